//! The whole sans-IO TURN server: client packets on an allocated 5-tuple, and peer packets
//! framed in place. Nothing the network sends may panic it.
#![no_main]
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kinlink::config::Secret;
use kinlink::metrics::Metrics;
use kinlink::turn::policy::PeerPolicy;
use kinlink::turn::server::{BindError, Binder, FiveTuple, PortChoice, Settings, Transport, TurnServer, PEER_HEADROOM};
use libfuzzer_sys::fuzz_target;

struct Ports(u16);

impl Binder<u16> for Ports {
    fn bind(&mut self, _ipv6: bool, choice: PortChoice) -> Result<(u16, SocketAddr), BindError> {
        let p = match choice {
            PortChoice::Exact(p) => p,
            _ => {
                self.0 = self.0.wrapping_add(2).max(1024);
                self.0
            }
        };
        Ok((p, SocketAddr::from(([127, 0, 0, 1], p))))
    }
    fn start(&mut self, _relay: &u16, _tuple: FiveTuple) {}
}

fn settings() -> Settings {
    Settings {
        secret: Secret::new("fuzz-secret-0123456789"),
        realm: "kinlink".into(),
        public_ip: None,
        max_lifetime: Duration::from_secs(3600),
        nonce_lifetime: Duration::from_secs(600),
        family_allocations: 4,
        device_allocations: 4,
        total_allocations: 16,
        permissions_per_allocation: 8,
        channels_per_allocation: 8,
        family_bytes_per_sec: 1_000_000,
    }
}

static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let metrics = METRICS.get_or_init(|| Arc::new(Metrics::new())).clone();
    let policy = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec![]);
    let t0 = Instant::now();
    let mut server: TurnServer<u16> = TurnServer::new(settings(), policy, metrics, t0, 1_800_000_000);
    let tuple = FiveTuple { client: "127.0.0.1:5000".parse().unwrap(), server: "127.0.0.1:3478".parse().unwrap(), transport: Transport::Udp };
    let mut binder = Ports(40000);
    // Split the input into packets at 0xFF 0xFF markers, so one input exercises a sequence.
    for (i, packet) in data.split(|b| *b == 0xFF).enumerate() {
        let now = t0 + Duration::from_secs(i as u64 * 7);
        let _ = server.handle_client(now, tuple, packet, &mut binder);
        let mut buf = vec![0u8; PEER_HEADROOM + packet.len() + 4];
        buf[PEER_HEADROOM..PEER_HEADROOM + packet.len()].copy_from_slice(packet);
        let _ = server.handle_peer(now, &tuple, "127.0.0.1:9000".parse().unwrap(), &mut buf, packet.len());
        server.handle_timeout(now);
    }
});
