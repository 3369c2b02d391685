//! The TypeScript client across real NATs: tests/nat/testbed.sh builds network namespaces
//! (two client LANs behind their own NAT routers, kinlink behind a 1:1 NAT learning its public
//! address by STUN from coturn, `turn.public_ip = "stun:…"`), and each case runs one device in
//! each client namespace (Node on libwebrtc, clients/js/test/nat-peer.mjs; Chromium for TURN
//! over TLS, which libwebrtc outside a browser only accepts with a publicly trusted certificate).
//! Each case checks the route both devices took and that kinlink's
//! `kinlink_p2p_negotiations_total{outcome}` counts the route the bytes took, whichever side
//! reports (one-sided cases run once with only each side reporting).
//!
//! Root, iproute2 and iptables are needed (scripts/test installs iptables); `NAT_ROUNDS=n`
//! repeats every run n times (bench/nat_connect.sh uses it for the time-to-connected medians).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TOKEN_SECRET, TURN_SECRET};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

struct Testbed {
    prefix: String,
    dir: PathBuf,
    /// The STUN server and kinlink, stopped on drop.
    daemons: Vec<Child>,
}

impl Testbed {
    /// Builds the namespaces with NAT kinds `a` and `b`, starts the STUN server and kinlink.
    fn up(a: &str, b: &str) -> Testbed {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("kl{}n{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(format!("kinlink-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut tb = Testbed { prefix, dir, daemons: Vec::new() };
        tb.script(&["up", a, b]);
        // kinlink's public_ip comes from this STUN server, as from a public one.
        let stun = tb.spawn("inet", "turnserver", &["-n", "--stun-only", "-L", "11.0.0.1", "-p", "3478", "--no-cli", "--no-tls", "--no-dtls", "--log-file", "stdout"]);
        tb.daemons.push(stun);
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kinlink", "-addext", "subjectAltName=IP:11.0.3.2"])
            .arg("-keyout")
            .arg(tb.dir.join("key.pem"))
            .arg("-out")
            .arg(tb.dir.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success());
        let set = |kv: String| ["--set".to_string(), kv];
        let mut args: Vec<String> = vec![];
        for kv in [
            format!("auth.token_secret={TOKEN_SECRET}"),
            format!("turn.secret={TURN_SECRET}"),
            "http.listen=0.0.0.0:8080".into(),
            "metrics.listen=127.0.0.1:9090".into(),
            "turn.udp_listen=10.0.3.2:3478".into(),
            "turn.tcp_listen=10.0.3.2:3478".into(),
            "turn.tls_listen=10.0.3.2:443".into(),
            format!("turn.tls_cert={}", tb.dir.join("cert.pem").display()),
            format!("turn.tls_key={}", tb.dir.join("key.pem").display()),
            "turn.public_ip=stun:11.0.0.1:3478".into(),
            format!("data_dir={}", tb.dir.join("data").display()),
        ] {
            args.extend(set(kv));
        }
        let log = std::fs::File::create(tb.dir.join("kinlink.log")).unwrap();
        let kinlink = Command::new("ip")
            .args(["netns", "exec", &tb.ns("srv"), env!("CARGO_BIN_EXE_kinlink")])
            .args(&args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("kinlink starts");
        tb.daemons.push(kinlink);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tb.curl("http://127.0.0.1:8080/readyz").starts_with("ready") {
            assert!(Instant::now() < deadline, "kinlink not ready: {}", std::fs::read_to_string(tb.dir.join("kinlink.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(tb.dir.join("kinlink.log")).unwrap();
        assert!(log.contains("from STUN") && log.contains("m11.0.3.2") || log.contains("=11.0.3.2"), "public address learned by STUN through the 1:1 NAT: {log}");
        tb
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn script(&self, args: &[&str]) {
        let out = Command::new("bash").arg(format!("{ROOT}/tests/nat/testbed.sh")).arg(args[0]).arg(&self.prefix).args(&args[1..]).output().expect("bash runs");
        assert!(out.status.success(), "testbed.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn spawn(&self, ns: &str, program: &str, args: &[&str]) -> Child {
        Command::new("ip").args(["netns", "exec", &self.ns(ns), program]).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }

    fn curl(&self, url: &str) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.ns("srv"), "curl", "-s", "--max-time", "2", url]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn metric(&self, sample: &str) -> f64 {
        common::metric_value(&self.curl("http://127.0.0.1:9090/metrics"), sample).unwrap_or_else(|| panic!("{sample} not in /metrics"))
    }

    /// Waits until `kinlink_p2p_negotiations_total{outcome}` reaches `want`.
    fn wait_outcome(&self, outcome: &str, want: f64) {
        let sample = format!(r#"kinlink_p2p_negotiations_total{{outcome="{outcome}"}}"#);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.metric(&sample);
            if v == want {
                return;
            }
            assert!(Instant::now() < deadline, "{sample} = {v}, want {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One device in client namespace `ns` (clia/clib) on libwebrtc.
    fn device(&self, ns: &str, family: &str, me: &str, peer: &str, report: bool, unavailable_ms: u32) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns), "node"]).args(common::js::websocket_flag());
        cmd.args(["test/nat-peer.mjs", "ws://11.0.3.2:8080/signal", family, me, peer, if report { "yes" } else { "no" }, &unavailable_ms.to_string()])
            .current_dir(common::js::DIR)
            .env("KL_TEST_TOKEN_SECRET", TOKEN_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs")
    }

    /// One device in Chromium (examples/web's page), for TURN over TLS with a private CA.
    fn chromium(&self, ns: &str, family: &str, me: &str, peer: &str, report: bool) -> Child {
        let token = common::token(family, &format!("user-{me}"), me);
        Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "node", &format!("{ROOT}/tests/nat/chromium-peer.mjs"), "ws://11.0.3.2:8080/signal", &token, peer])
            .arg(if report { "yes" } else { "no" })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        self.script(&["down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn result(out: Output) -> Value {
    common::js::result(&String::from_utf8_lossy(&out.stdout), &String::from_utf8_lossy(&out.stderr))
}

fn rounds() -> usize {
    std::env::var("NAT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// What each side may see (its `via`), and the outcome kinlink must count.
struct Expect {
    via_a: &'static [&'static str],
    via_b: &'static [&'static str],
    outcome: &'static str,
}

/// Runs A and B `rounds()` times per reporting mode and checks routes and the count.
/// `reporters`: which sides report p2p-status in each run ("ab", "a", "b").
fn run(case: &str, nat_a: &str, nat_b: &str, chromium_a: bool, reporters: &[&str], unavailable_ms: u32, want: Expect) {
    common::js::build();
    // Same LAN: both devices in A's namespace (B's NAT is built but unused).
    let tb = Testbed::up(nat_a, if nat_b == "lan" { "port-restricted" } else { nat_b });
    let (ns_a, ns_b) = if nat_b == "lan" { ("clia", "clia") } else { ("clia", "clib") };
    let mut counted = std::collections::HashMap::<&str, f64>::new();
    for round in 0..rounds() {
        for who in reporters {
            let family = format!("fam-{case}-{round}-{who}");
            let (ra, rb) = (who.contains('a'), who.contains('b'));
            let a = if chromium_a { tb.chromium(ns_a, &family, "a", "b", ra) } else { tb.device(ns_a, &family, "a", "b", ra, unavailable_ms) };
            let b = tb.device(ns_b, &family, "b", "a", rb, unavailable_ms);
            let (a, b) = (result(a.wait_with_output().unwrap()), result(b.wait_with_output().unwrap()));
            for (side, r, via) in [("a", &a, want.via_a), ("b", &b, want.via_b)] {
                let got = if r["unavailable"] == true { "unavailable" } else { r["status"]["route"]["via"].as_str().unwrap_or("none") };
                assert!(via.contains(&got), "{case} ({who} reporting): {side} went {got}, want one of {via:?}: {r:#}");
            }
            // The bytes crossed TURN exactly when either end of the pair is a relay candidate.
            let relayed = [&a, &b].iter().any(|r| r["status"]["route"]["local"] == "relay" || r["status"]["route"]["remote"] == "relay");
            assert_eq!(relayed, want.outcome == "relay", "{case}: {a:#} {b:#}");
            let outcome = want.outcome;
            let n = counted.entry(outcome).or_default();
            *n += 1.0;
            tb.wait_outcome(outcome, *n);
            eprintln!("nat-connect case={case} reporters={who} a={} b={} a_ms={} b_ms={}", a["status"]["route"]["via"], b["status"]["route"]["via"], a["connectMs"], b["connectMs"]);
        }
    }
    for outcome in ["direct", "relay", "http_fallback", "abandoned"] {
        let want = counted.get(outcome).copied().unwrap_or(0.0);
        assert_eq!(tb.metric(&format!(r#"kinlink_p2p_negotiations_total{{outcome="{outcome}"}}"#)), want, "{case}: {outcome} counted exactly for the runs that took it");
    }
    if counted.contains_key("relay") {
        assert!(tb.metric(r#"kinlink_turn_relayed_bytes_total{direction="client_to_peer"}"#) > 1000.0, "{case}: the bytes crossed kinlink's relay");
    }
}

/// What the side that does not relay shows when the other one does: its local candidate is
/// srflx, the remote one a relay, and `via` says relay (every byte crosses TURN).
const SEES_PEERS_RELAY: &[&str] = &["relay-udp"];

#[test]
fn same_lan_connects_directly_over_host_candidates() {
    run("lan", "port-restricted", "lan", false, &["ab"], 12_000, Expect { via_a: &["host"], via_b: &["host"], outcome: "direct" });
}

#[test]
fn full_cone_and_port_restricted_nats_connect_directly() {
    run("full-cone", "full-cone", "full-cone", false, &["ab"], 12_000, Expect { via_a: &["srflx", "prflx"], via_b: &["srflx", "prflx"], outcome: "direct" });
    run("cone-restricted", "full-cone", "port-restricted", false, &["ab"], 12_000, Expect { via_a: &["srflx", "prflx"], via_b: &["srflx", "prflx"], outcome: "direct" });
    run("port-restricted", "port-restricted", "port-restricted", false, &["ab"], 12_000, Expect { via_a: &["srflx", "prflx"], via_b: &["srflx", "prflx"], outcome: "direct" });
}

#[test]
fn symmetric_nats_relay_over_udp_and_count_relay_whichever_side_reports() {
    // Both symmetric: at least one side relays (ICE may pair one side's srflx with the other's
    // relay), and the negotiation is relay from either side's report alone.
    run("symmetric", "symmetric", "symmetric", false, &["a", "b"], 12_000, Expect { via_a: &["relay-udp"], via_b: &["relay-udp"], outcome: "relay" });
}

#[test]
fn udp_blocked_relays_over_tcp_and_counts_relay_whichever_side_reports() {
    run("udp-blocked", "udp-blocked", "port-restricted", false, &["a", "b"], 12_000, Expect { via_a: &["relay-tcp"], via_b: SEES_PEERS_RELAY, outcome: "relay" });
}

#[test]
fn only_tcp_443_relays_over_tls_and_counts_relay_whichever_side_reports() {
    run("tcp443", "tcp443-only", "port-restricted", true, &["a", "b"], 12_000, Expect { via_a: &["relay-tls"], via_b: SEES_PEERS_RELAY, outcome: "relay" });
}

#[test]
fn only_signaling_reachable_gives_unavailable_and_http() {
    run("signaling-only", "signaling-only", "port-restricted", false, &["ab"], 6_000, Expect { via_a: &["unavailable"], via_b: &["unavailable"], outcome: "http_fallback" });
}
