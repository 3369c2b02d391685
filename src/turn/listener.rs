//! The client legs: the UDP listener, and TCP/TLS streams with RFC 8656 framing. Each reads a
//! message, hands it to the core under the lock, and sends what comes back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::policy::{Cidr, OwnAddr};
use super::relay::{lock, ClientSink, Core, SocketBinder};
use super::server::{ClientAction, FiveTuple, Transport};
use super::stun::{frame_len, HEADER_LEN};
use crate::connlimit::{Accepting, ConnLimiter};
use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;

/// What the listeners share.
#[derive(Clone)]
pub struct Ctx {
    /// The core.
    pub core: Core,
    /// Relay port range.
    pub ports: (u16, u16),
    /// Relay bind IPs.
    pub relay_ipv4: std::net::IpAddr,
    /// Relay bind IPs.
    pub relay_ipv6: std::net::IpAddr,
    /// Kernel buffer size for relay sockets.
    pub buffer_bytes: usize,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Deadlines of TCP/TLS clients.
    pub stream_timeouts: StreamTimeouts,
    /// `turn.stream_queue_bytes`: data queued for one TCP/TLS client.
    pub stream_queue_bytes: usize,
}

/// Deadlines that bound what a TCP/TLS client can hold without sending anything useful.
#[derive(Debug, Clone, Copy)]
pub struct StreamTimeouts {
    /// TLS handshake plus the first complete message; also the time to finish a started frame.
    pub handshake: Duration,
    /// No complete frame for this long closes the connection.
    pub idle: Duration,
}

impl Ctx {
    fn binder(&self, sink: &ClientSink) -> SocketBinder<'_> {
        SocketBinder {
            ports: self.ports,
            ipv4: self.relay_ipv4,
            ipv6: self.relay_ipv6,
            buffer_bytes: self.buffer_bytes,
            core: &self.core,
            sink: sink.clone(),
            metrics: &self.metrics,
        }
    }

    fn handle(&self, tuple: FiveTuple, buf: &[u8], sink: &ClientSink) -> ClientAction<super::relay::Relay> {
        let mut binder = self.binder(sink);
        lock(&self.core).handle_client(Instant::now(), tuple, buf, &mut binder)
    }
}

/// Datagrams read per `recvmmsg` call on the UDP listener.
const UDP_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Bytes per receive slot: a GRO-coalesced read holds up to 64 KiB of same-sized datagrams.
const UDP_SLOT: usize = 64 * 1024;

/// Serves STUN/TURN on a UDP socket until the task is aborted. Every client shares this
/// socket, so it is read in batches (`recvmmsg`, with GRO where the kernel offers it):
/// measured in BENCHMARKS.md against one `recv_from` per packet.
pub async fn serve_udp(socket: Arc<UdpSocket>, ctx: Ctx) {
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "TURN UDP listener: cannot set up batched reads");
            return;
        }
    };
    let sink = ClientSink::Udp(socket.clone());
    let mut storage = vec![0u8; UDP_SLOT * UDP_BATCH];
    let mut meta = vec![quinn_udp::RecvMeta::default(); UDP_BATCH];
    let mut out: Vec<(SocketAddr, Outgoing)> = Vec::with_capacity(UDP_BATCH);
    loop {
        let read = socket
            .async_io(tokio::io::Interest::READABLE, || {
                let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage.chunks_mut(UDP_SLOT).map(std::io::IoSliceMut::new).collect();
                state.recv((&*socket).into(), &mut bufs, &mut meta)
            })
            .await;
        let n = match read {
            Ok(n) => n,
            // ICMP errors and the like: keep serving.
            Err(_) => continue,
        };
        let mut binder = ctx.binder(&sink);
        let now = Instant::now();
        for (i, m) in meta.iter().enumerate().take(n) {
            let slot = i * UDP_SLOT;
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let tuple = FiveTuple { client: m.addr, server: local, transport: Transport::Udp };
            let mut at = slot;
            while at < slot + m.len {
                let end = (at + stride).min(slot + m.len);
                // The core is locked per datagram, not per batch: relay tasks (peer → client)
                // contend for it, and a batch-long hold stalled them on the other worker.
                let action = lock(&ctx.core).handle_client(now, tuple, &storage[at..end], &mut binder);
                match action {
                    ClientAction::None => {}
                    ClientAction::Reply(bytes) => out.push((m.addr, Outgoing::Reply(bytes))),
                    ClientAction::Relay { relay, peer, payload } => {
                        let range = at + payload.start..at + payload.end;
                        // Sent at once when the socket has room; queued for an awaited send otherwise.
                        if let Err(e) = relay.socket.try_send_to(&storage[range.clone()], peer) {
                            if e.kind() == std::io::ErrorKind::WouldBlock {
                                out.push((peer, Outgoing::Relay(relay, range)));
                            }
                        }
                    }
                }
                at = end;
            }
        }
        for (to, o) in out.drain(..) {
            let _ = match o {
                Outgoing::Reply(bytes) => socket.send_to(&bytes, to).await,
                Outgoing::Relay(relay, range) => relay.socket.send_to(&storage[range], to).await,
            };
        }
    }
}

