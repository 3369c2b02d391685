//! The TURN server's rules without IO, one file per concern: `auth` (nonces, credentials,
//! the unauthenticated-request limit), `allocate` (Allocate, Refresh, reservations, quotas),
//! `permissions` (CreatePermission, ChannelBind, peer policy), `path` (the data path: ChannelData,
//! Send and Data indications, bandwidth), `stats`. Drivers (`turn::shard`, `turn::stream`) hand it packets
//! and the clock; it answers with bytes to send, or asks for relay sockets to be bound
//! ([`ClientAction::Bind`]), which the driver does outside any lock. Relay sockets are kept
//! as an opaque handle `R`, so tests use plain numbers.
//!
//! This is the control plane, one per process behind one lock. The data plane is `path`:
//! each allocation's [`Path`] is read by the thread that relays for it, without the core.
//! It is allocation-free: client ChannelData/Send payloads are returned as a range of the
//! input, and peer packets are framed in place in the caller's buffer, which keeps
//! [`PEER_HEADROOM`] bytes free in front of the payload and 3 behind it.
//! `stats` holds the counters; the core never touches Prometheus or reads a clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use md5::Digest;

use super::policy::{Denied, PeerPolicy};
use crate::auth::revocation::{DenyList, Entry};
use crate::auth::{turn_password, valid_id};
use crate::config::{Secret, TurnQuota};
use crate::ratelimit::{KeyedBuckets, LogLimiter};
use crate::turn::stun::{attr, method, Builder, Class, Message};
use path::{Channel, Permission};

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
    /// REST shared secrets: credentials made with any of them are accepted (rotation).
    pub secrets: Vec<Secret>,
    /// Longest credential lifetime handed out (`turn.credential_ttl_secs`): how long a
    /// revocation must refuse credentials minted before it.
    pub credential_ttl_secs: u64,
    /// Realm.
    pub realm: String,
    /// The IP put into XOR-RELAYED-ADDRESS (NAT, Kubernetes); `None` uses the relay socket's.
    pub public_ip: Option<IpAddr>,
    /// Longest allocation lifetime granted.
    pub max_lifetime: Duration,
    /// Nonce validity.
    pub nonce_lifetime: Duration,
    /// `turn.quota.*`. Self-check families (named [`crate::check::FAMILY_PREFIX`]`…`) share
    /// `check_allocations`, so `/check` can never take the server's capacity.
    pub quota: TurnQuota,
    /// Requests without valid credentials (Binding, the 401 leg, refused ones) answered per
    /// second per source IP (IPv6 per /64); past it they are dropped unanswered. 0: no limit.
    pub unauthenticated_per_ip_per_sec: u32,
}

