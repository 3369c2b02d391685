//! The TURN server's rules without IO: authentication, allocations, permissions, channels,
//! quotas, peer policy and lifetimes. Drivers ([`super::udp`], [`super::tcp`]) hand it packets
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
use crate::ratelimit::LogLimiter;
use super::stun::{attr, method, Builder, Class, Message};
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
    /// `unauthenticated_per_ip_per_sec`, by source.
    unauthenticated: HashMap<IpAddr, crate::ratelimit::TokenBucket>,
    draining: bool,
}

const SOFTWARE: &str = concat!("kinlink/", env!("CARGO_PKG_VERSION"));

impl<R: Clone> TurnServer<R> {
    /// A server whose clock reads `epoch` at unix time `epoch_unix`.
    pub fn new(settings: Settings, policy: PeerPolicy, metrics: Arc<Metrics>, epoch: Instant, epoch_unix: u64) -> Self {
        let mut nonce_key = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce_key);
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
            unauthenticated: HashMap::new(),
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

    fn unix(&self, now: Instant) -> u64 {
        self.epoch_unix + now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Re-reads the wall clock the driver sampled at `now`. Credentials are minted from the
    /// wall clock, so the core follows it (an NTP step included) instead of adding monotonic
    /// time to one reading taken at start. Nonces stay on the monotonic clock: they are ours.
    fn sync_wall_clock(&mut self, now: Instant, unix: u64) {
        let mono_secs = now.saturating_duration_since(self.epoch).as_secs();
        self.epoch_unix = unix.saturating_sub(mono_secs);
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

    fn client_channel_data(&mut self, now: Instant, tuple: FiveTuple, buf: &[u8]) -> ClientAction<R> {
        let Some((number, payload)) = super::stun::parse_channel_data(buf) else {
            return self.drop_packet("malformed");
        };
        let Some(alloc) = self.allocations.get(&tuple) else { return self.drop_packet("no_allocation") };
        if alloc.expires <= now {
            return self.drop_packet("no_allocation");
        }
        let Some(ch) = alloc.channels.iter().find(|c| c.number == number && c.expires > now) else {
            return self.drop_packet("no_channel");
        };
        let (peer, relay, family) = (ch.peer, alloc.relay.clone(), alloc.family.clone());
        if !self.spend(now, &family, payload.len()) {
            return self.drop_packet("bandwidth");
        }
        self.metrics.turn_bytes_to_peer.inc_by(payload.len() as u64);
        self.metrics.turn_packets_to_peer.inc();
        ClientAction::Relay { relay, peer, payload: 4..4 + payload.len() }
    }

    fn drop_packet(&self, reason: &'static str) -> ClientAction<R> {
        self.metrics.turn_dropped.with_label_values(&[reason]).inc();
        ClientAction::None
    }

    /// Family bandwidth quota: false when the packet must be dropped.
    fn spend(&mut self, now: Instant, family: &Arc<str>, bytes: usize) -> bool {
        let rate = self.settings.family_bytes_per_sec;
        if rate == 0 {
            return true;
        }
        let Some(u) = self.families.get_mut(family) else { return true };
        let burst = rate as f64; // one second's worth
        u.tokens = (u.tokens + now.saturating_duration_since(u.refilled).as_secs_f64() * rate as f64).min(burst);
        u.refilled = now;
        if u.tokens >= bytes as f64 {
            u.tokens -= bytes as f64;
            true
        } else {
            false
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

    fn send_indication(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>) -> ClientAction<R> {
        let (Some(Some(peer)), Some(data)) = (msg.xor_peer_addresses().next(), msg.get(attr::DATA)) else {
            return self.drop_packet("malformed");
        };
        let peer = normalize(peer);
        let Some(alloc) = self.allocations.get(&tuple) else { return self.drop_packet("no_allocation") };
        if alloc.expires <= now {
            return self.drop_packet("no_allocation");
        }
        if !alloc.permissions.iter().any(|p| p.ip == peer.ip() && p.expires > now) {
            return self.drop_packet("no_permission");
        }
        // A permission is for an IP; the port is the sender's choice, so the policy (own
        // listeners above all) is applied to the full address of every Send.
        if alloc.relayed.is_ipv6() != peer.is_ipv6() || self.policy_check(peer).is_err() {
            return self.drop_packet("denied_peer");
        }
        let (relay, family) = (alloc.relay.clone(), alloc.family.clone());
        if !self.spend(now, &family, data.len()) {
            return self.drop_packet("bandwidth");
        }
        // `data` borrows from the input: recover its offset.
        let start = data.as_ptr() as usize - msg.raw().as_ptr() as usize;
        self.metrics.turn_bytes_to_peer.inc_by(data.len() as u64);
        self.metrics.turn_packets_to_peer.inc();
        ClientAction::Relay { relay, peer, payload: start..start + data.len() }
    }

    /// Handles a packet a peer sent to the relay of `tuple`'s allocation. The payload sits
    /// at `buf[PEER_HEADROOM..PEER_HEADROOM + len]`; on success returns the range of `buf`
    /// holding the framed message (ChannelData or Data indication) for the client.
    pub fn handle_peer(&mut self, now: Instant, tuple: &FiveTuple, peer: SocketAddr, buf: &mut [u8], len: usize) -> Option<Range<usize>> {
        let Some(alloc) = self.allocations.get(tuple) else {
            self.drop_packet("no_allocation");
            return None;
        };
        if alloc.expires <= now {
            self.drop_packet("no_allocation");
            return None;
        }
        let peer = normalize(peer);
        if !alloc.permissions.iter().any(|p| p.ip == peer.ip() && p.expires > now) {
            self.drop_packet("no_permission");
            return None;
        }
        let channel = alloc.channels.iter().find(|c| c.peer == peer && c.expires > now).map(|c| c.number);
        let family = alloc.family.clone();
        if buf.len() < PEER_HEADROOM + len + 3 {
            return None;
        }
        if !self.spend(now, &family, len) {
            self.drop_packet("bandwidth");
            return None;
        }
        self.metrics.turn_bytes_to_client.inc_by(len as u64);
        self.metrics.turn_packets_to_client.inc();
        let end = PEER_HEADROOM + len;
        match channel {
            Some(number) => {
                let start = PEER_HEADROOM - 4;
                buf[start..start + 2].copy_from_slice(&number.to_be_bytes());
                buf[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
                // Over streams ChannelData is padded to a multiple of 4 (RFC 8656 §12.5).
                let pad = if tuple.transport.is_stream() { (4 - len % 4) % 4 } else { 0 };
                buf[end..end + pad].fill(0);
                Some(start..end + pad)
            }
            None => {
                let mut tid = [0u8; 12];
                rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut tid);
                let mut addr = [0u8; 20];
                let alen = super::stun::encode_xor_addr(peer, &tid, &mut addr);
                let hdr_len = 20 + 4 + alen + 4;
                let start = PEER_HEADROOM - hdr_len;
                let pad = (4 - len % 4) % 4;
                let h = &mut buf[start..PEER_HEADROOM];
                h[0..2].copy_from_slice(&super::stun::message_type(method::DATA, Class::Indication).to_be_bytes());
                h[2..4].copy_from_slice(&((4 + alen + 4 + len + pad) as u16).to_be_bytes());
                h[4..8].copy_from_slice(&super::stun::MAGIC_COOKIE.to_be_bytes());
                h[8..20].copy_from_slice(&tid);
                h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
                h[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
                h[24..24 + alen].copy_from_slice(&addr[..alen]);
                let d = 24 + alen;
                h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
                h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
                buf[end..end + pad].fill(0);
                Some(start..end + pad)
            }
        }
    }

    /// Expires allocations, permissions and channels; call about once a second.
    /// `unix` is the wall clock read with `now`: the core follows it (see `sync_wall_clock`).
    pub fn handle_timeout(&mut self, now: Instant, unix: u64) {
        self.sync_wall_clock(now, unix);
        // A bucket idle for two seconds is full again: forget it.
        self.unauthenticated.retain(|_, b| now.saturating_duration_since(b.last_taken()) < Duration::from_secs(2));
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

    fn nonce(&self, now: Instant, client: IpAddr) -> String {
        let expiry = (now.saturating_duration_since(self.epoch) + self.settings.nonce_lifetime).as_secs();
        format!("{expiry:010x}{}", self.nonce_mac(expiry, client))
    }

    fn nonce_mac(&self, expiry: u64, client: IpAddr) -> String {
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&self.nonce_key).expect("any key length");
        mac.update(&expiry.to_be_bytes());
        match client {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.finalize().into_bytes()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `Ok(())` for a fresh nonce of ours, `Err(true)` for a stale one, `Err(false)` for junk.
    fn check_nonce(&self, now: Instant, client: IpAddr, nonce: &[u8]) -> Result<(), bool> {
        // Bytes, not text: an attacker chooses the nonce, and slicing decoded text at a byte
        // index panics when a multi-byte character straddles it.
        let (Some(expiry), Some(mac)) = (nonce.get(..10), nonce.get(10..)) else { return Err(false) };
        if nonce.len() != 26 || !nonce.iter().all(u8::is_ascii_hexdigit) {
            return Err(false);
        }
        let expiry = std::str::from_utf8(expiry).ok().and_then(|e| u64::from_str_radix(e, 16).ok()).ok_or(false)?;
        if self.nonce_mac(expiry, client).as_bytes() != mac {
            return Err(false);
        }
        if expiry <= now.saturating_duration_since(self.epoch).as_secs() {
            return Err(true);
        }
        Ok(())
    }

    fn challenge(&self, now: Instant, tuple: FiveTuple, m: u16, tid: [u8; 12], code: u16, reason: &str) -> Vec<u8> {
        let mut b = Builder::new(m, Class::Error, tid);
        b.error(code, reason).attr(attr::REALM, self.settings.realm.as_bytes());
        b.attr(attr::NONCE, self.nonce(now, tuple.client.ip()).as_bytes());
        self.finish(b, None)
    }

    fn auth_failure(&self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, reason: &'static str) -> Vec<u8> {
        self.metrics.turn_auth_failures.with_label_values(&[reason]).inc();
        if let Some(suppressed) = self.refusal_log.allow(now) {
            tracing::info!(reason, transport = tuple.transport.as_str(), suppressed, "TURN request refused (one line a second; kinlink_turn_auth_failures_total counts all)");
        }
        self.challenge(now, tuple, msg.method, msg.tid, 401, "Unauthorized")
    }

    /// Long-term credential check with TURN REST usernames (RFC 8489 §9.2).
    fn authenticate(&self, now: Instant, tuple: FiveTuple, msg: &Message<'_>) -> Result<Authed, Vec<u8>> {
        let sha256 = msg.get(attr::MESSAGE_INTEGRITY_SHA256).is_some();
        if msg.get(attr::MESSAGE_INTEGRITY).is_none() && !sha256 {
            // The normal first leg: no credentials yet.
            return Err(self.challenge(now, tuple, msg.method, msg.tid, 401, "Unauthorized"));
        }
        let (Some(username), Some(realm), Some(nonce)) = (msg.get(attr::USERNAME), msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            self.metrics.turn_auth_failures.with_label_values(&["malformed"]).inc();
            let mut b = Builder::new(msg.method, Class::Error, msg.tid);
            // USERHASH needs the server to find the user by hash; a TURN REST username is not
            // stored anywhere, so the nonce never offers username anonymity (RFC 8489 §9.2).
            if msg.get(attr::USERHASH).is_some() {
                b.error(400, "Bad Request: USERHASH is not offered (TURN REST credentials); send USERNAME");
            } else {
                b.error(400, "Bad Request: USERNAME, REALM and NONCE are required");
            }
            return Err(self.finish(b, None));
        };
        match self.check_nonce(now, tuple.client.ip(), nonce) {
            Ok(()) => {}
            Err(stale) => {
                self.metrics.turn_auth_failures.with_label_values(&[if stale { "stale_nonce" } else { "bad_nonce" }]).inc();
                return Err(self.challenge(now, tuple, msg.method, msg.tid, 438, "Stale Nonce"));
            }
        }
        if realm != self.settings.realm.as_bytes() {
            return Err(self.auth_failure(now, tuple, msg, "wrong_realm"));
        }
        let Ok(username) = std::str::from_utf8(username) else { return Err(self.auth_failure(now, tuple, msg, "malformed")) };
        let mut parts = username.splitn(3, ':');
        let (Some(expiry), Some(family), Some(device)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(self.auth_failure(now, tuple, msg, "malformed"));
        };
        let Ok(expiry) = expiry.parse::<u64>() else { return Err(self.auth_failure(now, tuple, msg, "malformed")) };
        if !valid_id(family) || !valid_id(device) {
            return Err(self.auth_failure(now, tuple, msg, "malformed"));
        }
        let password = turn_password(&self.settings.secret, username);
        let key = long_term_key(username, &self.settings.realm, &password, sha256);
        let ok = if sha256 { msg.verify_integrity_sha256(&key) } else { msg.verify_integrity(&key) };
        if !ok {
            return Err(self.auth_failure(now, tuple, msg, "bad_integrity"));
        }
        // Checked after the MAC so a forged username learns nothing from the answer.
        if expiry <= self.unix(now) {
            return Err(self.auth_failure(now, tuple, msg, "expired"));
        }
        Ok(Authed { username: username.to_string(), family: family.into(), device: device.into(), key, sha256 })
    }

    fn finish(&self, mut b: Builder, auth: Option<(&[u8], bool)>) -> Vec<u8> {
        b.attr(attr::SOFTWARE, SOFTWARE.as_bytes());
        if let Some((key, sha256)) = auth {
            if sha256 {
                b.integrity_sha256(key);
            } else {
                b.integrity(key);
            }
        }
        b.finish_with_fingerprint()
    }

    fn error_reply(&self, msg: &Message<'_>, a: &Authed, code: u16, reason: &str) -> Vec<u8> {
        let mut b = Builder::new(msg.method, Class::Error, msg.tid);
        b.error(code, reason);
        self.finish(b, Some((&a.key, a.sha256)))
    }

    fn authenticated_request(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>, binder: &mut dyn Binder<R>) -> ClientAction<R> {
        // A retransmitted Allocate gets the same answer (RFC 8656 §7.2).
        if msg.method == method::ALLOCATE {
            if let Some(a) = self.allocations.get(&tuple) {
                if a.allocate_tid == msg.tid {
                    return ClientAction::Reply(a.allocate_reply.clone());
                }
            }
        }
        let a = match self.authenticate(now, tuple, &msg) {
            Ok(a) => a,
            // Refused credentials count against the unauthenticated rate too (a forged-MAC
            // flood costs an HMAC each).
            // (A request without any was counted on arrival.)
            Err(_) if has_integrity(&msg) && !self.admit_unauthenticated(now, tuple.client.ip()) => return self.drop_packet("rate_limited"),
            Err(reply) => return ClientAction::Reply(reply),
        };
        ClientAction::Reply(self.authenticated_dispatch(now, tuple, msg, a, binder))
    }

    fn authenticated_dispatch(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>, a: Authed, binder: &mut dyn Binder<R>) -> Vec<u8> {
        if let Some(existing) = self.allocations.get(&tuple) {
            if existing.username != a.username && existing.expires > now {
                self.metrics.turn_auth_failures.with_label_values(&["wrong_credentials"]).inc();
                return self.error_reply(&msg, &a, 441, "Wrong Credentials");
            }
        }
        match msg.method {
            method::ALLOCATE => self.allocate(now, tuple, &msg, a, binder),
            method::REFRESH => self.refresh(now, tuple, &msg, &a),
            method::CREATE_PERMISSION => self.create_permission(now, tuple, &msg, &a),
            _ => self.channel_bind(now, tuple, &msg, &a),
        }
    }

    fn lifetime(&self, msg: &Message<'_>) -> Duration {
        let requested = msg.get(attr::LIFETIME).and_then(|v| v.try_into().ok()).map(u32::from_be_bytes);
        match requested {
            None => DEFAULT_LIFETIME,
            Some(secs) => Duration::from_secs(secs as u64).clamp(DEFAULT_LIFETIME, self.settings.max_lifetime.max(DEFAULT_LIFETIME)),
        }
    }

    fn quota_reject(&self, now: Instant, msg: &Message<'_>, a: &Authed, scope: &'static str) -> Vec<u8> {
        self.metrics.turn_quota_rejections.with_label_values(&[scope]).inc();
        if let Some(suppressed) = self.refusal_log.allow(now) {
            tracing::info!(scope, suppressed, "allocation refused: quota reached (one line a second; kinlink_turn_quota_rejections_total counts all)");
        }
        self.error_reply(msg, a, 486, "Allocation Quota Reached")
    }

    fn allocate(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: Authed, binder: &mut dyn Binder<R>) -> Vec<u8> {
        if let Some(existing) = self.allocations.get(&tuple) {
            if existing.expires > now {
                return self.error_reply(msg, &a, 437, "Allocation Mismatch");
            }
            self.remove(now, &tuple, "expired");
        }
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return self.error_reply(msg, &a, 400, "Bad Request: REQUESTED-TRANSPORT missing"),
            Some(v) if v.first() != Some(&17) => return self.error_reply(msg, &a, 442, "Unsupported Transport Protocol"),
            Some(_) => {}
        }
        // EVEN-PORT: `Some(reserve_next)`.
        let even = msg.get(attr::EVEN_PORT).map(|v| v.first().is_some_and(|b| b & 0x80 != 0));
        let token = match msg.get(attr::RESERVATION_TOKEN) {
            Some(_) if even.is_some() => return self.error_reply(msg, &a, 400, "Bad Request: EVEN-PORT with RESERVATION-TOKEN"),
            Some(v) => match <[u8; 8]>::try_from(v) {
                Ok(t) => Some(t),
                Err(_) => return self.error_reply(msg, &a, 400, "Bad Request: RESERVATION-TOKEN"),
            },
            None => None,
        };
        let ipv6 = match msg.get(attr::REQUESTED_ADDRESS_FAMILY).map(|v| v.first().copied()) {
            // RFC 8656 §7.2: without the attribute the relay is IPv4, whatever the client leg
            // (browsers on IPv6 still relay to IPv4 peers); unless the server advertises only IPv6.
            None => self.settings.public_ip.is_some_and(|ip| ip.is_ipv6()),
            Some(Some(0x01)) => false,
            Some(Some(0x02)) => true,
            Some(_) => return self.error_reply(msg, &a, 440, "Address Family not Supported"),
        };
        if self.draining {
            return self.error_reply(msg, &a, 508, "Insufficient Capacity: server draining");
        }
        // A claimed reservation stops counting before the quotas are checked: the allocation
        // that replaces it counts instead.
        let claimed = match token {
            Some(t) => match self.reservations.remove(&t) {
                Some(r) => {
                    self.release(&r.family, &r.device);
                    self.forget_port(r.local.port());
                    if r.expires <= now {
                        return self.error_reply(msg, &a, 508, "Insufficient Capacity: no such reservation");
                    }
                    Some((r.relay, r.local))
                }
                None => return self.error_reply(msg, &a, 508, "Insufficient Capacity: no such reservation"),
            },
            None => None,
        };
        // EVEN-PORT with R holds two ports: both count.
        let needed = if even == Some(true) { 2 } else { 1 };
        if let Err(scope) = self.quota_room(&a.family, &a.device, needed) {
            return self.quota_reject(now, msg, &a, scope);
        }
        let mut reserved_token = None;
        let bound = match (claimed, even) {
            (Some(bound), _) => Ok(bound),
            (None, Some(true)) => match bind_pair(binder, ipv6) {
                Ok((even, odd)) => {
                    let mut t = [0u8; 8];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut t);
                    self.charge(&a.family, &a.device, odd.1.port());
                    let reservation =
                        Reservation { relay: odd.0, local: odd.1, expires: now + RESERVATION_LIFETIME, family: a.family.clone(), device: a.device.clone() };
                    self.reservations.insert(t, reservation);
                    reserved_token = Some(t);
                    Ok(even)
                }
                Err(e) => Err(e),
            },
            (None, Some(false)) => binder.bind(ipv6, PortChoice::Even),
            (None, None) => binder.bind(ipv6, PortChoice::Any),
        };
        let (relay, local) = match bound {
            Ok(r) => r,
            Err(e) => {
                self.metrics.turn_quota_rejections.with_label_values(&["ports"]).inc();
                if let Some(suppressed) = self.refusal_log.allow(now) {
                    tracing::warn!(error = %e, suppressed, "allocation refused: no relay port");
                }
                return self.error_reply(msg, &a, 508, "Insufficient Capacity");
            }
        };
        binder.start(&relay, tuple);
        let relayed = SocketAddr::new(self.settings.public_ip.filter(|ip| ip.is_ipv6() == ipv6).unwrap_or(local.ip()), local.port());
        let lifetime = self.lifetime(msg);
        let mut b = Builder::new(method::ALLOCATE, Class::Success, msg.tid);
        b.xor_addr(attr::XOR_RELAYED_ADDRESS, relayed).u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
        if let Some(t) = reserved_token {
            b.attr(attr::RESERVATION_TOKEN, &t);
        }
        let reply = self.finish(b, Some((&a.key, a.sha256)));
        self.charge(&a.family, &a.device, local.port());
        self.allocations.insert(
            tuple,
            Allocation {
                relay,
                relayed,
                family: a.family,
                device: a.device,
                username: a.username,
                created: now,
                expires: now + lifetime,
                permissions: Vec::new(),
                channels: Vec::new(),
                allocate_tid: msg.tid,
                allocate_reply: reply.clone(),
                reservation: reserved_token,
            },
        );
        self.metrics.turn_allocations.set(self.allocations.len() as i64);
        self.metrics.turn_allocations_created.with_label_values(&[tuple.transport.as_str()]).inc();
        tracing::debug!(transport = tuple.transport.as_str(), lifetime_secs = lifetime.as_secs(), "allocation created");
        reply
    }

    /// Takes a token from the source's unauthenticated-request bucket. The map is bounded:
    /// past `MAX_TRACKED_SOURCES` sources, idle ones (full again) are forgotten, and if none
    /// is, the request is refused (a spoofed-source flood cannot grow it).
    fn admit_unauthenticated(&mut self, now: Instant, ip: IpAddr) -> bool {
        let rate = self.settings.unauthenticated_per_ip_per_sec;
        if rate == 0 {
            return true;
        }
        let source = crate::connlimit::source_key(ip);
        if !self.unauthenticated.contains_key(&source) && self.unauthenticated.len() >= MAX_TRACKED_SOURCES {
            self.unauthenticated.retain(|_, b| now.saturating_duration_since(b.last_taken()) < Duration::from_secs(2));
            if self.unauthenticated.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let bucket = self.unauthenticated.entry(source).or_insert_with(|| crate::ratelimit::TokenBucket::new(rate as f64, rate.saturating_mul(2), now));
        bucket.take(now)
    }

    /// Whether `needed` more relay ports fit every quota; `Err(scope)` names the one that is full.
    fn quota_room(&self, family: &Arc<str>, device: &Arc<str>, needed: usize) -> Result<(), &'static str> {
        let s = &self.settings;
        if self.allocations.len() + self.reservations.len() + needed > s.total_allocations {
            return Err("server");
        }
        if is_check_family(family) && self.check_usage + needed > s.check_allocations {
            return Err("check");
        }
        if self.families.get(family).map_or(0, |u| u.allocations) + needed > s.family_allocations {
            return Err("family");
        }
        if self.devices.get(&(family.clone(), device.clone())).copied().unwrap_or(0) + needed > s.device_allocations {
            return Err("device");
        }
        Ok(())
    }

    /// Counts one relay port (an allocation or a reservation) against its owner's quotas.
    fn charge(&mut self, family: &Arc<str>, device: &Arc<str>, port: u16) {
        let rate = self.settings.family_bytes_per_sec as f64;
        let now = self.epoch; // the bucket is refilled from `refilled` on first use
        let usage = self.families.entry(family.clone()).or_insert(FamilyUsage { allocations: 0, tokens: rate, refilled: now });
        usage.allocations += 1;
        *self.devices.entry((family.clone(), device.clone())).or_insert(0) += 1;
        if is_check_family(family) {
            self.check_usage += 1;
        }
        *self.relay_ports.entry(port).or_insert(0) += 1;
    }

    /// Gives back what [`Self::charge`] took (the port is forgotten by [`Self::forget_port`]).
    fn release(&mut self, family: &Arc<str>, device: &Arc<str>) {
        if let Some(u) = self.families.get_mut(family) {
            u.allocations = u.allocations.saturating_sub(1);
            if u.allocations == 0 {
                self.families.remove(family);
            }
        }
        let key = (family.clone(), device.clone());
        if let Some(n) = self.devices.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.devices.remove(&key);
            }
        }
        if is_check_family(family) {
            self.check_usage = self.check_usage.saturating_sub(1);
        }
    }

    fn forget_port(&mut self, port: u16) {
        if let Some(n) = self.relay_ports.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.relay_ports.remove(&port);
            }
        }
    }

    fn refresh(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let requested_zero = msg.get(attr::LIFETIME).is_some_and(|v| v == [0, 0, 0, 0]);
        let lifetime = self.lifetime(msg);
        let Some(alloc) = self.allocations.get_mut(&tuple).filter(|al| al.expires > now) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let granted = if requested_zero {
            0
        } else {
            alloc.expires = now + lifetime;
            lifetime.as_secs() as u32
        };
        if requested_zero {
            self.remove(now, &tuple, "deleted");
        }
        let mut b = Builder::new(method::REFRESH, Class::Success, msg.tid);
        b.u32_attr(attr::LIFETIME, granted);
        self.finish(b, Some((&a.key, a.sha256)))
    }

    /// Policy and family checks for a peer address named in a request.
    fn peer_allowed(&self, now: Instant, relayed: SocketAddr, peer: SocketAddr) -> Result<SocketAddr, (u16, &'static str)> {
        let peer = normalize(peer);
        if peer.is_ipv6() != relayed.is_ipv6() {
            return Err((443, "Peer Address Family Mismatch"));
        }
        if let Err(d) = self.policy_check(peer) {
            self.metrics.turn_permission_denied.with_label_values(&[d.reason()]).inc();
            if let Some(suppressed) = self.refusal_log.allow(now) {
                tracing::info!(reason = d.reason(), suppressed, "peer refused by policy (one line a second; kinlink_turn_permission_denied_total counts all)");
            }
            return Err((403, match d {
                Denied::SpecialRange => "Forbidden: peer address not allowed",
                Denied::DenyList => "Forbidden: peer address denied",
                Denied::OwnPort => "Forbidden: peer is this server",
            }));
        }
        Ok(peer)
    }

    /// The peer policy, except that a port one of our relays holds is another allocation of
    /// this server (two devices both relayed through it), not a listener: relayed data is UDP
    /// and a UDP relay port cannot be a UDP listener's, so only a TCP listener could share the
    /// number, and UDP sent there reaches the relay.
    fn policy_check(&self, peer: SocketAddr) -> Result<(), Denied> {
        match self.policy.check(peer) {
            Err(Denied::OwnPort) if self.relay_ports.contains_key(&peer.port()) => Ok(()),
            other => other,
        }
    }

    fn create_permission(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let Some(relayed) = self.allocations.get(&tuple).filter(|al| al.expires > now).map(|al| al.relayed) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let mut peers = Vec::new();
        for p in msg.xor_peer_addresses() {
            let Some(p) = p else { return self.error_reply(msg, a, 400, "Bad Request: bad XOR-PEER-ADDRESS") };
            match self.peer_allowed(now, relayed, p) {
                Ok(p) => peers.push(p.ip()),
                Err((code, reason)) => return self.error_reply(msg, a, code, reason),
            }
        }
        if peers.is_empty() {
            return self.error_reply(msg, a, 400, "Bad Request: XOR-PEER-ADDRESS missing");
        }
        let cap = self.settings.permissions_per_allocation;
        let alloc = self.allocations.get_mut(&tuple).expect("checked above");
        let new = peers.iter().filter(|ip| !alloc.permissions.iter().any(|p| p.ip == **ip && p.expires > now)).count();
        alloc.permissions.retain(|p| p.expires > now);
        if alloc.permissions.len() + new > cap {
            self.metrics.turn_quota_rejections.with_label_values(&["permissions"]).inc();
            return self.error_reply(msg, a, 508, "Insufficient Capacity: too many permissions");
        }
        for ip in peers {
            install_permission(alloc, ip, now);
        }
        self.finish(Builder::new(method::CREATE_PERMISSION, Class::Success, msg.tid), Some((&a.key, a.sha256)))
    }

    fn channel_bind(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let Some(relayed) = self.allocations.get(&tuple).filter(|al| al.expires > now).map(|al| al.relayed) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return self.error_reply(msg, a, 400, "Bad Request: CHANNEL-NUMBER missing"),
        };
        if !super::stun::CHANNELS.contains(&number) {
            return self.error_reply(msg, a, 400, "Bad Request: channel number out of range");
        }
        let Some(Some(peer)) = msg.xor_peer_addresses().next() else {
            return self.error_reply(msg, a, 400, "Bad Request: XOR-PEER-ADDRESS missing");
        };
        let peer = match self.peer_allowed(now, relayed, peer) {
            Ok(p) => p,
            Err((code, reason)) => return self.error_reply(msg, a, code, reason),
        };
        let cap = self.settings.channels_per_allocation;
        let cap_p = self.settings.permissions_per_allocation;
        let alloc = self.allocations.get_mut(&tuple).expect("checked above");
        alloc.channels.retain(|c| c.expires > now);
        let by_number = alloc.channels.iter().position(|c| c.number == number);
        let by_peer = alloc.channels.iter().position(|c| c.peer == peer);
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => alloc.channels[i].expires = now + CHANNEL_LIFETIME,
            (None, None) => {
                if alloc.channels.len() >= cap {
                    self.metrics.turn_quota_rejections.with_label_values(&["channels"]).inc();
                    return self.error_reply(msg, a, 508, "Insufficient Capacity: too many channels");
                }
                if !alloc.permissions.iter().any(|p| p.ip == peer.ip() && p.expires > now) && alloc.permissions.len() >= cap_p {
                    self.metrics.turn_quota_rejections.with_label_values(&["permissions"]).inc();
                    return self.error_reply(msg, a, 508, "Insufficient Capacity: too many permissions");
                }
                alloc.channels.push(Channel { number, peer, expires: now + CHANNEL_LIFETIME });
            }
            _ => return self.error_reply(msg, a, 400, "Bad Request: channel or peer already bound"),
        }
        install_permission(alloc, peer.ip(), now);
        self.finish(Builder::new(method::CHANNEL_BIND, Class::Success, msg.tid), Some((&a.key, a.sha256)))
    }
}

