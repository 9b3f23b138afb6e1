//! Logging (tracing, structured, to stderr) and the Prometheus recorder.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tickshard_shard::metrics as m;
use tracing_subscriber::EnvFilter;

/// Structured logs to stderr, filtered by `filter` (EnvFilter syntax).
pub fn init_tracing(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init();
}

/// Installs the global metrics recorder; latency metrics are real histograms.
pub fn init_metrics() -> Result<PrometheusHandle, String> {
    const SECONDS: &[f64] = &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ];
    const BATCH: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(m::COMMIT_BATCH.into()), BATCH))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        m::TICKS_ACCEPTED,
        "Ticks accepted (durable and acked) by this shard as owner."
    );
    describe_counter!(m::TICKS_REJECTED, "Ticks rejected, by error code.");
    describe_counter!(
        m::TICKS_DUPLICATE,
        "Publishes recognised as retries and not stored again."
    );
    describe_counter!(
        m::LATE_TICKS,
        "Ticks older than their symbol's current candle interval."
    );
    describe_histogram!(
        m::PUBLISH_LATENCY,
        metrics::Unit::Seconds,
        "Publish request received to durable ack."
    );
    describe_histogram!(
        m::FLUSH_LATENCY,
        metrics::Unit::Seconds,
        "sled flush of one group commit."
    );
    describe_histogram!(m::COMMIT_BATCH, "Ticks per group commit.");
    describe_counter!(
        m::COMPACTIONS,
        "Symbols compacted: their logged ticks written as tick blocks and their state snapshotted."
    );
    describe_counter!(
        m::STORE_WRITTEN,
        metrics::Unit::Bytes,
        "Bytes of log records (kind=log) and tick blocks (kind=blocks) committed to the store."
    );
    describe_gauge!(m::OWNED_SYMBOLS, "Symbols with state on this shard.");
    describe_counter!(m::PRUNED_TICKS, "Ticks removed by retention.");
    describe_gauge!(m::STORE_BYTES, metrics::Unit::Bytes, "Bytes sled uses on disk.");
    describe_gauge!(m::CLIENTS_CONNECTED, "Connected subscribers, by protocol.");
    describe_counter!(m::MESSAGES_SENT, "Messages sent to subscribers, by protocol.");
    describe_counter!(
        m::BYTES_SENT,
        metrics::Unit::Bytes,
        "Bytes sent to subscribers, by protocol."
    );
    describe_counter!(m::CONFLATIONS, "Times a client fell behind and its data was conflated.");
    describe_counter!(m::SLOW_CLIENT_CLOSES, "Clients closed with 1013 for staying behind.");
    describe_gauge!(
        m::PUBLISH_IN_FLIGHT,
        "Client publish requests read and not yet answered to their client (of --publish-max-in-flight)."
    );
    describe_counter!(
        m::SLOW_PUBLISHERS,
        "gRPC connections closed because a publisher holding some of --publish-max-in-flight stopped reading its acks."
    );
    describe_gauge!(
        m::CLIENT_QUEUE_PEAK,
        metrics::Unit::Bytes,
        "Highest unsent bytes one client reached."
    );
    describe_counter!(
        m::GRPC_SHED,
        "Reads (gRPC, and /api/candles) refused at once because --grpc-max-reads were in flight, by method."
    );
    describe_counter!(m::CLIENT_ERRORS, "Errors sent to WebSocket clients, by code.");
    describe_gauge!(m::READY, "1 while ready, 0 while starting or draining.");
    describe_gauge!(m::PEER_UP, "1 while the link to a peer shard is up, by peer.");
    describe_gauge!(
        m::PEER_LAG,
        metrics::Unit::Seconds,
        "Follow lag behind a peer shard, by peer."
    );
}
