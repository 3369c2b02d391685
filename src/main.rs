use std::process::ExitCode;


use kinlink::cli::{init_logging, Cli, Command, ConfigAction};

fn main() -> ExitCode {
    let cli = Cli::parse_all();
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kinlink: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Config { action: ConfigAction::Check }) => config_check(&config),
        Some(Command::Token { family, user, device, ttl, key, kid, cnf_jwk }) => token(config, &family, &user, &device, ttl, key, kid, cnf_jwk),
        Some(Command::Keys { action }) => keys(action),
        Some(Command::Admin { url, token_file, action }) => admin(&config, url, token_file, &action),
        Some(Command::Healthcheck { urls, timeout }) => {
            let urls = if urls.is_empty() { vec![kinlink::probe::default_url(&config)] } else { urls };
            for url in &urls {
                match kinlink::probe::get(url, std::time::Duration::from_secs(timeout)) {
                    Ok(status) => println!("{url}: {status}"),
                    Err(e) => {
                        eprintln!("kinlink: healthcheck failed: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some(Command::Check { url, token, ca_file, timeout, skip_turn }) => check(config, url, token, ca_file, timeout, skip_turn),
        Some(Command::Serve { .. }) | None => serve(config),
    }
}

fn admin(config: &kinlink::Config, url: Option<String>, token_file: Option<std::path::PathBuf>, action: &kinlink::cli::AdminAction) -> ExitCode {
    let url = url.unwrap_or_else(|| format!("http://{}", config.admin.listen));
    let token = match token_file {
        Some(path) => kinlink::config::AdminConfig { token_file: Some(path), ..Default::default() }.token(),
        None => config.admin.token(),
    };
    let token = match token {
        Ok(Some(t)) => t,
        Ok(None) => {
            eprintln!("kinlink: admin: no token: set admin.token or admin.token_file, or pass --token-file");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("kinlink: admin: {e}");
            return ExitCode::from(2);
        }
    };
    if url == "http://" {
        eprintln!("kinlink: admin: admin.listen is not set: pass --url");
        return ExitCode::from(2);
    }
    let (method, path) = action.request();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kinlink: admin: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kinlink::admin::client::request(&url, token.expose(), method, &path)) {
        Ok((status, body)) => {
            println!("{body}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("kinlink: admin: HTTP {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("kinlink: admin: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: kinlink::Config) -> ExitCode {
    init_logging(&config);
    for var in &config.ignored_env {
        tracing::debug!(var, "environment variable ignored: a Kubernetes service link, not configuration");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kinlink: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let server = kinlink::Server::bind(config).await?;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = first_tx.send(());
            shutdown_signal().await;
            tracing::warn!("second shutdown signal: exiting now");
            std::process::exit(130);
        });
        server.run(async move { let _ = first_rx.await; }).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kinlink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `kinlink token`.
#[allow(clippy::too_many_arguments)]
fn token(
    mut config: kinlink::Config,
    family: &str,
    user: &str,
    device: &str,
    ttl: u64,
    key: Option<std::path::PathBuf>,
    kid: Option<String>,
    cnf_jwk: Option<String>,
) -> ExitCode {
    for (name, id) in [("--family", family), ("--user", user), ("--device", device)] {
        if !kinlink::auth::valid_id(id) {
            eprintln!("kinlink: {name}: ids are 1-{} printable ASCII characters without spaces or ':'", kinlink::auth::MAX_ID_BYTES);
            return ExitCode::from(2);
        }
    }
    let max = config.auth.max_token_ttl_secs;
    if ttl > max {
        eprintln!("kinlink: --ttl: {ttl} s is longer than auth.max_token_ttl_secs ({max} s): the server would refuse the token");
        return ExitCode::from(2);
    }
    let cnf_jwk = match cnf_jwk.map(|j| serde_json::from_str::<serde_json::Value>(&j)) {
        None => None,
        Some(Ok(v)) if v.is_object() && v.get("d").is_none() => Some(v),
        Some(_) => {
            eprintln!("kinlink: --cnf-jwk: not a public JWK (a JSON object without \"d\")");
            return ExitCode::from(2);
        }
    };
    let minted = kinlink::auth::Minted { fam: family, user, dev: device, ttl_secs: ttl, now_unix: kinlink::auth::unix_now(), cnf_jwk };
    if let Some(path) = key {
        let signing = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|pem| kinlink::auth::jwks::signing_key(&pem, kid).map_err(|e| e.to_string()));
        return match signing.and_then(|k| minted.with_key(&k).map_err(|e| e.to_string())) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kinlink: token: --key {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = kinlink::secrets::resolve_existing(&mut config) {
        eprintln!("kinlink: token: {e}");
        return ExitCode::FAILURE;
    }
    match kinlink::secrets::token_secrets(&config.auth) {
        Ok(secrets) => {
            println!("{}", minted.hs256(&secrets[0]));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kinlink: token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `kinlink keys`.
fn keys(action: kinlink::cli::KeysAction) -> ExitCode {
    use kinlink::auth::jwks;
    use kinlink::cli::KeysAction;
    let result = match action {
        KeysAction::Generate { alg, kid, out } => (|| {
            let alg = match alg.as_str() {
                "ES256" => jsonwebtoken::Algorithm::ES256,
                "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
                other => return Err(format!("--alg {other}: use ES256 or EdDSA")),
            };
            let pem = jwks::generate(alg).map_err(|e| e.to_string())?;
            write_private(&out, &pem).map_err(|e| format!("--out {}: {e}", out.display()))?;
            jwks::signing_key(pem.as_bytes(), Some(kid)).map_err(|e| e.to_string())
        })(),
        KeysAction::Jwks { key, kid } => std::fs::read(&key)
            .map_err(|e| format!("--key {}: {e}", key.display()))
            .and_then(|pem| jwks::signing_key(&pem, Some(kid)).map_err(|e| e.to_string())),
    };
    match result {
        Ok(k) => {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "keys": [k.public_jwk] })).expect("JSON"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kinlink: keys: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Creates `path` with mode 0600, refusing to overwrite.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?.write_all(text.as_bytes())
}

/// `kinlink config check`: the effective configuration, then what devices will be handed and
/// where each secret comes from; files the configuration names must exist.
fn config_check(config: &kinlink::Config) -> ExitCode {
    println!("# configuration is valid; effective values (secrets redacted):");
    print!("{}", config.to_redacted_toml());
    let env: Vec<(String, String)> = std::env::vars().collect();
    println!();
    println!("# What this configuration serves:");
    for line in kinlink::turn::advertised(config) {
        println!("#   {line}");
    }
    let p = config.auth.policy();
    println!("#   device tokens: {} (longest lifetime {} s)", p.algorithms().join(", "), p.max_ttl_secs);
    if config.auth.has_public_keys() && !p.hs256 {
        println!("#   kinlink's own HS256 secret signs only its self-check families: it cannot mint a device token");
    }
    for key in ["auth.token_secret", "turn.secret"] {
        println!("#   {key}: {}", kinlink::secrets::source(config, key, &env));
    }
    let mut missing = false;
    let files = [
        ("auth.token_secrets_file", &config.auth.token_secrets_file),
        ("auth.public_keys", &config.auth.public_keys),
        ("auth.public_keys_ca_file", &config.auth.public_keys_ca_file),
        ("turn.secrets_file", &config.turn.secrets_file),
        ("turn.tls_cert", &config.turn.tls_cert),
        ("turn.tls_key", &config.turn.tls_key),
        ("http.tls_cert", &config.http.tls_cert),
        ("http.tls_key", &config.http.tls_key),
        ("cluster.redis_ca_file", &config.cluster.redis_ca_file),
        ("cluster.redis_cert_file", &config.cluster.redis_cert_file),
        ("cluster.redis_key_file", &config.cluster.redis_key_file),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            if let Err(e) = std::fs::metadata(path) {
                eprintln!("kinlink: configuration error: {key}: cannot read {}: {e}", path.display());
                missing = true;
            }
        }
    }
    if missing { ExitCode::from(2) } else { ExitCode::SUCCESS }
}

fn check(
    mut config: kinlink::Config,
    url: Option<String>,
    token: Option<String>,
    ca_file: Option<std::path::PathBuf>,
    timeout: u64,
    skip_turn: bool,
) -> ExitCode {
    let url = url.unwrap_or_else(|| kinlink::probe::local_base(config.http.listen));
    // On the server host the token secret is at hand: configured, or generated earlier into
    // the data directory (never create one here: it would not be the server's).
    let token_secret = if token.is_some() {
        None
    } else if config.auth.token_secret.is_some() {
        config.auth.token_secret.clone()
    } else if config.data_dir.join("token_secret").exists() {
        kinlink::secrets::resolve(&mut config).ok().and(config.auth.token_secret.clone())
    } else {
        None
    };
    let opts =
        kinlink::check::client::CheckOptions { url, token, token_secret, ca_file, timeout: std::time::Duration::from_secs(timeout), skip_turn };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kinlink: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kinlink::check::client::run(&opts)) {
        Ok(report) => {
            print!("{}", report.render());
            if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("kinlink: check: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
