//! Several kinlink nodes sharing presence and routing through a real `redis-server` (Debian
//! package, installed by scripts/test), started on a free loopback port per test.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::{redis_cmd, Redis};
use common::*;
use kinlink::config::Secret;
use serde_json::json;

/// Where a test's nodes meet: one `redis-server`, or a Redis Cluster of three masters. The
/// core suite runs against both (the `on_redis` and `on_redis_cluster` modules below).
enum Backend {
    Single(Redis),
    Cluster(RedisCluster),
}

impl Backend {
    fn single() -> Backend {
        Backend::Single(Redis::start())
    }

    fn cluster() -> Backend {
        Backend::Cluster(RedisCluster::start())
    }

    fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
        }
    }

    /// One command on every server (a key lives on one master of a cluster): the replies.
    fn cmd(&self, cmd: &str) -> String {
        match self {
            Backend::Single(r) => redis_cmd(r.port, cmd).unwrap_or_default(),
            Backend::Cluster(c) => c.nodes.iter().map(|n| redis_cmd(n.port, cmd).unwrap_or_default()).collect(),
        }
    }

    /// Stops every server and starts it again, empty, on the same ports.
    fn restart_empty(&mut self) {
        match self {
            Backend::Single(r) => {
                r.kill();
                *r = Redis::start_on(r.port);
            }
            Backend::Cluster(c) => c.restart_empty(),
        }
    }

    /// Stops every server.
    fn stop(&mut self) {
        let servers = match self {
            Backend::Single(r) => std::slice::from_mut(r),
            Backend::Cluster(c) => &mut c.nodes[..],
        };
        for r in servers {
            r.kill();
        }
    }
}

/// Runs each core test against one redis-server and against a Redis Cluster.
macro_rules! core_suite {
    ($($test:ident),* $(,)?) => {
        mod on_redis {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::single()).await
            })*
        }
        mod on_redis_cluster {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::cluster()).await
            })*
        }
    };
}

core_suite!(
    devices_on_different_nodes_see_each_other_and_relay_every_message_type,
    the_family_limit_holds_across_nodes_when_devices_join_at_once,
    a_device_reconnecting_on_another_node_replaces_its_old_connection_without_going_offline,
    a_node_that_dies_has_its_devices_reported_offline_within_the_ttl_and_leaves_nothing,
    without_redis_each_node_serves_its_own_devices_and_all_converge_when_it_returns,
    negotiation_outcomes_are_counted_once_when_the_report_arrives_at_another_node,
    a_rolling_restart_keeps_a_family_online_without_a_flap,
    the_helm_test_passes_through_one_service_spreading_connections_over_three_nodes,
);

async fn node(redis: &Backend, id: &str, per_family: usize) -> TestServer {
    node_at(redis.url(), id, per_family).await
}

async fn node_at(url: String, id: &str, per_family: usize) -> TestServer {
    let id = id.to_string();
    TestServer::with(move |c| {
        c.cluster.redis_url = Some(Secret::new(url));
        c.cluster.node_id = id;
        c.cluster.presence_ttl_secs = 3;
        c.signal.max_devices_per_family = per_family;
        c.turn.enabled = false;
    })
    .await
}

/// The next message that is not a presence notice about `other` devices.
async fn recv_type(c: &mut Client, kind: &str) -> serde_json::Value {
    loop {
        let v = c.recv().await;
        if v["type"] == kind {
            return v;
        }
    }
}

async fn devices_on_different_nodes_see_each_other_and_relay_every_message_type(redis: Backend) {
    let (n1, n2, n3) = (node(&redis, "n1", 8).await, node(&redis, "n2", 8).await, node(&redis, "n3", 8).await);
    let (mut a, reg_a) = Client::register(&n1, "fam", "u1", "a").await;
    assert_eq!(reg_a["devices"], json!([]));
    let (mut b, reg_b) = Client::register(&n2, "fam", "u2", "b").await;
    assert_eq!(reg_b["devices"], json!([{"deviceId":"a","userId":"u1"}]), "a on n1 is listed on n2");
    let online = a.recv().await;
    assert_eq!((online["type"].as_str(), online["deviceId"].as_str(), online["userId"].as_str()), (Some("device-online"), Some("b"), Some("u2")));
    // Another family on the third node sees nothing and reaches nobody.
    let (mut x, reg_x) = Client::register(&n3, "evil", "u3", "x").await;
    assert_eq!(reg_x["devices"], json!([]));
    x.send(json!({"type":"offer","toDeviceId":"a","sdp":{"type":"offer","sdp":"v=0"}})).await;
    x.expect_error("peer-offline").await;

    a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0 a"}})).await;
    let got = b.recv().await;
    assert_eq!((got["type"].as_str(), got["fromDeviceId"].as_str()), (Some("offer"), Some("a")), "{got}");
    assert_eq!(got["sdp"]["sdp"], "v=0 a");
    b.send(json!({"type":"answer","toDeviceId":"a","sdp":{"type":"answer","sdp":"v=0 b"}})).await;
    assert_eq!(recv_type(&mut a, "answer").await["sdp"]["sdp"], "v=0 b");
    for i in 0..20 {
        a.send(json!({"type":"ice-candidate","toDeviceId":"b","candidate":{"candidate":format!("candidate:{i}"),"sdpMid":"0","sdpMLineIndex":0}})).await;
    }
    for i in 0..20 {
        let c = recv_type(&mut b, "ice-candidate").await;
        assert_eq!(c["candidate"]["candidate"], format!("candidate:{i}"), "in order");
    }
    x.expect_silence(Duration::from_millis(300)).await;

    // b leaves: a (on the other node) sees it offline, and an offer to b is refused.
    b.ws.close(None).await.unwrap();
    let off = recv_type(&mut a, "device-offline").await;
    assert_eq!(off["deviceId"], "b");
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"}})).await;
    a.expect_error("peer-offline").await;
    assert!(redis.cmd("HLEN kl:{fam}:dev").contains(":1\r\n"), "a is still registered");
    drop((n3, x));
}

