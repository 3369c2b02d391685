//! TURN relay benchmark: kinlink and Debian's coturn under the same load, side by side.
//!
//! Starts the server (`--server kinlink|coturn`) on 127.0.0.1, creates `--allocations` UDP
//! allocations in pairs, binds a channel from each to its partner's relayed address, then for
//! `--seconds` sends `--rate` packets per second of `--size` bytes from one side of every pair;
//! the other side reflects each packet back. Each packet therefore crosses the server four
//! times (client→relay, relay→relay, relay→client, and back). Reports delivered packets/s and
//! Mbit/s, loss, round-trip p50/p99, and the server's CPU seconds per million packets
//! delivered, in all and in the kernel (`sys_s_per_mpkt`: what no user-space change can
//! remove). Loopback (or network namespaces the bench script makes) only; bounded by count
//! and time.
//!
//! With `--peer echo` each allocation instead binds a channel to one plain UDP peer of the
//! generator that echoes everything back in batches: each packet crosses the server twice
//! (client→relay→peer, peer→relay→client), the generator's work per relayed packet halves,
//! and one generator core can outrun one server core. `--server forwarder` runs
//! `examples/udp_forwarder` (the same sockets and batch syscalls, no TURN) under that load, or
//! the program `--forwarder PATH` names.
//! `--server-cpus` pins the server (`taskset`), `--server-nice N` sets its priority;
//! `--threads` sets kinlink's `turn.data_threads` or coturn's `--relay-threads`.
//! `--server-netns NS --server-ip IP --client-ip IP` puts the server in its own network
//! namespace, reached over a veth pair
//! (bench/turn_per_core.sh sets it up with NETNS=1): then each side's kernel receive work is
//! its own, as between two hosts, instead of a loopback send also doing the receiver's.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/turn_bench --server kinlink --allocations 100 --size 1200 --rate 20000 --seconds 5
//! bench/turn.sh     # every point, both servers, alternating
//! ```

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinlink::config::Secret;
use kinlink::turn::stun::{attr, frame_len, method, Builder, Class, Message};
use futures_util::StreamExt;
use md5::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

const SECRET: &str = "bench-turn-secret-0123456789";

struct Args {
    server: String,
    allocations: usize,
    size: usize,
    rate: u64,
    seconds: u64,
    bin: String,
    /// Client leg: `udp` or `tcp` (RFC 8656 framing on a stream; the relayed leg is UDP).
    transport: String,
    /// `reflect` (pairs of allocations) or `echo` (every allocation to one echoing peer).
    peer: String,
    /// kinlink's `turn.data_threads` / coturn's `--relay-threads`; 0 leaves the default.
    threads: usize,
    /// CPUs the server may run on (`taskset -c`), e.g. "0".
    server_cpus: Option<String>,
    /// The server's scheduling priority (`nice -n`), e.g. -10.
    server_nice: Option<i32>,
    /// kinlink's HTTP listener on the TURN port: TURN/TCP through the shared-port demux.
    share_http: bool,
    /// The network namespace to start the server in (`ip netns exec`); see `--server-ip`.
    server_netns: Option<String>,
    /// The server's address (127.0.0.1, or its side of a veth pair with `--server-netns`).
    server_ip: std::net::IpAddr,
    /// The generator's address: its clients and its echo peer bind to it.
    client_ip: std::net::IpAddr,
    /// The program `--server forwarder` runs (default: examples/udp_forwarder beside `--bin`);
    /// bench/io_uring.sh runs its io_uring variant through it.
    forwarder: Option<String>,
}

