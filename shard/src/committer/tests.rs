//! Recovery: the state folded from snapshots plus the log is exactly the state
//! that was acked, after a crash and after a clean stop.

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
    let marks = store.load_move_marks().unwrap();
    let setup = super::Setup {
        me: 0,
        state: crate::placement::ClusterState::initial(2),
        marks,
        relay: tokio::sync::mpsc::unbounded_channel().0,
    };
    let (committer, join) = Committer::start(
        store.clone(),
        hub.clone(),
        records,
        dedup,
        CommitterConfig::default(),
        setup,
    )
    .unwrap();
    Running {
        store,
        hub,
        committer,
        join,
    }
}

/// A crash: the committer's handles go away without `stop` (so no final
/// compaction); waits for its thread and returns the store to inspect.
async fn crash(r: Running) -> Arc<Store> {
    drop(r.committer);
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    r.store
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

/// `n` publishes of one `sym` tick each from `publisher` (pseq 1..=n), every
/// one waited for, so each is its own commit; ticks `step_us` apart.
async fn one_tick_per_commit(c: &Committer, publisher: &str, sym: &str, n: i64, step_us: i64) {
    for i in 0..n {
        publish(c, publisher, 1 + i as u64, &[tick(sym, T0 + i * step_us, 200 + i)]).await;
    }
}

/// The seq of `sym`'s snapshot in the store.
fn snapshot_seq(store: &Store, sym: &Symbol) -> u64 {
    store
        .load_symbols()
        .unwrap()
        .into_iter()
        .find(|rec| rec.symbol == *sym)
        .unwrap()
        .last_seq
}

/// Waves of publishes: each is at least one commit.
const WAVES: i64 = COMPACT_AFTER as i64 + 20;

/// Enough commits that a compaction ran (snapshots, blocks) and log records
/// follow it.
async fn publish_waves(c: &Committer) {
    let per_wave = 4;
    for wave in 0..WAVES {
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
    // one more commit, so the log is never empty (a compaction may just have
    // taken every record)
    publish(&r.committer, "p2", 1, &[tick("ETH-USD", T0 + 3_600_000_000, 5)]).await;
    let before = heads(&r.hub);

    // a crash: the committer goes away without its final compaction
    let store = crash(r).await;
    // the test must exercise the fold of log records onto snapshots
    assert!(
        store.load_symbols().unwrap().iter().any(|rec| rec.last_seq > 0),
        "no compaction ran"
    );
    assert!(!store.load_log().unwrap().is_empty(), "nothing to fold");
    drop(store);

    let r = start(dir.path());
    assert_eq!(heads(&r.hub), before, "epoch, seq, last tick and open candles");
    // de-dup state: the last request of p1 is still a duplicate with its seq,
    // and the next publisher_seq is accepted with the next seq
    let last_pseq = WAVES as u64 * 12;
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

    // a clean stop compacts everything: the next start folds nothing
    r.committer.stop().await;
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    assert!(r.store.load_log().unwrap().is_empty());
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
async fn a_symbol_compacted_while_an_idle_one_holds_the_log_recovers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    // B's one commit keeps log record 1 alive; A is compacted after
    // COMPACT_AFTER commits, so records 1.. hold A's sections that A's
    // snapshot already covers
    publish(&r.committer, "pb", 1, &[tick("BTC-USD", T0, 100)]).await;
    one_tick_per_commit(&r.committer, "pa", "ETH-USD", COMPACT_AFTER as i64 + 8, 400_000).await;
    let before = heads(&r.hub);
    let store = crash(r).await;
    let eth = Symbol::parse("ETH-USD").unwrap();
    let snap = snapshot_seq(&store, &eth);
    assert!(
        snap >= COMPACT_AFTER as u64,
        "ETH-USD was compacted (snapshot at {snap})"
    );
    let log = store.load_log().unwrap();
    assert_eq!(log.first().map(|(c, _)| *c), Some(1), "BTC-USD holds record 1");
    assert!(
        log.iter()
            .flat_map(|(_, s)| s)
            .any(|s| s.ticks[0].symbol == eth && s.ticks[0].seq <= snap),
        "the log holds ETH-USD sections the snapshot covers"
    );
    drop(store);
    let r = start(dir.path());
    assert_eq!(heads(&r.hub), before);
    // and the history reads back whole from the blocks start-up compacted
    let ticks = r.store.read_ticks(&eth, 1, u64::MAX, usize::MAX).unwrap();
    assert_eq!(ticks.len() as u64, before["ETH-USD"].1);
    assert!(ticks.iter().enumerate().all(|(i, t)| t.seq == i as u64 + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_symbol_does_not_hold_the_log_forever() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    publish(&r.committer, "pb", 1, &[tick("BTC-USD", T0, 100)]).await;
    // (commits that log nothing, because they compact ETH-USD, take no record
    // number: go well past LOG_SPAN records)
    one_tick_per_commit(&r.committer, "pa", "ETH-USD", 2 * LOG_SPAN as i64, 1_000).await;
    let before = heads(&r.hub);
    let store = crash(r).await;
    let btc = Symbol::parse("BTC-USD").unwrap();
    assert_eq!(
        snapshot_seq(&store, &btc),
        1,
        "BTC-USD was compacted once it held the log back LOG_SPAN commits"
    );
    let log = store.load_log().unwrap();
    assert!(
        log.len() as u64 <= LOG_SPAN,
        "the log stays bounded: {} records",
        log.len()
    );
    assert!(
        log.iter()
            .all(|(_, sections)| sections.iter().all(|s| s.ticks[0].symbol != btc))
    );
    drop(store);
    let r = start(dir.path());
    assert_eq!(heads(&r.hub), before);
}

/// A client that makes up a new `publisher_id` per request grows a symbol's
/// de-dup state to [`MAX_PUBLISHERS_PER_SYMBOL`] at most: the state used least
/// recently goes first (its retry would be stored again, as after the horizon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symbols_publishers_are_bounded_least_recent_first() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let n = MAX_PUBLISHERS_PER_SYMBOL + 10;
    for i in 0..n {
        publish(
            &r.committer,
            &format!("p{i}"),
            1,
            &[tick("BTC-USD", T0 + i as i64, 100)],
        )
        .await;
    }
    // the newest are still de-duplicated, the oldest are forgotten
    let newest = publish(&r.committer, &format!("p{}", n - 1), 1, &[tick("BTC-USD", T0, 100)]).await;
    assert!(matches!(newest[0].result, Ok(Accepted { duplicate: true, .. })));
    let oldest = publish(&r.committer, "p0", 1, &[tick("BTC-USD", T0, 100)]).await;
    assert!(matches!(oldest[0].result, Ok(Accepted { duplicate: false, .. })));
    r.committer.stop().await;
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    let dedup = r.store.load_dedup().unwrap();
    assert!(dedup[0].1.len() <= MAX_PUBLISHERS_PER_SYMBOL, "{}", dedup[0].1.len());
}

/// The committer keeps what it committed to the log but not yet to tick
/// blocks (compaction takes it from there, readers read it there); the hub
/// holds nothing the store needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committer_holds_what_the_log_has_until_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let btc = Symbol::parse("BTC-USD").unwrap();
    one_tick_per_commit(&r.committer, "p", "BTC-USD", 5, 1_000).await;
    let held = r.committer.held(&btc).unwrap().recent(0);
    let seqs: Vec<u64> = held.chunks.iter().flat_map(|c| c.ticks.iter().map(|t| t.seq)).collect();
    assert_eq!(
        (held.first, seqs),
        (Some(1), vec![1, 2, 3, 4, 5]),
        "below COMPACT_AFTER: all in the log"
    );
    assert!(
        r.store.read_ticks(&btc, 1, 5, 10).unwrap().is_empty(),
        "no tick block yet"
    );
    // Enough commits for a compaction: the blocks have what was held.
    one_tick_per_commit(&r.committer, "q", "BTC-USD", COMPACT_AFTER as i64, 1_000).await;
    let first_held = r.committer.held(&btc).unwrap().recent(0).first;
    let snap = snapshot_seq(&r.store, &btc);
    assert!(
        snap >= 5 && first_held.is_none_or(|f| f == snap + 1),
        "held from {first_held:?}, blocks to {snap}"
    );
    assert_eq!(r.store.read_ticks(&btc, 1, snap, 100).unwrap().len() as u64, snap);
    r.committer.stop().await;
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
}

/// A compaction retention asks for happens once: later commits go to the log
/// again (a request must not stay in force).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_compaction_happens_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let btc = Symbol::parse("BTC-USD").unwrap();
    one_tick_per_commit(&r.committer, "p", "BTC-USD", 3, 1_000).await;
    r.committer.request_compaction();
    publish(&r.committer, "q", 1, &[tick("BTC-USD", T0 + 10_000, 1)]).await;
    assert!(snapshot_seq(&r.store, &btc) >= 3, "the requested compaction ran");
    let compacted = snapshot_seq(&r.store, &btc);
    for i in 0..3 {
        publish(&r.committer, "q", 2 + i, &[tick("BTC-USD", T0 + 20_000 + i as i64, 1)]).await;
    }
    assert_eq!(snapshot_seq(&r.store, &btc), compacted, "no compaction after it");
    let held = r.committer.held(&btc).unwrap().recent(0);
    // (seq 4 was compacted with the request or is held, whichever came first)
    assert_eq!(
        held.chunks.len() as u64,
        7 - compacted,
        "the later commits are held from the log"
    );
    assert_eq!(held.first, Some(compacted + 1));
}
