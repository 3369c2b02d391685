//! `kinlink check` (the binary) against a running server: everything passes on a correct
//! deployment, including TURN over TLS with the server's certificate trusted via --ca-file;
//! a wrong `turn.public_ip` fails with the hint that names it.

mod common;

use std::process::Command;

use common::*;

fn check(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kinlink"))
        .args(["--data-dir", "/nonexistent-kinlink-check", "check"])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn check_passes_against_a_correct_deployment() {
    let dir = temp_dir("check");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| serve_tls(c, &cert, &key)).await;
    let url = format!("http://{}", server.http);
    let t = token("fam", "u", "d");
    let ca = cert.to_str().unwrap().to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || check(&[&url, "--token", &t, "--ca-file", &ca])).await.unwrap();
    assert!(ok, "{out}");
    for line in ["signaling", "TURN UDP", "TURN TCP", "TURN TLS", "all checks passed"] {
        assert!(out.contains(line), "missing `{line}`:\n{out}");
    }
    assert!(server.metric(r#"kinlink_turn_allocations_created_total{transport="tls"}"#).await >= 2.0);
    assert!(server.metric(r#"kinlink_turn_relayed_packets_total{direction="client_to_peer"}"#).await >= 3.0);

    // Without --ca-file the self-signed certificate is refused, with the TLS hint.
    let url = format!("http://{}", server.http);
    let t = token("fam", "u", "d");
    let (ok, out) = tokio::task::spawn_blocking(move || check(&[&url, "--token", &t, "--timeout", "3"])).await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("TLS name mismatch or untrusted certificate"), "{out}");
    // And a forged token is refused before anything else.
    let url = format!("http://{}", server.http);
    let (ok, out) = tokio::task::spawn_blocking(move || check(&[&url, "--token", "forged.token.x"])).await.unwrap();
    assert!(!ok && out.contains("HTTP 401"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn wrong_public_ip_fails_with_the_hint() {
    // 127.0.0.2 is loopback, but nothing listens there: what a wrong public IP looks like.
    let server = TestServer::with(|c| c.turn.public_ip = Some("127.0.0.2".parse().unwrap())).await;
    let url = format!("http://{}", server.http);
    let t = token("fam", "u", "d");
    let (ok, out) = tokio::task::spawn_blocking(move || check(&[&url, "--token", &t, "--timeout", "2"])).await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("turn.public_ip is wrong"), "{out}");
    assert!(out.contains("signaling") && out.contains("PASS"), "signaling itself passes:\n{out}");
}

#[tokio::test]
async fn a_private_relay_address_gets_the_exact_hint() {
    // A default local run: relays carry a private address (loopback here), which the default
    // peer policy refuses as a peer. The hint must say so, not just "turn.allowed_peers".
    let server = TestServer::with(|c| c.turn.allowed_peers.clear()).await;
    let url = format!("http://{}", server.http);
    let t = token("fam", "u", "d");
    let (ok, out) = tokio::task::spawn_blocking(move || check(&[&url, "--token", &t, "--timeout", "2"])).await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("127.0.0.1 is a private address") && out.contains("turn.public_ip") && out.contains("127.0.0.0/8"), "{out}");
}

#[tokio::test]
async fn check_reports_a_closed_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let (ok, out) = tokio::task::spawn_blocking(move || check(&[&url, "--token", "x.y.z", "--timeout", "2"])).await.unwrap();
    assert!(!ok && out.contains("is kinlink listening"), "{out}");
}

#[tokio::test]
async fn check_mints_with_the_configured_secret_as_the_helm_test_does() {
    let server = TestServer::start().await;
    let text = helm_test_check(format!("http://{}", server.http)).await;
    assert!(text.contains("signaling") && !text.contains("TURN"), "{text}");
    assert_eq!(server.metric(r#"kinlink_check_tokens_total{result="issued"}"#).await, 0.0, "minted locally");
}

#[tokio::test]
async fn healthcheck_answers_for_the_container_and_helm() {
    let server = TestServer::start().await;
    let ready = format!("http://{}/readyz", server.metrics);
    let health = format!("http://{}/healthz", server.http);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kinlink")).args(["healthcheck", "--url", &ready, "--url", &health]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("200"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_kinlink")).args(["healthcheck", "--url", &format!("http://127.0.0.1:{port}/readyz")]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("healthcheck failed"));
}
