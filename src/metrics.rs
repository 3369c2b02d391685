//! Every metric kinlink exports, in one place, with fixed label sets. Labels are bounded
//! enums only: never a family, user, device or IP. Labelled counters are created at zero at
//! start-up so `rate()` works from the first scrape. docs/metrics.md describes each one.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use std::sync::{Arc, Mutex};

use crate::auth::AuthError;
use crate::signal::protocol::{CloseCode, ErrorCode, RelayKind};

/// All metric handles plus the registry they live in.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `kinlink_signal_connections`: open WebSocket connections.
    pub signal_connections: IntGauge,
    /// `kinlink_signal_connections_accepted_total`: WebSocket upgrades accepted.
    pub signal_connections_accepted: IntCounter,
    /// `kinlink_signal_upgrades_rejected_total{reason}`: upgrades refused (server_full, shutting_down).
    pub signal_upgrades_rejected: IntCounterVec,
    /// `kinlink_signal_connections_closed_total{reason}`.
    pub signal_connections_closed: IntCounterVec,
    /// `kinlink_signal_devices`: registered devices.
    pub signal_devices: IntGauge,
    /// `kinlink_signal_families`: families with at least one device online.
    pub signal_families: IntGauge,
    /// `kinlink_signal_registrations_total`: successful registrations.
    pub signal_registrations: IntCounter,
    /// `kinlink_signal_messages_relayed_total{type}`.
    pub signal_relayed: IntCounterVec,
    /// `kinlink_signal_errors_total{code}`: error messages sent to clients.
    pub signal_errors: IntCounterVec,
    /// `kinlink_signal_relay_latency_seconds`: from accepting a frame to writing it to the target.
    pub signal_relay_latency: Histogram,
    /// `kinlink_signal_ice_servers_pushed_total`: fresh credentials pushed to connected devices.
    pub signal_ice_refreshes: IntCounter,
    /// `kinlink_auth_failures_total{reason}`: refused device tokens.
    pub auth_failures: IntCounterVec,
    /// `kinlink_http_ice_servers_requests_total{status}`: `GET /v1/ice-servers`.
    pub http_ice_servers: IntCounterVec,
    /// `kinlink_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `kinlink_turn_allocations`: open TURN allocations.
    pub turn_allocations: IntGauge,
    /// `kinlink_turn_allocations_created_total{transport}`.
    pub turn_allocations_created: IntCounterVec,
    /// `kinlink_turn_allocation_duration_seconds`: lifetime of closed allocations.
    pub turn_allocation_duration: Histogram,
    /// `kinlink_turn_relayed_bytes_total{direction="client_to_peer"}` (payload bytes).
    pub turn_bytes_to_peer: IntCounter,
    /// `kinlink_turn_relayed_bytes_total{direction="peer_to_client"}`.
    pub turn_bytes_to_client: IntCounter,
    /// `kinlink_turn_relayed_packets_total{direction="client_to_peer"}`.
    pub turn_packets_to_peer: IntCounter,
    /// `kinlink_turn_relayed_packets_total{direction="peer_to_client"}`.
    pub turn_packets_to_client: IntCounter,
    /// `kinlink_turn_dropped_packets_total{reason}`: data not relayed.
    pub turn_dropped: IntCounterVec,
    /// `kinlink_turn_auth_failures_total{reason}`.
    pub turn_auth_failures: IntCounterVec,
    /// `kinlink_turn_permission_denied_total{reason}`: peers refused by the peer policy.
    pub turn_permission_denied: IntCounterVec,
    /// `kinlink_turn_quota_rejections_total{scope}`.
    pub turn_quota_rejections: IntCounterVec,
    /// `kinlink_turn_binding_requests_total{transport}`: STUN binding requests.
    pub turn_binding_requests: IntCounterVec,
    /// `kinlink_turn_relay_capacity_bytes_per_second`: the operator's stated relay capacity
    /// (`metrics.relay_capacity_bytes_per_sec`), for the bandwidth alert.
    pub turn_relay_capacity: IntGauge,
    /// `kinlink_p2p_negotiations_total{outcome}`: direct, relay, http_fallback, abandoned.
    pub p2p_negotiations: IntCounterVec,
    /// `kinlink_p2p_negotiations_open`: offers relayed without an outcome yet.
    pub p2p_negotiations_open: IntGauge,
    /// `kinlink_p2p_connect_seconds`: offer relayed → first `connected` report.
    pub p2p_connect: Histogram,
    /// `kinlink_check_tokens_total{result}`: `POST /v1/check/tokens` (issued, unauthorized, rate_limited).
    pub check_tokens: IntCounterVec,
    /// `kinlink_turn_tls_reloads_total{listener,result}`: certificate reloads (turn, http, redis; ok, error).
    pub turn_tls_reloads: IntCounterVec,
    /// `kinlink_auth_key_reloads_total{source,result}`: token keys and secrets reloaded
    /// (jwks_file, token_secrets, turn_secrets; ok, error).
    pub auth_key_reloads: IntCounterVec,
    /// `kinlink_auth_jwks_url_fetches_total{result}`: fetches of `auth.public_keys_url`.
    pub auth_jwks_url_fetches: IntCounterVec,
    /// `kinlink_auth_jwks_url_last_success_timestamp_seconds`: last good fetch (0: never).
    pub auth_jwks_url_last_success: IntGauge,
    /// `kinlink_auth_deny_list_entries`: revocations in force.
    pub auth_deny_list_entries: IntGauge,
    /// `kinlink_admin_revocations_total{kind}`: revocations made through this node's admin API.
    pub admin_revocations: IntCounterVec,
    /// `kinlink_admin_disconnects_total`: disconnects made through this node's admin API.
    pub admin_disconnects: IntCounter,
    /// `kinlink_admin_requests_total{result}`: admin API requests by authorization (ok, missing, wrong).
    pub admin_requests: IntCounterVec,
    /// `kinlink_panics_total`: panics anywhere in the process (each one is a bug).
    pub panics: IntCounter,
    /// `kinlink_listener_restarts_total{listener}`: listener tasks that ended and were restarted.
    pub listener_restarts: IntCounterVec,
    /// `kinlink_accept_errors_total{listener}`: failed `accept()` calls (e.g. out of descriptors).
    pub accept_errors: IntCounterVec,
    /// `kinlink_connections_rejected_total{listener,reason}`: TCP connections closed at once
    /// by an admission cap.
    pub connections_rejected: IntCounterVec,
    /// `kinlink_http_unupgraded_connections`: HTTP connections not (yet) WebSockets.
    pub http_unupgraded: IntGauge,
    /// `kinlink_acme_certificate_expiry_timestamp_seconds`: when the ACME certificate in use
    /// expires (unix seconds); 0 before one is loaded or issued.
    pub acme_certificate_expiry: IntGauge,
    /// `kinlink_acme_events_total{event}`: deployed_cached, deployed_new, cache_store,
    /// order_error, cache_error.
    pub acme_events: IntCounterVec,
    /// `kinlink_shared_port_connections_total{protocol}`: connections on a port HTTP shares
    /// with TURN, by what they turned out to speak (`unknown`: closed unserved).
    pub shared_port_connections: IntCounterVec,
    /// `kinlink_turn_stream_timeouts_total{stage}`: TCP/TLS clients cut off by a deadline.
    pub turn_stream_timeouts: IntCounterVec,
    /// `kinlink_turn_tls_handshake_failures_total{listener,reason}` (turn, http).
    pub turn_tls_handshake_failures: IntCounterVec,
    /// `kinlink_turn_shard_packets_total{shard}`: packets relayed (both directions) by each
    /// UDP data-path shard; the label is bounded by `turn.data_threads`.
    pub turn_shard_packets: IntCounterVec,
    /// `kinlink_turn_public_ip_checks_total{result}`: STUN checks of `turn.public_ip =
    /// "stun:…"` (same, changed, failed).
    pub turn_public_ip_checks: IntCounterVec,
    /// `kinlink_cluster_redis_errors_total{op}`: Redis commands that failed (join, leave,
    /// publish, subscribe, heartbeat, sweep); while they fail, devices see only this node.
    pub cluster_redis_errors: IntCounterVec,
    /// `kinlink_cluster_resubscriptions_total{reason}`: subscriptions renewed after a Redis
    /// reconnect or a moved Redis Cluster slot.
    pub cluster_resubscriptions: IntCounterVec,
    /// `kinlink_cluster_connected`: 1 while this node reaches Redis (several nodes only).
    pub cluster_connected: IntGauge,
    /// Run before every render, to bring counters kept elsewhere (the TURN core's) up to date.
    render_hooks: Arc<Mutex<Vec<RenderHook>>>,
}

