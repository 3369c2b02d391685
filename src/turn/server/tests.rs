//! The TURN rules with bytes and virtual time: no sockets, no sleeping.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use md5::Digest;

use super::*;
use crate::auth::turn_credential;
use crate::config::TurnQuota;
use crate::turn::policy::{OwnAddr, PeerPolicy};
use crate::turn::stun::{attr, method, Builder, Class, Message};

const SECRET: &str = "turn-unit-secret-0123456789";
const UNIX0: u64 = 1_800_000_000;

fn settings() -> Settings {
    Settings {
        secrets: vec![Secret::new(SECRET)],
        credential_ttl_secs: 86_400,
        realm: "kinlink".into(),
        public_ip: Some("203.0.113.10".parse().unwrap()),
        max_lifetime: Duration::from_secs(3600),
        nonce_lifetime: Duration::from_secs(600),
        quota: quota(),
        unauthenticated_per_ip_per_sec: 0,
    }
}

fn quota() -> TurnQuota {
    TurnQuota {
        family_allocations: 3,
        device_allocations: 2,
        total_allocations: 5,
        check_allocations: 2,
        permissions_per_allocation: 4,
        channels_per_allocation: 4,
        family_bytes_per_sec: 0,
    }
}

fn with_quota(q: TurnQuota) -> Settings {
    Settings { quota: q, ..settings() }
}

/// Relay handles are numbers; the binder hands out ports and can run out.
struct FakeBinder {
    /// The family of the last bind: true for IPv6.
    last_v6: bool,
    next: u16,
    fail: bool,
}

impl FakeBinder {
    fn bind_one(&mut self, ipv6: bool, choice: PortChoice) -> Result<(u16, SocketAddr), BindError> {
        self.last_v6 = ipv6;
        if self.fail {
            return Err(BindError("exhausted".into()));
        }
        let port = match choice {
            PortChoice::Exact(p) => p,
            PortChoice::Even => self.next + self.next % 2,
            PortChoice::Any => self.next,
        };
        self.next = self.next.max(port + 1);
        Ok((port, SocketAddr::from(([0, 0, 0, 0], port))))
    }

    fn bind(&mut self, r: &BindRequest) -> Result<Bound<u16>, BindError> {
        let relay = self.bind_one(r.ipv6, r.choice)?;
        let reserved = if r.pair { Some(self.bind_one(r.ipv6, PortChoice::Exact(relay.1.port() + 1))?) } else { None };
        Ok(Bound { relay, reserved })
    }
}

/// What a packet from a client came to, as the drivers see it.
#[derive(Debug)]
enum Act {
    None,
    Reply(Vec<u8>),
    Relay { relay: u16, peer: SocketAddr, payload: std::ops::Range<usize> },
}

struct Harness {
    s: TurnServer<u16>,
    b: FakeBinder,
    t0: Instant,
    /// The data path's counters (one shard's).
    counters: DataCounters,
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple { client: SocketAddr::from(([198, 51, 100, 1], port)), server: "203.0.113.10:3478".parse().unwrap(), transport: Transport::Udp }
}

fn harness_with(settings: Settings) -> Harness {
    let own = vec![OwnAddr { ips: vec!["127.0.0.0/8".parse().unwrap(), "203.0.113.10".parse().unwrap()], port: 3478 }];
    let policy = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], own);
    let t0 = Instant::now();
    Harness { s: TurnServer::new(settings, policy, t0, UNIX0), b: FakeBinder { last_v6: false, next: 50000, fail: false }, t0, counters: DataCounters::default() }
}

fn harness() -> Harness {
    harness_with(settings())
}

/// A client's credentials and the nonce it learned.
#[derive(Clone)]
struct Creds {
    username: String,
    key: Vec<u8>,
    nonce: Vec<u8>,
}

fn creds_for(fam: &str, dev: &str, expires_in: i64, secret: &str) -> Creds {
    let c = turn_credential(&Secret::new(secret), fam, dev, 0, (UNIX0 as i64 + expires_in) as u64);
    let key = md5::Md5::digest(format!("{}:kinlink:{}", c.username, c.credential).as_bytes()).to_vec();
    Creds { username: c.username, key, nonce: Vec::new() }
}

fn tid(n: u8) -> [u8; 12] {
    [n; 12]
}

