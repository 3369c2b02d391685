//! Cost of verifying one device token, per algorithm: what a registration pays before it
//! joins. `cargo run --release --example token_bench -- [rounds] [tokens]`
//!
//! Each round verifies `tokens` distinct tokens of each algorithm (HS256 with one secret,
//! HS256 with the matching secret last of three, ES256, EdDSA), interleaved by round so the
//! machine's drift hits every algorithm alike; prints each round and the median per token.

use std::time::Instant;

use jsonwebtoken::Algorithm;
use kinlink::auth::jwks;
use kinlink::auth::token::{KeySet, TokenPolicy, DEFAULT_MAX_TTL_SECS};
use kinlink::auth::{Minted, TokenVerifier};
use kinlink::config::Secret;

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let tokens: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let now = kinlink::auth::unix_now();
    let secret = Secret::new("bench-secret-0123456789abcdef");
    let es = jwks::signing_key(jwks::generate(Algorithm::ES256).unwrap().as_bytes(), Some("es".into())).unwrap();
    let ed = jwks::signing_key(jwks::generate(Algorithm::EdDSA).unwrap().as_bytes(), Some("ed".into())).unwrap();
    let doc = serde_json::json!({ "keys": [es.public_jwk.clone(), ed.public_jwk.clone()] }).to_string();
    let policy = |hs256| TokenPolicy { leeway_secs: 60, max_ttl_secs: DEFAULT_MAX_TTL_SECS, hs256, es256: true, eddsa: true, rs256: false };
    let public = TokenVerifier::new(policy(false), KeySet { file: jwks::parse(doc.as_bytes(), false).unwrap(), ..KeySet::default() });
    let hs = TokenVerifier::new(policy(true), KeySet { hs256: vec![secret.clone()], ..KeySet::default() });
    let rotated = vec![Secret::new("rotation-secret-a-0123456789"), Secret::new("rotation-secret-b-0123456789"), secret.clone()];
    let hs_last = TokenVerifier::new(policy(true), KeySet { hs256: rotated, ..KeySet::default() });
    let devices: Vec<String> = (0..tokens).map(|i| format!("device-{i}")).collect();
    fn mint(dev: &str, now: u64) -> Minted<'_> {
        Minted { fam: "bench-family", user: "u", dev, ttl_secs: 3600, now_unix: now, cnf_jwk: None }
    }
    let cases: Vec<(&str, &TokenVerifier, Vec<String>)> = vec![
        ("HS256", &hs, devices.iter().map(|d| mint(d, now).hs256(&secret)).collect()),
        ("HS256 (3rd of 3 secrets)", &hs_last, devices.iter().map(|d| mint(d, now).hs256(&secret)).collect()),
        ("ES256", &public, devices.iter().map(|d| mint(d, now).with_key(&es).unwrap()).collect()),
        ("EdDSA", &public, devices.iter().map(|d| mint(d, now).with_key(&ed).unwrap()).collect()),
    ];
    println!("# token_bench: {rounds} rounds x {tokens} tokens per algorithm; us per verification");
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        let mut line = format!("round {round}:");
        for (i, (name, verifier, toks)) in cases.iter().enumerate() {
            let t = Instant::now();
            for tok in toks {
                verifier.verify(tok, now).expect("a valid token");
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / toks.len() as f64;
            per[i].push(us);
            line += &format!(" {name}={us:.2}");
        }
        println!("{line}");
    }
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let mut v = per[i].clone();
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        println!("median {name}: {median:.2} us/token ({:.0} verifications/s on one core)", 1e6 / median);
    }
}
