//! Hand-overs of symbols between shards (contract §9), on the committer's
//! side. The committer is the one place every publish of a symbol passes in
//! order, so it is where a symbol's publishes are held while it moves and
//! relayed to its new owner after:
//!
//! 1. `Export`: the symbol is marked moving (`X` key, durable with this
//!    commit, its ticks compacted into blocks in the same batch); from the
//!    command on, its publishes are *parked* here, in order, unanswered.
//! 2. The node ships the state to the new owner, which `Import`s it (one
//!    atomic batch there) and takes over its mirror hub, if it had one.
//! 3. `Release { moved: true }`: this shard's copy is deleted and the mark
//!    says `done`, in one batch; parked publishes, and every later one, are
//!    relayed to the new owner in order. `moved: false` (the new owner did
//!    not take it) applies the parked publishes here instead.
//!
//! A restart finds the marks: `done` ones are relayed, others are resolved
//! by the node (it asks the new owner, whose answer is final).
//!
//! While a rebalance is *sealed* (its last phase), a new symbol whose owner
//! changes under the target is not created here: its publishes and ensures
//! wait for the commit, then go to the committed owner.

use std::{sync::Arc, time::Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Cmd, CommitError, EnsureReply, PublishCmd, Round, SymState, Worker, snapshot, unref};
use crate::{
    domain::{Candle, Symbol, Tick},
    metrics as m,
    ownership::{jump_consistent_hash, symbol_hash},
    placement::ClusterState,
    store::{CommitBatch, DedupState, MoveMark, SymbolRecord},
};

/// What the committer starts with besides the store's symbols.
pub struct Setup {
    pub me: u32,
    pub state: ClusterState,
    /// The stored state was sealed (see [`Cmd::SetState`]).
    pub sealed: bool,
    pub marks: Vec<MoveMark>,
    pub relay: mpsc::UnboundedSender<Relay>,
}

/// How long a publish may wait for a hand-over (or a sealed rebalance)
/// before it is answered UNAVAILABLE (retryable: de-dup makes the retry
/// exact wherever the symbol ends up). Contract §9: held at most 1 s.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// To the node's relay task, in the committer's order.
pub enum Relay {
    /// A publish of a symbol now owned by shard `.0`.
    /// (Boxed: relays are the rare path, the `Barrier` stays small.)
    Publish(u32, Box<PublishCmd>),
    /// Every relay before this one was handed on.
    Barrier(oneshot::Sender<()>),
}

/// A symbol's state at the start of its hold (its ticks are all in blocks).
pub struct Exported {
    pub record: SymbolRecord,
    pub dedup: Vec<(String, DedupState)>,
    /// When its publishes started being held.
    pub held_since: Instant,
    /// The hand-over's id (in its mark: what a restart asks the new owner about).
    pub attempt: u64,
}

/// A symbol taken over: its state and retained history.
pub struct Imported {
    pub record: SymbolRecord,
    pub dedup: Vec<(String, DedupState)>,
    /// Consecutive, ending at `record.last_seq` (empty if it has no ticks).
    pub ticks: Vec<Tick>,
    pub candles: Vec<Candle>,
}

/// One part of a symbol's hand-over (the MoveIn stream, contract §9):
/// retained ticks (consecutive, seq set) and closed candles, and on the last
/// part the symbol's state.
pub struct MovePart {
    pub symbol: Symbol,
    pub from: u32,
    pub ticks: Vec<Tick>,
    pub candles: Vec<Candle>,
    pub last: Option<(SymbolRecord, Vec<(String, DedupState)>)>,
    /// The old owner's id of this hand-over.
    pub attempt: u64,
}

impl MovePart {
    pub fn new(symbol: Symbol, from: u32, attempt: u64, ticks: Vec<Tick>, candles: Vec<Candle>) -> MovePart {
        MovePart {
            symbol,
            from,
            ticks,
            candles,
            last: None,
            attempt,
        }
    }
}

