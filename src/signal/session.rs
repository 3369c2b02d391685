//! One signaling connection's rules, without IO: registration, authorization, relaying, the
//! rate limit and every timer. The WebSocket driver ([`super::ws`]) feeds it frames and the
//! clock and writes out what [`Session::poll_output`] returns; unit tests do the same with
//! strings and made-up instants.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;

use super::hub::{DeliverError, Hub, JoinError, Member, OutboundTx, SessionId};
#[cfg(test)]
use super::hub::{Outbound, OutboundRx};
use super::negotiation::{Negotiations, Outcome, Report, ReportError, Reported, Route, State};
use super::protocol::{self, ClientMsg, CloseCode, DeviceInfo, ErrorCode, RelayKind, ServerMsg};
use crate::auth::{self, AuthError, TokenVerifier};
use crate::config::SignalConfig;
use crate::ice::IceConfig;
use crate::metrics::Metrics;
use crate::ratelimit::TokenBucket;

/// What every session shares.
pub struct SessionEnv {
    /// Limits.
    pub limits: SignalConfig,
    /// Device token verifier.
    pub verifier: TokenVerifier,
    /// Leeway applied to token expiry while connected.
    pub token_leeway: Duration,
    /// ICE server blocks.
    pub ice: IceConfig,
    /// Routing.
    pub hub: Arc<dyn Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// P2P outcomes per device pair; expired by the server's sweeper
    /// ([`SessionEnv::expire_negotiations`]).
    pub negotiations: std::sync::Mutex<Negotiations>,
    /// Refusals whose rate a client controls (bad tokens, full server) are logged at most
    /// once a second with a count of the rest; the metrics count every one.
    pub refusal_log: crate::ratelimit::LogLimiter,
}

impl SessionEnv {
    fn negotiations(&self) -> std::sync::MutexGuard<'_, Negotiations> {
        // Plain map updates only: a poisoned lock holds consistent data.
        self.negotiations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a `p2p-status` report from `reporter` about `peer` (made here, or forwarded by
    /// another node), counting the outcome when it closes the negotiation.
    pub fn record_report(&self, family: &str, reporter: &str, peer: &str, report: Report, now: Instant) -> Result<Reported, ReportError> {
        let mut n = self.negotiations();
        let result = n.report(family, reporter, peer, report.state, report.route, report.remote, now);
        self.metrics.p2p_negotiations_open.set(n.open() as i64);
        drop(n);
        match &result {
            Ok(Reported::Closed { outcome, .. }) => self.hub.note_route(family, reporter, peer, *outcome, auth::unix_now()),
            Ok(Reported::Settling) => self.hub.note_route(family, reporter, peer, Outcome::Direct, auth::unix_now()),
            _ => {}
        }
        match &result {
            Ok(Reported::Closed { outcome, connect }) => {
                self.metrics.p2p_negotiations.with_label_values(&[outcome.as_str()]).inc();
                if let Some(d) = connect {
                    self.metrics.p2p_connect.observe(d.as_secs_f64());
                }
                tracing::info!(outcome = outcome.as_str(), connect_ms = connect.map(|d| d.as_millis() as u64), "p2p negotiation ended");
            }
            Ok(Reported::Settling) => tracing::debug!("direct connection reported; waiting for the other side's route"),
            _ => {}
        }
        result
    }

    /// Closes negotiations without a report as `abandoned`; called about once a second.
    pub fn expire_negotiations(&self, now: Instant) {
        let mut n = self.negotiations();
        let expired = n.expire(now);
        self.metrics.p2p_negotiations_open.set(n.open() as i64);
        drop(n);
        if expired.abandoned > 0 {
            self.metrics.p2p_negotiations.with_label_values(&["abandoned"]).inc_by(expired.abandoned as u64);
            tracing::debug!(abandoned = expired.abandoned, "negotiations abandoned without a report");
        }
        for connect in expired.direct {
            self.metrics.p2p_negotiations.with_label_values(&["direct"]).inc();
            self.metrics.p2p_connect.observe(connect.as_secs_f64());
        }
    }
}

/// What the driver must do next.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Write a text frame.
    Text(Utf8Bytes),
    /// Write a ping.
    Ping,
    /// Write a close frame and stop.
    Close(CloseCode),
    /// Join the hub with this member (with several nodes, a round trip to the cluster), and
    /// hand the result to [`Session::handle_joined`] before anything else.
    Join(JoinRequest),
}

/// A registration the hub must accept or refuse.
#[derive(Debug)]
pub struct JoinRequest(pub Member);

impl PartialEq for JoinRequest {
    fn eq(&self, other: &Self) -> bool {
        (&self.0.family, &self.0.device, self.0.session) == (&other.0.family, &other.0.device, other.0.session)
    }
}

struct Registered {
    family: Arc<str>,
    device: Arc<str>,
    user: Arc<str>,
    /// When the token stops being valid (plus leeway).
    token_expires: Instant,
    /// The token's `exp` (unix seconds): TURN credentials never outlive it.
    token_exp: u64,
    /// The token's `iat`: a revocation made while the join was in flight still applies.
    token_iat: u64,
    /// When to push fresh ICE credentials.
    ice_refresh: Instant,
}

