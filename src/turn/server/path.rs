//! The data path of one allocation: what the control plane decided (lifetime, permissions,
//! channels) in a form the relaying threads read without the core's lock, and the rules
//! that relay ChannelData, Send indications and peer datagrams. Still sans-IO: bytes and
//! `now` in, a destination and a range of the buffer out.
//!
//! Each allocation's [`Path`] is shared (`Arc`) by the core, which writes its routes on
//! CreatePermission, ChannelBind, Refresh and expiry, and by the one thread that relays for
//! it, which reads them per packet. The `RwLock` is per allocation, so it is only ever
//! contended by one relaying thread and the occasional control request.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use super::stats::{DataCounters, Direction, DropReason};
use super::{normalize, FiveTuple, PEER_HEADROOM};
use crate::turn::policy::{Denied, PeerPolicy};
use crate::turn::stun::{attr, method, Class, Message};

/// The peer policy as the data path applies it, and the relay ports in use: a peer on one of
/// them is another allocation of this server (relay to relay), not one of its listeners.
pub struct PeerGate {
    policy: PeerPolicy,
    /// Allocations and reservations holding each port number (IPv4 and IPv6 relays may share one).
    relay_ports: Box<[AtomicU32]>,
    /// Our listeners' port numbers, and a public IP learned after start (`stun:`): an
    /// address the policy was built without, denied on those ports. Read only for a peer on
    /// one of the ports, so the data path almost never touches the lock.
    own_ports: Vec<u16>,
    learned_public: RwLock<Option<std::net::IpAddr>>,
}

impl PeerGate {
    /// A gate applying `policy`, with no relay port in use.
    pub fn new(policy: PeerPolicy) -> Self {
        let own_ports = policy.own_ports();
        PeerGate { policy, relay_ports: (0..=u16::MAX).map(|_| AtomicU32::new(0)).collect(), own_ports, learned_public: RwLock::new(None) }
    }

    /// The peer policy, except that a port one of our relays holds is another allocation of
    /// this server (two devices both relayed through it), not a listener: relayed data is UDP
    /// and a UDP relay port cannot be a UDP listener's, so only a TCP listener could share the
    /// number, and UDP sent there reaches the relay.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denied> {
        let relay_port = || self.relay_ports[peer.port() as usize].load(Ordering::Relaxed) > 0;
        match self.policy.check(peer) {
            Err(Denied::OwnPort) if relay_port() => Ok(()),
            Ok(()) if self.own_ports.binary_search(&peer.port()).is_ok() && !relay_port() => {
                let learned = *self.learned_public.read().unwrap_or_else(|e| e.into_inner());
                if learned.is_some_and(|ip| ip == peer.ip()) {
                    Err(Denied::OwnPort)
                } else {
                    Ok(())
                }
            }
            other => other,
        }
    }

    /// A public IP learned after start: denied as our own on our listeners' ports.
    pub(super) fn learn_public_ip(&self, ip: std::net::IpAddr) {
        *self.learned_public.write().unwrap_or_else(|e| e.into_inner()) = Some(ip);
    }

    pub(super) fn hold_port(&self, port: u16) {
        self.relay_ports[port as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn release_port(&self, port: u16) {
        let _ = self.relay_ports[port as usize].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// A family's bandwidth quota (`turn.quota.family_bytes_per_sec`): a token bucket holding
/// one second's worth, shared by every path of the family.
#[derive(Debug)]
pub struct Meter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Meter {
    /// A full bucket of `rate` bytes a second.
    pub fn new(rate: u64, now: Instant) -> Self {
        Meter { rate: rate as f64, state: Mutex::new((rate as f64, now)) }
    }

    /// Takes `bytes`; false when the packet must be dropped.
    pub fn spend(&self, now: Instant, bytes: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, refilled) = *s;
        let tokens = (tokens + now.saturating_duration_since(refilled).as_secs_f64() * self.rate).min(self.rate);
        let ok = tokens >= bytes as f64;
        *s = (if ok { tokens - bytes as f64 } else { tokens }, now.max(refilled));
        ok
    }
}

pub(super) struct Permission {
    pub(super) ip: std::net::IpAddr,
    pub(super) expires: Instant,
}

pub(super) struct Channel {
    pub(super) number: u16,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
}

/// What the control plane decides and the data path reads.
pub(super) struct Routes {
    pub(super) expires: Instant,
    pub(super) permissions: Vec<Permission>,
    pub(super) channels: Vec<Channel>,
}

impl Routes {
    pub(super) fn permits(&self, ip: std::net::IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|p| p.ip == ip && p.expires > now)
    }
}

/// One allocation as the data path sees it.
pub struct Path<R> {
    /// The relay socket handle.
    pub relay: R,
    /// The client it belongs to.
    pub tuple: FiveTuple,
    /// The relay's local address (its family decides which peers it reaches).
    pub local: SocketAddr,
    routes: RwLock<Routes>,
    meter: Option<Arc<Meter>>,
    gate: Arc<PeerGate>,
    closed: AtomicBool,
}

/// A client packet, told apart without any state.
pub enum Packet<'a> {
    /// ChannelData: the data path.
    ChannelData,
    /// A Send indication: the data path.
    Send(Message<'a>),
    /// A STUN request or anything else for the control plane.
    Control,
    /// Neither STUN nor ChannelData, or a STUN message with a bad fingerprint.
    Junk,
}

/// Which path a client packet takes.
pub fn classify(buf: &[u8]) -> Packet<'_> {
    match buf.first() {
        Some(b) if b & 0xC0 == 0x40 => Packet::ChannelData,
        Some(b) if b & 0xC0 == 0 => match Message::parse(buf) {
            Ok(msg) if !msg.fingerprint_ok() => Packet::Junk,
            Ok(msg) if msg.class == Class::Indication && msg.method == method::SEND => Packet::Send(msg),
            Ok(_) => Packet::Control,
            Err(_) => Packet::Junk,
        },
        _ => Packet::Junk,
    }
}

