//! The UDP data plane: one thread per core ("shard"), each with its own event loop, its own
//! socket on every UDP listener address (`SO_REUSEPORT`: the kernel spreads clients over the
//! shards by a hash of their address, and keeps each client on one), and the relay sockets of
//! the allocations it serves. Everything one allocation relays, both ways, is handled by one
//! shard and never waits for another: relay state is read from the allocation's own
//! [`Path`], the core's lock is taken only for STUN requests, and sockets are bound and
//! written outside it.
//!
//! Reads are `recvmmsg` batches; replies and peer data for clients leave through one
//! `sendmmsg` per loop turn, client data for peers one `sendmmsg` per relay socket per batch.
//! The loop uses mio directly (tokio's own poller), so a turn of the loop serves every ready
//! socket before sending: a task per socket could not batch across sockets.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::batch::{self, RecvBatch, SendBatch};
use super::relay::{Relay, MAX_PEER_DATAGRAM};
use super::server::{classify, DataCounters, DropReason, FiveTuple, Packet, Path, Transport, PEER_HEADROOM};
use super::outbox::Outbox;
use super::Control;
use crate::health::Health;
use crate::metrics::Metrics;

/// Batches read from one socket before the others get their turn.
const ROUNDS_PER_TURN: usize = 4;
/// How often closed allocations' relay sockets are let go.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Largest client datagram read (a STUN message or ChannelData; WebRTC stays near 1,200).
const MAX_CLIENT_DATAGRAM: usize = 8192;

/// What other threads hand a shard.
enum Command {
    /// Read this relay for a TCP/TLS client.
    Start(Arc<Path<Relay>>, Arc<Outbox>),
}

/// A running shard, as the rest of the server reaches it.
pub struct ShardHandle {
    /// Its data-path counters.
    pub counters: Arc<DataCounters>,
    commands: Mutex<Vec<Command>>,
    waker: Waker,
    stop: AtomicBool,
}

impl ShardHandle {
    /// Relays what peers send to `path`'s relay into a TCP/TLS client's queue.
    pub fn start_stream_relay(&self, path: Arc<Path<Relay>>, outbox: Arc<Outbox>) {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).push(Command::Start(path, outbox));
        // Outside the lock: waking is a system call.
        let _ = self.waker.wake();
    }

    /// Ends the shard's thread (its sockets close with it).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
    }
}

/// Where a relay's peer data goes.
enum Sink {
    /// Out of this shard's listener socket `usize`, to the client.
    Udp(usize),
    /// Into a TCP/TLS client's outbox.
    Stream(Arc<Outbox>),
}

struct RelayEntry {
    path: Arc<Path<Relay>>,
    sink: Sink,
}

struct Listener {
    socket: UdpSocket,
    local: SocketAddr,
    out: SendBatch,
}

/// One shard's state; kept across a restart after a panic, so its relays keep running.
struct Shard {
    index: usize,
    poll: Poll,
    handle: Arc<ShardHandle>,
    control: Control,
    listeners: Vec<Listener>,
    /// Relay sockets by token (minus [`Shard::relay_base`]); `None` is a free slot.
    relays: Vec<Option<RelayEntry>>,
    free: Vec<usize>,
    /// The allocations of clients this shard has seen, so data never needs the core.
    clients: HashMap<FiveTuple, Arc<Path<Relay>>>,
    client_recv: RecvBatch,
    relay_recv: RecvBatch,
    /// Client data for peers from the current batch: relay socket, peer, range in `client_recv`.
    to_peers: Vec<(Relay, SocketAddr, std::ops::Range<usize>)>,
    /// One relay socket's share of `to_peers`, kept to save an allocation per batch.
    group: Vec<(SocketAddr, std::ops::Range<usize>)>,
    /// Sockets that still had data when their turn ended.
    unfinished: Vec<Token>,
    swept: Instant,
}

impl Shard {
    fn waker_token(&self) -> Token {
        Token(self.listeners.len())
    }

