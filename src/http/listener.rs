//! The HTTP listener's accept loop, served with hyper directly: every connection is admitted
//! against a per-IP cap and a cap on connections not (yet) upgraded to a WebSocket, must send
//! its request head within `http.header_read_timeout_secs`, and a failing `accept` backs off.
//! `axum::serve` offers none of these, and without them one host holding silent sockets
//! (slowloris) exhausts descriptors for TURN too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::connlimit::{Accepting, ConnGuard, ConnLimiter};
use crate::demux::{self, Protocol, Rewind, Sniff};
use crate::turn::server::{FiveTuple, Transport};
use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;

/// The admission caps and deadline of the HTTP listener (`http.*`).
#[derive(Clone)]
pub struct HttpLimits {
    /// `http.header_read_timeout_secs`.
    pub header_read_timeout: Duration,
    /// `http.max_unupgraded_connections` and `http.max_unupgraded_per_ip`.
    pub unupgraded: Arc<ConnLimiter>,
    /// `http.max_connections_per_ip` (total unbounded here: `signal.max_connections` caps
    /// WebSockets, `unupgraded` the rest).
    pub per_ip: Arc<ConnLimiter>,
    /// The TLS acceptor of this port: HTTPS/WSS when `http.tls_cert` and `http.tls_key` are
    /// set, and `turns:` too when TURN shares the port.
    pub tls: Option<crate::tls::Acceptor>,
    /// Whether HTTP itself is served over TLS (else only TURN is, on a shared port).
    pub https: bool,
    /// TURN sharing this port, if it does.
    pub share: Option<Share>,
}

/// TURN on the HTTP port (`turn.tcp_listen`/`turn.tls_listen` naming `http.listen`).
#[derive(Clone)]
pub struct Share {
    /// Where TURN connections go.
    pub turn: crate::turn::stream::StreamEntry,
    /// TURN over plain TCP is served here.
    pub tcp: bool,
    /// TURN over TLS is served here.
    pub tls: bool,
}

impl HttpLimits {
    /// From `http.*`, with this port's TLS acceptor (see [`crate::server`]).
    pub fn new(cfg: &crate::config::HttpConfig, tls: Option<crate::tls::Acceptor>, https: bool, share: Option<Share>) -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(cfg.header_read_timeout_secs),
            unupgraded: ConnLimiter::new(cfg.max_unupgraded_connections, cfg.max_unupgraded_per_ip),
            per_ip: ConnLimiter::new(usize::MAX, cfg.max_connections_per_ip),
            tls,
            https,
            share,
        }
    }
}

