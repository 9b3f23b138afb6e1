//! The client library: what `tail`, `publish`/`replay`, the benchmarks and the
//! tests use to talk to tickshard, so they all get the delivery guarantees from
//! one place.
//!
//! - [`ws::WsConn`]: one raw WebSocket connection (frames in, frames out).
//! - [`ws::Subscriber`]: subscribes, tracks `{seq, epoch}` per symbol, and on any
//!   failure reconnects to the next address in its list and resumes.
//! - [`publisher::Publisher`]: a gRPC publisher that numbers its requests per
//!   symbol and, after any failure, resends everything unacked with the same
//!   `publisher_seq`, so the server's de-duplication makes retries exact.
//! - [`input`]: CSV / NDJSON tick files.

pub mod admin;
#[doc(hidden)]
pub mod fuzzing;
pub mod input;
pub mod publisher;
pub mod tls;
pub mod ws;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad address '{0}'")]
    BadAddress(String),
    #[error("connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("websocket: {0}")]
    WebSocket(String),
    #[error("grpc: {0}")]
    Grpc(String),
    /// The server refused in a way no retry can fix as it is (no valid
    /// token, not entitled, a request over its size limit, …); the
    /// publisher keeps what is unacked, and a later call tries again.
    #[error("refused: {0}")]
    Refused(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Input(String),
}

pub use tickshard_shard::backoff::Backoff;
