//! The group-commit thread: the only writer of ticks, symbol state and de-dup
//! state.
//!
//! Loop: take every queued command (up to [`MAX_BATCH`]), assign `seq`s,
//! de-duplicate, fold candles, write one atomic batch (one *log record* with
//! every touched symbol's ticks and changed de-dup states, closed candles,
//! records of new symbols), `flush` once, then queue the batch to the hub's
//! subscribers, ack every request in it and only then hand the subscribers'
//! wake-ups to the [`waker`] thread (an ack never waits for the fan-out, and
//! the next commit never waits for the wake-ups). While a flush runs, new
//! requests queue up, so batches grow with load by themselves.
//!
//! Each commit also *compacts* a few symbols ([`COMPACT_PER_COMMIT`], or a
//! [`LOG_SPAN`]th of the symbols in the log if more, picked by
//! [`Worker::pick_compactions`]): their logged ticks become per-symbol tick
//! blocks and their state is snapshotted, in the same atomic batch, and log
//! records no symbol needs any more are removed. A commit thus writes one log
//! key plus a few per-symbol keys, whatever the number of symbols touched
//! (writing one block and one state key per touched symbol per commit, as
//! format 2 did, made sled's per-key cost the bottleneck). Until a symbol is
//! compacted, its ticks are held in memory ([`held`]) for compaction and
//! for readers: what the store needs never depends on the fan-out.
//!
//! On start the committer folds the log (and, for a format 2 directory, the
//! tick blocks after each snapshot) into the state with the same code that
//! applies a live publish ([`SymState::fold`]), so recovered state is exactly
//! the state that was acked, and compacts it before serving.
//!
//! It runs on its own OS thread: sled calls block, and must never stall the
//! async runtime.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

mod held;
mod moves;
mod recovery;
mod waker;

pub use held::{Held, Recent, SymbolHeld};
use moves::MoveOut;
pub use moves::{Exported, Imported, MovePart, Relay, Setup};

use crate::{
    domain::{Candle, CandleAgg, CandleEffect, Epoch, ErrorCode, InputError, Interval, Symbol, Tick, now_micros},
    hub::{Chunk, Head, Hub, SymbolHub, Wakes},
    metrics as m,
    store::{CommitBatch, DedupState, Store, SymbolDedup, SymbolRecord},
};

/// Most commands folded into one group commit.
pub const MAX_BATCH: usize = 16_384;
/// Capacity of the command queue in front of the committer: publishers wait
/// (backpressure) when it is full.
pub const QUEUE_CAPACITY: usize = 65_536;
/// A `(publisher_id, symbol)` de-dup state is forgotten this long after its
/// last accepted publish (a retry older than that would be stored again).
pub const DEDUP_HORIZON: Duration = Duration::from_secs(7 * 86_400);
/// Most publishers whose de-dup state one symbol keeps: past it, an eighth
/// is forgotten (as after [`DEDUP_HORIZON`]), so a client that makes up a
/// new `publisher_id` per request grows nothing without bound (a snapshot
/// rewrites all of a symbol's states). The callers holding the most states
/// give up their least recent ones ([`forget_least_recent`]): one caller's
/// new ids cannot push another's states out.
pub const MAX_PUBLISHERS_PER_SYMBOL: usize = 1_024;
/// A symbol is compacted once this many of its commits are in the log (or a
/// block's worth of ticks).
pub const COMPACT_AFTER: usize = 32;
/// Fewest symbols compacted per commit (so compaction costs every commit a
/// little instead of some commits a lot); more when many symbols are in the
/// log (see `Pick::Due`).
pub const COMPACT_PER_COMMIT: usize = 4;
/// Most symbols compacted in a commit that retention asked for.
pub const COMPACT_ASKED_PER_COMMIT: usize = 256;
/// A symbol holding the log back this many records is compacted: start-up
/// folds at most about this many log records.
pub const LOG_SPAN: u64 = 256;

/// The committer's limits (contract §5, §6), from the configuration.
#[derive(Clone, Debug)]
pub struct CommitterConfig {
    /// Most symbols this shard holds: creating one more is refused with
    /// `symbol_limit`.
    pub max_symbols: usize,
    /// A tick whose `ts` is further ahead of this shard's clock is
    /// `invalid_tick` (`None`: no check).
    pub max_future: Option<Duration>,
    /// A symbol created by a subscribe that never received a tick is
    /// forgotten once it is this old and has no subscriber (checked at each
    /// retention pass; one still subscribed is looked at again this long
    /// later).
    pub forget_unticked_after: Duration,
}

impl Default for CommitterConfig {
    fn default() -> Self {
        CommitterConfig {
            max_symbols: 100_000,
            max_future: Some(Duration::from_secs(300)),
            forget_unticked_after: Duration::from_secs(3_600),
        }
    }
}

/// Where acks go: one channel per publish stream, carrying the stream's acks of
/// one group commit together (one send per stream per commit, not per tick).
/// Unbounded because the stream bounds its in-flight requests itself.
///
/// It also keeps the stream's *order* (contract §5): once one request of a
/// `(publisher_id, symbol)` pair was refused as UNAVAILABLE, every later one
/// of that pair on the stream is refused too, so that none is ever accepted
/// past a hole (the publisher's in-order resend would be de-duplicated away).
#[derive(Clone)]
pub struct AckTx {
    id: u64,
    tx: mpsc::UnboundedSender<Vec<Ack>>,
    order: Arc<StreamOrder>,
    /// Acks sent so far (the stream compares it with the answers its
    /// client took: see `publish::PodBudget`).
    sent: Arc<AtomicU64>,
}

/// Most `(publisher_id, symbol)` pairs one client's stream remembers as
/// refused (see [`AckTx`]); past it the stream is ended ([`AckTx::is_full`]).
pub const MAX_BROKEN_PAIRS: usize = 4_096;
/// The same for a peer's Forward stream, which carries the publishes of
/// every client of that pod (a rebalance refuses each moving symbol's
/// pairs for a moment): ending it restarts the link's forwards.
pub const MAX_BROKEN_PAIRS_PEER: usize = 65_536;

/// The pairs of one stream that have had a request refused as UNAVAILABLE.
struct StreamOrder {
    /// Fast path: nothing was ever refused on this stream.
    any: AtomicBool,
    /// A std mutex, never held across an await. Per pair, the lowest
    /// `publisher_seq` refused: a resend from it (or earlier) fills the hole.
    /// At most `limit`.
    broken: std::sync::Mutex<HashMap<(Arc<str>, Symbol), u64>>,
    /// [`MAX_BROKEN_PAIRS`] or [`MAX_BROKEN_PAIRS_PEER`].
    limit: usize,
    /// A refused pair did not fit in `broken`: nothing more is accepted on
    /// this stream, and it ends (the publisher resends on a new one).
    full: AtomicBool,
}