pub(super) enum MoveOut {
    /// Being handed over to `to`: publishes wait here (at most
    /// [`HOLD_LIMIT`]; after it, while the hand-over is not settled, they
    /// are answered UNAVAILABLE: `refusing`).
    Holding {
        to: u32,
        parked: Vec<PublishCmd>,
        since: Instant,
        refusing: bool,
    },
    /// Handed over (in commit `at`): publishes are relayed.
    Gone { to: u32, at: u64 },
}

type ExportReply = oneshot::Sender<Result<Exported, CommitError>>;
pub(super) type Exporting = (Symbol, u32, u64, ExportReply);
type ImportReply = oneshot::Sender<Result<(), CommitError>>;

/// The hand-overs a round carries, answered once it is durable.
#[derive(Default)]
pub(super) struct RoundMoves {
    pub(super) exports: Vec<Exporting>,
    releases: Vec<(Symbol, Option<u32>, oneshot::Sender<()>)>,
    imports: Vec<(Box<Imported>, ImportReply)>,
    states: Vec<(ClusterState, oneshot::Sender<Result<(), CommitError>>)>,
}

impl Worker {
    fn owner_under(&self, sym: &Symbol, shards: u32) -> u32 {
        jump_consistent_hash(symbol_hash(sym), shards)
    }

    /// A publish this shard does not apply now: parked (its symbol is moving,
    /// or it would create a symbol while sealed) or relayed (handed over).
    /// `Some` gives it back to be applied.
    pub(super) fn divert(&mut self, p: PublishCmd) -> Option<PublishCmd> {
        let sym = p.tick.symbol;
        match self.moving.get_mut(&sym) {
            Some(MoveOut::Holding { refusing: true, .. }) => {
                p.unavailable(format!("{sym} is moving to another shard; retry"));
                return None;
            }
            Some(MoveOut::Holding { parked, .. }) => {
                parked.push(p);
                return None;
            }
            Some(MoveOut::Gone { to, .. }) => {
                let _ = self.relay.send(super::Relay::Publish(*to, Box::new(p)));
                return None;
            }
            None => {}
        }
        if !self.symbols.contains_key(&sym) {
            // Never create a symbol the committed map gives another shard: a
            // request routed before this pod switched to a new map would
            // start it over here with a new epoch. Refused (retryable), it
            // keeps its stream's order, and the retry finds the owner.
            let owner = self.owner_under(&sym, self.cluster.committed);
            if owner != self.me {
                p.unavailable(format!("{sym} is owned by shard {owner}; retry"));
                return None;
            }
            if self.sealed
                && let Some(t) = self.cluster.target
                && self.owner_under(&sym, t) != self.me
            {
                if self.sealed_refusing {
                    p.unavailable(format!("{sym} waits for a rebalance to commit; retry"));
                } else {
                    self.sealed_parked.push(p);
                }
                return None;
            }
        }
        Some(p)
    }

    /// The same for an ensure (a subscribe creating symbols).
    pub(super) fn divert_ensure(
        &mut self,
        symbols: Vec<Symbol>,
        reply: EnsureReply,
    ) -> Option<(Vec<Symbol>, EnsureReply)> {
        if let Some((s, to)) = symbols.iter().find_map(|s| match self.moving.get(s) {
            Some(MoveOut::Gone { to, .. }) => Some((*s, *to)),
            _ => None,
        }) {
            let _ = reply.send(Err(CommitError::Move(format!("{s} moved to shard {to}; retry"))));
            return None;
        }
        if let Some(s) = symbols
            .iter()
            .find(|s| !self.symbols.contains_key(s) && self.owner_under(s, self.cluster.committed) != self.me)
        {
            let _ = reply.send(Err(CommitError::Move(format!("{s} is owned by another shard; retry"))));
            return None;
        }
        if self.sealed
            && let Some(t) = self.cluster.target
            && symbols
                .iter()
                .any(|s| !self.symbols.contains_key(s) && self.owner_under(s, t) != self.me)
        {
            self.sealed_ensures.push((symbols, reply, Instant::now()));
            return None;
        }
        Some((symbols, reply))
    }

