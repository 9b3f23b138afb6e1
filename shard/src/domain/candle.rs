use rust_decimal::Decimal;

use super::{Symbol, Tick};

/// A candle interval, aligned to UTC boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interval {
    S1,
    M1,
    H1,
}

impl Interval {
    pub const ALL: [Interval; 3] = [Interval::S1, Interval::M1, Interval::H1];

    pub fn micros(self) -> i64 {
        match self {
            Interval::S1 => 1_000_000,
            Interval::M1 => 60_000_000,
            Interval::H1 => 3_600_000_000,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::S1 => "1s",
            Interval::M1 => "1m",
            Interval::H1 => "1h",
        }
    }

    pub fn parse(s: &str) -> Option<Interval> {
        Interval::ALL.into_iter().find(|i| i.as_str() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: u8) -> Option<Interval> {
        Interval::ALL.get(usize::from(i)).copied()
    }

    /// The start of the interval containing `ts` (µs, event time).
    pub fn start_of(self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.micros())
    }
}

/// OHLCV of one symbol over one interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candle {
    pub symbol: Symbol,
    pub interval: Interval,
    /// Interval start, µs since the Unix epoch.
    pub start: i64,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    /// Sum of the ticks' sizes (saturating at `Decimal::MAX`).
    pub volume: Decimal,
    pub count: u64,
}

impl Candle {
    fn open_with(interval: Interval, tick: &Tick) -> Candle {
        Candle {
            symbol: tick.symbol,
            interval,
            start: interval.start_of(tick.ts),
            open: tick.price,
            high: tick.price,
            low: tick.price,
            close: tick.price,
            volume: tick.size,
            count: 1,
        }
    }
}

/// What one tick did to one interval's current candle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CandleEffect {
    /// The current candle changed (or was opened).
    Updated,
    /// A tick of a later interval arrived: this candle is now closed, and a new
    /// current one was opened with the tick.
    Rolled { closed: Candle },
    /// The tick is older than the current interval: it does not reopen a closed
    /// candle (contract §4) and is only counted.
    Late,
}

/// Event-time candle aggregation of one interval for one symbol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CandleAgg {
    pub current: Option<Candle>,
}

impl CandleAgg {
    /// Folds an accepted tick into the current candle. The close is the price of
    /// the last tick *accepted* for the interval (arrival order).
    pub fn apply(&mut self, interval: Interval, tick: &Tick) -> CandleEffect {
        let start = interval.start_of(tick.ts);
        match &mut self.current {
            None => {
                self.current = Some(Candle::open_with(interval, tick));
                CandleEffect::Updated
            }
            Some(c) if start == c.start => {
                c.high = c.high.max(tick.price);
                c.low = c.low.min(tick.price);
                c.close = tick.price;
                c.volume = c.volume.saturating_add(tick.size);
                c.count += 1;
                CandleEffect::Updated
            }
            Some(c) if start > c.start => {
                let closed = *c;
                *c = Candle::open_with(interval, tick);
                CandleEffect::Rolled { closed }
            }
            Some(_) => CandleEffect::Late,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn tick(ts: i64, price: i64, size: i64) -> Tick {
        Tick {
            symbol: Symbol::parse("X").unwrap(),
            seq: 0,
            ts,
            price: Decimal::new(price, 2),
            size: Decimal::new(size, 3),
            bid: None,
            ask: None,
            bid_size: None,
            ask_size: None,
        }
    }

    #[test]
    fn boundaries_are_utc_aligned() {
        assert_eq!(Interval::M1.start_of(1_732_529_999_999_999), 1_732_529_940_000_000);
        assert_eq!(Interval::S1.start_of(2_000_000), 2_000_000);
        assert_eq!(Interval::H1.start_of(3_599_999_999), 0);
    }

    #[test]
    fn late_tick_does_not_reopen() {
        let mut agg = CandleAgg::default();
        assert_eq!(agg.apply(Interval::S1, &tick(1_500_000, 100, 1)), CandleEffect::Updated);
        let rolled = agg.apply(Interval::S1, &tick(2_100_000, 101, 1));
        assert!(matches!(rolled, CandleEffect::Rolled { closed } if closed.start == 1_000_000 && closed.count == 1));
        assert_eq!(agg.apply(Interval::S1, &tick(1_900_000, 1, 1)), CandleEffect::Late);
        assert_eq!(agg.current.unwrap().low, Decimal::new(101, 2));
    }

    /// A naive model: group every tick by interval start in arrival order, except
    /// ticks older than the newest interval seen so far.
    fn model(interval: Interval, ticks: &[Tick]) -> Vec<(i64, Decimal, Decimal, Decimal, Decimal, Decimal, u64)> {
        let mut out: BTreeMap<i64, (Decimal, Decimal, Decimal, Decimal, Decimal, u64)> = BTreeMap::new();
        let mut newest = i64::MIN;
        for t in ticks {
            let s = interval.start_of(t.ts);
            if s < newest {
                continue;
            }
            newest = s;
            let e = out
                .entry(s)
                .or_insert((t.price, t.price, t.price, t.price, Decimal::ZERO, 0));
            e.1 = e.1.max(t.price);
            e.2 = e.2.min(t.price);
            e.3 = t.price;
            e.4 += t.size;
            e.5 += 1;
        }
        out.into_iter()
            .map(|(s, (o, h, l, c, v, n))| (s, o, h, l, c, v, n))
            .collect()
    }

    proptest! {
        #[test]
        fn aggregation_matches_naive_model(
            steps in prop::collection::vec((-2_000_000i64..5_000_000, 1i64..100_000, 0i64..10_000), 1..200)
        ) {
            let mut ts = 1_700_000_000_000_000i64;
            let ticks: Vec<Tick> = steps.iter().map(|&(dt, p, s)| { ts = (ts + dt).max(1); tick(ts, p, s) }).collect();
            for interval in Interval::ALL {
                let mut agg = CandleAgg::default();
                let mut got = Vec::new();
                for t in &ticks {
                    if let CandleEffect::Rolled { closed } = agg.apply(interval, t) {
                        got.push(closed);
                    }
                }
                got.extend(agg.current);
                let got: Vec<_> = got.iter().map(|c| (c.start, c.open, c.high, c.low, c.close, c.volume, c.count)).collect();
                prop_assert_eq!(got, model(interval, &ticks));
            }
        }
    }
}
