//! Layered configuration: built-in defaults, then an optional TOML file, then `KINLINK_`
//! environment variables (nested keys joined with `__`), then command-line overrides.
//!
//! Unknown keys are an error and every error names the key it is about, so a typo in a
//! file or a variable fails start-up instead of being silently ignored.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A configuration error; the message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, environment or overrides could not be read or merged.
    #[error("{0}")]
    Source(String),
    /// A key has a value of the wrong type or an unknown name.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key path, e.g. `signal.max_frame_bytes`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.to_string(), message: message.into() }
    }
}

/// A secret string. `Debug` and `Serialize` never show its value, so printing the effective
/// configuration or logging a struct that holds one cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret bytes, for keying a MAC.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Listener addresses: one, several separated by commas (e.g. IPv4 and IPv6:
/// `"0.0.0.0:3478,[::]:3478"`), or `"off"` (or `""`) for none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listen(pub Vec<SocketAddr>);

impl Listen {
    /// One address.
    pub fn one(addr: SocketAddr) -> Self {
        Listen(vec![addr])
    }

    /// The first address, whose port goes into advertised URLs.
    pub fn first(&self) -> Option<SocketAddr> {
        self.0.first().copied()
    }

    /// The IPv4 wildcard and the IPv6 wildcard on `port`.
    fn dual(port: u16) -> Self {
        Listen(vec![(std::net::Ipv4Addr::UNSPECIFIED, port).into(), (std::net::Ipv6Addr::UNSPECIFIED, port).into()])
    }
}

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            return s.serialize_str("off");
        }
        s.serialize_str(&self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join(","))
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim() {
            "" | "off" => Ok(Listen(Vec::new())),
            list => list
                .split(',')
                .map(|a| {
                    let a = a.trim();
                    a.parse().map_err(|_| {
                        serde::de::Error::custom(format!("`{a}` is not an address like 0.0.0.0:3478 or [::]:3478, or \"off\""))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Listen),
        }
    }
}

/// `turn.public_ip`: the address relayed addresses are advertised on, given, or discovered by
/// asking a STUN server what this host's address looks like from outside (cloud 1:1 NAT,
/// `hostNetwork` on a node with a private VPC address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicIp {
    /// This address.
    Fixed(std::net::IpAddr),
    /// Discovered by a STUN Binding request to this `host:port`, at start and periodically.
    Stun(String),
}

impl PublicIp {
    /// The fixed address, if it is one.
    pub fn fixed(&self) -> Option<std::net::IpAddr> {
        match self {
            PublicIp::Fixed(ip) => Some(*ip),
            PublicIp::Stun(_) => None,
        }
    }
}

impl fmt::Display for PublicIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicIp::Fixed(ip) => write!(f, "{ip}"),
            PublicIp::Stun(server) => write!(f, "stun:{server}"),
        }
    }
}

impl std::str::FromStr for PublicIp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(server) = s.strip_prefix("stun:") {
            // host:port, [v6]:port, or a host alone (port 3478).
            let with_port = match server.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && !host.ends_with(':') && port.parse::<u16>().is_ok_and(|p| p > 0) => server.to_string(),
                _ if !server.is_empty() && !server.contains(':') => format!("{server}:3478"),
                _ if server.starts_with('[') && server.ends_with(']') => format!("{server}:3478"),
                _ => return Err(format!("`{s}` is not stun:HOST:PORT (e.g. stun:stun.example.org:3478)")),
            };
            return Ok(PublicIp::Stun(with_port));
        }
        s.parse().map(PublicIp::Fixed).map_err(|_| format!("`{s}` is neither an IP address nor stun:HOST:PORT"))
    }
}

impl Serialize for PublicIp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PublicIp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// An IP and port, with an error that says what is accepted (`localhost:8080` once got only
/// "invalid socket address syntax").
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.trim().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{s}` is not an address like 0.0.0.0:8080, 127.0.0.1:8080 or [::]:8080 (an IP and a port; host names such as localhost are not accepted)"
        ))
    })
}

/// The whole configuration. Every limit has a default; see `deploy/kinlink.example.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where generated secrets are kept (created 0700, files 0600).
    pub data_dir: PathBuf,
    /// The public HTTP + WebSocket listener.
    pub http: HttpConfig,
    /// The Prometheus listener.
    pub metrics: MetricsConfig,
    /// Device token verification.
    pub auth: AuthConfig,
    /// TURN credentials and the ICE servers handed to devices.
    pub turn: TurnConfig,
    /// Signaling limits.
    pub signal: SignalConfig,
    /// Logging.
    pub log: LogConfig,
    /// Draining on SIGTERM.
    pub shutdown: ShutdownConfig,
    /// `[cluster]`: several nodes sharing presence and routing through Redis.
    pub cluster: ClusterConfig,
    /// The `/check` self-check page.
    pub check: CheckConfig,
    /// `[acme]`: certificates obtained and renewed automatically.
    pub acme: AcmeConfig,
    /// `[admin]`: the session API (list, disconnect, revoke) on its own listener.
    pub admin: AdminConfig,
    /// `KINLINK_*` environment variables that were not configuration but Kubernetes
    /// service links (logged at debug once logging is up). Not a key.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// `acme.*`: the HTTPS (and shared-port `turns:`) certificate from an ACME CA, validated by
/// TLS-ALPN-01 on `http.listen` itself (no port 80), cached in `data_dir` and renewed before
/// expiry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    /// Names to obtain one certificate for. Empty: ACME is off.
    pub domains: Vec<String>,
    /// Contacts for the account, e.g. `mailto:ops@example.org`.
    pub contact: Vec<String>,
    /// The CA's directory URL (default Let's Encrypt).
    pub directory: String,
    /// Extra roots (PEM) to trust for the directory's HTTPS, e.g. a private ACME server's.
    pub ca_file: Option<PathBuf>,
}

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig { domains: Vec::new(), contact: Vec::new(), directory: LETS_ENCRYPT.into(), ca_file: None }
    }
}

impl AcmeConfig {
    /// Whether certificates come from ACME.
    pub fn enabled(&self) -> bool {
        !self.domains.is_empty()
    }
}

/// `check.*`: the self-check page at `/check` and the throw-away tokens it uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    /// Serve `/check` and `POST /v1/check/tokens`.
    pub enabled: bool,
    /// Mint check tokens without a device token. Anyone reaching the server can then
    /// register throw-away devices and use TURN: for trying a deployment out, not for production.
    pub demo: bool,
    /// Lifetime of the minted tokens, in seconds.
    pub token_ttl_secs: u64,
    /// Check token pairs minted per minute, server-wide.
    pub tokens_per_minute: u32,
    /// Check token pairs one device token may mint per hour.
    pub mints_per_token_per_hour: u32,
    /// Check token pairs one source IP may mint per minute.
    pub mints_per_ip_per_minute: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig { enabled: true, demo: false, token_ttl_secs: 600, tokens_per_minute: 30, mints_per_token_per_hour: 20, mints_per_ip_per_minute: 6 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./kinlink-data"),
            http: HttpConfig::default(),
            metrics: MetricsConfig::default(),
            auth: AuthConfig::default(),
            turn: TurnConfig::default(),
            signal: SignalConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
            cluster: ClusterConfig::default(),
            check: CheckConfig::default(),
            acme: AcmeConfig::default(),
            admin: AdminConfig::default(),
            ignored_env: Vec::new(),
        }
    }
}

