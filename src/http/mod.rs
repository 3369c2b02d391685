//! HTTP routes: the `/signal` WebSocket upgrade, `GET /v1/ice-servers`, health, readiness and
//! metrics. `app` and `metrics_app` are plain routers, so tests can also call them directly;
//! [`listener`] serves them with admission caps and a header-read timeout.

pub mod listener;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::Extension;
use std::net::SocketAddr;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};

use crate::auth;
use crate::signal::protocol::{ErrorCode, ServerMsg};
use crate::signal::session::SessionEnv;

/// Shared state of the HTTP side.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] holds.
pub struct Shared {
    /// Everything a signaling session needs.
    pub env: Arc<SessionEnv>,
    /// One permit per open WebSocket (`signal.max_connections`).
    pub connections: Arc<Semaphore>,
    /// Flips to true when the server starts draining.
    pub draining: watch::Receiver<bool>,
    /// True once listeners are bound, false while draining.
    pub ready: AtomicBool,
    /// The self-check's token minter.
    pub check: crate::check::Minter,
    /// The listener tasks, for `/readyz`.
    pub health: Arc<crate::health::Health>,
    /// `http.cors_origins`.
    pub cors_origins: Vec<String>,
    next_session: AtomicU64,
}

impl AppState {
    /// New state; `ready` starts false until the server has bound its listeners.
    pub fn new(
        env: Arc<SessionEnv>,
        draining: watch::Receiver<bool>,
        check: crate::check::Minter,
        health: Arc<crate::health::Health>,
        cors_origins: Vec<String>,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(env.limits.max_connections));
        AppState(Arc::new(Shared {
            env,
            connections,
            draining,
            ready: AtomicBool::new(false),
            check,
            health,
            cors_origins,
            next_session: AtomicU64::new(1),
        }))
    }

    /// The shared parts.
    pub fn shared(&self) -> &Shared {
        &self.0
    }
}

/// The public router: `/signal`, `/v1/ice-servers`, `/healthz`, `/readyz`, plus `/metrics`
/// when `with_metrics` (no separate metrics listener).
pub fn app(state: AppState, with_metrics: bool) -> Router {
    let mut router = Router::new()
        .route("/", get(index))
        .route("/signal", get(signal))
        .route("/v1/ice-servers", get(ice_servers))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if with_metrics {
        router = router.route("/metrics", get(metrics));
    }
    if state.shared().check.enabled() {
        router = router.route("/check", get(check_page)).route("/v1/check/tokens", axum::routing::post(check_tokens));
    }
    let cors = cors(&state.shared().cors_origins);
    router.layer(cors).with_state(state)
}

/// CORS for `http.cors_origins`: browsers on those origins may call the JSON endpoints with
/// a bearer token (preflight answered, `Authorization` allowed). No origins: no CORS headers,
/// so cross-origin pages cannot read the answers.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| header::HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

/// The metrics listener's router: `/metrics`, `/healthz`, `/readyz`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// What a person opening the server's address in a browser sees.
async fn index(State(st): State<AppState>) -> Response {
    let check = if st.shared().check.enabled() {
        r#"<li><a href="/check">/check</a>: prove this deployment from your browser (signaling, STUN, TURN, a WebRTC data channel)</li>"#
    } else {
        ""
    };
    let page = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>kinlink</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 2em auto; line-height: 1.5">
<h1>kinlink {version}</h1>
<p>A signaling relay and TURN/STUN server that lets the devices of a family find each other and talk peer to peer.
This address is an API for apps, not a website.</p>
<ul>
{check}
<li><code>/signal</code>: the WebSocket devices connect to (with a device token)</li>
<li><code>/v1/ice-servers</code>: STUN/TURN servers and credentials for a bearer device token</li>
<li><a href="/healthz">/healthz</a>, <a href="/readyz">/readyz</a>: health</li>
</ul>
<p>Documentation: <a href="https://github.com/kinlink/kinlink#readme">README</a>,
<a href="https://github.com/kinlink/kinlink/blob/main/docs/protocol.md">protocol</a>,
<a href="https://github.com/kinlink/kinlink/blob/main/docs/deploy.md">deployment</a>.</p>
</body></html>
"#,
        version = env!("CARGO_PKG_VERSION"),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'; base-uri 'none'; form-action 'none'"),
        ],
        page,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 "ready" with every listener task listed; 503 while starting, draining, or while a
