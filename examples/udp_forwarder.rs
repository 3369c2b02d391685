//! The physical limit for `bench/turn.sh --per-core`: a minimal UDP forwarder with kinlink's
//! batch syscalls and event loop and no TURN at all. Each client gets its own "relay" socket
//! on its first datagram; what a client sends goes out of its relay to `--peer`, and what
//! arrives at a relay goes back to its client from the listener: the same sockets and system
//! calls as a TURN relay (listener `recvmmsg`, relay `sendmmsg`, relay `recvmmsg`, listener
//! `sendmmsg` once per loop turn), without parsing, authentication, permissions or counters.
//!
//! ```text
//! target/release/examples/udp_forwarder --listen 127.0.0.1:40000 --peer 127.0.0.1:40001
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use kinlink::turn::batch::{self, RecvBatch, SendBatch};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut peer: Option<SocketAddr> = None;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--listen" => listen = Some(v.parse().expect("--listen ADDR")),
            "--peer" => peer = Some(v.parse().expect("--peer ADDR")),
            other => panic!("unknown flag {other}"),
        }
    }
    let (listen, peer) = (listen.expect("--listen"), peer.expect("--peer"));
    let listener = kinlink::turn::relay::bind_udp(listen, 1 << 20, false).expect("bind --listen");
    let mut poll = Poll::new().unwrap();
    poll.registry().register(&mut SourceFd(&listener.as_raw_fd()), Token(0), Interest::READABLE).unwrap();
    let mut relays: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut client_recv = RecvBatch::new(2048, 0);
    let mut relay_recv = RecvBatch::new(2048, 0);
    let mut out = SendBatch::default();
    let mut to_peer: Vec<(usize, SocketAddr, std::ops::Range<usize>)> = Vec::new();
    let mut group = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut unfinished: Vec<Token> = Vec::new();
    loop {
        let timeout = if unfinished.is_empty() { Duration::from_millis(250) } else { Duration::ZERO };
        let _ = poll.poll(&mut events, Some(timeout));
        let mut ready: Vec<Token> = std::mem::take(&mut unfinished);
        ready.extend(events.iter().map(|e| e.token()));
        for token in ready {
            if token == Token(0) {
                let mut more = true;
                for _ in 0..4 {
                    let Ok(n) = client_recv.recv(&listener) else {
                        more = false;
                        break;
                    };
                    for k in 0..n {
                        let offset = client_recv.offset(k);
                        let (from, _, len, _) = client_recv.get(k);
                        let idx = *by_client.entry(from).or_insert_with(|| {
                            let s = kinlink::turn::relay::bind_udp(SocketAddr::new(listen.ip(), 0), 256 << 10, false).unwrap();
                            poll.registry().register(&mut SourceFd(&s.as_raw_fd()), Token(1 + relays.len()), Interest::READABLE).unwrap();
                            relays.push((s, from));
                            relays.len() - 1
                        });
                        to_peer.push((idx, peer, offset..offset + len));
                    }
                    // One sendmmsg per relay socket, as a shard does.
                    to_peer.sort_by_key(|(i, _, _)| *i);
                    let mut at = 0;
                    while at < to_peer.len() {
                        let idx = to_peer[at].0;
                        group.clear();
                        while at < to_peer.len() && to_peer[at].0 == idx {
                            group.push((to_peer[at].1, to_peer[at].2.clone()));
                            at += 1;
                        }
                        batch::send_many(&relays[idx].0, client_recv.data(), &group);
                    }
                    to_peer.clear();
                    if n < batch::BATCH {
                        more = false;
                        break;
                    }
                }
                if more {
                    unfinished.push(token);
                }
            } else {
                let idx = token.0 - 1;
                let mut more = true;
                for _ in 0..4 {
                    let Ok(n) = relay_recv.recv(&relays[idx].0) else {
                        more = false;
                        break;
                    };
                    for k in 0..n {
                        let (_, buf, len, _) = relay_recv.get(k);
                        out.push(relays[idx].1, &buf[..len]);
                    }
                    if n < batch::BATCH {
                        more = false;
                        break;
                    }
                }
                if more {
                    unfinished.push(token);
                }
            }
        }
        out.flush(&listener);
    }
}