/// The state of one connection.
pub struct Session {
    id: SessionId,
    env: Arc<SessionEnv>,
    /// Token from the upgrade request (`Authorization: Bearer` or `?token=`).
    upgrade_token: Option<String>,
    /// Host header of the upgrade, for ICE URLs.
    host: Option<String>,
    /// Handed to the hub at registration.
    tx: Option<OutboundTx>,
    registered: Option<Registered>,
    /// A registration handed to the driver to join the hub, until [`Session::handle_joined`].
    joining: Option<Registered>,
    register_deadline: Instant,
    rate: TokenBucket,
    strikes: u32,
    last_activity: Instant,
    next_ping: Instant,
    missed_pongs: u32,
    closed: bool,
    out: VecDeque<Output>,
    /// The `ref` of the client message being handled.
    reply_ref: Option<Box<RawValue>>,
}

impl Session {
    /// A new, unregistered connection at `now`.
    pub fn new(
        id: SessionId,
        env: Arc<SessionEnv>,
        tx: OutboundTx,
        upgrade_token: Option<String>,
        host: Option<String>,
        now: Instant,
    ) -> Self {
        let l = &env.limits;
        Session {
            id,
            upgrade_token,
            host,
            tx: Some(tx),
            registered: None,
            joining: None,
            register_deadline: now + Duration::from_secs(l.register_timeout_secs),
            rate: TokenBucket::new(l.rate_per_sec, l.rate_burst, now),
            strikes: 0,
            last_activity: now,
            next_ping: now + Duration::from_secs(l.ping_interval_secs),
            missed_pongs: 0,
            closed: false,
            out: VecDeque::new(),
            reply_ref: None,
            env,
        }
    }

    /// The next thing to write, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// [`Session::poll_output`], joining the hub on the spot (`LocalHub` answers at once).
    #[cfg(test)]
    fn poll_output_joined(&mut self) -> Option<Output> {
        use futures_util::FutureExt;
        match self.out.pop_front() {
            Some(Output::Join(JoinRequest(member))) => {
                let result = self.env.hub.join(member).now_or_never().expect("LocalHub joins at once");
                // At the virtual time of the input that registered.
                self.handle_joined(self.last_activity, result);
                self.poll_output_joined()
            }
            other => other,
        }
    }

    /// True once a close has been queued; the driver stops reading.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True once registered: the driver then also reads the hub queue.
    pub fn is_registered(&self) -> bool {
        self.registered.is_some()
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_ping;
        match &self.registered {
            None => t = t.min(self.register_deadline),
            Some(r) => t = t.min(r.token_expires).min(r.ice_refresh),
        }
        if let Some(idle) = self.idle_deadline() {
            t = t.min(idle);
        }
        t
    }

    fn idle_deadline(&self) -> Option<Instant> {
        let secs = self.env.limits.idle_timeout_secs;
        (secs > 0).then(|| self.last_activity + Duration::from_secs(secs))
    }

