//! Device tokens kinlink cannot forge, the bounds on their time claims, and rotation of every
//! secret without logging anyone out: the real binary with JWKS files it reloads, a JWKS URL
//! on a local HTTPS server, and HS256 and TURN secrets rotated while a family is connected
//! and relaying.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::binary::{bin, serve, Running};
use common::coturn::{coturn_peer, uclient_with_secret};
use common::*;
use serde_json::{json, Value};

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// An HS256 token over arbitrary claims and header, signed with `secret`.
fn hs256(header: Value, claims: Value, secret: &[u8]) -> String {
    use hmac::Mac;
    let input = format!("{}.{}", b64(&header), b64(&claims));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// Registers over `url` with `token`; returns the client and the first answer.
async fn try_register(url: &str, family: &str, device: &str, token: &str) -> (Client, Value) {
    let mut c = Client::connect(url).await;
    c.send(json!({"type":"register","familyId":family,"userId":"u","deviceId":device,"token":token})).await;
    let first = c.recv().await;
    (c, first)
}

/// The registration is refused with 4401 and an error naming `message`.
async fn refused(url: &str, family: &str, device: &str, token: &str, message: &str) {
    let (mut c, e) = try_register(url, family, device, token).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unauthorized")), "{e}");
    assert!(e["message"].as_str().unwrap().contains(message), "want {message:?}: {e}");
    assert_eq!(c.expect_close().await, 4401);
}

#[tokio::test]
async fn time_claims_past_the_lifetime_bound_are_refused_and_nothing_panics() {
    let dir = temp_dir("time-claims");
    let server = serve(&dir, &["--set", &format!("auth.token_secret={TOKEN_SECRET}")]);
    let url = format!("ws://{}/signal", server.http);
    let metric = |sample: &'static str| {
        let addr = server.metrics;
        async move {
            let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
            metric_value(&text, sample).unwrap_or_else(|| panic!("{sample} not in /metrics"))
        }
    };
    let now = kinlink::auth::unix_now();
    // exp between 2^63 + now and 2^64 - 61 once overflowed `Instant + Duration` in the
    // session and panicked its task (64 of 100 connections), leaving the gauge behind.
    let exps = [(1u64 << 63) + now, u64::MAX - 61, u64::MAX, now + 31 * 86_400];
    // 100 connections, 20 at a time (under the per-address admission caps).
    for batch in 0..5 {
        let mut tasks = Vec::new();
        for i in batch * 20..(batch + 1) * 20 {
            let url = url.clone();
            let exp = exps[i % exps.len()];
            tasks.push(tokio::spawn(async move {
                let claims = json!({"fam":"f","sub":"u","dev":format!("d{i}"),"exp":exp,"iat":now});
                let tok = hs256(json!({"alg":"HS256","typ":"JWT"}), claims, TOKEN_SECRET.as_bytes());
                refused(&url, "f", &format!("d{i}"), &tok, "max_token_ttl_secs").await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert_eq!(metric(r#"kinlink_auth_failures_total{reason="lifetime_too_long"}"#).await, 100.0);
    let deadline = std::time::Instant::now() + WAIT;
    while metric("kinlink_signal_connections").await != 0.0 {
        assert!(std::time::Instant::now() < deadline, "kinlink_signal_connections stays above 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric("kinlink_panics_total").await, 0.0);
    // A token within the bound still registers.
    let (_c, reg) = try_register(&url, "f", "fine", &token_ttl("f", "u", "fine", 30 * 86_400)).await;
    assert_eq!(reg["type"], "registered", "{reg}");
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn token_command_refuses_lifetimes_the_server_would_refuse() {
    let dir = temp_dir("token-ttl");
    std::fs::write(dir.join("token_secret"), "a-secret-for-the-ttl-test-0123").unwrap();
    for ttl in ["9223372038854775808s", "18446744073709551000s", "31d"] {
        let out = bin().args(["--data-dir", dir.to_str().unwrap(), "token", "--family", "f", "--user", "u", "--device", "d", "--ttl", ttl]).output().unwrap();
        assert!(!out.status.success(), "--ttl {ttl} minted {}", String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("max_token_ttl_secs") || err.contains("positive duration") || err.contains("not a duration"), "{ttl}: {err}");
    }
    let out = bin().args(["--data-dir", dir.to_str().unwrap(), "token", "--family", "f", "--user", "u", "--device", "d", "--ttl", "30d"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kinlink keys generate`: a private key file and the JWKS printed for it.
fn generate_key(dir: &Path, alg: &str, kid: &str) -> (std::path::PathBuf, Value) {
    let key = dir.join(format!("{kid}.pem"));
    let out = bin().args(["keys", "generate", "--alg", alg, "--kid", kid, "--out", key.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jwks: Value = serde_json::from_slice(&out.stdout).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    (key, jwks["keys"][0].clone())
}

/// `kinlink token --key`.
fn mint_with(key: &Path, kid: &str, family: &str, device: &str) -> String {
    let out = bin()
        .args(["token", "--family", family, "--user", "u", "--device", device, "--ttl", "1h", "--key", key.to_str().unwrap(), "--kid", kid])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn write_jwks(path: &Path, keys: &[&Value]) {
    // Written aside and renamed: the server never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sighup(child: &std::process::Child) {
    assert!(std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
}

/// Waits until the server logs `message` (JSON logs).
fn wait_log(server: &Running, message: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = server.log.recv_timeout(left).unwrap_or_else(|_| panic!("no log line {message:?}"));
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"].as_str().is_some_and(|m| m.contains(message)) {
            return v;
        }
    }
}

#[tokio::test]
async fn es256_and_eddsa_tokens_verify_with_a_jwks_file_that_changes_under_connected_devices() {
    let dir = temp_dir("jwks-file");
    let (es_key, es_jwk) = generate_key(&dir, "ES256", "es-1");
    let (ed_key, ed_jwk) = generate_key(&dir, "EdDSA", "ed-1");
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, &[&es_jwk]);
    let server = serve(&dir, &["--set", &format!("auth.public_keys={}", jwks.display()), "--set", "auth.reload_poll_secs=3600"]);
    let url = format!("ws://{}/signal", server.http);

    let (mut a, reg) = try_register(&url, "fam", "a", &mint_with(&es_key, "es-1", "fam", "a")).await;
    assert_eq!(reg["type"], "registered", "{reg}");
    refused(&url, "fam", "b", &mint_with(&ed_key, "ed-1", "fam", "b"), "key id is not known").await;

    // kinlink's own secret (generated into its data directory) signs only its self-check
    // families: `kinlink token` without --key mints what this server refuses.
    let out = bin().args(["--data-dir", dir.to_str().unwrap(), "token", "--family", "fam", "--user", "u", "--device", "z"]).output().unwrap();
    assert!(out.status.success());
    refused(&url, "fam", "z", String::from_utf8_lossy(&out.stdout).trim(), "algorithm not accepted").await;
    // Algorithm confusion: HS256 keyed with the public key's own text, naming its kid; and none.
    let now = kinlink::auth::unix_now();
    let claims = json!({"fam":"fam","sub":"u","dev":"x","exp":now+600,"iat":now});
    let confused = hs256(json!({"alg":"HS256","kid":"es-1"}), claims.clone(), es_jwk.to_string().as_bytes());
    // It is only ever checked against HS256 secrets, never against the public key's bytes.
    refused(&url, "fam", "x", &confused, "signature invalid").await;
    let none = format!("{}.{}.", b64(&json!({"alg":"none"})), b64(&claims));
    refused(&url, "fam", "x", &none, "algorithm not accepted").await;

    // Both keys: the new kid works at once after SIGHUP; `a` stays connected throughout.
    write_jwks(&jwks, &[&es_jwk, &ed_jwk]);
    sighup(&server.child);
    wait_log(&server, "auth.public_keys loaded");
    let (mut b, reg) = try_register(&url, "fam", "b", &mint_with(&ed_key, "ed-1", "fam", "b")).await;
    assert_eq!(reg["type"], "registered", "{reg}");
    assert_eq!(a.recv().await["type"], "device-online");

    // A document with private key material is refused whole; the keys stay as they were.
    let mut private = ed_jwk.clone();
    private["d"] = json!("AAAA");
    write_jwks(&jwks, &[&es_jwk, &private]);
    sighup(&server.child);
    let failed = wait_log(&server, "reload failed");
    assert!(failed["fields"]["error"].as_str().unwrap().contains("private key material"), "{failed}");
    let (_c, reg) = try_register(&url, "fam", "c", &mint_with(&es_key, "es-1", "fam", "c")).await;
    assert_eq!(reg["type"], "registered", "{reg}");

    // The old kid removed: new registrations with it are refused, connected devices stay.
    write_jwks(&jwks, &[&ed_jwk]);
    sighup(&server.child);
    wait_log(&server, "auth.public_keys loaded");
    refused(&url, "fam", "d", &mint_with(&es_key, "es-1", "fam", "d"), "key id is not known").await;
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"}})).await;
    let offer = loop {
        let m = b.recv().await;
        if m["type"] == "offer" {
            break m;
        }
    };
    assert_eq!(offer["fromDeviceId"], "a");
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A one-file HTTPS server on 127.0.0.1: answers every request with `body` while `up`, and
/// refuses connections once `up` is false.
async fn jwks_server(cert: &Path, key: &Path, body: String, up: Arc<AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice()).collect::<Result<_, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice()).unwrap().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config =
        rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_no_client_auth().with_single_cert(certs, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if !up.load(Ordering::Relaxed) {
                continue; // dropped: the fetch fails
            }
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_jwks_url_keeps_its_keys_for_the_stale_period_then_refusals_name_the_cause() {
    let dir = temp_dir("jwks-url");
    let (cert, key) = self_signed_cert(&dir);
    let signing = kinlink::auth::jwks::signing_key(kinlink::auth::jwks::generate(jsonwebtoken::Algorithm::ES256).unwrap().as_bytes(), Some("url-1".into())).unwrap();
    let up = Arc::new(AtomicBool::new(true));
    let port = jwks_server(&cert, &key, json!({"keys": [signing.public_jwk]}).to_string(), up.clone()).await;
    let server = TestServer::with(|c| {
        c.auth.public_keys_url = format!("https://127.0.0.1:{port}/.well-known/jwks.json");
        c.auth.public_keys_ca_file = Some(cert.clone());
        c.auth.public_keys_refresh_secs = 1;
        c.auth.public_keys_max_stale_secs = 3;
    })
    .await;
    let mint = |dev: &str| {
        kinlink::auth::Minted { fam: "fam", user: "u", dev, ttl_secs: 600, now_unix: kinlink::auth::unix_now(), cnf_jwk: None }.with_key(&signing).unwrap()
    };
    server.wait_metric(r#"kinlink_auth_jwks_url_fetches_total{result="ok"}"#, 1.0).await;
    let (_a, reg) = try_register(&server.ws_url(), "fam", "a", &mint("a")).await;
    assert_eq!(reg["type"], "registered", "{reg}");
    // HS256 is off for devices once public keys are configured.
    refused(&server.ws_url(), "fam", "h", &token("fam", "u", "h"), "algorithm not accepted").await;

    up.store(false, Ordering::Relaxed);
    let down_at = std::time::Instant::now();
    // Within the stale period the cached keys keep working.
    let (_b, reg) = try_register(&server.ws_url(), "fam", "b", &mint("b")).await;
    assert_eq!(reg["type"], "registered", "{reg}");
    assert!(down_at.elapsed() < Duration::from_secs(2));
    // Past it (3 s after the last good fetch), refusals say why.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    refused(&server.ws_url(), "fam", "c", &mint("c"), "JWKS URL has not answered").await;
    assert!(server.metric(r#"kinlink_auth_jwks_url_fetches_total{result="error"}"#).await >= 2.0);
    assert_eq!(server.metric(r#"kinlink_auth_failures_total{reason="keys_unavailable"}"#).await, 1.0);
    // Back up: accepted again after the next fetch.
    up.store(true, Ordering::Relaxed);
    let ok = server.metric(r#"kinlink_auth_jwks_url_fetches_total{result="ok"}"#).await;
    server.wait_metric(r#"kinlink_auth_jwks_url_fetches_total{result="ok"}"#, ok + 1.0).await;
    let (_c, reg) = try_register(&server.ws_url(), "fam", "c", &mint("c")).await;
    assert_eq!(reg["type"], "registered", "{reg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends `msg` through `relay` to the echo `peer` and checks it comes back.
async fn echo(relay: &impl webrtc_util::conn::Conn, peer: std::net::SocketAddr, msg: &[u8]) {
    let mut buf = [0u8; 64];
    relay.send_to(msg, peer).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.expect("echo").unwrap();
    assert_eq!(&buf[..n], msg);
}

fn write_secrets(path: &Path, secrets: &[&str]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, secrets.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The TURN credentials in a `registered` or `ice-servers` message.
fn turn_creds(msg: &Value) -> (String, String) {
    let s = msg["iceServers"].as_array().unwrap().iter().find(|s| s.get("username").is_some()).expect("a TURN block");
    (s["username"].as_str().unwrap().into(), s["credential"].as_str().unwrap().into())
}

#[tokio::test]
async fn secrets_rotate_while_a_family_is_connected_and_relaying() {
    let dir = temp_dir("rotation");
    let (token_file, turn_file) = (dir.join("token_secrets"), dir.join("turn_secrets"));
    let (old_tok, new_tok) = ("old-token-secret-0123456789", "new-token-secret-0123456789");
    let (old_turn, new_turn) = ("old-turn-secret-0123456789", "new-turn-secret-0123456789");
    write_secrets(&token_file, &[old_tok]);
    write_secrets(&turn_file, &[old_turn]);
    let server = TestServer::with(|c| {
        c.auth.token_secret = None;
        c.auth.token_secrets_file = Some(token_file.clone());
        c.turn.secret = None;
        c.turn.secrets_file = Some(turn_file.clone());
        c.auth.reload_poll_secs = 1;
    })
    .await;
    let mint = |secret: &str, dev: &str| kinlink::auth::mint_token(&kinlink::config::Secret::new(secret), "fam", "u", dev, 600, kinlink::auth::unix_now());
    let url = server.ws_url();
    let (mut a, reg_a) = try_register(&url, "fam", "a", &mint(old_tok, "a")).await;
    assert_eq!(reg_a["type"], "registered");
    // A relay over UDP with the credentials handed out before the rotation.
    let (user, pass) = turn_creds(&reg_a);
    let client = turn_client(server.turn_udp.unwrap(), user.clone(), pass.clone()).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().expect("allocate");
    let (peer, _) = echo_peer().await;
    echo(&relay, peer, b"before").await;

    // New secrets first, old ones kept.
    write_secrets(&token_file, &[new_tok, old_tok]);
    write_secrets(&turn_file, &[new_turn, old_turn]);
    server.wait_metric(r#"kinlink_auth_key_reloads_total{result="ok",source="token_secrets"}"#, 1.0).await;
    server.wait_metric(r#"kinlink_auth_key_reloads_total{result="ok",source="turn_secrets"}"#, 1.0).await;
    let (_b, reg_b) = try_register(&url, "fam", "b", &mint(new_tok, "b")).await;
    assert_eq!(reg_b["type"], "registered", "new tokens work at once: {reg_b}");
    let (_c, reg_c) = try_register(&url, "fam", "c", &mint(old_tok, "c")).await;
    assert_eq!(reg_c["type"], "registered", "old tokens until their secret is removed: {reg_c}");
    // Credentials handed out now are minted with the new TURN secret, and both allocate,
    // over UDP (the turn crate) and TCP (coturn's client with each secret).
    let (new_user, new_pass) = turn_creds(&reg_b);
    assert_eq!(new_pass, kinlink::auth::turn_password(&kinlink::config::Secret::new(new_turn), &new_user));
    let fresh = turn_client(server.turn_udp.unwrap(), new_user, new_pass).await;
    let fresh_relay = tokio::time::timeout(WAIT, fresh.allocate()).await.unwrap().expect("allocate with the new secret");
    echo(&fresh_relay, peer, b"fresh").await;
    let (coturn, peer_port) = coturn_peer().await;
    let tcp_port = server.turn_tcp.unwrap().port();
    for secret in [old_turn, new_turn] {
        let (received, lost, text) =
            tokio::task::spawn_blocking(move || uclient_with_secret(secret, &["-t"], tcp_port, peer_port, 1, 10)).await.unwrap();
        // One client is a pair of allocations, 10 messages each way.
        assert_eq!((received, lost), (20, 0), "TCP with {secret}: {text}");
    }

    // Old secrets removed: old tokens and credentials are refused; nobody was disconnected
    // and the allocation made with the old credentials keeps relaying.
    write_secrets(&token_file, &[new_tok]);
    write_secrets(&turn_file, &[new_turn]);
    server.wait_metric(r#"kinlink_auth_key_reloads_total{result="ok",source="token_secrets"}"#, 2.0).await;
    server.wait_metric(r#"kinlink_auth_key_reloads_total{result="ok",source="turn_secrets"}"#, 2.0).await;
    refused(&url, "fam", "d", &mint(old_tok, "d"), "signature invalid").await;
    let stale = turn_client(server.turn_udp.unwrap(), user, pass).await;
    assert!(tokio::time::timeout(WAIT, stale.allocate()).await.unwrap().is_err(), "old TURN credentials refused");
    let (received, _, text) = tokio::task::spawn_blocking(move || uclient_with_secret(old_turn, &["-t"], tcp_port, peer_port, 1, 5)).await.unwrap();
    assert_eq!(received, 0, "TCP with the removed secret: {text}");
    drop(coturn);
    echo(&relay, peer, b"after").await;
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"}})).await;
    server.wait_metric(r#"kinlink_signal_messages_relayed_total{type="offer"}"#, 1.0).await;
    server.wait_metric("kinlink_signal_connections", 3.0).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