/// Held by a connection for as long as it is open, upgraded or not; a WebSocket handler takes
/// a clone into the upgraded session (request extension), so the per-IP count covers it.
#[derive(Clone)]
pub struct ConnHold(#[allow(dead_code)] Arc<ConnGuard>);

/// Serves `router` on `listener` until `stop` turns true; then stops accepting and asks open
/// HTTP connections to finish (upgraded WebSockets drain through their own sessions).
pub async fn serve(listener: TcpListener, router: Router, limits: HttpLimits, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut accepting = Accepting::new("http");
    let log = LogLimiter::new(Instant::now(), Duration::from_secs(1));
    let log_misrouted = Arc::new(LogLimiter::new(Instant::now(), Duration::from_secs(1)));
    loop {
        let (stream, from) = tokio::select! {
            a = accepting.accept(&listener, &metrics) => a,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        let admitted = limits.per_ip.admit(from.ip()).map_err(|_| "per_ip").and_then(|all| {
            limits.unupgraded.admit(from.ip()).map(|pending| (all, pending)).map_err(|_| "unupgraded")
        });
        let (all, pending) = match admitted {
            Ok(guards) => guards,
            Err(reason) => {
                metrics.connections_rejected.with_label_values(&["http", reason]).inc();
                if let Some(suppressed) = log.allow(Instant::now()) {
                    tracing::warn!(reason, suppressed, "HTTP connection refused: http.max_connections_per_ip / max_unupgraded_* reached");
                }
                continue;
            }
        };
        let hold = ConnHold(Arc::new(all));
        let log_misrouted = log_misrouted.clone();
        let router = router.clone();
        let metrics = metrics.clone();
        let mut stop = stop.clone();
        let timeout = limits.header_read_timeout;
        let (tls, https, share) = (limits.tls.clone(), limits.https, limits.share.clone());
        tokio::spawn(async move {
            let unupgraded = Unupgraded::new(&metrics, pending);
            // The handshake (and on a shared port, telling the protocols apart) shares the
            // header-read deadline: a socket that never gets there is held no longer than a
            // silent plain one.
            let deadline = tokio::time::Instant::now() + timeout;
            let conn = Conn { from, hold, router, timeout, deadline, metrics: &metrics };
            match (share, tls) {
                (Some(share), tls) => serve_shared(stream, conn, unupgraded, share, tls, https, &log_misrouted, &mut stop).await,
                (None, None) => serve_connection(stream, from, conn.hold, conn.router, timeout, &mut stop).await,
                (None, Some(acceptor)) => {
                    if let Some(tls) = acceptor.accept_by(stream, deadline, &metrics).await {
                        if !is_acme_challenge(&tls) {
                            serve_connection(tls, from, conn.hold, conn.router, timeout, &mut stop).await;
                        }
                    }
                }
            }
        });
    }
}

/// One accepted connection, before it is known what it speaks.
struct Conn<'a> {
    from: SocketAddr,
    hold: ConnHold,
    router: Router,
    timeout: Duration,
    deadline: tokio::time::Instant,
    metrics: &'a Metrics,
}

/// A connection on the port HTTP shares with TURN: classified by its first bytes (and, over
/// TLS, by ALPN or the first decrypted bytes), then served as HTTP(S) or handed to TURN with
/// its own admission and deadlines; anything else is closed and counted.
#[allow(clippy::too_many_arguments)]
async fn serve_shared(
    stream: tokio::net::TcpStream,
    conn: Conn<'_>,
    unupgraded: Unupgraded<'_>,
    share: Share,
    tls: Option<crate::tls::Acceptor>,
    https: bool,
    log: &LogLimiter,
    stop: &mut watch::Receiver<bool>,
) {
    let Conn { from, hold, router, timeout, deadline, metrics } = conn;
    let local = stream.local_addr().unwrap_or(from);
    // TURN legs carry small frames that must not wait for Nagle (the dedicated TURN listener
    // does the same); HTTP writes whole responses and does not mind.
    let _ = stream.set_nodelay(true);
    let count = |p: &str| metrics.shared_port_connections.with_label_values(&[p]).inc();
    let accepted = deadline - timeout;
    match tokio::time::timeout_at(deadline, demux::peek_and_sniff(&stream)).await {
        Ok(Ok(Sniff::Plain(Protocol::Http))) if !https => {
            count("http");
            serve_connection(stream, from, hold, router, timeout, stop).await;
        }
        Ok(Ok(Sniff::Plain(Protocol::Turn))) if share.tcp => {
            count("turn_tcp");
            // This is no HTTP connection: TURN's caps and deadlines apply from here.
            drop((unupgraded, hold));
            share.turn.serve(stream, FiveTuple { client: from, server: local, transport: Transport::Tcp }, accepted).await;
        }
        Ok(Ok(Sniff::Tls)) if tls.is_some() => {
            let acceptor = tls.expect("checked");
            let Some(mut tls) = acceptor.accept_by(stream, deadline, metrics).await else { return };
            if is_acme_challenge(&tls) {
                return;
            }
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            // Negotiated ALPN decides; without it, the first decrypted bytes do.
            let (protocol, prefix) = match demux::by_alpn(alpn.as_deref()) {
                Some(p) => (Some(p), Vec::new()),
                None => match tokio::time::timeout_at(deadline, demux::read_and_sniff(&mut tls)).await {
                    Ok(Ok((Sniff::Plain(p), prefix))) => (Some(p), prefix),
                    _ => (None, Vec::new()),
                },
            };
            let stream = Rewind::new(prefix, tls);
            match protocol {
                Some(Protocol::Http) if https => {
                    count("https");
                    serve_connection(stream, from, hold, router, timeout, stop).await;
                }
                Some(Protocol::Turn) if share.tls => {
                    count("turn_tls");
                    drop((unupgraded, hold));
                    share.turn.serve(stream, FiveTuple { client: from, server: local, transport: Transport::Tls }, accepted).await;
                }
                _ => misrouted(metrics, log, from),
            }
        }
        _ => misrouted(metrics, log, from),
    }
}

/// A TLS-ALPN-01 validation (RFC 8737): the handshake with the challenge certificate was the
/// whole point; the CA closes the connection.
fn is_acme_challenge(tls: &crate::tls::ServerTls) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN)
}

/// A connection not (yet) upgraded to a WebSocket: counted in the gauge and holding its
/// admission slot until dropped.
struct Unupgraded<'a>(&'a Metrics, #[allow(dead_code)] ConnGuard);

impl<'a> Unupgraded<'a> {
    fn new(metrics: &'a Metrics, pending: ConnGuard) -> Self {
        metrics.http_unupgraded.inc();
        Unupgraded(metrics, pending)
    }
}

impl Drop for Unupgraded<'_> {
    fn drop(&mut self) {
        self.0.http_unupgraded.dec();
    }
}

/// A connection on a shared port that speaks nothing served there (garbage, a plain request
/// on an HTTPS port, TLS without a certificate, a silent socket): closed and counted.
fn misrouted(metrics: &Metrics, log: &LogLimiter, from: SocketAddr) {
    metrics.shared_port_connections.with_label_values(&["unknown"]).inc();
    if let Some(suppressed) = log.allow(Instant::now()) {
        tracing::info!(%from, suppressed, "connection on the shared port closed: not a protocol served here");
    }
}

/// Serves one connection (plain or TLS) until it closes or is handed to a WebSocket.
async fn serve_connection<S>(stream: S, from: SocketAddr, hold: ConnHold, router: Router, timeout: Duration, stop: &mut watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(from));
        req.extensions_mut().insert(hold.clone());
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.oneshot(req.map(axum::body::Body::new)).await.unwrap_or_else(|e| match e {})) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    // The connection future ends when the connection closes or is handed over to a
    // WebSocket: either way it is no longer "unupgraded".
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
