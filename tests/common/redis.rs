//! A real `redis-server` (Debian package, installed by scripts/test) on a loopback port,
//! killed on drop, and one-line commands to it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` on 127.0.0.1, killed on drop.
pub struct Redis {
    pub child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        // The probe listener is closed before redis-server binds the port.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Redis::start_on(port)
    }

    pub fn start_on(port: u16) -> Redis {
        Redis::start_with(port, &["--appendonly", "no"])
    }

    /// A server on `port` with `extra` arguments (persistence, say).
    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        #[allow(clippy::zombie_processes)] // waited for by Redis's Drop
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if redis_cmd(port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
                return Redis { child, port };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not answer on {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Redis {
    /// Stops the server (SIGKILL: nothing saved, as configured anyway).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One inline command, the raw reply.
pub fn redis_cmd(port: u16, cmd: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

