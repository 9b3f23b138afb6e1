//! The state the HTTP, WebSocket and gRPC layers share: the node, the limits,
//! the drain's signals and the open subscriber connections. Below every
//! protocol module (they import it; it imports none of them).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use metrics_exporter_prometheus::PrometheusHandle;
use tickshard_shard::{
    hub::{Close, Outbox},
    metrics as m,
    node::Node,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{auth::Auth, config::WsLimits};

/// Anything the drain can close: WebSocket and gRPC subscriber outboxes.
pub trait Closable: Send + Sync {
    fn close(&self, close: Close);
}

impl<C: Send + 'static> Closable for Outbox<C> {
    fn close(&self, close: Close) {
        Outbox::close(self, close);
    }
}

/// At most `max` reads in flight (gRPC `GetSnapshot`, `GetHistory`,
/// `ListSymbols` and HTTP `/api/candles`); one more is shed at once
/// (retryable), so a burst of reads cannot pile up behind the store or a
/// peer and starve everything else of the blocking pool and memory.
pub struct ReadLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ReadLimit {
    pub fn new(max: usize) -> ReadLimit {
        ReadLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for one read of `method`, held until the answer is built;
    /// `None` (counted in `tickshard_grpc_shed_total{method}`) past the limit.
    pub fn admit(&self, method: &'static str) -> Option<OwnedSemaphorePermit> {
        let slot = self.permits.clone().try_acquire_owned().ok();
        if slot.is_none() {
            metrics::counter!(m::GRPC_SHED, "method" => method).increment(1);
        }
        slot
    }

    /// What a shed read is told.
    pub fn overloaded(&self) -> String {
        format!(
            "overloaded: {} reads in flight (--grpc-max-reads); retry with back-off",
            self.max
        )
    }
}

/// State shared by the HTTP, WebSocket and gRPC layers.
pub struct Shared {
    pub node: Arc<Node>,
    pub ws: WsLimits,
    pub publish_window: usize,
    /// Publish requests of every client stream read and not yet answered to
    /// their client (`--publish-max-in-flight`).
    pub publish_budget: Arc<Semaphore>,
    pub publish_max_in_flight: usize,
    /// Set at SIGTERM: not ready, no new WebSockets or subscriptions.
    pub(crate) draining: CancellationToken,
    /// Set once clients are closed: publish and peer streams stop taking work.
    pub(crate) stopping: CancellationToken,
    pub(crate) ready: AtomicBool,
    pub(crate) metrics: PrometheusHandle,
    /// Open subscriber connections, closed one by one during the drain.
    pub(crate) conns: Mutex<HashMap<u64, Arc<dyn Closable>>>,
    /// Every WebSocket and gRPC subscriber task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Subscribers (`--max-connections`): a WebSocket takes one at the
    /// upgrade, a gRPC `Subscribe` stream when it starts.
    pub(crate) ws_permits: Arc<Semaphore>,
    /// Token verification and the anonymous grant (contract §8).
    pub auth: Arc<Auth>,
    /// `--allowed-origins`: the `Origin`s a WebSocket upgrade may come from
    /// (`None`: any).
    pub allowed_origins: Option<Vec<String>>,
    /// Reads in flight (`--grpc-max-reads`): gRPC reads and `/api/candles`.
    pub(crate) reads: ReadLimit,
    /// Messages and bytes sent to WebSocket subscribers, direct writes whole
    /// and partial (resolved once).
    pub(crate) ws_sent: [metrics::Counter; 4],
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Cancelled when publish streams (and peer streams) must wind down: after
    /// the clients are closed, so the shard keeps taking publishes for its
    /// symbols while it drains (its owner downtime is only the restart itself).
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.is_draining() && self.node.is_healthy()
    }

    /// A subscriber slot (`--max-connections`), if one is free.
    pub fn subscriber_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.ws_permits.clone().try_acquire_owned().ok()
    }

    /// Registers a subscriber connection for the drain (which closes it) and
    /// counts it in `tickshard_clients_connected{protocol}`, until the
    /// returned guard is dropped. One that enters once the drain has begun
    /// is closed at once (1012): the drain may have listed the connections
    /// before it came.
    pub fn enter<C: Send + 'static>(self: &Arc<Self>, protocol: &'static str, outbox: Arc<Outbox<C>>) -> Entered {
        let id = outbox.id();
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, outbox.clone());
        // (after the insert: the drain cancels `draining` before it lists
        // the connections, so each one is either listed or sees it here)
        if self.is_draining() {
            outbox.close(Close::Restart);
        }
        let gauge = metrics::gauge!(m::CLIENTS_CONNECTED, "protocol" => protocol);
        gauge.increment(1.0);
        Entered {
            shared: self.clone(),
            id,
            gauge,
        }
    }
}

/// A registered subscriber connection (see [`Shared::enter`]).
pub struct Entered {
    shared: Arc<Shared>,
    id: u64,
    gauge: metrics::Gauge,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.gauge.decrement(1.0);
    }
}
