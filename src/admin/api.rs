//! The admin HTTP API (`admin.listen`), JSON in and out, every route behind
//! `Authorization: Bearer <admin.token>` (compared in constant time, never logged):
//!
//! - `GET  /v1/families/{family}/devices`: online devices (node, since) and pair routes;
//! - `POST /v1/families/{family}/devices/{device}/disconnect`: close it (4001); it may reconnect;
//! - `POST /v1/families/{family}/devices/{device}/revoke`: revoke its tokens (4410);
//! - `POST /v1/families/{family}/revoke`: revoke the whole family;
//! - `GET  /v1/revocations`: the deny list.
//!
//! Specified in docs/openapi.yaml. Served on its own listener only, never on `http.listen`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{Applied, Control, ControlError};
use crate::auth::valid_id;
use crate::config::Secret;
use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;

struct Api {
    control: Arc<Control>,
    /// SHA-256 of the token: compared digest to digest, so neither the bytes nor the length
    /// of the token leak through timing.
    token_digest: [u8; 32],
    metrics: Arc<Metrics>,
    refusal_log: LogLimiter,
}

fn digest(s: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The admin router over `control`, guarded by `token`.
pub fn router(control: Arc<Control>, token: &Secret, metrics: Arc<Metrics>) -> Router {
    let api = Arc::new(Api { control, token_digest: digest(token.expose().as_bytes()), metrics, refusal_log: LogLimiter::new(Instant::now(), Duration::from_secs(1)) });
    Router::new()
        .route("/v1/families/{family}/devices", get(devices))
        .route("/v1/families/{family}/devices/{device}/disconnect", post(disconnect))
        .route("/v1/families/{family}/devices/{device}/revoke", post(revoke_device))
        .route("/v1/families/{family}/revoke", post(revoke_family))
        .route("/v1/revocations", get(revocations))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not-found", "no such admin route") })
        .layer(axum::middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn authorize(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    use subtle::ConstantTimeEq;
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|t| bool::from(digest(t.trim().as_bytes()).ct_eq(&api.token_digest)));
    let route = if ok { "ok" } else if given.is_none() { "missing" } else { "wrong" };
    api.metrics.admin_requests.with_label_values(&[route]).inc();
    if !ok {
        if let Some(suppressed) = api.refusal_log.allow(Instant::now()) {
            tracing::warn!(reason = route, suppressed, "admin API: request refused (token missing or wrong)");
        }
        let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", "Authorization: Bearer <admin.token> required");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

/// A 400 unless every id is valid.
fn check_ids(ids: &[&str]) -> Result<(), Box<Response>> {
    if ids.iter().all(|id| valid_id(id)) {
        Ok(())
    } else {
        Err(Box::new(error(StatusCode::BAD_REQUEST, "bad-id", "ids are 1-128 printable ASCII characters without ':' or spaces")))
    }
}

async fn devices(State(api): State<Arc<Api>>, Path(family): Path<String>) -> Response {
    if let Err(r) = check_ids(&[&family]) {
        return *r;
    }
    let view = api.control.family(&family).await;
    Json(json!({ "familyId": family, "devices": view.devices, "routes": view.routes })).into_response()
}

/// 200 when every node was reached; 503 with what happened here when not.
fn outcome(body: serde_json::Value, shared: Result<(), ControlError>) -> Response {
    match shared {
        Ok(()) => (StatusCode::OK, Json(body)).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "admin API: command not carried out everywhere");
            let code = match e {
                ControlError::ClusterUnavailable(_) => "cluster-unavailable",
                ControlError::NotSaved(_) => "not-saved",
            };
            let mut body = body;
            body["error"] = json!(code);
            body["message"] = json!(e.to_string());
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

fn applied_json(a: Applied) -> serde_json::Value {
    json!({ "closedHere": a.closed, "allocationsHere": a.allocations })
}

async fn disconnect(State(api): State<Arc<Api>>, Path((family, device)): Path<(String, String)>) -> Response {
    if let Err(r) = check_ids(&[&family, &device]) {
        return *r;
    }
    let (applied, shared) = api.control.disconnect(&family, &device).await;
    outcome(applied_json(applied), shared)
}

async fn revoke_device(State(api): State<Arc<Api>>, Path((family, device)): Path<(String, String)>) -> Response {
    if let Err(r) = check_ids(&[&family, &device]) {
        return *r;
    }
    revoke(&api, &family, Some(&device)).await
}

async fn revoke_family(State(api): State<Arc<Api>>, Path(family): Path<String>) -> Response {
    if let Err(r) = check_ids(&[&family]) {
        return *r;
    }
    revoke(&api, &family, None).await
}

async fn revoke(api: &Api, family: &str, device: Option<&str>) -> Response {
    let (entry, applied, shared) = api.control.revoke(family, device, crate::auth::unix_now()).await;
    let mut body = applied_json(applied);
    body["revocation"] = serde_json::to_value(&entry).unwrap_or_default();
    outcome(body, shared)
}

async fn revocations(State(api): State<Arc<Api>>) -> Response {
    Json(json!({ "revocations": api.control.revocations() })).into_response()
}
