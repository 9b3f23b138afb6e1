//! The client sub-commands: `tail`, `publish`, `replay`, on the client
//! library.

use std::{
    io::Write as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use rust_decimal::prelude::ToPrimitive as _;
use tickshard_client::{
    ClientError,
    input::{Columns, InputSpec, TickReader, TsUnit},
    publisher::{Acked, Publisher, PublisherConfig},
    ws::{Event, ServerMsg, Subscriber, SubscriberConfig},
};
use tickshard_shard::domain::{Decimal, now_micros, parse_decimal};

use crate::args::{PublishArgs, ReplayArgs, TailArgs};

/// Writes a line to stderr (the binary's user-facing errors).
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

/// `1732530000123456` → `2024-11-25T10:20:00.123456Z`
pub fn format_ts(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil_from_days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The CAs of `--ca-cert`, if given.
fn trust_of(ca_cert: Option<&std::path::Path>) -> Result<Option<tickshard_client::tls::Trust>, ExitCode> {
    ca_cert
        .map(tickshard_client::tls::Trust::from_pem_file)
        .transpose()
        .map_err(|e| {
            say!("tickshard: {e}");
            ExitCode::from(2)
        })
}

pub async fn tail(a: TailArgs) -> ExitCode {
    let trust = match trust_of(a.ca_cert.as_deref()) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let sub = Subscriber::new(SubscriberConfig {
        urls: a.url.clone(),
        symbols: a.symbols.clone(),
        channels: a.channels.clone(),
        connect_timeout: Duration::from_secs(3),
        silence: tickshard_client::ws::SILENCE,
        token: a.token.clone(),
        trust: trust.clone(),
    });
    let mut sub = match sub {
        Ok(s) => s,
        Err(e) => {
            say!("tickshard: {e}");
            return ExitCode::from(2);
        }
    };
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    loop {
        let line = match sub.next().await {
            Event::Connected { url } => {
                say!("tail: connected to {url}");
                continue;
            }
            // 1002, 1007, 1008, 1009: "fix the client first" (contract §4);
            // the same request and token would only be closed again.
            Event::Disconnected {
                code: Some(c @ (1002 | 1007 | 1008 | 1009)),
                reason,
            } => {
                say!("tail: the server closed the connection with {c}: {reason}");
                return ExitCode::from(2);
            }
            Event::Disconnected { code, reason } => {
                say!(
                    "tail: disconnected ({}): {reason}; reconnecting and resuming",
                    code.map_or("-".into(), |c| c.to_string())
                );
                continue;
            }
            // Checked before `--json`: an error no retry fixes (a bad channel
            // or symbol, too many of them, a token that does not allow them)
            // ends the command instead of leaving it waiting for good.
            Event::Message(ServerMsg::Error { code, message, .. }) => {
                say!("tail: server error {code}: {message}");
                // (`client_parse`: a message this build cannot read, say of a
                // newer server: not the subscription's fault)
                if !matches!(code.as_str(), "unavailable" | "rate_limited" | "client_parse") {
                    return ExitCode::from(2);
                }
                if !a.json {
                    continue;
                }
                sub.raw().to_owned()
            }
            Event::Message(m) if a.json => {
                if matches!(m, ServerMsg::Tick(_) | ServerMsg::Snapshot(_)) {
                    seen += 1;
                }
                sub.raw().to_owned()
            }
            Event::Message(ServerMsg::Tick(t)) | Event::Message(ServerMsg::Snapshot(t)) => {
                seen += 1;
                format!(
                    "{:<12} #{:<8} {:>14} x {:<12} bid {:>14} ask {:>14}  {}{}",
                    t.symbol,
                    t.seq,
                    t.price,
                    t.size,
                    t.bid.as_deref().unwrap_or("-"),
                    t.ask.as_deref().unwrap_or("-"),
                    format_ts(t.ts),
                    if t.epoch.is_some() {
                        if t.conflated {
                            "  (snapshot, conflated)"
                        } else {
                            "  (snapshot)"
                        }
                    } else {
                        ""
                    }
                )
            }
            Event::Message(ServerMsg::Candle(c)) => format!(
                "{:<12} {} {} O {} H {} L {} C {} V {} n {}{}",
                c.symbol,
                c.interval,
                format_ts(c.start),
                c.open,
                c.high,
                c.low,
                c.close,
                c.volume,
                c.count,
                if c.closed { " closed" } else { "" }
            ),
            Event::Message(ServerMsg::Subscribed { symbols, .. }) => symbols
                .iter()
                .map(|s| {
                    format!(
                        "subscribed {} epoch {} seq {} recovered {}",
                        s.symbol, s.epoch, s.seq, s.recovered
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Event::Message(_) => continue,
        };
        if writeln!(out, "{line}").is_err() {
            return ExitCode::SUCCESS; // stdout closed (e.g. piped to head)
        }
        if a.count > 0 && seen >= a.count {
            return ExitCode::SUCCESS;
        }
    }
}

pub async fn replay(a: ReplayArgs) -> ExitCode {
    let speed = if a.speed == "max" {
        None
    } else {
        match parse_decimal(&a.speed).filter(|s| *s > Decimal::ZERO) {
            Some(s) => Some(s),
            None => {
                say!("replay: --speed must be a positive number or 'max', not '{}'", a.speed);
                return ExitCode::from(2);
            }
        }
    };
    publish(a.publish, Some((speed, a.now))).await
}

/// `publish` (pace = None) and `replay` (pace = speed, shift-to-now).
pub async fn publish(a: PublishArgs, pace: Option<(Option<Decimal>, bool)>) -> ExitCode {
    let Some(ts_unit) = TsUnit::parse(&a.ts_unit) else {
        say!("publish: unknown --ts-unit {}", a.ts_unit);
        return ExitCode::from(2);
    };
    let spec = InputSpec {
        ndjson: InputSpec::detect(&a.file, a.format.as_deref()),
        symbol: a.symbol.clone(),
        columns: Columns {
            symbol: a.col_symbol.clone(),
            ts: a.col_ts.clone(),
            price: a.col_price.clone(),
            size: a.col_size.clone(),
            bid: a.col_bid.clone(),
            ask: a.col_ask.clone(),
            bid_size: a.col_bid_size.clone(),
            ask_size: a.col_ask_size.clone(),
        },
        ts_unit,
    };
    let publisher_id = match &a.publisher_id {
        Some(id) => {
            if let Err(e) = tickshard_shard::domain::validate_publisher_id(id) {
                say!("publish: --publisher-id: {e}");
                return ExitCode::from(2);
            }
            id.clone()
        }
        None => match default_publisher_id(&a.file, &spec, pace.is_some_and(|(_, now)| now)) {
            Ok(id) => id,
            Err(e) => {
                say!("publish: {}: {e}", a.file.display());
                return ExitCode::from(2);
            }
        },
    };
    let reader = match TickReader::open(&a.file, spec) {
        Ok(r) => r,
        Err(e) => {
            say!("publish: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cfg = PublisherConfig::new(a.grpc.clone(), publisher_id);
    cfg.give_up_after = a.give_up_after;
    cfg.token = a.token.clone();
    cfg.trust = match trust_of(a.ca_cert.as_deref()) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let mut p = match Publisher::connect(cfg).await {
        Ok(p) => p,
        Err(e) => {
            say!("publish: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let (mut sent, mut accepted, mut dups, mut rejected, mut bad_rows) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut first: Option<(i64, tokio::time::Instant, i64)> = None;
    let mut count = |ack: Acked, rejected: &mut u64| {
        if let Some((code, msg)) = &ack.error {
            *rejected += 1;
            if *rejected <= 10 {
                say!(
                    "publish: request {} ({}) rejected: {code}: {msg}",
                    ack.request_id,
                    ack.symbol
                );
            }
        } else if ack.duplicate {
            dups += 1;
        } else {
            accepted += 1;
        }
    };
    let mut reader = reader;
    for row in reader.by_ref() {
        let mut tick = match row {
            Ok(t) => t,
            Err(e) => {
                bad_rows += 1;
                say!("publish: {}: {e}", a.file.display());
                if a.skip_invalid {
                    continue;
                }
                return ExitCode::from(2);
            }
        };
        if let Some((speed, now)) = pace {
            let (ts0, t0, shift) = *first.get_or_insert_with(|| {
                (
                    tick.ts_micros,
                    tokio::time::Instant::now(),
                    now_micros() - tick.ts_micros,
                )
            });
            if let Some(speed) = speed {
                let due = (Decimal::from((tick.ts_micros - ts0).max(0)) / speed)
                    .to_u64()
                    .unwrap_or(0);
                tokio::time::sleep_until(t0 + Duration::from_micros(due)).await;
            }
            if now {
                tick.ts_micros += shift;
            }
        }
        match p.send(tick).await {
            Ok(_) => {}
            // (a tick over the request bound: a bad row like any other)
            Err(e @ ClientError::Input(_)) => {
                bad_rows += 1;
                say!("publish: {}: {e}", a.file.display());
                if !a.skip_invalid {
                    return ExitCode::from(2);
                }
                continue;
            }
            Err(e) => {
                say!("publish: {e}");
                return ExitCode::FAILURE;
            }
        }
        sent += 1;
        while let Some(ack) = p.try_ack() {
            count(ack, &mut rejected);
        }
    }
    // The file itself failed to read (its error was the last row, and ends
    // them): what was sent is flushed and reported, and the run fails even
    // with --skip-invalid, which skips bad rows, not a file cut short.
    let read_failed = reader.read_failed();
    match p.flush().await {
        Ok(acks) => acks.into_iter().for_each(|ack| count(ack, &mut rejected)),
        Err(e) => {
            say!("publish: {e}");
            return ExitCode::FAILURE;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    say!(
        "publish: {sent} sent, {accepted} accepted, {dups} duplicates, {rejected} rejected, {bad_rows} unreadable rows, {secs:.2} s ({:.0} ticks/s), {} reconnects",
        sent as f64 / secs.max(1e-9),
        p.reconnects
    );
    if read_failed || (rejected > 0 && !a.skip_invalid) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The lines of a file's head that name it in its default publisher id (a
/// CSV header and the first row, or an NDJSON file's first two rows), and
/// the most bytes read for them.
const ID_HEAD_LINES: usize = 2;
const ID_HEAD_BYTES: u64 = 64 << 10;

/// The publisher id of a file's run: `file:<hash>:<name>`, the hash over
/// the file's first [`ID_HEAD_LINES`] and the settings that shape its ticks.
/// Running the same file again, or the same file grown by appended rows,
/// stores nothing twice (each symbol's `publisher_seq` goes on where the
/// rows are the same), while another file of the same name (the next day's
/// `trades.csv`, whose first trade differs) is a publisher of its own. With `--now` (timestamps shifted
/// to the run's start) each run makes new ticks: its start is hashed too.
/// A file that cannot be read twice (a pipe) needs `--publisher-id`.
fn default_publisher_id(path: &std::path::Path, spec: &InputSpec, now: bool) -> Result<String, String> {
    use std::io::Read as _;
    // (asked before opening it: opening a named pipe would wait for a writer)
    if !std::fs::metadata(path).map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file (its rows can be read only once): give --publisher-id".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    file.take(ID_HEAD_BYTES)
        .read_to_end(&mut head)
        .map_err(|e| e.to_string())?;
    let end = head
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(ID_HEAD_LINES - 1)
        .map_or(head.len(), |(i, _)| i + 1);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&head[..end]);
    let symbol = spec.symbol.as_deref().map(str::to_ascii_uppercase).unwrap_or_default();
    let settings = [if spec.ndjson { "ndjson" } else { "csv" }, &symbol, spec.ts_unit.name()];
    for o in settings.into_iter().chain(spec.columns.names()) {
        // (length-prefixed: no two option lists hash alike by shifting text)
        h.update(&(o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    if now {
        h.update(&now_micros().to_le_bytes());
    }
    let name = path
        .file_name()
        .map_or("-".into(), |f| f.to_string_lossy().into_owned());
    // (printable ASCII, cut to the id's 128 bytes: the hash comes first)
    Ok(tickshard_shard::domain::publisher_id_from(&format!(
        "file:{:016x}:{name}",
        h.digest()
    )))
}

/// `tickshard token`: prints an HS256 token for the server's secret.
pub fn token(a: crate::args::TokenArgs) -> ExitCode {
    let secret = match std::fs::read(&a.secret_file) {
        Ok(s) => s,
        Err(e) => {
            say!("token: {}: {e}", a.secret_file.display());
            return ExitCode::FAILURE;
        }
    };
    let claims = tickshard_feed::auth::MintClaims {
        sub: a.sub,
        exp: tickshard_feed::auth::now_secs().saturating_add(a.ttl.as_secs()),
        iss: a.issuer,
        aud: a.audience,
        subscribe: a.subscribe,
        publish: a.publish,
    };
    match tickshard_feed::auth::mint_hs256(&secret, &claims) {
        Ok(t) => {
            let _ = writeln!(std::io::stdout().lock(), "{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say!("token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tickshard admin`: status and rebalance through a pod's peer port (contract §9).
pub async fn admin(a: crate::args::AdminArgs) -> ExitCode {
    use tickshard_client::admin::{Admin, PeerCredentials, Status};
    let tls = a.peer_tls_cert.is_some();
    let url = match &a.peer {
        Some(p) if p.contains("://") => p.clone(),
        Some(p) => format!("{}://{p}", if tls { "https" } else { "http" }),
        // (this pod's own peer listener: on loopback when it listens on
        // every address, else on the address it is bound to)
        None => {
            let ip = match a.peer_addr.ip() {
                ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
                ip => ip,
            };
            format!(
                "{}://{}",
                if tls { "https" } else { "http" },
                std::net::SocketAddr::new(ip, a.peer_addr.port())
            )
        }
    };
    let creds = match (&a.peer_tls_cert, &a.peer_tls_key, &a.peer_tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(PeerCredentials {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: a.peer_tls_name.clone().unwrap_or_else(|| {
                let host_of = |url: &str| {
                    let authority = url.split_once("://").map_or(url, |(_, r)| r);
                    tickshard_client::tls::host_of(authority.split('/').next().unwrap_or(authority)).to_string()
                };
                let host = host_of(&url);
                if host.parse::<std::net::IpAddr>().is_err() {
                    return host;
                }
                // On loopback: the name this pod's certificate has, its host
                // in the --peers template (what its peers dial).
                let me = a.shard_id.or_else(|| {
                    tickshard_feed::config::hostname()
                        .as_deref()
                        .and_then(tickshard_shard::ownership::ordinal_from_hostname)
                });
                match (a.peers.as_deref().filter(|p| p.contains("{}")), me) {
                    (Some(t), Some(id)) => host_of(&t.replace("{}", &id.to_string())),
                    _ => "localhost".to_string(),
                }
            }),
        }),
        _ => None,
    };
    let mut admin = match Admin::connect(&url, creds.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            say!("admin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let print = |s: &Status| {
        let mut out = String::new();
        match s.target_shards {
            Some(t) => out.push_str(&format!(
                "committed shards: {}, moving to {t}: {} symbol moves left\n",
                s.committed_shards,
                s.moves_left.len()
            )),
            None => out.push_str(&format!(
                "committed shards: {} (no rebalance in progress)\n",
                s.committed_shards
            )),
        }
        for m in &s.moves_left {
            out.push_str(&format!("  {} {} -> {}\n", m.symbol, m.from, m.to));
        }
        if !s.unreachable.is_empty() {
            out.push_str(&format!("unreachable shards: {:?}\n", s.unreachable));
        }
        if let Some(e) = &s.error {
            out.push_str(&format!("last error: {e}\n"));
        }
        let _ = write!(std::io::stdout().lock(), "{out}");
    };
    match a.command {
        crate::args::AdminCommand::Status { json } => match admin.status().await {
            Ok(s) if json => {
                let _ = writeln!(std::io::stdout().lock(), "{}", s.to_json());
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print(&s);
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("admin status: {e}");
                ExitCode::FAILURE
            }
        },
        crate::args::AdminCommand::Rebalance {
            shards,
            no_wait,
            timeout,
        } => {
            let first = match admin.rebalance(shards).await {
                Ok(s) => s,
                Err(e) => {
                    say!("admin rebalance: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if first.target_shards.is_none() && first.committed_shards == shards {
                say!("the cluster has {shards} shards");
                return ExitCode::SUCCESS;
            }
            say!(
                "rebalance {} -> {shards} started: {} symbol moves",
                first.committed_shards,
                first.moves_left.len()
            );
            if no_wait {
                return ExitCode::SUCCESS;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut last_left = usize::MAX;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                let s = match admin.status().await {
                    Ok(s) => s,
                    Err(e) => {
                        say!("admin rebalance: status: {e} (retrying)");
                        if tokio::time::Instant::now() > deadline {
                            return ExitCode::FAILURE;
                        }
                        continue;
                    }
                };
                match s.target_shards {
                    None if s.committed_shards == shards => {
                        say!("rebalance committed: {shards} shards");
                        return ExitCode::SUCCESS;
                    }
                    None => {
                        say!(
                            "the rebalance was rolled back: the cluster has {} shards ({})",
                            s.committed_shards,
                            s.error.as_deref().unwrap_or("no reason recorded")
                        );
                        return ExitCode::FAILURE;
                    }
                    Some(t) if t != shards => {
                        say!("another rebalance (to {t} shards) replaced this one");
                        return ExitCode::FAILURE;
                    }
                    Some(_) => {}
                }
                if s.moves_left.len() != last_left {
                    last_left = s.moves_left.len();
                    say!("{last_left} symbol moves left");
                }
                if tokio::time::Instant::now() > deadline {
                    say!(
                        "admin rebalance: not committed after {timeout:?} (it goes on; see `tickshard admin status`){}",
                        s.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format_ts;

    #[test]
    fn formats_utc() {
        assert_eq!(format_ts(1_732_530_000_123_456), "2024-11-25T10:20:00.123456Z");
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_ts(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
    }
}
