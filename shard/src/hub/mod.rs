//! The fan-out core: per-symbol subscriber registries and bounded outboxes.
//!
//! A [`SymbolHub`] holds a symbol's published head (epoch, seq, latest tick,
//! current candles) and its subscriptions, under one mutex. Publishing a chunk
//! and attaching a subscriber both happen under that lock, which is what makes
//! "snapshot at seq S, then every tick after S" gapless and duplicate-free.
//!
//! The lock is taken once per symbol per group commit, never per tick; each
//! subscriber receives one `Arc<Chunk>` per commit, never a copy of the ticks.
//! The hub is protocol-agnostic: sinks are WebSocket connections, gRPC streams
//! or peer followers alike.

mod chunk;
mod entries;
mod outbox;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard, RwLock},
};

pub use chunk::{APPROX_TICK_BYTES, CandleData, Chunk, Data, Encoded, Format, Frames, SnapshotData};
pub use outbox::{AfterWrite, Close, DirectWrite, Msg, Outbox};

use crate::domain::{Candle, Epoch, Interval, Symbol, Tick};

/// A subscription channel (contract §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Ticks,
    Candles(Interval),
}

impl Channel {
    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "ticks" => Some(Channel::Ticks),
            _ => s
                .strip_prefix("candles:")
                .and_then(Interval::parse)
                .map(Channel::Candles),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Ticks => "ticks",
            Channel::Candles(Interval::S1) => "candles:1s",
            Channel::Candles(Interval::M1) => "candles:1m",
            Channel::Candles(Interval::H1) => "candles:1h",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of offering data to a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Over its limit: the data was not queued (see [`outbox`] docs).
    Stalled,
    /// The subscriber is gone; drop the subscription.
    Gone,
}

/// How an offer meets a sink's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Within the limit, for this subscription. Refused past it
    /// ([`Push::Stalled`]), and then the sink has already named the
    /// subscription for a conflated snapshot once the client catches up, in
    /// the step that refused it: the writer's repair cannot run in between
    /// and miss it.
    Within(Symbol, Channel),
    /// Regardless of the limit (small, rate-bounded items).
    Forced,
}

/// Where a subscription's data goes. Implemented by [`Outbox`].
pub trait Sink: Send + Sync {
    fn id(&self) -> u64;
    /// Queues `d` (see [`Offer`]) without waking its writer; the second
    /// value: [`wake`](Sink::wake) is owed.
    fn offer(&self, d: Data, how: Offer) -> (Push, bool);
    /// Wakes the writer after an [`offer`](Sink::offer) that asked for it.
    fn wake(&self);
    /// Writes the queued ticks straight to the client if its writer is idle
    /// and the sink can ([`Outbox::write_or_wake`]), else wakes it.
    fn write_or_wake(&self) {
        self.wake();
    }

    /// Queues `d` regardless of the limit (small, rate-bounded items) and
    /// wakes the writer.
    fn force(&self, d: Data) -> Push {
        let (r, wake) = self.offer(d, Offer::Forced);
        if wake {
            self.wake();
        }
        r
    }
}

/// Writers owed a wake-up: the fan-out queues a commit's data to every
/// subscriber under the symbol locks, acks the commit, and only then wakes
/// the writers ([`Wakes::wake_all`], on the committer's waker thread), so an
/// ack never waits for the subscribers. One vector per commit that has
/// subscribers to wake, not one per tick or per subscriber.
#[derive(Default)]
pub struct Wakes(Vec<Arc<dyn Sink>>);

impl Wakes {
    /// Wakes every writer owed a wake-up.
    pub fn wake_all(&mut self) {
        for s in self.0.drain(..) {
            s.wake();
        }
    }

