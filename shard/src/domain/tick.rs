use rust_decimal::Decimal;

use super::{InputError, MAX_TS_MICROS, Symbol, parse_decimal};

/// One accepted market update. `seq` is assigned by the owning shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    pub symbol: Symbol,
    pub seq: u64,
    /// Exchange time, µs since the Unix epoch, in `1..=2^53`.
    pub ts: i64,
    pub price: Decimal,
    pub size: Decimal,
    pub bid: Option<Decimal>,
    pub ask: Option<Decimal>,
    pub bid_size: Option<Decimal>,
    pub ask_size: Option<Decimal>,
}

/// A tick as given by a publisher, all fields still text: what gRPC, CSV and
/// NDJSON input have in common. An empty optional field means "absent".
#[derive(Clone, Copy, Debug, Default)]
pub struct TickFields<'a> {
    pub symbol: &'a str,
    pub ts: i64,
    pub price: &'a str,
    pub size: &'a str,
    pub bid: &'a str,
    pub ask: &'a str,
    pub bid_size: &'a str,
    pub ask_size: &'a str,
}

impl TickFields<'_> {
    /// Validates the fields (contract §1) into a tick with `seq: 0`.
    pub fn validate(&self) -> Result<Tick, InputError> {
        let symbol = Symbol::parse(self.symbol)?;
        let bad = |m: String| InputError::InvalidTick(m);
        if !(1..=MAX_TS_MICROS).contains(&self.ts) {
            return Err(bad(format!(
                "ts {} is outside 1..=2^53 microseconds since the Unix epoch",
                self.ts
            )));
        }
        let required = |name: &str, v: &str| {
            parse_decimal(v).ok_or_else(|| bad(format!("{name} {} is not a decimal string", quoted(v))))
        };
        let optional = |name: &str, v: &str| {
            if v.is_empty() {
                Ok(None)
            } else {
                required(name, v).map(Some)
            }
        };
        let price = required("price", self.price)?;
        let size = required("size", self.size)?;
        let bid = optional("bid", self.bid)?;
        let ask = optional("ask", self.ask)?;
        let bid_size = optional("bid_size", self.bid_size)?;
        let ask_size = optional("ask_size", self.ask_size)?;
        if price <= Decimal::ZERO {
            return Err(bad(format!("price {price} must be > 0")));
        }
        for (name, v) in [("size", Some(size)), ("bid_size", bid_size), ("ask_size", ask_size)] {
            if let Some(v) = v
                && v.is_sign_negative()
                && !v.is_zero()
            {
                return Err(bad(format!("{name} {v} must be >= 0")));
            }
        }
        if let (Some(b), Some(a)) = (bid, ask)
            && b > a
        {
            return Err(bad(format!("bid {b} is above ask {a}")));
        }
        Ok(Tick {
            symbol,
            seq: 0,
            ts: self.ts,
            price,
            size,
            bid,
            ask,
            bid_size,
            ask_size,
        })
    }
}

fn quoted(v: &str) -> String {
    let mut s: String = v.chars().take(40).flat_map(char::escape_debug).collect();
    if v.chars().count() > 40 {
        s.push('…');
    }
    format!("'{s}'")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ErrorCode;

    fn fields() -> TickFields<'static> {
        TickFields {
            symbol: "btc-usd",
            ts: 1_732_530_000_123_456,
            price: "67012.50",
            size: "0.01",
            bid: "67012.40",
            ask: "67012.60",
            ..TickFields::default()
        }
    }

    #[test]
    fn valid_tick_keeps_exact_decimals() {
        let t = fields().validate().unwrap();
        assert_eq!(t.symbol.as_str(), "BTC-USD");
        assert_eq!(t.price.to_string(), "67012.50");
        assert_eq!(t.bid.unwrap().to_string(), "67012.40");
        assert_eq!(t.bid_size, None);
    }

    #[test]
    fn each_rule_has_its_code() {
        let cases: [(TickFields<'static>, ErrorCode); 9] = [
            (
                TickFields {
                    symbol: "b@d",
                    ..fields()
                },
                ErrorCode::InvalidSymbol,
            ),
            (TickFields { price: "0", ..fields() }, ErrorCode::InvalidTick),
            (
                TickFields {
                    price: "-1",
                    ..fields()
                },
                ErrorCode::InvalidTick,
            ),
            (
                TickFields {
                    price: "1e3",
                    ..fields()
                },
                ErrorCode::InvalidTick,
            ),
            (
                TickFields {
                    size: "-0.1",
                    ..fields()
                },
                ErrorCode::InvalidTick,
            ),
            (
                TickFields {
                    bid: "2",
                    ask: "1",
                    ..fields()
                },
                ErrorCode::InvalidTick,
            ),
            (TickFields { ts: 0, ..fields() }, ErrorCode::InvalidTick),
            (
                TickFields {
                    ts: MAX_TS_MICROS + 1,
                    ..fields()
                },
                ErrorCode::InvalidTick,
            ),
            (
                TickFields {
                    ask_size: "x",
                    ..fields()
                },
                ErrorCode::InvalidTick,
            ),
        ];
        for (f, code) in cases {
            assert_eq!(f.validate().unwrap_err().code(), code, "{f:?}");
        }
        assert!(
            TickFields {
                ts: MAX_TS_MICROS,
                size: "0",
                ..fields()
            }
            .validate()
            .is_ok()
        );
        assert!(
            TickFields {
                bid: "1",
                ask: "1",
                ..fields()
            }
            .validate()
            .is_ok()
        );
    }
}
