//! The self-check: a page at `/check` that proves a deployment from a real browser
//! (signaling, STUN, TURN over UDP/TCP/TLS, a WebRTC data channel between two devices), and
//! `POST /v1/check/tokens`, which mints the page two short-lived tokens for a throw-away
//! family. Minting needs a valid device token, unless the operator turned on `check.demo`.

pub mod client;

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::auth::{self, AuthError, TokenVerifier};
use crate::config::CheckConfig;
use crate::ratelimit::{KeyedBuckets, TokenBucket};

/// Every self-check family id starts with this: the TURN core counts their allocations
/// against `turn.quota.check_allocations`. Backend-minted families should not use it.
pub const FAMILY_PREFIX: &str = "check-";

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
    /// A check token asked to mint: only device tokens may, or one holder could mint
    /// families without end.
    #[error("check tokens cannot mint check tokens; use a device token")]
    CheckToken,
    /// `check.tokens_per_minute` reached.
    #[error("too many check tokens minted; try again in a minute")]
    RateLimited,
    /// `check.mints_per_token_per_hour` reached for this device token.
    #[error("this device token has minted too many check tokens; try again later")]
    TokenRateLimited,
    /// `check.mints_per_ip_per_minute` reached for this address.
    #[error("too many check tokens minted from this address; try again in a minute")]
    IpRateLimited,
}

impl MintError {
    /// Label for `kinlink_check_tokens_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            MintError::Unauthorized(_) => "unauthorized",
            MintError::CheckToken => "forbidden",
            MintError::RateLimited => "rate_limited",
            MintError::TokenRateLimited => "rate_limited_token",
            MintError::IpRateLimited => "rate_limited_ip",
        }
    }
}

/// Mints check tokens under a server-wide rate limit, one per device token and one per
/// source address.
pub struct Minter {
    config: CheckConfig,
    /// `check.tokens_per_minute`, server-wide.
    bucket: Mutex<TokenBucket>,
    /// `check.mints_per_token_per_hour`, by (family, device) of the minting token.
    per_token: Mutex<KeyedBuckets<(String, String)>>,
    /// `check.mints_per_ip_per_minute`, by source (IPv6 by /64).
    per_ip: Mutex<KeyedBuckets<IpAddr>>,
}

/// Device tokens and source addresses whose mints are tracked at once; past it, a mint from a
/// new one is refused until some are idle.
const MAX_TRACKED: usize = 10_000;

impl Minter {
    /// From `check.*`. Tokens are signed with the verifier's first HS256 secret (kinlink's
    /// own when public keys are configured, which then vouches for self-check families only).
    pub fn new(config: CheckConfig, now: Instant) -> Self {
        let bucket = TokenBucket::new(config.tokens_per_minute as f64 / 60.0, config.tokens_per_minute, now);
        let per_token = KeyedBuckets::new(config.mints_per_token_per_hour as f64 / 3600.0, config.mints_per_token_per_hour, MAX_TRACKED);
        let per_ip = KeyedBuckets::new(config.mints_per_ip_per_minute as f64 / 60.0, config.mints_per_ip_per_minute, MAX_TRACKED);
        Minter { config, bucket: Mutex::new(bucket), per_token: Mutex::new(per_token), per_ip: Mutex::new(per_ip) }
    }

