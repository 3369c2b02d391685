//! Keeping the cluster's view true over time: this node's heartbeat, sweeping nodes that
//! stopped heartbeating, and recovering after Redis came back (re-announcing this node's
//! devices, re-reading rosters, subscribing again), and following a Redis Cluster's slots
//! when they move.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use fred::prelude::*;

use super::keys::*;
use super::{Inner, PIPELINE_BATCH};
use crate::signal::protocol::ServerMsg;

impl Inner {
    pub(super) fn now_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// Writes this node's heartbeat; whether Redis took it.
    pub(super) async fn heartbeat(&self) -> bool {
        let ttl_ms = self.ttl.as_millis() as u64;
        let r: Result<(), Error> = async {
            let _: () = self.client.set(alive_key(&self.node), 1, Some(Expiration::PX(ttl_ms as i64)), None, false).await?;
            let _: Value = self.client.eval("return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])", vec![NODES], vec![Self::now_ms().to_string(), self.node.to_string()]).await?;
            Ok(())
        }
        .await;
        match r {
            Ok(()) => true,
            Err(e) => {
                self.redis_error("heartbeat", &e);
                false
            }
        }
    }

    /// Sweeps every node whose heartbeat is older than the TTL.
    pub(super) async fn sweep_dead(&self) {
        let cutoff = Self::now_ms().saturating_sub(self.ttl.as_millis() as u64);
        let dead: Result<Vec<String>, Error> = self.client.eval("return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])", vec![NODES], vec![cutoff.to_string()]).await;
        match dead {
            Ok(nodes) => {
                for n in nodes.into_iter().filter(|n| **n != *self.node) {
                    self.sweep(&n).await;
                }
            }
            Err(e) => self.redis_error("sweep", &e),
        }
    }

