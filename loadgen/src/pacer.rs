//! Pacing publishers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Paces a publisher at `rate` ticks/s in 1 ms steps (0: as fast as it can).
pub(crate) struct Pacer {
    rate: u64,
    owed: u64,
    tick: tokio::time::Interval,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            owed: 0,
            tick: tokio::time::interval(Duration::from_millis(1)),
        }
    }

    /// How many ticks to publish now (`unpaced` at rate 0); `None` once `stop`
    /// is cancelled.
    pub(crate) async fn next(&mut self, stop: &CancellationToken, unpaced: u64) -> Option<u64> {
        if self.rate == 0 {
            return (!stop.is_cancelled()).then_some(unpaced);
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = self.tick.tick() => {}
        }
        self.owed += self.rate;
        let n = self.owed / 1000;
        self.owed %= 1000;
        Some(n)
    }
}