    /// Whether `/check` is served.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Two tokens for a fresh family, if `bearer` is a device token (or demo mode is on and
    /// no token is given), within the rate limits. `ip` is the requester's address.
    pub fn mint(&self, verifier: &TokenVerifier, bearer: Option<&str>, ip: Option<IpAddr>, now: Instant) -> Result<CheckTokens, MintError> {
        let minter = match bearer {
            Some(token) => Some(verifier.verify(token, auth::unix_now()).map_err(MintError::Unauthorized)?),
            None if self.config.demo => None,
            None => return Err(MintError::Unauthorized(AuthError::Missing)),
        };
        if let Some(claims) = &minter {
            if claims.fam.starts_with(FAMILY_PREFIX) {
                return Err(MintError::CheckToken);
            }
        }
        if let Some(ip) = ip {
            if !self.per_ip.lock().unwrap_or_else(|e| e.into_inner()).take(crate::connlimit::source_key(ip), now) {
                return Err(MintError::IpRateLimited);
            }
        }
        if let Some(claims) = minter {
            if !self.per_token.lock().unwrap_or_else(|e| e.into_inner()).take((claims.fam, claims.dev), now) {
                return Err(MintError::TokenRateLimited);
            }
        }
        if !self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take(now) {
            return Err(MintError::RateLimited);
        }
        let secret = verifier.minting_secret().ok_or(MintError::Unauthorized(AuthError::BadAlgorithm))?;
        let family_id = format!("{FAMILY_PREFIX}{:016x}", rand::random::<u64>());
        let unix = auth::unix_now();
        let ttl = self.config.token_ttl_secs;
        let devices = ["check-a", "check-b"]
            .into_iter()
            .map(|d| CheckDevice {
                device_id: d.into(),
                user_id: "check".into(),
                token: auth::mint_token(&secret, &family_id, "check", d, ttl, unix),
            })
            .collect();
        Ok(CheckTokens { family_id, devices, ttl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::time::Duration;

    fn minter(demo: bool, per_minute: u32) -> (Minter, TokenVerifier, Secret) {
        let secret = Secret::new("check-test-secret-0123456789");
        let cfg = CheckConfig { demo, tokens_per_minute: per_minute, ..CheckConfig::default() };
        (Minter::new(cfg, Instant::now()), TokenVerifier::hs256(&secret, 0), secret)
    }

    #[test]
    fn needs_a_valid_token_unless_demo() {
        let (m, v, secret) = minter(false, 10);
        let now = Instant::now();
        assert_eq!(m.mint(&v, None, None, now).unwrap_err(), MintError::Unauthorized(AuthError::Missing));
        assert!(matches!(m.mint(&v, Some("forged.token.here"), None, now), Err(MintError::Unauthorized(_))));
        let good = auth::mint_token(&secret, "fam", "u", "d", 60, auth::unix_now());
        let t = m.mint(&v, Some(&good), None, now).unwrap();
        assert!(t.family_id.starts_with("check-") && t.family_id != "fam");
        assert_eq!(t.devices.len(), 2);
        let c = v.verify(&t.devices[1].token, auth::unix_now()).unwrap();
        assert_eq!((c.fam.as_str(), c.dev.as_str(), c.sub.as_str()), (t.family_id.as_str(), "check-b", "check"));
        let (demo, v, _) = minter(true, 10);
        assert!(demo.mint(&v, None, None, now).is_ok());
    }

    #[test]
    fn check_tokens_cannot_mint_and_limits_hold_per_token_and_per_ip() {
        let secret = Secret::new("check-test-secret-0123456789");
        let cfg = CheckConfig { tokens_per_minute: 1000, mints_per_token_per_hour: 3, mints_per_ip_per_minute: 5, ..CheckConfig::default() };
        let m = Minter::new(cfg, Instant::now());
        let v = TokenVerifier::hs256(&secret, 0);
        let now = Instant::now();
        let device = auth::mint_token(&secret, "fam", "u", "d", 600, auth::unix_now());
        let minted = m.mint(&v, Some(&device), None, now).unwrap();
        // The minted check token is refused as a minter.
        assert_eq!(m.mint(&v, Some(&minted.devices[0].token), None, now).unwrap_err(), MintError::CheckToken);
        // Per device token: 3 an hour.
        assert!(m.mint(&v, Some(&device), None, now).is_ok());
        assert!(m.mint(&v, Some(&device), None, now).is_ok());
        assert_eq!(m.mint(&v, Some(&device), None, now).unwrap_err(), MintError::TokenRateLimited);
        assert!(m.mint(&v, Some(&device), None, now + Duration::from_secs(1200)).is_ok(), "one back after 20 min");
        // Per source address: 5 a minute, whatever the tokens; IPv6 counted by /64.
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        for i in 0..5 {
            let t = auth::mint_token(&secret, "fam", "u", &format!("dev{i}"), 600, auth::unix_now());
            assert!(m.mint(&v, Some(&t), ip(&format!("2001:db8::{i}")), now).is_ok());
        }
        let t = auth::mint_token(&secret, "fam", "u", "dev9", 600, auth::unix_now());
        assert_eq!(m.mint(&v, Some(&t), ip("2001:db8::99"), now).unwrap_err(), MintError::IpRateLimited);
        assert!(m.mint(&v, Some(&t), ip("2001:db8:0:1::1"), now).is_ok());
    }

    #[test]
    fn minting_is_rate_limited_and_refills() {
        let (m, v, _) = minter(true, 2);
        let t0 = Instant::now();
        assert!(m.mint(&v, None, None, t0).is_ok());
        assert!(m.mint(&v, None, None, t0).is_ok());
        assert_eq!(m.mint(&v, None, None, t0).unwrap_err(), MintError::RateLimited);
        assert!(m.mint(&v, None, None, t0 + Duration::from_secs(30)).is_ok(), "one token back after 30 s at 2/min");
    }
}
