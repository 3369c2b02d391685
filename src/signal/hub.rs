//! Who is online, and delivery between devices of one family.
//!
//! Sessions only ever talk to the [`Hub`] trait: joining, leaving and delivering. Presence
//! notifications (`device-online`/`device-offline`) are the hub's job, because with several
//! replicas (Redis) they have to fan out across nodes. [`LocalHub`] is the single-node
//! implementation: one short, never-awaited mutex section per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

use super::negotiation::Outcome;
use super::protocol::{CloseCode, DeviceInfo, ServerMsg};
use crate::metrics::Metrics;

/// Identifies one WebSocket connection, so a late `leave` from a replaced connection is ignored.
pub type SessionId = u64;

/// What a session's writer receives from the hub.
#[derive(Debug)]
pub enum Outbound {
    /// A text frame; `relayed_at` is set for relayed messages so the writer can observe latency.
    Text {
        /// The frame.
        text: Utf8Bytes,
        /// When the sender's frame was accepted, for `kinlink_signal_relay_latency_seconds`.
        relayed_at: Option<Instant>,
    },
    /// Close the connection (a newer connection took over this device).
    Close(CloseCode),
}

impl crate::queue::Weighed for Outbound {
    fn bytes(&self) -> usize {
        match self {
            Outbound::Text { text, .. } => text.len(),
            Outbound::Close(_) => 0,
        }
    }
}

/// A device's outbound queue, bounded in messages *and* bytes: 256 queued 64 KiB frames
/// are 16 MB per slow reader, so the byte bound is what keeps memory per device small. A
/// close always fits.
pub fn outbound(messages: usize, max_bytes: usize) -> (OutboundTx, OutboundRx) {
    crate::queue::bounded(messages, max_bytes)
}

/// The sending half of [`outbound`].
pub type OutboundTx = crate::queue::Sender<Outbound>;

/// The receiving half of [`outbound`].
pub type OutboundRx = crate::queue::Receiver<Outbound>;

/// A registered device, as the hub keeps it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Family id.
    pub family: Arc<str>,
    /// Device id.
    pub device: Arc<str>,
    /// User id.
    pub user: Arc<str>,
    /// The connection.
    pub session: SessionId,
    /// When it registered (unix seconds), for the admin API.
    pub since: u64,
    /// Its outbound queue.
    pub tx: OutboundTx,
}

/// An online device, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OnlineDevice {
    /// Device id.
    pub device_id: String,
    /// User id.
    pub user_id: String,
    /// The node holding its connection.
    pub node: String,
    /// When it registered (unix seconds); none when the node did not record it.
    pub since: Option<u64>,
}

/// How a pair of devices last connected, from their `p2p-status` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairRoute {
    /// The two devices, in order.
    pub devices: [String; 2],
    /// `direct`, `relay`, `http_fallback` or `abandoned`.
    pub route: String,
    /// When it was reported (unix seconds).
    pub at: u64,
}

/// A family's online devices on every node, and the last route of each pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyView {
    /// Online devices, by id.
    pub devices: Vec<OnlineDevice>,
    /// Routes of pairs with at least one device online.
    pub routes: Vec<PairRoute>,
}

/// What [`Hub::family`] resolves to (with several nodes, a round trip to Redis).
pub type FamilyFuture = std::pin::Pin<Box<dyn std::future::Future<Output = FamilyView> + Send>>;

/// Why a device could not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// `signal.max_devices_per_family` reached.
    #[error("family has the maximum number of devices online")]
    FamilyFull,
    /// `signal.max_devices` reached on this node.
    #[error("server has the maximum number of devices online")]
    ServerFull,
}

/// Why a message could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The target is not online in the sender's family (or does not exist at all: the two
    /// are indistinguishable on purpose, so other families cannot be probed).
    #[error("device is not online")]
    Offline,
    /// The target's queue is full: it is not reading.
    #[error("device is not keeping up")]
    QueueFull,
    /// The target is on another node, and this node has lost the cluster (Redis).
    #[error("the device is on another node, which this node cannot reach now")]
    ClusterUnavailable,
}

/// What [`Hub::join`] resolves to: the family's other online devices, or why not. With
/// several nodes it is a round trip to the cluster, hence a future.
pub type JoinFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<DeviceInfo>, JoinError>> + Send>>;

