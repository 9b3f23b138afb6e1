//! A client that stops reading never slows the shard or other clients; it is
//! conflated, then closed with 1013, and its memory stays bounded.

use tickshard_client::ws::{ConnectOpts, Incoming, ServerMsg, WsConn};

use crate::common::*;

const T0: i64 = 1_700_000_000_000_000;
const QUEUE: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_conflated_then_closed_1013_and_others_get_everything() {
    let srv = Server::start(&["--no-sim", "--client-queue-bytes", "262144", "--slow-client-ms", "1500"]);
    // the slow client: tiny receive buffer, subscribes, then stops reading
    let mut slow = WsConn::connect_with(
        &srv.ws_url(),
        WAIT,
        ConnectOpts {
            recv_buffer: Some(4096),
            ..ConnectOpts::default()
        },
    )
    .await
    .unwrap();
    slow.send_text(r#"{"op":"subscribe","symbols":["BTC-USD"]}"#)
        .await
        .unwrap();
    assert!(matches!(recv(&mut slow).await, ServerMsg::Subscribed { .. }));
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
