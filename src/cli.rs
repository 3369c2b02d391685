//! The `kinlink` command line: `serve` (the default), `token`, `config check`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, LogFormat};

/// kinlink: signaling relay and TURN/STUN server for families of devices.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML configuration file (layered over the defaults, under KINLINK_* environment variables).
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override any key, e.g. `--set signal.max_frame_bytes=32768` (repeatable; wins over file and env).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// Shorthand for `--set data_dir=DIR`.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve {
        /// Shorthand for `--set http.listen=ADDR`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Shorthand for `--set metrics.listen=ADDR`.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Print a device token: HS256 with the server's token secret, or (`--key`) ES256/EdDSA
    /// with a private key, for development against `auth.public_keys`.
    Token {
        /// Family id.
        #[arg(long)]
        family: String,
        /// User id.
        #[arg(long)]
        user: String,
        /// Device id.
        #[arg(long)]
        device: String,
        /// Lifetime: seconds, or a number with s, m, h or d (e.g. 30d); at most
        /// auth.max_token_ttl_secs (the server refuses longer ones).
        #[arg(long, default_value = "30d", value_parser = parse_duration_secs)]
        ttl: u64,
        /// Sign with this PKCS#8 PEM private key (P-256: ES256, Ed25519: EdDSA) instead of
        /// the HS256 secret.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// The `kid` header (with --key): the key's id in the server's JWKS.
        #[arg(long)]
        kid: Option<String>,
        /// The device's public key as a JWK (JSON), carried in the `cnf` claim for device
        /// identity.
        #[arg(long, value_name = "JSON")]
        cnf_jwk: Option<String>,
    },
    /// Signing keys for development: `generate` writes a private key and prints its public
    /// JWKS (for `auth.public_keys`); `jwks` prints the JWKS of an existing private key.
    Keys {
        /// What to do.
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Exit 0 when kinlink answers 200 (default: this configuration's /readyz on loopback);
    /// for container HEALTHCHECKs and `helm test`.
    Healthcheck {
        /// URL to GET (repeatable; every one must answer 200).
        #[arg(long = "url")]
        urls: Vec<String>,
        /// Seconds to wait for each answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Check a running kinlink end to end without a browser: signaling, presence, offer/answer
    /// relay, and a datagram relayed between two allocations on every TURN URL it hands out.
    /// Exits non-zero on any failure (a Helm test, a monitoring probe).
    Check {
        /// Base URL of the public listener (default: this configuration's http.listen on loopback).
        url: Option<String>,
        /// A device token, exchanged for throw-away check tokens. Without one, tokens are minted
        /// with this configuration's auth.token_secret when it is available.
        #[arg(long)]
        token: Option<String>,
        /// Extra CA certificate (PEM) to trust for https://, wss:// and turns:.
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        /// Seconds to wait for each step.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Check signaling only (e.g. from inside a cluster that cannot reach TURN's public address).
        #[arg(long)]
        skip_turn: bool,
    },
    /// Drive the admin API of a running kinlink (admin.listen): list a family's devices,
    /// disconnect a device, revoke a device or family. The token is this configuration's
    /// admin.token (or admin.token_file), or --token-file; the answer is printed as JSON.
    Admin {
        /// Base URL of the admin listener (default: this configuration's admin.listen).
        #[arg(long)]
        url: Option<String>,
        /// A file holding the admin token.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// What to do.
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Configuration tools.
    Config {
        /// What to do with the configuration.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `kinlink keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Write a new private key (mode 0600) and print the JWKS with its public key.
    Generate {
        /// ES256 (P-256) or EdDSA (Ed25519).
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// The key id.
        #[arg(long)]
        kid: String,
        /// Where to write the private key (PKCS#8 PEM); refuses to overwrite.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the JWKS with the public key of a private key file.
    Jwks {
        /// PKCS#8 PEM private key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The key id.
        #[arg(long)]
        kid: String,
    },
}

/// `kinlink admin ...`
#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// The family's online devices (node, since) and the route of each pair.
    Devices {
        /// Family id.
        family: String,
    },
    /// Close a device's connection (close code 4001); it may reconnect.
    Disconnect {
        /// Family id.
        family: String,
        /// Device id.
        device: String,
    },
    /// Revoke every token of a device issued until now (closed with 4410 on every node).
    RevokeDevice {
        /// Family id.
        family: String,
        /// Device id.
        device: String,
    },
    /// Revoke every token of a family issued until now.
    RevokeFamily {
        /// Family id.
        family: String,
    },
    /// The revocations in force.
    Revocations,
}

impl AdminAction {
    /// The API request: method and path.
    pub fn request(&self) -> (&'static str, String) {
        match self {
            AdminAction::Devices { family } => ("GET", format!("/v1/families/{family}/devices")),
            AdminAction::Disconnect { family, device } => ("POST", format!("/v1/families/{family}/devices/{device}/disconnect")),
            AdminAction::RevokeDevice { family, device } => ("POST", format!("/v1/families/{family}/devices/{device}/revoke")),
            AdminAction::RevokeFamily { family } => ("POST", format!("/v1/families/{family}/revoke")),
            AdminAction::Revocations => ("GET", "/v1/revocations".to_string()),
        }
    }
}

/// `kinlink config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate the configuration and print the effective values, secrets redacted.
    Check,
}

impl Cli {
    /// Parses the command line. Every `--set` counts, wherever it is: clap keeps only the
    /// occurrences after the subcommand when a global option is given on both sides, and
    /// `kinlink --set a=1 serve --set b=2` must not silently drop `a=1`.
    pub fn parse_all() -> Cli {
        Cli::parse_all_from(std::env::args_os())
    }

    /// [`Cli::parse_all`] over `args` (the program name first).
    pub fn parse_all_from<I, T>(args: I) -> Cli
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut cli = <Cli as clap::Parser>::parse_from(&args);
        let mut sets = Vec::new();
        let mut it = args.iter().skip(1).map(|a| a.to_string_lossy().into_owned());
        while let Some(arg) = it.next() {
            if arg == "--" {
                break;
            }
            let value = match arg.strip_prefix("--set") {
                Some("") => it.next(),
                Some(rest) => rest.strip_prefix('=').map(str::to_string),
                None => None,
            };
            // clap has validated every occurrence already.
            if let Some(Ok(kv)) = value.as_deref().map(parse_set) {
                sets.push(kv);
            }
        }
        if sets.len() > cli.set.len() {
            cli.set = sets;
        }
        cli
    }
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    Ok((k.trim().to_string(), v.to_string()))
}

/// Parses `90`, `90s`, `15m`, `12h`, `30d` into seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 3600, 90m, 12h or 30d"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("`{s}` must be a positive duration")),
        Some(secs) => Ok(secs),
    }
}

