//! Durability and lifecycle (contract §6, §7): kill -9, SIGTERM drain,
//! retention, and refusing data dirs that are not ours.

use std::time::Duration;

use tickshard_client::ws::ServerMsg;
use tickshard_proto::v1 as pb;

use crate::common::*;

const T0: i64 = 1_700_000_000_000_000;

#[tokio::test]
async fn every_acked_tick_survives_kill_9_with_its_seq() {
    let mut srv = Server::start(&["--no-sim"]);
    let mut p = srv.publisher("k9").await;
    let symbols = ["BTC-USD", "ETH-USD", "SOL-USD"];
    let ticks: Vec<pb::Tick> = (0..3000i64)
        .map(|i| {
            tick(
                symbols[(i % 3) as usize],
                T0 + i,
                &format!("{}.{:04}", 100 + i, i),
                "0.001",
            )
        })
        .collect();
    let acks = publish_all(&mut p, ticks.clone()).await;
    srv.kill9();
    srv.restart();
    for sym in symbols {
        let stored = history(&srv, sym, 1).await;
        let mine: Vec<(&pb::Tick, u64)> = ticks
            .iter()
            .zip(&acks)
            .filter(|(t, _)| t.symbol == sym)
            .map(|(t, a)| (t, a.seq))
            .collect();
        assert_eq!(stored.len(), mine.len(), "{sym}: every acked tick is present");
        for (s, (t, seq)) in stored.iter().zip(mine) {
            assert_eq!(
                (s.seq, s.ts_micros, s.price.as_str(), s.size.as_str()),
                (seq, t.ts_micros, t.price.as_str(), "0.001")
            );
        }
    }
    // seq continues after the last durable one, epoch unchanged
    let mut p = srv.publisher("k9-after").await;
    let a = publish_all(&mut p, [tick("BTC-USD", T0 + 10_000, "1", "1")]).await;
    assert_eq!(a[0].seq, 1001);
    assert_eq!(a[0].epoch, acks[0].epoch);
    // de-dup state survived too: a retry of the last request is a duplicate
    let mut retry = srv.publisher("k9").await;
    let r = publish_all(&mut retry, [tick("BTC-USD", T0 + 1, "100.0000", "0.001")]).await;
    assert!(
        r[0].duplicate,
        "publisher_seq 1 of k9/BTC-USD was accepted before the crash"
    );
}

#[tokio::test]
async fn sigterm_closes_clients_with_1012_flushes_and_exits_0() {
    let mut srv = Server::start(&["--no-sim", "--drain-ms", "300"]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = srv.ws().await;
        c.send_text(r#"{"op":"subscribe","symbols":["X"]}"#).await.unwrap();
        assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
        clients.push(c);
    }
    let mut p = srv.publisher("term").await;
    let acks = publish_all(&mut p, (0..500).map(|i| tick("X", T0 + i, "1.5", "1"))).await;
    srv.sigterm();
    for c in &mut clients {
        assert_eq!(recv_close(c).await, 1012);
    }
    let st = srv.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "exit status {st:?}");
    srv.restart();
    let h = history(&srv, "X", 1).await;
    assert_eq!(h.len(), 500);
    assert_eq!(h.last().unwrap().seq, acks.last().unwrap().seq);
}

/// Nothing left to drain, nothing to wait for: with its clients gone (one
/// came and left, a publisher is still connected), SIGTERM exits as soon as
/// what was acked is flushed, not after `--drain-ms` (here 10 minutes).
#[tokio::test]
async fn sigterm_with_no_clients_left_does_not_wait_for_the_drain_time() {
    let mut srv = Server::start(&["--no-sim", "--drain-ms", "600000"]);
    let mut c = srv.ws().await;
    c.send_text(r#"{"op":"subscribe","symbols":["GONE"]}"#).await.unwrap();
    assert!(matches!(recv(&mut c).await, ServerMsg::Subscribed { .. }));
    drop(c);
    let mut p = srv.publisher("left").await;
    let acks = publish_all(&mut p, (0..20).map(|i| tick("GONE", T0 + i, "2.5", "1"))).await;
    // the server has seen the client go (its connection count is back to 0)
    eventually("the client's connection is gone", || async {
        srv.metric("tickshard_clients_connected").await == 0.0
    })
    .await;
    srv.sigterm();
    let st = srv.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "exit status {st:?}");
    srv.restart();
    assert_eq!(history(&srv, "GONE", 1).await.len(), acks.len());
}

