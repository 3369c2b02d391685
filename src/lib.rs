//! kinlink: a WebSocket signaling relay and an embedded TURN/STUN server for the devices of
//! a family, with family-scoped credentials and Prometheus metrics.
//!
//! # Layout
//! - [`config`]: layered configuration (defaults, TOML, `KINLINK_` env, flags); errors name the key.
//! - [`secrets`]: secrets generated once into the data directory when not configured.
//! - [`auth`]: device tokens (HS256 JWT) and TURN REST credentials.
//! - [`ice`]: the `iceServers` block handed to devices.
//! - [`signal`]: the relay: [`signal::protocol`] (wire format), [`signal::session`] (rules,
//!   sans-IO), [`signal::hub`] (who is online, routing), [`signal::ws`] (the tokio driver).
//! - [`turn`]: the STUN/TURN server: [`turn::stun`] (wire format), [`turn::policy`] (peer
//!   addresses), [`turn::server`] (rules, sans-IO), [`turn::shard`] and [`turn::stream`]
//!   (the drivers).
//! - [`http`]: the axum routers and the HTTP listener ([`http::listener`]); [`check`]: the
//!   `/check` self-check page and its tokens.
//! - [`tls`]: certificates for `turns:` and HTTPS, reloaded on change; [`coalesce`]: TLS
//!   writes held until a flush (a TURN frame per record, one syscall per batch).
//! - [`connlimit`]: admission caps (total, per source IP) for TCP listeners; [`health`]: the
//!   listener supervisor and what `/readyz` reports.
//! - [`metrics`]: every exported metric; [`ratelimit`]: token buckets and the log limiter;
//!   [`queue`]: queues bounded in messages and bytes (what a slow reader can make us hold).
//! - [`server`]: binds the listeners and runs until shutdown, draining gracefully.
//! - [`cli`]: the `kinlink` command line; [`probe`]: `kinlink healthcheck`.

// No unsafe code, except the one module that calls recvmmsg/sendmmsg (turn::batch): the
// kernel's batched UDP calls take raw message headers, and no safe wrapper sends to many
// destinations in one call without an allocation per batch.
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod acme;
pub mod admin;
pub mod auth;
pub mod check;
pub mod cluster;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod connlimit;
pub mod demux;
pub mod health;
pub mod http;
pub mod ice;
pub mod metrics;
pub mod probe;
pub mod queue;
pub mod ratelimit;
pub mod reload;
pub mod secrets;
pub mod server;
pub mod signal;
pub mod tls;
pub mod turn;

pub use config::Config;
pub use server::{run, Server};
