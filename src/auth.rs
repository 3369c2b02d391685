//! Family-scoped credentials: device tokens (HS256 JWTs minted by the app's backend) and the
//! TURN REST credentials derived from them (coturn's `use-auth-secret` scheme).

use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha1::Sha1;

use crate::config::Secret;

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
    /// Issued at, unix seconds.
    #[serde(default)]
    pub iat: u64,
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
    /// Any algorithm other than HS256 (including `none`).
    #[error("token algorithm not accepted")]
    BadAlgorithm,
    /// The HMAC does not verify.
    #[error("token signature invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// An id claim is empty, too long, or has characters that cannot go in a TURN username.
    #[error("token has an invalid id claim")]
    BadClaim,
    /// `register` names a user or device other than the token's.
    #[error("ids in register do not match the token")]
    ClaimsMismatch,
    /// `register` names a family other than the token's.
    #[error("family does not match the token")]
    FamilyMismatch,
}

impl AuthError {
    /// Every variant's label, for pre-registering metrics at zero.
    pub const ALL: [AuthError; 9] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::BadAlgorithm,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::BadClaim,
        AuthError::ClaimsMismatch,
        AuthError::FamilyMismatch,
    ];

    /// Bounded metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadAlgorithm => "bad_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadClaim => "bad_claim",
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

/// Verifies device tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// A verifier for tokens signed with `secret`, tolerating `leeway_secs` of clock skew.
    pub fn new(secret: &Secret, leeway_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        TokenVerifier { key: DecodingKey::from_secret(secret.expose().as_bytes()), validation }
    }

    /// Checks signature, algorithm, expiry and id claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => data.claims,
            Err(e) => {
                return Err(match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::BadAlgorithm,
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    // A header the library cannot parse may still name an algorithm we refuse
                    // (`"alg":"none"` is not even a variant of its enum): report it as such.
                    _ if header_alg(token).is_some_and(|alg| alg != "HS256") => AuthError::BadAlgorithm,
                    _ => AuthError::Malformed,
                })
            }
        };
        if !(valid_id(&claims.fam) && valid_id(&claims.sub) && valid_id(&claims.dev)) {
            return Err(AuthError::BadClaim);
        }
        Ok(claims)
    }
}

fn header_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(value.get("alg")?.as_str()?.to_string())
}

/// Mints a device token, as the app's backend (or `kinlink token`) does.
pub fn mint_token(secret: &Secret, fam: &str, user: &str, dev: &str, ttl_secs: u64, now_unix: u64) -> String {
    let claims = Claims { fam: fam.into(), sub: user.into(), dev: dev.into(), exp: now_unix + ttl_secs, iat: now_unix };
    // Encoding HS256 with an in-memory key cannot fail.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.expose().as_bytes()))
        .expect("HS256 encoding")
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
    let expires_unix = now_unix + ttl_secs;
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

    fn secret() -> Secret {
        Secret::new("test-secret-0123456789")
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn round_trip_and_expiry() {
        let v = TokenVerifier::new(&secret(), 5);
        let now = unix_now();
        let t = mint_token(&secret(), "fam1", "u1", "d1", 60, now);
        let c = v.verify(&t).unwrap();
        assert_eq!((c.fam.as_str(), c.sub.as_str(), c.dev.as_str()), ("fam1", "u1", "d1"));
        let old = mint_token(&secret(), "fam1", "u1", "d1", 10, now - 100);
        assert_eq!(v.verify(&old), Err(AuthError::Expired));
        // Within the leeway it still passes.
        let edge = mint_token(&secret(), "fam1", "u1", "d1", 10, now - 12);
        assert!(v.verify(&edge).is_ok());
    }

    #[test]
    fn forged_and_wrong_algorithms_are_refused() {
        let v = TokenVerifier::new(&secret(), 0);
        let now = unix_now();
        let forged = mint_token(&Secret::new("another-secret-987654"), "f", "u", "d", 60, now);
        assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
        let claims = serde_json::json!({"fam":"f","sub":"u","dev":"d","exp":now+60,"iat":now});
        let none = format!("{}.{}.", b64(&serde_json::json!({"alg":"none","typ":"JWT"})), b64(&claims));
        assert_eq!(v.verify(&none), Err(AuthError::BadAlgorithm));
        // RS256 header with an HMAC-computed signature: the classic key-confusion forgery.
        let rs_header = b64(&serde_json::json!({"alg":"RS256","typ":"JWT"}));
        let signing_input = format!("{rs_header}.{}", b64(&claims));
        // The MAC used here does not matter: the header's algorithm must be refused before any
        // signature check, whatever the signature bytes are.
        let mut mac = Hmac::<Sha1>::new_from_slice(b"test-secret-0123456789").unwrap();
        mac.update(signing_input.as_bytes());
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(v.verify(&format!("{signing_input}.{sig}")), Err(AuthError::BadAlgorithm));
        assert_eq!(v.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(v.verify("garbage"), Err(AuthError::Malformed));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn bad_id_claims_are_refused() {
        let v = TokenVerifier::new(&secret(), 0);
        let t = mint_token(&secret(), "fam:1", "u", "d", 60, unix_now());
        assert_eq!(v.verify(&t), Err(AuthError::BadClaim));
        assert!(valid_id("a-b_c.d@e"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn turn_credential_matches_coturn_scheme() {
        let c = turn_credential(&secret(), "fam", "dev", 3600, 1_700_000_000);
        assert_eq!(c.username, "1700003600:fam:dev");
        // Independent value: python3 -c "import hmac,hashlib,base64;print(base64.b64encode(hmac.new(
        //   b'test-secret-0123456789', b'1700003600:fam:dev', hashlib.sha1).digest()).decode())"
        assert_eq!(c.credential, "KDoLUV7epDgyEOaCNzSKjrQjoRI=");
        assert_eq!(c.credential.len(), 28);
    }
}
