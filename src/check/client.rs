//! `kinlink check [URL]`: the self-check without a browser. Registers two devices of a
//! throw-away family, checks presence and the offer/answer relay, takes the iceServers the
//! server hands out, allocates on every TURN URL (UDP, TCP, TLS) with those credentials and
//! relays a datagram between two allocations through the server. Prints a table with timings
//! and a hint per failure; the exit code says whether everything passed, so it serves as a
//! Helm test and a monitoring probe.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use md5::Digest;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::turn::stun::{attr, decode_xor_addr, frame_len, method, Builder, Class, Message};

/// What to check and how.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Base URL of the public listener (`http://host:8080`, `https://kinlink.example.com`).
    pub url: String,
    /// A device token, to get check tokens from `POST /v1/check/tokens`. Without one, tokens
    /// are minted with `token_secret` (on the server host) or asked for without auth (demo).
    pub token: Option<String>,
    /// The server's token secret, when this runs where the configuration is.
    pub token_secret: Option<crate::config::Secret>,
    /// Extra CA certificate (PEM) for `https://`, `wss://` and `turns:` (self-signed servers).
    pub ca_file: Option<PathBuf>,
    /// Per-step timeout.
    pub timeout: Duration,
    /// Stop after signaling.
    pub skip_turn: bool,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// How long it took.
    pub ms: f64,
    /// What happened.
    pub detail: String,
    /// What to look at, when it failed.
    pub hint: String,
}

/// The report.
#[derive(Debug, Default)]
pub struct Report {
    /// Every row, in order.
    pub rows: Vec<Row>,
}

impl Report {
    /// True when every row passed.
    pub fn ok(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.ok)
    }

    fn push(&mut self, name: impl Into<String>, started: Instant, result: Result<String, (String, String)>) -> bool {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let (ok, detail, hint) = match result {
            Ok(d) => (true, d, String::new()),
            Err((d, h)) => (false, d, h),
        };
        self.rows.push(Row { name: name.into(), ok, ms, detail, hint });
        ok
    }

    /// The table, for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(10);
        for r in &self.rows {
            out.push_str(&format!("{:<width$}  {}  {:>7.1} ms  {}\n", r.name, if r.ok { "PASS" } else { "FAIL" }, r.ms, r.detail));
            if !r.ok && !r.hint.is_empty() {
                out.push_str(&format!("{:<width$}        hint: {}\n", "", r.hint));
            }
        }
        out.push_str(if self.ok() { "all checks passed\n" } else { "some checks FAILED\n" });
        out
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// `scheme://host:port/path` split up.
struct Target {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_base(url: &str) -> anyhow::Result<Target> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("{url}: use an http:// or https:// URL");
    };
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = split_host_port(authority, if tls { 443 } else { 80 })?;
    Ok(Target { tls, host, port })
}

fn split_host_port(authority: &str, default: u16) -> anyhow::Result<(String, u16)> {
    crate::probe::split_host_port(authority, default).ok_or_else(|| anyhow!("`{authority}` is not host:port"))
}

struct Tls {
    config: Arc<tokio_rustls::rustls::ClientConfig>,
    /// The same, offering ALPN `http/1.1`: on a port shared with TURN, a handshake that names
    /// nothing and then sends nothing would be counted as a misrouted connection.
    http: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl Tls {
    fn new(ca_file: Option<&PathBuf>) -> anyhow::Result<Tls> {
        let config = crate::tls::client_config(ca_file.map(PathBuf::as_path)).context("--ca-file")?;
        let mut http = (*config).clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls { config, http: Arc::new(http) })
    }

    async fn tcp(host: &str, port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| anyhow!("connecting to {host}:{port} timed out"))?
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn handshake(config: &Arc<tokio_rustls::rustls::ClientConfig>, host: &str, port: u16, timeout: Duration) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = Self::tcp(host, port, timeout).await?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())?;
        tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake with {host}:{port} timed out"))?
            .with_context(|| format!("TLS with {host}:{port}"))
    }

    async fn connect(&self, host: &str, port: u16, tls: bool, timeout: Duration) -> anyhow::Result<Box<dyn Stream>> {
        if tls {
            Ok(Box::new(Self::handshake(&self.config, host, port, timeout).await?))
        } else {
            Ok(Box::new(Self::tcp(host, port, timeout).await?))
        }
    }

    /// How long the certificate `host:port` presents stays valid, and its issuer.
    async fn certificate(&self, host: &str, port: u16, timeout: Duration) -> anyhow::Result<(Duration, String)> {
        let stream = Self::handshake(&self.http, host, port, timeout).await?;
        let leaf = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or_else(|| anyhow!("no certificate presented"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| anyhow!("unreadable certificate: {e}"))?;
        let now = crate::auth::unix_now() as i64;
        let left = u64::try_from(cert.validity().not_after.timestamp() - now).unwrap_or(0);
        Ok((Duration::from_secs(left), cert.issuer().to_string()))
    }
}

