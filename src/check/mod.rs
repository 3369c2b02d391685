//! The self-check: a page at `/check` that proves a deployment from a real browser
//! (signaling, STUN, TURN over UDP/TCP/TLS, a WebRTC data channel between two devices), and
//! `POST /v1/check/tokens`, which mints the page two short-lived tokens for a throw-away
//! family. Minting needs a valid device token, unless the operator turned on `check.demo`.

pub mod client;

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::auth::{self, AuthError, TokenVerifier};
use crate::config::{CheckConfig, Secret};
use crate::ratelimit::TokenBucket;

/// The page: static HTML and JS, no external assets.
pub const PAGE: &str = include_str!("page.html");

/// One minted device.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckDevice {
    /// Device id.
    pub device_id: String,
    /// User id.
    pub user_id: String,
    /// Its token.
    pub token: String,
}

/// `POST /v1/check/tokens` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckTokens {
    /// The throw-away family.
    pub family_id: String,
    /// Two devices of it.
    pub devices: Vec<CheckDevice>,
    /// Seconds the tokens stay valid.
    pub ttl: u64,
}

/// Why no tokens were minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// No valid device token, and not in demo mode.
    #[error("a valid device token is required: {0}")]
    Unauthorized(AuthError),
    /// `check.tokens_per_minute` reached.
    #[error("too many check tokens minted; try again in a minute")]
    RateLimited,
}

impl MintError {
    /// Label for `kinlink_check_tokens_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            MintError::Unauthorized(_) => "unauthorized",
            MintError::RateLimited => "rate_limited",
        }
    }
}

/// Mints check tokens under a server-wide rate limit.
pub struct Minter {
    config: CheckConfig,
    secret: Secret,
    /// `check.tokens_per_minute`, server-wide.
    bucket: Mutex<TokenBucket>,
}

impl Minter {
    /// From `check.*` and the token secret.
    pub fn new(config: CheckConfig, secret: Secret, now: Instant) -> Self {
        let bucket = TokenBucket::new(config.tokens_per_minute as f64 / 60.0, config.tokens_per_minute, now);
        Minter { config, secret, bucket: Mutex::new(bucket) }
    }

    /// Whether `/check` is served.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Two tokens for a fresh family, if `bearer` verifies (or demo mode is on).
    pub fn mint(&self, verifier: &TokenVerifier, bearer: Option<&str>, now: Instant) -> Result<CheckTokens, MintError> {
        if !self.config.demo {
            verifier.verify(bearer.ok_or(MintError::Unauthorized(AuthError::Missing))?).map_err(MintError::Unauthorized)?;
        }
        if !self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(now) {
            return Err(MintError::RateLimited);
        }
        let family_id = format!("check-{:016x}", rand::random::<u64>());
        let unix = auth::unix_now();
        let ttl = self.config.token_ttl_secs;
        let devices = ["check-a", "check-b"]
            .into_iter()
            .map(|d| CheckDevice {
                device_id: d.into(),
                user_id: "check".into(),
                token: auth::mint_token(&self.secret, &family_id, "check", d, ttl, unix),
            })
            .collect();
        Ok(CheckTokens { family_id, devices, ttl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn minter(demo: bool, per_minute: u32) -> (Minter, TokenVerifier, Secret) {
        let secret = Secret::new("check-test-secret-0123456789");
        let cfg = CheckConfig { demo, tokens_per_minute: per_minute, ..CheckConfig::default() };
        (Minter::new(cfg, secret.clone(), Instant::now()), TokenVerifier::new(&secret, 0), secret)
    }

    #[test]
    fn needs_a_valid_token_unless_demo() {
        let (m, v, secret) = minter(false, 10);
        let now = Instant::now();
        assert_eq!(m.mint(&v, None, now).unwrap_err(), MintError::Unauthorized(AuthError::Missing));
        assert!(matches!(m.mint(&v, Some("forged.token.here"), now), Err(MintError::Unauthorized(_))));
        let good = auth::mint_token(&secret, "fam", "u", "d", 60, auth::unix_now());
        let t = m.mint(&v, Some(&good), now).unwrap();
        assert!(t.family_id.starts_with("check-") && t.family_id != "fam");
        assert_eq!(t.devices.len(), 2);
        let c = v.verify(&t.devices[1].token).unwrap();
        assert_eq!((c.fam.as_str(), c.dev.as_str(), c.sub.as_str()), (t.family_id.as_str(), "check-b", "check"));
        let (demo, v, _) = minter(true, 10);
        assert!(demo.mint(&v, None, now).is_ok());
    }

    #[test]
    fn minting_is_rate_limited_and_refills() {
        let (m, v, _) = minter(true, 2);
        let t0 = Instant::now();
        assert!(m.mint(&v, None, t0).is_ok());
        assert!(m.mint(&v, None, t0).is_ok());
        assert_eq!(m.mint(&v, None, t0).unwrap_err(), MintError::RateLimited);
        assert!(m.mint(&v, None, t0 + Duration::from_secs(30)).is_ok(), "one token back after 30 s at 2/min");
    }
}
