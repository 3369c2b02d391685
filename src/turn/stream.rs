//! The TCP and TLS client legs (RFC 8656 framing), one tokio task per connection. A
//! connection owns its one allocation: its data goes straight out of the relay socket from
//! this task, and what peers send back is framed by the shard reading the relay and queued
//! here. STUN requests go to the core through [`Control`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::outbox::Outbox;
use super::relay::Relay;
use super::server::{classify, DataCounters, DropReason, FiveTuple, Packet, Path, Transport};
use super::shard::ShardHandle;
use super::stun::{frame_len, HEADER_LEN};
use super::Control;
use crate::connlimit::{Accepting, ConnGuard, ConnLimiter};
use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;

/// What the stream listeners share.
#[derive(Clone)]
pub struct Ctx {
    /// The core.
    pub control: Control,
    /// The shards that read relay sockets; stream clients' relays are spread over them.
    pub shards: Arc<[Arc<ShardHandle>]>,
    /// The next shard to hand a relay to.
    pub next_shard: Arc<AtomicUsize>,
    /// Data-path counters of stream clients: a few sets, each connection counting into one
    /// (by its port), so connections on different cores rarely share a cache line.
    pub counters: Arc<[DataCounters]>,
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
        let Some(guard) = admit(&limit, &ctx.metrics, &log, from, label) else { continue };
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

/// Admits one TURN TCP/TLS connection (`turn.max_stream_connections`, per IP); a refusal is
/// counted and logged (rate limited: clients pace it).
fn admit(limit: &Arc<ConnLimiter>, metrics: &Metrics, log: &LogLimiter, from: std::net::SocketAddr, listener: &str) -> Option<ConnGuard> {
    match limit.admit(from.ip()) {
        Ok(g) => Some(g),
        Err(refused) => {
            metrics.connections_rejected.with_label_values(&["turn_stream", refused.label()]).inc();
            if let Some(suppressed) = log.allow(Instant::now()) {
                tracing::warn!(listener, reason = refused.label(), suppressed, "TURN stream connection refused: turn.max_stream_connections(_per_ip) reached");
            }
            None
        }
    }
}

/// TURN's side of a shared port: the HTTP listener hands it connections it recognised as
/// TURN (by ALPN or first bytes), and they are admitted and served like any TCP/TLS leg.
#[derive(Clone)]
pub struct StreamEntry {
    pub(super) ctx: Ctx,
    pub(super) limit: Arc<ConnLimiter>,
    pub(super) log: Arc<LogLimiter>,
}

impl StreamEntry {
    /// Admits and serves one connection; `accepted` starts its first-message deadline.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(&self, stream: S, tuple: FiveTuple, accepted: tokio::time::Instant) {
        let Some(guard) = admit(&self.limit, &self.ctx.metrics, &self.log, tuple.client, "shared") else { return };
        serve_stream(stream, tuple, self.ctx.clone(), accepted).await;
        drop(guard);
    }
}

/// How long client data waits for room in the relay socket's send buffer.
const SEND_WAIT: Duration = Duration::from_millis(500);

/// A writer's buffer is given back to the allocator past this size once written.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;