/// `3 d 4 h`, `5 h 2 min`, `40 s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Minimal HTTP/1.1 POST (Connection: close); returns status, Date header and body.
async fn post(tls: &Tls, base: &Target, path: &str, bearer: Option<&str>, timeout: Duration) -> anyhow::Result<(u16, Option<String>, String)> {
    let mut s = tls.connect(&base.host, base.port, base.tls, timeout).await?;
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("POST {path} HTTP/1.1\r\nHost: {}:{}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n", base.host, base.port);
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(timeout, s.read_to_end(&mut raw)).await.map_err(|_| anyhow!("{path}: no answer"))??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("{path}: not an HTTP answer"))?;
    let date = head.lines().find_map(|l| l.strip_prefix("date: ").or_else(|| l.strip_prefix("Date: "))).map(str::to_string);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok((status, date, body))
}

/// Decodes a chunked body. Works on bytes: chunk sizes count bytes, and slicing text at a
/// byte count panics when it falls inside a multi-byte character.
fn dechunk(body: &str) -> String {
    let mut out = Vec::new();
    let mut rest = body.as_bytes();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let after = &rest[eol + 2..];
        let Some(n) = size.filter(|&n| n > 0 && n <= after.len()) else { break };
        out.extend_from_slice(&after[..n]);
        rest = after[n..].strip_prefix(b"\r\n").unwrap_or(&after[n..]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Stream>>;

struct Device {
    id: String,
    ws: Ws,
}

impl Device {
    async fn recv_until(&mut self, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.map_err(|_| anyhow!("timed out"))?;
            match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if v["type"] == "error" {
                        bail!("server error {}: {}", v["code"], v["message"]);
                    }
                    if pred(&v) {
                        return Ok(v);
                    }
                }
                Some(Ok(WsMessage::Close(f))) => bail!("closed by the server: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("{e}"),
                None => bail!("connection ended"),
            }
        }
    }

    async fn send(&mut self, v: Value) -> anyhow::Result<()> {
        self.ws.send(WsMessage::Text(v.to_string().into())).await?;
        Ok(())
    }
}

async fn register(tls: &Tls, base: &Target, token: &str, claims: &Value, timeout: Duration) -> anyhow::Result<(Device, Value)> {
    let stream = tls.connect(&base.host, base.port, base.tls, timeout).await?;
    let url = format!("{}://{}:{}/signal?token={token}", if base.tls { "wss" } else { "ws" }, base.host, base.port);
    let (ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::client_async(url, stream)).await.map_err(|_| anyhow!("WebSocket upgrade timed out"))??;
    let mut d = Device { id: claims["dev"].as_str().unwrap_or_default().to_string(), ws };
    d.send(json!({"type": "register", "familyId": claims["fam"], "userId": claims["sub"], "deviceId": claims["dev"]})).await?;
    let reg = d.recv_until(timeout, |v| v["type"] == "registered").await?;
    Ok((d, reg))
}

fn claims(token: &str) -> anyhow::Result<Value> {
    use base64::Engine;
    let part = token.split('.').nth(1).ok_or_else(|| anyhow!("not a JWT"))?;
    Ok(serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('='))?)?)
}

/// A TURN client leg: UDP, or a TCP/TLS stream with RFC 8656 framing.
enum Leg {
    Udp(UdpSocket),
    Stream(Box<dyn Stream>, Vec<u8>),
}

impl Leg {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Leg::Udp(s) => {
                s.send(bytes).await?;
            }
            Leg::Stream(s, _) => s.write_all(bytes).await?,
        }
        Ok(())
    }

    /// The next STUN message (or ChannelData frame) from the server.
    async fn recv(&mut self) -> anyhow::Result<Vec<u8>> {
        match self {
            Leg::Udp(s) => {
                let mut buf = vec![0u8; 2048];
                let n = s.recv(&mut buf).await.context("no answer (ICMP: port closed?)")?;
                buf.truncate(n);
                Ok(buf)
            }
            Leg::Stream(s, pending) => loop {
                if let Some(len) = frame_len(pending, true) {
                    if pending.len() >= len {
                        return Ok(pending.drain(..len).collect());
                    }
                }
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    bail!("the server closed the connection");
                }
                pending.extend_from_slice(&buf[..n]);
            },
        }
    }
}

