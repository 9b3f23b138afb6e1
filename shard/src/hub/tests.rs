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
    assert!(matches!(out.pop_front(), Some(Msg::Control(7))));
}
