//! Operators' control of sessions: list a family's online devices, disconnect a device,
//! revoke a device or a whole family.
//!
//! A revocation is an entry in the deny list ([`crate::auth::revocation`]): every token of
//! the device (or family) issued up to that second is refused from then on, until the last of
//! them has expired. Applying one here closes the device's connections with 4410, tells its
//! family it went offline, deletes its TURN allocations and refuses its TURN credentials.
//! [`Control::revoke`] applies it on this node, persists it (`data_dir/revocations.json` on
//! one node, a sorted set in Redis with several) and, clustered, publishes it so every other
//! node applies it too; a node that starts, or gets Redis back, reads the whole list again.
//!
//! - [`api`]: the HTTP API on `admin.listen` (bearer token);
//! - [`client`]: `kinlink admin ...`, the same API from the command line.

pub mod api;
pub mod client;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::revocation::Entry;
use crate::auth::TokenVerifier;
use crate::cluster::RedisHub;
use crate::metrics::Metrics;
use crate::signal::hub::{FamilyView, Hub};
use crate::signal::protocol::CloseCode;
use crate::turn::TurnHandle;

/// What one node tells the others (JSON on the cluster's control channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    /// Apply a revocation.
    Revoke(Entry),
    /// Close a device's connection (it may reconnect).
    Disconnect {
        /// Family id.
        #[serde(rename = "familyId")]
        family_id: String,
        /// Device id.
        #[serde(rename = "deviceId")]
        device_id: String,
    },
}

/// What applying a command did on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    /// Connections closed here.
    pub closed: usize,
    /// TURN allocations deleted here.
    pub allocations: usize,
}

/// Why a command could not be carried out everywhere.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Applied on this node, but neither persisted nor sent to the other nodes.
    #[error("applied on this node only: Redis is unreachable ({0}); retry to reach every node")]
    ClusterUnavailable(String),
    /// Applied, but the data directory could not be written: lost on restart.
    #[error("applied, but not saved: {0}")]
    NotSaved(String),
}

/// Where the deny list lives between restarts.
pub enum Store {
    /// `data_dir/revocations.json` (one node).
    File(PathBuf),
    /// Redis (several nodes).
    Cluster(Arc<RedisHub>),
}

/// The session controls of one node.
pub struct Control {
    verifier: TokenVerifier,
    hub: Arc<dyn Hub>,
    turn: Option<TurnHandle>,
    store: Store,
    metrics: Arc<Metrics>,
}

