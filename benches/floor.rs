//! The floor of a fan-out on this machine (issue 14): what the kernel alone
//! costs to write one tick frame to each of N loopback WebSocket sockets.
//! No framework, no runtime, no queues: one thread per publisher connection
//! encodes each tick line as a WebSocket text frame once and writes it to
//! every subscriber socket with one non-blocking `write` each. It speaks the
//! naive baseline's protocol, so the same generator measures it
//! (`tickshard bench --target naive --naive-pub …`): its CPU per delivery is
//! the floor tickshard's is compared with.
//!
//! Run: `cargo bench --bench floor -- [WS_ADDR] [PUB_ADDR]`. It does not read
//! what clients send and does not handle back-pressure (a write that would
//! block is counted, and the frame is lost for that client): it is a
//! measuring stick for rates a socket takes without blocking, not a server.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::disallowed_methods)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use tokio_tungstenite::tungstenite;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let ws_addr = args.first().map_or("127.0.0.1:19180", String::as_str).to_string();
    let pub_addr = args.get(1).map_or("127.0.0.1:19181", String::as_str).to_string();
    let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (writes, blocked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let ws = TcpListener::bind(&ws_addr).unwrap();
    let accepted = socks.clone();
    thread::spawn(move || {
        for s in ws.incoming() {
            let Ok(s) = s else { continue };
            let _ = s.set_nodelay(true);
            // the handshake, then the bare socket (tungstenite buffers nothing
            // to write once it is done)
            let Ok(w) = tungstenite::accept(s) else { continue };
            let Ok(t) = w.get_ref().try_clone() else { continue };
            if t.set_nonblocking(true).is_ok() {
                accepted.lock().unwrap().push(t);
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
        let (socks, writes, blocked) = (socks.clone(), writes.clone(), blocked.clone());
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
                let socks = socks.lock().unwrap();
                let mut n_blocked = 0;
                for mut t in socks.iter() {
                    if !matches!(t.write(&frame), Ok(n) if n == frame.len()) {
                        n_blocked += 1;
                    }
                }
                writes.fetch_add(socks.len() as u64, Ordering::Relaxed);
                blocked.fetch_add(n_blocked, Ordering::Relaxed);
            }
        });
    }
}
