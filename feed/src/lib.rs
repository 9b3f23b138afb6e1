//! tickshard's client-facing server layer (the client library is
//! `tickshard_client`, the load generator `tickshard_loadgen`).
//!
//! - [`server`]: the serving lifecycle (`run`), HTTP routes and the drain.
//! - [`http`]: the HTTP accept loop: connection bounds, timeouts, eviction.
//! - [`ws`]: WebSocket protocol v1 (reader, writer, limits, JSON).
//! - [`grpc`]: the public `tickshard.v1.Feed` gRPC service, health, reflection.
//! - [`sim`]: the simulated market.
//! - [`cli`]: `tickshard serve` (config, listeners, signals).
//!
//! Market-data logic lives in `tickshard_shard`; this crate only speaks protocols.

pub mod auth;
pub mod cli;
pub mod config;
mod dashboard;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod server;
pub mod shared;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod watch;
pub mod ws;