    fn relay_base(&self) -> usize {
        self.listeners.len() + 1
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut ready = Vec::with_capacity(1024);
        while !self.handle.stop.load(Ordering::Relaxed) {
            let timeout = if self.unfinished.is_empty() { Duration::from_millis(250) } else { Duration::ZERO };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(shard = self.index, error = %e, "TURN shard: poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            ready.clear();
            ready.append(&mut self.unfinished);
            ready.extend(events.iter().map(|e| e.token()));
            let now = Instant::now();
            for &token in &ready {
                if token == self.waker_token() {
                    self.take_commands();
                } else if token.0 < self.listeners.len() {
                    self.read_clients(token.0, now);
                } else {
                    self.read_relay(token.0 - self.relay_base(), now);
                }
            }
            for l in &mut self.listeners {
                for _ in 0..l.out.flush(&l.socket) {
                    self.handle.counters.dropped(DropReason::SendBufferFull);
                }
            }
            if now.duration_since(self.swept) >= SWEEP_EVERY {
                self.sweep();
                self.swept = now;
            }
        }
    }

    fn take_commands(&mut self) {
        let commands = std::mem::take(&mut *self.handle.commands.lock().unwrap_or_else(|e| e.into_inner()));
        for Command::Start(path, outbox) in commands {
            self.register(path, Sink::Stream(outbox));
        }
    }

    fn register(&mut self, path: Arc<Path<Relay>>, sink: Sink) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.relays.push(None);
            self.relays.len() - 1
        });
        let token = Token(self.relay_base() + slot);
        let fd = path.relay.as_raw_fd();
        if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
            tracing::error!(shard = self.index, error = %e, "TURN shard: cannot watch a relay socket");
            self.free.push(slot);
            return;
        }
        self.relays[slot] = Some(RelayEntry { path, sink });
        // Data may have arrived before the registration: edge-triggered readiness would not
        // report it, so the socket gets a turn now.
        self.unfinished.push(token);
    }

    /// Reads client datagrams from listener `i`.
    fn read_clients(&mut self, i: usize, now: Instant) {
        for _ in 0..ROUNDS_PER_TURN {
            let n = match self.client_recv.recv(&self.listeners[i].socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // ICMP errors surface as read errors: keep reading.
                Err(_) => continue,
            };
            for k in 0..n {
                self.client_datagram(i, k, now);
            }
            self.send_to_peers();
            if n < batch::BATCH {
                return;
            }
        }
        self.unfinished.push(Token(i));
    }

    fn client_datagram(&mut self, i: usize, k: usize, now: Instant) {
        let counters = &self.handle.counters;
        let local = self.listeners[i].local;
        let offset = self.client_recv.offset(k);
        let (from, slot, len, truncated) = self.client_recv.get(k);
        if truncated {
            counters.dropped(DropReason::TooLarge);
            return;
        }
        let tuple = FiveTuple { client: from, server: local, transport: Transport::Udp };
        let buf = &slot[..len];
        let routed = match classify(buf) {
            Packet::ChannelData => lookup(&mut self.clients, &self.control, &tuple, counters)
                .and_then(|p| p.channel_data(now, buf, counters).map(|(peer, r)| (p.relay.clone(), peer, r))),
            Packet::Send(msg) => lookup(&mut self.clients, &self.control, &tuple, counters)
                .and_then(|p| p.send_indication(now, &msg, counters).map(|(peer, r)| (p.relay.clone(), peer, r))),
            Packet::Control => {
                let (reply, started) = self.control.request(tuple, buf);
                if let Some(reply) = reply {
                    self.listeners[i].out.push(from, &reply);
                }
                if let Some(path) = started {
                    self.clients.insert(tuple, path.clone());
                    self.register(path, Sink::Udp(i));
                }
                None
            }
            Packet::Junk => None,
        };
        if let Some((relay, peer, range)) = routed {
            self.to_peers.push((relay, peer, offset + range.start..offset + range.end));
        }
    }

    /// Sends the batch's client data, one `sendmmsg` per relay socket.
    fn send_to_peers(&mut self) {
        if self.to_peers.is_empty() {
            return;
        }
        // Group by socket, keeping each socket's packets in arrival order.
        self.to_peers.sort_by_key(|(relay, _, _)| Arc::as_ptr(relay) as usize);
        let data = self.client_recv.data();
        let mut at = 0;
        let group = &mut self.group;
        while at < self.to_peers.len() {
            let socket = &self.to_peers[at].0;
            group.clear();
            while at < self.to_peers.len() && Arc::ptr_eq(&self.to_peers[at].0, socket) {
                group.push((self.to_peers[at].1, self.to_peers[at].2.clone()));
                at += 1;
            }
            for _ in 0..batch::send_many(socket, data, group) {
                self.handle.counters.dropped(DropReason::SendBufferFull);
            }
        }
        self.to_peers.clear();
    }

    /// Reads what peers sent to relay `slot` and frames it for the client.
    fn read_relay(&mut self, slot: usize, now: Instant) {
        let Some(Some(entry)) = self.relays.get(slot) else { return };
        let path = entry.path.clone();
        let counters = self.handle.counters.clone();
        for _ in 0..ROUNDS_PER_TURN {
            let n = match self.relay_recv.recv(&path.relay) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            for k in 0..n {
                let (peer, buf, len, truncated) = self.relay_recv.get(k);
                if truncated || len > MAX_PEER_DATAGRAM {
                    counters.dropped(DropReason::TooLarge);
                    continue;
                }
                let Some(range) = path.from_peer(now, peer, buf, len, &counters) else { continue };
                match &self.relays[slot].as_ref().expect("looked up above").sink {
                    Sink::Udp(i) => self.listeners[*i].out.push(path.tuple.client, &buf[range]),
                    Sink::Stream(outbox) => {
                        if !outbox.push_data(&buf[range]) {
                            counters.dropped(DropReason::QueueFull);
                        }
                    }
                }
            }
            if n < batch::BATCH {
                return;
            }
        }
        self.unfinished.push(Token(self.relay_base() + slot));
    }

    /// Lets go of the relays and cached paths of allocations the core has closed.
    fn sweep(&mut self) {
        for slot in 0..self.relays.len() {
            let closed = self.relays[slot].as_ref().is_some_and(|e| e.path.is_closed());
            if closed {
                if let Some(e) = self.relays[slot].take() {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&e.path.relay.as_raw_fd()));
                }
                self.free.push(slot);
            }
        }
        self.clients.retain(|_, p| !p.is_closed());
    }
}