/// See [`Metrics::on_render`].
pub type RenderHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Listeners that restart, accept and admit (labels of the listener metrics).
pub const LISTENERS: [&str; 4] = ["http", "turn_udp", "turn_tcp", "turn_tls"];
/// `kinlink_shared_port_connections_total` protocols.
pub const SHARED_PORT_PROTOCOLS: [&str; 5] = ["http", "https", "turn_tcp", "turn_tls", "unknown"];

/// `kinlink_connections_rejected_total` reasons.
pub const ADMISSION_REASONS: [&str; 3] = ["total", "per_ip", "unupgraded"];
/// `kinlink_turn_stream_timeouts_total` stages.
pub const STREAM_TIMEOUT_STAGES: [&str; 3] = ["first_message", "frame", "idle"];
/// `kinlink_turn_tls_handshake_failures_total` reasons.
pub const TLS_FAILURE_REASONS: [&str; 5] = ["timeout", "eof", "protocol", "alpn", "io"];
/// `kinlink_check_tokens_total` results.
pub const CHECK_TOKEN_RESULTS: [&str; 6] = ["issued", "unauthorized", "forbidden", "rate_limited", "rate_limited_token", "rate_limited_ip"];

/// The process-wide panic counter: a panic hook has no `Metrics` to hand, so every registry
/// registers this one counter (see [`count_panics`]).
static PANICS: std::sync::LazyLock<IntCounter> =
    std::sync::LazyLock::new(|| IntCounter::new("kinlink_panics_total", "Panics anywhere in the process; each is a bug.").expect("valid metric"));

