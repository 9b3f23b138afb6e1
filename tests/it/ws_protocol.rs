//! WebSocket protocol v1 (contract §4) end to end.

use tickshard_client::ws::{Incoming, OpCode, ServerMsg, TickMsg};

use crate::common::*;

const T0: i64 = 1_732_530_000_000_000;

fn as_tick(m: ServerMsg) -> TickMsg {
    match m {
        ServerMsg::Tick(t) => t,
        other => panic!("expected a tick, got {other:?}"),
    }
}

#[tokio::test]
async fn snapshot_then_every_tick_in_order_with_exact_decimals() {
    let srv = Server::start(&["--no-sim"]);
    let mut p = srv.publisher("snap").await;
    publish_all(
        &mut p,
        (1..=50).map(|i| tick("BTC-USD", T0 + i, &format!("67012.{i:02}"), "0.010")),
    )
    .await;

    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","id":1,"symbols":["btc-usd"]}"#)
        .await
        .unwrap();
    let ServerMsg::Subscribed { id, symbols } = recv(&mut c).await else {
        panic!()
    };
    assert_eq!(id.as_deref(), Some("1"));
    assert_eq!(
        (symbols[0].symbol.as_str(), symbols[0].seq, symbols[0].recovered),
        ("BTC-USD", 50, false)
    );
    assert_eq!(symbols[0].epoch.len(), 12);
    let s = recv_snapshot(&mut c).await;
    assert_eq!((s.seq, s.price.as_str(), s.size.as_str()), (50, "67012.50", "0.010"));
    assert_eq!(s.epoch.as_deref(), Some(symbols[0].epoch.as_str()));

    // live ticks follow the snapshot with no gap, scale preserved exactly
    let acks = publish_all(
        &mut p,
        (51..=250).map(|i| pb_tick_with_quote("BTC-USD", T0 + i, &format!("67012.{:03}", i), "0.5")),
    )
    .await;
    assert_eq!(acks.first().unwrap().seq, 51);
    for i in 51..=250u64 {
        let t = as_tick(recv(&mut c).await);
        assert_eq!(t.seq, i);
        assert_eq!(t.price, format!("67012.{i:03}"));
        assert_eq!(t.bid.as_deref(), Some("67012.000"));
        assert_eq!(t.ask_size, None, "absent optional fields are omitted");
    }
}

fn pb_tick_with_quote(symbol: &str, ts: i64, price: &str, size: &str) -> tickshard_proto::v1::Tick {
    tickshard_proto::v1::Tick {
        bid: "67012.000".into(),
        ask: "99999.999".into(),
        ..tick(symbol, ts, price, size)
    }
}

#[tokio::test]
async fn a_symbol_without_ticks_gets_an_epoch_and_seq_zero_then_its_first_tick() {
    let srv = Server::start(&["--no-sim"]);
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["NEW-1"]}"#).await.unwrap();
    let symbols = recv_subscribed(&mut c).await;
    assert_eq!((symbols[0].seq, symbols[0].recovered), (0, false));
    assert_eq!(symbols[0].epoch.len(), 12);
    let mut p = srv.publisher("first").await;
    let acks = publish_all(&mut p, [tick("NEW-1", T0, "1.5", "2")]).await;
    assert_eq!(
        acks[0].epoch, symbols[0].epoch,
        "the epoch made on subscribe is the one the first tick gets"
    );
    let t = as_tick(recv(&mut c).await);
    assert_eq!((t.seq, t.price.as_str()), (1, "1.5"));
    // `symbols` lists only symbols with ticks
    c.send_text(r#"{"op":"symbols","id":"s"}"#).await.unwrap();
    assert_eq!(
        recv(&mut c).await,
        ServerMsg::Symbols {
            id: Some("\"s\"".into()),
            symbols: vec!["NEW-1".into()]
        }
    );
}

