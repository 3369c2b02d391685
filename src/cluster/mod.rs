//! Several kinlink nodes sharing presence and routing through Redis (`cluster.redis_url`).
//!
//! Each node keeps its own devices in a [`LocalHub`] (delivery and presence among them need no
//! Redis), and Redis holds what every node must agree on:
//!
//! - `kl:{F}:dev`, a hash per family: device → `node|session|user`. Joining is one Lua script
//!   that checks `signal.max_devices_per_family` and writes the device atomically, so two
//!   devices joining at once on two nodes cannot both take the last slot. The `{F}` hash tag
//!   keeps a family's keys in one Redis Cluster slot.
//! - `kl:{F}:ev`, a channel per family that the nodes holding its devices subscribe to:
//!   `on`/`off` presence events and forwarded `p2p-status` reports. Families are small, so
//!   the fan-out is a few nodes.
//! - `kl:node:{N}:in`, node N's inbox: a message for a device on N, published there by the
//!   node that received it (which knows where the target is from its roster) as a one-line
//!   header and the frame as it came, so only N reads it and nobody re-encodes it.
//! - `kl:node:{N}:alive` (expires after `cluster.presence_ttl_secs`), `kl:nodes` (a sorted set
//!   of heartbeats) and `kl:node:{N}:fam` (the families a node has devices in): a node whose
//!   heartbeat is older than the TTL is swept by whichever node gets there first, and its
//!   devices are announced offline.
//!
//! Every node also keeps a roster of its families' devices on other nodes (from the join
//! script's answer and the events), so `deliver` answers `peer-offline` without Redis.
//!
//! This file is the hub itself (joining, leaving, delivery, presence events); `keys` holds
//! the names, value formats and Lua scripts; `liveness` the heartbeat, the sweeping of dead
//! nodes and the recovery after Redis comes back.

mod control;
mod keys;
mod liveness;

pub use control::{ControlSink, Incoming};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::mpsc;

use self::keys::*;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::ratelimit::LogLimiter;
use crate::signal::hub::{DeliverError, FamilyFuture, Hub, HubLimits, JoinError, JoinFuture, LocalHub, Member, SessionId};
use crate::signal::negotiation::{Outcome, Report};
use crate::signal::protocol::{CloseCode, DeviceInfo, ServerMsg};
use crate::tls::{client_config_with_identity, KeyFiles};

/// Where reports forwarded by other nodes go: `(family, reporter, peer, report)`.
pub type ReportSink = Box<dyn Fn(&str, &str, &str, Report) + Send + Sync>;

