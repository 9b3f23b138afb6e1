//! The floor of a fan-out on this machine (issue 14): what the kernel alone
//! costs to write one tick frame to each of N loopback WebSocket sockets.
//! No framework, no runtime, no queues: one thread per publisher connection
//! encodes each tick line as a WebSocket text frame once and writes it to
//! every socket that watches its symbol with one non-blocking `write` each
//! (the publishers' threads fan out in parallel: with several publisher
//! connections, as at W7, it uses every core).
//! It speaks the naive baseline's protocol, so the same generator measures it
//! (`tickshard bench --target naive --naive-pub …`): its CPU per delivery is
//! the floor tickshard's is compared with.
//!
//! A client's first message says what it watches: `{"symbols":["A","B",…]}`
//! (the generator's watchlists, W7) or anything else for every symbol (L100).
//!
//! Run: `cargo bench --bench floor -- [WS_ADDR] [PUB_ADDR]`. It does not read
//! what clients send after that and does not handle back-pressure (a write
//! that would block is counted, and the frame is lost for that client): it
//! is a measuring stick for rates a socket takes without blocking, not a
//! server. A socket whose write fails (its client left) is dropped, so a
//! later run does not pay for an earlier run's sockets.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::disallowed_methods)]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use tokio_tungstenite::tungstenite;

/// Who watches what: sockets by index (and whether each was dropped), and
/// the indexes watching each symbol or every symbol.
#[derive(Default)]
struct Subs {
    socks: Vec<(TcpStream, AtomicBool)>,
    all: Vec<usize>,
    by_symbol: HashMap<Vec<u8>, Vec<usize>>,
}

/// The symbols of a `{"symbols":["A","B",…]}` message; `None` for anything
/// else (every symbol).
fn watchlist(msg: &str) -> Option<Vec<Vec<u8>>> {
    let list = msg.split_once("\"symbols\":[")?.1.split_once(']')?.0;
    Some(
        list.split(',')
            .map(|s| s.trim().trim_matches('"').as_bytes().to_vec())
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

/// The symbol of a tick line `{"type":"tick","symbol":"X",…}`.
fn symbol_of(line: &[u8]) -> &[u8] {
    const KEY: &[u8] = b"\"symbol\":\"";
    let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) else {
        return &[];
    };
    let rest = &line[at + KEY.len()..];
    &rest[..rest.iter().position(|&b| b == b'"').unwrap_or(rest.len())]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let ws_addr = args.first().map_or("127.0.0.1:19180", String::as_str).to_string();
    let pub_addr = args.get(1).map_or("127.0.0.1:19181", String::as_str).to_string();
    let subs: Arc<RwLock<Subs>> = Arc::default();
    let (writes, blocked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let ws = TcpListener::bind(&ws_addr).unwrap();
    let accepted = subs.clone();
    thread::spawn(move || {
        for s in ws.incoming() {
            let Ok(s) = s else { continue };
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            // the handshake and the client's first message, then the bare
            // socket (tungstenite buffers nothing to write once it is done)
            let Ok(mut w) = tungstenite::accept(s) else { continue };
            let watch = match w.read() {
                Ok(tungstenite::Message::Text(t)) => watchlist(t.as_str()),
                _ => None,
            };
            let Ok(t) = w.get_ref().try_clone() else { continue };
            if t.set_nonblocking(true).is_err() {
                continue;
            }
            let mut subs = accepted.write().unwrap();
            let i = subs.socks.len();
            subs.socks.push((t, AtomicBool::new(false)));
            match watch {
                None => subs.all.push(i),
                Some(list) => {
                    for sym in list {
                        subs.by_symbol.entry(sym).or_default().push(i);
                    }
                }
            }
        }
    });

    let (w, b) = (writes.clone(), blocked.clone());
    thread::spawn(move || {
        loop {
            thread::sleep(Duration::from_secs(10));
            eprintln!(
                "floor: {} writes, {} would have blocked",
                w.load(Ordering::Relaxed),
                b.load(Ordering::Relaxed)
            );
        }
    });

    let pubs = TcpListener::bind(&pub_addr).unwrap();
    eprintln!("floor: websocket on {ws_addr}, publishers on {pub_addr}");
    for s in pubs.incoming() {
        let Ok(s) = s else { continue };
        let (subs, writes, blocked) = (subs.clone(), writes.clone(), blocked.clone());
        thread::spawn(move || {
            let mut frame = Vec::with_capacity(512);
            for line in BufReader::new(s).split(b'\n') {
                let Ok(line) = line else { return };
                frame.clear();
                frame.push(0x81); // FIN, text
                match line.len() {
                    n @ 0..=125 => frame.push(n as u8),
                    n @ 126..=65_535 => {
                        frame.push(126);
                        frame.extend_from_slice(&(n as u16).to_be_bytes());
                    }
                    n => {
                        frame.push(127);
                        frame.extend_from_slice(&(n as u64).to_be_bytes());
                    }
                }
                frame.extend_from_slice(&line);
                let subs = subs.read().unwrap();
                let watching = subs.by_symbol.get(symbol_of(&line)).map_or(&[][..], Vec::as_slice);
                let (mut n_writes, mut n_blocked) = (0, 0);
                for &i in subs.all.iter().chain(watching) {
                    let (mut t, dropped) = (&subs.socks[i].0, &subs.socks[i].1);
                    if dropped.load(Ordering::Relaxed) {
                        continue;
                    }
                    n_writes += 1;
                    match t.write(&frame) {
                        Ok(n) if n == frame.len() => {}
                        Ok(_) => n_blocked += 1,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => n_blocked += 1,
                        Err(_) => dropped.store(true, Ordering::Relaxed),
                    }
                }
                writes.fetch_add(n_writes, Ordering::Relaxed);
                blocked.fetch_add(n_blocked, Ordering::Relaxed);
            }
        });
    }
}