impl AckTx {
    /// A client's stream.
    pub fn new() -> (AckTx, mpsc::UnboundedReceiver<Vec<Ack>>) {
        AckTx::remembering(MAX_BROKEN_PAIRS)
    }

    /// A peer's Forward stream.
    pub fn for_peer() -> (AckTx, mpsc::UnboundedReceiver<Vec<Ack>>) {
        AckTx::remembering(MAX_BROKEN_PAIRS_PEER)
    }

    fn remembering(limit: usize) -> (AckTx, mpsc::UnboundedReceiver<Vec<Ack>>) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let order = StreamOrder {
            any: AtomicBool::new(false),
            broken: std::sync::Mutex::default(),
            limit,
            full: AtomicBool::new(false),
        };
        (
            AckTx {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                tx,
                order: Arc::new(order),
                sent: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// Sends acks that did not come from a group commit (forwarded, failed).
    /// An UNAVAILABLE ack must go through [`PublishCmd::unavailable`] or
    /// [`AckTx::unavailable`] instead, which keep the stream's order.
    pub fn send(&self, acks: Vec<Ack>) -> Result<(), Vec<Ack>> {
        self.sent.fetch_add(acks.len() as u64, Ordering::Relaxed);
        self.tx.send(acks).map_err(|e| e.0)
    }

    /// Acks sent on this stream so far.
    pub fn sent(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// True if an earlier request of `(publisher, symbol)` on this stream was
    /// refused as UNAVAILABLE and this one comes after it (a later
    /// `publisher_seq`): it must be refused too. The publisher's resend from
    /// the refused request (its `publisher_seq` or an earlier one) fills the
    /// hole: from it on the pair is accepted again, in order. (A peer's
    /// long-lived Forward stream carries many clients' retries: without
    /// this, one refusal would close a pair on it until the link breaks.)
    pub fn is_broken(&self, publisher: Option<(&Arc<str>, u64)>, symbol: Symbol) -> bool {
        let Some((p, pseq)) = publisher else { return false };
        if !self.order.any.load(Ordering::Acquire) {
            return false;
        }
        if self.is_full() {
            return true;
        }
        let mut broken = self.order.broken.lock().unwrap_or_else(|e| e.into_inner());
        let key = (p.clone(), symbol);
        match broken.get(&key) {
            Some(&first) if pseq > first => true,
            Some(_) => {
                broken.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Whether an earlier request of `(publisher, symbol)` was refused on
    /// this stream and not yet resent (see [`AckTx::is_broken`], which
    /// also fills the hole on a resend; this never changes anything).
    pub fn is_past_a_hole(&self, publisher: &Arc<str>, pseq: u64, symbol: Symbol) -> bool {
        if !self.order.any.load(Ordering::Acquire) {
            return false;
        }
        if self.is_full() {
            return true;
        }
        let broken = self.order.broken.lock().unwrap_or_else(|e| e.into_inner());
        broken
            .get(&(publisher.clone(), symbol))
            .is_some_and(|&first| pseq > first)
    }

    /// More pairs were refused on this stream than it remembers: it must
    /// end (its publisher resends the unacked requests on a new stream, in
    /// order); until then nothing more with a `publisher_id` is accepted.
    pub fn is_full(&self) -> bool {
        self.order.full.load(Ordering::Acquire)
    }

    /// Refuses one request as UNAVAILABLE: first marks its pair broken on this
    /// stream (so no later request of the pair can be accepted), then acks.
    pub fn unavailable(&self, publisher: Option<(&Arc<str>, u64)>, request_id: u64, symbol: Symbol, why: String) {
        if let Some((p, pseq)) = publisher {
            let mut broken = self.order.broken.lock().unwrap_or_else(|e| e.into_inner());
            let key = (p.clone(), symbol);
            let room = broken.len() < self.order.limit;
            match broken.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let first = e.get_mut();
                    *first = (*first).min(pseq);
                }
                std::collections::hash_map::Entry::Vacant(e) if room => {
                    e.insert(pseq);
                }
                // (a request per new publisher_id during an outage must not
                // grow this without bound: the stream ends instead)
                std::collections::hash_map::Entry::Vacant(_) => self.order.full.store(true, Ordering::Release),
            }
            self.order.any.store(true, Ordering::Release);
        }
        let _ = self.send(vec![Ack {
            request_id,
            symbol,
            result: Err(AckError::Unavailable(why)),
        }]);
    }
}

pub struct PublishCmd {
    /// Validated, `seq` still 0.
    pub tick: Tick,
    /// `(publisher_id, publisher_seq)`; `None` disables de-dup (the simulator).
    pub publisher: Option<(Arc<str>, u64)>,
    pub request_id: u64,
    pub reply: AckTx,
    pub received: Instant,
}

impl PublishCmd {
    pub fn publisher_id(&self) -> Option<&Arc<str>> {
        self.publisher.as_ref().map(|(p, _)| p)
    }

    /// True if this request must be refused to keep its stream's order.
    pub fn is_behind_a_hole(&self) -> bool {
        let publisher = self.publisher.as_ref().map(|(p, s)| (p, *s));
        self.reply.is_broken(publisher, self.tick.symbol)
    }

    /// The same check without its side effect (a resend read at the
    /// stream's edge fills the hole there; a request applied later, maybe
    /// one read before the refusal, must not): for the committer.
    pub fn is_past_a_hole(&self) -> bool {
        let Some((p, pseq)) = &self.publisher else { return false };
        self.reply.is_past_a_hole(p, *pseq, self.tick.symbol)
    }

    /// Refuses this request as UNAVAILABLE (retryable), keeping its stream's
    /// order (see [`AckTx`]).
    pub fn unavailable(self, why: String) {
        self.reply.unavailable(
            self.publisher.as_ref().map(|(p, s)| (p, *s)),
            self.request_id,
            self.tick.symbol,
            why,
        );
    }
}

pub enum Cmd {
    Publish(PublishCmd),
    /// Creates (durably) the epoch of symbols without ticks.
    Ensure {
        symbols: Vec<Symbol>,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    /// Compacts every symbol with ticks in the log (up to
    /// [`COMPACT_ASKED_PER_COMMIT`]) in the next commit: retention asks, so
    /// that idle symbols' ticks reach the blocks it prunes. Also forgets
    /// symbols that never had a tick and have had no subscriber for
    /// [`CommitterConfig::forget_unticked_after`].
    Compact,
    /// Commits everything queued before it, flushes and ends the thread.
    Stop,
    /// Elastic shards (contract §9, see [`moves`]): start handing `symbol`
    /// over to shard `to`. From here on its publishes are held; the answer
    /// (its state, all its ticks in blocks) comes once the hold is durable.
    Export {
        symbol: Symbol,
        to: u32,
        attempt: u64,
        reply: oneshot::Sender<Result<Exported, CommitError>>,
    },
    /// Ends a hand-over: `moved` (the new owner holds the symbol: this
    /// shard's copy goes, held publishes are relayed to it) or not (rolled
    /// back: held publishes are applied here, in order).
    Release {
        symbol: Symbol,
        moved: bool,
        reply: oneshot::Sender<()>,
    },
    /// Takes over a symbol handed over by its old owner.
    Import {
        state: Box<Imported>,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    /// Adopts a cluster state (durable with this commit). `seal`: new
    /// symbols whose owner changes under the target are held, not created.
    SetState {
        state: crate::placement::ClusterState,
        seal: bool,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    /// The symbols held here whose owner under the target is another shard
    /// (`startable`: only those no hand-over holds now, e.g. one whose
    /// outcome is still being settled after a restart).
    Moves {
        startable: bool,
        reply: oneshot::Sender<Vec<(Symbol, u32)>>,
    },
    /// Whether this shard holds `symbol` at `epoch` with a head at `seq` or later.
    Holds {
        symbol: Symbol,
        epoch: Epoch,
        seq: u64,
        reply: oneshot::Sender<bool>,
    },
    /// Answered (through the relay) once every relay before it was sent.
    Barrier {
        reply: oneshot::Sender<()>,
    },
    /// Answers publishes held longer than [`moves::HOLD_LIMIT`] as UNAVAILABLE.
    Expire,
}

#[derive(Clone, Debug)]
pub struct Ack {
    pub request_id: u64,
    pub symbol: Symbol,
    pub result: Result<Accepted, AckError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    pub epoch: Epoch,
    pub duplicate: bool,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum AckError {
    #[error(transparent)]
    Input(#[from] InputError),
    /// Rejected with a contract code (`symbol_limit`, or a forwarded
    /// publish's rejection by the owner shard).
    #[error("{message}")]
    Rejected {
        code: crate::domain::ErrorCode,
        message: String,
    },
    /// Retryable: the owner could not make the tick durable or is unreachable.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("recovering the shard state: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("recovering the shard state: the log holds {0} ticks of {1} from seq {2}, expected seq {3}")]
    Log(usize, Symbol, u64, u64),
    #[error("starting the committer thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum CommitError {
    /// A group commit failed: the shard stopped accepting writes (the
    /// failure, shared by every request it refuses).
    #[error("the shard store failed and stopped accepting writes: {0}")]
    StoreFailed(Arc<crate::store::StoreError>),
    #[error("the committer has stopped")]
    Stopped,
    #[error("symbol {0} is not owned by shard {1} (the cluster configuration disagrees)")]
    NotOwner(String, u32),
    #[error("this shard holds its limit of {0} symbols (--max-symbols); refusing to create another")]
    SymbolLimit(usize),
    /// A hand-over the committer cannot do (the symbol is not here, or is
    /// already moving).
    #[error("{0}")]
    Move(String),
}

/// The committer's handle: cheap to clone, used by every publisher.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Cmd>,
    failed: Failure,
    held: Arc<Held>,
    /// Publishes wait in the committer for a hand-over or a sealed rebalance.
    holding: Arc<AtomicBool>,
}

/// Set once, by the worker, when a group commit fails.
type Failure = Arc<std::sync::OnceLock<Arc<crate::store::StoreError>>>;

impl Committer {
    /// Starts the committer thread on `store`, publishing to `hub`, from the
    /// durable state loaded from the store.
    pub fn start(
        store: Arc<Store>,
        hub: Arc<Hub>,
        records: Vec<SymbolRecord>,
        dedup: Vec<SymbolDedup>,
        cfg: CommitterConfig,
        setup: Setup,
    ) -> Result<(Committer, thread::JoinHandle<()>), StartError> {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let failed = Failure::default();
        let gone: HashSet<Symbol> = setup.marks.iter().filter(|m| m.done).map(|m| m.symbol).collect();
        let recovery::Recovered {
            mut symbols,
            next_commit,
        } = recovery::recover(&store, records, dedup, &gone)?;
        // Marks of symbols handed over: while the rebalance runs they route
        // (relay); once it committed they are tombstones only (recovery
        // compacted the log: they go with the first commit). Undone holds
        // wait for the node to settle them.
        let mut moving = HashMap::new();
        let mut pending_unmark = Vec::new();
        for m in &setup.marks {
            match (m.done, setup.state.target) {
                (true, Some(_)) => {
                    moving.insert(m.symbol, MoveOut::Gone { to: m.to, at: 0 });
                }
                (true, None) => pending_unmark.push((m.symbol, 0)),
                (false, _) => {
                    moving.insert(
                        m.symbol,
                        MoveOut::Holding {
                            to: m.to,
                            parked: Vec::new(),
                            since: Instant::now(),
                            refusing: false,
                        },
                    );
                }
            }
        }
        let holding = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut unticked = VecDeque::new();
        let held = Arc::new(Held::default());
        for st in symbols.values_mut() {
            st.held = held.entry(st.rec.symbol);
            st.hub = Some(hub.get_or_insert(st.rec.symbol, || head_of(&st.rec)));
            if st.rec.last_seq == 0 {
                // Created by a subscribe before the restart: its hour starts now.
                unticked.push_back((started, st.rec.symbol));
            }
        }
        metrics::gauge!(m::OWNED_SYMBOLS).set(symbols.len() as f64);
        let waker = waker::Waker::start().map_err(StartError::Thread)?;
        let mut worker = Worker {
            store,
            hub,
            held: held.clone(),
            symbols,
            failed: failed.clone(),
            next_commit,
            log_floor: next_commit,
            log_refs: BTreeMap::new(),
            unticked,
            cfg,
            me: setup.me,
            cluster: setup.state,
            sealed: setup.sealed && setup.state.target.is_some(),
            moving,
            pending_unmark,
            holding: holding.clone(),
            sealed_parked: Vec::new(),
            sealed_refusing: false,
            sealed_ensures: Vec::new(),
            relay: setup.relay,
            waker,
        };
        let join = thread::Builder::new()
            .name("tickshard-commit".into())
            .spawn(move || worker.run(rx))
            .map_err(StartError::Thread)?;
        Ok((
            Committer {
                tx,
                failed,
                held,
                holding,
            },
            join,
        ))
    }

    /// Queues a publish; waits only if the queue is full (backpressure). A
    /// publish that cannot be queued is answered UNAVAILABLE (and the error
    /// returned): no request is ever dropped without an answer.
    pub async fn publish(&self, cmd: PublishCmd) -> Result<(), CommitError> {
        let (cmd, err) = if let Some(e) = self.failed.get() {
            (cmd, CommitError::StoreFailed(e.clone()))
        } else {
            match self.tx.send(Cmd::Publish(cmd)).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(Cmd::Publish(cmd))) => (cmd, CommitError::Stopped),
                Err(_) => return Err(CommitError::Stopped), // (it was a Publish)
            }
        };
        cmd.unavailable(err.to_string());
        Err(err)
    }

    /// Makes sure `symbols` have a durable epoch.
    pub async fn ensure(&self, symbols: Vec<Symbol>) -> Result<(), CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Ensure { symbols, reply })
            .await
            .map_err(|_| CommitError::Stopped)?;
        rx.await.map_err(|_| CommitError::Stopped)?
    }

    /// Sends a command that answers on a oneshot, and waits for the answer.
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, CommitError> {
        if let Some(e) = self.failed.get() {
            return Err(CommitError::StoreFailed(e.clone()));
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(cmd(reply)).await.map_err(|_| CommitError::Stopped)?;
        rx.await.map_err(|_| CommitError::Stopped)
    }

    /// See [`Cmd::Export`].
    pub async fn export(&self, symbol: Symbol, to: u32, attempt: u64) -> Result<Exported, CommitError> {
        self.ask(|reply| Cmd::Export {
            symbol,
            to,
            attempt,
            reply,
        })
        .await?
    }

    /// While publishes wait here (a hand-over, a sealed rebalance), asks
    /// for [`Cmd::Expire`] (called ten times a second).
    pub fn expire_holds(&self) {
        if self.holding.load(Ordering::Relaxed) {
            let _ = self.tx.try_send(Cmd::Expire);
        }
    }

    /// See [`Cmd::Release`].
    pub async fn release(&self, symbol: Symbol, moved: bool) -> Result<(), CommitError> {
        self.ask(|reply| Cmd::Release { symbol, moved, reply }).await
    }

    /// See [`Cmd::Import`].
    pub async fn import(&self, state: Imported) -> Result<(), CommitError> {
        let state = Box::new(state);
        self.ask(|reply| Cmd::Import { state, reply }).await?
    }

    /// See [`Cmd::SetState`].
    pub async fn set_state(&self, state: crate::placement::ClusterState, seal: bool) -> Result<(), CommitError> {
        self.ask(|reply| Cmd::SetState { state, seal, reply }).await?
    }

    /// See [`Cmd::Moves`]: every move left (what `admin status` shows).
    pub async fn moves(&self) -> Result<Vec<(Symbol, u32)>, CommitError> {
        self.ask(|reply| Cmd::Moves {
            startable: false,
            reply,
        })
        .await
    }

    /// See [`Cmd::Moves`]: the moves a mover may start now (not one held
    /// by a hand-over whose outcome is pending: trying it again would
    /// stream its whole history only to be refused at the hold).
    pub async fn startable_moves(&self) -> Result<Vec<(Symbol, u32)>, CommitError> {
        self.ask(|reply| Cmd::Moves { startable: true, reply }).await
    }

    /// See [`Cmd::Holds`].
    pub async fn holds(&self, symbol: Symbol, epoch: Epoch, seq: u64) -> Result<bool, CommitError> {
        self.ask(|reply| Cmd::Holds {
            symbol,
            epoch,
            seq,
            reply,
        })
        .await
    }

    /// See [`Cmd::Barrier`].
    pub async fn barrier(&self) -> Result<(), CommitError> {
        let rx = self.ask(|reply| Cmd::Barrier { reply }).await;
        rx.map(|_| ())
    }

    /// Asks for a compaction of the log after the next commit, if the queue
    /// has room (retention asks again on its next pass otherwise).
    pub fn request_compaction(&self) {
        let _ = self.tx.try_send(Cmd::Compact);
    }

    /// Commits everything queued so far, flushes, and stops the thread. Publishes
    /// sent after this fail with [`CommitError::Stopped`].
    pub async fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop).await;
    }

    /// The ticks of `symbol` that are durable in the log but not yet in
    /// tick blocks (see [`held`]).
    pub fn held(&self, symbol: &Symbol) -> Option<Arc<SymbolHeld>> {
        self.held.get(symbol)
    }

    /// True once a store failure stopped the committer.
    pub fn has_failed(&self) -> bool {
        self.failed.get().is_some()
    }
}

fn head_of(rec: &SymbolRecord) -> Head {
    Head {
        epoch: rec.epoch,
        seq: rec.last_seq,
        last: rec.last,
        candles: rec.candles,
    }
}

/// Adds `st`'s state snapshot (record and every de-dup state) to `batch`.
fn snapshot(batch: &mut CommitBatch, st: &SymState) {
    batch.put_symbol(&st.rec);
    batch.put_dedup(&st.rec.symbol, st.dedup.iter().map(|(id, d)| (&**id, d)));
}

/// Which symbols a commit compacts.
#[derive(Clone, Copy)]
enum Pick {
    /// At most [`COMPACT_PER_COMMIT`], or the symbols in the log over
    /// [`LOG_SPAN`] if more: touched symbols with a block's worth of
    /// uncompacted ticks or [`COMPACT_AFTER`] commits of them, and those
    /// holding the log back `LOG_SPAN` records.
    Due,
    /// Every symbol with uncompacted ticks, up to this many (stop: all;
    /// retention: [`COMPACT_ASKED_PER_COMMIT`]).
    Everything(usize),
}

/// `sym` no longer needs log record `from` (it was compacted).
fn unref(refs: &mut BTreeMap<u64, HashSet<Symbol>>, from: u64, sym: &Symbol) {
    if let Some(set) = refs.get_mut(&from) {
        set.remove(sym);
        if set.is_empty() {
            refs.remove(&from);
        }
    }
}

struct SymState {
    rec: SymbolRecord,
    aggs: [CandleAgg; 3],
    /// Every publisher's de-dup state for this symbol (all in memory: the
    /// horizon bounds it).
    dedup: HashMap<Arc<str>, DedupState>,
    /// Created after the symbol's first commit is durable.
    hub: Option<Arc<SymbolHub>>,
    /// The chunks committed since the symbol's last compaction: in the log,
    /// not yet in tick blocks (shared with readers).
    held: Arc<SymbolHeld>,
    /// How many chunks and ticks `held` has (kept here: compaction picks by
    /// them every commit without taking its lock).
    uncompacted_chunks: usize,
    uncompacted_ticks: usize,
    /// The oldest log record holding ticks of this symbol that no snapshot
    /// covers yet.
    log_from: Option<u64>,
    // per-batch scratch
    touched: bool,
    /// Created in this batch: its (empty) record goes into the commit, so the
    /// epoch is durable and the log can be folded onto it.
    created: bool,
    /// Compacted in this batch.
    compacted: bool,
    /// Publishers whose de-dup state this batch changed (a set: a batch may
    /// carry many publishers of one symbol).
    dedup_changed: std::collections::HashSet<Arc<str>>,
    ticks: Vec<Tick>,
    closed: Vec<Candle>,
}

impl SymState {
    fn new(rec: SymbolRecord) -> SymState {
        let aggs = rec.candles.map(|current| CandleAgg { current });
        SymState {
            rec,
            aggs,
            dedup: HashMap::new(),
            hub: None,
            held: Arc::default(),
            uncompacted_chunks: 0,
            uncompacted_ticks: 0,
            log_from: None,
            touched: false,
            created: false,
            compacted: false,
            dedup_changed: std::collections::HashSet::new(),
            ticks: Vec::new(),
            closed: Vec::new(),
        }
    }

    /// Appends `tick` (its seq already assigned) to the symbol's state: last
    /// tick, seq, candles (closing ones go to `closed`). Returns whether it was
    /// late for the 1s candle. Used for live publishes and for recovery alike.
    fn fold(&mut self, tick: Tick) -> bool {
        let mut late = false;
        for i in Interval::ALL {
            match self.aggs[i.index()].apply(i, &tick) {
                CandleEffect::Updated => {}
                CandleEffect::Rolled { closed } => self.closed.push(closed),
                // Late for 1s covers late for the coarser intervals.
                CandleEffect::Late => late |= i == Interval::S1,
            }
        }
        self.rec.last_seq = tick.seq;
        self.rec.last = Some(tick);
        self.rec.candles = self.aggs.map(|a| a.current);
        self.ticks.push(tick);
        late
    }
}

struct Worker {
    store: Arc<Store>,
    hub: Arc<Hub>,
    held: Arc<Held>,
    symbols: HashMap<Symbol, SymState>,
    failed: Failure,
    /// The number of the next log record.
    next_commit: u64,
    /// The oldest log record not removed yet.
    log_floor: u64,
    /// The symbols with each `log_from`: the first key is the oldest log
    /// record still needed, and every symbol with uncompacted ticks is here.
    log_refs: BTreeMap<u64, HashSet<Symbol>>,
    /// Symbols without ticks, oldest creation first (checked for forgetting).
    unticked: VecDeque<(Instant, Symbol)>,
    cfg: CommitterConfig,
    /// This shard's id and the cluster's layout (contract §9).
    me: u32,
    cluster: crate::placement::ClusterState,
    /// The last phase of a rebalance: new symbols that will belong to another
    /// shard are not created here.
    sealed: bool,
    /// Symbols being handed over, or handed over (see [`moves`]).
    moving: HashMap<Symbol, MoveOut>,
    /// Publishes and ensures of new symbols held while sealed.
    sealed_parked: Vec<PublishCmd>,
    /// The held publishes waited too long and were refused, all together:
    /// further ones are refused at once until the state changes (as a
    /// hand-over's hold does), so that no request of a refused pair is
    /// held past the refusal and applied later, past its hole.
    sealed_refusing: bool,
    sealed_ensures: Vec<(Vec<Symbol>, EnsureReply, Instant)>,
    /// Publishes for symbols handed over go to their new owner through here.
    relay: mpsc::UnboundedSender<Relay>,
    /// Marks of handed-over symbols to remove once the log is past the
    /// commit of their hand-over (see `moves`).
    pending_unmark: Vec<(Symbol, u64)>,
    /// Shared with [`Committer::expire_holds`].
    holding: Arc<AtomicBool>,
    /// Wakes the subscribers' writers after each commit, off this thread.
    waker: waker::Waker,
}

#[derive(Default)]
struct Counts {
    ticks: u64,
    duplicates: u64,
    late: u64,
}

/// An ack to send once the batch is durable.
struct Pending {
    reply: AckTx,
    /// `(publisher_id, publisher_seq)`.
    publisher: Option<(Arc<str>, u64)>,
    ack: Ack,
    received: Instant,
}

type EnsureReply = oneshot::Sender<Result<(), CommitError>>;

/// One group commit's working state; the vectors are reused from round to
/// round (their capacity is the committer's steady state, not a per-commit
/// allocation), except `wakes`, handed to the waker with each commit that has
/// writers to wake.
#[derive(Default)]
struct Round {
    cmds: Vec<Cmd>,
    acks: Vec<Pending>,
    /// Ensure requests and their outcomes, answered after the commit.
    ensures: Vec<(EnsureReply, Result<(), CommitError>)>,
    /// Symbols this round changed, in first-touch order.
    touched: Vec<Symbol>,
    /// Symbols this round compacts.
    compacting: Vec<Symbol>,
    counts: Counts,
    /// `Cmd::Compact` came: compact what retention needs, forget old
    /// never-ticked symbols.
    compact: bool,
    /// `Cmd::Stop` came: compact everything, then end.
    stop: bool,
    by_stream: HashMap<u64, (AckTx, Vec<Ack>)>,
    per_stream: HashMap<u64, usize>,
    /// Hand-overs of this round (see [`moves`]).
    moves: moves::RoundMoves,
    /// Subscribers' writers to wake once the round is acked.
    wakes: Wakes,
}

/// The committer's metrics, resolved once.
struct Meters {
    accepted: metrics::Counter,
    duplicates: metrics::Counter,
    late: metrics::Counter,
    flush: metrics::Histogram,
    batch: metrics::Histogram,
    compactions: metrics::Counter,
    owned: metrics::Gauge,
    log_bytes: metrics::Counter,
    block_bytes: metrics::Counter,
}

impl Meters {
    fn new() -> Meters {
        Meters {
            accepted: metrics::counter!(m::TICKS_ACCEPTED),
            duplicates: metrics::counter!(m::TICKS_DUPLICATE),
            late: metrics::counter!(m::LATE_TICKS),
            flush: metrics::histogram!(m::FLUSH_LATENCY),
            batch: metrics::histogram!(m::COMMIT_BATCH),
            compactions: metrics::counter!(m::COMPACTIONS),
            owned: metrics::gauge!(m::OWNED_SYMBOLS),
            log_bytes: metrics::counter!(m::STORE_WRITTEN, "kind" => "log"),
            block_bytes: metrics::counter!(m::STORE_WRITTEN, "kind" => "blocks"),
        }
    }
}

impl Worker {
    /// Serves commands until `Stop` (which compacts everything), until every
    /// handle is dropped, or until the store fails. Each round is one group
    /// commit, in stages: collect → apply → build the batch → commit →
    /// publish → ack.
    fn run(&mut self, mut rx: mpsc::Receiver<Cmd>) {
        let meters = Meters::new();
        let mut round = Round {
            cmds: Vec::with_capacity(MAX_BATCH),
            acks: Vec::with_capacity(MAX_BATCH),
            ..Round::default()
        };
        while collect(&mut rx, &mut round.cmds) {
            let now = now_micros();
            self.apply(&mut round, now);
            let batch = self.build_batch(&mut round, now);
            let written = batch.written();
            match self.store.commit(batch) {
                Ok(flush) => {
                    meters.flush.record(flush.as_secs_f64());
                    meters.log_bytes.increment(written.log);
                    meters.block_bytes.increment(written.blocks);
                }
                Err(e) => {
                    self.fail(e, &mut round, &mut rx);
                    return;
                }
            }
            self.publish(&mut round, &meters);
            self.finish_moves(&mut round);
            // Durable, readable (held chunks, hub heads), queued to every
            // subscriber: ack first, then wake the subscribers' writers (on
            // the waker thread), so an ack never waits for the fan-out.
            ack(&mut round);
            self.waker.wake(&mut round.wakes);
            if round.stop {
                tracing::debug!("committer stopped");
                return;
            }
        }
        // Every handle was dropped without `stop`: everything acked is durable
        // in the log; recovery folds it, as after a crash.
        tracing::debug!("committer stopped without a final compaction");
    }

    /// Applies the round's commands in order: publishes (de-dup, seq,
    /// candles), ensures, and the compaction and stop requests.
    fn apply(&mut self, round: &mut Round, now: i64) {
        round.counts = Counts::default();
        round.compact = false;
        let mut cmds = std::mem::take(&mut round.cmds);
        for cmd in cmds.drain(..) {
            match cmd {
                Cmd::Publish(p) => {
                    if let Some(p) = self.divert(p) {
                        self.apply_one(p, round, now);
                    }
                }
                Cmd::Ensure { symbols, reply } => {
                    if let Some((symbols, reply)) = self.divert_ensure(symbols, reply) {
                        let r = self.ensure(&symbols, &mut round.touched);
                        round.ensures.push((reply, r));
                    }
                }
                Cmd::Compact => round.compact = true,
                Cmd::Stop => round.stop = true,
                other => self.apply_move(other, round, now),
            }
        }
        round.cmds = cmds; // (its capacity, for the next round)
    }

    /// Applies one publish and queues its ack.
    fn apply_one(&mut self, p: PublishCmd, round: &mut Round, now: i64) {
        if p.is_past_a_hole() {
            // An earlier request of its pair was refused after this one was
            // read (both parked by a hold or a sealed rebalance, the earlier
            // one expired first): never accepted past the hole (contract §5).
            p.unavailable(
                "an earlier request of this publisher_id and symbol was refused; resend from it on a new stream".into(),
            );
            return;
        }
        let result = self.apply_publish(&p, now, &mut round.touched, &mut round.counts);
        round.acks.push(Pending {
            publisher: p.publisher,
            reply: p.reply,
            ack: Ack {
                request_id: p.request_id,
                symbol: p.tick.symbol,
                result,
            },
            received: p.received,
        });
    }

    /// The round's one atomic batch: forgotten symbols removed, a few
    /// symbols compacted (their held and new ticks as tick blocks, a
    /// snapshot of their state), one log record with every other touched
    /// symbol's new ticks and changed de-dup states, the log records no
    /// symbol needs any more removed, closed candles, records of new symbols.
    fn build_batch(&mut self, round: &mut Round, now: i64) -> CommitBatch {
        let mut batch = CommitBatch::default();
        if round.compact {
            self.forget_unticked(&mut batch);
        }
        let commit = self.next_commit;
        let pick = if round.stop {
            Pick::Everything(usize::MAX)
        } else if round.compact {
            Pick::Everything(COMPACT_ASKED_PER_COMMIT)
        } else {
            Pick::Due
        };
        round.compacting = self.pick_compactions(commit, &round.touched, pick);
        for (sym, _, _, _) in &round.moves.exports {
            if !round.compacting.contains(sym) {
                round.compacting.push(*sym);
            }
        }
        let block_ticks = self.store.block_ticks();
        let horizon = now - DEDUP_HORIZON.as_micros() as i64;
        for sym in &round.compacting {
            let Some(st) = self.symbols.get_mut(sym) else { continue };
            // The ticks since the last compaction: the chunks held since,
            // then this commit's.
            let held = st.held.all();
            let mut ticks = Vec::with_capacity(st.uncompacted_ticks + st.ticks.len());
            ticks.extend(held.iter().flat_map(|c| c.ticks.iter().copied()));
            ticks.extend_from_slice(&st.ticks);
            debug_assert_eq!(
                ticks.len(),
                st.uncompacted_ticks + st.ticks.len(),
                "{sym}: held ticks and counts disagree"
            );
            batch.put_ticks(&ticks, block_ticks);
            st.dedup.retain(|_, d| d.last_used >= horizon);
            snapshot(&mut batch, st);
            st.uncompacted_chunks = 0;
            st.uncompacted_ticks = 0;
            if let Some(from) = st.log_from.take() {
                unref(&mut self.log_refs, from, sym);
            }
            st.compacted = true;
        }
        for sym in &round.touched {
            let Some(st) = self.symbols.get_mut(sym) else { continue };
            for c in &st.closed {
                batch.put_closed_candle(c);
            }
            if st.compacted {
                continue;
            }
            if st.created {
                batch.put_symbol(&SymbolRecord {
                    symbol: *sym,
                    epoch: st.rec.epoch,
                    last_seq: 0,
                    last: None,
                    candles: [None; 3],
                });
            }
            if st.ticks.is_empty() {
                continue;
            }
            let changed = st.dedup_changed.iter().filter_map(|id| st.dedup.get_key_value(id));
            batch.log_ticks(&st.ticks, changed.map(|(id, d)| (&**id, d)));
            if st.log_from.is_none() {
                st.log_from = Some(commit);
                self.log_refs.entry(commit).or_default().insert(*sym);
            }
        }
        self.write_moves(round, &mut batch);
        if batch.seal_log(commit) {
            self.next_commit += 1;
        }
        let floor = self.log_refs.keys().next().copied().unwrap_or(self.next_commit);
        for old in self.log_floor..floor {
            batch.remove_log(old);
        }
        self.unmark_behind(floor, &mut batch);
        self.log_floor = self.log_floor.max(floor);
        batch
    }

    /// The commit failed: the batch may or may not be on disk, and the
    /// in-memory state is ahead of what is durable. Everything is refused
    /// (the round and whatever is still queued) and the committer stops: the
    /// process must restart and recover from the store.
    fn fail(&mut self, e: crate::store::StoreError, round: &mut Round, rx: &mut mpsc::Receiver<Cmd>) {
        tracing::error!(error = %e, "group commit failed; the shard stops accepting writes");
        let e = self.failed.get_or_init(|| Arc::new(e)).clone();
        let why = format!("store failure: {e}");
        for p in round.acks.drain(..) {
            p.reply.unavailable(
                p.publisher.as_ref().map(|(id, s)| (id, *s)),
                p.ack.request_id,
                p.ack.symbol,
                why.clone(),
            );
        }
        for (r, _) in round.ensures.drain(..) {
            let _ = r.send(Err(CommitError::StoreFailed(e.clone())));
        }
        self.fail_moves(round, &why, &e);
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Cmd::Publish(p) => p.unavailable(why.clone()),
                Cmd::Ensure { reply, .. } => {
                    let _ = reply.send(Err(CommitError::StoreFailed(e.clone())));
                }
                _ => {} // (the other answers are dropped: their askers see Stopped)
            }
        }
    }

    /// The batch is durable: each touched symbol's chunk goes to the held
    /// chunks (unless compacted) and then to its hub (subscribers), held
    /// chunks that compaction made durable in blocks are released.
    fn publish(&mut self, round: &mut Round, meters: &Meters) {
        for sym in round.touched.drain(..) {
            let Some(st) = self.symbols.get_mut(&sym) else { continue };
            st.touched = false;
            st.created = false;
            st.dedup_changed.clear();
            let hub = match &st.hub {
                Some(h) => h.clone(),
                None => {
                    let h = self.hub.get_or_insert(sym, || head_of(&st.rec));
                    st.hub = Some(h.clone());
                    h
                }
            };
            let chunk = Arc::new(Chunk::new(sym, std::mem::take(&mut st.ticks)));
            if st.compacted {
                // Its ticks are in blocks now (this chunk's too): what
                // was held goes, and this is not held.
                st.held.release(st.rec.last_seq);
                st.compacted = false;
            } else if !chunk.ticks.is_empty() {
                st.uncompacted_chunks += 1;
                st.uncompacted_ticks += chunk.ticks.len();
                st.held.push(chunk.clone());
            }
            if hub.publish_deferred(chunk, &st.closed, st.rec.candles, &mut round.wakes) {
                self.hub.mark_candles_dirty(hub.clone());
            }
            st.closed.clear();
        }
        // Compacted symbols this commit did not touch.
        meters.compactions.increment(round.compacting.len() as u64);
        for sym in round.compacting.drain(..) {
            let Some(st) = self.symbols.get_mut(&sym) else { continue };
            if std::mem::take(&mut st.compacted) {
                st.held.release(st.rec.last_seq);
            }
        }
        let c = &round.counts;
        meters.accepted.increment(c.ticks);
        meters.duplicates.increment(c.duplicates);
        meters.late.increment(c.late);
        meters.batch.record(c.ticks as f64);
        meters.owned.set(self.symbols.len() as f64);
    }

    /// Picks the symbols to compact in commit `commit`, oldest log first, in
    /// O(touched + picked), not O(symbols).
    fn pick_compactions(&self, commit: u64, touched: &[Symbol], pick: Pick) -> Vec<Symbol> {
        let block_ticks = self.store.block_ticks();
        let (everything, limit) = match pick {
            // (symbols enter the log at most as fast as this takes them out
            // once they are LOG_SPAN old: the log, the ticks held for it
            // and what start-up folds stay within about 2 × LOG_SPAN
            // records, whatever the number of symbols; O(log records))
            Pick::Due => {
                let in_log: usize = self.log_refs.values().map(HashSet::len).sum();
                (false, COMPACT_PER_COMMIT.max(in_log.div_ceil(LOG_SPAN as usize)))
            }
            Pick::Everything(limit) => (true, limit),
        };
        let mut due: Vec<(u64, Symbol)> = Vec::new();
        for (&from, syms) in &self.log_refs {
            if due.len() >= limit || (!everything && commit - from < LOG_SPAN) {
                break;
            }
            due.extend(syms.iter().map(|s| (from, *s)));
        }
        for sym in touched {
            let Some(st) = self.symbols.get(sym) else { continue };
            let ready = st.uncompacted_ticks + st.ticks.len() >= block_ticks
                || st.uncompacted_chunks >= COMPACT_AFTER
                || (everything && !st.ticks.is_empty());
            if ready {
                due.push((st.log_from.unwrap_or(commit), *sym));
            }
        }
        due.sort_unstable_by_key(|&(_, s)| s);
        due.dedup_by_key(|&mut (_, s)| s);
        if due.len() > limit {
            due.select_nth_unstable(limit);
            due.truncate(limit);
        }
        due.into_iter().map(|(_, s)| s).collect()
    }

    /// De-duplicates, checks the clock and the symbol limit, assigns the next
    /// seq and folds candles for one publish. A rejected tick consumes no seq.
    fn apply_publish(
        &mut self,
        p: &PublishCmd,
        now: i64,
        touched: &mut Vec<Symbol>,
        counts: &mut Counts,
    ) -> Result<Accepted, AckError> {
        if let Some(st) = self.symbols.get(&p.tick.symbol)
            && let Some((pid, pseq)) = &p.publisher
            && let Some(d) = st.dedup.get(&**pid)
            && *pseq <= d.publisher_seq
        {
            counts.duplicates += 1;
            // The original seq is known only for the latest accepted request.
            let seq = if *pseq == d.publisher_seq { d.seq } else { 0 };
            return Ok(Accepted {
                seq,
                epoch: st.rec.epoch,
                duplicate: true,
            });
        }
        if let Some(max) = self.cfg.max_future {
            let max_us = i64::try_from(max.as_micros()).unwrap_or(i64::MAX);
            if p.tick.ts > now.saturating_add(max_us) {
                return Err(AckError::Input(InputError::InvalidTick(format!(
                    "ts {} is {} ms ahead of this shard's clock; at most {} ms are allowed (--max-future-ms)",
                    p.tick.ts,
                    (p.tick.ts - now) / 1_000,
                    max.as_millis()
                ))));
            }
        }
        let st = self.state(p.tick.symbol, touched).map_err(|e| AckError::Rejected {
            code: ErrorCode::SymbolLimit,
            message: e.to_string(),
        })?;
        let epoch = st.rec.epoch;
        let mut tick = p.tick;
        tick.seq = st.rec.last_seq + 1;
        counts.late += u64::from(st.fold(tick));
        counts.ticks += 1;
        if let Some((pid, publisher_seq)) = &p.publisher {
            let d = DedupState {
                publisher_seq: *publisher_seq,
                seq: tick.seq,
                last_used: now,
            };
            match st.dedup.get_mut(&**pid) {
                Some(e) => *e = d,
                None => {
                    if st.dedup.len() >= MAX_PUBLISHERS_PER_SYMBOL {
                        forget_least_recent(&mut st.dedup, &mut st.dedup_changed);
                    }
                    st.dedup.insert(pid.clone(), d);
                }
            }
            if !st.dedup_changed.contains(&**pid) {
                st.dedup_changed.insert(pid.clone());
            }
        }
        Ok(Accepted {
            seq: tick.seq,
            epoch,
            duplicate: false,
        })
    }

    /// Makes sure `symbols` exist (with a durable epoch): all of them, or
    /// none if that would take the shard past its symbol limit.
    fn ensure(&mut self, symbols: &[Symbol], touched: &mut Vec<Symbol>) -> Result<(), CommitError> {
        let new = symbols.iter().filter(|s| !self.symbols.contains_key(s)).count();
        if new > 0 && self.symbols.len() + new > self.cfg.max_symbols {
            return Err(CommitError::SymbolLimit(self.cfg.max_symbols));
        }
        let now = Instant::now();
        for &sym in symbols {
            let st = self.state(sym, touched)?;
            if st.created {
                self.unticked.push_back((now, sym));
            }
        }
        Ok(())
    }

    /// Forgets symbols created by a subscribe that never received a tick and
    /// have had no subscriber for `forget_unticked_after` (contract §6): their
    /// record is removed in `batch`, their hub retired (a subscribe that races
    /// with this attaches to a new one). A symbol being handed over is not
    /// forgotten (its hold would stay for good). O(symbols forgotten or
    /// re-checked).
    fn forget_unticked(&mut self, batch: &mut CommitBatch) {
        let now = Instant::now();
        let ttl = self.cfg.forget_unticked_after;
        let mut keep = Vec::new();
        while let Some(&(since, sym)) = self.unticked.front() {
            if now.duration_since(since) < ttl {
                break;
            }
            self.unticked.pop_front();
            let Some(st) = self.symbols.get(&sym) else { continue };
            if st.rec.last_seq > 0 || st.touched {
                continue; // it has ticks now (or gets some in this batch)
            }
            if self.moving.contains_key(&sym) {
                // (being handed over: the hand-over settles it; a rollback
                // leaves it to be looked at again)
                keep.push((now, sym));
                continue;
            }
            if st.hub.as_ref().is_some_and(|h| !self.hub.retire_if_unused(h)) {
                keep.push((now, sym)); // subscribed: look again later
                continue;
            }
            self.symbols.remove(&sym);
            self.held.remove(&sym);
            batch.remove_symbol(&sym);
            metrics::counter!(m::SYMBOLS_FORGOTTEN).increment(1);
            tracing::debug!(symbol = %sym, "forgot a symbol that never had a tick");
        }
        self.unticked.extend(keep);
    }

    /// The state of `sym`, creating it (with a fresh epoch) on first use, and
    /// marking it touched by this batch. Creating one more symbol than
    /// [`CommitterConfig::max_symbols`] is refused.
    fn state(&mut self, sym: Symbol, touched: &mut Vec<Symbol>) -> Result<&mut SymState, CommitError> {
        let full = self.symbols.len() >= self.cfg.max_symbols;
        let st = match self.symbols.entry(sym) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if full => {
                return Err(CommitError::SymbolLimit(self.cfg.max_symbols));
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut st = SymState::new(SymbolRecord {
                    symbol: sym,
                    epoch: Epoch::random(),
                    last_seq: 0,
                    last: None,
                    candles: [None; 3],
                });
                st.held = self.held.entry(sym);
                st.created = true; // the epoch must be durable
                e.insert(st)
            }
        };
        if !st.touched {
            st.touched = true;
            touched.push(sym);
        }
        Ok(st)
    }
}