/// The hub of a node in a cluster.
pub struct RedisHub {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Inner {
    node: Arc<str>,
    local: LocalHub,
    limits: HubLimits,
    ttl: Duration,
    client: Client,
    subscriber: SubscriberClient,
    /// Every family with devices here: its devices on other nodes.
    remote: Mutex<Rosters>,
    /// Messages for other nodes, published in order by one task.
    outgoing: mpsc::Sender<(String, String)>,
    metrics: Arc<Metrics>,
    errors_log: LogLimiter,
    reports: std::sync::OnceLock<ReportSink>,
    /// Where admin commands from the control channel go.
    control: std::sync::OnceLock<ControlSink>,
    /// Shutting down: devices that leave are expected to reconnect on another node.
    draining: std::sync::atomic::AtomicBool,
    /// A Redis Cluster (`redis-cluster://`): family channels are sharded (`SSUBSCRIBE` and
    /// `SPUBLISH` on the family's slot) instead of broadcast over the cluster bus.
    sharded: bool,
}

/// Pub/sub messages buffered for the subscriber task (about 100 bytes of bookkeeping each).
const SUBSCRIBER_BUFFER: usize = 16_384;

/// Messages for other nodes queued before `deliver` answers `rate-limited`.
const OUTGOING_QUEUE: usize = 65_536;

/// Commands sent in one pipelined batch, at most (publishes to other nodes, resubscriptions).
const PIPELINE_BATCH: usize = 256;

impl RedisHub {
    /// Connects to Redis, clears what a previous life of this node left, and starts the
    /// heartbeat, the sweeper and the subscriber.
    /// `identity`: the client certificate for a Redis that asks for one (reloaded by its
    /// owner, [`KeyFiles::watch`]).
    pub async fn connect(cluster: &ClusterConfig, identity: Option<Arc<KeyFiles>>, limits: HubLimits, metrics: Arc<Metrics>) -> anyhow::Result<RedisHub> {
        let (node, ttl) = (cluster.node(), Duration::from_secs(cluster.presence_ttl_secs));
        let url = cluster.redis_url.as_ref().map(|u| u.expose()).unwrap_or_default();
        anyhow::ensure!(!node.is_empty() && !node.contains(['|', '{', '}']), "cluster.node_id `{node}` must not be empty or contain | {{ }}");
        let mut config = Config::from_url(url).map_err(|e| anyhow::anyhow!("cluster.redis_url: {e}"))?;
        let sharded = matches!(config.server, ServerConfig::Clustered { .. });
        if config.tls.is_some() {
            // The compiled-in public roots (as everywhere else in kinlink: a distroless image
            // has no system store to rely on) plus a private CA, and a client certificate.
            let tls = client_config_with_identity(cluster.redis_ca_file.as_deref(), identity).map_err(|e| anyhow::anyhow!("TLS to Redis: {e}"))?;
            config.tls = Some(Arc::unwrap_or_clone(tls).into());
        }
        // While Redis is away, commands fail at once instead of queueing: a registration must
        // fall back to this node's devices, not wait for Redis.
        config.fail_fast = true;
        let mut builder = Builder::from_config(config);
        builder.with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(2);
            // Messages for this node's devices wait here for the subscriber task: the default
            // (32) dropped cross-node messages in bursts at 10,000 messages/s.
            p.broadcast_channel_capacity = SUBSCRIBER_BUFFER;
        });
        builder.with_connection_config(|c| c.connection_timeout = Duration::from_secs(2));
        builder.set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let client = builder.build().map_err(|e| anyhow::anyhow!("cluster.redis_url: {e}"))?;
        let subscriber = builder.build_subscriber_client().map_err(|e| anyhow::anyhow!("cluster.redis_url: {e}"))?;
        // The URL holds a password: errors name the key, never the value.
        tokio::time::timeout(Duration::from_secs(10), client.init())
            .await
            .map_err(|_| anyhow::anyhow!("cluster.redis_url: no connection to Redis within 10 s"))?
            .map_err(|e| anyhow::anyhow!("cluster.redis_url: cannot connect to Redis: {e}{}", hint(&e)))?;
        subscriber.init().await.map_err(|e| anyhow::anyhow!("cluster.redis_url: cannot connect the subscriber: {e}"))?;
        let (outgoing, mut out_rx) = mpsc::channel::<(String, String)>(OUTGOING_QUEUE);
        let inner = Arc::new(Inner {
            local: LocalHub::new(limits, metrics.clone(), &node),
            node: node.into(),
            limits,
            ttl,
            client,
            subscriber,
            remote: Mutex::new(HashMap::new()),
            outgoing,
            metrics,
            errors_log: LogLimiter::new(Instant::now(), Duration::from_secs(5)),
            reports: std::sync::OnceLock::new(),
            control: std::sync::OnceLock::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            sharded,
        });
        // A node restarted under the same name sweeps its former self first.
        inner.sweep(&inner.node.clone()).await;
        inner.heartbeat().await;
        let mut tasks = Vec::new();
        // Subscriptions back after every reconnect, retried until they hold. fred's
        // `manage_subscriptions` tries its `resubscribe_all` once, which on a Redis Cluster
        // always fails (see `Inner::resubscribe`): the node stayed deaf to its inbox and
        // families for good.
        let i = inner.clone();
        let mut back = inner.subscriber.reconnect_rx();
        tasks.push(tokio::spawn(async move {
            while back.recv().await.is_ok() {
                i.metrics.cluster_resubscriptions.with_label_values(&["reconnect"]).inc();
                let mut delay = Duration::from_millis(100);
                while let Err(e) = i.resubscribe().await {
                    i.redis_error("subscribe", &e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }));
        // Messages for this node's devices come to its own inbox, not over the family
        // channels: only the node holding the target reads them.
        let own_inbox = inbox(&inner.node);
        inner.subscribe(own_inbox.clone()).await.map_err(|e| anyhow::anyhow!("cluster: cannot subscribe to this node's inbox: {e}"))?;
        // Revocations and disconnects from every node's admin API.
        inner.subscribe(CONTROL.to_string()).await.map_err(|e| anyhow::anyhow!("cluster: cannot subscribe to the control channel: {e}"))?;
        let i = inner.clone();
        let mut messages = inner.subscriber.message_rx();
        tasks.push(tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(m) if *m.channel == *own_inbox => {
                        let Some(frame) = m.value.as_str() else { continue };
                        if let Some((family, to, text)) = parse_inbox_frame(&frame) {
                            let _ = i.local.deliver_now(family, to, text.to_string().into(), Instant::now());
                        }
                    }
                    Ok(m) if *m.channel == *CONTROL => {
                        if let Some(text) = m.value.as_str() {
                            i.on_control(&text);
                        }
                    }
                    Ok(m) => {
                        let (Some(family), Some(text)) = (family_of(&m.channel), m.value.as_str()) else { continue };
                        i.on_event(family, &text);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "cluster: the subscriber fell behind; events were missed");
                    }
                    Err(_) => break,
                }
            }
        }));
        // Redis back (restarted, possibly empty): announce this node's devices again and
        // re-read the rosters, so every node converges without a restart.
        let i = inner.clone();
        let mut reconnects = inner.client.reconnect_rx();
        tasks.push(tokio::spawn(async move {
            while let Ok(_server) = reconnects.recv().await {
                i.metrics.cluster_connected.set(1);
                tracing::info!(node = %i.node, "cluster: Redis reachable again; re-announcing this node's devices");
                i.reannounce().await;
                i.reload_revocations().await;
                // The other nodes re-announce as they reconnect, possibly while this node's
                // subscription is not back yet: re-read the rosters each heartbeat period for
                // a TTL, then drop what is still missing (it left while Redis was away).
                let j = i.clone();
                tokio::spawn(async move {
                    for _ in 0..3 {
                        tokio::time::sleep(j.ttl / 3).await;
                        j.merge_rosters().await;
                    }
                    j.prune_rosters().await;
                });
            }
        }));
        let i = inner.clone();
        let mut errors = inner.client.error_rx();
        tasks.push(tokio::spawn(async move {
            while let Ok((e, _)) = errors.recv().await {
                i.metrics.cluster_connected.set(0);
                i.redis_error("connection", &e);
            }
        }));
        inner.metrics.cluster_connected.set(1);
        let i = inner.clone();
        tasks.push(tokio::spawn(async move {
            // Everything queued goes out at once, pipelined: awaiting each reply before the
            // next publish held the queue to one Redis round trip per message, and a node
            // descheduled for a moment came back to a queue it drained one trip at a time
            // (the cross-node p99). Futures are polled in order, so commands reach fred's
            // router, and each connection, in queue order.
            let mut batch = Vec::with_capacity(PIPELINE_BATCH);
            while out_rx.recv_many(&mut batch, PIPELINE_BATCH).await > 0 {
                let sends = batch.drain(..).map(|(ch, text)| i.publish(ch, text));
                for r in futures_util::future::join_all(sends).await {
                    if let Err(e) = r {
                        i.redis_error("publish", &e);
                    }
                }
            }
        }));
        let i = inner.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(i.ttl / 3);
            let mut slots = None;
            // Since when this node's heartbeats have been landing. A node cut off from Redis
            // cannot tell a dead node from one cut off too (after an outage longer than the
            // TTL every heartbeat has expired, a Sentinel failover included): it sweeps no
            // other node until the others have had a TTL to heartbeat again, or every device
            // on another node would flap offline and online.
            let mut heard_since: Option<tokio::time::Instant> = None;
            loop {
                tick.tick().await;
                if !i.heartbeat().await {
                    heard_since = None;
                    continue;
                }
                let since = *heard_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= i.ttl {
                    i.sweep_dead().await;
                }
                i.follow_slot_moves(&mut slots).await;
            }
        }));
        tracing::info!(node = %inner.node, ttl_secs = ttl.as_secs(), "cluster: presence and routing through Redis");
        Ok(RedisHub { inner, tasks })
    }
}