/// What a batch of client datagrams still has to send after the batch.
enum Outgoing {
    /// A STUN response to the client.
    Reply(Vec<u8>),
    /// A payload (a range of the receive storage) to a peer through a relay socket.
    Relay(super::relay::Relay, std::ops::Range<usize>),
}

/// Accepts TCP connections (and, with `tls`, wraps them) until the task is aborted.
/// Admission (`turn.max_stream_connections`, per IP) happens right after `accept`, and a
/// failing `accept` (out of descriptors) backs off instead of spinning (as mini-redis does).
pub async fn serve_tcp(listener: Arc<TcpListener>, ctx: Ctx, limit: Arc<ConnLimiter>, tls: Option<crate::tls::Acceptor>) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let label = if tls.is_some() { "turn_tls" } else { "turn_tcp" };
    let mut accepting = Accepting::new(label);
    let log = LogLimiter::new(Instant::now(), Duration::from_secs(1));
    loop {
        let (stream, from) = accepting.accept(&listener, &ctx.metrics).await;
        let guard = match limit.admit(from.ip()) {
            Ok(g) => g,
            Err(refused) => {
                ctx.metrics.connections_rejected.with_label_values(&["turn_stream", refused.label()]).inc();
                if let Some(suppressed) = log.allow(Instant::now()) {
                    tracing::warn!(listener = label, reason = refused.label(), suppressed, "TURN stream connection refused: turn.max_stream_connections(_per_ip) reached");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let tuple = FiveTuple { client: from, server: local, transport: if tls.is_some() { Transport::Tls } else { Transport::Tcp } };
            let accepted = tokio::time::Instant::now();
            match tls {
                None => serve_stream(stream, tuple, ctx, accepted).await,
                Some(acceptor) => {
                    if let Some(s) = acceptor.accept_by(stream, accepted + ctx.stream_timeouts.handshake, &ctx.metrics).await {
                        serve_stream(s, tuple, ctx, accepted).await;
                    }
                }
            }
            drop(guard);
        });
    }
}

/// Frames queued for one stream client before relayed data is dropped.
const STREAM_QUEUE: usize = 512;
/// Frames written to a stream at once, at most.
const WRITE_BATCH: usize = 128;

