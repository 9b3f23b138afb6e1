//! tickshard's client-facing layer and binary logic.
//!
//! - [`server`]: the serving lifecycle (`run`), HTTP routes and the drain.
//! - [`http`]: the HTTP accept loop: connection bounds, timeouts, eviction.
//! - [`ws`]: WebSocket protocol v1 (reader, writer, limits, JSON).
//! - [`grpc`]: the public `tickshard.v1.Feed` gRPC service, health, reflection.
//! - [`sim`]: the simulated market.
//! - [`client`]: the client library (resuming subscriber, retrying publisher).
//! - [`cli`]: the `tickshard` command line (`serve`, `tail`, `publish`, `replay`).
//!
//! Market-data logic lives in `tickshard_shard`; this crate only speaks protocols.

pub mod bench;
pub mod cli;
pub mod client;
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
pub mod ws;
