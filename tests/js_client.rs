//! The TypeScript client (clients/js) against the real binary: Node on libwebrtc
//! (@roamhq/wrtc, the stack inside react-native-webrtc) running the scenario scripts in
//! clients/js/test, real WebSockets, real peer connections and data channels on this machine.
//! scripts/test installs the package's dev dependencies (`npm ci`); the client is built once
//! per run here (`npm run build`, tsc).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use common::js::{build, result, DIR};

/// `node` in clients/js, with WebSocket available and the test token secret.
fn node() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("node");
    cmd.args(common::js::websocket_flag()).env("KL_TEST_TOKEN_SECRET", TOKEN_SECRET).current_dir(DIR).kill_on_drop(true);
    cmd
}

/// Runs a scenario script to its end and returns its result line.
async fn scenario(script: &str, args: &[&str]) -> Value {
    build();
    let out = tokio::time::timeout(Duration::from_secs(120), node().arg(format!("test/{script}")).args(args).output())
        .await
        .expect("scenario within 120 s")
        .expect("node runs");
    result(&String::from_utf8_lossy(&out.stdout), &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn message_types_match_the_protocol_schema() {
    // docs/protocol.schema.json is generated from the Rust types (its own drift test in
    // src/signal/schema.rs); src/protocol.ts is generated from it.
    let out = std::process::Command::new("node").args(["scripts/gen-protocol.mjs", "--check"]).current_dir(DIR).output().expect("node runs");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn reconnect_policy_unit_tests() {
    build();
    let out = std::process::Command::new("node").args(["--test", "test/unit/"]).current_dir(DIR).output().expect("node runs");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_family_of_four_meshes_and_comes_back_after_a_kinlink_restart() {
    build();
    let mut server = TestServer::with(|c| c.shutdown.grace_secs = 0).await;
    let url = server.ws_url();
    let mut child = node().arg("test/mesh.mjs").arg(&url).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("node runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    // Meshed: all six pairs connected and messages exchanged.
    let meshed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            stdout.push_str(&l);
            stdout.push('\n');
            if l.contains("\"meshed\"") || l.starts_with("{\"ok\"") {
                return l;
            }
        }
        String::new()
    })
    .await
    .expect("meshed within 60 s");
    assert!(meshed.contains("meshed"), "{stdout}");
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="direct"}"#, 6.0).await;

    // Restart kinlink on the same ports.
    let (http, metrics, udp, tcp) = (server.http, server.metrics, server.turn_udp.unwrap(), server.turn_tcp.unwrap());
    server.begin_shutdown().await.unwrap().unwrap();
    let server = TestServer::with(|c| {
        c.http.listen = http;
        c.metrics.listen = metrics.to_string();
        c.turn.udp_listen = kinlink::config::Listen::one(udp);
        c.turn.tcp_listen = kinlink::config::Listen::one(tcp);
    })
    .await;
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output()).await.expect("done within 90 s").unwrap();
    while let Some(l) = lines.next_line().await.unwrap() {
        stdout.push_str(&l);
        stdout.push('\n');
    }
    let r = result(&stdout, &String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["familySawStranger"], false, "{r:#}");
    assert_eq!(r["strangerSaw"], serde_json::json!([]), "{r:#}");
    for (i, p) in r["presence"].as_array().unwrap().iter().enumerate() {
        assert_eq!(p.as_array().unwrap().len(), 3, "device {i} sees the 3 others: {r:#}");
    }
    // Every pair established again through the new process, and counted there.
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="direct"}"#, 6.0).await;
    eprintln!("mesh {} ms, back after restart {} ms", r["meshMs"], r["reconnectMs"]);
}

#[tokio::test]
async fn relay_only_over_udp_and_over_tcp_goes_through_kinlinks_turn() {
    let server = TestServer::start().await;
    let url = server.ws_url();
    for (transport, via) in [("udp", "relay-udp"), ("tcp", "relay-tcp")] {
        let before = server.metric(r#"kinlink_turn_relayed_bytes_total{direction="client_to_peer"}"#).await;
        let r = scenario("relay.mjs", &[&url, transport]).await;
        for p in r["peers"].as_array().unwrap() {
            assert_eq!(p["state"], "connected", "{r:#}");
            assert_eq!(p["route"]["local"], "relay", "{r:#}");
            assert_eq!(p["route"]["via"], via, "{r:#}");
        }
        let relayed = server.metric(r#"kinlink_turn_relayed_bytes_total{direction="client_to_peer"}"#).await - before;
        assert!(relayed > 1000.0, "{transport}: relayed only {relayed} bytes");
    }
    // Each pair counted once, as relay.
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="relay"}"#, 2.0).await;
    assert_eq!(server.metric(r#"kinlink_p2p_negotiations_total{outcome="direct"}"#).await, 0.0);
}

#[tokio::test]
async fn expired_token_is_refreshed_through_the_provider_and_pushed_credentials_are_applied() {
    // Credentials pushed at three quarters of a 12 s lifetime.
    let server = TestServer::with(|c| c.turn.credential_ttl_secs = 12).await;
    let r = scenario("credentials.mjs", &[&server.ws_url(), "4"]).await;
    let asked: Vec<(String, String)> = serde_json::from_value(r["asked"].clone()).unwrap();
    for dev in ["a", "b"] {
        let reasons: Vec<&str> = asked.iter().filter(|(d, _)| d == dev).map(|(_, r)| r.as_str()).collect();
        assert_eq!(reasons, ["initial", "refused"], "{dev}: {r:#}");
    }
    assert_ne!(r["firstUser"], r["pushedUser"], "{r:#}");
    assert_eq!(r["applied"], r["pushedUser"], "{r:#}");
    assert!(server.metric("kinlink_signal_ice_servers_pushed_total").await >= 1.0);
}

#[tokio::test]
async fn the_node_example_exchanges_messages_between_two_devices() {
    build();
    let server = TestServer::start().await;
    let (a, b) = (token("demo", "ana", "laptop"), token("demo", "rui", "phone"));
    let out = tokio::time::timeout(Duration::from_secs(60), node().arg("../../examples/node/two-devices.mjs").args([&a, &b, &server.ws_url()]).output())
        .await
        .expect("example within 60 s")
        .expect("node runs (scripts/test runs `npm ci` in examples/node)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["phone: message from laptop: hello from laptop", "laptop: message from phone: hello from phone", "laptop: connected to phone via host"] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
}
