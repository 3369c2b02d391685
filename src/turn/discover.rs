//! `turn.public_ip = "stun:HOST:PORT"`: this node's public address, learned the way a client
//! learns its own: a STUN Binding request to a server outside, whose XOR-MAPPED-ADDRESS is
//! what the world sees (cloud 1:1 NAT, `hostNetwork` on a node with a private VPC address).
//! Asked at start (kinlink does not start handing out unreachable relays) and every
//! `turn.public_ip_refresh_secs`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::stun::{attr, method, Builder, Class, Message};

/// Retransmissions of the Binding request (RFC 8489 §6.2.1 doubles the RTO from 500 ms).
const TIMEOUTS_MS: [u64; 4] = [500, 1000, 2000, 4000];

/// Why no address was learned.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// The server's name does not resolve to an address of the wanted family.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// No socket.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// No answer after every retransmission.
    #[error("no answer from {0} after {1} tries")]
    Timeout(SocketAddr, usize),
    /// An answer without a usable mapped address.
    #[error("{0} answered without XOR-MAPPED-ADDRESS")]
    BadAnswer(SocketAddr),
}

/// Asks the STUN server `server` (`host:port`) for this host's address as seen from there,
/// from a socket on `bind` (the relays' IP, so the answer is their mapping).
pub async fn public_address(server: &str, bind: IpAddr) -> Result<IpAddr, DiscoverError> {
    let to = tokio::net::lookup_host(server)
        .await
        .map_err(|_| DiscoverError::Resolve(server.to_string()))?
        .find(|a| a.is_ipv6() == bind.is_ipv6())
        .ok_or_else(|| DiscoverError::Resolve(server.to_string()))?;
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(bind, 0)).await.map_err(DiscoverError::Socket)?;
    let tid: [u8; 12] = rand::random();
    let request = Builder::new(method::BINDING, Class::Request, tid).finish_with_fingerprint();
    let mut buf = vec![0u8; 1500];
    for timeout in TIMEOUTS_MS {
        let _ = socket.send_to(&request, to).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
        // Whatever else arrives (a late answer to an earlier try is fine: same transaction).
        while let Ok(Ok((n, from))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            if from != to {
                continue;
            }
            let Ok(m) = Message::parse(&buf[..n]) else { continue };
            if m.tid != tid || m.method != method::BINDING || m.class != Class::Success {
                continue;
            }
            let mapped = m.get(attr::XOR_MAPPED_ADDRESS).and_then(|v| super::stun::decode_xor_addr(v, &m.tid));
            return mapped.map(|a| a.ip()).ok_or(DiscoverError::BadAnswer(to));
        }
    }
    Err(DiscoverError::Timeout(to, TIMEOUTS_MS.len()))
}
