//! The thin tokio driver around [`Session`]: read a frame, hand it over, write what comes out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::watch;

use super::hub::{Outbound, SessionId};
use super::protocol::CloseCode;
use super::session::{JoinRequest, Output, Session, SessionEnv};

/// Why the write side gave up.
enum WriteError {
    Timeout,
    Io,
}

/// Drives one upgraded connection until it closes.
pub async fn drive(
    mut socket: WebSocket,
    env: Arc<SessionEnv>,
    id: SessionId,
    token: Option<String>,
    host: Option<String>,
    mut draining: watch::Receiver<bool>,
) {
    let metrics = env.metrics.clone();
    // Decremented on drop, so the gauge cannot drift whatever ends this task (a panic once
    // left it 68 high with no connection open).
    let _open = GaugeGuard::inc(&metrics.signal_connections);
    metrics.signal_connections_accepted.inc();
    tracing::debug!(session = id, "connection opened");
    let write_timeout = Duration::from_secs(env.limits.write_timeout_secs);
    let (tx, mut rx) = super::hub::outbound(env.limits.outbound_queue, env.limits.outbound_queue_bytes);
    let mut session = Session::new(id, env.clone(), tx, token, host, Instant::now());
    let mut drain_seen = false;
    if *draining.borrow_and_update() {
        session.handle_shutdown();
    }

    let reason: &'static str = 'conn: loop {
        while let Some(out) = session.poll_output() {
            let msg = match out {
                Output::Text(t) => Message::Text(t),
                Output::Ping => Message::Ping(Default::default()),
                Output::Close(code) => {
                    close(&mut socket, code, write_timeout).await;
                    break 'conn code.reason();
                }
                Output::Join(JoinRequest(member)) => {
                    // Nothing is read from the socket meanwhile: the join answers first.
                    let result = env.hub.join(member).await;
                    session.handle_joined(Instant::now(), result);
                    continue;
                }
            };
            if let Err(e) = write(&mut socket, msg, write_timeout).await {
                break 'conn e.reason();
            }
        }
        let deadline = tokio::time::Instant::from_std(session.poll_timeout());
        tokio::select! {
            msg = socket.recv() => match msg {
                None => break 'conn "client",
                Some(Ok(Message::Close(_))) => {
                    // The WebSocket layer has queued the answering Close frame: flush it, or
                    // the client sees 1006 (wasClean false) instead of its own 1000.
                    let _ = tokio::time::timeout(write_timeout, futures_util::SinkExt::flush(&mut socket)).await;
                    break 'conn "client";
                }
                Some(Ok(Message::Text(t))) => session.handle_text(Instant::now(), t.as_str()),
                Some(Ok(Message::Binary(b))) => session.handle_binary(Instant::now(), &b),
                Some(Ok(Message::Pong(_))) => session.handle_pong(Instant::now()),
                // Pings are answered by the WebSocket layer itself, but counted here.
                Some(Ok(Message::Ping(_))) => session.handle_ping(Instant::now()),
                Some(Err(e)) if is_too_big(&e) => session.handle_oversize(),
                Some(Err(_)) => break 'conn "error",
            },
            out = rx.recv(), if session.is_registered() => match out {
                Some(Outbound::Text { text, relayed_at }) => {
                    if let Err(e) = write(&mut socket, Message::Text(text), write_timeout).await {
                        break 'conn e.reason();
                    }
                    let now = Instant::now();
                    if let Some(at) = relayed_at {
                        metrics.signal_relay_latency.observe(now.saturating_duration_since(at).as_secs_f64());
                    }
                    session.handle_delivered(now);
                }
                // The hub dropped us: a newer connection registered this device.
                Some(Outbound::Close(code)) => {
                    close(&mut socket, code, write_timeout).await;
                    break 'conn code.reason();
                }
                None => {
                    close(&mut socket, CloseCode::Replaced, write_timeout).await;
                    break 'conn CloseCode::Replaced.reason();
                }
            },
            _ = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
            _ = draining.changed(), if !drain_seen => {
                drain_seen = true;
                session.handle_shutdown();
            }
        }
    };
    session.finish();
    metrics.signal_connections_closed.with_label_values(&[reason]).inc();
    tracing::debug!(session = id, reason, "connection closed");
}

/// One unit of a gauge, held for as long as the guard lives.
struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    fn inc(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl WriteError {
    fn reason(&self) -> &'static str {
        match self {
            WriteError::Timeout => "write_timeout",
            WriteError::Io => "error",
        }
    }
}

async fn write(socket: &mut WebSocket, msg: Message, timeout: Duration) -> Result<(), WriteError> {
    match tokio::time::timeout(timeout, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout),
    }
}

/// How long a server-initiated close waits for the client's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Sends a close frame, then reads until the client answers with its own (the closing
/// handshake). Dropping the socket with unread client data would make the kernel send a
/// RST, and the client would lose the error and close frame we just wrote.
async fn close(socket: &mut WebSocket, code: CloseCode, write_timeout: Duration) {
    let frame = Message::Close(Some(CloseFrame { code: code.code(), reason: code.reason().into() }));
    if write(socket, frame, write_timeout).await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + CLOSE_LINGER;
    // Bounded: after a framing error each read consumes input or ends the stream, but never
    // trust that with an unbounded loop.
    for _ in 0..1024 {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Err(_) => return,
            Ok(Some(_)) => continue,
        }
    }
}

/// Whether a read error is the transport refusing a frame over `signal.hard_max_frame_bytes`.
fn is_too_big(e: &axum::Error) -> bool {
    use std::error::Error;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source: Option<&(dyn Error + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(ws) = s.downcast_ref::<WsError>() {
            return matches!(ws, WsError::Capacity(_));
        }
        source = s.source();
    }
    // Fall back on the message if the error type is from another tungstenite version.
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
}