fn args() -> Args {
    let mut a = Args { server: "kinlink".into(), allocations: 100, size: 1200, rate: 10_000, seconds: 5, bin: "target/release/kinlink".into(), transport: "udp".into(), peer: "reflect".into(), threads: 0, server_cpus: None, server_nice: None, share_http: false, server_netns: None, server_ip: LOCALHOST, client_ip: LOCALHOST, forwarder: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--server" => a.server = v,
            "--allocations" => a.allocations = v.parse().unwrap(),
            "--size" => a.size = v.parse().unwrap(),
            "--rate" => a.rate = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--bin" => a.bin = v,
            "--transport" => a.transport = v,
            "--peer" => a.peer = v,
            "--threads" => a.threads = v.parse().unwrap(),
            "--server-cpus" => a.server_cpus = Some(v),
            "--server-nice" => a.server_nice = Some(v.parse().expect("--server-nice N")),
            "--share-http" => a.share_http = v == "yes",
            "--server-netns" => a.server_netns = Some(v),
            "--server-ip" => a.server_ip = v.parse().expect("--server-ip IP"),
            "--client-ip" => a.client_ip = v.parse().expect("--client-ip IP"),
            "--forwarder" => a.forwarder = Some(v),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.allocations >= 2 && a.allocations.is_multiple_of(2), "--allocations must be even");
    assert!(a.size >= 16 && a.size <= 1400, "--size 16..=1400");
    assert!(a.seconds <= 120, "--seconds is bounded to 120");
    assert!(["udp", "tcp", "tls"].contains(&a.transport.as_str()), "--transport udp|tcp|tls");
    assert!(a.peer == "reflect" || a.peer == "echo", "--peer reflect|echo");
    assert!(a.server != "forwarder" || (a.peer == "echo" && a.transport == "udp"), "--server forwarder needs --peer echo over udp");
    assert!(a.server == "kinlink" || a.transport != "tls", "--transport tls is for kinlink (bench/oneport.sh)");
    a
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    // A UDP port whose TCP twin is free too (both servers listen on both); a TCP port can
    // still be held by a connection of an earlier run, so try a few.
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP+TCP port pair");
}

const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The server's command, in `--server-netns` (`ip netns exec`), under `taskset` when
/// `--server-cpus` is given and `nice` with `--server-nice` (each execs the next, so the
/// child's pid is the server's).
fn command(a: &Args, program: &str) -> Command {
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = &a.server_netns {
        argv.extend(["ip", "netns", "exec", ns].map(String::from));
    }
    if let Some(cpus) = &a.server_cpus {
        argv.extend(["taskset", "-c", cpus].map(String::from));
    }
    if let Some(n) = a.server_nice {
        argv.extend(["nice".to_string(), "-n".to_string(), n.to_string()]);
    }
    argv.push(program.to_string());
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// Starts the server; `peer` is the echo peer (the forwarder's fixed destination).
fn start(a: &Args, port: u16, metrics_port: u16, peer: Option<SocketAddr>) -> Server {
    let quiet = || (Stdio::null(), Stdio::null());
    let child = match a.server.as_str() {
        "kinlink" => {
            let data = std::env::temp_dir().join(format!("kinlink-turn-bench-{}", std::process::id()));
            let (o, e) = quiet();
            let mut c = command(a, &a.bin);
            let ip = a.server_ip;
            let http = if a.share_http { format!("{ip}:{port}") } else { format!("{ip}:0") };
            let peers = if a.client_ip.is_loopback() { "127.0.0.0/8".to_string() } else { format!("{}/32", a.client_ip) };
            c.args(["serve", "--listen", &http, "--metrics-listen", &format!("{ip}:{metrics_port}")])
                .arg("--data-dir")
                .arg(&data)
                .args(["--set", &format!("turn.udp_listen={ip}:{port}"), "--set", &format!("turn.tcp_listen={ip}:{port}")])
                .args(["--set", &format!("turn.allowed_peers={peers}"), "--set", "turn.relay_ports=20000-59999"])
                .args(["--set", "turn.quota.total_allocations=100000", "--set", "turn.quota.family_allocations=100000"])
                .args(["--set", "turn.quota.device_allocations=100000", "--set", "log.level=warn"])
                // Every bench client is 127.0.0.1: the per-source limit on the 401 leg (200/s by
                // default) would measure itself, not allocation speed. coturn has no such limit.
                .args(["--set", "turn.unauthenticated_per_ip_per_sec=0"])
                // Likewise the per-source cap on TCP/TLS connections (256 by default).
                .args(["--set", "turn.max_stream_connections_per_ip=100000"]);
            if a.threads > 0 {
                c.args(["--set", &format!("turn.data_threads={}", a.threads)]);
            }
            if a.transport == "tls" {
                // TURN over TLS on the port (TCP off there); with --share-http, HTTPS too.
                std::fs::create_dir_all(&data).unwrap();
                let (cert, key) = (data.join("bench-cert.pem"), data.join("bench-key.pem"));
                let ok = Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
                    .arg("-keyout")
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert)
                    .stderr(Stdio::null())
                    .status()
                    .expect("openssl")
                    .success();
                assert!(ok, "openssl");
                c.args(["--set", "turn.tcp_listen=off", "--set", &format!("turn.tls_listen={ip}:{port}")])
                    .args(["--set", &format!("turn.tls_cert={}", cert.display()), "--set", &format!("turn.tls_key={}", key.display())]);
                if a.share_http {
                    c.args(["--set", &format!("http.tls_cert={}", cert.display()), "--set", &format!("http.tls_key={}", key.display())]);
                }
            }
            c.env("KINLINK_TURN__SECRET", SECRET)
                .env("KINLINK_TURN__REALM", "kinlink")
                .stdout(o)
                .stderr(e)
                .spawn()
                .expect("kinlink binary (cargo build --release)")
        }
        "coturn" => {
            let (o, e) = quiet();
            let mut c = command(a, "turnserver");
            let ip = a.server_ip.to_string();
            c.args(["-n", "--no-cli", "--no-tls", "--no-dtls", "-L", &ip, "-E", &ip])
                .args(["-p", &port.to_string(), "--min-port", "20000", "--max-port", "59999"])
                .args(["--use-auth-secret", "--static-auth-secret", SECRET, "--realm", "kinlink"])
                .args(["--allow-loopback-peers", "--log-file", "stdout", "--simple-log", "--pidfile", "/dev/null"]);
            if a.threads > 0 {
                c.args(["--relay-threads", &a.threads.to_string()]);
            }
            c.stdout(o).stderr(e).spawn().expect("turnserver (Debian package coturn)")
        }
        "forwarder" => {
            let (o, e) = quiet();
            let program = a.forwarder.clone().unwrap_or_else(|| std::path::Path::new(&a.bin).with_file_name("examples/udp_forwarder").display().to_string());
            let mut c = command(a, &program);
            c.args(["--listen", &SocketAddr::new(a.server_ip, port).to_string(), "--peer", &peer.expect("an echo peer").to_string()]);
            c.stdout(o).stderr(e).spawn().unwrap_or_else(|err| panic!("{program}: {err}"))
        }
        other => panic!("--server kinlink|coturn|forwarder, not {other}"),
    };
    Server(child)
}