    /// Writes straight to the idle clients that allow it and wakes the
    /// others ([`Sink::write_or_wake`]) until `behind` (asked before each
    /// client) says more work waits for this thread; from then on only wakes,
    /// so that the rest is written by the writers, in parallel.
    pub fn write_or_wake_all(&mut self, behind: impl Fn() -> bool) {
        let mut direct = true;
        for s in self.0.drain(..) {
            direct = direct && !behind();
            if direct {
                s.write_or_wake();
            } else {
                s.wake();
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn push(&mut self, s: Arc<dyn Sink>) {
        self.0.push(s);
    }

    /// Moves `other`'s wake-ups into these (several commits woken as one).
    pub fn append(&mut self, other: &mut Wakes) {
        self.0.append(&mut other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The published state of a symbol as a subscriber first sees it.
#[derive(Clone, Copy, Debug)]
pub struct Head {
    pub epoch: Epoch,
    pub seq: u64,
    pub last: Option<Tick>,
    pub candles: [Option<Candle>; 3],
}

struct Entry {
    sink: Arc<dyn Sink>,
    /// `sink.id()`, kept here (no call through the sink to find an entry).
    sink_id: u64,
    channel: Channel,
    /// Data was refused while the client was behind; no more is sent until the
    /// writer repairs the subscription with a conflated snapshot.
    needs_snapshot: bool,
    /// Set while the subscription is being set up (history replay): live data
    /// is held here so it follows the replay in order.
    pending: Option<Pending>,
    /// The sink refused data as gone; removed at the end of the delivery.
    gone: bool,
    /// Deliver only ticks with a higher seq (a client resuming ahead of this
    /// pod's mirror of the symbol already has them).
    after: u64,
}

#[derive(Default)]
struct Pending {
    items: Vec<Data>,
    bytes: usize,
    overflow: bool,
}

struct State {
    head: Head,
    /// Bit `i`: the current candle of `Interval::ALL[i]` changed and has not
    /// been sent to candle subscribers yet.
    candle_dirty: u8,
    entries: entries::Entries,
    /// The committer forgot the symbol (it never had a tick): nothing may
    /// attach any more; a new subscribe gets a new hub and epoch.
    retired: bool,
}

pub struct SymbolHub {
    symbol: Symbol,
    /// A mirror of a symbol owned by another shard, fed by a peer follow.
    /// Changes when the symbol moves between shards (contract §9).
    foreign: std::sync::atomic::AtomicBool,
    pending_limit: usize,
    state: Mutex<State>,
}

impl SymbolHub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn symbol(&self) -> Symbol {
        self.symbol
    }

    pub fn is_foreign(&self) -> bool {
        self.foreign.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The symbol was handed over to another shard: from now on this hub is
    /// its mirror (subscribers stay attached and see the new owner's ticks,
    /// which continue the seq).
    pub fn hand_over(&self) {
        self.foreign.store(true, std::sync::atomic::Ordering::Release);
    }

    /// This shard took the symbol over (at `epoch`, with retained `ticks`
    /// ending at its head). A mirror it had is brought up to the head (its
    /// subscribers get the ticks it lacked, in order) and becomes the
    /// owner's hub.
    pub fn take_over(&self, epoch: Epoch, ticks: &[Tick], candles: [Option<Candle>; 3]) {
        let head = self.head();
        if head.epoch != epoch && !head.epoch.is_none() {
            tracing::warn!(symbol = %self.symbol, mirror = %head.epoch, owner = %epoch, "a mirror of another epoch became the owner's hub");
        }
        if head.epoch != epoch {
            self.reset(epoch, ticks.last().copied());
        } else {
            let missing: Vec<Tick> = ticks.iter().filter(|t| t.seq > head.seq).copied().collect();
            if !missing.is_empty() {
                self.publish(Arc::new(Chunk::new(self.symbol, missing)), &[], candles);
            }
        }
        self.lock().head.candles = candles;
        self.foreign.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Publishes ticks received from the owner (a mirror); candles unchanged.
    pub fn publish_ticks(&self, chunk: Arc<Chunk>) {
        let current = self.lock().head.candles;
        self.publish(chunk, &[], current);
    }

    /// Publishes a candle received from the owner (a mirror): closed ones are
    /// forced through, updates are already conflated by the owner.
    pub fn publish_candle(&self, candle: Candle, closed: bool) {
        let mut st = self.lock();
        let st = &mut *st;
        if !closed {
            st.head.candles[candle.interval.index()] = Some(candle);
        }
        let limit = self.pending_limit;
        let mut gone = false;
        let event = CandleData::new(candle, closed);
        for e in st.entries.iter_mut() {
            if e.channel == Channel::Candles(candle.interval) {
                let d = Data::Candle(event.clone());
                e.gone = deliver(e, self.symbol, d, closed, limit, None);
                gone |= e.gone;
            }
        }
        if gone {
            st.entries.remove_gone();
        }
    }

    /// The owner could not resume this mirror from where it was: it starts over
    /// at `last` (epoch `epoch`). Tick subscribers get a conflated snapshot, so
    /// they know they missed data.
    pub fn reset(&self, epoch: Epoch, last: Option<Tick>) {
        let mut st = self.lock();
        let st = &mut *st;
        st.head.epoch = epoch;
        st.head.seq = last.map_or(0, |t| t.seq);
        st.head.last = last;
        let head = st.head;
        for e in st.entries.iter_mut().filter(|e| e.channel == Channel::Ticks) {
            match &mut e.pending {
                Some(p) => {
                    p.items.clear();
                    p.overflow = true;
                }
                None => resnapshot(e, &head),
            }
        }
    }

    /// Tells every subscriber that the owner is unreachable.
    pub fn notify_unavailable(&self) {
        let st = self.lock();
        // (once per sink, which may have several channels of the symbol)
        let mut told = std::collections::HashSet::new();
        for e in st.entries.iter().filter(|e| e.pending.is_none()) {
            if told.insert(e.sink_id) {
                e.sink.force(Data::Unavailable(self.symbol));
            }
        }
    }

    pub fn head(&self) -> Head {
        self.lock().head
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().entries.len()
    }

    /// Publishes committed data: `chunk` (may be empty of ticks), the candles it
    /// closed (oldest first) and the new current candles. Returns true if a
    /// current candle changed and the hub was not yet in the dirty list.
    pub fn publish(&self, chunk: Arc<Chunk>, closed: &[Candle], current: [Option<Candle>; 3]) -> bool {
        self.publish_inner(chunk, closed, current, None)
    }

    /// [`publish`](Self::publish), leaving the subscribers' wake-ups in
    /// `wakes`: the head moves and every subscriber's queue gets the data
    /// under the symbol lock (so attach stays gapless), the writers wake when
    /// the caller says.
    pub fn publish_deferred(
        &self,
        chunk: Arc<Chunk>,
        closed: &[Candle],
        current: [Option<Candle>; 3],
        wakes: &mut Wakes,
    ) -> bool {
        self.publish_inner(chunk, closed, current, Some(wakes))
    }

    fn publish_inner(
        &self,
        chunk: Arc<Chunk>,
        closed: &[Candle],
        current: [Option<Candle>; 3],
        mut wakes: Option<&mut Wakes>,
    ) -> bool {
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(t) = chunk.ticks.last() {
            st.head.seq = t.seq;
            st.head.last = Some(*t);
        }
        let was_dirty = st.candle_dirty != 0;
        for i in Interval::ALL {
            if current[i.index()] != st.head.candles[i.index()] {
                st.candle_dirty |= 1 << i.index();
            }
        }
        st.head.candles = current;
        let symbol = self.symbol;
        let limit = self.pending_limit;
        let mut gone = false;
        // (each closed candle made once for all its subscribers, when the
        // first one is met: nothing allocated without one)
        let mut closed_events: Vec<Arc<CandleData>> = Vec::new();
        for e in st.entries.iter_mut() {
            match e.channel {
                Channel::Ticks if !chunk.ticks.is_empty() => {
                    let d = Data::Ticks {
                        chunk: chunk.clone(),
                        from: 0,
                    };
                    e.gone = deliver(e, symbol, d, false, limit, wakes.as_deref_mut());
                    gone |= e.gone;
                }
                Channel::Candles(i) => {
                    if closed_events.is_empty() && !closed.is_empty() {
                        closed_events = closed.iter().map(|c| CandleData::new(*c, true)).collect();
                    }
                    for c in closed_events.iter().filter(|c| c.candle.interval == i) {
                        let d = Data::Candle(c.clone());
                        e.gone |= deliver(e, symbol, d, true, limit, wakes.as_deref_mut());
                        gone |= e.gone;
                    }
                }
                Channel::Ticks => {}
            }
        }
        if gone {
            st.entries.remove_gone();
        }
        !was_dirty && st.candle_dirty != 0
    }

    /// Sends changed current candles to candle subscribers (called at most 10
    /// times a second per symbol by the candle ticker).
    pub fn flush_candles(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let dirty = std::mem::take(&mut st.candle_dirty);
        if dirty == 0 {
            return;
        }
        let limit = self.pending_limit;
        // each changed candle made once for all its subscribers, when the
        // first one is met
        let mut events: [Option<Arc<CandleData>>; 3] = Default::default();
        for e in st.entries.iter_mut() {
            if let Channel::Candles(i) = e.channel
                && dirty & (1 << i.index()) != 0
                && let Some(c) = st.head.candles[i.index()]
            {
                let event = events[i.index()].get_or_insert_with(|| CandleData::new(c, false));
                let d = Data::Candle(event.clone());
                deliver(e, self.symbol, d, false, limit, None);
            }
        }
    }

    /// Registers `sink` for `channel` in setup mode (live data is held) and
    /// returns the head it starts from. An existing subscription of the same
    /// sink and channel is replaced. `None` if the hub was retired (its
    /// symbol forgotten): ask the node for the symbol's hub again.
    pub fn attach(&self, sink: Arc<dyn Sink>, channel: Channel) -> Option<Head> {
        let mut st = self.lock();
        if st.retired {
            return None;
        }
        let sink_id = sink.id();
        st.entries.put(Entry {
            sink,
            sink_id,
            channel,
            needs_snapshot: false,
            pending: Some(Pending::default()),
            gone: false,
            after: 0,
        });
        Some(st.head)
    }

    /// Makes a subscription skip ticks up to `seq` (see [`Entry::after`]).
    pub fn deliver_after(&self, sink_id: u64, channel: Channel, seq: u64) {
        let mut st = self.lock();
        if let Some(e) = st.entries.find(sink_id, channel) {
            e.after = seq;
        }
    }

    /// Gives up a replay that cannot be served: drops held data and returns the
    /// current head, from which the caller sends a snapshot instead.
    pub fn restart_from_head(&self, sink_id: u64, channel: Channel) -> Head {
        let mut st = self.lock();
        if let Some(e) = st.entries.find(sink_id, channel) {
            e.pending = Some(Pending::default());
        }
        st.head
    }

    /// Ends setup mode: held live data is queued after what the caller sent. If
    /// held data overflowed (or `lost` is set: the replay found a gap), a
    /// conflated snapshot of the current head is sent instead.
    pub fn activate(&self, sink_id: u64, channel: Channel, lost: bool) {
        let mut st = self.lock();
        let st = &mut *st;
        let head = st.head;
        let Some(e) = st.entries.find(sink_id, channel) else {
            return;
        };
        let Some(p) = e.pending.take() else { return };
        if p.overflow || lost {
            resnapshot(e, &head);
            return;
        }
        // Held data continues the catch-up the caller just sent (paced by the
        // queue's room): it is forced through rather than conflated. It is
        // bounded by the pending limit.
        for d in p.items {
            deliver(e, self.symbol, d, true, usize::MAX, None);
        }
    }

    /// Sends a conflated snapshot to a subscription that fell behind.
    pub fn repair(&self, sink_id: u64, channel: Channel) {
        tracing::debug!(symbol = %self.symbol, sink = sink_id, %channel, "client caught up after a stall: conflated snapshot");
        let mut st = self.lock();
        let st = &mut *st;
        let head = st.head;
        if let Some(e) = st.entries.find(sink_id, channel)
            && e.needs_snapshot
            && e.pending.is_none()
        {
            resnapshot(e, &head);
        }
    }

    /// Whether `sink_id` is subscribed to `channel` here (attached, not yet
    /// detached).
    pub fn holds(&self, sink_id: u64, channel: Channel) -> bool {
        self.lock().entries.find(sink_id, channel).is_some()
    }

    /// Queues `d` (a subscription's initial data: snapshot, candle, replay
    /// page) for `sink_id`'s `channel` subscription if it is still attached,
    /// under the lock a detach takes: a subscription detached first gets
    /// nothing, one detached after gets it before anything that follows its
    /// detach. False if it is no longer attached.
    pub fn send_initial(&self, sink_id: u64, channel: Channel, d: Data) -> bool {
        match self.lock().entries.find(sink_id, channel) {
            Some(e) => {
                e.sink.force(d);
                true
            }
            None => false,
        }
    }

    pub fn detach(&self, sink_id: u64, channel: Channel) {
        self.lock().entries.remove(sink_id, channel);
    }
}

/// Sends the head as a conflated snapshot (ticks) or current candle.
fn resnapshot(e: &mut Entry, head: &Head) {
    e.needs_snapshot = false;
    let d = match e.channel {
        Channel::Ticks => head.last.map(|tick| {
            Data::Snapshot(Box::new(SnapshotData {
                epoch: head.epoch,
                tick,
                conflated: true,
            }))
        }),
        Channel::Candles(i) => head.candles[i.index()].map(|candle| Data::Candle(CandleData::new(candle, false))),
    };
    if let Some(d) = d {
        e.sink.force(d);
    }
}

/// Offers `d` to one subscription; returns true if its sink is gone.
///
/// With `wakes`, the writer's wake-up is left to the caller (see [`Wakes`]);
/// without, it is woken at once.
fn deliver(
    e: &mut Entry,
    symbol: Symbol,
    d: Data,
    force: bool,
    pending_limit: usize,
    wakes: Option<&mut Wakes>,
) -> bool {
    let d = match d {
        Data::Ticks { chunk, from } if e.after > 0 => {
            // skip the ticks the subscriber already has
            let first = chunk.first_seq();
            let from = from.max(e.after.saturating_add(1).saturating_sub(first).min(usize::MAX as u64) as usize);
            if from >= chunk.ticks.len() {
                return false;
            }
            Data::Ticks { chunk, from }
        }
        d => d,
    };
    if let Some(p) = &mut e.pending {
        if !p.overflow {
            p.bytes += d.weight();
            if p.bytes > pending_limit && !force {
                p.overflow = true;
                p.items.clear();
            } else {
                p.items.push(d);
            }
        }
        return false;
    }
    if e.needs_snapshot && !force {
        return false;
    }
    let how = if force {
        Offer::Forced
    } else {
        Offer::Within(symbol, e.channel)
    };
    let (r, wake) = e.sink.offer(d, how);
    if wake {
        match wakes {
            Some(w) => w.0.push(e.sink.clone()),
            None => e.sink.wake(),
        }
    }
    match r {
        Push::Queued => false,
        Push::Stalled => {
            // (the sink named it for repair; the repair takes this symbol's
            // lock, which the caller holds, so it sees this mark)
            e.needs_snapshot = true;
            false
        }
        Push::Gone => true,
    }
}

/// All symbols' hubs of this pod.
pub struct Hub {
    symbols: RwLock<HashMap<Symbol, Arc<SymbolHub>>>,
    candle_dirty: Mutex<Vec<Arc<SymbolHub>>>,
    pending_limit: usize,
}

impl Hub {
    /// `pending_limit`: bytes of live data held per subscription during setup.
    pub fn new(pending_limit: usize) -> Hub {
        Hub {
            symbols: RwLock::new(HashMap::new()),
            candle_dirty: Mutex::new(Vec::new()),
            pending_limit,
        }
    }

    pub fn get(&self, symbol: &Symbol) -> Option<Arc<SymbolHub>> {
        self.symbols
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(symbol)
            .cloned()
    }

    /// The hub of `symbol`, created with `head` if it does not exist yet.
    pub fn get_or_insert(&self, symbol: Symbol, head: impl FnOnce() -> Head) -> Arc<SymbolHub> {
        self.insert_with(symbol, false, head)
    }

    /// The mirror hub of a symbol owned by another shard.
    pub fn get_or_insert_foreign(&self, symbol: Symbol, head: impl FnOnce() -> Head) -> Arc<SymbolHub> {
        self.insert_with(symbol, true, head)
    }

    /// Removes `hub` (only if it is still the one registered).
    pub fn remove(&self, hub: &Arc<SymbolHub>) {
        let mut map = self.symbols.write().unwrap_or_else(|p| p.into_inner());
        if map.get(&hub.symbol).is_some_and(|h| Arc::ptr_eq(h, hub)) {
            map.remove(&hub.symbol);
        }
    }

    fn insert_with(&self, symbol: Symbol, foreign: bool, head: impl FnOnce() -> Head) -> Arc<SymbolHub> {
        if let Some(h) = self.get(&symbol) {
            return h;
        }
        let mut map = self.symbols.write().unwrap_or_else(|p| p.into_inner());
        map.entry(symbol)
            .or_insert_with(|| {
                Arc::new(SymbolHub {
                    symbol,
                    foreign: std::sync::atomic::AtomicBool::new(foreign),
                    pending_limit: self.pending_limit,
                    state: Mutex::new(State {
                        head: head(),
                        candle_dirty: 0,
                        entries: entries::Entries::default(),
                        retired: false,
                    }),
                })
            })
            .clone()
    }

    /// Retires `hub` and removes it if nothing is subscribed to it (atomic
    /// with respect to `attach`); false if it has subscribers.
    pub fn retire_if_unused(&self, hub: &Arc<SymbolHub>) -> bool {
        {
            let mut st = hub.lock();
            if !st.entries.is_empty() {
                return false;
            }
            st.retired = true;
        }
        self.remove(hub);
        true
    }

    /// Every hub of a symbol this shard owns, sorted by symbol.
    pub fn all(&self) -> Vec<Arc<SymbolHub>> {
        let mut v: Vec<_> = self
            .symbols
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|h| !h.is_foreign())
            .cloned()
            .collect();
        v.sort_by_key(|h| h.symbol);
        v
    }

    /// Records that `h` has unsent candle changes.
    pub fn mark_candles_dirty(&self, h: Arc<SymbolHub>) {
        self.candle_dirty.lock().unwrap_or_else(|p| p.into_inner()).push(h);
    }

    /// Sends all pending candle changes (the ≤ 10/s conflation tick).
    pub fn flush_candles(&self) {
        let dirty = std::mem::take(&mut *self.candle_dirty.lock().unwrap_or_else(|p| p.into_inner()));
        for h in dirty {
            h.flush_candles();
        }
    }

    /// Repairs a sink's stalled subscriptions (see [`outbox`]).
    pub fn repair(&self, sink_id: u64, stalled: &[(Symbol, Channel)]) {
        for (sym, ch) in stalled {
            if let Some(h) = self.get(sym) {
                h.repair(sink_id, *ch);
            }
        }
    }
}

#[cfg(test)]
mod tests;
