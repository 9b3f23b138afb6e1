//! The naive baseline of the benchmarks: what a WebSocket fan-out looks like
//! without tickshard's design — a tokio::sync::broadcast of `String`s, one
//! `send` (a copy, a frame, a flush, a syscall) per message per subscriber.
//! Publishers write JSON tick lines to a TCP port; every WebSocket client gets
//! every line. Run: `cargo bench --bench naive_ws -- [WS_ADDR] [PUB_ADDR]`.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::disallowed_methods)]

use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    sync::broadcast,
};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let ws_addr = args.first().map_or("127.0.0.1:19080", String::as_str).to_string();
    let pub_addr = args.get(1).map_or("127.0.0.1:19081", String::as_str).to_string();
    let (tx, _) = broadcast::channel::<String>(65_536);

    let pubs = TcpListener::bind(&pub_addr).await.unwrap();
    let ptx = tx.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = pubs.accept().await {
            let tx = ptx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(s).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = tx.send(line);
                }
            });
        }
    });

    let ws = TcpListener::bind(&ws_addr).await.unwrap();
    eprintln!("naive_ws: websocket on {ws_addr}, publishers on {pub_addr}");
    while let Ok((s, _)) = ws.accept().await {
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let Ok(ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            let (mut write, mut read) = ws.split();
            tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
            loop {
                match rx.recv().await {
                    Ok(line) => {
                        if write.send(Message::Text(line.into())).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }
}
