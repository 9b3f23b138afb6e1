//! Exponential back-off with jitter: what every retry loop of tickshard
//! (peer reconnects, waits for an owner, deferred subscribes, accept errors,
//! the client library's reconnects) waits with.

use std::time::Duration;

/// Doubles from `min` up to `max`; each delay is drawn at random from the
/// upper half of the current step ("equal jitter": `current/2..=current`), so
/// that many waiters spread out but none waits much less than the step.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { next: min, min, max }
    }

    /// The next delay (random in `current/2..=current`), doubling the current one.
    pub fn next_delay(&mut self) -> Duration {
        let cur = self.next;
        self.next = (self.next * 2).min(self.max);
        let us = cur.as_micros().max(1) as u64;
        Duration::from_micros(fastrand::u64(us / 2..=us))
    }

    /// Waits for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to `min` (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
        for step in [20u64, 40, 80, 160, 200, 200] {
            let d = b.next_delay();
            let step = Duration::from_millis(step);
            assert!(d >= step / 2 && d <= step, "{d:?} within {step:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(20));
    }
}
