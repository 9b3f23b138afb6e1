//! The bounded queue between the fan-out and one client's writer task.
//!
//! Policy for a client that cannot keep up (contract §4), in one place:
//! 1. Data is queued while the client's unsent bytes (queued plus taken by the
//!    writer but not yet written) stay within `limit` (or the client has
//!    nothing unsent: one group commit's chunk may exceed the limit alone).
//! 2. Past it, the outbox *stalls*: new data is refused, the outbox names the
//!    refused subscription in its repair list (under its lock, in the step
//!    that refuses), and the hub marks it as needing a fresh snapshot.
//! 3. When the writer has drained below half the limit, it takes the list of
//!    stalled subscriptions and the hub sends each a `conflated` snapshot, after
//!    which live data flows again — no gap the client is not told about.
//! 4. A client stalled for longer than `slow` is closed with 1013.
//! 5. A client past the limit is not read either ([`Outbox::over_limit`])
//!    until it has caught up to half of it.
//!
//! Control messages (replies, pongs, closes), snapshots and closed candles
//! bypass the limit ([`Offer::Forced`], [`Outbox::control`]): they are what
//! the client asked for, or rare. Since a client past the limit is not read
//! (5), its memory is bounded by `limit` plus one request's replies, closed
//! candles and server pings until the 1013.

use std::{
    collections::VecDeque,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{Channel, Data, Offer, Push, Sink};
use crate::domain::Symbol;

/// Why a subscriber's connection is being closed, in domain terms. Each
/// protocol maps it once, at its edge: WebSocket close codes in `feed::ws`,
/// gRPC statuses in [`crate::wire::close_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// The client ended it (or its stream broke).
    Normal,
    /// The client stayed silent past the idle timeout.
    Idle,
    /// The client broke the protocol.
    Protocol,
    /// The client sent text that is not UTF-8.
    InvalidData,
    /// The client flooded past the message rate limits.
    Flood,
    /// The client sent a message over the size limit.
    TooBig,
    /// The server is restarting: come back (elsewhere) and resume.
    Restart,
    /// The client stayed behind too long: come back and resume.
    Slow,
    /// The client did not authenticate in time (contract §8).
    Unauthenticated,
    /// The client's token expired without a refresh (contract §8).
    TokenExpired,
}

/// The highest unsent-bytes level any outbox of this process reached.
static PEAK_BYTES: AtomicU64 = AtomicU64::new(0);

/// Records `peak` into the process-wide peak and its gauge (rare: on stalls
/// and when a connection ends).
fn record_peak(peak: usize) {
    let prev = PEAK_BYTES.fetch_max(peak as u64, Ordering::Relaxed);
    if peak as u64 > prev {
        metrics::gauge!(crate::metrics::CLIENT_QUEUE_PEAK).set(peak as f64);
    }
}

/// One entry of the queue: hub data or a protocol-specific control message
/// with its weight (what it counts against the client while unsent).
pub enum Msg<C> {
    Data(Data),
    Control(C, usize),
}

impl<C> Msg<C> {
    /// What it counts against the client while unsent: a writer reports the
    /// sum of what it wrote with [`Outbox::written`], control messages
    /// included (else their weight would stay counted for the connection's
    /// life, and a long-lived client would drift into a stall it never
    /// leaves).
    pub fn weight(&self) -> usize {
        match self {
            Msg::Data(d) => d.weight(),
            Msg::Control(_, w) => *w,
        }
    }
}

/// The writer's view after a write: whether stalled subscriptions need repair.
pub enum AfterWrite {
    Continue,
    /// The client caught up after a stall: send these subscriptions a fresh
    /// conflated snapshot via [`super::Hub::repair`].
    Repair(Vec<(Symbol, Channel)>),
}

/// A connection's way of writing queued ticks to its client without its
/// writer task ([`Outbox::write_or_wake`]). The protocol layer implements it
/// (plain-TCP WebSockets); the fan-out's waker thread calls it.
pub trait DirectWrite<C>: Send + Sync {
    /// Writes the ticks of `q` (every item is [`Data::Ticks`]) without
    /// blocking; `weight` is their queue weight. Returns false if the socket
    /// did not take every byte: the implementation keeps the rest, with
    /// `weight`, and the writer task (woken for it) writes that before
    /// anything else and releases the weight ([`Outbox::written`]).
    fn write(&self, q: &VecDeque<Msg<C>>, weight: usize) -> bool;
}