/// `http.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP + WebSocket listener.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Seconds a client has to send a whole request head (and, between keep-alive requests,
    /// to start the next one) before the connection is closed: the slowloris bound.
    pub header_read_timeout_secs: u64,
    /// Connections not (yet) upgraded to a WebSocket, server-wide; past it new connections
    /// are closed at once. Open WebSockets count in `signal.max_connections` instead.
    pub max_unupgraded_connections: usize,
    /// Connections not (yet) upgraded to a WebSocket from one source IP.
    pub max_unupgraded_per_ip: usize,
    /// All connections (WebSockets included) from one source IP. A carrier-grade NAT puts
    /// many households behind one address, so this is high; it stops one host, not one NAT.
    pub max_connections_per_ip: usize,
    /// PEM certificate chain: with `tls_key`, `http.listen` serves HTTPS and WSS (reloaded
    /// when the files change or on SIGHUP).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Origins (`https://app.example.com`) whose pages may call the JSON endpoints
    /// (`/v1/ice-servers`, `/v1/check/tokens`) from a browser; `*` for any. Default none.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: ([0, 0, 0, 0], 8080).into(),
            header_read_timeout_secs: 10,
            max_unupgraded_connections: 4096,
            max_unupgraded_per_ip: 64,
            max_connections_per_ip: 1024,
            tls_cert: None,
            tls_key: None,
            cors_origins: Vec::new(),
        }
    }
}

/// `admin.*`: the operators' session API, off unless `listen` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener ("" = off). Plain HTTP, so loopback unless
    /// `allow_remote`.
    pub listen: String,
    /// The bearer token the API asks for (at least 32 characters); or `token_file`.
    pub token: Option<Secret>,
    /// A file holding the token (a mounted Kubernetes Secret), read at start.
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback `listen` in plain HTTP: only behind a TLS-terminating proxy or
    /// inside a network policy.
    pub allow_remote: bool,
}

impl AdminConfig {
    /// The admin listener's address, when the API is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        (!self.listen.is_empty()).then(|| self.listen.parse().ok()).flatten()
    }

    /// The token: `token`, or the first secret of `token_file` (read as the other secrets
    /// files are: blank lines and `#` comments skipped).
    pub fn token(&self) -> Result<Option<Secret>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(path) = &self.token_file else { return Ok(None) };
        Ok(crate::auth::keys::read_secrets(path)?.into_iter().next())
    }
}

/// `metrics.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the metrics listener; the empty string serves `/metrics` on `http.listen`.
    pub listen: String,
    /// Relayed payload bytes per second (both directions) this node is sized for; exported as
    /// `kinlink_turn_relay_capacity_bytes_per_second` so an alert can fire near it.
    pub relay_capacity_bytes_per_sec: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        // 1 Gbit/s: a common NIC, and well under what one kinlink process relays (BENCHMARKS.md).
        MetricsConfig { listen: "0.0.0.0:9090".into(), relay_capacity_bytes_per_sec: 125_000_000 }
    }
}

impl MetricsConfig {
    /// The separate metrics listener, if one is configured.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        // Validated at load time, so a parse failure here cannot happen.
        (!self.listen.is_empty()).then(|| self.listen.parse().ok()).flatten()
    }
}

/// `auth.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 key for device tokens. Generated into `data_dir` when unset (and then, with
    /// public keys configured, used only for kinlink's own self-check tokens).
    pub token_secret: Option<Secret>,
    /// HS256 secrets, one a line, instead of `token_secret`: the first mints, every one is
    /// accepted (rotation without logging anyone out). Reloaded on change or SIGHUP.
    pub token_secrets_file: Option<PathBuf>,
    /// JWKS file of the backend's public keys (ES256 P-256, EdDSA Ed25519): tokens kinlink can
    /// verify but not mint. Reloaded on change or SIGHUP.
    pub public_keys: Option<PathBuf>,
    /// An https URL serving the backend's JWKS, fetched every `public_keys_refresh_secs`.
    pub public_keys_url: String,
    /// Extra CA certificates (PEM) trusted for `public_keys_url`.
    pub public_keys_ca_file: Option<PathBuf>,
    /// Seconds between fetches of `public_keys_url`.
    pub public_keys_refresh_secs: u64,
    /// How long keys from `public_keys_url` stay usable after its last good answer.
    pub public_keys_max_stale_secs: u64,
    /// Accepted token algorithms (HS256, ES256, EdDSA, RS256). Empty: HS256 without public
    /// keys; ES256 and EdDSA with them (HS256 is then off for devices unless listed).
    pub algorithms: Vec<String>,
    /// Longest token lifetime accepted (`exp` from now and from `iat`); revocations are kept
    /// this long.
    pub max_token_ttl_secs: u64,
    /// Clock skew tolerated on `exp`/`nbf`/`iat`, in seconds.
    pub token_leeway_secs: u64,
    /// Seconds between checks of the key and secret files for changes (SIGHUP reloads at once).
    pub reload_poll_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_secret: None,
            token_secrets_file: None,
            public_keys: None,
            public_keys_url: String::new(),
            public_keys_ca_file: None,
            public_keys_refresh_secs: 300,
            public_keys_max_stale_secs: 86_400,
            algorithms: Vec::new(),
            max_token_ttl_secs: crate::auth::token::DEFAULT_MAX_TTL_SECS,
            token_leeway_secs: 60,
            reload_poll_secs: 10,
        }
    }
}

impl AuthConfig {
    /// Whether backend public keys are configured.
    pub fn has_public_keys(&self) -> bool {
        self.public_keys.is_some() || !self.public_keys_url.is_empty()
    }

    /// The token policy these settings describe (`algorithms` validated at load).
    pub fn policy(&self) -> crate::auth::TokenPolicy {
        let listed = |a: &str| self.algorithms.iter().any(|x| x == a);
        let derived = self.algorithms.is_empty();
        let public = self.has_public_keys();
        crate::auth::TokenPolicy {
            leeway_secs: self.token_leeway_secs,
            max_ttl_secs: self.max_token_ttl_secs,
            hs256: if derived { !public } else { listed("HS256") },
            es256: if derived { public } else { listed("ES256") },
            eddsa: if derived { public } else { listed("EdDSA") },
            rs256: listed("RS256"),
        }
    }
}

/// Algorithms `auth.algorithms` may list.
pub const TOKEN_ALGORITHMS: [&str; 4] = ["HS256", "ES256", "EdDSA", "RS256"];

