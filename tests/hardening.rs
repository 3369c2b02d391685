//! What a host without credentials can do to kinlink, over real sockets: one bad datagram,
//! slowloris on the HTTP listener, idle and half-sent TURN streams, TLS sockets that never
//! handshake, pings past the rate limit, oversized peer datagrams. Attackers connect from
//! 127.0.0.2 so the per-IP caps they hit leave 127.0.0.1 (the legitimate client) alone.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use kinlink::turn::stun::{attr, method, Builder, Class, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use webrtc_util::conn::Conn;

const ATTACKER: &str = "127.0.0.2";

async fn connect_from(ip: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{ip}:0").parse().unwrap())?;
    s.connect(to).await
}

/// True when the server closed the connection (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn binding(id: u8) -> Vec<u8> {
    Builder::new(method::BINDING, Class::Request, [id; 12]).finish_with_fingerprint()
}

async fn udp_binding_works(turn: SocketAddr) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 1500];
    for attempt in 0..3u8 {
        s.send_to(&binding(attempt), turn).await.unwrap();
        if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await {
            return Message::parse(&buf[..n]).map(|m| m.class == Class::Success).unwrap_or(false);
        }
    }
    false
}

#[tokio::test]
async fn a_nonce_splitting_a_utf8_character_does_not_stop_turn_over_udp() {
    let server = TestServer::start().await;
    let turn = server.turn_udp.unwrap();
    // The reproduced packet: an Allocate with MESSAGE-INTEGRITY and a 26-byte UTF-8 nonce
    // whose 'é' straddles byte 10. It used to panic the UDP listener task.
    let mut nonce = b"000000000".to_vec();
    nonce.extend_from_slice("é".as_bytes());
    nonce.extend_from_slice(b"000000000000000");
    let mut b = Builder::new(method::ALLOCATE, Class::Request, [7; 12]);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, b"1:f:d").attr(attr::REALM, b"kinlink").attr(attr::NONCE, &nonce);
    b.integrity(&[0u8; 16]);
    let evil = b.finish_with_fingerprint();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&evil, turn).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf)).await.expect("answered").unwrap();
    assert_eq!(Message::parse(&buf[..n]).unwrap().error_code().map(|e| e.0), Some(438));
    assert!(udp_binding_works(turn).await, "TURN over UDP still answers");
    assert_eq!(server.metric("kinlink_panics_total").await, 0.0);
    let ready = reqwest::get(format!("http://{}/readyz", server.http)).await.unwrap();
    assert_eq!(ready.status(), 200);
    let body = ready.text().await.unwrap();
    assert!(body.contains(&format!("turn udp {turn} shard 0: up")) && body.contains("turn tcp"), "{body}");
}