/// An even port and the odd one above it, for EVEN-PORT with the R bit.
type Bound<R> = (R, SocketAddr);

fn bind_pair<R>(binder: &mut dyn Binder<R>, ipv6: bool) -> Result<(Bound<R>, Bound<R>), BindError> {
    let mut last = BindError("no free port pair".into());
    for _ in 0..16 {
        let even = binder.bind(ipv6, PortChoice::Even)?;
        match binder.bind(ipv6, PortChoice::Exact(even.1.port().wrapping_add(1))) {
            Ok(odd) => return Ok((even, odd)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn install_permission<R>(alloc: &mut Allocation<R>, ip: IpAddr, now: Instant) {
    match alloc.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.expires = now + PERMISSION_LIFETIME,
        None => alloc.permissions.push(Permission { ip, expires: now + PERMISSION_LIFETIME }),
    }
}

/// The long-term credential key (RFC 8489 §9.2.2): MD5, or SHA-256 for
/// MESSAGE-INTEGRITY-SHA256, of `username:realm:password`.
pub fn long_term_key(username: &str, realm: &str, password: &str, sha256: bool) -> Vec<u8> {
    let input = format!("{username}:{realm}:{password}");
    if sha256 {
        sha2::Sha256::digest(input.as_bytes()).to_vec()
    } else {
        md5::Md5::digest(input.as_bytes()).to_vec()
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

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
