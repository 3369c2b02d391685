//! What a cluster keeps in Redis, and in what shape: key and channel names, the device
//! record, inbox frames, presence events and the Lua scripts that change a family atomically.
//! Pure functions over strings; the driver in `mod.rs` sends them.

use std::collections::HashMap;
use std::sync::Arc;

use fred::prelude::Value;
use serde::{Deserialize, Serialize};

use crate::signal::hub::SessionId;
use crate::signal::negotiation::Report;

/// Registers a device unless the family is full: `{0}`, or `{1, previous value or '', HGETALL}`.
/// KEYS[2] (`since_key`) records when it registered (ARGV[4]), for the admin API.
pub(super) const JOIN: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {0} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if KEYS[2] then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
return {1, old or '', redis.call('HGETALL', KEYS[1])}
";

/// Removes a device if it is still this connection: 1 when removed.
pub(super) const LEAVE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if KEYS[2] then redis.call('HDEL', KEYS[2], ARGV[1]) end
  return 1
end
return 0
";

/// Removes every device of node ARGV[1] (values starting `node|`): their names and values.
pub(super) const SWEEP: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local gone = {}
for i = 1, #all, 2 do
  if string.sub(all[i + 1], 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
    redis.call('HDEL', KEYS[1], all[i])
    if KEYS[2] then redis.call('HDEL', KEYS[2], all[i]) end
    table.insert(gone, all[i])
    table.insert(gone, all[i + 1])
  end
end
return gone
";

/// Re-registers a device after Redis came back, unless another node holds it now: 1 when set.
pub(super) const REANNOUNCE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or string.sub(v, 1, #ARGV[3] + 1) == ARGV[3] .. '|' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
";

/// Events on a family's channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub(super) enum Event {
    /// `d` (user `u`) joined on node `n` as session `s`.
    On { d: String, u: String, n: String, s: SessionId },
    /// `d`'s session `s` on node `n` left (or the node is gone).
    Off { d: String, n: String, s: SessionId },
    /// `from`'s `p2p-status` about `to`, for the node that relayed their offer.
    Rep { to: String, from: String, n: String, r: Report },
}

pub(super) fn devices_key(family: &str) -> String {
    format!("kl:{{{family}}}:dev")
}

/// When each online device of the family registered: device → unix seconds.
pub(super) fn since_key(family: &str) -> String {
    format!("kl:{{{family}}}:since")
}

/// The last route of each pair of the family: `a b` → `route unix`; expires a day after the
/// last report.
pub(super) fn routes_key(family: &str) -> String {
    format!("kl:{{{family}}}:route")
}

/// How long a family's routes are kept after the last report.
pub(super) const ROUTES_TTL_SECS: i64 = 86_400;

/// Revocations every node applies: a sorted set of `family` or `family device`, scored by
/// the unix second of the revocation. One key (one slot on a Redis Cluster).
pub(super) const REVOKED: &str = "kl:revoked";

/// Admin commands (revocations, disconnects) for every node, as JSON.
pub(super) const CONTROL: &str = "kl:{control}:cmd";

/// Records a revocation (ARGV[1] score, ARGV[2] member; a later one wins), drops those older
/// than ARGV[3], and keeps at most ARGV[4] entries (the newest).
pub(super) const REVOKE: &str = r"
redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -1 - tonumber(ARGV[4]))
return redis.call('ZCARD', KEYS[1])
";

/// Every revocation newer than ARGV[1]: member, score, member, score...
pub(super) const REVOCATIONS: &str = r"
return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES')
";

/// The sorted-set member of a revocation.
pub(super) fn revoked_member(e: &crate::auth::revocation::Entry) -> String {
    match &e.device_id {
        Some(d) => format!("{} {d}", e.family_id),
        None => e.family_id.clone(),
    }
}

/// The entry of a sorted-set member and score.
pub(super) fn parse_revoked(member: &str, score: &str) -> Option<crate::auth::revocation::Entry> {
    let revoked_at = score.parse::<f64>().ok().filter(|s| *s >= 0.0)? as u64;
    let (family_id, device_id) = match member.split_once(' ') {
        Some((f, d)) => (f.to_string(), Some(d.to_string())),
        None => (member.to_string(), None),
    };
    Some(crate::auth::revocation::Entry { family_id, device_id, revoked_at })
}

pub(super) fn channel(family: &str) -> String {
    format!("kl:{{{family}}}:ev")
}

