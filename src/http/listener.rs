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
    /// HTTPS/WSS when `http.tls_cert` and `http.tls_key` are set.
    pub tls: Option<crate::tls::Acceptor>,
}

impl HttpLimits {
    /// From `http.*`; fails when the TLS files are unusable.
    pub fn new(cfg: &crate::config::HttpConfig) -> Result<Self, crate::tls::TlsError> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::Acceptor::new(cert.clone(), key.clone(), "http")?),
            _ => None,
        };
        Ok(HttpLimits {
            header_read_timeout: Duration::from_secs(cfg.header_read_timeout_secs),
            unupgraded: ConnLimiter::new(cfg.max_unupgraded_connections, cfg.max_unupgraded_per_ip),
            per_ip: ConnLimiter::new(usize::MAX, cfg.max_connections_per_ip),
            tls,
        })
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
        let router = router.clone();
        let metrics = metrics.clone();
        let mut stop = stop.clone();
        let timeout = limits.header_read_timeout;
        let tls = limits.tls.clone();
        tokio::spawn(async move {
            metrics.http_unupgraded.inc();
            match tls {
                None => serve_connection(stream, from, hold, router, timeout, &mut stop).await,
                // The handshake shares the header-read deadline: a socket that never completes
                // it is held no longer than a silent plain one.
                Some(acceptor) => {
                    if let Some(tls) = acceptor.accept_by(stream, tokio::time::Instant::now() + timeout, &metrics).await {
                        serve_connection(tls, from, hold, router, timeout, &mut stop).await;
                    }
                }
            }
            metrics.http_unupgraded.dec();
            drop(pending);
        });
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
