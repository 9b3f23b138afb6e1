//! Kill -9 soak (issue 10): one node under a steady publish load with
//! resuming subscribers, killed with SIGKILL at random moments and restarted,
//! `TICKSHARD_SOAK_CYCLES` times (default 10; the figures in BENCHMARKS.md
//! come from 100). Retention and compaction run all the time (small
//! `--history-ticks`, a 50 ms retention pass), so kills land after acks,
//! during compactions and during retention passes.
//!
//! After every restart: every acked tick still retained is there with its
//! `seq` and its exact content, nothing was acked twice under two seqs, the
//! epochs are unchanged; at the end, each subscriber saw every tick of every
//! symbol exactly once, in order (never a snapshot after the first).
//!
//! `cargo test --test it soak -- --ignored --nocapture` (`.ci/run` runs it).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tickshard_client::{
    publisher::{Publisher, PublisherConfig},
    ws::{Event, ServerMsg, Subscriber, SubscriberConfig},
};
use tickshard_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::common::*;

const SYMBOLS: usize = 8;
const HISTORY: u64 = 500;
const T0: i64 = 1_732_530_000_000_000;

/// What the publisher was told: per symbol, seq → (ts, price) of the tick.
type Acked = Arc<Mutex<HashMap<String, BTreeMap<u64, (i64, String)>>>>;

#[derive(Default)]
struct SubReport {
    /// Per symbol, every seq seen in order.
    seqs: HashMap<String, Vec<u64>>,
    snapshots_after_start: u64,
    max_gap: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak: .ci/run runs it (TICKSHARD_SOAK_CYCLES), see BENCHMARKS.md"]
async fn kill_9_soak() {
    let cycles: usize = std::env::var("TICKSHARD_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut srv = Server::start(&[
        "--no-sim",
        "--history-ticks",
        &HISTORY.to_string(),
        "--prune-interval-ms",
        "50",
    ]);
    let symbols: Vec<String> = (0..SYMBOLS).map(|i| format!("SOAK-{i}")).collect();
    let stop = CancellationToken::new();