impl RedisHub {
    /// Where `p2p-status` reports forwarded by other nodes are applied (the negotiations).
    pub fn set_report_sink(&self, sink: ReportSink) {
        let _ = self.inner.reports.set(sink);
    }
}

impl Drop for RedisHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Inner {
    fn redis_error(&self, op: &'static str, e: &Error) {
        self.metrics.cluster_redis_errors.with_label_values(&[op]).inc();
        if let Some(suppressed) = self.errors_log.allow(Instant::now()) {
            tracing::warn!(op, error = %e, suppressed, "cluster: Redis command failed; serving this node's devices only meanwhile");
        }
    }

    fn on_event(&self, family: &str, text: &str) {
        let Ok(event) = serde_json::from_str::<Event>(text) else { return };
        match event {
            Event::On { n, .. } | Event::Off { n, .. } | Event::Rep { n, .. } if *n == *self.node => {}
            // Only the node that relayed the offer holds the negotiation; the others find none.
            Event::Rep { to, from, r, .. } => {
                if let Some(sink) = self.reports.get() {
                    sink(family, &from, &to, r);
                }
            }
            Event::On { d, u, n, s } => {
                // The same device joined elsewhere: its connection here is replaced, quietly.
                self.local.evict(family, &d);
                let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
                let known = remote.entry(family.into()).or_default().insert(d.as_str().into(), Remote { node: n.as_str().into(), session: s, user: u.as_str().into() });
                drop(remote);
                // A re-announcement, or a device moving between nodes (a rolling update, a
                // reconnect), is not news: the family already sees it online.
                if known.is_some() {
                    return;
                }
                let online: Utf8Bytes = ServerMsg::DeviceOnline { family_id: family, device_id: &d, user_id: &u }.to_text().into();
                self.local.notify_family(family, &d, &online);
            }
            Event::Off { d, n, s } => {
                let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
                let was = remote.get_mut(family).and_then(|devices| {
                    let matches = devices.get(d.as_str()).is_some_and(|r| *r.node == *n && r.session == s);
                    matches.then(|| devices.remove(d.as_str()))
                });
                drop(remote);
                if was.is_some() {
                    let offline: Utf8Bytes = ServerMsg::DeviceOffline { family_id: family, device_id: &d }.to_text().into();
                    self.local.notify_family(family, &d, &offline);
                }
            }
        }
    }