impl Cli {
    /// Loads the configuration with this command line's overrides applied last.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut overrides = Vec::new();
        if let Some(dir) = &self.data_dir {
            overrides.push(("data_dir".to_string(), dir.clone()));
        }
        if let Some(Command::Serve { listen, metrics_listen }) = &self.command {
            if let Some(l) = listen {
                overrides.push(("http.listen".into(), l.clone()));
            }
            if let Some(m) = metrics_listen {
                overrides.push(("metrics.listen".into(), m.clone()));
            }
        }
        overrides.extend(self.set.iter().cloned());
        config::load(self.config.as_deref(), &overrides)
    }
}

/// Targets that log payloads (and so tokens) below info, and rustls, which warns once per
/// handshake about what a client sent (an IP address as SNI — every libwebrtc `turns:` client
/// given an IP URL does that): a rate any client controls, already counted by
/// `kinlink_turn_tls_handshake_failures_total` when it matters.
const NEVER_TRACED: [&str; 3] = ["tungstenite=info", "tokio_tungstenite=info", "rustls=error"];

/// Installs the tracing subscriber for `log.*`. `RUST_LOG`, when set, wins over `log.level`.
pub fn init_logging(cfg: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| f.parse::<tracing_subscriber::EnvFilter>().ok())
        .unwrap_or_else(|| cfg.log.level.parse().unwrap_or_else(|_| "info".into()));
    // tungstenite traces whole frames, `register` and its token included: its targets are
    // capped at info whatever the filter says, so no level logs a token. rustls is capped at
    // error: its per-handshake warnings are paced by clients.
    let filter = NEVER_TRACED.iter().fold(filter, |f, d| f.add_directive(d.parse().expect("built-in directive")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_counts_on_both_sides_of_the_subcommand() {
        let cli = Cli::parse_all_from(["kinlink", "--set", "a=1", "serve", "--set", "b=2", "--set=c=3", "--listen", "127.0.0.1:0"]);
        let keys: Vec<&str> = cli.set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        let cli = Cli::parse_all_from(["kinlink", "serve", "--set", "b=2"]);
        assert_eq!(cli.set, vec![("b".to_string(), "2".to_string())]);
        let cli = Cli::parse_all_from(["kinlink", "--set", "a=1", "serve"]);
        assert_eq!(cli.set, vec![("a".to_string(), "1".to_string())]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("15m"), Ok(900));
        assert!(parse_duration_secs("0").is_err());
        assert!(parse_duration_secs("soon").is_err());
        assert!(parse_duration_secs("99999999999999999d").is_err());
    }
}