/// A plain UDP peer on its own thread that echoes every datagram to its sender, in batches
/// (`recvmmsg`/`sendmmsg`), so it costs the generator little per packet.
fn batch_echo_peer(ip: std::net::IpAddr) -> SocketAddr {
    use kinlink::turn::batch::{RecvBatch, SendBatch};
    use mio::unix::SourceFd;
    use std::os::fd::AsRawFd;
    let sock = kinlink::turn::relay::bind_udp(SocketAddr::new(ip, 0), 8 << 20, false).unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut poll = mio::Poll::new().unwrap();
        poll.registry().register(&mut SourceFd(&sock.as_raw_fd()), mio::Token(0), mio::Interest::READABLE).unwrap();
        let mut events = mio::Events::with_capacity(8);
        let mut rb = RecvBatch::new(2048, 0);
        let mut out = SendBatch::default();
        loop {
            let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
            while let Ok(n) = rb.recv(&sock) {
                for k in 0..n {
                    let (from, buf, len, _) = rb.get(k);
                    out.push(from, &buf[..len]);
                }
                out.flush(&sock);
            }
        }
    });
    addr
}

/// `kinlink_turn_shard_packets_total` per shard, from kinlink's metrics endpoint.
fn shard_packets(ip: std::net::IpAddr, metrics_port: u16) -> Vec<u64> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect((ip, metrics_port)) else { return Vec::new() };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with("kinlink_turn_shard_packets_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .collect()
}

/// The server's resident set (user-space memory: kernel socket buffers are not in it), KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// The server's CPU seconds so far, (user, system), every thread counted.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (ticks(11), ticks(12))
}

/// UDP receive-buffer drops in the server's network namespace.
fn rcvbuf_errors(pid: u32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).unwrap_or_default();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    let idx = names.split_whitespace().position(|n| n == "RcvbufErrors");
    idx.and_then(|i| values.split_whitespace().nth(i)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The client's socket to the server: a UDP socket, or a TCP stream carrying STUN messages
/// and 4-byte-padded ChannelData frames back to back.
/// A stream leg: TCP, or TLS over TCP (`--transport tls`).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

enum Leg {
    Udp(Arc<UdpSocket>),
    Tcp(Box<dyn Stream>),
}

/// A minimal TURN client: enough to allocate and bind a channel.
struct Alloc {
    leg: Leg,
    relayed: SocketAddr,
    username: String,
    key: Vec<u8>,
    nonce: Vec<u8>,
}

/// Reads one STUN message or ChannelData frame (with its padding) from a stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.resize(4, 0);
    r.read_exact(&mut buf[..4]).await?;
    let len = frame_len(buf, true).expect("a 4-byte header");
    buf.resize(len, 0);
    r.read_exact(&mut buf[4..]).await.map(drop)
}

