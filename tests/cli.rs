//! The real `kinlink` binary: defaults with generated secrets, `kinlink token`, `config check`,
//! and SIGTERM draining.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{temp_dir, Client};
use serde_json::json;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kinlink"));
    // A developer's own KINLINK_* variables must not leak into these tests.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KINLINK_")) {
        cmd.env_remove(k);
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

struct Running {
    child: Child,
    http: SocketAddr,
    metrics: SocketAddr,
    log: std::sync::mpsc::Receiver<String>,
    /// Lines logged up to and including "kinlink serving".
    startup: Vec<String>,
}

/// Starts `kinlink serve` on port 0 with JSON logs and reads the bound addresses from them.
fn serve(data_dir: &Path, extra: &[&str]) -> Running {
    #[allow(clippy::zombie_processes)] // waited for by `Running`'s Drop
    let mut child = bin()
        .args(["--data-dir", data_dir.to_str().unwrap(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--set", "log.format=json", "--set", "turn.udp_listen=127.0.0.1:0", "--set", "turn.tcp_listen=127.0.0.1:0"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut startup = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("server logs that it is serving");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        startup.push(line);
        if v["fields"]["message"] == "kinlink serving" {
            let http = v["fields"]["http"].as_str().unwrap().parse().unwrap();
            let metrics = v["fields"]["metrics"].as_str().unwrap().parse().unwrap();
            return Running { child, http, metrics, log: rx, startup };
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed assertion must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "process did not exit in {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn defaults_generate_secrets_and_token_command_agrees() {
    let dir = temp_dir("defaults");
    let mint = |device: &str| {
        let out = bin()
            .args(["--data-dir", dir.to_str().unwrap(), "token", "--family", "fam", "--user", "u", "--device", device, "--ttl", "1h"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let token_a = mint("a");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["token_secret", "turn_secret"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    let mut server = serve(&dir, &[]);
    let warned = server.startup.clone();
    assert!(warned.iter().any(|l| l.contains("secret not configured")), "warns about generated secrets");
    // The server reuses the secret the token command generated.
    let url = format!("ws://{}/signal?token={token_a}", server.http);
    let mut a = Client::connect(&url).await;
    a.send(json!({"type":"register","familyId":"fam","userId":"u","deviceId":"a"})).await;
    let reg = a.recv().await;
    assert_eq!(reg["type"], "registered", "{reg}");
    // Secrets never reach the logs.
    let secret = std::fs::read_to_string(dir.join("token_secret")).unwrap();
    let turn_secret = std::fs::read_to_string(dir.join("turn_secret")).unwrap();
    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = server.log.try_iter().collect();
    for line in warned.iter().chain(&log) {
        assert!(!line.contains(secret.trim()) && !line.contains(turn_secret.trim()) && !line.contains(&token_a), "{line}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sigterm_drains_devices_then_exits() {
    let dir = temp_dir("sigterm");
    let token = |d: &str| {
        let out = bin().args(["--data-dir", dir.to_str().unwrap(), "token", "--family", "f", "--user", "u", "--device", d]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (ta, tb) = (token("a"), token("b"));
    let mut server = serve(&dir, &["--set", "shutdown.grace_secs=5"]);
    let mut a = Client::connect(&format!("ws://{}/signal?token={ta}", server.http)).await;
    a.send(json!({"type":"register","familyId":"f","userId":"u","deviceId":"a"})).await;
    assert_eq!(a.recv().await["type"], "registered");
    let mut b = Client::connect(&format!("ws://{}/signal?token={tb}", server.http)).await;
    b.send(json!({"type":"register","familyId":"f","userId":"u","deviceId":"b"})).await;
    assert_eq!(b.recv().await["type"], "registered");
    assert_eq!(a.recv().await["type"], "device-online");

    sigterm(&server.child);
    for c in [&mut a, &mut b] {
        let v = c.recv().await;
        // A device may first see its peer leave; the shutting-down error always comes.
        let v = if v["type"] == "device-offline" { c.recv().await } else { v };
        assert_eq!(v["code"], "shutting-down", "{v}");
        assert_eq!(c.expect_close().await, 1001);
    }
    let status = wait_exit(&mut server.child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    let _ = server.metrics;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let dir = temp_dir("second");
    let out = bin().args(["--data-dir", dir.to_str().unwrap(), "token", "--family", "f", "--user", "u", "--device", "a"]).output().unwrap();
    let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut server = serve(&dir, &["--set", "shutdown.grace_secs=60"]);
    // A device that never answers the close keeps the drain waiting.
    let mut a = Client::connect(&format!("ws://{}/signal?token={t}", server.http)).await;
    a.send(json!({"type":"register","familyId":"f","userId":"u","deviceId":"a"})).await;
    assert_eq!(a.recv().await["type"], "registered");
    sigterm(&server.child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.child.try_wait().unwrap().is_none(), "still draining");
    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(3));
    assert!(!status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_check_prints_redacted_config_and_names_bad_keys() {
    let dir = temp_dir("check");
    let file = dir.join("kinlink.toml");
    std::fs::write(&file, "[auth]\ntoken_secret = \"file-secret-0123456789abcdef\"\n[signal]\nmax_devices_per_family = 8\n").unwrap();
    let out = bin().args(["--config", file.to_str().unwrap(), "config", "check"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max_devices_per_family = 8"));
    assert!(text.contains("<redacted>") && !text.contains("file-secret"));

    // Environment wins over the file, and flags win over the environment.
    let out = bin()
        .args(["--config", file.to_str().unwrap(), "--set", "signal.rate_burst=9", "config", "check"])
        .env("KINLINK_SIGNAL__MAX_DEVICES_PER_FAMILY", "12")
        .env("KINLINK_SIGNAL__RATE_BURST", "3")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max_devices_per_family = 12") && text.contains("rate_burst = 9"), "{text}");

    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&[], &[("KINLINK_SIGNAL__MAX_FRAME_BYTES", "big")], "signal.max_frame_bytes"),
        (&[], &[("KINLINK_HTTP__LISTEN", "not-an-address")], "http.listen"),
        (&[], &[("KINLINK_SIGNAL__TYPO_KEY", "1")], "typo_key"),
        (&["--set", "turn.credential_ttl_secs=5"], &[], "turn.credential_ttl_secs"),
        (&["--set", "log.format=xml"], &[], "log.format"),
    ];
    for (args, env, key) in cases {
        let mut cmd = bin();
        cmd.args(*args).args(["config", "check"]);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(key), "error for {key}: {err}");
    }
    std::fs::write(&file, "[signal]\nmax_frame_bytez = 1\n").unwrap();
    let out = bin().args(["--config", file.to_str().unwrap(), "config", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("signal") && err.contains("max_frame_bytez"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn token_command_rejects_bad_ids() {
    let out = bin().args(["--data-dir", "/nonexistent-never-created", "token", "--family", "a:b", "--user", "u", "--device", "d"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--family"));
}

/// deploy/kinlink.example.toml loads, and mentions every key the configuration has.
#[test]
fn example_config_covers_every_key() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kinlink.example.toml");
    let cfg = kinlink::config::load_with_env(Some(&example), &[], Vec::new()).expect("example loads");
    let text = std::fs::read_to_string(&example).unwrap();
    let mut full = cfg.clone();
    full.auth.token_secret = Some(kinlink::config::Secret::new("x".repeat(16)));
    full.turn.secret = full.auth.token_secret.clone();
    full.turn.tls_cert = Some("c".into());
    full.turn.tls_key = Some("k".into());
    let table: toml::Table = toml::from_str(&full.to_redacted_toml()).unwrap();
    fn keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            match v {
                toml::Value::Table(inner) => keys(&format!("{prefix}{k}."), inner, out),
                _ => out.push(format!("{prefix}{k}")),
            }
        }
    }
    let mut all = Vec::new();
    keys("", &table, &mut all);
    assert!(all.len() > 30);
    for key in all {
        let leaf = key.rsplit('.').next().unwrap();
        let documented = text.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{leaf} =")) || l.starts_with(&format!("{leaf}="))
        });
        assert!(documented, "{key} is not in deploy/kinlink.example.toml");
    }
}
