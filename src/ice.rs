//! The `iceServers` block handed to devices: STUN and TURN URLs from config, with TURN REST
//! credentials minted for the device (see [`crate::auth::turn_credential`]).

use crate::auth::{self, TurnCredential};
use crate::config::{Secret, TurnConfig};
use crate::signal::protocol::IceServer;

/// Builds ICE server blocks.
#[derive(Debug, Clone)]
pub struct IceConfig {
    turn: TurnConfig,
    /// The secret credentials are minted with: the first of `turn.secrets_file` (replaced
    /// when it is reloaded; clones share it) or `turn.secret`.
    secret: std::sync::Arc<std::sync::RwLock<Secret>>,
}

impl IceConfig {
    /// From the TURN section, minting with `secret`.
    pub fn new(turn: &TurnConfig, secret: Secret) -> Self {
        IceConfig { turn: turn.clone(), secret: std::sync::Arc::new(std::sync::RwLock::new(secret)) }
    }

    /// Mints with `secret` from now on (a rotation).
    pub fn set_secret(&self, secret: Secret) {
        *self.secret.write().unwrap_or_else(|e| e.into_inner()) = secret;
    }

    /// Lifetime of the credentials in a block for a token expiring at `token_exp` (unix
    /// seconds): `turn.credential_ttl_secs`, but never past the token. TURN access must not
    /// outlive the token it was handed out for (a 600 s check token once got 24 h of TURN).
    pub fn ttl_secs(&self, token_exp: u64, now_unix: u64) -> u64 {
        self.turn.credential_ttl_secs.min(token_exp.saturating_sub(now_unix))
    }

    /// Whether a block for this token is cut short by the token's expiry (then refreshing it
    /// would not give more).
    pub fn capped_by_token(&self, token_exp: u64, now_unix: u64) -> bool {
        self.ttl_secs(token_exp, now_unix) < self.turn.credential_ttl_secs
    }

    /// The block for one device. `request_host` is the Host header the device used, the
    /// fallback when `turn.public_host` is not configured (a self-hoster reaching kinlink at
    /// `myhost:8080` then gets `turn:myhost:3478`).
    /// The credential is valid for `ttl_secs` (see [`Self::ttl_secs`]).
    pub fn block(&self, family: &str, device: &str, request_host: Option<&str>, now_unix: u64, ttl_secs: u64) -> Vec<IceServer> {
        let secret = self.secret.read().unwrap_or_else(|e| e.into_inner()).clone();
        let cred = auth::turn_credential(&secret, family, device, ttl_secs, now_unix);
        if !self.turn.urls.is_empty() {
            return self.explicit_block(cred);
        }
        if !self.turn.enabled {
            return Vec::new();
        }
        let host = if self.turn.public_host.is_empty() {
            request_host.map(strip_port).unwrap_or("localhost")
        } else {
            self.turn.public_host.as_str()
        };
        let host = bracket_v6(host);
        let mut block = Vec::new();
        let mut turn_urls = Vec::new();
        if let Some(udp) = self.turn.udp_listen.first() {
            block.push(IceServer { urls: vec![format!("stun:{host}:{}", udp.port())], username: None, credential: None });
            turn_urls.push(format!("turn:{host}:{}?transport=udp", udp.port()));
        }
        if let Some(tcp) = self.turn.tcp_listen.first() {
            turn_urls.push(format!("turn:{host}:{}?transport=tcp", tcp.port()));
        }
        if let (true, Some(tls)) = (self.turn.tls_enabled(), self.turn.tls_listen.first()) {
            turn_urls.push(format!("turns:{host}:{}?transport=tcp", tls.port()));
        }
        if !turn_urls.is_empty() {
            block.push(IceServer { urls: turn_urls, username: Some(cred.username), credential: Some(cred.credential) });
        }
        block
    }

    fn explicit_block(&self, cred: TurnCredential) -> Vec<IceServer> {
        let (stun, turn): (Vec<String>, Vec<String>) = self.turn.urls.iter().cloned().partition(|u| u.starts_with("stun:"));
        let mut block = Vec::new();
        if !stun.is_empty() {
            block.push(IceServer { urls: stun, username: None, credential: None });
        }
        if !turn.is_empty() {
            block.push(IceServer { urls: turn, username: Some(cred.username), credential: Some(cred.credential) });
        }
        block
    }
}

/// `host:port`, `[v6]:port` or a bare host, to the host alone.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((h, _)) if !h.contains(':') => h,
        _ => host,
    }
}

fn bracket_v6(host: &str) -> std::borrow::Cow<'_, str> {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]").into()
    } else {
        host.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TurnConfig {
        TurnConfig { secret: Some(Secret::new("turn-secret-0123456789")), ..TurnConfig::default() }
    }

    #[test]
    fn derived_urls_use_public_host_or_request_host() {
        let ice = IceConfig::new(&cfg(), Secret::new("turn-secret-0123456789"));
        let b = ice.block("f", "d", Some("example.org:8080"), 1000, 86_400);
        assert_eq!(b[0].urls, vec!["stun:example.org:3478"]);
        assert_eq!(b[1].urls, vec!["turn:example.org:3478?transport=udp", "turn:example.org:3478?transport=tcp"]);
        assert_eq!(b[1].username.as_deref(), Some("87400:f:d"));
        let b = ice.block("f", "d", Some("[::1]:8080"), 1000, 600);
        assert_eq!(b[0].urls, vec!["stun:[::1]:3478"]);
        assert_eq!(b[1].username.as_deref(), Some("1600:f:d"));
        // Credentials never outlive the token they are handed out for.
        assert_eq!(ice.ttl_secs(1000 + 600, 1000), 600);
        assert_eq!(ice.ttl_secs(1000 + 999_999, 1000), 86_400);
        assert_eq!(ice.ttl_secs(10, 1000), 0);
        assert!(ice.capped_by_token(1600, 1000) && !ice.capped_by_token(1_000_000, 1000));

        let mut c = cfg();
        c.public_host = "turn.example.org".into();
        c.tls_cert = Some("c.pem".into());
        c.tls_key = Some("k.pem".into());
        let b = IceConfig::new(&c, Secret::new("turn-secret-0123456789")).block("f", "d", Some("ignored"), 1000, 600);
        assert_eq!(b[1].urls[2], "turns:turn.example.org:5349?transport=tcp");
    }

    #[test]
    fn explicit_urls_and_disabled() {
        let mut c = cfg();
        c.urls = vec!["stun:s:1".into(), "turn:t:2?transport=udp".into()];
        let b = IceConfig::new(&c, Secret::new("turn-secret-0123456789")).block("f", "d", None, 0, 600);
        assert_eq!(b.len(), 2);
        assert!(b[0].username.is_none() && b[1].username.is_some());
        let mut c = cfg();
        c.enabled = false;
        assert!(IceConfig::new(&c, Secret::new("turn-secret-0123456789")).block("f", "d", None, 0, 600).is_empty());
        let mut c = cfg();
        c.udp_listen = crate::config::Listen::default();
        let b = IceConfig::new(&c, Secret::new("turn-secret-0123456789")).block("f", "d", Some("h"), 0, 600);
        assert_eq!(b.len(), 1, "no STUN without UDP");
        assert_eq!(b[0].urls, vec!["turn:h:3478?transport=tcp"]);
    }
}
