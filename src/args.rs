//! The `tickshard` command line: `serve` (the default) and the client
//! sub-commands. Every flag has an env var or a default and a doc line;
//! `tickshard --help` is the reference.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tickshard_feed::config::ServeArgs;
use tickshard_loadgen::BenchArgs;

#[derive(Debug, Parser)]
#[command(
    name = "tickshard",
    version,
    about = "A sharded, durable real-time market-data feed (WebSocket + gRPC).",
    long_about = "A sharded, durable real-time market-data feed (WebSocket + gRPC).\n\n\
                  With no sub-command it serves: a one-shard cluster with a simulated market by default.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once at start")]
pub enum Command {
    /// Serve (the default when no sub-command is given).
    Serve(ServeArgs),
    /// Print live ticks of some symbols, reconnecting and resuming on failure.
    Tail(TailArgs),
    /// Publish a CSV or NDJSON file of ticks through gRPC, as fast as acks allow.
    Publish(PublishArgs),
    /// Replay a CSV or NDJSON file of ticks at its recorded pace (or ×N).
    Replay(ReplayArgs),
    /// Load generator: subscribers + publishers against running servers.
    Bench(BenchArgs),
    /// Mint an HS256 token from a secret file (for operators and tests).
    Token(TokenArgs),
    /// Operate a running cluster through a pod's peer port: `status`, `rebalance`.
    Admin(AdminArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub command: AdminCommand,
    /// The pod to ask: a peer URL (`http://tickshard-0.tickshard-headless:50052`)
    /// [default: this pod's own --peer-addr on loopback].
    #[arg(long, global = true)]
    pub peer: Option<String>,
    /// This pod's peer listener (the default --peer is its port on 127.0.0.1).
    #[arg(long, env = "TICKSHARD_PEER_ADDR", default_value = "0.0.0.0:50052", global = true)]
    pub peer_addr: std::net::SocketAddr,
    /// The pod's peer certificate (PEM): admin calls use mutual TLS when the
    /// cluster does (the same TICKSHARD_PEER_TLS_* variables as the server).
    #[arg(long, env = "TICKSHARD_PEER_TLS_CERT", global = true, requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub peer_tls_cert: Option<PathBuf>,
    #[arg(long, env = "TICKSHARD_PEER_TLS_KEY", global = true)]
    pub peer_tls_key: Option<PathBuf>,
    #[arg(long, env = "TICKSHARD_PEER_TLS_CA", global = true)]
    pub peer_tls_ca: Option<PathBuf>,
    /// The name the pod's certificate is checked against [default: the
    /// host of --peer; on loopback, this pod's host in the --peers template
    /// (its hostname's ordinal), else `localhost`].
    #[arg(long, global = true)]
    pub peer_tls_name: Option<String>,
    /// The server's --peers (for the default --peer-tls-name).
    #[arg(long, env = "TICKSHARD_PEERS", global = true, hide = true)]
    pub peers: Option<String>,
    /// The server's --shard-id (for the default --peer-tls-name).
    #[arg(long, env = "TICKSHARD_SHARD_ID", global = true, hide = true)]
    pub shard_id: Option<u32>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// The committed shard count, the one in progress and each symbol move left.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Moves the cluster to `--shards` shards (scale up: `kubectl scale` first;
    /// scale down: this first). Waits until the count is committed.
    Rebalance {
        /// The new shard count.
        #[arg(long)]
        shards: u32,
        /// Return once the rebalance started.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long (the rebalance goes on): 90s, 15m.
        #[arg(long, default_value = "30m", value_parser = tickshard_feed::config::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The HS256 secret file (the server's --auth-hs256-secret-file).
    #[arg(long, env = "TICKSHARD_AUTH_HS256_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// The caller's identity (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Symbol patterns it may read, comma separated (`BTC-USD,EQ.*`; `*`: all).
    #[arg(long, value_delimiter = ',')]
    pub subscribe: Vec<String>,
    /// Symbol patterns it may publish, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,
    /// Lifetime: 90s, 15m, 24h, 30d.
    #[arg(long, default_value = "1h", value_parser = tickshard_feed::config::parse_duration)]
    pub ttl: std::time::Duration,
    /// `iss` claim (the server's --auth-issuer).
    #[arg(long)]
    pub issuer: Option<String>,
    /// `aud` claim (the server's --auth-audience).
    #[arg(long)]
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Symbols to follow.
    #[arg(required = true)]
    pub symbols: Vec<String>,
    /// WebSocket URLs to connect to, comma separated; on failure the next one is tried.
    #[arg(
        long,
        env = "TICKSHARD_URL",
        default_value = "ws://127.0.0.1:8080/ws",
        value_delimiter = ','
    )]
    pub url: Vec<String>,
    /// Channels: ticks, candles:1s, candles:1m, candles:1h.
    #[arg(long, default_value = "ticks", value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Print the raw JSON frames instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many ticks (0 = never).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Bearer token (JWT) for servers that require one.
    #[arg(long, env = "TICKSHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificates (PEM) that verify a `wss://` server.
    #[arg(long, env = "TICKSHARD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The file: CSV with a header row, or NDJSON (one object per line).
    pub file: PathBuf,
    /// gRPC endpoints, comma separated; on failure the next one is tried.
    #[arg(
        long,
        env = "TICKSHARD_GRPC",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    pub grpc: Vec<String>,
    /// File format [default: from the extension: .csv, .ndjson/.jsonl].
    #[arg(long, value_parser = ["csv", "ndjson"])]
    pub format: Option<String>,
    /// The symbol of every row, for files without a symbol column.
    #[arg(long)]
    pub symbol: Option<String>,
    /// Column (or NDJSON field) holding the symbol.
    #[arg(long, default_value = "symbol")]
    pub col_symbol: String,
    /// Column holding the exchange timestamp.
    #[arg(long, default_value = "ts")]
    pub col_ts: String,
    /// Unit of the timestamp column: us, ms, s or ns.
    #[arg(long, default_value = "us", value_parser = ["us", "ms", "s", "ns"])]
    pub ts_unit: String,
    /// Column holding the price.
    #[arg(long, default_value = "price")]
    pub col_price: String,
    /// Column holding the size.
    #[arg(long, default_value = "size")]
    pub col_size: String,
    /// Optional columns (absent or empty = no value).
    #[arg(long, default_value = "bid")]
    pub col_bid: String,
    #[arg(long, default_value = "ask")]
    pub col_ask: String,
    #[arg(long, default_value = "bid_size")]
    pub col_bid_size: String,
    #[arg(long, default_value = "ask_size")]
    pub col_ask_size: String,
    /// Stable publisher id for de-duplication [default: derived from the
    /// file's name and content, and for `replay --now` from the run's start].
    #[arg(long)]
    pub publisher_id: Option<String>,
    /// Give up (exit 1) after this long without an ack, or without any server
    /// taking the stream while reconnecting; 0 = never.
    #[arg(long, default_value = "5m", value_parser = tickshard_feed::config::parse_duration)]
    pub give_up_after: std::time::Duration,
    /// Skip rows that fail validation instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Bearer token (JWT) for servers that require one.
    #[arg(long, env = "TICKSHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificates (PEM) that verify an `https://` server.
    #[arg(long, env = "TICKSHARD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub publish: PublishArgs,
    /// Pace: 1 = recorded speed, 10 = ten times faster, `max` = as fast as acks allow.
    #[arg(long, default_value = "1")]
    pub speed: String,
    /// Shift timestamps so the first row is "now" (keeps candles live on the dashboard).
    #[arg(long)]
    pub now: bool,
}