type Attrs<'a> = &'a [(u16, &'a [u8])];

fn request(m: u16, id: [u8; 12], attrs: Attrs, creds: Option<&Creds>, peers: &[SocketAddr]) -> Vec<u8> {
    let mut b = Builder::new(m, Class::Request, id);
    for (t, v) in attrs {
        b.attr(*t, v);
    }
    for p in peers {
        b.xor_addr(attr::XOR_PEER_ADDRESS, *p);
    }
    if let Some(c) = creds {
        b.attr(attr::USERNAME, c.username.as_bytes()).attr(attr::REALM, b"kinlink").attr(attr::NONCE, &c.nonce);
        b.integrity(&c.key);
    }
    b.finish_with_fingerprint()
}

const UDP: &[u8] = &[17, 0, 0, 0];

impl Harness {
    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    /// What a driver does with a client packet: data through the allocation's path,
    /// requests through the core, with the binding step in between.
    fn send(&mut self, now: Instant, t: FiveTuple, bytes: &[u8]) -> Act {
        let routed = match classify(bytes) {
            Packet::ChannelData => self.s.path(&t).and_then(|p| p.channel_data(now, bytes, &self.counters).map(|r| (p.relay, r))),
            Packet::Send(msg) => self.s.path(&t).and_then(|p| p.send_indication(now, &msg, &self.counters).map(|r| (p.relay, r))),
            Packet::Control => {
                let mut action = self.s.handle_client(now, t, bytes);
                if let ClientAction::Bind(r) = action {
                    let bound = self.b.bind(&r);
                    action = self.s.allocated(now, r, bound);
                }
                return match action {
                    ClientAction::None => Act::None,
                    ClientAction::Reply(r) | ClientAction::Started { reply: r, .. } => Act::Reply(r),
                    ClientAction::Bind(_) => panic!("bound above"),
                };
            }
            Packet::Junk => None,
        };
        match routed {
            Some((relay, (peer, payload))) => Act::Relay { relay, peer, payload },
            None => Act::None,
        }
    }

    /// A datagram from `peer` to `t`'s relay: the framed range for the client.
    fn peer(&mut self, now: Instant, t: &FiveTuple, peer: SocketAddr, buf: &mut [u8], len: usize) -> Option<std::ops::Range<usize>> {
        self.s.path(t).and_then(|p| p.from_peer(now, peer, buf, len, &self.counters))
    }

    fn reply(&mut self, now: Instant, t: FiveTuple, bytes: &[u8]) -> Vec<u8> {
        match self.send(now, t, bytes) {
            Act::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Allocate with the two-leg challenge; returns the success response.
    fn allocate(&mut self, now: Instant, t: FiveTuple, creds: &mut Creds, id: u8) -> Vec<u8> {
        let first = self.reply(now, t, &request(method::ALLOCATE, tid(id), &[(attr::REQUESTED_TRANSPORT, UDP)], None, &[]));
        let m = Message::parse(&first).unwrap();
        assert_eq!(code(&m), Some(401));
        creds.nonce = m.get(attr::NONCE).unwrap().to_vec();
        assert_eq!(m.get(attr::REALM), Some(&b"kinlink"[..]));
        self.reply(now, t, &request(method::ALLOCATE, tid(id + 1), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(creds), &[]))
    }
}

fn code(m: &Message<'_>) -> Option<u16> {
    m.error_code().map(|(c, _)| c)
}

fn code_of(bytes: &[u8]) -> Option<u16> {
    code(&Message::parse(bytes).unwrap())
}

#[test]
fn binding_answers_the_reflexive_address() {
    let mut h = harness();
    let r = h.reply(h.t0, tuple(4000), &request(method::BINDING, tid(1), &[], None, &[]));
    let m = Message::parse(&r).unwrap();
    assert_eq!((m.method, m.class), (method::BINDING, Class::Success));
    let addr = crate::turn::stun::decode_xor_addr(m.get(attr::XOR_MAPPED_ADDRESS).unwrap(), &m.tid).unwrap();
    assert_eq!(addr, tuple(4000).client);
    assert!(m.fingerprint_ok() && m.has_fingerprint());
    assert_eq!(h.s.stats().binding_requests.get("udp"), 1);
}

#[test]
fn allocate_challenge_success_retransmit_and_mismatch() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let ok = h.allocate(h.t0, tuple(4000), &mut c, 1);
    let m = Message::parse(&ok).unwrap();
    assert_eq!(m.class, Class::Success, "{:?}", code(&m));
    assert!(m.verify_integrity(&c.key), "responses carry integrity with the same key");
    let relayed = crate::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();
    assert_eq!(relayed, "203.0.113.10:50000".parse().unwrap(), "public IP, relay port");
    assert_eq!(m.get(attr::LIFETIME), Some(&600u32.to_be_bytes()[..]));
    // Retransmission of the same transaction: identical answer, no second allocation.
    let again = h.reply(h.t0, tuple(4000), &request(method::ALLOCATE, tid(2), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c), &[]));
    assert_eq!(again, ok);
    // A new transaction on the same 5-tuple: 437.
    let r = h.reply(h.t0, tuple(4000), &request(method::ALLOCATE, tid(3), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c), &[]));
    assert_eq!(code_of(&r), Some(437));
    assert_eq!(h.s.allocation_count(), 1);
    assert_eq!(h.s.allocation_count(), 1);
}

#[test]
fn bad_credentials_get_401_and_no_allocation() {
    let mut h = harness();
    for (creds, reason) in [
        (creds_for("fam", "dev", -10, SECRET), "expired"),
        (creds_for("fam", "dev", 3600, "some-other-secret-0000"), "bad_integrity"),
    ] {
        let mut c = creds;
        let r = h.allocate(h.t0, tuple(4001), &mut c, 10);
        assert_eq!(code_of(&r), Some(401), "{reason}");
        assert!(!Message::parse(&r).unwrap().verify_integrity(&c.key), "no integrity on 401");
        assert_eq!(h.s.stats().auth_failures.get(reason), 1);
    }
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    c.username = "not-a-rest-username".into();
    let r = h.allocate(h.t0, tuple(4001), &mut c, 20);
    assert_eq!(code_of(&r), Some(401));
    // Missing REALM/NONCE with integrity: 400.
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid(30));
    b.attr(attr::REQUESTED_TRANSPORT, UDP).attr(attr::USERNAME, c.username.as_bytes()).integrity(&c.key);
    assert_eq!(code_of(&h.reply(h.t0, tuple(4001), &b.finish())), Some(400));
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn nonces_expire_into_438() {
    let mut h = harness_with(Settings { nonce_lifetime: Duration::from_secs(300), ..settings() });
    let mut c = creds_for("fam", "dev", 7200, SECRET);
    h.allocate(h.t0, tuple(4000), &mut c, 1);
    let later = h.at(301);
    let r = h.reply(later, tuple(4000), &request(method::REFRESH, tid(5), &[], Some(&c), &[]));
    let m = Message::parse(&r).unwrap();
    assert_eq!(code(&m), Some(438));
    c.nonce = m.get(attr::NONCE).unwrap().to_vec();
    let r = h.reply(later, tuple(4000), &request(method::REFRESH, tid(6), &[], Some(&c), &[]));
    assert_eq!(Message::parse(&r).unwrap().class, Class::Success);
    // A nonce minted for another client IP is refused too.
    let elsewhere = FiveTuple { client: "198.51.100.2:4000".parse().unwrap(), ..tuple(4000) };
    let r = h.reply(later, elsewhere, &request(method::REFRESH, tid(7), &[], Some(&c), &[]));
    assert_eq!(code_of(&r), Some(438));
}

#[test]
fn allocate_attribute_rules() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    h.allocate(h.t0, tuple(4000), &mut c, 1); // learn a nonce
    let t = tuple(4100);
    let cases: [(Attrs, u16); 6] = [
        (&[], 400),
        (&[(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])], 442),
        (&[(attr::REQUESTED_TRANSPORT, UDP), (attr::DONT_FRAGMENT, &[])], 420),
        (&[(attr::REQUESTED_TRANSPORT, UDP), (attr::EVEN_PORT, &[0x80]), (attr::RESERVATION_TOKEN, &[1; 8])], 400),
        (&[(attr::REQUESTED_TRANSPORT, UDP), (attr::RESERVATION_TOKEN, &[1; 8])], 508),
        (&[(attr::REQUESTED_TRANSPORT, UDP), (attr::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0])], 440),
    ];
    for (i, (attrs, want)) in cases.into_iter().enumerate() {
        let r = h.reply(h.t0, t, &request(method::ALLOCATE, tid(40 + i as u8), attrs, Some(&c), &[]));
        let m = Message::parse(&r).unwrap();
        assert_eq!(code(&m), Some(want), "case {i}");
        if want == 420 {
            assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES), Some(&attr::DONT_FRAGMENT.to_be_bytes()[..]));
        }
    }
    // EVEN-PORT without reservation: an even relay port.
    let r = h.reply(h.t0, t, &request(method::ALLOCATE, tid(60), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::EVEN_PORT, &[0])], Some(&c), &[]));
    let m = Message::parse(&r).unwrap();
    let relayed = crate::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();
    assert_eq!(relayed.port() % 2, 0);
    // Lifetime is clamped to [600, max].
    let mut c2 = creds_for("fam", "dev2", 3600, SECRET);
    c2.nonce = c.nonce.clone();
    let r = h.reply(h.t0, tuple(4200), &request(method::ALLOCATE, tid(61), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::LIFETIME, &99_999u32.to_be_bytes())], Some(&c2), &[]));
    assert_eq!(Message::parse(&r).unwrap().get(attr::LIFETIME), Some(&3600u32.to_be_bytes()[..]));
}