/// Publishers forgotten at once when a symbol's de-dup table is full.
const FORGET_AT_ONCE: usize = MAX_PUBLISHERS_PER_SYMBOL / 8;

/// Forgets [`FORGET_AT_ONCE`] publishers of a full de-dup table, taken from
/// the callers (token `sub`s, contract §8) that hold the most: each caller
/// above a level gives up its least recent states past it (at the level
/// itself, the least recent of those callers' states, to make up the
/// number). A caller making up ids forgets its own, never the states of one
/// holding fewer. One pass over the table (and sorts within it) per that
/// many new publishers, so a new `publisher_id` per request costs the
/// committer a constant per request, not a scan of the table.
fn forget_least_recent(dedup: &mut HashMap<Arc<str>, DedupState>, changed: &mut std::collections::HashSet<Arc<str>>) {
    let gone: Vec<Arc<str>> = {
        let mut by_caller: HashMap<&str, Vec<(i64, &Arc<str>)>> = HashMap::new();
        for (id, d) in dedup.iter() {
            by_caller
                .entry(crate::domain::publisher_scope(id))
                .or_default()
                .push((d.last_used, id));
        }
        let mut sizes: Vec<usize> = by_caller.values().map(Vec::len).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let level = forget_level(&sizes, FORGET_AT_ONCE);
        // Past one above the level every state goes (fewer than wanted);
        // the callers' next states (each one's least recent left) make up
        // the rest, least recent first.
        let mut gone = Vec::new();
        let mut next = Vec::new();
        for states in by_caller.values_mut() {
            states.sort_unstable_by_key(|(used, _)| *used);
            let n = states.len().saturating_sub(level + 1);
            gone.extend(states.iter().take(n).map(|(_, id)| Arc::clone(id)));
            if states.len() > level {
                next.extend(states.get(n).copied());
            }
        }
        let rest = FORGET_AT_ONCE.saturating_sub(gone.len()).min(next.len());
        if rest > 0 {
            next.select_nth_unstable_by_key(rest - 1, |(used, _)| *used);
            gone.extend(next.iter().take(rest).map(|(_, id)| Arc::clone(id)));
        }
        gone
    };
    for id in &gone {
        dedup.remove(id);
        changed.remove(id);
    }
}

