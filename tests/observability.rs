//! The operator's view, checked against the real binary: the metric set passes
//! `promtool check metrics`, every metric the Grafana dashboard queries exists, the alert
//! rules pass `promtool test rules`, and a real Prometheus scraping kinlink with the recording
//! rules loaded computes the fallback rates the test's own negotiations imply.
//! Needs Debian's `prometheus` package (installed by scripts/test).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use webrtc_util::conn::Conn;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap();
    assert!(found.status.success(), "`{name}` not found: install Debian's `prometheus` package (scripts/test does)");
    Command::new(name)
}

/// Devices `a`..`e` of one family; `a` offers to each, and each reports one outcome:
/// b direct (host), c direct (srflx), d relay, e failed → 2 direct, 1 relay, 1 http_fallback.
async fn negotiate(server: &TestServer) {
    let (mut a, _) = Client::register(server, "fam", "u", "a").await;
    let reports = [
        ("b", json!({"state": "connected", "route": "host"})),
        // With the remote type, a direct report is counted at once (without it, it waits for
        // the other side's: tests/signal.rs).
        ("c", json!({"state": "connected", "route": "srflx", "remoteRoute": "host"})),
        ("d", json!({"state": "connected", "route": "relay", "connectMs": 900})),
        ("e", json!({"state": "failed"})),
    ];
    let mut peers = Vec::new();
    for (peer, report) in reports {
        let (mut p, _) = Client::register(server, "fam", "u", peer).await;
        assert_eq!(a.recv().await["type"], "device-online");
        a.send(json!({"type": "offer", "toDeviceId": peer, "sdp": {"type": "offer", "sdp": "v=0\r\n"}})).await;
        assert_eq!(p.recv().await["type"], "offer");
        let mut msg = json!({"type": "p2p-status", "peerDeviceId": "a"});
        msg.as_object_mut().unwrap().extend(report.as_object().unwrap().clone());
        p.send(msg).await;
        // The initiator reports too; it must not be counted twice.
        if peer == "b" {
            a.send(json!({"type": "p2p-status", "peerDeviceId": "b", "state": "connected", "route": "host"})).await;
        }
        peers.push(p);
    }
    // A report about a device never offered to is refused and not counted.
    a.send(json!({"type": "p2p-status", "peerDeviceId": "zz", "state": "failed"})).await;
    a.expect_error("no-negotiation").await;
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="direct"}"#, 2.0).await;
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="relay"}"#, 1.0).await;
    server.wait_metric(r#"kinlink_p2p_negotiations_total{outcome="http_fallback"}"#, 1.0).await;
    assert_eq!(server.metric(r#"kinlink_p2p_negotiations_total{outcome="abandoned"}"#).await, 0.0);
    assert_eq!(server.metric("kinlink_p2p_connect_seconds_count").await, 3.0);
}

/// A TURN allocation relaying through an echo peer, so the TURN series move.
async fn relay_some(server: &TestServer) {
    let (user, pass) = rest_credentials("fam", "a", 600);
    let client = turn_client(server.turn_udp.unwrap(), user, pass).await;
    let relay = tokio::time::timeout(WAIT, client.allocate()).await.unwrap().unwrap();
    let (peer, _) = echo_peer().await;
    let mut buf = [0u8; 64];
    relay.send_to(b"ping", peer).await.unwrap();
    tokio::time::timeout(WAIT, relay.recv_from(&mut buf)).await.unwrap().unwrap();
    client.close().await.unwrap();
}

/// Every identifier that looks like a kinlink or process metric in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("kinlink_") || word.starts_with("process_") {
                names.insert(word.clone());
            }
            word.clear();
        }
    }
    names
}

fn dashboard_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().cloned().unwrap_or_default());
        } else {
            out.push(p.clone());
        }
    }
    out
}

