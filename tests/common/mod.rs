//! Test harness: a kinlink server on 127.0.0.1:0 in this process, and WebSocket clients.
#![allow(dead_code)]

pub mod binary;
pub mod coturn;
pub mod js;
pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kinlink::config::{Config, Secret};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const TOKEN_SECRET: &str = "integration-token-secret-0123456789";
pub const TURN_SECRET: &str = "integration-turn-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    pub turn_udp: Option<SocketAddr>,
    pub turn_tcp: Option<SocketAddr>,
    pub turn_tls: Option<SocketAddr>,
    /// The admin listener, when `admin.listen` is set.
    pub admin: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.metrics.listen = "127.0.0.1:0".into();
    cfg.auth.token_secret = Some(Secret::new(TOKEN_SECRET));
    cfg.auth.token_leeway_secs = 0;
    cfg.turn.secret = Some(Secret::new(TURN_SECRET));
    cfg.data_dir = std::env::temp_dir().join("kinlink-test-unused");
    cfg.turn.udp_listen = kinlink::config::Listen::one("127.0.0.1:0".parse().unwrap());
    cfg.turn.tcp_listen = kinlink::config::Listen::one("127.0.0.1:0".parse().unwrap());
    // Tests relay to peers on loopback, which the default policy refuses.
    cfg.turn.allowed_peers = vec!["127.0.0.0/8".into()];
    cfg
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    pub async fn with(edit: impl FnOnce(&mut Config)) -> TestServer {
        let mut cfg = test_config();
        edit(&mut cfg);
        cfg.validate().expect("test config is valid");
        let server = kinlink::Server::bind(cfg).await.expect("bind");
        let http = server.http_addr();
        let metrics = server.metrics_addr().expect("separate metrics listener");
        let (turn_udp, turn_tcp, turn_tls) = (server.turn_udp_addr(), server.turn_tcp_addr(), server.turn_tls_addr());
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer { http, metrics, turn_udp, turn_tcp, turn_tls, admin, shutdown: Some(tx), task: Some(task) }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/signal", self.http)
    }

    /// Starts draining; returns the server task to await.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics)).await.unwrap().text().await.unwrap()
    }

    /// Waits until a sample reaches `want` (metrics of a closing connection move only after
    /// its closing handshake); panics with the last value after 5 s.
    pub async fn wait_metric(&self, sample: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.metric(sample).await;
            if v == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{sample} = {v}, want {want}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Value of one sample line, e.g. `kinlink_signal_errors_total{code="peer-offline"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_value(&text, sample).unwrap_or_else(|| panic!("{sample} not in /metrics"))
    }
}

pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
}

pub fn token(family: &str, user: &str, device: &str) -> String {
    token_ttl(family, user, device, 3600)
}

pub fn token_ttl(family: &str, user: &str, device: &str, ttl: u64) -> String {
    kinlink::auth::mint_token(&Secret::new(TOKEN_SECRET), family, user, device, ttl, kinlink::auth::unix_now())
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.expect("connect timeout").expect("connect");
        Client { ws }
    }

    /// Connects and registers with the token in `register`; returns the client and `registered`.
    pub async fn register(server: &TestServer, family: &str, user: &str, device: &str) -> (Client, Value) {
        let mut c = Client::connect(&server.ws_url()).await;
        c.send(json!({"type":"register","familyId":family,"userId":user,"deviceId":device,"token":token(family,user,device)})).await;
        let reg = c.recv().await;
        assert_eq!(reg["type"], "registered", "{reg}");
        (c, reg)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_string())).await.expect("send");
    }

    /// Next JSON text message (pings are skipped).
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next()).await.expect("recv timeout").expect("stream ended").expect("ws error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("server sends JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// Next message must be `error` with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], code, "{v}");
        v
    }

    /// Reads until the server closes; returns the close code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("close timeout") {
                Some(Ok(Message::Close(frame))) => {
                    // Complete the closing handshake as a real client does.
                    let _ = self.ws.flush().await;
                    return frame.map_or(u16::from(CloseCode::Status), |f| u16::from(f.code));
                }
                Some(Ok(Message::Text(t))) => panic!("expected close, got text {t}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("expected close frame, got error {e}"),
                None => panic!("stream ended without close frame"),
            }
        }
    }

    /// Nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        loop {
            match tokio::time::timeout(d, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

// TURN clients and peers.

pub fn rest_credentials(family: &str, device: &str, expires_in: i64) -> (String, String) {
    let expiry = (kinlink::auth::unix_now() as i64 + expires_in) as u64;
    let c = kinlink::auth::turn_credential(&Secret::new(TURN_SECRET), family, device, 0, expiry);
    (c.username, c.credential)
}

pub async fn turn_client(server: SocketAddr, username: String, password: String) -> turn::client::Client {
    let conn = tokio::net::UdpSocket::bind(if server.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" }).await.unwrap();
    let cfg = turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username,
        password,
        realm: "kinlink".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: std::sync::Arc::new(conn),
        vnet: None,
    };
    let client = turn::client::Client::new(cfg).await.unwrap();
    client.listen().await.unwrap();
    client
}

/// A UDP peer that echoes every datagram; returns its address and a counter of packets seen.
pub async fn echo_peer() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    (addr, seen)
}


/// A self-signed certificate for `localhost` and 127.0.0.1.
pub fn self_signed_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    // A leaf valid for 127.0.0.1 that `kinlink check --ca-file` can trust directly.
    self_signed_cert_named(dir, "cert", "localhost", "IP:127.0.0.1,DNS:localhost")
}

/// A self-signed leaf (`<file>.pem`, `<file>.key` in `dir`) for common name `cn` and
/// subject alternative names `san` (openssl syntax).
pub fn self_signed_cert_named(dir: &std::path::Path, file: &str, cn: &str, san: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &format!("/CN={cn}")])
        .args(["-addext", &format!("subjectAltName={san}"), "-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success());
    (cert, key)
}

/// A port free on 127.0.0.1 now (for listeners that must share one fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// curl (scripts/test installs it) with a 5 s limit: success and stdout+stderr.
pub fn curl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("curl").args(["-sS", "--max-time", "5"]).args(args).output().expect("curl (scripts/test installs it)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// HTTPS with `cert`, TURN over TLS with the same certificate and TURN over TCP, all on
/// 127.0.0.1:`port` (one port: a fixed port, since port 0 never shares).
pub fn serve_one_port(c: &mut Config, port: u16, cert: &std::path::Path, key: &std::path::Path) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    c.http.listen = addr;
    c.http.tls_cert = Some(cert.to_path_buf());
    c.http.tls_key = Some(key.to_path_buf());
    serve_tls(c, cert, key);
    c.turn.tls_listen = kinlink::config::Listen::one(addr);
    c.turn.tcp_listen = kinlink::config::Listen::one(addr);
}

/// `kinlink check <url> --skip-turn` as the chart's `helm test` runs it: the check mints its
/// tokens itself with the release's token secret (from the environment). Asserts that it
/// passed; returns its output.
pub async fn helm_test_check(url: String) -> String {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kinlink"))
            .args(["check", &url, "--skip-turn"])
            .env("KINLINK_AUTH__TOKEN_SECRET", TOKEN_SECRET)
            .env("KINLINK_DATA_DIR", "/nonexistent-kinlink-check")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// A fresh scratch directory for one test (`kinlink-<name>-<pid>` under the temp dir).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kinlink-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serves `turns:` on 127.0.0.1:0 with this certificate.
pub fn serve_tls(c: &mut Config, cert: &std::path::Path, key: &std::path::Path) {
    c.turn.tls_listen = kinlink::config::Listen::one("127.0.0.1:0".parse().unwrap());
    c.turn.tls_cert = Some(cert.to_path_buf());
    c.turn.tls_key = Some(key.to_path_buf());
}

/// The SHA-256 fingerprint of the certificate a TLS server on 127.0.0.1 presents (openssl s_client).
pub fn presented_fingerprint(port: u16) -> String {
    presented(port, Some("localhost"), "-fingerprint -sha256")
}

/// `openssl x509 -noout <what>` of the certificate 127.0.0.1:`port` presents for `sni` (None:
/// no SNI sent).
pub fn presented(port: u16, sni: Option<&str>, what: &str) -> String {
    let sni = sni.map(|s| format!("-servername {s}")).unwrap_or_else(|| "-noservername".into());
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("openssl s_client -connect 127.0.0.1:{port} {sni} </dev/null 2>/dev/null | openssl x509 -noout {what}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits (up to 10 s) until the TLS server on `port` presents the certificate `want`.
pub async fn wait_for_fingerprint(port: u16, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = tokio::task::spawn_blocking(move || presented_fingerprint(port)).await.unwrap();
        if now == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still serving {now}, want {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The SHA-256 fingerprint of a PEM certificate file.
pub fn file_fingerprint(cert: &std::path::Path) -> String {
    let out = std::process::Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(cert).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A device registered over wss:// to 127.0.0.1:`port`, trusting `ca` for `server_name`.
pub async fn wss_register(port: u16, ca: &std::path::Path, server_name: &str, family: &str, user: &str, device: &str) -> Wss {
    use tokio_rustls::rustls;
    let mut config = (*kinlink::tls::client_config(Some(ca)).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{server_name}:{port}/signal"), tls).await.unwrap();
    let register = serde_json::json!({"type": "register", "familyId": family, "userId": user, "deviceId": device, "token": token(family, user, device)});
    futures_util::SinkExt::send(&mut ws, Message::text(register.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "registered");
    ws
}

pub async fn next_json(ws: &mut Wss) -> serde_json::Value {
    loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(ws)).await.expect("a message in time").expect("open").unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    }
}