    /// Applies a hand-over command, in the round's order.
    pub(super) fn apply_move(&mut self, cmd: Cmd, round: &mut Round, now: i64) {
        match cmd {
            Cmd::Export {
                symbol,
                to,
                attempt,
                reply,
            } => {
                if !self.symbols.contains_key(&symbol) || self.moving.contains_key(&symbol) {
                    let _ = reply.send(Err(CommitError::Move(format!(
                        "{symbol} is not held here, or is already moving"
                    ))));
                    return;
                }
                self.pending_unmark.retain(|(s, _)| *s != symbol);
                self.moving.insert(
                    symbol,
                    MoveOut::Holding {
                        to,
                        parked: Vec::new(),
                        since: Instant::now(),
                        refusing: false,
                    },
                );
                round.moves.exports.push((symbol, to, attempt, reply));
            }
            Cmd::Release { symbol, moved, reply } => {
                let Some(MoveOut::Holding { to, parked, .. }) = self.moving.remove(&symbol) else {
                    let _ = reply.send(());
                    return;
                };
                if moved {
                    if let Some(st) = self.symbols.remove(&symbol) {
                        if let Some(from) = st.log_from {
                            unref(&mut self.log_refs, from, &symbol);
                        }
                        if st.touched {
                            round.touched.retain(|s| *s != symbol);
                        }
                    }
                    self.held.remove(&symbol);
                    for p in parked {
                        let _ = self.relay.send(super::Relay::Publish(to, Box::new(p)));
                    }
                    let at = self.next_commit;
                    self.moving.insert(symbol, MoveOut::Gone { to, at });
                    round.moves.releases.push((symbol, Some(to), reply));
                } else {
                    for p in parked {
                        self.apply_one(p, round, now);
                    }
                    round.moves.releases.push((symbol, None, reply));
                }
            }
            Cmd::Import { state, reply } => {
                let sym = state.record.symbol;
                if self.symbols.contains_key(&sym) {
                    let _ = reply.send(Err(CommitError::Move(format!("{sym} is already held here"))));
                    return;
                }
                self.moving.remove(&sym);
                self.pending_unmark.retain(|(s, _)| *s != sym);
                let mut st = SymState::new(state.record.clone());
                for (id, d) in &state.dedup {
                    st.dedup.insert(Arc::from(id.as_str()), *d);
                }
                st.held = self.held.entry(sym);
                self.symbols.insert(sym, st);
                round.moves.imports.push((state, reply));
            }
            Cmd::SetState { state, seal, reply } => {
                // (refusing lasts while the same rebalance stays sealed: the
                // coordinator seals the same state again on each pass)
                let sealed = seal && state.target.is_some();
                if !(sealed
                    && self.sealed
                    && state.committed == self.cluster.committed
                    && state.target == self.cluster.target)
                {
                    self.sealed_refusing = false;
                }
                self.cluster = state;
                self.sealed = sealed;
                self.note_holds();
                if state.target.is_none() {
                    // Committed (or given up): what waited for it goes on,
                    // to the owner under the committed map.
                    for p in std::mem::take(&mut self.sealed_parked) {
                        let owner = self.owner_under(&p.tick.symbol, state.committed);
                        if owner == self.me {
                            self.apply_one(p, round, now);
                        } else {
                            let _ = self.relay.send(super::Relay::Publish(owner, Box::new(p)));
                        }
                    }
                    for (symbols, r, _) in std::mem::take(&mut self.sealed_ensures) {
                        match symbols.iter().find(|s| self.owner_under(s, state.committed) != self.me) {
                            Some(s) => {
                                let _ = r.send(Err(CommitError::Move(format!("{s} is owned by another shard; retry"))));
                            }
                            None => {
                                let res = self.ensure(&symbols, &mut round.touched);
                                round.ensures.push((r, res));
                            }
                        }
                    }
                    // The committed map says what the marks said; they stay as
                    // tombstones (recovery skips the symbol's old log sections)
                    // until the log is past their hand-over.
                    let gone: Vec<(Symbol, u64)> = self
                        .moving
                        .iter()
                        .filter_map(|(s, m)| match m {
                            MoveOut::Gone { at, .. } => Some((*s, *at)),
                            MoveOut::Holding { .. } => None,
                        })
                        .collect();
                    for (s, at) in gone {
                        self.moving.remove(&s);
                        self.pending_unmark.push((s, at));
                    }
                }
                round.moves.states.push((state, reply));
            }
            Cmd::Moves { startable, reply } => {
                let list = match self.cluster.target {
                    None => Vec::new(),
                    Some(t) => self
                        .symbols
                        .keys()
                        .filter(|s| !(startable && self.moving.contains_key(s)))
                        .map(|s| (*s, self.owner_under(s, t)))
                        .filter(|(_, to)| *to != self.me)
                        .collect(),
                };
                let _ = reply.send(list);
            }
            Cmd::Holds {
                symbol,
                epoch,
                seq,
                reply,
            } => {
                let held = self
                    .symbols
                    .get(&symbol)
                    .is_some_and(|st| st.rec.epoch == epoch && st.rec.last_seq >= seq);
                let _ = reply.send(held);
            }
            Cmd::Barrier { reply } => {
                let _ = self.relay.send(super::Relay::Barrier(reply));
            }
            Cmd::Expire => self.expire_holds(),
            Cmd::Publish(_) | Cmd::Ensure { .. } | Cmd::Compact | Cmd::Stop => {
                unreachable!("applied by Worker::apply")
            }
        }
    }