/// `turn.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Whether kinlink advertises (and, with the TURN server, runs) its own STUN/TURN.
    pub enabled: bool,
    /// Shared secret for TURN REST credentials (coturn's `static-auth-secret`).
    pub secret: Option<Secret>,
    /// TURN secrets, one a line, instead of `secret`: credentials are minted with the first
    /// and accepted with any (eturnal's rotation model). Reloaded on change or SIGHUP.
    pub secrets_file: Option<PathBuf>,
    /// TURN realm.
    pub realm: String,
    /// Host name or IP put in the ICE URLs; empty means the Host header of the request.
    pub public_host: String,
    /// Lifetime of the TURN credentials handed to a device.
    pub credential_ttl_secs: u64,
    /// UDP listeners for STUN/TURN (the first one's port goes in `turn:...?transport=udp`),
    /// or "off". Default: IPv4 and IPv6 (the IPv6 wildcard is skipped where IPv6 is off).
    pub udp_listen: Listen,
    /// TCP listeners for STUN/TURN (the first port goes in `turn:...?transport=tcp`), or "off".
    pub tcp_listen: Listen,
    /// TLS listeners (`turns:`), or "off"; used only when `tls_cert` and `tls_key` are set.
    pub tls_listen: Listen,
    /// PEM certificate chain for `turns:`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `turns:`.
    pub tls_key: Option<PathBuf>,
    /// Explicit ICE URLs (e.g. an external coturn sharing `turn.secret`); replaces the derived ones.
    pub urls: Vec<String>,
    /// IP advertised in XOR-RELAYED-ADDRESS (behind NAT, Kubernetes), or `stun:HOST:PORT` to
    /// discover it; empty: the relay socket's.
    pub public_ip: Option<PublicIp>,
    /// With `public_ip = "stun:…"`: seconds between checks that the discovered address still holds.
    pub public_ip_refresh_secs: u64,
    /// Put this node's public address (`public_ip`, given or discovered) in the STUN/TURN
    /// URLs instead of `public_host`: with several replicas each on its node's network, a
    /// device's URLs then reach the node it registered on. (`turns:` needs a certificate for
    /// that IP.)
    pub advertise_ip: bool,
    /// Relay port range, `"low-high"`.
    pub relay_ports: String,
    /// CIDRs peers may be in even when the defaults deny them (e.g. `10.0.0.0/8` on a LAN).
    pub allowed_peers: Vec<String>,
    /// CIDRs peers may never be in; wins over `allowed_peers`.
    pub denied_peers: Vec<String>,
    /// Longest allocation lifetime granted, in seconds.
    pub max_lifetime_secs: u64,
    /// How long a nonce stays valid, in seconds (then 438 Stale Nonce).
    pub nonce_lifetime_secs: u64,
    /// Seconds between checks of the certificate files (`tls_cert`/`tls_key`, HTTPS's, the
    /// client certificate for Redis) for changes (SIGHUP reloads at once).
    pub tls_reload_poll_secs: u64,
    /// Kernel receive/send buffer of the UDP listener, which every client shares. 1 MiB
    /// absorbs bursts without loss at every benchmark point where coturn has none; 4 MiB
    /// lost no fewer packets under overload and quadrupled the queueing delay (BENCHMARKS.md).
    pub socket_buffer_bytes: usize,
    /// Kernel receive/send buffer of each relay socket (one allocation's peer traffic).
    /// Smaller than the listener's: under overload a deep queue only adds delay (at 30k
    /// packets/s a 4 MiB queue holds ~150 ms), and 10,000 allocations must not be able to pin
    /// gigabytes of kernel memory.
    pub relay_socket_buffer_bytes: usize,
    /// Open TCP/TLS client connections.
    pub max_stream_connections: usize,
    /// Open TCP/TLS client connections from one source IP.
    pub max_stream_connections_per_ip: usize,
    /// Seconds a TCP/TLS client has to finish the TLS handshake and send its first complete
    /// STUN message, and to complete any frame it has started.
    pub handshake_timeout_secs: u64,
    /// Seconds a TCP/TLS client may send no complete frame before it is closed. Longer than
    /// the 300 s permission lifetime every live client refreshes within.
    pub stream_idle_timeout_secs: u64,
    /// Bytes of relayed data queued for one TCP/TLS client that reads slowly; past it relayed
    /// data for that client is dropped (counted `queue_full`).
    pub stream_queue_bytes: usize,
    /// Threads relaying UDP ("shards"), each with its own socket on every UDP listener
    /// address and its own relay sockets; 0 is one per CPU the process may use.
    pub data_threads: usize,
    /// Requests without valid credentials (Binding, the 401 challenge leg, refused ones)
    /// answered per second per source IP (IPv6 per /64), burst twice that; past it they are
    /// dropped unanswered. 0 disables. Bounds floods and reflection (a 401 is 5x a request).
    pub unauthenticated_per_ip_per_sec: u32,
    /// Quotas.
    pub quota: TurnQuota,
    /// Set at start-up when no `tls_cert` is configured but the ACME certificate serves
    /// `turns:` on the port shared with `http.listen`. Not a key.
    #[serde(skip)]
    pub tls_by_acme: bool,
}

/// `turn.quota.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnQuota {
    /// Allocations one family may hold.
    pub family_allocations: usize,
    /// Allocations one device may hold.
    pub device_allocations: usize,
    /// Allocations on this server.
    pub total_allocations: usize,
    /// Allocations all self-check (`/check`, `kinlink check`) families hold together.
    pub check_allocations: usize,
    /// Peer IPs one allocation may have permissions for.
    pub permissions_per_allocation: usize,
    /// Channels one allocation may bind.
    pub channels_per_allocation: usize,
    /// Relayed bytes per second per family (both directions); 0 is unlimited.
    pub family_bytes_per_sec: u64,
}

impl Default for TurnQuota {
    fn default() -> Self {
        TurnQuota {
            // libwebrtc holds one allocation per TURN URL, per network, per peer connection.
            // With the three URLs kinlink hands out, a device of a family of 5 on Wi-Fi and
            // cellular needs 3 × 2 × 4 = 24; the family 5 × 24 = 120. See docs/security.md.
            family_allocations: 120,
            device_allocations: 24,
            total_allocations: 10_000,
            // One check is two devices × three URLs × one network.
            check_allocations: 24,
            permissions_per_allocation: 64,
            channels_per_allocation: 64,
            family_bytes_per_sec: 0,
        }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            enabled: true,
            secret: None,
            secrets_file: None,
            realm: "kinlink".into(),
            public_host: String::new(),
            credential_ttl_secs: 86_400,
            udp_listen: Listen::dual(3478),
            tcp_listen: Listen::dual(3478),
            tls_listen: Listen::dual(5349),
            tls_cert: None,
            tls_key: None,
            urls: Vec::new(),
            public_ip: None,
            public_ip_refresh_secs: 300,
            advertise_ip: false,
            relay_ports: "49152-65535".into(),
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            max_lifetime_secs: 3600,
            nonce_lifetime_secs: 600,
            tls_reload_poll_secs: 10,
            socket_buffer_bytes: 1024 * 1024,
            relay_socket_buffer_bytes: 256 * 1024,
            max_stream_connections: 10_000,
            max_stream_connections_per_ip: 256,
            handshake_timeout_secs: 10,
            stream_idle_timeout_secs: 360,
            unauthenticated_per_ip_per_sec: 200,
            stream_queue_bytes: 512 * 1024,
            data_threads: 0,
            quota: TurnQuota::default(),
            tls_by_acme: false,
        }
    }
}

