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
    start_with(dir, CommitterConfig::default())
}

fn start_with(dir: &std::path::Path, cfg: CommitterConfig) -> Running {
    let store = Arc::new(crate::store::reopen(dir).unwrap());
    let hub = Arc::new(Hub::new(1 << 20));
    let records = store.load_symbols().unwrap();
    let dedup = store.load_dedup().unwrap();
    let marks = store.load_move_marks().unwrap();
    let setup = super::Setup {
        me: 0,
        state: crate::placement::ClusterState::initial(1),
        sealed: false,
        marks,
        relay: tokio::sync::mpsc::unbounded_channel().0,
    };
    let (committer, join) = Committer::start(store.clone(), hub.clone(), records, dedup, cfg, setup).unwrap();
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

/// One caller making up new ids fills a symbol's de-dup table with its own
/// states and forgets them, never another caller's (contract §8: no caller
/// can shadow another's requests). Fails on the old eviction, which forgot
/// the least recent states whoever held them (the victim's first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_making_up_ids_forgets_its_own_states_not_anothers() {
    use crate::domain::scoped_publisher_id;
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let victims: Vec<String> = (0..3)
        .map(|i| scoped_publisher_id("victim", &format!("feed-{i}")))
        .collect();
    for v in &victims {
        publish(&r.committer, v, 1, &[tick("BTC-USD", T0, 100)]).await;
    }
    for i in 0..MAX_PUBLISHERS_PER_SYMBOL + 300 {
        let id = scoped_publisher_id("attacker", &format!("p{i}"));
        publish(&r.committer, &id, 1, &[tick("BTC-USD", T0 + i as i64, 100)]).await;
    }
    for v in &victims {
        let retry = publish(&r.committer, v, 1, &[tick("BTC-USD", T0, 100)]).await;
        assert!(
            matches!(retry[0].result, Ok(Accepted { duplicate: true, .. })),
            "{v}'s retry is still a duplicate: {:?}",
            retry[0].result
        );
    }
    // the attacker's oldest went
    let oldest = scoped_publisher_id("attacker", "p0");
    let again = publish(&r.committer, &oldest, 1, &[tick("BTC-USD", T0, 100)]).await;
    assert!(matches!(again[0].result, Ok(Accepted { duplicate: false, .. })));
    r.committer.stop().await;
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
}

/// A full table forgets exactly [`FORGET_AT_ONCE`] states, whatever the
/// callers' sizes (ties at the level included), least recent first among
/// the callers that hold the most.
#[test]
fn a_full_table_forgets_an_eighth_from_the_largest_holders() {
    use crate::domain::scoped_publisher_id;
    let state = |used: i64| DedupState {
        publisher_seq: 1,
        seq: 1,
        last_used: used,
    };
    // 1,024 callers of one state each (all tied at the level)
    let mut one_each: HashMap<Arc<str>, DedupState> = (0..MAX_PUBLISHERS_PER_SYMBOL)
        .map(|i| (Arc::from(scoped_publisher_id(&format!("c{i}"), "p")), state(i as i64)))
        .collect();
    forget_least_recent(&mut one_each, &mut Default::default());
    assert_eq!(one_each.len(), MAX_PUBLISHERS_PER_SYMBOL - FORGET_AT_ONCE);
    assert!(
        one_each.values().all(|d| d.last_used >= FORGET_AT_ONCE as i64),
        "the least recent went"
    );
    // 200 callers of 5 each, plus one of 24 (used more recently): the 24
    // go down to 5 first (19 states), then the least recent of the level's
    // next states make up the rest (109 of the small callers' oldest)
    let mut mixed: HashMap<Arc<str>, DedupState> = HashMap::new();
    for c in 0..200 {
        for p in 0..5 {
            mixed.insert(
                Arc::from(scoped_publisher_id(&format!("c{c}"), &format!("p{p}"))),
                state(0),
            );
        }
    }
    for p in 0..24 {
        mixed.insert(Arc::from(scoped_publisher_id("big", &format!("p{p}"))), state(1_000));
    }
    forget_least_recent(&mut mixed, &mut Default::default());
    assert_eq!(mixed.len(), 1_024 - FORGET_AT_ONCE);
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for k in mixed.keys() {
        *sizes.entry(crate::domain::publisher_scope(k)).or_default() += 1;
    }
    assert_eq!(sizes["big"], 5, "the largest holder was cut to the others' size first");
    assert_eq!(sizes.values().filter(|&&n| n == 4).count(), 109);
}