    /// The round's hand-overs in its batch.
    pub(super) fn write_moves(&mut self, round: &mut Round, batch: &mut CommitBatch) {
        for (sym, to, attempt, _) in &round.moves.exports {
            batch.put_move_mark(&MoveMark {
                symbol: *sym,
                to: *to,
                done: false,
                attempt: *attempt,
            });
        }
        for (sym, to, _) in &round.moves.releases {
            match to {
                Some(to) => {
                    self.remove_symbol_data(sym, batch);
                    batch.put_move_mark(&MoveMark {
                        symbol: *sym,
                        to: *to,
                        done: true,
                        attempt: 0,
                    });
                }
                None => batch.remove_move_mark(sym),
            }
        }
        for (imp, _) in &round.moves.imports {
            let sym = imp.record.symbol;
            self.remove_symbol_data(&sym, batch);
            batch.remove_move_mark(&sym);
            batch.put_ticks(&imp.ticks, self.store.block_ticks());
            for c in &imp.candles {
                batch.put_closed_candle(c);
            }
            if let Some(st) = self.symbols.get(&sym) {
                snapshot(batch, st);
            }
        }
        if let Some((state, _)) = round.moves.states.last() {
            batch.put_cluster_state(state, self.sealed);
        }
    }

    /// Removes every key of `sym` (blocks, candles, record, de-dup).
    fn remove_symbol_data(&self, sym: &Symbol, batch: &mut CommitBatch) {
        match self.store.symbol_keys(sym) {
            Ok(keys) => batch.remove_all_of(sym, keys),
            // (the batch still removes the record: the blocks left over are
            // unreachable and overwritten by a later import)
            Err(e) => {
                tracing::warn!(symbol = %sym, error = %e, "listing a moved symbol's keys failed");
                batch.remove_symbol(sym);
            }
        }
    }

    /// The round is durable: answer its hand-overs, and give imported
    /// symbols their hub (taking over the mirror this shard had, if any).
    pub(super) fn finish_moves(&mut self, round: &mut Round) {
        for (sym, _, attempt, reply) in round.moves.exports.drain(..) {
            let (Some(st), Some(MoveOut::Holding { since, .. })) = (self.symbols.get(&sym), self.moving.get(&sym))
            else {
                let _ = reply.send(Err(CommitError::Move(format!("{sym} went away during its export"))));
                continue;
            };
            let _ = reply.send(Ok(Exported {
                record: st.rec.clone(),
                dedup: st.dedup.iter().map(|(id, d)| (id.to_string(), *d)).collect(),
                held_since: *since,
                attempt,
            }));
        }
        self.note_holds();
        for (_, _, reply) in round.moves.releases.drain(..) {
            let _ = reply.send(());
        }
        for (imp, reply) in round.moves.imports.drain(..) {
            let sym = imp.record.symbol;
            let Some(st) = self.symbols.get_mut(&sym) else { continue };
            let hub = self.hub.get_or_insert(sym, || super::head_of(&st.rec));
            hub.take_over(st.rec.epoch, &imp.ticks, st.rec.candles);
            st.hub = Some(hub);
            metrics::counter!(m::SYMBOLS_MOVED_IN).increment(1);
            let _ = reply.send(Ok(()));
        }
        for (_, reply) in round.moves.states.drain(..) {
            let _ = reply.send(Ok(()));
        }
    }