    /// Timers: register deadline, heartbeat, idle, token expiry, ICE refresh.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.registered.is_none() && now >= self.register_deadline {
            self.error(ErrorCode::NotRegistered, "no register within the deadline", None);
            return self.close(CloseCode::RegisterTimeout);
        }
        if self.idle_deadline().is_some_and(|d| now >= d) {
            return self.close(CloseCode::Normal);
        }
        if let Some(r) = &self.registered {
            if now >= r.token_expires {
                self.error(ErrorCode::Unauthorized, "token expired", None);
                return self.close(CloseCode::Unauthorized);
            }
        }
        if now >= self.next_ping {
            if self.missed_pongs >= self.env.limits.max_missed_pongs {
                return self.close(CloseCode::HeartbeatTimeout);
            }
            self.missed_pongs += 1;
            self.next_ping = now + Duration::from_secs(self.env.limits.ping_interval_secs);
            self.out.push_back(Output::Ping);
        }
        if self.registered.as_ref().is_some_and(|r| now >= r.ice_refresh) {
            self.push_ice_servers(now);
        }
    }

    /// A pong arrived. It counts against the message rate like any frame (a flood of
    /// unsolicited pongs costs the server as much as messages do).
    pub fn handle_pong(&mut self, now: Instant) {
        self.missed_pongs = 0;
        self.admit(now);
    }

    /// A ping arrived (the WebSocket layer answers it). It counts against the message rate:
    /// 156,000 pings in 3 s were once each answered.
    pub fn handle_ping(&mut self, now: Instant) {
        self.admit(now);
    }

    /// Something was delivered to this device by the hub and written out.
    pub fn handle_delivered(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// The server is draining: tell the client to reconnect elsewhere.
    pub fn handle_shutdown(&mut self) {
        if !self.closed {
            self.error(ErrorCode::ShuttingDown, "server is shutting down; reconnect", None);
            self.close(CloseCode::GoingAway);
        }
    }

    /// A frame larger than the transport accepts at all: the rest of it cannot be skipped,
    /// so the connection ends.
    pub fn handle_oversize(&mut self) {
        let max = self.env.limits.hard_max_frame_bytes;
        self.error(ErrorCode::TooLarge, &format!("frame exceeds {max} bytes"), None);
        self.close(CloseCode::TooBig);
    }

    /// A binary frame: accepted when it is UTF-8 JSON, like a text frame.
    pub fn handle_binary(&mut self, now: Instant, bytes: &[u8]) {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.handle_text(now, text),
            Err(_) if self.admit(now) => self.error(ErrorCode::BadMessage, "binary frame is not UTF-8 JSON", None),
            Err(_) => {}
        }
    }

    /// A text frame from the client.
    pub fn handle_text(&mut self, now: Instant, text: &str) {
        if !self.admit(now) {
            return;
        }
        let max = self.env.limits.max_frame_bytes;
        if text.len() > max {
            return self.error(ErrorCode::TooLarge, &format!("message exceeds {max} bytes; dropped"), None);
        }
        let (msg, reference) = match protocol::parse_with_ref(text) {
            Err(e) => return self.error(e.code, &e.message, e.reference),
            Ok(parsed) => parsed,
        };
        // Every error answering this message echoes its `ref` (peer-offline from the relay
        // stage included), as docs/protocol.md shows.
        self.reply_ref = reference.map(|r| r.to_owned());
        self.dispatch(now, msg);
        self.reply_ref = None;
    }

    fn dispatch(&mut self, now: Instant, msg: ClientMsg<'_>) {
        match msg {
            ClientMsg::Register { family_id, user_id, device_id, token } => {
                self.register(now, &family_id, &user_id, &device_id, token.as_deref())
            }
            ClientMsg::Relay { kind, to_device_id, family_id, payload } => {
                self.relay(now, kind, &to_device_id, family_id.as_deref(), payload)
            }
            ClientMsg::P2pStatus { peer_device_id, family_id, state, route, remote_route, connect_ms: _ } => {
                self.p2p_status(now, &peer_device_id, family_id.as_deref(), state, route, remote_route)
            }
        }
    }

    /// The connection is gone: leave the hub.
    pub fn finish(&mut self) {
        if let Some(r) = self.registered.take() {
            self.env.hub.leave(&r.family, &r.device, self.id);
        }
    }

    /// Applies the rate limit to one incoming frame; false when it must be dropped (the
    /// client has then been told, or the connection closed).
    fn admit(&mut self, now: Instant) -> bool {
        if self.closed {
            return false;
        }
        if !self.rate.take(now) {
            self.strikes += 1;
            if self.strikes > self.env.limits.rate_strikes {
                self.error(ErrorCode::RateLimited, "message rate exceeded repeatedly", None);
                self.close(CloseCode::RateLimited);
            } else {
                self.error(ErrorCode::RateLimited, "message rate exceeded; message dropped", None);
            }
            return false;
        }
        self.strikes = 0;
        self.last_activity = now;
        true
    }

    fn register(&mut self, now: Instant, family: &str, user: &str, device: &str, token: Option<&str>) {
        if self.registered.is_some() || self.joining.is_some() {
            return self.error(ErrorCode::AlreadyRegistered, "this connection is already registered", None);
        }
        let token = token.or(self.upgrade_token.as_deref()).unwrap_or("");
        let unix = auth::unix_now();
        let claims = match self.env.verifier.verify(token, unix) {
            Ok(c) => c,
            Err(e) => return self.auth_failed(now, e),
        };
        if claims.fam != family {
            return self.auth_failed(now, AuthError::FamilyMismatch);
        }
        if claims.sub != user || claims.dev != device {
            return self.auth_failed(now, AuthError::ClaimsMismatch);
        }
        let Some(tx) = self.tx.take() else { return };
        let member = Member { family: family.into(), device: device.into(), user: user.into(), session: self.id, since: unix, tx };
        let reg = Registered {
            family: member.family.clone(),
            device: member.device.clone(),
            user: member.user.clone(),
            // `exp` is bounded by auth.max_token_ttl_secs (the verifier refuses more), and the
            // sum saturates besides: no claim can overflow the deadline.
            token_expires: deadline(now, claims.exp.saturating_add(self.env.token_leeway.as_secs()).saturating_sub(unix)),
            token_exp: claims.exp,
            token_iat: claims.iat,
            ice_refresh: now,
        };
        self.joining = Some(reg);
        self.out.push_back(Output::Join(JoinRequest(member)));
    }

    /// The hub's answer to [`Output::Join`].
    pub fn handle_joined(&mut self, now: Instant, result: Result<Vec<DeviceInfo>, JoinError>) {
        let Some(reg) = self.joining.take() else { return };
        let (family, device) = (reg.family.clone(), reg.device.clone());
        match result {
            // Revoked between the token check and the join (the admin's kick found nothing to
            // close yet): out again at once.
            Ok(_) if self.env.verifier.is_revoked(&family, &device, reg.token_iat) => {
                self.env.hub.leave(&family, &device, self.id);
                self.auth_failed(now, AuthError::Revoked);
            }
            Ok(devices) => {
                self.env.metrics.signal_registrations.inc();
                let unix = auth::unix_now();
                let ttl = self.env.ice.ttl_secs(reg.token_exp, unix);
                let ice = self.env.ice.block(&family, &device, self.host.as_deref(), unix, ttl);
                let msg = ServerMsg::Registered { device_id: &device, devices: &devices, ice_servers: &ice, ice_servers_ttl: ttl };
                self.send(msg);
                let ice_refresh = self.next_ice_refresh(now, &reg, unix, ttl);
                self.registered = Some(Registered { ice_refresh, ..reg });
                tracing::info!(session = self.id, "device registered");
            }
            Err(e) => {
                let code = match e {
                    JoinError::FamilyFull => ErrorCode::FamilyFull,
                    JoinError::ServerFull => ErrorCode::ServerFull,
                };
                if let Some(suppressed) = self.env.refusal_log.allow(now) {
                    tracing::warn!(session = self.id, error = %e, suppressed, "registration refused");
                }
                self.error(code, &e.to_string(), None);
                self.close(CloseCode::TryAgainLater);
            }
        }
    }

    fn auth_failed(&mut self, now: Instant, e: AuthError) {
        self.env.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
        if let Some(suppressed) = self.env.refusal_log.allow(now) {
            tracing::info!(session = self.id, reason = e.reason(), suppressed, "registration refused");
        }
        let (code, close) = match e {
            AuthError::FamilyMismatch => (ErrorCode::FamilyMismatch, CloseCode::FamilyMismatch),
            // Not 4401: a fresh token for a revoked device is refused too, until the backend
            // issues one after the revocation.
            AuthError::Revoked => (ErrorCode::Unauthorized, CloseCode::Revoked),
            _ => (ErrorCode::Unauthorized, CloseCode::Unauthorized),
        };
        self.error(code, &e.to_string(), None);
        self.close(close);
    }

    fn relay(&mut self, now: Instant, kind: RelayKind, to: &str, family: Option<&str>, payload: &RawValue) {
        let Some(r) = &self.registered else {
            return self.error(ErrorCode::NotRegistered, "register first", None);
        };
        let (own_family, own_device) = (r.family.clone(), r.device.clone());
        if family.is_some_and(|f| f != &*own_family) {
            return self.error(ErrorCode::FamilyMismatch, "familyId is not this device's family", None);
        }
        if to == &*own_device {
            return self.error(ErrorCode::BadMessage, "toDeviceId is this device", None);
        }
        let text = protocol::relayed_text(kind, &own_family, &own_device, &r.user, to, payload);
        match self.env.hub.deliver(&own_family, to, text.into(), now) {
            Ok(()) => {
                self.env.metrics.signal_relayed.with_label_values(&[kind.as_str()]).inc();
                if kind == RelayKind::Offer {
                    let mut n = self.env.negotiations();
                    if n.offer(&own_family, &own_device, to, now) {
                        self.env.metrics.p2p_negotiations_open.set(n.open() as i64);
                    }
                }
            }
            Err(DeliverError::Offline) => self.error(ErrorCode::PeerOffline, &format!("{} is not online", Shown(to)), None),
            Err(DeliverError::QueueFull) => self.error(ErrorCode::RateLimited, "target device is not keeping up; dropped", None),
            Err(e @ DeliverError::ClusterUnavailable) => self.error(ErrorCode::ClusterUnavailable, &format!("{}: {e}", Shown(to)), None),
        }
    }

    fn p2p_status(&mut self, now: Instant, peer: &str, family: Option<&str>, state: State, route: Option<Route>, remote: Option<Route>) {
        let Some(r) = &self.registered else {
            return self.error(ErrorCode::NotRegistered, "register first", None);
        };
        if family.is_some_and(|f| f != &*r.family) {
            return self.error(ErrorCode::FamilyMismatch, "familyId is not this device's family", None);
        }
        let (family, device) = (r.family.clone(), r.device.clone());
        let report = Report { state, route, remote };
        match self.env.record_report(&family, &device, peer, report, now) {
            Ok(_) => {}
            // The offer was relayed by another node: the report goes there, to be counted once.
            Err(ReportError::Unknown) if self.env.hub.forward_report(&family, &device, peer, report) => {}
            Err(ReportError::Unknown) => {
                self.error(ErrorCode::NoNegotiation, &format!("no offer was relayed between this device and {}", Shown(peer)), None)
            }
            Err(e @ ReportError::MissingRoute) => self.error(ErrorCode::BadMessage, &format!("p2p-status: {e}"), None),
        }
    }

    /// When to push fresh credentials: at three quarters of their lifetime, unless the token's
    /// expiry cut them short (a push could not give more; the connection ends with the token).
    fn next_ice_refresh(&self, now: Instant, r: &Registered, unix: u64, ttl: u64) -> Instant {
        if self.env.ice.capped_by_token(r.token_exp, unix) {
            r.token_expires.max(now + Duration::from_secs(1))
        } else {
            now + refresh_after(ttl)
        }
    }

    fn push_ice_servers(&mut self, now: Instant) {
        let Some(r) = &self.registered else { return };
        let unix = auth::unix_now();
        let ttl = self.env.ice.ttl_secs(r.token_exp, unix);
        let next = self.next_ice_refresh(now, r, unix, ttl);
        let Some(r) = &mut self.registered else { return };
        r.ice_refresh = next;
        let ice = self.env.ice.block(&r.family, &r.device, self.host.as_deref(), unix, ttl);
        self.env.metrics.signal_ice_refreshes.inc();
        self.send(ServerMsg::IceServers { ice_servers: &ice, ice_servers_ttl: ttl });
    }

    fn send(&mut self, msg: ServerMsg<'_>) {
        self.out.push_back(Output::Text(msg.to_text().into()));
    }

    fn error(&mut self, code: ErrorCode, message: &str, reference: Option<&RawValue>) {
        self.env.metrics.signal_errors.with_label_values(&[code.as_str()]).inc();
        let reply_ref = self.reply_ref.take();
        self.send(ServerMsg::Error { code, message, reference: reference.or(reply_ref.as_deref()) });
        self.reply_ref = reply_ref;
    }

    fn close(&mut self, code: CloseCode) {
        self.closed = true;
        self.out.push_back(Output::Close(code));
    }
}

