//! Metric names (contract §7: Prometheus, `tickshard_` prefix). Every metric the
//! process exports is named here, so the names are greppable and documented in
//! one place.

/// Counter: ticks accepted (durable, acked) by this shard as owner.
pub const TICKS_ACCEPTED: &str = "tickshard_ticks_accepted_total";
/// Counter, label `code`: ticks rejected, by the refusal's error code (`invalid_symbol`,
/// `invalid_tick`, `invalid_request`, `symbol_limit`, `forbidden`, `unavailable`).
pub const TICKS_REJECTED: &str = "tickshard_ticks_rejected_total";
/// Counter: publishes recognised as retries and not stored again.
pub const TICKS_DUPLICATE: &str = "tickshard_ticks_duplicate_total";
/// Counter: ticks older than their symbol's current candle interval.
pub const LATE_TICKS: &str = "tickshard_late_ticks_total";
/// Histogram (seconds): request received → ack sent, for accepted publishes.
pub const PUBLISH_LATENCY: &str = "tickshard_publish_latency_seconds";
/// Histogram (seconds): one sled flush of a group commit.
pub const FLUSH_LATENCY: &str = "tickshard_sled_flush_seconds";
/// Counter: symbols compacted (logged ticks → tick blocks + state snapshot).
pub const COMPACTIONS: &str = "tickshard_compactions_total";
/// Counter, label `kind` (`log`, `blocks`): bytes of log records and of tick
/// blocks committed (values as encoded; what sled then writes to disk is
/// more: its own pages and their rewrites).
pub const STORE_WRITTEN: &str = "tickshard_store_written_bytes_total";
/// Histogram: ticks per group commit.
pub const COMMIT_BATCH: &str = "tickshard_commit_batch_ticks";
/// Gauge: symbols this shard owns (has a record for).
pub const OWNED_SYMBOLS: &str = "tickshard_owned_symbols";
/// Counter: symbols forgotten because they never had a tick and nobody
/// subscribed to them for an hour (contract §6).
pub const SYMBOLS_FORGOTTEN: &str = "tickshard_symbols_forgotten_total";
/// Gauge: symbol moves this pod still has to make to reach the rebalance
/// target (contract §9; 0 when no rebalance runs).
pub const REBALANCE_MOVES_LEFT: &str = "tickshard_rebalance_moves_left";
/// Histogram (seconds): how long a moved symbol's publishes were held (on
/// its old owner, from the hold to the release).
pub const SYMBOL_MOVE_SECONDS: &str = "tickshard_symbol_move_seconds";
/// Histogram (seconds): a whole symbol move, history copy included.
pub const SYMBOL_MOVE_TOTAL_SECONDS: &str = "tickshard_symbol_move_total_seconds";
/// Counter: bytes of ticks and candles shipped to new owners (protobuf size).
pub const MOVE_BYTES: &str = "tickshard_move_bytes_total";
/// Counter, label `result` (`moved`, `rolled_back`): symbol moves out of this pod.
pub const SYMBOL_MOVES: &str = "tickshard_symbol_moves_total";
/// Counter: symbols this pod took over.
pub const SYMBOLS_MOVED_IN: &str = "tickshard_symbols_moved_in_total";
/// Gauge: the committed shard count; `tickshard_target_shards`: the count a
/// rebalance moves to (0 when none runs).
pub const COMMITTED_SHARDS: &str = "tickshard_committed_shards";
pub const TARGET_SHARDS: &str = "tickshard_target_shards";
/// Sets the committed and target shard-count gauges.
pub fn set_cluster_gauges(s: &crate::placement::ClusterState) {
    metrics::gauge!(COMMITTED_SHARDS).set(f64::from(s.committed));
    metrics::gauge!(TARGET_SHARDS).set(f64::from(s.target.unwrap_or(0)));
}

/// Counter: ticks removed by retention.
pub const PRUNED_TICKS: &str = "tickshard_pruned_ticks_total";
/// Gauge: bytes sled uses on disk.
pub const STORE_BYTES: &str = "tickshard_store_disk_bytes";

