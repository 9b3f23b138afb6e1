//! The client library and the CLI built on it: a subscriber that resumes across
//! a server crash sees every tick exactly once; `publish` retries and de-dups.

use std::{process::Command, time::Duration};

use tickshard_client::ws::{Event, ServerMsg, Subscriber, SubscriberConfig};

use crate::common::*;

const T0: i64 = 1_732_530_000_000_000;

#[tokio::test]
async fn a_resuming_subscriber_sees_every_tick_once_across_a_kill_9() {
    let mut srv = Server::start(&["--no-sim"]);
    let mut sub = Subscriber::new(SubscriberConfig {
        urls: vec![srv.ws_url()],
        symbols: vec!["BTC-USD".into(), "ETH-USD".into()],
        channels: vec!["ticks".into()],
        connect_timeout: Duration::from_secs(2),
        silence: tickshard_client::ws::SILENCE,
        token: None,
        trust: None,
    })
    .expect("a valid subscriber configuration");
    assert!(matches!(sub.next().await, Event::Connected { .. }));
    assert!(matches!(sub.next().await, Event::Message(ServerMsg::Subscribed { .. })));
    let mut p = srv.publisher("resume-lib").await;
    let sym = |i: i64| if i % 2 == 0 { "BTC-USD" } else { "ETH-USD" };
    publish_all(&mut p, (0..400).map(|i| tick(sym(i), T0 + i, "1.25", "1"))).await;
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let count = |sub_msg: &ServerMsg, seen: &mut std::collections::HashMap<String, Vec<u64>>| {
        if let ServerMsg::Tick(t) = sub_msg {
            seen.entry(t.symbol.clone()).or_default().push(t.seq);
        }
    };
    while seen.values().map(Vec::len).sum::<usize>() < 400 {
        match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
            Event::Message(m) => count(&m, &mut seen),
            other => panic!("{other:?}"),
        }
    }
    // crash, publish while it is down is impossible (it is down); restart and
    // publish more: the subscriber reconnects by itself and resumes
    srv.kill9();
    srv.restart();
    let mut p = srv.publisher("resume-lib-2").await;
    publish_all(&mut p, (400..800).map(|i| tick(sym(i), T0 + i, "1.50", "1"))).await;
    let mut reconnected = false;
    while seen.values().map(Vec::len).sum::<usize>() < 800 {
        match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
            Event::Disconnected { .. } => {}
            Event::Connected { .. } => reconnected = true,
            Event::Message(ServerMsg::Subscribed { symbols, .. }) => {
                assert!(symbols.iter().all(|s| s.recovered), "{symbols:?}");
            }
            Event::Message(ServerMsg::Snapshot(s)) => panic!("resume must not need a snapshot: {s:?}"),
            Event::Message(m) => count(&m, &mut seen),
        }
    }
    assert!(reconnected);
    for (sym, seqs) in seen {
        assert_eq!(seqs, (1..=400).collect::<Vec<u64>>(), "{sym}: exactly once, in order");
    }
}

