use std::{collections::VecDeque, sync::Arc, time::Duration};

use rust_decimal::Decimal;

use super::*;
use crate::domain::{Epoch, Symbol, Tick};

fn sym() -> Symbol {
    Symbol::parse("BTC-USD").unwrap()
}

fn tick(seq: u64) -> Tick {
    Tick {
        symbol: sym(),
        seq,
        ts: 1_700_000_000_000_000 + seq as i64 * 1_000,
        price: Decimal::new(100 + seq as i64, 0),
        size: Decimal::ONE,
        bid: None,
        ask: None,
        bid_size: None,
        ask_size: None,
    }
}

/// An offer within the limit, for the test symbol's ticks.
fn within() -> Offer {
    Offer::Within(sym(), Channel::Ticks)
}

fn chunk(seqs: std::ops::RangeInclusive<u64>) -> Arc<Chunk> {
    Arc::new(Chunk::new(sym(), seqs.map(tick).collect()))
}

fn hub_with_head(seq: u64) -> (Hub, Arc<SymbolHub>) {
    let hub = Hub::new(1 << 20);
    let h = hub.get_or_insert(sym(), || Head {
        epoch: Epoch::random(),
        seq,
        last: (seq > 0).then(|| tick(seq)),
        candles: [None; 3],
    });
    (hub, h)
}

/// What a writer would see: seqs of ticks and snapshots, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Tick(u64),
    Snap(u64, bool),
}

async fn drain(o: &Outbox<()>) -> Vec<Seen> {
    let mut q = VecDeque::new();
    let mut out = Vec::new();
    let _ = o.take(&mut q).await;
    let mut w = 0;
    for m in q.drain(..) {
        if let Msg::Data(d) = m {
            w += d.weight();
            match d {
                Data::Ticks { chunk, from } => out.extend(chunk.ticks[from..].iter().map(|t| Seen::Tick(t.seq))),
                Data::Snapshot(s) => out.push(Seen::Snap(s.tick.seq, s.conflated)),
                Data::Candle(_) | Data::Unavailable(_) => {}
            }
        }
    }
    if let AfterWrite::Repair(list) = o.written(w) {
        out.push(Seen::Snap(u64::MAX, list.is_empty()));
    }
    out
}