/// RFC 8656 defaults.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// What to do with a client request.
pub enum ClientAction<R> {
    /// Nothing (dropped, or an indication that needs no answer).
    None,
    /// Send these bytes back to the client.
    Reply(Vec<u8>),
    /// An Allocate passed every check: bind relay sockets (outside any lock) and hand the
    /// result to [`TurnServer::allocated`].
    Bind(BindRequest),
    /// An allocation exists: send `reply` and start relaying what peers send to `path.relay`.
    Started {
        /// The Allocate success response.
        reply: Vec<u8>,
        /// The new allocation's data path.
        path: Arc<Path<R>>,
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

/// Relay sockets an Allocate needs bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindRequest {
    /// The client.
    pub tuple: FiveTuple,
    /// An IPv6 relay.
    pub ipv6: bool,
    /// `Any` or `Even`; with `pair`, an even port and the odd one above it.
    pub choice: PortChoice,
    /// EVEN-PORT with the R bit: the odd port is reserved for a later Allocate.
    pub pair: bool,
}

/// What the driver bound for a [`BindRequest`]: the relay and its local address, and the
/// reserved odd one for a pair.
pub struct Bound<R> {
    /// The relay socket.
    pub relay: (R, SocketAddr),
    /// The reserved odd port of a pair.
    pub reserved: Option<(R, SocketAddr)>,
}

/// Sources whose unauthenticated request rate is tracked at once.
const MAX_TRACKED_SOURCES: usize = 65_536;

/// How long a port reserved with EVEN-PORT's R bit is held (RFC 8656 suggests about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// How long an Allocate may wait for its relay socket before its quota is given back (the
/// driver binds at once; this only guards against a driver that never answers).
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// A port held with EVEN-PORT's R bit: it counts against the quotas of the device that made
/// it until it is claimed or expires, and goes with the allocation that made it.
struct Reservation<R> {
    relay: R,
    local: SocketAddr,
    expires: Instant,
    family: Arc<str>,
    device: Arc<str>,
}

/// An authenticated Allocate waiting for its relay socket; its quota is already taken.
struct Pending {
    authed: Authed,
    tid: [u8; 12],
    lifetime: Duration,
    ports: usize,
    since: Instant,
}

struct Allocation<R> {
    path: Arc<Path<R>>,
    family: Arc<str>,
    device: Arc<str>,
    username: String,
    created: Instant,
    /// The Allocate transaction and its success response, for retransmissions.
    allocate_tid: [u8; 12],
    allocate_reply: Vec<u8>,
    /// The odd port this allocation reserved, released with it.
    reservation: Option<[u8; 8]>,
}

impl<R> Allocation<R> {
    fn live(&self, now: Instant) -> bool {
        self.path.routes().expires > now
    }
}

struct FamilyUsage {
    allocations: usize,
    /// `family_bytes_per_sec`, shared with the family's paths; `None` when unlimited.
    meter: Option<Arc<Meter>>,
}

/// A verified request's identity.
struct Authed {
    username: String,
    family: Arc<str>,
    device: Arc<str>,
    key: Vec<u8>,
    sha256: bool,
}

/// The TURN control plane: authentication, allocations, permissions, channels and quotas.
pub struct TurnServer<R> {
    settings: Settings,
    gate: Arc<PeerGate>,
    stats: Stats,
    epoch: Instant,
    epoch_unix: u64,
    nonce_key: [u8; 16],
    allocations: HashMap<FiveTuple, Allocation<R>>,
    /// Allocates whose relay sockets are being bound.
    pending: HashMap<FiveTuple, Pending>,
    /// Relay ports taken by pending Allocates.
    pending_ports: usize,
    /// Odd ports held for a later Allocate with RESERVATION-TOKEN.
    reservations: HashMap<[u8; 8], Reservation<R>>,
    /// Allocations and reservations per family.
    families: HashMap<Arc<str>, FamilyUsage>,
    /// Allocations and reservations per device.
    devices: HashMap<(Arc<str>, Arc<str>), usize>,
    /// Allocations and reservations of self-check families.
    check_usage: usize,
    /// Refusals (auth, quota, policy) logged at most once a second, with a count of the rest.
    refusal_log: LogLimiter,
    /// `unauthenticated_per_ip_per_sec` (burst twice that), by source; `None` when 0.
    unauthenticated: Option<KeyedBuckets<IpAddr>>,
    draining: bool,
    /// Relays let go of, for the driver to drop after unlocking (closing a socket is a
    /// system call, and none is made under the core's lock).
    released: Released<R>,
    /// Revoked devices and families: their credentials are refused, from the signaling
    /// side's deny list ([`TurnServer::revoke`]).
    revoked: DenyList,
}

/// Relay handles and paths the core no longer holds; see [`TurnServer::take_released`].
pub struct Released<R> {
    /// Reserved or unused relay sockets.
    pub relays: Vec<R>,
    /// Closed allocations' paths (the shard reading one may hold it a little longer).
    pub paths: Vec<Arc<Path<R>>>,
}

impl<R> Default for Released<R> {
    fn default() -> Self {
        Released { relays: Vec::new(), paths: Vec::new() }
    }
}

const SOFTWARE: &str = concat!("kinlink/", env!("CARGO_PKG_VERSION"));

impl<R: Clone> TurnServer<R> {
    /// A server whose clock reads `epoch` at unix time `epoch_unix`.
    pub fn new(settings: Settings, policy: PeerPolicy, epoch: Instant, epoch_unix: u64) -> Self {
        let mut nonce_key = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce_key);
        let rate = settings.unauthenticated_per_ip_per_sec;
        let unauthenticated = (rate > 0).then(|| KeyedBuckets::new(rate as f64, rate.saturating_mul(2), MAX_TRACKED_SOURCES));
        let revoked = DenyList::new(settings.credential_ttl_secs);
        TurnServer {
            revoked,
            settings,
            gate: Arc::new(PeerGate::new(policy)),
            stats: Stats::default(),
            epoch,
            epoch_unix,
            nonce_key,
            allocations: HashMap::new(),
            pending: HashMap::new(),
            pending_ports: 0,
            reservations: HashMap::new(),
            families: HashMap::new(),
            devices: HashMap::new(),
            check_usage: 0,
            refusal_log: LogLimiter::new(epoch, Duration::from_secs(1)),
            unauthenticated,
            draining: false,
            released: Released::default(),
        }
    }

