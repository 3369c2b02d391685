//! Every metric kinlink exports, in one place, with fixed label sets. Labels are bounded
//! enums only: never a family, user, device or IP. Labelled counters are created at zero at
//! start-up so `rate()` works from the first scrape. docs/metrics.md describes each one.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
}

/// `kinlink_signal_connections_closed_total` reasons that are not a [`CloseCode`].
pub const EXTRA_CLOSE_REASONS: [&str; 3] = ["client", "write_timeout", "error"];

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
            registry: registry.clone(),
        };
        for reason in ["server_full", "shutting_down"] {
            m.signal_upgrades_rejected.with_label_values(&[reason]);
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

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own well-formed metric families cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
