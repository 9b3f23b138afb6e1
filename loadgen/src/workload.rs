//! Who watches what and which symbol each tick is for: every symbol alike
//! (W1–W6), or by Zipf popularity (W7, a dashboard workload: a few symbols
//! everybody watches, a long tail nobody does).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::measure::Window;

/// Symbol popularity: symbol `i` has weight `1/(i+1)^s` (`s = 0`: uniform).
pub(crate) struct Popularity {
    /// Cumulative weights, normalised to end at 1.
    cdf: Vec<f64>,
}

impl Popularity {
    pub(crate) fn zipf(n: usize, s: f64) -> Popularity {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (0..n)
            .map(|i| {
                acc += 1.0 / ((i + 1) as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Popularity { cdf }
    }

    pub(crate) fn len(&self) -> usize {
        self.cdf.len()
    }

    /// One symbol index, drawn by popularity.
    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cdf
            .partition_point(|&c| c < u)
            .min(self.cdf.len().saturating_sub(1))
    }

    /// `k` distinct symbol indexes, drawn by popularity without replacement
    /// (all of them if `k` ≥ the number of symbols), sorted.
    pub(crate) fn watchlist(&self, rng: &mut fastrand::Rng, k: usize) -> Vec<usize> {
        if k >= self.len() {
            return (0..self.len()).collect();
        }
        let mut taken = vec![false; self.len()];
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            let i = self.draw(rng);
            if !std::mem::replace(&mut taken[i], true) {
                out.push(i);
            }
        }
        out.sort_unstable();
        out
    }
}

/// Which symbol each published tick is for, and what it owes subscribers.
pub(crate) struct Picker {
    popularity: Option<Arc<Popularity>>,
    rng: fastrand::Rng,
    n: usize,
    next: usize,
    /// Subscribers watching each symbol.
    watchers: Arc<Vec<u64>>,
    /// Deliveries owed for the ticks published inside the window.
    owed: Arc<AtomicU64>,
    window: Arc<Window>,
}

impl Picker {
    /// `popularity`: draw by it (else round-robin over `n` symbols), seeded.
    pub(crate) fn new(
        popularity: Option<Arc<Popularity>>,
        seed: u64,
        n: usize,
        watchers: Arc<Vec<u64>>,
        owed: Arc<AtomicU64>,
        window: Arc<Window>,
    ) -> Picker {
        Picker {
            popularity,
            rng: fastrand::Rng::with_seed(seed),
            n: n.max(1),
            next: 0,
            watchers,
            owed,
            window,
        }
    }

    /// The symbol index of the next tick, published at `ts`; counts what it
    /// owes if `ts` is inside the measured window.
    pub(crate) fn pick(&mut self, ts: u64) -> usize {
        let s = match &self.popularity {
            Some(p) => p.draw(&mut self.rng),
            None => {
                self.next = (self.next + 1) % self.n;
                self.next
            }
        };
        if self.window.contains(ts) {
            self.owed
                .fetch_add(self.watchers.get(s).copied().unwrap_or(0), Ordering::Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_draws_follow_the_weights_and_watchlists_are_distinct() {
        let p = Popularity::zipf(10_000, 1.1);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 200_000;
        let mut hits = [0usize; 2];
        for _ in 0..n {
            match p.draw(&mut rng) {
                0 => hits[0] += 1,
                1 => hits[1] += 1,
                _ => {}
            }
        }
        // weight(0)/weight(1) = 2^1.1 ≈ 2.14
        let ratio = hits[0] as f64 / hits[1] as f64;
        assert!((1.9..2.4).contains(&ratio), "{ratio}");
        let w = p.watchlist(&mut rng, 50);
        assert_eq!(w.len(), 50);
        assert!(w.windows(2).all(|x| x[0] < x[1]), "sorted and distinct: {w:?}");
        assert!(w.iter().all(|&i| i < 10_000));
        assert_eq!(Popularity::zipf(5, 1.1).watchlist(&mut rng, 9), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let p = Popularity::zipf(1_000, 1.1);
        let (mut a, mut b) = (fastrand::Rng::with_seed(3), fastrand::Rng::with_seed(3));
        assert_eq!(p.watchlist(&mut a, 20), p.watchlist(&mut b, 20));
        assert_eq!(p.draw(&mut a), p.draw(&mut b));
    }
}