async fn transact(leg: &mut Leg, req: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let sock = match leg {
        Leg::Tcp(stream) => {
            stream.write_all(req).await.expect("TCP write");
            // TLS buffers records until flushed (a no-op on TCP).
            stream.flush().await.expect("TCP flush");
            tokio::time::timeout(Duration::from_secs(10), read_frame(stream, &mut buf)).await.expect("TCP answer").expect("TCP read");
            return buf;
        }
        Leg::Udp(sock) => sock,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let _ = sock.send(req).await;
        match tokio::time::timeout(Duration::from_millis(250), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                buf.truncate(n);
                return buf;
            }
            // ICMP port unreachable while the server starts: wait a little.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => {}
        }
    }
    panic!("no answer from the TURN server");
}

fn tid() -> [u8; 12] {
    rand::random()
}

/// A TLS client that accepts any certificate: the bench measures relaying, not PKI.
fn tls_connector() -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(&self, m: &[u8], c: &rustls::pki_types::CertificateDer<'_>, d: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(&self, m: &[u8], c: &rustls::pki_types::CertificateDer<'_>, d: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn allocate(server: SocketAddr, client_ip: std::net::IpAddr, device: usize, transport: &str) -> Alloc {
    let mut leg = if transport == "tcp" || transport == "tls" {
        let stream = TcpStream::connect(server).await.expect("TCP connect");
        stream.set_nodelay(true).unwrap();
        if transport == "tls" {
            // No ALPN, like libwebrtc: on a shared port the first bytes decide.
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
            Leg::Tcp(Box::new(tls_connector().connect(name, stream).await.expect("TLS handshake")))
        } else {
            Leg::Tcp(Box::new(stream))
        }
    } else {
        let sock = UdpSocket::bind(SocketAddr::new(client_ip, 0)).await.unwrap();
        sock.connect(server).await.unwrap();
        let sock2 = socket2::SockRef::from(&sock);
        let _ = sock2.set_recv_buffer_size(4 << 20);
        let _ = sock2.set_send_buffer_size(4 << 20);
        Leg::Udp(Arc::new(sock))
    };
    let cred = kinlink::auth::turn_credential(&Secret::new(SECRET), "benchfam", &format!("dev{device}"), 3600, kinlink::auth::unix_now());
    let key = md5::Md5::digest(format!("{}:kinlink:{}", cred.username, cred.credential).as_bytes()).to_vec();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid());
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let first = transact(&mut leg, &b.finish()).await;
    let m = Message::parse(&first).unwrap();
    let nonce = m.get(attr::NONCE).expect("401 with a nonce").to_vec();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid());
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, cred.username.as_bytes());
    b.attr(attr::REALM, b"kinlink").attr(attr::NONCE, &nonce).integrity(&key);
    let resp = transact(&mut leg, &b.finish_with_fingerprint()).await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class, Class::Success, "allocate failed: {:?}", m.error_code());
    let relayed = kinlink::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();
    Alloc { leg, relayed, username: cred.username, key, nonce }
}

async fn channel_bind(a: &mut Alloc, peer: SocketAddr) {
    let mut b = Builder::new(method::CHANNEL_BIND, Class::Request, tid());
    b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]).xor_addr(attr::XOR_PEER_ADDRESS, peer);
    b.attr(attr::USERNAME, a.username.as_bytes()).attr(attr::REALM, b"kinlink").attr(attr::NONCE, &a.nonce).integrity(&a.key);
    let resp = transact(&mut a.leg, &b.finish_with_fingerprint()).await;
    assert_eq!(Message::parse(&resp).unwrap().class, Class::Success, "channel bind failed");
}

/// Where the load generator writes one pair's outgoing frames.
enum Sender {
    Udp(Arc<UdpSocket>),
    Tcp(mpsc::Sender<Vec<u8>>),
}

