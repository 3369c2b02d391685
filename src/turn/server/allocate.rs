//! Allocations: Allocate (with EVEN-PORT reservations) and Refresh, lifetimes, and the
//! quotas every relay port counts against (device, family, self-check families, server).

use super::*;

impl<R: Clone> TurnServer<R> {
    pub(super) fn authenticated_request(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>, binder: &mut dyn Binder<R>) -> ClientAction<R> {
        // A retransmitted Allocate gets the same answer (RFC 8656 §7.2).
        if msg.method == method::ALLOCATE {
            if let Some(a) = self.allocations.get(&tuple) {
                if a.allocate_tid == msg.tid {
                    return ClientAction::Reply(a.allocate_reply.clone());
                }
            }
        }
        let a = match self.authenticate(now, tuple, &msg) {
            Ok(a) => a,
            // Refused credentials count against the unauthenticated rate too (a forged-MAC
            // flood costs an HMAC each).
            // (A request without any was counted on arrival.)
            Err(_) if has_integrity(&msg) && !self.admit_unauthenticated(now, tuple.client.ip()) => return self.drop_packet("rate_limited"),
            Err(reply) => return ClientAction::Reply(reply),
        };
        ClientAction::Reply(self.authenticated_dispatch(now, tuple, msg, a, binder))
    }

    pub(super) fn authenticated_dispatch(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>, a: Authed, binder: &mut dyn Binder<R>) -> Vec<u8> {
        if let Some(existing) = self.allocations.get(&tuple) {
            if existing.username != a.username && existing.expires > now {
                self.metrics.turn_auth_failures.with_label_values(&["wrong_credentials"]).inc();
                return self.error_reply(&msg, &a, 441, "Wrong Credentials");
            }
        }
        match msg.method {
            method::ALLOCATE => self.allocate(now, tuple, &msg, a, binder),
            method::REFRESH => self.refresh(now, tuple, &msg, &a),
            method::CREATE_PERMISSION => self.create_permission(now, tuple, &msg, &a),
            _ => self.channel_bind(now, tuple, &msg, &a),
        }
    }

    pub(super) fn lifetime(&self, msg: &Message<'_>) -> Duration {
        let requested = msg.get(attr::LIFETIME).and_then(|v| v.try_into().ok()).map(u32::from_be_bytes);
        match requested {
            None => DEFAULT_LIFETIME,
            Some(secs) => Duration::from_secs(secs as u64).clamp(DEFAULT_LIFETIME, self.settings.max_lifetime.max(DEFAULT_LIFETIME)),
        }
    }

    pub(super) fn quota_reject(&self, now: Instant, msg: &Message<'_>, a: &Authed, scope: &'static str) -> Vec<u8> {
        self.metrics.turn_quota_rejections.with_label_values(&[scope]).inc();
        if let Some(suppressed) = self.refusal_log.allow(now) {
            tracing::info!(scope, suppressed, "allocation refused: quota reached (one line a second; kinlink_turn_quota_rejections_total counts all)");
        }
        self.error_reply(msg, a, 486, "Allocation Quota Reached")
    }

