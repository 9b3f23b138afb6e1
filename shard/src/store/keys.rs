//! Key layout of the single sled tree. One tree means one atomic `apply_batch`
//! per group commit covers ticks, symbol state, candles and de-dup state.
//!
//! ```text
//! M <name>                                 meta (format version, shard identity)
//! S <len u8> <symbol>                      SymbolRecord
//! T <len u8> <symbol> <first_seq u64 BE>   block of consecutive ticks
//! C <len u8> <symbol> <interval u8> <start u64 BE>   closed candle
//! D <len u8> <symbol>                      every publisher's DedupState of the symbol
//! L <commit u64 BE>                        log record: one group commit's ticks and
//!                                          de-dup changes, all symbols (until compacted)
//! X <len u8> <symbol>                      move mark: the symbol is being handed over,
//!                                          or was, to another shard (contract §9)
//! ```
//! The length prefix makes every symbol's keys a contiguous, exact prefix range;
//! big-endian numbers make range scans follow seq and time order.

use crate::domain::{Interval, Symbol};

pub(crate) const META: u8 = b'M';
pub(crate) const SYMBOL: u8 = b'S';
pub(crate) const TICKS: u8 = b'T';
pub(crate) const CANDLE: u8 = b'C';
pub(crate) const DEDUP: u8 = b'D';
pub(crate) const LOG: u8 = b'L';
pub(crate) const MOVE: u8 = b'X';

pub(crate) fn meta(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(META);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `<tag> <len> <symbol>`: the prefix of all of a symbol's keys of one kind.
pub(crate) fn prefix(tag: u8, sym: &Symbol) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + sym.len() + 17);
    k.push(tag);
    k.push(sym.len() as u8);
    k.extend_from_slice(sym.as_bytes());
    k
}

pub(crate) fn symbol(sym: &Symbol) -> Vec<u8> {
    prefix(SYMBOL, sym)
}

pub(crate) fn ticks(sym: &Symbol, first_seq: u64) -> Vec<u8> {
    let mut k = prefix(TICKS, sym);
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

pub(crate) fn candle(sym: &Symbol, interval: Interval, start: i64) -> Vec<u8> {
    let mut k = candle_prefix(sym, interval);
    k.extend_from_slice(&(start.max(0) as u64).to_be_bytes());
    k
}

pub(crate) fn candle_prefix(sym: &Symbol, interval: Interval) -> Vec<u8> {
    let mut k = prefix(CANDLE, sym);
    k.push(interval.index() as u8);
    k
}

pub(crate) fn moved(sym: &Symbol) -> Vec<u8> {
    prefix(MOVE, sym)
}

pub(crate) fn dedup(sym: &Symbol) -> Vec<u8> {
    prefix(DEDUP, sym)
}

pub(crate) fn log(commit: u64) -> [u8; 9] {
    let mut k = [LOG; 9];
    k[1..].copy_from_slice(&commit.to_be_bytes());
    k
}

/// The symbol of an `S` key.
pub(crate) fn symbol_of(key: &[u8]) -> Option<Symbol> {
    let (&len, rest) = key.get(1..)?.split_first()?;
    Symbol::from_stored(rest.get(..usize::from(len))?)
}

/// The trailing big-endian u64 of a `T` or `C` key.
pub(crate) fn trailing_u64(key: &[u8]) -> Option<u64> {
    key.last_chunk::<8>().map(|b| u64::from_be_bytes(*b))
}
