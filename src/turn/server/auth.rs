//! Authentication: nonces (stateless, HMAC'd with a per-process key and bound to the client
//! IP), the long-term credential check of TURN REST usernames, the rate limit on requests
//! without valid credentials, and the wall clock credentials are judged by.

use super::*;

impl<R: Clone> TurnServer<R> {
    pub(super) fn unix(&self, now: Instant) -> u64 {
        self.epoch_unix + now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Re-reads the wall clock the driver sampled at `now`. Credentials are minted from the
    /// wall clock, so the core follows it (an NTP step included) instead of adding monotonic
    /// time to one reading taken at start. Nonces stay on the monotonic clock: they are ours.
    pub(super) fn sync_wall_clock(&mut self, now: Instant, unix: u64) {
        let mono_secs = now.saturating_duration_since(self.epoch).as_secs();
        self.epoch_unix = unix.saturating_sub(mono_secs);
    }

    pub(super) fn nonce(&self, now: Instant, client: IpAddr) -> String {
        let expiry = (now.saturating_duration_since(self.epoch) + self.settings.nonce_lifetime).as_secs();
        format!("{expiry:010x}{}", self.nonce_mac(expiry, client))
    }

    pub(super) fn nonce_mac(&self, expiry: u64, client: IpAddr) -> String {
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&self.nonce_key).expect("any key length");
        mac.update(&expiry.to_be_bytes());
        match client {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.finalize().into_bytes()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `Ok(())` for a fresh nonce of ours, `Err(true)` for a stale one, `Err(false)` for junk.
    pub(super) fn check_nonce(&self, now: Instant, client: IpAddr, nonce: &[u8]) -> Result<(), bool> {
        // Bytes, not text: an attacker chooses the nonce, and slicing decoded text at a byte
        // index panics when a multi-byte character straddles it.
        let (Some(expiry), Some(mac)) = (nonce.get(..10), nonce.get(10..)) else { return Err(false) };
        if nonce.len() != 26 || !nonce.iter().all(u8::is_ascii_hexdigit) {
            return Err(false);
        }
        let expiry = std::str::from_utf8(expiry).ok().and_then(|e| u64::from_str_radix(e, 16).ok()).ok_or(false)?;
        if self.nonce_mac(expiry, client).as_bytes() != mac {
            return Err(false);
        }
        if expiry <= now.saturating_duration_since(self.epoch).as_secs() {
            return Err(true);
        }
        Ok(())
    }

    pub(super) fn challenge(&self, now: Instant, tuple: FiveTuple, m: u16, tid: [u8; 12], code: u16, reason: &str) -> Vec<u8> {
        let mut b = Builder::new(m, Class::Error, tid);
        b.error(code, reason).attr(attr::REALM, self.settings.realm.as_bytes());
        b.attr(attr::NONCE, self.nonce(now, tuple.client.ip()).as_bytes());
        self.finish(b, None)
    }

    pub(super) fn auth_failure(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, reason: &'static str) -> Vec<u8> {
        self.stats.auth_failures.inc(reason);
        if let Some(suppressed) = self.refusal_log.allow(now) {
            tracing::info!(reason, transport = tuple.transport.as_str(), suppressed, "TURN request refused (one line a second; kinlink_turn_auth_failures_total counts all)");
        }
        self.challenge(now, tuple, msg.method, msg.tid, 401, "Unauthorized")
    }

    /// Long-term credential check with TURN REST usernames (RFC 8489 §9.2).
    pub(super) fn authenticate(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>) -> Result<Authed, Vec<u8>> {
        let sha256 = msg.get(attr::MESSAGE_INTEGRITY_SHA256).is_some();
        if msg.get(attr::MESSAGE_INTEGRITY).is_none() && !sha256 {
            // The normal first leg: no credentials yet.
            return Err(self.challenge(now, tuple, msg.method, msg.tid, 401, "Unauthorized"));
        }
        let (Some(username), Some(realm), Some(nonce)) = (msg.get(attr::USERNAME), msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            self.stats.auth_failures.inc("malformed");
            let mut b = Builder::new(msg.method, Class::Error, msg.tid);
            // USERHASH needs the server to find the user by hash; a TURN REST username is not
            // stored anywhere, so the nonce never offers username anonymity (RFC 8489 §9.2).
            if msg.get(attr::USERHASH).is_some() {
                b.error(400, "Bad Request: USERHASH is not offered (TURN REST credentials); send USERNAME");
            } else {
                b.error(400, "Bad Request: USERNAME, REALM and NONCE are required");
            }
            return Err(self.finish(b, None));
        };
        match self.check_nonce(now, tuple.client.ip(), nonce) {
            Ok(()) => {}
            Err(stale) => {
                self.stats.auth_failures.inc(if stale { "stale_nonce" } else { "bad_nonce" });
                return Err(self.challenge(now, tuple, msg.method, msg.tid, 438, "Stale Nonce"));
            }
        }
        if realm != self.settings.realm.as_bytes() {
            return Err(self.auth_failure(now, tuple, msg, "wrong_realm"));
        }
        let Ok(username) = std::str::from_utf8(username) else { return Err(self.auth_failure(now, tuple, msg, "malformed")) };
        let mut parts = username.splitn(3, ':');
        let (Some(expiry), Some(family), Some(device)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(self.auth_failure(now, tuple, msg, "malformed"));
        };
        let Ok(expiry) = expiry.parse::<u64>() else { return Err(self.auth_failure(now, tuple, msg, "malformed")) };
        if !valid_id(family) || !valid_id(device) {
            return Err(self.auth_failure(now, tuple, msg, "malformed"));
        }
        // Any accepted secret (a rotation keeps the old one for a while); the first usually.
        let key = self.settings.secrets.iter().find_map(|secret| {
            let key = long_term_key(username, &self.settings.realm, &turn_password(secret, username), sha256);
            let ok = if sha256 { msg.verify_integrity_sha256(&key) } else { msg.verify_integrity(&key) };
            ok.then_some(key)
        });
        let Some(key) = key else {
            return Err(self.auth_failure(now, tuple, msg, "bad_integrity"));
        };
        // Checked after the MAC so a forged username learns nothing from the answer.
        if expiry <= self.unix(now) {
            return Err(self.auth_failure(now, tuple, msg, "expired"));
        }
        if self.revoked.covers_credential(family, device, expiry, self.settings.credential_ttl_secs) {
            return Err(self.auth_failure(now, tuple, msg, "revoked"));
        }
        Ok(Authed { username: username.to_string(), family: family.into(), device: device.into(), key, sha256 })
    }

    pub(super) fn finish(&self, mut b: Builder, auth: Option<(&[u8], bool)>) -> Vec<u8> {
        b.attr(attr::SOFTWARE, SOFTWARE.as_bytes());
        if let Some((key, sha256)) = auth {
            if sha256 {
                b.integrity_sha256(key);
            } else {
                b.integrity(key);
            }
        }
        b.finish_with_fingerprint()
    }

    pub(super) fn error_reply(&self, msg: &Message<'_>, a: &Authed, code: u16, reason: &str) -> Vec<u8> {
        let mut b = Builder::new(msg.method, Class::Error, msg.tid);
        b.error(code, reason);
        self.finish(b, Some((&a.key, a.sha256)))
    }

    /// Takes a token from the source's unauthenticated-request bucket (IPv6 by /64); no
    /// limit when `unauthenticated_per_ip_per_sec` is 0.
    pub(super) fn admit_unauthenticated(&mut self, now: Instant, ip: IpAddr) -> bool {
        match &mut self.unauthenticated {
            Some(buckets) => buckets.take(crate::connlimit::source_key(ip), now),
            None => true,
        }
    }
}

/// The long-term credential key (RFC 8489 §9.2.2): MD5, or SHA-256 for
/// MESSAGE-INTEGRITY-SHA256, of `username:realm:password`.
pub fn long_term_key(username: &str, realm: &str, password: &str, sha256: bool) -> Vec<u8> {
    let input = format!("{username}:{realm}:{password}");
    if sha256 {
        sha2::Sha256::digest(input.as_bytes()).to_vec()
    } else {
        md5::Md5::digest(input.as_bytes()).to_vec()
    }
}
