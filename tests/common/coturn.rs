//! coturn's test tools against kinlink: `turnutils_peer` (a UDP echo peer) and
//! `turnutils_uclient` (a TURN client over UDP, TCP and TLS with REST credentials).

use std::process::Command;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::{TestServer, TURN_SECRET};

pub struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts coturn's echo peer on a free loopback port and waits until it echoes.
pub async fn coturn_peer() -> (Peer, u16) {
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    #[allow(clippy::zombie_processes)] // `Peer` waits on drop
    let child = Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("turnutils_peer (Debian package coturn) is installed");
    let child = Peer(child);
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..100 {
        probe.send_to(b"ping", ("127.0.0.1", port)).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(50), probe.recv_from(&mut buf)).await.is_ok() {
            return (child, port);
        }
    }
    panic!("turnutils_peer did not start");
}

/// Runs turnutils_uclient with REST secret auth; returns (messages received, packets lost).
pub fn uclient(extra: &[&str], turn_port: u16, peer_port: u16, clients: u32, messages: u32) -> (u64, u64, String) {
    uclient_with_secret(TURN_SECRET, extra, turn_port, peer_port, clients, messages)
}

/// [`uclient`] with credentials made from `secret`.
pub fn uclient_with_secret(secret: &str, extra: &[&str], turn_port: u16, peer_port: u16, clients: u32, messages: u32) -> (u64, u64, String) {
    let out = Command::new("turnutils_uclient")
        .args(extra)
        .args(["-W", secret, "-u", "fam:dev", "-e", "127.0.0.1", "-r", &peer_port.to_string()])
        .args(["-p", &turn_port.to_string(), "-n", &messages.to_string(), "-m", &clients.to_string(), "-l", "500", "-z", "5", "-X"])
        .arg("127.0.0.1")
        .output()
        .expect("turnutils_uclient (Debian package coturn) is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let grab = |key: &str| -> Option<u64> {
        text.lines().rev().find_map(|l| l.split(key).nth(1)).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
    };
    let received = grab("tot_recv_msgs=").unwrap_or(0);
    let lost = grab("Total lost packets ").unwrap_or(u64::MAX);
    (received, lost, text)
}

pub async fn uclient_case(server: &TestServer, extra: &'static [&'static str], turn_port: u16) {
    let (peer, peer_port) = coturn_peer().await;
    let (received, lost, text) = tokio::task::spawn_blocking(move || uclient(extra, turn_port, peer_port, 4, 25)).await.unwrap();
    drop(peer);
    if (received, lost) != (100, 0) {
        // What kinlink saw of the missing packets: its relayed and dropped packets.
        let metrics = server.metrics_text().await;
        let counts: Vec<&str> = metrics
            .lines()
            .filter(|l| (l.starts_with("kinlink_turn_dropped_packets_total") && !l.ends_with(" 0")) || l.starts_with("kinlink_turn_relayed_packets_total"))
            .collect();
        panic!("uclient {extra:?}: received {received}, lost {lost}, want (100, 0)\nkinlink: {counts:#?}\n{text}");
    }
}

