//! The ticks a symbol's group commits wrote to the store's *log* that no
//! compaction has put into tick blocks yet, kept in memory by the committer
//! that wrote them: compaction takes them from here, and readers read them
//! here before the blocks. The fan-out hub holds nothing the store needs: it
//! is a cache of what subscribers get, and may drop anything at any time.
//!
//! One mutex per symbol, taken once per symbol per commit by the committer
//! (push, release) and once per read.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

use crate::{domain::Symbol, hub::Chunk};

/// Every symbol's held chunks.
#[derive(Default)]
pub struct Held {
    symbols: RwLock<HashMap<Symbol, Arc<SymbolHeld>>>,
}

/// One symbol's held chunks, in seq order.
#[derive(Default)]
pub struct SymbolHeld {
    chunks: Mutex<VecDeque<Arc<Chunk>>>,
}

/// What [`SymbolHeld::recent`] found.
#[derive(Default)]
pub struct Recent {
    /// The first seq held (`None`: nothing is held; everything durable is in
    /// the tick blocks).
    pub first: Option<u64>,
    /// The held chunks with ticks at or after the requested seq.
    pub chunks: Vec<Arc<Chunk>>,
}

impl Held {
    pub fn get(&self, symbol: &Symbol) -> Option<Arc<SymbolHeld>> {
        self.symbols
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(symbol)
            .cloned()
    }

    /// The symbol's entry, made if needed (the committer, for a symbol it has).
    pub(super) fn entry(&self, symbol: Symbol) -> Arc<SymbolHeld> {
        if let Some(h) = self.get(&symbol) {
            return h;
        }
        self.symbols
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(symbol)
            .or_default()
            .clone()
    }

    /// The committer forgot the symbol.
    pub(super) fn remove(&self, symbol: &Symbol) {
        self.symbols.write().unwrap_or_else(|p| p.into_inner()).remove(symbol);
    }
}

impl SymbolHeld {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Chunk>>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A durable chunk that went to the log only (call after the flush).
    pub(super) fn push(&self, chunk: Arc<Chunk>) {
        if !chunk.ticks.is_empty() {
            self.lock().push_back(chunk);
        }
    }

    /// Compaction made every tick up to `upto` durable in tick blocks (call
    /// after the flush): the chunks holding only such ticks go.
    pub(super) fn release(&self, upto: u64) {
        let mut chunks = self.lock();
        while chunks
            .front()
            .is_some_and(|c| c.ticks.last().is_none_or(|t| t.seq <= upto))
        {
            chunks.pop_front();
        }
    }

    /// Every held chunk, oldest first (for compaction).
    pub(super) fn all(&self) -> Vec<Arc<Chunk>> {
        self.lock().iter().cloned().collect()
    }

    /// The held chunks with ticks at or after `from`, and the first seq held.
    pub fn recent(&self, from: u64) -> Recent {
        let chunks = self.lock();
        Recent {
            first: chunks.front().and_then(|c| c.ticks.first()).map(|t| t.seq),
            chunks: chunks
                .iter()
                .filter(|c| c.ticks.last().is_some_and(|t| t.seq >= from))
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;

    use super::*;
    use crate::domain::Tick;

    fn chunk(sym: Symbol, seqs: std::ops::RangeInclusive<u64>) -> Arc<Chunk> {
        let ticks = seqs
            .map(|seq| Tick {
                symbol: sym,
                seq,
                ts: 1_700_000_000_000_000 + seq as i64,
                price: Decimal::new(100, 0),
                size: Decimal::ONE,
                bid: None,
                ask: None,
                bid_size: None,
                ask_size: None,
            })
            .collect();
        Arc::new(Chunk::new(sym, ticks))
    }

    #[test]
    fn chunks_are_held_until_compaction_releases_them() {
        let sym = Symbol::parse("H").unwrap();
        let held = Held::default();
        let h = held.entry(sym);
        h.push(chunk(sym, 1..=3));
        h.push(chunk(sym, 4..=4));
        h.push(chunk(sym, 5..=9));
        let r = h.recent(4);
        assert_eq!(r.first, Some(1));
        assert_eq!(r.chunks.len(), 2, "the chunks with ticks at or after 4");
        h.release(4);
        assert_eq!(h.recent(0).first, Some(5), "released whole chunks up to 4");
        h.release(7);
        assert_eq!(h.recent(0).first, Some(5), "a chunk with a tick past the release stays");
        h.release(9);
        assert!(h.recent(0).first.is_none() && h.all().is_empty());
        assert!(Arc::ptr_eq(&held.entry(sym), &h));
        held.remove(&sym);
        assert!(held.get(&sym).is_none());
    }
}