/// The level callers are cut down to: the states past it are at least the
/// number wanted, and one level higher they would not be.
#[test]
fn the_forget_level_takes_from_the_largest_holders() {
    assert_eq!(forget_level(&[10, 3, 1], 4), 6);
    assert_eq!(forget_level(&[5, 5, 5], 4), 3);
    assert_eq!(forget_level(&[1, 1, 1], 128), 0);
    assert_eq!(forget_level(&[], 128), 0);
    assert_eq!(forget_level(&[1_024], 128), 896);
}

proptest::proptest! {
    #[test]
    fn the_forget_level_is_the_highest_that_frees_enough(
        mut sizes in proptest::collection::vec(1usize..300, 0..50),
        want in 1usize..200,
    ) {
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let past = |level: usize| sizes.iter().map(|s| s.saturating_sub(level)).sum::<usize>();
        let level = forget_level(&sizes, want);
        proptest::prop_assert!(past(level) >= want || level == 0);
        proptest::prop_assert!(past(level + 1) < want || sizes.first().is_none_or(|&m| level >= m));
    }
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

/// Contract §9, on the committer's side: a symbol exported, released to
/// another shard and imported there keeps its epoch, seq and de-dup state;
/// kill -9 of either side after it leaves a directory that opens (the old
/// owner's log sections of the symbol are skipped by its mark).
#[tokio::test]
async fn a_symbol_handed_over_survives_a_crash_on_both_sides() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(a_dir.path());
    // one commit per tick: the symbol's ticks sit in log records, shared
    // with another symbol that keeps them alive after the hand-over
    one_tick_per_commit(&a.committer, "p", "MOVE", 6, 1_000).await;
    one_tick_per_commit(&a.committer, "q", "STAY", 3, 1_000).await;
    let ex = a.committer.export(Symbol::parse("MOVE").unwrap(), 1, 42).await.unwrap();
    assert_eq!((ex.record.last_seq, ex.attempt), (6, 42));
    assert_eq!(ex.dedup, vec![("p".to_string(), ex.dedup[0].1)]);
    // a publish during the hold is parked: not answered yet
    let (reply, mut held) = AckTx::new();
    a.committer
        .publish(PublishCmd {
            tick: tick("MOVE", T0 + 10_000, 999),
            publisher: Some((Arc::from("p"), 7)),
            request_id: 1,
            reply,
            received: Instant::now(),
        })
        .await
        .unwrap();
    let ticks = a.store.read_ticks(&Symbol::parse("MOVE").unwrap(), 1, 6, 100).unwrap();
    assert_eq!(ticks.len(), 6, "an export leaves every tick in blocks");
    a.committer.release(Symbol::parse("MOVE").unwrap(), true).await.unwrap();
    publish(&a.committer, "q", 4, &[tick("STAY", T0 + 20_000, 300)]).await;
    assert!(
        held.try_recv().is_err(),
        "the held publish was relayed, not answered here"
    );
    let store = crash(a).await;
    drop(store);
    let a = start(a_dir.path());
    let h = heads(&a.hub);
    assert!(!h.contains_key("MOVE"), "the old owner's copy is gone");
    assert_eq!(h["STAY"].1, 4);
    let marks = a.store.load_move_marks().unwrap();
    assert_eq!(marks.len(), 1);
    assert!(marks[0].done && marks[0].to == 1);
    drop(crash(a).await);

    // the new owner takes it over, continues the seq, and de-dup holds
    let b = start(b_dir.path());
    b.committer
        .import(Imported {
            record: ex.record.clone(),
            dedup: ex.dedup.clone(),
            ticks,
            candles: Vec::new(),
        })
        .await
        .unwrap();
    let acks = publish(
        &b.committer,
        "p",
        6,
        &[tick("MOVE", T0 + 30_000, 5), tick("MOVE", T0 + 30_001, 6)],
    )
    .await;
    let got: Vec<(u64, bool)> = acks
        .iter()
        .map(|a| a.result.as_ref().map(|r| (r.seq, r.duplicate)).unwrap())
        .collect();
    assert_eq!(
        got,
        [(6, true), (7, false)],
        "the retry of pseq 6 is a duplicate; pseq 7 gets seq 7"
    );
    assert_eq!(
        acks[1].result.as_ref().unwrap().epoch,
        ex.record.epoch,
        "the epoch stays"
    );
    let store = crash(b).await;
    drop(store);
    let b = start(b_dir.path());
    let head = b.hub.get(&Symbol::parse("MOVE").unwrap()).unwrap().head();
    assert_eq!((head.epoch, head.seq), (ex.record.epoch, 7));
    let all = b.store.read_ticks(&Symbol::parse("MOVE").unwrap(), 1, 7, 100).unwrap();
    assert_eq!(
        all.iter().map(|t| t.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    b.committer.stop().await;
}

/// A refused request leaves a hole in its pair: later requests of the pair
/// are refused until the publisher resends from the hole (on any stream: a
/// peer's Forward stream carries every client's retries).
#[test]
fn a_hole_is_filled_by_the_resend_from_it() {
    let (tx, _rx) = AckTx::new();
    let p: Arc<str> = Arc::from("p");
    let s = Symbol::parse("HOLE").unwrap();
    assert!(!tx.is_broken(Some((&p, 5)), s));
    tx.unavailable(Some((&p, 5)), 1, s, "held".into());
    assert!(tx.is_broken(Some((&p, 6)), s), "a later request is behind the hole");
    tx.unavailable(Some((&p, 6)), 2, s, "behind".into());
    assert!(tx.is_broken(Some((&p, 7)), s));
    assert!(!tx.is_broken(Some((&p, 5)), s), "the resend from the hole is accepted");
    assert!(!tx.is_broken(Some((&p, 6)), s), "and what follows it, in order");
    let other: Arc<str> = Arc::from("q");
    assert!(!tx.is_broken(Some((&other, 9)), s), "other publishers are not held up");
}

/// A client's stream remembers [`MAX_BROKEN_PAIRS`] refused pairs, a peer's
/// Forward stream (every client of a pod) [`MAX_BROKEN_PAIRS_PEER`]; one
/// more makes the stream full (it ends).
#[test]
fn a_peer_stream_remembers_more_refused_pairs_than_a_clients() {
    let s = Symbol::parse("HOLE").unwrap();
    for (tx, limit) in [
        (AckTx::new().0, MAX_BROKEN_PAIRS),
        (AckTx::for_peer().0, MAX_BROKEN_PAIRS_PEER),
    ] {
        for i in 0..limit {
            let p: Arc<str> = Arc::from(format!("p{i}"));
            tx.unavailable(Some((&p, 1)), i as u64, s, "moving".into());
        }
        assert!(!tx.is_full(), "{limit} pairs fit");
        let one_more: Arc<str> = Arc::from("one-more");
        tx.unavailable(Some((&one_more, 1)), 0, s, "moving".into());
        assert!(tx.is_full(), "past {limit}");
    }
}

/// A commit is acked before its subscribers' writers are woken (issue 14: an
/// ack means durable and must not wait for the fan-out): a writer whose
/// wake-up never returns does not hold the ack back, and what the ack
/// promises is visible when it arrives (the head moved, the data is queued
/// to the subscriber); nor is the next commit held back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_does_not_wait_for_the_subscribers_wake_up() {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc as std_mpsc,
    };

    use crate::hub::{Channel, Data, Offer, Push, Sink};

    struct Gate {
        queued: Mutex<Vec<u64>>,
        release: Mutex<std_mpsc::Receiver<()>>,
        woken: AtomicUsize,
    }
    impl Sink for Gate {
        fn id(&self) -> u64 {
            7
        }
        fn offer(&self, d: Data, _: Offer) -> (Push, bool) {
            let mut q = self.queued.lock().unwrap();
            if let Data::Ticks { chunk, from } = d {
                q.extend(chunk.ticks[from..].iter().map(|t| t.seq));
            }
            (Push::Queued, true)
        }
        fn wake(&self) {
            // the writer "wakes" only when the test says so
            let _ = self.release.lock().unwrap().recv_timeout(Duration::from_secs(60));
            self.woken.fetch_add(1, Ordering::SeqCst);
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let btc = Symbol::parse("BTC-USD").unwrap();
    publish(&r.committer, "p", 1, &[tick("BTC-USD", T0, 100)]).await;
    let (release, rx) = std_mpsc::channel();
    let gate = Arc::new(Gate {
        queued: Mutex::new(Vec::new()),
        release: Mutex::new(rx),
        woken: AtomicUsize::new(0),
    });
    let hub = r.hub.get(&btc).unwrap();
    assert_eq!(hub.attach(gate.clone(), Channel::Ticks).unwrap().seq, 1);
    hub.activate(7, Channel::Ticks, false);

    // Publishes the `n`th tick (seq `n`), which must be acked while the
    // subscriber's wake-up is blocked.
    let acked = async |n: u64, why: &str| {
        let t = tick("BTC-USD", T0 + n as i64 - 1, 99 + n as i64);
        let acks = tokio::time::timeout(Duration::from_secs(20), publish(&r.committer, "p", n, &[t]))
            .await
            .expect(why);
        assert!(
            matches!(acks[0].result, Ok(Accepted { seq, .. }) if seq == n),
            "{:?}",
            acks[0].result
        );
    };
    acked(2, "the ack waited for the subscriber's wake-up").await;
    assert_eq!(hub.head().seq, 2, "the head moved before the ack");
    assert_eq!(
        *gate.queued.lock().unwrap(),
        vec![2],
        "queued to the subscriber before the ack"
    );
    assert_eq!(gate.woken.load(Ordering::SeqCst), 0, "acked before the wake-up");

    // Nor does the next commit wait for it: the wake-ups run on the waker
    // thread, not the committer's.
    acked(3, "the next commit waited for the last one's wake-up").await;
    assert_eq!(*gate.queued.lock().unwrap(), vec![2, 3]);
    assert_eq!(gate.woken.load(Ordering::SeqCst), 0);

    // (one release per commit's wake-up)
    release.send(()).unwrap();
    release.send(()).unwrap();
    r.committer.stop().await;
    tokio::task::spawn_blocking(move || r.join.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        gate.woken.load(Ordering::SeqCst),
        2,
        "the writer was woken after each commit's ack, none lost"
    );
}

/// A never-ticked symbol is not forgotten while it is handed over: the
/// hand-over keeps it, and once rolled back it is forgotten as usual.
/// Before, a compaction during the hold removed its record while its hold
/// stayed: the move failed as "went away", nobody released it, and its
/// publishes were held and refused until a restart (store review).
#[tokio::test]
async fn a_symbol_being_handed_over_is_not_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CommitterConfig {
        forget_unticked_after: Duration::ZERO,
        ..CommitterConfig::default()
    };
    let r = start_with(dir.path(), cfg);
    let sym = Symbol::parse("QUIET").unwrap();
    r.committer.ensure(vec![sym]).await.unwrap();
    let ex = r.committer.export(sym, 1, 11).await.unwrap();
    assert_eq!(ex.record.last_seq, 0);
    // (an ensure is answered after the commit of its round: the
    // compaction's round or a later one)
    let compacted = || async {
        r.committer.request_compaction();
        r.committer.ensure(vec![Symbol::parse("OTHER").unwrap()]).await.unwrap();
    };
    let stored = |store: &Store| store.load_symbols().unwrap().iter().any(|s| s.symbol == sym);
    compacted().await;
    assert!(stored(&r.store), "forgotten during its hand-over");
    r.committer.release(sym, false).await.unwrap();
    compacted().await;
    compacted().await;
    assert!(!stored(&r.store), "not forgotten after the rollback");
    r.committer.stop().await;
}

/// Many symbols touched rarely keep the log (folded whole at start-up) and
/// the ticks held in memory for it within about [`LOG_SPAN`] records: a
/// commit compacts as many symbols as the log holds over `LOG_SPAN` (at
/// least [`COMPACT_PER_COMMIT`]). Before, it compacted 4: with 4,096
/// symbols each touched every 256 commits, a symbol waited ~1,024 commits
/// for its compaction, and the log spanned as many; with 100k symbols, tens
/// of thousands (store review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rarely_touched_symbols_keep_the_log_within_its_span() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let syms: Vec<String> = (0..4_096).map(|i| format!("R{i}")).collect();
    let mut longest = 0;
    for c in 0..1_500u64 {
        let ticks: Vec<Tick> = (0..16)
            .map(|k| tick(&syms[((c * 16 + k) % 4_096) as usize], T0 + (c * 100 + k) as i64, 100))
            .collect();
        publish(&r.committer, "p", c * 16 + 1, &ticks).await;
        if c % 100 == 99 {
            longest = longest.max(r.store.load_log().unwrap().len());
        }
    }
    let before = heads(&r.hub);
    let store = crash(r).await;
    assert!(longest as u64 <= 2 * LOG_SPAN, "the log grew to {longest} records");
    drop(store);
    let r = start(dir.path());
    assert_eq!(heads(&r.hub), before, "recovered as acked");
}