/// One authenticated TURN allocation.
struct Allocation {
    leg: Leg,
    relayed: SocketAddr,
    username: String,
    key: Vec<u8>,
    realm: Vec<u8>,
    nonce: Vec<u8>,
}

struct TurnUrl {
    transport: &'static str,
    host: String,
    port: u16,
}

fn parse_turn_url(url: &str) -> Option<TurnUrl> {
    let (tls, rest) = match url.split_once(':')? {
        ("turn", r) => (false, r),
        ("turns", r) => (true, r),
        _ => return None,
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let tcp = query.contains("transport=tcp");
    let (host, port) = split_host_port(authority, if tls { 5349 } else { 3478 }).ok()?;
    let transport = match (tls, tcp) {
        (true, _) => "tls",
        (false, true) => "tcp",
        (false, false) => "udp",
    };
    Some(TurnUrl { transport, host, port })
}

async fn transact(leg: &mut Leg, req: &[u8], tid: [u8; 12], timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let udp = matches!(leg, Leg::Udp(_));
    loop {
        leg.send(req).await?;
        // UDP retransmits every 500 ms; streams are reliable.
        let wait = if udp { Duration::from_millis(500) } else { timeout };
        let until = (tokio::time::Instant::now() + wait).min(deadline);
        loop {
            match tokio::time::timeout_at(until, leg.recv()).await {
                Ok(Ok(bytes)) => {
                    if Message::parse(&bytes).is_ok_and(|m| m.tid == tid) {
                        return Ok(bytes);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no answer within {} s", timeout.as_secs());
        }
    }
}

fn error_of(m: &Message<'_>) -> String {
    m.error_code().map(|(code, reason)| format!("{code} {reason}")).unwrap_or_else(|| "error".into())
}

async fn allocate(tls: &Tls, url: &TurnUrl, username: &str, password: &str, timeout: Duration) -> anyhow::Result<Allocation> {
    let mut leg = match url.transport {
        "udp" => {
            let addr = tokio::net::lookup_host((url.host.as_str(), url.port)).await?.next().ok_or_else(|| anyhow!("{} does not resolve", url.host))?;
            let bind: SocketAddr = if addr.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
            let s = UdpSocket::bind(bind).await?;
            s.connect(addr).await?;
            Leg::Udp(s)
        }
        t => Leg::Stream(tls.connect(&url.host, url.port, t == "tls", timeout).await?, Vec::new()),
    };
    let tid: [u8; 12] = rand::random();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let first = transact(&mut leg, &b.finish(), tid, timeout).await?;
    let m = Message::parse(&first)?;
    let (Some(realm), Some(nonce)) = (m.get(attr::REALM), m.get(attr::NONCE)) else {
        bail!("the server did not challenge for credentials ({})", error_of(&m));
    };
    let (realm, nonce) = (realm.to_vec(), nonce.to_vec());
    let key = md5::Md5::digest(format!("{username}:{}:{password}", String::from_utf8_lossy(&realm)).as_bytes()).to_vec();
    let tid: [u8; 12] = rand::random();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, username.as_bytes());
    b.attr(attr::REALM, &realm).attr(attr::NONCE, &nonce).integrity(&key);
    let resp = transact(&mut leg, &b.finish_with_fingerprint(), tid, timeout).await?;
    let m = Message::parse(&resp)?;
    if m.class != Class::Success {
        bail!("Allocate refused: {}", error_of(&m));
    }
    let relayed = m.get(attr::XOR_RELAYED_ADDRESS).and_then(|v| decode_xor_addr(v, &m.tid)).ok_or_else(|| anyhow!("no XOR-RELAYED-ADDRESS"))?;
    Ok(Allocation { leg, relayed, username: username.into(), key, realm, nonce })
}

impl Allocation {
    async fn permit(&mut self, peer: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let tid: [u8; 12] = rand::random();
        let mut b = Builder::new(method::CREATE_PERMISSION, Class::Request, tid);
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::USERNAME, self.username.as_bytes());
        b.attr(attr::REALM, &self.realm).attr(attr::NONCE, &self.nonce).integrity(&self.key);
        let resp = transact(&mut self.leg, &b.finish_with_fingerprint(), tid, timeout).await?;
        let m = Message::parse(&resp)?;
        if m.class != Class::Success {
            bail!("CreatePermission for {peer} refused: {}", error_of(&m));
        }
        Ok(())
    }

    async fn send_to(&mut self, peer: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
        let mut b = Builder::new(method::SEND, Class::Indication, rand::random());
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, data);
        self.leg.send(&b.finish()).await
    }

    async fn recv_data(&mut self, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let bytes = tokio::time::timeout_at(deadline, self.leg.recv()).await.map_err(|_| anyhow!("nothing arrived"))??;
            if let Ok(m) = Message::parse(&bytes) {
                if m.method == method::DATA && m.class == Class::Indication {
                    return Ok(m.get(attr::DATA).unwrap_or_default().to_vec());
                }
            }
        }
    }
}