/// Gauge, label `protocol` (`ws`, `grpc`): connected subscribers.
pub const CLIENTS_CONNECTED: &str = "tickshard_clients_connected";
/// Counter, label `protocol` (`ws`, `grpc`): messages sent to subscribers
/// (not per write: a WebSocket connection adds its own at most 1 s late; a
/// gRPC `Subscribe` stream every 64 events, at its first event a second or
/// more after its last report, and when it ends).
pub const MESSAGES_SENT: &str = "tickshard_messages_sent_total";
/// Counter, label `protocol`: bytes sent to subscribers, as framed (WebSocket
/// frames; gRPC events with their 5-byte prefix), counted as above.
pub const BYTES_SENT: &str = "tickshard_bytes_sent_total";
/// Counter, label `outcome` (`whole`, `partial`): the fan-out's direct writes
/// to idle WebSocket clients (`--ws-direct-write-bytes`); `partial`: the
/// socket did not take it all and the connection's writer task wrote the
/// rest. Each connection adds its own at most 1 s late.
pub const WS_DIRECT_WRITES: &str = "tickshard_ws_direct_writes_total";
/// Counter: times a client fell behind and its data was conflated.
pub const CONFLATIONS: &str = "tickshard_conflations_total";
/// Counter: clients closed with 1013 for staying behind.
pub const SLOW_CLIENT_CLOSES: &str = "tickshard_slow_client_closes_total";
/// Gauge: client publish requests read and not yet answered to their
/// client, of `--publish-max-in-flight` (read when scraped).
pub const PUBLISH_IN_FLIGHT: &str = "tickshard_publish_in_flight";
/// Counter: gRPC connections closed because a publisher holding some of
/// `--publish-max-in-flight` stopped reading its acks.
pub const SLOW_PUBLISHERS: &str = "tickshard_slow_publisher_closes_total";
/// Gauge: the highest unsent bytes any one client reached (memory bound check).
pub const CLIENT_QUEUE_PEAK: &str = "tickshard_client_queue_peak_bytes";
/// Counter, label `code`: errors sent to WebSocket clients.
pub const CLIENT_ERRORS: &str = "tickshard_client_errors_total";

/// Counter, label `method`: reads refused at once because
/// `--grpc-max-reads` were in flight (load shedding): gRPC reads
/// (UNAVAILABLE) and `/api/candles` (503).
pub const GRPC_SHED: &str = "tickshard_grpc_shed_total";

/// Counter, labels `what` (`tls`, `peer_tls`, `auth_keys`) and `result`
/// (`ok`, `error`): certificate or key files re-read after they changed (an
/// `error` keeps the previous ones in force).
pub const RELOADS: &str = "tickshard_reloads_total";

/// Counter, label `reason` (`missing`, `expired`, `invalid`, `bad_signature`,
/// `unknown_key`, `wrong_issuer`, `wrong_audience`): tokens refused.
pub const AUTH_FAILURES: &str = "tickshard_auth_failures_total";

/// Counter, labels `protocol` (`ws`, `grpc`) and `right` (`subscribe`,
/// `publish`): requests refused because the caller is not entitled to a
/// symbol (`forbidden`, PERMISSION_DENIED).
pub const FORBIDDEN: &str = "tickshard_forbidden_total";

/// Gauge, label `peer`: 1 if the peer link is up, 0 if down.
pub const PEER_UP: &str = "tickshard_peer_up";
/// Gauge, label `peer`: seconds between the owner sending the last follow event
/// and this pod applying it (owner and follower clocks assumed in sync).
pub const PEER_LAG: &str = "tickshard_peer_lag_seconds";

/// Gauge: 1 while ready, 0 while starting or draining.
pub const READY: &str = "tickshard_ready";

/// A fixed-bucket latency histogram for the hot path: recording is one relaxed
/// atomic add (no allocation, no clock read), where the `metrics` crate's
/// Prometheus histograms store every sample. Rendered into `/metrics` as a
/// standard Prometheus histogram.
pub struct LatencyHistogram {
    counts: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: std::sync::atomic::AtomicU64,
}

/// Bucket upper bounds, µs (rendered in seconds).
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Publish request received → durable ack (the `PUBLISH_LATENCY` metric).
pub static PUBLISH_LATENCY_HISTOGRAM: LatencyHistogram = LatencyHistogram::new();

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub const fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: [const { std::sync::atomic::AtomicU64::new(0) }; LATENCY_BUCKETS_US.len() + 1],
            sum_us: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn record_us(&self, us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let b = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        self.counts[b].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Appends the Prometheus text exposition of this histogram.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            match LATENCY_BUCKETS_US.get(i) {
                Some(us) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *us as f64 / 1e6);
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = LatencyHistogram::new();
        for us in [10, 50, 51, 3_000, 2_000_000] {
            h.record_us(us);
        }
        let mut s = String::new();
        h.render("x_seconds", "test", &mut s);
        assert!(s.contains("x_seconds_bucket{le=\"0.00005\"} 2\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.0001\"} 3\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"0.005\"} 4\n"), "{s}");
        assert!(s.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{s}");
        assert!(s.contains("x_seconds_count 5\n"), "{s}");
    }
}
