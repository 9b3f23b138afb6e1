//! What reads of market data ask and answer (GetHistory, GetSnapshot,
//! ListSymbols and their peer forms), in domain terms.

use super::{Candle, Epoch, Interval, Symbol, Tick};

/// Ticks or candles a history read returns when no limit is given.
pub const HISTORY_LIMIT_DEFAULT: usize = 1_000;
/// The most ticks or candles one history read returns.
pub const HISTORY_LIMIT_MAX: usize = 10_000;

/// What a history read asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryQuery {
    /// Ticks with `from <= seq <= to`.
    Ticks { from: u64, to: u64 },
    /// Candles of `interval` starting in `from..=to` (µs), the current one
    /// included if it starts in the range.
    Candles { interval: Interval, from: i64, to: i64 },
}

/// A history read's answer, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The symbol's epoch (`None`: the owner has no such symbol).
    pub epoch: Option<Epoch>,
    pub ticks: Vec<Tick>,
    /// Candles and whether each is closed.
    pub candles: Vec<(Candle, bool)>,
    /// More was there than the limit let through.
    pub truncated: bool,
}

/// A symbol's latest tick, with the epoch its seq belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastTick {
    pub epoch: Epoch,
    pub tick: Tick,
}

/// A symbol with ticks, as listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolInfo {
    pub symbol: Symbol,
    pub owner: u32,
    pub seq: u64,
    pub epoch: Epoch,
}
