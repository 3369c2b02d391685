//! Device token verification: which key checks a token, and the bounds on its time claims.
//!
//! The algorithm in the header picks the kind of key and nothing else can: an HS256 token is
//! only ever checked against HS256 secrets, an ES256 or EdDSA token only against public keys
//! of that type (picked by `kid`). `none` is refused, RS256 unless `auth.algorithms` lists it.
//! When public keys are configured, HS256 is off for devices by default; kinlink's own secret
//! then verifies only the throw-away self-check families it mints itself, so kinlink cannot
//! mint a token for any family the backend vouches for.
//!
//! Time claims are bounded against the caller's clock: `exp` at most `max_ttl_secs` ahead
//! (from now and from `iat`), `iat` and `nbf` not in the future, so no accepted token can
//! make a deadline computation overflow, and a revocation outlives every token it covers.

use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use super::jwks::{PublicKey, SigningKey};
use super::revocation::DenyList;
use super::{valid_id, AuthError, Claims};
use crate::config::Secret;

/// How tokens are judged, from `auth.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway_secs: u64,
    /// Longest lifetime accepted (`auth.max_token_ttl_secs`).
    pub max_ttl_secs: u64,
    /// HS256 accepted for device tokens (not only for kinlink's own self-check families).
    pub hs256: bool,
    /// ES256 accepted.
    pub es256: bool,
    /// EdDSA (Ed25519) accepted.
    pub eddsa: bool,
    /// RS256 accepted (off unless `auth.algorithms` lists it).
    pub rs256: bool,
}

impl TokenPolicy {
    /// The names of the accepted algorithms, for logs and `config check`.
    pub fn algorithms(&self) -> Vec<&'static str> {
        [("HS256", self.hs256), ("ES256", self.es256), ("EdDSA", self.eddsa), ("RS256", self.rs256)].iter().filter(|(_, on)| *on).map(|(a, _)| *a).collect()
    }

    fn accepts(&self, alg: Algorithm) -> bool {
        match alg {
            Algorithm::HS256 => self.hs256,
            Algorithm::ES256 => self.es256,
            Algorithm::EdDSA => self.eddsa,
            Algorithm::RS256 => self.rs256,
            _ => false,
        }
    }
}

/// The keys accepted right now. Each source (secrets, the JWKS file, the JWKS URL) replaces
/// its own part when it reloads.
#[derive(Debug, Default)]
pub struct KeySet {
    /// HS256 secrets: the first mints (self-check tokens, `kinlink token`), any verifies.
    pub hs256: Vec<Secret>,
    /// Keys from `auth.public_keys` (a file).
    pub file: Vec<PublicKey>,
    /// Keys from `auth.public_keys_url`.
    pub url: Vec<PublicKey>,
    /// Whether a JWKS URL is configured.
    pub url_configured: bool,
    /// Unix time until which the URL's keys may be used (last successful fetch + the stale
    /// period); 0 before the first fetch.
    pub url_valid_until: u64,
}

struct Inner {
    policy: TokenPolicy,
    keys: RwLock<KeySet>,
    deny: RwLock<DenyList>,
}

/// Verifies device tokens against the current keys and the deny list. Cheap to clone.
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<Inner>,
}

/// A self-check family: the only ones kinlink's own HS256 secret may vouch for when HS256 is
/// off for devices.
fn is_check_family(fam: &str) -> bool {
    fam.starts_with(crate::check::FAMILY_PREFIX)
}

impl TokenVerifier {
    /// A verifier with `keys` under `policy` and an empty deny list that keeps entries for
    /// the longest token lifetime.
    pub fn new(policy: TokenPolicy, keys: KeySet) -> Self {
        let deny = DenyList::new(policy.max_ttl_secs.saturating_add(policy.leeway_secs));
        TokenVerifier { inner: Arc::new(Inner { policy, keys: RwLock::new(keys), deny: RwLock::new(deny) }) }
    }

    /// HS256 with one secret, leeway as given, the default 30-day lifetime bound (tests and
    /// simple setups).
    pub fn hs256(secret: &Secret, leeway_secs: u64) -> Self {
        let policy = TokenPolicy { leeway_secs, max_ttl_secs: DEFAULT_MAX_TTL_SECS, hs256: true, es256: false, eddsa: false, rs256: false };
        TokenVerifier::new(policy, KeySet { hs256: vec![secret.clone()], ..KeySet::default() })
    }

    /// The policy.
    pub fn policy(&self) -> TokenPolicy {
        self.inner.policy
    }