impl<R> Path<R> {
    pub(super) fn new(relay: R, tuple: FiveTuple, local: SocketAddr, expires: Instant, meter: Option<Arc<Meter>>, gate: Arc<PeerGate>) -> Self {
        let routes = Routes { expires, permissions: Vec::new(), channels: Vec::new() };
        Path { relay, tuple, local, routes: RwLock::new(routes), meter, gate, closed: AtomicBool::new(false) }
    }

    pub(super) fn routes(&self) -> RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn routes_mut(&self) -> RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The allocation is gone: its relay stops and its socket closes.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn spend(&self, now: Instant, bytes: usize) -> bool {
        self.meter.as_ref().is_none_or(|m| m.spend(now, bytes))
    }

    fn drop_packet<T>(c: &DataCounters, reason: DropReason) -> Option<T> {
        c.dropped(reason);
        None
    }

    /// ChannelData from the client: the peer and the payload's range in `buf`.
    pub fn channel_data(&self, now: Instant, buf: &[u8], c: &DataCounters) -> Option<(SocketAddr, Range<usize>)> {
        let Some((number, payload)) = crate::turn::stun::parse_channel_data(buf) else {
            return Self::drop_packet(c, DropReason::Malformed);
        };
        let peer = {
            let r = self.routes();
            if r.expires <= now || self.is_closed() {
                return Self::drop_packet(c, DropReason::NoAllocation);
            }
            match r.channels.iter().find(|ch| ch.number == number && ch.expires > now) {
                Some(ch) => ch.peer,
                None => return Self::drop_packet(c, DropReason::NoChannel),
            }
        };
        if !self.spend(now, payload.len()) {
            return Self::drop_packet(c, DropReason::Bandwidth);
        }
        c.relayed(Direction::ToPeer, payload.len());
        Some((peer, 4..4 + payload.len()))
    }

