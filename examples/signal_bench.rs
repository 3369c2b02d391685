//! Signaling benchmark: starts a release `kinlink` binary, opens N registered devices in
//! families of 4 from several 127.x.y.z source addresses, then measures
//! - connections held and server RSS per idle connection (from /proc),
//! - registration rate,
//! - offer relay latency (client send to target receive) at a fixed message rate,
//!   with the server's own `kinlink_signal_relay_latency_seconds` alongside.
//!
//! Traffic goes to loopback only; every loop is bounded in count and time.
//!
//! `--server node` runs the same load against the seed app's planned Node `ws` server
//! (bench/peer/seed-signaling.mjs), the peer BENCHMARKS.md compares with.
//!
//! `--nodes N` (N > 1) starts a `redis-server` and N kinlink nodes sharing it
//! (`cluster.redis_url`); device i connects to node i mod N, so most of a family's pairs are
//! cross-node. It then also reports CPU per message per node and in Redis, and Redis memory
//! per online device.
//!
//! ```text
//! cargo build --release && cargo run --release --example signal_bench -- --devices 19900 --rate 10000 --seconds 10
//! bench/signal.sh   # both servers, three rounds each, side by side
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const SECRET: &str = "bench-token-secret-0123456789abcdef";
const PER_SOURCE_IP: usize = 10_000;

struct Args {
    devices: usize,
    rate: u64,
    seconds: u64,
    concurrency: usize,
    bin: String,
    server: String,
    nodes: usize,
}

fn args() -> Args {
    let mut a = Args { devices: 2000, rate: 10_000, seconds: 10, concurrency: 256, bin: "target/release/kinlink".into(), server: "kinlink".into(), nodes: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--devices" => a.devices = v.parse().unwrap(),
            "--rate" => a.rate = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--bin" => a.bin = v,
            "--server" => a.server = v,
            "--nodes" => a.nodes = v.parse().unwrap(),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.devices >= 4 && a.devices.is_multiple_of(4), "--devices must be a multiple of 4");
    assert!(a.seconds <= 300, "--seconds is bounded to 300");
    a
}

struct Server {
    child: Child,
    http: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &str, devices: usize, cluster: Option<(u16, usize)>) -> Server {
    let data = std::env::temp_dir().join(format!("kinlink-bench-{}", std::process::id()));
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    if let Some((port, node)) = cluster {
        cmd.args(["--set", &format!("cluster.redis_url=redis://127.0.0.1:{port}"), "--set", &format!("cluster.node_id=bench{node}")]);
    }
    #[allow(clippy::zombie_processes)] // `Server`'s Drop kills and waits
    let mut child = cmd
        .args(["--set", "log.format=json", "--set", "log.level=warn,kinlink::server=info", "--set", "turn.enabled=false"])
        .args(["--set", &format!("signal.max_connections={}", devices + 100)])
        // Thousands of bench devices share a few 127.x source addresses: the per-IP caps
        // (hardening defaults) would measure themselves.
        .args(["--set", "http.max_connections_per_ip=1000000", "--set", "http.max_unupgraded_per_ip=1000000"])
        .args(["--set", &format!("signal.max_devices={}", devices + 100)])
        .env("KINLINK_AUTH__TOKEN_SECRET", SECRET)
        .env("KINLINK_TURN__SECRET", "bench-turn-secret-0123456789")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kinlink (build it first: cargo build --release)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("server: {line}");
            }
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("server starts");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "kinlink serving" {
            return Server {
                child,
                http: v["fields"]["http"].as_str().unwrap().parse().unwrap(),
                metrics: Some(v["fields"]["metrics"].as_str().unwrap().parse().unwrap()),
            };
        }
    }
}

fn start_node_peer() -> Server {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peer/seed-signaling.mjs");
    #[allow(clippy::zombie_processes)] // `Server`'s Drop kills and waits
    let mut child = Command::new("node")
        .arg(script)
        .env("TOKEN_SECRET", SECRET)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs (npm install in bench/peer first)");
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening ").expect("peer prints its address").parse().unwrap();
    Server { child, http: addr, metrics: None }
}

/// A `redis-server` for `--nodes`: its port and process.
fn start_redis() -> (u16, Server) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    #[allow(clippy::zombie_processes)] // `Server`'s Drop kills and waits
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_info(port, "PING").is_empty() {
        assert!(Instant::now() < deadline, "redis-server answers");
        std::thread::sleep(Duration::from_millis(50));
    }
    (port, Server { child, http: ([127, 0, 0, 1], port).into(), metrics: None })
}

/// One inline command's raw reply.
fn redis_info(port: u16, cmd: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.write_all(format!("{cmd}\r\n").as_bytes());
    let mut buf = vec![0u8; 16384];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).to_string()
}