/// Installs (once) a panic hook that counts panics and then runs the previous hook. A panic
/// in a task kills only that task, so without this one would go unnoticed.
pub fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.inc();
            previous(info);
        }));
    });
}

/// `kinlink_turn_auth_failures_total` reasons.
pub const TURN_AUTH_REASONS: [&str; 9] =
    ["malformed", "bad_nonce", "stale_nonce", "wrong_realm", "bad_integrity", "expired", "wrong_credentials", "missing", "revoked"];
/// `kinlink_turn_dropped_packets_total` reasons (the TURN core's `DropReason`s, checked by a test).
pub const TURN_DROP_REASONS: [&str; 10] = [
    "malformed",
    "no_allocation",
    "no_channel",
    "no_permission",
    "denied_peer",
    "too_large",
    "bandwidth",
    "queue_full",
    "rate_limited",
    "send_buffer_full",
];
/// TURN client transports (`transport` labels).
pub const TURN_TRANSPORTS: [&str; 3] = ["udp", "tcp", "tls"];
/// `kinlink_turn_permission_denied_total` reasons.
pub const TURN_DENIED_REASONS: [&str; 3] = ["special_range", "deny_list", "own_port"];
/// `kinlink_turn_quota_rejections_total` scopes.
pub const TURN_QUOTA_SCOPES: [&str; 7] = ["server", "family", "device", "check", "ports", "permissions", "channels"];

/// `kinlink_signal_connections_closed_total` reasons that are not a [`CloseCode`].
pub const EXTRA_CLOSE_REASONS: [&str; 3] = ["client", "write_timeout", "error"];