    async fn publish(&self, channel: String, text: String) -> Result<(), Error> {
        if self.sharded {
            self.client.spublish::<(), _, _>(channel, text).await
        } else {
            self.client.publish::<(), _, _>(channel, text).await
        }
    }

    async fn subscribe(&self, channel: String) -> Result<(), Error> {
        if self.sharded {
            self.subscriber.ssubscribe(channel).await
        } else {
            self.subscriber.subscribe(channel).await
        }
    }

    async fn unsubscribe(&self, channel: String) -> Result<(), Error> {
        if self.sharded {
            self.subscriber.sunsubscribe(channel).await
        } else {
            self.subscriber.unsubscribe(channel).await
        }
    }

    fn connected(&self) -> bool {
        self.client.state() == ClientState::Connected
    }

    async fn join(self: Arc<Self>, member: Member) -> Result<Vec<DeviceInfo>, JoinError> {
        let family = member.family.clone();
        let device = member.device.clone();
        let value = record(&self.node, member.session, &member.user);
        // Subscribed before joining, so no event between the roster read and now is missed.
        if self.local.local_devices(&family) == 0 {
            if let Err(e) = self.subscribe(channel(&family)).await {
                self.redis_error("subscribe", &e);
            }
        }
        let answer: Result<Value, Error> =
            self.client
                .eval(
                    JOIN,
                    vec![devices_key(&family), since_key(&family)],
                    vec![device.to_string(), value.clone(), self.limits.max_devices_per_family.to_string(), member.since.to_string()],
                )
                .await;
        let all = match answer {
            Ok(v) => match parse_join(v) {
                Some(JoinAnswer::Full) => return Err(JoinError::FamilyFull),
                Some(JoinAnswer::Joined(all)) => Some(all),
                None => None,
            },
            Err(e) => {
                self.redis_error("join", &e);
                None
            }
        };
        let Some(all) = all else {
            // Redis unavailable: this node's devices still see and reach each other.
            return self.local.join_now(member);
        };
        let user = member.user.clone();
        let session = member.session;
        // A device moving here from another node is already online for this family.
        let moved = self.remote.lock().unwrap_or_else(|e| e.into_inner()).get(&family).is_some_and(|r| r.contains_key(&device));
        if let Err(e) = self.local.join_announced(member, !moved) {
            let _: Result<i64, Error> = self.client.eval(LEAVE, vec![devices_key(&family), since_key(&family)], vec![device.to_string(), value]).await;
            return Err(e);
        }
        if let Err(e) = self.client.sadd::<(), _, _>(families_key(&self.node), family.to_string()).await {
            self.redis_error("join", &e);
        }
        let mut others = Vec::new();
        // (The device itself is local now, whatever node the roster had it on.)
        let mut roster = HashMap::new();
        for (d, v) in &all {
            let Some(r) = parse_record(v) else { continue };
            if **d != *device {
                others.push(DeviceInfo { device_id: d.clone(), user_id: r.user.to_string() });
                if *r.node != *self.node {
                    roster.insert(d.as_str().into(), r);
                }
            }
        }
        // Merged, not replaced: an event that arrived since the script ran is newer than it.
        {
            let mut rosters = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            let known = rosters.entry(family.clone()).or_default();
            known.remove(&device);
            known.extend(roster);
        }
        let on = Event::On { d: device.to_string(), u: user.to_string(), n: self.node.to_string(), s: session };
        let _ = self.outgoing.try_send((channel(&family), serde_json::to_string(&on).unwrap_or_default()));
        others.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(others)
    }