    /// Open allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The control plane's counters.
    pub fn stats(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// The data path of `tuple`'s allocation, for a relaying thread that has not seen it yet.
    pub fn path(&self, tuple: &FiveTuple) -> Option<Arc<Path<R>>> {
        self.allocations.get(tuple).map(|a| a.path.clone())
    }

    /// What the core let go of since the last call: drop it after unlocking.
    pub fn take_released(&mut self) -> Released<R> {
        std::mem::take(&mut self.released)
    }

    /// The public IP changed (`turn.public_ip = "stun:…"`): new allocations advertise `ip`,
    /// and it is denied as one of our own addresses.
    pub fn set_public_ip(&mut self, ip: IpAddr) {
        self.settings.public_ip = Some(ip);
        self.gate.learn_public_ip(ip);
    }

    /// Stop granting new allocations (shutdown); existing ones run on.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Handles a STUN message from a client. Data (ChannelData, Send indications) takes the
    /// [`Path`] of its allocation instead and never reaches the core.
    pub fn handle_client(&mut self, now: Instant, tuple: FiveTuple, buf: &[u8]) -> ClientAction<R> {
        match Message::parse(buf) {
            Ok(msg) if buf.first().is_some_and(|b| b & 0xC0 == 0) && msg.fingerprint_ok() => self.client_stun(now, tuple, msg),
            _ => ClientAction::None,
        }
    }

    fn client_stun(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>) -> ClientAction<R> {
        let Class::Request = msg.class else {
            // Responses and indications from clients are ignored.
            return ClientAction::None;
        };
        let m = msg.method;
        // Anyone can send these, and each answer costs more than the request (a 401 is five
        // times its size: a reflection amplifier), so they are rate limited per source
        // before any work.
        if !has_integrity(&msg) && !self.admit_unauthenticated(now, tuple.client.ip()) {
            return self.drop_packet(DropReason::RateLimited);
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
                self.stats.binding_requests.inc(tuple.transport.as_str());
                let mut b = Builder::new(method::BINDING, Class::Success, msg.tid);
                b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
                ClientAction::Reply(self.finish(b, None))
            }
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND => self.authenticated_request(now, tuple, msg),
            _ => {
                let mut b = Builder::new(m, Class::Error, msg.tid);
                b.error(400, "Bad Request: unknown method");
                ClientAction::Reply(self.finish(b, None))
            }
        }
    }

    pub(super) fn drop_packet(&mut self, reason: DropReason) -> ClientAction<R> {
        self.stats.dropped.inc(reason.as_str());
        ClientAction::None
    }