    // Publisher: ~2,000 ticks/s over the symbols, through the client library
    // (it resends everything unacked after each kill).
    let acked: Acked = Arc::default();
    let twice = Arc::new(Mutex::new(Vec::<String>::new()));
    let publisher = {
        let (url, syms, acked, twice, stop) = (
            srv.grpc_url(),
            symbols.clone(),
            acked.clone(),
            twice.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut p = Publisher::connect(PublisherConfig::new(vec![url], "soak"))
                .await
                .unwrap();
            let mut sent: HashMap<u64, (String, i64, String)> = HashMap::new();
            let mut every = tokio::time::interval(Duration::from_millis(1));
            let mut n = 0i64;
            let record = |a: tickshard_client::publisher::Acked, sent: &HashMap<u64, (String, i64, String)>| {
                assert!(a.error.is_none(), "{a:?}");
                let (sym, ts, price) = sent[&a.request_id].clone();
                let mut acked = acked.lock().unwrap();
                let per = acked.entry(sym.clone()).or_default();
                if a.duplicate && a.seq == 0 {
                    return; // a resend of an older request: its first ack counted
                }
                match per.insert(a.seq, (ts, price.clone())) {
                    Some(prev) if prev != (ts, price.clone()) => twice
                        .lock()
                        .unwrap()
                        .push(format!("{sym} seq {} acked for two ticks", a.seq)),
                    _ => {}
                }
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {
                        for _ in 0..2 {
                            n += 1;
                            let sym = syms[n as usize % SYMBOLS].clone();
                            let price = format!("{}.{:02}", 100 + n % 50, n % 100);
                            let id = p.send(tick(&sym, T0 + n, &price, "1")).await.unwrap();
                            sent.insert(id, (sym, T0 + n, price));
                        }
                    }
                    a = p.next_ack(), if p.in_flight() > 0 => {
                        if let Some(a) = a.unwrap() { record(a, &sent) }
                    }
                }
            }
            for a in tokio::time::timeout(WAIT, p.flush()).await.unwrap().unwrap() {
                record(a, &sent);
            }
        })
    };

    // Two resuming subscribers.
    let sub_stop = CancellationToken::new();
    let mut subscribers = Vec::new();
    let mut progress = Vec::new();
    for _ in 0..2 {
        let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        progress.push(seen.clone());
        let mut sub = Subscriber::new(SubscriberConfig {
            urls: vec![srv.ws_url()],
            symbols: symbols.clone(),
            channels: vec!["ticks".into()],
            connect_timeout: Duration::from_secs(2),
            silence: tickshard_client::ws::SILENCE,
            token: None,
            trust: None,
        })
        .expect("a valid subscriber configuration");
        let stop = sub_stop.clone();
        subscribers.push(tokio::spawn(async move {
            let mut r = SubReport::default();
            let mut started = false;
            let mut last = tokio::time::Instant::now();
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = sub.next() => ev,
                };
                match ev {
                    Event::Message(ServerMsg::Tick(t)) => {
                        let now = tokio::time::Instant::now();
                        if started {
                            r.max_gap = r.max_gap.max(now - last);
                        }
                        last = now;
                        seen.lock().unwrap().insert(t.symbol.clone(), t.seq);
                        r.seqs.entry(t.symbol).or_default().push(t.seq);
                    }
                    Event::Message(ServerMsg::Subscribed { .. }) => started = true,
                    Event::Message(ServerMsg::Snapshot(s)) if started && r.seqs.contains_key(&s.symbol) => {
                        r.snapshots_after_start += 1
                    }
                    _ => {}
                }
            }
            r
        }));
    }

    let epochs = |snap: pb::SnapshotResponse| -> BTreeMap<String, String> {
        snap.snapshots
            .into_iter()
            .map(|s| (s.last.map(|t| t.symbol).unwrap_or_default(), s.epoch))
            .collect()
    };
    let snapshot = |srv: &Server| {
        let url = srv.grpc_url();
        let symbols = symbols.clone();
        async move {
            pb::feed_client::FeedClient::connect(url)
                .await
                .unwrap()
                .get_snapshot(pb::SnapshotRequest { symbols })
                .await
                .unwrap()
                .into_inner()
        }
    };
    eventually("every symbol has ticks", || async {
        snapshot(&srv).await.snapshots.len() == SYMBOLS
    })
    .await;
    let first_epochs = epochs(snapshot(&srv).await);

    let mut ready_times = Vec::new();
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..600))).await; // a random moment
        srv.kill9();
        let t = std::time::Instant::now();
        srv.restart();
        eventually("ready after the restart", || async {
            srv.get("/readyz").await.0 == 200
        })
        .await;
        ready_times.push(t.elapsed());
        // Every acked tick still retained is there, with its seq and content.
        let acked_now = acked.lock().unwrap().clone();
        let snap = snapshot(&srv).await;
        let heads: HashMap<String, u64> = snap
            .snapshots
            .iter()
            .filter_map(|s| s.last.as_ref().map(|t| (t.symbol.clone(), t.seq)))
            .collect();
        assert_eq!(epochs(snap), first_epochs, "cycle {cycle}: epochs unchanged");
        for (sym, ticks) in &acked_now {
            let Some((&last, _)) = ticks.last_key_value() else {
                continue;
            };
            let head = heads.get(sym).copied().unwrap_or(0);
            assert!(head >= last, "cycle {cycle}: {sym} acked up to {last}, head {head}");
            // retention keeps at least the last HISTORY ticks
            let from = head.saturating_sub(HISTORY) + 1;
            let stored: HashMap<u64, (i64, String)> = history(&srv, sym, from)
                .await
                .into_iter()
                .map(|t| (t.seq, (t.ts_micros, t.price)))
                .collect();
            // More ticks came meanwhile, and retention keeps the last HISTORY
            // of the newest it saw, which may be newer than what this read
            // returned: bound by the head after the read.
            let head_after = snapshot(&srv)
                .await
                .snapshots
                .iter()
                .filter_map(|s| s.last.as_ref())
                .find(|t| t.symbol == *sym)
                .map_or(head, |t| t.seq);
            let newest = stored.keys().max().copied().unwrap_or(0).max(head_after);
            let from = from.max(newest.saturating_sub(HISTORY) + 1);
            for (seq, want) in ticks.range(from..) {
                if stored.get(seq) != Some(want) {
                    let mut have: Vec<u64> = stored.keys().copied().collect();
                    have.sort();
                    let gaps: Vec<(u64, u64)> = have
                        .windows(2)
                        .filter(|w| w[1] != w[0] + 1)
                        .map(|w| (w[0], w[1]))
                        .collect();
                    panic!(
                        "cycle {cycle}: {sym} seq {seq} acked as {want:?}, stored {:?}; stored {} ticks {:?}..{:?}, gaps {gaps:?}\n{}",
                        stored.get(seq),
                        have.len(),
                        have.first(),
                        have.last(),
                        srv.log_text()
                    );
                }
            }
        }
    }

    stop.cancel();
    publisher.await.unwrap();
    assert!(twice.lock().unwrap().is_empty(), "{:?}", twice.lock().unwrap());
    // Let the subscribers catch up with the last acked tick, then check them.
    let last: HashMap<String, u64> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|(s, t)| (s.clone(), t.keys().next_back().copied().unwrap_or(0)))
        .collect();
    let head = epochs(snapshot(&srv).await);
    assert_eq!(head, first_epochs);
    for seen in &progress {
        eventually("the subscribers reach the last acked ticks", || async {
            let seen = seen.lock().unwrap();
            last.iter().all(|(s, &q)| seen.get(s).is_some_and(|&got| got >= q))
        })
        .await;
    }
    sub_stop.cancel();
    let mut max_gap = Duration::ZERO;
    for (i, s) in subscribers.into_iter().enumerate() {
        let r = s.await.unwrap();
        assert_eq!(
            r.snapshots_after_start, 0,
            "subscriber {i} missed data (a conflated or unrecovered snapshot)"
        );
        for (sym, seqs) in &r.seqs {
            let first = seqs[0];
            let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
            assert_eq!(seqs, &want, "subscriber {i}, {sym}: every tick once, in order");
            assert!(
                seqs.last() >= last.get(sym),
                "subscriber {i}, {sym}: reached the last acked tick"
            );
        }
        max_gap = max_gap.max(r.max_gap);
    }
    ready_times.sort();
    let total: usize = acked.lock().unwrap().values().map(BTreeMap::len).sum();
    eprintln!(
        "soak: {cycles} kill -9 cycles, {total} ticks acked; restart to ready: min {:?}, median {:?}, max {:?}; max client-visible gap {:?}",
        ready_times[0],
        ready_times[ready_times.len() / 2],
        ready_times[ready_times.len() - 1],
        max_gap
    );
}
