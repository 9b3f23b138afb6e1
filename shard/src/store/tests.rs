use rust_decimal::Decimal;

use super::*;
use crate::domain::{Epoch, Symbol, Tick};

fn sym(s: &str) -> Symbol {
    Symbol::parse(s).unwrap()
}

fn tick(s: Symbol, seq: u64) -> Tick {
    Tick {
        symbol: s,
        seq,
        ts: 1_700_000_000_000_000 + seq as i64,
        price: Decimal::new(6_701_250 + seq as i64, 2),
        size: Decimal::new(1, 2),
        bid: (seq % 2 == 0).then(|| Decimal::new(6_701_240, 2)),
        ask: None,
        bid_size: Some(Decimal::new(5, 0)),
        ask_size: None,
    }
}

fn write_blocks(store: &Store, s: Symbol, blocks: &[std::ops::RangeInclusive<u64>]) {
    for r in blocks {
        let ticks: Vec<Tick> = r.clone().map(|q| tick(s, q)).collect();
        let mut b = CommitBatch::default();
        b.put_ticks(&ticks, usize::MAX);
        store.commit(b).unwrap();
    }
}

#[test]
fn reads_cross_block_boundaries_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let (a, ab) = (sym("A"), sym("AB"));
    write_blocks(&store, a, &[1..=3, 4..=4, 5..=9]);
    write_blocks(&store, ab, &[1..=100]);
    let got: Vec<u64> = store.read_ticks(&a, 2, 6, 100).unwrap().iter().map(|t| t.seq).collect();
    assert_eq!(got, vec![2, 3, 4, 5, 6]);
    let got = store.read_ticks(&a, 1, 9, 100).unwrap();
    assert_eq!(got, (1..=9).map(|q| tick(a, q)).collect::<Vec<_>>());
    assert_eq!(store.read_ticks(&a, 8, 100, 100).unwrap().len(), 2);
    assert_eq!(store.read_ticks(&a, 3, 9, 2).unwrap().len(), 2);
    assert!(store.read_ticks(&a, 10, 20, 100).unwrap().is_empty());
    // "A" never sees "AB"'s ticks (length-prefixed keys)
    assert_eq!(store.read_ticks(&ab, 99, 200, 100).unwrap().len(), 2);
}

fn snapshot_at(store: &Store, s: Symbol, last_seq: u64) {
    let mut b = CommitBatch::default();
    b.put_symbol(&SymbolRecord {
        symbol: s,
        epoch: Epoch::random(),
        last_seq,
        last: Some(tick(s, last_seq)),
        candles: [None; 3],
    });
    store.commit(b).unwrap();
}

#[test]
fn prune_removes_whole_old_blocks_only_and_never_past_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let s = sym("X");
    write_blocks(&store, s, &[1..=10, 11..=20, 21..=30]);
    snapshot_at(&store, s, 10);
    // blocks after the snapshot (11..) are the symbol's state: kept
    assert_eq!(store.prune_ticks(&s, 25).unwrap(), 10);
    assert_eq!(store.read_ticks(&s, 1, 30, 100).unwrap()[0].seq, 11);
    assert_eq!(store.prune_ticks(&s, 25).unwrap(), 0);
    snapshot_at(&store, s, 30);
    assert_eq!(store.prune_ticks(&s, 15).unwrap(), 0);
    // the newest block is never removed
    assert_eq!(store.prune_ticks(&s, 1_000).unwrap(), 10);
    assert_eq!(store.read_ticks(&s, 1, 30, 100).unwrap().len(), 10);
}

#[test]
fn log_records_round_trip_and_compaction_splits_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let (a, b) = (sym("A"), sym("B-LONGER.NAME"));
    let d = DedupState {
        publisher_seq: 3,
        seq: 12,
        last_used: 99,
    };
    let ta: Vec<Tick> = (10..=12).map(|q| tick(a, q)).collect();
    let tb: Vec<Tick> = (1..=1).map(|q| tick(b, q)).collect();
    for commit in [7, 8] {
        let mut batch = CommitBatch::default();
        batch.log_ticks(&ta, [("pub-a", &d)].into_iter());
        batch.log_ticks(&tb, std::iter::empty());
        batch.log_ticks(&[], std::iter::empty()); // nothing to log
        assert!(batch.seal_log(commit));
        store.commit(batch).unwrap();
    }
    assert!(
        !CommitBatch::default().seal_log(9),
        "an empty log record is not written"
    );
    let want = vec![
        TickBlock {
            ticks: ta.clone(),
            dedup: vec![("pub-a".to_string(), d)],
        },
        TickBlock {
            ticks: tb,
            dedup: vec![],
        },
    ];
    let log = store.load_log().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].0, &log[0].1), (7, &want));
    assert_eq!(log[1].0, 8);
    // logged ticks are not in the blocks
    assert!(store.read_ticks(&a, 1, 100, 100).unwrap().is_empty());

    // compaction: blocks of at most BLOCK_TICKS, log records removed
    let many: Vec<Tick> = (1..=2 * BLOCK_TICKS as u64 + 5).map(|q| tick(a, q)).collect();
    let mut batch = CommitBatch::default();
    batch.put_ticks(&many, BLOCK_TICKS);
    batch.remove_log(7);
    batch.remove_log(8);
    store.commit(batch).unwrap();
    assert!(store.load_log().unwrap().is_empty());
    assert_eq!(store.tree.scan_prefix(keys::prefix(keys::TICKS, &a)).count(), 3);
    assert_eq!(store.read_ticks(&a, 1, u64::MAX, usize::MAX).unwrap(), many);
}