#[tokio::test]
async fn publish_cli_sends_a_csv_and_a_second_run_stores_nothing_twice() {
    let srv = Server::start(&["--no-sim"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trades.csv");
    let mut csv = String::from("trade_id,timestamp,price,amount\n");
    for i in 0..300 {
        csv.push_str(&format!(
            "{i},{},{}.5,6.405e-05\n",
            1_714_617_360_000i64 + i,
            58_000 + i
        ));
    }
    std::fs::write(&file, csv).unwrap();
    let run_file = |file: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_tickshard"))
            .args([
                "publish",
                file.to_str().unwrap(),
                "--grpc",
                &srv.grpc_url(),
                "--symbol",
                "btc-usd",
            ])
            .args(["--col-ts", "timestamp", "--ts-unit", "ms", "--col-size", "amount"])
            .output()
            .unwrap()
    };
    let run = || run_file(&file);
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(err.contains("300 accepted, 0 duplicates, 0 rejected"), "{err}");
    let second = run();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("0 accepted, 300 duplicates"), "{err}");
    // Another file of the same name (the next day's trades.csv) is a
    // publisher of its own: none of its rows is taken for a duplicate.
    let other = dir.path().join("next-day");
    std::fs::create_dir(&other).unwrap();
    let mut csv = String::from("trade_id,timestamp,price,amount\n");
    for i in 300..400 {
        csv.push_str(&format!("{i},{},{}.5,1\n", 1_714_617_360_000i64 + i, 58_000 + i));
    }
    std::fs::write(other.join("trades.csv"), csv).unwrap();
    let third = run_file(&other.join("trades.csv"));
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(err.contains("100 accepted, 0 duplicates"), "{err}");
    // The first file grown by 50 rows: only those are stored.
    let mut grown = std::fs::read_to_string(&file).unwrap();
    for i in 400..450 {
        grown.push_str(&format!("{i},{},{}.5,1\n", 1_714_617_360_000i64 + i, 58_000 + i));
    }
    std::fs::write(&file, grown).unwrap();
    let fourth = run();
    let err = String::from_utf8_lossy(&fourth.stderr);
    assert!(err.contains("50 accepted, 300 duplicates"), "{err}");
    let h = srv
        .feed()
        .await
        .get_history(tickshard_proto::v1::HistoryRequest {
            symbol: "BTC-USD".into(),
            from_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.ticks.len(), 450);
    assert_eq!((h.ticks[399].seq, h.ticks[399].price.as_str()), (400, "58399.5"));
    assert_eq!((h.ticks[449].seq, h.ticks[449].price.as_str()), (450, "58449.5"));
    assert_eq!(
        (
            h.ticks[0].ts_micros,
            h.ticks[0].price.as_str(),
            h.ticks[0].size.as_str()
        ),
        (1_714_617_360_000_000, "58000.5", "0.00006405")
    );
}

/// A subscriber takes a connection that brings no frame at all for its
/// `silence` (a server or path that died without a FIN) for dead, and
/// reconnects and resumes; a server's pings keep a quiet connection alive.
#[tokio::test]
async fn a_silent_connection_is_replaced_and_pings_keep_a_quiet_one() {
    let sub_of = |srv: &Server| {
        Subscriber::new(SubscriberConfig {
            urls: vec![srv.ws_url()],
            symbols: vec!["SPY".into()],
            channels: vec!["ticks".into()],
            connect_timeout: Duration::from_secs(2),
            silence: Duration::from_millis(1500),
            token: None,
            trust: None,
        })
        .expect("a valid subscriber configuration")
    };
    // a server that never pings (within the test)
    let mute = Server::start(&[
        "--no-sim",
        "--ping-interval-ms",
        "3600000",
        "--idle-timeout-ms",
        "7200000",
    ]);
    let mut sub = sub_of(&mute);
    assert!(matches!(sub.next().await, Event::Connected { .. }));
    let gone = tokio::time::timeout(WAIT, async {
        loop {
            match sub.next().await {
                Event::Message(_) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("a silent connection was never given up");
    assert!(
        matches!(&gone, Event::Disconnected { code: None, reason } if reason.contains("not even a ping")),
        "{gone:?}"
    );
    assert!(matches!(sub.next().await, Event::Connected { .. }), "it reconnects");

    // pings every 100 ms: a tick published after more than two silences
    // (4 s) is the very next event, on the same connection
    let pinging = Server::start(&["--no-sim", "--ping-interval-ms", "100", "--idle-timeout-ms", "10000"]);
    let mut sub = sub_of(&pinging);
    assert!(matches!(sub.next().await, Event::Connected { .. }));
    assert!(matches!(sub.next().await, Event::Message(ServerMsg::Subscribed { .. })));
    let mut p = pinging.publisher("pings").await;
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        publish_all(&mut p, [tick("SPY", T0 + 1, "601.25", "100")]).await;
    });
    // (`next` is not cancel-safe: it is not raced against the delay)
    match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
        Event::Message(ServerMsg::Tick(t)) => assert_eq!((t.seq, t.price.as_str()), (1, "601.25")),
        other => panic!("the tick on the same connection, not {other:?}"),
    }
    later.await.unwrap();
}

/// What no resend can fix is not resent for ever: a tick over the
/// contract's 4 MiB is refused by `send` before it is queued; one over the
/// server's own request limit (here 192,000 bytes: the server ends the stream
/// OUT_OF_RANGE) is answered as rejected (`message_too_large`), and the
/// requests after it go on, stored in order.
#[tokio::test]
async fn a_publisher_is_told_what_no_resend_can_fix() {
    use tickshard_client::{
        ClientError,
        publisher::{Publisher, PublisherConfig},
    };
    let srv = Server::start(&["--no-sim"]);
    let mut p = Publisher::connect(PublisherConfig::new(vec![srv.grpc_url()], "big"))
        .await
        .unwrap();
    let big = |bytes: usize, ts: i64| tickshard_proto::v1::Tick {
        price: "1".repeat(bytes),
        ..tick("AAPL", ts, "1", "1")
    };
    match p.send(big(5 << 20, T0 + 1)).await {
        Err(ClientError::Input(m)) => assert!(m.contains("request bound"), "{m}"),
        other => panic!("refused before it is queued, not {other:?}"),
    }
    assert_eq!(p.in_flight(), 0);
    p.send(tick("AAPL", T0 + 2, "189.5", "1")).await.unwrap();
    let too_big = p.send(big(300_000, T0 + 3)).await.unwrap();
    p.send(tick("AAPL", T0 + 4, "189.75", "2")).await.unwrap();
    let mut acks = tokio::time::timeout(WAIT, p.flush())
        .await
        .expect("the publisher resends the request for ever")
        .unwrap();
    acks.sort_by_key(|a| a.request_id);
    assert_eq!((acks[0].seq, &acks[0].error), (1, &None));
    assert_eq!(acks[1].request_id, too_big);
    assert_eq!(
        acks[1].error.as_ref().map(|e| e.0.as_str()),
        Some("message_too_large"),
        "{:?}",
        acks[1]
    );
    assert_eq!(
        (acks[2].seq, &acks[2].error),
        (2, &None),
        "the request after it is stored next"
    );
    let h = srv
        .feed()
        .await
        .get_history(tickshard_proto::v1::HistoryRequest {
            symbol: "AAPL".into(),
            from_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let prices: Vec<_> = h.ticks.iter().map(|t| (t.seq, t.price.as_str())).collect();
    assert_eq!(prices, vec![(1, "189.5"), (2, "189.75")]);
}

/// `publish --skip-invalid` skips bad rows, not a file it cannot read: a
/// read error of the input itself ends the run with exit code 1 (here a
/// directory read as NDJSON), instead of looping on it or reporting success.
#[test]
fn publish_fails_on_a_file_it_cannot_read_even_when_skipping_bad_rows() {
    let srv = Server::start(&["--no-sim"]);
    let dir = tempfile::tempdir().unwrap();
    let url = srv.grpc_url();
    let out = cli_output(
        &[
            "publish",
            dir.path().to_str().unwrap(),
            "--format",
            "ndjson",
            "--publisher-id",
            "dir",
            "--skip-invalid",
            "--grpc",
            &url,
        ],
        "publish kept going on a file it cannot read",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("directory"), "{err}");
}

/// `give_up_after` counts only while the caller waits on the publisher: one
/// left alone past it (a paced replay between rows) still collects the acks
/// that came meanwhile, each of them, rather than giving up on them.
#[tokio::test]
async fn a_publisher_left_idle_past_its_give_up_still_collects_its_acks() {
    use tickshard_client::publisher::{Publisher, PublisherConfig};
    let srv = Server::start(&["--no-sim"]);
    let mut cfg = PublisherConfig::new(vec![srv.grpc_url()], "idle");
    cfg.give_up_after = Duration::from_millis(300);
    let mut p = Publisher::connect(cfg).await.unwrap();
    for i in 1..=5 {
        p.send(tick("IDLE", T0 + i, "1.5", "1")).await.unwrap();
    }
    // (the caller is elsewhere for three give-ups' time)
    tokio::time::sleep(Duration::from_millis(900)).await;
    let acks = tokio::time::timeout(WAIT, p.flush())
        .await
        .unwrap()
        .expect("the acks that are there are collected");
    let seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
}

/// `tail` ends with exit code 2 on a subscribe error no retry fixes (here
/// an unknown channel, `bad_json`), with `--json` too, instead of waiting
/// for good on a connection that will bring nothing.
#[test]
fn tail_exits_on_an_error_no_retry_fixes() {
    let srv = Server::start(&["--no-sim"]);
    for json in [false, true] {
        let mut args = vec!["tail", "TL", "--channels", "candles:2m", "--url"];
        let url = srv.ws_url();
        args.push(&url);
        if json {
            args.push("--json");
        }
        let out = cli_output(
            &args,
            &format!("tail (--json {json}) kept waiting after a bad_json subscribe"),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("server error bad_json"), "{err}");
    }
}

/// `tickshard tail` prints a symbol's snapshot then every tick with its exact
/// decimals (`--json`: the frames as sent), resumes without a gap or a
/// duplicate across a kill -9 of the server, and stops after `--count`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_every_tick_once_across_a_restart() {
    use std::io::BufRead;
    let mut srv = Server::start(&["--no-sim"]);
    let mut p = srv.publisher("tail").await;
    let t0 = 1_732_530_000_000_000;
    publish_all(&mut p, [tick("TL", t0, "10.50", "1"), tick("TL", t0 + 1, "10.75", "2")]).await;
    /// Kills the child if the test fails before it exits.
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tickshard"))
        .args(["tail", "tl", "--json", "--count", "4", "--url", &srv.ws_url()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let mut child = Reap(Some(child));
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || rx.recv_timeout(WAIT).expect("a line from tail");
    assert!(next().contains("\"type\":\"subscribed\""));
    let snap = next();
    assert!(
        snap.contains("\"type\":\"snapshot\"") && snap.contains("\"seq\":2") && snap.contains("\"price\":\"10.75\""),
        "{snap}"
    );
    drop(p);
    srv.kill9();
    srv.restart();
    let mut p = srv.publisher("tail-2").await;
    publish_all(
        &mut p,
        [
            tick("TL", t0 + 2, "11.00", "1"),
            tick("TL", t0 + 3, "11.25", "1"),
            tick("TL", t0 + 4, "11.50", "1"),
        ],
    )
    .await;
    let mut ticks = Vec::new();
    while ticks.len() < 3 {
        let line = next();
        if line.contains("\"type\":\"tick\"") {
            ticks.push(line);
        }
    }
    for (line, (seq, price)) in ticks.iter().zip([(3, "11.00"), (4, "11.25"), (5, "11.50")]) {
        assert!(
            line.contains(&format!("\"seq\":{seq},")) && line.contains(&format!("\"price\":\"{price}\"")),
            "{line}"
        );
    }
    let mut c = child.0.take().unwrap();
    let (stx, srx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = stx.send(c.wait());
    });
    let status = srx.recv_timeout(WAIT).expect("tail stops after --count").unwrap();
    assert!(status.success());
}
