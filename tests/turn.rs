//! The embedded TURN server against independently written clients: the `turn` crate's client
//! and coturn's `turnutils_uclient` (Debian package `coturn`, installed by scripts/test),
//! with UDP peers on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::coturn::*;
use common::*;
use kinlink::config::Listen;
use webrtc_util::conn::Conn;

#[tokio::test]
async fn turn_crate_client_allocates_and_relays_through_an_echo_peer() {
    let server = TestServer::start().await;
    let turn_addr = server.turn_udp.unwrap();
    let (user, pass) = rest_credentials("fam", "phone", 600);
    let client = turn_client(turn_addr, user, pass).await;
    let mapped = tokio::time::timeout(WAIT, client.send_binding_request()).await.unwrap().unwrap();
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().expect("allocate");
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert!(relayed.port() >= 49152, "relay port from turn.relay_ports: {relayed}");

    let (peer, _) = echo_peer().await;
    let mut buf = vec![0u8; 1500];
    for i in 0..5u8 {
        let msg = [b'k', b'i', b'n', i];
        relay.send_to(&msg, peer).await.expect("send via relay");
        let (n, from) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.expect("echo arrives").unwrap();
        assert_eq!((&buf[..n], from), (&msg[..], peer));
    }
    assert!(server.metric(r#"kinlink_turn_relayed_bytes_total{direction="client_to_peer"}"#).await >= 20.0);
    assert!(server.metric(r#"kinlink_turn_relayed_packets_total{direction="peer_to_client"}"#).await >= 5.0);
    assert_eq!(server.metric("kinlink_turn_allocations").await, 1.0);
    assert_eq!(server.metric(r#"kinlink_turn_allocations_created_total{transport="udp"}"#).await, 1.0);
    relay.close().await.unwrap();
    client.close().await.unwrap();
    server.wait_metric("kinlink_turn_allocations", 0.0).await;
}

#[tokio::test]
async fn expired_or_forged_credentials_get_401_and_no_allocation() {
    let server = TestServer::start().await;
    let turn_addr = server.turn_udp.unwrap();
    let (user, pass) = rest_credentials("fam", "phone", -60);
    let client = turn_client(turn_addr, user, pass).await;
    assert!(tokio::time::timeout(WAIT, client.allocate()).await.unwrap().is_err());
    client.close().await.unwrap();
    let (user, _) = rest_credentials("fam", "phone", 600);
    let client = turn_client(turn_addr, user, "forged-password".into()).await;
    assert!(tokio::time::timeout(WAIT, client.allocate()).await.unwrap().is_err());
    client.close().await.unwrap();
    assert!(server.metric(r#"kinlink_turn_auth_failures_total{reason="expired"}"#).await >= 1.0);
    assert!(server.metric(r#"kinlink_turn_auth_failures_total{reason="bad_integrity"}"#).await >= 1.0);
    assert_eq!(server.metric("kinlink_turn_allocations").await, 0.0);
}

#[tokio::test]
async fn denied_peer_gets_403_and_sees_nothing() {
    // The default policy: loopback peers are refused.
    let server = TestServer::with(|c| c.turn.allowed_peers.clear()).await;
    let (user, pass) = rest_credentials("fam", "phone", 600);
    let client = turn_client(server.turn_udp.unwrap(), user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().unwrap();
    let (peer, seen) = echo_peer().await;
    let _ = tokio::time::timeout(WAIT, relay.send_to(b"let me in", peer)).await.unwrap();
    server.wait_metric(r#"kinlink_turn_permission_denied_total{reason="special_range"}"#, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing reached the denied peer");
    assert_eq!(server.metric(r#"kinlink_turn_relayed_packets_total{direction="client_to_peer"}"#).await, 0.0);
    client.close().await.unwrap();
}

#[tokio::test]
async fn family_quota_answers_486() {
    let server = TestServer::with(|c| c.turn.quota.family_allocations = 1).await;
    let turn_addr = server.turn_udp.unwrap();
    let (u1, p1) = rest_credentials("fam", "phone", 600);
    let c1 = turn_client(turn_addr, u1, p1).await;
    let _relay = tokio::time::timeout(WAIT, c1.allocate()).await.unwrap().expect("first allocation");
    let (u2, p2) = rest_credentials("fam", "tablet", 600);
    let c2 = turn_client(turn_addr, u2, p2).await;
    assert!(tokio::time::timeout(WAIT, c2.allocate()).await.unwrap().is_err(), "second allocation of the family refused");
    // Another family is unaffected.
    let (u3, p3) = rest_credentials("other", "phone", 600);
    let c3 = turn_client(turn_addr, u3, p3).await;
    assert!(tokio::time::timeout(WAIT, c3.allocate()).await.unwrap().is_ok());
    assert_eq!(server.metric(r#"kinlink_turn_quota_rejections_total{scope="family"}"#).await, 1.0);
    for c in [c1, c2, c3] {
        c.close().await.unwrap();
    }
}

/// coturn's echo peer, killed on drop.
#[tokio::test]
async fn coturn_uclient_over_udp_with_channels_and_send_indications() {
    let server = TestServer::start().await;
    let port = server.turn_udp.unwrap().port();
    uclient_case(&server, &[], port).await;
    uclient_case(&server, &["-s"], port).await;
    assert!(server.metric(r#"kinlink_turn_allocations_created_total{transport="udp"}"#).await >= 8.0);
}

#[tokio::test]
async fn coturn_uclient_over_tcp() {
    let server = TestServer::start().await;
    uclient_case(&server, &["-t"], server.turn_tcp.unwrap().port()).await;
    assert!(server.metric(r#"kinlink_turn_allocations_created_total{transport="tcp"}"#).await >= 4.0);
    // A TCP client's allocations end with its connection.
    server.wait_metric("kinlink_turn_allocations", 0.0).await;
}

#[tokio::test]
async fn coturn_uclient_over_tls() {
    let dir = temp_dir("tls");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| serve_tls(c, &cert, &key)).await;
    let tls = server.turn_tls.expect("TLS listener");
    uclient_case(&server, &["-t", "-S"], tls.port()).await;
    assert!(server.metric(r#"kinlink_turn_allocations_created_total{transport="tls"}"#).await >= 4.0);
    // The ICE servers block now lists turns:.
    let (_c, reg) = Client::register(&server, "fam", "u", "d").await;
    let urls = reg["iceServers"][1]["urls"].to_string();
    assert!(urls.contains(&format!("turns:127.0.0.1:{}?transport=tcp", tls.port())), "{urls}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TURN client over TLS that keeps every byte the server sent, as it arrived on the socket.
mod tls_tap {
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    pub struct Tap(pub tokio::net::TcpStream, pub Arc<Mutex<Vec<u8>>>);

    impl AsyncRead for Tap {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.0).poll_read(cx, buf);
            let seen = buf.filled()[before..].to_vec();
            self.1.lock().unwrap().extend_from_slice(&seen);
            r
        }
    }

    impl AsyncWrite for Tap {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// TLS records of type application data (23) in a TLS 1.2 byte stream from the server.
    pub fn application_records(stream: &[u8]) -> usize {
        let (mut at, mut n) = (0, 0);
        while at + 5 <= stream.len() {
            n += usize::from(stream[at] == 23);
            at += 5 + u16::from_be_bytes([stream[at + 3], stream[at + 4]]) as usize;
        }
        n
    }
}

#[tokio::test]
async fn over_tls_every_relayed_frame_travels_in_its_own_record() {
    // TLS is a byte stream, but clients such as coturn's uclient take one SSL_read as one
    // frame; coturn, pion and LiveKit write a record per frame, so kinlink must too, even when
    // a burst from the peer is written in one go.
    use kinlink::turn::stun::{attr, decode_xor_addr, frame_len, method, Builder, Class, Message};
    use md5::Digest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let dir = temp_dir("tls-records");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| serve_tls(c, &cert, &key)).await;
    let turn = server.turn_tls.unwrap();

    // TLS 1.2, where application data is the only record type after the handshake.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(&cert).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let raw = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let tcp = tokio::net::TcpStream::connect(turn).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tls_tap::Tap(tcp, raw.clone())).await.unwrap();
    let handshake_bytes = raw.lock().unwrap().len();

    let mut pending = Vec::new();
    let mut frames = 0;
    macro_rules! next_frame {
        () => {
            loop {
                if let Some(len) = frame_len(&pending, true).filter(|l| *l <= pending.len()) {
                    frames += 1;
                    break pending.drain(..len).collect::<Vec<u8>>();
                }
                let mut buf = [0u8; 4096];
                let n = tokio::time::timeout(WAIT, tls.read(&mut buf)).await.expect("a frame in time").unwrap();
                assert!(n > 0, "closed");
                pending.extend_from_slice(&buf[..n]);
            }
        };
    }
    let (username, password) = rest_credentials("fam", "dev", 600);
    let tid = [1u8; 12];
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    tls.write_all(&b.finish()).await.unwrap();
    let challenge = next_frame!();
    let m = Message::parse(&challenge).unwrap();
    let (realm, nonce) = (m.get(attr::REALM).unwrap().to_vec(), m.get(attr::NONCE).unwrap().to_vec());
    let key = md5::Md5::digest(format!("{username}:{}:{password}", String::from_utf8_lossy(&realm))).to_vec();
    let tid = [2u8; 12];
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, username.as_bytes());
    b.attr(attr::REALM, &realm).attr(attr::NONCE, &nonce).integrity(&key);
    tls.write_all(&b.finish_with_fingerprint()).await.unwrap();
    let ok = next_frame!();
    let m = Message::parse(&ok).unwrap();
    assert_eq!(m.class, Class::Success);
    let relayed = decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();

    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tid = [3u8; 12];
    let mut b = Builder::new(method::CREATE_PERMISSION, Class::Request, tid);
    b.xor_addr(attr::XOR_PEER_ADDRESS, peer.local_addr().unwrap()).attr(attr::USERNAME, username.as_bytes());
    b.attr(attr::REALM, &realm).attr(attr::NONCE, &nonce).integrity(&key);
    tls.write_all(&b.finish_with_fingerprint()).await.unwrap();
    assert_eq!(Message::parse(&next_frame!()).unwrap().class, Class::Success);

    // A burst from the peer: the relay reads it in batches, faster than one write per frame.
    const BURST: usize = 64;
    for i in 0..BURST {
        peer.send_to(&[i as u8; 1000], relayed).await.unwrap();
    }
    for i in 0..BURST {
        let frame = next_frame!();
        let m = Message::parse(&frame).unwrap();
        assert_eq!((m.method, m.get(attr::DATA).map(|d| (d.len(), d[0]))), (method::DATA, Some((1000, i as u8))));
    }
    let raw = raw.lock().unwrap();
    let records = tls_tap::application_records(&raw[handshake_bytes..]);
    assert_eq!(records, frames, "application-data records for {frames} frames");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn draining_refuses_new_allocations_and_keeps_existing_ones_relaying() {
    let mut server = TestServer::with(|c| c.shutdown.grace_secs = 10).await;
    let turn_addr = server.turn_udp.unwrap();
    let (u1, p1) = rest_credentials("fam", "a", 600);
    let c1 = turn_client(turn_addr, u1, p1).await;
    let relay = tokio::time::timeout(WAIT, c1.allocate()).await.unwrap().unwrap();
    let (peer, _) = echo_peer().await;
    let mut buf = vec![0u8; 64];
    relay.send_to(b"before", peer).await.unwrap();
    tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.unwrap().unwrap();

    let task = server.begin_shutdown();
    let ready = format!("http://{}/readyz", server.metrics);
    for _ in 0..100 {
        if reqwest::get(&ready).await.unwrap().status() == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (u2, p2) = rest_credentials("fam", "b", 600);
    let c2 = turn_client(turn_addr, u2, p2).await;
    assert!(tokio::time::timeout(WAIT, c2.allocate()).await.unwrap().is_err(), "no new allocations while draining");
    // The existing allocation keeps relaying during the drain.
    relay.send_to(b"during", peer).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"during");
    assert!(!task.is_finished(), "the server waits for the allocation");
    // When it ends, the server exits well before the grace period.
    relay.close().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("exits once allocations are gone").unwrap().unwrap();
    c1.close().await.unwrap();
    c2.close().await.unwrap();
}

#[tokio::test]
async fn tls_certificate_is_reloaded_when_the_files_change() {
    let dir = temp_dir("reload");
    let next = dir.join("next");
    std::fs::create_dir_all(&next).unwrap();
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| {
        serve_tls(c, &cert, &key);
        c.turn.tls_reload_poll_secs = 1;
    })
    .await;
    let port = server.turn_tls.unwrap().port();
    let first = tokio::task::spawn_blocking(move || presented_fingerprint(port)).await.unwrap();
    assert_eq!(first, file_fingerprint(&cert), "serves the configured certificate");
    // A renewal replaces both files (as certbot or a Kubernetes Secret update does).
    let (new_cert, new_key) = self_signed_cert(&next);
    let want = file_fingerprint(&new_cert);
    assert_ne!(want, first);
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    wait_for_fingerprint(port, &want).await;
    server.wait_metric(r#"kinlink_turn_tls_reloads_total{listener="turn",result="ok"}"#, 1.0).await;
    // A broken file is refused and the working certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    server.wait_metric(r#"kinlink_turn_tls_reloads_total{listener="turn",result="error"}"#, 1.0).await;
    assert_eq!(tokio::task::spawn_blocking(move || presented_fingerprint(port)).await.unwrap(), want);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A port free on 127.0.0.1 and [::1], for UDP and TCP alike.
fn dual_stack_port() -> u16 {
    for _ in 0..100 {
        let u4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u4.local_addr().unwrap().port();
        let free = std::net::UdpSocket::bind(("::1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("::1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no port free on both families");
}

#[tokio::test]
async fn ipv4_and_ipv6_listeners_serve_at_once() {
    let port = dual_stack_port();
    let both = |p: u16| Listen(vec![SocketAddr::from(([127, 0, 0, 1], p)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p))]);
    let server = TestServer::with(|c| {
        c.turn.udp_listen = both(port);
        c.turn.tcp_listen = both(port);
    })
    .await;
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();

    // TURN over UDP from an IPv6 client: allocate (an IPv4 relay, the RFC 8656 default) and
    // relay to an IPv4 echo peer and back.
    let (user, pass) = rest_credentials("fam", "v6", 600);
    let client = turn_client(v6, user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().unwrap();
    let (peer, _) = echo_peer().await;
    relay.send_to(b"over six", peer).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"over six");
    client.close().await.unwrap();

    // STUN over TCP on the IPv6 listener reports the IPv6 source address.
    use kinlink::turn::stun::{attr, decode_xor_addr, method, Builder, Class, Message};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(v6).await.unwrap();
    let tid = [7u8; 12];
    tcp.write_all(&Builder::new(method::BINDING, Class::Request, tid).finish()).await.unwrap();
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head).await.unwrap();
    let mut rest = vec![0u8; u16::from_be_bytes([head[2], head[3]]) as usize];
    tcp.read_exact(&mut rest).await.unwrap();
    let msg = [head.to_vec(), rest].concat();
    let m = Message::parse(&msg).unwrap();
    assert_eq!(m.class, Class::Success);
    let mapped = decode_xor_addr(m.get(attr::XOR_MAPPED_ADDRESS).unwrap(), &m.tid).unwrap();
    assert_eq!(mapped, tcp.local_addr().unwrap());
    assert!(server.metric(r#"kinlink_turn_binding_requests_total{transport="tcp"}"#).await >= 1.0);
}

#[tokio::test]
async fn own_listeners_are_refused_as_peers_but_other_relays_are_not() {
    let server = TestServer::start().await;
    let (user, pass) = rest_credentials("fam", "loop", 600);
    let client = turn_client(server.turn_udp.unwrap(), user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().unwrap();
    // Every listener of ours: TURN UDP and TCP, HTTP and metrics (loopback is allow-listed in
    // the tests, so only the own-address rule stands in the way).
    let own = [server.turn_udp.unwrap(), server.turn_tcp.unwrap(), server.http, server.metrics];
    for (i, addr) in own.iter().enumerate() {
        let _ = tokio::time::timeout(WAIT, relay.send_to(b"loop", *addr)).await.unwrap();
        server.wait_metric(r#"kinlink_turn_permission_denied_total{reason="own_port"}"#, (i + 1) as f64).await;
    }
    // Another device's relay on this server is a peer like any other (both relayed).
    let (user, pass) = rest_credentials("fam", "other", 600);
    let other = turn_client(server.turn_udp.unwrap(), user, pass).await;
    let other_relay = tokio::time::timeout(WAIT, other.allocate()).await.unwrap().unwrap();
    relay.send_to(b"relay to relay", other_relay.local_addr().unwrap()).await.unwrap();
    server.wait_metric(r#"kinlink_turn_relayed_packets_total{direction="client_to_peer"}"#, 1.0).await;
    assert_eq!(server.metric(r#"kinlink_turn_permission_denied_total{reason="own_port"}"#).await, 4.0);
    client.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test]
async fn wildcard_listeners_deny_every_local_address_without_public_ip() {
    // The default shape: wildcard listeners, no turn.public_ip. The host's own addresses on
    // the TURN port were once reachable through the relay (a nested allocation was made).
    let server = TestServer::with(|c| {
        c.turn.udp_listen = Listen::one("0.0.0.0:0".parse().unwrap());
        c.turn.allowed_peers = vec!["0.0.0.0/0".into()];
    })
    .await;
    let port = server.turn_udp.unwrap().port();
    let (user, pass) = rest_credentials("fam", "wild", 600);
    let client = turn_client(SocketAddr::from(([127, 0, 0, 1], port)), user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().unwrap();
    let host_ip = relay.local_addr().unwrap().ip();
    for target in [SocketAddr::new(host_ip, port), SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from(([127, 9, 9, 9], port))] {
        let _ = tokio::time::timeout(WAIT, relay.send_to(b"nest", target)).await.unwrap();
    }
    server.wait_metric(r#"kinlink_turn_permission_denied_total{reason="own_port"}"#, 3.0).await;
    assert_eq!(server.metric(r#"kinlink_turn_relayed_packets_total{direction="client_to_peer"}"#).await, 0.0);
    client.close().await.unwrap();
}

/// The UDP data path on several shards: clients spread over every shard's socket (the
/// kernel's SO_REUSEPORT hash), each allocation relays both ways on its shard, and nothing
/// is lost or refused.
#[tokio::test]
async fn clients_spread_over_every_data_path_shard_without_loss() {
    const SHARDS: usize = 4;
    // 48 clients: the chance that the hash leaves a shard without one is 4 × (3/4)^48 < 1e-5.
    const CLIENTS: usize = 48;
    const ROUND_TRIPS: usize = 20;
    let server = TestServer::with(|c| c.turn.data_threads = SHARDS).await;
    let turn_addr = server.turn_udp.unwrap();
    let readyz = reqwest::get(format!("http://{}/readyz", server.http)).await.unwrap().text().await.unwrap();
    for k in 0..SHARDS {
        assert!(readyz.contains(&format!("turn udp {turn_addr} shard {k}: up")), "{readyz}");
    }
    let (peer, seen) = echo_peer().await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(tokio::spawn(async move {
            let (user, pass) = rest_credentials("spread", &format!("dev{}", i % 20), 600);
            let client = turn_client(turn_addr, user, pass).await;
            let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().expect("allocate");
            let mut buf = vec![0u8; 1500];
            let mut echoed = 0;
            for n in 0..ROUND_TRIPS {
                let msg = format!("client {i} packet {n}");
                relay.send_to(msg.as_bytes(), peer).await.expect("send via relay");
                let (len, from) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.expect("echo arrives").unwrap();
                assert_eq!((&buf[..len], from), (msg.as_bytes(), peer));
                echoed += 1;
            }
            (client, echoed)
        }));
    }
    let mut held = Vec::new();
    for c in clients {
        let (client, echoed) = c.await.unwrap();
        assert_eq!(echoed, ROUND_TRIPS);
        held.push(client);
    }
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), CLIENTS * ROUND_TRIPS, "every packet reached the peer once");
    let text = server.metrics_text().await;
    for k in 0..SHARDS {
        let packets = metric_value(&text, &format!(r#"kinlink_turn_shard_packets_total{{shard="{k}"}}"#)).unwrap_or(0.0);
        assert!(packets >= 2.0 * ROUND_TRIPS as f64, "shard {k} carried {packets} packets:\n{text}");
    }
    let total = 2.0 * (CLIENTS * ROUND_TRIPS) as f64;
    assert_eq!(metric_value(&text, r#"kinlink_turn_relayed_packets_total{direction="client_to_peer"}"#), Some(total / 2.0));
    assert_eq!(metric_value(&text, r#"kinlink_turn_relayed_packets_total{direction="peer_to_client"}"#), Some(total / 2.0));
    let shard_sum: f64 = (0..SHARDS).filter_map(|k| metric_value(&text, &format!(r#"kinlink_turn_shard_packets_total{{shard="{k}"}}"#))).sum();
    assert_eq!(shard_sum, total, "UDP clients' packets are all counted by a shard");
    for line in text.lines().filter(|l| l.starts_with("kinlink_turn_dropped_packets_total")) {
        assert!(line.ends_with(" 0"), "nothing dropped: {line}");
    }
    assert_eq!(metric_value(&text, "kinlink_turn_allocations"), Some(CLIENTS as f64));
    drop(held);
}

/// `turn.public_ip = "stun:HOST:PORT"`: the node asks a STUN server (here another kinlink)
/// for its address at start, advertises it, and counts the check; a server that does not
/// answer stops the start with an error naming the key.
#[tokio::test]
async fn public_ip_is_learned_by_stun_at_start() {
    use kinlink::config::PublicIp;
    let stun = TestServer::start().await;
    let stun_addr = stun.turn_udp.unwrap();
    assert_eq!(stun.metric(r#"kinlink_turn_binding_requests_total{transport="udp"}"#).await, 0.0);
    let node = TestServer::with(|c| c.turn.public_ip = Some(PublicIp::Stun(stun_addr.to_string()))).await;
    assert_eq!(stun.metric(r#"kinlink_turn_binding_requests_total{transport="udp"}"#).await, 1.0, "the node asked");
    assert_eq!(node.metric(r#"kinlink_turn_public_ip_checks_total{result="same"}"#).await, 1.0);
    let (user, pass) = rest_credentials("fam", "phone", 600);
    let client = turn_client(node.turn_udp.unwrap(), user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().expect("allocate");
    assert_eq!(relay.local_addr().unwrap().ip().to_string(), "127.0.0.1", "the address the STUN server saw");

    // Nobody answers on this port: the node does not start handing out unreachable relays.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = test_config();
    cfg.turn.public_ip = Some(PublicIp::Stun(silent.local_addr().unwrap().to_string()));
    let started = std::time::Instant::now();
    let err = kinlink::Server::bind(cfg).await.err().expect("no public address, no start").to_string();
    assert!(err.contains("turn.public_ip") && err.contains("no answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by the retransmissions");
}

/// `turn.advertise_ip`: the ICE URLs carry this node's public address, not the Host header.
#[tokio::test]
async fn advertise_ip_puts_the_nodes_address_in_the_ice_urls() {
    let server = TestServer::with(|c| {
        c.turn.public_ip = Some(kinlink::config::PublicIp::Fixed("203.0.113.9".parse().unwrap()));
        c.turn.advertise_ip = true;
    })
    .await;
    let (_c, reg) = Client::register(&server, "fam", "u", "d").await;
    let port = server.turn_udp.unwrap().port();
    let urls: Vec<String> = reg["iceServers"].as_array().unwrap().iter().flat_map(|s| s["urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_string())).collect();
    assert!(urls.contains(&format!("stun:203.0.113.9:{port}")) && urls.contains(&format!("turn:203.0.113.9:{port}?transport=udp")), "{urls:?}");
}

#[tokio::test]
async fn a_refused_tls_handshake_gets_the_alert_that_says_why() {
    // Writes under a server's TLS wait for a flush (src/coalesce.rs); the alert rustls queues
    // when it refuses a handshake must still reach the client, which then says why.
    let dir = temp_dir("tls-alert");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| serve_tls(c, &cert, &key)).await;
    let port = server.turn_tls.unwrap().port();
    // Only a cipher suite rustls does not implement (RSA key exchange, CBC).
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("alert handshake failure"), "{text}");
    server.wait_metric(r#"kinlink_turn_tls_handshake_failures_total{listener="turn",reason="protocol"}"#, 1.0).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
