//! What `/readyz` reports beyond "bound and not draining": the listener tasks. A listener
//! that ends (a panic on some input) is down until its supervisor has restarted it, and
//! `/readyz` says which.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// Up/down state of every supervised listener.
#[derive(Default)]
pub struct Health {
    listeners: Mutex<Vec<(String, bool)>>,
}

impl Health {
    /// A shared, empty health table.
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }

    /// Marks listener `name` up or down.
    pub fn set(&self, name: &str, up: bool) {
        let mut l = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        match l.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = up,
            None => l.push((name.to_string(), up)),
        }
    }

    /// Every listener and whether it serves.
    pub fn listeners(&self) -> Vec<(String, bool)> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Aborts the task when dropped, so aborting a supervisor also stops what it supervises.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the task `make` builds, and builds and runs it again (after a short back-off) when it
/// ends: a listener must not stay dead because one input made it panic. `name` is what
/// `/readyz` shows; `label` is the `kinlink_listener_restarts_total` label.
pub fn supervise<F, Fut>(name: String, label: &'static str, health: Arc<Health>, metrics: Arc<Metrics>, make: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            health.set(&name, true);
            let mut task = AbortOnDrop(tokio::spawn(make()));
            let ended = (&mut task.0).await;
            health.set(&name, false);
            metrics.listener_restarts.with_label_values(&[label]).inc();
            match ended {
                Err(e) if e.is_panic() => tracing::error!(listener = %name, "listener panicked; restarting it (a bug: please report it)"),
                _ => tracing::error!(listener = %name, "listener ended unexpectedly; restarting it"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_listener_that_panics_is_restarted_and_shown_down_meanwhile() {
        let health = Health::new();
        let metrics = Arc::new(Metrics::new());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let sup = supervise("turn udp test".into(), "turn_udp", health.clone(), metrics.clone(), move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a bad packet");
                }
                std::future::pending::<()>().await;
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.listener_restarts.with_label_values(&["turn_udp"]).get(), 1);
        assert!(metrics.panics.get() >= 1);
        assert_eq!(health.listeners(), vec![("turn udp test".to_string(), true)], "up again");
        sup.abort();
    }
}
