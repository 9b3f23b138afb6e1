//! `tickshard bench`: an end-to-end load generator.
//!
//! Opens C WebSocket subscribers (spread over 127.0.0.x source addresses), each
//! subscribed to the same S symbols, publishes through K gRPC Publish streams at
//! P ticks/s (or as fast as acks allow), and reports deliveries/s, publish→receive
//! latency (the publish wall-clock time travels in `ts`), ack latency, bytes/s,
//! gaps, conflations, connection setup rate and the CPU and RSS of the server and
//! of the generator itself (from `/proc`). Subscribers scan frames for `seq` and
//! `ts` instead of parsing them, so the generator stays cheap next to the server.
#![allow(
    clippy::disallowed_methods,
    reason = "the load generator is a client: its tasks are not the server's to drain"
)]

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use hdrhistogram::Histogram;
use tickshard_proto::v1::{self as pb, feed_client::FeedClient};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

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
    /// Symbols; every subscriber subscribes to all of them.
    #[arg(long, default_value_t = 10)]
    pub symbols: usize,
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
}

fn now_us() -> u64 {
    tickshard_shard::domain::now_micros().max(0) as u64
}

fn hist() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits: constant, valid bounds
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
fn proc_usage(pid: &str) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 of stat (utime, stime), in clock ticks (100/s on Linux)
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks as f64 / 100.0, rss_kb * 1024))
}

/// One subscriber's counters and latency histogram.
type SubResult = (SubStats, Histogram<u64>);

#[derive(Default)]
struct SubStats {
    deliveries: u64,
    bytes: u64,
    gaps: u64,
    conflated: u64,
    closed: bool,
}

/// Parses the digits at the start of `p`.
fn digits(p: &[u8]) -> (u64, usize) {
    let mut n = 0u64;
    let mut i = 0;
    while let Some(&c) = p.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        n = n * 10 + u64::from(c - b'0');
        i += 1;
    }
    (n, i)
}

const TICK_HEAD: &[u8] = b"{\"type\":\"tick\",\"symbol\":\"";
const SNAP_HEAD: &[u8] = b"{\"type\":\"snapshot\",\"symbol\":\"";

/// A subscriber's view of one text frame: count, latency, gap check. Frames
/// are scanned by position (the server's field order is fixed), not parsed.
fn on_frame(p: &[u8], prefix: &[u8], last: &mut [u64], st: &mut SubStats, h: &mut Histogram<u64>, rec: bool) {
    let (is_tick, rest) = if let Some(r) = p.strip_prefix(TICK_HEAD) {
        (true, r)
    } else if let Some(r) = p.strip_prefix(SNAP_HEAD) {
        (false, r)
    } else {
        return;
    };
    // <prefix><idx>","epoch":"…" (snapshots) or <prefix><idx>","seq":N,"ts":T
    let Some(rest) = rest.strip_prefix(prefix) else { return };
    let (idx, n) = digits(rest);
    let mut rest = &rest[n..];
    if !is_tick {
        // skip ","epoch":"xxxxxxxxxxxx"
        rest = rest.get(24..).unwrap_or_default();
    }
    let Some(rest) = rest
        .strip_prefix(b"\",\"seq\":".as_slice())
        .or_else(|| rest.strip_prefix(b",\"seq\":".as_slice()))
    else {
        return;
    };
    let (seq, n) = digits(rest);
    if let Some(l) = last.get_mut(idx as usize) {
        if is_tick && *l != 0 && seq != *l + 1 {
            st.gaps += 1;
        }
        *l = seq;
    }
    if !is_tick {
        if p.ends_with(b"\"conflated\":true}") {
            st.conflated += 1;
        }
        return;
    }
    if rec {
        st.deliveries += 1;
        st.bytes += p.len() as u64;
        if let Some(ts) = rest[n..].strip_prefix(b",\"ts\":".as_slice()) {
            let _ = h.record(now_us().saturating_sub(digits(ts).0).max(1));
        }
    }
}