/// The highest level such that the callers' states past it (`sizes`, largest
/// first) number at least `want` (0 if they are fewer in all).
fn forget_level(sizes: &[usize], want: usize) -> usize {
    let mut level = sizes.first().copied().unwrap_or(0);
    // (past the level: `above` callers lose one more state per step down)
    let (mut above, mut past) = (0usize, 0usize);
    while level > 0 && past < want {
        while sizes.get(above).is_some_and(|&s| s >= level) {
            above += 1;
        }
        level -= 1;
        past += above;
    }
    level
}

/// Waits for a command, then takes every one already queued (up to
/// [`MAX_BATCH`]); false once every handle is gone.
fn collect(rx: &mut mpsc::Receiver<Cmd>, cmds: &mut Vec<Cmd>) -> bool {
    let Some(first) = rx.blocking_recv() else { return false };
    cmds.push(first);
    while cmds.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => cmds.push(c),
            Err(_) => break,
        }
    }
    true
}

/// Acks every request of the round (one send per stream: each stream's acks
/// in one vector, sized once), then answers the ensures.
fn ack(round: &mut Round) {
    let done = Instant::now();
    for p in &round.acks {
        *round.per_stream.entry(p.reply.id).or_default() += 1;
    }
    for p in round.acks.drain(..) {
        if matches!(p.ack.result, Ok(Accepted { duplicate: false, .. })) {
            m::PUBLISH_LATENCY_HISTOGRAM.record_us(done.duration_since(p.received).as_micros() as u64);
        }
        if p.reply.tx.is_closed() {
            continue; // the publisher left (or does not want acks)
        }
        let per_stream = &round.per_stream;
        round
            .by_stream
            .entry(p.reply.id)
            .or_insert_with(|| {
                let n = per_stream.get(&p.reply.id).copied().unwrap_or(0);
                (p.reply.clone(), Vec::with_capacity(n))
            })
            .1
            .push(p.ack);
    }
    for (_, (tx, acks)) in round.by_stream.drain() {
        let _ = tx.send(acks);
    }
    round.per_stream.clear();
    for (r, result) in round.ensures.drain(..) {
        let _ = r.send(result);
    }
}

#[cfg(test)]
mod tests;