    /// Replaces part of the key set.
    pub fn update_keys(&self, f: impl FnOnce(&mut KeySet)) {
        f(&mut self.inner.keys.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Reads the key set.
    pub fn with_keys<T>(&self, f: impl FnOnce(&KeySet) -> T) -> T {
        f(&self.inner.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The secret that mints HS256 tokens (self-check, `kinlink token`).
    pub fn minting_secret(&self) -> Option<Secret> {
        self.with_keys(|k| k.hs256.first().cloned())
    }

    /// The deny list.
    pub fn deny_list(&self) -> std::sync::RwLockWriteGuard<'_, DenyList> {
        self.inner.deny.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a token of `device` of `family` issued at `iat` is revoked now.
    pub fn is_revoked(&self, family: &str, device: &str, iat: u64) -> bool {
        self.inner.deny.read().unwrap_or_else(|e| e.into_inner()).covers(family, device, iat)
    }

    /// Checks algorithm, key, signature, time claims, ids and the deny list at `now_unix`.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            // A header the library cannot parse may still name an algorithm we refuse
            // (`"alg":"none"` is not even a variant of its enum): report it as such.
            Err(_) if header_alg(token).is_some() => return Err(AuthError::BadAlgorithm),
            Err(_) => return Err(AuthError::Malformed),
        };
        let claims = {
            let keys = self.inner.keys.read().unwrap_or_else(|e| e.into_inner());
            match header.alg {
                Algorithm::HS256 => self.verify_hs256(&keys, token)?,
                alg if self.inner.policy.accepts(alg) => verify_public(&keys, token, alg, header.kid.as_deref(), now_unix)?,
                _ => return Err(AuthError::BadAlgorithm),
            }
        };
        check_times(&claims, now_unix, &self.inner.policy)?;
        if !(valid_id(&claims.fam) && valid_id(&claims.sub) && valid_id(&claims.dev)) {
            return Err(AuthError::BadClaim);
        }
        if self.inner.deny.read().unwrap_or_else(|e| e.into_inner()).covers(&claims.fam, &claims.dev, claims.iat) {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }

    fn verify_hs256(&self, keys: &KeySet, token: &str) -> Result<Claims, AuthError> {
        if keys.hs256.is_empty() {
            return Err(AuthError::BadAlgorithm);
        }
        let validation = validation(Algorithm::HS256);
        let mut last = AuthError::BadSignature;
        for secret in &keys.hs256 {
            match jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.expose().as_bytes()), &validation) {
                Ok(data) if self.inner.policy.hs256 || is_check_family(&data.claims.fam) => return Ok(data.claims),
                // kinlink's own secret, presented for a family it does not own.
                Ok(_) => return Err(AuthError::BadAlgorithm),
                Err(e) => last = map_error(&e),
            }
            if last != AuthError::BadSignature {
                break;
            }
        }
        Err(last)
    }
}

/// ES256, EdDSA or RS256: the keys of that algorithm, the one named by `kid` when the token
/// names one.
fn verify_public(keys: &KeySet, token: &str, alg: Algorithm, kid: Option<&str>, now_unix: u64) -> Result<Claims, AuthError> {
    let url_fresh = keys.url_valid_until >= now_unix;
    let matches = |k: &&PublicKey| k.alg == alg && kid.is_none_or(|kid| k.kid.as_deref() == Some(kid));
    let mut candidates: Vec<&PublicKey> = keys.file.iter().filter(matches).collect();
    let from_url: Vec<&PublicKey> = keys.url.iter().filter(matches).collect();
    if url_fresh {
        candidates.extend(from_url.iter().copied());
    }
    if candidates.is_empty() {
        // The key would come from the URL: say so, not "unknown", when the URL is stale.
        return Err(if keys.url_configured && (!from_url.is_empty() || !url_fresh) { AuthError::KeysUnavailable } else { AuthError::UnknownKey });
    }
    let validation = validation(alg);
    let mut last = AuthError::BadSignature;
    for key in candidates {
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => last = map_error(&e),
        }
        if last != AuthError::BadSignature {
            break;
        }
    }
    Err(last)
}

/// Signature and algorithm only: time claims are checked against the caller's clock.
fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v
}

fn map_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::InvalidKeyFormat => AuthError::BadAlgorithm,
        _ => AuthError::Malformed,
    }
}

/// The bounds on `exp`, `nbf` and `iat`.
fn check_times(c: &Claims, now: u64, p: &TokenPolicy) -> Result<(), AuthError> {
    let late = now.saturating_add(p.leeway_secs);
    if c.exp.saturating_add(p.leeway_secs) < now {
        return Err(AuthError::Expired);
    }
    if c.nbf.is_some_and(|nbf| nbf > late) || c.iat > late {
        return Err(AuthError::NotYetValid);
    }
    let longest = p.max_ttl_secs.saturating_add(p.leeway_secs);
    if c.exp > now.saturating_add(longest) || (c.iat > 0 && c.exp.saturating_sub(c.iat) > longest) {
        return Err(AuthError::LifetimeTooLong);
    }
    Ok(())
}

fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(value.get("alg")?.as_str()?.to_string())
}

/// The default of `auth.max_token_ttl_secs`: 30 days.
pub const DEFAULT_MAX_TTL_SECS: u64 = 30 * 86_400;

/// A token to mint: the claims `kinlink token` and the self-check put in.
pub struct Minted<'a> {
    /// Family id.
    pub fam: &'a str,
    /// User id.
    pub user: &'a str,
    /// Device id.
    pub dev: &'a str,
    /// Lifetime.
    pub ttl_secs: u64,
    /// Issue time.
    pub now_unix: u64,
    /// The device's public JWK, for `cnf`.
    pub cnf_jwk: Option<serde_json::Value>,
}

impl Minted<'_> {
    fn claims(&self) -> Claims {
        Claims {
            fam: self.fam.into(),
            sub: self.user.into(),
            dev: self.dev.into(),
            exp: self.now_unix.saturating_add(self.ttl_secs),
            iat: self.now_unix,
            nbf: None,
            cnf: self.cnf_jwk.clone().map(|jwk| serde_json::json!({ "jwk": jwk })),
        }
    }

    /// Signs with an HS256 secret.
    pub fn hs256(&self, secret: &Secret) -> String {
        // Encoding HS256 with an in-memory key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &self.claims(), &EncodingKey::from_secret(secret.expose().as_bytes()))
            .expect("HS256 encoding")
    }

    /// Signs with a private key (ES256 or EdDSA).
    pub fn with_key(&self, key: &SigningKey) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(key.alg);
        header.kid = key.kid.clone();
        jsonwebtoken::encode(&header, &self.claims(), &key.key)
    }
}

/// Mints an HS256 device token, as a simple backend (or `kinlink token`) does.
pub fn mint_token(secret: &Secret, fam: &str, user: &str, dev: &str, ttl_secs: u64, now_unix: u64) -> String {
    Minted { fam, user, dev, ttl_secs, now_unix, cnf_jwk: None }.hs256(secret)
}

#[cfg(test)]
mod tests {
    use super::super::jwks;
    use super::*;
    use base64::Engine;
    use hmac::Mac;

    const NOW: u64 = 1_800_000_000;