/// A minimal WebSocket client for the generator: it reads raw bytes and walks
/// the (unmasked, unfragmented) server frames in its buffer, one `read` per
/// many frames — far cheaper than a general client, so the server, not the
/// generator, is what gets measured.
struct RawWs {
    sock: tokio::net::TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RawWs {
    /// Connects and upgrades. `buf_bytes` is the initial read buffer (it grows
    /// for a frame that does not fit): small for idle connections, so the
    /// generator's own page faults do not bound the connect rate.
    async fn connect(
        url: &str,
        local_ip: Option<IpAddr>,
        recv_buffer: Option<u32>,
        buf_bytes: usize,
    ) -> Result<RawWs, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("ws://").ok_or("ws:// URL expected")?;
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "ws".to_string()), |(h, p)| (h, p.to_string()));
        let addr = tokio::net::lookup_host(host)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(ip) = local_ip {
            sock.bind(std::net::SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        if let Some(n) = recv_buffer {
            let _ = sock.set_recv_buffer_size(n);
        }
        let mut s = sock.connect(addr).await.map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let req = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; buf_bytes.max(1024)];
        let mut end = 0;
        let head_end = loop {
            if end == buf.len() {
                return Err("handshake response larger than the read buffer".into());
            }
            let n = s.read(&mut buf[end..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during handshake".into());
            }
            end += n;
            if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            return Err(String::from_utf8_lossy(&buf[..head_end.min(64)]).into_owned());
        }
        Ok(RawWs {
            sock: s,
            buf,
            start: head_end,
            end,
        })
    }

    /// Sends a text frame (masked with a zero key, as a client must).
    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let len = text.len();
        let mut f = vec![0x81u8];
        if len < 126 {
            f.push(0x80 | len as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(text.as_bytes());
        self.sock.write_all(&f).await.map_err(|e| e.to_string())
    }

    /// Reads once and calls `f` for every complete text frame; `None` on close.
    async fn read_frames(&mut self, mut f: impl FnMut(&[u8])) -> Option<usize> {
        use tokio::io::AsyncReadExt;
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                // a frame longer than the buffer
                self.buf.resize(self.buf.len() * 2, 0);
            } else {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
        }
        let mut frames = 0;
        // first use frames already buffered (from the handshake read)
        if self.start == self.end || !self.has_frame() {
            let n = self.sock.read(&mut self.buf[self.end..]).await.ok()?;
            if n == 0 {
                return None;
            }
            self.end += n;
        }
        while self.has_frame() {
            let b = &self.buf[self.start..self.end];
            let (hl, len) = match b[1] & 0x7f {
                126 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
                127 => (10, u64::from_be_bytes(b[2..10].try_into().unwrap_or([0; 8])) as usize),
                l => (2, l as usize),
            };
            let opcode = b[0] & 0x0f;
            if opcode == 0x8 {
                return None;
            }
            if opcode == 0x1 || opcode == 0x2 {
                f(&b[hl..hl + len]);
                frames += 1;
            }
            self.start += hl + len;
        }
        Some(frames)
    }

    fn has_frame(&self) -> bool {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return false;
        }
        let (hl, len) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
            127 if b.len() >= 10 => (10, u64::from_be_bytes(b[2..10].try_into().unwrap_or([0; 8])) as usize),
            126 | 127 => return false,
            l => (2, l as usize),
        };
        b.len() >= hl + len
    }
}

/// Splits NATS protocol data (possibly cut across WebSocket frames) into the
/// payloads of its `MSG <subject> <sid> <len>\r\n<payload>\r\n` messages.
fn nats_messages(buf: &mut Vec<u8>, data: &[u8], mut f: impl FnMut(&[u8])) {
    buf.extend_from_slice(data);
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let line = &rest[..eol];
        if let Some(args) = line.strip_prefix(b"MSG ") {
            let len = args
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            let start = eol + 2;
            if rest.len() < start + len + 2 {
                break; // the payload has not fully arrived
            }
            f(&rest[start..start + len]);
            at += start + len + 2;
        } else {
            at += eol + 2; // INFO, PING, PONG, +OK …
        }
    }
    buf.drain(..at);
}

