//! Recovery: the committer's state rebuilt from the store before it serves.
//!
//! Each symbol's snapshot (record and de-dup states), then (format 2 and 3
//! directories) the tick blocks after it, then every log record in commit
//! order, all folded with the code that applies a live publish
//! ([`SymState::fold`]), so the recovered state is exactly the acked one. What
//! was folded is compacted at once (blocks, snapshots, no log), so the
//! committer starts with nothing held.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{DEDUP_HORIZON, StartError, SymState, snapshot};
use crate::{
    domain::{Symbol, now_micros},
    store::{CommitBatch, DedupState, Store, StoreError, SymbolDedup, SymbolRecord},
};

/// The recovered state.
pub(super) struct Recovered {
    pub(super) symbols: HashMap<Symbol, SymState>,
    /// The number of the next log record.
    pub(super) next_commit: u64,
}

/// Folds the store's snapshots, tails and log into the committer's state and
/// compacts it (one atomic batch). A log section that a snapshot already
/// covers is skipped; any other gap refuses the start.
pub(super) fn recover(
    store: &Store,
    records: Vec<SymbolRecord>,
    dedup: Vec<SymbolDedup>,
    gone: &HashSet<Symbol>,
) -> Result<Recovered, StartError> {
    let mut dedup: HashMap<Symbol, Vec<(String, DedupState)>> = dedup.into_iter().collect();
    let mut symbols = HashMap::with_capacity(records.len());
    let mut dirty = Vec::new();
    for rec in records {
        let sym = rec.symbol;
        let mut st = SymState::new(rec);
        for (id, d) in dedup.remove(&sym).unwrap_or_default() {
            st.dedup.insert(Arc::from(id), d);
        }
        // Format 2 leaves tick blocks after the snapshot: fold them.
        let tail = store.load_tail(&sym, st.rec.last_seq)?;
        if !tail.is_empty() {
            dirty.push(sym);
        }
        for block in tail {
            for tick in block.ticks {
                st.fold(tick);
            }
            for (id, d) in block.dedup {
                st.dedup.insert(Arc::from(id), d);
            }
        }
        st.ticks.clear(); // already in blocks
        symbols.insert(sym, st);
    }
    let log = store.load_log()?;
    let mut folded = 0usize;
    for section in log.iter().flat_map(|(_, sections)| sections) {
        let Some(first) = section.ticks.first() else { continue };
        if gone.contains(&first.symbol) && !symbols.contains_key(&first.symbol) {
            continue; // handed over to another shard (its copy here is gone)
        }
        let st = symbols.get_mut(&first.symbol).ok_or(StoreError::Corrupt {
            key: format!("L… {}", first.symbol),
            what: "log record of a symbol without a record",
        })?;
        if first.seq <= st.rec.last_seq {
            // A compaction snapshotted this symbol past this commit but
            // stopped before it removed the log record.
            continue;
        }
        if first.seq != st.rec.last_seq + 1 {
            return Err(StartError::Log(
                section.ticks.len(),
                first.symbol,
                first.seq,
                st.rec.last_seq + 1,
            ));
        }
        if !st.touched {
            st.touched = true;
            dirty.push(first.symbol);
        }
        folded += section.ticks.len();
        for tick in &section.ticks {
            st.fold(*tick);
        }
        for (id, d) in &section.dedup {
            st.dedup.insert(Arc::from(id.as_str()), *d);
        }
    }
    // Compact what was folded before serving: blocks, snapshots, no log.
    let horizon = now_micros() - DEDUP_HORIZON.as_micros() as i64;
    for st in symbols.values_mut() {
        st.dedup.retain(|_, d| d.last_used >= horizon);
    }
    let mut batch = CommitBatch::default();
    for sym in &dirty {
        let Some(st) = symbols.get(sym) else { continue };
        batch.put_ticks(&st.ticks, store.block_ticks());
        snapshot(&mut batch, st);
    }
    for (commit, _) in &log {
        batch.remove_log(*commit);
    }
    store.commit(batch)?;
    for st in symbols.values_mut() {
        st.closed.clear(); // stored with the commits that closed them
        st.ticks.clear();
        st.touched = false;
    }
    tracing::info!(
        symbols = symbols.len(),
        log_records = log.len(),
        ticks = folded,
        "shard state recovered"
    );
    Ok(Recovered {
        symbols,
        next_commit: log.last().map_or(1, |(c, _)| c + 1),
    })
}
