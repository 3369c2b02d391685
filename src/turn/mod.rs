//! The embedded STUN/TURN server (RFC 8489, RFC 8656) with TURN REST credentials that the
//! signaling side hands out.
//!
//! - [`stun`]: the wire format (zero-copy parser, builder, integrity, ChannelData).
//! - [`policy`]: which peer addresses may be relayed to.
//! - [`server`]: the rules, sans-IO: auth, allocations, permissions, channels, quotas.
//! - [`udp`], [`tcp`]: the tokio drivers for the client legs; relays are UDP.

pub mod policy;
pub mod server;
pub mod stun;