/// Two requests of one pair parked while a rebalance is sealed (a new
/// symbol the target gives another shard): the earlier one expires, and
/// the later one must not be stored past the hole after a rollback
/// (contract §5) — its publisher's resend of the earlier one would be
/// acked `duplicate` and that tick lost. Both are refused together, and
/// so is what comes while still sealed (a resend read meanwhile must not
/// let the held one through); after the rollback the resends are stored
/// in order.
#[tokio::test]
async fn a_parked_request_behind_a_refused_one_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path());
    let sealed = crate::placement::ClusterState {
        version: 1,
        committed: 1,
        target: Some(2),
    };
    r.committer.set_state(sealed, true).await.unwrap();
    let own = crate::ownership::Ownership::new(2, 0);
    let sym = (0..)
        .map(|i| format!("NEW{i}"))
        .find(|s| own.owner(&Symbol::parse(s).unwrap()) == 1)
        .unwrap();
    let (reply, mut rx) = AckTx::new();
    let id: Arc<str> = Arc::from("p");
    let long_ago = Instant::now() - std::time::Duration::from_secs(5);
    for (pseq, received) in [(1, long_ago), (2, Instant::now())] {
        r.committer
            .publish(PublishCmd {
                tick: tick(&sym, T0 + pseq as i64, 100),
                publisher: Some((id.clone(), pseq)),
                request_id: pseq,
                reply: reply.clone(),
                received,
            })
            .await
            .unwrap();
    }
    // Both parked (the committer then asks for expiries), then expired.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !r.committer.holding.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("parked");
    r.committer.expire_holds();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        acks.extend(rx.recv().await.unwrap());
    }
    acks.sort_by_key(|a| a.request_id);
    for a in &acks {
        assert!(
            matches!(a.result, Err(AckError::Unavailable(_))),
            "request {} must be refused: {:?}",
            a.request_id,
            a.result
        );
    }
    // The coordinator seals the same state again on each pass: still refusing.
    r.committer.set_state(sealed, true).await.unwrap();
    // The resends, on a new stream: refused at once while still sealed,
    // stored in order after the rollback.
    for round in [0, 1] {
        if round == 1 {
            let rolled_back = crate::placement::ClusterState {
                version: 2,
                committed: 1,
                target: None,
            };
            r.committer.set_state(rolled_back, false).await.unwrap();
        }
        let acks = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            publish(
                &r.committer,
                "p",
                1,
                &[tick(&sym, T0 + 1, 100), tick(&sym, T0 + 2, 100)],
            ),
        )
        .await
        .expect("answered at once");
        let got: Vec<_> = acks.iter().map(|a| a.result.clone()).collect();
        if round == 0 {
            assert!(
                got.iter().all(|r| matches!(r, Err(AckError::Unavailable(_)))),
                "{got:?}"
            );
        } else {
            let seqs: Vec<_> = got
                .iter()
                .map(|r| match r {
                    Ok(Accepted {
                        seq, duplicate: false, ..
                    }) => *seq,
                    other => panic!("stored: {other:?}"),
                })
                .collect();
            assert_eq!(seqs, [1, 2]);
        }
    }
    r.committer.stop().await;
}
