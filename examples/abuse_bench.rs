//! Abuse benchmark: what a legitimate client sees while kinlink is attacked, and what each
//! attack costs kinlink. Starts the release binary on 127.0.0.1 with default limits, then
//! runs phases of `--seconds` each:
//!
//! - `baseline`: no attack;
//! - `slowloris`: 2,000 HTTP connections from 40 loopback addresses (127.0.1.1–40, 50 each),
//!   each sending half a request head and then nothing; reopened as kinlink cuts them;
//! - `idle-turn-streams`: 2,000 TURN/TCP connections from 10 addresses (127.0.2.1–10) that
//!   never send a byte; reopened as they are cut;
//! - `allocate-flood`: Allocate requests as fast as one socket sends them from 127.0.3.1,
//!   alternating unauthenticated and forged (valid nonce, wrong password).
//!
//! Throughout, the legitimate client on 127.0.0.1 measures, five times a second, the time to
//! connect a WebSocket and get `registered`, and the time for a TURN Allocate over UDP (401
//! challenge + authenticated request, then Refresh 0). Reports p50/p99 of both, failures,
//! kinlink's peak RSS and CPU per phase. Loopback only; every loop is bounded in count and time.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/abuse_bench --seconds 10 [--phases baseline,allocate-flood]
//! bench/abuse.sh     # the same, output kept in bench/results/
//! ```
//!
//! kinlink inherits the environment, so a limit can be changed for a comparison, e.g.
//! `KINLINK_TURN__UNAUTHENTICATED_PER_IP_PER_SEC=0` (no per-IP limit on unauthenticated
//! requests):
//!
//! ```text
//! KINLINK_TURN__UNAUTHENTICATED_PER_IP_PER_SEC=0 target/release/examples/abuse_bench --phases allocate-flood
//! ```

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kinlink::config::Secret;
use kinlink::turn::server::long_term_key;
use kinlink::turn::stun::{attr, method, Builder, Class, Message};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

const TOKEN_SECRET: &str = "bench-abuse-token-secret-0123456789";
const TURN_SECRET: &str = "bench-abuse-turn-secret-0123456789";

struct Server {
    child: Child,
    http: SocketAddr,
    /// TURN over UDP.
    turn: SocketAddr,
    /// TURN over TCP.
    turn_tcp: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str) -> Server {
    let data = std::env::temp_dir().join(format!("kinlink-abuse-bench-{}", std::process::id()));
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--set", "turn.udp_listen=127.0.0.1:0", "--set", "turn.tcp_listen=127.0.0.1:0", "--set", "log.format=json"])
        .env("KINLINK_AUTH__TOKEN_SECRET", TOKEN_SECRET)
        .env("KINLINK_TURN__SECRET", TURN_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kinlink binary (cargo build --release)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut http, mut turn) = (None, None);
    let mut turn_tcp = None;
    let first = |v: &serde_json::Value| -> SocketAddr { v.as_str().unwrap().trim_matches(['[', ']']).parse().unwrap() };
    while http.is_none() || turn.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("kinlink starts");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        match v["fields"]["message"].as_str() {
            Some("TURN serving") => {
                turn = Some(first(&v["fields"]["udp"]));
                turn_tcp = Some(first(&v["fields"]["tcp"]));
            }
            Some("kinlink serving") => http = Some(v["fields"]["http"].as_str().unwrap().parse().unwrap()),
            _ => {}
        }
    }
    // Keep draining the logs so kinlink never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Server { child, http: http.unwrap(), turn: turn.unwrap(), turn_tcp: turn_tcp.unwrap() }
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0) * 1024
}

async fn connect_from(ip: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{ip}:0").parse().unwrap())?;
    s.connect(to).await
}

