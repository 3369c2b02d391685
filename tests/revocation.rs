//! A lost phone cut off in a second: the admin API (its own listener, a bearer token) lists a
//! family's devices, disconnects one, and revokes a device or a family. The real binary, on
//! one node (the deny list in the data directory, kept across a restart) and on three nodes
//! sharing a real redis-server (a device on node B revoked through node A's API, refused on
//! every node and after every node restarted).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::{bin, serve, Running};
use common::redis::Redis;
use common::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789abcdef";

fn node_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--set",
        &format!("auth.token_secret={TOKEN_SECRET}"),
        "--set",
        &format!("turn.secret={TURN_SECRET}"),
        "--set",
        "admin.listen=127.0.0.1:0",
        "--set",
        &format!("admin.token={ADMIN_TOKEN}"),
        // The echo peer is on loopback, which the default peer policy refuses.
        "--set",
        "turn.allowed_peers=127.0.0.0/8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start(dir: &Path, extra: &[&str]) -> Running {
    let args = node_args(extra);
    serve(dir, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// An admin API call: status and JSON body.
async fn admin(node: &Running, method: &str, path: &str) -> (u16, Value) {
    admin_with(node.admin.expect("admin listener"), ADMIN_TOKEN, method, path).await
}

async fn admin_with(addr: SocketAddr, token: &str, method: &str, path: &str) -> (u16, Value) {
    let (status, body) = kinlink::admin::client::request(&format!("http://{addr}"), token, method, path).await.expect("admin API answers");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn ws_url(node: &Running) -> String {
    format!("ws://{}/signal", node.http)
}

/// Registers `device` of `family` with `token`; the first answer.
async fn register_with(node: &Running, family: &str, device: &str, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&ws_url(node)).await;
    c.send(json!({"type":"register","familyId":family,"userId":"u","deviceId":device,"token":token})).await;
    let first = c.recv().await;
    (c, first)
}

async fn register(node: &Running, family: &str, device: &str, token: &str) -> Client {
    let (c, first) = register_with(node, family, device, token).await;
    assert_eq!(first["type"], "registered", "{first}");
    c
}

/// The connection is closed with `code` within `within` of now (messages before it skipped).
async fn closed_with(c: &mut Client, code: u16, within: Duration) -> Duration {
    use futures_util::StreamExt;
    let t0 = Instant::now();
    loop {
        let left = within.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, c.ws.next()).await.expect("closed in time") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), code, "close code ({})", f.reason);
                return t0.elapsed();
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The next message of `kind`, skipping others.
async fn next_of(c: &mut Client, kind: &str) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// A registration with `token` is refused with 4410.
async fn refused_as_revoked(node: &Running, family: &str, device: &str, token: &str) {
    let (mut c, first) = register_with(node, family, device, token).await;
    assert_eq!(first["type"], "error", "{first}");
    assert!(first["message"].as_str().unwrap().contains("revoked"), "{first}");
    closed_with(&mut c, 4410, WAIT).await;
}