#[tokio::test]
async fn slowloris_on_http_is_capped_per_ip_timed_out_and_does_not_reach_others() {
    let server = TestServer::with(|c| {
        c.http.header_read_timeout_secs = 1;
        c.http.max_unupgraded_per_ip = 20;
    })
    .await;
    // 100 connections from one host: half a request each, or nothing at all.
    let mut held = Vec::new();
    for i in 0..100 {
        let mut s = connect_from(ATTACKER, server.http).await.unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
        }
        held.push(s);
    }
    // Past the per-IP cap the server closes at once.
    let mut refused = 0;
    for s in held.iter_mut().skip(20) {
        refused += closed_within(s, Duration::from_millis(300)).await as usize;
    }
    assert_eq!(refused, 80, "all but 20 closed at once");
    // A device elsewhere registers meanwhile, quickly.
    let started = Instant::now();
    let (mut c, _) = Client::register(&server, "fam", "u", "phone").await;
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // The 20 held ones are cut at the header-read deadline: silent and half-sent alike.
    let mut cut = 0;
    for s in held.iter_mut().take(20) {
        cut += closed_within(s, Duration::from_secs(3)).await as usize;
    }
    assert_eq!(cut, 20);
    server.wait_metric("kinlink_http_unupgraded_connections", 0.0).await;
    assert_eq!(server.metric(r#"kinlink_connections_rejected_total{listener="http",reason="unupgraded"}"#).await, 80.0);
    // The registered device is a WebSocket now, not an unupgraded connection, and is alive.
    c.send(serde_json::json!({"type": "offer", "toDeviceId": "nobody", "sdp": "x"})).await;
    c.expect_error("peer-offline").await;
}

#[tokio::test]
async fn http_connections_per_ip_include_websockets() {
    let server = TestServer::with(|c| c.http.max_connections_per_ip = 3).await;
    let mut clients = Vec::new();
    for d in ["a", "b", "c"] {
        clients.push(Client::register(&server, "fam", "u", d).await.0);
    }
    let err = tokio_tungstenite::connect_async(server.ws_url()).await;
    assert!(err.is_err(), "a fourth connection from the same IP is refused");
    server.wait_metric(r#"kinlink_connections_rejected_total{listener="http",reason="per_ip"}"#, 1.0).await;
    drop(clients.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    Client::register(&server, "fam", "u", "d").await;
}

/// A TURN Binding over a stream, as a legitimate TCP/TLS client would send first.
async fn stream_binding_works<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> bool {
    if s.write_all(&binding(9)).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Message::parse(&buf[..n]).map(|m| m.class == Class::Success).unwrap_or(false),
        _ => false,
    }
}

#[tokio::test]
async fn idle_and_half_sent_turn_streams_are_capped_and_cut() {
    let server = TestServer::with(|c| {
        c.turn.handshake_timeout_secs = 1;
        c.turn.stream_idle_timeout_secs = 3;
        c.turn.max_stream_connections_per_ip = 10;
    })
    .await;
    let tcp = server.turn_tcp.unwrap();
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(connect_from(ATTACKER, tcp).await.unwrap());
    }
    // One more from the attacker declares a 64 KiB frame and never finishes it (its slot is
    // one of the 10, so open it among them).
    let mut refused = 0;
    for s in idle.iter_mut().skip(10) {
        refused += closed_within(s, Duration::from_millis(300)).await as usize;
    }
    assert_eq!(refused, 20, "past turn.max_stream_connections_per_ip");
    // A legitimate TURN/TCP client gets in and is served.
    let mut good = TcpStream::connect(tcp).await.unwrap();
    assert!(stream_binding_works(&mut good).await);
    // The idle ones are cut at the first-message deadline; the served one is not.
    for s in idle.iter_mut().take(10) {
        assert!(closed_within(s, Duration::from_secs(3)).await);
    }
    assert!(stream_binding_works(&mut good).await);
    // A frame declared 64 KiB long and never completed is cut at the frame deadline.
    let mut half = TcpStream::connect(tcp).await.unwrap();
    assert!(stream_binding_works(&mut half).await);
    let mut partial = Builder::new(method::BINDING, Class::Request, [3; 12]).finish_with_fingerprint();
    partial[2..4].copy_from_slice(&0xfff0u16.to_be_bytes());
    half.write_all(&partial).await.unwrap();
    assert!(closed_within(&mut half, Duration::from_secs(3)).await);
    // A served client that then stays quiet past the idle timeout is cut too.
    assert!(closed_within(&mut good, Duration::from_secs(6)).await);
    assert!(server.metric(r#"kinlink_turn_stream_timeouts_total{stage="first_message"}"#).await >= 10.0);
    assert!(server.metric(r#"kinlink_turn_stream_timeouts_total{stage="frame"}"#).await >= 1.0);
    assert!(server.metric(r#"kinlink_turn_stream_timeouts_total{stage="idle"}"#).await >= 1.0);
    assert_eq!(server.metric(r#"kinlink_connections_rejected_total{listener="turn_stream",reason="per_ip"}"#).await, 20.0);
}

#[tokio::test]
async fn tls_sockets_that_never_handshake_are_cut_and_counted() {
    let dir = temp_dir("tls-silent");
    let (cert, key) = self_signed_cert(&dir);
    let server = TestServer::with(|c| {
        serve_tls(c, &cert, &key);
        c.turn.handshake_timeout_secs = 1;
    })
    .await;
    let tls = server.turn_tls.unwrap();
    let mut silent = TcpStream::connect(tls).await.unwrap();
    let mut garbage = TcpStream::connect(tls).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(1)).await);
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    server.wait_metric(r#"kinlink_turn_tls_handshake_failures_total{listener="turn",reason="timeout"}"#, 1.0).await;
    server.wait_metric(r#"kinlink_turn_tls_handshake_failures_total{listener="turn",reason="protocol"}"#, 1.0).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn pings_count_against_the_rate_limit() {
    let server = TestServer::with(|c| {
        c.signal.rate_burst = 20;
        c.signal.rate_strikes = 10;
    })
    .await;
    let (mut c, _) = Client::register(&server, "fam", "u", "phone").await;
    for _ in 0..2000 {
        if c.ws.send(WsMessage::Ping(Default::default())).await.is_err() {
            break;
        }
    }
    // Closed with 4429 long before 2000 pings were answered.
    let mut pongs = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, c.ws.next()).await.expect("closed in time") {
            Some(Ok(WsMessage::Pong(_))) => pongs += 1,
            Some(Ok(WsMessage::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => {}
            _ => break 0,
        }
    };
    assert_eq!(code, 4429);
    assert!(pongs < 200, "{pongs} pongs");
}

#[tokio::test]
async fn peer_datagrams_over_the_limit_are_dropped_not_truncated() {
    let server = TestServer::start().await;
    let (user, pass) = rest_credentials("fam", "big", 600);
    let client = turn_client(server.turn_udp.unwrap(), user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().unwrap();
    let relayed = relay.local_addr().unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    relay.send_to(b"hi", peer.local_addr().unwrap()).await.unwrap(); // installs the permission
    let mut buf = vec![0u8; 70_000];
    tokio::time::timeout(WAIT, peer.recv_from(&mut buf)).await.unwrap().unwrap();
    peer.send_to(&vec![7u8; 9000], relayed).await.unwrap();
    peer.send_to(&[8u8; 1000], relayed).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!((n, buf[0]), (1000, 8), "the 9000-byte datagram is not relayed, cut or whole");
    server.wait_metric(r#"kinlink_turn_dropped_packets_total{reason="too_large"}"#, 1.0).await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn check_tokens_cannot_mint_check_tokens() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/check/tokens", server.http);
    let minted: serde_json::Value =
        http.post(&url).bearer_auth(token("fam", "u", "phone")).send().await.unwrap().json().await.unwrap();
    let check_token = minted["devices"][0]["token"].as_str().unwrap();
    let again = http.post(&url).bearer_auth(check_token).send().await.unwrap();
    assert_eq!(again.status(), 403);
    assert_eq!(server.metric(r#"kinlink_check_tokens_total{result="forbidden"}"#).await, 1.0);
}

/// `kinlink serve` as a child process on 127.0.0.1:0 (optionally under `prlimit`), with JSON
/// logs read on a thread; returns the child, its log lines so far and the addresses it logged.
struct Child {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    http: SocketAddr,
    turn_udp: SocketAddr,
    turn_tcp: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn first_addr(v: &serde_json::Value) -> SocketAddr {
    v.as_str().unwrap().trim_matches(|c| c == '[' || c == ']').split(", ").next().unwrap().parse().unwrap()
}

fn spawn_kinlink(prefix: &[&str], extra: &[&str]) -> Child {
    use std::io::BufRead;
    let dir = temp_dir(&format!("child-{}", rand_suffix()));
    let bin = env!("CARGO_BIN_EXE_kinlink");
    let (program, mut args): (&str, Vec<&str>) = match prefix.split_first() {
        Some((p, rest)) => (p, rest.iter().copied().chain([bin]).collect()),
        None => (bin, Vec::new()),
    };
    let dir_s = dir.to_str().unwrap().to_string();
    args.extend(["--data-dir", &dir_s, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
    args.extend(["--set", "log.format=json", "--set", "turn.udp_listen=127.0.0.1:0", "--set", "turn.tcp_listen=127.0.0.1:0"]);
    args.extend(extra);
    let mut cmd = std::process::Command::new(program);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KINLINK_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd.env_remove("RUST_LOG").args(&args).stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let store = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            store.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let (mut http, mut udp, mut tcp) = (None, None, None);
    while http.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("kinlink starts");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        match v["fields"]["message"].as_str() {
            Some("TURN serving") => {
                udp = Some(first_addr(&v["fields"]["udp"]));
                tcp = Some(first_addr(&v["fields"]["tcp"]));
            }
            Some("kinlink serving") => http = Some(v["fields"]["http"].as_str().unwrap().parse().unwrap()),
            _ => {}
        }
    }
    Child { child, lines, http: http.unwrap(), turn_udp: udp.unwrap(), turn_tcp: tcp.unwrap(), dir }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// CPU seconds the process has used (user + system), from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test]
async fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let k = spawn_kinlink(&["prlimit", "--nofile=64:64"], &[]);
    // Fill the descriptor table: the kernel completes handshakes into the backlog, and
    // accept() fails with EMFILE for every one kinlink cannot take.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(TcpStream::connect(k.turn_tcp).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_secs(k.child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_secs(k.child.id()) - before;
    // Spinning on EMFILE burned a whole core (2 s here); backing off costs almost nothing.
    assert!(used < 0.3, "kinlink used {used} CPU s in 2 s while out of descriptors");
    drop(held);
    // Descriptors free again: TURN/TCP serves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut s = TcpStream::connect(k.turn_tcp).await.unwrap();
    assert!(stream_binding_works(&mut s).await, "serving again after the flood");
    let warned = k.lines.lock().unwrap().iter().filter(|l| l.contains("accept failed; backing off")).count();
    assert!((1..=5).contains(&warned), "{warned} accept warnings: logged, but rate-limited");
}

#[tokio::test]
async fn tokens_are_never_logged_even_at_trace_and_refusals_are_summarised() {
    let k = spawn_kinlink(&[], &["--set", "log.level=trace"]);
    let secret = std::fs::read_to_string(k.dir.join("token_secret")).unwrap();
    let tok = kinlink::auth::mint_token(&kinlink::config::Secret::new(secret.trim()), "fam", "u", "phone", 600, kinlink::auth::unix_now());
    let url = format!("ws://{}/signal?token={tok}", k.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let reg = serde_json::json!({"type": "register", "familyId": "fam", "userId": "u", "deviceId": "phone", "token": tok});
    ws.send(WsMessage::text(reg.to_string())).await.unwrap();
    let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("registered"), "{first:?}");
    // 300 forged TURN requests: counted each, logged about once a second.
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 1500];
    let mut b = Builder::new(method::ALLOCATE, Class::Request, [1; 12]);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    s.send_to(&b.finish_with_fingerprint(), k.turn_udp).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf)).await.unwrap().unwrap();
    let nonce = Message::parse(&buf[..n]).unwrap().get(attr::NONCE).unwrap().to_vec();
    for i in 0..300u32 {
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&i.to_be_bytes());
        let mut b = Builder::new(method::ALLOCATE, Class::Request, tid);
        b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, b"9999999999:fam:phone");
        b.attr(attr::REALM, b"kinlink").attr(attr::NONCE, &nonce).integrity(&[1u8; 16]);
        s.send_to(&b.finish_with_fingerprint(), k.turn_udp).await.unwrap();
        let _ = tokio::time::timeout(WAIT, s.recv_from(&mut buf)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = k.lines.lock().unwrap().clone();
    assert!(lines.iter().any(|l| l.contains(r#""level":"DEBUG""#) || l.contains(r#""level":"TRACE""#)), "verbose logging is on");
    let sig = tok.rsplit('.').next().unwrap();
    let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(sig)).collect();
    assert!(leaked.is_empty(), "token logged: {:?}", leaked.first());
    let refused = lines.iter().filter(|l| l.contains("TURN request refused")).count();
    assert!((1..=3).contains(&refused), "{refused} refusal lines for 300 refusals");
}

/// rustls warns once per handshake about what a client sent, e.g. an IP address as SNI, which
/// every libwebrtc `turns:` client given an IP URL sends: a rate any client sets. Even at trace
/// level those lines stay out of the log (rustls is capped at error), and the handshakes
/// succeed.
#[tokio::test]
async fn rustls_warnings_a_client_paces_are_not_logged_even_at_trace() {
    let dir = temp_dir("rustls-log");
    let (cert, key) = self_signed_cert(&dir);
    let port = free_port();
    let tls = [format!("turn.tls_listen=127.0.0.1:{port}"), format!("turn.tls_cert={}", cert.display()), format!("turn.tls_key={}", key.display())];
    let mut extra = vec!["--set", "log.level=trace"];
    for t in &tls {
        extra.extend(["--set", t.as_str()]);
    }
    let k = spawn_kinlink(&[], &extra);
    for _ in 0..5 {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "127.0.0.1", "-alpn", "stun.turn"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Verify return code") && !text.contains("alert"), "the handshake succeeds: {text}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = k.lines.lock().unwrap().clone();
    assert!(lines.iter().any(|l| l.contains(r#""level":"TRACE""#)), "verbose logging is on");
    let from_rustls: Vec<&String> = lines.iter().filter(|l| l.contains(r#""target":"rustls"#)).collect();
    assert!(from_rustls.is_empty(), "{} rustls lines, e.g. {:?}", from_rustls.len(), from_rustls.first());
}

#[tokio::test]
async fn a_slow_reader_holds_a_bounded_number_of_bytes() {
    // 200 offers of 60 KB to a device that never reads: within the message bound (256), so
    // only the byte bound stops the queue (it once grew to ~16 MB per slow device). The
    // kernel's socket buffers absorb a few MB first; after that the sender is told.
    let server = TestServer::with(|c| {
        c.signal.outbound_queue_bytes = 256 * 1024;
        c.signal.rate_burst = 1000;
        c.signal.rate_per_sec = 1000.0;
    })
    .await;
    let (mut sender, _) = Client::register(&server, "fam", "u", "sender").await;
    let (slow, _) = Client::register(&server, "fam", "u", "slow").await;
    assert_eq!(sender.recv().await["type"], "device-online");
    let sdp = "v".repeat(60_000);
    for _ in 0..200 {
        sender.send(serde_json::json!({"type": "offer", "toDeviceId": "slow", "sdp": sdp})).await;
    }
    let mut refused = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), sender.ws.next()).await {
        if m.to_text().is_ok_and(|t| t.contains("not keeping up")) {
            refused += 1;
        }
    }
    assert!(refused > 0, "the byte bound never refused a message");
    assert!(server.metric(r#"kinlink_signal_errors_total{code="rate-limited"}"#).await >= refused as f64);
    drop(slow);
}