    async fn leave(self: Arc<Self>, family: Arc<str>, device: Arc<str>, session: SessionId, user: Arc<str>) {
        let value = record(&self.node, session, &user);
        let removed: Result<i64, Error> = self.client.eval(LEAVE, vec![devices_key(&family), since_key(&family)], vec![device.to_string(), value]).await;
        match removed {
            Ok(1) => {
                let off = Event::Off { d: device.to_string(), n: self.node.to_string(), s: session };
                let _ = self.outgoing.try_send((channel(&family), serde_json::to_string(&off).unwrap_or_default()));
            }
            Ok(_) => {}
            Err(e) => self.redis_error("leave", &e),
        }
        if self.local.local_devices(&family) == 0 {
            self.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(&family);
            let _ = self.client.srem::<(), _, _>(families_key(&self.node), family.to_string()).await;
            if let Err(e) = self.unsubscribe(channel(&family)).await {
                self.redis_error("subscribe", &e);
            }
        }
    }
}

/// What to change, for the connection errors whose own text does not say it.
fn hint(e: &Error) -> &'static str {
    let text = e.to_string();
    if text.contains("UnknownIssuer") {
        " (Redis' certificate is not signed by a CA kinlink trusts: set cluster.redis_ca_file to its CA)"
    } else if text.contains("NotValidForName") {
        " (Redis' certificate does not name the host in cluster.redis_url)"
    } else if text.contains("CertificateRequired") {
        " (Redis asks for a client certificate: set cluster.redis_cert_file and cluster.redis_key_file)"
    } else if text.contains("ConnectionReset") || text.contains("UnexpectedEof") {
        " (if that port serves TLS, the URL is rediss://)"
    } else {
        ""
    }
}