impl TurnConfig {
    /// The number of UDP data-path shards: `data_threads`, or one per CPU this process may
    /// run on (its affinity mask and cgroup quota, as `available_parallelism` reads them).
    pub fn shards(&self) -> usize {
        match self.data_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// True when `turns:` is served: both TLS files are configured (or the ACME certificate
    /// serves it on the shared port) and the TLS listener is on.
    pub fn tls_enabled(&self) -> bool {
        ((self.tls_cert.is_some() && self.tls_key.is_some()) || self.tls_by_acme) && !self.tls_listen.0.is_empty()
    }

    /// `relay_ports` as an inclusive range; validated at load time.
    pub fn relay_port_range(&self) -> Option<(u16, u16)> {
        let (lo, hi) = self.relay_ports.split_once('-')?;
        let (lo, hi) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
        (lo <= hi && lo > 0).then_some((lo, hi))
    }
}

/// `signal.*`: every limit of the signaling relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalConfig {
    /// Largest accepted text frame; larger ones get `too-large`.
    pub max_frame_bytes: usize,
    /// Frames past this many bytes are not even buffered: `too-large`, then close 1009.
    pub hard_max_frame_bytes: usize,
    /// Sustained messages per second per connection (token bucket refill).
    pub rate_per_sec: f64,
    /// Token bucket size: the burst a connection may send at once.
    pub rate_burst: u32,
    /// Rate-limited messages in a row before the connection is closed (4429).
    pub rate_strikes: u32,
    /// Devices one family may have online at once.
    pub max_devices_per_family: usize,
    /// Registered devices on this node; past it `register` gets `server-full`.
    pub max_devices: usize,
    /// Open WebSocket connections; past it the upgrade is answered 503.
    pub max_connections: usize,
    /// Seconds a connection has to send `register`.
    pub register_timeout_secs: u64,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Unanswered pings before the connection is dropped.
    pub max_missed_pongs: u32,
    /// Seconds without any application message (either way) before closing; 0 disables.
    pub idle_timeout_secs: u64,
    /// Messages queued for one device before further ones are refused with `rate-limited`.
    pub outbound_queue: usize,
    /// Bytes queued for one device (a slow reader) before further messages are refused.
    pub outbound_queue_bytes: usize,
    /// Seconds a write to a client may block before the connection is dropped.
    pub write_timeout_secs: u64,
    /// Seconds after a relayed offer within which a `p2p-status` report must arrive, or the
    /// negotiation counts as `abandoned`.
    pub negotiation_timeout_secs: u64,
    /// Seconds a "direct" report without the remote candidate type waits for the other
    /// side's report (which makes it `relay` if that side's end is a relay candidate).
    pub negotiation_settle_secs: u64,
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            max_frame_bytes: 64 * 1024,
            hard_max_frame_bytes: 256 * 1024,
            rate_per_sec: 50.0,
            rate_burst: 200,
            rate_strikes: 100,
            max_devices_per_family: 32,
            max_devices: 100_000,
            max_connections: 100_000,
            register_timeout_secs: 10,
            ping_interval_secs: 25,
            max_missed_pongs: 2,
            idle_timeout_secs: 3600,
            outbound_queue: 256,
            outbound_queue_bytes: 1024 * 1024,
            write_timeout_secs: 10,
            negotiation_timeout_secs: 120,
            negotiation_settle_secs: 10,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // By hand: the config crate's enum errors name neither the value nor the choices.
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(serde::de::Error::custom(format!("`{s}` is not a log format: use `text` or `json`"))),
        }
    }
}

/// `log.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `kinlink=debug,tower=warn`, ...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

/// `shutdown.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds to wait for devices to leave after SIGTERM before exiting anyway.
    pub grace_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_secs: 10 }
    }
}

/// `cluster.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS); `redis-cluster://…`,
    /// `redis-sentinel://…?sentinelServiceName=NAME` (and their `rediss` forms). Unset: a single node,
    /// no Redis. Holds a password: never logged.
    pub redis_url: Option<Secret>,
    /// This node's name in the cluster; unset: the host name (the pod name on Kubernetes).
    pub node_id: String,
    /// Seconds after which a node that stopped heartbeating is declared gone and its devices
    /// offline; it heartbeats every third of it.
    pub presence_ttl_secs: u64,
    /// PEM CA certificates trusted for `rediss://` besides the public (Web PKI) roots: the
    /// private CA of a self-hosted Redis.
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate (and `redis_key_file`, its key) for a Redis that asks for one
    /// (`tls-auth-clients yes`, Redis' default with TLS).
    pub redis_cert_file: Option<PathBuf>,
    /// PEM private key of `redis_cert_file`.
    pub redis_key_file: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { redis_url: None, node_id: String::new(), presence_ttl_secs: 15, redis_ca_file: None, redis_cert_file: None, redis_key_file: None }
    }
}

impl ClusterConfig {
    /// `node_id`, or the host name, or a random name.
    pub fn node(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
        });
        host.unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()))
    }
}

/// Keys whose environment-variable form is a comma-separated list.
const LIST_KEYS: &[&str] = &["auth.algorithms", "turn.urls", "turn.allowed_peers", "turn.denied_peers", "http.cors_origins", "acme.domains", "acme.contact"];

/// Loads the configuration: defaults, then `file`, then the process environment, then
/// `overrides` (`key`, `value`) pairs from the command line.
pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Config, ConfigError> {
    load_with_env(file, overrides, std::env::vars())
}

/// [`load`] with an explicit environment, for tests.
pub fn load_with_env(
    file: Option<&Path>,
    overrides: &[(String, String)],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        // Read here, not by the config crate, so every I/O error names the file (a
        // permission error once said only "Permission denied (os error 13)").
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConfigError::Source(format!("config file {} does not exist", path.display())),
            std::io::ErrorKind::PermissionDenied => ConfigError::Source(format!(
                "config file {}: permission denied for this user (under systemd's DynamicUser= the file must be world-readable; keep secrets in the environment file)",
                path.display()
            )),
            _ => ConfigError::Source(format!("config file {}: {e}", path.display())),
        })?;
        drop(text);
        // From the path (not the text just read), so values remember which file they are from.
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    // Only variables that name a key are configuration. Kubernetes injects service links for
    // every Service in the namespace (`KINLINK_SERVICE_HOST`, `KINLINK_TURN_PORT=tcp://…`
    // for a release named kinlink): those are set aside; anything else unknown is an error.
    let known = known_keys();
    let mut env_map = config::Map::new();
    let mut ignored_env = Vec::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("KINLINK_") else { continue };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        if known.contains(&key) {
            // An empty variable counts as unset: compose files and charts pass `${X:-}` through.
            if !v.is_empty() {
                env_map.insert(k, v);
            }
        } else if is_service_link(&k) {
            ignored_env.push(k);
        } else {
            return Err(ConfigError::invalid(&key, format!("unknown key (environment variable {k}); see deploy/kinlink.example.toml")));
        }
    }
    let mut environment = config::Environment::with_prefix("KINLINK")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .source(Some(env_map));
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    builder = builder.add_source(environment);
    for (key, value) in overrides {
        builder = if LIST_KEYS.contains(&key.as_str()) {
            let items: Vec<String> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
            builder.set_override(key.as_str(), items)
        } else {
            builder.set_override(key.as_str(), value.as_str())
        }
        .map_err(|e| ConfigError::invalid(key, e.to_string()))?;
    }
    let merged = builder.build().map_err(|e| ConfigError::Source(e.to_string()))?;
    let lookup = merged.clone();
    let cfg: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = e.path().to_string();
        let mut message = e.into_inner().to_string();
        if key == "." {
            return ConfigError::Source(message);
        }
        // Say which value was refused and where it was set: a file, the environment, or a
        // command-line override.
        if let Some(value) = raw_value(&lookup, &key) {
            let shown = value.to_string();
            if !message.contains(&shown) {
                message = format!("`{shown}`: {message}");
            }
            let origin = match (value.origin(), file) {
                (Some("the environment"), _) => "the environment".to_string(),
                (Some(_), Some(path)) => path.display().to_string(),
                _ => "a --set override".to_string(),
            };
            message = format!("{message} (set in {origin})");
        }
        ConfigError::Invalid { key, message }
    })?;
    let mut cfg = cfg;
    cfg.ignored_env = ignored_env;
    cfg.validate()?;
    Ok(cfg)
}

