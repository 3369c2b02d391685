//! Permissions and channels: CreatePermission and ChannelBind, and the peer policy applied
//! to every peer address a client names.

use super::*;

impl<R: Clone> TurnServer<R> {
    /// Policy and family checks for a peer address named in a request.
    pub(super) fn peer_allowed(&self, now: Instant, relayed: SocketAddr, peer: SocketAddr) -> Result<SocketAddr, (u16, &'static str)> {
        let peer = normalize(peer);
        if peer.is_ipv6() != relayed.is_ipv6() {
            return Err((443, "Peer Address Family Mismatch"));
        }
        if let Err(d) = self.policy_check(peer) {
            self.metrics.turn_permission_denied.with_label_values(&[d.reason()]).inc();
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

    /// The peer policy, except that a port one of our relays holds is another allocation of
    /// this server (two devices both relayed through it), not a listener: relayed data is UDP
    /// and a UDP relay port cannot be a UDP listener's, so only a TCP listener could share the
    /// number, and UDP sent there reaches the relay.
    pub(super) fn policy_check(&self, peer: SocketAddr) -> Result<(), Denied> {
        match self.policy.check(peer) {
            Err(Denied::OwnPort) if self.relay_ports.contains_key(&peer.port()) => Ok(()),
            other => other,
        }
    }

    pub(super) fn create_permission(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let Some(relayed) = self.allocations.get(&tuple).filter(|al| al.expires > now).map(|al| al.relayed) else {
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
        let cap = self.settings.permissions_per_allocation;
        let alloc = self.allocations.get_mut(&tuple).expect("checked above");
        let new = peers.iter().filter(|ip| !alloc.permissions.iter().any(|p| p.ip == **ip && p.expires > now)).count();
        alloc.permissions.retain(|p| p.expires > now);
        if alloc.permissions.len() + new > cap {
            self.metrics.turn_quota_rejections.with_label_values(&["permissions"]).inc();
            return self.error_reply(msg, a, 508, "Insufficient Capacity: too many permissions");
        }
        for ip in peers {
            install_permission(alloc, ip, now);
        }
        self.finish(Builder::new(method::CREATE_PERMISSION, Class::Success, msg.tid), Some((&a.key, a.sha256)))
    }

    pub(super) fn channel_bind(&mut self, now: Instant, tuple: FiveTuple, msg: &Message<'_>, a: &Authed) -> Vec<u8> {
        let Some(relayed) = self.allocations.get(&tuple).filter(|al| al.expires > now).map(|al| al.relayed) else {
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
        let cap = self.settings.channels_per_allocation;
        let cap_p = self.settings.permissions_per_allocation;
        let alloc = self.allocations.get_mut(&tuple).expect("checked above");
        alloc.channels.retain(|c| c.expires > now);
        let by_number = alloc.channels.iter().position(|c| c.number == number);
        let by_peer = alloc.channels.iter().position(|c| c.peer == peer);
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => alloc.channels[i].expires = now + CHANNEL_LIFETIME,
            (None, None) => {
                if alloc.channels.len() >= cap {
                    self.metrics.turn_quota_rejections.with_label_values(&["channels"]).inc();
                    return self.error_reply(msg, a, 508, "Insufficient Capacity: too many channels");
                }
                if !alloc.permissions.iter().any(|p| p.ip == peer.ip() && p.expires > now) && alloc.permissions.len() >= cap_p {
                    self.metrics.turn_quota_rejections.with_label_values(&["permissions"]).inc();
                    return self.error_reply(msg, a, 508, "Insufficient Capacity: too many permissions");
                }
                alloc.channels.push(Channel { number, peer, expires: now + CHANNEL_LIFETIME });
            }
            _ => return self.error_reply(msg, a, 400, "Bad Request: channel or peer already bound"),
        }
        install_permission(alloc, peer.ip(), now);
        self.finish(Builder::new(method::CHANNEL_BIND, Class::Success, msg.tid), Some((&a.key, a.sha256)))
    }
}

pub(super) fn install_permission<R>(alloc: &mut Allocation<R>, ip: IpAddr, now: Instant) {
    match alloc.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.expires = now + PERMISSION_LIFETIME,
        None => alloc.permissions.push(Permission { ip, expires: now + PERMISSION_LIFETIME }),
    }
}
