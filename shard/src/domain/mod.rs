//! The domain of a market-data feed: symbols, ticks, candles, epochs, and the
//! validation that turns untrusted input into them.
//!
//! Nothing here knows about a wire format: no prost, no JSON, no HTTP. Every
//! price and size is an exact [`Decimal`]; floats never appear.

mod candle;
mod epoch;
mod error;
mod history;
mod num;
mod publisher;
mod symbol;
mod tick;

pub use candle::{Candle, CandleAgg, CandleEffect, Interval};
pub use epoch::Epoch;
pub use error::{ErrorCode, InputError};
pub use history::{HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX, History, HistoryQuery, LastTick, SymbolInfo};
pub use num::{MAX_SEQ, MAX_TS_MICROS, now_micros, parse_decimal};
pub use publisher::{
    MAX_PUBLISHER_ID_BYTES, MAX_SUB_BYTES, publisher_id_from, publisher_scope, scoped_publisher_id,
    validate_forwarded_publisher_id, validate_publisher_id,
};
pub use rust_decimal::Decimal;
pub use symbol::{MAX_SYMBOL_LEN, Symbol, SymbolListError, SymbolSet};
pub use tick::{Tick, TickFields};

/// A position in a symbol's history: the last `seq` a client has seen, meaningful
/// only together with the epoch of that history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub epoch: Epoch,
}
