//! The shard: everything a tickshard pod knows about market data, independent of
//! how clients reach it.
//!
//! - [`domain`]: symbols, ticks, candles, epochs, validation with contract error codes.
//! - [`ownership`]: which shard owns a symbol (jump consistent hash over xxh3).
//! - [`store`]: the sled store (per-symbol tick blocks, one atomic batch and one
//!   flush per group commit).
//! - [`committer`]: the group-commit thread that assigns `seq`, de-duplicates,
//!   aggregates candles, makes a batch durable, then acks and fans out.
//! - [`hub`]: per-symbol subscriber registries and bounded per-client outboxes:
//!   the fan-out core shared by WebSocket, gRPC and peer followers.
//! - [`node`]: the API the protocol layers call.
//! - [`wire`]: conversions between the domain and the generated gRPC types.
//!
//! This crate knows nothing of HTTP, WebSocket or JSON.

pub mod backoff;
pub mod cluster;
pub mod committer;
pub mod domain;
mod error;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod ownership;
pub mod placement;
pub mod publish;
pub mod reads;
pub mod rpc;
pub mod session;
pub mod store;
pub mod tasks;
pub mod wire;

pub use error::Error;
