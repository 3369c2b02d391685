//! HTTPS and WSS on `http.listen` (`http.tls_cert`/`http.tls_key`), with real clients: curl
//! trusting the test CA, `kinlink check` over https:// and wss:// (signaling and TURN), and
//! the certificate reloaded when the files change.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn https_server_config(c: &mut kinlink::config::Config, cert: &std::path::Path, key: &std::path::Path) {
    c.http.tls_cert = Some(cert.to_path_buf());
    c.http.tls_key = Some(key.to_path_buf());
    c.turn.tls_reload_poll_secs = 1;
}

#[tokio::test]
async fn https_and_wss_on_the_http_listener() {
    let dir = temp_dir("https");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| https_server_config(c, &cert, &key)).await;
    let port = server.http.port();
    let ca = cert.to_str().unwrap().to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || curl(&["--cacert", &ca, &format!("https://127.0.0.1:{port}/healthz")])).await.unwrap();
    assert!(ok && out.trim() == "ok", "{out}");
    // Plain HTTP on the TLS port gets nothing it can read.
    let (ok, _) = tokio::task::spawn_blocking(move || curl(&[&format!("http://127.0.0.1:{port}/healthz")])).await.unwrap();
    assert!(!ok);
    // The whole path a device takes: check tokens over https, registration over wss, TURN.
    let url = format!("https://127.0.0.1:{port}");
    let t = token("fam", "u", "d");
    let ca = cert.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kinlink"))
            .args(["--data-dir", "/nonexistent-kinlink-https", "check", &url, "--token", &t, "--ca-file", &ca])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("signaling") && text.contains("all checks passed"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_silent_tls_client_is_cut_and_counted() {
    let dir = temp_dir("https-silent");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| {
        https_server_config(c, &cert, &key);
        c.http.header_read_timeout_secs = 1;
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(server.http).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), tokio::io::AsyncReadExt::read(&mut silent, &mut buf)).await.expect("cut in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    server.wait_metric(r#"kinlink_turn_tls_handshake_failures_total{listener="http",reason="timeout"}"#, 1.0).await;
    server.wait_metric("kinlink_http_unupgraded_connections", 0.0).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_https_certificate_is_reloaded_when_the_files_change() {
    let dir = temp_dir("https-reload");
    let next = dir.join("next");
    std::fs::create_dir_all(&next).unwrap();
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| https_server_config(c, &cert, &key)).await;
    let port = server.http.port();
    let first = tokio::task::spawn_blocking(move || presented_fingerprint(port)).await.unwrap();
    assert_eq!(first, file_fingerprint(&cert));
    let (new_cert, new_key) = self_signed_cert(&next);
    let want = file_fingerprint(&new_cert);
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    wait_for_fingerprint(port, &want).await;
    server.wait_metric(r#"kinlink_turn_tls_reloads_total{listener="http",result="ok"}"#, 1.0).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn over_wss_pings_are_answered_and_messages_flow_both_ways() {
    // Writes under the server's TLS wait for a flush (src/coalesce.rs): the pong the
    // WebSocket layer queues while it reads, and every relayed message, must still leave.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = temp_dir("wss-ping");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| https_server_config(c, &cert, &key)).await;
    let port = server.http.port();
    let mut a = wss_register(port, &cert, "localhost", "fam", "u", "a").await;
    let mut b = wss_register(port, &cert, "localhost", "fam", "u", "b").await;
    assert_eq!(next_json(&mut a).await["type"], "device-online");
    a.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    match tokio::time::timeout(WAIT, a.next()).await.expect("a pong in time").expect("open").unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("want the pong, got {other:?}"),
    }
    for i in 0..5 {
        let offer = serde_json::json!({"type":"ice-candidate","toDeviceId":"b","candidate":{"candidate":format!("c{i}")}});
        a.send(Message::text(offer.to_string())).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(next_json(&mut b).await["candidate"]["candidate"], format!("c{i}"));
    }
    b.send(Message::text(serde_json::json!({"type":"answer","toDeviceId":"a","sdp":{"type":"answer","sdp":"v=0"}}).to_string())).await.unwrap();
    assert_eq!(next_json(&mut a).await["type"], "answer");
    std::fs::remove_dir_all(&dir).unwrap();
}
