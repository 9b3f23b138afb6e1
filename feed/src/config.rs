//! The command line: every flag has an env var (`TICKSHARD_*`), a default and a
//! doc line; `tickshard --help` is the reference. Parsed and validated into typed
//! config before any port is bound, with the bad flag named in the error.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{ArgAction, Args};
use tickshard_shard::{cluster::PeerTls, committer::CommitterConfig, node::NodeConfig, ownership, store::StoreOptions};

use crate::{
    auth::{Anonymous, AuthConfig},
    tls::TlsFiles,
};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTP + WebSocket listener (`/ws`, `/healthz`, `/readyz`, `/metrics`, `/`).
    #[arg(long, env = "TICKSHARD_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Public gRPC listener (`tickshard.v1.Feed`, health, reflection).
    #[arg(long, env = "TICKSHARD_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Shard-to-shard listener: the internal `Cluster` service only, never on
    /// the public port.
    #[arg(long, env = "TICKSHARD_PEER_ADDR", default_value = "0.0.0.0:50052")]
    pub peer_addr: SocketAddr,
    /// The shard's sled directory.
    #[arg(long, env = "TICKSHARD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Shard count N of a new cluster. A running cluster's committed count
    /// (kept in every pod's store) wins over it: change it with `tickshard
    /// admin rebalance --shards M`.
    #[arg(long, env = "TICKSHARD_SHARDS", default_value_t = 1)]
    pub shards: u32,
    /// This pod's shard id [default: the ordinal at the end of the hostname, else 0].
    #[arg(long, env = "TICKSHARD_SHARD_ID")]
    pub shard_id: Option<u32>,
    /// Peer address (`--peer-addr`) of every shard: a template with `{}` for
    /// the id (`http://tickshard-{}.tickshard-headless:50052`, `https://` with
    /// peer TLS) or a comma list ordered by shard id [default: this node only].
    #[arg(long, env = "TICKSHARD_PEERS")]
    pub peers: Option<String>,
    /// TLS certificate chain (PEM) of the public listeners: HTTPS/`wss://` and
    /// gRPC over TLS. Re-read when the file changes. Needs `--tls-key`.
    #[arg(long, env = "TICKSHARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, env = "TICKSHARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// This pod's certificate (PEM) for mutual TLS between pods: served on
    /// `--peer-addr` and presented when dialing peers (`https://` in
    /// `--peers`). Needs `--peer-tls-key` and `--peer-tls-ca`.
    #[arg(long, env = "TICKSHARD_PEER_TLS_CERT", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub peer_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--peer-tls-cert`.
    #[arg(long, env = "TICKSHARD_PEER_TLS_KEY", requires_all = ["peer_tls_cert", "peer_tls_ca"])]
    pub peer_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs every pod's peer certificate: a peer connection
    /// is accepted only with a client certificate it signed.
    #[arg(long, env = "TICKSHARD_PEER_TLS_CA", requires_all = ["peer_tls_cert", "peer_tls_key"])]
    pub peer_tls_ca: Option<PathBuf>,
    /// JWKS file (RS256, ES256, EdDSA public keys, chosen by `kid`) that
    /// verifies JWT bearer tokens; re-read when it changes.
    #[arg(long, env = "TICKSHARD_AUTH_JWKS")]
    pub auth_jwks: Option<PathBuf>,
    /// File holding an HS256 secret (at least 32 bytes) that verifies JWT
    /// bearer tokens; re-read when it changes.
    #[arg(long, env = "TICKSHARD_AUTH_HS256_SECRET_FILE")]
    pub auth_hs256_secret_file: Option<PathBuf>,
    /// Required `iss` of tokens [default: not checked].
    #[arg(long, env = "TICKSHARD_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Required `aud` of tokens [default: not checked].
    #[arg(long, env = "TICKSHARD_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// What callers without a token may do: none, subscribe (read every
    /// symbol) or all [default: all without a verification key, none with one].
    #[arg(long, env = "TICKSHARD_ANONYMOUS", value_enum)]
    pub anonymous: Option<Anonymous>,
    /// `Origin`s a WebSocket upgrade may come from, comma separated
    /// (`https://desk.example.com`); others get HTTP 403 [default: any].
    #[arg(long, env = "TICKSHARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// No built-in simulated market.
    #[arg(long, env = "TICKSHARD_NO_SIM", action = ArgAction::SetTrue)]
    pub no_sim: bool,
    /// Simulated ticks per second, over all simulated symbols.
    #[arg(long, env = "TICKSHARD_SIM_RATE", default_value_t = 200)]
    pub sim_rate: u32,
    /// Ticks retained per symbol (at least), for resume and GetHistory.
    #[arg(long, env = "TICKSHARD_HISTORY_TICKS", default_value_t = 100_000)]
    pub history_ticks: u64,
    /// Retention of 1s candles, back from the symbol's newest tick (s, m, h, d, y).
    #[arg(long, env = "TICKSHARD_RETAIN_CANDLES_1S", default_value = "24h", value_parser = parse_duration)]
    pub retain_candles_1s: Duration,
    /// Retention of 1m candles.
    #[arg(long, env = "TICKSHARD_RETAIN_CANDLES_1M", default_value = "30d", value_parser = parse_duration)]
    pub retain_candles_1m: Duration,
    /// Retention of 1h candles.
    #[arg(long, env = "TICKSHARD_RETAIN_CANDLES_1H", default_value = "5y", value_parser = parse_duration)]
    pub retain_candles_1h: Duration,
    /// How often retention runs, in milliseconds.
    #[arg(long, env = "TICKSHARD_PRUNE_INTERVAL_MS", default_value_t = 5_000)]
    pub prune_interval_ms: u64,
    /// sled page cache, in MiB.
    #[arg(long, env = "TICKSHARD_CACHE_MB", default_value_t = 256)]
    pub cache_mb: u64,
    /// How long shutdown spreads the WebSocket closes (1012), in milliseconds.
    #[arg(long, env = "TICKSHARD_DRAIN_MS", default_value_t = 5_000)]
    pub drain_ms: u64,
    /// Largest client message in bytes; a larger one closes the socket with 1009.
    #[arg(long, env = "TICKSHARD_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub max_message_bytes: usize,
    /// Symbol×channel subscriptions per WebSocket connection or gRPC Subscribe
    /// stream; also the most symbols one request may name.
    #[arg(long, env = "TICKSHARD_MAX_SUBSCRIPTIONS", default_value_t = 1_000)]
    pub max_subscriptions: usize,
    /// Client messages per second per connection (past it: `rate_limited`).
    #[arg(long, env = "TICKSHARD_MAX_CLIENT_RATE", default_value_t = NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN))]
    pub max_client_rate: NonZeroU32,
    /// Burst of client messages allowed above the rate.
    #[arg(long, env = "TICKSHARD_CLIENT_BURST", default_value_t = NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN))]
    pub client_burst: NonZeroU32,
    /// Unsent bytes per client before its data is conflated.
    #[arg(long, env = "TICKSHARD_CLIENT_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub client_queue_bytes: usize,
    /// A client still behind after this many milliseconds is closed with 1013.
    #[arg(long, env = "TICKSHARD_SLOW_CLIENT_MS", default_value_t = 10_000)]
    pub slow_client_ms: u64,
    /// Most queued bytes the fan-out writes straight to an idle plain-TCP
    /// WebSocket client (more is left to its writer task); 0: never.
    #[arg(long, env = "TICKSHARD_WS_DIRECT_WRITE_BYTES", default_value_t = 4_096)]
    pub ws_direct_write_bytes: usize,
    /// Server ping interval, in milliseconds.
    #[arg(long, env = "TICKSHARD_PING_INTERVAL_MS", default_value_t = 15_000)]
    pub ping_interval_ms: u64,
    /// A client silent for this long (no frame, no pong) is dropped, in milliseconds.
    #[arg(long, env = "TICKSHARD_IDLE_TIMEOUT_MS", default_value_t = 45_000)]
    pub idle_timeout_ms: u64,
    /// Concurrent subscribers: WebSocket connections and gRPC Subscribe streams
    /// (past it: HTTP 503 / RESOURCE_EXHAUSTED). Keep below the open-file limit.
    #[arg(long, env = "TICKSHARD_MAX_CONNECTIONS", default_value_t = 18_000)]
    pub max_connections: usize,
    /// Unsent bytes per peer follower stream before it is closed (the follower
    /// re-follows and resumes; peers are never conflated).
    #[arg(long, env = "TICKSHARD_PEER_QUEUE_BYTES", default_value_t = 64 << 20)]
    pub peer_queue_bytes: usize,
    /// Most symbols this shard holds; a publish or subscribe that would create
    /// one more is refused with `symbol_limit`.
    #[arg(long, env = "TICKSHARD_MAX_SYMBOLS", default_value_t = 100_000)]
    pub max_symbols: usize,
    /// A symbol created by a subscribe that never received a tick is forgotten
    /// once it is this old and has no subscriber (s, m, h, d).
    #[arg(long, env = "TICKSHARD_FORGET_UNTICKED_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub forget_unticked_after: Duration,
    /// A tick whose `ts` is more than this many milliseconds ahead of the
    /// owner's clock is `invalid_tick` (0 turns the check off).
    #[arg(long, env = "TICKSHARD_MAX_FUTURE_MS", default_value_t = 300_000)]
    pub max_future_ms: u64,
    /// Concurrent gRPC connections (a connection past it waits to be accepted).
    #[arg(long, env = "TICKSHARD_MAX_GRPC_CONNECTIONS", default_value_t = 1_024)]
    pub max_grpc_connections: usize,
    /// Concurrent streams per gRPC connection (HTTP/2 MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "TICKSHARD_GRPC_MAX_STREAMS", default_value_t = 1_024)]
    pub grpc_max_streams: u32,
    /// Reads (gRPC `GetSnapshot`, `GetHistory`, `ListSymbols`, and HTTP
    /// `/api/candles`) in flight at once; one more is refused at once with
    /// UNAVAILABLE or 503 (load shedding: retry with back-off) rather than
    /// queued behind the others.
    #[arg(long, env = "TICKSHARD_GRPC_MAX_READS", default_value_t = 256)]
    pub grpc_max_reads: usize,
    /// A gRPC connection that has not completed its HTTP/2 handshake within
    /// this many milliseconds is closed; a unary or server-streaming call
    /// whose request message has not arrived within it is answered
    /// DEADLINE_EXCEEDED.
    #[arg(long, env = "TICKSHARD_GRPC_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub grpc_handshake_timeout_ms: u64,
    /// A gRPC connection without an open stream for this many milliseconds is
    /// closed (clients reconnect on their next call).
    #[arg(long, env = "TICKSHARD_GRPC_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub grpc_idle_timeout_ms: u64,
    /// Pending connections each listener's kernel queue holds (the accept
    /// backlog; capped by `net.core.somaxconn`). A burst of connects past it
    /// waits for a SYN retry (a second).
    #[arg(long, env = "TICKSHARD_LISTEN_BACKLOG", default_value_t = 4_096)]
    pub listen_backlog: u32,
    /// An HTTP connection that has not sent a complete request head within
    /// this many milliseconds is closed.
    #[arg(long, env = "TICKSHARD_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,
    /// An HTTP connection idle between requests for this many milliseconds is closed.
    #[arg(long, env = "TICKSHARD_HTTP_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub http_idle_timeout_ms: u64,
    /// Unacked publishes in flight per gRPC Publish stream (backpressure past it).
    #[arg(long, env = "TICKSHARD_PUBLISH_WINDOW", default_value_t = 8_192)]
    pub publish_window: usize,
    /// Publish requests read and not yet answered, over all client streams
    /// (each stream also has its window): a client that never reads its
    /// acks holds at most this many answers of the server's memory, and
    /// publishers wait while it is all held.
    #[arg(long, env = "TICKSHARD_PUBLISH_MAX_IN_FLIGHT", default_value_t = 262_144)]
    pub publish_max_in_flight: usize,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,tickshard_feed=debug`).
    #[arg(long, env = "TICKSHARD_LOG", default_value = "info")]
    pub log: String,
}

/// Parses `90`, `90s`, `15m`, `24h`, `30d`, `5y` (a year is 365 days).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s, 15m, 24h, 30d, 5y"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "y" => 365 * 86_400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m, h, d or y)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// A configuration error, naming the flag.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

fn cfg_err(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        message: message.into(),
    }
}

/// The validated serve configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub node: NodeConfig,
    pub ws: WsLimits,
    /// Peer address of every shard, by shard id.
    pub peers: Vec<String>,
    /// TLS of the public listeners (`--tls-cert`/`--tls-key`).
    pub tls: Option<TlsFiles>,
    /// Mutual TLS of the peer listener (its `client_ca` is `--peer-tls-ca`).
    pub peer_tls: Option<TlsFiles>,
    pub auth: AuthConfig,
    pub allowed_origins: Option<Vec<String>>,
    pub sim: Option<u32>,
    pub drain: Duration,
    pub max_connections: usize,
    pub publish_window: usize,
    pub publish_max_in_flight: usize,
    pub grpc: GrpcLimits,
    pub http: HttpLimits,
}

/// Per-connection limits (contract §4), from the configuration.
#[derive(Clone, Debug)]
pub struct WsLimits {
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub max_client_rate: NonZeroU32,
    pub client_burst: NonZeroU32,
    pub slow_client: Duration,
    /// `--ws-direct-write-bytes`.
    pub direct_write_bytes: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
}

/// Bounds of the gRPC listener, from the configuration.
#[derive(Clone, Debug)]
pub struct GrpcLimits {
    /// Concurrent connections (`--max-grpc-connections`).
    pub max_connections: usize,
    /// Concurrent streams per connection (`--grpc-max-streams`).
    pub max_streams: u32,
    /// Reads in flight before the next is shed (`--grpc-max-reads`).
    pub max_reads: usize,
    /// Time to complete the HTTP/2 handshake (10 s, contract §5).
    pub handshake_timeout: Duration,
    /// Time for the one request message of a unary or server-streaming call
    /// to arrive (the handshake timeout on the public port; `None` on the
    /// peer port, where a long Forward stream may hold the connection's
    /// flow-control window and pods are trusted).
    pub request_timeout: Option<Duration>,
    /// A connection without an open stream this long is closed (gracefully;
    /// clients reconnect on their next call), so idle connections cannot
    /// hold the connection permits for ever.
    pub idle_timeout: Duration,
}

/// Bounds of plain HTTP connections (contract §7).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Time to send a complete request head.
    pub header_timeout: Duration,
    /// Time a connection may sit idle between requests.
    pub idle_timeout: Duration,
}

/// The longest `--drain-ms` (shutdown's arithmetic on it cannot overflow).
const MAX_DRAIN_MS: u64 = 3_600_000;

impl ServeArgs {
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        if self.shards == 0 {
            return Err(cfg_err("--shards", "must be at least 1"));
        }
        let shard_id = match self.shard_id {
            Some(id) => id,
            None => hostname()
                .as_deref()
                .and_then(ownership::ordinal_from_hostname)
                .unwrap_or(0),
        };
        let peer_tls = match (&self.peer_tls_cert, &self.peer_tls_key, &self.peer_tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(PeerTls {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        };
        let scheme = if peer_tls.is_some() { "https" } else { "http" };
        let peer_template = self.peers.clone().filter(|p| p.contains("{}"));
        let peers: Vec<String> = match &self.peers {
            None if self.shards == 1 => vec![format!("{scheme}://{}", self.peer_addr)],
            None => return Err(cfg_err("--peers", "required when --shards is above 1")),
            Some(p) if p.contains("{}") => (0..self.shards.max(shard_id + 1))
                .map(|i| p.replace("{}", &i.to_string()))
                .collect(),
            Some(p) => p.split(',').map(|s| s.trim().to_string()).collect(),
        };
        // A pod may be at an ordinal at or above the committed count (it owns
        // nothing until a rebalance gives it symbols, contract §9), but its
        // address must be known.
        let addressable = if peer_template.is_some() {
            tickshard_shard::placement::MAX_SHARDS
        } else {
            peers.len() as u32
        };
        if shard_id >= addressable {
            return Err(cfg_err(
                "--shard-id",
                format!(
                    "shard id {shard_id} (from {}) has no address in --peers ({} listed)",
                    if self.shard_id.is_some() {
                        "--shard-id"
                    } else {
                        "the hostname"
                    },
                    addressable
                ),
            ));
        }
        if let Some(bad) = peers
            .iter()
            .find(|p| !(p.starts_with("http://") || p.starts_with("https://")))
        {
            return Err(cfg_err(
                "--peers",
                format!("'{bad}' is not a URL like http://host:50052"),
            ));
        }
        if let Some(bad) = peers.iter().find(|p| !p.starts_with(&format!("{scheme}://"))) {
            return Err(cfg_err(
                "--peers",
                if peer_tls.is_some() {
                    format!("'{bad}' must be an https:// URL: peer links use mutual TLS (--peer-tls-cert)")
                } else {
                    format!(
                        "'{bad}' is https:// but peer TLS is not configured (--peer-tls-cert, --peer-tls-key, --peer-tls-ca)"
                    )
                },
            ));
        }
        if peers.len() < self.shards as usize {
            return Err(cfg_err(
                "--peers",
                format!("lists {} addresses but --shards is {}", peers.len(), self.shards),
            ));
        }
        if self.max_symbols == 0 {
            return Err(cfg_err("--max-symbols", "must be at least 1"));
        }
        if self.history_ticks == 0 {
            return Err(cfg_err("--history-ticks", "must be at least 1"));
        }
        if self.drain_ms > MAX_DRAIN_MS {
            return Err(cfg_err("--drain-ms", "must be at most 3600000 (an hour)"));
        }
        if self.max_message_bytes < 64 {
            return Err(cfg_err("--max-message-bytes", "must be at least 64"));
        }
        if self.client_queue_bytes < 4096 {
            return Err(cfg_err("--client-queue-bytes", "must be at least 4096"));
        }
        if self.ping_interval_ms == 0 || self.idle_timeout_ms <= self.ping_interval_ms {
            return Err(cfg_err(
                "--idle-timeout-ms",
                "must be above --ping-interval-ms (and both above 0)",
            ));
        }
        Ok(ServeConfig {
            node: NodeConfig {
                data_dir: self.data_dir.clone(),
                store: StoreOptions::for_history(self.cache_mb << 20, self.history_ticks),
                shard_id,
                shards: self.shards,
                history_ticks: self.history_ticks,
                candle_retention: [self.retain_candles_1s, self.retain_candles_1m, self.retain_candles_1h],
                prune_interval: Duration::from_millis(self.prune_interval_ms.max(10)),
                client_queue_bytes: self.client_queue_bytes,
                peers: peers.clone(),
                peer_template,
                peer_tls: peer_tls.clone(),
                peer_queue_bytes: self.peer_queue_bytes,
                committer: CommitterConfig {
                    max_symbols: self.max_symbols,
                    max_future: (self.max_future_ms > 0).then(|| Duration::from_millis(self.max_future_ms)),
                    forget_unticked_after: self.forget_unticked_after,
                },
            },
            ws: WsLimits {
                max_message_bytes: self.max_message_bytes,
                max_subscriptions: self.max_subscriptions,
                max_client_rate: self.max_client_rate,
                client_burst: self.client_burst,
                slow_client: Duration::from_millis(self.slow_client_ms),
                direct_write_bytes: self.ws_direct_write_bytes,
                ping_interval: Duration::from_millis(self.ping_interval_ms),
                idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            },
            peers,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: None,
                }),
                _ => None,
            },
            peer_tls: peer_tls.map(|t| TlsFiles {
                cert: t.cert,
                key: t.key,
                client_ca: Some(t.ca),
            }),
            auth: AuthConfig {
                jwks: self.auth_jwks.clone(),
                hs256_secret: self.auth_hs256_secret_file.clone(),
                issuer: self.auth_issuer.clone(),
                audience: self.auth_audience.clone(),
                anonymous: self.anonymous,
            },
            allowed_origins: self.allowed_origins.clone().map(|v| {
                v.into_iter()
                    .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                    .filter(|o| !o.is_empty())
                    .collect()
            }),
            sim: (!self.no_sim && self.sim_rate > 0).then_some(self.sim_rate),
            drain: Duration::from_millis(self.drain_ms),
            max_connections: self.max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            publish_window: self.publish_window.max(1),
            publish_max_in_flight: self.publish_max_in_flight.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            grpc: GrpcLimits {
                max_connections: self.max_grpc_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
                max_streams: self.grpc_max_streams.max(1),
                max_reads: self.grpc_max_reads.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
                handshake_timeout: Duration::from_millis(self.grpc_handshake_timeout_ms.max(1)),
                request_timeout: Some(Duration::from_millis(self.grpc_handshake_timeout_ms.max(1))),
                idle_timeout: Duration::from_millis(self.grpc_idle_timeout_ms.max(1)),
            },
            http: HttpLimits {
                header_timeout: Duration::from_millis(self.http_header_timeout_ms.max(1)),
                idle_timeout: Duration::from_millis(self.http_idle_timeout_ms.max(1)),
            },
        })
    }
}

/// The pod's hostname (Kubernetes sets it to the pod name).
/// This machine's (pod's) hostname.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// The serve flags as the binary parses them.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut v = vec!["tickshard", "--shard-id", "0"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().serve
    }

    #[test]
    fn a_drain_past_an_hour_is_refused() {
        assert!(args(&["--drain-ms", "3600000"]).validate().is_ok());
        let e = args(&["--drain-ms", "18446744073709551615"]).validate().unwrap_err();
        assert_eq!(e.flag, "--drain-ms");
    }

    #[test]
    fn defaults_follow_the_contract() {
        assert_eq!(args(&[]).listen_backlog, 4_096);
        let c = args(&[]).validate().unwrap();
        assert_eq!(c.node.history_ticks, 100_000);
        assert_eq!(c.drain, Duration::from_millis(5_000));
        assert_eq!(c.ws.max_message_bytes, 65_536);
        assert_eq!(c.ws.max_subscriptions, 1_000);
        assert_eq!(c.ws.max_client_rate.get(), 50);
        assert_eq!(c.node.client_queue_bytes, 4 << 20);
        assert_eq!(c.node.candle_retention[2], Duration::from_secs(5 * 365 * 86_400));
        assert!(c.sim.is_some());
        assert_eq!(c.peers, ["http://0.0.0.0:50052"], "one shard: its own peer port");
    }

    #[test]
    fn inconsistent_cluster_config_is_refused_with_the_flag_named() {
        let e = args(&["--shards", "3"]).validate().unwrap_err();
        assert_eq!(e.flag, "--peers");
        let e = Cli::try_parse_from(["tickshard", "--shards", "2", "--shard-id", "2", "--peers", "a,b"])
            .unwrap()
            .serve
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "--shard-id");
        let e = args(&["--shards", "3", "--peers", "http://a,http://b"])
            .validate()
            .unwrap_err();
        assert_eq!(e.flag, "--peers");
        let c = args(&["--shards", "3", "--peers", "http://ts-{}.h:50052"])
            .validate()
            .unwrap();
        assert_eq!(c.peers[2], "http://ts-2.h:50052");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