/// The path of `tuple`'s allocation: this shard's copy, else the core's (a client this shard
/// has not served before, e.g. after its listener socket was replaced), kept for next time.
/// `None` counts a drop.
fn lookup(clients: &mut HashMap<FiveTuple, Arc<Path<Relay>>>, control: &Control, tuple: &FiveTuple, counters: &DataCounters) -> Option<Arc<Path<Relay>>> {
    let cached = clients.get(tuple);
    let live = control.live_path(cached, tuple, counters);
    if let Some(p) = live.as_ref().filter(|p| !cached.is_some_and(|c| Arc::ptr_eq(c, p))) {
        clients.insert(*tuple, p.clone());
    }
    live
}

/// Starts shard `index` on its listener sockets (one per UDP listener address, already
/// bound with `SO_REUSEPORT`), supervised: a panic restarts its loop with the same sockets
/// and relays, and `/readyz` shows it down meanwhile.
pub fn spawn(
    index: usize,
    sockets: Vec<UdpSocket>,
    control: Control,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Arc<ShardHandle>, std::thread::JoinHandle<()>)> {
    let poll = Poll::new()?;
    let mut listeners = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        poll.registry().register(&mut SourceFd(&socket.as_raw_fd()), Token(i), Interest::READABLE)?;
        let local = socket.local_addr()?;
        listeners.push(Listener { socket, local, out: SendBatch::default() });
    }
    let waker = Waker::new(poll.registry(), Token(listeners.len()))?;
    let handle = Arc::new(ShardHandle {
        counters: Arc::new(DataCounters::default()),
        commands: Mutex::new(Vec::new()),
        waker,
        stop: AtomicBool::new(false),
    });
    let name = format!("turn udp {} shard {index}", listeners.iter().map(|l| l.local.to_string()).collect::<Vec<_>>().join(", "));
    let unfinished = (0..listeners.len()).map(Token).collect();
    let mut shard = Shard {
        index,
        poll,
        handle: handle.clone(),
        control,
        listeners,
        relays: Vec::new(),
        free: Vec::new(),
        clients: HashMap::new(),
        client_recv: RecvBatch::new(MAX_CLIENT_DATAGRAM + 1, 0),
        relay_recv: RecvBatch::new(PEER_HEADROOM + MAX_PEER_DATAGRAM + 4, PEER_HEADROOM),
        to_peers: Vec::with_capacity(batch::BATCH),
        group: Vec::with_capacity(batch::BATCH),
        unfinished,
        swept: Instant::now(),
    };
    // Up from here on: its sockets are bound and registered, and what arrives before the
    // thread runs waits in them.
    health.set(&name, true);
    let thread = std::thread::Builder::new().name(format!("turn-shard-{index}")).spawn(move || {
        let mut backoff = Duration::from_millis(50);
        loop {
            match std::panic::catch_unwind(AssertUnwindSafe(|| shard.run())) {
                Ok(()) => return,
                Err(_) => {
                    health.set(&name, false);
                    metrics.listener_restarts.with_label_values(&["turn_udp"]).inc();
                    tracing::error!(listener = %name, "TURN shard panicked; restarting its loop (a bug: please report it)");
                    shard.to_peers.clear();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    health.set(&name, true);
                }
            }
        }
    })?;
    Ok((handle, thread))
}
