//! Public keys from a JWKS document (RFC 7517), the only kind of key kinlink needs to accept
//! ES256 and EdDSA device tokens; and, for development, private keys in PKCS#8 PEM to mint
//! such tokens (`kinlink token --key`) and to print their JWKS (`kinlink keys`).
//!
//! The parser is strict on purpose: a document with private key material (`d`), a symmetric
//! key (`kty: oct`) or a key whose `alg` disagrees with its type is refused whole, so a
//! mistake in the file cannot turn into a key an attacker can sign with.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::{json, Value};

/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys one document may hold.
pub const MAX_KEYS: usize = 64;

/// One verification key.
#[derive(Clone)]
pub struct PublicKey {
    /// `kid`, when the document names one.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    /// The key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

/// Why a JWKS document or a private key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not JSON, or not `{"keys": [...]}`.
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    /// Over [`MAX_JWKS_BYTES`] or [`MAX_KEYS`].
    #[error("JWKS document too large: {0}")]
    TooLarge(String),
    /// A key carries private material; kinlink must only ever hold public keys.
    #[error("key {0}: has private key material (\"d\"); publish only the public key")]
    Private(String),
    /// A key kinlink does not verify with (symmetric, unknown type or curve, RS256 when not
    /// configured) or whose parameters are malformed.
    #[error("key {0}")]
    Unsupported(String),
    /// A private key file kinlink cannot use.
    #[error("private key: {0}")]
    BadPrivateKey(String),
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

fn b64url_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWS name of an algorithm kinlink accepts.
pub fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        Algorithm::RS256 => "RS256",
        _ => "other",
    }
}

/// Parses a JWKS document. `rs256` allows RSA keys (off unless `auth.algorithms` lists it).
pub fn parse(bytes: &[u8], rs256: bool) -> Result<Vec<PublicKey>, KeyError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(KeyError::TooLarge(format!("{} bytes, at most {MAX_JWKS_BYTES}", bytes.len())));
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| KeyError::NotJwks(e.to_string()))?;
    let keys = doc.get("keys").and_then(Value::as_array).ok_or_else(|| KeyError::NotJwks("no \"keys\" array".into()))?;
    if keys.len() > MAX_KEYS {
        return Err(KeyError::TooLarge(format!("{} keys, at most {MAX_KEYS}", keys.len())));
    }
    keys.iter().enumerate().map(|(i, k)| parse_key(i, k, rs256)).collect()
}

fn parse_key(index: usize, k: &Value, rs256: bool) -> Result<PublicKey, KeyError> {
    let kid = k.get("kid").and_then(Value::as_str).map(str::to_owned);
    let name = match &kid {
        Some(kid) => format!("{kid:?}"),
        None => format!("#{index}"),
    };
    let field = |f: &str| k.get(f).and_then(Value::as_str);
    if k.get("d").is_some() {
        return Err(KeyError::Private(name));
    }
    if let Some(u) = field("use") {
        if u != "sig" {
            return Err(KeyError::Unsupported(format!("{name}: use {u:?} is not \"sig\"")));
        }
    }
    let bytes = |f: &str, len: usize| -> Result<String, KeyError> {
        let v = field(f).ok_or_else(|| KeyError::Unsupported(format!("{name}: no \"{f}\"")))?;
        match b64url(v) {
            Some(b) if b.len() == len => Ok(v.trim_end_matches('=').to_owned()),
            _ => Err(KeyError::Unsupported(format!("{name}: \"{f}\" is not {len} bytes of base64url"))),
        }
    };
    let (alg, key) = match (field("kty"), field("crv")) {
        (Some("EC"), Some("P-256")) => {
            let key = DecodingKey::from_ec_components(&bytes("x", 32)?, &bytes("y", 32)?)
                .map_err(|e| KeyError::Unsupported(format!("{name}: {e}")))?;
            (Algorithm::ES256, key)
        }
        (Some("OKP"), Some("Ed25519")) => {
            let key = DecodingKey::from_ed_components(&bytes("x", 32)?).map_err(|e| KeyError::Unsupported(format!("{name}: {e}")))?;
            (Algorithm::EdDSA, key)
        }
        (Some("RSA"), _) if rs256 => {
            let (Some(n), Some(e)) = (field("n"), field("e")) else {
                return Err(KeyError::Unsupported(format!("{name}: RSA key without n and e")));
            };
            if b64url(n).is_none_or(|n| n.len() < 256) {
                return Err(KeyError::Unsupported(format!("{name}: RSA modulus under 2048 bits")));
            }
            (Algorithm::RS256, DecodingKey::from_rsa_components(n, e).map_err(|e| KeyError::Unsupported(format!("{name}: {e}")))?)
        }
        (Some("RSA"), _) => return Err(KeyError::Unsupported(format!("{name}: RSA keys are refused unless auth.algorithms lists RS256"))),
        (Some("oct"), _) => {
            return Err(KeyError::Unsupported(format!("{name}: symmetric keys do not belong in a public key set (HS256 secrets go in auth.token_secret)")))
        }
        (kty, crv) => return Err(KeyError::Unsupported(format!("{name}: kty {kty:?} crv {crv:?} is not EC P-256 or OKP Ed25519"))),
    };
    if let Some(a) = field("alg") {
        if a != alg_name(alg) {
            return Err(KeyError::Unsupported(format!("{name}: alg {a:?} does not match its key type ({})", alg_name(alg))));
        }
    }
    Ok(PublicKey { kid, alg, key })
}