#[tokio::test]
async fn live_data_held_during_setup_follows_in_order() {
    let (_hub, h) = hub_with_head(10);
    let o: Arc<Outbox<()>> = Arc::new(Outbox::new(1, 1 << 20, Duration::from_secs(10)));
    let head = h.attach(o.clone(), Channel::Ticks).unwrap();
    assert_eq!(head.seq, 10);
    // ticks committed while the subscriber is being set up are held ...
    h.publish(chunk(11..=12), &[], [None; 3]);
    // ... the caller sends its initial data (here: a replay of 9..=10) ...
    o.force(Data::Ticks {
        chunk: chunk(9..=10),
        from: 0,
    });
    // ... and activation releases the held ticks after it.
    h.activate(1, Channel::Ticks, false);
    h.publish(chunk(13..=13), &[], [None; 3]);
    let seen = drain(&o).await;
    assert_eq!(seen, (9..=13).map(Seen::Tick).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stalled_subscriber_is_conflated_then_repaired_and_others_are_untouched() {
    let (hub, h) = hub_with_head(0);
    // room for ~3 ticks
    let slow: Arc<Outbox<()>> = Arc::new(Outbox::new(1, 3 * APPROX_TICK_BYTES, Duration::from_secs(10)));
    let fast: Arc<Outbox<()>> = Arc::new(Outbox::new(2, 1 << 20, Duration::from_secs(10)));
    for o in [&slow, &fast] {
        h.attach(o.clone(), Channel::Ticks);
        h.activate(o.id(), Channel::Ticks, false);
    }
    for s in 1..=10 {
        h.publish(chunk(s..=s), &[], [None; 3]);
    }
    assert_eq!(drain(&fast).await, (1..=10).map(Seen::Tick).collect::<Vec<_>>());
    // slow got 1..=3, then stalled; draining reports the repair list
    let seen = drain(&slow).await;
    assert_eq!(seen[..3], [Seen::Tick(1), Seen::Tick(2), Seen::Tick(3)]);
    assert_eq!(seen[3], Seen::Snap(u64::MAX, false), "repair requested");
    hub.repair(1, &[(sym(), Channel::Ticks)]);
    h.publish(chunk(11..=11), &[], [None; 3]);
    assert_eq!(drain(&slow).await, vec![Seen::Snap(10, true), Seen::Tick(11)]);
    assert!(slow.peak_bytes() <= slow.limit());
}

#[tokio::test]
async fn held_data_overflow_turns_into_a_conflated_snapshot() {
    let hub = Hub::new(2 * APPROX_TICK_BYTES);
    let h = hub.get_or_insert(sym(), || Head {
        epoch: Epoch::random(),
        seq: 0,
        last: None,
        candles: [None; 3],
    });
    let o: Arc<Outbox<()>> = Arc::new(Outbox::new(7, 1 << 20, Duration::from_secs(10)));
    h.attach(o.clone(), Channel::Ticks);
    for s in 1..=5 {
        h.publish(chunk(s..=s), &[], [None; 3]);
    }
    h.activate(7, Channel::Ticks, false);
    h.publish(chunk(6..=6), &[], [None; 3]);
    assert_eq!(drain(&o).await, vec![Seen::Snap(5, true), Seen::Tick(6)]);
}

#[tokio::test]
async fn a_client_stalled_too_long_is_closed_with_1013() {
    let (_hub, h) = hub_with_head(0);
    let o: Arc<Outbox<()>> = Arc::new(Outbox::new(1, APPROX_TICK_BYTES, Duration::ZERO));
    h.attach(o.clone(), Channel::Ticks);
    h.activate(1, Channel::Ticks, false);
    h.publish(chunk(1..=1), &[], [None; 3]);
    h.publish(chunk(2..=2), &[], [None; 3]); // stalls
    // the connection's supervisor checks periodically: stalled for >= 0 ms
    assert!(o.check_slow());
    let mut q = VecDeque::new();
    assert_eq!(o.take(&mut q).await, Some(Close::Slow));
    assert!(q.is_empty(), "queued data is dropped on close");
    // a closed sink refuses data; the hub drops it on the next forced delivery
    assert_eq!(
        o.force(Data::Ticks {
            chunk: chunk(3..=3),
            from: 0
        }),
        Push::Gone
    );
}

/// Replies a client asks for but does not read are never refused, but they
/// count: past the limit on them alone, the slow-client clock starts, its
/// live ticks are conflated meanwhile, and it is closed with 1013 when the
/// clock runs out (not only when a tick found the queue full).
#[tokio::test]
async fn replies_past_the_limit_start_the_slow_client_clock() {
    let (_hub, h) = hub_with_head(0);
    let o: Arc<Outbox<()>> = Arc::new(Outbox::new(1, 1_000, Duration::ZERO));
    h.attach(o.clone(), Channel::Ticks);
    h.activate(1, Channel::Ticks, false);
    o.control((), 600);
    assert!(o.stalled_for().is_none(), "within the limit");
    o.control((), 600);
    assert!(o.stalled_for().is_some(), "past the limit on replies alone");
    h.publish(chunk(1..=1), &[], [None; 3]);
    assert!(o.check_slow(), "closed when the clock runs out");
    let mut q = VecDeque::new();
    assert_eq!(o.take(&mut q).await, Some(Close::Slow));

    // One reply past the limit on its own, with nothing unsent before, is
    // taken (a large symbol list): no clock.
    let o: Outbox<()> = Outbox::new(2, 1_000, Duration::ZERO);
    o.control((), 5_000);
    assert!(o.stalled_for().is_none(), "one message is always taken");
    // A sink that is never conflated (a peer's follow) is closed instead.
    let o: Outbox<()> = Outbox::new(3, 1_000, Duration::from_secs(10)).closing_on_stall();
    o.control((), 600);
    o.control((), 600);
    assert!(o.stalled_for().is_none(), "never stalled");
    assert!(o.is_closing(), "closed");
}

/// A deferred publish queues to the outbox without waking its writer; the
/// writer parked in `take` sees the data once `Wakes::wake_all` runs, and a
/// control message queued behind the pending wake-up does not get lost.
#[tokio::test]
async fn a_deferred_publish_wakes_the_parked_writer_only_when_told() {
    use std::{future::Future as _, task::Poll};

    let (_hub, h) = hub_with_head(0);
    let o: Arc<Outbox<u8>> = Arc::new(Outbox::new(1, 1 << 20, Duration::from_secs(5)));
    assert!(h.attach(o.clone(), Channel::Ticks).is_some());
    h.activate(1, Channel::Ticks, false);

    let mut out = VecDeque::new();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        let mut poll = |cx: &mut std::task::Context<'_>| take.as_mut().poll(cx).is_ready();
        // the writer parks: nothing queued
        assert!(!std::future::poll_fn(|cx| Poll::Ready(poll(cx))).await);
        let mut wakes = Wakes::default();
        h.publish_deferred(chunk(1..=2), &[], [None; 3], &mut wakes);
        o.control(7, 1); // the queue is not empty: this one does not wake either
        assert_eq!(wakes.len(), 1, "one writer owed a wake-up");
        assert!(
            !std::future::poll_fn(|cx| Poll::Ready(poll(cx))).await,
            "not woken before the commit is acked"
        );
        wakes.wake_all();
        assert!(wakes.is_empty());
        assert!(std::future::poll_fn(|cx| Poll::Ready(poll(cx))).await, "woken");
    }
    assert!(matches!(out.pop_front(), Some(Msg::Data(Data::Ticks { .. }))));
    assert!(matches!(out.pop_front(), Some(Msg::Control(7, _))));
}

/// A client socket for direct writes: takes `room` more ticks, records them,
/// and reports the rest as left for the writer task; `during` runs inside
/// the write (what other threads do meanwhile).
struct Socket {
    written: std::sync::Mutex<Vec<u64>>,
    left: std::sync::Mutex<Vec<u64>>,
    room: std::sync::atomic::AtomicUsize,
    during: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Socket {
    fn new(room: usize) -> Arc<Socket> {
        Arc::new(Socket {
            written: Default::default(),
            left: Default::default(),
            room: room.into(),
            during: Default::default(),
        })
    }
    fn written(&self) -> Vec<u64> {
        self.written.lock().unwrap().clone()
    }
}

impl DirectWrite<u8> for Socket {
    fn write(&self, q: &VecDeque<Msg<u8>>, _weight: usize) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(f) = self.during.lock().unwrap().take() {
            f();
        }
        let mut left = self.left.lock().unwrap();
        left.clear();
        for m in q {
            let Msg::Data(Data::Ticks { chunk, from }) = m else {
                panic!("a direct write got more than ticks");
            };
            for t in &chunk.ticks[*from..] {
                if self.room.load(SeqCst) > 0 {
                    self.room.fetch_sub(1, SeqCst);
                    self.written.lock().unwrap().push(t.seq);
                } else {
                    left.push(t.seq);
                }
            }
        }
        left.is_empty()
    }
}

fn direct_outbox(socket: &Arc<Socket>, max_bytes: usize) -> Arc<Outbox<u8>> {
    let o: Arc<Outbox<u8>> = Arc::new(Outbox::new(1, 1 << 20, Duration::from_secs(5)));
    o.set_direct(socket.clone(), max_bytes);
    o
}

fn ticks(seqs: std::ops::RangeInclusive<u64>) -> Data {
    Data::Ticks {
        chunk: chunk(seqs),
        from: 0,
    }
}

/// Polls `fut` once with a no-op waker: whether it finished.
fn ready<F: std::future::Future>(fut: std::pin::Pin<&mut F>) -> bool {
    fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        .is_ready()
}

fn seqs(q: &VecDeque<Msg<u8>>) -> Vec<u64> {
    q.iter()
        .flat_map(|m| match m {
            Msg::Data(Data::Ticks { chunk, from }) => chunk.ticks[*from..].iter().map(|t| t.seq).collect(),
            Msg::Control(c, _) => vec![1000 + u64::from(*c)],
            Msg::Data(_) => vec![u64::MAX],
        })
        .collect()
}

/// An idle writer's ticks go straight to its socket, in order, and the
/// writer task is not woken; a writer that is not idle, a queue over the
/// bound, a queue with more than ticks, or no direct writer: woken instead.
#[test]
fn an_idle_writers_ticks_are_written_directly_and_it_is_not_woken() {
    let socket = Socket::new(usize::MAX);
    let o = direct_outbox(&socket, 4096);
    let mut out = VecDeque::new();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(!ready(take.as_mut()), "the writer parks: nothing queued");
        for n in [1, 3] {
            let (push, wake) = o.offer(ticks(n..=n + 1), within());
            assert!(matches!(push, Push::Queued) && wake);
            o.write_or_wake();
            assert!(!ready(take.as_mut()), "the writer was woken for a direct write");
        }
        assert_eq!(socket.written(), vec![1, 2, 3, 4]);
        assert_eq!(o.unsent(), 0, "what went out directly no longer counts");

        // more than the bound: the writer writes it
        let big = o.limit() / 2;
        let many = (big / APPROX_TICK_BYTES) as u64 + 10;
        assert!(o.offer(ticks(5..=4 + many), within()).1);
        o.write_or_wake();
        assert!(ready(take.as_mut()), "a queue over the bound wakes the writer");
    }
    assert_eq!(seqs(&out).first(), Some(&5));
    assert_eq!(socket.written().len(), 4);
    assert!(matches!(o.written(o.unsent()), AfterWrite::Continue));

    // the writer is busy (not in `take`): woken, nothing written around it
    out.clear();
    assert!(o.offer(ticks(100..=100), within()).1);
    o.write_or_wake();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(ready(take.as_mut()));
    }
    assert_eq!(seqs(&out), vec![100]);
    assert_eq!(socket.written().len(), 4);

    // a control message in the queue: the writer writes it all, in order
    out.clear();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(!ready(take.as_mut()));
        o.control(1, 1);
        assert!(ready(take.as_mut()));
    }
    out.clear();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(!ready(take.as_mut()));
        assert!(o.offer(ticks(101..=101), Offer::Forced).1);
        o.control(2, 1);
        o.write_or_wake();
        assert!(ready(take.as_mut()));
    }
    assert_eq!(seqs(&out), vec![101, 1002]);
    assert_eq!(socket.written().len(), 4, "nothing written directly");

    // without a direct writer (TLS, gRPC, peers), `write_or_wake` wakes
    let plain: Outbox<u8> = Outbox::new(2, 1 << 20, Duration::from_secs(5));
    let mut out = VecDeque::new();
    let mut take = std::pin::pin!(plain.take(&mut out));
    assert!(!ready(take.as_mut()));
    assert!(plain.offer(ticks(1..=1), within()).1);
    plain.write_or_wake();
    assert!(ready(take.as_mut()));
}

