//! Publishers without acks: JSON tick lines to NATS (`PUB`) or to the naive
//! baseline, and the NATS message splitter subscribers use.

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use crate::{measure::now_us, pacer::Pacer, workload::Picker};

/// Splits NATS protocol data (possibly cut across WebSocket frames) into the
/// payloads of its `MSG <subject> <sid> <len>\r\n<payload>\r\n` messages.
pub(crate) fn nats_messages(buf: &mut Vec<u8>, data: &[u8], mut f: impl FnMut(&[u8])) {
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
#[allow(clippy::too_many_arguments)]
pub(crate) async fn line_publisher(
    target: &str,
    addr: &str,
    symbols: Vec<String>,
    mut picker: Picker,
    seqs: Arc<Vec<AtomicU64>>,
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
    let mut pace = Pacer::new(rate);
    let mut line = Vec::with_capacity(256);
    loop {
        let Some(batch) = pace.next(&stop, 64).await else {
            break;
        };
        for _ in 0..batch {
            let ts = now_us();
            let s = picker.pick(ts);
            // one counter per symbol across publishers (NATS does not order
            // across publishing connections: with several, a subscriber may
            // count a reordering as a gap)
            let seq = seqs[s].fetch_add(1, Ordering::Relaxed) + 1;
            line.clear();
            let _ = write!(
                line,
                "{{\"type\":\"tick\",\"symbol\":\"{}\",\"seq\":{},\"ts\":{},\"price\":\"67012.50\",\"size\":\"0.01\",\"bid\":\"67012.40\",\"ask\":\"67012.60\"}}",
                symbols[s], seq, ts
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