/// The merged value at a dotted key with its origin (`Config::get` would rebuild it and lose
/// where it came from).
fn raw_value(cfg: &config::Config, key: &str) -> Option<config::Value> {
    let mut parts = key.split('.');
    let mut value = config::Source::collect(cfg).ok()?.remove(parts.next()?)?;
    for part in parts {
        value = value.into_table().ok()?.remove(part)?;
    }
    Some(value)
}

/// Every key's dotted path (`http.listen`, `turn.quota.family_allocations`, ...).
pub fn known_keys() -> std::collections::HashSet<String> {
    // Optional keys are absent from a default's serialization: fill them in first.
    let mut full = Config::default();
    full.auth.token_secret = Some(Secret::new("x"));
    full.turn.secret = Some(Secret::new("x"));
    full.turn.tls_cert = Some("x".into());
    full.turn.secrets_file = Some("x".into());
    full.auth.token_secrets_file = Some("x".into());
    full.auth.public_keys = Some("x".into());
    full.auth.public_keys_ca_file = Some("x".into());
    full.http.tls_cert = Some("x".into());
    full.http.tls_key = Some("x".into());
    full.turn.tls_key = Some("x".into());
    full.turn.public_ip = Some(PublicIp::Fixed(std::net::Ipv4Addr::LOCALHOST.into()));
    full.cluster.redis_url = Some(Secret::new("redis://x"));
    full.cluster.redis_ca_file = Some("x".into());
    full.cluster.redis_cert_file = Some("x".into());
    full.cluster.redis_key_file = Some("x".into());
    let table: toml::Table = toml::from_str(&toml::to_string(&full).expect("the config serializes")).expect("and parses back");
    fn walk(prefix: &str, t: &toml::Table, out: &mut std::collections::HashSet<String>) {
        for (k, v) in t {
            match v {
                toml::Value::Table(inner) => walk(&format!("{prefix}{k}."), inner, out),
                _ => {
                    out.insert(format!("{prefix}{k}"));
                }
            }
        }
    }
    let mut out = std::collections::HashSet::new();
    walk("", &table, &mut out);
    out
}

/// Whether `var` has the shape of a Kubernetes service-link variable: `{SVC}_SERVICE_HOST`,
/// `{SVC}_SERVICE_PORT[_{NAME}]`, `{SVC}_PORT`, `{SVC}_PORT_{N}_{PROTO}[_PROTO|_PORT|_ADDR]`.
/// A double underscore is never one (service names are DNS labels, config keys nest with it).
fn is_service_link(var: &str) -> bool {
    if var.contains("__") {
        return false;
    }
    let t: Vec<&str> = var.split('_').collect();
    let proto = |p: &str| matches!(p, "TCP" | "UDP" | "SCTP");
    let number = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let port_proto = |t: &[&str]| matches!(t, [.., "PORT", n, p] if number(n) && proto(p));
    t.ends_with(&["SERVICE", "HOST"])
        || t.windows(2).any(|w| w == ["SERVICE", "PORT"])
        || t.ends_with(&["PORT"])
        || port_proto(&t)
        || matches!(t.split_last(), Some((&("PROTO" | "PORT" | "ADDR"), head)) if port_proto(head))
}

/// A log filter is a comma-separated list of `level` or `target=level` directives, with a
/// level of trace, debug, info, warn, error or off. `EnvFilter` itself takes any word as a
/// target name, so `verbose!!` would silently mean "trace for a target nobody has".
fn validate_log_level(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let bad = || format!("`{filter}` is not a log filter: use a level ({}) or target=level pairs, e.g. `info,kinlink=debug`", LEVELS.join(", "));
    for d in filter.split(',').map(str::trim) {
        let level = match d.split_once('=') {
            Some((target, level)) => {
                let ok_target = !target.is_empty() && target.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'));
                if !ok_target {
                    return Err(bad());
                }
                level
            }
            None => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad());
        }
    }
    if filter.parse::<tracing_subscriber::EnvFilter>().is_err() {
        return Err(bad());
    }
    Ok(())
}

