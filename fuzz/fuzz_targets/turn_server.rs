//! The whole sans-IO TURN server, past authentication. Each input runs against a server with
//! a live allocation (a permission and a channel to 127.0.0.1:9000): the harness learns the
//! nonce from a real 401, and every authenticated request it builds from the input carries a
//! freshly computed MESSAGE-INTEGRITY (MD5 or SHA-256) and FINGERPRINT, so mutations reach
//! Allocate/Refresh/CreatePermission/ChannelBind handling instead of dying at the MAC check.
//! Raw packets, ChannelData, Send indications, peer packets and time steps are interleaved.
//! Nothing the network sends may panic it.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kinlink::config::{Secret, TurnQuota};
use kinlink::turn::policy::PeerPolicy;
use kinlink::turn::server::{classify, long_term_key, BindRequest, Bound, ClientAction, DataCounters, FiveTuple, Packet, Settings, Transport, TurnServer, PEER_HEADROOM};
use kinlink::turn::stun::{attr, method, Builder, Class, Message};
use libfuzzer_sys::fuzz_target;

/// Hands out ports; every fourth bind fails (the input decides when, through the count of binds).
struct Ports(u16);

impl Ports {
    fn bind(&mut self, r: &BindRequest) -> Result<Bound<u16>, kinlink::turn::server::BindError> {
        self.0 = self.0.wrapping_add(2).max(1024);
        if self.0 % 8 == 6 {
            return Err(kinlink::turn::server::BindError("exhausted".into()));
        }
        let relay = (self.0, SocketAddr::from(([127, 0, 0, 1], self.0)));
        let reserved = r.pair.then(|| (self.0 + 1, SocketAddr::from(([127, 0, 0, 1], self.0 + 1))));
        Ok(Bound { relay, reserved })
    }
}

/// What a driver does with a client packet: data through the allocation's path, requests
/// through the core with the binding step in between. Returns a reply, if any.
fn drive(server: &mut TurnServer<u16>, now: Instant, tuple: FiveTuple, buf: &[u8], ports: &mut Ports, counters: &DataCounters) -> Option<Vec<u8>> {
    match classify(buf) {
        Packet::ChannelData => {
            let _ = server.path(&tuple).and_then(|p| p.channel_data(now, buf, counters));
            None
        }
        Packet::Send(msg) => {
            let _ = server.path(&tuple).and_then(|p| p.send_indication(now, &msg, counters));
            None
        }
        Packet::Control => {
            let mut action = server.handle_client(now, tuple, buf);
            if let ClientAction::Bind(r) = action {
                let bound = ports.bind(&r);
                action = server.allocated(now, r, bound);
            }
            let _ = server.take_released();
            match action {
                ClientAction::Reply(r) | ClientAction::Started { reply: r, .. } => Some(r),
                _ => None,
            }
        }
        Packet::Junk => None,
    }
}

const SECRET: &str = "fuzz-secret-0123456789";
const UNIX0: u64 = 1_800_000_000;

fn settings() -> Settings {
    Settings {
        secret: Secret::new(SECRET),
        realm: "kinlink".into(),
        public_ip: None,
        max_lifetime: Duration::from_secs(3600),
        nonce_lifetime: Duration::from_secs(600),
        quota: TurnQuota {
            family_allocations: 4,
            device_allocations: 4,
            total_allocations: 16,
            check_allocations: 2,
            permissions_per_allocation: 8,
            channels_per_allocation: 8,
            family_bytes_per_sec: 1_000_000,
        },
        unauthenticated_per_ip_per_sec: 50,
    }
}

struct Client {
    username: String,
    md5: Vec<u8>,
    sha256: Vec<u8>,
    nonce: Vec<u8>,
}

/// An authenticated request: `attrs` then USERNAME, REALM, NONCE, the integrity and FINGERPRINT.
fn authed(c: &Client, m: u16, tid: [u8; 12], attrs: &[(u16, &[u8])], peer: Option<SocketAddr>, sha: bool) -> Vec<u8> {
    let mut b = Builder::new(m, Class::Request, tid);
    for (t, v) in attrs {
        b.attr(*t, v);
    }
    if let Some(p) = peer {
        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
    }
    b.attr(attr::USERNAME, c.username.as_bytes()).attr(attr::REALM, b"kinlink").attr(attr::NONCE, &c.nonce);
    if sha {
        b.integrity_sha256(&c.sha256);
    } else {
        b.integrity(&c.md5);
    }
    b.finish_with_fingerprint()
}

/// Attributes read from fuzz bytes as `type(2) len(1) value(len)` records.
fn attrs_from(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 && out.len() < 16 {
        let t = u16::from_be_bytes([data[0], data[1]]);
        let n = (data[2] as usize).min(data.len() - 3);
        out.push((t, &data[3..3 + n]));
        data = &data[3 + n..];
    }
    out
}

const METHODS: [u16; 6] = [method::ALLOCATE, method::REFRESH, method::CREATE_PERMISSION, method::CHANNEL_BIND, method::BINDING, method::SEND];

