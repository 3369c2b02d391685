//! The signaling relay: wire protocol, session rules, routing between devices, and the
//! WebSocket driver.

pub mod hub;
pub mod negotiation;
pub mod protocol;
pub mod schema;
pub mod session;
pub mod ws;