impl Control {
    /// Controls over `hub`, `verifier`'s deny list and TURN, persisting to `store`.
    pub fn new(verifier: TokenVerifier, hub: Arc<dyn Hub>, turn: Option<TurnHandle>, store: Store, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Control { verifier, hub, turn, store, metrics })
    }

    /// How long an entry is kept: the longest token lifetime accepted, plus leeway.
    fn keep_secs(&self) -> u64 {
        let p = self.verifier.policy();
        p.max_ttl_secs.saturating_add(p.leeway_secs)
    }

    /// Reads the persisted deny list (at start). Returns how many entries are in force.
    pub async fn load(&self, now_unix: u64) -> anyhow::Result<usize> {
        let entries = match &self.store {
            Store::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let mut list = crate::auth::revocation::DenyList::new(self.keep_secs());
                    list.load_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    list.entries()
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => anyhow::bail!("{}: {e}", path.display()),
            },
            Store::Cluster(redis) => redis.revocations(now_unix.saturating_sub(self.keep_secs())).await.map_err(|e| anyhow::anyhow!("cluster: reading revocations: {e}"))?,
        };
        self.apply_all(&entries, now_unix);
        Ok(self.entries())
    }

    /// Applies revocations read from the store (at start, or after Redis came back).
    pub fn apply_all(&self, entries: &[Entry], now_unix: u64) {
        for e in entries {
            self.apply(&Command::Revoke(e.clone()));
        }
        self.expire(now_unix);
    }

    /// Entries in force.
    pub fn entries(&self) -> usize {
        self.verifier.deny_list().len()
    }

    /// Applies `cmd` on this node only (made here, or received from another node).
    pub fn apply(&self, cmd: &Command) -> Applied {
        match cmd {
            Command::Revoke(e) => {
                // An entry already held (this node's own broadcast coming back, the whole list
                // read again after Redis returned) was applied when it arrived: closing and
                // scanning TURN again per entry would be 100,000 scans for nothing.
                if !self.verifier.deny_list().apply(e) {
                    return Applied::default();
                }
                let closed = self.hub.kick(&e.family_id, e.device_id.as_deref(), CloseCode::Revoked);
                let allocations = self.turn.as_ref().map_or(0, |t| t.revoke(e));
                self.metrics.auth_deny_list_entries.set(self.entries() as i64);
                // Loading the list at start applies every entry: only those that cut something
                // off are news.
                if closed > 0 || allocations > 0 {
                    tracing::info!(kind = kind(e), closed, allocations, "revocation applied: connections closed");
                } else {
                    tracing::debug!(kind = kind(e), "revocation applied");
                }
                Applied { closed, allocations }
            }
            Command::Disconnect { family_id, device_id } => Applied { closed: self.hub.kick(family_id, Some(device_id), CloseCode::Disconnected), allocations: 0 },
        }
    }

    /// Revokes every token of `device` (every device when none) of `family` issued up to
    /// `now_unix`, on every node.
    pub async fn revoke(&self, family: &str, device: Option<&str>, now_unix: u64) -> (Entry, Applied, Result<(), ControlError>) {
        let entry = Entry { family_id: family.to_string(), device_id: device.map(str::to_string), revoked_at: now_unix };
        // Here first: the device is cut off at once whatever becomes of the rest.
        let applied = self.apply(&Command::Revoke(entry.clone()));
        self.metrics.admin_revocations.with_label_values(&[kind(&entry)]).inc();
        let shared = match &self.store {
            Store::File(path) => self.save(path).map_err(ControlError::NotSaved),
            Store::Cluster(redis) => redis.record_revocation(&entry, now_unix.saturating_sub(self.keep_secs())).await.map_err(ControlError::ClusterUnavailable),
        };
        (entry, applied, shared)
    }

    /// Closes `device`'s connection (on whichever node holds it); it may reconnect.
    pub async fn disconnect(&self, family: &str, device: &str) -> (Applied, Result<(), ControlError>) {
        let cmd = Command::Disconnect { family_id: family.to_string(), device_id: device.to_string() };
        let applied = self.apply(&cmd);
        self.metrics.admin_disconnects.inc();
        let shared = match &self.store {
            Store::File(_) => Ok(()),
            Store::Cluster(redis) => redis.broadcast_control(&cmd).await.map_err(ControlError::ClusterUnavailable),
        };
        (applied, shared)
    }

    /// The family's online devices (every node) and the last route of each pair.
    pub async fn family(&self, family: &str) -> FamilyView {
        self.hub.family(family).await
    }

    /// Every revocation in force, oldest first.
    pub fn revocations(&self) -> Vec<Entry> {
        self.verifier.deny_list().entries()
    }

    /// Drops entries every token of which has expired; about once a minute. A file store is
    /// rewritten when something was dropped.
    pub fn expire(&self, now_unix: u64) {
        let dropped = self.verifier.deny_list().expire(now_unix);
        self.metrics.auth_deny_list_entries.set(self.entries() as i64);
        if dropped > 0 {
            tracing::debug!(dropped, "expired revocations dropped");
            if let Store::File(path) = &self.store {
                if let Err(e) = self.save(path) {
                    tracing::warn!(error = %e, "cannot save the deny list");
                }
            }
        }
    }

    /// Writes the deny list to `path` atomically (a temporary file renamed over it), 0600.
    fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let json = self.verifier.deny_list().to_json();
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            f.write_all(json.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The `kind` label: `device` or `family`.
fn kind(e: &Entry) -> &'static str {
    if e.device_id.is_some() {
        "device"
    } else {
        "family"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_plain_json() {
        let c = Command::Revoke(Entry { family_id: "f".into(), device_id: Some("d".into()), revoked_at: 5 });
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"op":"revoke","familyId":"f","deviceId":"d","revokedAt":5}"#);
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), c);
        let d = Command::Disconnect { family_id: "f".into(), device_id: "d".into() };
        assert_eq!(serde_json::from_str::<Command>(&serde_json::to_string(&d).unwrap()).unwrap(), d);
        assert!(serde_json::from_str::<Command>(r#"{"op":"explode"}"#).is_err());
    }
}
