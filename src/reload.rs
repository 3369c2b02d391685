//! Files that are reloaded while kinlink runs (certificates, public keys, secrets): checked
//! every few seconds for a new modification time, and reloaded at once on SIGHUP. A reload
//! that fails keeps what was loaded before and is logged and counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntCounterVec;

/// Something loaded from files.
pub trait Reloadable: Send + Sync + 'static {
    /// The metric label and the name in log lines (`http`, `turn`, `jwks_file`, ...).
    fn label(&self) -> &'static str;
    /// The files it is loaded from.
    fn paths(&self) -> Vec<PathBuf>;
    /// Loads the files again; on failure the previous contents stay in use.
    fn reload(&self) -> Result<(), String>;
}

fn modified(paths: &[PathBuf]) -> Option<Vec<SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

/// Reloads `item` on SIGHUP and when its files' modification times change (checked every
/// `poll`), counting each attempt in `counter{label, result}` with `result` ok or error.
pub async fn watch(item: Arc<dyn Reloadable>, poll: Duration, counter: IntCounterVec) {
    let paths = item.paths();
    let mut last = modified(&paths);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let signalled = match hup.as_mut() {
            Some(h) => tokio::select! {
                _ = h.recv() => true,
                _ = tokio::time::sleep(poll) => false,
            },
            None => {
                tokio::time::sleep(poll).await;
                false
            }
        };
        #[cfg(not(unix))]
        let signalled = {
            tokio::time::sleep(poll).await;
            false
        };
        let now = modified(&paths);
        if signalled || now != last {
            last = now;
            let label = item.label();
            match item.reload() {
                Ok(()) => {
                    counter.with_label_values(&[label, "ok"]).inc();
                    tracing::info!(signalled, source = label, "reloaded")
                }
                Err(e) => {
                    counter.with_label_values(&[label, "error"]).inc();
                    tracing::error!(error = %e, source = label, "reload failed; keeping what was loaded before")
                }
            }
        }
    }
}
