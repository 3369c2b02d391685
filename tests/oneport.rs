//! One port for everything: HTTPS/WSS signaling, TURN over TLS and TURN over TCP on
//! `http.listen` (`turn.tls_listen` and `turn.tcp_listen` naming the same address), told apart
//! by ALPN and first bytes. Real clients: curl, `kinlink check` (wss:// and turns:), coturn's
//! `turnutils_uclient` over TLS and TCP, openssl s_client offering ALPN; misrouted connections
//! are closed and counted without disturbing the others.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::coturn::*;
use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// HTTPS, TURN/TLS and TURN/TCP all on the HTTP listener's address.
async fn one_port_server(dir: &std::path::Path) -> (TestServer, std::path::PathBuf) {
    let (cert, key) = self_signed_cert(dir);
    let server = TestServer::with(|c| {
        serve_one_port(c, free_port(), &cert, &key);
        c.http.header_read_timeout_secs = 2;
    })
    .await;
    assert_eq!(server.turn_tls, Some(server.http), "turns: is advertised on the HTTP port");
    assert_eq!(server.turn_tcp, Some(server.http), "turn:?transport=tcp too");
    (server, cert)
}

#[tokio::test]
async fn https_wss_turn_tls_and_turn_tcp_share_one_port() {
    let dir = temp_dir("oneport");
    let (server, cert) = one_port_server(&dir).await;
    let port = server.http.port();
    let ca = cert.to_str().unwrap().to_string();

    // HTTPS (curl offers h2 and http/1.1: ALPN picks http/1.1).
    let c = ca.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || curl(&["--cacert", &c, &format!("https://127.0.0.1:{port}/healthz")])).await.unwrap();
    assert!(ok && out.trim() == "ok", "{out}");

    // A device's whole path through the one port: wss:// registration, then TURN over TLS and
    // TCP (the ICE servers it is handed name this port).
    let url = format!("https://127.0.0.1:{port}");
    let t = token("fam", "u", "d");
    let c = ca.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kinlink")).args(["--data-dir", "/nonexistent-kinlink-oneport", "check", &url, "--token", &t, "--ca-file", &c]).output().unwrap()
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("TURN TLS") && text.contains("certificate") && text.contains("all checks passed"), "{text}");

    // coturn's client over TLS (no ALPN: the first decrypted bytes say STUN) and over TCP,
    // relaying with REST credentials.
    uclient_case(&server, &["-t", "-S"], port).await;
    uclient_case(&server, &["-t"], port).await;
    for p in ["https", "turn_tls", "turn_tcp"] {
        assert!(server.metric(&format!(r#"kinlink_shared_port_connections_total{{protocol="{p}"}}"#)).await >= 1.0, "{p}");
    }
    assert!(server.metric(r#"kinlink_turn_allocations_created_total{transport="tls"}"#).await >= 4.0);
    assert!(server.metric(r#"kinlink_turn_allocations_created_total{transport="tcp"}"#).await >= 4.0);
    assert_eq!(server.metric(r#"kinlink_shared_port_connections_total{protocol="unknown"}"#).await, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `openssl s_client -alpn <ids>`: the negotiated protocol, or None when the handshake failed.
fn alpn_handshake(port: u16, ca: &str, alpn: &str) -> Option<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost", "-CAfile", ca, "-alpn", alpn])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if text.contains("Cipher is (NONE)") {
        return None; // the handshake failed
    }
    text.lines().find_map(|l| l.strip_prefix("ALPN protocol: ").map(str::to_string)).or_else(|| text.contains("No ALPN negotiated").then(String::new))
}

#[tokio::test]
async fn alpn_picks_the_protocol_and_misrouted_connections_are_closed_and_counted() {
    let dir = temp_dir("oneport-misrouted");
    let (server, cert) = one_port_server(&dir).await;
    let port = server.http.port();
    let ca = cert.to_str().unwrap().to_string();
    // A device connected over wss:// during all of this is not disturbed.
    let mut device = wss_register(port, &cert, "localhost", "fam", "u", "watcher").await;

    let c = ca.clone();
    let negotiated = tokio::task::spawn_blocking(move || (alpn_handshake(port, &c, "stun.turn"), alpn_handshake(port, &c, "h2,http/1.1"), alpn_handshake(port, &c, "imap")))
        .await
        .unwrap();
    assert_eq!(negotiated.0.as_deref(), Some("stun.turn"), "RFC 7443 ALPN");
    assert_eq!(negotiated.1.as_deref(), Some("http/1.1"), "kinlink speaks HTTP/1.1");
    assert_eq!(negotiated.2, None, "an unknown ALPN is refused in the handshake");
    server.wait_metric(r#"kinlink_turn_tls_handshake_failures_total{listener="http",reason="alpn"}"#, 1.0).await;

    // Garbage first bytes, and plain HTTP on the HTTPS port: closed unserved.
    for junk in [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], &b"\x00\x01\x00\x00\xde\xad\xbe\xef\x00\x00\x00\x00"[..], &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..]] {
        let junk = junk.to_vec();
        let closed = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&junk).unwrap();
            let mut buf = [0u8; 64];
            matches!(s.read(&mut buf), Ok(0) | Err(_))
        })
        .await
        .unwrap();
        assert!(closed, "closed without an answer");
    }
    // A silent socket is closed at the header-read deadline.
    let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    server.wait_metric(r#"kinlink_shared_port_connections_total{protocol="unknown"}"#, 3.0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.wait_metric(r#"kinlink_shared_port_connections_total{protocol="unknown"}"#, 4.0).await;
    drop(silent);

    // The watcher is still registered and answered.
    device.send(Message::text(r#"{"type":"offer","toDeviceId":"nobody","sdp":{},"ref":1}"#)).await.unwrap();
    let reply = next_json(&mut device).await;
    assert_eq!((reply["code"].as_str(), reply["ref"].as_i64()), (Some("peer-offline"), Some(1)), "{reply}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sni_picks_the_signaling_or_the_turn_certificate_on_one_ip() {
    let dir = temp_dir("oneport-sni");
    let (http_cert, http_key) = self_signed_cert_named(&dir, "signal", "signal.example.test", "DNS:signal.example.test");
    let (turn_cert, turn_key) = self_signed_cert_named(&dir, "turn", "turn.example.test", "DNS:turn.example.test");
    let port = free_port();
    let _server = TestServer::with(|c| {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        c.http.listen = addr;
        c.http.tls_cert = Some(http_cert.clone());
        c.http.tls_key = Some(http_key.clone());
        serve_tls(c, &turn_cert, &turn_key);
        c.turn.tls_listen = kinlink::config::Listen::one(addr);
    })
    .await;
    let subjects = tokio::task::spawn_blocking(move || {
        [Some("turn.example.test"), Some("signal.example.test"), Some("other.example.test"), None].map(|sni| presented(port, sni, "-subject"))
    })
    .await
    .unwrap();
    assert!(subjects[0].contains("turn.example.test"), "{subjects:?}");
    assert!(subjects[1].contains("signal.example.test"), "{subjects:?}");
    assert!(subjects[2].contains("signal.example.test"), "an unknown name gets the HTTPS certificate: {subjects:?}");
    assert!(subjects[3].contains("signal.example.test"), "no SNI gets the HTTPS certificate: {subjects:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// TURN recognised on the shared port is admitted like TURN on its own listener: past
/// `turn.max_stream_connections_per_ip` a connection is closed unanswered and counted.
#[tokio::test]
async fn turn_on_the_shared_port_keeps_the_per_ip_stream_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("oneport-cap");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| {
        serve_one_port(c, free_port(), &cert, &key);
        c.turn.max_stream_connections_per_ip = 2;
    })
    .await;
    // A STUN Binding request over plain TCP: answered while under the cap, held open.
    let binding = |id: u8| [&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42][..], &[id; 12]].concat();
    let mut held = Vec::new();
    for id in 0..3u8 {
        let mut s = tokio::net::TcpStream::connect(server.http).await.unwrap();
        s.write_all(&binding(id)).await.unwrap();
        let mut header = [0u8; 20];
        let answered = tokio::time::timeout(WAIT, s.read_exact(&mut header)).await.unwrap().is_ok();
        assert_eq!(answered, id < 2, "connection {id}: answered only under the cap of 2");
        if answered {
            assert_eq!((&header[..2], &header[8..20]), (&[0x01, 0x01][..], &[id; 12][..]), "a Binding success for it");
        }
        held.push(s);
    }
    assert_eq!(server.metric(r#"kinlink_connections_rejected_total{listener="turn_stream",reason="per_ip"}"#).await, 1.0);
    assert_eq!(server.metric(r#"kinlink_shared_port_connections_total{protocol="turn_tcp"}"#).await, 3.0);
}

/// Whether the server's end of the TCP connection whose client end is `client` has
/// TCP_NODELAY. The server runs in this test's process: its end is one of our descriptors,
/// the one whose peer is `client`'s local address.
fn server_end_nodelay(client: &tokio::net::TcpStream) -> bool {
    use std::os::fd::FromRawFd;
    let client = client.local_addr().unwrap();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Borrowed, never closed: the descriptor belongs to the server.
        let socket = std::mem::ManuallyDrop::new(unsafe { socket2::Socket::from_raw_fd(fd) });
        if socket.peer_addr().ok().and_then(|a| a.as_socket()) == Some(client) {
            return socket.nodelay().unwrap();
        }
    }
    panic!("no server end for {client}");
}

/// TURN frames are small and must leave at once: every TURN stream (the dedicated TCP
/// listener, and any connection to the shared port, before it is told apart) writes without
/// Nagle's delay. With Nagle, bench/oneport.sh measured RTT p50 4.8 ms against 1.0 ms.
#[tokio::test]
async fn turn_streams_write_without_nagle_on_the_shared_and_the_dedicated_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("oneport-nodelay");
    let (shared, _) = one_port_server(&dir).await;
    let dedicated = TestServer::start().await;
    let binding = [&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42][..], &[7; 12]].concat();
    for (what, addr) in [("shared port", shared.http), ("dedicated TURN TCP listener", dedicated.turn_tcp.unwrap())] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&binding).await.unwrap();
        let mut header = [0u8; 20];
        tokio::time::timeout(WAIT, s.read_exact(&mut header)).await.unwrap().unwrap();
        assert_eq!(&header[..2], &[0x01, 0x01], "{what}: a Binding success");
        assert!(server_end_nodelay(&s), "{what}: the server's end has TCP_NODELAY");
    }
}
