//! Elastic shards (contract §9): changing the shard count of a running
//! cluster, one symbol move at a time, nothing lost or repeated.
//!
//! **Phases.** `admin rebalance --shards M` on any pod *prepares*: every pod
//! of the span (`max(N, M)`) durably takes the state `{committed N, target
//! M}`. Then each old owner *moves* its symbols whose owner under `M` is
//! another shard ([`move_symbol`], four at a time). Shard 0 drives the rest
//! ([`drive`]): once no pod has a move left it *seals* every pod (a new
//! symbol that would belong elsewhere is not created any more: its
//! publishes wait), checks again, and *commits* `{committed M}` everywhere.
//! A pod that was down learns the newest state from any peer (Topology).
//!
//! **One move** (old owner O, new owner D): O streams the symbol's retained
//! ticks and closed candles to D while it still takes publishes; then O's
//! committer *exports* it (its publishes are held from here, the hold and
//! the hand-over target are durable, every tick is in blocks); O sends the
//! ticks since, and the state (epoch, head, open candles, de-dup). D imports
//! it in one atomic batch (taking over its mirror hub, if it had one: its
//! subscribers stay attached) and answers; O turns its hub into a mirror of
//! D (its subscribers, and the peers that follow it, stay attached and see
//! D's ticks continue the seq) and releases the held publishes to D. At
//! every moment one shard accepts the symbol's publishes.
//!
//! **Crashes.** If O loses D's answer (a break, its own restart), it asks D
//! ([`Moves::status`]), whose answer is final: a MoveIn still in flight there
//! is refused from then on. D holds it → O finishes; D does not → O rolls
//! back (applies the held publishes itself). Until D answers, the publishes
//! stay held.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Error,
    cluster::{MovePart, Peer},
    committer::{Exported, Imported},
    domain::{Candle, Epoch, ErrorCode, Symbol, Tick},
    metrics as m,
    node::Node,
    placement::{ClusterState, MAX_SHARDS, Placement},
    store::{MoveMark, SymbolRecord},
};

/// Ticks (and candles) per MoveIn chunk.
pub const MOVE_CHUNK: usize = 2_048;
/// Most ticks one MoveIn may carry (a named bound on what a peer sends): a
/// symbol retains `--history-ticks` plus at most an eighth more, so twice this
/// pod's `--history-ticks` (and a block), capped here. What all MoveIns
/// at once hold is bounded by [`MOVE_IN_BYTES`] (and [`MAX_INCOMING`]).
pub const MAX_MOVE_TICKS: usize = 8_000_000;
/// Most closed candles one MoveIn may carry (1s candles for a day are 86,400).
pub const MAX_MOVE_CANDLES: usize = 1_000_000;
/// Symbols one pod moves at once.
pub const MOVE_PARALLEL: usize = 4;
/// A whole MoveIn call (history included) must finish within this.
pub const MOVE_DEADLINE: Duration = Duration::from_secs(120);
/// How long `admin rebalance` waits for every pod to take the new target.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the mover and the driver look again.
const POLL: Duration = Duration::from_millis(250);

/// MoveIns received at once by one pod (each may hold a symbol's history
/// in memory until its import).
pub const MAX_INCOMING: usize = 16;
/// Bytes of ticks and candles held across every MoveIn being received or
/// imported (at least one hand-over of the largest size,
/// [`max_move_bytes`]): past it, a MoveIn is answered `unavailable` (its
/// old owner tries again later). Counted as the parts arrive, by
/// `size_of` (a `Vec`'s spare capacity, at most as much again, is not).
pub const MOVE_IN_BYTES: usize = 512 << 20;

/// Most ticks one hand-over may carry to this pod (see [`MAX_MOVE_TICKS`]).
fn max_move_ticks(history_ticks: u64) -> usize {
    let history = usize::try_from(history_ticks).unwrap_or(usize::MAX);
    history.saturating_mul(2).saturating_add(MOVE_CHUNK).min(MAX_MOVE_TICKS)
}

/// Bytes the ticks and candles of the largest hand-over take in memory.
fn max_move_bytes(history_ticks: u64) -> usize {
    max_move_ticks(history_ticks)
        .saturating_mul(std::mem::size_of::<Tick>())
        .saturating_add(MAX_MOVE_CANDLES.saturating_mul(std::mem::size_of::<Candle>()))
}

/// Attempts a MoveStatus refused, remembered (a late MoveIn of one is refused).
const REFUSED_KEPT: usize = 4_096;

/// A MoveIn being received, by the old owner's attempt id.
enum Incoming {
    Receiving(u64),
    Importing(watch::Receiver<bool>),
}

/// This pod's side of rebalances.
pub struct Moves {
    incoming: Mutex<HashMap<Symbol, Incoming>>,
    /// Attempts a MoveStatus answered while they were not imported: they
    /// may never import (oldest first, at most [`REFUSED_KEPT`]).
    refused: Mutex<std::collections::VecDeque<u64>>,
    receiving: Arc<tokio::sync::Semaphore>,
    /// What hand-overs hold in memory, in bytes ([`MOVE_IN_BYTES`]).
    budget: Arc<tokio::sync::Semaphore>,
    budget_bytes: usize,
    /// Hand-overs a restart interrupted (a durable hold without `done`).
    unresolved: Mutex<Vec<MoveMark>>,
    last_error: Mutex<Option<String>>,
    /// Shard 0 starts one rebalance at a time.
    starting: tokio::sync::Mutex<()>,
}