/// Publishes JSON tick lines: to NATS over TCP (`PUB ticks.<symbol>`), or to
/// the naive baseline (one line per tick). Neither acks, so "published" is
/// what was written.
async fn line_publisher(
    target: &str,
    addr: &str,
    symbols: Vec<String>,
    rate: u64,
    stop: CancellationToken,
    published: Arc<AtomicU64>,
) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = sock.set_nodelay(true);
    let (r, w) = sock.into_split();
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let nats = target == "nats";
    if nats {
        let mut info = String::new();
        BufReader::new(r)
            .read_line(&mut info)
            .await
            .map_err(|e| e.to_string())?;
        w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut seqs = vec![0u64; symbols.len()];
    let mut n = 0u64;
    let mut pace = Pacer::new(rate);
    let mut line = Vec::with_capacity(256);
    loop {
        let Some(batch) = pace.next(&stop, 64).await else {
            break;
        };
        for _ in 0..batch {
            let s = (n as usize) % symbols.len();
            n += 1;
            seqs[s] += 1;
            line.clear();
            let _ = write!(
                line,
                "{{\"type\":\"tick\",\"symbol\":\"{}\",\"seq\":{},\"ts\":{},\"price\":\"67012.50\",\"size\":\"0.01\",\"bid\":\"67012.40\",\"ask\":\"67012.60\"}}",
                symbols[s],
                seqs[s],
                now_us()
            );
            let r = if nats {
                let head = format!("PUB ticks.{} {}\r\n", symbols[s], line.len());
                async {
                    w.write_all(head.as_bytes()).await?;
                    w.write_all(&line).await?;
                    w.write_all(b"\r\n").await
                }
                .await
            } else {
                line.push(b'\n');
                w.write_all(&line).await
            };
            r.map_err(|e| e.to_string())?;
        }
        w.flush().await.map_err(|e| e.to_string())?;
        published.fetch_add(batch, Ordering::Relaxed);
        if rate == 0 {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// The report of one run.
#[derive(Debug, Default)]
pub struct Report {
    pub subscribers: usize,
    pub symbols: usize,
    pub seconds: f64,
    pub connect_per_sec: f64,
    pub published: u64,
    pub publish_per_sec: f64,
    pub ack_us: [u64; 5],
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub latency_us: [u64; 5],
    pub bytes_per_sec: f64,
    pub gaps: u64,
    pub conflated: u64,
    pub closed: u64,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub server_rss_per_conn_kb: Option<f64>,
    pub gen_cpu_pct: f64,
}

fn quantiles(h: &Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

pub async fn run(a: BenchArgs) -> Result<Report, String> {
    let server_pid = a.server_pid.map(|p| p.to_string());
    let usage0_server = server_pid.as_deref().and_then(proc_usage);
    let stop = CancellationToken::new();
    let recording = Arc::new(AtomicBool::new(false));
    let own = a
        .owned_by
        .zip(a.of)
        .map(|(s, n)| (s, tickshard_shard::ownership::Ownership::new(n, 0)));
    let symbols: Vec<String> = (0..)
        .map(|i| format!("{}{i}", a.prefix))
        .filter(|s| {
            own.is_none_or(|(shard, o)| {
                tickshard_shard::domain::Symbol::parse(s).is_ok_and(|sym| o.owner(&sym) == shard)
            })
        })
        .take(a.symbols)
        .collect();
    // gap checks index by the number in the name
    let max_index = symbols
        .iter()
        .filter_map(|s| s[a.prefix.len()..].parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    let nats = a.target == "nats";
    let sub_msg = if a.idle {
        None
    } else if nats {
        let subs: String = symbols
            .iter()
            .enumerate()
            .map(|(i, s)| format!("SUB ticks.{s} {i}\r\n"))
            .collect();
        Some(format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\n{subs}PING\r\n"
        ))
    } else if a.target == "naive" {
        Some("{}".to_string()) // the baseline broadcasts everything; it ignores client messages
    } else {
        let list = symbols.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(",");
        Some(format!("{{\"op\":\"subscribe\",\"symbols\":[{list}]}}"))
    };
    let naive = a.target == "naive";

    // 1. Subscribers (connection setup rate measured here).
    let setup = Instant::now();
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let results: Arc<Mutex<Vec<SubResult>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let connected = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(a.subscribers + a.slow + 1);
    for i in 0..a.subscribers + a.slow {
        let slow = i >= a.subscribers;
        let idle = a.idle;
        let url = a.ws[i % a.ws.len()].clone();
        let local_ip =
            (a.source_ips > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % a.source_ips as usize) as u8)));
        let (gate, stop, recording, results, ready, msg, prefix, n_sym, connected) = (
            gate.clone(),
            stop.clone(),
            recording.clone(),
            results.clone(),
            ready_tx.clone(),
            sub_msg.clone(),
            a.prefix.clone().into_bytes(),
            max_index + 1,
            connected.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let buf_bytes = if idle { 4096 } else { 256 * 1024 };
            let mut c = match RawWs::connect(&url, local_ip, slow.then_some(4096), buf_bytes).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e)).await;
                    return;
                }
            };
            if let Some(m) = &msg {
                let mut subscribed = naive; // the baseline has no reply
                if c.send_text(m).await.is_err() {
                    let _ = ready.send(Err("subscribe failed".into())).await;
                    return;
                }
                while !subscribed {
                    // tickshard: `subscribed`; NATS: the PONG after our SUBs
                    let ok = c
                        .read_frames(|p| {
                            subscribed |=
                                p.starts_with(b"{\"type\":\"subscribed\"") || p.windows(4).any(|w| w == b"PONG")
                        })
                        .await;
                    if ok.is_none() {
                        let _ = ready.send(Err("closed while subscribing".into())).await;
                        return;
                    }
                }
            }
            connected.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            let _ = ready.send(Ok(())).await;
            if slow || idle {
                // slow: never read; idle: only connections are measured, and a
                // latency histogram (~150 KB to zero) per connection would
                // make the generator's page faults the connect rate's limit
                stop.cancelled().await;
                return;
            }
            let mut st = SubStats::default();
            let mut h = hist();
            let mut last = vec![0u64; n_sym];
            let mut nats_buf: Vec<u8> = Vec::new();
            loop {
                let rec = recording.load(Ordering::Relaxed);
                let r = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    r = c.read_frames(|p| {
                        if nats {
                            nats_messages(&mut nats_buf, p, |m| on_frame(m, &prefix, &mut last, &mut st, &mut h, rec));
                        } else {
                            on_frame(p, &prefix, &mut last, &mut st, &mut h, rec)
                        }
                    }) => r,
                };
                if r.is_none() {
                    st.closed = true;
                    break;
                }
            }
            results.lock().await.push((st, h));
        }));
    }
    drop(ready_tx);
    let mut failures = 0;
    for _ in 0..a.subscribers + a.slow {
        let Some(r) = ready_rx.recv().await else { break };
        if let Err(e) = r {
            failures += 1;
            if failures <= 3 {
                let _ = writeln!(std::io::stderr(), "bench: subscriber failed: {e}");
            }
        }
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    let n_conn = connected.load(Ordering::Relaxed);
    let mut report = Report {
        subscribers: n_conn as usize,
        symbols: a.symbols,
        connect_per_sec: n_conn as f64 / setup_secs.max(1e-9),
        ..Report::default()
    };
    if a.idle {
        let usage1 = server_pid.as_deref().and_then(proc_usage);
        if let (Some((_, r0)), Some((_, r1))) = (usage0_server, usage1) {
            report.server_rss_mb = Some(r1 as f64 / 1_048_576.0);
            report.server_rss_per_conn_kb = Some(r1.saturating_sub(r0) as f64 / 1024.0 / n_conn.max(1) as f64);
        }
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        return Ok(report);
    }

    // 2. Publishers.
    let published = Arc::new(AtomicU64::new(0));
    let ack_hists: Arc<Mutex<Vec<Histogram<u64>>>> = Arc::new(Mutex::new(Vec::new()));
    let mut pubs = Vec::new();
    for k in 0..a.publishers.max(1) {
        let url = a.grpc[k % a.grpc.len()].clone();
        let (stop, recording, published, ack_hists, symbols) = (
            stop.clone(),
            recording.clone(),
            published.clone(),
            ack_hists.clone(),
            symbols.clone(),
        );
        let rate = a.rate / a.publishers.max(1) as u64;
        let window = a.window.max(1);
        let (target, line_addr) = (
            a.target.clone(),
            if nats { a.nats.clone() } else { a.naive_pub.clone() },
        );
        pubs.push(tokio::spawn(async move {
            let r = if target == "tickshard" {
                publisher(k, url, symbols, rate, window, stop, recording, published, ack_hists).await
            } else {
                line_publisher(&target, &line_addr, symbols, rate, stop, published).await
            };
            if let Err(e) = r {
                let _ = writeln!(std::io::stderr(), "bench: publisher {k}: {e}");
            }
        }));
    }

    // 3. Warm up, measure, stop.
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let self_pid = std::process::id().to_string();
    let (u_srv0, u_gen0) = (server_pid.as_deref().and_then(proc_usage), proc_usage(&self_pid));
    let pub0 = published.load(Ordering::Relaxed);
    recording.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    recording.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let pub1 = published.load(Ordering::Relaxed);
    let (u_srv1, u_gen1) = (server_pid.as_deref().and_then(proc_usage), proc_usage(&self_pid));
    stop.cancel();
    for t in pubs.into_iter().chain(tasks) {
        let _ = t.await;
    }

    let mut lat = hist();
    for (st, h) in results.lock().await.iter() {
        report.deliveries += st.deliveries;
        report.bytes_per_sec += st.bytes as f64;
        report.gaps += st.gaps;
        report.conflated += st.conflated;
        report.closed += u64::from(st.closed);
        let _ = lat.add(h);
    }
    let mut acks = hist();
    for h in ack_hists.lock().await.iter() {
        let _ = acks.add(h);
    }
    report.seconds = secs;
    report.published = pub1 - pub0;
    report.publish_per_sec = report.published as f64 / secs;
    report.deliveries_per_sec = report.deliveries as f64 / secs;
    report.bytes_per_sec /= secs;
    report.latency_us = quantiles(&lat);
    report.ack_us = quantiles(&acks);
    if let (Some((c0, _)), Some((c1, rss))) = (u_srv0, u_srv1) {
        report.server_cpu_pct = Some((c1 - c0) / secs * 100.0);
        report.server_rss_mb = Some(rss as f64 / 1_048_576.0);
    }
    if let (Some((c0, _)), Some((c1, _))) = (u_gen0, u_gen1) {
        report.gen_cpu_pct = (c1 - c0) / secs * 100.0;
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    k: usize,
    url: String,
    symbols: Vec<String>,
    rate: u64,
    window: usize,
    stop: CancellationToken,
    recording: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    ack_hists: Arc<Mutex<Vec<Histogram<u64>>>>,
) -> Result<(), String> {
    let mut client = FeedClient::connect(url.clone())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(window);
    let out = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut acks = client.publish(out).await.map_err(|e| e.to_string())?.into_inner();
    let ring: Arc<Vec<AtomicU64>> = Arc::new((0..window * 2).map(|_| AtomicU64::new(0)).collect());
    let permits = Arc::new(Semaphore::new(window));
    let reader = {
        let (ring, permits, recording, published, stop) = (
            ring.clone(),
            permits.clone(),
            recording.clone(),
            published.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut h = hist();
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = acks.message() => m,
                };
                let Ok(Some(ack)) = m else { break };
                permits.add_permits(1);
                if ack.error.is_some() {
                    continue;
                }
                published.fetch_add(1, Ordering::Relaxed);
                if recording.load(Ordering::Relaxed) {
                    let sent = ring[(ack.request_id as usize) % ring.len()].load(Ordering::Relaxed);
                    let _ = h.record(now_us().saturating_sub(sent).max(1));
                }
            }
            h
        })
    };
    let publisher_id = format!("bench-{k}-{}", now_us());
    let mut pseq = vec![0u64; symbols.len()];
    let mut id = 0u64;
    let mut pace = Pacer::new(rate);
    loop {
        let Some(batch) = pace.next(&stop, window as u64 / 4).await else {
            break;
        };
        for _ in 0..batch {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = permits.acquire() => p,
            };
            let Ok(permit) = permit else { break };
            permit.forget();
            id += 1;
            let s = (id as usize) % symbols.len();
            pseq[s] += 1;
            let ts = now_us();
            ring[(id as usize) % ring.len()].store(ts, Ordering::Relaxed);
            let req = pb::PublishRequest {
                request_id: id,
                publisher_id: publisher_id.clone(),
                publisher_seq: pseq[s],
                tick: Some(pb::Tick {
                    symbol: symbols[s].clone(),
                    ts_micros: ts as i64,
                    price: "67012.50".into(),
                    size: "0.01".into(),
                    bid: "67012.40".into(),
                    ask: "67012.60".into(),
                    ..Default::default()
                }),
            };
            if tx.send(req).await.is_err() {
                return Err("publish stream closed".into());
            }
        }
        if stop.is_cancelled() {
            break;
        }
    }
    drop(tx);
    if let Ok(h) = reader.await {
        ack_hists.lock().await.push(h);
    }
    Ok(())
}