/// Routing of signaling messages between devices of a family.
pub trait Hub: Send + Sync + 'static {
    /// Registers `member`, replacing an older connection of the same device (which receives
    /// [`Outbound::Close`] with [`CloseCode::Replaced`]). The family's other devices receive
    /// `device-online`. Returns the family's other online devices.
    fn join(&self, member: Member) -> JoinFuture;
    /// Removes the device if `session` is still its connection; the family then receives
    /// `device-offline`.
    fn leave(&self, family: &str, device: &str, session: SessionId);
    /// Queues `text` for `to_device` of `family`, without waiting.
    fn deliver(&self, family: &str, to_device: &str, text: Utf8Bytes, relayed_at: Instant) -> Result<(), DeliverError>;
    /// The node is shutting down and its devices are about to reconnect elsewhere.
    fn drain(&self) {}
    /// A `p2p-status` about a negotiation this node does not hold: hands it to the node of
    /// `peer` (which relayed the offer), true when sent there. One node: nowhere to send.
    fn forward_report(&self, _family: &str, _reporter: &str, _peer: &str, _report: super::negotiation::Report) -> bool {
        false
    }
    /// Closes this node's connection of `device` (of every device when none) of `family`
    /// with `code`; the family is told they went offline. Returns how many closed.
    fn kick(&self, family: &str, device: Option<&str>, code: CloseCode) -> usize;
    /// The family's online devices and pair routes (on every node).
    fn family(&self, family: &str) -> FamilyFuture;
    /// The negotiation between `a` and `b` ended as `outcome`, at unix second `at`.
    fn note_route(&self, family: &str, a: &str, b: &str, outcome: Outcome, at: u64);
}

/// Limits the hub enforces.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Devices per family.
    pub max_devices_per_family: usize,
    /// Devices on this node.
    pub max_devices: usize,
}

/// Single-node hub.
pub struct LocalHub {
    limits: HubLimits,
    metrics: Arc<Metrics>,
    node: Arc<str>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    // Families are small (tens of devices), so a Vec scan beats a map per family.
    families: HashMap<Arc<str>, Vec<Member>>,
    devices: usize,
    /// The last route of each pair, for families with devices here: at most a family's
    /// devices squared, dropped with the family.
    routes: HashMap<Arc<str>, Vec<PairRoute>>,
}