/// A private key for minting (development and tests; production backends hold their own).
pub struct SigningKey {
    /// ES256 or EdDSA.
    pub alg: Algorithm,
    /// Put in the token header.
    pub kid: Option<String>,
    /// The key.
    pub key: EncodingKey,
    /// The matching public JWK (with `kid`, `alg`, `use`).
    pub public_jwk: Value,
}

/// Reads a PKCS#8 PEM private key (`openssl genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:P-256`, `openssl genpkey -algorithm ed25519`, or `kinlink keys generate`).
pub fn signing_key(pem: &[u8], kid: Option<String>) -> Result<SigningKey, KeyError> {
    use ring::signature::KeyPair;
    let der = match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(der))) => der,
        Ok(Some(_)) => {
            return Err(KeyError::BadPrivateKey("not PKCS#8 (\"BEGIN PRIVATE KEY\"); convert with `openssl pkcs8 -topk8 -nocrypt`".into()))
        }
        Ok(None) | Err(_) => return Err(KeyError::BadPrivateKey("no PEM private key found".into())),
    };
    let der = der.secret_pkcs8_der();
    let rng = ring::rand::SystemRandom::new();
    let (alg, key, mut jwk) = if let Ok(pair) = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
        let point = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64url_encode(&point[1..33]), "y": b64url_encode(&point[33..65])});
        (Algorithm::ES256, EncodingKey::from_ec_der(der), jwk)
    } else if let Ok(pair) = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(pair.public_key().as_ref())});
        (Algorithm::EdDSA, EncodingKey::from_ed_der(der), jwk)
    } else {
        return Err(KeyError::BadPrivateKey("neither an EC P-256 nor an Ed25519 key".into()));
    };
    jwk["alg"] = alg_name(alg).into();
    jwk["use"] = "sig".into();
    if let Some(kid) = &kid {
        jwk["kid"] = kid.clone().into();
    }
    Ok(SigningKey { alg, kid, key, public_jwk: jwk })
}

/// A new private key as PKCS#8 PEM: `ES256` (P-256) or `EdDSA` (Ed25519).
pub fn generate(alg: Algorithm) -> Result<String, KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let doc = match alg {
        Algorithm::ES256 => ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
        Algorithm::EdDSA => ring::signature::Ed25519KeyPair::generate_pkcs8(&rng),
        other => return Err(KeyError::BadPrivateKey(format!("cannot generate {other:?} keys; use ES256 or EdDSA"))),
    }
    .map_err(|_| KeyError::BadPrivateKey("the system random source failed".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
    Ok(format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_to_their_jwks() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA] {
            let pem = generate(alg).unwrap();
            let k = signing_key(pem.as_bytes(), Some("k1".into())).unwrap();
            assert_eq!(k.alg, alg);
            let doc = json!({"keys": [k.public_jwk]}).to_string();
            let keys = parse(doc.as_bytes(), false).unwrap();
            assert_eq!((keys[0].kid.as_deref(), keys[0].alg), (Some("k1"), alg));
        }
    }

    #[test]
    fn dangerous_or_malformed_documents_are_refused_whole() {
        let pem = generate(Algorithm::ES256).unwrap();
        let good = signing_key(pem.as_bytes(), Some("good".into())).unwrap().public_jwk;
        let with = |extra: Value| json!({"keys": [good.clone(), extra]}).to_string();
        let mut private = good.clone();
        private["d"] = "AAAA".into();
        assert!(matches!(parse(with(private).as_bytes(), false), Err(KeyError::Private(_))));
        let oct = json!({"kty": "oct", "k": "c2VjcmV0"});
        assert!(matches!(parse(with(oct).as_bytes(), false), Err(KeyError::Unsupported(m)) if m.contains("symmetric")));
        let mut wrong_alg = good.clone();
        wrong_alg["alg"] = "HS256".into();
        assert!(matches!(parse(with(wrong_alg).as_bytes(), false), Err(KeyError::Unsupported(m)) if m.contains("does not match")));
        let mut p384 = good.clone();
        p384["crv"] = "P-384".into();
        assert!(parse(with(p384).as_bytes(), false).is_err());
        let mut short = good.clone();
        short["x"] = "AAAA".into();
        assert!(parse(with(short).as_bytes(), false).is_err());
        let rsa = json!({"kty": "RSA", "n": b64url_encode(&[0xff; 256]), "e": "AQAB"});
        assert!(matches!(parse(with(rsa.clone()).as_bytes(), false), Err(KeyError::Unsupported(m)) if m.contains("RS256")));
        assert!(parse(with(rsa).as_bytes(), true).is_ok());
        assert!(matches!(parse(b"[]", false), Err(KeyError::NotJwks(_))));
        assert!(matches!(parse(b"not json", false), Err(KeyError::NotJwks(_))));
        let many = json!({"keys": vec![good.clone(); MAX_KEYS + 1]}).to_string();
        assert!(matches!(parse(many.as_bytes(), false), Err(KeyError::TooLarge(_))));
    }

    #[test]
    fn private_keys_other_than_pkcs8_p256_or_ed25519_are_refused() {
        assert!(signing_key(b"nothing here", None).is_err());
        assert!(generate(Algorithm::HS256).is_err());
    }
}