#[test]
fn the_tail_after_a_snapshot_carries_ticks_and_dedup_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let s = sym("T");
    write_blocks(&store, s, &[1..=5]);
    let d = DedupState {
        publisher_seq: 9,
        seq: 8,
        last_used: 77,
    };
    let ticks: Vec<Tick> = (6..=8).map(|q| tick(s, q)).collect();
    let mut b = CommitBatch::default();
    b.put_block(&ticks, [("pub-a", &d)].into_iter());
    store.commit(b).unwrap();
    let tail = store
        .load_tail(&s, 3)
        .expect_err("3 is inside a block: not a snapshot point");
    assert!(tail.to_string().contains("not consecutive"), "{tail}");
    assert_eq!(
        store.load_tail(&s, 5).unwrap(),
        vec![TickBlock {
            ticks,
            dedup: vec![("pub-a".to_string(), d)],
        }]
    );
    assert_eq!(store.load_tail(&s, 0).unwrap().len(), 2);
    assert!(store.load_tail(&s, 8).unwrap().is_empty());
    // a block with a trailer still reads as ticks
    assert_eq!(store.read_ticks(&s, 1, 8, 100).unwrap().len(), 8);
}

#[test]
fn symbol_records_dedup_and_candles_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = sym("ETH-USD");
    let t = tick(s, 7);
    let candle = Candle {
        symbol: s,
        interval: Interval::M1,
        start: 1_700_000_040_000_000,
        open: Decimal::new(1, 0),
        high: Decimal::new(3, 0),
        low: Decimal::new(1, 1),
        close: Decimal::new(2, 0),
        volume: Decimal::new(12345, 4),
        count: 9,
    };
    let rec = SymbolRecord {
        symbol: s,
        epoch: Epoch::random(),
        last_seq: 7,
        last: Some(t),
        candles: [None, Some(candle), None],
    };
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut b = CommitBatch::default();
        b.put_symbol(&rec);
        let d = DedupState {
            publisher_seq: 42,
            seq: 7,
            last_used: 5,
        };
        b.put_dedup(&s, [("pub-1", &d)].into_iter());
        b.put_closed_candle(&candle);
        store.commit(b).unwrap();
        store.set_identity(0, 1).unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    assert_eq!(store.load_symbols().unwrap(), vec![rec]);
    let d = DedupState {
        publisher_seq: 42,
        seq: 7,
        last_used: 5,
    };
    assert_eq!(store.load_dedup().unwrap(), vec![(s, vec![("pub-1".to_string(), d)])]);
    assert_eq!(store.identity().unwrap(), Some((0, 1)));
    let got = store.read_candles(&s, Interval::M1, 0, i64::MAX, 10).unwrap();
    assert_eq!(got, vec![candle]);
    assert!(
        store
            .read_candles(&s, Interval::S1, 0, i64::MAX, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.prune_candles(&s, Interval::M1, candle.start + 1).unwrap(), 1);
}

#[test]
fn wrong_format_version_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        store
            .tree
            .insert(keys::meta(META_FORMAT), &99u32.to_be_bytes()[..])
            .unwrap();
        store.flush().unwrap();
    }
    let err = reopen(dir.path()).err().unwrap();
    assert!(matches!(
        err,
        StoreError::FormatMismatch {
            found: 99,
            expected: FORMAT_VERSION,
            ..
        }
    ));
    assert!(err.to_string().contains("format version 99"), "{err}");
}

#[test]
fn older_format_dirs_are_upgraded_in_place_and_their_blocks_stay_readable() {
    for old in [1u32, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let s = sym("OLD");
        let ticks: Vec<Tick> = (1..=4).map(|q| tick(s, q)).collect();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            snapshot_at(&store, s, 4);
            // a block as formats 1 and 2 wrote it: 16-byte decimals
            let mut v = vec![codec::VALUE_V1];
            v.extend_from_slice(&4u32.to_be_bytes());
            for t in &ticks {
                codec::put_tick(&mut v, t);
            }
            store.tree.insert(keys::ticks(&s, 1), v).unwrap();
            store
                .tree
                .insert(keys::meta(META_FORMAT), &old.to_be_bytes()[..])
                .unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        let v = store.tree.get(keys::meta(META_FORMAT)).unwrap().unwrap();
        assert_eq!(&v[..], &FORMAT_VERSION.to_be_bytes()[..]);
        assert_eq!(store.load_symbols().unwrap()[0].last_seq, 4);
        assert!(store.load_tail(&s, 4).unwrap().is_empty());
        assert!(store.load_log().unwrap().is_empty());
        assert_eq!(store.read_ticks(&s, 1, 4, 10).unwrap(), ticks);
    }
}

