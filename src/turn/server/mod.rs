//! The TURN server's rules without IO, one file per concern: `auth` (nonces, credentials,
//! the unauthenticated-request limit), `allocate` (Allocate, Refresh, reservations, quotas),
//! `permissions` (CreatePermission, ChannelBind, peer policy), `data` (ChannelData, Send and
//! Data indications, bandwidth). Drivers ([`super::listener`], [`super::relay`]) hand it packets
//! and the clock; it answers with bytes to send. Relay sockets are created through a
//! caller-supplied binder and kept as an opaque handle `R`, so tests use plain numbers.
//!
//! The data path is allocation-free: client ChannelData/Send payloads are returned as a range
//! of the input, and peer packets are framed in place in the caller's buffer, which keeps
//! [`PEER_HEADROOM`] bytes free in front of the payload and 3 behind it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use md5::Digest;

use super::policy::{Denied, PeerPolicy};
use crate::ratelimit::{KeyedBuckets, LogLimiter};
use crate::turn::stun::{attr, method, Builder, Class, Message};
use crate::auth::{turn_password, valid_id};
use crate::config::Secret;
use crate::metrics::Metrics;

/// Bytes a peer-packet buffer must keep free before the payload (Data indication header with
/// an IPv6 XOR-PEER-ADDRESS).
pub const PEER_HEADROOM: usize = 20 + 24 + 4;

/// Client transport, also a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// Every transport, for pre-registering metrics.
    pub const ALL: [Transport; 3] = [Transport::Udp, Transport::Tcp, Transport::Tls];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

/// Identifies a client: its address, the server socket it reached, and the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// Client address.
    pub client: SocketAddr,
    /// The server's listening address it used.
    pub server: SocketAddr,
    /// Transport.
    pub transport: Transport,
}

/// Settings of the core, from `turn.*`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// REST shared secret.
    pub secret: Secret,
    /// Realm.
    pub realm: String,
    /// The IP put into XOR-RELAYED-ADDRESS (NAT, Kubernetes); `None` uses the relay socket's.
    pub public_ip: Option<IpAddr>,
    /// Longest allocation lifetime granted.
    pub max_lifetime: Duration,
    /// Nonce validity.
    pub nonce_lifetime: Duration,
    /// Allocations per family.
    pub family_allocations: usize,
    /// Allocations per device.
    pub device_allocations: usize,
    /// Allocations on this server.
    pub total_allocations: usize,
    /// Allocations all self-check families together may hold (families named
    /// [`crate::check::FAMILY_PREFIX`]`…`), so `/check` can never take the server's capacity.
    pub check_allocations: usize,
    /// Permissions (peer IPs) per allocation.
    pub permissions_per_allocation: usize,
    /// Channels per allocation.
    pub channels_per_allocation: usize,
    /// Relayed payload bytes per second per family, both directions; 0 is unlimited.
    pub family_bytes_per_sec: u64,
    /// Requests without valid credentials (Binding, the 401 leg, refused ones) answered per
    /// second per source IP (IPv6 per /64); past it they are dropped unanswered. 0: no limit.
    pub unauthenticated_per_ip_per_sec: u32,
}

/// RFC 8656 defaults.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// What to do with a client packet.
#[derive(Debug)]
pub enum ClientAction<R> {
    /// Nothing (dropped, or an indication that needs no answer).
    None,
    /// Send these bytes back to the client.
    Reply(Vec<u8>),
    /// Send `payload` (a range of the input) from `relay` to `peer`.
    Relay {
        /// The allocation's relay socket.
        relay: R,
        /// Destination.
        peer: SocketAddr,
        /// The payload within the input buffer.
        payload: Range<usize>,
    },
}

/// Why a relay socket could not be had.
#[derive(Debug, thiserror::Error)]
#[error("no relay port available: {0}")]
pub struct BindError(pub String);

/// Which port a relay socket needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    /// Any port of the range.
    Any,
    /// An even port (EVEN-PORT).
    Even,
    /// Exactly this one (the odd half of a reserved pair).
    Exact(u16),
}

/// What the driver provides for relay sockets.
pub trait Binder<R> {
    /// Binds a relay socket (IPv6 when `ipv6`). Returns the handle and the local address.
    fn bind(&mut self, ipv6: bool, port: PortChoice) -> Result<(R, SocketAddr), BindError>;
    /// The relay now belongs to `tuple`'s allocation: start forwarding what peers send.
    fn start(&mut self, relay: &R, tuple: FiveTuple);
}