#[test]
fn even_port_reservation_pairs_rtp_and_rtcp() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    h.allocate(h.t0, tuple(4000), &mut c, 1); // nonce; occupies one port
    let mut c_rtp = creds_for("fam", "dev3", 3600, SECRET);
    c_rtp.nonce = c.nonce.clone();
    let rtp = h.reply(h.t0, tuple(4001), &request(method::ALLOCATE, tid(10), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::EVEN_PORT, &[0x80])], Some(&c_rtp), &[]));
    let m = Message::parse(&rtp).unwrap();
    assert_eq!(m.class, Class::Success, "{:?}", code(&m));
    let port = crate::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap().port();
    assert_eq!(port % 2, 0);
    let token = m.get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    let mut c2 = creds_for("fam", "dev2", 3600, SECRET);
    c2.nonce = c.nonce.clone();
    let rtcp = h.reply(h.t0, tuple(4002), &request(method::ALLOCATE, tid(11), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::RESERVATION_TOKEN, &token)], Some(&c2), &[]));
    let m = Message::parse(&rtcp).unwrap();
    assert_eq!(m.class, Class::Success, "{:?}", code(&m));
    assert_eq!(crate::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap().port(), port + 1);
    // A token is good once, and reservations lapse after 30 s.
    let mut c4 = creds_for("kfam", "dev", 3600, SECRET);
    c4.nonce = c.nonce.clone();
    let again = h.reply(h.t0, tuple(4003), &request(method::ALLOCATE, tid(12), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::RESERVATION_TOKEN, &token)], Some(&c4), &[]));
    assert_eq!(code_of(&again), Some(508));
    let mut c3 = creds_for("gam", "dev", 3600, SECRET);
    c3.nonce = c.nonce.clone();
    let r = h.reply(h.t0, tuple(4010), &request(method::ALLOCATE, tid(20), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::EVEN_PORT, &[0x80])], Some(&c3), &[]));
    let token = Message::parse(&r).unwrap().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    h.s.handle_timeout(h.at(31), UNIX0 + 31);
    let late = h.reply(h.at(31), tuple(4011), &request(method::ALLOCATE, tid(21), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::RESERVATION_TOKEN, &token)], Some(&c3), &[]));
    assert_eq!(code_of(&late), Some(508));
}