/// What the socket did not take is the writer task's, and goes out before
/// anything queued after it: the writer is woken even with an empty queue,
/// no direct write goes out until it has taken, and the weight stays
/// counted until it has written.
#[test]
fn a_partial_direct_write_leaves_the_rest_to_the_writer_before_anything_else() {
    let socket = Socket::new(1);
    let o = direct_outbox(&socket, 4096);
    let mut out = VecDeque::new();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(!ready(take.as_mut()));
        assert!(o.offer(ticks(1..=3), within()).1);
        let weight = o.unsent();
        o.write_or_wake();
        assert_eq!(socket.written(), vec![1]);
        assert_eq!(*socket.left.lock().unwrap(), vec![2, 3]);
        assert_eq!(o.unsent(), weight, "the rest still counts against the client");
        // the next commit before the writer ran: not written around the rest
        socket.room.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        assert!(o.offer(ticks(4..=4), within()).1);
        o.write_or_wake();
        assert_eq!(socket.written(), vec![1], "a direct write went out before the rest");
        assert!(ready(take.as_mut()), "the writer is woken for the rest");
    }
    assert_eq!(seqs(&out), vec![4], "the writer takes the queue after the rest");
    let all = o.unsent();
    assert!(matches!(o.written(all), AfterWrite::Continue));
    assert_eq!(o.unsent(), 0);

    // once the writer has taken it, direct writes resume
    out.clear();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(!ready(take.as_mut()));
        assert!(o.offer(ticks(5..=5), within()).1);
        o.write_or_wake();
        assert_eq!(socket.written(), vec![1, 5]);
        assert!(!ready(take.as_mut()));
    }
    assert_eq!(o.unsent(), 0);
}