/// `now + secs`, or far in the future where that does not fit an `Instant`.
fn deadline(now: Instant, secs: u64) -> Instant {
    now.checked_add(Duration::from_secs(secs)).unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// Push fresh credentials once three quarters of their lifetime has passed.
fn refresh_after(ttl_secs: u64) -> Duration {
    Duration::from_secs(ttl_secs * 3 / 4)
}

/// An id echoed in an error message, cut short so an error never amplifies a large input.
struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: String = self.0.chars().take(64).collect();
        write!(f, "`{cut}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TurnConfig};
    use crate::signal::hub::{HubLimits, LocalHub};

    const SECRET: &str = "unit-test-secret-0123456789";

    fn env_with(limits: SignalConfig) -> Arc<SessionEnv> {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(LocalHub::new(
            HubLimits { max_devices_per_family: limits.max_devices_per_family, max_devices: limits.max_devices },
            metrics.clone(),
            "test",
        ));
        let turn = TurnConfig { secret: Some(Secret::new("turn-secret-0123456789")), ..TurnConfig::default() };
        Arc::new(SessionEnv {
            verifier: TokenVerifier::hs256(&Secret::new(SECRET), 0),
            token_leeway: Duration::ZERO,
            ice: IceConfig::new(&turn, Secret::new("turn-secret-0123456789")),
            hub,
            metrics,
            negotiations: std::sync::Mutex::new(Negotiations::new(
                Duration::from_secs(limits.negotiation_timeout_secs),
                Duration::from_secs(limits.negotiation_settle_secs),
            )),
            refusal_log: crate::ratelimit::LogLimiter::new(Instant::now(), Duration::from_secs(1)),
            limits,
        })
    }

    fn token(f: &str, u: &str, d: &str) -> String {
        auth::mint_token(&Secret::new(SECRET), f, u, d, 3600, auth::unix_now())
    }

    struct Dev {
        s: Session,
        rx: OutboundRx,
    }

    impl Dev {
        fn new(env: &Arc<SessionEnv>, id: SessionId, now: Instant) -> Dev {
            let (tx, rx) = super::super::hub::outbound(8, usize::MAX);
            Dev { s: Session::new(id, env.clone(), tx, None, Some("h:1".into()), now), rx }
        }
        fn register(env: &Arc<SessionEnv>, id: SessionId, f: &str, d: &str, now: Instant) -> Dev {
            let mut dev = Dev::new(env, id, now);
            let t = token(f, "u", d);
            dev.s.handle_text(now, &format!(r#"{{"type":"register","familyId":"{f}","userId":"u","deviceId":"{d}","token":"{t}"}}"#));
            assert!(dev.next_text().starts_with(r#"{"type":"registered""#));
            dev
        }
        fn next_text(&mut self) -> String {
            match self.s.poll_output_joined() {
                Some(Output::Text(t)) => t.to_string(),
                other => panic!("expected text, got {other:?}"),
            }
        }
        fn next_error(&mut self) -> String {
            let t = self.next_text();
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["type"], "error", "{t}");
            v["code"].as_str().unwrap().to_string()
        }
        fn hub_text(&mut self) -> String {
            match self.rx.try_recv() {
                Ok(Outbound::Text { text, .. }) => text.to_string(),
                other => panic!("expected hub text, got {other:?}"),
            }
        }
    }

    #[test]
    fn register_then_relay_within_family() {
        let env = env_with(SignalConfig::default());
        let now = Instant::now();
        let mut a = Dev::register(&env, 1, "fam", "a", now);
        let mut b = Dev::register(&env, 2, "fam", "b", now);
        assert!(a.hub_text().contains("device-online"));
        b.s.handle_text(now, r#"{"type":"offer","toDeviceId":"a","sdp":{"type":"offer","sdp":"v=0"}}"#);
        assert!(b.s.poll_output_joined().is_none(), "a relayed message gets no reply");
        let got = a.hub_text();
        assert!(got.contains(r#""fromDeviceId":"b""#) && got.contains(r#""sdp":{"type":"offer","sdp":"v=0"}"#), "{got}");
        b.s.handle_text(now, r#"{"type":"answer","toDeviceId":"zzz","sdp":"x"}"#);
        assert_eq!(b.next_error(), "peer-offline");
        b.s.handle_text(now, r#"{"type":"answer","familyId":"other","toDeviceId":"a","sdp":"x"}"#);
        assert_eq!(b.next_error(), "family-mismatch");
        assert!(!b.s.is_closed(), "a family mismatch in a relay keeps the connection");
        b.s.handle_text(now, r#"{"type":"register","familyId":"fam","userId":"u","deviceId":"b"}"#);
        assert_eq!(b.next_error(), "already-registered");
        b.s.finish();
        assert!(a.hub_text().contains("device-offline"));
    }

    fn outcome(env: &SessionEnv, o: &str) -> u64 {
        env.metrics.p2p_negotiations.with_label_values(&[o]).get()
    }

    #[test]
    fn p2p_status_closes_the_negotiation_once() {
        let env = env_with(SignalConfig { negotiation_timeout_secs: 60, ..SignalConfig::default() });
        let t0 = Instant::now();
        let mut a = Dev::register(&env, 1, "fam", "a", t0);
        let mut b = Dev::register(&env, 2, "fam", "b", t0);
        let mut x = Dev::register(&env, 3, "evil", "x", t0);
        let _ = a.hub_text();
        // No offer yet: nothing to report on.
        a.s.handle_text(t0, r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"host"}"#);
        assert_eq!(a.next_error(), "no-negotiation");
        a.s.handle_text(t0, r#"{"type":"offer","toDeviceId":"b","sdp":"x"}"#);
        assert_eq!(env.metrics.p2p_negotiations_open.get(), 1);
        let _ = b.hub_text();
        // Another family cannot report on it, under any familyId.
        x.s.handle_text(t0, r#"{"type":"p2p-status","peerDeviceId":"a","state":"failed"}"#);
        assert_eq!(x.next_error(), "no-negotiation");
        x.s.handle_text(t0, r#"{"type":"p2p-status","familyId":"fam","peerDeviceId":"a","state":"failed"}"#);
        assert_eq!(x.next_error(), "family-mismatch");
        b.s.handle_text(t0, r#"{"type":"p2p-status","peerDeviceId":"a","state":"connected"}"#);
        assert_eq!(b.next_error(), "bad-message", "connected needs a route");
        let t1 = t0 + Duration::from_millis(700);
        b.s.handle_text(t1, r#"{"type":"p2p-status","peerDeviceId":"a","state":"connected","route":"relay","connectMs":650}"#);
        assert!(b.s.poll_output_joined().is_none(), "an accepted report gets no reply");
        a.s.handle_text(t1, r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"relay"}"#);
        assert!(a.s.poll_output_joined().is_none(), "the other side's report is accepted");
        assert_eq!((outcome(&env, "relay"), outcome(&env, "direct"), outcome(&env, "http_fallback")), (1, 0, 0));
        assert_eq!(env.metrics.p2p_connect.get_sample_count(), 1);
        assert!((env.metrics.p2p_connect.get_sample_sum() - 0.7).abs() < 1e-9, "measured by the server");
        assert_eq!(env.metrics.p2p_negotiations_open.get(), 0);

        // A new offer, never answered by a report: abandoned once the window passes.
        b.s.handle_text(t1, r#"{"type":"offer","toDeviceId":"a","sdp":"y"}"#);
        env.expire_negotiations(t1 + Duration::from_secs(59));
        assert_eq!(outcome(&env, "abandoned"), 0);
        env.expire_negotiations(t1 + Duration::from_secs(60));
        assert_eq!(outcome(&env, "abandoned"), 1);
        assert_eq!(env.metrics.p2p_negotiations_open.get(), 0);
    }

    #[test]
    fn other_families_are_unreachable() {
        let env = env_with(SignalConfig::default());
        let now = Instant::now();
        let mut a = Dev::register(&env, 1, "fam", "a", now);
        let mut x = Dev::register(&env, 2, "evil", "x", now);
        x.s.handle_text(now, r#"{"type":"offer","familyId":"fam","toDeviceId":"a","sdp":"x"}"#);
        assert_eq!(x.next_error(), "family-mismatch");
        x.s.handle_text(now, r#"{"type":"offer","toDeviceId":"a","sdp":"x"}"#);
        assert_eq!(x.next_error(), "peer-offline");
        assert!(a.rx.try_recv().is_err());
    }

    #[test]
    fn auth_failures_close_with_44xx() {
        let env = env_with(SignalConfig::default());
        let now = Instant::now();
        let cases = [
            (r#"{"type":"register","familyId":"f","userId":"u","deviceId":"d"}"#.to_string(), "unauthorized", CloseCode::Unauthorized),
            (
                format!(r#"{{"type":"register","familyId":"g","userId":"u","deviceId":"d","token":"{}"}}"#, token("f", "u", "d")),
                "family-mismatch",
                CloseCode::FamilyMismatch,
            ),
            (
                format!(r#"{{"type":"register","familyId":"f","userId":"u","deviceId":"e","token":"{}"}}"#, token("f", "u", "d")),
                "unauthorized",
                CloseCode::Unauthorized,
            ),
        ];
        for (i, (frame, code, close)) in cases.into_iter().enumerate() {
            let mut d = Dev::new(&env, i as u64, now);
            d.s.handle_text(now, &frame);
            assert_eq!(d.next_error(), code);
            assert_eq!(d.s.poll_output_joined(), Some(Output::Close(close)));
            assert!(d.s.is_closed());
        }
        assert_eq!(env.metrics.auth_failures.with_label_values(&["missing"]).get(), 1);
        assert_eq!(env.metrics.auth_failures.with_label_values(&["family_mismatch"]).get(), 1);
        assert_eq!(env.metrics.auth_failures.with_label_values(&["claims_mismatch"]).get(), 1);
    }

    #[test]
    fn upgrade_token_is_used_when_register_has_none() {
        let env = env_with(SignalConfig::default());
        let now = Instant::now();
        let (tx, _rx) = super::super::hub::outbound(8, usize::MAX);
        let mut s = Session::new(1, env, tx, Some(token("f", "u", "d")), None, now);
        s.handle_text(now, r#"{"type":"register","familyId":"f","userId":"u","deviceId":"d"}"#);
        assert!(matches!(s.poll_output_joined(), Some(Output::Text(t)) if t.as_str().starts_with(r#"{"type":"registered""#)));
    }

    #[test]
    fn bad_input_keeps_the_connection() {
        let env = env_with(SignalConfig { max_frame_bytes: 100, ..SignalConfig::default() });
        let now = Instant::now();
        let mut d = Dev::new(&env, 1, now);
        for (frame, code) in [
            ("not json", "bad-message"),
            (r#"{"type":"teleport"}"#, "bad-message"),
            (r#"{"type":"offer","toDeviceId":"x","sdp":"y"}"#, "not-registered"),
        ] {
            d.s.handle_text(now, frame);
            assert_eq!(d.next_error(), code);
        }
        d.s.handle_text(now, &"x".repeat(101));
        assert_eq!(d.next_error(), "too-large");
        assert!(!d.s.is_closed());
    }

    #[test]
    fn flood_is_rate_limited_then_closed() {
        let limits = SignalConfig { rate_per_sec: 10.0, rate_burst: 5, rate_strikes: 3, ..SignalConfig::default() };
        let env = env_with(limits);
        let now = Instant::now();
        let mut d = Dev::new(&env, 1, now);
        for _ in 0..5 {
            d.s.handle_text(now, "{}");
            assert_eq!(d.next_error(), "bad-message");
        }
        for _ in 0..3 {
            d.s.handle_text(now, "{}");
            assert_eq!(d.next_error(), "rate-limited");
        }
        // Time refills the bucket: 100 ms at 10/s is one more message.
        d.s.handle_text(now + Duration::from_millis(100), "{}");
        assert_eq!(d.next_error(), "bad-message");
        for _ in 0..3 {
            d.s.handle_text(now + Duration::from_millis(100), "{}");
            assert_eq!(d.next_error(), "rate-limited");
        }
        d.s.handle_text(now + Duration::from_millis(100), "{}");
        assert_eq!(d.next_error(), "rate-limited");
        assert_eq!(d.s.poll_output_joined(), Some(Output::Close(CloseCode::RateLimited)));
    }

    #[test]
    fn timers_without_sleeping() {
        let limits = SignalConfig {
            register_timeout_secs: 5,
            ping_interval_secs: 10,
            max_missed_pongs: 2,
            idle_timeout_secs: 100,
            ..SignalConfig::default()
        };
        let env = env_with(limits);
        let t0 = Instant::now();
        // Register deadline.
        let mut d = Dev::new(&env, 1, t0);
        assert_eq!(d.s.poll_timeout(), t0 + Duration::from_secs(5));
        d.s.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(d.next_error(), "not-registered");
        assert_eq!(d.s.poll_output_joined(), Some(Output::Close(CloseCode::RegisterTimeout)));
        // Heartbeat: two unanswered pings, then the third tick drops the connection.
        let mut d = Dev::register(&env, 2, "f", "a", t0);
        let t = t0 + Duration::from_secs(10);
        assert_eq!(d.s.poll_timeout(), t);
        d.s.handle_timeout(t);
        assert_eq!(d.s.poll_output_joined(), Some(Output::Ping));
        d.s.handle_pong(t);
        d.s.handle_timeout(t + Duration::from_secs(10));
        assert_eq!(d.s.poll_output_joined(), Some(Output::Ping));
        d.s.handle_timeout(t + Duration::from_secs(20));
        assert_eq!(d.s.poll_output_joined(), Some(Output::Ping));
        d.s.handle_timeout(t + Duration::from_secs(30));
        assert_eq!(d.s.poll_output_joined(), Some(Output::Close(CloseCode::HeartbeatTimeout)));
        // Idle.
        let mut d = Dev::register(&env, 3, "g", "a", t0);
        d.s.handle_pong(t0);
        d.s.handle_timeout(t0 + Duration::from_secs(100));
        assert_eq!(d.s.poll_output_joined(), Some(Output::Close(CloseCode::Normal)));
    }

    #[test]
    fn ice_credentials_are_pushed_before_expiry() {
        let env = env_with(SignalConfig { ping_interval_secs: 1_000_000, idle_timeout_secs: 0, ..SignalConfig::default() });
        let t0 = Instant::now();
        let mut d = Dev::register(&env, 1, "f", "a", t0);
        let refresh = t0 + Duration::from_secs(86_400 * 3 / 4);
        assert_eq!(d.s.poll_timeout(), refresh.min(t0 + Duration::from_secs(3600)));
        d.s.handle_timeout(t0 + Duration::from_secs(3599));
        assert!(d.s.poll_output_joined().is_none());
        // The token (1 h) expires before the refresh is due: the device is told and closed.
        d.s.handle_timeout(t0 + Duration::from_secs(3600));
        assert_eq!(d.next_error(), "unauthorized");
        assert_eq!(d.s.poll_output_joined(), Some(Output::Close(CloseCode::Unauthorized)));
    }

    #[test]
    fn ice_refresh_with_long_token() {
        let env = env_with(SignalConfig { ping_interval_secs: 1_000_000, idle_timeout_secs: 0, ..SignalConfig::default() });
        let t0 = Instant::now();
        let (tx, _rx) = super::super::hub::outbound(8, usize::MAX);
        let long = auth::mint_token(&Secret::new(SECRET), "f", "u", "a", 10 * 86_400, auth::unix_now());
        let mut s = Session::new(1, env.clone(), tx, Some(long), None, t0);
        s.handle_text(t0, r#"{"type":"register","familyId":"f","userId":"u","deviceId":"a"}"#);
        assert!(s.poll_output_joined().is_some());
        let refresh = t0 + Duration::from_secs(86_400 * 3 / 4);
        assert_eq!(s.poll_timeout(), refresh);
        s.handle_timeout(refresh);
        match s.poll_output_joined() {
            Some(Output::Text(t)) => assert!(t.as_str().starts_with(r#"{"type":"ice-servers","iceServers":[{"urls""#), "{t}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(env.metrics.signal_ice_refreshes.get(), 1);
    }

    /// Network input never panics: random bytes and mutations of valid frames, bounded and
    /// seeded so a failure reproduces.
    #[test]
    fn turn_credentials_never_outlive_the_token() {
        let env = env_with(SignalConfig::default());
        let t0 = Instant::now();
        let mut d = Dev::new(&env, 1, t0);
        let t = auth::mint_token(&Secret::new(SECRET), "f", "u", "d", 600, auth::unix_now());
        d.s.handle_text(t0, &format!(r#"{{"type":"register","familyId":"f","userId":"u","deviceId":"d","token":"{t}"}}"#));
        let v: serde_json::Value = serde_json::from_str(&d.next_text()).unwrap();
        let ttl = v["iceServersTtl"].as_u64().unwrap();
        assert!((595..=600).contains(&ttl), "a 600 s token gets at most 600 s of TURN, not a day: {ttl}");
        let turn = v["iceServers"].as_array().unwrap().iter().find(|s| s["username"].is_string()).unwrap();
        let expiry: u64 = turn["username"].as_str().unwrap().split(':').next().unwrap().parse().unwrap();
        assert!(expiry <= auth::unix_now() + 600);
        // No refresh push before the token ends (it could not give more); the session ends
        // with the token.
        d.s.handle_pong(t0 + Duration::from_secs(400));
        d.s.handle_timeout(t0 + Duration::from_secs(460));
        while let Some(out) = d.s.poll_output_joined() {
            assert!(!matches!(&out, Output::Text(t) if t.contains("ice-servers")), "{out:?}");
        }
    }

    #[test]
    fn random_and_mutated_frames_never_panic() {
        use rand::{Rng, SeedableRng};
        let env = env_with(SignalConfig { rate_burst: 1_000_000, max_frame_bytes: 512, ..SignalConfig::default() });
        let now = Instant::now();
        let mut a = Dev::register(&env, 1, "f", "a", now);
        let mut b = Dev::register(&env, 2, "f", "b", now);
        let seeds = [
            r#"{"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"},"ref":1}"#.to_string(),
            r#"{"type":"ice-candidate","familyId":"f","toDeviceId":"b","candidate":null}"#.to_string(),
            format!(r#"{{"type":"register","familyId":"f","userId":"u","deviceId":"a","token":"{}"}}"#, token("f", "u", "a")),
            r#"{"type":"answer","toDeviceId":"b","sdp":"\u0000\ud800"}"#.to_string(),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696e6c);
        for i in 0..20_000 {
            let mut bytes = seeds[i % seeds.len()].clone().into_bytes();
            match i % 3 {
                0 => {
                    let n = rng.gen_range(0..600);
                    bytes = (0..n).map(|_| rng.gen()).collect();
                }
                1 => {
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(0..bytes.len());
                        bytes[at] = rng.gen();
                    }
                }
                _ => {
                    let cut = rng.gen_range(0..bytes.len());
                    bytes.truncate(cut);
                }
            }
            a.s.handle_binary(now, &bytes);
            while a.s.poll_output_joined().is_some() {}
            while b.rx.try_recv().is_ok() {}
            if a.s.is_closed() {
                a = Dev::register(&env, 10 + i as u64, "f", "a", now);
            }
        }
    }
}