/// A token issued after the current second (a revocation covers tokens issued up to the
/// second it was made).
async fn fresh_token(family: &str, device: &str) -> String {
    let now = kinlink::auth::unix_now();
    while kinlink::auth::unix_now() == now {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token_ttl(family, "u", device, 600)
}

#[tokio::test]
async fn a_revoked_device_is_cut_off_its_tokens_and_turn_credentials_refused_across_a_restart() {
    let dir = temp_dir("revoke-single");
    let node = start(&dir, &[]);
    let admin_addr = node.admin.unwrap();

    // The API wants the token, and is not on the public listener.
    assert_eq!(admin_with(admin_addr, "", "GET", "/v1/revocations").await.0, 401);
    assert_eq!(admin_with(admin_addr, "wrong-token-wrong-token-wrong-token", "GET", "/v1/revocations").await.0, 401);
    assert_eq!(admin_with(node.http, ADMIN_TOKEN, "GET", "/v1/revocations").await.0, 404);
    assert_eq!(admin_with(node.http, ADMIN_TOKEN, "POST", "/v1/families/fam/revoke").await.0, 404);
    assert_eq!(admin(&node, "GET", "/v1/families/bad:id/devices").await.0, 400);

    let (tok_a, tok_b) = (token_ttl("fam", "u", "a", 600), token_ttl("fam", "u", "b", 600));
    let mut a = register(&node, "fam", "a", &tok_a).await;
    let mut b = register(&node, "fam", "b", &tok_b).await;
    next_of(&mut a, "device-online").await;
    let (status, view) = admin(&node, "GET", "/v1/families/fam/devices").await;
    assert_eq!(status, 200, "{view}");
    let devices: Vec<&str> = view["devices"].as_array().unwrap().iter().map(|d| d["deviceId"].as_str().unwrap()).collect();
    assert_eq!(devices, ["a", "b"], "{view}");
    assert!(view["devices"][0]["since"].as_u64().unwrap() >= kinlink::auth::unix_now() - 60, "{view}");
    assert!(!view["devices"][0]["node"].as_str().unwrap().is_empty(), "{view}");

    // b relays through TURN with its credentials.
    let relaying = Relaying::start(&node, "fam", "b").await;

    // Disconnect: closed with 4001, and the same token registers again.
    let (status, body) = admin(&node, "POST", "/v1/families/fam/devices/a/disconnect").await;
    assert_eq!((status, body["closedHere"].as_u64()), (200, Some(1)), "{body}");
    closed_with(&mut a, 4001, Duration::from_secs(1)).await;
    next_of(&mut b, "device-offline").await;
    let mut a = register(&node, "fam", "a", &tok_a).await;
    next_of(&mut b, "device-online").await;

    // Revoke b: closed within a second, a sees it go, its relay is gone.
    let t0 = Instant::now();
    let (status, body) = admin(&node, "POST", "/v1/families/fam/devices/b/revoke").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["closedHere"].as_u64(), body["allocationsHere"].as_u64()), (Some(1), Some(1)), "{body}");
    assert_eq!(body["revocation"]["deviceId"], "b");
    closed_with(&mut b, 4410, Duration::from_secs(1)).await;
    assert!(t0.elapsed() < Duration::from_secs(1), "closed {:?} after the call", t0.elapsed());
    let off = next_of(&mut a, "device-offline").await;
    assert_eq!(off["deviceId"], "b");
    relaying.assert_cut_off().await;
    refused_as_revoked(&node, "fam", "b", &tok_b).await;
    // The revocation covers what was issued before it, not the backend's next token.
    let tok_b2 = fresh_token("fam", "b").await;
    let b2 = register(&node, "fam", "b", &tok_b2).await;
    drop(b2);

    let metrics = reqwest_metrics(node.metrics).await;
    assert_eq!(metric_value(&metrics, "kinlink_admin_revocations_total{kind=\"device\"}"), Some(1.0));
    assert_eq!(metric_value(&metrics, "kinlink_auth_deny_list_entries"), Some(1.0));
    // The kick and the refused retry (counted once each closing handshake ends).
    let deadline = Instant::now() + WAIT;
    while metric_value(&reqwest_metrics(node.metrics).await, "kinlink_signal_connections_closed_total{reason=\"revoked\"}") != Some(2.0) {
        assert!(Instant::now() < deadline, "two connections closed as revoked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric_value(&metrics, "kinlink_admin_requests_total{result=\"wrong\"}").unwrap() >= 1.0);
    drop(a);

    // A restart keeps the deny list (data directory); `kinlink admin` reads it.
    drop(node);
    let node = start(&dir, &[]);
    refused_as_revoked(&node, "fam", "b", &tok_b).await;
    let out = bin()
        .args(["--set", &format!("admin.token={ADMIN_TOKEN}"), "admin", "--url", &format!("http://{}", node.admin.unwrap()), "revocations"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["revocations"][0]["deviceId"], "b", "{listed}");
    let wrong = bin().args(["--set", "admin.token=not-the-admin-token-not-the-admin-token", "admin", "--url", &format!("http://{}", node.admin.unwrap()), "revocations"]).output().unwrap();
    assert!(!wrong.status.success());

    // A whole family: every device closed, every earlier token refused.
    let mut a = register(&node, "fam", "a", &tok_a).await;
    let out = bin()
        .args(["--set", &format!("admin.token={ADMIN_TOKEN}"), "admin", "--url", &format!("http://{}", node.admin.unwrap()), "revoke-family", "fam"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    closed_with(&mut a, 4410, Duration::from_secs(1)).await;
    refused_as_revoked(&node, "fam", "a", &tok_a).await;
    refused_as_revoked(&node, "fam", "c", &token_ttl("fam", "u", "c", 600)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn revocation_entries_are_dropped_once_every_token_they_cover_has_expired() {
    let dir = temp_dir("revoke-expiry");
    // Tokens live at most 60 s here, so an entry is kept 60 s (no leeway).
    let node = start(&dir, &["--set", "auth.max_token_ttl_secs=60", "--set", "auth.token_leeway_secs=0"]);
    let (status, _) = admin(&node, "POST", "/v1/families/fam/devices/x/revoke").await;
    assert_eq!(status, 200);
    assert_eq!(admin(&node, "GET", "/v1/revocations").await.1["revocations"].as_array().unwrap().len(), 1);
    // Within a restart's reach too: the file is rewritten when the entry goes.
    let deadline = Instant::now() + Duration::from_secs(80);
    loop {
        let (_, listed) = admin(&node, "GET", "/v1/revocations").await;
        if listed["revocations"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "entry still there after 80 s: {listed}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let saved = std::fs::read_to_string(dir.join("revocations.json")).unwrap();
    assert!(!saved.contains("\"x\""), "{saved}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn cluster_node(dir: &Path, redis: &Redis, id: &str) -> Running {
    start(dir, &["--set", &format!("cluster.redis_url={}", redis.url()), "--set", &format!("cluster.node_id={id}")])
}

#[tokio::test]
async fn a_device_revoked_through_one_node_is_closed_on_another_and_refused_everywhere_after_all_restart() {
    let redis = Redis::start();
    let dirs: Vec<_> = ["a", "b", "c"].iter().map(|n| temp_dir(&format!("revoke-cluster-{n}"))).collect();
    let nodes: Vec<Running> = ["node-a", "node-b", "node-c"].iter().zip(&dirs).map(|(id, d)| cluster_node(d, &redis, id)).collect();
    let tokens: Vec<String> = ["p", "q", "r"].iter().map(|d| token_ttl("fam", "u", d, 600)).collect();
    // p on node A, q on node B, r on node C.
    let mut p = register(&nodes[0], "fam", "p", &tokens[0]).await;
    let mut q = register(&nodes[1], "fam", "q", &tokens[1]).await;
    let mut r = register(&nodes[2], "fam", "r", &tokens[2]).await;
    next_of(&mut p, "device-online").await;
    next_of(&mut p, "device-online").await;

    // Node C lists the family across nodes.
    let (_, view) = admin(&nodes[2], "GET", "/v1/families/fam/devices").await;
    let listed: Vec<(String, String)> =
        view["devices"].as_array().unwrap().iter().map(|d| (d["deviceId"].as_str().unwrap().to_string(), d["node"].as_str().unwrap().to_string())).collect();
    assert_eq!(listed, [("p".into(), "node-a".into()), ("q".into(), "node-b".into()), ("r".into(), "node-c".into())], "{view}");

    // q relays through node B's TURN.
    let relaying = Relaying::start(&nodes[1], "fam", "q").await;

    // q (on B) revoked through A: closed within a second, the others see it go.
    let t0 = Instant::now();
    let (status, body) = admin(&nodes[0], "POST", "/v1/families/fam/devices/q/revoke").await;
    assert_eq!(status, 200, "{body}");
    closed_with(&mut q, 4410, Duration::from_secs(1)).await;
    assert!(t0.elapsed() < Duration::from_secs(1), "closed {:?} after the call", t0.elapsed());
    assert_eq!(next_of(&mut p, "device-offline").await["deviceId"], "q");
    assert_eq!(next_of(&mut r, "device-offline").await["deviceId"], "q");
    for n in &nodes {
        refused_as_revoked(n, "fam", "q", &tokens[1]).await;
    }
    // Its allocation on B is gone and its credentials are refused there.
    relaying.assert_cut_off().await;
    let metrics = reqwest_metrics(nodes[1].metrics).await;
    assert_eq!(metric_value(&metrics, "kinlink_auth_deny_list_entries"), Some(1.0), "B holds the entry A made");
    // Disconnect through C of a device on A.
    let (status, _) = admin(&nodes[2], "POST", "/v1/families/fam/devices/p/disconnect").await;
    assert_eq!(status, 200);
    closed_with(&mut p, 4001, Duration::from_secs(1)).await;
    drop((p, r));

    // Every node restarted: the deny list comes back from Redis.
    drop(nodes);
    let nodes: Vec<Running> = ["node-a", "node-b", "node-c"].iter().zip(&dirs).map(|(id, d)| cluster_node(d, &redis, id)).collect();
    for n in &nodes {
        refused_as_revoked(n, "fam", "q", &tokens[1]).await;
        let (_, listed) = admin(n, "GET", "/v1/revocations").await;
        assert_eq!(listed["revocations"][0]["deviceId"], "q", "{listed}");
    }
    // A family revoked through B closes its devices on A and C.
    let mut p = register(&nodes[0], "fam", "p", &tokens[0]).await;
    let mut r = register(&nodes[2], "fam", "r", &tokens[2]).await;
    let (status, _) = admin(&nodes[1], "POST", "/v1/families/fam/revoke").await;
    assert_eq!(status, 200);
    closed_with(&mut p, 4410, Duration::from_secs(1)).await;
    closed_with(&mut r, 4410, Duration::from_secs(1)).await;
    refused_as_revoked(&nodes[1], "fam", "r", &tokens[2]).await;
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

use webrtc_util::Conn;

/// A device relaying to an echo peer through a node's TURN over UDP.
struct Relaying {
    turn: SocketAddr,
    credentials: (String, String),
    _client: turn::client::Client,
    relay: Box<dyn webrtc_util::Conn + Send + Sync>,
    peer: SocketAddr,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relaying {
    /// Allocates with `device`'s credentials on `node` and relays one datagram.
    async fn start(node: &Running, family: &str, device: &str) -> Relaying {
        let turn: SocketAddr = format!("127.0.0.1:{}", turn_udp_port(node)).parse().unwrap();
        let (peer, seen) = echo_peer().await;
        let (user, pass) = rest_credentials(family, device, 600);
        let client = turn_client(turn, user.clone(), pass.clone()).await;
        let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().expect("allocate");
        relay.send_to(b"before", peer).await.unwrap();
        wait_until(|| seen.load(std::sync::atomic::Ordering::Relaxed) >= 1, "relayed before the revocation").await;
        Relaying { turn, credentials: (user, pass), _client: client, relay: Box::new(relay), peer, seen }
    }

    /// The allocation is gone (nothing more is relayed) and the credentials are refused.
    async fn assert_cut_off(&self) {
        let before = self.seen.load(std::sync::atomic::Ordering::Relaxed);
        let _ = self.relay.send_to(b"after", self.peer).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(self.seen.load(std::sync::atomic::Ordering::Relaxed), before, "nothing relayed after the revocation");
        let (user, pass) = self.credentials.clone();
        let again = turn_client(self.turn, user, pass).await;
        assert!(tokio::time::timeout(WAIT, again.allocate()).await.unwrap().is_err(), "its TURN credentials are refused on {}", self.turn);
    }
}

fn turn_udp_port(node: &Running) -> u16 {
    // "TURN listening" names the bound UDP address.
    for line in &node.startup {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        if let Some(udp) = v["fields"]["udp"].as_str() {
            let first = udp.trim_matches(|c| c == '[' || c == ']').split(',').next().unwrap().trim().to_string();
            if let Ok(a) = first.parse::<SocketAddr>() {
                return a.port();
            }
        }
    }
    panic!("no TURN UDP address in the startup log: {:?}", node.startup);
}

async fn wait_until(f: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reqwest_metrics(addr: SocketAddr) -> String {
    let (status, body) = kinlink::admin::client::request(&format!("http://{addr}"), "", "GET", "/metrics").await.unwrap();
    assert_eq!(status, 200);
    body
}
