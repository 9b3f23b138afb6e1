//! Metric names (contract §7: Prometheus, `tickshard_` prefix). Every metric the
//! process exports is named here, so the names are greppable and documented in
//! one place.

/// Counter: ticks accepted (durable, acked) by this shard as owner.
pub const TICKS_ACCEPTED: &str = "tickshard_ticks_accepted_total";
/// Counter, label `code`: ticks rejected (`invalid_symbol`, `invalid_tick`, `unavailable`).
pub const TICKS_REJECTED: &str = "tickshard_ticks_rejected_total";
/// Counter: publishes recognised as retries and not stored again.
pub const TICKS_DUPLICATE: &str = "tickshard_ticks_duplicate_total";
/// Counter: ticks older than their symbol's current candle interval.
pub const LATE_TICKS: &str = "tickshard_late_ticks_total";
/// Histogram (seconds): request received → ack sent, for accepted publishes.
pub const PUBLISH_LATENCY: &str = "tickshard_publish_latency_seconds";
/// Histogram (seconds): one sled flush of a group commit.
pub const FLUSH_LATENCY: &str = "tickshard_sled_flush_seconds";
/// Histogram: ticks per group commit.
pub const COMMIT_BATCH: &str = "tickshard_commit_batch_ticks";
/// Gauge: symbols this shard owns (has a record for).
pub const OWNED_SYMBOLS: &str = "tickshard_owned_symbols";
/// Counter: ticks removed by retention.
pub const PRUNED_TICKS: &str = "tickshard_pruned_ticks_total";
/// Gauge: bytes sled uses on disk.
pub const STORE_BYTES: &str = "tickshard_store_disk_bytes";

/// Gauge, label `protocol` (`ws`, `grpc`): connected subscribers.
pub const CLIENTS_CONNECTED: &str = "tickshard_clients_connected";
/// Counter, label `protocol`: messages sent to subscribers.
pub const MESSAGES_SENT: &str = "tickshard_messages_sent_total";
/// Counter, label `protocol`: bytes sent to subscribers.
pub const BYTES_SENT: &str = "tickshard_bytes_sent_total";
/// Counter: times a client fell behind and its data was conflated.
pub const CONFLATIONS: &str = "tickshard_conflations_total";
/// Counter: clients closed with 1013 for staying behind.
pub const SLOW_CLIENT_CLOSES: &str = "tickshard_slow_client_closes_total";
/// Gauge: the highest unsent bytes any one client reached (memory bound check).
pub const CLIENT_QUEUE_PEAK: &str = "tickshard_client_queue_peak_bytes";
/// Counter, label `code`: errors sent to WebSocket clients.
pub const CLIENT_ERRORS: &str = "tickshard_client_errors_total";

/// Gauge, label `peer`: 1 if the peer link is up, 0 if down.
pub const PEER_UP: &str = "tickshard_peer_up";
/// Gauge, label `peer`: ticks the followed symbols lag behind the owner.
pub const PEER_LAG: &str = "tickshard_peer_lag_ticks";

/// Gauge: 1 while ready, 0 while starting or draining.
pub const READY: &str = "tickshard_ready";