#[tokio::test]
async fn every_error_code_keeps_the_connection_usable() {
    let srv = Server::start(&[
        "--no-sim",
        "--max-subscriptions",
        "3",
        "--max-client-rate",
        "20",
        "--client-burst",
        "40",
    ]);
    let mut c = srv.ws().await;
    let cases: [(&str, &str); 7] = [
        ("{not json", "bad_json"),
        (r#"[1,2]"#, "bad_json"),
        (r#"{"op":"dance","id":5}"#, "unknown_op"),
        (r#"{"op":"subscribe","id":6,"symbols":["b@d"]}"#, "invalid_symbol"),
        (
            r#"{"op":"subscribe","id":7,"symbols":["A","B","C","D"]}"#,
            "too_many_subscriptions",
        ),
        (
            r#"{"op":"subscribe","id":8,"symbols":["A"],"channels":["candles:5m"]}"#,
            "bad_json",
        ),
        (r#"{"op":"unsubscribe","id":9}"#, "bad_json"),
    ];
    for (msg, code) in cases {
        c.send_text(msg).await.unwrap();
        match recv(&mut c).await {
            ServerMsg::Error { code: got, message, .. } => {
                assert_eq!(got, code, "{msg}");
                assert!(!message.is_empty());
            }
            other => panic!("{msg}: expected error {code}, got {other:?}"),
        }
        c.send_text(r#"{"op":"ping","id":42}"#).await.unwrap();
        assert_eq!(
            recv(&mut c).await,
            ServerMsg::Pong { id: Some("42".into()) },
            "usable after {code}"
        );
    }
    // the invalid symbol error names the bad symbol, and the id is echoed
    c.send_text(r#"{"op":"subscribe","id":6,"symbols":["ok","b@d"]}"#)
        .await
        .unwrap();
    let ServerMsg::Error { id, message, .. } = recv(&mut c).await else {
        panic!()
    };
    assert_eq!(id.as_deref(), Some("6"));
    assert!(message.contains("'b@d'"), "{message}");
    // a subscribe past the limit is rejected whole; existing ones stay
    c.send_text(r#"{"op":"subscribe","id":10,"symbols":["A","B"]}"#)
        .await
        .unwrap();
    assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
    c.send_text(r#"{"op":"subscribe","id":11,"symbols":["C","D"]}"#)
        .await
        .unwrap();
    let ServerMsg::Error { code, .. } = recv(&mut c).await else {
        panic!()
    };
    assert_eq!(code, "too_many_subscriptions");
    let mut p = srv.publisher("err").await;
    publish_all(&mut p, [tick("B", T0, "2", "1")]).await;
    assert_eq!(
        as_tick(recv(&mut c).await).symbol,
        "B",
        "existing subscriptions keep flowing"
    );
    // binary frames are not JSON text
    c.send_frame(true, OpCode::Binary, b"\x01\x02").await.unwrap();
    let ServerMsg::Error { code, .. } = recv(&mut c).await else {
        panic!()
    };
    assert_eq!(code, "bad_json");
    // past the message rate: rate_limited, not processed, then usable again
    let mut limited = 0;
    for i in 0..80 {
        c.send_text(&format!(r#"{{"op":"ping","id":{i}}}"#)).await.unwrap();
    }
    for _ in 0..80 {
        match recv(&mut c).await {
            ServerMsg::Error { code, .. } if code == "rate_limited" => limited += 1,
            ServerMsg::Pong { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(limited > 0, "a burst past the limit is rate limited");
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_oversized_ones_close_with_1009() {
    let srv = Server::start(&["--no-sim", "--max-message-bytes", "1024"]);
    let mut c = srv.ws().await;
    c.send_frame(false, OpCode::Text, br#"{"op":"pi"#).await.unwrap();
    c.send_frame(true, OpCode::Continuation, br#"ng","id":1}"#)
        .await
        .unwrap();
    assert_eq!(recv(&mut c).await, ServerMsg::Pong { id: Some("1".into()) });
    // one frame over the limit
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    c.send_text(&big).await.unwrap();
    let ServerMsg::Error { code, .. } = recv(&mut c).await else {
        panic!()
    };
    assert_eq!(code, "message_too_large");
    assert_eq!(recv_close(&mut c).await, 1009);
    // fragments that add up past the limit
    let mut c = srv.ws().await;
    c.send_frame(false, OpCode::Text, &[b' '; 400]).await.unwrap();
    for _ in 0..2 {
        c.send_frame(false, OpCode::Continuation, &[b' '; 400]).await.unwrap();
    }
    let ServerMsg::Error { code, .. } = recv(&mut c).await else {
        panic!()
    };
    assert_eq!(code, "message_too_large");
    assert_eq!(recv_close(&mut c).await, 1009);
}

#[tokio::test]
async fn a_sustained_flood_is_closed_with_1008() {
    // 10× a rate of 5/s is 50/s; sustained for 10 s the client is closed.
    let srv = Server::start(&["--no-sim", "--max-client-rate", "5", "--client-burst", "5"]);
    let mut c = srv.ws().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut every = tokio::time::interval(std::time::Duration::from_millis(10)); // 100 msg/s
    let mut limited = 0;
    let mut flood_error = None;
    let mut note = |t: String, limited: &mut i32| {
        if t.contains("sustained flood") {
            flood_error = Some(t);
        } else if t.contains("rate_limited") {
            *limited += 1;
        }
    };
    let mut sent_to_the_close = false;
    for n in 0.. {
        assert!(tokio::time::Instant::now() < deadline, "not closed for flooding");
        every.tick().await;
        if c.send_text(&format!(r#"{{"op":"ping","id":{n}}}"#)).await.is_err() {
            sent_to_the_close = true;
        }
        // drain replies without blocking the flood
        let wait = if sent_to_the_close {
            WAIT
        } else {
            std::time::Duration::ZERO
        };
        while let Ok(Ok(m)) = tokio::time::timeout(wait, c.recv()).await {
            match m {
                Incoming::Close { code, .. } => {
                    assert!(limited > 0);
                    assert_eq!(code, 1008);
                    // the closing error echoes its message's id (§4: rate_limited too)
                    let e = flood_error.expect("the closing error came first");
                    assert!(e.contains(r#""code":"rate_limited""#) && e.contains(r#""id":"#), "{e}");
                    return;
                }
                Incoming::Text(t) => note(t, &mut limited),
            }
        }
        assert!(!sent_to_the_close, "a close frame after the send failed");
    }
}

#[tokio::test]
async fn resume_with_the_right_epoch_replays_exactly_the_missed_ticks() {
    let srv = Server::start(&["--no-sim"]);
    let mut p = srv.publisher("resume").await;
    publish_all(&mut p, (1..=10).map(|i| tick("ETH-USD", T0 + i, "3012.5", "0.4"))).await;
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["ETH-USD"]}"#)
        .await
        .unwrap();
    let symbols = recv_subscribed(&mut c).await;
    let epoch = symbols[0].epoch.clone();
    let s = recv_snapshot(&mut c).await;
    assert_eq!(s.seq, 10);
    c.close().await;
    drop(c);

    // 5000 ticks arrive while the client is away (several group commits)
    for chunk in (11..=5010).collect::<Vec<i64>>().chunks(1000) {
        publish_all(
            &mut p,
            chunk
                .iter()
                .map(|&i| tick("ETH-USD", T0 + i, &format!("3012.{i}"), "0.4")),
        )
        .await;
    }
    let mut c = srv.ws().await;
    c.send_text(&format!(
        r#"{{"op":"subscribe","id":2,"symbols":["ETH-USD"],"resume":{{"ETH-USD":{{"seq":10,"epoch":"{epoch}"}}}}}}"#
    ))
    .await
    .unwrap();
    let symbols = recv_subscribed(&mut c).await;
    assert_eq!((symbols[0].seq, symbols[0].recovered), (5010, true));
    // live ticks published during the replay must follow it, in order
    let live = tokio::spawn(async move {
        publish_all(&mut p, (5011..=5100).map(|i| tick("ETH-USD", T0 + i, "1", "1"))).await;
    });
    for i in 11..=5100u64 {
        let t = as_tick(recv(&mut c).await);
        assert_eq!(t.seq, i, "no gap, no duplicate");
        if i <= 5010 {
            assert_eq!(t.price, format!("3012.{i}"));
        }
    }
    live.await.unwrap();

    // a wrong epoch (or an unknown one) gets a snapshot and recovered=false
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["ETH-USD"],"resume":{"ETH-USD":{"seq":10,"epoch":"000000000001"}}}"#)
        .await
        .unwrap();
    let symbols = recv_subscribed(&mut c).await;
    assert!(!symbols[0].recovered);
    let s = recv_snapshot(&mut c).await;
    assert_eq!(s.seq, 5100);
    // a position already current: recovered, nothing replayed, live follows
    let mut c = srv.ws().await;
    c.send_text(&format!(
        r#"{{"op":"subscribe","symbols":["ETH-USD"],"resume":{{"ETH-USD":{{"seq":5100,"epoch":"{epoch}"}}}}}}"#
    ))
    .await
    .unwrap();
    let symbols = recv_subscribed(&mut c).await;
    assert!(symbols[0].recovered);
    let mut p = srv.publisher("resume-2").await;
    publish_all(&mut p, [tick("ETH-USD", T0 + 9_999, "7", "1")]).await;
    assert_eq!(as_tick(recv(&mut c).await).seq, 5101);
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let srv = Server::start(&["--no-sim"]);
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["A","B"]}"#).await.unwrap();
    assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
    c.send_text(r#"{"op":"unsubscribe","id":2,"symbols":["A"]}"#)
        .await
        .unwrap();
    assert_eq!(
        recv(&mut c).await,
        ServerMsg::Unsubscribed {
            id: Some("2".into()),
            symbols: vec!["A".into()]
        }
    );
    let mut p = srv.publisher("unsub").await;
    publish_all(&mut p, [tick("A", T0, "1", "1"), tick("B", T0, "2", "1")]).await;
    let t = as_tick(recv(&mut c).await);
    assert_eq!(t.symbol, "B", "A was unsubscribed");
}

#[tokio::test]
async fn candles_close_across_interval_boundaries() {
    let srv = Server::start(&["--no-sim"]);
    let mut p = srv.publisher("candles").await;
    let s = 1_732_530_000_000_000i64; // a whole second (and minute) boundary
    publish_all(
        &mut p,
        [
            tick("SOL-USD", s + 100, "150.10", "1.5"),
            tick("SOL-USD", s + 200, "151.00", "0.5"),
        ],
    )
    .await;
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["SOL-USD"],"channels":["candles:1s","ticks"]}"#)
        .await
        .unwrap();
    let mut candles = Vec::new();
    let mut ticks = 0;
    assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
    // more ticks in the same second, a late one, then one in the next second
    publish_all(
        &mut p,
        [
            tick("SOL-USD", s + 300, "149.90", "1"),
            tick("SOL-USD", s + 999_999, "150.50", "2"),
            tick("SOL-USD", s + 1_000_000 + 5, "152.00", "3"),
            tick("SOL-USD", s + 999_000, "1.00", "100"), // late: stored, but no candle change
        ],
    )
    .await;
    while candles.iter().all(|c: &tickshard_client::ws::CandleMsg| !c.closed) || ticks < 4 {
        match recv(&mut c).await {
            ServerMsg::Candle(k) => candles.push(k),
            ServerMsg::Snapshot(_) => {}
            ServerMsg::Tick(_) => ticks += 1,
            other => panic!("{other:?}"),
        }
    }
    let first = &candles[0];
    assert_eq!(
        (first.interval.as_str(), first.start, first.closed),
        ("1s", s, false),
        "current candle first"
    );
    let closed = candles.iter().find(|k| k.closed).unwrap();
    assert_eq!(
        (
            closed.start,
            closed.open.as_str(),
            closed.high.as_str(),
            closed.low.as_str(),
            closed.close.as_str(),
            closed.volume.as_str(),
            closed.count
        ),
        (s, "150.10", "151.00", "149.90", "150.50", "5.0", 4)
    );
    // history: the closed candle from the store, the open one from memory
    let mut f = srv.feed().await;
    let h = f
        .get_history(tickshard_proto::v1::HistoryRequest {
            symbol: "SOL-USD".into(),
            interval: "1s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.candles.len(), 2);
    assert_eq!(
        (h.candles[0].close.as_str(), h.candles[0].count, h.candles[0].closed),
        ("150.50", 4, true)
    );
    assert_eq!(
        (h.candles[1].open.as_str(), h.candles[1].count, h.candles[1].closed),
        ("152.00", 1, false)
    );
    // the late tick is a tick (seq 6) and counted in the metric
    let t = srv
        .feed()
        .await
        .get_history(tickshard_proto::v1::HistoryRequest {
            symbol: "SOL-USD".into(),
            from_seq: 6,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.ticks[0].price, "1.00");
    assert!(srv.metric("tickshard_late_ticks_total").await >= 1.0);
    // the late tick is late only for 1s: the minute candle includes it
    let h = srv
        .feed()
        .await
        .get_history(tickshard_proto::v1::HistoryRequest {
            symbol: "SOL-USD".into(),
            interval: "1m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (h.candles.len(), h.candles[0].count, h.candles[0].volume.as_str()),
        (1, 6, "108.0")
    );
}

#[tokio::test]
async fn non_http_paths_and_health() {
    let srv = Server::start(&["--no-sim"]);
    assert_eq!(srv.get("/healthz").await.0, 200);
    assert_eq!(srv.get("/readyz").await.0, 200);
    assert_eq!(srv.get("/nope").await.0, 404);
    assert_eq!(srv.get("/ws").await.0, 426, "plain GET on /ws asks for an upgrade");
    let (code, page) = srv.get("/").await;
    assert_eq!(code, 200);
    assert!(page.contains("<title>tickshard"));
    let (_, metrics) = srv.get("/metrics").await;
    assert!(metrics.contains("tickshard_ready 1"), "{metrics}");
}

#[tokio::test]
async fn the_server_pings_and_drops_a_silent_client() {
    let srv = Server::start(&["--no-sim", "--ping-interval-ms", "100", "--idle-timeout-ms", "400"]);
    // a client that answers pings stays connected past the idle timeout
    let mut alive = srv.ws().await;
    let mut silent = srv.ws().await;
    silent.set_auto_pong(false);
    // the silent one sees pings, then a close (1001) once 400 ms pass without a frame
    let silent_task = tokio::spawn(async move {
        let code = recv_close(&mut silent).await;
        (code, silent.pings)
    });
    // meanwhile the live client keeps reading, which answers the pings
    let (code, pings) = tokio::select! {
        r = silent_task => r.unwrap(),
        m = alive.recv() => panic!("the live client got {m:?}"),
    };
    assert_eq!(code, 1001);
    assert!(pings >= 1, "server pings were sent");
    alive.send_text(r#"{"op":"ping","id":1}"#).await.unwrap();
    assert_eq!(
        recv(&mut alive).await,
        ServerMsg::Pong { id: Some("1".into()) },
        "answered pings keep a client"
    );
}

/// A close the server starts (here the idle timeout's 1001) is followed by
/// the write side's FIN at once, not when the connection's linger (2 s, the
/// time its reader waits for the client's close) ends: the fan-out's direct
/// writer shares the write half, and the writer task gives its handle back
/// when it ends. Checked to fail with the direct writer's handle kept to the
/// connection's end.
#[tokio::test]
async fn a_close_the_server_starts_is_followed_by_its_fin_at_once() {
    use tokio::io::AsyncReadExt;
    let srv = Server::start(&["--no-sim", "--ping-interval-ms", "200", "--idle-timeout-ms", "300"]);
    let (mut s, mut buf) = raw_ws(&srv, &[]).await;
    assert_eq!(read_close_code(&mut s, &mut buf).await, 1001);
    // Only the rest of the close frame may come before the end of stream,
    // and the end comes well before the 2 s linger.
    let mut chunk = [0u8; 64];
    loop {
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), s.read(&mut chunk))
            .await
            .expect("no FIN within 1 s of the close frame")
            .expect("the connection was reset, not shut down");
        if got == 0 {
            break;
        }
    }
}

#[tokio::test]
async fn the_simulated_market_publishes_through_the_real_path() {
    let srv = Server::start(&["--sim-rate", "2000"]);
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["BTC-USD","EUR/USD"]}"#)
        .await
        .unwrap();
    assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
    let mut last = std::collections::HashMap::new();
    let mut ticks = 0;
    while ticks < 40 {
        match recv(&mut c).await {
            ServerMsg::Snapshot(t) => {
                last.insert(t.symbol.clone(), t.seq);
            }
            ServerMsg::Tick(t) => {
                let prev = last.insert(t.symbol.clone(), t.seq);
                if let Some(p) = prev {
                    assert_eq!(t.seq, p + 1, "gapless");
                }
                let (bid, ask) = (t.bid.unwrap(), t.ask.unwrap());
                assert!(
                    bid.parse::<f64>().unwrap() <= ask.parse::<f64>().unwrap(),
                    "{bid} <= {ask}"
                );
                ticks += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // (one scrape: a commit counts its bytes before its ticks)
    let (_, metrics) = srv.get("/metrics").await;
    let accepted = metric_in(&metrics, "tickshard_ticks_accepted_total");
    assert!(accepted >= 40.0, "{metrics}");
    // Every accepted tick is in a log record or a tick block, and the
    // smallest stored tick is 13 bytes (time 8, flags 1, price and size 2 each).
    let written = metric_in(&metrics, "tickshard_store_written_bytes_total");
    assert!(written >= 13.0 * accepted, "{written} bytes for {accepted} ticks");
    assert!(
        metrics.contains("tickshard_store_written_bytes_total{kind=\"log\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn websockets_past_the_limit_are_refused_until_a_slot_is_free() {
    let srv = Server::start(&["--no-sim", "--max-connections", "2"]);
    let mut a = srv.ws().await;
    let b = srv.ws().await;
    // a third is refused (503) while two WebSockets hold the slots
    let third = tickshard_client::ws::WsConn::connect(&srv.ws_url(), std::time::Duration::from_millis(500)).await;
    assert!(third.is_err(), "a third connection must not be served");
    a.close().await;
    assert_eq!(recv_close(&mut a).await, 1000);
    drop(a);
    drop(b);
    // once a slot is free (the server has ended a connection: a 503 until
    // then), new connections are served again
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut c = loop {
        match tickshard_client::ws::WsConn::connect(&srv.ws_url(), WAIT).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no slot freed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        }
    };
    c.send_text(r#"{"op":"ping","id":1}"#).await.unwrap();
    assert_eq!(recv(&mut c).await, ServerMsg::Pong { id: Some("1".into()) });
}

/// The reader keeps no buffer between bursts of client frames, so frames that
/// arrive together, frames cut anywhere, and frames sent in the same packet as
/// the upgrade request must all be read, whole and in order.
#[tokio::test]
async fn frames_pipelined_cut_or_sent_with_the_upgrade_are_all_read() {
    use tokio::io::AsyncWriteExt;
    let srv = Server::start(&["--no-sim"]);
    let ping = |id: u32| client_frame(format!(r#"{{"op":"ping","id":{id}}}"#).as_bytes());
    // The upgrade request and the first frame in one write.
    let (mut s, mut buf) = raw_ws(&srv, &ping(1)).await;
    assert_eq!(
        read_server_frames(&mut s, &mut buf, 1).await,
        [r#"{"type":"pong","id":1}"#]
    );

    // Two whole frames and the start of a third (cut inside its header), in one write.
    let mut burst = [ping(2), ping(3)].concat();
    let third = ping(4);
    burst.extend_from_slice(&third[..1]);
    s.write_all(&burst).await.unwrap();
    let got = read_server_frames(&mut s, &mut buf, 2).await;
    assert_eq!(got, [r#"{"type":"pong","id":2}"#, r#"{"type":"pong","id":3}"#]);
    // The rest of the third, cut inside its payload, then a long frame (16-bit length).
    s.write_all(&third[1..third.len() - 3]).await.unwrap();
    let mut rest = third[third.len() - 3..].to_vec();
    let pad = "x".repeat(300);
    rest.extend(client_frame(
        format!(r#"{{"op":"ping","id":5,"pad":"{pad}"}}"#).as_bytes(),
    ));
    s.write_all(&rest).await.unwrap();
    let got = read_server_frames(&mut s, &mut buf, 2).await;
    assert_eq!(got, [r#"{"type":"pong","id":4}"#, r#"{"type":"pong","id":5}"#]);
}

/// A client that keeps sending after the server has decided to close (here: an
/// oversized message) still gets the close frame and a clean end of stream:
/// the server reads and discards until the client closes, instead of closing
/// a socket with unread bytes, which makes the kernel send a reset that can
/// fail the client's close reply and lose the close frame.
#[tokio::test]
async fn a_server_close_is_not_turned_into_a_reset_by_late_client_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = Server::start(&["--no-sim", "--max-message-bytes", "1024"]);
    let (mut s, mut buf) = raw_ws(&srv, &client_frame(&[b' '; 5000])).await;
    let got = read_server_frames(&mut s, &mut buf, 1).await;
    assert!(got[0].contains("message_too_large"), "{got:?}");
    // Wait for the close frame (0x88, code 1009) ...
    while !(buf.len() >= 4 && buf[0] == 0x88 && buf[2..4] == 1009u16.to_be_bytes()) {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "no close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
    // ... then send what a busy client still had in flight, and wait until the
    // server has let the connection go.
    s.write_all(&client_frame(br#"{"op":"ping"}"#)).await.unwrap();
    eventually("the server lets the connection go", || async {
        srv.metric("tickshard_clients_connected").await == 0.0
    })
    .await;
    // A server that closed its socket with that frame unread has reset the
    // connection, and the client's close reply (what a WebSocket client sends
    // on reading the close frame) fails; one that lingered read it and ended
    // the connection cleanly.
    s.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xf1])
        .await
        .expect("the close reply failed: the server reset the connection");
}

/// A resume whose replay outlasts the idle timeout is not closed as idle
/// while the client takes it. The reader handles the subscribe until the
/// replay is queued and reads no frame meanwhile (the client's pings wait
/// in the socket), so what the client takes counts as its life then. The
/// client's small receive buffer makes the replay go at its pace, not into
/// the kernel's buffers. Fails (1001 mid-replay) when only frames count.
/// A client that takes nothing of such a replay is still closed as idle.
#[tokio::test]
async fn a_replay_longer_than_the_idle_timeout_goes_on_while_the_client_takes_it() {
    const N: i64 = 80_000;
    const IDLE_MS: u64 = 800;
    let srv = Server::start(&[
        "--no-sim",
        "--client-queue-bytes",
        "65536",
        "--ping-interval-ms",
        "300",
        "--idle-timeout-ms",
        &IDLE_MS.to_string(),
    ]);
    let mut p = srv.publisher("long-replay").await;
    publish_all(&mut p, [tick("LONG-1", T0, "1.5", "1")]).await;
    let epoch = {
        let mut c = srv.ws().await;
        c.send_text(r#"{"op":"subscribe","symbols":["LONG-1"]}"#).await.unwrap();
        recv_subscribed(&mut c).await[0].epoch.clone()
    };
    for chunk in (2..=N).collect::<Vec<i64>>().chunks(8_000) {
        publish_all(
            &mut p,
            chunk.iter().map(|&i| tick("LONG-1", T0 + i, &format!("1.{i}"), "1")),
        )
        .await;
    }

    // a client with a small receive buffer, resuming from seq 1
    let resume = || async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(8 * 1024).unwrap();
        let s = tokio::time::timeout(WAIT, sock.connect(srv.http))
            .await
            .unwrap()
            .unwrap();
        let sub = format!(
            r#"{{"op":"subscribe","id":1,"symbols":["LONG-1"],"resume":{{"LONG-1":{{"seq":1,"epoch":"{epoch}"}}}}}}"#
        );
        raw_ws_over(s, &client_frame(sub.as_bytes())).await
    };
    let (mut s, mut buf) = resume().await;
    let started = std::time::Instant::now();
    let mut next = 2u64;
    let mut subscribed = false;
    let mut rounds = 0u32;
    use tokio::io::AsyncWriteExt;
    while next <= N as u64 {
        // a live client: it says so now and then (a browser answers the
        // server's pings; this one sends its own)
        rounds += 1;
        if rounds % 10 == 0 {
            s.write_all(&client_frame(br#"{"op":"ping"}"#)).await.unwrap();
        }
        for text in read_server_frames(&mut s, &mut buf, 200).await {
            match ServerMsg::parse(&text) {
                Some(ServerMsg::Subscribed { symbols, .. }) if !subscribed => {
                    assert_eq!((symbols[0].seq, symbols[0].recovered), (N as u64, true));
                    subscribed = true;
                }
                Some(ServerMsg::Tick(t)) => {
                    assert!(subscribed);
                    assert_eq!(t.seq, next, "no gap, no duplicate");
                    next += 1;
                }
                Some(ServerMsg::Pong { .. }) => {}
                _ => panic!("unexpected message after tick {}: {text}", next - 1),
            }
            if next > N as u64 {
                break;
            }
        }
        // a client that reads, but slowly
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The test means something only if the replay outlasted the timeout.
    let took = started.elapsed();
    assert!(
        took > std::time::Duration::from_millis(2 * IDLE_MS),
        "the replay took only {took:?}"
    );
    // and the connection still answers
    s.write_all(&client_frame(br#"{"op":"ping","id":2}"#)).await.unwrap();
    loop {
        let got = read_server_frames(&mut s, &mut buf, 1).await;
        match ServerMsg::parse(&got[0]) {
            Some(ServerMsg::Pong { id: Some(id) }) if id == "2" => break,
            Some(ServerMsg::Pong { id: None }) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    drop(s);
    let connected = || async { srv.metric("tickshard_clients_connected").await };
    eventually("the first client gone", || async { connected().await == 0.0 }).await;

    // One that takes nothing: closed as idle once the kernel's buffers are
    // full, though the server is still replaying to it.
    let idle_before = srv.log_text().matches("idle timeout").count();
    let (_silent, _) = resume().await;
    eventually("a silent client connected", || async { connected().await == 1.0 }).await;
    eventually("a silent client closed", || async { connected().await == 0.0 }).await;
    assert!(
        srv.log_text().matches("idle timeout").count() > idle_before,
        "closed as idle"
    );
}