#[test]
fn permissions_policy_send_and_data_indications() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let t = tuple(4000);
    h.allocate(h.t0, t, &mut c, 1);
    let peer: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    for denied in ["10.0.0.1:9", "[::ffff:169.254.169.254]:80", "127.0.0.1:3478"] {
        let r = h.reply(h.t0, t, &request(method::CREATE_PERMISSION, tid(10), &[], Some(&c), &[denied.parse().unwrap()]));
        assert_eq!(code_of(&r), Some(403), "{denied}");
    }
    assert_eq!(h.s.stats().permission_denied.get("special_range"), 2);
    assert_eq!(h.s.stats().permission_denied.get("own_port"), 1);
    // Without a permission, Send is dropped and peer data too.
    let mut send = Builder::new(method::SEND, Class::Indication, tid(11));
    send.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, b"hello");
    let send = send.finish();
    assert!(matches!(h.send(h.t0, t, &send), Act::None));
    let mut buf = vec![0u8; PEER_HEADROOM + 64];
    buf[PEER_HEADROOM..PEER_HEADROOM + 3].copy_from_slice(b"pon");
    assert!(h.peer(h.t0, &t, peer, &mut buf, 3).is_none());
    // With it, both directions flow.
    let r = h.reply(h.t0, t, &request(method::CREATE_PERMISSION, tid(12), &[], Some(&c), &[peer]));
    assert_eq!(Message::parse(&r).unwrap().class, Class::Success);
    match h.send(h.t0, t, &send) {
        Act::Relay { relay, peer: p, payload } => {
            assert_eq!((relay, p), (50000, peer));
            assert_eq!(&send[payload], b"hello");
        }
        other => panic!("{other:?}"),
    }
    buf[PEER_HEADROOM..PEER_HEADROOM + 4].copy_from_slice(b"pong");
    let range = h.peer(h.t0, &t, "127.0.0.1:9999".parse().unwrap(), &mut buf, 4).expect("permission is per IP");
    let m = Message::parse(&buf[range]).unwrap();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA), Some(&b"pong"[..]));
    assert_eq!(m.xor_peer_addresses().next(), Some(Some("127.0.0.1:9999".parse().unwrap())));
    // Permissions expire after 300 s.
    assert!(matches!(h.send(h.at(301), t, &send), Act::None));
    assert_eq!(h.counters.bytes(Direction::ToPeer), 5);
    assert_eq!(h.counters.packets(Direction::ToClient), 1);
}

#[test]
fn channels_bind_relay_frame_and_expire() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let t = FiveTuple { transport: Transport::Tcp, ..tuple(4000) };
    h.allocate(h.t0, t, &mut c, 1);
    let peer: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let bind = |n: u16, p: SocketAddr, id: u8| request(method::CHANNEL_BIND, tid(id), &[(attr::CHANNEL_NUMBER, &[(n >> 8) as u8, n as u8, 0, 0])], Some(&c), &[p]);
    assert_eq!(code_of(&h.reply(h.t0, t, &bind(0x3FFF, peer, 10))), Some(400));
    assert_eq!(code_of(&h.reply(h.t0, t, &bind(0x8000, peer, 15))), Some(400));
    // The top of RFC 5766's range: coturn's clients pick it one bind in 16,384.
    let top: SocketAddr = "127.0.0.1:9001".parse().unwrap();
    assert_eq!(Message::parse(&h.reply(h.t0, t, &bind(0x7FFF, top, 16))).unwrap().class, Class::Success);
    assert_eq!(code_of(&h.reply(h.t0, t, &bind(0x4000, "10.0.0.1:1".parse().unwrap(), 11))), Some(403));
    assert_eq!(Message::parse(&h.reply(h.t0, t, &bind(0x4000, peer, 12))).unwrap().class, Class::Success);
    // Rebinding the same pair refreshes; a different pairing is refused.
    assert_eq!(Message::parse(&h.reply(h.t0, t, &bind(0x4000, peer, 13))).unwrap().class, Class::Success);
    assert_eq!(code_of(&h.reply(h.t0, t, &bind(0x4001, peer, 14))), Some(400));
    let frame = [0x40, 0x00, 0x00, 0x03, b'a', b'b', b'c', 0];
    match h.send(h.t0, t, &frame) {
        Act::Relay { peer: p, payload, .. } => assert_eq!((p, &frame[payload]), (peer, &b"abc"[..])),
        other => panic!("{other:?}"),
    }
    assert!(matches!(h.send(h.t0, t, &[0x40, 0x01, 0x00, 0x01, b'x']), Act::None), "unbound channel");
    // Peer → client over TCP: ChannelData padded to 4.
    let mut buf = vec![0u8; PEER_HEADROOM + 16];
    buf[PEER_HEADROOM..PEER_HEADROOM + 5].copy_from_slice(b"hello");
    let r = h.peer(h.t0, &t, peer, &mut buf, 5).unwrap();
    assert_eq!(&buf[r], &[0x40, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]);
    // The channel's permission lapses at 300 s unless refreshed, the channel at 600 s.
    assert!(h.peer(h.at(301), &t, peer, &mut buf, 5).is_none());
    h.s.handle_timeout(h.at(601), UNIX0 + 601);
    assert!(matches!(h.send(h.at(601), t, &frame), Act::None));
}

