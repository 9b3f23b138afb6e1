//! The shard store on sled.
//!
//! One sled tree holds everything (see [`keys`]). sled's cost is per inserted
//! key (≈ 10–20 µs: leaf copy-on-write, splits), not per byte, so the write
//! path is shaped to insert few keys:
//!
//! - **Group commit** ([`Store::commit`], the committer thread): one *log
//!   record* key per commit holding every touched symbol's new ticks and the
//!   de-dup states the commit changed, plus closed candles and the records of
//!   new symbols; `apply_batch` (atomic) then `flush` (durable).
//! - **Compaction** (also the committer, a few symbols per commit, in the
//!   same batch): a symbol's logged ticks move into its tick blocks and its
//!   state is snapshotted ([`SymbolRecord`] + de-dup states); log records no
//!   symbol needs any more are removed.
//! - **Recovery**: snapshot, then [`Store::load_tail`] (blocks after the
//!   snapshot: only in format 2 and 3 directories), then [`Store::load_log`], folded
//!   in commit order by the committer.
//!
//! Reads of a symbol's ticks come from its blocks; ticks still in the log are
//! served from memory (the committer holds the chunks since the last
//! compaction: `committer::held`).
//!
//! Every method here blocks: call it from the committer thread or
//! `spawn_blocking`, never on an async worker.

pub(crate) mod codec;
mod keys;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use codec::{DedupState, SymbolRecord, TickBlock};

/// Every publisher's de-dup state of one symbol.
pub type SymbolDedup = (Symbol, Vec<(String, DedupState)>);

use crate::{
    domain::{Candle, Interval, Symbol, Tick},
    placement::ClusterState,
};

/// The layout version of the data directory. Bump it on any incompatible
/// change; an older version is then migrated or refused, never misread.
///
/// 4: each commit is one log record (all symbols), compacted into tick
/// blocks + snapshots.
/// 3: tick blocks are written with compact decimals (`BLOCK_V3`).
/// 2: symbol and de-dup records are snapshots; tick blocks after a snapshot
/// carry the de-dup states their commit changed.
/// 1: records rewritten every commit.
/// Formats 1 to 3 are upgraded in place on open (their blocks stay readable;
/// recovery folds format 2 and 3 blocks after the snapshots; none has a log);
/// a newer directory is refused by an older binary.
pub const FORMAT_VERSION: u32 = 4;

/// Most ticks in one tick block written by compaction (at most: see
/// [`StoreOptions::block_ticks`]).
pub const BLOCK_TICKS: usize = 1024;

const TREE: &str = "tickshard";
const META_FORMAT: &str = "format";
const META_IDENTITY: &str = "identity";
const META_CLUSTER: &str = "cluster";

/// A symbol this shard hands over, or handed over, to shard `to` (contract
/// §9): `done` once the new owner holds it (this shard's copy is deleted in
/// the same batch). Kept until the rebalance commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveMark {
    pub symbol: Symbol,
    pub to: u32,
    pub done: bool,
    /// The old owner's id of the hand-over (what it asks the new owner about).
    pub attempt: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "data dir {path} has format version {found}; this tickshard reads version {expected}. \
         Use a tickshard release that matches the data, or point --data-dir at an empty directory"
    )]
    FormatMismatch { path: PathBuf, found: u32, expected: u32 },
    #[error("data dir {path} holds data but no tickshard format marker: refusing to touch it")]
    Foreign { path: PathBuf },
    #[error("data dir {path} is locked by another process (is another tickshard using it?)")]
    Locked { path: PathBuf },
    #[error("corrupt record under key {key:?}: {what}")]
    Corrupt { key: String, what: &'static str },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A store call panicked or was cancelled: a bug in tickshard, not a
    /// sign of a damaged data directory.
    #[error("a store task failed: {0} (a bug in tickshard, not data corruption; please report it)")]
    Bug(String),
}

/// Options for opening the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
    /// Most ticks per tick block written by compaction: retention removes
    /// whole blocks, so this is its granularity (see [`StoreOptions::for_history`]).
    pub block_ticks: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 256 << 20,
            block_ticks: BLOCK_TICKS,
        }
    }
}