/// Sources whose unauthenticated request rate is tracked at once.
const MAX_TRACKED_SOURCES: usize = 65_536;

/// How long a port reserved with EVEN-PORT's R bit is held (RFC 8656 suggests about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// A port held with EVEN-PORT's R bit: it counts against the quotas of the device that made
/// it until it is claimed or expires, and goes with the allocation that made it.
struct Reservation<R> {
    relay: R,
    local: SocketAddr,
    expires: Instant,
    family: Arc<str>,
    device: Arc<str>,
}

struct Permission {
    ip: IpAddr,
    expires: Instant,
}

struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

struct Allocation<R> {
    relay: R,
    relayed: SocketAddr,
    family: Arc<str>,
    device: Arc<str>,
    username: String,
    created: Instant,
    expires: Instant,
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
    /// The Allocate transaction and its success response, for retransmissions.
    allocate_tid: [u8; 12],
    allocate_reply: Vec<u8>,
    /// The odd port this allocation reserved, released with it.
    reservation: Option<[u8; 8]>,
}

struct FamilyUsage {
    allocations: usize,
    /// Token bucket for `family_bytes_per_sec`.
    tokens: f64,
    refilled: Instant,
}

/// A verified request's identity.
struct Authed {
    username: String,
    family: Arc<str>,
    device: Arc<str>,
    key: Vec<u8>,
    sha256: bool,
}

/// The TURN server state.
pub struct TurnServer<R> {
    settings: Settings,
    policy: PeerPolicy,
    metrics: Arc<Metrics>,
    epoch: Instant,
    epoch_unix: u64,
    nonce_key: [u8; 16],
    allocations: HashMap<FiveTuple, Allocation<R>>,
    /// Odd ports held for a later Allocate with RESERVATION-TOKEN.
    reservations: HashMap<[u8; 8], Reservation<R>>,
    /// Allocations and reservations per family.
    families: HashMap<Arc<str>, FamilyUsage>,
    /// Allocations and reservations per device.
    devices: HashMap<(Arc<str>, Arc<str>), usize>,
    /// Allocations and reservations of self-check families.
    check_usage: usize,
    /// Relay ports in use: a peer on one of them is another allocation of this server (the
    /// relay-to-relay case), not one of its listeners.
    relay_ports: HashMap<u16, usize>,
    /// Refusals (auth, quota, policy) logged at most once a second, with a count of the rest.
    refusal_log: LogLimiter,
    /// `unauthenticated_per_ip_per_sec` (burst twice that), by source; `None` when 0.
    unauthenticated: Option<KeyedBuckets<IpAddr>>,
    draining: bool,
}

const SOFTWARE: &str = concat!("kinlink/", env!("CARGO_PKG_VERSION"));