pub(super) fn family_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("kl:{")?.strip_suffix("}:ev")
}

/// A node's inbox: messages for devices on that node, as `family to\ntext`.
pub(super) fn inbox(node: &str) -> String {
    format!("kl:node:{{{node}}}:in")
}

/// An inbox frame: the relayed text as it is, after a one-line header (ids have no spaces or
/// newlines), so it is neither escaped nor parsed on the way.
pub(super) fn inbox_frame(family: &str, to: &str, text: &str) -> String {
    let mut f = String::with_capacity(family.len() + to.len() + 2 + text.len());
    f.push_str(family);
    f.push(' ');
    f.push_str(to);
    f.push('\n');
    f.push_str(text);
    f
}

pub(super) fn parse_inbox_frame(f: &str) -> Option<(&str, &str, &str)> {
    let (header, text) = f.split_once('\n')?;
    let (family, to) = header.split_once(' ')?;
    Some((family, to, text))
}

pub(super) fn alive_key(node: &str) -> String {
    format!("kl:node:{{{node}}}:alive")
}

pub(super) fn families_key(node: &str) -> String {
    format!("kl:node:{{{node}}}:fam")
}

pub(super) const NODES: &str = "kl:nodes";

/// A device on another node.
#[derive(Debug, Clone)]
pub(super) struct Remote {
    pub(super) node: Arc<str>,
    pub(super) session: SessionId,
    pub(super) user: Arc<str>,
}

/// `node|session|user`.
pub(super) fn record(node: &str, session: SessionId, user: &str) -> String {
    format!("{node}|{session}|{user}")
}

pub(super) fn parse_record(v: &str) -> Option<Remote> {
    let mut parts = v.splitn(3, '|');
    let (node, session, user) = (parts.next()?, parts.next()?.parse().ok()?, parts.next()?);
    Some(Remote { node: node.into(), session, user: user.into() })
}

/// Family → its devices on other nodes.
pub(super) type Rosters = HashMap<Arc<str>, HashMap<Arc<str>, Remote>>;

pub(super) enum JoinAnswer {
    Full,
    Joined(Vec<(String, String)>),
}

/// The JOIN script's answer.
pub(super) fn parse_join(v: Value) -> Option<JoinAnswer> {
    let Value::Array(items) = v else { return None };
    match items.first()?.as_i64()? {
        0 => Some(JoinAnswer::Full),
        _ => {
            let Value::Array(flat) = items.get(2)?.clone() else { return None };
            let flat: Vec<String> = flat.into_iter().filter_map(|v| v.as_string()).collect();
            Some(JoinAnswer::Joined(flat.chunks(2).filter(|p| p.len() == 2).map(|p| (p[0].clone(), p[1].clone())).collect()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_frames_carry_the_text_as_it_is() {
        let text = "{\"type\":\"offer\",\"sdp\":{\"sdp\":\"v=0\\r\\n a b\\n\"}}\nsecond line";
        let f = inbox_frame("fam-1", "dev-b", text);
        assert_eq!(parse_inbox_frame(&f), Some(("fam-1", "dev-b", text)));
        assert_eq!(parse_inbox_frame("no header"), None);
        assert_eq!(inbox("node-a"), "kl:node:{node-a}:in");
    }

    #[test]
    fn revocations_round_trip() {
        use crate::auth::revocation::Entry;
        for e in [Entry { family_id: "f".into(), device_id: Some("d".into()), revoked_at: 1_765_000_000 }, Entry { family_id: "f".into(), device_id: None, revoked_at: 7 }] {
            assert_eq!(parse_revoked(&revoked_member(&e), &e.revoked_at.to_string()), Some(e));
        }
        assert_eq!(parse_revoked("f", "x"), None);
        assert_eq!(family_of(CONTROL), None, "the control channel is not a family's");
    }

    #[test]
    fn records_and_channels_round_trip() {
        let r = parse_record(&record("pod-1", 42, "u|with|bars")).unwrap();
        assert_eq!((&*r.node, r.session, &*r.user), ("pod-1", 42, "u|with|bars"));
        assert_eq!(family_of(&channel("fam-1")), Some("fam-1"));
        assert_eq!(devices_key("f"), "kl:{f}:dev");
        let e: Event = serde_json::from_str(&serde_json::to_string(&Event::Off { d: "a".into(), n: "n".into(), s: 7 }).unwrap()).unwrap();
        assert!(matches!(e, Event::Off { s: 7, .. }));
    }
}