    /// A Send indication from the client: the peer and the DATA's range in the message.
    pub fn send_indication(&self, now: Instant, msg: &Message<'_>, c: &DataCounters) -> Option<(SocketAddr, Range<usize>)> {
        let (Some(Some(peer)), Some(data)) = (msg.xor_peer_addresses().next(), msg.get(attr::DATA)) else {
            return Self::drop_packet(c, DropReason::Malformed);
        };
        let peer = normalize(peer);
        {
            let r = self.routes();
            if r.expires <= now || self.is_closed() {
                return Self::drop_packet(c, DropReason::NoAllocation);
            }
            if !r.permits(peer.ip(), now) {
                return Self::drop_packet(c, DropReason::NoPermission);
            }
        }
        // A permission is for an IP; the port is the sender's choice, so the policy (own
        // listeners above all) is applied to the full address of every Send.
        if self.local.is_ipv6() != peer.is_ipv6() || self.gate.check(peer).is_err() {
            return Self::drop_packet(c, DropReason::DeniedPeer);
        }
        if !self.spend(now, data.len()) {
            return Self::drop_packet(c, DropReason::Bandwidth);
        }
        // `data` borrows from the input: recover its offset.
        let start = data.as_ptr() as usize - msg.raw().as_ptr() as usize;
        c.relayed(Direction::ToPeer, data.len());
        Some((peer, start..start + data.len()))
    }

    /// A datagram a peer sent to the relay. The payload sits at
    /// `buf[PEER_HEADROOM..PEER_HEADROOM + len]`; on success returns the range of `buf`
    /// holding the framed message (ChannelData or Data indication) for the client.
    pub fn from_peer(&self, now: Instant, peer: SocketAddr, buf: &mut [u8], len: usize, c: &DataCounters) -> Option<Range<usize>> {
        let peer = normalize(peer);
        let channel = {
            let r = self.routes();
            if r.expires <= now || self.is_closed() {
                return Self::drop_packet(c, DropReason::NoAllocation);
            }
            if !r.permits(peer.ip(), now) {
                return Self::drop_packet(c, DropReason::NoPermission);
            }
            r.channels.iter().find(|ch| ch.peer == peer && ch.expires > now).map(|ch| ch.number)
        };
        if buf.len() < PEER_HEADROOM + len + 3 {
            return Self::drop_packet(c, DropReason::TooLarge);
        }
        if !self.spend(now, len) {
            return Self::drop_packet(c, DropReason::Bandwidth);
        }
        c.relayed(Direction::ToClient, len);
        Some(frame_for_client(buf, len, peer, channel, self.tuple.transport.is_stream()))
    }
}

/// Frames the payload at `buf[PEER_HEADROOM..PEER_HEADROOM + len]` in place: as ChannelData
/// when the peer has a channel, else as a Data indication.
fn frame_for_client(buf: &mut [u8], len: usize, peer: SocketAddr, channel: Option<u16>, stream: bool) -> Range<usize> {
    let end = PEER_HEADROOM + len;
    match channel {
        Some(number) => {
            let start = PEER_HEADROOM - 4;
            buf[start..start + 2].copy_from_slice(&number.to_be_bytes());
            buf[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
            // Over streams ChannelData is padded to a multiple of 4 (RFC 8656 §12.5).
            let pad = if stream { (4 - len % 4) % 4 } else { 0 };
            buf[end..end + pad].fill(0);
            start..end + pad
        }
        None => {
            let mut tid = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut tid);
            let mut addr = [0u8; 20];
            let alen = crate::turn::stun::encode_xor_addr(peer, &tid, &mut addr);
            let hdr_len = 20 + 4 + alen + 4;
            let start = PEER_HEADROOM - hdr_len;
            let pad = (4 - len % 4) % 4;
            let h = &mut buf[start..PEER_HEADROOM];
            h[0..2].copy_from_slice(&crate::turn::stun::message_type(method::DATA, Class::Indication).to_be_bytes());
            h[2..4].copy_from_slice(&((4 + alen + 4 + len + pad) as u16).to_be_bytes());
            h[4..8].copy_from_slice(&crate::turn::stun::MAGIC_COOKIE.to_be_bytes());
            h[8..20].copy_from_slice(&tid);
            h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
            h[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
            h[24..24 + alen].copy_from_slice(&addr[..alen]);
            let d = 24 + alen;
            h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
            h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
            buf[end..end + pad].fill(0);
            start..end + pad
        }
    }
}
