//! TURN relay benchmark: kinlink and Debian's coturn under the same load, side by side.
//!
//! Starts the server (`--server kinlink|coturn`) on 127.0.0.1, creates `--allocations` UDP
//! allocations in pairs, binds a channel from each to its partner's relayed address, then for
//! `--seconds` sends `--rate` packets per second of `--size` bytes from one side of every pair;
//! the other side reflects each packet back. Each packet therefore crosses the server four
//! times (client→relay, relay→relay, relay→client, and back). Reports delivered packets/s and
//! Mbit/s, loss, round-trip p50/p99, and the server's CPU seconds per million packets
//! delivered. Loopback only; bounded by count and time.
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
use kinlink::turn::stun::{attr, method, Builder, Class, Message};
use md5::Digest;
use tokio::net::UdpSocket;

const SECRET: &str = "bench-turn-secret-0123456789";

struct Args {
    server: String,
    allocations: usize,
    size: usize,
    rate: u64,
    seconds: u64,
    bin: String,
}

fn args() -> Args {
    let mut a = Args { server: "kinlink".into(), allocations: 100, size: 1200, rate: 10_000, seconds: 5, bin: "target/release/kinlink".into() };
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
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.allocations >= 2 && a.allocations % 2 == 0, "--allocations must be even");
    assert!(a.size >= 16 && a.size <= 1400, "--size 16..=1400");
    assert!(a.seconds <= 120, "--seconds is bounded to 120");
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
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    // The TCP port too, as both servers also listen on TCP.
    let _tcp = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    port
}

fn start(a: &Args, port: u16) -> Server {
    let quiet = || (Stdio::null(), Stdio::null());
    let child = match a.server.as_str() {
        "kinlink" => {
            let data = std::env::temp_dir().join(format!("kinlink-turn-bench-{}", std::process::id()));
            let (o, e) = quiet();
            Command::new(&a.bin)
                .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(&data)
                .args(["--set", &format!("turn.udp_listen=127.0.0.1:{port}"), "--set", &format!("turn.tcp_listen=127.0.0.1:{port}")])
                .args(["--set", "turn.allowed_peers=127.0.0.0/8", "--set", "turn.relay_ports=20000-59999"])
                .args(["--set", "turn.quota.total_allocations=100000", "--set", "turn.quota.family_allocations=100000"])
                .args(["--set", "turn.quota.device_allocations=100000", "--set", "log.level=warn"])
                .env("KINLINK_TURN__SECRET", SECRET)
                .env("KINLINK_TURN__REALM", "kinlink")
                .stdout(o)
                .stderr(e)
                .spawn()
                .expect("kinlink binary (cargo build --release)")
        }
        "coturn" => {
            let (o, e) = quiet();
            Command::new("turnserver")
                .args(["-n", "--no-cli", "--no-tls", "--no-dtls", "-L", "127.0.0.1", "-E", "127.0.0.1"])
                .args(["-p", &port.to_string(), "--min-port", "20000", "--max-port", "59999"])
                .args(["--use-auth-secret", "--static-auth-secret", SECRET, "--realm", "kinlink"])
                .args(["--allow-loopback-peers", "--log-file", "stdout", "--simple-log", "--pidfile", "/dev/null"])
                .stdout(o)
                .stderr(e)
                .spawn()
                .expect("turnserver (Debian package coturn)")
        }
        other => panic!("--server kinlink|coturn, not {other}"),
    };
    Server(child)
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    let idx = names.split_whitespace().position(|n| n == "RcvbufErrors");
    idx.and_then(|i| values.split_whitespace().nth(i)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A minimal UDP TURN client: enough to allocate and bind a channel.
struct Alloc {
    sock: Arc<UdpSocket>,
    relayed: SocketAddr,
    username: String,
    key: Vec<u8>,
    nonce: Vec<u8>,
}

async fn transact(sock: &UdpSocket, req: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
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

async fn allocate(server: SocketAddr, device: usize) -> Alloc {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    let sock2 = socket2::SockRef::from(&sock);
    let _ = sock2.set_recv_buffer_size(4 << 20);
    let _ = sock2.set_send_buffer_size(4 << 20);
    let cred = kinlink::auth::turn_credential(&Secret::new(SECRET), "benchfam", &format!("dev{device}"), 3600, kinlink::auth::unix_now());
    let key = md5::Md5::digest(format!("{}:kinlink:{}", cred.username, cred.credential).as_bytes()).to_vec();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid());
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let first = transact(&sock, &b.finish()).await;
    let m = Message::parse(&first).unwrap();
    let nonce = m.get(attr::NONCE).expect("401 with a nonce").to_vec();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid());
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, cred.username.as_bytes());
    b.attr(attr::REALM, b"kinlink").attr(attr::NONCE, &nonce).integrity(&key);
    let resp = transact(&sock, &b.finish_with_fingerprint()).await;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class, Class::Success, "allocate failed: {:?}", m.get(attr::ERROR_CODE).map(|v| String::from_utf8_lossy(&v[4..]).to_string()));
    let relayed = kinlink::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();
    Alloc { sock: Arc::new(sock), relayed, username: cred.username, key, nonce }
}