async fn the_family_limit_holds_across_nodes_when_devices_join_at_once(redis: Backend) {
    let nodes = [node(&redis, "r1", 2).await, node(&redis, "r2", 2).await, node(&redis, "r3", 2).await];
    for round in 0..5 {
        let family = format!("race{round}");
        let joins = nodes.iter().enumerate().map(|(i, n)| {
            let (url, family) = (n.ws_url(), family.clone());
            async move {
                let mut c = Client::connect(&url).await;
                let d = format!("d{i}");
                c.send(json!({"type":"register","familyId":family,"userId":"u","deviceId":d,"token":token(&family,"u",&d)})).await;
                let v = c.recv().await;
                (c, v["type"] == "registered", v)
            }
        });
        let results = futures_util::future::join_all(joins).await;
        let joined = results.iter().filter(|(_, ok, _)| *ok).count();
        assert_eq!(joined, 2, "round {round}: exactly the limit joins: {:?}", results.iter().map(|r| &r.2).collect::<Vec<_>>());
        let refused = results.iter().find(|(_, ok, _)| !ok).unwrap();
        assert_eq!(refused.2["code"], "family-full");
    }
}

async fn a_device_reconnecting_on_another_node_replaces_its_old_connection_without_going_offline(redis: Backend) {
    let (n1, n2, n3) = (node(&redis, "p1", 8).await, node(&redis, "p2", 8).await, node(&redis, "p3", 8).await);
    let (mut watcher, _) = Client::register(&n3, "fam", "u", "watcher").await;
    let (mut old, _) = Client::register(&n1, "fam", "u", "phone").await;
    assert_eq!(recv_type(&mut watcher, "device-online").await["deviceId"], "phone");
    let (mut new, reg) = Client::register(&n2, "fam", "u", "phone").await;
    assert_eq!(reg["devices"], json!([{"deviceId":"watcher","userId":"u"}]));
    assert_eq!(old.expect_close().await, 4409, "replaced (the documented close code)");
    // For the watcher nothing happened: the device stayed online (no offline, no new online).
    watcher.expect_silence(Duration::from_millis(500)).await;
    // And reaches it on the new node.
    watcher.send(json!({"type":"offer","toDeviceId":"phone","sdp":{"type":"offer","sdp":"v=0"}})).await;
    assert_eq!(recv_type(&mut new, "offer").await["fromDeviceId"], "watcher");
}