impl Config {
    /// Cross-field and range checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.signal;
        if !self.admin.listen.is_empty() {
            let Ok(addr) = self.admin.listen.parse::<SocketAddr>() else {
                return Err(ConfigError::invalid("admin.listen", format!("`{}` is not an address like 127.0.0.1:9091 (or \"\" for off)", self.admin.listen)));
            };
            if !addr.ip().is_loopback() && !self.admin.allow_remote {
                return Err(ConfigError::invalid(
                    "admin.listen",
                    format!("{addr} is not loopback and the admin API is plain HTTP: bind 127.0.0.1 (kubectl exec or port-forward reach it), or set admin.allow_remote behind a TLS proxy"),
                ));
            }
            match self.admin.token() {
                Err(e) => return Err(ConfigError::invalid("admin.token_file", e)),
                Ok(None) => return Err(ConfigError::invalid("admin.token", "the admin API needs admin.token or admin.token_file".to_string())),
                Ok(Some(t)) if t.expose().len() < 32 => {
                    return Err(ConfigError::invalid("admin.token", "at least 32 characters (e.g. `openssl rand -hex 32`)".to_string()))
                }
                Ok(Some(_)) => {}
            }
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "metrics.listen",
                format!("`{}` is not an address like 0.0.0.0:9090 (or \"\" to share http.listen)", self.metrics.listen),
            ));
        }
        // Every number has a floor and a ceiling: a zero disables what it bounds, and a huge
        // duration overflows `Instant + Duration` on every connection.
        let t = &self.turn;
        let q = &t.quota;
        let h = &self.http;
        let c = &self.check;
        const DAY: u64 = 86_400;
        const MIB: u64 = 1024 * 1024;
        let bounds: &[(&str, u64, u64, u64)] = &[
            ("http.header_read_timeout_secs", h.header_read_timeout_secs, 1, 600),
            ("http.max_unupgraded_connections", h.max_unupgraded_connections as u64, 1, 10_000_000),
            ("http.max_unupgraded_per_ip", h.max_unupgraded_per_ip as u64, 1, 10_000_000),
            ("http.max_connections_per_ip", h.max_connections_per_ip as u64, 1, 10_000_000),
            ("auth.token_leeway_secs", self.auth.token_leeway_secs, 0, DAY),
            ("auth.max_token_ttl_secs", self.auth.max_token_ttl_secs, 60, 365 * DAY),
            ("auth.public_keys_refresh_secs", self.auth.public_keys_refresh_secs, 1, DAY),
            ("auth.public_keys_max_stale_secs", self.auth.public_keys_max_stale_secs, 1, 30 * DAY),
            ("auth.reload_poll_secs", self.auth.reload_poll_secs, 1, DAY),
            ("check.token_ttl_secs", c.token_ttl_secs, 1, DAY),
            ("check.tokens_per_minute", c.tokens_per_minute as u64, 1, 1_000_000),
            ("check.mints_per_token_per_hour", c.mints_per_token_per_hour as u64, 1, 1_000_000),
            ("check.mints_per_ip_per_minute", c.mints_per_ip_per_minute as u64, 1, 1_000_000),
            ("signal.max_frame_bytes", s.max_frame_bytes as u64, 1, 16 * MIB),
            ("signal.hard_max_frame_bytes", s.hard_max_frame_bytes as u64, 1, 64 * MIB),
            ("signal.rate_burst", s.rate_burst as u64, 1, 1_000_000),
            ("signal.rate_strikes", s.rate_strikes as u64, 1, 1_000_000),
            ("signal.max_devices_per_family", s.max_devices_per_family as u64, 1, 1_000_000),
            ("signal.max_devices", s.max_devices as u64, 1, 100_000_000),
            ("signal.max_connections", s.max_connections as u64, 1, 100_000_000),
            ("signal.register_timeout_secs", s.register_timeout_secs, 1, 3600),
            ("signal.ping_interval_secs", s.ping_interval_secs, 1, 3600),
            ("signal.max_missed_pongs", s.max_missed_pongs as u64, 1, 1000),
            ("signal.idle_timeout_secs", s.idle_timeout_secs, 0, 30 * DAY),
            ("signal.outbound_queue", s.outbound_queue as u64, 1, 1_000_000),
            ("signal.outbound_queue_bytes", s.outbound_queue_bytes as u64, 1024, 1024 * MIB),
            ("signal.write_timeout_secs", s.write_timeout_secs, 1, 3600),
            ("signal.negotiation_timeout_secs", s.negotiation_timeout_secs, 1, DAY),
            ("signal.negotiation_settle_secs", s.negotiation_settle_secs, 1, 600),
            ("turn.credential_ttl_secs", t.credential_ttl_secs, 10, 30 * DAY),
            ("turn.max_lifetime_secs", t.max_lifetime_secs, 1, DAY),
            ("turn.nonce_lifetime_secs", t.nonce_lifetime_secs, 1, DAY),
            ("turn.tls_reload_poll_secs", t.tls_reload_poll_secs, 1, DAY),
            ("turn.socket_buffer_bytes", t.socket_buffer_bytes as u64, 0, 256 * MIB),
            ("turn.relay_socket_buffer_bytes", t.relay_socket_buffer_bytes as u64, 0, 64 * MIB),
            ("turn.max_stream_connections", t.max_stream_connections as u64, 1, 10_000_000),
            ("turn.max_stream_connections_per_ip", t.max_stream_connections_per_ip as u64, 1, 10_000_000),
            ("turn.handshake_timeout_secs", t.handshake_timeout_secs, 1, 600),
            ("turn.stream_idle_timeout_secs", t.stream_idle_timeout_secs, 1, DAY),
            ("turn.unauthenticated_per_ip_per_sec", t.unauthenticated_per_ip_per_sec as u64, 0, 1_000_000),
            ("turn.stream_queue_bytes", t.stream_queue_bytes as u64, 16 * 1024, 64 * MIB),
            ("turn.data_threads", t.data_threads as u64, 0, 256),
            ("turn.public_ip_refresh_secs", t.public_ip_refresh_secs, 10, 86_400),
            ("cluster.presence_ttl_secs", self.cluster.presence_ttl_secs, 3, 600),
            ("turn.quota.family_allocations", q.family_allocations as u64, 1, 10_000_000),
            ("turn.quota.device_allocations", q.device_allocations as u64, 1, 10_000_000),
            ("turn.quota.total_allocations", q.total_allocations as u64, 1, 10_000_000),
            ("turn.quota.check_allocations", q.check_allocations as u64, 1, 10_000_000),
            ("turn.quota.permissions_per_allocation", q.permissions_per_allocation as u64, 1, 100_000),
            ("turn.quota.channels_per_allocation", q.channels_per_allocation as u64, 1, 16_384),
            ("shutdown.grace_secs", self.shutdown.grace_secs, 0, 3600),
            ("metrics.relay_capacity_bytes_per_sec", self.metrics.relay_capacity_bytes_per_sec, 0, i64::MAX as u64),
        ];
        for &(key, value, min, max) in bounds {
            if value < min || value > max {
                return Err(ConfigError::invalid(key, format!("{value} is out of range: must be {min} to {max}")));
            }
        }
        if s.hard_max_frame_bytes < s.max_frame_bytes {
            return Err(ConfigError::invalid(
                "signal.hard_max_frame_bytes",
                "must be at least signal.max_frame_bytes",
            ));
        }
        if !(s.rate_per_sec.is_finite() && s.rate_per_sec > 0.0 && s.rate_per_sec <= 1_000_000.0) {
            return Err(ConfigError::invalid("signal.rate_per_sec", "must be a number above 0 and at most 1000000"));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(ConfigError::invalid("http.tls_cert", "http.tls_cert and http.tls_key go together"));
        }
        if self.turn.tls_cert.is_some() != self.turn.tls_key.is_some() {
            return Err(ConfigError::invalid("turn.tls_cert", "turn.tls_cert and turn.tls_key go together"));
        }
        let c = &self.cluster;
        if c.redis_cert_file.is_some() != c.redis_key_file.is_some() {
            return Err(ConfigError::invalid("cluster.redis_cert_file", "cluster.redis_cert_file and cluster.redis_key_file go together"));
        }
        let tls_file = if c.redis_ca_file.is_some() { Some("cluster.redis_ca_file") } else { c.redis_cert_file.as_ref().map(|_| "cluster.redis_cert_file") };
        if let (Some(key), Some(url)) = (tls_file, &c.redis_url) {
            if !url.expose().starts_with("rediss") {
                return Err(ConfigError::invalid(key, "is for TLS to Redis: cluster.redis_url must be rediss:// (or rediss-cluster://, rediss-sentinel://)"));
            }
        }
        let a = &self.acme;
        if a.enabled() {
            if self.http.tls_cert.is_some() {
                return Err(ConfigError::invalid("acme.domains", "acme.domains and http.tls_cert both give the HTTPS certificate: set one"));
            }
            for d in &a.domains {
                let name_ok = !d.is_empty() && d.len() <= 253 && d.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
                if !name_ok || d.parse::<std::net::IpAddr>().is_ok() {
                    return Err(ConfigError::invalid("acme.domains", format!("`{d}` is not a DNS name (ACME certificates are for names, not IP addresses)")));
                }
            }
            if !(a.directory.starts_with("https://") || a.directory.starts_with("http://")) {
                return Err(ConfigError::invalid("acme.directory", format!("`{}` is not an http(s) URL", a.directory)));
            }
            for c in &a.contact {
                if !c.starts_with("mailto:") {
                    return Err(ConfigError::invalid("acme.contact", format!("`{c}` is not a mailto: URL")));
                }
            }
        }
        for (key, secret) in [("auth.token_secret", &self.auth.token_secret), ("turn.secret", &self.turn.secret)] {
            if let Some(secret) = secret {
                if secret.expose().len() < 16 {
                    return Err(ConfigError::invalid(key, "must be at least 16 characters"));
                }
            }
        }
        let a = &self.auth;
        for alg in &a.algorithms {
            if !TOKEN_ALGORITHMS.contains(&alg.as_str()) {
                return Err(ConfigError::invalid("auth.algorithms", format!("`{alg}` is not one of {}", TOKEN_ALGORITHMS.join(", "))));
            }
        }
        let p = a.policy();
        if (p.es256 || p.eddsa || p.rs256) && !a.has_public_keys() {
            return Err(ConfigError::invalid("auth.algorithms", "lists a public-key algorithm but neither auth.public_keys nor auth.public_keys_url is set"));
        }
        if !(p.hs256 || p.es256 || p.eddsa || p.rs256) {
            return Err(ConfigError::invalid("auth.algorithms", "accepts no algorithm: no device could register"));
        }
        if !a.public_keys_url.is_empty() {
            crate::auth::keys::parse_https_url(&a.public_keys_url).map_err(|e| ConfigError::invalid("auth.public_keys_url", e.to_string()))?;
        }
        if a.token_secret.is_some() && a.token_secrets_file.is_some() {
            return Err(ConfigError::invalid("auth.token_secrets_file", "set either auth.token_secret or auth.token_secrets_file, not both"));
        }
        if self.turn.secret.is_some() && self.turn.secrets_file.is_some() {
            return Err(ConfigError::invalid("turn.secrets_file", "set either turn.secret or turn.secrets_file, not both"));
        }
        for url in &self.turn.urls {
            if !(url.starts_with("stun:") || url.starts_with("turn:") || url.starts_with("turns:")) {
                return Err(ConfigError::invalid("turn.urls", format!("`{url}` is not a stun:, turn: or turns: URL")));
            }
        }
        if t.relay_port_range().is_none() {
            return Err(ConfigError::invalid("turn.relay_ports", format!("`{}` is not a range like 49152-65535", t.relay_ports)));
        }
        for (key, list) in [("turn.allowed_peers", &t.allowed_peers), ("turn.denied_peers", &t.denied_peers)] {
            crate::turn::policy::parse_list(key, list).map_err(|e| ConfigError::invalid(key, e.trim_start_matches(&format!("{key}: ")).to_string()))?;
        }
        validate_log_level(&self.log.level).map_err(|m| ConfigError::invalid("log.level", m))?;
        for origin in &self.http.cors_origins {
            let ok = origin == "*"
                || origin.parse::<axum::http::Uri>().is_ok_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() && matches!(u.path(), "" | "/") && !origin.ends_with('/')
                });
            if !ok {
                return Err(ConfigError::invalid(
                    "http.cors_origins",
                    format!("`{origin}` is not an origin like https://app.example.com (scheme, host, optional port, no path) or *"),
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ip_is_an_address_or_a_stun_server() {
        let ip: PublicIp = "203.0.113.7".parse().unwrap();
        assert_eq!(ip.fixed(), Some("203.0.113.7".parse().unwrap()));
        assert_eq!("stun:stun.example.org:19302".parse::<PublicIp>(), Ok(PublicIp::Stun("stun.example.org:19302".into())));
        assert_eq!("stun:stun.example.org".parse::<PublicIp>(), Ok(PublicIp::Stun("stun.example.org:3478".into())), "default port");
        assert_eq!("stun:[2001:db8::1]:3478".parse::<PublicIp>(), Ok(PublicIp::Stun("[2001:db8::1]:3478".into())));
        assert_eq!("stun:[2001:db8::1]".parse::<PublicIp>(), Ok(PublicIp::Stun("[2001:db8::1]:3478".into())));
        for bad in ["stun:", "stun::3478", "stun:host:0", "stun:host:x", "203.0.113", "turn:host:3478"] {
            assert!(bad.parse::<PublicIp>().is_err(), "{bad}");
        }
        assert_eq!(PublicIp::Stun("h:1".into()).to_string(), "stun:h:1");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_with_nothing_set() {
        let cfg = load_with_env(None, &[], env(&[])).unwrap();
        assert_eq!(cfg.http.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.metrics.listen, "0.0.0.0:9090");
        assert_eq!(cfg.signal.max_frame_bytes, 65536);
    }

    #[test]
    fn listeners_take_lists_and_default_to_both_families() {
        let d = Config::default();
        assert_eq!(d.turn.udp_listen.0, vec!["0.0.0.0:3478".parse().unwrap(), "[::]:3478".parse::<SocketAddr>().unwrap()]);
        let cfg = load_with_env(
            None,
            &[("turn.tcp_listen".into(), "127.0.0.1:3478, [::1]:3478".into()), ("turn.tls_listen".into(), "off".into())],
            env(&[("KINLINK_TURN__UDP_LISTEN", "10.0.0.1:3478")]),
        )
        .unwrap();
        assert_eq!(cfg.turn.udp_listen, Listen::one("10.0.0.1:3478".parse().unwrap()));
        assert_eq!(cfg.turn.tcp_listen.0.len(), 2);
        assert!(cfg.turn.tls_listen.0.is_empty());
        assert!(cfg.to_redacted_toml().contains(r#"tcp_listen = "127.0.0.1:3478,[::1]:3478""#));
        let err = load_with_env(None, &[("turn.udp_listen".into(), "0.0.0.0:3478,nope".into())], env(&[])).unwrap_err();
        assert!(err.to_string().contains("turn.udp_listen") && err.to_string().contains("`nope`"), "{err}");
    }

    #[test]
    fn env_then_overrides_win_in_order() {
        let cfg = load_with_env(
            None,
            &[("signal.rate_burst".into(), "7".into()), ("turn.denied_peers".into(), "1.2.3.0/24, 5.6.7.8".into())],
            env(&[
                ("KINLINK_HTTP__LISTEN", "127.0.0.1:1234"),
                ("KINLINK_SIGNAL__RATE_BURST", "5"),
                ("KINLINK_TURN__URLS", "stun:a:1,turn:b:2"),
                ("KINLINK_TURN__SECRET", "0123456789abcdef0123"),
                ("KINLINK_TURN__PUBLIC_IP", ""),
                ("KINLINK_AUTH__TOKEN_SECRET", ""),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.http.listen.to_string(), "127.0.0.1:1234");
        assert_eq!(cfg.signal.rate_burst, 7);
        assert_eq!(cfg.turn.urls, vec!["stun:a:1", "turn:b:2"]);
        assert_eq!(cfg.turn.denied_peers, vec!["1.2.3.0/24", "5.6.7.8"]);
        assert_eq!(cfg.turn.secret.unwrap().expose(), "0123456789abcdef0123");
        // Empty variables are unset, not invalid values.
        assert_eq!(cfg.turn.public_ip, None);
        assert!(cfg.auth.token_secret.is_none());
    }

    #[test]
    fn kubernetes_service_links_are_not_config_but_unknown_keys_still_are_errors() {
        // What Kubernetes injects for Services `kinlink` and `kinlink-turn` of a release
        // named kinlink (tests/deploy.rs derives the full set from `helm template`).
        let links = [
            ("KINLINK_SERVICE_HOST", "10.96.0.12"),
            ("KINLINK_SERVICE_PORT", "8080"),
            ("KINLINK_SERVICE_PORT_HTTP", "8080"),
            ("KINLINK_PORT", "tcp://10.96.0.12:8080"),
            ("KINLINK_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
            ("KINLINK_PORT_8080_TCP_PROTO", "tcp"),
            ("KINLINK_PORT_8080_TCP_PORT", "8080"),
            ("KINLINK_PORT_8080_TCP_ADDR", "10.96.0.12"),
            ("KINLINK_TURN_SERVICE_HOST", "10.96.0.13"),
            ("KINLINK_TURN_SERVICE_PORT_TURN_UDP", "3478"),
            ("KINLINK_TURN_PORT_3478_UDP_ADDR", "10.96.0.13"),
            ("KINLINK_TURN_PORT_49152_UDP", "udp://10.96.0.13:49152"),
        ];
        let mut vars = env(&links);
        vars.push(("KINLINK_HTTP__LISTEN".into(), "127.0.0.1:1234".into()));
        let cfg = load_with_env(None, &[], vars).unwrap();
        assert_eq!(cfg.http.listen.to_string(), "127.0.0.1:1234");
        assert_eq!(cfg.ignored_env.len(), links.len());
        // Keys are still checked: a typo in a nested key, or a plain unknown variable.
        for (var, key) in [("KINLINK_SIGNAL__NO_SUCH_KEY", "signal.no_such_key"), ("KINLINK_DATADIR", "datadir"), ("KINLINK_HTTP__PORT", "http.port")] {
            let err = load_with_env(None, &[], env(&[(var, "1")])).unwrap_err().to_string();
            assert!(err.starts_with(key) && err.contains(var), "{var}: {err}");
        }
        assert!(known_keys().contains("turn.quota.check_allocations") && known_keys().contains("auth.token_secret"));
    }

    #[test]
    fn errors_name_the_value_and_where_it_was_set() {
        let dir = std::env::temp_dir().join(format!("kinlink-config-origin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kinlink.toml");
        std::fs::write(&file, "[http]\nlisten = \"localhost:8080\"\n").unwrap();
        let err = load_with_env(Some(&file), &[], env(&[])).unwrap_err().to_string();
        assert!(err.starts_with("http.listen: `localhost:8080`") && err.contains("0.0.0.0:8080") && err.contains(&file.display().to_string()), "{err}");
        std::fs::write(&file, "[log]\nformat = \"yaml\"\n").unwrap();
        let err = load_with_env(Some(&file), &[], env(&[])).unwrap_err().to_string();
        assert!(err.contains("`yaml`") && err.contains("`text`") && err.contains("`json`") && err.contains(&file.display().to_string()), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_LOG__FORMAT", "yaml")])).unwrap_err().to_string();
        assert!(err.contains("the environment"), "{err}");
        let err = load_with_env(None, &[("log.format".into(), "yaml".into())], env(&[])).unwrap_err().to_string();
        assert!(err.contains("--set"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let err = load_with_env(None, &[], env(&[("KINLINK_SIGNAL__MAX_FRAME_BYTES", "lots")])).unwrap_err();
        assert!(err.to_string().contains("signal.max_frame_bytes"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_SIGNAL__NO_SUCH_KEY", "1")])).unwrap_err();
        assert!(err.to_string().contains("signal") && err.to_string().contains("no_such_key"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_HTTP__LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("http.listen"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_AUTH__TOKEN_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("auth.token_secret"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_TURN__ALLOWED_PEERS", "10.0.0.0/8,10.0.0.0/99")])).unwrap_err();
        assert!(err.to_string().starts_with("turn.allowed_peers: `10.0.0.0/99`"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_TURN__RELAY_PORTS", "9-1")])).unwrap_err();
        assert!(err.to_string().contains("turn.relay_ports"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_TURN__PUBLIC_IP", "not-an-ip")])).unwrap_err();
        assert!(err.to_string().contains("turn.public_ip"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_TURN__PUBLIC_IP", "stun:host:99999")])).unwrap_err();
        assert!(err.to_string().contains("turn.public_ip") && err.to_string().contains("stun:HOST:PORT"), "{err}");
        let err = load_with_env(None, &[], env(&[("KINLINK_METRICS__LISTEN", "x")])).unwrap_err();
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }

    #[test]
    fn default_turn_quotas_fit_what_libwebrtc_allocates() {
        // One allocation per TURN URL (3), per network (Wi-Fi and cellular), per peer
        // connection: a device of a family of 5 has 4 peers.
        let q = TurnQuota::default();
        assert!(q.device_allocations >= 3 * 2 * 4, "{}", q.device_allocations);
        assert!(q.family_allocations >= 5 * q.device_allocations, "{}", q.family_allocations);
        assert!(q.check_allocations >= 2 * 3, "a check needs two devices × three URLs");
        assert!(q.total_allocations >= 10 * q.family_allocations);
    }

    #[test]
    fn every_number_is_bounded_and_log_levels_are_strict() {
        // A huge duration once made `Instant + Duration` panic on every connection.
        for (key, value) in [
            ("KINLINK_SIGNAL__REGISTER_TIMEOUT_SECS", "18446744073709551615"),
            ("KINLINK_SIGNAL__NEGOTIATION_TIMEOUT_SECS", "100000000000"),
            ("KINLINK_TURN__MAX_LIFETIME_SECS", "100000000000"),
            ("KINLINK_SHUTDOWN__GRACE_SECS", "100000000000"),
            ("KINLINK_HTTP__HEADER_READ_TIMEOUT_SECS", "0"),
            ("KINLINK_SIGNAL__OUTBOUND_QUEUE_BYTES", "10"),
        ] {
            let err = load_with_env(None, &[], env(&[(key, value)])).unwrap_err().to_string();
            let dotted = key.trim_start_matches("KINLINK_").to_ascii_lowercase().replace("__", ".");
            assert!(err.starts_with(&dotted) && err.contains("out of range"), "{key}: {err}");
        }
        for level in ["verbose!!", "loud", "kinlink=shout", "=debug", "info,,"] {
            let err = load_with_env(None, &[("log.level".into(), level.into())], env(&[])).unwrap_err().to_string();
            assert!(err.starts_with("log.level: ") && err.contains("trace, debug, info"), "{level}: {err}");
        }
        for level in ["info", "DEBUG", "kinlink=debug,tower=warn", "warn,kinlink::turn=trace"] {
            load_with_env(None, &[("log.level".into(), level.into())], env(&[])).unwrap();
        }
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let mut cfg = Config::default();
        cfg.auth.token_secret = Some(Secret::new("supersecretvalue-123"));
        let text = cfg.to_redacted_toml();
        assert!(!text.contains("supersecretvalue"));
        assert!(text.contains("<redacted>"));
        assert!(!format!("{cfg:?}").contains("supersecretvalue"));
    }
}