fn counter_vec2(r: &Registry, name: &str, help: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &["direction"]).expect("valid metric");
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("metric names are unique");
            c
        }
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, label: &str| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"))
        };

        let bytes = counter_vec2(&registry, "kinlink_turn_relayed_bytes_total", "Payload bytes relayed, by direction.");
        let packets = counter_vec2(&registry, "kinlink_turn_relayed_packets_total", "Packets relayed, by direction.");
        let m = Metrics {
            signal_connections: gauge("kinlink_signal_connections", "Open signaling WebSocket connections."),
            signal_connections_accepted: counter(
                "kinlink_signal_connections_accepted_total",
                "Signaling WebSocket upgrades accepted.",
            ),
            signal_upgrades_rejected: counter_vec(
                "kinlink_signal_upgrades_rejected_total",
                "Signaling WebSocket upgrades refused before the handshake, by reason.",
                "reason",
            ),
            signal_connections_closed: counter_vec(
                "kinlink_signal_connections_closed_total",
                "Signaling connections closed, by reason.",
                "reason",
            ),
            signal_devices: gauge("kinlink_signal_devices", "Devices registered on this node."),
            signal_families: gauge("kinlink_signal_families", "Families with at least one device online on this node."),
            signal_registrations: counter("kinlink_signal_registrations_total", "Successful device registrations."),
            signal_relayed: counter_vec(
                "kinlink_signal_messages_relayed_total",
                "Signaling messages relayed between devices, by type.",
                "type",
            ),
            signal_errors: counter_vec("kinlink_signal_errors_total", "Error messages sent to clients, by code.", "code"),
            signal_relay_latency: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kinlink_signal_relay_latency_seconds",
                        "Time from accepting a relayed message to writing it to the target's socket.",
                    )
                    .buckets(vec![0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0]),
                )
                .expect("valid metric"),
            ),
            signal_ice_refreshes: counter(
                "kinlink_signal_ice_servers_pushed_total",
                "Fresh ICE server credentials pushed to connected devices before expiry.",
            ),
            auth_failures: counter_vec("kinlink_auth_failures_total", "Device tokens refused, by reason.", "reason"),
            http_ice_servers: counter_vec(
                "kinlink_http_ice_servers_requests_total",
                "GET /v1/ice-servers requests, by HTTP status.",
                "status",
            ),
            build_info: reg(
                &registry,
                IntGaugeVec::new(Opts::new("kinlink_build_info", "Build information; always 1."), &["version"])
                    .expect("valid metric"),
            ),
            turn_allocations: gauge("kinlink_turn_allocations", "Open TURN allocations."),
            turn_allocations_created: counter_vec(
                "kinlink_turn_allocations_created_total",
                "TURN allocations created, by client transport.",
                "transport",
            ),
            turn_allocation_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("kinlink_turn_allocation_duration_seconds", "Lifetime of closed TURN allocations.")
                        .buckets(vec![1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0]),
                )
                .expect("valid metric"),
            ),
            // Resolved once: the data path must not hash label values per packet.
            turn_bytes_to_peer: bytes.with_label_values(&["client_to_peer"]),
            turn_bytes_to_client: bytes.with_label_values(&["peer_to_client"]),
            turn_packets_to_peer: packets.with_label_values(&["client_to_peer"]),
            turn_packets_to_client: packets.with_label_values(&["peer_to_client"]),
            turn_dropped: counter_vec(
                "kinlink_turn_dropped_packets_total",
                "Relay data dropped instead of forwarded, by reason.",
                "reason",
            ),
            turn_auth_failures: counter_vec("kinlink_turn_auth_failures_total", "TURN requests refused authentication, by reason.", "reason"),
            turn_permission_denied: counter_vec(
                "kinlink_turn_permission_denied_total",
                "Peer addresses refused by the peer policy, by reason.",
                "reason",
            ),
            turn_quota_rejections: counter_vec(
                "kinlink_turn_quota_rejections_total",
                "TURN requests refused for a quota or capacity, by scope.",
                "scope",
            ),
            turn_binding_requests: counter_vec(
                "kinlink_turn_binding_requests_total",
                "STUN binding requests answered, by transport.",
                "transport",
            ),
            turn_relay_capacity: gauge(
                "kinlink_turn_relay_capacity_bytes_per_second",
                "Relay capacity the operator configured (metrics.relay_capacity_bytes_per_sec), payload bytes/s in both directions.",
            ),
            p2p_negotiations: counter_vec(
                "kinlink_p2p_negotiations_total",
                "P2P negotiations (an offer relayed between two devices) by outcome: direct, relay, http_fallback, abandoned.",
                "outcome",
            ),
            p2p_negotiations_open: gauge("kinlink_p2p_negotiations_open", "P2P negotiations waiting for a p2p-status report."),
            p2p_connect: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kinlink_p2p_connect_seconds",
                        "Time from relaying an offer to the first `connected` p2p-status report.",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0]),
                )
                .expect("valid metric"),
            ),
            check_tokens: counter_vec(
                "kinlink_check_tokens_total",
                "Self-check token pairs requested, by result: issued, unauthorized, rate_limited.",
                "result",
            ),
            turn_tls_reloads: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kinlink_turn_tls_reloads_total",
                        "TLS certificate reloads (file change or SIGHUP), by listener (turn, http, redis: its client certificate) and result (ok, error).",
                    ),
                    &["listener", "result"],
                )
                .expect("valid metric"),
            ),
            auth_key_reloads: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kinlink_auth_key_reloads_total",
                        "Token keys and shared secrets reloaded (file change or SIGHUP), by source (jwks_file, token_secrets, turn_secrets) and result (ok, error).",
                    ),
                    &["source", "result"],
                )
                .expect("valid metric"),
            ),
            auth_jwks_url_fetches: counter_vec("kinlink_auth_jwks_url_fetches_total", "Fetches of auth.public_keys_url, by result (ok, error).", "result"),
            auth_jwks_url_last_success: gauge(
                "kinlink_auth_jwks_url_last_success_timestamp_seconds",
                "Unix time of the last good fetch of auth.public_keys_url (0: never fetched).",
            ),
            auth_deny_list_entries: gauge("kinlink_auth_deny_list_entries", "Revocations in force (devices and families whose earlier tokens are refused)."),
            admin_revocations: counter_vec("kinlink_admin_revocations_total", "Revocations made through this node's admin API, by kind (device, family).", "kind"),
            admin_disconnects: counter("kinlink_admin_disconnects_total", "Device disconnects made through this node's admin API."),
            admin_requests: counter_vec("kinlink_admin_requests_total", "Admin API requests, by authorization result (ok, missing, wrong).", "result"),
            panics: reg(&registry, PANICS.clone()),
            listener_restarts: counter_vec(
                "kinlink_listener_restarts_total",
                "Listener tasks that ended unexpectedly and were restarted, by listener.",
                "listener",
            ),
            accept_errors: counter_vec("kinlink_accept_errors_total", "Failed accept() calls, by listener.", "listener"),
            connections_rejected: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kinlink_connections_rejected_total",
                        "TCP connections closed at once by an admission cap, by listener and reason.",
                    ),
                    &["listener", "reason"],
                )
                .expect("valid metric"),
            ),
            http_unupgraded: gauge("kinlink_http_unupgraded_connections", "HTTP connections not (yet) upgraded to a WebSocket."),
            acme_certificate_expiry: gauge(
                "kinlink_acme_certificate_expiry_timestamp_seconds",
                "When the certificate obtained by ACME expires, in unix seconds; 0 until one is loaded or issued.",
            ),
            acme_events: counter_vec(
                "kinlink_acme_events_total",
                "ACME client events: deployed_cached, deployed_new (issued or renewed), cache_store, order_error, cache_error.",
                "event",
            ),
            shared_port_connections: counter_vec(
                "kinlink_shared_port_connections_total",
                "Connections on the port HTTP shares with TURN, by protocol: http, https, turn_tcp, turn_tls, unknown (closed unserved).",
                "protocol",
            ),
            turn_stream_timeouts: counter_vec(
                "kinlink_turn_stream_timeouts_total",
                "TURN TCP/TLS clients closed by a deadline, by stage: first_message, frame, idle.",
                "stage",
            ),
            turn_tls_handshake_failures: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "kinlink_turn_tls_handshake_failures_total",
                        "TLS handshakes that failed, by listener (turn, http) and reason (timeout, eof, protocol, alpn: no application protocol in common, io).",
                    ),
                    &["listener", "reason"],
                )
                .expect("valid metric"),
            ),
            turn_shard_packets: counter_vec(
                "kinlink_turn_shard_packets_total",
                "Packets relayed (both directions) by each UDP data-path shard (turn.data_threads).",
                "shard",
            ),
            turn_public_ip_checks: counter_vec(
                "kinlink_turn_public_ip_checks_total",
                "STUN checks of this node's public address (turn.public_ip = stun:HOST:PORT), by result: same, changed, failed.",
                "result",
            ),
            cluster_redis_errors: counter_vec(
                "kinlink_cluster_redis_errors_total",
                "Redis commands that failed, by operation; while they fail, devices see only the devices of their own node.",
                "op",
            ),
            cluster_resubscriptions: counter_vec(
                "kinlink_cluster_resubscriptions_total",
                "Times this node subscribed to its Redis channels again, by reason: reconnect (Redis came back), slots_moved (a Redis Cluster slot moved).",
                "reason",
            ),
            cluster_connected: gauge(
                "kinlink_cluster_connected",
                "1 while this node reaches Redis (cluster.redis_url set); 0 means devices see only their own node.",
            ),
            render_hooks: Arc::default(),
            registry: registry.clone(),
        };
        count_panics();
        for l in LISTENERS {
            m.listener_restarts.with_label_values(&[l]);
            m.accept_errors.with_label_values(&[l]);
        }
        for l in ["http", "turn_stream"] {
            for r in ADMISSION_REASONS {
                if l == "http" || r != "unupgraded" {
                    m.connections_rejected.with_label_values(&[l, r]);
                }
            }
        }
        for s in STREAM_TIMEOUT_STAGES {
            m.turn_stream_timeouts.with_label_values(&[s]);
        }
        for r in TLS_FAILURE_REASONS {
            m.turn_tls_handshake_failures.with_label_values(&["turn", r]);
            m.turn_tls_handshake_failures.with_label_values(&["http", r]);
        }
        for e in ["deployed_cached", "deployed_new", "cache_store", "order_error", "cache_error"] {
            m.acme_events.with_label_values(&[e]);
        }
        for p in SHARED_PORT_PROTOCOLS {
            m.shared_port_connections.with_label_values(&[p]);
        }
        for r in ["ok", "error"] {
            m.turn_tls_reloads.with_label_values(&["turn", r]);
            m.turn_tls_reloads.with_label_values(&["http", r]);
            m.auth_jwks_url_fetches.with_label_values(&[r]);
            for source in ["jwks_file", "token_secrets", "turn_secrets"] {
                m.auth_key_reloads.with_label_values(&[source, r]);
            }
        }
        for op in ["join", "leave", "publish", "subscribe", "heartbeat", "sweep", "connection", "cluster_slots"] {
            m.cluster_redis_errors.with_label_values(&[op]);
        }
        for r in ["reconnect", "slots_moved"] {
            m.cluster_resubscriptions.with_label_values(&[r]);
        }
        for r in ["same", "changed", "failed"] {
            m.turn_public_ip_checks.with_label_values(&[r]);
        }
        for r in CHECK_TOKEN_RESULTS {
            m.check_tokens.with_label_values(&[r]);
        }
        for o in crate::signal::negotiation::Outcome::ALL {
            m.p2p_negotiations.with_label_values(&[o.as_str()]);
        }
        for t in TURN_TRANSPORTS {
            m.turn_allocations_created.with_label_values(&[t]);
            m.turn_binding_requests.with_label_values(&[t]);
        }
        for r in TURN_AUTH_REASONS {
            m.turn_auth_failures.with_label_values(&[r]);
        }
        for r in TURN_DROP_REASONS {
            m.turn_dropped.with_label_values(&[r]);
        }
        for s in TURN_QUOTA_SCOPES {
            m.turn_quota_rejections.with_label_values(&[s]);
        }
        for d in TURN_DENIED_REASONS {
            m.turn_permission_denied.with_label_values(&[d]);
        }
        for reason in ["server_full", "shutting_down"] {
            m.signal_upgrades_rejected.with_label_values(&[reason]);
        }
        for kind in ["device", "family"] {
            m.admin_revocations.with_label_values(&[kind]);
        }
        for result in ["ok", "missing", "wrong"] {
            m.admin_requests.with_label_values(&[result]);
        }
        for reason in CloseCode::ALL.iter().map(|c| c.reason()).chain(EXTRA_CLOSE_REASONS) {
            m.signal_connections_closed.with_label_values(&[reason]);
        }
        for kind in RelayKind::ALL {
            m.signal_relayed.with_label_values(&[kind.as_str()]);
        }
        for code in ErrorCode::ALL {
            m.signal_errors.with_label_values(&[code.as_str()]);
        }
        for e in AuthError::ALL {
            m.auth_failures.with_label_values(&[e.reason()]);
        }
        for status in ["200", "401"] {
            m.http_ice_servers.with_label_values(&[status]);
        }
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registration fails only if registered twice, which `new` never does.
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Runs `hook` before every render.
    pub fn on_render(&self, hook: RenderHook) {
        self.render_hooks.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        for hook in self.render_hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            hook(self);
        }
        let mut buf = Vec::new();
        // Encoding our own well-formed metric families cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
