//! What the core counts, without Prometheus: the control plane's counters live in the core
//! (read under its lock), the data path's in [`DataCounters`], one set per data-path shard so
//! cores never write the same cache line. The driver's collector (`turn::telemetry`) turns
//! both into `kinlink_turn_*` metrics at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a packet was not relayed: the `kinlink_turn_dropped_packets_total` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a well-formed ChannelData or Send indication.
    Malformed,
    /// No live allocation for the client, or the relay's allocation is gone.
    NoAllocation,
    /// ChannelData on a channel that is not bound.
    NoChannel,
    /// No permission for the peer's IP.
    NoPermission,
    /// The peer policy refuses the address (Send indications are checked per packet).
    DeniedPeer,
    /// A peer datagram larger than the relay reads.
    TooLarge,
    /// The family's bandwidth quota is spent.
    Bandwidth,
    /// A TCP/TLS client's queue is full (it does not read).
    QueueFull,
    /// Requests without valid credentials past the per-source rate.
    RateLimited,
    /// The kernel's send buffer was full (UDP is never waited for on the data path).
    SendBufferFull,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 10] = [
        DropReason::Malformed,
        DropReason::NoAllocation,
        DropReason::NoChannel,
        DropReason::NoPermission,
        DropReason::DeniedPeer,
        DropReason::TooLarge,
        DropReason::Bandwidth,
        DropReason::QueueFull,
        DropReason::RateLimited,
        DropReason::SendBufferFull,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoAllocation => "no_allocation",
            DropReason::NoChannel => "no_channel",
            DropReason::NoPermission => "no_permission",
            DropReason::DeniedPeer => "denied_peer",
            DropReason::TooLarge => "too_large",
            DropReason::Bandwidth => "bandwidth",
            DropReason::QueueFull => "queue_full",
            DropReason::RateLimited => "rate_limited",
            DropReason::SendBufferFull => "send_buffer_full",
        }
    }
}

/// Direction of relayed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → relay → peer.
    ToPeer = 0,
    /// Peer → relay → client.
    ToClient = 1,
}

/// Data-path counters of one shard. Aligned to its own cache lines: two cores counting into
/// neighbouring sets would otherwise bounce the line between them on every packet.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct DataCounters {
    packets: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl DataCounters {
    /// One packet of `bytes` payload relayed.
    pub fn relayed(&self, dir: Direction, bytes: usize) {
        self.packets[dir as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[dir as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// One packet dropped.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets relayed in `dir`.
    pub fn packets(&self, dir: Direction) -> u64 {
        self.packets[dir as usize].load(Ordering::Relaxed)
    }

    /// Payload bytes relayed in `dir`.
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes[dir as usize].load(Ordering::Relaxed)
    }

    /// Packets dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }
}

/// Counts by a bounded set of `&'static str` labels.
#[derive(Debug, Default, Clone)]
pub struct Labeled(Vec<(&'static str, u64)>);

impl Labeled {
    /// Adds one under `label`.
    pub fn inc(&mut self, label: &'static str) {
        match self.0.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => self.0.push((label, 1)),
        }
    }

    /// The count under `label`.
    pub fn get(&self, label: &str) -> u64 {
        self.0.iter().find(|(l, _)| *l == label).map_or(0, |(_, n)| *n)
    }

    /// Every label counted so far.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().copied()
    }
}

/// Closed allocations' lifetimes kept for the collector, at most this many between scrapes
/// (the driver's timer drains them every second too).
const MAX_PENDING_LIFETIMES: usize = 65_536;

/// The control plane's counters, kept in the core and read under its lock.
#[derive(Debug, Default)]
pub struct Stats {
    /// STUN Binding requests by transport.
    pub binding_requests: Labeled,
    /// Allocations created by transport.
    pub allocations_created: Labeled,
    /// Requests refused authentication, by reason.
    pub auth_failures: Labeled,
    /// Peers refused by the peer policy, by reason.
    pub permission_denied: Labeled,
    /// Requests refused by a quota, by scope.
    pub quota_rejections: Labeled,
    /// Packets the control plane dropped (unauthenticated rate), by reason.
    pub dropped: Labeled,
    closed_lifetimes: Vec<Duration>,
    /// Closed allocations whose lifetime did not fit [`MAX_PENDING_LIFETIMES`].
    pub lifetimes_lost: u64,
}

impl Stats {
    pub(super) fn closed(&mut self, lived: Duration) {
        if self.closed_lifetimes.len() < MAX_PENDING_LIFETIMES {
            self.closed_lifetimes.push(lived);
        } else {
            self.lifetimes_lost += 1;
        }
    }

    /// Lifetimes of allocations closed since the last call.
    pub fn take_closed_lifetimes(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.closed_lifetimes)
    }
}