impl StoreOptions {
    /// Blocks of at most an eighth of the retained history (16 to
    /// [`BLOCK_TICKS`] ticks), so retention keeps at most ~1/8 more than asked.
    pub fn for_history(cache_bytes: u64, history_ticks: u64) -> StoreOptions {
        StoreOptions {
            cache_bytes,
            block_ticks: (history_ticks / 8).clamp(16, BLOCK_TICKS as u64) as usize,
        }
    }
}

pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
    block_ticks: usize,
}

/// The writes of one group commit, applied atomically by [`Store::commit`].
#[derive(Default)]
pub struct CommitBatch {
    batch: sled::Batch,
    scratch: Vec<u8>,
    log: Vec<u8>,
    keys: usize,
    /// Bytes of log records and of tick blocks in this batch (values only).
    written: Written,
}

/// What a batch writes, in bytes of values: its log record and its tick
/// blocks (the bulk of a commit; keys, records and candles are small).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub log: u64,
    pub blocks: u64,
}

impl CommitBatch {
    /// Adds one symbol's ticks of this commit, with the de-dup states it
    /// changed, to the commit's log record (see [`CommitBatch::seal_log`]).
    pub fn log_ticks<'a>(&mut self, ticks: &[Tick], dedup: impl Iterator<Item = (&'a str, &'a DedupState)>) {
        codec::put_log_section(&mut self.log, ticks, dedup);
    }

    /// Writes the log record built by [`CommitBatch::log_ticks`] as commit
    /// number `commit` (if it holds any ticks).
    /// Returns whether it wrote one.
    pub fn seal_log(&mut self, commit: u64) -> bool {
        if self.log.is_empty() {
            return false;
        }
        self.written.log += self.log.len() as u64;
        self.batch.insert(&keys::log(commit), std::mem::take(&mut self.log));
        self.keys += 1;
        true
    }

    /// Removes a compacted log record.
    pub fn remove_log(&mut self, commit: u64) {
        self.batch.remove(&keys::log(commit));
        self.keys += 1;
    }

    /// Consecutive ticks of one symbol as tick blocks of at most `max`
    /// ticks ([`Store::block_ticks`]), keyed by their first seq.
    pub fn put_ticks(&mut self, ticks: &[Tick], max: usize) {
        for block in ticks.chunks(max.max(1)) {
            self.put_block(block, std::iter::empty());
        }
    }

    /// One tick block keyed by its first seq (nothing for no ticks). With
    /// de-dup states it is a block as formats 2 and 3 wrote after a snapshot
    /// (upgrade tests write those).
    fn put_block<'a>(&mut self, ticks: &[Tick], dedup: impl Iterator<Item = (&'a str, &'a DedupState)>) {
        let Some(first) = ticks.first() else { return };
        self.scratch.clear();
        codec::encode_block(ticks, dedup, &mut self.scratch);
        self.written.blocks += self.scratch.len() as u64;
        self.batch
            .insert(keys::ticks(&first.symbol, first.seq), self.scratch.as_slice());
        self.keys += 1;
    }

    /// A snapshot of a symbol's state (as of `rec.last_seq`).
    pub fn put_symbol(&mut self, rec: &SymbolRecord) {
        self.scratch.clear();
        rec.encode(&mut self.scratch);
        self.batch.insert(keys::symbol(&rec.symbol), self.scratch.as_slice());
        self.keys += 1;
    }

    pub fn put_closed_candle(&mut self, c: &Candle) {
        self.scratch.clear();
        codec::put_candle(&mut self.scratch, c);
        self.batch
            .insert(keys::candle(&c.symbol, c.interval, c.start), self.scratch.as_slice());
        self.keys += 1;
    }

    /// A snapshot of every publisher's de-dup state of `sym` (one key per symbol).
    pub fn put_dedup<'a>(&mut self, sym: &Symbol, entries: impl Iterator<Item = (&'a str, &'a DedupState)>) {
        self.scratch.clear();
        codec::encode_dedup(entries, &mut self.scratch);
        self.batch.insert(keys::dedup(sym), self.scratch.as_slice());
        self.keys += 1;
    }

    pub fn put_move_mark(&mut self, m: &MoveMark) {
        self.batch
            .insert(keys::moved(&m.symbol), codec::encode_move_mark(m.to, m.done, m.attempt));
        self.keys += 1;
    }

    pub fn remove_move_mark(&mut self, sym: &Symbol) {
        self.batch.remove(keys::moved(sym));
        self.keys += 1;
    }

    /// The cluster's shard layout, durable with this batch.
    pub fn put_cluster_state(&mut self, s: &ClusterState, sealed: bool) {
        self.batch
            .insert(keys::meta(META_CLUSTER), codec::encode_cluster_state(s, sealed));
        self.keys += 1;
    }

    /// Removes every key of `sym` that `keys` lists (see
    /// [`Store::symbol_keys`]) and its record and de-dup states.
    pub fn remove_all_of(&mut self, sym: &Symbol, keys: Vec<sled::IVec>) {
        for k in keys {
            self.batch.remove(k);
            self.keys += 1;
        }
        self.remove_symbol(sym);
    }

    /// Removes a symbol's record and de-dup states (a symbol that never had
    /// a tick: it has no blocks, candles or log sections).
    pub fn remove_symbol(&mut self, sym: &Symbol) {
        self.batch.remove(keys::symbol(sym));
        self.batch.remove(keys::dedup(sym));
        self.keys += 2;
    }

    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }

    /// The bytes of log records and tick blocks this batch writes.
    pub fn written(&self) -> Written {
        self.written
    }
}