#[test]
fn compact_decimals_round_trip_exactly_and_bad_input_is_refused() {
    use proptest::prelude::*;
    let edge = [
        Decimal::ZERO,
        -Decimal::ZERO,
        Decimal::new(-0, 8),
        Decimal::new(6_701_250, 2),
        Decimal::new(1, 28),
        Decimal::MAX,
        Decimal::MIN,
        Decimal::from_i128_with_scale(1 << 95, 0),
    ];
    let check = |d: Decimal| {
        let mut out = Vec::new();
        codec::put_decimal_compact(&mut out, d);
        let mut r = codec::Reader::new(&out);
        let back = r.decimal_compact().expect("decodes");
        // the same bits: value, scale and sign (so "-0.00" stays "-0.00")
        assert_eq!(back.serialize(), d.serialize(), "{d}");
        assert!(r.is_empty());
        out.len()
    };
    for d in edge {
        check(d);
    }
    assert_eq!(check(Decimal::new(6_701_250, 2)), 5, "a price in 5 bytes");
    proptest!(ProptestConfig::with_cases(2_000), |(m in any::<i128>(), scale in 0u32..=28)| {
        let m = m % (1i128 << 96);
        check(Decimal::from_i128_with_scale(m, scale));
    });
    // truncated, overlong, scale out of range: refused, not misread
    for bad in [
        &[2u8][..],
        &[2, 0x80],
        &[29, 1],
        &[
            0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ],
    ] {
        assert_eq!(codec::Reader::new(bad).decimal_compact(), None, "{bad:?}");
    }
}

/// Issue 10, item 1: an older release cut a 65,536-byte `publisher_id` at
/// 65,535 bytes, inside a UTF-8 character, in both the de-dup snapshot and
/// the log record; recovery then refused the directory ("bad de-dup
/// record", "bad log record") and the pod crash-looped. Such bytes must load.
#[test]
fn dedup_ids_an_older_release_cut_inside_a_character_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let s = sym("BTC-USD");
    let d = DedupState {
        publisher_seq: 3,
        seq: 1,
        last_used: 5,
    };
    // What the old encoder wrote: a u16 length, then the id cut mid-character.
    let id = "\u{e9}".repeat(32_768); // 65,536 bytes
    let cut = &id.as_bytes()[..65_535];
    let mut dedup_value = vec![codec::VALUE_V1];
    dedup_value.extend_from_slice(&1u32.to_be_bytes());
    dedup_value.extend_from_slice(&(cut.len() as u16).to_be_bytes());
    dedup_value.extend_from_slice(cut);
    for v in [d.publisher_seq, d.seq] {
        dedup_value.extend_from_slice(&v.to_be_bytes());
    }
    dedup_value.extend_from_slice(&d.last_used.to_be_bytes());
    // The log record: one section whose block's de-dup trailer has that id.
    let mut block = Vec::new();
    codec::encode_block(&[tick(s, 1)], std::iter::empty(), &mut block);
    block.truncate(block.len() - 4); // drop the empty trailer ...
    block.extend_from_slice(&dedup_value[1..]); // ... and put the cut one
    let mut log = vec![codec::LOG_V1, s.len() as u8];
    log.extend_from_slice(s.as_bytes());
    log.extend_from_slice(&1u64.to_be_bytes());
    log.extend_from_slice(&(block.len() as u32).to_be_bytes());
    log.extend_from_slice(&block);
    {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        store.tree.insert(keys::dedup(&s), dedup_value).unwrap();
        store.tree.insert(keys::log(1), log).unwrap();
        store.flush().unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    let loaded = store.load_dedup().unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].1[0].1, d);
    let log = store.load_log().unwrap();
    assert_eq!(log[0].1[0].ticks, vec![tick(s, 1)]);
    assert_eq!(log[0].1[0].dedup[0].1, d);
    // And what this release writes never cuts a character.
    let mut b = CommitBatch::default();
    b.put_dedup(&s, [(id.as_str(), &d)].into_iter());
    store.commit(b).unwrap();
    let (_, ids) = &store.load_dedup().unwrap()[0];
    assert!(
        id.starts_with(&ids[0].0) && ids[0].0.len() == 65_534,
        "{}",
        ids[0].0.len()
    );
}

/// A tick block whose (corrupt) key puts its first seq near 2^64 is an error,
/// never an overflow panic.
#[test]
fn a_block_whose_seqs_would_overflow_is_refused() {
    let s = sym("X");
    let mut block = Vec::new();
    codec::encode_block(&[tick(s, 1), tick(s, 2)], std::iter::empty(), &mut block);
    assert!(codec::decode_whole_block(s, u64::MAX - 1, &block).is_some());
    assert!(codec::decode_whole_block(s, u64::MAX, &block).is_none());
}
