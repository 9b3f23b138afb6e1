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

pub mod input;
pub mod publisher;
pub mod ws;

use std::time::Duration;

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
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Input(String),
}

/// Exponential back-off with full jitter, for reconnects.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { next: min, min, max }
    }

    /// The next delay (random in `0..=current`), doubling the current one.
    pub fn next_delay(&mut self) -> Duration {
        let cur = self.next;
        self.next = (self.next * 2).min(self.max);
        let ms = cur.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(ms / 2..=ms))
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}