#[test]
fn refresh_deletes_and_allocations_expire() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 7200, SECRET);
    let t = tuple(4000);
    h.allocate(h.t0, t, &mut c, 1);
    let r = h.reply(h.t0, t, &request(method::REFRESH, tid(5), &[(attr::LIFETIME, &[0; 4])], Some(&c), &[]));
    let m = Message::parse(&r).unwrap();
    assert_eq!((m.class, m.get(attr::LIFETIME)), (Class::Success, Some(&[0u8; 4][..])));
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(code_of(&h.reply(h.t0, t, &request(method::REFRESH, tid(6), &[], Some(&c), &[]))), Some(437));
    h.allocate(h.t0, t, &mut c, 7);
    h.s.handle_timeout(h.at(599), UNIX0 + 599);
    assert_eq!(h.s.allocation_count(), 1);
    h.s.handle_timeout(h.at(600), UNIX0 + 600);
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.s.stats().take_closed_lifetimes().len(), 2);
}

#[test]
fn quotas_per_device_family_server_and_ports() {
    let mut h = harness();
    let mut port = 5000;
    let mut alloc = |h: &mut Harness, fam: &str, dev: &str| {
        port += 1;
        let mut c = creds_for(fam, dev, 3600, SECRET);
        code_of(&h.allocate(h.t0, tuple(port), &mut c, 1))
    };
    assert_eq!(alloc(&mut h, "f", "a"), None);
    assert_eq!(alloc(&mut h, "f", "a"), None);
    assert_eq!(alloc(&mut h, "f", "a"), Some(486), "device quota 2");
    assert_eq!(alloc(&mut h, "f", "b"), None);
    assert_eq!(alloc(&mut h, "f", "c"), Some(486), "family quota 3");
    assert_eq!(alloc(&mut h, "g", "a"), None);
    assert_eq!(alloc(&mut h, "h", "a"), None);
    assert_eq!(alloc(&mut h, "i", "a"), Some(486), "server quota 5");
    for scope in ["device", "family", "server"] {
        assert_eq!(h.s.stats().quota_rejections.get(scope), 1, "{scope}");
    }
    let mut h = harness();
    h.b.fail = true;
    let mut c = creds_for("f", "a", 3600, SECRET);
    assert_eq!(code_of(&h.allocate(h.t0, tuple(1), &mut c, 1)), Some(508));
}

#[test]
fn other_credentials_on_an_allocation_get_441() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let t = tuple(4000);
    h.allocate(h.t0, t, &mut c, 1);
    let mut other = creds_for("fam", "other", 3600, SECRET);
    other.nonce = c.nonce.clone();
    let r = h.reply(h.t0, t, &request(method::REFRESH, tid(9), &[], Some(&other), &[]));
    assert_eq!(code_of(&r), Some(441));
}

#[test]
fn sha256_integrity_is_accepted() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    h.allocate(h.t0, tuple(4000), &mut c, 1); // learns a nonce
    let cred = turn_credential(&Secret::new(SECRET), "fam", "dev2", 0, UNIX0 + 3600);
    let key = sha2::Sha256::digest(format!("{}:kinlink:{}", cred.username, cred.credential).as_bytes()).to_vec();
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid(50));
    b.attr(attr::REQUESTED_TRANSPORT, UDP).attr(attr::USERNAME, cred.username.as_bytes()).attr(attr::REALM, b"kinlink");
    b.attr(attr::NONCE, &c.nonce).integrity_sha256(&key);
    let r = h.reply(h.t0, tuple(4001), &b.finish_with_fingerprint());
    let m = Message::parse(&r).unwrap();
    assert_eq!(m.class, Class::Success, "{:?}", code(&m));
    assert!(m.verify_integrity_sha256(&key));
}

#[test]
fn family_bandwidth_quota_drops_excess() {
    let mut h = harness_with(with_quota(TurnQuota { family_bytes_per_sec: 1000, ..quota() }));
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let t = tuple(4000);
    h.allocate(h.t0, t, &mut c, 1);
    let peer: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    h.reply(h.t0, t, &request(method::CHANNEL_BIND, tid(3), &[(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])], Some(&c), &[peer]));
    let mut frame = vec![0x40, 0x00, 0x01, 0xF4];
    frame.extend_from_slice(&[7; 500]);
    assert!(matches!(h.send(h.t0, t, &frame), Act::Relay { .. }));
    assert!(matches!(h.send(h.t0, t, &frame), Act::Relay { .. }));
    assert!(matches!(h.send(h.t0, t, &frame), Act::None), "1000 B/s spent");
    assert!(matches!(h.send(h.at(1), t, &frame), Act::Relay { .. }), "refilled");
    assert_eq!(h.counters.drops(DropReason::Bandwidth), 1);
}

/// Network input never panics: random bytes and mutated valid messages, bounded and seeded.
#[test]
fn random_and_mutated_packets_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let t = tuple(4000);
    h.allocate(h.t0, t, &mut c, 1);
    let peer: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let seeds = [
        request(method::CREATE_PERMISSION, tid(3), &[], Some(&c), &[peer]),
        request(method::CHANNEL_BIND, tid(4), &[(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])], Some(&c), &[peer]),
        request(method::ALLOCATE, tid(5), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::EVEN_PORT, &[0])], Some(&c), &[]),
        vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4],
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7475726e);
    let mut buf = vec![0u8; PEER_HEADROOM + 2048];
    for i in 0..30_000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        match i % 3 {
            0 => bytes = (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect(),
            1 => {
                for _ in 0..rng.gen_range(1..6) {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = rng.gen();
                }
            }
            _ => bytes.truncate(rng.gen_range(0..bytes.len())),
        }
        let _ = h.send(h.t0, t, &bytes);
        let n = rng.gen_range(0..2048);
        let _ = h.peer(h.t0, &t, peer, &mut buf, n);
    }
}