impl Report {
    pub fn to_json(&self) -> String {
        let q = |v: &[u64; 5]| {
            format!(
                "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
                v[0], v[1], v[2], v[3], v[4]
            )
        };
        let o = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.1}"));
        format!(
            "{{\"subscribers\":{},\"symbols\":{},\"seconds\":{:.2},\"connect_per_sec\":{:.0},\"published\":{},\"publish_per_sec\":{:.0},\"ack_us\":{},\"deliveries\":{},\"deliveries_per_sec\":{:.0},\"latency_us\":{},\"bytes_per_sec\":{:.0},\"gaps\":{},\"conflated\":{},\"closed\":{},\"server_cpu_pct\":{},\"server_rss_mb\":{},\"server_rss_per_conn_kb\":{},\"gen_cpu_pct\":{:.1}}}",
            self.subscribers,
            self.symbols,
            self.seconds,
            self.connect_per_sec,
            self.published,
            self.publish_per_sec,
            q(&self.ack_us),
            self.deliveries,
            self.deliveries_per_sec,
            q(&self.latency_us),
            self.bytes_per_sec,
            self.gaps,
            self.conflated,
            self.closed,
            o(self.server_cpu_pct),
            o(self.server_rss_mb),
            o(self.server_rss_per_conn_kb),
            self.gen_cpu_pct
        )
    }

    pub fn to_table(&self) -> String {
        let q = |v: &[u64; 5]| {
            format!(
                "p50 {} / p90 {} / p99 {} / p99.9 {} / max {} µs",
                v[0], v[1], v[2], v[3], v[4]
            )
        };
        let o = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |x| format!("{x:.1}{unit}"));
        format!(
            "subscribers        {}\nsymbols            {}\nconnects/s         {:.0}\npublished/s        {:.0}\nack latency        {}\ndeliveries/s       {:.0}\nlatency            {}\nbytes/s            {:.0}\ngaps               {}\nconflated          {}\nclosed             {}\nserver CPU         {}\nserver RSS         {}\nRSS per connection {}\ngenerator CPU      {:.1}%\n",
            self.subscribers,
            self.symbols,
            self.connect_per_sec,
            self.publish_per_sec,
            q(&self.ack_us),
            self.deliveries_per_sec,
            q(&self.latency_us),
            self.bytes_per_sec,
            self.gaps,
            self.conflated,
            self.closed,
            o(self.server_cpu_pct, "%"),
            o(self.server_rss_mb, " MiB"),
            o(self.server_rss_per_conn_kb, " KiB"),
            self.gen_cpu_pct
        )
    }
}

/// Paces a publisher at `rate` ticks/s in 1 ms steps (0: as fast as it can).
struct Pacer {
    rate: u64,
    owed: u64,
    tick: tokio::time::Interval,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            owed: 0,
            tick: tokio::time::interval(Duration::from_millis(1)),
        }
    }

    /// How many ticks to publish now (`unpaced` at rate 0); `None` once `stop`
    /// is cancelled.
    async fn next(&mut self, stop: &CancellationToken, unpaced: u64) -> Option<u64> {
        if self.rate == 0 {
            return (!stop.is_cancelled()).then_some(unpaced);
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = self.tick.tick() => {}
        }
        self.owed += self.rate;
        let n = self.owed / 1000;
        self.owed %= 1000;
        Some(n)
    }
}
