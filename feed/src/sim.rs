//! The simulated market: random-walk quotes and trades for a few dozen
//! realistic instruments, published through the same group-commit path as real
//! ticks (so running the demo exercises the real write path).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tickshard_shard::{
    committer::PublishCmd,
    domain::{Decimal, Symbol, Tick, now_micros},
    node::Node,
};
use tokio_util::sync::CancellationToken;

/// (symbol, starting price as text, relative activity)
const INSTRUMENTS: &[(&str, &str, u32)] = &[
    ("BTC-USD", "67012.50", 10),
    ("ETH-USD", "3012.55", 8),
    ("SOL-USD", "152.347", 5),
    ("XRP-USD", "0.52310", 4),
    ("ADA-USD", "0.45120", 3),
    ("DOGE-USD", "0.123450", 4),
    ("AVAX-USD", "35.412", 2),
    ("LINK-USD", "14.2310", 2),
    ("DOT-USD", "7.1230", 2),
    ("LTC-USD", "84.21", 2),
    ("BCH-USD", "482.15", 1),
    ("XLM-USD", "0.11234", 1),
    ("AAPL", "189.84", 6),
    ("MSFT", "421.53", 5),
    ("NVDA", "118.47", 8),
    ("AMZN", "185.21", 4),
    ("GOOGL", "171.38", 4),
    ("META", "502.11", 4),
    ("TSLA", "245.67", 7),
    ("JPM", "201.45", 2),
    ("V", "275.32", 2),
    ("NFLX", "645.10", 2),
    ("AMD", "158.64", 4),
    ("INTC", "31.22", 2),
    ("EUR/USD", "1.08512", 6),
    ("GBP/USD", "1.27134", 4),
    ("USD/JPY", "151.482", 5),
    ("AUD/USD", "0.66215", 3),
    ("USD/CHF", "0.90412", 2),
    ("USD/CAD", "1.36251", 2),
    ("NZD/USD", "0.60123", 1),
    ("EUR/GBP", "0.85341", 2),
    ("EUR/JPY", "164.372", 2),
    ("XAU/USD", "2351.45", 3),
    ("XAG/USD", "28.123", 1),
    ("WTI/USD", "78.52", 2),
];

struct Instrument {
    symbol: Symbol,
    scale: u32,
    /// Mid price in units of 10^-scale.
    mid: i64,
    start: i64,
    last_trade: i64,
    weight: u32,
}

impl Instrument {
    /// One market update: a quote change, or a trade at the bid or the ask.
    fn step(&mut self, rng: &mut fastrand::Rng) -> Tick {
        // Random walk with a pull back towards the start price.
        let unit = (self.start / 20_000).max(1);
        let pull = if self.mid > self.start * 11 / 10 {
            -1
        } else if self.mid < self.start * 9 / 10 {
            1
        } else {
            0
        };
        self.mid = (self.mid + (rng.i64(-2..=2) + pull) * unit).max(unit * 10);
        let half_spread = unit * rng.i64(1..=3);
        let (bid, ask) = (self.mid - half_spread, self.mid + half_spread);
        let trade = rng.u8(0..10) < 3;
        let size = if trade {
            self.last_trade = if rng.bool() { bid } else { ask };
            Decimal::new(rng.i64(1..=50_000), 4)
        } else {
            Decimal::ZERO
        };
        let d = |m: i64| Decimal::new(m, self.scale);
        Tick {
            symbol: self.symbol,
            seq: 0,
            ts: now_micros(),
            price: d(self.last_trade),
            size,
            bid: Some(d(bid)),
            ask: Some(d(ask)),
            bid_size: Some(Decimal::new(rng.i64(1..=2_000), 2)),
            ask_size: Some(Decimal::new(rng.i64(1..=2_000), 2)),
        }
    }
}

fn instruments(node: &Node) -> Vec<Instrument> {
    INSTRUMENTS
        .iter()
        .filter_map(|&(s, p, weight)| {
            let symbol = Symbol::parse(s).ok()?;
            let start = tickshard_shard::domain::parse_decimal(p)?;
            let scale = start.scale();
            // Continue from where the last run left off.
            let mid = node
                .head(&symbol)
                .and_then(|h| h.last)
                .and_then(|t| t.bid.zip(t.ask).map(|(b, a)| (b + a) / Decimal::TWO))
                .map(|m| m.round_dp(scale))
                .filter(|m| m.scale() == scale)
                .map_or(start.mantissa() as i64, |m| m.mantissa() as i64);
            Some(Instrument {
                symbol,
                scale,
                mid,
                start: start.mantissa() as i64,
                last_trade: mid,
                weight,
            })
        })
        .collect()
}

/// Publishes `rate` ticks per second until `stop`.
pub async fn run(node: Arc<Node>, rate: u32, stop: CancellationToken) {
    let mut inst = instruments(&node);
    let total: u32 = inst.iter().map(|i| i.weight).sum();
    let mut rng = fastrand::Rng::new();
    // Acks of simulated ticks are not needed: the receiver is dropped.
    let (ack_tx, _) = tickshard_shard::committer::AckTx::new();
    let period = Duration::from_millis(10);
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed: u64 = 0; // in 1/100 ticks
    tracing::info!(symbols = inst.len(), rate, "simulated market on");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        owed += u64::from(rate);
        while owed >= 100 {
            owed -= 100;
            let mut pick = rng.u32(0..total.max(1));
            let Some(i) = inst.iter_mut().find(|i| {
                let hit = pick < i.weight;
                pick = pick.saturating_sub(i.weight);
                hit
            }) else {
                continue;
            };
            let cmd = PublishCmd {
                tick: i.step(&mut rng),
                publisher: None,
                request_id: 0,
                reply: ack_tx.clone(),
                received: Instant::now(),
            };
            if node.publish(cmd).await.is_err() {
                return;
            }
        }
    }
}