/// Keeps `per_ip` connections open from each of `ips`, writing `first` on each, reopening
/// those kinlink closes, until `stop`. Counts connections opened.
async fn hold(ips: Vec<String>, per_ip: usize, to: SocketAddr, first: &'static [u8], stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    let mut tasks = Vec::new();
    for ip in ips {
        for _ in 0..per_ip {
            let (ip, stop, opened) = (ip.clone(), stop.clone(), opened.clone());
            tasks.push(tokio::spawn(async move {
                // Bounded: at most 1,000 reopenings per slot.
                for _ in 0..1000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut s) = connect_from(&ip, to).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(first).await;
                    let mut b = [0u8; 64];
                    // Held until kinlink closes it or the phase ends.
                    loop {
                        match tokio::time::timeout(Duration::from_millis(200), tokio::io::AsyncReadExt::read(&mut s, &mut b)).await {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(_)) => {}
                            Err(_) if stop.load(Ordering::Relaxed) => return,
                            Err(_) => {}
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn binding_like(m: u16, tid: [u8; 12]) -> Builder {
    let mut b = Builder::new(m, Class::Request, tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    b
}

/// Floods from its own OS thread (a blocking socket), so the flood never starves the
/// probes' runtime: what is measured is kinlink, not this process.
fn allocate_flood(turn: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let s = std::net::UdpSocket::bind("127.0.3.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // One 401 to learn a nonce, so half the flood is forged *authenticated* requests.
    s.send_to(&binding_like(method::ALLOCATE, [9; 12]).finish_with_fingerprint(), turn).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    let nonce = Message::parse(&buf[..n]).unwrap().get(attr::NONCE).unwrap().to_vec();
    s.set_nonblocking(true).unwrap();
    let mut i: u64 = 0;
    // Bounded by the phase and by 50 M packets.
    while !stop.load(Ordering::Relaxed) && i < 50_000_000 {
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&i.to_be_bytes());
        let mut b = binding_like(method::ALLOCATE, tid);
        if i % 2 == 1 {
            b.attr(attr::USERNAME, b"9999999999:fam:dev").attr(attr::REALM, b"kinlink").attr(attr::NONCE, &nonce).integrity(&[7u8; 16]);
        }
        if s.send_to(&b.finish_with_fingerprint(), turn).is_ok() {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        // Drain what comes back, so the flooder's own buffer never blocks it.
        while s.recv_from(&mut buf).is_ok() {}
        i += 1;
    }
}

/// Time to connect a WebSocket and be `registered`.
async fn register_once(http: SocketAddr, n: u64) -> Option<Duration> {
    let started = Instant::now();
    let dev = format!("probe-{n}");
    let token = kinlink::auth::mint_token(&Secret::new(TOKEN_SECRET), "legit", "u", &dev, 600, kinlink::auth::unix_now());
    let work = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/signal?token={token}")).await.ok()?;
        let reg = serde_json::json!({"type": "register", "familyId": "legit", "userId": "u", "deviceId": dev});
        ws.send(tokio_tungstenite::tungstenite::Message::text(reg.to_string())).await.ok()?;
        while let Some(Ok(m)) = ws.next().await {
            if m.to_text().is_ok_and(|t| t.contains("\"registered\"")) {
                let elapsed = started.elapsed();
                let _ = ws.close(None).await;
                return Some(elapsed);
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(5), work).await.ok().flatten()
}

/// Sends a request and waits for the answer, retransmitting as STUN clients do (RFC 8489
/// §6.2.1: 250 ms, doubling, five sends).
async fn transact(s: &UdpSocket, to: SocketAddr, req: &[u8], buf: &mut [u8]) -> Option<usize> {
    let mut rto = Duration::from_millis(250);
    for _ in 0..5 {
        s.send_to(req, to).await.ok()?;
        if let Ok(Ok((n, _))) = tokio::time::timeout(rto, s.recv_from(buf)).await {
            return Some(n);
        }
        rto *= 2;
    }
    None
}

/// Time for an Allocate with the 401 challenge; the allocation is deleted after.
async fn allocate_once(turn: SocketAddr, n: u64) -> Option<Duration> {
    let s = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    let cred = kinlink::auth::turn_credential(&Secret::new(TURN_SECRET), "legit", &format!("probe-{}", n % 8), 600, kinlink::auth::unix_now());
    let key = long_term_key(&cred.username, "kinlink", &cred.credential, false);
    let mut buf = [0u8; 1500];
    let started = Instant::now();
    let work = async {
        let tid = |k: u8| [k; 12];
        let len = transact(&s, turn, &binding_like(method::ALLOCATE, tid(1)).finish_with_fingerprint(), &mut buf).await?;
        let nonce = Message::parse(&buf[..len]).ok()?.get(attr::NONCE)?.to_vec();
        let mut b = binding_like(method::ALLOCATE, tid(2));
        b.attr(attr::USERNAME, cred.username.as_bytes()).attr(attr::REALM, b"kinlink").attr(attr::NONCE, &nonce).integrity(&key);
        let len = transact(&s, turn, &b.finish_with_fingerprint(), &mut buf).await?;
        let ok = Message::parse(&buf[..len]).ok()?.class == Class::Success;
        let elapsed = started.elapsed();
        let mut del = Builder::new(method::REFRESH, Class::Request, tid(3));
        del.u32_attr(attr::LIFETIME, 0).attr(attr::USERNAME, cred.username.as_bytes()).attr(attr::REALM, b"kinlink");
        del.attr(attr::NONCE, &nonce).integrity(&key);
        s.send_to(&del.finish_with_fingerprint(), turn).await.ok()?;
        let _ = s.recv_from(&mut buf).await;
        ok.then_some(elapsed)
    };
    tokio::time::timeout(Duration::from_secs(5), work).await.ok().flatten()
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

async fn phase(name: &str, server: &Server, seconds: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let attack = {
        let (stop, counter) = (stop.clone(), counter.clone());
        let (http, turn, turn_tcp) = (server.http, server.turn, server.turn_tcp);
        match name {
            "slowloris" => {
                let ips = (1..=40).map(|i| format!("127.0.1.{i}")).collect();
                Some(tokio::spawn(hold(ips, 50, http, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", stop, counter)))
            }
            "idle-turn-streams" => {
                let ips = (1..=10).map(|i| format!("127.0.2.{i}")).collect();
                Some(tokio::spawn(hold(ips, 200, turn_tcp, b"", stop, counter)))
            }
            "allocate-flood" => Some(tokio::task::spawn_blocking(move || allocate_flood(turn, stop, counter))),
            _ => None,
        }
    };
    let pid = server.child.id();
    // Let the attack build up before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let (mut reg, mut alloc, mut reg_fail, mut alloc_fail, mut rss_max, mut n) = (Vec::new(), Vec::new(), 0, 0, 0u64, 0u64);
    while t0.elapsed() < Duration::from_secs(seconds) {
        n += 1;
        match register_once(server.http, n).await {
            Some(d) => reg.push(d),
            None => reg_fail += 1,
        }
        match allocate_once(server.turn, n).await {
            Some(d) => alloc.push(d),
            None => alloc_fail += 1,
        }
        rss_max = rss_max.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(a) = attack {
        let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
    }
    println!(
        "RESULT phase={name} register_p50_ms={:.2} register_p99_ms={:.2} register_failed={reg_fail} allocate_p50_ms={:.2} allocate_p99_ms={:.2} allocate_failed={alloc_fail} probes={n} attack_units={} rss_max_mb={:.1} cpu_cores={:.3}",
        pct(&mut reg, 0.5),
        pct(&mut reg, 0.99),
        pct(&mut alloc, 0.5),
        pct(&mut alloc, 0.99),
        counter.load(Ordering::Relaxed),
        rss_max as f64 / 1e6,
        cpu,
    );
    // Let kinlink settle (deadlines cut what the attack left) before the next phase.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::main]
async fn main() {
    let mut seconds = 10;
    let mut bin = "target/release/kinlink".to_string();
    let mut phases: Vec<String> = ["baseline", "slowloris", "idle-turn-streams", "allocate-flood"].map(String::from).to_vec();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--seconds" => seconds = v.parse::<u64>().unwrap().min(120),
            "--bin" => bin = v,
            "--phases" => phases = v.split(',').map(String::from).collect(),
            other => panic!("unknown flag {other}"),
        }
    }
    let server = start(&bin);
    println!("kinlink pid {} http {} turn {}", server.child.id(), server.http, server.turn);
    for name in &phases {
        phase(name, &server, seconds).await;
    }
}
