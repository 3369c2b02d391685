//! The real `kinlink` binary as a child process: `serve` on port 0 with JSON logs, read for
//! the bound addresses.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kinlink"));
    // A developer's own KINLINK_* variables must not leak into these tests.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KINLINK_")) {
        cmd.env_remove(k);
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

pub struct Running {
    pub child: Child,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    /// The admin listener, when `admin.listen` is set.
    pub admin: Option<SocketAddr>,
    pub log: std::sync::mpsc::Receiver<String>,
    /// Lines logged up to and including "kinlink serving".
    pub startup: Vec<String>,
}

/// Starts `kinlink serve` on port 0 with JSON logs and reads the bound addresses from them.
pub fn serve(data_dir: &Path, extra: &[&str]) -> Running {
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
            let admin = v["fields"]["admin"].as_str().and_then(|a| a.parse().ok());
            return Running { child, http, metrics, admin, log: rx, startup };
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

pub fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "process did not exit in {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