/// One TCP/TLS client: frames in, frames out; its allocation ends with the connection.
/// `accepted` starts the first-message deadline (the TLS handshake used part of it).
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, tuple: FiveTuple, ctx: Ctx, accepted: tokio::time::Instant) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let outbox = Arc::new(Outbox::new(ctx.stream_queue_bytes));
    let record_per_frame = tuple.transport == Transport::Tls;
    let writer = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            // Everything queued goes out together: a syscall per batch, not per 100-byte
            // frame, is what keeps a busy stream leg up with coturn's.
            let mut out = Vec::with_capacity(16 * 1024);
            while outbox.take(&mut out).await {
                if write_batch(&mut wr, &out, record_per_frame).await.is_err() {
                    break;
                }
                out.clear();
                if out.capacity() > KEEP_WRITE_BUFFER {
                    out.shrink_to(16 * 1024);
                }
            }
            // A reply waiting for room must not wait for a writer that is gone.
            outbox.close();
            let _ = wr.shutdown().await;
        }
    });
    let mut path: Option<Arc<Path<Relay>>> = None;
    let mut writable: Option<(Arc<Path<Relay>>, UdpSocket)> = None;
    let counters = &ctx.counters[tuple.client.port() as usize % ctx.counters.len()];
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
            let now = Instant::now();
            let routed = match classify(frame) {
                Packet::ChannelData => current(&mut path, &ctx.control, &tuple, counters).and_then(|p| p.channel_data(now, frame, counters).map(|r| (p, r))),
                Packet::Send(msg) => current(&mut path, &ctx.control, &tuple, counters).and_then(|p| p.send_indication(now, &msg, counters).map(|r| (p, r))),
                Packet::Control => {
                    let (reply, started) = ctx.control.request(tuple, frame);
                    if let Some(p) = started {
                        let shard = ctx.next_shard.fetch_add(1, Ordering::Relaxed) % ctx.shards.len();
                        ctx.shards[shard].start_stream_relay(p.clone(), outbox.clone());
                        path = Some(p);
                    }
                    if let Some(reply) = reply {
                        if !outbox.push_reply(&reply).await {
                            break 'conn;
                        }
                    }
                    None
                }
                Packet::Junk => None,
            };
            if let Some((p, (peer, payload))) = routed {
                send_to_peer(&p, &mut writable, &frame[payload], peer, counters).await;
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
    ctx.control.closed(&tuple);
    outbox.close();
    let _ = writer.await;
}

/// Writes a batch of frames and flushes. Over TLS each frame gets a record of its own: TLS is a
/// byte stream, but some clients (coturn's uclient among them) take one record as one frame,
/// and coturn, pion and LiveKit write a record per frame. The records still leave in one
/// syscall: writes under a server's TLS are held until the flush ([`crate::coalesce`]).
async fn write_batch<W: AsyncWrite + Unpin>(wr: &mut W, batch: &[u8], record_per_frame: bool) -> std::io::Result<()> {
    if record_per_frame {
        let mut rest = batch;
        while !rest.is_empty() {
            // The outbox holds whole frames; a length it cannot read sends the rest as is.
            let len = frame_len(rest, true).map_or(rest.len(), |l| l.min(rest.len()));
            wr.write_all(&rest[..len]).await?;
            rest = &rest[len..];
        }
    } else {
        wr.write_all(batch).await?;
    }
    wr.flush().await
}

/// Sends client data out of the relay socket. A full socket buffer is waited for: unlike a UDP
/// client, a TCP/TLS client can be slowed down (its reads pause), so nothing is dropped; the
/// wait is bounded so a stuck socket cannot hold the connection (then the datagram is dropped).
async fn send_to_peer(p: &Arc<Path<Relay>>, writable: &mut Option<(Arc<Path<Relay>>, UdpSocket)>, payload: &[u8], peer: std::net::SocketAddr, counters: &DataCounters) {
    match p.relay.send_to(payload, peer) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        _ => return,
    }
    // The relay socket is read by a shard's poller; a duplicate of its descriptor, registered
    // with tokio on first need and kept for the connection, waits for writability.
    if writable.as_ref().is_none_or(|(q, _)| !Arc::ptr_eq(q, p)) {
        *writable = p.relay.try_clone().and_then(UdpSocket::from_std).ok().map(|s| (p.clone(), s));
    }
    let sent = match writable.as_ref() {
        Some((_, socket)) => tokio::time::timeout(SEND_WAIT, socket.send_to(payload, peer)).await.is_ok_and(|r| r.is_ok()),
        None => false,
    };
    if !sent {
        counters.dropped(DropReason::SendBufferFull);
    }
}

/// This connection's allocation, live: the one it started, or the core's (a frame before
/// the allocation, or after it was replaced). `None` counts a drop.
fn current(path: &mut Option<Arc<Path<Relay>>>, control: &Control, tuple: &FiveTuple, counters: &DataCounters) -> Option<Arc<Path<Relay>>> {
    *path = control.live_path(path.as_ref(), tuple, counters);
    path.clone()
}
