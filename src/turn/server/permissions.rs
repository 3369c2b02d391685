//! Permissions and channels: CreatePermission and ChannelBind, and the peer policy applied
//! to every peer address a client names.

use super::*;

impl<R: Clone> TurnServer<R> {
    /// Policy and family checks for a peer address named in a request.
    pub(super) fn peer_allowed(&mut self, now: Instant, relayed: SocketAddr, peer: SocketAddr) -> Result<SocketAddr, (u16, &'static str)> {
        let peer = normalize(peer);
        if peer.is_ipv6() != relayed.is_ipv6() {
            return Err((443, "Peer Address Family Mismatch"));
        }
        if let Err(d) = self.gate.check(peer) {
            self.stats.permission_denied.inc(d.reason());
            if let Some(suppressed) = self.refusal_log.allow(now) {
                tracing::info!(reason = d.reason(), suppressed, "peer refused by policy (one line a second; kinlink_turn_permission_denied_total counts all)");
            }
            return Err((403, match d {
                Denied::SpecialRange => "Forbidden: peer address not allowed",
                Denied::DenyList => "Forbidden: peer address denied",
                Denied::OwnPort => "Forbidden: peer is this server",
            }));
        }
        Ok(peer)
    }

    pub(super) fn create_permission(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let Some(relayed) = self.allocations.get(&tuple).filter(|al| al.live(now)).map(|al| al.path.local) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let mut peers = Vec::new();
        for p in msg.xor_peer_addresses() {
            let Some(p) = p else { return self.error_reply(msg, a, 400, "Bad Request: bad XOR-PEER-ADDRESS") };
            match self.peer_allowed(now, relayed, p) {
                Ok(p) => peers.push(p.ip()),
                Err((code, reason)) => return self.error_reply(msg, a, code, reason),
            }
        }
        if peers.is_empty() {
            return self.error_reply(msg, a, 400, "Bad Request: XOR-PEER-ADDRESS missing");
        }
        let cap = self.settings.quota.permissions_per_allocation;
        let path = self.allocations.get(&tuple).expect("checked above").path.clone();
        let mut routes = path.routes_mut();
        let new = peers.iter().filter(|ip| !routes.permissions.iter().any(|p| p.ip == **ip && p.expires > now)).count();
        routes.permissions.retain(|p| p.expires > now);
        if routes.permissions.len() + new > cap {
            drop(routes);
            self.stats.quota_rejections.inc("permissions");
            return self.error_reply(msg, a, 508, "Insufficient Capacity: too many permissions");
        }
        for ip in peers {
            install_permission(&mut routes, ip, now);
        }
        drop(routes);
        self.finish(Builder::new(method::CREATE_PERMISSION, Class::Success, msg.tid), Some((&a.key, a.sha256)))
    }

    pub(super) fn channel_bind(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let Some(relayed) = self.allocations.get(&tuple).filter(|al| al.live(now)).map(|al| al.path.local) else {
            return self.error_reply(msg, a, 437, "Allocation Mismatch");
        };
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return self.error_reply(msg, a, 400, "Bad Request: CHANNEL-NUMBER missing"),
        };
        if !crate::turn::stun::CHANNELS.contains(&number) {
            return self.error_reply(msg, a, 400, "Bad Request: channel number out of range");
        }
        let Some(Some(peer)) = msg.xor_peer_addresses().next() else {
            return self.error_reply(msg, a, 400, "Bad Request: XOR-PEER-ADDRESS missing");
        };
        let peer = match self.peer_allowed(now, relayed, peer) {
            Ok(p) => p,
            Err((code, reason)) => return self.error_reply(msg, a, code, reason),
        };
        let cap = self.settings.quota.channels_per_allocation;
        let cap_p = self.settings.quota.permissions_per_allocation;
        let path = self.allocations.get(&tuple).expect("checked above").path.clone();
        let mut routes = path.routes_mut();
        routes.channels.retain(|c| c.expires > now);
        let by_number = routes.channels.iter().position(|c| c.number == number);
        let by_peer = routes.channels.iter().position(|c| c.peer == peer);
        let refused = match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => {
                routes.channels[i].expires = now + CHANNEL_LIFETIME;
                None
            }
            (None, None) if routes.channels.len() >= cap => Some(("channels", 508, "Insufficient Capacity: too many channels")),
            (None, None) if !routes.permits(peer.ip(), now) && routes.permissions.len() >= cap_p => {
                Some(("permissions", 508, "Insufficient Capacity: too many permissions"))
            }
            (None, None) => {
                routes.channels.push(Channel { number, peer, expires: now + CHANNEL_LIFETIME });
                None
            }
            _ => Some(("", 400, "Bad Request: channel or peer already bound")),
        };
        if refused.is_none() {
            install_permission(&mut routes, peer.ip(), now);
        }
        drop(routes);
        if let Some((scope, code, reason)) = refused {
            if !scope.is_empty() {
                self.stats.quota_rejections.inc(scope);
            }
            return self.error_reply(msg, a, code, reason);
        }
        self.finish(Builder::new(method::CHANNEL_BIND, Class::Success, msg.tid), Some((&a.key, a.sha256)))
    }
}

pub(super) fn install_permission(routes: &mut path::Routes, ip: IpAddr, now: Instant) {
    match routes.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.expires = now + PERMISSION_LIFETIME,
        None => routes.permissions.push(Permission { ip, expires: now + PERMISSION_LIFETIME }),
    }
}
