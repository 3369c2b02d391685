//! What the admin API needs from the cluster: revocations persisted in Redis and published
//! to every node, disconnects published the same way, and a family's devices and routes read
//! across nodes. The commands themselves are the admin module's ([`crate::admin::Command`]);
//! this file only moves them.

use std::collections::HashMap;
use std::sync::Arc;

use fred::prelude::*;

use super::keys::*;
use super::{Inner, RedisHub};
use crate::admin::Command;
use crate::auth::revocation::{Entry, MAX_ENTRIES};
use crate::signal::hub::{FamilyView, OnlineDevice, PairRoute};
use crate::signal::negotiation::Outcome;

/// What reaches this node from the control channel.
pub enum Incoming {
    /// A command another node (or this one) published.
    Command(Command),
    /// Every revocation in force, read again after Redis came back (publishes made while
    /// this node was cut off never reached it).
    Revocations(Vec<Entry>),
}

/// Where incoming commands are applied (the admin module's `Control`).
pub type ControlSink = Box<dyn Fn(Incoming) + Send + Sync>;

impl RedisHub {
    /// Where commands from the control channel go.
    pub fn set_control_sink(&self, sink: ControlSink) {
        let _ = self.inner.control.set(sink);
    }

    /// Persists `entry` (dropping entries revoked before `drop_before`) and publishes it to
    /// every node.
    pub async fn record_revocation(&self, entry: &Entry, drop_before: u64) -> Result<(), String> {
        let args = vec![entry.revoked_at.to_string(), revoked_member(entry), drop_before.to_string(), MAX_ENTRIES.to_string()];
        let stored: Result<i64, Error> = self.inner.client.eval(REVOKE, vec![REVOKED], args).await;
        if let Err(e) = stored {
            self.inner.redis_error("revoke", &e);
            return Err(e.to_string());
        }
        self.broadcast_control(&Command::Revoke(entry.clone())).await
    }

    /// Publishes `cmd` to every node.
    pub async fn broadcast_control(&self, cmd: &Command) -> Result<(), String> {
        let text = serde_json::to_string(cmd).map_err(|e| e.to_string())?;
        self.inner.publish(CONTROL.to_string(), text).await.map_err(|e| {
            self.inner.redis_error("publish", &e);
            e.to_string()
        })
    }

    /// Every revocation made at or after `since` (unix seconds).
    pub async fn revocations(&self, since: u64) -> Result<Vec<Entry>, Error> {
        self.inner.revocations(since).await
    }
}

impl Inner {
    pub(super) async fn revocations(&self, since: u64) -> Result<Vec<Entry>, Error> {
        let flat: Vec<String> = self.client.eval(REVOCATIONS, vec![REVOKED], vec![since.to_string()]).await?;
        Ok(flat.chunks(2).filter(|p| p.len() == 2).filter_map(|p| parse_revoked(&p[0], &p[1])).collect())
    }

    /// A message on the control channel.
    pub(super) fn on_control(&self, text: &str) {
        let Some(sink) = self.control.get() else { return };
        match serde_json::from_str::<Command>(text) {
            Ok(cmd) => sink(Incoming::Command(cmd)),
            Err(e) => tracing::warn!(error = %e, "cluster: unreadable control command ignored (a newer node?)"),
        }
    }

    /// After Redis came back: read the revocations again.
    pub(super) async fn reload_revocations(&self) {
        let Some(sink) = self.control.get() else { return };
        match self.revocations(0).await {
            Ok(all) => sink(Incoming::Revocations(all)),
            Err(e) => self.redis_error("revocations", &e),
        }
    }

    /// The family across nodes: devices from its record, since and routes beside it.
    pub(super) async fn family_view(&self, family: &str) -> FamilyView {
        let read = async {
            let devices: HashMap<String, String> = self.client.hgetall(devices_key(family)).await?;
            let since: HashMap<String, String> = self.client.hgetall(since_key(family)).await?;
            let routes: HashMap<String, String> = self.client.hgetall(routes_key(family)).await?;
            Ok::<_, Error>((devices, since, routes))
        };
        let (devices, since, routes) = match read.await {
            Ok(v) => v,
            Err(e) => {
                // Redis away: this node's devices, which is all this node can know.
                self.redis_error("family", &e);
                return FamilyView { devices: self.local.online(family), routes: self.local.routes(family) };
            }
        };
        let mut online: Vec<OnlineDevice> = devices
            .iter()
            .filter_map(|(d, v)| {
                let r = parse_record(v)?;
                Some(OnlineDevice { device_id: d.clone(), user_id: r.user.to_string(), node: r.node.to_string(), since: since.get(d).and_then(|s| s.parse().ok()) })
            })
            .collect();
        online.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let mut pairs: Vec<PairRoute> = routes
            .iter()
            .filter_map(|(k, v)| {
                let (a, b) = k.split_once(' ')?;
                let (route, at) = v.split_once(' ')?;
                let any_online = devices.contains_key(a) || devices.contains_key(b);
                let at = at.parse().ok()?;
                any_online.then(|| PairRoute { devices: [a.to_string(), b.to_string()], route: route.to_string(), at })
            })
            .collect();
        pairs.sort_by(|x, y| x.devices.cmp(&y.devices));
        FamilyView { devices: online, routes: pairs }
    }

    /// Records a pair's route in Redis (reports are rare: one or two per connection).
    pub(super) fn note_route(self: &Arc<Self>, family: &str, a: &str, b: &str, outcome: Outcome, at: u64) {
        self.local.note_route_now(family, a, b, outcome, at);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let (key, field, value) = (routes_key(family), format!("{lo} {hi}"), format!("{} {at}", outcome.as_str()));
        let i = self.clone();
        tokio::spawn(async move {
            let set: Result<(), Error> = async {
                i.client.hset::<(), _, _>(&key, (field, value)).await?;
                i.client.expire::<(), _>(&key, ROUTES_TTL_SECS, None).await
            }
            .await;
            if let Err(e) = set {
                i.redis_error("route", &e);
            }
        });
    }
}