/// listener is down (its supervisor restarts it).
async fn readyz(State(st): State<AppState>) -> Response {
    let s = st.shared();
    let listeners = s.health.listeners();
    let mut body = String::new();
    for (name, up) in &listeners {
        body.push_str(&format!("{name}: {}\n", if *up { "up" } else { "down" }));
    }
    if !s.ready.load(Ordering::Relaxed) || *s.draining.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{body}")).into_response()
    } else if listeners.iter().any(|(_, up)| !up) {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: a listener is down\n{body}")).into_response()
    } else {
        format!("ready\n{body}").into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.shared().env.metrics.render()).into_response()
}

async fn check_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Inline script and style only; talks to this origin alone.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'",
            ),
        ],
        crate::check::PAGE,
    )
        .into_response()
}

async fn check_tokens(State(st): State<AppState>, peer: Option<Extension<ConnectInfo<SocketAddr>>>, headers: HeaderMap) -> Response {
    use crate::check::MintError;
    let s = st.shared();
    let env = &s.env;
    let ip = peer.map(|p| p.0 .0.ip());
    match s.check.mint(&env.verifier, bearer(&headers), ip, std::time::Instant::now()) {
        Ok(tokens) => {
            env.metrics.check_tokens.with_label_values(&["issued"]).inc();
            tracing::info!("check tokens minted for a throw-away family");
            ([(header::CACHE_CONTROL, "no-store")], Json(tokens)).into_response()
        }
        Err(e) => {
            env.metrics.check_tokens.with_label_values(&[e.label()]).inc();
            match e {
                MintError::Unauthorized(reason) => unauthorized(env, reason, &e.to_string()),
                MintError::CheckToken => json_error(StatusCode::FORBIDDEN, ErrorCode::Unauthorized, &e.to_string()),
                MintError::RateLimited | MintError::TokenRateLimited | MintError::IpRateLimited => {
                    let mut resp = json_error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, &e.to_string());
                    resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
                    resp
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn host(headers: &HeaderMap) -> Option<String> {
    headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
}

/// 401 for a refused bearer token, counted in `kinlink_auth_failures_total`.
fn unauthorized(env: &SessionEnv, reason: auth::AuthError, message: &str) -> Response {
    env.metrics.auth_failures.with_label_values(&[reason.reason()]).inc();
    let mut resp = json_error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body = ServerMsg::Error { code, message, reference: None }.to_text();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn signal(
    State(st): State<AppState>,
    hold: Option<Extension<listener::ConnHold>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let s = st.shared();
    let metrics = &s.env.metrics;
    if *s.draining.borrow() {
        metrics.signal_upgrades_rejected.with_label_values(&["shutting_down"]).inc();
        return json_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ShuttingDown, "server is shutting down");
    }
    let Ok(permit) = s.connections.clone().try_acquire_owned() else {
        metrics.signal_upgrades_rejected.with_label_values(&["server_full"]).inc();
        if let Some(suppressed) = s.env.refusal_log.allow(std::time::Instant::now()) {
            tracing::warn!(limit = s.env.limits.max_connections, suppressed, "connection refused: signal.max_connections reached");
        }
        return json_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ServerFull, "too many connections");
    };
    let token = bearer(&headers).map(str::to_string).or(query.token);
    let host = host(&headers);
    let id = s.next_session.fetch_add(1, Ordering::Relaxed);
    let env = s.env.clone();
    let draining = s.draining.clone();
    let hard_max = env.limits.hard_max_frame_bytes;
    upgrade
        .max_message_size(hard_max)
        .max_frame_size(hard_max)
        // Small buffers: most connections idle, and 20k of them must fit in little memory.
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            crate::signal::ws::drive(socket, env, id, token, host, draining).await;
            drop(permit);
            drop(hold);
        })
}

async fn ice_servers(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let env = &st.shared().env;
    let verified = match bearer(&headers) {
        None => Err(auth::AuthError::Missing),
        Some(token) => env.verifier.verify(token, auth::unix_now()),
    };
    let claims = match verified {
        Ok(claims) => claims,
        Err(e) => {
            env.metrics.http_ice_servers.with_label_values(&["401"]).inc();
            return unauthorized(env, e, &e.to_string());
        }
    };
    env.metrics.http_ice_servers.with_label_values(&["200"]).inc();
    let now = auth::unix_now();
    let ttl = env.ice.ttl_secs(claims.exp, now);
    let ice = env.ice.block(&claims.fam, &claims.dev, host(&headers).as_deref(), now, ttl);
    let body = serde_json::json!({ "iceServers": ice, "iceServersTtl": ttl });
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}