    /// The commit failed: nothing of the round's hand-overs is durable.
    pub(super) fn fail_moves(&mut self, round: &mut Round, why: &str, e: &Arc<crate::store::StoreError>) {
        for (_, _, _, reply) in round.moves.exports.drain(..) {
            let _ = reply.send(Err(CommitError::StoreFailed(e.clone())));
        }
        round.moves.releases.clear();
        for (_, reply) in round.moves.imports.drain(..) {
            let _ = reply.send(Err(CommitError::StoreFailed(e.clone())));
        }
        for (_, reply) in round.moves.states.drain(..) {
            let _ = reply.send(Err(CommitError::StoreFailed(e.clone())));
        }
        for (_, m) in self.moving.drain() {
            if let MoveOut::Holding { parked, .. } = m {
                for p in parked {
                    p.unavailable(why.to_string());
                }
            }
        }
        for p in self.sealed_parked.drain(..) {
            p.unavailable(why.to_string());
        }
        for (_, r, _) in self.sealed_ensures.drain(..) {
            let _ = r.send(Err(CommitError::StoreFailed(e.clone())));
        }
    }
    /// Removes the marks of handed-over symbols whose old log sections are
    /// all gone (records before `floor` are removed in this batch).
    pub(super) fn unmark_behind(&mut self, floor: u64, batch: &mut CommitBatch) {
        if self.pending_unmark.is_empty() {
            return;
        }
        self.pending_unmark.retain(|(sym, at)| {
            let done = *at < floor;
            if done {
                batch.remove_move_mark(sym);
            }
            !done
        });
    }

    /// Answers publishes that waited longer than [`HOLD_LIMIT`] for a
    /// hand-over or a sealed rebalance as UNAVAILABLE (and, while such a
    /// hand-over is not settled, the next ones at once).
    fn expire_holds(&mut self) {
        let why = |s: &Symbol| format!("{s} is moving to another shard; retry");
        for (sym, m) in &mut self.moving {
            if let MoveOut::Holding {
                parked,
                since,
                refusing,
                ..
            } = m
                && since.elapsed() >= HOLD_LIMIT
            {
                *refusing = true;
                for p in parked.drain(..) {
                    p.unavailable(why(sym));
                }
            }
        }
        // All together once the oldest has waited its limit, and the next
        // ones at once (`sealed_refusing`): refused one by one, a later
        // request of a refused pair could stay held, and be applied after
        // a rollback past its hole (its pair's resend then a duplicate).
        if self.sealed_parked.iter().any(|p| p.received.elapsed() >= HOLD_LIMIT) {
            self.sealed_refusing = true;
            for p in std::mem::take(&mut self.sealed_parked) {
                let sym = p.tick.symbol;
                p.unavailable(format!("{sym} waits for a rebalance to commit; retry"));
            }
        }
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sealed_ensures)
            .into_iter()
            .partition(|(_, _, since)| since.elapsed() >= HOLD_LIMIT);
        self.sealed_ensures = keep;
        for (_, r, _) in old {
            let _ = r.send(Err(CommitError::Move(
                "a new symbol waits for a rebalance to commit; retry".into(),
            )));
        }
        self.note_holds();
    }

    /// Tells the node whether anything waits here (it then asks for
    /// [`Cmd::Expire`] ten times a second).
    pub(super) fn note_holds(&self) {
        let any = !self.sealed_parked.is_empty()
            || !self.sealed_ensures.is_empty()
            || self
                .moving
                .values()
                .any(|m| matches!(m, MoveOut::Holding { refusing: false, .. }));
        self.holding.store(any, std::sync::atomic::Ordering::Relaxed);
    }
}