/// A control message or a close that comes while a direct write goes out
/// does not let the writer task take the queue meanwhile (it would write
/// around the direct write), and wakes it once the write is done: nothing is
/// lost, nothing overtakes the ticks.
#[test]
fn what_comes_during_a_direct_write_follows_it() {
    type Taken = (Option<Close>, Vec<u64>);
    type Writer = std::pin::Pin<Box<dyn std::future::Future<Output = Taken> + Send>>;
    fn poll(w: &std::sync::Mutex<Writer>) -> Option<Taken> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match w.lock().unwrap().as_mut().poll(&mut cx) {
            std::task::Poll::Ready(t) => Some(t),
            std::task::Poll::Pending => None,
        }
    }
    for close in [false, true] {
        let socket = Socket::new(usize::MAX);
        let o = direct_outbox(&socket, 4096);
        let o2 = o.clone();
        let writer: Arc<std::sync::Mutex<Writer>> = Arc::new(std::sync::Mutex::new(Box::pin(async move {
            let mut out = VecDeque::new();
            let c = o2.take(&mut out).await;
            (c, seqs(&out))
        })));
        assert!(poll(&writer).is_none(), "the writer parks: nothing queued");
        let (o2, w2) = (o.clone(), writer.clone());
        *socket.during.lock().unwrap() = Some(Box::new(move || {
            o2.control(7, 1);
            if close {
                o2.close(Close::Restart);
            }
            // the writer task, woken by them, runs now
            assert!(poll(&w2).is_none(), "the writer took the queue during a direct write");
        }));
        assert!(o.offer(ticks(1..=2), within()).1);
        o.write_or_wake();
        assert_eq!(socket.written(), vec![1, 2]);
        let taken = poll(&writer).expect("the writer was not woken after the direct write");
        assert_eq!(taken, (close.then_some(Close::Restart), vec![1007]));
    }
}