impl Moves {
    pub(crate) fn new(unresolved: Vec<MoveMark>, history_ticks: u64) -> Moves {
        let budget_bytes = MOVE_IN_BYTES
            .max(max_move_bytes(history_ticks))
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Moves {
            budget: Arc::new(tokio::sync::Semaphore::new(budget_bytes)),
            budget_bytes,
            incoming: Mutex::new(HashMap::new()),
            refused: Mutex::new(std::collections::VecDeque::new()),
            receiving: Arc::new(tokio::sync::Semaphore::new(MAX_INCOMING)),
            unresolved: Mutex::new(unresolved),
            last_error: Mutex::new(None),
            starting: tokio::sync::Mutex::new(()),
        }
    }

    fn refuse(&self, attempt: u64) {
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= REFUSED_KEPT {
            r.pop_front();
        }
        r.push_back(attempt);
    }

    fn is_refused(&self, attempt: u64) -> bool {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&attempt)
    }

    fn incoming(&self) -> std::sync::MutexGuard<'_, HashMap<Symbol, Incoming>> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Clears the last error if it was `sym`'s (its move has since gone
    /// through): `admin status` shows what still fails, not what did once.
    fn clear_error_of(&self, sym: &Symbol) {
        let mut e = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if e.as_deref().is_some_and(|e| e.starts_with(&format!("moving {sym} "))) {
            *e = None;
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn refused(message: impl Into<String>) -> Error {
    Error::Refused {
        code: ErrorCode::InvalidRequest,
        message: message.into(),
    }
}

/// Starts the mover (every pod) and the driver (shard 0).
pub(crate) fn start(node: &Arc<Node>, tracker: &TaskTracker, stop: CancellationToken) {
    let unresolved = std::mem::take(&mut *node.moves.unresolved.lock().unwrap_or_else(|p| p.into_inner()));
    for mark in unresolved {
        let (n, s) = (node.clone(), stop.clone());
        crate::tasks::spawn(tracker, async move { resolve_after_restart(&n, mark, &s).await });
    }
    let n = node.clone();
    let s = stop.clone();
    crate::tasks::spawn(tracker, async move { mover(n, s).await });
    if node.placement().me() == 0 {
        let n = node.clone();
        crate::tasks::spawn(tracker, async move { drive(n, stop).await });
    }
}

/// Moves this pod's symbols whose owner changes under the target.
async fn mover(node: Arc<Node>, stop: CancellationToken) {
    let mut changes = node.placement().watch();
    let moves_left = metrics::gauge!(m::REBALANCE_MOVES_LEFT);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changes.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        if node.placement().state().target.is_none() || !node.is_ready() {
            moves_left.set(0.0);
            continue;
        }
        let list = match node.committer().startable_moves().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing the symbols to move failed");
                continue;
            }
        };
        // (the gauge counts the held ones too: they are moves left)
        if let Ok(all) = node.committer().moves().await {
            moves_left.set(all.len() as f64);
        }
        if list.is_empty() {
            continue;
        }
        // Only to pods that took this rebalance already: a new owner that
        // has not would refuse the hand-over after the hold began.
        let state = node.placement().state();
        let mut ready = std::collections::HashMap::new();
        for to in list
            .iter()
            .map(|(_, to)| *to)
            .collect::<std::collections::BTreeSet<u32>>()
        {
            let ok = match node.cluster().and_then(|c| c.peer(to)) {
                Some(p) => p.moves().await.is_ok_and(|(s, _)| s == state),
                None => false,
            };
            ready.insert(to, ok);
        }
        let list: Vec<(Symbol, u32)> = list.into_iter().filter(|(_, to)| ready[to]).collect();
        if list.is_empty() {
            continue;
        }
        tracing::info!(moves = list.len(), "moving symbols to their new owners");
        let (node, stop, moves_left) = (&node, &stop, &moves_left);
        futures_util::stream::iter(list)
            .for_each_concurrent(MOVE_PARALLEL, |(sym, to)| async move {
                if stop.is_cancelled() {
                    return;
                }
                match move_symbol(node, sym, to).await {
                    Ok(()) => {
                        moves_left.decrement(1.0);
                        node.moves.clear_error_of(&sym);
                    }
                    Err(e) => {
                        tracing::warn!(symbol = %sym, to, error = %e, "symbol move failed; will retry");
                        node.moves.set_error(Some(format!("moving {sym} to shard {to}: {e}")));
                    }
                }
            })
            .await;
    }
}

