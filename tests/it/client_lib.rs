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
        token: None,
        trust: None,
    });
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
    let run = || {
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
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(err.contains("300 accepted, 0 duplicates, 0 rejected"), "{err}");
    let second = run();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("0 accepted, 300 duplicates"), "{err}");
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
    assert_eq!(h.ticks.len(), 300);
    assert_eq!(
        (
            h.ticks[0].ts_micros,
            h.ticks[0].price.as_str(),
            h.ticks[0].size.as_str()
        ),
        (1_714_617_360_000_000, "58000.5", "0.00006405")
    );
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
