//! Allocations: Allocate (with EVEN-PORT reservations) and Refresh, lifetimes, and the
//! quotas every relay port counts against (device, family, self-check families, server).

use super::*;

impl<R: Clone> TurnServer<R> {
    pub(super) fn authenticated_request(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>) -> ClientAction<R> {
        if msg.method == method::ALLOCATE {
            // A retransmitted Allocate gets the same answer (RFC 8656 §7.2); one whose relay
            // is still being bound gets none (the client retransmits again).
            if let Some(a) = self.allocations.get(&tuple) {
                if a.allocate_tid == msg.tid {
                    return ClientAction::Reply(a.allocate_reply.clone());
                }
            }
            if self.pending.get(&tuple).is_some_and(|p| p.tid == msg.tid) {
                return ClientAction::None;
            }
        }
        let a = match self.authenticate(now, tuple, &msg) {
            Ok(a) => a,
            // Refused credentials count against the unauthenticated rate too (a forged-MAC
            // flood costs an HMAC each).
            // (A request without any was counted on arrival.)
            Err(_) if has_integrity(&msg) && !self.admit_unauthenticated(now, tuple.client.ip()) => return self.drop_packet(DropReason::RateLimited),
            Err(reply) => return ClientAction::Reply(reply),
        };
        if let Some(existing) = self.allocations.get(&tuple) {
            if existing.username != a.username && existing.live(now) {
                self.stats.auth_failures.inc("wrong_credentials");
                return ClientAction::Reply(self.error_reply(&msg, &a, 441, "Wrong Credentials"));
            }
        }
        let reply = match msg.method {
            method::ALLOCATE => return self.allocate(now, tuple, &msg, a),
            method::REFRESH => self.refresh(now, tuple, &msg, &a),
            method::CREATE_PERMISSION => self.create_permission(now, tuple, &msg, &a),
            _ => self.channel_bind(now, tuple, &msg, &a),
        };
        ClientAction::Reply(reply)
    }

    pub(super) fn lifetime(&self, msg: &Message<'_>) -> Duration {
        let requested = msg.get(attr::LIFETIME).and_then(|v| v.try_into().ok()).map(u32::from_be_bytes);
        match requested {
            None => DEFAULT_LIFETIME,
            Some(secs) => Duration::from_secs(secs as u64).clamp(DEFAULT_LIFETIME, self.settings.max_lifetime.max(DEFAULT_LIFETIME)),
        }
    }

    pub(super) fn quota_reject(&mut self, now: Instant, msg: &Message<'_>, a: &Authed, scope: &'static str) -> ClientAction<R> {
        self.stats.quota_rejections.inc(scope);
        if let Some(suppressed) = self.refusal_log.allow(now) {
            tracing::info!(scope, suppressed, "allocation refused: quota reached (one line a second; kinlink_turn_quota_rejections_total counts all)");
        }
        ClientAction::Reply(self.error_reply(msg, a, 486, "Allocation Quota Reached"))
    }

