//! Rate limits with the clock passed in: [`TokenBucket`] (a signaling connection's message
//! rate, self-check minting) and [`LogLimiter`] (log lines whose rate an attacker controls).

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

    /// When the bucket was last used.
    pub fn last_taken(&self) -> Instant {
        self.last
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
