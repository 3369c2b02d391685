//! Family-scoped credentials: device tokens minted by the app's backend and the TURN REST
//! credentials derived from them (coturn's `use-auth-secret` scheme).
//!
//! - [`token`]: verifying device tokens (HS256 with several secrets; ES256 and EdDSA with
//!   public keys only, so kinlink cannot mint what it accepts) and every time claim's bound;
//! - [`jwks`]: public keys from a JWKS document, and private keys for development minting;
//! - [`keys`]: where the keys come from (files reloaded on change or SIGHUP, an https JWKS
//!   URL with a bounded stale period);
//! - [`revocation`]: the deny list of revoked devices and families;
//! - TURN credentials (here): minted with the first of several TURN secrets, accepted with any.

pub mod jwks;
pub mod keys;
pub mod revocation;
pub mod token;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;

use crate::config::Secret;

pub use token::{mint_token, Minted, TokenPolicy, TokenVerifier};

/// Claims of a device token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Family id.
    pub fam: String,
    /// User id.
    pub sub: String,
    /// Device id.
    pub dev: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issued at, unix seconds. A token without it counts as issued at 0: every revocation
    /// covers it.
    #[serde(default)]
    pub iat: u64,
    /// Not before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// RFC 7800 confirmation claim: the device's public key (`{"jwk": {...}}`) that the
    /// backend vouches for with the token's own signature. kinlink does not interpret it; the
    /// device-identity layer of the client does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

/// Why a token was refused. [`AuthError::reason`] is the metric label; the token itself is
/// never part of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token on the upgrade request nor in `register`.
    #[error("no token presented")]
    Missing,
    /// Not a well-formed JWT, or claims missing or of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// An algorithm this server does not accept (`none`, RS256 unless configured, HS256
    /// where only public keys are configured), or one that does not match the key.
    #[error("token algorithm not accepted")]
    BadAlgorithm,
    /// The signature does not verify.
    #[error("token signature invalid")]
    BadSignature,
    /// The token's `kid` names no key this server has.
    #[error("token key id is not known")]
    UnknownKey,
    /// The token's key would come from the JWKS URL, which has not answered for longer than
    /// `auth.public_keys_max_stale_secs` (or never has).
    #[error("signing keys unavailable: the JWKS URL has not answered")]
    KeysUnavailable,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp` lies further ahead than `auth.max_token_ttl_secs` (from now, or from `iat`).
    #[error("token lifetime exceeds auth.max_token_ttl_secs")]
    LifetimeTooLong,
    /// An id claim is empty, too long, or has characters that cannot go in a TURN username.
    #[error("token has an invalid id claim")]
    BadClaim,
    /// The device or its family was revoked after this token was issued.
    #[error("token revoked")]
    Revoked,
    /// `register` names a user or device other than the token's.
    #[error("ids in register do not match the token")]
    ClaimsMismatch,
    /// `register` names a family other than the token's.
    #[error("family does not match the token")]
    FamilyMismatch,
}

impl AuthError {
    /// Every variant's label, for pre-registering metrics at zero.
    pub const ALL: [AuthError; 13] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::BadAlgorithm,
        AuthError::BadSignature,
        AuthError::UnknownKey,
        AuthError::KeysUnavailable,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::LifetimeTooLong,
        AuthError::BadClaim,
        AuthError::Revoked,
        AuthError::ClaimsMismatch,
        AuthError::FamilyMismatch,
    ];

    /// Bounded metric label, also the `reason` of the signaling error a client gets.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadAlgorithm => "bad_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::LifetimeTooLong => "lifetime_too_long",
            AuthError::BadClaim => "bad_claim",
            AuthError::Revoked => "revoked",
            AuthError::ClaimsMismatch => "claims_mismatch",
            AuthError::FamilyMismatch => "family_mismatch",
        }
    }
}

/// Longest accepted family, user or device id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Ids are printable ASCII without spaces or `:`, because they become part of a TURN
/// username `<expiry>:<family>:<device>` that must split unambiguously.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// TURN REST credentials: what goes into an `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnCredential {
    /// `<unix-expiry>:<familyId>:<deviceId>`.
    pub username: String,
    /// `base64(HMAC-SHA1(turn_secret, username))`.
    pub credential: String,
    /// Unix time at which the credential stops working.
    pub expires_unix: u64,
}

/// Derives the TURN password for `username` (coturn `use-auth-secret`).
pub fn turn_password(secret: &Secret, username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.expose().as_bytes()).expect("HMAC accepts any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Issues TURN credentials for one device, valid for `ttl_secs` from `now_unix`.
pub fn turn_credential(secret: &Secret, fam: &str, dev: &str, ttl_secs: u64, now_unix: u64) -> TurnCredential {
    let expires_unix = now_unix.saturating_add(ttl_secs);
    let username = format!("{expires_unix}:{fam}:{dev}");
    let credential = turn_password(secret, &username);
    TurnCredential { username, credential, expires_unix }
}

/// Seconds since the unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("a-b_c.d@e"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a:b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn turn_credential_matches_coturn_scheme() {
        let c = turn_credential(&Secret::new("test-secret-0123456789"), "fam", "dev", 3600, 1_700_000_000);
        assert_eq!(c.username, "1700003600:fam:dev");
        // Independent value: python3 -c "import hmac,hashlib,base64;print(base64.b64encode(hmac.new(
        //   b'test-secret-0123456789', b'1700003600:fam:dev', hashlib.sha1).digest()).decode())"
        assert_eq!(c.credential, "KDoLUV7epDgyEOaCNzSKjrQjoRI=");
        assert_eq!(c.credential.len(), 28);
    }
}
