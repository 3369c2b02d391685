//! The data path: ChannelData and Send indications from clients, datagrams from peers
//! framed in place for the client, and the per-family bandwidth quota.

use super::*;

impl<R: Clone> TurnServer<R> {
    pub(super) fn client_channel_data(&mut self, now: Instant, tuple: FiveTuple, buf: &[u8]) -> ClientAction<R> {
        let Some((number, payload)) = crate::turn::stun::parse_channel_data(buf) else {
            return self.drop_packet("malformed");
        };
        let Some(alloc) = self.allocations.get(&tuple) else { return self.drop_packet("no_allocation") };
        if alloc.expires <= now {
            return self.drop_packet("no_allocation");
        }
        let Some(ch) = alloc.channels.iter().find(|c| c.number == number && c.expires > now) else {
            return self.drop_packet("no_channel");
        };
        let (peer, relay, family) = (ch.peer, alloc.relay.clone(), alloc.family.clone());
        if !self.spend(now, &family, payload.len()) {
            return self.drop_packet("bandwidth");
        }
        self.metrics.turn_bytes_to_peer.inc_by(payload.len() as u64);
        self.metrics.turn_packets_to_peer.inc();
        ClientAction::Relay { relay, peer, payload: 4..4 + payload.len() }
    }

    pub(super) fn drop_packet(&self, reason: &'static str) -> ClientAction<R> {
        self.metrics.turn_dropped.with_label_values(&[reason]).inc();
        ClientAction::None
    }

    /// Family bandwidth quota: false when the packet must be dropped.
    pub(super) fn spend(&mut self, now: Instant, family: &Arc<str>, bytes: usize) -> bool {
        let rate = self.settings.family_bytes_per_sec;
        if rate == 0 {
            return true;
        }
        let Some(u) = self.families.get_mut(family) else { return true };
        let burst = rate as f64; // one second's worth
        u.tokens = (u.tokens + now.saturating_duration_since(u.refilled).as_secs_f64() * rate as f64).min(burst);
        u.refilled = now;
        if u.tokens >= bytes as f64 {
            u.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }

    pub(super) fn send_indication(&mut self, now: Instant, tuple: FiveTuple, msg: Message<'_>) -> ClientAction<R> {
        let (Some(Some(peer)), Some(data)) = (msg.xor_peer_addresses().next(), msg.get(attr::DATA)) else {
            return self.drop_packet("malformed");
        };
        let peer = normalize(peer);
        let Some(alloc) = self.allocations.get(&tuple) else { return self.drop_packet("no_allocation") };
        if alloc.expires <= now {
            return self.drop_packet("no_allocation");
        }
        if !alloc.permissions.iter().any(|p| p.ip == peer.ip() && p.expires > now) {
            return self.drop_packet("no_permission");
        }
        // A permission is for an IP; the port is the sender's choice, so the policy (own
        // listeners above all) is applied to the full address of every Send.
        if alloc.relayed.is_ipv6() != peer.is_ipv6() || self.policy_check(peer).is_err() {
            return self.drop_packet("denied_peer");
        }
        let (relay, family) = (alloc.relay.clone(), alloc.family.clone());
        if !self.spend(now, &family, data.len()) {
            return self.drop_packet("bandwidth");
        }
        // `data` borrows from the input: recover its offset.
        let start = data.as_ptr() as usize - msg.raw().as_ptr() as usize;
        self.metrics.turn_bytes_to_peer.inc_by(data.len() as u64);
        self.metrics.turn_packets_to_peer.inc();
        ClientAction::Relay { relay, peer, payload: start..start + data.len() }
    }

    /// Handles a packet a peer sent to the relay of `tuple`'s allocation. The payload sits
    /// at `buf[PEER_HEADROOM..PEER_HEADROOM + len]`; on success returns the range of `buf`
    /// holding the framed message (ChannelData or Data indication) for the client.
    pub fn handle_peer(&mut self, now: Instant, tuple: &FiveTuple, peer: SocketAddr, buf: &mut [u8], len: usize) -> Option<Range<usize>> {
        let Some(alloc) = self.allocations.get(tuple) else {
            self.drop_packet("no_allocation");
            return None;
        };
        if alloc.expires <= now {
            self.drop_packet("no_allocation");
            return None;
        }
        let peer = normalize(peer);
        if !alloc.permissions.iter().any(|p| p.ip == peer.ip() && p.expires > now) {
            self.drop_packet("no_permission");
            return None;
        }
        let channel = alloc.channels.iter().find(|c| c.peer == peer && c.expires > now).map(|c| c.number);
        let family = alloc.family.clone();
        if buf.len() < PEER_HEADROOM + len + 3 {
            return None;
        }
        if !self.spend(now, &family, len) {
            self.drop_packet("bandwidth");
            return None;
        }
        self.metrics.turn_bytes_to_client.inc_by(len as u64);
        self.metrics.turn_packets_to_client.inc();
        let end = PEER_HEADROOM + len;
        match channel {
            Some(number) => {
                let start = PEER_HEADROOM - 4;
                buf[start..start + 2].copy_from_slice(&number.to_be_bytes());
                buf[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
                // Over streams ChannelData is padded to a multiple of 4 (RFC 8656 §12.5).
                let pad = if tuple.transport.is_stream() { (4 - len % 4) % 4 } else { 0 };
                buf[end..end + pad].fill(0);
                Some(start..end + pad)
            }
            None => {
                let mut tid = [0u8; 12];
                rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut tid);
                let mut addr = [0u8; 20];
                let alen = crate::turn::stun::encode_xor_addr(peer, &tid, &mut addr);
                let hdr_len = 20 + 4 + alen + 4;
                let start = PEER_HEADROOM - hdr_len;
                let pad = (4 - len % 4) % 4;
                let h = &mut buf[start..PEER_HEADROOM];
                h[0..2].copy_from_slice(&crate::turn::stun::message_type(method::DATA, Class::Indication).to_be_bytes());
                h[2..4].copy_from_slice(&((4 + alen + 4 + len + pad) as u16).to_be_bytes());
                h[4..8].copy_from_slice(&crate::turn::stun::MAGIC_COOKIE.to_be_bytes());
                h[8..20].copy_from_slice(&tid);
                h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
                h[22..24].copy_from_slice(&(alen as u16).to_be_bytes());
                h[24..24 + alen].copy_from_slice(&addr[..alen]);
                let d = 24 + alen;
                h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
                h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
                buf[end..end + pad].fill(0);
                Some(start..end + pad)
            }
        }
    }
}