/// A stall that begins during a direct write (a commit finds the queue
/// full with the write's bytes still counted) wakes the writer task when
/// the write is done, though its queue is empty, so that it reports and
/// the stall is repaired; and an empty queue is never written directly.
#[test]
fn a_stall_that_begins_during_a_direct_write_is_repaired_by_the_writer() {
    let socket = Socket::new(usize::MAX);
    let o = direct_outbox(&socket, 1 << 20);
    let mut out = VecDeque::new();
    {
        let mut take = std::pin::pin!(o.take(&mut out));
        assert!(!ready(take.as_mut()), "the writer parks: nothing queued");
        let o2 = o.clone();
        *socket.during.lock().unwrap() = Some(Box::new(move || {
            let over = (o2.limit() / APPROX_TICK_BYTES) as u64 + 10;
            assert!(matches!(o2.offer(ticks(10..=10 + over), within()).0, Push::Stalled));
        }));
        // (an empty queue is not written directly: that would run `during`)
        o.write_or_wake();
        assert!(
            !ready(take.as_mut()),
            "nothing queued, nothing written: the writer sleeps on"
        );
        assert!(o.offer(ticks(1..=2), within()).1);
        o.write_or_wake();
        assert_eq!(socket.written(), vec![1, 2]);
        assert!(ready(take.as_mut()), "the writer was not woken to end the stall");
    }
    assert!(out.is_empty());
    match o.written(0) {
        AfterWrite::Repair(dirty) => assert_eq!(dirty, vec![(sym(), Channel::Ticks)]),
        AfterWrite::Continue => panic!("the stall was not repaired"),
    }
}

/// A refused offer names its subscription for repair in the step that
/// refuses it, so a writer that ends the stall right after the refusal
/// still repairs that subscription. (The hub used to name it in a second
/// step, after the outbox's lock was let go: a writer ending the stall in
/// between took a repair list without it, and the subscription's ticks
/// stopped for good, with no conflated snapshot and no close.)
#[test]
fn a_refused_offer_is_named_for_repair_before_it_returns() {
    let o: Outbox<u8> = Outbox::new(1, 4096, Duration::from_secs(60));
    let eth = Symbol::parse("ETH-USD").unwrap();
    let many = (o.limit() / APPROX_TICK_BYTES) as u64 + 10;
    assert!(matches!(o.offer(ticks(1..=2), within()).0, Push::Queued));
    // this one starts the stall, and the next (another subscription) meets it
    assert!(matches!(o.offer(ticks(3..=2 + many), within()).0, Push::Stalled));
    let eth_ticks = Offer::Within(eth, Channel::Ticks);
    assert!(matches!(o.offer(ticks(3..=3), eth_ticks).0, Push::Stalled));
    // the writer writes what it has and ends the stall at once
    match o.written(o.unsent()) {
        AfterWrite::Repair(dirty) => {
            assert_eq!(dirty, vec![(sym(), Channel::Ticks), (eth, Channel::Ticks)])
        }
        AfterWrite::Continue => panic!("the stall did not end"),
    }
    assert!(matches!(o.offer(ticks(3..=3), within()).0, Push::Queued));
}

