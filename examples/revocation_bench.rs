//! Revocation and registration figures, against the release binary on 127.0.0.1:
//!
//! - `propagation [--count N]`: a real redis-server and three kinlink nodes (A, B, C). Devices
//!   register on B and C, 50 at a time; each is revoked in turn through A's admin API, and the
//!   time from the call to the device's close frame (4410) is recorded. Prints p50/p99/max of
//!   that and of the API call itself, over N revocations (default 1,000).
//! - `registrations [--seconds S] [--in-flight K]`: one node per token algorithm (HS256 with
//!   `auth.token_secret`; ES256 and EdDSA with `auth.public_keys`), K workers (default 256)
//!   each connecting, registering with a fresh token and closing, for S seconds (default 10)
//!   per algorithm, from 32 loopback source addresses (under the per-IP caps). Prints
//!   registrations/s and the p50/p99 of connect-to-`registered`.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/revocation_bench propagation
//! target/release/examples/revocation_bench registrations
//! ```
//! Every loop is bounded in count and time.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::Algorithm;
use kinlink::auth::{jwks, Minted};
use kinlink::config::Secret;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const TOKEN_SECRET: &str = "bench-revocation-token-secret-0123456789";
const ADMIN_TOKEN: &str = "bench-revocation-admin-token-0123456789";

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

struct Node {
    child: Child,
    http: SocketAddr,
    admin: Option<SocketAddr>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary: `--bin PATH`, or the release build. (Not a KINLINK_ variable: kinlink reads
/// those as configuration.)
fn bin() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == "--bin").and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| "target/release/kinlink".into())
}