/// The side of an allocation that sends the load and measures what comes back: a reader
/// handing each frame to `on_frame`, and (TCP) a writer batching whatever is queued into one
/// write. Returns where the load goes.
fn measured_leg<F>(leg: Leg, on_frame: F, tasks: &mut Vec<tokio::task::JoinHandle<()>>) -> Sender
where
    F: Fn(&[u8]) + Send + 'static,
{
    match leg {
        Leg::Udp(sock) => {
            let reader = sock.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok(n) = reader.recv(&mut buf).await {
                    on_frame(&buf[..n]);
                }
            }));
            Sender::Udp(sock)
        }
        Leg::Tcp(stream) => {
            let (mut r, mut w) = tokio::io::split(stream);
            tasks.push(tokio::spawn(async move {
                let mut buf = Vec::with_capacity(2048);
                while read_frame(&mut r, &mut buf).await.is_ok() {
                    on_frame(&buf);
                }
            }));
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4096);
            tasks.push(tokio::spawn(async move {
                let mut batch = Vec::new();
                let mut out = Vec::with_capacity(64 * 1024);
                while rx.recv_many(&mut batch, 256).await > 0 {
                    out.clear();
                    batch.drain(..).for_each(|f| out.extend_from_slice(&f));
                    if w.write_all(&out).await.is_err() || w.flush().await.is_err() {
                        break;
                    }
                }
            }));
            Sender::Tcp(tx)
        }
    }
}

/// Round-trip histogram shared by every receiver: 10 µs buckets up to 200 ms.
struct Rtt(Vec<AtomicU64>);

