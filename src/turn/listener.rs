//! The client legs: the UDP listener, and TCP/TLS streams with RFC 8656 framing. Each reads a
//! message, hands it to the core under the lock, and sends what comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Semaphore};

use super::relay::{lock, ClientSink, Core, SocketBinder};
use super::server::{ClientAction, FiveTuple, Transport};
use super::stun::{frame_len, HEADER_LEN};
use crate::metrics::Metrics;

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
}

impl Ctx {
    fn handle(&self, tuple: FiveTuple, buf: &[u8], sink: &ClientSink) -> ClientAction<super::relay::Relay> {
        let mut binder = SocketBinder {
            ports: self.ports,
            ipv4: self.relay_ipv4,
            ipv6: self.relay_ipv6,
            buffer_bytes: self.buffer_bytes,
            core: &self.core,
            sink: sink.clone(),
            metrics: &self.metrics,
        };
        lock(&self.core).handle_client(Instant::now(), tuple, buf, &mut binder)
    }
}

/// Serves STUN/TURN on a UDP socket until the task is aborted.
pub async fn serve_udp(socket: Arc<UdpSocket>, ctx: Ctx) {
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let sink = ClientSink::Udp(socket.clone());
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => continue,
        };
        let tuple = FiveTuple { client: from, server: local, transport: Transport::Udp };
        match ctx.handle(tuple, &buf[..n], &sink) {
            ClientAction::None => {}
            ClientAction::Reply(bytes) => {
                let _ = socket.send_to(&bytes, from).await;
            }
            ClientAction::Relay { relay, peer, payload } => {
                let _ = relay.socket.send_to(&buf[payload], peer).await;
            }
        }
    }
}

/// Accepts TCP connections (and, with `tls`, wraps them) until the task is aborted.
pub async fn serve_tcp(listener: TcpListener, ctx: Ctx, limit: Arc<Semaphore>, tls: Option<super::tls::Acceptor>) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    loop {
        let Ok((stream, from)) = listener.accept().await else { continue };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!("TURN stream connection refused: turn.max_stream_connections reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let tuple = FiveTuple { client: from, server: local, transport: if tls.is_some() { Transport::Tls } else { Transport::Tcp } };
            match tls {
                None => serve_stream(stream, tuple, ctx).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => serve_stream(s, tuple, ctx).await,
                    Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                },
            }
            drop(permit);
        });
    }
}

/// Frames queued for one stream client before relayed data is dropped.
const STREAM_QUEUE: usize = 512;
/// Frames written to a stream at once, at most.
const WRITE_BATCH: usize = 128;

/// One TCP/TLS client: frames in, frames out; its allocation ends with the connection.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, tuple: FiveTuple, ctx: Ctx) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
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
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match rd.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    lock(&ctx.core).handle_client_closed(Instant::now(), &tuple);
    drop(sink);
    drop(tx);
    let _ = writer.await;
}

/// The address a listener bound, for the peer policy's own-port list.
pub fn own_addresses(bound: &[SocketAddr], public_ip: Option<std::net::IpAddr>) -> Vec<SocketAddr> {
    let mut own = Vec::new();
    for a in bound {
        if a.ip().is_unspecified() {
            if let Some(ip) = public_ip {
                own.push(SocketAddr::new(ip, a.port()));
            }
        } else {
            own.push(*a);
        }
    }
    own
}