    /// The checks of an Allocate; what passes takes its quota and asks for a relay socket
    /// (or claims a reserved one, which needs no binding).
    pub(super) fn allocate(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: Authed) -> ClientAction<R> {
        let reply = |s: &Self, code: u16, reason: &str| ClientAction::Reply(s.error_reply(msg, &a, code, reason));
        if let Some(existing) = self.allocations.get(&tuple) {
            if existing.live(now) {
                return reply(self, 437, "Allocation Mismatch");
            }
            self.remove(now, &tuple, "expired");
        }
        if self.pending.contains_key(&tuple) {
            return reply(self, 437, "Allocation Mismatch");
        }
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return reply(self, 400, "Bad Request: REQUESTED-TRANSPORT missing"),
            Some(v) if v.first() != Some(&17) => return reply(self, 442, "Unsupported Transport Protocol"),
            Some(_) => {}
        }
        // EVEN-PORT: `Some(reserve_next)`.
        let even = msg.get(attr::EVEN_PORT).map(|v| v.first().is_some_and(|b| b & 0x80 != 0));
        let token = match msg.get(attr::RESERVATION_TOKEN) {
            Some(_) if even.is_some() => return reply(self, 400, "Bad Request: EVEN-PORT with RESERVATION-TOKEN"),
            Some(v) => match <[u8; 8]>::try_from(v) {
                Ok(t) => Some(t),
                Err(_) => return reply(self, 400, "Bad Request: RESERVATION-TOKEN"),
            },
            None => None,
        };
        let ipv6 = match msg.get(attr::REQUESTED_ADDRESS_FAMILY).map(|v| v.first().copied()) {
            // RFC 8656 §7.2: without the attribute the relay is IPv4, whatever the client leg
            // (browsers on IPv6 still relay to IPv4 peers); unless the server advertises only IPv6.
            None => self.settings.public_ip.is_some_and(|ip| ip.is_ipv6()),
            Some(Some(0x01)) => false,
            Some(Some(0x02)) => true,
            Some(_) => return reply(self, 440, "Address Family not Supported"),
        };
        if self.draining {
            return reply(self, 508, "Insufficient Capacity: server draining");
        }
        // A claimed reservation stops counting before the quotas are checked: the allocation
        // that replaces it counts instead.
        let claimed = match token {
            Some(t) => match self.reservations.remove(&t) {
                Some(r) => {
                    self.release(&r.family, &r.device);
                    self.gate.release_port(r.local.port());
                    if r.expires <= now {
                        self.released.relays.push(r.relay);
                        return reply(self, 508, "Insufficient Capacity: no such reservation");
                    }
                    Some((r.relay, r.local))
                }
                None => return reply(self, 508, "Insufficient Capacity: no such reservation"),
            },
            None => None,
        };
        // EVEN-PORT with R holds two ports: both count.
        let needed = if even == Some(true) { 2 } else { 1 };
        if let Err(scope) = self.quota_room(&a.family, &a.device, needed) {
            return self.quota_reject(now, msg, &a, scope);
        }
        for _ in 0..needed {
            self.charge(&a.family, &a.device);
        }
        self.pending_ports += needed;
        let lifetime = self.lifetime(msg);
        self.pending.insert(tuple, Pending { authed: a, tid: msg.tid, lifetime, ports: needed, since: now });
        let request = BindRequest {
            tuple,
            ipv6,
            choice: if even.is_some() { PortChoice::Even } else { PortChoice::Any },
            pair: even == Some(true),
        };
        match claimed {
            Some(relay) => self.allocated(now, request, Ok(Bound { relay, reserved: None })),
            None => ClientAction::Bind(request),
        }
    }

    /// Completes an Allocate with the sockets the driver bound for `request` (dropped, and
    /// so closed, when the Allocate is no longer waiting for them).
    pub fn allocated(&mut self, now: Instant, request: BindRequest, bound: Result<Bound<R>, BindError>) -> ClientAction<R> {
        let tuple = request.tuple;
        let Some(p) = self.pending.remove(&tuple) else {
            // Given up on meanwhile (the client's connection closed): the sockets go unused.
            if let Ok(b) = bound {
                self.released.relays.extend([Some(b.relay.0), b.reserved.map(|r| r.0)].into_iter().flatten());
            }
            return ClientAction::None;
        };
        self.pending_ports -= p.ports;
        let a = p.authed;
        let msg_tid = p.tid;
        let bound = match bound {
            Ok(b) => b,
            Err(e) => {
                for _ in 0..p.ports {
                    self.release(&a.family, &a.device);
                }
                self.stats.quota_rejections.inc("ports");
                if let Some(suppressed) = self.refusal_log.allow(now) {
                    tracing::warn!(error = %e, suppressed, "allocation refused: no relay port");
                }
                let mut b = Builder::new(method::ALLOCATE, Class::Error, msg_tid);
                b.error(508, "Insufficient Capacity");
                return ClientAction::Reply(self.finish(b, Some((&a.key, a.sha256))));
            }
        };
        let (relay, local) = bound.relay;
        let mut reserved_token = None;
        if let Some((odd, odd_local)) = bound.reserved {
            let mut t = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut t);
            self.gate.hold_port(odd_local.port());
            let reservation = Reservation { relay: odd, local: odd_local, expires: now + RESERVATION_LIFETIME, family: a.family.clone(), device: a.device.clone() };
            self.reservations.insert(t, reservation);
            reserved_token = Some(t);
        } else if p.ports == 2 {
            // A pair was asked for and one socket came: give the second port's quota back.
            self.release(&a.family, &a.device);
        }
        let ipv6 = local.is_ipv6();
        let relayed = SocketAddr::new(self.settings.public_ip.filter(|ip| ip.is_ipv6() == ipv6).unwrap_or(local.ip()), local.port());
        let mut b = Builder::new(method::ALLOCATE, Class::Success, msg_tid);
        b.xor_addr(attr::XOR_RELAYED_ADDRESS, relayed).u32_attr(attr::LIFETIME, p.lifetime.as_secs() as u32);
        b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
        if let Some(t) = reserved_token {
            b.attr(attr::RESERVATION_TOKEN, &t);
        }
        let reply = self.finish(b, Some((&a.key, a.sha256)));
        self.gate.hold_port(local.port());
        let meter = self.families.get(&a.family).and_then(|u| u.meter.clone());
        let path = Arc::new(Path::new(relay, tuple, local, now + p.lifetime, meter, self.gate.clone()));
        self.allocations.insert(
            tuple,
            Allocation {
                path: path.clone(),
                family: a.family,
                device: a.device,
                username: a.username,
                created: now,
                allocate_tid: msg_tid,
                allocate_reply: reply.clone(),
                reservation: reserved_token,
            },
        );
        self.stats.allocations_created.inc(tuple.transport.as_str());
        tracing::debug!(transport = tuple.transport.as_str(), lifetime_secs = p.lifetime.as_secs(), "allocation created");
        ClientAction::Started { reply, path }
    }

    /// Gives back what a pending Allocate took.
    pub(super) fn abandon(&mut self, tuple: &FiveTuple) {
        if let Some(p) = self.pending.remove(tuple) {
            self.pending_ports -= p.ports;
            for _ in 0..p.ports {
                self.release(&p.authed.family, &p.authed.device);
            }
        }
    }

    /// Whether `needed` more relay ports fit every quota; `Err(scope)` names the one that is full.
    pub(super) fn quota_room(&self, family: &Arc<str>, device: &Arc<str>, needed: usize) -> Result<(), &'static str> {
        let q = &self.settings.quota;
        if self.allocations.len() + self.reservations.len() + self.pending_ports + needed > q.total_allocations {
            return Err("server");
        }
        if is_check_family(family) && self.check_usage + needed > q.check_allocations {
            return Err("check");
        }
        if self.families.get(family).map_or(0, |u| u.allocations) + needed > q.family_allocations {
            return Err("family");
        }
        if self.devices.get(&(family.clone(), device.clone())).copied().unwrap_or(0) + needed > q.device_allocations {
            return Err("device");
        }
        Ok(())
    }

    /// Counts one relay port (an allocation, a reservation, or one being bound) against its
    /// owner's quotas.
    pub(super) fn charge(&mut self, family: &Arc<str>, device: &Arc<str>) {
        let rate = self.settings.quota.family_bytes_per_sec;
        let epoch = self.epoch;
        let usage = self
            .families
            .entry(family.clone())
            .or_insert_with(|| FamilyUsage { allocations: 0, meter: (rate > 0).then(|| Arc::new(Meter::new(rate, epoch))) });
        usage.allocations += 1;
        *self.devices.entry((family.clone(), device.clone())).or_insert(0) += 1;
        if is_check_family(family) {
            self.check_usage += 1;
        }
    }

    /// Gives back what [`Self::charge`] took.
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

    pub(super) fn refresh(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let requested_zero = msg.get(attr::LIFETIME).is_some_and(|v| v == [0, 0, 0, 0]);
        let lifetime = self.lifetime(msg);
        let Some(alloc) = self.allocations.get(&tuple).filter(|al| al.live(now)) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let granted = if requested_zero {
            0
        } else {
            alloc.path.routes_mut().expires = now + lifetime;
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