#[test]
fn relay_family_is_ipv4_unless_requested() {
    let mut h = harness();
    let v6 = FiveTuple { client: "[2001:db8::7]:4000".parse().unwrap(), server: "[2001:db8::1]:3478".parse().unwrap(), transport: Transport::Udp };
    let mut c = creds_for("f", "a", 600, SECRET);
    let r = h.allocate(h.t0, v6, &mut c, 1);
    assert_eq!(Message::parse(&r).unwrap().class, Class::Success);
    assert!(!h.b.last_v6, "RFC 8656: no REQUESTED-ADDRESS-FAMILY means an IPv4 relay, even for an IPv6 client");
    let v6b = FiveTuple { client: "[2001:db8::7]:4001".parse().unwrap(), ..v6 };
    let attrs: Attrs = &[(attr::REQUESTED_TRANSPORT, UDP), (attr::REQUESTED_ADDRESS_FAMILY, &[0x02, 0, 0, 0])];
    let r = h.reply(h.t0, v6b, &request(method::ALLOCATE, tid(9), attrs, Some(&c), &[]));
    assert_eq!(Message::parse(&r).unwrap().class, Class::Success);
    assert!(h.b.last_v6, "REQUESTED-ADDRESS-FAMILY IPv6 gets an IPv6 relay");
}

#[test]
fn userhash_without_username_is_refused_with_the_reason() {
    let mut h = harness();
    let mut c = creds_for("f", "a", 600, SECRET);
    let first = h.reply(h.t0, tuple(4100), &request(method::ALLOCATE, tid(1), &[(attr::REQUESTED_TRANSPORT, UDP)], None, &[]));
    let m = Message::parse(&first).unwrap();
    let nonce = m.get(attr::NONCE).unwrap().to_vec();
    // The nonce does not advertise username anonymity (no "obMatJos2" security-feature prefix).
    assert!(!nonce.starts_with(b"obMatJos2"));
    c.nonce = nonce;
    let hash = sha2::Sha256::digest(format!("{}:kinlink", c.username).as_bytes());
    let mut b = Builder::new(method::ALLOCATE, Class::Request, tid(2));
    b.attr(attr::REQUESTED_TRANSPORT, UDP).attr(attr::USERHASH, &hash).attr(attr::REALM, b"kinlink").attr(attr::NONCE, &c.nonce);
    b.integrity(&c.key);
    let r = h.reply(h.t0, tuple(4100), &b.finish_with_fingerprint());
    let m = Message::parse(&r).unwrap();
    assert_eq!(code(&m), Some(400));
    assert!(m.error_code().unwrap().1.contains("USERHASH"));
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn a_nonce_with_a_multibyte_character_across_byte_10_is_refused_not_a_panic() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    // 26 bytes of UTF-8 with 'é' (2 bytes) at bytes 9..11: slicing the text at 10 panicked.
    let mut nonce = b"000000000".to_vec();
    nonce.extend_from_slice("é".as_bytes());
    nonce.extend_from_slice(b"000000000000000");
    assert_eq!(nonce.len(), 26);
    for bad in [nonce, vec![0xff; 26], b"zzzzzzzzzzzzzzzzzzzzzzzzzz".to_vec(), b"0".to_vec(), Vec::new()] {
        c.nonce = bad;
        let r = h.reply(h.t0, tuple(4000), &request(method::ALLOCATE, tid(1), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c), &[]));
        assert_eq!(code_of(&r), Some(438), "junk nonce is answered with a fresh one");
    }
    assert_eq!(h.s.stats().auth_failures.get("bad_nonce"), 5);
    assert_eq!(h.s.allocation_count(), 0);
}

fn even_port_r(h: &mut Harness, t: FiveTuple, c: &Creds, id: u8) -> Vec<u8> {
    h.reply(h.t0, t, &request(method::ALLOCATE, tid(id), &[(attr::REQUESTED_TRANSPORT, UDP), (attr::EVEN_PORT, &[0x80])], Some(c), &[]))
}

#[test]
fn even_port_reservations_count_against_quotas_and_go_with_their_allocation() {
    let mut h = harness_with(with_quota(TurnQuota { device_allocations: 4, family_allocations: 4, total_allocations: 100, ..quota() }));
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    h.allocate(h.t0, tuple(4000), &mut c, 1);
    let t = tuple(4001);
    // Allocate(EVEN-PORT R) + Refresh(0), repeated, once held a socket per round with no
    // allocation at all: now the reservation is released with its allocation.
    for round in 0..50u8 {
        let r = even_port_r(&mut h, t, &c, 2 * round + 10);
        assert_eq!(Message::parse(&r).unwrap().class, Class::Success, "round {round}: {:?}", code_of(&r));
        let del = h.reply(h.t0, t, &request(method::REFRESH, tid(2 * round + 11), &[(attr::LIFETIME, &[0, 0, 0, 0])], Some(&c), &[]));
        assert_eq!(Message::parse(&del).unwrap().class, Class::Success);
        assert_eq!(h.s.reservations.len(), 0, "round {round}");
    }
    assert_eq!(h.s.allocation_count(), 1);
    // A reservation counts: 1 allocation + (1 + 1 reserved) = 3 of the device's 4, so a
    // second EVEN-PORT R (2 more) is refused, a plain Allocate (1 more) is not.
    assert_eq!(Message::parse(&even_port_r(&mut h, tuple(4002), &c, 200)).unwrap().class, Class::Success);
    assert_eq!(code_of(&even_port_r(&mut h, tuple(4003), &c, 202)), Some(486));
    let plain = h.reply(h.t0, tuple(4004), &request(method::ALLOCATE, tid(204), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c), &[]));
    assert_eq!(Message::parse(&plain).unwrap().class, Class::Success);
    assert_eq!(code_of(&h.reply(h.t0, tuple(4005), &request(method::ALLOCATE, tid(206), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c), &[]))), Some(486));
    // Expired reservations give their quota back.
    h.s.handle_timeout(h.at(31), UNIX0 + 31);
    assert_eq!(h.s.reservations.len(), 0);
    let again = h.reply(h.at(31), tuple(4006), &request(method::ALLOCATE, tid(208), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c), &[]));
    assert_eq!(Message::parse(&again).unwrap().class, Class::Success, "{:?}", code_of(&again));
}