    /// Replaces the accepted REST secrets (a rotation): live allocations are untouched, new
    /// requests are checked against the new list.
    pub fn set_secrets(&mut self, secrets: Vec<Secret>) {
        self.settings.secrets = secrets;
    }

    /// A device or family was revoked: its allocations end now (with their reservations),
    /// and its credentials minted up to `entry.revoked_at` are refused from now on. Returns
    /// how many allocations were closed.
    pub fn revoke(&mut self, now: Instant, entry: &Entry) -> usize {
        self.revoked.apply(entry);
        let hit = |family: &str, device: &str| family == entry.family_id && entry.device_id.as_deref().is_none_or(|d| d == device);
        let doomed: Vec<FiveTuple> = self.allocations.iter().filter(|(_, a)| hit(&a.family, &a.device)).map(|(t, _)| *t).collect();
        let pending: Vec<FiveTuple> = self.pending.iter().filter(|(_, p)| hit(&p.authed.family, &p.authed.device)).map(|(t, _)| *t).collect();
        for t in pending {
            self.abandon(&t);
        }
        for t in &doomed {
            self.remove(now, t, "revoked");
        }
        doomed.len()
    }

    /// Expires allocations, permissions and channels; call about once a second.
    /// `unix` is the wall clock read with `now`: the core follows it (see `sync_wall_clock`).
    pub fn handle_timeout(&mut self, now: Instant, unix: u64) {
        self.sync_wall_clock(now, unix);
        self.revoked.expire(unix);
        if let Some(buckets) = &mut self.unauthenticated {
            buckets.prune(now);
        }
        let expired: Vec<FiveTuple> = self.allocations.iter().filter(|(_, a)| !a.live(now)).map(|(t, _)| *t).collect();
        for t in expired {
            self.remove(now, &t, "expired");
        }
        let stale: Vec<[u8; 8]> = self.reservations.iter().filter(|(_, r)| r.expires <= now).map(|(t, _)| *t).collect();
        for t in stale {
            if let Some(r) = self.reservations.remove(&t) {
                self.release(&r.family, &r.device);
                self.gate.release_port(r.local.port());
                self.released.relays.push(r.relay);
            }
        }
        let abandoned: Vec<FiveTuple> = self.pending.iter().filter(|(_, p)| now.saturating_duration_since(p.since) > BIND_TIMEOUT).map(|(t, _)| *t).collect();
        for t in abandoned {
            self.abandon(&t);
        }
        for a in self.allocations.values() {
            let mut r = a.path.routes_mut();
            r.permissions.retain(|p| p.expires > now);
            r.channels.retain(|c| c.expires > now);
        }
    }

    /// The client's connection is gone (TCP/TLS): its allocation goes with it.
    pub fn handle_client_closed(&mut self, now: Instant, tuple: &FiveTuple) {
        self.abandon(tuple);
        self.remove(now, tuple, "client_closed");
    }

    fn remove(&mut self, now: Instant, tuple: &FiveTuple, why: &'static str) {
        let Some(a) = self.allocations.remove(tuple) else { return };
        a.path.close();
        self.release(&a.family, &a.device);
        self.gate.release_port(a.path.local.port());
        // Its reserved odd port goes with it (RFC 8656 leaves this open; holding it would let
        // Allocate + Refresh(0) pile up sockets without any allocation).
        if let Some(r) = a.reservation.and_then(|t| self.reservations.remove(&t)) {
            self.release(&r.family, &r.device);
            self.gate.release_port(r.local.port());
            self.released.relays.push(r.relay);
        }
        self.released.paths.push(a.path);
        self.stats.closed(now.saturating_duration_since(a.created));
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
mod path;
mod permissions;
mod stats;

pub use auth::long_term_key;
pub use path::{classify, Meter, Packet, Path, PeerGate};
pub use stats::{DataCounters, Direction, DropReason, Labeled, Stats};

#[cfg(test)]
mod tests;
