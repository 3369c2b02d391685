//! A token bucket with the clock passed in: a signaling connection's message rate, and the
//! server-wide rate of self-check tokens.

use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
