//! Relay sockets: binding them in the configured port range for a [`BindRequest`], outside
//! any lock. The shard that reads a relay socket is chosen when its allocation starts.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use rand::Rng;

use super::server::{BindError, BindRequest, Bound, PortChoice};

/// Largest peer datagram relayed; WebRTC stays near 1200 bytes.
pub const MAX_PEER_DATAGRAM: usize = 8192;

/// An allocation's relay socket, as the core keeps it. The socket closes when the core and
/// the shard reading it have both let go.
pub type Relay = Arc<UdpSocket>;

/// Where relay sockets are bound.
#[derive(Debug, Clone)]
pub struct RelayBinder {
    /// Relay port range.
    pub ports: (u16, u16),
    /// IP to bind IPv4 relays on.
    pub ipv4: IpAddr,
    /// IP to bind IPv6 relays on.
    pub ipv6: IpAddr,
    /// Kernel buffer size.
    pub buffer_bytes: usize,
}

impl RelayBinder {
    /// Binds what `request` needs: one socket, or an even port and the odd one above it.
    pub fn bind(&self, request: &BindRequest) -> Result<Bound<Relay>, BindError> {
        if !request.pair {
            return Ok(Bound { relay: self.bind_one(request.ipv6, request.choice)?, reserved: None });
        }
        let mut last = BindError("no free port pair".into());
        for _ in 0..16 {
            let even = self.bind_one(request.ipv6, PortChoice::Even)?;
            match self.bind_one(request.ipv6, PortChoice::Exact(even.1.port().wrapping_add(1))) {
                Ok(odd) => return Ok(Bound { relay: even, reserved: Some(odd) }),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn bind_one(&self, ipv6: bool, choice: PortChoice) -> Result<(Relay, SocketAddr), BindError> {
        let ip = if ipv6 { self.ipv6 } else { self.ipv4 };
        let (lo, hi) = self.ports;
        let mut rng = rand::thread_rng();
        let mut last_err = String::from("range empty");
        // Random probing first: ports are not predictable to a peer, and a half-full range
        // still finds a free one in a few tries. Then a linear scan from a random start, so
        // the last free ports of a nearly full range are still found.
        let span = u32::from(hi - lo) + 1;
        let offset = rng.gen_range(0..span);
        let candidates = (0..64u32).map(|_| rng.gen_range(0..span)).chain((0..span).map(|i| (offset + i) % span));
        for k in candidates {
            let port = match choice {
                PortChoice::Exact(p) if (lo..=hi).contains(&p) => p,
                PortChoice::Exact(p) => return Err(BindError(format!("port {p} outside turn.relay_ports"))),
                PortChoice::Any => lo + k as u16,
                PortChoice::Even => match lo + k as u16 {
                    p if p % 2 == 0 => p,
                    p if p < hi => p + 1,
                    _ => continue,
                },
            };
            match bind_udp(SocketAddr::new(ip, port), self.buffer_bytes, false) {
                Ok(socket) => {
                    let local = socket.local_addr().map_err(|e| BindError(e.to_string()))?;
                    return Ok((Arc::new(socket), local));
                }
                Err(e) => last_err = e.to_string(),
            }
            if matches!(choice, PortChoice::Exact(_)) {
                break;
            }
        }
        Err(BindError(last_err))
    }
}

/// A non-blocking UDP socket with large kernel buffers (the `turn` crate lost packets to
/// UdpRcvbufErrors with the defaults). `reuse_port` lets one socket per shard share a
/// listener address, the kernel spreading clients over them by a hash of their address.
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize, reuse_port: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
