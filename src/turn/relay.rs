//! Relay sockets: binding them in the configured port range, and the task per allocation
//! that reads what peers send and forwards it to the client.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::server::{BindError, Binder, FiveTuple, PortChoice, TurnServer, PEER_HEADROOM};
use crate::metrics::Metrics;

/// Largest peer datagram relayed; WebRTC stays near 1200 bytes.
pub const MAX_PEER_DATAGRAM: usize = 8192;

/// The core, shared by the listener tasks and the relay tasks. A std mutex: every section
/// is short and never crosses an `.await`.
pub type Core = Arc<Mutex<TurnServer<Relay>>>;

/// Locks the core; a panic elsewhere must not take TURN down with it.
pub fn lock(core: &Core) -> std::sync::MutexGuard<'_, TurnServer<Relay>> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

/// An allocation's relay socket. When the core drops the last handle (allocation deleted
/// or expired), the peer-reading task is aborted and the socket closes.
pub struct RelayInner {
    /// The socket peers talk to.
    pub socket: Arc<UdpSocket>,
    /// Set once an allocation owns the socket (a reserved port has no task yet).
    task: std::sync::OnceLock<AbortHandle>,
}

impl Drop for RelayInner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// Cloneable relay handle, as the core stores it.
pub type Relay = Arc<RelayInner>;

/// Where data for a client goes.
#[derive(Clone)]
pub enum ClientSink {
    /// Back through the UDP listener socket.
    Udp(Arc<UdpSocket>),
    /// Into a TCP/TLS connection's writer queue.
    Stream(StreamTx),
}

/// A TCP/TLS client's outbound queue, bounded in frames and in bytes: a client that stops
/// reading while its peers send would otherwise hold frames × 8 KiB (4 MB) each. Relayed data
/// past the bound is dropped (`try_send`: media is loss-tolerant); STUN responses wait for
/// room (`send`).
pub fn stream_queue(frames: usize, max_bytes: usize) -> (StreamTx, StreamRx) {
    crate::queue::bounded(frames, max_bytes)
}

/// The sending half of [`stream_queue`].
pub type StreamTx = crate::queue::Sender<Vec<u8>>;

/// The receiving half of [`stream_queue`].
pub type StreamRx = crate::queue::Receiver<Vec<u8>>;

/// Binds relay sockets for one client.
pub struct SocketBinder<'a> {
    /// Relay port range.
    pub ports: (u16, u16),
    /// IP to bind IPv4 relays on.
    pub ipv4: IpAddr,
    /// IP to bind IPv6 relays on.
    pub ipv6: IpAddr,
    /// Kernel buffer size.
    pub buffer_bytes: usize,
    /// For the relay task.
    pub core: &'a Core,
    /// The client's sink.
    pub sink: ClientSink,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
}

impl Binder<Relay> for SocketBinder<'_> {
    fn bind(&mut self, ipv6: bool, choice: PortChoice) -> Result<(Relay, SocketAddr), BindError> {
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
            match bind_udp(SocketAddr::new(ip, port), self.buffer_bytes) {
                Ok(socket) => {
                    let local = socket.local_addr().map_err(|e| BindError(e.to_string()))?;
                    return Ok((Arc::new(RelayInner { socket: Arc::new(socket), task: std::sync::OnceLock::new() }), local));
                }
                Err(e) => last_err = e.to_string(),
            }
            if matches!(choice, PortChoice::Exact(_)) {
                break;
            }
        }
        Err(BindError(last_err))
    }

    fn start(&mut self, relay: &Relay, tuple: FiveTuple) {
        let task = tokio::spawn(peer_loop(relay.socket.clone(), tuple, self.core.clone(), self.sink.clone(), self.metrics.clone()));
        if relay.task.set(task.abort_handle()).is_err() {
            task.abort();
        }
    }
}

/// A non-blocking UDP socket with large kernel buffers (the `turn` crate lost packets to
/// UdpRcvbufErrors with the defaults).
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Reads peer datagrams for one allocation and forwards what the core frames.
async fn peer_loop(socket: Arc<UdpSocket>, tuple: FiveTuple, core: Core, sink: ClientSink, metrics: Arc<Metrics>) {
    // One byte more than the largest datagram relayed: a read that fills it was truncated by
    // the kernel, and a truncated payload must not be relayed as if it were whole.
    let mut buf = vec![0u8; PEER_HEADROOM + MAX_PEER_DATAGRAM + 1 + 4];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf[PEER_HEADROOM..PEER_HEADROOM + MAX_PEER_DATAGRAM + 1]).await {
            Ok(r) => r,
            // ICMP errors surface as recv errors on some platforms: keep going.
            Err(_) => continue,
        };
        if n > MAX_PEER_DATAGRAM {
            metrics.turn_dropped.with_label_values(&["too_large"]).inc();
            continue;
        }
        let framed = lock(&core).handle_peer(Instant::now(), &tuple, peer, &mut buf, n);
        let Some(range) = framed else { continue };
        match &sink {
            ClientSink::Udp(listener) => {
                let _ = listener.send_to(&buf[range], tuple.client).await;
            }
            ClientSink::Stream(tx) => {
                if tx.try_send(buf[range].to_vec()).is_err() {
                    metrics.turn_dropped.with_label_values(&["queue_full"]).inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_clients_queue_is_bounded_in_bytes() {
        let (tx, mut rx) = stream_queue(512, 10_000);
        // 512 frames of 1,200 bytes would be 600 KB: the byte bound stops it at 10 KB.
        let accepted = (0..512).filter(|_| tx.try_send(vec![0u8; 1200]).is_ok()).count();
        assert_eq!(accepted, 8);
        // Responses still get through (and count), and reading gives the room back.
        tx.send(vec![1u8; 100]).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 128).await, 9);
        assert!(tx.try_send(vec![0u8; 1200]).is_ok());
    }
}