/// The direct writes of an outbox: the writer and the most queued bytes it
/// takes (more is left to the writer task, so a large backlog is written by
/// the runtime's workers, not one thread).
struct Direct<C> {
    writer: std::sync::Arc<dyn DirectWrite<C>>,
    max_bytes: usize,
}

pub struct Outbox<C> {
    id: u64,
    limit: usize,
    slow: Duration,
    /// Close at once instead of conflating (peer followers: they re-follow and
    /// resume without a gap, which a conflated snapshot would not give).
    close_on_stall: bool,
    state: Mutex<State<C>>,
    /// Wakes the writer (one waiter, so a permit is stored if it is busy).
    notify: Notify,
    /// Wakes history replays waiting for room.
    room: Notify,
}

struct State<C> {
    queue: VecDeque<Msg<C>>,
    /// Queued plus taken-but-unwritten bytes.
    bytes: usize,
    peak: usize,
    stalled_since: Option<Instant>,
    dirty: Vec<(Symbol, Channel)>,
    close: Option<Close>,
    /// The writer is gone: pushes are refused with `Push::Gone`.
    finished: bool,
    /// The writer task waits in `take` with nothing unsent: a direct write
    /// may go out.
    idle: bool,
    /// A direct write is going out: the writer task may not take the queue.
    writing: bool,
    /// A direct write left bytes unwritten, or a stall began during one: the
    /// writer task must take (even an empty queue), write the bytes first
    /// and report with [`Outbox::written`] (which repairs the stall), and no
    /// direct write goes out before it has.
    leftover: bool,
    direct: Option<Direct<C>>,
}

