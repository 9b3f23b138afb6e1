//! The fan-out's wake-ups, off the committer thread.
//!
//! A commit's data is queued to every subscriber under the symbol locks and
//! the commit is acked; the writers it owes a wake-up are then handed to the
//! *waker* thread, so that waking thousands of writer tasks (a popular tick)
//! never delays the next group commit. Commits that queue up while the waker
//! is busy are woken together.
//!
//! While the waker is not behind (no other commit queued), it writes each
//! idle client's ticks straight to its socket where the connection allows it
//! ([`crate::hub::Outbox::write_or_wake`]): at low rates that saves a task
//! wake-up and poll per delivery. As soon as another commit is queued, even
//! in the middle of one, it only wakes the writers, so that a backlog is
//! written by the runtime's workers in parallel, not by this one thread
//! (BENCHMARKS.md, "direct writes").
//!
//! (A window that wakes at most once per 1–2 ms, merging the commits inside
//! it, was measured and did not pay: BENCHMARKS.md, "a fan-out window".)

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    thread,
};

use crate::hub::Wakes;

/// Commits' wake-ups queued to the waker before the committer wakes the
/// writers itself (the waker never blocks the committer).
const QUEUE: usize = 256;

pub(super) struct Waker {
    tx: Option<SyncSender<Wakes>>,
    /// Commits sent to the waker and not yet received by it.
    queued: Arc<AtomicUsize>,
    join: Option<thread::JoinHandle<()>>,
}

impl Waker {
    /// Starts the waker thread.
    pub(super) fn start() -> std::io::Result<Waker> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let join = thread::Builder::new()
            .name("tickshard-wake".into())
            .spawn(move || run(&rx, &q))?;
        Ok(Waker {
            tx: Some(tx),
            queued,
            join: Some(join),
        })
    }

    /// Hands a commit's wake-ups to the waker; if its queue is full (or it is
    /// gone), wakes them here.
    pub(super) fn wake(&mut self, wakes: &mut Wakes) {
        if wakes.is_empty() {
            return;
        }
        let mut w = std::mem::take(wakes);
        if let Some(tx) = &self.tx {
            // (counted before it can be received, so the count never wraps)
            self.queued.fetch_add(1, Ordering::Relaxed);
            match tx.try_send(w) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    w = back;
                }
                Err(TrySendError::Disconnected(back)) => {
                    // (it panicked: the wake-ups it held are lost, and their
                    // writers wait for a close or the slow-client timeout)
                    tracing::error!("the waker thread died; the committer wakes subscribers itself");
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    self.tx = None;
                    w = back;
                }
            }
        }
        w.wake_all();
    }
}

impl Drop for Waker {
    /// Wakes what is queued, then ends the thread.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(j) = self.join.take()
            && j.join().is_err()
        {
            tracing::error!("the waker thread panicked");
        }
    }
}

fn run(rx: &Receiver<Wakes>, queued: &AtomicUsize) {
    while let Ok(mut w) = rx.recv() {
        queued.fetch_sub(1, Ordering::Relaxed);
        let mut behind = false;
        while let Ok(mut more) = rx.try_recv() {
            queued.fetch_sub(1, Ordering::Relaxed);
            w.append(&mut more);
            behind = true;
        }
        if behind {
            w.wake_all();
        } else {
            w.write_or_wake_all(|| queued.load(Ordering::Relaxed) > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, mpsc},
        time::Duration,
    };

    use super::Waker;
    use crate::hub::{Data, Offer, Push, Sink, Wakes};

    /// A writer that reports when it is woken (and whether it was offered a
    /// direct write); one with a gate blocks the waker in a direct write
    /// until the test opens it.
    struct Probe(
        u64,
        mpsc::Sender<(u64, bool)>,
        Option<std::sync::Mutex<mpsc::Receiver<()>>>,
    );
    impl Sink for Probe {
        fn id(&self) -> u64 {
            self.0
        }
        fn offer(&self, _: Data, _: Offer) -> (Push, bool) {
            (Push::Queued, true)
        }
        fn wake(&self) {
            let _ = self.1.send((self.0, false));
        }
        fn write_or_wake(&self) {
            let _ = self.1.send((self.0, true));
            if let Some(gate) = &self.2 {
                let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(60));
            }
        }
    }

    fn wakes(ids: &[u64], tx: &mpsc::Sender<(u64, bool)>) -> Wakes {
        let mut w = Wakes::default();
        for &id in ids {
            w.push(Arc::new(Probe(id, tx.clone(), None)));
        }
        w
    }

    /// Every commit's writers are woken, in commit order, and nothing handed
    /// over is left unwoken when the committer ends.
    #[test]
    fn every_commit_is_woken_in_order_and_none_is_left_at_the_end() {
        let mut waker = Waker::start().unwrap();
        let (tx, rx) = mpsc::channel();
        for id in 1..=3 {
            waker.wake(&mut wakes(&[id], &tx));
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).map(|w| w.0), Ok(id));
        }
        waker.wake(&mut wakes(&[4, 5], &tx));
        waker.wake(&mut wakes(&[6], &tx));
        drop(waker);
        assert_eq!(rx.try_iter().map(|w| w.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    }

    /// A commit the waker takes alone is offered direct writes until another
    /// commit is queued, even in its middle; from then on, and for commits
    /// that queued up while it worked (it is behind), it only wakes the
    /// writers, so that the runtime's workers share a backlog.
    #[test]
    fn a_waker_that_is_behind_only_wakes() {
        let mut waker = Waker::start().unwrap();
        let (tx, rx) = mpsc::channel();
        let (open, gate) = mpsc::channel();
        let mut first = Wakes::default();
        first.push(Arc::new(Probe(1, tx.clone(), Some(std::sync::Mutex::new(gate)))));
        for id in [5, 6] {
            first.push(Arc::new(Probe(id, tx.clone(), None)));
        }
        waker.wake(&mut first);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok((1, true)));
        // (the waker is held in probe 1's direct write)
        waker.wake(&mut wakes(&[2], &tx));
        waker.wake(&mut wakes(&[3], &tx));
        open.send(()).unwrap();
        let got: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got, vec![(5, false), (6, false), (2, false), (3, false)]);
        waker.wake(&mut wakes(&[4], &tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok((4, true)));
    }
}
