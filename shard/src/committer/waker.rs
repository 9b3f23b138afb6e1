//! The fan-out's wake-ups, off the committer thread.
//!
//! A commit's data is queued to every subscriber under the symbol locks and
//! the commit is acked; the writers it owes a wake-up are then handed to the
//! *waker* thread, so that waking thousands of writer tasks (a popular tick)
//! never delays the next group commit. Commits that queue up while the waker
//! is busy are woken together.
//!
//! (A window that wakes at most once per 1–2 ms, merging the commits inside
//! it, was measured and did not pay: BENCHMARKS.md, "a fan-out window".)

use std::{
    sync::mpsc::{Receiver, SyncSender, TrySendError},
    thread,
};

use crate::hub::Wakes;

/// Commits' wake-ups queued to the waker before the committer wakes the
/// writers itself (the waker never blocks the committer).
const QUEUE: usize = 256;

pub(super) struct Waker {
    tx: Option<SyncSender<Wakes>>,
    join: Option<thread::JoinHandle<()>>,
}

impl Waker {
    /// Starts the waker thread.
    pub(super) fn start() -> std::io::Result<Waker> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let join = thread::Builder::new()
            .name("tickshard-wake".into())
            .spawn(move || run(&rx))?;
        Ok(Waker {
            tx: Some(tx),
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
            match tx.try_send(w) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => w = back,
                Err(TrySendError::Disconnected(back)) => {
                    // (it panicked: the wake-ups it held are lost, and their
                    // writers wait for a close or the slow-client timeout)
                    tracing::error!("the waker thread died; the committer wakes subscribers itself");
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

fn run(rx: &Receiver<Wakes>) {
    while let Ok(mut w) = rx.recv() {
        while let Ok(mut more) = rx.try_recv() {
            w.append(&mut more);
        }
        w.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, mpsc},
        time::Duration,
    };

    use super::Waker;
    use crate::{
        domain::Symbol,
        hub::{Channel, Data, Push, Sink, Wakes},
    };

    /// A writer that reports when it is woken.
    struct Probe(u64, mpsc::Sender<u64>);
    impl Sink for Probe {
        fn id(&self) -> u64 {
            self.0
        }
        fn offer(&self, _: Data, _: bool) -> (Push, bool) {
            (Push::Queued, true)
        }
        fn wake(&self) {
            let _ = self.1.send(self.0);
        }
        fn mark_dirty(&self, _: Symbol, _: Channel) {}
    }

    fn wakes(ids: &[u64], tx: &mpsc::Sender<u64>) -> Wakes {
        let mut w = Wakes::default();
        for &id in ids {
            w.push(Arc::new(Probe(id, tx.clone())));
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
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(id));
        }
        waker.wake(&mut wakes(&[4, 5], &tx));
        waker.wake(&mut wakes(&[6], &tx));
        drop(waker);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![4, 5, 6]);
    }
}
