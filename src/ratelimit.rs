//! Rate limits with the clock passed in: [`TokenBucket`] (a signaling connection's message
//! rate, self-check minting), [`KeyedBuckets`] (one bucket per source or token, bounded: the
//! self-check mints, TURN requests without credentials) and [`LogLimiter`] (log lines whose
//! rate an attacker controls).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `burst` tokens at most, refilled at `per_sec`; each admitted event takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    per_sec: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_sec: f64, burst: u32, now: Instant) -> Self {
        TokenBucket { tokens: burst as f64, last: now, per_sec, burst: burst as f64 }
    }

    /// Takes a token if one is there after refilling up to `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A token bucket per key (a source address, a token), at most `max_keys` of them: past that,
/// buckets idle long enough to be full again are forgotten, and if none is, the event is
/// refused rather than the map grown (a spoofed-source flood cannot grow it).
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    per_sec: f64,
    burst: u32,
    max_keys: usize,
    map: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    /// Buckets of `burst` tokens refilled at `per_sec` (which must be above 0).
    pub fn new(per_sec: f64, burst: u32, max_keys: usize) -> Self {
        KeyedBuckets { per_sec, burst, max_keys, map: HashMap::new() }
    }

    /// Takes a token from `key`'s bucket (a new key starts full).
    pub fn take(&mut self, key: K, now: Instant) -> bool {
        if !self.map.contains_key(&key) && self.map.len() >= self.max_keys {
            self.prune(now);
            if self.map.len() >= self.max_keys {
                return false;
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.map.entry(key).or_insert_with(|| TokenBucket::new(per_sec, burst, now)).take(now)
    }

    /// Forgets the buckets idle long enough to be full again: they hold nothing a new one
    /// would not.
    pub fn prune(&mut self, now: Instant) {
        let refill = Duration::from_secs_f64(self.burst as f64 / self.per_sec);
        self.map.retain(|_, b| now.saturating_duration_since(b.last) < refill);
    }
}

/// Lets one log line through per `every` and counts the ones it holds back, so a flood of
/// refusals costs a counter increment each, not a line each. Shared by reference (atomics), so
/// `&self` paths can use it.
#[derive(Debug)]
pub struct LogLimiter {
    base: Instant,
    every_nanos: u64,
    /// Nanoseconds after `base` before which lines are held back.
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter whose first line at or after `base` goes through.
    pub fn new(base: Instant, every: Duration) -> Self {
        LogLimiter { base, every_nanos: every.as_nanos() as u64, next: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(held back since the last line)` when a line may be written at `now`.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let at = now.saturating_duration_since(self.base).as_nanos() as u64;
        let next = self.next.load(Ordering::Relaxed);
        if at >= next && self.next.compare_exchange(next, at.saturating_add(self.every_nanos), Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_buckets_are_bounded_and_forget_idle_keys() {
        let t0 = Instant::now();
        let mut b = KeyedBuckets::new(1.0, 2, 2);
        assert!(b.take("a", t0) && b.take("a", t0) && !b.take("a", t0));
        assert!(b.take("b", t0));
        assert!(!b.take("c", t0), "full of busy keys: refused, not grown");
        // Two seconds later both are full again, so a new key finds room.
        assert!(b.take("c", t0 + Duration::from_secs(2)));
    }

    #[test]
    fn log_limiter_lets_one_line_a_period_and_counts_the_rest() {
        let t0 = Instant::now();
        let l = LogLimiter::new(t0, Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert!((0..1000).all(|_| l.allow(t0 + Duration::from_millis(500)).is_none()));
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), None);
    }

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(400)), "0.8 of a token");
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!((0..3).all(|_| b.take(t0 + Duration::from_secs(100))), "refill stops at the burst");
        assert!(!b.take(t0 + Duration::from_secs(100)));
    }
}