#[test]
fn check_families_share_their_own_small_quota() {
    let mut h = harness_with(with_quota(TurnQuota { device_allocations: 10, family_allocations: 10, total_allocations: 100, ..quota() }));
    let mut port = 6000;
    let mut alloc = |h: &mut Harness, fam: &str| {
        port += 1;
        let mut c = creds_for(fam, "check-a", 3600, SECRET);
        code_of(&h.allocate(h.t0, tuple(port), &mut c, 1))
    };
    assert_eq!(alloc(&mut h, "check-0000000000000001"), None);
    assert_eq!(alloc(&mut h, "check-0000000000000002"), None);
    assert_eq!(alloc(&mut h, "check-0000000000000003"), Some(486), "check quota 2 across check families");
    assert_eq!(alloc(&mut h, "family"), None, "other families unaffected");
    assert_eq!(h.s.stats().quota_rejections.get("check"), 1);
}

#[test]
fn send_indications_are_checked_against_own_ports_by_full_address() {
    let mut h = harness();
    let mut c = creds_for("fam", "dev", 3600, SECRET);
    let t = tuple(4000);
    h.allocate(h.t0, t, &mut c, 1);
    // A permission for 127.0.0.1 (allowed) was once enough to Send to 127.0.0.1:3478, our
    // own listener: the port is the sender's choice, so every Send is checked in full.
    let r = h.reply(h.t0, t, &request(method::CREATE_PERMISSION, tid(10), &[], Some(&c), &["127.0.0.1:9000".parse().unwrap()]));
    assert_eq!(Message::parse(&r).unwrap().class, Class::Success);
    for (to, relayed) in [("127.0.0.1:9000", true), ("127.0.0.1:3478", false), ("[::ffff:127.0.0.1]:3478", false), ("127.0.0.1:3479", true)] {
        let mut send = Builder::new(method::SEND, Class::Indication, tid(11));
        send.xor_addr(attr::XOR_PEER_ADDRESS, to.parse().unwrap()).attr(attr::DATA, b"x");
        let sent = matches!(h.send(h.t0, t, &send.finish()), Act::Relay { .. });
        assert_eq!(sent, relayed, "{to}");
    }
    assert_eq!(h.counters.drops(DropReason::DeniedPeer), 2);
    // Our public IP on the listener port is refused at CreatePermission and ChannelBind...
    let r = h.reply(h.t0, t, &request(method::CHANNEL_BIND, tid(12), &[(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])], Some(&c), &["203.0.113.10:3478".parse().unwrap()]));
    assert_eq!(code_of(&r), Some(403));
    // ...but another allocation's relay port on our own IP is a legitimate peer (both devices
    // relayed through this server), even when a listener shares the number.
    let mut c2 = creds_for("fam", "dev2", 3600, SECRET);
    c2.nonce = c.nonce.clone();
    h.b.next = 3478;
    let other = h.reply(h.t0, tuple(4001), &request(method::ALLOCATE, tid(13), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c2), &[]));
    let m = Message::parse(&other).unwrap();
    let relayed = crate::turn::stun::decode_xor_addr(m.get(attr::XOR_RELAYED_ADDRESS).unwrap(), &m.tid).unwrap();
    assert_eq!(relayed, "203.0.113.10:3478".parse().unwrap());
    let r = h.reply(h.t0, t, &request(method::CREATE_PERMISSION, tid(14), &[], Some(&c), &[relayed]));
    assert_eq!(Message::parse(&r).unwrap().class, Class::Success);
}

#[test]
fn the_core_follows_the_wall_clock_credentials_are_minted_from() {
    let mut h = harness();
    // A credential valid until UNIX0 + 100.
    let mut c = creds_for("fam", "dev", 100, SECRET);
    assert_eq!(Message::parse(&h.allocate(h.t0, tuple(4000), &mut c, 1)).unwrap().class, Class::Success);
    // NTP steps the wall clock an hour forward while only a second passes monotonically:
    // the credential is expired now, as the minting clock says.
    h.s.handle_timeout(h.at(1), UNIX0 + 3600);
    let mut c2 = creds_for("fam", "dev", 100, SECRET);
    c2.nonce = c.nonce.clone();
    let r = h.reply(h.at(1), tuple(4001), &request(method::ALLOCATE, tid(20), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&c2), &[]));
    assert_eq!(code_of(&r), Some(401));
    assert_eq!(h.s.stats().auth_failures.get("expired"), 1);
    // And a step backwards makes fresh credentials work at once.
    let mut h = harness();
    let mut fresh = creds_for("fam", "dev", -3000 + 60, SECRET); // minted by a clock 3000 s behind
    h.s.handle_timeout(h.at(1), UNIX0 - 3000);
    assert_eq!(Message::parse(&h.allocate(h.at(1), tuple(4002), &mut fresh, 1)).unwrap().class, Class::Success);
}