/// Hands `sym` over to shard `to` (see the module doc).
pub async fn move_symbol(node: &Arc<Node>, sym: Symbol, to: u32) -> Result<(), Error> {
    let started = Instant::now();
    let attempt = fastrand::u64(1..);
    let peer = node
        .cluster()
        .and_then(|c| c.peer(to))
        .ok_or_else(|| Error::Unavailable(format!("no link to shard {to}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = peer.move_in(rx, MOVE_DEADLINE);
    let feed = feed_move(node, sym, to, attempt, tx);
    let (answer, fed) = tokio::join!(call, feed);
    let exported = match fed {
        Ok(e) => e,
        // Nothing was held yet (or the export itself failed): nothing to undo.
        Err(FeedError::BeforeHold(e)) => return Err(e),
        Err(FeedError::AfterHold(ex, e)) => {
            tracing::warn!(symbol = %sym, to, error = %e, "the hand-over broke after the hold; asking the new owner");
            return settle(node, &peer, sym, to, &ex, started).await;
        }
    };
    match answer {
        Ok(seq) if seq == exported.record.last_seq => finish(node, &peer, sym, to, &exported, started).await,
        Ok(seq) => {
            tracing::error!(symbol = %sym, to, seq, head = exported.record.last_seq, "the new owner took another head; asking it");
            settle(node, &peer, sym, to, &exported, started).await
        }
        Err(e) => {
            tracing::warn!(symbol = %sym, to, error = %e, "no answer to the hand-over; asking the new owner");
            settle(node, &peer, sym, to, &exported, started).await
        }
    }
}

enum FeedError {
    BeforeHold(Error),
    AfterHold(Box<Exported>, Error),
}

/// Streams the history, holds the symbol, streams the rest and its state.
async fn feed_move(
    node: &Arc<Node>,
    sym: Symbol,
    to: u32,
    attempt: u64,
    tx: tokio::sync::mpsc::Sender<MovePart>,
) -> Result<Exported, FeedError> {
    let me = node.placement().me();
    let gone = || FeedError::BeforeHold(Error::Unavailable(format!("the hand-over stream to shard {to} closed")));
    let send = |chunk: MovePart| tx.send(chunk);
    // 1. History while publishes go on (read up to the head seen now).
    let head = node.head(&sym).map_or(0, |h| h.seq);
    let mut from = 1u64;
    from = send_ticks(node, sym, (me, attempt), from, head, &send)
        .await
        .map_err(FeedError::BeforeHold)?;
    let store = node.store().clone();
    let candles = super::blocking(move || store.all_candles(&sym, [i64::MIN; 3], MAX_MOVE_CANDLES))
        .await
        .map_err(|e| FeedError::BeforeHold(e.into()))?;
    let mut after = [i64::MIN; 3];
    for c in &candles {
        let a = &mut after[c.interval.index()];
        *a = (*a).max(c.start.saturating_add(1));
    }
    for part in candles.chunks(MOVE_CHUNK) {
        send(MovePart::new(sym, me, attempt, Vec::new(), part.to_vec()))
            .await
            .map_err(|_| gone())?;
    }
    // 2. Hold, then the rest.
    let ex = node
        .committer()
        .export(sym, to, attempt)
        .await
        .map_err(|e| FeedError::BeforeHold(e.into()))?;
    let rest = async {
        let last = ex.record.last_seq;
        send_ticks(node, sym, (me, attempt), from, last, &send).await?;
        let store = node.store().clone();
        let candles = super::blocking(move || store.all_candles(&sym, after, MAX_MOVE_CANDLES)).await?;
        let mut parts: Vec<&[Candle]> = candles.chunks(MOVE_CHUNK).collect();
        let lastpart = parts.pop().unwrap_or(&[]);
        for part in parts {
            send(MovePart::new(sym, me, attempt, Vec::new(), part.to_vec()))
                .await
                .map_err(|_| Error::Unavailable("the hand-over stream closed".into()))?;
        }
        let mut fin = MovePart::new(sym, me, attempt, Vec::new(), lastpart.to_vec());
        fin.last = Some((ex.record.clone(), ex.dedup.clone()));
        send(fin)
            .await
            .map_err(|_| Error::Unavailable("the hand-over stream closed".into()))?;
        Ok::<(), Error>(())
    };
    match rest.await {
        Ok(()) => Ok(ex),
        Err(e) => Err(FeedError::AfterHold(Box::new(ex), e)),
    }
}

/// Sends ticks `from..=to` in chunks; answers the next seq to send.
async fn send_ticks<F, Fut>(
    node: &Arc<Node>,
    sym: Symbol,
    (me, attempt): (u32, u64),
    mut from: u64,
    to: u64,
    send: &F,
) -> Result<u64, Error>
where
    F: Fn(MovePart) -> Fut,
    Fut: std::future::Future<Output = Result<(), tokio::sync::mpsc::error::SendError<MovePart>>>,
{
    while from <= to {
        let page = node.read_local_ticks(sym, from, to, MOVE_CHUNK).await?;
        let Some(last) = page.last() else { break };
        let next = last.seq + 1;
        send(MovePart::new(sym, me, attempt, page, Vec::new()))
            .await
            .map_err(|_| Error::Unavailable("the hand-over stream closed".into()))?;
        from = next;
    }
    Ok(from)
}

/// The new owner holds the symbol: this pod's hub becomes its mirror, the
/// held publishes go to it.
async fn finish(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    sym: Symbol,
    to: u32,
    ex: &Exported,
    started: Instant,
) -> Result<(), Error> {
    node.placement().note_moved(sym, to);
    if let Some(hub) = node.hub().get(&sym) {
        hub.hand_over();
        peer.adopt_mirror(hub);
    }
    node.committer().release(sym, true).await?;
    let held = ex.held_since.elapsed();
    metrics::histogram!(m::SYMBOL_MOVE_SECONDS).record(held.as_secs_f64());
    metrics::histogram!(m::SYMBOL_MOVE_TOTAL_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::counter!(m::SYMBOL_MOVES, "result" => "moved").increment(1);
    tracing::info!(
        symbol = %sym, to, seq = ex.record.last_seq,
        held_ms = held.as_millis() as u64, total_ms = started.elapsed().as_millis() as u64,
        "symbol moved"
    );
    Ok(())
}

/// The answer was lost: ask the new owner until it says (its answer is
/// final), then finish or roll back. Publishes wait meanwhile, at most
/// `HOLD_LIMIT` (then they are answered `unavailable`, retryable).
async fn settle(
    node: &Arc<Node>,
    peer: &Arc<Peer>,
    sym: Symbol,
    to: u32,
    ex: &Exported,
    started: Instant,
) -> Result<(), Error> {
    let mut wait = crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        match peer
            .move_status(sym, ex.record.epoch, ex.record.last_seq, ex.attempt)
            .await
        {
            Ok(true) => return finish(node, peer, sym, to, ex, started).await,
            Ok(false) => {
                node.committer().release(sym, false).await?;
                node.placement().note_unsettled(sym, false);
                metrics::counter!(m::SYMBOL_MOVES, "result" => "rolled_back").increment(1);
                tracing::warn!(symbol = %sym, to, "the new owner did not take the symbol; rolled back (it stays here)");
                return Err(Error::Unavailable(format!(
                    "shard {to} did not take {sym}; rolled back"
                )));
            }
            Err(e) => {
                tracing::debug!(symbol = %sym, to, error = %e, "the new owner does not answer yet");
                if !node.is_healthy() {
                    return Err(Error::Unavailable("the store failed".into()));
                }
                wait.wait().await;
            }
        }
    }
}

/// A hold this pod made durably before a restart: the new owner says.
async fn resolve_after_restart(node: &Arc<Node>, mark: MoveMark, stop: &CancellationToken) {
    let Some(head) = node.head(&mark.symbol) else {
        return;
    };
    let ex = Exported {
        record: SymbolRecord {
            symbol: mark.symbol,
            epoch: head.epoch,
            last_seq: head.seq,
            last: head.last,
            candles: head.candles,
        },
        dedup: Vec::new(),
        held_since: Instant::now(),
        attempt: mark.attempt,
    };
    loop {
        let peer = node.cluster().and_then(|c| c.peer(mark.to));
        if let Some(peer) = peer {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = settle(node, &peer, mark.symbol, mark.to, &ex, Instant::now()) => {
                    if let Err(e) = r {
                        tracing::info!(symbol = %mark.symbol, error = %e, "an interrupted hand-over was settled");
                    }
                    return;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The new owner's side of a move: takes the parts in order, imports the
/// symbol once the last one came. Answers the head it took.
pub async fn receive_move(
    node: &Arc<Node>,
    mut parts: impl futures_util::Stream<Item = Result<MovePart, String>> + Unpin,
) -> Result<u64, Error> {
    let first = match parts.next().await {
        Some(Ok(p)) => p,
        Some(Err(e)) => return Err(refused(e)),
        None => return Err(refused("an empty hand-over")),
    };
    let sym = first.symbol;
    let from = first.from;
    let attempt = first.attempt;
    let me = node.placement().me();
    if node.moves.is_refused(attempt) {
        return Err(Error::Unavailable(format!("the hand-over of {sym} was called off")));
    }
    let Ok(permit) = node.moves.receiving.clone().try_acquire_owned() else {
        return Err(Error::Unavailable(format!(
            "shard {me} receives {MAX_INCOMING} hand-overs already; retry"
        )));
    };
    if node.placement().target_owner(&sym) != Some(me) && !node.placement().is_local(&sym) {
        return Err(refused(format!("shard {me} is not the new owner of {sym}")));
    }
    if node.hub().get(&sym).is_some_and(|h| !h.is_foreign()) {
        return Err(refused(format!("shard {me} already holds {sym}")));
    }
    {
        let mut inc = node.moves.incoming();
        if matches!(inc.get(&sym), Some(Incoming::Importing(_))) {
            return Err(Error::Unavailable(format!("{sym} is being imported; retry")));
        }
        inc.insert(sym, Incoming::Receiving(attempt));
    }
    // (the note goes however this call ends before the import: an error,
    // or the call dropped mid-transfer)
    let _receiving = ReceivingNote { node, sym, attempt };
    // A hand-over that does not arrive in time frees its place: one that
    // sends a part and then nothing cannot hold one of MAX_INCOMING.
    let deadline = tokio::time::Instant::now() + MOVE_DEADLINE;
    let max_ticks = max_move_ticks(node.config().history_ticks);
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut ticks: Vec<Tick> = Vec::new();
    let mut candles: Vec<Candle> = Vec::new();
    let mut part = first;
    let (record, dedup) = loop {
        if part.symbol != sym || part.from != from || part.attempt != attempt {
            return Err(refused("a hand-over of two symbols"));
        }
        if ticks.len() + part.ticks.len() > max_ticks || candles.len() + part.candles.len() > MAX_MOVE_CANDLES {
            return Err(refused(format!(
                "a hand-over beyond {max_ticks} ticks or {MAX_MOVE_CANDLES} candles (twice --history-ticks)"
            )));
        }
        let bytes = part.ticks.len().saturating_mul(std::mem::size_of::<Tick>())
            + part.candles.len().saturating_mul(std::mem::size_of::<Candle>());
        let more = u32::try_from(bytes)
            .ok()
            .and_then(|n| node.moves.budget.clone().try_acquire_many_owned(n).ok());
        let Some(more) = more else {
            return Err(Error::Unavailable(format!(
                "shard {me} holds {} MiB of hand-overs already; retry",
                node.moves.budget_bytes >> 20
            )));
        };
        match &mut held {
            Some(h) => h.merge(more),
            None => held = Some(more),
        }
        for t in &part.ticks {
            if ticks.last().is_some_and(|l| l.seq.checked_add(1) != Some(t.seq)) {
                return Err(refused("a hand-over with a gap in its ticks"));
            }
            ticks.push(*t);
        }
        candles.append(&mut part.candles);
        if let Some(last) = part.last.take() {
            break last;
        }
        part = match tokio::time::timeout_at(deadline, parts.next()).await {
            Ok(Some(Ok(p))) => p,
            Ok(Some(Err(e))) => return Err(refused(e)),
            Ok(None) => return Err(Error::Unavailable("the hand-over ended before its state".into())),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "the hand-over of {sym} did not arrive within {} s",
                    MOVE_DEADLINE.as_secs()
                )));
            }
        };
    };
    if ticks.last().map_or(0, |t| t.seq) != record.last_seq && !(ticks.is_empty() && record.last_seq == 0) {
        return Err(refused("a hand-over whose ticks do not end at its head"));
    }
    // Final: from here only this attempt may import, and a MoveStatus waits for it.
    let (done_tx, done_rx) = watch::channel(false);
    {
        let mut inc = node.moves.incoming();
        match inc.get(&sym) {
            Some(Incoming::Receiving(a)) if *a == attempt && !node.moves.is_refused(attempt) => {
                inc.insert(sym, Incoming::Importing(done_rx));
            }
            _ => return Err(Error::Unavailable(format!("the hand-over of {sym} was called off"))),
        }
    }
    let imported = Imported {
        record,
        dedup,
        ticks,
        candles,
    };
    // The import runs to its end on its own task, even if this call is
    // dropped meanwhile (the old owner went away): the symbol stays
    // unsettled here until the import has ended (durable, or failed and
    // given back), and the hand-over's notes are cleared when it ends (a
    // later hand-over of the symbol is not refused as "being imported").
    let task = crate::tasks::spawn(
        node.stream_tasks(),
        import(node.clone(), from, imported, done_tx, (permit, held)),
    );
    match task.await {
        Ok(result) => result.map_err(Error::from),
        Err(e) => Err(Error::Unavailable(format!("the import of {sym} stopped: {e}"))),
    }
}

/// A hand-over being received (`Incoming::Receiving`): the note goes when
/// this is dropped, unless the import has taken it over (`Importing`).
struct ReceivingNote<'a> {
    node: &'a Node,
    sym: Symbol,
    attempt: u64,
}

impl Drop for ReceivingNote<'_> {
    fn drop(&mut self) {
        let mut inc = self.node.moves.incoming();
        if matches!(inc.get(&self.sym), Some(Incoming::Receiving(a)) if *a == self.attempt) {
            inc.remove(&self.sym);
        }
    }
}

/// The final step of a hand-over on the new owner: the import, once the
/// whole state has arrived (see [`receive_move`]). Answers the head.
async fn import(
    node: Arc<Node>,
    from: u32,
    imported: Imported,
    done: watch::Sender<bool>,
    // (its place among MAX_INCOMING, and what it holds of MOVE_IN_BYTES)
    _permits: (
        tokio::sync::OwnedSemaphorePermit,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
) -> Result<u64, crate::committer::CommitError> {
    let sym = imported.record.symbol;
    let head = imported.record.last_seq;
    let (n_ticks, n_candles) = (imported.ticks.len(), imported.candles.len());
    // From here this pod is the symbol's owner for its own subscribes (none
    // may mirror it from the old owner again), then the mirror this pod had
    // (fed by the old owner) becomes the owner's hub. Until the import is
    // durable this pod's copy is empty: reads and subscribes of the symbol
    // here are answered `unavailable` (retryable), not from that copy.
    let before = node.placement().note_moved_in(sym);
    let unsettled = Unsettled::mark(node.placement(), sym);
    let mut taken = None;
    if let Some(c) = node.cluster() {
        for p in c.peers() {
            if let Some(h) = p.take_mirror(&sym) {
                taken = Some((p, h));
            }
        }
    }
    let result = node.committer().import(imported).await;
    match &result {
        Ok(()) => {
            let _ = node.placement().note_moved_in(sym);
            tracing::info!(symbol = %sym, from, seq = head, ticks = n_ticks, candles = n_candles, "symbol taken over");
        }
        // Not taken: the mirror goes back to its feed.
        Err(e) => {
            tracing::warn!(symbol = %sym, from, error = %e, "import of a handed-over symbol failed");
            // (the notes as they were: a failed second import of a symbol
            // this pod already took keeps it taken)
            node.placement().forget_moved_in(sym, before);
            if let Some((p, h)) = taken {
                p.adopt_mirror(h);
            }
        }
    }
    drop(unsettled);
    node.moves.incoming().remove(&sym);
    let _ = done.send(true);
    result.map(|()| head)
}

/// A symbol marked unsettled while it is imported; the mark goes when the
/// import ends, or if its task is dropped unfinished (the runtime's
/// shutdown), so that it can never stay.
struct Unsettled<'a>(&'a Placement, Symbol);

impl<'a> Unsettled<'a> {
    fn mark(placement: &'a Placement, sym: Symbol) -> Unsettled<'a> {
        placement.note_unsettled(sym, true);
        Unsettled(placement, sym)
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        self.0.note_unsettled(self.1, false);
    }
}

/// Whether this pod holds `sym` at `epoch` with a head at `seq` or later.
/// Final: the hand-over `attempt` is refused from here on (if it is still
/// in flight, it is called off; if it is importing, this waits for it).
pub async fn move_status(node: &Arc<Node>, sym: Symbol, epoch: Epoch, seq: u64, attempt: u64) -> Result<bool, Error> {
    let importing = {
        let mut inc = node.moves.incoming();
        node.moves.refuse(attempt);
        match inc.get(&sym) {
            Some(Incoming::Importing(rx)) => Some(rx.clone()),
            // (only the attempt asked about is called off: a MoveStatus of
            // another, stale or made up, leaves a hand-over in flight be)
            Some(Incoming::Receiving(a)) if *a == attempt => {
                inc.remove(&sym);
                None
            }
            Some(Incoming::Receiving(_)) | None => None,
        }
    };
    if let Some(mut rx) = importing {
        let _ = rx.wait_for(|done| *done).await;
    }
    Ok(node.committer().holds(sym, epoch, seq).await?)
}

/// Starts a rebalance to `shards`: every pod of the span takes the target
/// (or none does). Answers the new state.
pub async fn start_rebalance(node: &Arc<Node>, shards: u32) -> Result<ClusterState, Error> {
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(refused(format!("--shards must be 1 to {MAX_SHARDS}")));
    }
    let Some(cluster) = node.cluster() else {
        return Err(refused(
            "this pod runs alone (no --peers): start the cluster with a --peers template to change its size",
        ));
    };
    // Shard 0 alone starts rebalances, one at a time (two pods starting two
    // could each take the same version with another target).
    let me = node.placement().me();
    if me != 0 {
        let zero = cluster
            .peer(0)
            .ok_or_else(|| Error::Unavailable("no link to shard 0".into()))?;
        return zero
            // (shard 0 probes every pod, then pushes the target to each:
            // each push retries for PREPARE_TIMEOUT, one call may take 15 s)
            .start_rebalance(shards, PREPARE_TIMEOUT * 4)
            .await
            .map_err(|e| match e.refusal() {
                Some(message) => refused(message),
                None => Error::Unavailable(format!("shard 0 (which starts rebalances): {e}")),
            });
    }
    let _one = node.moves.starting.lock().await;
    let cur = node.placement().state();
    match cur.target {
        Some(t) if t == shards => return Ok(cur),
        Some(t) => {
            return Err(refused(format!(
                "a rebalance to {t} shards is in progress and cannot be replaced; wait for it \
                 (tickshard admin status), then rebalance again"
            )));
        }
        None if shards == cur.committed => return Ok(cur),
        None => {}
    }
    let span = cur.committed.max(shards).max(cluster.span());
    if cluster.config().addressable() < cur.committed.max(shards) {
        return Err(refused(format!(
            "--peers names {} shards; a rebalance to {shards} needs a {{}} template or {} addresses",
            cluster.config().addressable(),
            cur.committed.max(shards)
        )));
    }
    // Every pod of the old and the new count must be up, ready and speak
    // the protocol of elastic shards (a rolling upgrade from the first
    // release must be over) before any takes the target: a rebalance to a
    // pod that does not exist would wait for it forever (contract §9:
    // scale up first, then rebalance; rebalance first, then scale down).
    let unfit = cluster.unfit(cur.committed.max(shards)).await;
    if !unfit.is_empty() {
        let hint = if shards > cur.committed {
            "scaling up: `kubectl scale` first, and rebalance once the new pods are ready"
        } else {
            "bring the missing pods back first (scaling down: rebalance first, then `kubectl scale`)"
        };
        return Err(refused(format!(
            "not started: every pod of shards 0 to {} must be up and ready first ({}); {hint}",
            cur.committed.max(shards) - 1,
            unfit.join("; ")
        )));
    }
    let next = ClusterState {
        version: cur.version + 1,
        committed: cur.committed,
        target: Some(shards),
    };
    node.adopt_state(next, false).await?;
    node.moves.set_error(None);
    let span = span.max(cluster.span());
    let pushes = (0..span).filter(|i| *i != me).map(|i| async move {
        let deadline = Instant::now() + PREPARE_TIMEOUT;
        let mut wait = crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            let r = match node.cluster().and_then(|c| c.peer(i)) {
                Some(p) => p.set_state(next, false).await.map_err(|e| e.to_string()),
                None => Err("no link".to_string()),
            };
            match r {
                Ok(s) if s == next => return Ok(()),
                Ok(s) => return Err(format!("shard {i} has {s}")),
                Err(e) if Instant::now() >= deadline => return Err(format!("shard {i}: {e}")),
                Err(_) => wait.wait().await,
            }
        }
    });
    let failed: Vec<String> = futures_util::future::join_all(pushes)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if failed.is_empty() {
        tracing::info!(from = cur.committed, to = shards, "rebalance started");
        return Ok(next);
    }
    // Not every pod took it yet. Some may have moved symbols already, so it
    // is not called off: shard 0 keeps offering the target, and the moves to
    // or from a missing pod wait for it (every symbol keeps one owner).
    let why = format!(
        "not every pod took the new target yet, the rebalance waits for them: {}",
        failed.join("; ")
    );
    tracing::warn!(reason = %why, "rebalance started without every pod");
    node.moves.set_error(Some(why.clone()));
    Err(Error::Unavailable(why))
}