async fn a_node_that_dies_has_its_devices_reported_offline_within_the_ttl_and_leaves_nothing(redis: Backend) {
    let n1 = node(&redis, "k1", 8).await;
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    // The second node is a separate process, killed with SIGKILL: no goodbye to Redis.
    let data = temp_dir("cluster-kill");
    #[allow(clippy::zombie_processes)] // killed and waited for below
    let mut child = Command::new(env!("CARGO_BIN_EXE_kinlink"))
        .args(["--data-dir", data.to_str().unwrap(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--set", &format!("cluster.redis_url={}", redis.url()), "--set", "cluster.node_id=k2", "--set", "cluster.presence_ttl_secs=3"])
        .args(["--set", "turn.enabled=false", "--set", &format!("auth.token_secret={TOKEN_SECRET}"), "--set", "log.format=json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = serving_addr(&mut child);
    let mut b = Client::connect(&format!("ws://{http}/signal")).await;
    b.send(json!({"type":"register","familyId":"fam","userId":"u","deviceId":"b","token":token("fam","u","b")})).await;
    assert_eq!(b.recv().await["type"], "registered");
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");
    child.kill().unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    let off = tokio::time::timeout(Duration::from_secs(10), recv_type(&mut a, "device-offline")).await.expect("offline within the TTL");
    assert_eq!(off["deviceId"], "b");
    assert!(killed.elapsed() < Duration::from_secs(3 + 2), "TTL 3 s plus one sweep period: {:?}", killed.elapsed());
    // Nothing of k2 is left: not its device, not its family set, not its heartbeat.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = redis.cmd("KEYS kl:node:{k2}*");
        let fam = redis.cmd("HKEYS kl:{fam}:dev");
        if !left.contains("k2") && !fam.contains("\r\nb\r\n") && !redis.cmd("ZRANGE kl:nodes 0 -1").contains("k2") {
            break;
        }
        assert!(Instant::now() < deadline, "k2 left {left:?} / devices {fam:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The HTTP address from the server's JSON "kinlink serving" line (stderr; drained after).
fn serving_addr(child: &mut Child) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("the node logs that it is serving");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "kinlink serving" {
            return v["fields"]["http"].as_str().unwrap().to_string();
        }
    }
}

async fn without_redis_each_node_serves_its_own_devices_and_all_converge_when_it_returns(mut redis: Backend) {
    let (n1, n2) = (node(&redis, "q1", 8).await, node(&redis, "q2", 8).await);
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    let (mut b, _) = Client::register(&n2, "fam", "u", "b").await;
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");

    // Redis goes away (and will come back empty).
    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"}})).await;
        // A send the node still took for delivered gets no answer: try again.
        if let Ok(v) = tokio::time::timeout(Duration::from_millis(300), a.recv()).await {
            if v["code"] == "cluster-unavailable" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the node notices Redis is gone");
    }
    assert_eq!(n1.metric("kinlink_cluster_connected").await, 0.0);
    let ready = reqwest::get(format!("http://{}/readyz", n1.http)).await.unwrap();
    assert_eq!(ready.status(), 200, "still ready: this node's devices are served");
    // A device joining n1 meanwhile sees and reaches a (same node).
    let (mut c, reg_c) = Client::register(&n1, "fam", "u", "c").await;
    assert!(reg_c["devices"].as_array().unwrap().iter().any(|d| d["deviceId"] == "a"), "{reg_c}");
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "c");
    c.send(json!({"type":"offer","toDeviceId":"a","sdp":{"type":"offer","sdp":"local"}})).await;
    assert_eq!(recv_type(&mut a, "offer").await["fromDeviceId"], "c");

    // Redis is back, empty: the nodes re-announce; b learns of c, and messages flow again.
    redis.restart_empty();
    assert_eq!(recv_type(&mut b, "device-online").await["deviceId"], "c", "b converges without a restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"again"}})).await;
        match tokio::time::timeout(Duration::from_millis(500), recv_type(&mut b, "offer")).await {
            // (a's offers from before Redis left may arrive first.)
            Ok(v) if v["fromDeviceId"] == "c" => break,
            _ => assert!(
                Instant::now() < deadline,
                "cross-node delivery resumes; subscribed: {:?} {:?}; n2: {:?}",
                redis.cmd("PUBSUB CHANNELS"),
                redis.cmd("PUBSUB SHARDCHANNELS"),
                n2.metrics_text().await.lines().filter(|l| l.starts_with("kinlink_cluster")).collect::<Vec<_>>()
            ),
        }
    }
    assert_eq!(n1.metric("kinlink_cluster_connected").await, 1.0);
}

/// The offer is relayed by the offerer's node; the answerer's `p2p-status` arrives at the
/// other node and is forwarded there: each negotiation is counted once, by one node.
async fn negotiation_outcomes_are_counted_once_when_the_report_arrives_at_another_node(redis: Backend) {
    let (n1, n2) = (node(&redis, "g1", 8).await, node(&redis, "g2", 8).await);
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    let (mut b, _) = Client::register(&n2, "fam", "u", "b").await;
    let (mut c, _) = Client::register(&n2, "fam", "u", "c").await;
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "c");
    assert_eq!(recv_type(&mut b, "device-online").await["deviceId"], "c");
    for (peer, client) in [("b", &mut b), ("c", &mut c)] {
        a.send(json!({"type":"offer","toDeviceId":peer,"sdp":{"type":"offer","sdp":"v=0"}})).await;
        assert_eq!(recv_type(client, "offer").await["fromDeviceId"], "a");
    }
    // b (on n2) reports a relayed connection first; a (on n1) reports its side after.
    b.send(json!({"type":"p2p-status","peerDeviceId":"a","state":"connected","route":"relay"})).await;
    // c gives up and syncs over HTTP; a never reports about c.
    c.send(json!({"type":"p2p-status","peerDeviceId":"a","state":"failed"})).await;
    n1.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="relay"}"#, 1.0).await;
    n1.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="http_fallback"}"#, 1.0).await;
    a.send(json!({"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"host"})).await;
    // No error came back to the reporters on n2, and nothing was counted twice or there.
    b.expect_silence(Duration::from_millis(300)).await;
    c.expect_silence(Duration::from_millis(100)).await;
    a.expect_silence(Duration::from_millis(100)).await;
    for outcome in ["direct", "relay", "http_fallback", "abandoned"] {
        let sample = format!(r#"kinlink_p2p_negotiations_total{{outcome="{outcome}"}}"#);
        let total = n1.metric(&sample).await + n2.metric(&sample).await;
        let want = if outcome == "relay" || outcome == "http_fallback" { 1.0 } else { 0.0 };
        assert_eq!(total, want, "{outcome}");
    }
    // A report about a device nowhere in the family is still refused.
    b.send(json!({"type":"p2p-status","peerDeviceId":"zz","state":"failed"})).await;
    b.expect_error("no-negotiation").await;
}

/// Every message a client has received until it has been quiet for `quiet`.
/// (A close ends it: a drained connection.)
async fn drain_msgs(c: &mut Client, quiet: Duration) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(quiet, c.ws.next()).await {
        match m {
            Message::Text(t) => out.push(serde_json::from_str(&t).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    out
}

/// A rolling restart of all three nodes, one at a time, while a family of four stays
/// connected: a drained device reconnects on another node, its family never sees it offline,
/// and every message afterwards is delivered.
async fn a_rolling_restart_keeps_a_family_online_without_a_flap(redis: Backend) {
    let mut nodes = vec![node(&redis, "m0", 8).await, node(&redis, "m1", 8).await, node(&redis, "m2", 8).await];
    let names = ["d0", "d1", "d2", "d3"];
    let mut at = [0usize, 1, 2, 0];
    let mut clients = Vec::new();
    for (d, &n) in names.iter().zip(&at) {
        clients.push(Client::register(&nodes[n], "fam", "u", d).await.0);
    }
    let mut seen = Vec::new();
    for c in clients.iter_mut() {
        seen.extend(drain_msgs(c, Duration::from_millis(300)).await);
    }
    for k in 0..3 {
        // Node k drains: its devices are told to go and reconnect on the next node.
        let mut old = nodes.remove(k);
        let stopping = old.begin_shutdown();
        let next = k % nodes.len();
        // Apps back off before reconnecting: longer than the server's close linger (2 s), so
        // the old connection is gone by then, but within the TTL (3 s).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for i in 0..4 {
            if at[i] == k {
                seen.extend(drain_msgs(&mut clients[i], Duration::from_millis(100)).await);
                clients[i] = Client::register(&nodes[next], "fam", "u", names[i]).await.0;
                at[i] = usize::MAX;
            }
        }
        let _ = stopping.await;
        drop(old);
        // Its replacement (a new pod name) takes the place of node k.
        nodes.insert(k, node(&redis, &format!("m{k}-b"), 8).await);
        for a in at.iter_mut().filter(|a| **a == usize::MAX) {
            *a = if next >= k { next + 1 } else { next };
        }
        // Past the TTL: a drained device's old record would have been announced by now.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        for c in clients.iter_mut() {
            seen.extend(drain_msgs(c, Duration::from_millis(100)).await);
        }
    }
    let offline: Vec<_> = seen.iter().filter(|v| v["type"] == "device-offline").collect();
    assert!(offline.is_empty(), "no device of the family went offline: {offline:?}");
    // Nor announced online again while it was online all along (moving between nodes).
    let online: Vec<_> = seen.iter().filter(|v| v["type"] == "device-online").map(|v| v["deviceId"].as_str().unwrap().to_string()).collect();
    let mut unique = online.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(online.len(), 6, "each device announced once to each device that joined before it: {online:?}");
    // Every pair still reaches each other.
    for i in 0..4 {
        for j in 0..4 {
            if i == j {
                continue;
            }
            clients[i].send(json!({"type":"ice-candidate","toDeviceId":names[j],"candidate":{"candidate":format!("from {i}")}})).await;
            let v = recv_type(&mut clients[j], "ice-candidate").await;
            assert_eq!(v["fromDeviceId"], names[i]);
        }
    }
}

/// A TCP load balancer over `backends`, a connection to each in turn, as a Kubernetes Service
/// spreads connections over pods.
async fn round_robin(backends: Vec<std::net::SocketAddr>) -> std::net::SocketAddr {
    proxy(backends, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true))).await
}

/// A TCP proxy over `backends`, a connection to each in turn, that refuses connections
/// (accepts and drops them) while `open` is false.
async fn proxy(backends: Vec<std::net::SocketAddr>, open: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::net::SocketAddr {
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = lb.local_addr().unwrap();
    tokio::spawn(async move {
        for next in 0.. {
            let Ok((mut inbound, _)) = lb.accept().await else { break };
            if !open.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let backend = backends[next % backends.len()];
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// What the chart's `helm test` does with three replicas: `kinlink check` through the one
/// Service, its two devices landing on different pods, each minted with the release's secret.
async fn the_helm_test_passes_through_one_service_spreading_connections_over_three_nodes(redis: Backend) {
    let nodes = [node(&redis, "h0", 8).await, node(&redis, "h1", 8).await, node(&redis, "h2", 8).await];
    let service = round_robin(nodes.iter().map(|n| n.http).collect()).await;
    helm_test_check(format!("http://{service}")).await;
    let mut registered = Vec::new();
    for n in &nodes {
        registered.push(n.metric("kinlink_signal_registrations_total").await);
    }
    assert_eq!(registered.iter().filter(|r| **r == 1.0).count(), 2, "the two check devices on two different nodes: {registered:?}");
}

/// A private CA and two leaves it signed: Redis' server certificate (for 127.0.0.1) and a
/// client certificate for the nodes; and a second CA with a client certificate of its own.
/// Returns the directory holding ca.pem, redis.{pem,key}, client.{pem,key}, ca2.pem and
/// client2.{pem,key}.
fn private_pki(name: &str) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").current_dir(&dir).args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let new_key = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"];
    openssl(&[&new_key[..], &["-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"]].concat());
    let issue = |name: &str, extension: &str| {
        let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={name}"));
        let leaf = ["-CA", "ca.pem", "-CAkey", "ca.key", "-subj", &subject, "-addext", "basicConstraints=critical,CA:FALSE"];
        openssl(&[&new_key[..], &leaf, &["-addext", extension, "-keyout", &key, "-out", &pem]].concat());
    };
    issue("redis", "subjectAltName=IP:127.0.0.1");
    issue("client", "extendedKeyUsage=clientAuth");
    // A second CA and a client certificate from it: the renewal in the rotation test.
    openssl(&[&new_key[..], &["-subj", "/CN=test CA 2", "-keyout", "ca2.key", "-out", "ca2.pem"]].concat());
    let leaf = ["-CA", "ca2.pem", "-CAkey", "ca2.key", "-subj", "/CN=client2", "-addext", "basicConstraints=critical,CA:FALSE"];
    openssl(&[&new_key[..], &leaf, &["-addext", "extendedKeyUsage=clientAuth", "-keyout", "client2.key", "-out", "client2.pem"]].concat());
    dir
}

/// A `redis-server` as one is run in production: TLS only (no plain port), client
/// certificates required (Redis' default with TLS), the default user off and an ACL user
/// `kinlink` with `password`, allowed kinlink's keys and channels only (`kl:*`) and no
/// dangerous command (docs/scaling.md's least-privilege user).
fn tls_redis(pki: &std::path::Path, password: &str) -> Redis {
    tls_redis_on(pki, password, free_port(), "ca.pem")
}

/// [`tls_redis`] on `port`, taking client certificates signed by the CA in `client_ca`.
fn tls_redis_on(pki: &std::path::Path, password: &str, port: u16, client_ca: &str) -> Redis {
    let file = |f: &str| pki.join(f).display().to_string();
    #[allow(clippy::zombie_processes)] // waited for by Redis's Drop
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", &file("redis.pem"), "--tls-key-file", &file("redis.key"), "--tls-ca-cert-file", &file(client_ca)])
        .args(["--tls-auth-clients", "yes", "--user", "default", "off"])
        .args(["--user", "kinlink", "on", &format!(">{password}"), "~kl:*", "&kl:*", "+@all", "-@dangerous"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Redis { child, port }
}

/// A node's configuration for that Redis: `rediss://` with the user and password, the
/// private CA, and (unless `client_cert` is false) the client certificate.
fn tls_cluster_config(c: &mut kinlink::config::Config, pki: &std::path::Path, url: &str, id: &str, client_cert: bool) {
    c.cluster.redis_url = Some(Secret::new(url));
    c.cluster.node_id = id.into();
    c.cluster.presence_ttl_secs = 3;
    c.cluster.redis_ca_file = Some(pki.join("ca.pem"));
    if client_cert {
        c.cluster.redis_cert_file = Some(pki.join("client.pem"));
        c.cluster.redis_key_file = Some(pki.join("client.key"));
    }
    c.turn.enabled = false;
}

/// Two nodes on `url` with the TLS files of `pki`: device a on the first and b on the second
/// see each other, and a's offer reaches b. The nodes and the two devices.
async fn two_tls_nodes_meet(pki: &std::path::Path, url: &str, ids: [&'static str; 2]) -> ([TestServer; 2], Client, Client) {
    let n1 = TestServer::with(|c| tls_cluster_config(c, pki, url, ids[0], true)).await;
    let n2 = TestServer::with(|c| tls_cluster_config(c, pki, url, ids[1], true)).await;
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    let (mut b, reg) = Client::register(&n2, "fam", "u", "b").await;
    assert_eq!(reg["devices"], json!([{"deviceId":"a","userId":"u"}]), "a on {} is listed on {}", ids[0], ids[1]);
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0 a"}})).await;
    assert_eq!(recv_type(&mut b, "offer").await["sdp"]["sdp"], "v=0 a");
    ([n1, n2], a, b)
}

/// Managed and self-hosted Redis alike are reached over TLS with a password: nodes meet
/// through `rediss://user:password@…` with a private CA and a client certificate, and each way
/// of getting it wrong stops the node at start with an error that says which, never the
/// password.
#[tokio::test]
async fn nodes_meet_through_a_redis_with_tls_a_private_ca_a_client_certificate_and_a_password() {
    const PASSWORD: &str = "s3cret-redis-pw";
    let pki = private_pki("redis-tls");
    let redis = tls_redis(&pki, PASSWORD);
    let url = format!("rediss://kinlink:{PASSWORD}@127.0.0.1:{}", redis.port);
    let ([n1, n2], _, _) = two_tls_nodes_meet(&pki, &url, ["t1", "t2"]).await;
    assert_eq!(n1.metric("kinlink_cluster_connected").await, 1.0);
    // The user may touch only kl:* keys and channels, no dangerous command: nothing kinlink
    // does, heartbeats and the dead-node search included (every second at this TTL), is refused.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for n in [&n1, &n2] {
        let text = n.metrics_text().await;
        let refused: Vec<&str> = text.lines().filter(|l| l.starts_with("kinlink_cluster_redis_errors_total") && !l.ends_with(" 0")).collect();
        assert!(refused.is_empty(), "{refused:?}");
    }

    // What goes wrong at start, and what the node says.
    let wrong_password = format!("rediss://kinlink:not-{PASSWORD}@127.0.0.1:{}", redis.port);
    let plain = url.replacen("rediss://", "redis://", 1);
    // (case, URL, trust the private CA, present the client certificate, what the error says)
    let cases = [
        ("wrong password", &wrong_password, true, true, &["cannot connect to Redis", "WRONGPASS"][..]),
        ("the CA not trusted", &url, false, true, &["UnknownIssuer", "set cluster.redis_ca_file"]),
        ("no client certificate", &url, true, false, &["set cluster.redis_cert_file"]),
        ("plain redis:// to a TLS port", &plain, false, false, &["the URL is rediss://"]),
    ];
    for (i, (case, url, ca, client_cert, says)) in cases.into_iter().enumerate() {
        let mut cfg = test_config();
        tls_cluster_config(&mut cfg, &pki, url, &format!("bad{i}"), client_cert);
        if !ca {
            cfg.cluster.redis_ca_file = None;
        }
        cfg.validate().expect("a valid configuration");
        let started = tokio::time::Instant::now();
        let err = match kinlink::Server::bind(cfg).await {
            Ok(_) => panic!("{case}: the node started"),
            Err(e) => format!("{e:#}"),
        };
        for want in says {
            assert!(err.contains(want), "{case}: says {want}: {err}");
        }
        assert!(!err.contains(PASSWORD), "{case}: the password is not in the error: {err}");
        assert!(started.elapsed() < Duration::from_secs(15), "{case}: gave up in {:?}", started.elapsed());
    }
    // The TLS files are only for rediss://.
    let mut cfg = test_config();
    tls_cluster_config(&mut cfg, &pki, &url.replacen("rediss://", "redis://", 1), "bad", true);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("cluster.redis_ca_file") && err.contains("rediss://"), "{err}");
    // A client certificate without its key.
    let mut cfg = test_config();
    tls_cluster_config(&mut cfg, &pki, &url, "bad", true);
    cfg.cluster.redis_key_file = None;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("cluster.redis_cert_file and cluster.redis_key_file go together"), "{err}");
}

/// cert-manager renews a client certificate in place (the Secret volume's files change): the
/// nodes reload it and present the new one from their next connection on, without a restart.
#[tokio::test]
async fn a_renewed_client_certificate_for_redis_is_used_from_the_next_connection_on() {
    const PASSWORD: &str = "renewal-pw";
    let pki = private_pki("redis-tls-renew");
    let port = free_port();
    let mut redis = tls_redis_on(&pki, PASSWORD, port, "ca.pem");
    let url = format!("rediss://kinlink:{PASSWORD}@127.0.0.1:{port}");
    let config = |id: &'static str| {
        let (pki, url) = (pki.clone(), url.clone());
        move |c: &mut kinlink::config::Config| {
            tls_cluster_config(c, &pki, &url, id, true);
            c.turn.tls_reload_poll_secs = 1;
        }
    };
    let nodes = [TestServer::with(config("w1")).await, TestServer::with(config("w2")).await];
    let (mut a, _) = Client::register(&nodes[0], "fam", "u", "a").await;
    let (_b, reg) = Client::register(&nodes[1], "fam", "u", "b").await;
    assert_eq!(reg["devices"], json!([{"deviceId":"a","userId":"u"}]));
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");

    // The renewal: a certificate from another CA replaces the files.
    for ext in ["pem", "key"] {
        std::fs::copy(pki.join(format!("client2.{ext}")), pki.join(format!("client.{ext}"))).unwrap();
    }
    let reloaded = r#"kinlink_turn_tls_reloads_total{listener="redis",result="ok"}"#;
    let connected = "kinlink_cluster_connected";
    let all = &nodes;
    let wait = |sample: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in all {
            while metric_value(&n.metrics_text().await, sample) != Some(1.0) {
                assert!(Instant::now() < deadline, "{sample} never 1");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait(reloaded).await;
    // Redis comes back trusting only the new CA for clients: only the renewed certificate
    // gets in, and the family converges again.
    redis.kill();
    redis = tls_redis_on(&pki, PASSWORD, port, "ca2.pem");
    wait(connected).await;
    let (mut c, _) = Client::register(&nodes[1], "fam", "u", "c").await;
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "c", "a on w1 hears of c on w2");
    a.send(json!({"type":"offer","toDeviceId":"c","sdp":{"type":"offer","sdp":"v=0"}})).await;
    assert_eq!(recv_type(&mut c, "offer").await["fromDeviceId"], "a");
    drop(redis);
}

/// Redis away for longer than the TTL, then back with its data (persisted, or a replica
/// promoted), and the nodes coming back at different times: every heartbeat has expired, but
/// a node that returns first must not sweep the others as dead before they had a TTL to
/// heartbeat again, or every device on another node flaps offline and online for its family.
#[tokio::test]
async fn nodes_returning_after_a_long_redis_outage_do_not_sweep_each_other() {
    let dir = temp_dir("redis-aof");
    let port = free_port();
    let dir_s = dir.display().to_string();
    let durable = ["--appendonly", "yes", "--appendfsync", "always", "--dir", dir_s.as_str()];
    let mut redis = Redis::start_with(port, &durable);
    // n2 reaches Redis through a gate (a proxy) the test holds closed after n1 is back.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let gated = proxy(vec![([127, 0, 0, 1], port).into()], open.clone()).await;
    // A TTL of 6 s: a heartbeat (and, before this fix, a sweep) every 2 s.
    let config = |url: String, id: &'static str| {
        move |c: &mut kinlink::config::Config| {
            c.cluster.redis_url = Some(Secret::new(url));
            c.cluster.node_id = id.into();
            c.cluster.presence_ttl_secs = 6;
            c.turn.enabled = false;
        }
    };
    let n1 = TestServer::with(config(format!("redis://127.0.0.1:{port}"), "g1")).await;
    let n2 = TestServer::with(config(format!("redis://{gated}"), "g2")).await;
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    let (mut b, _) = Client::register(&n2, "fam", "u", "b").await;
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");

    // Away for 7 s: every heartbeat expires.
    redis.kill();
    open.store(false, std::sync::atomic::Ordering::SeqCst);
    n1.wait_metric("kinlink_cluster_connected", 0.0).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let _back = Redis::start_with(port, &durable);
    let deadline = Instant::now() + Duration::from_secs(10);
    while n1.metric("kinlink_cluster_connected").await != 1.0 {
        assert!(Instant::now() < deadline, "n1 reconnects");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // n1 is back, n2 not yet: for 2.5 s, past n1's next heartbeat (every 2 s), b's record
    // must stay (n2 comes back within the TTL), where a sweep would have removed it.
    let held = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < held {
        assert!(redis_cmd(port, "HLEN kl:{fam}:dev").is_some_and(|r| r.contains(":2")), "n1 swept b's node while it was on its way back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    // Both back; past the TTL after n1's return, when its sweeps resume.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(redis_cmd(port, "HLEN kl:{fam}:dev").is_some_and(|r| r.contains(":2")), "both devices registered");
    for (who, c) in [("a", &mut a), ("b", &mut b)] {
        let seen = drain_msgs(c, Duration::from_millis(300)).await;
        let flaps: Vec<_> = seen.iter().filter(|v| v["type"] == "device-offline" || v["type"] == "device-online").collect();
        assert!(flaps.is_empty(), "{who} saw a flap: {flaps:?}");
    }
    // And they still reach each other.
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"}})).await;
    assert_eq!(recv_type(&mut b, "offer").await["fromDeviceId"], "a");
}

/// The next message of type `kind` (any, if empty) within `within` (longer than
/// [`recv_type`]'s wait).
async fn recv_type_within(c: &mut Client, kind: &str, within: Duration) -> serde_json::Value {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, c.ws.next()).await.unwrap_or_else(|_| panic!("no {kind} within {within:?}"));
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = next {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if kind.is_empty() || v["type"] == kind {
                return v;
            }
        }
    }
}

/// Redis with Sentinel, the usual high availability without Redis Cluster (Bitnami's chart,
/// most self-hosted setups): nodes find the master through the sentinel
/// (`redis-sentinel://…?sentinelServiceName=…`), and when the master dies the sentinel
/// promotes its replica; the nodes follow it and the family converges, no restart.
#[tokio::test]
async fn nodes_follow_a_sentinel_failover_to_the_promoted_replica() {
    use futures_util::StreamExt;
    let dir = temp_dir("redis-sentinel");
    // Each in the test's directory: a replica writes the snapshot it syncs from to disk.
    let dir_s = dir.display().to_string();
    let mut master = Redis::start_with(free_port(), &["--appendonly", "no", "--dir", &dir_s]);
    let replica_port = free_port();
    let master_port = master.port.to_string();
    let replica = Redis::start_with(replica_port, &["--appendonly", "no", "--dir", &dir_s, "--replicaof", "127.0.0.1", &master_port]);
    // Waits without blocking the runtime the nodes run on.
    async fn until(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    until("the replica syncs", || redis_cmd(replica.port, "INFO replication").is_some_and(|i| i.contains("master_link_status:up"))).await;
    // One sentinel (quorum 1). It declares the master down after 4 s, longer than the nodes'
    // TTL (3 s), as Sentinel's default 30 s is longer than the default 15 s.
    let sentinel_port = free_port();
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor kl 127.0.0.1 {} 1\nsentinel down-after-milliseconds kl 4000\nsentinel failover-timeout kl 5000\n",
            master.port
        ),
    )
    .unwrap();
    #[allow(clippy::zombie_processes)] // waited for by Redis's Drop
    let child = Command::new("redis-server").arg(&conf).arg("--sentinel").stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("redis-server --sentinel");
    let sentinel = Redis { child, port: sentinel_port };
    until("the sentinel knows the replica", || redis_cmd(sentinel.port, "SENTINEL REPLICAS kl").is_some_and(|r| r.contains(&replica_port.to_string()))).await;

    let url = format!("redis-sentinel://127.0.0.1:{sentinel_port}/0?sentinelServiceName=kl");
    let (n1, n2) = (node_at(url.clone(), "s1", 8).await, node_at(url, "s2", 8).await);
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    let (mut b, reg) = Client::register(&n2, "fam", "u", "b").await;
    assert_eq!(reg["devices"], json!([{"deviceId":"a","userId":"u"}]), "through the master the sentinel named");
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");

    // The master dies; the sentinel promotes the replica. The failover outlasts the TTL:
    // every node's heartbeat expires meanwhile.
    master.kill();
    until("the sentinel promotes the replica", || {
        redis_cmd(sentinel.port, "SENTINEL GET-MASTER-ADDR-BY-NAME kl").is_some_and(|r| r.contains(&replica_port.to_string()))
    })
    .await;
    // Both nodes subscribe again on the new master (a message published in the gap is lost,
    // as in any reconnect: docs/scaling.md).
    until("both nodes listen on the new master", || {
        redis_cmd(replica.port, "PUBSUB CHANNELS kl:node:*").is_some_and(|r| r.contains("{s1}") && r.contains("{s2}"))
    })
    .await;
    for n in [&n1, &n2] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while n.metric("kinlink_cluster_connected").await != 1.0 {
            assert!(Instant::now() < deadline, "both nodes reconnect");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A device joining now is heard of across nodes, and reached, through the new master.
    let (mut c, _) = Client::register(&n2, "fam", "u", "c").await;
    let mut seen_by_a = Vec::new();
    loop {
        let v = recv_type_within(&mut a, "", Duration::from_secs(20)).await;
        seen_by_a.push(v.clone());
        if v["type"] == "device-online" && v["deviceId"] == "c" {
            break;
        }
    }
    a.send(json!({"type":"offer","toDeviceId":"c","sdp":{"type":"offer","sdp":"v=0"}})).await;
    assert_eq!(recv_type_within(&mut c, "offer", Duration::from_secs(20)).await["fromDeviceId"], "a");
    // a and b, online all along, never went offline for each other: no node swept another
    // while all were cut off, and after it each waited a TTL for the others to heartbeat.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (who, ws) in [("a", &mut a.ws), ("b", &mut b.ws)] {
        let mut seen = if who == "a" { std::mem::take(&mut seen_by_a) } else { Vec::new() };
        while let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
            seen.push(serde_json::from_str::<serde_json::Value>(&t).unwrap());
        }
        let flaps: Vec<_> = seen.iter().filter(|v| v["type"] == "device-offline" || (v["type"] == "device-online" && v["deviceId"] != "c")).collect();
        assert!(flaps.is_empty(), "{who} saw a flap: {flaps:?}");
    }
    assert!(redis_cmd(replica.port, "HLEN kl:{fam}:dev").is_some_and(|r| r.contains(":3")), "the new master holds the family");
}

/// A local Redis Cluster: three masters, no replicas, slots spread by `redis-cli --cluster`.
struct RedisCluster {
    nodes: Vec<Redis>,
    /// Each master's cluster bus port (by default its port + 10,000, which may not exist).
    bus: Vec<u16>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        RedisCluster::start_with(None)
    }

    fn start_with(tls: Option<&std::path::Path>) -> RedisCluster {
        // Six distinct free ports: each probe listener is held until all are picked.
        let held: Vec<std::net::TcpListener> = (0..6).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        let (ports, bus) = (ports[..3].to_vec(), ports[3..].to_vec());
        let dir = temp_dir(&format!("redis-cluster-{}", ports[0]));
        RedisCluster { nodes: RedisCluster::create(&ports, &bus, &dir, tls), bus, dir }
    }

    /// Starts a master on each port and joins them into a cluster (empty, fresh slots). With
    /// `tls` (a [`private_pki`] directory): TLS only, clients and the cluster bus alike, client
    /// certificates required.
    fn create(ports: &[u16], bus: &[u16], dir: &std::path::Path, tls: Option<&std::path::Path>) -> Vec<Redis> {
        let tls_args = |pki: &std::path::Path, cli: bool| -> Vec<String> {
            let file = |f: &str| pki.join(f).display().to_string();
            let (cert, key, ca) = if cli { ("--cert", "--key", "--cacert") } else { ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file") };
            let mut args = vec![cert.into(), file(if cli { "client.pem" } else { "redis.pem" }), key.into(), file(if cli { "client.key" } else { "redis.key" })];
            args.extend([ca.into(), file("ca.pem")]);
            if cli {
                args.insert(0, "--tls".into());
            } else {
                // The bus's connections present the server certificate as a client's too.
                args.extend(["--tls-cluster", "yes", "--tls-auth-clients", "yes"].map(String::from));
                args.extend(["--tls-client-cert-file".into(), file("redis.pem"), "--tls-client-key-file".into(), file("redis.key")]);
            }
            args
        };
        // What a redis-cli command says (over TLS when the cluster speaks it).
        let cli = |port: u16, args: &[&str]| -> String {
            let mut cmd = Command::new("redis-cli");
            if let Some(pki) = tls {
                cmd.args(tls_args(pki, true));
            }
            let out = cmd.args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let mut nodes = Vec::new();
        for (&port, &bus) in ports.iter().zip(bus) {
            // A fresh node: no cluster state from a previous life on this port.
            let _ = std::fs::remove_file(dir.join(format!("nodes-{port}.conf")));
            #[allow(clippy::zombie_processes)] // waited for by Redis's Drop
            let mut server = Command::new("redis-server");
            match tls {
                None => server.args(["--port", &port.to_string()]),
                Some(pki) => server.args(["--port", "0", "--tls-port", &port.to_string()]).args(tls_args(pki, false)),
            };
            let child = server
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{port}.conf"), "--cluster-port", &bus.to_string()])
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cli(port, &["PING"]).starts_with("PONG") {
                assert!(Instant::now() < deadline, "redis-server on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
            nodes.push(Redis { child, port });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create: Vec<&str> = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(ports[0], &create);
        assert!(out.contains("All 16384 slots covered"), "redis-cli --cluster create: {out}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ports.iter().all(|&p| cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "the cluster converges");
            std::thread::sleep(Duration::from_millis(100));
        }
        nodes
    }

    /// Every master restarted empty on its port, the cluster created anew (data lost).
    fn restart_empty(&mut self) {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        self.nodes.clear();
        self.nodes = RedisCluster::create(&ports, &self.bus, &self.dir, None);
    }

    fn url(&self) -> String {
        format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port)
    }

    /// Moves the slot of hash tag `tag` to another master while everything runs, the way
    /// `redis-cli --cluster reshard` moves each slot: IMPORTING and MIGRATING, its keys
    /// migrated, then the new owner set on every master.
    fn move_slot_of(&self, tag: &str) {
        let cli = |port: u16, args: &[&str]| -> String {
            let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let any = self.nodes[0].port;
        let slot: u16 = cli(any, &["CLUSTER", "KEYSLOT", tag]).parse().unwrap();
        // CLUSTER NODES: `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots>...`
        let masters: Vec<(String, u16, bool)> = cli(any, &["CLUSTER", "NODES"])
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() >= 8 && f[2].contains("master"))
            .map(|f| {
                let port = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                let owns = f[8..].iter().any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
                });
                (f[0].to_string(), port, owns)
            })
            .collect();
        let from = masters.iter().position(|m| m.2).expect("an owner");
        let ((src, sport, _), (dst, dport, _)) = (&masters[from], &masters[(from + 1) % masters.len()]);
        let (s, dport_s) = (slot.to_string(), dport.to_string());
        assert_eq!(cli(*dport, &["CLUSTER", "SETSLOT", &s, "IMPORTING", src]), "OK");
        assert_eq!(cli(*sport, &["CLUSTER", "SETSLOT", &s, "MIGRATING", dst]), "OK");
        loop {
            let keys = cli(*sport, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &dport_s, "", "0", "5000", "KEYS"];
            args.extend(keys.lines());
            assert_eq!(cli(*sport, &args), "OK", "MIGRATE {keys}");
        }
        for port in [*dport, *sport].into_iter().chain(masters.iter().map(|m| m.1).filter(|p| p != dport && p != sport)) {
            assert_eq!(cli(port, &["CLUSTER", "SETSLOT", &s, "NODE", dst]), "OK");
        }
    }
}

/// Redis Cluster over TLS (`rediss-cluster://`): the nodes reach every master over TLS with the
/// private CA and their client certificate (each master's certificate names the address it
/// announces, 127.0.0.1 here), and sharded pub/sub carries presence and messages.
#[tokio::test]
async fn nodes_meet_through_a_redis_cluster_over_tls() {
    let pki = private_pki("redis-cluster-tls");
    let cluster = RedisCluster::start_with(Some(&pki));
    let url = format!("rediss-cluster://127.0.0.1:{}", cluster.nodes[0].port);
    let (_nodes, mut a, mut b) = two_tls_nodes_meet(&pki, &url, ["c1", "c2"]).await;
    b.send(json!({"type":"answer","toDeviceId":"a","sdp":{"type":"answer","sdp":"v=0 b"}})).await;
    assert_eq!(recv_type(&mut a, "answer").await["sdp"]["sdp"], "v=0 b");
    drop(b);
    assert_eq!(recv_type(&mut a, "device-offline").await["deviceId"], "b");
}

/// Resharding while nodes run. A master that hands a slot over drops the slot's shard-channel
/// subscribers without a reconnect (fred does not surface the SUNSUBSCRIBE): the nodes must
/// notice the moved slot and subscribe again, or the node whose inbox moved stops receiving
/// messages, and a family whose channel moved stops seeing presence.
#[tokio::test]
async fn slots_moved_by_resharding_keep_inboxes_and_families_heard() {
    let cluster = RedisCluster::start();
    let (n1, n2) = (node_at(cluster.url(), "r1", 8).await, node_at(cluster.url(), "r2", 8).await);
    let (mut a, _) = Client::register(&n1, "fam", "u", "a").await;
    let (mut b, _) = Client::register(&n2, "fam", "u", "b").await;
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");
    // r2's inbox (`kl:node:{r2}:in`) and the family's channel (`kl:{fam}:ev`) move.
    cluster.move_slot_of("r2");
    cluster.move_slot_of("fam");
    let moved = r#"kinlink_cluster_resubscriptions_total{reason="slots_moved"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while n1.metric(moved).await < 1.0 || n2.metric(moved).await < 1.0 {
        assert!(Instant::now() < deadline, "both nodes noticed the moved slots");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a (on r1) reaches b (on r2) through r2's moved inbox, in order.
    for i in 0..10 {
        a.send(json!({"type":"ice-candidate","toDeviceId":"b","candidate":{"candidate":format!("c{i}")}})).await;
    }
    for i in 0..10 {
        assert_eq!(recv_type(&mut b, "ice-candidate").await["candidate"]["candidate"], format!("c{i}"));
    }
    // Presence over the moved family channel, both ways.
    let (_c, _) = Client::register(&n2, "fam", "u", "c").await;
    assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "c");
    b.ws.close(None).await.unwrap();
    assert_eq!(recv_type(&mut a, "device-offline").await["deviceId"], "b");
}

/// The core behaviour on a Redis Cluster (sharded pub/sub): families spread over the three
/// masters' slots see each other across nodes, relay in order, and keep their limit.
#[tokio::test]
async fn the_core_behaviour_holds_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let (n1, n2, n3) = (node_at(cluster.url(), "c1", 2).await, node_at(cluster.url(), "c2", 2).await, node_at(cluster.url(), "c3", 2).await);
    // Enough families that their slots land on every master.
    for f in 0..6 {
        let family = format!("family-{f}");
        let (mut a, _) = Client::register(&n1, &family, "u", "a").await;
        let (mut b, reg) = Client::register(&n2, &family, "u", "b").await;
        assert_eq!(reg["devices"], json!([{"deviceId":"a","userId":"u"}]), "{family}");
        assert_eq!(recv_type(&mut a, "device-online").await["deviceId"], "b");
        for i in 0..5 {
            a.send(json!({"type":"ice-candidate","toDeviceId":"b","candidate":{"candidate":format!("c{i}")}})).await;
        }
        for i in 0..5 {
            assert_eq!(recv_type(&mut b, "ice-candidate").await["candidate"]["candidate"], format!("c{i}"));
        }
        // The family is full (2): a third device on the third node is refused.
        let mut c = Client::connect(&n3.ws_url()).await;
        c.send(json!({"type":"register","familyId":family,"userId":"u","deviceId":"c","token":token(&family,"u","c")})).await;
        assert_eq!(c.expect_error("family-full").await["code"], "family-full");
        b.ws.close(None).await.unwrap();
        assert_eq!(recv_type(&mut a, "device-offline").await["deviceId"], "b");
    }
    let used: Vec<String> = cluster.nodes.iter().map(|n| redis_cmd(n.port, "DBSIZE").unwrap_or_default()).collect();
    assert!(used.iter().filter(|r| !r.starts_with(":0")).count() >= 2, "keys on several masters: {used:?}");
}
