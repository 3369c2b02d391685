//! Certificates that get themselves: Debian's `pebble` (the ACME test server) issues kinlink
//! a certificate over TLS-ALPN-01 on its shared port (pebble-challtestsrv answers pebble's DNS
//! with 127.0.0.1); then, on that one port: curl over HTTPS trusting Pebble's root, a wss://
//! registration, coturn's `turnutils_uclient` over TLS with REST credentials and plain TURN
//! over TCP; the short-lived certificate is renewed; a restart deploys it from the cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::coturn::*;
use common::*;

const DOMAIN: &str = "kinlink.test";

struct Pebble {
    children: Vec<Child>,
    /// Pebble's directory URL.
    directory: String,
    /// The CA of Pebble's own HTTPS listener (acme.ca_file).
    https_ca: PathBuf,
    management: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn openssl(args: &[&str]) {
    let ok = Command::new("openssl").args(args).stderr(Stdio::null()).status().expect("openssl runs").success();
    assert!(ok, "openssl {args:?}");
}

/// Starts pebble (validating TLS-ALPN-01 on `tls_port`, issuing certificates valid
/// `validity_secs`) and its DNS (every name is 127.0.0.1).
fn pebble(dir: &Path, tls_port: u16, validity_secs: u64) -> Pebble {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    // Pebble's own HTTPS certificate, from a throw-away CA kinlink is told to trust.
    openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pebble test CA", "-keyout", &p("ca.key"), "-out", &p("ca.pem")]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", &p("pebble.key"), "-out", &p("pebble.csr")]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(&["x509", "-req", "-in", &p("pebble.csr"), "-CA", &p("ca.pem"), "-CAkey", &p("ca.key"), "-CAcreateserial", "-days", "1", "-extfile", &p("ext.cnf"), "-out", &p("pebble.pem")]);
    let (listen, management, dns, http01) = (free_port(), free_port(), free_port(), free_port());
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{listen}"),
        "managementListenAddress": format!("127.0.0.1:{management}"),
        "certificate": p("pebble.pem"),
        "privateKey": p("pebble.key"),
        "httpPort": http01,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
        "certificateValidityPeriod": validity_secs,
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let quiet = |c: &mut Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    };
    let mut challtest = Command::new("pebble-challtestsrv");
    challtest.args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", &format!("127.0.0.1:{dns}"), "-http01", "", "-https01", "", "-tlsalpn01", ""]);
    challtest.args(["-management", &format!("127.0.0.1:{}", free_port())]);
    quiet(&mut challtest);
    let mut server = Command::new("pebble");
    server.args(["-config", &p("pebble.json"), "-dnsserver", &format!("127.0.0.1:{dns}")]);
    // No random validation delays or nonce rejections: a test, not a conformance run.
    server.env("PEBBLE_VA_NOSLEEP", "1").env("PEBBLE_WFE_NONCEREJECT", "0");
    quiet(&mut server);
    let children = vec![challtest.spawn().expect("pebble-challtestsrv (Debian package pebble)"), server.spawn().expect("pebble (Debian package pebble)")];
    let pebble = Pebble { children, directory: format!("https://127.0.0.1:{listen}/dir"), https_ca: dir.join("ca.pem"), management };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !curl(&["--cacert", &p("ca.pem"), &pebble.directory]).0 {
        assert!(Instant::now() < deadline, "pebble did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    pebble
}

/// kinlink with its HTTPS and `turns:` certificate from pebble, everything on one port.
async fn acme_server(port: u16, pebble: &Pebble, data: &Path) -> TestServer {
    let (directory, ca, data) = (pebble.directory.clone(), pebble.https_ca.clone(), data.to_path_buf());
    TestServer::with(move |c| {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        c.http.listen = addr;
        c.turn.tls_listen = kinlink::config::Listen::one(addr);
        c.turn.tcp_listen = kinlink::config::Listen::one(addr);
        c.acme.domains = vec![DOMAIN.into()];
        c.acme.contact = vec!["mailto:ops@kinlink.test".into()];
        c.acme.directory = directory;
        c.acme.ca_file = Some(ca);
        c.data_dir = data;
    })
    .await
}

async fn wait_for(server: &TestServer, sample: &str, at_least: f64, within: Duration) -> f64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = server.metric(sample).await;
        if v >= at_least {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sample} = {v}, want at least {at_least}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn pebble_issues_and_renews_a_certificate_over_tls_alpn_01_on_the_shared_port() {
    let dir = temp_dir("acme");
    let port = free_port();
    // Certificates valid 30 s: renewed a third before expiry, within the test.
    let pebble = pebble(&dir, port, 30);
    let data = dir.join("data");
    let server = acme_server(port, &pebble, &data).await;
    wait_for(&server, r#"kinlink_acme_events_total{event="deployed_new"}"#, 1.0, Duration::from_secs(60)).await;
    let expiry = server.metric("kinlink_acme_certificate_expiry_timestamp_seconds").await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(expiry > now && expiry < now + 60.0, "expiry {expiry} vs now {now}");

    // Pebble's issuing root, for the clients.
    let root = dir.join("issuer-root.pem");
    let (ok, pem) = curl(&["--cacert", pebble.https_ca.to_str().unwrap(), &format!("https://127.0.0.1:{}/roots/0", pebble.management)]);
    assert!(ok, "{pem}");
    std::fs::write(&root, &pem).unwrap();
    let root_s = root.to_str().unwrap().to_string();

    // HTTPS with the issued certificate.
    // (Blocking clients run off the runtime thread, which also runs kinlink.)
    let (ok, out) = tokio::task::spawn_blocking(move || curl(&["--cacert", &root_s, "--resolve", &format!("{DOMAIN}:{port}:127.0.0.1"), &format!("https://{DOMAIN}:{port}/healthz")]))
        .await
        .unwrap();
    assert!(ok && out.trim() == "ok", "{out}");
    // A device registers over wss:// on the same port.
    let mut device = wss_register(port, &root, DOMAIN, "fam", "u", "d").await;
    // TURN over TLS and over TCP, same port, REST credentials.
    uclient_case(&server, &["-t", "-S"], port).await;
    uclient_case(&server, &["-t"], port).await;
    for p in ["https", "turn_tls", "turn_tcp"] {
        assert!(server.metric(&format!(r#"kinlink_shared_port_connections_total{{protocol="{p}"}}"#)).await >= 1.0, "{p}");
    }
    // Renewal: a new certificate before the first one expires, served without a restart.
    let first = tokio::task::spawn_blocking(move || presented(port, Some(DOMAIN), "-fingerprint -sha256")).await.unwrap();
    wait_for(&server, r#"kinlink_acme_events_total{event="deployed_new"}"#, 2.0, Duration::from_secs(40)).await;
    let renewed = tokio::task::spawn_blocking(move || presented(port, Some(DOMAIN), "-fingerprint -sha256")).await.unwrap();
    assert_ne!(first, renewed, "the renewed certificate is served");
    assert!(server.metric("kinlink_acme_certificate_expiry_timestamp_seconds").await > expiry);
    futures_util::SinkExt::send(&mut device, tokio_tungstenite::tungstenite::Message::text(r#"{"type":"offer","toDeviceId":"x","sdp":{},"ref":2}"#)).await.unwrap();
    assert_eq!(next_json(&mut device).await["ref"], 2, "the device kept its connection through the renewal");
    drop(device);

    // A restart deploys the cached certificate (and reuses the account) at once.
    let mut server = server;
    server.begin_shutdown().await.unwrap().unwrap();
    let server = acme_server(port, &pebble, &data).await;
    wait_for(&server, r#"kinlink_acme_events_total{event="deployed_cached"}"#, 1.0, Duration::from_secs(10)).await;
    // The account key and certificate are private files.
    #[cfg(unix)]
    for entry in walk(&data.join("acme")) {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", entry.display());
    }
    drop(server);
    drop(pebble);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