/// Offers `state` to every other pod below `span`; answers the shards that
/// did not take it.
async fn push_everywhere(node: &Arc<Node>, state: ClusterState, seal: bool, span: u32) -> Vec<u32> {
    push_to(node, state, seal, 0..span).await
}

/// Offers `state` to the other pods of `shards`.
async fn push_to(node: &Arc<Node>, state: ClusterState, seal: bool, shards: std::ops::Range<u32>) -> Vec<u32> {
    let me = node.placement().me();
    let calls = shards.filter(|i| *i != me).map(|i| async move {
        let ok = match node.cluster().and_then(|c| c.peer(i)) {
            Some(p) => p.set_state(state, seal).await.is_ok_and(|s| s.version >= state.version),
            None => false,
        };
        (i, ok)
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(i, _)| i)
        .collect()
}

/// What a rebalance has left: per shard of the span, its moves (or unreachable).
pub struct Progress {
    pub state: ClusterState,
    pub moves: Vec<(Symbol, u32, u32)>,
    pub unreachable: Vec<u32>,
}

/// Asks every pod of the span for its moves left.
pub async fn progress(node: &Arc<Node>) -> Progress {
    let state = node.placement().state();
    let me = node.placement().me();
    let mut moves = Vec::new();
    let mut unreachable = Vec::new();
    if state.target.is_some() {
        match node.committer().moves().await {
            Ok(l) => moves.extend(l.into_iter().map(|(s, to)| (s, me, to))),
            Err(_) => unreachable.push(me),
        }
        let span = node.cluster().map_or(1, |c| c.span());
        let calls = (0..span).filter(|i| *i != me).map(|i| async move {
            match node.cluster().and_then(|c| c.peer(i)) {
                Some(p) => (i, p.moves().await.ok()),
                None => (i, None),
            }
        });
        for (i, r) in futures_util::future::join_all(calls).await {
            match r {
                // (a pod behind this one's state has not started its moves)
                Some((s, l)) if s.version >= state.version => moves.extend(l),
                Some(_) | None => unreachable.push(i),
            }
        }
    }
    moves.sort_by_key(|(s, _, _)| *s);
    Progress {
        state,
        moves,
        unreachable,
    }
}

/// Shard 0 drives every rebalance to its commit: no moves left anywhere →
/// seal → none still → commit (see the module doc).
async fn drive(node: Arc<Node>, stop: CancellationToken) {
    let mut changes = node.placement().watch();
    // A committed state some pods have not taken yet, and the span to tell.
    let mut unsent: Option<(ClusterState, u32)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changes.changed() => {}
            () = tokio::time::sleep(POLL * 2) => {}
        }
        let state = node.placement().state();
        if let Some((done, span)) = unsent
            && done == state
        {
            let missed = push_everywhere(&node, done, false, span).await;
            unsent = (!missed.is_empty()).then_some((done, span));
        }
        // (the span before a commit: pods beyond the new count hear it too)
        let span = node.cluster().map_or(1, |c| c.span());
        let Some(target) = state.target else { continue };
        if !node.is_ready() {
            continue;
        }
        let p = progress(&node).await;
        if !p.unreachable.is_empty() {
            // (a pod that missed the target, or was down: offer it again)
            push_everywhere(&node, state, false, span).await;
        }
        if !p.unreachable.is_empty() || !p.moves.is_empty() || p.state != state {
            continue;
        }
        // Seal: no new symbol is created behind the last move.
        if let Err(e) = node.adopt_state(state, true).await {
            tracing::warn!(error = %e, "sealing the rebalance failed");
            continue;
        }
        let missed = push_everywhere(&node, state, true, span).await;
        if !missed.is_empty() {
            tracing::info!(?missed, "rebalance: not every pod sealed yet");
            continue;
        }
        let p = progress(&node).await;
        if !p.unreachable.is_empty() || !p.moves.is_empty() || p.state != state {
            continue;
        }
        let done = ClusterState {
            version: state.version + 1,
            committed: target,
            target: None,
        };
        // Pods beyond the new count first: this pod's links to them end
        // with its own commit.
        let mut missed = push_to(&node, done, false, target..span).await;
        if let Err(e) = node.adopt_state(done, false).await {
            tracing::warn!(error = %e, "committing the rebalance failed");
            continue;
        }
        missed.extend(push_to(&node, done, false, 0..target.min(span)).await);
        missed.sort_unstable();
        let span = span.min(target);
        tracing::info!(from = state.committed, to = target, ?missed, "rebalance committed");
        unsent = (!missed.is_empty()).then_some((done, span));
        node.moves.set_error(None);
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use rust_decimal::Decimal;

    use super::*;
    use crate::{domain::Epoch, store::SymbolRecord};

    /// The whole state of `sym` with ticks 1..=`n`, as an old owner sends it.
    fn hand_over(sym: Symbol, n: u64, attempt: u64) -> MovePart {
        let ticks: Vec<Tick> = (1..=n)
            .map(|seq| Tick {
                symbol: sym,
                seq,
                ts: 1_732_530_000_000_000 + seq as i64,
                price: Decimal::new(6_701_200 + seq as i64, 2),
                size: Decimal::new(10, 3),
                bid: None,
                ask: None,
                bid_size: None,
                ask_size: None,
            })
            .collect();
        let record = SymbolRecord {
            symbol: sym,
            epoch: Epoch::random(),
            last_seq: n,
            last: ticks.last().copied(),
            candles: [None; 3],
        };
        let mut part = MovePart::new(sym, 1, attempt, ticks, Vec::new());
        part.last = Some((record, Vec::new()));
        part
    }

    /// A hand-over whose call is dropped during its import (the old owner
    /// went away) still ends: the import lands, the symbol is settled and
    /// read from its whole copy, and the hand-over's notes are gone. Before,
    /// dropping the call dropped the import's waiter with them: the
    /// `Importing` note stayed (refusing every later hand-over of the symbol
    /// as "being imported"), and the symbol was settled before its copy was
    /// durable (reads answered from the empty copy).
    #[tokio::test]
    async fn a_hand_over_dropped_during_its_import_still_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = crate::node::test_node(dir.path(), 1, 1_000);
        let sym = Symbol::parse("MOVED-1").expect("symbol");
        let mut call = Box::pin(receive_move(
            &node,
            futures_util::stream::iter([Ok(hand_over(sym, 3, 7))]),
        ));
        // One poll takes the whole state and spawns the import (a task on
        // this thread's runtime: it runs only once the test yields).
        let waker = futures_util::task::noop_waker();
        assert!(
            matches!(call.as_mut().poll(&mut Context::from_waker(&waker)), Poll::Pending),
            "the import finished within one poll"
        );
        assert!(
            matches!(node.moves.incoming().get(&sym), Some(Incoming::Importing(_))),
            "the import has begun"
        );
        drop(call);
        // The import runs until it waits for the committer: the symbol is
        // D's now, and unsettled (it cannot be settled again before the
        // task runs once more, which needs this test to yield).
        tokio::task::yield_now().await;
        assert!(
            node.placement().is_unsettled(&sym),
            "settled before the import is durable"
        );
        match node.read_ticks(sym, 1, 3, 10).await {
            Err(Error::Unavailable(_)) => {}
            other => panic!("a read during the import: {other:?}"),
        }

        let ended = async {
            while node.moves.incoming().contains_key(&sym) || node.placement().is_unsettled(&sym) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), ended)
            .await
            .expect("the dropped hand-over's import never ended");
        let ticks = node.read_ticks(sym, 1, 3, 10).await.expect("read the imported ticks");
        assert_eq!(ticks.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(ticks[2].price, Decimal::new(6_701_203, 2));

        // A later hand-over of the symbol is not refused as "being imported":
        // it meets the copy this pod now holds.
        let again = receive_move(&node, futures_util::stream::iter([Ok(hand_over(sym, 3, 8))])).await;
        match again {
            Err(Error::Refused { message, .. }) => assert!(message.contains("already holds"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    /// A hand-over that sends a part and then nothing leaves no note behind,
    /// whether its call is dropped (the stream reset) or it runs out of
    /// time ([`MOVE_DEADLINE`], then its place among [`MAX_INCOMING`] is
    /// free again). Before, a dropped call left its `Receiving` note for
    /// good: one per symbol, without bound, and no deadline on this side.
    #[tokio::test(start_paused = true)]
    async fn a_hand_over_that_stops_sending_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = crate::node::test_node(dir.path(), 1, 1_000);
        let sym = Symbol::parse("MOVED-2").expect("symbol");
        let stalled = |attempt| {
            let mut part = hand_over(sym, 3, attempt);
            part.last = None;
            futures_util::stream::iter([Ok(part)]).chain(futures_util::stream::pending())
        };
        // dropped while it waits for the next part
        let mut call = Box::pin(receive_move(&node, stalled(9)));
        let waker = futures_util::task::noop_waker();
        assert!(matches!(
            call.as_mut().poll(&mut Context::from_waker(&waker)),
            Poll::Pending
        ));
        assert!(matches!(node.moves.incoming().get(&sym), Some(Incoming::Receiving(9))));
        drop(call);
        assert!(node.moves.incoming().is_empty(), "the dropped hand-over's note stayed");
        // left to run out of time
        let timed = tokio::time::timeout(MOVE_DEADLINE * 2, receive_move(&node, stalled(10)));
        match timed.await.expect("no deadline on the receiving side") {
            Err(Error::Unavailable(m)) => assert!(m.contains("did not arrive"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(node.moves.incoming().is_empty());
        assert_eq!(node.moves.receiving.available_permits(), MAX_INCOMING);
    }

    /// A MoveStatus calls off only the hand-over it asks about: one of
    /// another attempt (stale, or made up by any peer) leaves a hand-over
    /// in flight to import. Before, any MoveStatus of the symbol removed
    /// its note and the hand-over was then refused as "called off".
    #[tokio::test]
    async fn a_move_status_calls_off_only_its_own_attempt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = crate::node::test_node(dir.path(), 1, 1_000);
        let waker = futures_util::task::noop_waker();
        for (name, asked, attempt) in [("MOVED-3", 42, 11), ("MOVED-4", 12, 12)] {
            let sym = Symbol::parse(name).expect("symbol");
            // the ticks first, the state in a second part, sent later
            let mut ticks = hand_over(sym, 3, attempt);
            let mut state = MovePart::new(sym, 1, attempt, Vec::new(), Vec::new());
            state.last = ticks.last.take();
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(Ok(ticks)).await.expect("send");
            let parts = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|p| (p, rx))
            }));
            let mut call = Box::pin(receive_move(&node, parts));
            assert!(call.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
            assert!(matches!(node.moves.incoming().get(&sym), Some(Incoming::Receiving(a)) if *a == attempt));

            let held = move_status(&node, sym, Epoch::random(), 3, asked)
                .await
                .expect("status");
            assert!(!held, "{name}: held before its state came");
            tx.send(Ok(state)).await.expect("send");
            let result = tokio::time::timeout(Duration::from_secs(20), call)
                .await
                .expect("the hand-over never ended");
            match (asked == attempt, result) {
                (false, Ok(3)) => {
                    let seqs: Vec<u64> = node
                        .read_ticks(sym, 1, 3, 10)
                        .await
                        .expect("read")
                        .iter()
                        .map(|t| t.seq)
                        .collect();
                    assert_eq!(seqs, vec![1, 2, 3]);
                }
                (true, Err(Error::Unavailable(m))) => assert!(m.contains("called off"), "{m}"),
                (own, other) => panic!("{name} (its own attempt asked: {own}): {other:?}"),
            }
        }
    }

    /// Hand-overs together hold at most the budget: one arriving while the
    /// others hold (nearly) all of it is answered `unavailable` and holds
    /// nothing; once they are done it is taken, and an import gives back
    /// what it held. Before, sixteen hand-overs of up to 8M ticks each
    /// could be held at once.
    #[tokio::test]
    async fn hand_overs_hold_at_most_the_budget() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = crate::node::test_node(dir.path(), 1, 1_000);
        let budget = node.moves.budget_bytes;
        assert!(budget >= MOVE_IN_BYTES && budget >= max_move_bytes(1_000));
        assert_eq!(node.moves.budget.available_permits(), budget);
        let sym = Symbol::parse("MOVED-5").expect("symbol");
        // (others hold all but two ticks' worth)
        let others = node
            .moves
            .budget
            .clone()
            .try_acquire_many_owned(u32::try_from(budget - 2 * std::mem::size_of::<Tick>()).expect("u32"))
            .expect("take the budget");
        let refused = receive_move(&node, futures_util::stream::iter([Ok(hand_over(sym, 3, 21))])).await;
        match refused {
            Err(Error::Unavailable(m)) => assert!(m.contains("MiB of hand-overs"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(node.moves.incoming().is_empty());
        assert_eq!(node.moves.budget.available_permits(), 2 * std::mem::size_of::<Tick>());
        drop(others);
        let taken = receive_move(&node, futures_util::stream::iter([Ok(hand_over(sym, 3, 22))])).await;
        assert_eq!(taken.expect("taken once the budget is free"), 3);
        assert_eq!(
            node.moves.budget.available_permits(),
            budget,
            "the import kept its bytes"
        );
    }
}
