//! Admission of TCP connections: accepting with a back-off when `accept` fails, a
//! server-wide cap and a cap per source, released when the guard drops. The HTTP listener and
//! the TURN TCP/TLS listeners use it, so what one host can hold open is bounded before it has
//! shown any credential.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;

/// First pause after a failed `accept`; doubled on each further failure up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections for one listener. A failing `accept` (out of descriptors) pauses,
/// doubling up to a second, instead of spinning (as mini-redis does); each failure is counted
/// in `kinlink_accept_errors_total{listener}` and logged at most once a second.
pub struct Accepting {
    label: &'static str,
    pause: Duration,
    log: LogLimiter,
}

impl Accepting {
    /// For the listener named `label` in the metrics.
    pub fn new(label: &'static str) -> Self {
        Accepting { label, pause: ACCEPT_BACKOFF_MIN, log: LogLimiter::new(Instant::now(), Duration::from_secs(1)) }
    }

    /// The next connection, however many failed `accept`s it takes.
    pub async fn accept(&mut self, listener: &TcpListener, metrics: &Metrics) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    self.pause = ACCEPT_BACKOFF_MIN;
                    return accepted;
                }
                Err(e) => {
                    metrics.accept_errors.with_label_values(&[self.label]).inc();
                    if let Some(suppressed) = self.log.allow(Instant::now()) {
                        let backoff_ms = self.pause.as_millis() as u64;
                        tracing::warn!(listener = self.label, error = %e, suppressed, backoff_ms, "accept failed; backing off");
                    }
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// Why a connection was not admitted; also a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The server-wide cap.
    Total,
    /// The per-source cap.
    PerSource,
}

impl Refused {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerSource => "per_ip",
        }
    }
}

/// The source a per-source cap counts by: an IPv4 address, or an IPv6 /64 (one subscriber
/// gets a whole /64, so counting single IPv6 addresses would bound nothing).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Caps open connections in total and per source.
pub struct ConnLimiter {
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
}

/// An admitted connection; dropping it gives the slot back.
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    source: IpAddr,
}

impl ConnLimiter {
    /// A limiter with both caps.
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(ConnLimiter { max_total, max_per_source, counts: Mutex::new(Counts { total: 0, per_source: HashMap::new() }) })
    }

    /// Admits a connection from `ip`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refused> {
        let source = source_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max_total {
            return Err(Refused::Total);
        }
        let n = c.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Refused::PerSource);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnGuard { limiter: self.clone(), source })
    }

    /// Connections admitted and not yet released.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.limiter.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_total_and_per_source_and_gives_back_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refused::PerSource));
        // The same host over IPv4-mapped IPv6 is the same source.
        assert_eq!(l.admit("::ffff:192.0.2.1".parse().unwrap()).err(), Some(Refused::PerSource));
        let _g3 = l.admit(b).unwrap();
        assert_eq!(l.admit("192.0.2.3".parse().unwrap()).err(), Some(Refused::Total));
        drop(g1);
        assert_eq!(l.open(), 2);
        assert!(l.admit(a).is_ok());
    }

    #[test]
    fn ipv6_counts_by_slash_64() {
        let l = ConnLimiter::new(100, 1);
        let _g = l.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(l.admit("2001:db8:1:2:ffff::9".parse().unwrap()).err(), Some(Refused::PerSource));
        assert!(l.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
    }
}