async fn channel_bind(a: &Alloc, peer: SocketAddr) {
    let mut b = Builder::new(method::CHANNEL_BIND, Class::Request, tid());
    b.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]).xor_addr(attr::XOR_PEER_ADDRESS, peer);
    b.attr(attr::USERNAME, a.username.as_bytes()).attr(attr::REALM, b"kinlink").attr(attr::NONCE, &a.nonce).integrity(&a.key);
    let resp = transact(&a.sock, &b.finish_with_fingerprint()).await;
    assert_eq!(Message::parse(&resp).unwrap().class, Class::Success, "channel bind failed");
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
    let server = start(&a, port);
    let pid = server.0.id();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Wait for the server: a Binding request answered.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe.connect(addr).await.unwrap();
    let b = Builder::new(method::BINDING, Class::Request, tid()).finish();
    let _ = tokio::time::timeout(Duration::from_secs(10), transact(&probe, &b)).await.expect("server answers");

    let mut allocs = Vec::with_capacity(a.allocations);
    for i in 0..a.allocations {
        allocs.push(allocate(addr, i).await);
    }
    for pair in allocs.chunks(2) {
        channel_bind(&pair[0], pair[1].relayed).await;
        channel_bind(&pair[1], pair[0].relayed).await;
    }

    let epoch = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let rtts = Arc::new(Rtt::new());
    let mut tasks = Vec::new();
    for pair in allocs.chunks(2) {
        // Reflector: B sends every ChannelData frame straight back on its own channel.
        let b = pair[1].sock.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = b.recv(&mut buf).await {
                if n >= 4 && buf[0] & 0xC0 == 0x40 {
                    let _ = b.try_send(&buf[..n]);
                }
            }
        }));
        // Receiver on A: the round trip is in the payload.
        let sock = pair[0].sock.clone();
        let (received, rtts) = (received.clone(), rtts.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = sock.recv(&mut buf).await {
                if n >= 16 && buf[0] & 0xC0 == 0x40 {
                    let sent = u64::from_be_bytes(buf[4..12].try_into().unwrap());
                    rtts.record((epoch.elapsed().as_micros() as u64).saturating_sub(sent));
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let senders: Vec<Arc<UdpSocket>> = allocs.chunks(2).map(|p| p[0].sock.clone()).collect();
    let mut frame = vec![0u8; 4 + a.size];
    frame[0..2].copy_from_slice(&0x4000u16.to_be_bytes());
    frame[2..4].copy_from_slice(&(a.size as u16).to_be_bytes());

    let drops0 = rcvbuf_errors();
    let cpu0 = cpu_secs(pid);
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
            let s = &senders[(sent as usize) % senders.len()];
            frame[4..12].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
            if s.try_send(&frame).is_err() {
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
    let cpu = cpu_secs(pid) - cpu0;
    let got = received.load(Ordering::Relaxed);
    let drops = rcvbuf_errors() - drops0;
    for t in &tasks {
        t.abort();
    }
    let lost = sent.saturating_sub(got);
    // One delivered round trip = 2 packets relayed end to end (A→B and B→A).
    let relayed = 2 * got;
    println!(
        "RESULT server={} allocations={} size={} offered_pps={} sent={} received={} loss_pct={:.3} client_send_failed={} \
         relayed_pps={:.0} mbit_s={:.1} rtt_p50_ms={:.3} rtt_p99_ms={:.3} server_cpu_s={:.2} cpu_s_per_mpkt={:.2} udp_rcvbuf_errors={}",
        a.server,
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
        drops,
    );
    drop(server);
}