impl Store {
    /// Opens (or creates) the store in `path`, checking the format version.
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(opts.cache_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked {
                    path: path.to_path_buf(),
                },
                e => StoreError::Sled(e),
            })?;
        let tree = db.open_tree(TREE)?;
        let store = Store {
            db,
            tree,
            path: path.to_path_buf(),
            block_ticks: opts.block_ticks.max(1),
        };
        store.check_format()?;
        Ok(store)
    }

    fn check_format(&self) -> Result<(), StoreError> {
        match self.tree.get(keys::meta(META_FORMAT))? {
            Some(v) => {
                let found = codec::Reader::new(&v).u32().ok_or(StoreError::Corrupt {
                    key: "M format".into(),
                    what: "format version is not a u32",
                })?;
                match found {
                    FORMAT_VERSION => {}
                    1..=3 => {
                        // Format 1 rewrote every symbol's record and de-dup
                        // state each commit: they are exact snapshots. Formats
                        // 2 and 3 leave tick blocks after the snapshots, which
                        // recovery folds (`load_tail`). None has a log; old
                        // blocks keep their own version byte.
                        self.tree
                            .insert(keys::meta(META_FORMAT), &FORMAT_VERSION.to_be_bytes()[..])?;
                        self.db.flush()?;
                        tracing::info!(path = %self.path.display(), from = found, to = FORMAT_VERSION, "data dir format upgraded");
                    }
                    _ => {
                        return Err(StoreError::FormatMismatch {
                            path: self.path.clone(),
                            found,
                            expected: FORMAT_VERSION,
                        });
                    }
                }
            }
            None if !self.tree.is_empty() => {
                return Err(StoreError::Foreign {
                    path: self.path.clone(),
                });
            }
            None => {
                self.tree
                    .insert(keys::meta(META_FORMAT), &FORMAT_VERSION.to_be_bytes()[..])?;
                self.db.flush()?;
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Most ticks per block written by compaction.
    pub fn block_ticks(&self) -> usize {
        self.block_ticks
    }

    /// The `(shard_id, shards)` this data directory was created for, if recorded.
    pub fn identity(&self) -> Result<Option<(u32, u32)>, StoreError> {
        let Some(v) = self.tree.get(keys::meta(META_IDENTITY))? else {
            return Ok(None);
        };
        let mut r = codec::Reader::new(&v);
        match (r.u32(), r.u32()) {
            (Some(id), Some(n)) => Ok(Some((id, n))),
            _ => Err(StoreError::Corrupt {
                key: "M identity".into(),
                what: "identity is not two u32",
            }),
        }
    }

    pub fn set_identity(&self, shard_id: u32, shards: u32) -> Result<(), StoreError> {
        let mut v = shard_id.to_be_bytes().to_vec();
        v.extend_from_slice(&shards.to_be_bytes());
        self.tree.insert(keys::meta(META_IDENTITY), v)?;
        self.db.flush()?;
        Ok(())
    }

    /// The cluster state this pod last adopted, if any, and whether it was sealed.
    pub fn cluster_state(&self) -> Result<Option<(ClusterState, bool)>, StoreError> {
        let Some(v) = self.tree.get(keys::meta(META_CLUSTER))? else {
            return Ok(None);
        };
        codec::decode_cluster_state(&v).map(Some).ok_or(StoreError::Corrupt {
            key: "M cluster".into(),
            what: "bad cluster state",
        })
    }

    /// Every move mark (see [`MoveMark`]).
    pub fn load_move_marks(&self) -> Result<Vec<MoveMark>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::MOVE]) {
            let (k, v) = kv?;
            let corrupt = |what| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                what,
            };
            let symbol = keys::symbol_of(&k).ok_or_else(|| corrupt("bad move mark key"))?;
            let (to, done, attempt) = codec::decode_move_mark(&v).ok_or_else(|| corrupt("bad move mark"))?;
            out.push(MoveMark {
                symbol,
                to,
                done,
                attempt,
            });
        }
        Ok(out)
    }

    /// The keys of `sym`'s tick blocks and closed candles (to remove them
    /// with its record: a symbol handed over, or one taken over anew).
    pub fn symbol_keys(&self, sym: &Symbol) -> Result<Vec<sled::IVec>, StoreError> {
        let mut out = Vec::new();
        for tag in [keys::TICKS, keys::CANDLE] {
            for kv in self.tree.scan_prefix(keys::prefix(tag, sym)) {
                out.push(kv?.0);
            }
        }
        Ok(out)
    }

    /// Every closed candle of `sym` starting at or after `from` (per interval), oldest first.
    pub fn all_candles(&self, sym: &Symbol, from: [i64; 3], limit: usize) -> Result<Vec<Candle>, StoreError> {
        let mut out = Vec::new();
        for i in Interval::ALL {
            out.extend(self.read_candles(sym, i, from[i.index()], i64::MAX, limit.saturating_sub(out.len()))?);
        }
        Ok(out)
    }

    /// Every symbol's durable state, for the committer to start from.
    pub fn load_symbols(&self) -> Result<Vec<SymbolRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::SYMBOL]) {
            let (k, v) = kv?;
            let corrupt = |what| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                what,
            };
            let sym = keys::symbol_of(&k).ok_or_else(|| corrupt("bad symbol key"))?;
            out.push(SymbolRecord::decode(sym, &v).ok_or_else(|| corrupt("bad symbol record"))?);
        }
        Ok(out)
    }

    /// Every symbol's publisher de-dup states, for the committer to start from.
    pub fn load_dedup(&self) -> Result<Vec<SymbolDedup>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::DEDUP]) {
            let (k, v) = kv?;
            let corrupt = |what| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                what,
            };
            let sym = keys::symbol_of(&k).ok_or_else(|| corrupt("bad de-dup key"))?;
            out.push((
                sym,
                codec::decode_dedup(&v).ok_or_else(|| corrupt("bad de-dup record"))?,
            ));
        }
        Ok(out)
    }

    /// The tick blocks of `sym` written after its snapshot at `after_seq`, in
    /// seq order, checked to be consecutive.
    pub fn load_tail(&self, sym: &Symbol, after_seq: u64) -> Result<Vec<TickBlock>, StoreError> {
        let mut out = Vec::new();
        // (a snapshot at u64::MAX has nothing after it)
        let Some(mut next) = after_seq.checked_add(1) else {
            return Ok(out);
        };
        for kv in self.tree.range(keys::ticks(sym, next)..=keys::ticks(sym, u64::MAX)) {
            let (k, v) = kv?;
            let corrupt = |what| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                what,
            };
            if keys::trailing_u64(&k) != Some(next) {
                return Err(corrupt("tick blocks after the symbol snapshot are not consecutive"));
            }
            let block = codec::decode_whole_block(*sym, next, &v).ok_or_else(|| corrupt("bad tick block"))?;
            next += block.ticks.len() as u64;
            out.push(block);
        }
        Ok(out)
    }

    /// Every log record not yet compacted, in commit order.
    pub fn load_log(&self) -> Result<Vec<(u64, Vec<TickBlock>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::LOG]) {
            let (k, v) = kv?;
            let corrupt = |what| StoreError::Corrupt {
                key: format!("{:?}", &*k),
                what,
            };
            let commit = keys::trailing_u64(&k).ok_or_else(|| corrupt("bad log key"))?;
            out.push((commit, codec::decode_log(&v).ok_or_else(|| corrupt("bad log record"))?));
        }
        Ok(out)
    }

    /// Applies one group commit atomically and makes it durable. Returns the
    /// time spent in `flush`.
    pub fn commit(&self, batch: CommitBatch) -> Result<Duration, StoreError> {
        if !batch.is_empty() {
            self.tree.apply_batch(batch.batch)?;
        }
        let t = Instant::now();
        self.db.flush()?;
        Ok(t.elapsed())
    }

    /// Ticks `from..=to` of `sym` in seq order, at most `limit`. Callers clamp
    /// `to` to the durable seq: blocks past it may exist before their flush.
    pub fn read_ticks(&self, sym: &Symbol, from: u64, to: u64, limit: usize) -> Result<Vec<Tick>, StoreError> {
        let mut out = Vec::new();
        if from > to || limit == 0 {
            return Ok(out);
        }
        let prefix = keys::prefix(keys::TICKS, sym);
        // The block holding `from` is the last one starting at or before it.
        let start = match self.tree.range(prefix.clone()..=keys::ticks(sym, from)).next_back() {
            Some(kv) => kv?.0.to_vec(),
            None => keys::ticks(sym, from),
        };
        for kv in self.tree.range(start..=keys::ticks(sym, to)) {
            let (k, v) = kv?;
            let first = keys::trailing_u64(&k).ok_or(StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                what: "bad tick block key",
            })?;
            let mut done = false;
            codec::decode_block(*sym, first, &v, |t| {
                if t.seq > to || out.len() >= limit {
                    done = true;
                    return false;
                }
                if t.seq >= from {
                    out.push(t);
                }
                true
            })
            .ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                what: "bad tick block",
            })?;
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Closed candles of `sym` with `from <= start <= to`, oldest first.
    pub fn read_candles(
        &self,
        sym: &Symbol,
        interval: Interval,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<Candle>, StoreError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        for kv in self
            .tree
            .range(keys::candle(sym, interval, from)..=keys::candle(sym, interval, to))
            .take(limit)
        {
            let (k, v) = kv?;
            let c = codec::Reader::new(&v)
                .candle(*sym, interval)
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    what: "bad candle",
                })?;
            out.push(c);
        }
        Ok(out)
    }

    /// Deletes whole tick blocks of `sym` whose every seq is below `keep_from`,
    /// never one after the symbol's snapshot (recovery may need it). Returns
    /// the number of ticks removed.
    pub fn prune_ticks(&self, sym: &Symbol, keep_from: u64) -> Result<u64, StoreError> {
        // Snapshots only move forward, so a stale read here is only more careful.
        let snapshot = match self.tree.get(keys::symbol(sym))? {
            Some(v) => SymbolRecord::decode(*sym, &v).map_or(0, |r| r.last_seq),
            None => 0,
        };
        let keep_from = keep_from.min(snapshot + 1);
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        let mut iter = self.tree.scan_prefix(keys::prefix(keys::TICKS, sym)).peekable();
        while let Some(kv) = iter.next() {
            let (k, v) = kv?;
            // A block ends where the next one starts (blocks are consecutive).
            let next_first = match iter.peek() {
                Some(Ok((nk, _))) => keys::trailing_u64(nk),
                _ => None,
            };
            let Some(next_first) = next_first else { break };
            if next_first > keep_from {
                break;
            }
            removed += codec::block_len(&v).unwrap_or(0);
            batch.remove(k);
        }
        if removed > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// Deletes closed candles of one interval that start before `before`.
    pub fn prune_candles(&self, sym: &Symbol, interval: Interval, before: i64) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for kv in self
            .tree
            .range(keys::candle_prefix(sym, interval)..keys::candle(sym, interval, before))
        {
            batch.remove(kv?.0);
            removed += 1;
        }
        if removed > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// A final flush, for shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Bytes sled uses on disk (for metrics and the retention benchmark).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Opens `path` again in the same process. sled releases its directory lock
/// from its own I/O threads shortly after the last handle is dropped, so this
/// polls (bounded) while the directory is still locked.
#[cfg(test)]
pub(crate) fn reopen(path: &Path) -> Result<Store, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path, &StoreOptions::default()) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                #[expect(
                    clippy::disallowed_methods,
                    reason = "sled signals nothing when it releases its lock"
                )]
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests;
