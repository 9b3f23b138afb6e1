//! Recovery: the state folded from snapshots plus tail blocks is exactly the
//! state that was acked, after a crash and after a clean stop.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use rust_decimal::Decimal;

use super::*;

const T0: i64 = 1_700_000_000_000_000;
const SYMBOLS: [&str; 3] = ["BTC-USD", "ETH-USD", "SOL-USD"];

struct Running {
    store: Arc<Store>,
    hub: Arc<Hub>,
    committer: Committer,
    join: thread::JoinHandle<()>,
}

fn start(dir: &std::path::Path) -> Running {
    let store = Arc::new(crate::store::reopen(dir).unwrap());
    let hub = Arc::new(Hub::new(1 << 20));
    let records = store.load_symbols().unwrap();
    let dedup = store.load_dedup().unwrap();
    let (committer, join) = Committer::start(store.clone(), hub.clone(), records, dedup).unwrap();
    Running {
        store,
        hub,
        committer,
        join,
    }
}

fn tick(sym: &str, ts: i64, cents: i64) -> Tick {
    Tick {
        symbol: Symbol::parse(sym).unwrap(),
        seq: 0,
        ts,
        price: Decimal::new(cents, 2),
        size: Decimal::new(cents % 7 + 1, 3),
        bid: None,
        ask: Some(Decimal::new(cents + 1, 2)),
        bid_size: None,
        ask_size: None,
    }
}

/// Publishes `ticks` as one batch of requests from `publisher` and waits for
/// every ack (so each call is one or a few group commits).
async fn publish(c: &Committer, publisher: &str, first_pseq: u64, ticks: &[Tick]) -> Vec<Ack> {
    let (reply, mut rx) = AckTx::new();
    let id: Arc<str> = Arc::from(publisher);
    for (i, t) in ticks.iter().enumerate() {
        c.publish(PublishCmd {
            tick: *t,
            publisher: Some((id.clone(), first_pseq + i as u64)),
            request_id: i as u64,
            reply: reply.clone(),
            received: Instant::now(),
        })
        .await
        .unwrap();
    }
    let mut acks = Vec::new();
    while acks.len() < ticks.len() {
        acks.extend(rx.recv().await.unwrap());
    }
    acks.sort_by_key(|a| a.request_id);
    acks
}

/// Every symbol's head, comparable across restarts.
type Heads = BTreeMap<String, (Epoch, u64, Option<Tick>, [Option<Candle>; 3])>;

fn heads(hub: &Hub) -> Heads {
    hub.all()
        .into_iter()
        .map(|h| {
            let head = h.head();
            (h.symbol().to_string(), (head.epoch, head.seq, head.last, head.candles))
        })
        .collect()
}

/// Enough commits that every symbol has a snapshot and blocks after it.
async fn publish_waves(c: &Committer) {
    let per_wave = 4;
    for wave in 0..(SNAPSHOT_EVERY as i64 + 20) {
        let ticks: Vec<Tick> = (0..per_wave)
            .flat_map(|i| {
                SYMBOLS.iter().map(move |s| {
                    // 250 ms apart: 1s and 1m candles roll during the run;
                    // every 9th tick is late for its 1s candle
                    let ts = T0 + (wave * per_wave + i) * 250_000 - if i == 3 && wave % 9 == 0 { 900_000 } else { 0 };
                    tick(s, ts, 10_000 + wave * 13 + i)
                })
            })
            .collect();
        let pseq = 1 + (wave * per_wave * 3) as u64;
        let acks = publish(c, "p1", pseq, &ticks).await;
        assert!(
            acks.iter()
                .all(|a| matches!(a.result, Ok(Accepted { duplicate: false, .. })))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_after_a_crash_is_the_acked_state() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    publish_waves(&r.committer).await;
    let before = heads(&r.hub);
    // the test must exercise the fold: some symbol has blocks after its snapshot
    let tails: usize = r
        .store
        .load_symbols()
        .unwrap()
        .iter()
        .map(|rec| r.store.load_tail(&rec.symbol, rec.last_seq).unwrap().len())
        .sum();
    assert!(tails > 0, "no tail blocks: the snapshot is written every commit");

    // a crash: the committer goes away without its shutdown snapshot
    drop(r.committer);
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    drop(r.store);

    let r = start(dir.path());
    assert_eq!(heads(&r.hub), before, "epoch, seq, last tick and open candles");
    // de-dup state: the last request of p1 is still a duplicate with its seq,
    // and the next publisher_seq is accepted with the next seq
    let last_pseq = (SNAPSHOT_EVERY as u64 + 20) * 12;
    let last = tick("SOL-USD", T0, 1);
    let acks = publish(&r.committer, "p1", last_pseq, &[last]).await;
    let want = before["SOL-USD"].1;
    assert!(
        matches!(acks[0].result, Ok(Accepted { duplicate: true, seq, .. }) if seq == want),
        "{:?}",
        acks[0]
    );
    let acks = publish(&r.committer, "p1", last_pseq + 1, &[last]).await;
    assert!(matches!(acks[0].result, Ok(Accepted { duplicate: false, seq, .. }) if seq == want + 1));

    // a clean stop snapshots every symbol: the next start folds nothing
    r.committer.stop().await;
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    for rec in r.store.load_symbols().unwrap() {
        assert!(
            r.store.load_tail(&rec.symbol, rec.last_seq).unwrap().is_empty(),
            "{rec:?}"
        );
    }
    let after = heads(&r.hub);
    drop(r.store);
    let r = start(dir.path());
    assert_eq!(heads(&r.hub), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_removes_blocks_after_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    publish_waves(&r.committer).await;
    let before = heads(&r.hub);
    for (sym, (_, seq, _, _)) in &before {
        r.store.prune_ticks(&Symbol::parse(sym).unwrap(), seq + 1).unwrap();
    }
    drop(r.committer);
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    drop(r.store);
    let r = start(dir.path());
    assert_eq!(heads(&r.hub), before);
}