/// Whether `n` appears in `text` as a whole number (a STUN error code, not part of a port).
fn has_number(text: &str, n: &str) -> bool {
    text.split(|c: char| !c.is_ascii_digit()).any(|w| w == n)
}

/// Allocates twice on `url` (one allocation per device) and relays a datagram from the first
/// to the second through the server.
async fn relay_check(tls: &Tls, url: &TurnUrl, creds: [(&str, &str); 2], timeout: Duration) -> Result<String, (String, String)> {
    let port_hint = |e: &anyhow::Error| {
        let text = format!("{e:#}");
        // Certificate errors first: the text also carries the address, whose port may
        // contain "401".
        let hint = if text.contains("certificate") || text.contains("CertificateNotValid") || text.contains("NotValidForName") || text.contains("UnknownIssuer") {
            format!("TLS name mismatch or untrusted certificate: the certificate must be valid for `{}` (self-signed: --ca-file)", url.host)
        } else if has_number(&text, "401") {
            "credentials refused: turn.secret differs between the signaling and TURN side, or the clocks disagree (credentials carry an expiry)".to_string()
        } else if has_number(&text, "508") || has_number(&text, "486") {
            "the server is at a quota or out of relay ports (turn.quota.*, turn.relay_ports)".to_string()
        } else {
            format!("port {}/{} is closed or filtered on the way to {}: firewall, security group, Service ports, or turn.public_host", url.port, url.transport, url.host)
        };
        (text, hint)
    };
    let mut a = allocate(tls, url, creds[0].0, creds[0].1, timeout).await.map_err(|e| port_hint(&e))?;
    let mut b = allocate(tls, url, creds[1].0, creds[1].1, timeout).await.map_err(|e| port_hint(&e))?;
    let relayed_ip = b.relayed.ip();
    let fail = |e: anyhow::Error| {
        let hint = if crate::turn::is_private(relayed_ip) {
            // The common first run: no turn.public_ip, so relays carry this host's private
            // address, which the default peer policy refuses as a peer.
            format!(
                "the relay address {relayed_ip} is a private address, which the default peer policy refuses as a peer (and \
                 peers on the internet could not reach). Set turn.public_ip to this host's public IP; for a LAN-only \
                 install, allow the LAN instead (turn.allowed_peers = [\"{}\"])",
                lan_of(relayed_ip)
            )
        } else {
            "the server refused a peer: turn.allowed_peers / denied_peers".to_string()
        };
        (format!("{e:#}"), hint)
    };
    a.permit(b.relayed, timeout).await.map_err(fail)?;
    b.permit(a.relayed, timeout).await.map_err(fail)?;
    let probe = format!("kinlink-check-{}", rand::random::<u32>());
    // UDP may drop one: send three.
    for _ in 0..3 {
        a.send_to(b.relayed, probe.as_bytes()).await.map_err(|e| (format!("{e:#}"), String::new()))?;
    }
    match b.recv_data(timeout).await {
        Ok(d) if d == probe.as_bytes() => Ok(format!("relayed {} → {} through the server", a.relayed, b.relayed)),
        Ok(_) => Err(("a different datagram arrived".into(), String::new())),
        Err(_) => Err((
            format!("allocated {} and {}, but a datagram between them never arrived", a.relayed, b.relayed),
            format!("the relayed address {} is not reachable: turn.public_ip is wrong (it must be the address peers can reach), or the relay ports (turn.relay_ports) are closed", a.relayed.ip()),
        )),
    }
}

