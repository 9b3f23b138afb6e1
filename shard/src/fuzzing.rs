//! Entry points for the coverage-guided fuzz targets in `fuzz/` (see its
//! README). Each takes arbitrary bytes and must never panic; where a property
//! holds (an accepted value round-trips), it is asserted, so a violation is a
//! crash the fuzzer reports.

use crate::{
    domain::{Decimal, Interval, Symbol, TickFields, parse_decimal, validate_publisher_id},
    store::codec,
};

/// Every decoder of stored records on arbitrary bytes: an error, never a
/// panic (recovery must refuse a damaged record cleanly, not crash). What
/// decodes is encoded again and must decode to the same value.
pub fn store_records(data: &[u8]) {
    let Ok(sym) = Symbol::parse("FUZZ") else { return };
    if let Some(blocks) = codec::decode_log(data) {
        for b in blocks {
            let mut again = Vec::new();
            let dedup = b.dedup.iter().map(|(id, d)| (id.as_str(), d));
            codec::put_log_section(&mut again, &b.ticks, dedup);
            if let Some(first) = b.ticks.first() {
                let back = codec::decode_log(&again).unwrap_or_default();
                assert_eq!(back.first().map(|x| &x.ticks), Some(&b.ticks), "log section round trip");
                assert_eq!(back[0].ticks[0].seq, first.seq);
            }
        }
    }
    if let Some((to, done, attempt)) = codec::decode_move_mark(data) {
        let again = codec::encode_move_mark(to, done, attempt);
        assert_eq!(
            codec::decode_move_mark(&again),
            Some((to, done, attempt)),
            "move mark round trip"
        );
    }
    if let Some((s, sealed)) = codec::decode_cluster_state(data) {
        let again = codec::encode_cluster_state(&s, sealed);
        assert_eq!(
            codec::decode_cluster_state(&again),
            Some((s, sealed)),
            "cluster state round trip"
        );
    }
    if let Some(entries) = codec::decode_dedup(data) {
        let mut again = Vec::new();
        codec::encode_dedup(entries.iter().map(|(id, d)| (id.as_str(), d)), &mut again);
        assert_eq!(codec::decode_dedup(&again), Some(entries), "de-dup round trip");
    }
    if let Some(rec) = codec::SymbolRecord::decode(sym, data) {
        let mut again = Vec::new();
        rec.encode(&mut again);
        assert_eq!(
            codec::SymbolRecord::decode(sym, &again),
            Some(rec),
            "symbol record round trip"
        );
    }
    let first_seq = data.first().map_or(1, |&b| u64::from(b) << 56 | 1);
    if let Some(block) = codec::decode_whole_block(sym, first_seq, data) {
        assert_eq!(codec::block_len(data), Some(block.ticks.len() as u64));
        let mut again = Vec::new();
        codec::encode_block(
            &block.ticks,
            block.dedup.iter().map(|(id, d)| (id.as_str(), d)),
            &mut again,
        );
        let back = codec::decode_whole_block(sym, first_seq, &again);
        assert_eq!(back.map(|b| b.ticks), Some(block.ticks), "block round trip");
    }
    let mut r = codec::Reader::new(data);
    while !r.is_empty() {
        match r.decimal_compact() {
            Some(d) => {
                let mut again = Vec::new();
                codec::put_decimal_compact(&mut again, d);
                assert_eq!(codec::Reader::new(&again).decimal_compact(), Some(d));
            }
            None => break,
        }
    }
    let _ = codec::Reader::new(data).candle(sym, Interval::M1);
}

/// Tick validation on arbitrary text fields: fields separated by `\n` in the
/// order of [`TickFields`] (the timestamp as decimal text). An accepted tick
/// keeps its decimals exactly (they print back to what parses to the same).
pub fn tick_fields(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let mut next = || parts.next().unwrap_or("");
    let symbol = next();
    let ts = next().parse::<i64>().unwrap_or(1);
    let fields = TickFields {
        symbol,
        ts,
        price: next(),
        size: next(),
        bid: next(),
        ask: next(),
        bid_size: next(),
        ask_size: next(),
    };
    if let Ok(t) = fields.validate() {
        assert!(t.price > Decimal::ZERO);
        for (given, got) in [
            (fields.price, Some(t.price)),
            (fields.size, Some(t.size)),
            (fields.bid, t.bid),
        ] {
            if let Some(d) = got {
                assert_eq!(parse_decimal(&d.to_string()), Some(d), "{given:?} prints back exactly");
                assert_eq!(parse_decimal(given), Some(d));
            }
        }
        assert_eq!(Symbol::parse(t.symbol.as_str()).ok(), Some(t.symbol));
    }
    for line in text.lines() {
        if let Some(d) = parse_decimal(line) {
            assert_eq!(parse_decimal(&d.to_string()), Some(d));
        }
        let _ = validate_publisher_id(line);
    }
}