impl<R: Clone> TurnServer<R> {
    /// A server whose clock reads `epoch` at unix time `epoch_unix`.
    pub fn new(settings: Settings, policy: PeerPolicy, metrics: Arc<Metrics>, epoch: Instant, epoch_unix: u64) -> Self {
        let mut nonce_key = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce_key);
        let rate = settings.unauthenticated_per_ip_per_sec;
        let unauthenticated = (rate > 0).then(|| KeyedBuckets::new(rate as f64, rate.saturating_mul(2), MAX_TRACKED_SOURCES));
        TurnServer {
            settings,
            policy,
            metrics,
            epoch,
            epoch_unix,
            nonce_key,
            allocations: HashMap::new(),
            reservations: HashMap::new(),
            families: HashMap::new(),
            devices: HashMap::new(),
            check_usage: 0,
            relay_ports: HashMap::new(),
            refusal_log: LogLimiter::new(epoch, Duration::from_secs(1)),
            unauthenticated,
            draining: false,
        }
    }

    /// Open allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// Stop granting new allocations (shutdown); existing ones run on.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Handles a datagram or stream frame from a client.
    pub fn handle_client(&mut self, now: Instant, tuple: FiveTuple, buf: &[u8], binder: &mut dyn Binder<R>) -> ClientAction<R> {
        match buf.first() {
            Some(b) if b & 0xC0 == 0x40 => self.client_channel_data(now, tuple, buf),
            Some(b) if b & 0xC0 == 0 => match Message::parse(buf) {
                Ok(msg) if msg.fingerprint_ok() => self.client_stun(now, tuple, msg, binder),
                _ => ClientAction::None,
            },
            _ => ClientAction::None,
        }
    }

    fn client_stun(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>, binder: &mut dyn Binder<R>) -> ClientAction<R> {
        match (msg.class, msg.method) {
            (Class::Indication, method::SEND) => self.send_indication(now, tuple, msg),
            (Class::Request, m) => {
                // Anyone can send these, and each answer costs more than the request (a 401
                // is five times its size: a reflection amplifier), so they are rate limited
                // per source before any work.
                if !has_integrity(&msg) && !self.admit_unauthenticated(now, tuple.client.ip()) {
                    return self.drop_packet("rate_limited");
                }
                let unknown = msg.unknown_required();
                if !unknown.is_empty() {
                    let mut b = Builder::new(m, Class::Error, msg.tid);
                    b.error(420, "Unknown Attribute");
                    let list: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
                    b.attr(attr::UNKNOWN_ATTRIBUTES, &list);
                    return ClientAction::Reply(self.finish(b, None));
                }
                match m {
                    method::BINDING => {
                        self.metrics.turn_binding_requests.with_label_values(&[tuple.transport.as_str()]).inc();
                        let mut b = Builder::new(method::BINDING, Class::Success, msg.tid);
                        b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
                        ClientAction::Reply(self.finish(b, None))
                    }
                    method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND => {
                        self.authenticated_request(now, tuple, msg, binder)
                    }
                    _ => {
                        let mut b = Builder::new(m, Class::Error, msg.tid);
                        b.error(400, "Bad Request: unknown method");
                        ClientAction::Reply(self.finish(b, None))
                    }
                }
            }
            // Responses and other indications from clients are ignored.
            _ => ClientAction::None,
        }
    }

    /// Expires allocations, permissions and channels; call about once a second.
    /// `unix` is the wall clock read with `now`: the core follows it (see `sync_wall_clock`).
    pub fn handle_timeout(&mut self, now: Instant, unix: u64) {
        self.sync_wall_clock(now, unix);
        if let Some(buckets) = &mut self.unauthenticated {
            buckets.prune(now);
        }
        let expired: Vec<FiveTuple> = self.allocations.iter().filter(|(_, a)| a.expires <= now).map(|(t, _)| *t).collect();
        for t in expired {
            self.remove(now, &t, "expired");
        }
        let stale: Vec<[u8; 8]> = self.reservations.iter().filter(|(_, r)| r.expires <= now).map(|(t, _)| *t).collect();
        for t in stale {
            if let Some(r) = self.reservations.remove(&t) {
                self.release(&r.family, &r.device);
                self.forget_port(r.local.port());
            }
        }
        for a in self.allocations.values_mut() {
            a.permissions.retain(|p| p.expires > now);
            a.channels.retain(|c| c.expires > now);
        }
    }

    /// The client's connection is gone (TCP/TLS): its allocation goes with it.
    pub fn handle_client_closed(&mut self, now: Instant, tuple: &FiveTuple) {
        self.remove(now, tuple, "client_closed");
    }

    fn remove(&mut self, now: Instant, tuple: &FiveTuple, why: &'static str) {
        let Some(a) = self.allocations.remove(tuple) else { return };
        self.release(&a.family, &a.device);
        self.forget_port(a.relayed.port());
        // Its reserved odd port goes with it (RFC 8656 leaves this open; holding it would let
        // Allocate + Refresh(0) pile up sockets without any allocation).
        if let Some(r) = a.reservation.and_then(|t| self.reservations.remove(&t)) {
            self.release(&r.family, &r.device);
            self.forget_port(r.local.port());
        }
        self.metrics.turn_allocations.set(self.allocations.len() as i64);
        self.metrics.turn_allocation_duration.observe(now.saturating_duration_since(a.created).as_secs_f64());
        tracing::debug!(why, transport = tuple.transport.as_str(), "allocation closed");
    }
}

fn has_integrity(msg: &Message<'_>) -> bool {
    msg.get(attr::MESSAGE_INTEGRITY).is_some() || msg.get(attr::MESSAGE_INTEGRITY_SHA256).is_some()
}

fn is_check_family(family: &str) -> bool {
    family.starts_with(crate::check::FAMILY_PREFIX)
}

/// IPv4-mapped IPv6 peers are compared and relayed as IPv4.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        _ => addr,
    }
}

mod allocate;
mod auth;
mod data;
mod permissions;

pub use auth::long_term_key;

#[cfg(test)]
mod tests;