impl Rtt {
    const BUCKET_US: u64 = 10;
    fn new() -> Self {
        Rtt((0..20_000).map(|_| AtomicU64::new(0)).collect())
    }
    fn record(&self, us: u64) {
        let i = ((us / Self::BUCKET_US) as usize).min(self.0.len() - 1);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
    /// The quantile in milliseconds (upper edge of its bucket).
    fn quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let target = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return ((i as u64 + 1) * Self::BUCKET_US) as f64 / 1000.0;
            }
        }
        f64::NAN
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let port = free_port();
    let metrics_port = free_port();
    let echo = (a.peer == "echo").then(|| batch_echo_peer(a.client_ip));
    let server = start(&a, port, metrics_port, echo);
    let pid = server.0.id();
    let addr = SocketAddr::new(a.server_ip, port);
    let client_ip = a.client_ip;
    let forwarder = a.server == "forwarder";
    if forwarder {
        // It answers nothing but data: give it a moment to bind.
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        // Wait for the server: a Binding request answered.
        let probe = UdpSocket::bind(SocketAddr::new(client_ip, 0)).await.unwrap();
        probe.connect(addr).await.unwrap();
        let mut probe = Leg::Udp(Arc::new(probe));
        let b = Builder::new(method::BINDING, Class::Request, tid()).finish();
        let _ = tokio::time::timeout(Duration::from_secs(10), transact(&mut probe, &b)).await.expect("server answers");
    }

    let rss_before = rss_kib(pid);
    // Allocations are made 64 at a time: the rate (with the 401 leg) is reported.
    let alloc_start = Instant::now();
    let transport = a.transport.clone();
    let mut allocs: Vec<Alloc> = futures_util::stream::iter(0..a.allocations)
        .map(|i| {
            let transport = transport.clone();
            async move {
                if forwarder {
                    let sock = UdpSocket::bind(SocketAddr::new(client_ip, 0)).await.unwrap();
                    sock.connect(addr).await.unwrap();
                    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20);
                    Alloc { leg: Leg::Udp(Arc::new(sock)), relayed: echo.unwrap(), username: String::new(), key: Vec::new(), nonce: Vec::new() }
                } else {
                    allocate(addr, client_ip, i, &transport).await
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let alloc_per_sec = a.allocations as f64 / alloc_start.elapsed().as_secs_f64();
    match echo {
        Some(peer) if !forwarder => {
            for x in allocs.iter_mut() {
                channel_bind(x, peer).await;
            }
        }
        Some(_) => {}
        None => {
            for pair in allocs.chunks_mut(2) {
                let (x, y) = pair.split_at_mut(1);
                channel_bind(&mut x[0], y[0].relayed).await;
                channel_bind(&mut y[0], x[0].relayed).await;
            }
        }
    }

    let epoch = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let rtts = Arc::new(Rtt::new());
    let mut tasks = Vec::new();
    let mut senders = Vec::new();
    // What one receiver does with a ChannelData frame that came back: the send time is in it.
    let on_frame = {
        let (received, rtts) = (received.clone(), rtts.clone());
        move |frame: &[u8]| {
            if frame.len() >= 12 && frame[0] & 0xC0 == 0x40 {
                let sent = u64::from_be_bytes(frame[4..12].try_into().unwrap());
                rtts.record((epoch.elapsed().as_micros() as u64).saturating_sub(sent));
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    if echo.is_some() {
        // Every allocation sends and gets its packets back from the echo peer.
        for x in allocs.drain(..) {
            senders.push(measured_leg(x.leg, on_frame.clone(), &mut tasks));
        }
    }
    let mut it = allocs.into_iter();
    while let (Some(first), Some(second)) = (it.next(), it.next()) {
        // Reflector: B sends every ChannelData frame straight back on its own channel.
        match second.leg {
            Leg::Udp(b) => tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok(n) = b.recv(&mut buf).await {
                    if n >= 4 && buf[0] & 0xC0 == 0x40 {
                        let _ = b.try_send(&buf[..n]);
                    }
                }
            })),
            Leg::Tcp(b_stream) => {
                let (mut rb, mut wb) = tokio::io::split(b_stream);
                tasks.push(tokio::spawn(async move {
                    let mut buf = Vec::with_capacity(2048);
                    while read_frame(&mut rb, &mut buf).await.is_ok() {
                        if buf[0] & 0xC0 == 0x40 && (wb.write_all(&buf).await.is_err() || wb.flush().await.is_err()) {
                            break;
                        }
                    }
                }));
            }
        }
        senders.push(measured_leg(first.leg, on_frame.clone(), &mut tasks));
    }
    let padded = (a.size + 3) & !3;
    let mut frame = vec![0u8; 4 + padded];
    frame[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
    frame[2..4].copy_from_slice(&(a.size as u16).to_be_bytes());
    let frame_len = if a.transport == "udp" { 4 + a.size } else { 4 + padded };

    let drops0 = rcvbuf_errors(pid);
    let cpu0 = cpu_secs(pid);
    let cpu_window = Instant::now();
    let total = a.rate * a.seconds;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut send_failed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total && start.elapsed() < Duration::from_secs(a.seconds + 2) {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * a.rate as f64) as u64).min(total);
        while sent < due {
            frame[4..12].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
            let ok = match &senders[(sent as usize) % senders.len()] {
                Sender::Udp(s) => s.try_send(&frame[..frame_len]).is_ok(),
                Sender::Tcp(tx) => tx.try_send(frame[..frame_len].to_vec()).is_ok(),
            };
            if !ok {
                send_failed += 1;
            }
            sent += 1;
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(2);
    while received.load(Ordering::Relaxed) < sent - send_failed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (user, sys) = cpu_secs(pid);
    let (user, sys) = (user - cpu0.0, sys - cpu0.1);
    let cpu = user + sys;
    let util = cpu / cpu_window.elapsed().as_secs_f64();
    let shards = if a.server == "kinlink" { shard_packets(a.server_ip, metrics_port) } else { Vec::new() };
    let rss_after = rss_kib(pid);
    let got = received.load(Ordering::Relaxed);
    let drops = rcvbuf_errors(pid) - drops0;
    for t in &tasks {
        t.abort();
    }
    let lost = sent.saturating_sub(got);
    // One delivered round trip = 2 packets relayed end to end (A→B and B→A; with an echo
    // peer, client→peer and peer→client).
    let relayed = 2 * got;
    println!(
        "RESULT server={} shared_port={} transport={} allocations={} size={} offered_pps={} sent={} received={} loss_pct={:.3} client_send_failed={} \
         relayed_pps={:.0} mbit_s={:.1} rtt_p50_ms={:.3} rtt_p99_ms={:.3} server_cpu_s={:.2} cpu_s_per_mpkt={:.2} sys_s_per_mpkt={:.2} udp_rcvbuf_errors={} \
         peer={} threads={} server_cpu_util={:.2} shard_packets={} allocations_per_sec={:.0} rss_kib_before={} rss_kib_after={} rss_bytes_per_allocation={:.0}",
        a.server,
        a.share_http,
        a.transport,
        a.allocations,
        a.size,
        a.rate,
        sent,
        got,
        100.0 * lost as f64 / sent.max(1) as f64,
        send_failed,
        relayed as f64 / send_secs,
        relayed as f64 * a.size as f64 * 8.0 / send_secs / 1e6,
        rtts.quantile_ms(0.5),
        rtts.quantile_ms(0.99),
        cpu,
        cpu / (relayed.max(1) as f64 / 1e6),
        sys / (relayed.max(1) as f64 / 1e6),
        drops,
        a.peer,
        a.threads,
        util,
        if shards.is_empty() { "-".to_string() } else { shards.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("/") },
        alloc_per_sec,
        rss_before,
        rss_after,
        (rss_after.saturating_sub(rss_before) * 1024) as f64 / a.allocations as f64,
    );
    drop(server);
}