impl LocalHub {
    /// An empty hub, on a node named `node` (as the admin API shows it).
    pub fn new(limits: HubLimits, metrics: Arc<Metrics>, node: &str) -> Self {
        LocalHub { limits, metrics, node: node.into(), state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing presence entirely, so recover instead of cascading.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_gauges(&self, state: &State) {
        self.metrics.signal_devices.set(state.devices as i64);
        self.metrics.signal_families.set(state.families.len() as i64);
    }
}

/// Best-effort presence fan-out: a device whose queue is full misses the notification (it is
/// already failing to keep up, and will see the truth in `registered` when it reconnects).
fn notify(members: &[Member], skip_device: &str, text: &Utf8Bytes) {
    for m in members.iter().filter(|m| &*m.device != skip_device) {
        if m.tx.try_send(Outbound::Text { text: text.clone(), relayed_at: None }).is_err() {
            tracing::debug!(family_size = members.len(), "presence notification dropped: queue full");
        }
    }
}

impl Hub for LocalHub {
    fn join(&self, member: Member) -> JoinFuture {
        Box::pin(std::future::ready(self.join_now(member)))
    }

    fn leave(&self, family_id: &str, device: &str, session: SessionId) {
        self.leave_now(family_id, device, session);
    }

    fn deliver(&self, family: &str, to_device: &str, text: Utf8Bytes, relayed_at: Instant) -> Result<(), DeliverError> {
        self.deliver_now(family, to_device, text, relayed_at)
    }

    fn kick(&self, family: &str, device: Option<&str>, code: CloseCode) -> usize {
        self.kick_now(family, device, code).len()
    }

    fn family(&self, family: &str) -> FamilyFuture {
        let view = FamilyView { devices: self.online(family), routes: self.routes(family) };
        Box::pin(std::future::ready(view))
    }

    fn note_route(&self, family: &str, a: &str, b: &str, outcome: Outcome, at: u64) {
        self.note_route_now(family, a, b, outcome, at);
    }
}

impl LocalHub {
    /// Registers `member` on this node (see [`Hub::join`]).
    pub fn join_now(&self, member: Member) -> Result<Vec<DeviceInfo>, JoinError> {
        self.join_announced(member, true)
    }

    /// [`LocalHub::join_now`]; with `announce` false the family's devices here are not told
    /// (they already see the device online: it moved here from another node).
    pub fn join_announced(&self, member: Member, announce: bool) -> Result<Vec<DeviceInfo>, JoinError> {
        let mut state = self.lock();
        let state = &mut *state;
        let existing = state.families.get(&member.family);
        let replacing = existing.and_then(|f| f.iter().position(|m| m.device == member.device));
        if replacing.is_none() {
            if existing.map_or(0, Vec::len) >= self.limits.max_devices_per_family {
                return Err(JoinError::FamilyFull);
            }
            if state.devices >= self.limits.max_devices {
                return Err(JoinError::ServerFull);
            }
        }
        let family = state.families.entry(member.family.clone()).or_default();
        let online = ServerMsg::DeviceOnline { family_id: &member.family, device_id: &member.device, user_id: &member.user };
        if announce {
            let online: Utf8Bytes = online.to_text().into();
            notify(family, &member.device, &online);
        }
        let others =
            family.iter().filter(|m| m.device != member.device).map(|m| DeviceInfo { device_id: m.device.to_string(), user_id: m.user.to_string() }).collect();
        match replacing {
            Some(i) => {
                let old = std::mem::replace(&mut family[i], member);
                // The old connection's queue may be full; dropping its sender ends it anyway.
                let _ = old.tx.try_send(Outbound::Close(CloseCode::Replaced));
            }
            None => {
                family.push(member);
                state.devices += 1;
            }
        }
        self.publish_gauges(state);
        Ok(others)
    }

    /// See [`Hub::leave`]. The member that left; none when `session` was no longer the
    /// device's connection.
    pub fn leave_now(&self, family_id: &str, device: &str, session: SessionId) -> Option<Member> {
        let mut state = self.lock();
        let family = state.families.get_mut(family_id)?;
        let i = family.iter().position(|m| &*m.device == device && m.session == session)?;
        let gone = family.swap_remove(i);
        if family.is_empty() {
            state.families.remove(family_id);
            state.routes.remove(family_id);
        } else {
            let offline: Utf8Bytes = ServerMsg::DeviceOffline { family_id, device_id: device }.to_text().into();
            notify(family, device, &offline);
        }
        state.devices -= 1;
        self.publish_gauges(&state);
        Some(gone)
    }

    /// Closes the device's connection here with [`CloseCode::Replaced`] (a newer one joined on
    /// another node), without telling the family it went offline.
    pub fn evict(&self, family_id: &str, device: &str) {
        let mut state = self.lock();
        let Some(family) = state.families.get_mut(family_id) else { return };
        let Some(i) = family.iter().position(|m| &*m.device == device) else { return };
        let old = family.swap_remove(i);
        let _ = old.tx.try_send(Outbound::Close(CloseCode::Replaced));
        if family.is_empty() {
            state.families.remove(family_id);
            state.routes.remove(family_id);
        }
        state.devices -= 1;
        self.publish_gauges(&state);
    }

    /// Closes the connections of `device` (every device when none) of `family` here with
    /// `code` and tells the family's other devices here they went offline. The members closed.
    pub fn kick_now(&self, family_id: &str, device: Option<&str>, code: CloseCode) -> Vec<Member> {
        let mut state = self.lock();
        let Some(family) = state.families.get_mut(family_id) else { return Vec::new() };
        let (gone, stay): (Vec<Member>, Vec<Member>) = std::mem::take(family).into_iter().partition(|m| device.is_none_or(|d| *m.device == *d));
        *family = stay;
        for m in &gone {
            // A close has slots of its own in the queue, however full it is.
            let _ = m.tx.try_send(Outbound::Close(code));
            let offline: Utf8Bytes = ServerMsg::DeviceOffline { family_id, device_id: &m.device }.to_text().into();
            notify(family, &m.device, &offline);
        }
        if family.is_empty() {
            state.families.remove(family_id);
            state.routes.remove(family_id);
        }
        state.devices -= gone.len();
        self.publish_gauges(&state);
        gone
    }

    /// The family's devices on this node.
    pub fn online(&self, family_id: &str) -> Vec<OnlineDevice> {
        let state = self.lock();
        let mut all: Vec<OnlineDevice> = state
            .families
            .get(family_id)
            .into_iter()
            .flatten()
            .map(|m| OnlineDevice { device_id: m.device.to_string(), user_id: m.user.to_string(), node: self.node.to_string(), since: Some(m.since) })
            .collect();
        all.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        all
    }

    /// The last route of each pair of the family seen here.
    pub fn routes(&self, family_id: &str) -> Vec<PairRoute> {
        self.lock().routes.get(family_id).cloned().unwrap_or_default()
    }

    /// Records how `a` and `b` last connected, while the family has devices here.
    pub fn note_route_now(&self, family_id: &str, a: &str, b: &str, outcome: Outcome, at: u64) {
        let mut state = self.lock();
        let Some((key, _)) = state.families.get_key_value(family_id) else { return };
        let key = key.clone();
        let devices = if a <= b { [a.to_string(), b.to_string()] } else { [b.to_string(), a.to_string()] };
        let routes = state.routes.entry(key).or_default();
        let route = PairRoute { devices, route: outcome.as_str().to_string(), at };
        match routes.iter_mut().find(|r| r.devices == route.devices) {
            Some(r) => *r = route,
            None => routes.push(route),
        }
    }

    /// Tells the family's devices on this node (but `skip`) `text`: presence from other nodes.
    pub fn notify_family(&self, family_id: &str, skip: &str, text: &Utf8Bytes) {
        let state = self.lock();
        if let Some(family) = state.families.get(family_id) {
            notify(family, skip, text);
        }
    }

    /// Devices of the family on this node.
    pub fn local_devices(&self, family_id: &str) -> usize {
        self.lock().families.get(family_id).map_or(0, Vec::len)
    }

    /// Every device on this node, for re-announcing them.
    pub fn members(&self) -> Vec<Member> {
        self.lock().families.values().flatten().cloned().collect()
    }

    /// See [`Hub::deliver`].
    pub fn deliver_now(&self, family: &str, to_device: &str, text: Utf8Bytes, relayed_at: Instant) -> Result<(), DeliverError> {
        let state = self.lock();
        let target = state.families.get(family).and_then(|f| f.iter().find(|m| &*m.device == to_device));
        let Some(target) = target else { return Err(DeliverError::Offline) };
        target.tx.try_send(Outbound::Text { text, relayed_at: Some(relayed_at) }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DeliverError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => DeliverError::Offline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(per_family: usize, total: usize) -> LocalHub {
        LocalHub::new(HubLimits { max_devices_per_family: per_family, max_devices: total }, Arc::new(Metrics::new()), "n1")
    }

    fn member(f: &str, d: &str, session: SessionId) -> (Member, OutboundRx) {
        let (tx, rx) = outbound(4, usize::MAX);
        (Member { family: f.into(), device: d.into(), user: format!("u-{d}").into(), session, since: 1000 + session, tx }, rx)
    }

    fn text(rx: &mut OutboundRx) -> String {
        match rx.try_recv() {
            Ok(Outbound::Text { text, .. }) => text.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn presence_and_delivery_stay_within_the_family() {
        let h = hub(8, 100);
        let (a, mut ra) = member("f1", "a", 1);
        let (b, mut rb) = member("f1", "b", 2);
        let (x, mut rx) = member("f2", "a", 3);
        assert!(h.join_now(a).unwrap().is_empty());
        assert_eq!(h.join_now(b).unwrap(), vec![DeviceInfo { device_id: "a".into(), user_id: "u-a".into() }]);
        assert!(text(&mut ra).contains(r#""type":"device-online","familyId":"f1","deviceId":"b""#));
        assert!(h.join_now(x).unwrap().is_empty(), "another family's devices are invisible");
        h.deliver_now("f1", "b", "hi".into(), Instant::now()).unwrap();
        assert_eq!(text(&mut rb), "hi");
        assert_eq!(h.deliver_now("f2", "b", "x".into(), Instant::now()), Err(DeliverError::Offline));
        assert!(rx.try_recv().is_err());
        h.leave_now("f1", "b", 2);
        assert!(text(&mut ra).contains(r#""type":"device-offline","familyId":"f1","deviceId":"b""#));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn replacement_closes_old_and_has_no_false_offline() {
        let h = hub(8, 100);
        let (a, mut ra) = member("f", "a", 1);
        let (b1, mut rb1) = member("f", "b", 2);
        let (b2, _rb2) = member("f", "b", 3);
        h.join_now(a).unwrap();
        h.join_now(b1).unwrap();
        let _ = text(&mut ra);
        let others = h.join_now(b2).unwrap();
        assert_eq!(others.len(), 1);
        assert!(matches!(rb1.try_recv(), Ok(Outbound::Close(CloseCode::Replaced))));
        // The replacement is announced as online again (the device must be re-offered)...
        assert!(text(&mut ra).contains("device-online"));
        // ...and the old connection's late leave changes nothing.
        h.leave_now("f", "b", 2);
        assert!(ra.try_recv().is_err());
        assert!(h.deliver_now("f", "b", "x".into(), Instant::now()).is_ok());
    }

    #[test]
    fn limits_and_full_queues() {
        let h = hub(2, 3);
        let (a, _ra) = member("f", "a", 1);
        let (b, _rb) = member("f", "b", 2);
        let (c, _rc) = member("f", "c", 3);
        h.join_now(a).unwrap();
        h.join_now(b).unwrap();
        assert_eq!(h.join_now(c).unwrap_err(), JoinError::FamilyFull);
        let (d, _rd) = member("g", "d", 4);
        h.join_now(d).unwrap();
        let (e, _re) = member("h", "e", 5);
        assert_eq!(h.join_now(e).unwrap_err(), JoinError::ServerFull);
        for _ in 0..4 {
            h.deliver_now("g", "d", "x".into(), Instant::now()).unwrap();
        }
        assert_eq!(h.deliver_now("g", "d", "x".into(), Instant::now()), Err(DeliverError::QueueFull));
    }

    #[test]
    fn a_kick_reaches_a_device_with_a_full_queue_and_its_family_sees_it_go() {
        let h = hub(8, 100);
        let (a, mut ra) = member("f", "a", 1);
        let (b, mut rb) = member("f", "b", 2);
        let (c, _rc) = member("f", "c", 3);
        h.join_now(a).unwrap();
        h.join_now(b).unwrap();
        h.join_now(c).unwrap();
        while ra.try_recv().is_ok() {}
        // b stopped reading: its queue is full of data.
        while h.deliver_now("f", "b", "x".into(), Instant::now()).is_ok() {}
        h.note_route_now("f", "b", "a", Outcome::Relay, 77);
        let view = futures_util::FutureExt::now_or_never(Hub::family(&h, "f")).unwrap();
        assert_eq!(view.devices.iter().map(|d| (d.device_id.as_str(), d.since, d.node.as_str())).collect::<Vec<_>>(), [("a", Some(1001), "n1"), ("b", Some(1002), "n1"), ("c", Some(1003), "n1")]);
        assert_eq!(view.routes, [PairRoute { devices: ["a".into(), "b".into()], route: "relay".into(), at: 77 }]);
        assert_eq!(h.kick_now("f", Some("b"), CloseCode::Revoked).len(), 1);
        let mut last = None;
        while let Ok(m) = rb.try_recv() {
            last = Some(m);
        }
        assert!(matches!(last, Some(Outbound::Close(CloseCode::Revoked))), "the close fits behind a full queue");
        assert!(text(&mut ra).contains(r#""type":"device-offline","familyId":"f","deviceId":"b""#));
        assert_eq!(h.deliver_now("f", "b", "x".into(), Instant::now()), Err(DeliverError::Offline));
        // A late leave of the kicked connection changes nothing.
        assert!(h.leave_now("f", "b", 2).is_none());
        assert_eq!(h.kick_now("f", None, CloseCode::Revoked).len(), 2, "a whole family");
        assert_eq!(h.local_devices("f"), 0);
        assert!(h.routes("f").is_empty(), "routes go with the family");
        assert_eq!(h.kick_now("f", None, CloseCode::Revoked).len(), 0);
    }

    #[test]
    fn outbound_queues_are_bounded_in_bytes_too() {
        let (tx, mut rx) = outbound(256, 100_000);
        let big: Utf8Bytes = "x".repeat(60_000).into();
        assert!(tx.try_send(Outbound::Text { text: big.clone(), relayed_at: None }).is_ok());
        // A second 60 KB frame would pass the message bound (2 of 256), not the byte bound.
        assert!(matches!(tx.try_send(Outbound::Text { text: big.clone(), relayed_at: None }), Err(mpsc::error::TrySendError::Full(_))));
        assert!(tx.try_send(Outbound::Text { text: "small".into(), relayed_at: None }).is_ok());
        assert!(tx.try_send(Outbound::Close(CloseCode::Replaced)).is_ok(), "a close always fits");
        assert!(rx.try_recv().is_ok());
        assert!(tx.try_send(Outbound::Text { text: big, relayed_at: None }).is_ok(), "room again once read");
    }
}
