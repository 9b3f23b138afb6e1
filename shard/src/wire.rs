//! Conversions between domain types and the generated gRPC types. The only
//! module of this crate (besides the cluster sync) that touches prost types.

use tickshard_proto::v1 as pb;

use crate::{
    domain::{Candle, Decimal, InputError, Tick, TickFields},
    hub::SnapshotData,
    node::SubResult,
};

fn opt(d: Option<Decimal>) -> String {
    d.map(|d| d.to_string()).unwrap_or_default()
}

pub fn tick_to_pb(t: &Tick) -> pb::Tick {
    pb::Tick {
        symbol: t.symbol.as_str().to_owned(),
        seq: t.seq,
        ts_micros: t.ts,
        price: t.price.to_string(),
        size: t.size.to_string(),
        bid: opt(t.bid),
        ask: opt(t.ask),
        bid_size: opt(t.bid_size),
        ask_size: opt(t.ask_size),
    }
}

/// Validates a published tick (its `seq` is ignored: the owner assigns it).
pub fn tick_from_pb(t: &pb::Tick) -> Result<Tick, InputError> {
    TickFields {
        symbol: &t.symbol,
        ts: t.ts_micros,
        price: &t.price,
        size: &t.size,
        bid: &t.bid,
        ask: &t.ask,
        bid_size: &t.bid_size,
        ask_size: &t.ask_size,
    }
    .validate()
}

pub fn candle_to_pb(c: &Candle, closed: bool) -> pb::Candle {
    pb::Candle {
        symbol: c.symbol.as_str().to_owned(),
        interval: c.interval.as_str().to_owned(),
        start_micros: c.start,
        open: c.open.to_string(),
        high: c.high.to_string(),
        low: c.low.to_string(),
        close: c.close.to_string(),
        volume: c.volume.to_string(),
        count: c.count,
        closed,
    }
}

/// A candle from a peer (already validated by its owner); `None` if malformed.
pub fn candle_from_pb(c: &pb::Candle) -> Option<Candle> {
    use crate::domain::{Interval, Symbol, parse_decimal};
    Some(Candle {
        symbol: Symbol::parse(&c.symbol).ok()?,
        interval: Interval::parse(&c.interval)?,
        start: c.start_micros,
        open: parse_decimal(&c.open)?,
        high: parse_decimal(&c.high)?,
        low: parse_decimal(&c.low)?,
        close: parse_decimal(&c.close)?,
        volume: parse_decimal(&c.volume)?,
        count: c.count,
    })
}

pub fn snapshot_to_pb(s: &SnapshotData, recovered: bool) -> pb::Snapshot {
    pb::Snapshot {
        last: Some(tick_to_pb(&s.tick)),
        epoch: s.epoch.to_string(),
        recovered,
        conflated: s.conflated,
    }
}

pub fn sub_result_to_pb(r: &SubResult) -> pb::SymbolState {
    pb::SymbolState {
        symbol: r.symbol.as_str().to_owned(),
        epoch: r.epoch.to_string(),
        seq: r.seq,
        recovered: r.recovered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_round_trips_exactly() {
        let p = pb::Tick {
            symbol: "eth-usd".into(),
            seq: 99,
            ts_micros: 1_732_530_000_123_456,
            price: "3012.50".into(),
            size: "0.400".into(),
            bid: "3012.4".into(),
            ask: String::new(),
            bid_size: "10".into(),
            ask_size: String::new(),
        };
        let t = tick_from_pb(&p).unwrap();
        assert_eq!(t.seq, 0);
        let back = tick_to_pb(&Tick { seq: 99, ..t });
        assert_eq!(
            back,
            pb::Tick {
                symbol: "ETH-USD".into(),
                ..p
            }
        );
    }
}