fuzz_target!(|data: &[u8]| {
    let policy = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec![]);
    let t0 = Instant::now();
    let mut server: TurnServer<u16> = TurnServer::new(settings(), policy, t0, UNIX0);
    let counters = DataCounters::default();
    let tuple = FiveTuple { client: "127.0.0.1:5000".parse().unwrap(), server: "127.0.0.1:3478".parse().unwrap(), transport: Transport::Udp };
    let peer: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let mut binder = Ports(40000);
    let send = |server: &mut TurnServer<u16>, now: Instant, buf: &[u8], binder: &mut Ports| drive(server, now, tuple, buf, binder, &counters);

    // The live allocation, built the way a client does: 401 first, then authenticated.
    let cred = kinlink::auth::turn_credential(&Secret::new(SECRET), "fam", "dev", 3600, UNIX0);
    let mut c = Client {
        md5: long_term_key(&cred.username, "kinlink", &cred.credential, false),
        sha256: long_term_key(&cred.username, "kinlink", &cred.credential, true),
        username: cred.username,
        nonce: Vec::new(),
    };
    let mut first = Builder::new(method::ALLOCATE, Class::Request, [1; 12]);
    first.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let Some(r) = send(&mut server, t0, &first.finish_with_fingerprint(), &mut binder) else { panic!("401 expected") };
    c.nonce = Message::parse(&r).unwrap().get(attr::NONCE).unwrap().to_vec();
    let setup = [
        authed(&c, method::ALLOCATE, [2; 12], &[(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])], None, false),
        authed(&c, method::CREATE_PERMISSION, [3; 12], &[], Some(peer), false),
        authed(&c, method::CHANNEL_BIND, [4; 12], &[(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])], Some(peer), true),
    ];
    // (Bind 0 of Ports never fails: 40002 % 8 == 2.)
    for p in &setup {
        let r = send(&mut server, t0, p, &mut binder).expect("harness setup answered");
        assert_eq!(Message::parse(&r).unwrap().class, Class::Success, "harness setup");
    }

    let mut now = t0;
    let mut unix = UNIX0;
    // Ops are separated by 0xFF; the first byte of each picks what to do with the rest.
    for (i, op) in data.split(|b| *b == 0xFF).enumerate() {
        let Some((&kind, rest)) = op.split_first() else { continue };
        let tid = [i as u8; 12];
        match kind % 7 {
            // Raw bytes from the client.
            0 => drop(send(&mut server, now, rest, &mut binder)),
            // An authenticated request with fuzzed attributes (MD5 or SHA-256 integrity).
            1 | 2 => {
                let Some((&m, rest)) = rest.split_first() else { continue };
                let attrs = attrs_from(rest);
                let p = authed(&c, METHODS[m as usize % METHODS.len()], tid, &attrs, None, kind % 7 == 2);
                if let Some(r) = send(&mut server, now, &p, &mut binder) {
                    // A 438 hands out a new nonce: keep authenticating with it.
                    if let Ok(msg) = Message::parse(&r) {
                        if let Some(n) = msg.get(attr::NONCE) {
                            c.nonce = n.to_vec();
                        }
                    }
                }
            }
            // ChannelData on the bound channel (or another number).
            3 => {
                let number = if rest.first().is_some_and(|b| b & 1 == 0) { 0x4000u16 } else { 0x4001 };
                let mut p = number.to_be_bytes().to_vec();
                p.extend_from_slice(&(rest.len() as u16).to_be_bytes());
                p.extend_from_slice(rest);
                drop(send(&mut server, now, &p, &mut binder));
            }
            // A Send indication to the peer, or to a port the input picks.
            4 => {
                let port = rest.get(..2).map_or(9000, |b| u16::from_be_bytes([b[0], b[1]]));
                let mut b = Builder::new(method::SEND, Class::Indication, tid);
                b.xor_addr(attr::XOR_PEER_ADDRESS, SocketAddr::from(([127, 0, 0, 1], port))).attr(attr::DATA, rest);
                drop(send(&mut server, now, &b.finish(), &mut binder));
            }
            // A peer packet, from the permitted peer or another port.
            5 => {
                let from = if rest.first().is_some_and(|b| b & 1 == 0) { peer } else { "127.0.0.1:9001".parse().unwrap() };
                let mut buf = vec![0u8; PEER_HEADROOM + rest.len() + 4];
                buf[PEER_HEADROOM..PEER_HEADROOM + rest.len()].copy_from_slice(rest);
                let _ = server.path(&tuple).and_then(|p| p.from_peer(now, from, &mut buf, rest.len(), &counters));
            }
            // Time passes (up to ~17 minutes), the wall clock possibly stepping.
            _ => {
                let secs = rest.first().map_or(1, |b| *b as u64 * 4);
                now += Duration::from_secs(secs);
                unix = unix.saturating_add(secs).saturating_add(rest.get(1).map_or(0, |b| *b as u64 * 60));
                server.handle_timeout(now, unix);
                let _ = server.take_released();
            }
        }
    }
});