    fn secret() -> Secret {
        Secret::new("test-secret-0123456789")
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn raw(header: serde_json::Value, claims: serde_json::Value, secret: &[u8]) -> String {
        let input = format!("{}.{}", b64(&header), b64(&claims));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    fn public_policy() -> TokenPolicy {
        TokenPolicy { leeway_secs: 0, max_ttl_secs: DEFAULT_MAX_TTL_SECS, hs256: false, es256: true, eddsa: true, rs256: false }
    }

    fn key(alg: Algorithm, kid: &str) -> (SigningKey, PublicKey) {
        let k = jwks::signing_key(jwks::generate(alg).unwrap().as_bytes(), Some(kid.into())).unwrap();
        let doc = serde_json::json!({"keys": [k.public_jwk]}).to_string();
        let public = jwks::parse(doc.as_bytes(), false).unwrap().remove(0);
        (k, public)
    }

    fn mint<'a>(fam: &'a str, dev: &'a str, ttl: u64, now: u64) -> Minted<'a> {
        Minted { fam, user: "u", dev, ttl_secs: ttl, now_unix: now, cnf_jwk: None }
    }

    #[test]
    fn round_trip_and_expiry() {
        let v = TokenVerifier::hs256(&secret(), 5);
        let t = mint_token(&secret(), "fam1", "u1", "d1", 60, NOW);
        let c = v.verify(&t, NOW).unwrap();
        assert_eq!((c.fam.as_str(), c.sub.as_str(), c.dev.as_str()), ("fam1", "u1", "d1"));
        let old = mint_token(&secret(), "fam1", "u1", "d1", 10, NOW - 100);
        assert_eq!(v.verify(&old, NOW), Err(AuthError::Expired));
        // Within the leeway it still passes.
        let edge = mint_token(&secret(), "fam1", "u1", "d1", 10, NOW - 12);
        assert!(v.verify(&edge, NOW).is_ok());
    }

    #[test]
    fn every_time_claim_is_bounded() {
        let v = TokenVerifier::hs256(&secret(), 60);
        let s = secret();
        let claims = |exp: u64, iat: u64, nbf: Option<u64>| {
            let mut c = serde_json::json!({"fam": "f", "sub": "u", "dev": "d", "exp": exp, "iat": iat});
            if let Some(nbf) = nbf {
                c["nbf"] = nbf.into();
            }
            raw(serde_json::json!({"alg": "HS256", "typ": "JWT"}), c, s.expose().as_bytes())
        };
        // The attack: exp near 2^64 once overflowed `Instant + Duration` in the session.
        for exp in [(1u64 << 63) + NOW, u64::MAX - 61, u64::MAX] {
            assert_eq!(v.verify(&claims(exp, NOW, None), NOW), Err(AuthError::LifetimeTooLong), "exp {exp}");
        }
        // Past u64: not a number serde takes.
        let huge = raw(
            serde_json::json!({"alg": "HS256"}),
            serde_json::json!({"fam": "f", "sub": "u", "dev": "d", "exp": 1e30}),
            s.expose().as_bytes(),
        );
        assert_eq!(v.verify(&huge, NOW), Err(AuthError::Malformed));
        let max = DEFAULT_MAX_TTL_SECS;
        assert!(v.verify(&claims(NOW + max, NOW, None), NOW).is_ok());
        assert_eq!(v.verify(&claims(NOW + max + 61, 0, None), NOW), Err(AuthError::LifetimeTooLong));
        // Long-lived by its own iat, even if exp is near.
        assert_eq!(v.verify(&claims(NOW + 10, NOW + 10 - max - 100, None), NOW), Err(AuthError::LifetimeTooLong));
        assert_eq!(v.verify(&claims(NOW + 600, NOW + 120, None), NOW), Err(AuthError::NotYetValid));
        assert_eq!(v.verify(&claims(NOW + 600, NOW, Some(NOW + 120)), NOW), Err(AuthError::NotYetValid));
        assert!(v.verify(&claims(NOW + 600, NOW + 30, Some(NOW + 30)), NOW).is_ok());
    }

    #[test]
    fn forged_and_wrong_algorithms_are_refused() {
        let v = TokenVerifier::hs256(&secret(), 0);
        let forged = mint_token(&Secret::new("another-secret-987654"), "f", "u", "d", 60, NOW);
        assert_eq!(v.verify(&forged, NOW), Err(AuthError::BadSignature));
        let claims = serde_json::json!({"fam":"f","sub":"u","dev":"d","exp":NOW+60,"iat":NOW});
        let none = format!("{}.{}.", b64(&serde_json::json!({"alg":"none","typ":"JWT"})), b64(&claims));
        assert_eq!(v.verify(&none, NOW), Err(AuthError::BadAlgorithm));
        // RS256 header with an HMAC-computed signature: the classic key-confusion forgery.
        let rs = raw(serde_json::json!({"alg":"RS256","typ":"JWT"}), claims.clone(), b"test-secret-0123456789");
        assert_eq!(v.verify(&rs, NOW), Err(AuthError::BadAlgorithm));
        assert_eq!(v.verify("not.a.jwt", NOW), Err(AuthError::Malformed));
        assert_eq!(v.verify("garbage", NOW), Err(AuthError::Malformed));
        assert_eq!(v.verify("", NOW), Err(AuthError::Missing));
    }

    #[test]
    fn several_hs256_secrets_verify_and_the_first_mints() {
        let (old, new) = (Secret::new("old-secret-0123456789"), Secret::new("new-secret-0123456789"));
        let v = TokenVerifier::hs256(&new, 0);
        v.update_keys(|k| k.hs256.push(old.clone()));
        assert_eq!(v.minting_secret(), Some(new.clone()));
        for s in [&old, &new] {
            assert!(v.verify(&mint_token(s, "f", "u", "d", 60, NOW), NOW).is_ok());
        }
        v.update_keys(|k| k.hs256.retain(|s| s != &old));
        assert_eq!(v.verify(&mint_token(&old, "f", "u", "d", 60, NOW), NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn public_keys_verify_by_kid_and_never_by_their_bytes_as_a_secret() {
        let (es, es_pub) = key(Algorithm::ES256, "es-1");
        let (ed, ed_pub) = key(Algorithm::EdDSA, "ed-1");
        let (other, _) = key(Algorithm::ES256, "es-1");
        let own = Secret::new("kinlink-own-secret-0123");
        let v = TokenVerifier::new(public_policy(), KeySet { hs256: vec![own.clone()], file: vec![es_pub.clone(), ed_pub], ..KeySet::default() });
        for k in [&es, &ed] {
            let t = mint("fam", "d", 600, NOW).with_key(k).unwrap();
            assert_eq!(v.verify(&t, NOW).unwrap().fam, "fam");
        }
        // Same kid, another key: the signature fails.
        assert_eq!(v.verify(&mint("fam", "d", 600, NOW).with_key(&other).unwrap(), NOW), Err(AuthError::BadSignature));
        let (unknown, _) = key(Algorithm::ES256, "es-9");
        assert_eq!(v.verify(&mint("fam", "d", 600, NOW).with_key(&unknown).unwrap(), NOW), Err(AuthError::UnknownKey));
        // Algorithm confusion: an HS256 token whose "secret" is the public key's own text.
        let jwk_text = serde_json::to_string(&es.public_jwk).unwrap();
        let confused = raw(
            serde_json::json!({"alg": "HS256", "kid": "es-1"}),
            serde_json::json!({"fam":"fam","sub":"u","dev":"d","exp":NOW+60,"iat":NOW}),
            jwk_text.as_bytes(),
        );
        assert_eq!(v.verify(&confused, NOW), Err(AuthError::BadSignature));
        // kinlink's own secret mints only self-check families once HS256 is off for devices.
        assert_eq!(v.verify(&mint_token(&own, "fam", "u", "d", 60, NOW), NOW), Err(AuthError::BadAlgorithm));
        assert!(v.verify(&mint_token(&own, "check-0011", "check", "check-a", 60, NOW), NOW).is_ok());
        // An ES256 header on an EdDSA signature.
        let t = mint("fam", "d", 600, NOW).with_key(&ed).unwrap();
        let body = t.split_once('.').unwrap().1;
        let relabelled = format!("{}.{body}", b64(&serde_json::json!({"alg": "ES256", "kid": "es-1"})));
        assert_eq!(v.verify(&relabelled, NOW), Err(AuthError::BadSignature));
        // A token without kid tries every key of its algorithm.
        let mut nokid = jwks::signing_key(jwks::generate(Algorithm::ES256).unwrap().as_bytes(), None).unwrap();
        nokid.key = es.key.clone();
        assert!(v.verify(&mint("fam", "d", 600, NOW).with_key(&nokid).unwrap(), NOW).is_ok());
        // cnf is carried through.
        let cnf = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "abc"});
        let with_cnf = Minted { cnf_jwk: Some(cnf.clone()), ..mint("fam", "d", 600, NOW) }.with_key(&es).unwrap();
        assert_eq!(v.verify(&with_cnf, NOW).unwrap().cnf, Some(serde_json::json!({ "jwk": cnf })));
    }

    #[test]
    fn url_keys_stop_after_their_stale_period_with_a_cause() {
        let (es, es_pub) = key(Algorithm::ES256, "url-1");
        let keys = KeySet { url: vec![es_pub], url_configured: true, url_valid_until: NOW + 100, ..KeySet::default() };
        let v = TokenVerifier::new(public_policy(), keys);
        let t = mint("fam", "d", 600, NOW).with_key(&es).unwrap();
        assert!(v.verify(&t, NOW + 100).is_ok());
        assert_eq!(v.verify(&t, NOW + 101), Err(AuthError::KeysUnavailable));
        // Never fetched: unavailable, not unknown.
        v.update_keys(|k| {
            k.url.clear();
            k.url_valid_until = 0;
        });
        assert_eq!(v.verify(&t, NOW), Err(AuthError::KeysUnavailable));
    }

    #[test]
    fn revoked_tokens_are_refused_and_later_ones_are_not() {
        let v = TokenVerifier::hs256(&secret(), 0);
        let before = mint_token(&secret(), "f", "u", "d", 600, NOW - 10);
        v.deny_list().revoke_device("f", "d", NOW);
        assert_eq!(v.verify(&before, NOW), Err(AuthError::Revoked));
        assert!(v.verify(&mint_token(&secret(), "f", "u", "other", 600, NOW - 10), NOW).is_ok());
        assert!(v.verify(&mint_token(&secret(), "f", "u", "d", 600, NOW + 1), NOW + 1).is_ok());
        v.deny_list().revoke_family("f", NOW + 5);
        assert_eq!(v.verify(&mint_token(&secret(), "f", "u", "other", 600, NOW), NOW + 5), Err(AuthError::Revoked));
    }

    #[test]
    fn bad_id_claims_are_refused() {
        let v = TokenVerifier::hs256(&secret(), 0);
        let t = mint_token(&secret(), "fam:1", "u", "d", 60, NOW);
        assert_eq!(v.verify(&t, NOW), Err(AuthError::BadClaim));
    }
}