#[tokio::test]
async fn while_draining_readyz_is_false_and_new_subscriptions_are_unavailable() {
    let mut srv = Server::start(&["--no-sim", "--drain-ms", "4000"]);
    let mut a = srv.ws().await;
    let mut b = srv.ws().await;
    for c in [&mut a, &mut b] {
        c.send_text(r#"{"op":"ping"}"#).await.unwrap();
        assert!(matches!(recv(c).await, ServerMsg::Pong { .. }));
    }
    srv.sigterm();
    // closes are paced: one client goes at once, the other about 2 s later
    let (first, second) = tokio::select! {
        code = recv_close(&mut a) => { assert_eq!(code, 1012); (a, b) }
        code = recv_close(&mut b) => { assert_eq!(code, 1012); (b, a) }
    };
    drop(first);
    let mut second = second;
    assert_eq!(srv.get("/readyz").await.0, 503);
    second
        .send_text(r#"{"op":"subscribe","id":1,"symbols":["X"]}"#)
        .await
        .unwrap();
    let ServerMsg::Error { code, .. } = recv(&mut second).await else {
        panic!()
    };
    assert_eq!(code, "unavailable");
    // new WebSockets are refused
    assert!(
        tickshard_client::ws::WsConn::connect(&srv.ws_url(), WAIT)
            .await
            .is_err()
    );
    assert_eq!(recv_close(&mut second).await, 1012);
    assert!(srv.wait_exit(Duration::from_secs(20)).success());
}

#[tokio::test]
async fn retention_prunes_old_ticks_and_resume_past_it_is_not_recovered() {
    let srv = Server::start(&["--no-sim", "--history-ticks", "100", "--prune-interval-ms", "50"]);
    let mut p = srv.publisher("ret").await;
    let mut epoch = String::new();
    // ten waves: ten group commits, so ten blocks
    for wave in 0..10i64 {
        let acks = publish_all(&mut p, (0..100).map(|i| tick("R", T0 + wave * 100 + i, "1", "1"))).await;
        epoch = acks[0].epoch.clone();
    }
    // Waves are separate commits, so the block holding seq 901 starts there and
    // everything before it goes (retention first asks for a snapshot of R's
    // state if the one on disk is older than what it removes).
    eventually("old ticks pruned", || async {
        history(&srv, "R", 1).await.first().is_some_and(|t| t.seq > 800)
    })
    .await;
    assert!(srv.metric("tickshard_pruned_ticks_total").await >= 800.0);
    let h = history(&srv, "R", 1).await;
    let first = h[0].seq;
    assert!(
        first <= 901,
        "at least --history-ticks are retained (first retained: {first})"
    );
    assert_eq!(
        h.iter().map(|t| t.seq).collect::<Vec<_>>(),
        (first..=1000).collect::<Vec<_>>()
    );
    // resuming from a pruned position is not recoverable: snapshot
    let mut c = srv.ws().await;
    c.send_text(&format!(
        r#"{{"op":"subscribe","symbols":["R"],"resume":{{"R":{{"seq":5,"epoch":"{epoch}"}}}}}}"#
    ))
    .await
    .unwrap();
    let symbols = recv_subscribed(&mut c).await;
    assert!(!symbols[0].recovered);
    let s = recv_snapshot(&mut c).await;
    assert_eq!(s.seq, 1000);
}

#[tokio::test]
async fn a_data_dir_of_another_shard_or_format_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    {
        let mut s = Server::start_in(&dir, &["--no-sim"]);
        s.sigterm();
        assert!(s.wait_exit(Duration::from_secs(20)).success());
    }
    let (st, log) = Server::try_start_in(
        &dir,
        &[
            "--no-sim",
            "--shards",
            "3",
            "--shard-id",
            "1",
            "--peers",
            "http://a:1,http://b:1,http://c:1",
        ],
    )
    .err()
    .expect("must refuse");
    assert!(!st.success());
    assert!(log.contains("belongs to shard 0,"), "{log}");
    // bad flags are named
    let (st, log) = Server::try_start_in(
        &dir,
        &["--shards", "2", "--shard-id", "5", "--peers", "http://a:1,http://b:1"],
    )
    .err()
    .unwrap();
    assert_eq!(st.code(), Some(2));
    assert!(log.contains("--shard-id"), "{log}");
}
