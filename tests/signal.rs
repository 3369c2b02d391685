//! The signaling relay over real sockets: a kinlink server on 127.0.0.1:0 and
//! tokio-tungstenite clients.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn two_devices_see_each_other_and_exchange_offer_answer_candidates() {
    let server = TestServer::start().await;
    let (mut a, reg_a) = Client::register(&server, "fam1", "joao", "phone-a").await;
    assert_eq!(reg_a["deviceId"], "phone-a");
    assert_eq!(reg_a["devices"], json!([]));
    assert!(reg_a["iceServersTtl"].as_u64().unwrap() > 0);
    let (mut b, reg_b) = Client::register(&server, "fam1", "maria", "phone-b").await;
    assert_eq!(reg_b["devices"], json!([{"deviceId":"phone-a","userId":"joao"}]));
    let online = a.recv().await;
    assert_eq!(online, json!({"type":"device-online","familyId":"fam1","deviceId":"phone-b","userId":"maria"}));

    let sdp = json!({"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"});
    a.send(json!({"type":"offer","toDeviceId":"phone-b","sdp":sdp})).await;
    let got = b.recv().await;
    assert_eq!(got["type"], "offer");
    assert_eq!(got["fromDeviceId"], "phone-a");
    assert_eq!(got["fromUserId"], "joao");
    assert_eq!(got["familyId"], "fam1");
    assert_eq!(got["sdp"], sdp);

    b.send(json!({"type":"answer","familyId":"fam1","toDeviceId":"phone-a","sdp":{"type":"answer","sdp":"v=0"}})).await;
    let got = a.recv().await;
    assert_eq!((got["type"].as_str(), got["fromDeviceId"].as_str()), (Some("answer"), Some("phone-b")));

    let cand = json!({"candidate":"candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host","sdpMid":"0","sdpMLineIndex":0});
    a.send(json!({"type":"ice-candidate","toDeviceId":"phone-b","candidate":cand})).await;
    let got = b.recv().await;
    assert_eq!(got["type"], "ice-candidate");
    assert_eq!(got["candidate"], cand);

    drop(b);
    let off = a.recv().await;
    assert_eq!(off, json!({"type":"device-offline","familyId":"fam1","deviceId":"phone-b"}));

    assert_eq!(server.metric(r#"kinlink_signal_messages_relayed_total{type="offer"}"#).await, 1.0);
    assert_eq!(server.metric(r#"kinlink_signal_messages_relayed_total{type="ice-candidate"}"#).await, 1.0);
    assert_eq!(server.metric("kinlink_signal_registrations_total").await, 2.0);
    assert!(server.metric("kinlink_signal_relay_latency_seconds_count").await >= 3.0);
}

/// Exactly the seed's P2PSyncManager: token on the URL, `register` without token, relays
/// without familyId, `sdp` as the RTCSessionDescription object.
#[tokio::test]
async fn seed_client_shapes_work_unchanged() {
    let server = TestServer::start().await;
    let url = |f: &str, u: &str, d: &str| format!("{}?token={}", server.ws_url(), token(f, u, d));
    let mut a = Client::connect(&url("fam", "u1", "dev-a")).await;
    a.send(json!({"type":"register","familyId":"fam","userId":"u1","deviceId":"dev-a"})).await;
    assert_eq!(a.recv().await["type"], "registered");
    let mut b = Client::connect(&url("fam", "u2", "dev-b")).await;
    b.send(json!({"type":"register","familyId":"fam","userId":"u2","deviceId":"dev-b"})).await;
    assert_eq!(b.recv().await["type"], "registered");
    // The seed reacts to device-online by `msg.deviceId` and offers to it.
    let online = a.recv().await;
    let target = online["deviceId"].as_str().unwrap().to_string();
    a.send(json!({"type":"offer","toDeviceId":target,"sdp":{"type":"offer","sdp":"v=0"}})).await;
    let offer = b.recv().await;
    // The seed answers to `msg.fromDeviceId` with `msg.sdp`.
    assert_eq!(offer["fromDeviceId"], "dev-a");
    assert_eq!(offer["sdp"]["type"], "offer");
    b.send(json!({"type":"answer","toDeviceId":offer["fromDeviceId"],"sdp":{"type":"answer","sdp":"v=0"}})).await;
    assert_eq!(a.recv().await["type"], "answer");
    b.send(json!({"type":"ice-candidate","toDeviceId":"dev-a","candidate":{"candidate":"c","sdpMid":"0"}})).await;
    assert_eq!(a.recv().await["fromDeviceId"], "dev-b");
    a.send(json!({"type":"ice-candidate","toDeviceId":"dev-b","candidate":{"candidate":"d","sdpMid":"0"}})).await;
    assert_eq!(b.recv().await["fromDeviceId"], "dev-a");
    // Once connected, both sides report; the negotiation counts once, as direct.
    a.send(json!({"type":"p2p-status","peerDeviceId":"dev-b","state":"connected","route":"host","connectMs":420})).await;
    b.send(json!({"type":"p2p-status","peerDeviceId":"dev-a","state":"connected","route":"host"})).await;
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="direct"}"#, 1.0).await;
    a.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(server.metric("kinlink_p2p_connect_seconds_count").await, 1.0);
    assert_eq!(server.metric("kinlink_p2p_negotiations_open").await, 0.0);

    // And the Authorization header works the same way.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(server.ws_url()).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token("fam", "u3", "dev-c")).parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = Client { ws };
    c.send(json!({"type":"register","familyId":"fam","userId":"u3","deviceId":"dev-c"})).await;
    let reg = c.recv().await;
    assert_eq!(reg["devices"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn other_family_neither_sees_nor_reaches() {
    let server = TestServer::start().await;
    let (mut a, _) = Client::register(&server, "fam1", "u", "a").await;
    let (mut x, reg_x) = Client::register(&server, "evil", "u", "x").await;
    assert_eq!(reg_x["devices"], json!([]), "no devices of another family listed");
    // Names fam1 explicitly: refused as family-mismatch.
    x.send(json!({"type":"offer","familyId":"fam1","toDeviceId":"a","sdp":"x","ref":"r1"})).await;
    let e = x.expect_error("family-mismatch").await;
    assert!(e.get("ref").is_none() || e["ref"] == "r1");
    // Names only the deviceId: it does not exist in its own family.
    x.send(json!({"type":"offer","toDeviceId":"a","sdp":"x"})).await;
    x.expect_error("peer-offline").await;
    // A device with the same id in the evil family does not collide with fam1's.
    let (_x2, reg) = Client::register(&server, "evil", "u", "a").await;
    assert_eq!(reg["devices"], json!([{"deviceId":"x","userId":"u"}]));
    a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_44xx() {
    let server = TestServer::start().await;
    let now = kinlink::auth::unix_now();
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = json!({"fam":"f","sub":"u","dev":"d","exp":now+600,"iat":now});
    let expired = kinlink::auth::mint_token(&kinlink::config::Secret::new(TOKEN_SECRET), "f", "u", "d", 10, now - 100);
    let forged = kinlink::auth::mint_token(&kinlink::config::Secret::new("attacker-secret-0123456789"), "f", "u", "d", 600, now);
    let alg_none = format!("{}.{}.", b64(json!({"alg":"none","typ":"JWT"})), b64(claims.clone()));
    let rs256 = format!("{}.{}.c2lnbmF0dXJl", b64(json!({"alg":"RS256","typ":"JWT"})), b64(claims));
    let cases = [
        (expired, "f", 4401, "expired"),
        (forged, "f", 4401, "bad_signature"),
        (alg_none, "f", 4401, "bad_algorithm"),
        (rs256.clone(), "f", 4401, "bad_algorithm"),
        ("garbage".to_string(), "f", 4401, "malformed"),
        (token("f", "u", "d"), "other-family", 4403, "family_mismatch"),
    ];
    for (tok, fam, close, reason) in cases {
        let mut c = Client::connect(&server.ws_url()).await;
        c.send(json!({"type":"register","familyId":fam,"userId":"u","deviceId":"d","token":tok})).await;
        let e = c.recv().await;
        assert_eq!(e["type"], "error");
        assert!(e["code"] == "unauthorized" || e["code"] == "family-mismatch", "{e}");
        assert!(!e.to_string().contains(&tok), "error must not echo the token");
        assert_eq!(c.expect_close().await, close, "{reason}");
    }
    let metrics = server.metrics_text().await;
    for reason in ["expired", "bad_signature", "malformed", "family_mismatch"] {
        assert!(metric_value(&metrics, &format!(r#"kinlink_auth_failures_total{{reason="{reason}"}}"#)).unwrap() >= 1.0, "{reason}");
    }
    assert_eq!(metric_value(&metrics, r#"kinlink_auth_failures_total{reason="bad_algorithm"}"#), Some(2.0));
    // No token at all.
    let mut c = Client::connect(&server.ws_url()).await;
    c.send(json!({"type":"register","familyId":"f","userId":"u","deviceId":"d"})).await;
    c.expect_error("unauthorized").await;
    assert_eq!(c.expect_close().await, 4401);
}

#[tokio::test]
async fn duplicate_device_replaces_old_connection_without_false_offline() {
    let server = TestServer::start().await;
    let (mut a, _) = Client::register(&server, "fam", "u", "a").await;
    let (mut b1, _) = Client::register(&server, "fam", "u", "b").await;
    assert_eq!(a.recv().await["type"], "device-online");
    let (mut b2, reg) = Client::register(&server, "fam", "u", "b").await;
    assert_eq!(reg["devices"], json!([{"deviceId":"a","userId":"u"}]));
    assert_eq!(b1.expect_close().await, 4409);
    // The family sees the device online again (to re-offer), never offline.
    assert_eq!(a.recv().await, json!({"type":"device-online","familyId":"fam","deviceId":"b","userId":"u"}));
    a.expect_silence(Duration::from_millis(300)).await;
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":"x"})).await;
    assert_eq!(b2.recv().await["type"], "offer");
    server.wait_metric(r#"kinlink_signal_connections_closed_total{reason="replaced"}"#, 1.0).await;
    assert_eq!(server.metric("kinlink_signal_devices").await, 2.0);
}

#[tokio::test]
async fn every_error_code_is_produced() {
    let server = TestServer::with(|c| {
        c.signal.max_frame_bytes = 1024;
        c.signal.hard_max_frame_bytes = 4096;
        c.signal.max_devices_per_family = 2;
        c.signal.max_devices = 3;
    })
    .await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.send_raw("{not json").await;
    c.expect_error("bad-message").await;
    c.send(json!({"type":"teleport","ref":42})).await;
    assert_eq!(c.expect_error("bad-message").await["ref"], 42);
    c.send(json!({"type":"offer","toDeviceId":"x","sdp":"y"})).await;
    c.expect_error("not-registered").await;
    c.send_raw(&format!(r#"{{"type":"offer","toDeviceId":"x","sdp":"{}"}}"#, "a".repeat(2000))).await;
    c.expect_error("too-large").await;

    let (mut a, _) = Client::register(&server, "fam", "u", "a").await;
    a.send(json!({"type":"register","familyId":"fam","userId":"u","deviceId":"a","token":token("fam","u","a")})).await;
    a.expect_error("already-registered").await;
    a.send(json!({"type":"offer","familyId":"nope","toDeviceId":"b","sdp":"y"})).await;
    a.expect_error("family-mismatch").await;
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":"y"})).await;
    a.expect_error("peer-offline").await;

    let (mut _b, _) = Client::register(&server, "fam", "u", "b").await;
    assert_eq!(a.recv().await["type"], "device-online");
    let mut full = Client::connect(&server.ws_url()).await;
    full.send(json!({"type":"register","familyId":"fam","userId":"u","deviceId":"c","token":token("fam","u","c")})).await;
    full.expect_error("family-full").await;
    assert_eq!(full.expect_close().await, 1013);
    let (_g, _) = Client::register(&server, "gam", "u", "g").await;
    let mut over = Client::connect(&server.ws_url()).await;
    over.send(json!({"type":"register","familyId":"ham","userId":"u","deviceId":"h","token":token("ham","u","h")})).await;
    over.expect_error("server-full").await;
    assert_eq!(over.expect_close().await, 1013);

    let mut unauth = Client::connect(&server.ws_url()).await;
    unauth.send(json!({"type":"register","familyId":"f","userId":"u","deviceId":"d","token":"x"})).await;
    unauth.expect_error("unauthorized").await;

    // The bad connection survived all its mistakes.
    c.send(json!({"type":"offer","toDeviceId":"x","sdp":"y"})).await;
    c.expect_error("not-registered").await;

    // Past the hard limit the frame is refused at its header and its payload is never read,
    // so the connection ends: with too-large and 1009 when the client reads them before the
    // kernel's reset for the unread payload arrives, with a reset otherwise.
    c.send_raw(&"b".repeat(10_000)).await;
    loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut c.ws)).await.unwrap() {
            Some(Ok(Message::Text(t))) => assert!(t.contains("too-large"), "{t}"),
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1009);
                break;
            }
            Some(Ok(other)) => panic!("{other:?}"),
            Some(Err(_)) | None => break,
        }
    }
    server.wait_metric(r#"kinlink_signal_connections_closed_total{reason="too_large"}"#, 1.0).await;
    // Everyone else is unaffected.
    a.send(json!({"type":"offer","toDeviceId":"b","sdp":"still here"})).await;
    assert_eq!(_b.recv().await["sdp"], "still here");

    let metrics = server.metrics_text().await;
    for code in ["bad-message", "not-registered", "too-large", "already-registered", "family-mismatch", "peer-offline", "family-full", "server-full", "unauthorized"] {
        let v = metric_value(&metrics, &format!(r#"kinlink_signal_errors_total{{code="{code}"}}"#)).unwrap();
        assert!(v >= 1.0, "{code} counted");
    }
    // rate-limited and shutting-down have their own tests below.
}

#[tokio::test]
async fn flood_hits_rate_limit_without_affecting_another_family() {
    let server = TestServer::with(|c| {
        c.signal.rate_per_sec = 20.0;
        c.signal.rate_burst = 20;
        c.signal.rate_strikes = 50;
    })
    .await;
    let (mut flooder, _) = Client::register(&server, "noisy", "u", "f").await;
    let (mut a, _) = Client::register(&server, "quiet", "u", "a").await;
    let (mut b, _) = Client::register(&server, "quiet", "u", "b").await;
    assert_eq!(a.recv().await["type"], "device-online");

    // 500 messages as fast as possible, bounded.
    for i in 0..500 {
        let frame = json!({"type":"offer","toDeviceId":"nobody","sdp":"x","ref":i}).to_string();
        if flooder.ws.feed(Message::text(frame)).await.is_err() {
            break;
        }
    }
    let _ = flooder.ws.flush().await;
    // Meanwhile the quiet family relays normally.
    for i in 0..10 {
        a.send(json!({"type":"ice-candidate","toDeviceId":"b","candidate":{"n":i}})).await;
        let got = b.recv().await;
        assert_eq!(got["candidate"]["n"], i);
    }
    let mut rate_limited = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut flooder.ws)).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                if t.contains("rate-limited") {
                    rate_limited += 1;
                }
            }
            Some(Ok(Message::Close(Some(f)))) => break Some(u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(rate_limited >= 50, "rate-limited errors: {rate_limited}");
    assert_eq!(close, Some(4429));
    assert!(server.metric(r#"kinlink_signal_errors_total{code="rate-limited"}"#).await >= 50.0);
    server.wait_metric(r#"kinlink_signal_connections_closed_total{reason="rate_limited"}"#, 1.0).await;
}

#[tokio::test]
async fn register_deadline_closes_4408() {
    let server = TestServer::with(|c| c.signal.register_timeout_secs = 1).await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.expect_error("not-registered").await;
    assert_eq!(c.expect_close().await, 4408);
}

#[tokio::test]
async fn connection_cap_answers_503() {
    let server = TestServer::with(|c| c.signal.max_connections = 2).await;
    let _a = Client::connect(&server.ws_url()).await;
    let _b = Client::connect(&server.ws_url()).await;
    match tokio_tungstenite::connect_async(server.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.metric(r#"kinlink_signal_upgrades_rejected_total{reason="server_full"}"#).await, 1.0);
}

#[tokio::test]
async fn shutdown_notifies_devices_and_drains() {
    let mut server = TestServer::with(|c| c.shutdown.grace_secs = 5).await;
    let (mut a, _) = Client::register(&server, "fam", "u", "a").await;
    let (mut b, _) = Client::register(&server, "fam", "u", "b").await;
    let ready = reqwest::get(format!("http://{}/readyz", server.metrics)).await.unwrap();
    assert_eq!(ready.status(), 200);
    let task = server.begin_shutdown();
    for c in [&mut a, &mut b] {
        loop {
            let v = c.recv().await;
            if v["type"] == "error" {
                assert_eq!(v["code"], "shutting-down");
                break;
            }
        }
        assert_eq!(c.expect_close().await, 1001);
    }
    drop((a, b));
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("drained in time").unwrap().unwrap();
}

#[tokio::test]
async fn readyz_is_503_while_draining_and_new_upgrades_are_refused() {
    let mut server = TestServer::with(|c| c.shutdown.grace_secs = 3).await;
    // A device that never reads keeps the drain waiting, so the window can be observed.
    let (_a, _) = Client::register(&server, "fam", "u", "a").await;
    let task = server.begin_shutdown();
    let mut saw_503 = false;
    for _ in 0..50 {
        let r = reqwest::get(format!("http://{}/readyz", server.metrics)).await.unwrap();
        if r.status() == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503);
    assert!(tokio_tungstenite::connect_async(server.ws_url()).await.is_err(), "no new connections while draining");
    let _ = tokio::time::timeout(Duration::from_secs(6), task).await.expect("exits within grace");
}

#[tokio::test]
async fn ice_servers_endpoint_returns_verifiable_credentials() {
    let server = TestServer::start().await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/ice-servers", server.http);
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client.get(&url).bearer_auth("forged.token.here").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");

    let r = client.get(&url).bearer_auth(token("fam", "u", "dev")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: serde_json::Value = r.json().await.unwrap();
    let ttl = body["iceServersTtl"].as_u64().unwrap();
    // turn.credential_ttl_secs is a day, but TURN access never outlives the 1-hour token.
    assert!((3590..=3600).contains(&ttl), "{ttl}");
    let servers = body["iceServers"].as_array().unwrap();
    // The host is the one the request used; the ports are the TURN listeners actually bound.
    let (udp, tcp) = (server.turn_udp.unwrap().port(), server.turn_tcp.unwrap().port());
    assert_eq!(servers[0]["urls"], json!([format!("stun:127.0.0.1:{udp}")]));
    let turn = &servers[1];
    assert_eq!(turn["urls"], json!([format!("turn:127.0.0.1:{udp}?transport=udp"), format!("turn:127.0.0.1:{tcp}?transport=tcp")]));
    let username = turn["username"].as_str().unwrap();
    let (expiry, rest) = username.split_once(':').unwrap();
    assert_eq!(rest, "fam:dev");
    let expiry: u64 = expiry.parse().unwrap();
    let now = kinlink::auth::unix_now();
    assert!(expiry >= now + ttl - 5 && expiry <= now + ttl + 5);
    // Independent computation of the coturn REST password, in Python's standard library.
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import hmac,hashlib,base64,sys;print(base64.b64encode(hmac.new(sys.argv[1].encode(),sys.argv[2].encode(),hashlib.sha1).digest()).decode())")
        .arg(TURN_SECRET)
        .arg(username)
        .output()
        .expect("python3 runs");
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), turn["credential"].as_str().unwrap());

    // The registered block carries the same scheme.
    let (_c, reg) = Client::register(&server, "fam", "u", "dev").await;
    assert_eq!(reg["iceServers"][1]["username"].as_str().unwrap().split_once(':').unwrap().1, "fam:dev");
    assert_eq!(server.metric(r#"kinlink_http_ice_servers_requests_total{status="401"}"#).await, 2.0);
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let server = TestServer::start().await;
    let ok = reqwest::get(format!("http://{}/healthz", server.http)).await.unwrap();
    assert_eq!(ok.status(), 200);
    let text = server.metrics_text().await;
    for name in [
        "kinlink_build_info",
        "kinlink_signal_connections",
        "kinlink_signal_devices",
        "kinlink_signal_families",
        "kinlink_signal_messages_relayed_total",
        "kinlink_signal_errors_total",
        "kinlink_auth_failures_total",
        "kinlink_signal_connections_closed_total",
        "kinlink_signal_relay_latency_seconds_bucket",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    // /metrics is not exposed on the public listener when metrics have their own.
    let r = reqwest::get(format!("http://{}/metrics", server.http)).await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode as Code, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start().await;
    let (mut c, _) = Client::register(&server, "fam", "u", "phone").await;
    c.ws.send(Message::Close(Some(CloseFrame { code: Code::Normal, reason: "bye".into() }))).await.unwrap();
    // A clean close: the server's own Close frame comes back (ws.close(1000) then ends with
    // wasClean and 1000, not 1006).
    let answer = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(f))) => return Some(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(answer, Some(Some(1000)));
}

#[tokio::test]
async fn a_one_sided_relay_is_counted_as_relay_whichever_side_reports_first() {
    // A's local candidate is a relay, B's is srflx: B alone would report "direct". Old-style
    // reports (no remoteRoute), in both orders; a direct report waits for the other side's.
    let server = TestServer::with(|c| c.signal.negotiation_settle_secs = 1).await;
    let (mut a, _) = Client::register(&server, "fam", "u", "a").await;
    let mut relay_expected = 0.0;
    let mut keep = Vec::new();
    for (i, relay_first) in [(0, true), (1, false)] {
        let peer = format!("b{i}");
        let (mut b, _) = Client::register(&server, "fam", "u", &peer).await;
        assert_eq!(a.recv().await["type"], "device-online");
        a.send(json!({"type": "offer", "toDeviceId": peer, "sdp": {"type": "offer", "sdp": "v=0\r\n"}})).await;
        assert_eq!(b.recv().await["type"], "offer");
        let from_a = json!({"type": "p2p-status", "peerDeviceId": peer, "state": "connected", "route": "relay"});
        let from_b = json!({"type": "p2p-status", "peerDeviceId": "a", "state": "connected", "route": "srflx"});
        if relay_first {
            a.send(from_a).await;
            b.send(from_b).await;
        } else {
            b.send(from_b).await;
            a.send(from_a).await;
        }
        relay_expected += 1.0;
        server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="relay"}"#, relay_expected).await;
        keep.push(b);
    }
    // A direct report nobody contradicts is counted as direct after the settle time.
    let (mut c, _) = Client::register(&server, "fam", "u", "c").await;
    assert_eq!(a.recv().await["type"], "device-online");
    a.send(json!({"type": "offer", "toDeviceId": "c", "sdp": {"type": "offer", "sdp": "v=0\r\n"}})).await;
    assert_eq!(c.recv().await["type"], "offer");
    c.send(json!({"type": "p2p-status", "peerDeviceId": "a", "state": "connected", "route": "host"})).await;
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="direct"}"#, 1.0).await;
    assert_eq!(server.metric(r#"kinlink_p2p_negotiations_total{outcome="relay"}"#).await, 2.0);
}
