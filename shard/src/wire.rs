//! Conversions between domain types and the generated gRPC types: pure
//! functions, below everything that serves (`rpc`) or calls (`cluster`) gRPC.

use tickshard_proto::v1 as pb;

use crate::{
    committer::MovePart,
    domain::validate_forwarded_publisher_id,
    domain::{
        Candle, Decimal, Epoch, HISTORY_LIMIT_DEFAULT, History, HistoryQuery, InputError, Interval, LastTick, Symbol,
        SymbolInfo, Tick, TickFields,
    },
    hub::{Close, SnapshotData},
    placement::{ClusterState, MAX_SHARDS},
    store::{DedupState, SymbolRecord},
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
/// A candle from a peer (a mirror's, or a hand-over's open candles);
/// `None` if malformed or impossible: a start outside `0..=2^53` µs or off
/// its interval's grid, `low > high`, a negative volume, more than
/// [`MAX_SEQ`](crate::domain::MAX_SEQ) ticks (later ticks fold into it:
/// nothing may overflow).
pub fn candle_from_pb(c: &pb::Candle) -> Option<Candle> {
    use crate::domain::{Interval, MAX_SEQ, MAX_TS_MICROS, Symbol, parse_decimal};
    let interval = Interval::parse(&c.interval)?;
    let start = c.start_micros;
    if !(0..=MAX_TS_MICROS).contains(&start) || interval.start_of(start) != start || c.count > MAX_SEQ {
        return None;
    }
    let candle = Candle {
        symbol: Symbol::parse(&c.symbol).ok()?,
        interval,
        start,
        open: parse_decimal(&c.open)?,
        high: parse_decimal(&c.high)?,
        low: parse_decimal(&c.low)?,
        close: parse_decimal(&c.close)?,
        volume: parse_decimal(&c.volume)?,
        count: c.count,
    };
    (candle.low <= candle.high && !candle.volume.is_sign_negative()).then_some(candle)
}

pub fn snapshot_to_pb(s: &SnapshotData, recovered: bool) -> pb::Snapshot {
    pb::Snapshot {
        last: Some(tick_to_pb(&s.tick)),
        epoch: s.epoch.to_string(),
        recovered,
        conflated: s.conflated,
    }
}

/// A tick from a peer or a history answer (already validated by its owner),
/// with its seq; `None` if malformed.
pub fn stored_tick_from_pb(t: &pb::Tick) -> Option<Tick> {
    if t.seq > crate::domain::MAX_SEQ {
        return None;
    }
    let mut tick = tick_from_pb(t).ok()?;
    tick.seq = t.seq;
    Some(tick)
}

/// A `HistoryRequest` in domain terms: the symbol, the query (ticks by seq,
/// or candles by interval and time; `to` 0 means "to the end") and the limit
/// (0: [`HISTORY_LIMIT_DEFAULT`]).
pub fn history_query(r: &pb::HistoryRequest) -> Result<(Symbol, HistoryQuery, usize), InputError> {
    let symbol = Symbol::parse(&r.symbol)?;
    let q = if r.interval.is_empty() {
        HistoryQuery::Ticks {
            from: r.from_seq,
            to: if r.to_seq == 0 { u64::MAX } else { r.to_seq },
        }
    } else {
        let interval = Interval::parse(&r.interval).ok_or_else(|| {
            let shown: String = r.interval.chars().take(16).collect();
            InputError::InvalidRequest(format!("unknown interval '{shown}'; expected 1s, 1m or 1h"))
        })?;
        HistoryQuery::Candles {
            interval,
            from: r.from_micros,
            to: if r.to_micros == 0 { i64::MAX } else { r.to_micros },
        }
    };
    let limit = match r.limit {
        0 => HISTORY_LIMIT_DEFAULT,
        n => n as usize,
    };
    Ok((symbol, q, limit))
}

/// The `HistoryRequest` of a domain query (to a peer).
pub fn history_request(symbol: Symbol, q: HistoryQuery, limit: usize) -> pb::HistoryRequest {
    let mut r = pb::HistoryRequest {
        symbol: symbol.as_str().to_owned(),
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        ..Default::default()
    };
    match q {
        HistoryQuery::Ticks { from, to } => {
            r.from_seq = from;
            r.to_seq = to;
        }
        HistoryQuery::Candles { interval, from, to } => {
            r.interval = interval.as_str().to_owned();
            r.from_micros = from;
            r.to_micros = to;
        }
    }
    r
}

pub fn history_to_pb(h: &History) -> pb::HistoryResponse {
    pb::HistoryResponse {
        epoch: h.epoch.map(|e| e.to_string()).unwrap_or_default(),
        ticks: h.ticks.iter().map(tick_to_pb).collect(),
        candles: h.candles.iter().map(|(c, closed)| candle_to_pb(c, *closed)).collect(),
        truncated: h.truncated,
    }
}

/// A peer's history answer (malformed items are left out).
pub fn history_from_pb(r: &pb::HistoryResponse) -> History {
    History {
        epoch: Epoch::parse(&r.epoch),
        ticks: r.ticks.iter().filter_map(stored_tick_from_pb).collect(),
        candles: r
            .candles
            .iter()
            .filter_map(|c| candle_from_pb(c).map(|candle| (candle, c.closed)))
            .collect(),
        truncated: r.truncated,
    }
}

pub fn last_tick_to_pb(l: &LastTick) -> pb::Snapshot {
    pb::Snapshot {
        last: Some(tick_to_pb(&l.tick)),
        epoch: l.epoch.to_string(),
        recovered: false,
        conflated: false,
    }
}

pub fn last_tick_from_pb(s: &pb::Snapshot) -> Option<LastTick> {
    Some(LastTick {
        epoch: Epoch::parse(&s.epoch)?,
        tick: stored_tick_from_pb(s.last.as_ref()?)?,
    })
}

pub fn symbol_info_to_pb(i: &SymbolInfo) -> pb::SymbolInfo {
    pb::SymbolInfo {
        symbol: i.symbol.as_str().to_owned(),
        owner_shard: i.owner,
        seq: i.seq,
        epoch: i.epoch.to_string(),
    }
}

pub fn symbol_info_from_pb(i: &pb::SymbolInfo) -> Option<SymbolInfo> {
    Some(SymbolInfo {
        symbol: Symbol::parse(&i.symbol).ok()?,
        owner: i.owner_shard,
        seq: i.seq,
        epoch: Epoch::parse(&i.epoch)?,
    })
}

/// How a subscriber stream ends when its outbox closes: every close but
/// [`Close::Slow`] is the server going away (UNAVAILABLE: reconnect and
/// resume); a slow one is RESOURCE_EXHAUSTED (reconnect and resume too).
pub fn close_status(c: Close) -> tonic::Status {
    match c {
        Close::Slow => tonic::Status::resource_exhausted("too slow: reconnect and resume from your last position"),
        Close::Unauthenticated | Close::TokenExpired => {
            tonic::Status::unauthenticated("the token expired: reconnect with a fresh one and resume")
        }
        _ => tonic::Status::unavailable("server is restarting: reconnect and resume"),
    }
}

/// The status of a failed subscribe or read (contract §5): a refusal by its
/// code (bad input INVALID_ARGUMENT; limits RESOURCE_EXHAUSTED, the message
/// starting with the contract code), unavailability UNAVAILABLE (retry), a
/// fault INTERNAL.
pub fn error_status(e: crate::Error) -> tonic::Status {
    use crate::{Error, domain::ErrorCode as C};
    match e {
        Error::Refused { code, message } => match code {
            C::BadJson | C::UnknownOp | C::InvalidSymbol | C::InvalidTick | C::InvalidRequest => {
                tonic::Status::invalid_argument(message)
            }
            C::TooManySubscriptions | C::RateLimited | C::MessageTooLarge | C::SymbolLimit => {
                tonic::Status::resource_exhausted(format!("{code}: {message}"))
            }
            C::Unavailable => tonic::Status::unavailable(message),
            C::Unauthorized | C::TokenExpired => tonic::Status::unauthenticated(message),
            C::Forbidden => tonic::Status::permission_denied(message),
        },
        Error::Unavailable(m) => tonic::Status::unavailable(m),
        e @ Error::Fault(_) => tonic::Status::internal(e.to_string()),
    }
}

/// A cluster state on the wire (`target` 0: none).
pub fn cluster_state_to_pb(s: &ClusterState) -> pb::ClusterState {
    pb::ClusterState {
        version: s.version,
        committed: s.committed,
        target: s.target.unwrap_or(0),
    }
}

/// `None` for a state no pod could be in (no shards, or beyond
/// [`MAX_SHARDS`]), or a version past [`MAX_SEQ`](crate::domain::MAX_SEQ)
/// (the next version, `+ 1`, must exist).
pub fn cluster_state_from_pb(s: &pb::ClusterState) -> Option<ClusterState> {
    let ok = |n: u32| (1..=MAX_SHARDS).contains(&n);
    let version_ok = s.version <= crate::domain::MAX_SEQ;
    (version_ok && ok(s.committed) && (s.target == 0 || ok(s.target))).then_some(ClusterState {
        version: s.version,
        committed: s.committed,
        target: (s.target > 0).then_some(s.target),
    })
}

/// One part of a hand-over on the wire.
pub fn move_part_to_pb(p: &MovePart) -> pb::MoveChunk {
    pb::MoveChunk {
        symbol: p.symbol.as_str().to_owned(),
        from: p.from,
        ticks: p.ticks.iter().map(tick_to_pb).collect(),
        candles: p.candles.iter().map(|c| candle_to_pb(c, true)).collect(),
        last: p.last.as_ref().map(|(rec, dedup)| move_final_to_pb(rec, dedup)),
        attempt: p.attempt,
    }
}

/// One part of a hand-over from a peer, checked: every tick and candle is
/// the named symbol's, ticks carry their seq.
pub fn move_part_from_pb(c: &pb::MoveChunk) -> Result<MovePart, String> {
    let symbol = Symbol::parse(&c.symbol).map_err(|e| e.to_string())?;
    let ticks = c
        .ticks
        .iter()
        .map(|t| stored_tick_from_pb(t).filter(|t| t.symbol == symbol && t.seq > 0))
        .collect::<Option<Vec<Tick>>>()
        .ok_or("a bad tick in a hand-over")?;
    let candles = c
        .candles
        .iter()
        .map(|x| candle_from_pb(x).filter(|x| x.symbol == symbol))
        .collect::<Option<Vec<Candle>>>()
        .ok_or("a bad candle in a hand-over")?;
    let last = match &c.last {
        Some(f) => Some(move_final_from_pb(symbol, f)?),
        None => None,
    };
    Ok(MovePart {
        symbol,
        from: c.from,
        ticks,
        candles,
        last,
        attempt: c.attempt,
    })
}

/// The final chunk of a hand-over: a symbol's state.
pub fn move_final_to_pb(rec: &SymbolRecord, dedup: &[(String, DedupState)]) -> pb::MoveFinal {
    pb::MoveFinal {
        epoch: rec.epoch.to_string(),
        seq: rec.last_seq,
        tick: rec.last.as_ref().map(tick_to_pb),
        current: rec.candles.iter().flatten().map(|c| candle_to_pb(c, false)).collect(),
        dedup: dedup
            .iter()
            .map(|(id, d)| pb::DedupEntry {
                publisher_id: id.clone(),
                publisher_seq: d.publisher_seq,
                seq: d.seq,
                last_used_micros: d.last_used,
            })
            .collect(),
    }
}

/// A symbol's state from the final chunk of a hand-over, checked: the epoch
/// parses, the last tick is the symbol's at `seq`, candles are the symbol's
/// (one per interval), publisher ids are what a forwarded publish may carry.
pub fn move_final_from_pb(
    symbol: Symbol,
    f: &pb::MoveFinal,
) -> Result<(SymbolRecord, Vec<(String, DedupState)>), String> {
    let epoch = Epoch::parse(&f.epoch).filter(|e| !e.is_none()).ok_or("bad epoch")?;
    let last = match &f.tick {
        Some(t) => Some(
            stored_tick_from_pb(t)
                .filter(|t| t.symbol == symbol && t.seq == f.seq)
                .ok_or("bad last tick")?,
        ),
        None if f.seq == 0 => None,
        None => return Err("a head without its tick".into()),
    };
    // (the last tick's seq is checked by `stored_tick_from_pb`)
    let mut candles = [None; 3];
    for c in &f.current {
        let c = candle_from_pb(c).filter(|c| c.symbol == symbol).ok_or("bad candle")?;
        let slot = &mut candles[c.interval.index()];
        if slot.is_some() {
            return Err("two open candles of one interval".into());
        }
        *slot = Some(c);
    }
    // (a symbol keeps at most MAX_PUBLISHERS_PER_SYMBOL de-dup states)
    if f.dedup.len() > crate::committer::MAX_PUBLISHERS_PER_SYMBOL {
        return Err("more de-dup states than a symbol keeps".into());
    }
    let mut dedup = Vec::with_capacity(f.dedup.len());
    for d in &f.dedup {
        validate_forwarded_publisher_id(&d.publisher_id).map_err(|e| e.to_string())?;
        if d.seq > f.seq {
            return Err("a de-dup state past the head".into());
        }
        dedup.push((
            d.publisher_id.clone(),
            DedupState {
                publisher_seq: d.publisher_seq,
                seq: d.seq,
                // (not in this pod's future: it expires after the horizon
                // like any other; clocks may differ a little)
                last_used: d.last_used_micros.min(crate::domain::now_micros()),
            },
        ));
    }
    let rec = SymbolRecord {
        symbol,
        epoch,
        last_seq: f.seq,
        last,
        candles,
    };
    Ok((rec, dedup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MAX_SEQ;

    /// What a peer hands over is bounded so that nothing that follows it
    /// can overflow (a seq, a version, a candle's count) or stall (an open
    /// candle off its grid): refused, not stored (review of the peer inputs).
    #[test]
    fn peer_values_past_their_bounds_are_refused() {
        let t = pb::Tick {
            symbol: "ETH-USD".into(),
            seq: MAX_SEQ,
            ts_micros: 1_732_530_000_123_456,
            price: "1".into(),
            size: "1".into(),
            ..Default::default()
        };
        assert!(stored_tick_from_pb(&t).is_some());
        assert!(
            stored_tick_from_pb(&pb::Tick {
                seq: MAX_SEQ + 1,
                ..t.clone()
            })
            .is_none()
        );
        assert!(stored_tick_from_pb(&pb::Tick { seq: u64::MAX, ..t }).is_none());

        let c = pb::Candle {
            symbol: "ETH-USD".into(),
            interval: "1m".into(),
            start_micros: 1_732_530_000_000_000, // (on the minute grid)
            open: "1".into(),
            high: "2".into(),
            low: "1".into(),
            close: "2".into(),
            volume: "3".into(),
            count: 2,
            ..Default::default()
        };
        let good = candle_from_pb(&c).expect("a valid candle");
        assert_eq!(candle_from_pb(&candle_to_pb(&good, false)), Some(good));
        for bad in [
            pb::Candle {
                count: MAX_SEQ + 1,
                ..c.clone()
            },
            pb::Candle {
                count: u64::MAX,
                ..c.clone()
            },
            pb::Candle {
                start_micros: i64::MAX,
                ..c.clone()
            },
            pb::Candle {
                start_micros: -60_000_000,
                ..c.clone()
            },
            pb::Candle {
                start_micros: c.start_micros + 1,
                ..c.clone()
            },
            pb::Candle {
                low: "3".into(),
                ..c.clone()
            },
            pb::Candle {
                volume: "-1".into(),
                ..c.clone()
            },
        ] {
            assert_eq!(candle_from_pb(&bad), None, "{bad:?}");
        }

        // a de-dup state "used" in this pod's future would never expire
        let f = pb::MoveFinal {
            epoch: Epoch::random().to_string(),
            seq: 0,
            tick: None,
            current: Vec::new(),
            dedup: vec![pb::DedupEntry {
                publisher_id: "p".into(),
                publisher_seq: 1,
                seq: 0,
                last_used_micros: i64::MAX,
            }],
        };
        let (_, dedup) = move_final_from_pb(Symbol::parse("ETH-USD").unwrap(), &f).unwrap();
        assert!(dedup[0].1.last_used <= crate::domain::now_micros());

        let s = pb::ClusterState {
            version: MAX_SEQ,
            committed: 2,
            target: 0,
        };
        assert!(cluster_state_from_pb(&s).is_some());
        assert!(cluster_state_from_pb(&pb::ClusterState { version: u64::MAX, ..s }).is_none());
    }

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