fn start(name: &str, extra: &[String]) -> Node {
    let data = std::env::temp_dir().join(format!("kinlink-revocation-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    #[allow(clippy::zombie_processes)] // waited for by Node's Drop
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(["--set", "log.format=json", "--set", "log.level=warn,kinlink::server=info", "--set", "turn.enabled=false"])
        .args(["--set", "admin.listen=127.0.0.1:0", "--set", &format!("admin.token={ADMIN_TOKEN}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kinlink binary (cargo build --release, or --bin PATH)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(15)).unwrap_or_else(|e| panic!("kinlink did not start ({e}): {seen:#?}"));
        seen.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "kinlink serving" {
            let http = v["fields"]["http"].as_str().unwrap().parse().unwrap();
            let admin = v["fields"]["admin"].as_str().and_then(|a| a.parse().ok());
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return Node { child, http, admin };
        }
    }
}

async fn connect(from: &str, to: SocketAddr) -> Option<Ws> {
    let s = TcpSocket::new_v4().ok()?;
    s.bind(format!("{from}:0").parse().ok()?).ok()?;
    let tcp = s.connect(to).await.ok()?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{to}/signal"), tcp).await.ok()?;
    Some(ws)
}

/// Connects from `from`, registers, and returns the socket once `registered` arrives.
async fn register(from: &str, to: SocketAddr, family: &str, device: &str, token: &str) -> Option<Ws> {
    let mut ws = connect(from, to).await?;
    let msg = serde_json::json!({"type":"register","familyId":family,"userId":"u","deviceId":device,"token":token});
    ws.send(Message::text(msg.to_string())).await.ok()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) if t.contains("\"registered\"") => return Some(ws),
            Ok(Message::Text(_)) | Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!("{name}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms", v.len(), percentile(&v, 0.5), percentile(&v, 0.99), v.last().copied().unwrap_or(f64::NAN));
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn propagation(count: usize) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    #[allow(clippy::zombie_processes)] // waited for by Redis's Drop
    let _redis = Redis(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let cluster = |id: &str| {
        vec![
            "--set".to_string(),
            format!("cluster.redis_url=redis://127.0.0.1:{port}"),
            "--set".into(),
            format!("cluster.node_id={id}"),
            "--set".into(),
            format!("auth.token_secret={TOKEN_SECRET}"),
        ]
    };
    let nodes = [start("a", &cluster("a")), start("b", &cluster("b")), start("c", &cluster("c"))];
    let admin = format!("http://{}", nodes[0].admin.unwrap());
    let now = kinlink::auth::unix_now();
    let secret = Secret::new(TOKEN_SECRET);
    let (mut to_close, mut api) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let batch = 50;
    for b in 0..count.div_ceil(batch) {
        let mut devices = Vec::new();
        for k in 0..batch.min(count - b * batch) {
            let (family, device) = (format!("fam-{b}-{}", k / 25), format!("dev-{k}"));
            let token = kinlink::auth::mint_token(&secret, &family, "u", &device, 3600, now);
            let node = &nodes[1 + k % 2];
            let ws = register("127.0.0.1", node.http, &family, &device, &token).await.expect("register");
            devices.push((family, device, ws));
        }
        for (family, device, mut ws) in devices {
            let t0 = Instant::now();
            let (status, _) = kinlink::admin::client::request(&admin, ADMIN_TOKEN, "POST", &format!("/v1/families/{family}/devices/{device}/revoke")).await.expect("admin");
            assert_eq!(status, 200);
            api.push(t0.elapsed().as_secs_f64() * 1e3);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::time::timeout_at(deadline, ws.next()).await {
                    Ok(Some(Ok(Message::Close(Some(f))))) => {
                        assert_eq!(u16::from(f.code), 4410);
                        to_close.push(t0.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("no close within 5 s: {other:?}"),
                }
            }
        }
    }
    println!("# propagation: {count} revocations through node A of devices on B and C, 3 nodes, one redis-server, {:.1} s", started.elapsed().as_secs_f64());
    summary("API call to the device's close (4410)", to_close);
    summary("API call", api);
}

async fn registrations(seconds: u64, in_flight: usize) {
    let es = Arc::new(jwks::signing_key(jwks::generate(Algorithm::ES256).unwrap().as_bytes(), Some("es".into())).unwrap());
    let ed = Arc::new(jwks::signing_key(jwks::generate(Algorithm::EdDSA).unwrap().as_bytes(), Some("ed".into())).unwrap());
    let dir = std::env::temp_dir().join(format!("kinlink-revocation-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks_file = dir.join("jwks.json");
    std::fs::write(&jwks_file, serde_json::json!({ "keys": [es.public_jwk.clone(), ed.public_jwk.clone()] }).to_string()).unwrap();
    let secret = Secret::new(TOKEN_SECRET);
    println!("# registrations: {in_flight} in flight from 32 loopback addresses, {seconds} s per algorithm; connect + register + close each");
    for alg in ["HS256", "ES256", "EdDSA"] {
        let mut extra = vec!["--set".to_string(), format!("auth.token_secret={TOKEN_SECRET}"), "--set".into(), "signal.max_devices_per_family=1000".into()];
        if alg != "HS256" {
            extra.extend(["--set".to_string(), format!("auth.public_keys={}", jwks_file.display())]);
        }
        let node = start(&alg.to_lowercase(), &extra);
        let stop = Arc::new(AtomicBool::new(false));
        let times = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..in_flight {
            let (stop, times, failures, secret, es, ed) = (stop.clone(), times.clone(), failures.clone(), secret.clone(), es.clone(), ed.clone());
            let to = node.http;
            tasks.push(tokio::spawn(async move {
                let from = format!("127.0.9.{}", 1 + w % 32);
                // Bounded: at most 100,000 registrations per worker.
                for i in 0..100_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let (family, device) = (format!("fam-{}", w % 64), format!("w{w}-{i}"));
                    let now = kinlink::auth::unix_now();
                    let m = Minted { fam: &family, user: "u", dev: &device, ttl_secs: 3600, now_unix: now, cnf_jwk: None };
                    let token = match alg {
                        "HS256" => m.hs256(&secret),
                        "ES256" => m.with_key(&es).unwrap(),
                        _ => m.with_key(&ed).unwrap(),
                    };
                    let t0 = Instant::now();
                    match register(&from, to, &family, &device, &token).await {
                        Some(mut ws) => {
                            times.lock().unwrap().push(t0.elapsed().as_secs_f64() * 1e3);
                            let _ = ws.close(None).await;
                        }
                        None => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
        let v = std::mem::take(&mut *times.lock().unwrap());
        let n = v.len();
        println!("{alg}: {:.0} registrations/s ({n} in {elapsed:.1} s, {} failed)", n as f64 / elapsed, failures.load(Ordering::Relaxed));
        summary(&format!("{alg} connect to registered"), v);
        drop(node);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("propagation") => propagation(flag("--count", 1000) as usize).await,
        Some("registrations") => registrations(flag("--seconds", 10), flag("--in-flight", 256) as usize).await,
        _ => eprintln!("usage: revocation_bench propagation [--count N] | registrations [--seconds S] [--in-flight K]"),
    }
}