#[test]
fn requests_without_credentials_are_rate_limited_per_source() {
    let mut h = harness_with(Settings { unauthenticated_per_ip_per_sec: 10, ..settings() });
    let binding = Builder::new(method::BINDING, Class::Request, tid(1)).finish_with_fingerprint();
    let flooder = tuple(4000);
    let answered = (0..100).filter(|_| matches!(h.send(h.t0, flooder, &binding), Act::Reply(_))).count();
    assert_eq!(answered, 20, "the burst (twice the rate), then nothing");
    assert_eq!(h.s.stats().dropped.get("rate_limited"), 80);
    // Another source is unaffected; the flooder gets 10 more a second later.
    let other = FiveTuple { client: "198.51.100.2:5000".parse().unwrap(), ..flooder };
    assert!(matches!(h.send(h.t0, other, &binding), Act::Reply(_)));
    let later = (0..100).filter(|_| matches!(h.send(h.at(1), flooder, &binding), Act::Reply(_))).count();
    assert_eq!(later, 10);
    // Forged credentials count too (each costs an HMAC); valid ones never do.
    let mut good = creds_for("fam", "dev", 3600, SECRET);
    let mut h = harness_with(Settings { unauthenticated_per_ip_per_sec: 1, ..settings() });
    h.allocate(h.t0, flooder, &mut good, 1); // the 401 leg takes 1 of the burst of 2
    let mut forged = creds_for("fam", "dev", 3600, "not-the-secret");
    forged.nonce = good.nonce.clone();
    let refused = request(method::CREATE_PERMISSION, tid(20), &[], Some(&forged), &["127.0.0.1:9".parse().unwrap()]);
    assert!(matches!(h.send(h.t0, flooder, &refused), Act::Reply(_)), "401 while tokens last");
    assert!(matches!(h.send(h.t0, flooder, &refused), Act::None), "then dropped");
    for i in 0..20u8 {
        let ok = request(method::CREATE_PERMISSION, tid(30 + i), &[], Some(&good), &["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(Message::parse(&h.reply(h.t0, flooder, &ok)).unwrap().class, Class::Success);
    }
}

#[test]
fn revocation_closes_the_device_s_allocations_and_refuses_its_credentials() {
    use crate::auth::revocation::Entry;
    let mut h = harness();
    let (ta, tb, tx) = (tuple(4100), tuple(4101), tuple(4102));
    let (mut a, mut b) = (creds_for("fam", "a", 3600, SECRET), creds_for("fam", "b", 3600, SECRET));
    let mut x = creds_for("other", "a", 3600, SECRET);
    for (t, c, id) in [(ta, &mut a, 1), (tb, &mut b, 3), (tx, &mut x, 5)] {
        assert_eq!(Message::parse(&h.allocate(h.t0, t, c, id)).unwrap().class, Class::Success);
    }
    let path = h.s.path(&ta).unwrap();
    let entry = Entry { family_id: "fam".into(), device_id: Some("a".into()), revoked_at: UNIX0 };
    assert_eq!(h.s.revoke(h.t0, &entry), 1);
    assert!(path.is_closed() && h.s.path(&ta).is_none(), "the relay stops at once");
    assert_eq!(h.s.allocation_count(), 2, "the family's other device and another family's same id keep theirs");
    // Its credentials (minted up to the revocation) are refused, with the reason counted.
    let first = h.reply(h.t0, ta, &request(method::ALLOCATE, tid(7), &[(attr::REQUESTED_TRANSPORT, UDP)], None, &[]));
    a.nonce = Message::parse(&first).unwrap().get(attr::NONCE).unwrap().to_vec();
    let again = h.reply(h.t0, ta, &request(method::ALLOCATE, tid(8), &[(attr::REQUESTED_TRANSPORT, UDP)], Some(&a), &[]));
    assert_eq!(code_of(&again), Some(401));
    assert_eq!(h.s.stats().auth_failures.get("revoked"), 1);
    // Credentials minted after the revocation (a new token) work.
    let mut later = creds_for("fam", "a", 86_400 + 10, SECRET);
    assert_eq!(Message::parse(&h.allocate(h.t0, tuple(4103), &mut later, 9)).unwrap().class, Class::Success);
    // A family revocation takes every device of it.
    assert_eq!(h.s.revoke(h.t0, &Entry { family_id: "fam".into(), device_id: None, revoked_at: UNIX0 + 1 }), 2);
    assert_eq!(h.s.allocation_count(), 1);
}

#[test]
fn rotated_secrets_accept_old_and_new_until_the_old_is_removed() {
    let mut h = harness();
    let next = "turn-unit-secret-next-012345";
    h.s.set_secrets(vec![Secret::new(next), Secret::new(SECRET)]);
    let mut old = creds_for("fam", "a", 3600, SECRET);
    let mut new = creds_for("fam", "b", 3600, next);
    assert_eq!(Message::parse(&h.allocate(h.t0, tuple(4200), &mut old, 1)).unwrap().class, Class::Success);
    assert_eq!(Message::parse(&h.allocate(h.t0, tuple(4201), &mut new, 3)).unwrap().class, Class::Success);
    h.s.set_secrets(vec![Secret::new(next)]);
    let mut stale = creds_for("fam", "c", 3600, SECRET);
    assert_eq!(code_of(&h.allocate(h.t0, tuple(4202), &mut stale, 5)), Some(401));
    assert_eq!(h.s.allocation_count(), 2, "allocations made with the removed secret live on");
}
