//! The deny list: devices and families revoked at a unix second. A token is covered when it
//! was issued (`iat`) at or before the revocation of its device or family; a TURN credential
//! when it could have been minted then. An entry is kept for the longest token lifetime
//! (plus leeway) and then dropped: every token it covers has expired by then.
//!
//! No IO and no clock: the admin API and the cluster feed it, and persist it
//! ([`DenyList::to_json`]) in the data directory or in Redis.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Most entries held; past it the oldest revocation is dropped early (and counted by the
/// caller). 100,000 entries are about 20 MB.
pub const MAX_ENTRIES: usize = 100_000;

/// One revocation, as persisted and as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Family id.
    pub family_id: String,
    /// Device id; none for a whole family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Tokens issued at or before this unix second are refused.
    pub revoked_at: u64,
}

/// Revoked devices and families.
#[derive(Debug, Default)]
pub struct DenyList {
    devices: HashMap<(String, String), u64>,
    families: HashMap<String, u64>,
    keep_secs: u64,
}

impl DenyList {
    /// An empty list whose entries live `keep_secs` (the longest token lifetime + leeway).
    pub fn new(keep_secs: u64) -> Self {
        DenyList { keep_secs, ..DenyList::default() }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.devices.len() + self.families.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Revokes every token of `device` issued at or before `at`. Returns false when an
    /// entry at least as recent was already there (nothing changed).
    pub fn revoke_device(&mut self, family: &str, device: &str, at: u64) -> bool {
        self.make_room();
        let slot = self.devices.entry((family.to_owned(), device.to_owned())).or_insert(0);
        let changed = at > *slot;
        *slot = (*slot).max(at);
        changed
    }

    /// Revokes every token of `family` issued at or before `at`.
    pub fn revoke_family(&mut self, family: &str, at: u64) -> bool {
        self.make_room();
        let slot = self.families.entry(family.to_owned()).or_insert(0);
        let changed = at > *slot;
        *slot = (*slot).max(at);
        changed
    }

    /// Applies an entry (from a peer node or the persisted list).
    pub fn apply(&mut self, e: &Entry) -> bool {
        match &e.device_id {
            Some(d) => self.revoke_device(&e.family_id, d, e.revoked_at),
            None => self.revoke_family(&e.family_id, e.revoked_at),
        }
    }

    /// The latest revocation covering `device` of `family`, if any.
    pub fn revoked_at(&self, family: &str, device: &str) -> Option<u64> {
        let d = self.devices.get(&(family.to_owned(), device.to_owned())).copied();
        let f = self.families.get(family).copied();
        d.max(f)
    }

    /// Whether a token of `device` issued at `iat` is revoked.
    pub fn covers(&self, family: &str, device: &str, iat: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        self.revoked_at(family, device).is_some_and(|at| iat <= at)
    }

    /// Whether a TURN credential of `device` expiring at `expiry` may have been minted at or
    /// before a revocation: credentials carry no issue time, so any whose expiry is within
    /// one credential lifetime of the revocation is refused (a credential minted after it,
    /// cut short by its token's expiry, may be refused too; the device then asks again).
    pub fn covers_credential(&self, family: &str, device: &str, expiry: u64, credential_ttl_secs: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        self.revoked_at(family, device).is_some_and(|at| expiry <= at.saturating_add(credential_ttl_secs))
    }

    /// Drops entries older than the longest token lifetime; returns how many.
    pub fn expire(&mut self, now_unix: u64) -> usize {
        let before = self.len();
        let keep = self.keep_secs;
        self.devices.retain(|_, at| at.saturating_add(keep) > now_unix);
        self.families.retain(|_, at| at.saturating_add(keep) > now_unix);
        before - self.len()
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = self
            .devices
            .iter()
            .map(|((f, d), at)| Entry { family_id: f.clone(), device_id: Some(d.clone()), revoked_at: *at })
            .chain(self.families.iter().map(|(f, at)| Entry { family_id: f.clone(), device_id: None, revoked_at: *at }))
            .collect();
        all.sort_by(|a, b| (a.revoked_at, &a.family_id, &a.device_id).cmp(&(b.revoked_at, &b.family_id, &b.device_id)));
        all
    }

    /// The list as JSON, for the data directory.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Persisted { version: 1, entries: self.entries() }).expect("plain data serializes")
    }

    /// Loads entries saved by [`DenyList::to_json`]; returns how many were applied.
    pub fn load_json(&mut self, text: &str) -> Result<usize, serde_json::Error> {
        let p: Persisted = serde_json::from_str(text)?;
        Ok(p.entries.iter().filter(|e| self.apply(e)).count())
    }

    fn make_room(&mut self) {
        while self.len() >= MAX_ENTRIES {
            let oldest_device = self.devices.iter().min_by_key(|(_, at)| **at).map(|(k, at)| (k.clone(), *at));
            let oldest_family = self.families.iter().min_by_key(|(_, at)| **at).map(|(k, at)| (k.clone(), *at));
            match (oldest_device, oldest_family) {
                (Some((d, a)), Some((_, b))) if a <= b => drop(self.devices.remove(&d)),
                (_, Some((f, _))) => drop(self.families.remove(&f)),
                (Some((d, _)), None) => drop(self.devices.remove(&d)),
                (None, None) => return,
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u32,
    entries: Vec<Entry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_tokens_issued_up_to_the_revocation_and_expires_after_the_longest_lifetime() {
        let mut d = DenyList::new(1000);
        assert!(!d.covers("f", "a", 0));
        assert!(d.revoke_device("f", "a", 500));
        assert!(!d.revoke_device("f", "a", 400), "an older revocation changes nothing");
        assert!(d.covers("f", "a", 500) && d.covers("f", "a", 0));
        assert!(!d.covers("f", "a", 501) && !d.covers("f", "b", 0) && !d.covers("g", "a", 0));
        d.revoke_family("g", 700);
        assert!(d.covers("g", "anything", 700) && !d.covers("g", "anything", 701));
        assert!(d.covers_credential("f", "a", 500 + 3600, 3600) && !d.covers_credential("f", "a", 501 + 3600, 3600));
        assert_eq!(d.expire(1499), 0);
        assert_eq!(d.expire(1500), 1);
        assert_eq!(d.expire(1700), 1);
        assert!(d.is_empty());
    }

    #[test]
    fn persists_and_reloads() {
        let mut d = DenyList::new(1000);
        d.revoke_device("f", "a", 5);
        d.revoke_family("g", 6);
        let mut back = DenyList::new(1000);
        assert_eq!(back.load_json(&d.to_json()).unwrap(), 2);
        assert_eq!(back.entries(), d.entries());
        assert!(back.load_json("{").is_err());
    }

    #[test]
    fn is_bounded() {
        let mut d = DenyList::new(u64::MAX);
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            d.revoke_device("f", &i.to_string(), i + 1);
        }
        assert_eq!(d.len(), MAX_ENTRIES);
        // The oldest went first.
        assert!(d.revoked_at("f", "0").is_none() && d.revoked_at("f", &(MAX_ENTRIES as u64 + 9).to_string()).is_some());
    }
}