/// One TCP/TLS client: frames in, frames out; its allocation ends with the connection.
/// `accepted` starts the first-message deadline (the TLS handshake used part of it).
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, tuple: FiveTuple, ctx: Ctx, accepted: tokio::time::Instant) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = super::relay::stream_queue(STREAM_QUEUE, ctx.stream_queue_bytes);
    let writer = tokio::spawn(async move {
        // Everything queued goes out in one write: a syscall (and a TLS record) per batch,
        // not per 100-byte frame, is what keeps a busy stream leg up with coturn's.
        let mut frames = Vec::with_capacity(WRITE_BATCH);
        let mut out = Vec::with_capacity(16 * 1024);
        while rx.recv_many(&mut frames, WRITE_BATCH).await > 0 {
            out.clear();
            frames.drain(..).for_each(|f| out.extend_from_slice(&f));
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let sink = ClientSink::Stream(tx.clone());
    let mut buf = vec![0u8; 4096];
    let mut filled = 0usize;
    let timeouts = ctx.stream_timeouts;
    // Until the first complete frame: the first-message deadline. Then the idle deadline from
    // the last complete frame, or the frame deadline from the first byte of an unfinished one.
    let mut last_frame: Option<tokio::time::Instant> = None;
    let mut partial_since: Option<tokio::time::Instant> = None;
    'conn: loop {
        // Handle every complete frame in the buffer.
        let mut start = 0;
        while let Some(len) = frame_len(&buf[start..filled], true) {
            if len > 65536 + HEADER_LEN {
                break 'conn;
            }
            if filled - start < len {
                if buf.len() < len {
                    buf.resize(len.max(buf.len() * 2), 0);
                }
                break;
            }
            let frame = &buf[start..start + len];
            match ctx.handle(tuple, frame, &sink) {
                ClientAction::None => {}
                ClientAction::Reply(bytes) => {
                    if tx.send(bytes).await.is_err() {
                        break 'conn;
                    }
                }
                ClientAction::Relay { relay, peer, payload } => {
                    let _ = relay.socket.send_to(&frame[payload], peer).await;
                }
            }
            start += len;
        }
        if start > 0 {
            last_frame = Some(tokio::time::Instant::now());
            partial_since = None;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled > 0 && partial_since.is_none() {
            partial_since = Some(tokio::time::Instant::now());
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let (deadline, stage) = match (last_frame, partial_since) {
            (None, _) => (accepted + timeouts.handshake, "first_message"),
            (Some(_), Some(since)) => (since + timeouts.handshake, "frame"),
            (Some(last), None) => (last + timeouts.idle, "idle"),
        };
        match tokio::time::timeout_at(deadline, rd.read(&mut buf[filled..])).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => filled += n,
            Err(_) => {
                ctx.metrics.turn_stream_timeouts.with_label_values(&[stage]).inc();
                tracing::debug!(stage, "TURN stream client timed out");
                break;
            }
        }
    }
    lock(&ctx.core).handle_client_closed(Instant::now(), &tuple);
    drop(sink);
    drop(tx);
    let _ = writer.await;
}

/// kinlink's own sockets as a peer could address them, for the peer policy. A specific listen
/// address is reachable on that address; a wildcard one on every local address: every
/// interface's (IPv4 and IPv6), all of loopback, the unspecified address (which reaches the
/// host on Linux), and `extra` (the public IP and the relay IPs, which may be NATed to us).
pub fn own_addresses(bound: &[SocketAddr], extra: &[IpAddr]) -> Vec<OwnAddr> {
    let mut local: Vec<Cidr> = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"].iter().map(|c| c.parse().expect("built-in CIDR")).collect();
    match if_addrs::get_if_addrs() {
        Ok(ifs) => local.extend(ifs.iter().map(|i| Cidr::host(i.ip()))),
        Err(e) => tracing::warn!(error = %e, "cannot list local interfaces: only loopback and turn.public_ip are denied as own addresses"),
    }
    local.extend(extra.iter().map(|ip| Cidr::host(*ip)));
    local.dedup();
    bound
        .iter()
        .map(|a| {
            let ips = if a.ip().is_unspecified() {
                local.clone()
            } else {
                let mut ips = vec![Cidr::host(a.ip())];
                ips.extend(extra.iter().map(|ip| Cidr::host(*ip)));
                ips
            };
            OwnAddr { ips, port: a.port() }
        })
        .collect()
}