    pub(super) fn allocate(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: Authed, binder: &mut dyn Binder<R>) -> Vec<u8> {
        if let Some(existing) = self.allocations.get(&tuple) {
            if existing.expires > now {
                return self.error_reply(msg, &a, 437, "Allocation Mismatch");
            }
            self.remove(now, &tuple, "expired");
        }
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return self.error_reply(msg, &a, 400, "Bad Request: REQUESTED-TRANSPORT missing"),
            Some(v) if v.first() != Some(&17) => return self.error_reply(msg, &a, 442, "Unsupported Transport Protocol"),
            Some(_) => {}
        }
        // EVEN-PORT: `Some(reserve_next)`.
        let even = msg.get(attr::EVEN_PORT).map(|v| v.first().is_some_and(|b| b & 0x80 != 0));
        let token = match msg.get(attr::RESERVATION_TOKEN) {
            Some(_) if even.is_some() => return self.error_reply(msg, &a, 400, "Bad Request: EVEN-PORT with RESERVATION-TOKEN"),
            Some(v) => match <[u8; 8]>::try_from(v) {
                Ok(t) => Some(t),
                Err(_) => return self.error_reply(msg, &a, 400, "Bad Request: RESERVATION-TOKEN"),
            },
            None => None,
        };
        let ipv6 = match msg.get(attr::REQUESTED_ADDRESS_FAMILY).map(|v| v.first().copied()) {
            // RFC 8656 §7.2: without the attribute the relay is IPv4, whatever the client leg
            // (browsers on IPv6 still relay to IPv4 peers); unless the server advertises only IPv6.
            None => self.settings.public_ip.is_some_and(|ip| ip.is_ipv6()),
            Some(Some(0x01)) => false,
            Some(Some(0x02)) => true,
            Some(_) => return self.error_reply(msg, &a, 440, "Address Family not Supported"),
        };
        if self.draining {
            return self.error_reply(msg, &a, 508, "Insufficient Capacity: server draining");
        }
        // A claimed reservation stops counting before the quotas are checked: the allocation
        // that replaces it counts instead.
        let claimed = match token {
            Some(t) => match self.reservations.remove(&t) {
                Some(r) => {
                    self.release(&r.family, &r.device);
                    self.forget_port(r.local.port());
                    if r.expires <= now {
                        return self.error_reply(msg, &a, 508, "Insufficient Capacity: no such reservation");
                    }
                    Some((r.relay, r.local))
                }
                None => return self.error_reply(msg, &a, 508, "Insufficient Capacity: no such reservation"),
            },
            None => None,
        };
        // EVEN-PORT with R holds two ports: both count.
        let needed = if even == Some(true) { 2 } else { 1 };
        if let Err(scope) = self.quota_room(&a.family, &a.device, needed) {
            return self.quota_reject(now, msg, &a, scope);
        }
        let mut reserved_token = None;
        let bound = match (claimed, even) {
            (Some(bound), _) => Ok(bound),
            (None, Some(true)) => match bind_pair(binder, ipv6) {
                Ok((even, odd)) => {
                    let mut t = [0u8; 8];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut t);
                    self.charge(&a.family, &a.device, odd.1.port());
                    let reservation =
                        Reservation { relay: odd.0, local: odd.1, expires: now + RESERVATION_LIFETIME, family: a.family.clone(), device: a.device.clone() };
                    self.reservations.insert(t, reservation);
                    reserved_token = Some(t);
                    Ok(even)
                }
                Err(e) => Err(e),
            },
            (None, Some(false)) => binder.bind(ipv6, PortChoice::Even),
            (None, None) => binder.bind(ipv6, PortChoice::Any),
        };
        let (relay, local) = match bound {
            Ok(r) => r,
            Err(e) => {
                self.metrics.turn_quota_rejections.with_label_values(&["ports"]).inc();
                if let Some(suppressed) = self.refusal_log.allow(now) {
                    tracing::warn!(error = %e, suppressed, "allocation refused: no relay port");
                }
                return self.error_reply(msg, &a, 508, "Insufficient Capacity");
            }
        };
        binder.start(&relay, tuple);
        let relayed = SocketAddr::new(self.settings.public_ip.filter(|ip| ip.is_ipv6() == ipv6).unwrap_or(local.ip()), local.port());
        let lifetime = self.lifetime(msg);
        let mut b = Builder::new(method::ALLOCATE, Class::Success, msg.tid);
        b.xor_addr(attr::XOR_RELAYED_ADDRESS, relayed).u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
        if let Some(t) = reserved_token {
            b.attr(attr::RESERVATION_TOKEN, &t);
        }
        let reply = self.finish(b, Some((&a.key, a.sha256)));
        self.charge(&a.family, &a.device, local.port());
        self.allocations.insert(
            tuple,
            Allocation {
                relay,
                relayed,
                family: a.family,
                device: a.device,
                username: a.username,
                created: now,
                expires: now + lifetime,
                permissions: Vec::new(),
                channels: Vec::new(),
                allocate_tid: msg.tid,
                allocate_reply: reply.clone(),
                reservation: reserved_token,
            },
        );
        self.metrics.turn_allocations.set(self.allocations.len() as i64);
        self.metrics.turn_allocations_created.with_label_values(&[tuple.transport.as_str()]).inc();
        tracing::debug!(transport = tuple.transport.as_str(), lifetime_secs = lifetime.as_secs(), "allocation created");
        reply
    }

    /// Whether `needed` more relay ports fit every quota; `Err(scope)` names the one that is full.
    pub(super) fn quota_room(&self, family: &Arc<str>, device: &Arc<str>, needed: usize) -> Result<(), &'static str> {
        let s = &self.settings;
        if self.allocations.len() + self.reservations.len() + needed > s.total_allocations {
            return Err("server");
        }
        if is_check_family(family) && self.check_usage + needed > s.check_allocations {
            return Err("check");
        }
        if self.families.get(family).map_or(0, |u| u.allocations) + needed > s.family_allocations {
            return Err("family");
        }
        if self.devices.get(&(family.clone(), device.clone())).copied().unwrap_or(0) + needed > s.device_allocations {
            return Err("device");
        }
        Ok(())
    }

    /// Counts one relay port (an allocation or a reservation) against its owner's quotas.
    pub(super) fn charge(&mut self, family: &Arc<str>, device: &Arc<str>, port: u16) {
        let rate = self.settings.family_bytes_per_sec as f64;
        let now = self.epoch; // the bucket is refilled from `refilled` on first use
        let usage = self.families.entry(family.clone()).or_insert(FamilyUsage { allocations: 0, tokens: rate, refilled: now });
        usage.allocations += 1;
        *self.devices.entry((family.clone(), device.clone())).or_insert(0) += 1;
        if is_check_family(family) {
            self.check_usage += 1;
        }
        *self.relay_ports.entry(port).or_insert(0) += 1;
    }

    /// Gives back what [`Self::charge`] took (the port is forgotten by [`Self::forget_port`]).
    pub(super) fn release(&mut self, family: &Arc<str>, device: &Arc<str>) {
        if let Some(u) = self.families.get_mut(family) {
            u.allocations = u.allocations.saturating_sub(1);
            if u.allocations == 0 {
                self.families.remove(family);
            }
        }
        let key = (family.clone(), device.clone());
        if let Some(n) = self.devices.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.devices.remove(&key);
            }
        }
        if is_check_family(family) {
            self.check_usage = self.check_usage.saturating_sub(1);
        }
    }

    pub(super) fn forget_port(&mut self, port: u16) {
        if let Some(n) = self.relay_ports.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.relay_ports.remove(&port);
            }
        }
    }

    pub(super) fn refresh(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let requested_zero = msg.get(attr::LIFETIME).is_some_and(|v| v == [0, 0, 0, 0]);
        let lifetime = self.lifetime(msg);
        let Some(alloc) = self.allocations.get_mut(&tuple).filter(|al| al.expires > now) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let granted = if requested_zero {
            0
        } else {
            alloc.expires = now + lifetime;
            lifetime.as_secs() as u32
        };
        if requested_zero {
            self.remove(now, &tuple, "deleted");
        }
        let mut b = Builder::new(method::REFRESH, Class::Success, msg.tid);
        b.u32_attr(attr::LIFETIME, granted);
        self.finish(b, Some((&a.key, a.sha256)))
    }
}

/// An even port and the odd one above it, for EVEN-PORT with the R bit.
type Bound<R> = (R, SocketAddr);

pub(super) fn bind_pair<R>(binder: &mut dyn Binder<R>, ipv6: bool) -> Result<(Bound<R>, Bound<R>), BindError> {
    let mut last = BindError("no free port pair".into());
    for _ in 0..16 {
        let even = binder.bind(ipv6, PortChoice::Even)?;
        match binder.bind(ipv6, PortChoice::Exact(even.1.port().wrapping_add(1))) {
            Ok(odd) => return Ok((even, odd)),
            Err(e) => last = e,
        }
    }
    Err(last)
}
