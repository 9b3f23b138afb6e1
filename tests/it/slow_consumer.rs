//! A client that stops reading never slows the shard or other clients; it is
//! conflated, then closed with 1013, and its memory stays bounded.

use tickshard_client::ws::{ConnectOpts, Incoming, ServerMsg, WsConn};

use crate::common::*;

const T0: i64 = 1_700_000_000_000_000;
const QUEUE: usize = 256 * 1024;

/// A client with a tiny receive buffer, subscribed to `symbol`, that reads
/// nothing more until the test says so.
async fn paused_reader(srv: &Server, symbol: &str) -> WsConn {
    let mut c = WsConn::connect_with(
        &srv.ws_url(),
        WAIT,
        ConnectOpts {
            recv_buffer: Some(4096),
            ..ConnectOpts::default()
        },
    )
    .await
    .unwrap();
    c.send_text(&format!(r#"{{"op":"subscribe","symbols":["{symbol}"]}}"#))
        .await
        .unwrap();
    assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_conflated_then_closed_1013_and_others_get_everything() {
    let srv = Server::start(&["--no-sim", "--client-queue-bytes", "262144", "--slow-client-ms", "1500"]);
    // the slow client: tiny receive buffer, subscribes, then stops reading
    let mut slow = paused_reader(&srv, "BTC-USD").await;
    let mut fast = srv.ws().await;
    fast.send_text(r#"{"op":"subscribe","symbols":["BTC-USD"]}"#)
        .await
        .unwrap();
    assert!(matches!(recv(&mut fast).await, ServerMsg::Subscribed { .. }));

    let n = 40_000u64;
    let reader = tokio::spawn(async move {
        for want in 1..=n {
            let ServerMsg::Tick(t) = recv(&mut fast).await else {
                panic!("fast client got something else")
            };
            assert_eq!(t.seq, want, "the fast client sees every tick in order");
        }
    });
    let mut p = srv.publisher("flood").await;
    for chunk in (1..=n as i64).collect::<Vec<_>>().chunks(500) {
        publish_all(
            &mut p,
            chunk.iter().map(|&i| tick("BTC-USD", T0 + i, "67012.50", "0.01")),
        )
        .await;
    }
    tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();

    eventually("the slow client is conflated", || async {
        srv.metric("tickshard_conflations_total").await >= 1.0
    })
    .await;
    eventually("the slow client is closed", || async {
        srv.metric("tickshard_slow_client_closes_total").await >= 1.0
    })
    .await;
    // now read: buffered ticks (in order), maybe a conflated snapshot, then 1013
    let mut last = 0;
    let code = loop {
        match recv_any(&mut slow).await {
            Incoming::Text(t) => match ServerMsg::parse(&t).unwrap() {
                ServerMsg::Tick(t) => {
                    assert!(t.seq > last, "in order");
                    last = t.seq;
                }
                ServerMsg::Snapshot(s) => {
                    assert!(s.conflated);
                    last = s.seq;
                }
                other => panic!("{other:?}"),
            },
            Incoming::Close { code, .. } => break code,
        }
    };
    assert_eq!(code, 1013);
    assert!(last < n, "the slow client did not get everything");
    // memory per client stayed bounded: the queue limit plus at most one
    // group commit's chunk (500 ticks here) and a few forced items
    let peak = srv.metric("tickshard_client_queue_peak_bytes").await;
    assert!(peak > 0.0 && peak <= (QUEUE + 500 * 160 + 4096) as f64, "peak {peak}");
}

/// A client that pauses reading, within its queue limit, gets every tick
/// once and in order when it reads again: the fan-out writes straight to
/// its socket while it keeps up, the socket fills, and what a direct write
/// could not put out is written by the connection's writer task first.
/// (Whether the write that meets the full socket is a direct one depends on
/// timing, the fan-out then not being behind; each round reads everything
/// and checks it, and the test goes on until a round has had one, or fails
/// after `ROUNDS`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reader_gets_every_tick_in_order_across_direct_and_task_writes() {
    const ROUNDS: u64 = 8;
    // (a direct write takes a whole commit here, and the queue holds more
    // than the kernel's socket buffers, up to 4 MiB on the sending side)
    let srv = Server::start(&[
        "--no-sim",
        "--client-queue-bytes",
        "67108864",
        "--ws-direct-write-bytes",
        "1048576",
    ]);
    let mut paused = paused_reader(&srv, "ETH-USD").await;

    let direct = |outcome: &str| format!("tickshard_ws_direct_writes_total{{outcome=\"{outcome}\"}}");
    let mut p = srv.publisher("pauser").await;
    let n = 40_000u64;
    for round in 0..ROUNDS {
        // commits of 500 ticks or less, each a direct write while the
        // client's socket takes them; ~6 MB, more than the socket buffers,
        // less than the queue limit
        let first = round * n + 1;
        let seqs: Vec<i64> = (first as i64..(first + n) as i64).collect();
        for chunk in seqs.chunks(500) {
            publish_all(&mut p, chunk.iter().map(|&i| tick("ETH-USD", T0 + i, "3012.25", "0.5"))).await;
        }
        for want in first..first + n {
            match recv(&mut paused).await {
                ServerMsg::Tick(t) => {
                    assert_eq!(t.seq, want, "every tick once, in order");
                    assert_eq!((t.price.as_str(), t.size.as_str()), ("3012.25", "0.5"));
                }
                other => panic!("tick {want}: got {other:?}"),
            }
        }
        assert_eq!(srv.metric("tickshard_conflations_total").await, 0.0);
        // every message counted, and with them every direct write's outcome
        let sent = (first + n - 1) as f64;
        eventually("the messages sent counted", || async {
            srv.metric(r#"tickshard_messages_sent_total{protocol="ws"}"#).await >= sent
        })
        .await;
        if srv.metric(&direct("whole")).await >= 1.0 && srv.metric(&direct("partial")).await >= 1.0 {
            return;
        }
    }
    panic!("no direct write met a full socket in {ROUNDS} rounds");
}