impl Hub for RedisHub {
    fn forward_report(&self, family: &str, reporter: &str, peer: &str, report: Report) -> bool {
        let remote = self.inner.remote.lock().unwrap_or_else(|e| e.into_inner());
        if !remote.get(family).is_some_and(|d| d.contains_key(peer)) {
            return false;
        }
        drop(remote);
        let rep = Event::Rep { to: peer.to_string(), from: reporter.to_string(), n: self.inner.node.to_string(), r: report };
        self.inner.outgoing.try_send((channel(family), serde_json::to_string(&rep).unwrap_or_default())).is_ok()
    }

    fn join(&self, member: Member) -> JoinFuture {
        Box::pin(self.inner.clone().join(member))
    }

    fn leave(&self, family: &str, device: &str, session: SessionId) {
        let Some(gone) = self.inner.local.leave_now(family, device, session) else { return };
        let leave = self.inner.clone().leave(gone.family, gone.device, session, gone.user);
        if self.inner.draining.load(std::sync::atomic::Ordering::Relaxed) {
            // A rolling update: the device is reconnecting elsewhere. Its record is left for
            // a TTL; by then its new node has overwritten it (and the removal below finds
            // another connection's record and does nothing), or it did not come back and is
            // removed and announced offline then (by this node, or by the sweep of this node
            // once it is gone).
            let ttl = self.inner.ttl;
            tokio::spawn(async move {
                tokio::time::sleep(ttl).await;
                leave.await;
            });
        } else {
            tokio::spawn(leave);
        }
    }

    fn drain(&self) {
        self.inner.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn kick(&self, family: &str, device: Option<&str>, code: CloseCode) -> usize {
        let gone = self.inner.local.kick_now(family, device, code);
        for m in &gone {
            // Off the record and announced offline on the other nodes, as a leave.
            tokio::spawn(self.inner.clone().leave(m.family.clone(), m.device.clone(), m.session, m.user.clone()));
        }
        gone.len()
    }

    fn family(&self, family: &str) -> FamilyFuture {
        let (inner, family) = (self.inner.clone(), family.to_string());
        Box::pin(async move { inner.family_view(&family).await })
    }

    fn note_route(&self, family: &str, a: &str, b: &str, outcome: Outcome, at: u64) {
        self.inner.note_route(family, a, b, outcome, at);
    }

    fn deliver(&self, family: &str, to_device: &str, text: Utf8Bytes, relayed_at: Instant) -> Result<(), DeliverError> {
        match self.inner.local.deliver_now(family, to_device, text.clone(), relayed_at) {
            Err(DeliverError::Offline) => {}
            other => return other,
        }
        let remote = self.inner.remote.lock().unwrap_or_else(|e| e.into_inner());
        let Some(node) = remote.get(family).and_then(|d| d.get(to_device)).map(|r| r.node.clone()) else {
            return Err(DeliverError::Offline);
        };
        drop(remote);
        if !self.inner.connected() {
            return Err(DeliverError::ClusterUnavailable);
        }
        self.inner.outgoing.try_send((inbox(&node), inbox_frame(family, to_device, &text))).map_err(|_| DeliverError::QueueFull)
    }
}
