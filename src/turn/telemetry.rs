//! The TURN counters as `kinlink_turn_*` metrics. The core and the shards count without
//! Prometheus (plain integers under the core's lock, per-shard atomics on the data path);
//! at every scrape this brings the Prometheus counters up to their totals.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::IntCounter;

use super::server::{DataCounters, Direction, DropReason, Labeled};
use super::shard::ShardHandle;
use super::{lock, Core};
use crate::metrics::Metrics;

/// Raises `counter` to `total` (counters only go up; a total below it is ignored).
fn raise(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn raise_all(vec: &prometheus::IntCounterVec, counts: &Labeled) {
    for (label, n) in counts.iter() {
        raise(&vec.with_label_values(&[label]), n);
    }
}

/// Observes closed allocations' lifetimes.
pub fn observe_lifetimes(metrics: &Metrics, lifetimes: &[Duration]) {
    for l in lifetimes {
        metrics.turn_allocation_duration.observe(l.as_secs_f64());
    }
}

/// Registers the TURN server's counters with `metrics`: they are brought up to date before
/// every render. Holds the core weakly, so a stopped server is not kept alive by its metrics.
pub fn register(metrics: &Metrics, core: &Core, shards: &Arc<[Arc<ShardHandle>]>, streams: &Arc<[DataCounters]>) {
    for i in 0..shards.len() {
        metrics.turn_shard_packets.with_label_values(&[&i.to_string()]);
    }
    let core: Weak<Mutex<_>> = Arc::downgrade(core);
    let shard_counters: Vec<Arc<DataCounters>> = shards.iter().map(|s| s.counters.clone()).collect();
    let streams = streams.clone();
    // Two scrapes at once must not both add the same difference.
    let once = Mutex::new(());
    metrics.on_render(Box::new(move |m: &Metrics| {
        let _one = once.lock().unwrap_or_else(|e| e.into_inner());
        let Some(core) = core.upgrade() else { return };
        let (allocations, control_drops, lifetimes) = {
            let mut c = lock(&core);
            let allocations = c.allocation_count();
            let s = c.stats();
            raise_all(&m.turn_binding_requests, &s.binding_requests);
            raise_all(&m.turn_allocations_created, &s.allocations_created);
            raise_all(&m.turn_auth_failures, &s.auth_failures);
            raise_all(&m.turn_permission_denied, &s.permission_denied);
            raise_all(&m.turn_quota_rejections, &s.quota_rejections);
            (allocations, s.dropped.clone(), s.take_closed_lifetimes())
        };
        m.turn_allocations.set(allocations as i64);
        observe_lifetimes(m, &lifetimes);
        let sum = |f: &dyn Fn(&DataCounters) -> u64| shard_counters.iter().map(|d| f(d)).chain(streams.iter().map(f)).sum::<u64>();
        raise(&m.turn_packets_to_peer, sum(&|d| d.packets(Direction::ToPeer)));
        raise(&m.turn_packets_to_client, sum(&|d| d.packets(Direction::ToClient)));
        raise(&m.turn_bytes_to_peer, sum(&|d| d.bytes(Direction::ToPeer)));
        raise(&m.turn_bytes_to_client, sum(&|d| d.bytes(Direction::ToClient)));
        for r in DropReason::ALL {
            raise(&m.turn_dropped.with_label_values(&[r.as_str()]), control_drops.get(r.as_str()) + sum(&|d| d.drops(r)));
        }
        for (i, d) in shard_counters.iter().enumerate() {
            raise(&m.turn_shard_packets.with_label_values(&[&i.to_string()]), d.packets(Direction::ToPeer) + d.packets(Direction::ToClient));
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::super::policy::Denied;
    use super::super::server::Transport;
    use super::*;

    #[test]
    fn metrics_pre_registers_every_label_the_core_uses() {
        let reasons: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(reasons, crate::metrics::TURN_DROP_REASONS);
        let transports: Vec<&str> = Transport::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(transports, crate::metrics::TURN_TRANSPORTS);
        let denied: Vec<&str> = Denied::ALL.iter().map(|d| d.reason()).collect();
        assert_eq!(denied, crate::metrics::TURN_DENIED_REASONS);
    }
}