impl<C: Send + 'static> Outbox<C> {
    pub fn new(id: u64, limit: usize, slow: Duration) -> Outbox<C> {
        Outbox {
            id,
            limit,
            slow,
            close_on_stall: false,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                peak: 0,
                stalled_since: None,
                dirty: Vec::new(),
                close: None,
                finished: false,
                idle: false,
                writing: false,
                leftover: false,
                direct: None,
            }),
            notify: Notify::new(),
            room: Notify::new(),
        }
    }

    /// An outbox that closes with 1013 when it would stall (see the field).
    pub fn closing_on_stall(mut self) -> Outbox<C> {
        self.close_on_stall = true;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // A panic while holding this lock cannot leave the queue half-updated in
        // a way that matters more than losing the connection; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues `msg`; true if the queue was empty (the writer may be asleep
    /// and must be woken).
    fn enqueue_quiet(st: &mut State<C>, msg: Msg<C>, weight: usize) -> bool {
        let was_empty = st.queue.is_empty();
        st.queue.push_back(msg);
        st.bytes += weight;
        st.peak = st.peak.max(st.bytes);
        was_empty
    }

    fn enqueue(&self, st: &mut State<C>, msg: Msg<C>, weight: usize) {
        if Self::enqueue_quiet(st, msg, weight) {
            self.notify.notify_one();
        }
    }

    /// Queues data (see [`Offer`]) without waking the writer; the second
    /// value says whether the caller must [`wake`](Self::wake) it (the queue
    /// was empty). The fan-out uses this to ack a commit before it wakes the
    /// commit's subscribers.
    pub fn offer(&self, d: Data, how: Offer) -> (Push, bool) {
        let w = d.weight();
        let mut st = self.lock();
        if st.finished || st.close.is_some() {
            return (Push::Gone, false);
        }
        if let Offer::Within(symbol, channel) = how {
            if let Some(since) = st.stalled_since {
                if since.elapsed() >= self.slow {
                    drop(st);
                    self.close(Close::Slow);
                    return (Push::Gone, false);
                }
                st.dirty.push((symbol, channel));
                return (Push::Stalled, false);
            }
            // A client with nothing unsent is not behind: it takes any one chunk
            // (a big group commit can exceed the limit on its own).
            if st.bytes > 0 && st.bytes + w > self.limit {
                if self.close_on_stall {
                    drop(st);
                    self.close(Close::Slow);
                    return (Push::Gone, false);
                }
                st.stalled_since = Some(Instant::now());
                st.dirty.push((symbol, channel));
                record_peak(st.peak);
                metrics::counter!(crate::metrics::CONFLATIONS).increment(1);
                return (Push::Stalled, false);
            }
        }
        let wake = Self::enqueue_quiet(&mut st, Msg::Data(d), w);
        (Push::Queued, wake)
    }

    /// Wakes the writer (after [`offer`](Self::offer) asked for it).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Lets [`write_or_wake`](Self::write_or_wake) write up to `max_bytes`
    /// of queued ticks through `writer` (until [`finish`](Self::finish)).
    pub fn set_direct(&self, writer: std::sync::Arc<dyn DirectWrite<C>>, max_bytes: usize) {
        self.lock().direct = (max_bytes > 0).then_some(Direct { writer, max_bytes });
    }

    /// Like [`wake`](Self::wake), but if the writer task is idle (nothing
    /// unsent, waiting for data) and the queue holds only ticks, at most the
    /// direct-write bound of them, writes them straight to the client
    /// ([`DirectWrite`]) on this thread: no task wake-up and poll per
    /// delivery. The writer task is woken only for what that leaves (a
    /// partial write, messages queued meanwhile).
    pub fn write_or_wake(&self) {
        let mut st = self.lock();
        let writer = match &st.direct {
            Some(d)
                if st.idle
                    && !st.writing
                    && !st.leftover
                    && st.close.is_none()
                    && st.stalled_since.is_none()
                    && !st.finished
                    && st.bytes <= d.max_bytes
                    && !st.queue.is_empty()
                    && st.queue.iter().all(|m| matches!(m, Msg::Data(Data::Ticks { .. }))) =>
            {
                d.writer.clone()
            }
            _ => {
                drop(st);
                self.notify.notify_one();
                return;
            }
        };
        st.writing = true;
        let mut q = std::mem::take(&mut st.queue);
        // (idle with nothing left over: all that is unsent is this queue)
        let weight = st.bytes;
        drop(st);
        let complete = writer.write(&q, weight);
        q.clear();
        let mut st = self.lock();
        st.writing = false;
        if st.queue.is_empty() {
            // (keep the queue's allocation)
            std::mem::swap(&mut st.queue, &mut q);
        }
        let wake = if complete {
            st.bytes = st.bytes.saturating_sub(weight);
            if st.bytes <= self.limit / 2 {
                self.room.notify_waiters();
            }
            if st.stalled_since.is_some() {
                // a commit found the queue full meanwhile: the writer task
                // ends the stall (`written`: the repair snapshots)
                st.leftover = true;
            }
            // (a control message or a close that came meanwhile found the
            // writer held back: it is owed this wake-up)
            st.leftover || !st.queue.is_empty() || st.close.is_some()
        } else {
            st.leftover = true;
            true
        };
        drop(st);
        if wake {
            self.notify.notify_one();
        }
    }

    /// No more direct writes (the writer task has ended: the connection's
    /// write half must not outlive it here).
    pub fn end_direct(&self) {
        self.lock().direct = None;
    }

    pub fn control(&self, c: C, weight: usize) {
        let mut st = self.lock();
        if !st.finished {
            let behind = st.bytes > 0;
            self.enqueue(&mut st, Msg::Control(c, weight), weight);
            // Replies and snapshots are never refused, but a client whose
            // unsent data passes the limit on them is behind all the same,
            // as when a tick finds the queue full (and, as there, one that
            // had nothing unsent takes any one message): the slow-client
            // clock starts and its live data is conflated meanwhile, or,
            // for a sink never conflated (a peer's), it is closed.
            if behind && st.bytes > self.limit && st.stalled_since.is_none() && st.close.is_none() {
                if self.close_on_stall {
                    drop(st);
                    self.close(Close::Slow);
                    return;
                }
                st.stalled_since = Some(Instant::now());
                record_peak(st.peak);
                metrics::counter!(crate::metrics::CONFLATIONS).increment(1);
            }
        }
    }

    /// Asks the writer to close with `close`. Queued data is dropped (the client
    /// resumes elsewhere); queued control messages are still written first.
    pub fn close(&self, close: Close) {
        let mut st = self.lock();
        if st.close.is_some() || st.finished {
            return;
        }
        if close == Close::Slow {
            metrics::counter!(crate::metrics::SLOW_CLIENT_CLOSES).increment(1);
        }
        st.close = Some(close);
        self.room.notify_waiters();
        // Dropped data no longer counts against the client.
        let mut dropped = 0;
        st.queue.retain(|m| match m {
            Msg::Data(d) => {
                dropped += d.weight();
                false
            }
            Msg::Control(..) => true,
        });
        st.bytes = st.bytes.saturating_sub(dropped);
        drop(st);
        self.notify.notify_one();
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Closing, or its writer is gone: nobody will read what is queued.
    pub fn is_gone(&self) -> bool {
        let st = self.lock();
        st.close.is_some() || st.finished
    }

    /// Waits until there is something to write, then moves the whole queue into
    /// `out` (reusing its allocation). Returns the close request, if any; the
    /// writer writes `out` first, then closes.
    pub async fn take(&self, out: &mut VecDeque<Msg<C>>) -> Option<Close> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.lock();
                if !st.writing && (st.leftover || !st.queue.is_empty() || st.close.is_some()) {
                    st.idle = false;
                    st.leftover = false;
                    std::mem::swap(&mut st.queue, out);
                    return st.close;
                }
                st.idle = true;
            }
            notified.await;
        }
    }

    /// Waits until the unsent bytes are below half the limit (for history
    /// replay: the client's own backlog waits instead of conflating, and
    /// leaves the other half for live data, so a big resume never makes the
    /// live ticks of its other subscriptions stall).
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            {
                let st = self.lock();
                if st.bytes <= self.limit / 2 || st.finished || st.close.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Whether the client's unsent bytes are past its limit: its protocol's
    /// reader stops reading its requests until [`room`](Self::room), so
    /// that what it asks for (replies, pongs, snapshots: items the limit
    /// does not refuse) cannot pile up while it does not read.
    pub fn over_limit(&self) -> bool {
        self.lock().bytes > self.limit
    }

    /// The writer wrote items of total `weight`: release it and report whether
    /// a stall is over.
    pub fn written(&self, weight: usize) -> AfterWrite {
        let mut st = self.lock();
        st.bytes = st.bytes.saturating_sub(weight);
        if st.bytes <= self.limit / 2 {
            // wake a replay waiting for room
            self.room.notify_waiters();
        }
        if st.stalled_since.is_some() && st.bytes <= self.limit / 2 && st.close.is_none() {
            st.stalled_since = None;
            return AfterWrite::Repair(std::mem::take(&mut st.dirty));
        }
        AfterWrite::Continue
    }

    /// How long the client has been stalled, if it is.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.lock().stalled_since.map(|s| s.elapsed())
    }

    /// Closes ([`Close::Slow`]) if stalled for longer than the slow-client limit.
    pub fn check_slow(&self) -> bool {
        if self.stalled_for().is_some_and(|d| d >= self.slow) {
            self.close(Close::Slow);
            return true;
        }
        false
    }

    /// The writer is gone; refuse further pushes and free the queue.
    pub fn finish(&self) {
        let mut st = self.lock();
        record_peak(st.peak);
        st.finished = true;
        st.direct = None;
        st.queue.clear();
        st.bytes = 0;
        drop(st);
        self.room.notify_waiters();
    }

    /// The highest unsent-bytes level seen (for the memory-bound test and metrics).
    pub fn peak_bytes(&self) -> usize {
        self.lock().peak
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Queued plus taken-but-unwritten bytes.
    #[cfg(test)]
    pub(crate) fn unsent(&self) -> usize {
        self.lock().bytes
    }
}

impl<C: Send + 'static> Sink for Outbox<C> {
    fn id(&self) -> u64 {
        self.id
    }

    fn offer(&self, d: Data, how: Offer) -> (Push, bool) {
        Outbox::offer(self, d, how)
    }

    fn wake(&self) {
        Outbox::wake(self)
    }

    fn write_or_wake(&self) {
        Outbox::write_or_wake(self)
    }
}