#[tokio::test]
async fn metrics_pass_promtool_and_cover_every_dashboard_query() {
    let server = TestServer::start().await;
    negotiate(&server).await;
    relay_some(&server).await;
    let scrape = server.metrics_text().await;

    // promtool's linter: naming, units, _total counters, help strings.
    let mut lint = tool("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");

    // Bounded labels only: never a family, device, user or IP (`shard` is bounded by
    // turn.data_threads, at most 256).
    let allowed = ["reason", "code", "type", "direction", "transport", "scope", "outcome", "status", "version", "result", "listener", "stage", "le", "shard", "op", "protocol", "event", "source", "kind"];
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line.split_once('{').map(|(_, rest)| rest.split('}').next().unwrap()) else { continue };
        for pair in labels.split(',') {
            let name = pair.split('=').next().unwrap();
            assert!(allowed.contains(&name), "label `{name}` in `{line}` is not a bounded enum");
        }
    }
    // metrics.relay_capacity_bytes_per_sec, for the bandwidth alert.
    assert_eq!(metric_value(&scrape, "kinlink_turn_relay_capacity_bytes_per_second"), Some(125_000_000.0));
    for name in ["kinlink_build_info", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
        assert!(exported.contains(name), "{name} is not exported");
    }

    let dash: Value = serde_json::from_str(&std::fs::read_to_string(repo("grafana/kinlink.json")).unwrap()).unwrap();
    // An import input no panel uses showed as a dead dropdown in Grafana's import dialog.
    for input in dash["__inputs"].as_array().into_iter().flatten() {
        let name = input["name"].as_str().unwrap();
        let text = dash.to_string();
        assert!(text.matches(&format!("${{{name}}}")).count() > 0, "__inputs declares {name}, which no panel uses");
    }
    let vars: Vec<&str> = dash["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(vars.contains(&"datasource") && vars.contains(&"instance"), "variables: {vars:?}");
    let panels = dashboard_panels(&dash);
    assert!(panels.len() >= 20, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(p["description"].as_str().is_some_and(|d| !d.is_empty()), "panel `{title}` has no description");
        assert!(p["fieldConfig"]["defaults"]["unit"].as_str().is_some_and(|u| !u.is_empty()), "panel `{title}` has no unit");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel `{title}` does not use the datasource variable");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel `{title}` has no queries"));
        assert!(!targets.is_empty(), "panel `{title}` has no queries");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("$instance"), "panel `{title}` ignores the instance variable: {expr}");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel `{title}`: no metric in {expr}");
            used.extend(names);
        }
    }
    let missing: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "dashboard queries metrics kinlink does not export: {missing:?}");
    // And the dashboard covers each part: overview, signaling, TURN, process.
    for must in ["kinlink_p2p_negotiations_total", "kinlink_signal_relay_latency_seconds_bucket", "kinlink_turn_relayed_bytes_total", "kinlink_turn_permission_denied_total", "kinlink_turn_quota_rejections_total", "process_open_fds"] {
        assert!(used.contains(must), "the dashboard does not show {must}");
    }
}

#[test]
fn alert_and_recording_rules_pass_promtool_tests() {
    let dir = repo("deploy/prometheus");
    let check = tool("promtool").args(["check", "rules", "rules.yml"]).current_dir(&dir).output().unwrap();
    assert!(check.status.success(), "{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    let test = tool("promtool").args(["test", "rules", "rules.test.yml"]).current_dir(&dir).output().unwrap();
    assert!(test.status.success(), "{}{}", String::from_utf8_lossy(&test.stdout), String::from_utf8_lossy(&test.stderr));
}

struct Prometheus(std::process::Child, PathBuf);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

async fn query(api: &str, q: &str) -> Vec<Value> {
    let url = reqwest::Url::parse_with_params(&format!("{api}/api/v1/query"), &[("query", q)]).unwrap();
    match reqwest::get(url).await {
        Ok(r) => r.json::<Value>().await.ok().and_then(|v| v["data"]["result"].as_array().cloned()).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

fn sample(v: &[Value]) -> Option<f64> {
    v.first().and_then(|s| s["value"][1].as_str()).and_then(|s| s.parse().ok())
}

#[tokio::test]
async fn real_prometheus_computes_the_fallback_rates() {
    let server = TestServer::start().await;
    let dir = temp_dir("prom");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: kinlink\n    static_configs:\n      - targets: ['{target}']\n",
        rules = repo("deploy/prometheus/rules.yml").display(),
        target = server.metrics,
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = tool("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _prom = Prometheus(child, dir);
    let api = format!("http://127.0.0.1:{port}");

    // Wait for two scrapes of the idle server, so the counters' zero is on record.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = sample(&query(&api, r#"count_over_time(up{job="kinlink"}[1m])"#).await);
        if n.is_some_and(|n| n >= 2.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Prometheus never scraped kinlink");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    negotiate(&server).await;

    // 2 direct, 1 relay, 1 http_fallback: each rate is a quarter of the decided ones.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut http, mut relay) = (None, None);
    while tokio::time::Instant::now() < deadline {
        http = sample(&query(&api, r#"job:kinlink_p2p_http_fallback_ratio:rate5m{job="kinlink"}"#).await);
        relay = sample(&query(&api, r#"job:kinlink_p2p_relay_ratio:rate5m{job="kinlink"}"#).await);
        if http.is_some_and(|v| (v - 0.25).abs() < 1e-9) && relay.is_some_and(|v| (v - 0.25).abs() < 1e-9) {
            let by_outcome = query(&api, r#"job:kinlink_p2p_negotiations:rate5m{outcome="direct"} / ignoring(outcome) job:kinlink_p2p_negotiations:rate5m{outcome="relay"}"#).await;
            assert!(sample(&by_outcome).is_some_and(|v| (v - 2.0).abs() < 1e-9), "direct/relay = {by_outcome:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("recording rules: http fallback ratio {http:?}, relay ratio {relay:?}; want 0.25 each");
}