fn redis_used_memory(port: u16) -> u64 {
    redis_info(port, "INFO memory").lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Commands Redis has run so far, by name (`INFO commandstats`; calls made by scripts count
/// under their own names too).
fn redis_commands(port: u16) -> std::collections::BTreeMap<String, u64> {
    let info = redis_info(port, "INFO commandstats");
    let calls = |l: &str| -> Option<(String, u64)> {
        let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
        Some((name.to_string(), stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?))
    };
    info.lines().filter_map(calls).filter(|(name, _)| name != "info").collect()
}

/// The commands run between two readings, divided by `per`: "total 3.00 (evalsha 1.00, …)".
fn commands_per(before: &std::collections::BTreeMap<String, u64>, after: &std::collections::BTreeMap<String, u64>, per: f64) -> String {
    let mut ran: Vec<(String, u64)> = after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, n)| *n > 0).collect();
    ran.sort_by_key(|r| std::cmp::Reverse(r.1));
    let total: u64 = ran.iter().map(|(_, n)| n).sum();
    let each: Vec<String> = ran.iter().map(|(k, n)| format!("{k} {:.2}", *n as f64 / per)).collect();
    format!("total {:.2} ({})", total as f64 / per, each.join(", "))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).unwrap().parse().unwrap()
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;

async fn connect(i: usize, server: SocketAddr) -> (Sink, futures_util::stream::SplitStream<WebSocketStream<TcpStream>>) {
    let ip = Ipv4Addr::new(127, 0, 1 + (i / PER_SOURCE_IP) as u8, 1);
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((ip, 0).into()).unwrap();
    let stream = sock.connect(server).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{server}/signal");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let fam = format!("fam{}", i / 4);
    let dev = format!("dev{i}");
    let token = kinlink::auth::mint_token(&kinlink::config::Secret::new(SECRET), &fam, "u", &dev, 3600, kinlink::auth::unix_now());
    let reg = serde_json::json!({"type":"register","familyId":fam,"userId":"u","deviceId":dev,"token":token});
    sink.send(Message::text(reg.to_string())).await.unwrap();
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"registered""#) => break,
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"error""#) => panic!("register failed: {t}"),
            Some(Ok(_)) => continue,
            other => panic!("connection {i} failed: {other:?}"),
        }
    }
    (sink, stream)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn histogram_quantile(metrics: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("kinlink_signal_relay_latency_seconds_bucket{le=\""))
        .map(|l| {
            let (le, rest) = l.split_once("\"}").unwrap();
            (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, rest.trim().parse().unwrap())
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = buckets.last().map_or(0.0, |b| b.1);
    let target = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= target {
            if le.is_infinite() {
                return prev.0;
            }
            let frac = if count > prev.1 { (target - prev.1) / (count - prev.1) } else { 0.0 };
            return prev.0 + (le - prev.0) * frac;
        }
        prev = (le, count);
    }
    f64::NAN
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::main]
async fn main() {
    let a = args();
    let redis = (a.nodes > 1).then(start_redis);
    let mut servers = Vec::new();
    for node in 0..a.nodes {
        servers.push(match a.server.as_str() {
            "kinlink" => start_server(&a.bin, a.devices, redis.as_ref().map(|(port, _)| (*port, node))),
            "node" => start_node_peer(),
            other => panic!("--server kinlink|node, not {other}"),
        });
    }
    let server = &servers[0];
    println!("server: {}{}", a.server, if a.nodes > 1 { format!(" x {} nodes sharing redis-server", a.nodes) } else { String::new() });
    let pids: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
    let pid = pids[0];
    let rss_all = |pids: &[u32]| pids.iter().map(|p| rss_kib(*p)).sum::<u64>();
    let redis_port = redis.as_ref().map(|(p, _)| *p);
    let redis_pid = redis.as_ref().map(|(_, s)| s.child.id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_all(&pids);
    let redis_mem_before = redis_port.map_or(0, redis_used_memory);
    let redis_cmds_before = redis_port.map(redis_commands);
    println!("devices={} families={} rate={}/s seconds={}", a.devices, a.devices / 4, a.rate, a.seconds);
    println!("server rss before: {rss_before} KiB");

    // Register everyone, `concurrency` at a time.
    let t0 = Instant::now();
    let epoch = Instant::now();
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity((a.rate * a.seconds) as usize)));
    let received = Arc::new(AtomicU64::new(0));
    let mut sinks: Vec<Option<Arc<tokio::sync::Mutex<Sink>>>> = (0..a.devices).map(|_| None).collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let mut joins = Vec::with_capacity(a.devices);
    let https: Vec<SocketAddr> = servers.iter().map(|s| s.http).collect();
    for i in 0..a.devices {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let http = https[i % https.len()];
        joins.push(tokio::spawn(async move {
            let r = connect(i, http).await;
            drop(permit);
            r
        }));
    }
    for (i, j) in joins.into_iter().enumerate() {
        let (sink, mut stream) = j.await.unwrap();
        sinks[i] = Some(Arc::new(tokio::sync::Mutex::new(sink)));
        let lat = latencies.clone();
        let received = received.clone();
        // Reader: records the latency carried in relayed offers; answers pings implicitly.
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg {
                    if let Some(pos) = t.find(r#""sdp":"t"#) {
                        let rest = &t[pos + 8..];
                        let end = rest.find('"').unwrap();
                        let sent: u64 = rest[..end].parse().unwrap();
                        let now = epoch.elapsed().as_micros() as u64;
                        lat.lock().unwrap().push(now.saturating_sub(sent));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let reg_secs = t0.elapsed().as_secs_f64();
    println!("registered {} devices in {:.2} s: {:.0} registrations/s", a.devices, reg_secs, a.devices as f64 / reg_secs);
    // Let allocator and kernel settle, then read RSS with everyone idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_all(&pids);
    let _ = pid;
    if let Some(port) = redis_port {
        let used = redis_used_memory(port);
        println!(
            "redis used_memory: {} -> {} bytes; per online device: {:.0} bytes",
            redis_mem_before,
            used,
            used.saturating_sub(redis_mem_before) as f64 / a.devices as f64
        );
    }
    let redis_cmds_registered = redis_port.map(redis_commands);
    if let (Some(before), Some(after)) = (&redis_cmds_before, &redis_cmds_registered) {
        println!("redis commands per registration (and 2 s of heartbeats): {}", commands_per(before, after, a.devices as f64));
    }
    if let Some(m) = server.metrics {
        let held = kinlink_metric(&scrape(m).await, "kinlink_signal_connections");
        println!("connections held (server's gauge): {held}");
    }
    println!(
        "server rss after (all nodes): {rss_after} KiB; per idle connection: {:.2} KiB",
        (rss_after - rss_before) as f64 / a.devices as f64
    );

    // Relay: `rate` offers per second spread over all devices, each to the next device of its family.
    latencies.lock().unwrap().clear();
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let redis_cpu0 = redis_pid.map_or(0.0, cpu_secs);
    let total = a.rate * a.seconds;
    let tick = Duration::from_millis(1);
    let mut sent = 0u64;
    let mut next = 0usize;
    let start = Instant::now();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = start + Duration::from_secs(a.seconds + 5);
    while sent < total && Instant::now() < deadline {
        interval.tick().await;
        let due = ((start.elapsed().as_secs_f64() * a.rate as f64) as u64).min(total);
        while sent < due {
            let i = next % a.devices;
            next += 1;
            let to = (i / 4) * 4 + (i + 1) % 4;
            let now = epoch.elapsed().as_micros() as u64;
            let frame = format!(r#"{{"type":"offer","toDeviceId":"dev{to}","sdp":"t{now}"}}"#);
            let sink = sinks[i].as_ref().unwrap().clone();
            // Each device sends rarely; a spawned send keeps the pacing loop from stalling.
            tokio::spawn(async move {
                let _ = sink.lock().await.send(Message::text(frame)).await;
            });
            sent += 1;
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    let wait_until = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let per_node: Vec<f64> = pids.iter().zip(&cpu0).map(|(p, c)| cpu_secs(*p) - c).collect();
    let cpu: f64 = per_node.iter().sum();
    let redis_cpu = redis_pid.map_or(0.0, cpu_secs) - redis_cpu0;
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_unstable();
    println!(
        "relayed {} of {} offers in {:.2} s ({:.0}/s); lost {}",
        lat.len(),
        sent,
        send_secs,
        sent as f64 / send_secs,
        sent - lat.len() as u64
    );
    println!(
        "client-observed latency: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    if let Some(m) = server.metrics {
        let metrics = scrape(m).await;
        println!(
            "server relay latency (accept to write): p50 {:.3} ms, p99 {:.3} ms",
            histogram_quantile(&metrics, 0.50) * 1000.0,
            histogram_quantile(&metrics, 0.99) * 1000.0
        );
    }
    println!("server cpu during relay: {:.2} s ({:.1} us per message)", cpu, cpu * 1e6 / sent as f64);
    if a.nodes > 1 {
        let shown: Vec<String> = per_node.iter().map(|c| format!("{c:.2}")).collect();
        println!("cpu per node: {} s; redis-server: {:.2} s ({:.1} us per message)", shown.join(" / "), redis_cpu, redis_cpu * 1e6 / sent as f64);
    }
    if let (Some(port), Some(before)) = (redis_port, &redis_cmds_registered) {
        let after = redis_commands(port);
        println!("redis commands per message (and the heartbeats meanwhile): {}", commands_per(before, &after, sent as f64));
        // Idle: what the nodes cost Redis with every device online and nothing relayed.
        let idle = Duration::from_secs(10);
        tokio::time::sleep(idle).await;
        let quiet = redis_commands(port);
        println!("redis commands per node per second, idle: {}", commands_per(&after, &quiet, a.nodes as f64 * idle.as_secs_f64()));
    }
    drop(servers);
    drop(redis);
}

fn kinlink_metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).map_or(f64::NAN, |v| v.trim().parse().unwrap())
}