    /// Removes node `dead`'s devices from every family it had, announcing them offline.
    pub(super) async fn sweep(&self, dead: &str) {
        let r: Result<(), Error> = async {
            // One sweeper per dead node at a time.
            let lock: Option<String> = self.client.set(format!("kl:node:{{{dead}}}:sweep"), 1, Some(Expiration::PX(self.ttl.as_millis() as i64)), Some(SetOptions::NX), false).await?;
            if lock.is_none() && dead != &*self.node {
                return Ok(());
            }
            let families: Vec<String> = self.client.smembers(families_key(dead)).await?;
            for f in &families {
                let gone: Vec<String> = self.client.eval(SWEEP, vec![devices_key(f), since_key(f)], vec![dead]).await?;
                for pair in gone.chunks(2) {
                    let Some(r) = pair.get(1).and_then(|v| parse_record(v)) else { continue };
                    let off = Event::Off { d: pair[0].clone(), n: dead.to_string(), s: r.session };
                    self.publish(channel(f), serde_json::to_string(&off).unwrap_or_default()).await?;
                }
            }
            let _: () = self.client.del(families_key(dead)).await?;
            let _: Value = self.client.eval("return redis.call('ZREM', KEYS[1], ARGV[1])", vec![NODES], vec![dead]).await?;
            if dead != &*self.node {
                tracing::info!(node = dead, families = families.len(), "cluster: node gone; its devices are offline");
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            self.redis_error("sweep", &e);
        }
    }

    /// Subscribes again to every channel this node follows. Not fred's `resubscribe_all`:
    /// on a Redis Cluster it first sends SUBSCRIBE with no channel, which Redis refuses, and
    /// never gets to the sharded ones.
    pub(super) async fn resubscribe(&self) -> Result<(), Error> {
        if !self.sharded {
            let channels: Vec<String> = self.subscriber.tracked_channels().iter().map(|c| c.to_string()).collect();
            return self.subscriber.subscribe(channels).await;
        }
        let channels: Vec<String> = self.subscriber.tracked_shard_channels().iter().map(|c| c.to_string()).collect();
        for chunk in channels.chunks(PIPELINE_BATCH) {
            // One SSUBSCRIBE per channel (each goes to its slot's master), a chunk at a time.
            for r in futures_util::future::join_all(chunk.iter().map(|c| self.subscriber.ssubscribe(c.clone()))).await {
                r?;
            }
        }
        Ok(())
    }

    /// The Redis Cluster's slot map as this node's subscriber routes by it, read afresh:
    /// `(first slot, last slot, owner id)` ranges. `None` off a cluster, or when unreadable.
    pub(super) async fn slot_map(&self) -> Option<Vec<(u16, u16, String)>> {
        if !self.sharded {
            return None;
        }
        if let Err(e) = self.subscriber.sync_cluster().await {
            self.redis_error("cluster_slots", &e);
            return None;
        }
        let state = self.subscriber.cached_cluster_state()?;
        Some(state.slots().iter().map(|r| (r.start, r.end, r.id.to_string())).collect())
    }

    /// Subscribes again when the slot map changed since `last` (resharding, a failover). A
    /// master that hands a slot over drops that slot's shard-channel subscribers without a
    /// reconnect: it sends them SUNSUBSCRIBE, which fred does not surface, so without this the
    /// node would stay deaf to its inbox or to families whose slot moved. Events missed in
    /// between are made good from the rosters (the data moved with the slot).
    pub(super) async fn follow_slot_moves(&self, last: &mut Option<Vec<(u16, u16, String)>>) {
        let Some(now) = self.slot_map().await else { return };
        let moved = last.as_ref().is_some_and(|before| *before != now);
        if moved {
            self.metrics.cluster_resubscriptions.with_label_values(&["slots_moved"]).inc();
            tracing::info!(node = %self.node, "cluster: the Redis Cluster's slot map changed; subscribing again");
            if let Err(e) = self.resubscribe().await {
                // `last` stays as it was: the next heartbeat tries again.
                self.redis_error("subscribe", &e);
                return;
            }
            self.merge_rosters().await;
            self.prune_rosters().await;
        }
        *last = Some(now);
    }

    /// Writes every device of this node back, re-reads its families' rosters and announces
    /// the devices online again (other nodes treat a repeated `on` as a refresh).
    pub(super) async fn reannounce(&self) {
        self.heartbeat().await;
        let members = self.local.members();
        let mut families: Vec<Arc<str>> = members.iter().map(|m| m.family.clone()).collect();
        families.sort();
        families.dedup();
        for m in &members {
            let value = record(&self.node, m.session, &m.user);
            let set: Result<i64, Error> = self.client.eval(REANNOUNCE, vec![devices_key(&m.family)], vec![m.device.to_string(), value, self.node.to_string()]).await;
            match set {
                Ok(1) => {
                    let on = Event::On { d: m.device.to_string(), u: m.user.to_string(), n: self.node.to_string(), s: m.session };
                    let _ = self.outgoing.try_send((channel(&m.family), serde_json::to_string(&on).unwrap_or_default()));
                }
                // Another node holds the device now: this connection is the stale one.
                Ok(_) => self.local.evict(&m.family, &m.device),
                Err(e) => self.redis_error("join", &e),
            }
        }
        for f in families {
            if let Err(e) = self.client.sadd::<(), _, _>(families_key(&self.node), f.to_string()).await {
                self.redis_error("join", &e);
            }
            self.merge_roster(&f).await;
        }
    }

    /// The families this node holds rosters of (devices of other nodes).
    fn remote_families(&self) -> Vec<Arc<str>> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// [`Inner::merge_roster`] for every family this node holds a roster of.
    pub(super) async fn merge_rosters(&self) {
        for f in self.remote_families() {
            self.merge_roster(&f).await;
        }
    }

    /// Adds the family's devices on other nodes that this node did not know (announcing them
    /// online here). Nothing is removed: right after Redis returns, the other nodes may not
    /// have re-announced yet; [`Inner::prune_rosters`] removes, one TTL later.
    pub(super) async fn merge_roster(&self, f: &Arc<str>) {
        let Ok(all) = self.client.hgetall::<HashMap<String, String>, _>(devices_key(f)).await else { return };
        let mut added = Vec::new();
        {
            let mut rosters = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            let roster = rosters.entry(f.clone()).or_default();
            for (d, v) in &all {
                let Some(r) = parse_record(v).filter(|r| *r.node != *self.node) else { continue };
                if !roster.contains_key(d.as_str()) {
                    added.push((d.clone(), r.user.clone()));
                }
                roster.insert(d.as_str().into(), r);
            }
        }
        for (d, user) in added {
            let online: Utf8Bytes = ServerMsg::DeviceOnline { family_id: f, device_id: &d, user_id: &user }.to_text().into();
            self.local.notify_family(f, &d, &online);
        }
    }

    /// Removes devices of other nodes that Redis no longer has (they left while Redis was
    /// away, and their `off` was lost), announcing them offline here.
    pub(super) async fn prune_rosters(&self) {
        for f in self.remote_families() {
            let Ok(all) = self.client.hgetall::<HashMap<String, String>, _>(devices_key(&f)).await else { continue };
            let mut gone = Vec::new();
            if let Some(roster) = self.remote.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&f) {
                roster.retain(|d, r| {
                    let still = all.get(&**d).and_then(|v| parse_record(v)).is_some_and(|now| now.node == r.node && now.session == r.session);
                    if !still {
                        gone.push(d.clone());
                    }
                    still
                });
            }
            for d in gone {
                let offline: Utf8Bytes = ServerMsg::DeviceOffline { family_id: &f, device_id: &d }.to_text().into();
                self.local.notify_family(&f, &d, &offline);
            }
        }
    }
}