/// The private network an address is in, for the allow-list hint.
fn lan_of(ip: std::net::IpAddr) -> &'static str {
    match ip {
        std::net::IpAddr::V4(v4) if v4.octets()[0] == 10 => "10.0.0.0/8",
        std::net::IpAddr::V4(v4) if v4.octets()[0] == 172 => "172.16.0.0/12",
        std::net::IpAddr::V4(v4) if v4.octets()[0] == 192 => "192.168.0.0/16",
        std::net::IpAddr::V4(v4) if v4.octets()[0] == 127 => "127.0.0.0/8",
        std::net::IpAddr::V4(_) => "100.64.0.0/10",
        std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => "fe80::/10",
        std::net::IpAddr::V6(_) => "fc00::/7",
    }
}

/// Runs every check.
pub async fn run(opts: &CheckOptions) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let base = parse_base(&opts.url)?;
    let tls = Tls::new(opts.ca_file.as_ref())?;
    let t = opts.timeout;

    // Tokens for a throw-away family.
    let started = Instant::now();
    let tokens: Vec<String> = match (&opts.token, &opts.token_secret) {
        (None, Some(secret)) => {
            let family = format!("check-{:016x}", rand::random::<u64>());
            let now = crate::auth::unix_now();
            ["check-a", "check-b"].iter().map(|d| crate::auth::mint_token(secret, &family, "check", d, 600, now)).collect()
        }
        (token, _) => {
            let res = post(&tls, &base, "/v1/check/tokens", token.as_deref(), t).await;
            match res {
                Ok((200, _, body)) => {
                    let v: Value = serde_json::from_str(&body).context("/v1/check/tokens: bad JSON")?;
                    v["devices"].as_array().map(|d| d.iter().filter_map(|x| x["token"].as_str().map(String::from)).collect()).unwrap_or_default()
                }
                Ok((status, date, body)) => {
                    let skew = date.map(|d| format!(" (server clock: {d})")).unwrap_or_default();
                    report.push("tokens", started, Err((format!("HTTP {status}: {}", body.trim()), format!("pass a valid device token with --token, run where the server's configuration is, or enable check.demo; an expired-looking token means clock skew{skew}"))));
                    return Ok(report);
                }
                Err(e) => {
                    report.push("tokens", started, Err((format!("{e:#}"), format!("is kinlink listening at {}:{}? check the URL, DNS and firewall", base.host, base.port))));
                    return Ok(report);
                }
            }
        }
    };
    if tokens.len() != 2 {
        bail!("expected two check tokens");
    }
    report.push("tokens", started, Ok("two devices of a throw-away family".into()));

    // The HTTPS certificate's remaining lifetime (files or ACME: a stalled renewal shows here).
    if base.tls {
        let started = Instant::now();
        match tls.certificate(&base.host, base.port, t).await {
            Ok((left, issuer)) if left < Duration::from_secs(3600) => report.push(
                "certificate",
                started,
                Err((format!("expires in {} s (issuer {issuer})", left.as_secs()), "renewal is not happening: with acme.domains see kinlink_acme_events_total and the log; with files, your certbot or cert-manager".into())),
            ),
            Ok((left, issuer)) => report.push("certificate", started, Ok(format!("valid {} more (issuer {issuer})", human(left)))),
            Err(e) => report.push("certificate", started, Err((format!("{e:#}"), String::new()))),
        };
    }

    // Signaling: both register and see each other; an offer and an answer cross.
    let started = Instant::now();
    let (ca, cb) = (claims(&tokens[0])?, claims(&tokens[1])?);
    let signaling = async {
        let (mut a, reg) = register(&tls, &base, &tokens[0], &ca, t).await?;
        let (mut b, reg_b) = register(&tls, &base, &tokens[1], &cb, t).await?;
        let b_id = b.id.clone();
        a.recv_until(t, |v| v["type"] == "device-online" && v["deviceId"] == b_id.as_str()).await.context("presence")?;
        a.send(json!({"type": "offer", "toDeviceId": b.id, "sdp": {"type": "offer", "sdp": "v=0\r\n"}})).await?;
        b.recv_until(t, |v| v["type"] == "offer").await.context("offer relay")?;
        b.send(json!({"type": "answer", "toDeviceId": a.id, "sdp": {"type": "answer", "sdp": "v=0\r\n"}})).await?;
        a.recv_until(t, |v| v["type"] == "answer").await.context("answer relay")?;
        // The negotiation is a check, not a family connection: close it as abandoned.
        a.send(json!({"type": "p2p-status", "peerDeviceId": b.id, "state": "closed"})).await?;
        Ok::<_, anyhow::Error>((reg, reg_b, a, b))
    };
    let (reg, reg_b, a, b) = match signaling.await {
        Ok(x) => x,
        Err(e) => {
            let text = format!("{e:#}");
            let hint = if text.contains("4401") || text.contains("unauthorized") {
                "token refused: a different auth.token_secret, or clock skew (tokens carry an expiry)"
            } else {
                "WebSocket to /signal failed: a proxy in front must forward Upgrade/Connection headers"
            };
            report.push("signaling", started, Err((text, hint.into())));
            return Ok(report);
        }
    };
    report.push("signaling", started, Ok("register, presence, offer and answer relayed".into()));
    if opts.skip_turn {
        return Ok(report);
    }

    // TURN on every URL the server hands out.
    let ice: Vec<Value> = reg["iceServers"].as_array().cloned().unwrap_or_default();
    let turn = ice.iter().find(|s| s["username"].is_string());
    let started = Instant::now();
    let Some(turn) = turn else {
        report.push("turn", started, Err(("no TURN server in iceServers".into(), "turn.enabled is off, or turn.urls lists none".into())));
        return Ok(report);
    };
    let user_a = turn["username"].as_str().unwrap_or_default().to_string();
    let pass_a = turn["credential"].as_str().unwrap_or_default().to_string();
    // The second allocation uses the second device's own credentials.
    let turn_b = reg_b["iceServers"].as_array().and_then(|a| a.iter().find(|s| s["username"].is_string()).cloned()).unwrap_or_default();
    let user_b = turn_b["username"].as_str().unwrap_or_default().to_string();
    let pass_b = turn_b["credential"].as_str().unwrap_or_default().to_string();
    if let Some(expiry) = user_a.split(':').next().and_then(|e| e.parse::<u64>().ok()) {
        if expiry <= crate::auth::unix_now() {
            report.push("turn credentials", started, Err((format!("credentials expire at {expiry}, before this machine's clock"), "clock skew between this machine and the server".into())));
        }
    }
    for url in turn["urls"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let Some(parsed) = parse_turn_url(url) else { continue };
        let started = Instant::now();
        let result = relay_check(&tls, &parsed, [(&user_a, &pass_a), (&user_b, &pass_b)], t).await;
        report.push(format!("TURN {} {url}", parsed.transport.to_uppercase()), started, result);
    }
    drop((a, b));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = parse_base("https://kin.example.com").unwrap();
        assert!(t.tls && t.host == "kin.example.com" && t.port == 443);
        let t = parse_base("http://127.0.0.1:8080/").unwrap();
        assert!(!t.tls && t.port == 8080);
        let t = parse_base("http://[::1]:9/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert!(parse_base("ftp://x").is_err());
        let u = parse_turn_url("turns:kin.example.com:5349?transport=tcp").unwrap();
        assert_eq!((u.transport, u.port), ("tls", 5349));
        let u = parse_turn_url("turn:1.2.3.4:3478?transport=tcp").unwrap();
        assert_eq!(u.transport, "tcp");
        assert_eq!(parse_turn_url("turn:1.2.3.4").unwrap().transport, "udp");
        assert!(parse_turn_url("stun:1.2.3.4:3478").is_none());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"), "abcdefg");
        // A hostile server's chunk size that ends inside a multi-byte character once panicked.
        assert_eq!(dechunk("1\r\néa\r\n0\r\n\r\n"), "\u{fffd}");
        assert_eq!(dechunk("2\r\né\r\n0\r\n\r\n"), "é");
        assert_eq!(dechunk("ffffffffffffffffff\r\nab"), "");
    }

    #[test]
    fn stun_error_codes_are_whole_numbers_not_parts_of_ports() {
        // The hint once said "credentials refused" for a certificate error on port 40165.
        assert!(!has_number("TLS with 127.0.0.1:40165: invalid peer certificate: UnknownIssuer", "401"));
        assert!(has_number("allocate: 401 Unauthorized", "401"));
        assert!(has_number("error 508 (Insufficient Capacity)", "508"));
        assert!(!has_number("127.0.0.1:15086", "508"));
    }
}
