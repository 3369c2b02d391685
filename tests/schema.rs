//! The protocol's JSON Schema (docs/protocol.schema.json) against a real server: every
//! message a scenario makes the server send, and every message the clients send, validates
//! (Python's `jsonschema`, draft 2020-12, installed by scripts/test); messages the server
//! refuses do not validate either. The schema itself is generated from the Rust types and a
//! unit test keeps the checked-in file current.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Validates each message against `$defs/<def>`; returns the ones that fail, with the reason.
fn validate(def: &str, messages: &[Value]) -> Vec<String> {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = temp_dir(&format!("schema-{def}-{}", RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let file = dir.join("messages.json");
    std::fs::write(&file, serde_json::to_string(messages).unwrap()).unwrap();
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.schema.json");
    let script = r##"
import json, sys
from jsonschema import Draft202012Validator
doc = json.load(open(sys.argv[1]))
v = Draft202012Validator({"$defs": doc["$defs"], "$ref": "#/$defs/" + sys.argv[3]})
for i, m in enumerate(json.load(open(sys.argv[2]))):
    errs = list(v.iter_errors(m))
    if errs:
        print(json.dumps(m) + " -> " + errs[0].message)
"##;
    let out = std::process::Command::new("python3").args(["-c", script, schema, file.to_str().unwrap(), def]).output().expect("python3");
    assert!(out.status.success(), "jsonschema (pip install jsonschema; scripts/test does): {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Everything that arrives within `d`.
async fn drain(c: &mut Client, d: Duration, into: &mut Vec<Value>) {
    while let Ok(Some(Ok(m))) = tokio::time::timeout(d, c.ws.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            into.push(serde_json::from_str(&t).unwrap());
        }
    }
}

#[tokio::test]
async fn every_message_of_a_session_matches_the_schema() {
    let server = TestServer::with(|c| c.turn.credential_ttl_secs = 60).await;
    let mut seen = Vec::new();
    let (mut a, reg_a) = Client::register(&server, "fam", "u1", "phone").await;
    seen.push(reg_a);
    let (mut b, reg_b) = Client::register(&server, "fam", "u2", "tablet").await;
    seen.push(reg_b);
    let sent = vec![
        json!({"type": "register", "familyId": "fam", "userId": "u1", "deviceId": "phone", "token": "t", "ref": 1}),
        json!({"type": "offer", "toDeviceId": "tablet", "sdp": {"type": "offer", "sdp": "v=0\r\n"}, "ref": 2}),
        json!({"type": "answer", "toDeviceId": "phone", "familyId": "fam", "sdp": {"type": "answer", "sdp": "v=0\r\n"}}),
        json!({"type": "ice-candidate", "toDeviceId": "tablet", "candidate": {"candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host", "sdpMid": "0"}}),
        json!({"type": "ice-candidate", "toDeviceId": "tablet", "candidate": null}),
        json!({"type": "p2p-status", "peerDeviceId": "tablet", "state": "connected", "route": "relay", "connectMs": 80}),
        json!({"type": "offer", "toDeviceId": "nobody", "sdp": "x", "ref": "r-9"}),
        json!({"type": "p2p-status", "peerDeviceId": "nobody", "state": "failed"}),
    ];
    assert_eq!(validate("ClientMessage", &sent), Vec::<String>::new());
    // The first `register` above is the client's already-registered mistake: send the rest.
    for m in &sent {
        a.send(m.clone()).await;
    }
    a.send_raw(r#"{"type":"dance","ref":{"k":1}}"#).await;
    b.send(json!({"type": "answer", "toDeviceId": "phone", "sdp": {"type": "answer", "sdp": "v=0\r\n"}})).await;
    drain(&mut a, Duration::from_millis(500), &mut seen).await;
    drain(&mut b, Duration::from_millis(500), &mut seen).await;
    drop(b);
    // device-offline, and an ice-servers push (credentials of 60 s are refreshed at 45 s: too
    // long to wait here, so the push's shape is covered by `registered`'s and the unit tests).
    drain(&mut a, Duration::from_millis(500), &mut seen).await;
    let types: std::collections::BTreeSet<&str> = seen.iter().filter_map(|m| m["type"].as_str()).collect();
    for t in ["registered", "device-online", "device-offline", "offer", "answer", "ice-candidate", "error"] {
        assert!(types.contains(t), "the scenario produced no {t}: {types:?}");
    }
    // Every error answering a message echoes its ref.
    assert!(seen.iter().any(|m| m["code"] == "peer-offline" && m["ref"] == "r-9"), "{seen:#?}");
    assert!(seen.iter().any(|m| m["code"] == "already-registered" && m["ref"] == 1), "{seen:#?}");
    assert!(seen.iter().any(|m| m["code"] == "bad-message" && m["ref"]["k"] == 1), "{seen:#?}");
    // The end-of-candidates null arrived as null.
    assert!(seen.iter().any(|m| m["type"] == "ice-candidate" && m["candidate"].is_null()), "{seen:#?}");
    assert_eq!(validate("ServerMessage", &seen), Vec::<String>::new());
}

#[test]
fn refused_messages_do_not_validate_either() {
    let refused = vec![
        json!({"type": "offer", "toDeviceId": "b"}),
        json!({"type": "register", "familyId": "f", "userId": "u"}),
        json!({"type": "p2p-status", "peerDeviceId": "b", "state": "meh"}),
        json!({"type": "dance"}),
        json!({"familyId": "f"}),
    ];
    assert_eq!(validate("ClientMessage", &refused).len(), refused.len());
}