fn candle(start: i64, close: i64) -> crate::domain::Candle {
    crate::domain::Candle {
        symbol: sym(),
        interval: Interval::S1,
        start,
        open: Decimal::ONE,
        high: Decimal::new(close, 0),
        low: Decimal::ONE,
        close: Decimal::new(close, 0),
        volume: Decimal::ONE,
        count: 1,
    }
}

/// The candle events each subscriber got: (start, close, closed, the event).
async fn candles_seen(o: &Outbox<()>) -> Vec<(i64, Decimal, bool, Arc<CandleData>)> {
    let mut q = VecDeque::new();
    let _ = o.take(&mut q).await;
    q.drain(..)
        .filter_map(|m| match m {
            Msg::Data(Data::Candle(c)) => Some((c.candle.start, c.candle.close, c.closed, c)),
            _ => None,
        })
        .collect()
}

/// A candle event (a closed candle, an update of the current one) is made
/// once and shared by its subscribers, with its encodings: no allocation
/// or encode per subscriber.
#[tokio::test]
async fn candle_subscribers_share_one_event_and_its_encoding() {
    let (_hub, h) = hub_with_head(0);
    let subs: Vec<Arc<Outbox<()>>> = (1..=3)
        .map(|id| Arc::new(Outbox::new(id, 1 << 20, Duration::from_secs(10))))
        .collect();
    for o in &subs {
        h.attach(o.clone(), Channel::Candles(Interval::S1));
        h.activate(o.id(), Channel::Candles(Interval::S1), false);
    }
    // the 1 s candle at 0 closes; the one at 1 s is current
    h.publish(chunk(1..=1), &[candle(0, 5)], [Some(candle(1_000_000, 7)), None, None]);
    h.flush_candles();
    let seen: Vec<_> = futures_util::future::join_all(subs.iter().map(|o| candles_seen(o))).await;
    for s in &seen {
        let what: Vec<_> = s
            .iter()
            .map(|(start, close, closed, _)| (*start, *close, *closed))
            .collect();
        assert_eq!(
            what,
            [(0, Decimal::new(5, 0), true), (1_000_000, Decimal::new(7, 0), false)]
        );
    }
    for ((a, b), c) in seen[0].iter().zip(&seen[1]).zip(&seen[2]) {
        assert!(Arc::ptr_eq(&a.3, &b.3) && Arc::ptr_eq(&a.3, &c.3), "one event");
    }
    let mut encodes = 0;
    let frames: Vec<bytes::Bytes> = seen
        .iter()
        .map(|s| {
            s[0].3
                .encoded(Format::Json, |c, closed, out| {
                    encodes += 1;
                    out.extend_from_slice(format!("{} {closed}", c.close).as_bytes());
                })
                .clone()
        })
        .collect();
    assert_eq!(encodes, 1, "encoded once");
    assert!(frames.iter().all(|f| f.as_ref() == b"5 true"));
}

/// A subscription's initial data goes out only while it is attached,
/// checked under the lock a detach takes: once detached, nothing more.
#[tokio::test]
async fn initial_data_goes_only_to_an_attached_subscription() {
    let (_hub, h) = hub_with_head(3);
    let o: Arc<Outbox<()>> = Arc::new(Outbox::new(1, 1 << 20, Duration::from_secs(10)));
    h.attach(o.clone(), Channel::Ticks);
    let page = |s| Data::Ticks {
        chunk: chunk(s..=s),
        from: 0,
    };
    assert!(h.send_initial(1, Channel::Ticks, page(1)));
    assert!(
        !h.send_initial(1, Channel::Candles(Interval::S1), page(2)),
        "another channel"
    );
    h.detach(1, Channel::Ticks);
    assert!(!h.send_initial(1, Channel::Ticks, page(3)), "detached");
    assert_eq!(drain(&o).await, vec![Seen::Tick(1)]);
}
