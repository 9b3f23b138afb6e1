//! The generator's command line.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The system under test: `tickshard`, `nats` (nats-server with its
    /// websocket listener) or `naive` (the tokio-tungstenite broadcast baseline,
    /// `cargo bench --bench naive_ws`). Same workload, same measurements.
    #[arg(long, default_value = "tickshard", value_parser = ["tickshard", "nats", "naive"])]
    pub target: String,
    /// nats: the NATS TCP address publishers use.
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub nats: String,
    /// naive: the baseline's TCP address for JSON tick lines.
    #[arg(long, default_value = "127.0.0.1:19081")]
    pub naive_pub: String,
    /// WebSocket URLs of the servers under test (subscribers are spread over them).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", value_delimiter = ',')]
    pub ws: Vec<String>,
    /// gRPC URLs to publish to (publishers are spread over them).
    #[arg(long, default_value = "http://127.0.0.1:50051", value_delimiter = ',')]
    pub grpc: Vec<String>,
    /// WebSocket subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Symbols; every subscriber subscribes to all of them (or to a
    /// `--watchlist` of them).
    #[arg(long, default_value_t = 10)]
    pub symbols: usize,
    /// Each subscriber watches this many of the `--symbols`, drawn without
    /// replacement by popularity (`--zipf`); 0 = all of them.
    #[arg(long, default_value_t = 0)]
    pub watchlist: usize,
    /// Zipf exponent of symbol popularity (symbol `i` has weight
    /// `1/(i+1)^s`): drives the watchlists and each published tick's symbol.
    /// 0 = every symbol alike (publishers go round-robin).
    #[arg(long, default_value_t = 0.0)]
    pub zipf: f64,
    /// Seed of the watchlist and publish draws (the same seed gives every
    /// system under test the same workload).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Symbol name prefix (`BN0`, `BN1`, …).
    #[arg(long, default_value = "BN")]
    pub prefix: String,
    /// Use only symbols owned by this shard (with `--of`): compare a client on
    /// the owner pod with one on another pod.
    #[arg(long, requires = "of")]
    pub owned_by: Option<u32>,
    /// The shard count for `--owned-by`.
    #[arg(long)]
    pub of: Option<u32>,
    /// Ticks per second published in total; 0 = as fast as acks allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Parallel gRPC Publish streams.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Unacked publishes per stream.
    #[arg(long, default_value_t = 8192)]
    pub window: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Seconds the generator keeps reading after the window, so that ticks
    /// published inside it are counted when they arrive late.
    #[arg(long, default_value_t = 2)]
    pub grace: u64,
    /// Source addresses 127.0.0.1..=127.0.0.N for subscriber connections.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Subscribers that subscribe and then never read (slow consumers).
    #[arg(long, default_value_t = 0)]
    pub slow: usize,
    /// Only connect idle subscribers (no symbols, no publishing): connection rate and RSS.
    #[arg(long)]
    pub idle: bool,
    /// Server process id, for its CPU and RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Concurrent connection attempts while setting up subscribers.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Bearer token (JWT) for every connection and stream.
    #[arg(long, env = "TICKSHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificates (PEM) that verify `wss://` and `https://` servers.
    #[arg(long, env = "TICKSHARD_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
}
