//! Who owns a symbol right now (contract §2 and §9).
//!
//! The map is `jump_consistent_hash(h(symbol), committed)`, where `committed`
//! is the cluster's committed shard count (kept in every pod's store, not only
//! in `--shards`). While a rebalance to `target` runs, each symbol whose owner
//! changes moves on its own; until the rebalance commits, every pod but the
//! two that took part in a move still routes by the committed map, and the old
//! owner relays (publishes through its committer, follows through a mirror of
//! the new owner, reads to the new owner). So a pod knows three things:
//! - `moved`: symbols this pod handed over (or learned live elsewhere), and to whom;
//! - `moved_in`: symbols this pod took over;
//! - the committed map for everything else.
//!
//! Publishes take a *gate* (one of [`GATES`] read-write locks, by symbol)
//! around "decide the route, queue the request": a route change of a symbol
//! (the switch to a newly committed map) takes every gate for writing, so no
//! request of a pair is queued on the old route after one on the new route.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
};

use tokio::sync::{RwLockReadGuard, RwLockWriteGuard, watch};

use crate::{
    domain::Symbol,
    ownership::{jump_consistent_hash, symbol_hash},
};

/// Most shards a cluster may have (a named bound on `admin rebalance`).
pub const MAX_SHARDS: u32 = 1_024;
/// Publish gates, by symbol hash.
pub const GATES: usize = 64;

/// A cluster's shard layout: the committed count, and the count a rebalance
/// in progress moves to. A newer `version` replaces an older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterState {
    pub version: u64,
    pub committed: u32,
    pub target: Option<u32>,
}

impl ClusterState {
    /// The state of a new cluster of `shards`.
    pub fn initial(shards: u32) -> ClusterState {
        ClusterState {
            version: 0,
            committed: shards.max(1),
            target: None,
        }
    }

    /// The most shards this state involves (the committed and the target).
    pub fn span(&self) -> u32 {
        self.committed.max(self.target.unwrap_or(0))
    }
}

impl std::fmt::Display for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.target {
            Some(t) => write!(f, "{} shards, moving to {t} (v{})", self.committed, self.version),
            None => write!(f, "{} shards (v{})", self.committed, self.version),
        }
    }
}

struct Inner {
    state: ClusterState,
    moved: HashMap<Symbol, u32>,
    moved_in: HashSet<Symbol>,
    /// Held for a hand-over a restart interrupted: until the new owner says
    /// whether it took them, this pod's copy may be behind (not served).
    unsettled: HashSet<Symbol>,
}

/// A symbol's hand-over notes before a [`Placement::note_moved_in`].
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct MovedBefore {
    moved: Option<u32>,
    moved_in: bool,
}

pub struct Placement {
    me: u32,
    inner: RwLock<Inner>,
    gates: Box<[tokio::sync::RwLock<()>]>,
    changes: watch::Sender<ClusterState>,
    /// The newest state heard from peers (topology answers) and not yet
    /// taken: the node adopts it if newer. One slot, however many arrive.
    heard: watch::Sender<Option<ClusterState>>,
}

impl Placement {
    pub fn new(me: u32, state: ClusterState) -> (Arc<Placement>, watch::Receiver<Option<ClusterState>>) {
        let (heard, rx) = watch::channel(None);
        let p = Placement {
            me,
            inner: RwLock::new(Inner {
                state,
                moved: HashMap::new(),
                moved_in: HashSet::new(),
                unsettled: HashSet::new(),
            }),
            gates: (0..GATES).map(|_| tokio::sync::RwLock::new(())).collect(),
            changes: watch::channel(state).0,
            heard,
        };
        (Arc::new(p), rx)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn me(&self) -> u32 {
        self.me
    }

    pub fn state(&self) -> ClusterState {
        self.read().state
    }

    /// The committed shard count.
    pub fn shards(&self) -> u32 {
        self.read().state.committed
    }

    /// Wakes on every state change.
    pub fn watch(&self) -> watch::Receiver<ClusterState> {
        self.changes.subscribe()
    }

    /// A state a peer reported; adopted by the node if newer.
    pub fn heard(&self, state: ClusterState) {
        if state.version > self.state().version {
            // (the same version again wakes the node again: an adoption
            // that failed is retried when a peer reports the state again)
            self.heard.send_if_modified(|h| {
                let newer = h.is_none_or(|h| state.version >= h.version);
                if newer {
                    *h = Some(state);
                }
                newer
            });
        }
    }

    /// The owner of `symbol` now: for subscriptions and reads.
    pub fn owner(&self, symbol: &Symbol) -> u32 {
        let i = self.read();
        if i.moved_in.contains(symbol) {
            return self.me;
        }
        if let Some(&to) = i.moved.get(symbol) {
            return to;
        }
        jump_consistent_hash(symbol_hash(symbol), i.state.committed)
    }

    pub fn is_local(&self, symbol: &Symbol) -> bool {
        self.owner(symbol) == self.me
    }

    /// Where a client's publish of `symbol` goes until the rebalance
    /// commits: the owner by the committed map, always. The old owner's
    /// committer holds, then relays, what it handed over, so every request
    /// of a pair takes one path (the new owner's own clients' included: a
    /// direct path there could overtake a request still on its way through
    /// the old owner, and de-dup would take the later one for a retry).
    pub fn publish_owner(&self, symbol: &Symbol) -> u32 {
        jump_consistent_hash(symbol_hash(symbol), self.read().state.committed)
    }

    /// The owner under the rebalance target, if one is in progress.
    pub fn target_owner(&self, symbol: &Symbol) -> Option<u32> {
        self.read()
            .state
            .target
            .map(|t| jump_consistent_hash(symbol_hash(symbol), t))
    }

    /// Where this pod handed `symbol` over to, if it did.
    pub fn moved_to(&self, symbol: &Symbol) -> Option<u32> {
        self.read().moved.get(symbol).copied()
    }

    pub fn note_moved(&self, symbol: Symbol, to: u32) {
        let mut i = self.write();
        i.moved_in.remove(&symbol);
        i.unsettled.remove(&symbol);
        i.moved.insert(symbol, to);
    }

    /// See `Inner::unsettled`.
    pub fn note_unsettled(&self, symbol: Symbol, unsettled: bool) {
        let mut i = self.write();
        if unsettled {
            i.unsettled.insert(symbol);
        } else {
            i.unsettled.remove(&symbol);
        }
    }

    pub fn is_unsettled(&self, symbol: &Symbol) -> bool {
        let i = self.read();
        !i.unsettled.is_empty() && i.unsettled.contains(symbol)
    }

    /// An import that failed: the symbol is not this pod's.
    /// Undoes a [`note_moved_in`](Self::note_moved_in) whose import failed:
    /// puts back what `before` says the notes were.
    pub fn forget_moved_in(&self, symbol: Symbol, before: MovedBefore) {
        let mut i = self.write();
        if !before.moved_in {
            i.moved_in.remove(&symbol);
        }
        if let Some(to) = before.moved {
            i.moved.insert(symbol, to);
        }
    }

    /// Notes `symbol` as taken over by this pod; returns what its notes
    /// were, for [`forget_moved_in`](Self::forget_moved_in).
    pub fn note_moved_in(&self, symbol: Symbol) -> MovedBefore {
        let mut i = self.write();
        MovedBefore {
            moved: i.moved.remove(&symbol),
            moved_in: !i.moved_in.insert(symbol),
        }
    }

    /// Adopts `state`. Once a rebalance commits (no target), the committed
    /// map says what the moves said: they are forgotten.
    pub fn set_state(&self, state: ClusterState) {
        {
            let mut i = self.write();
            i.state = state;
            if state.target.is_none() {
                i.moved.clear();
                i.moved_in.clear();
            }
        }
        self.changes.send_replace(state);
    }

    /// The publish gate of `symbol` (see the module doc).
    pub async fn gate(&self, symbol: &Symbol) -> RwLockReadGuard<'_, ()> {
        self.gates[(symbol_hash(symbol) % GATES as u64) as usize].read().await
    }

    /// Every gate, for a route change.
    pub async fn close_gates(&self) -> Vec<RwLockWriteGuard<'_, ()>> {
        let mut all = Vec::with_capacity(GATES);
        for g in self.gates.iter() {
            all.push(g.write().await);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> Symbol {
        Symbol::parse(s).unwrap()
    }

    /// States heard from peers keep one slot, the newest: a flood of
    /// topology answers (each with a newer version) queues nothing (review
    /// of the peer inputs: the channel was unbounded). Older ones are
    /// dropped; the same version again wakes the node again (a failed
    /// adoption is retried).
    #[test]
    fn states_heard_keep_only_the_newest() {
        let (p, mut rx) = Placement::new(0, ClusterState::initial(3));
        let at = |version| ClusterState {
            version,
            ..ClusterState::initial(3)
        };
        for v in 2..10_000 {
            p.heard(at(v));
        }
        p.heard(at(5));
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), Some(at(9_999)));
        p.heard(at(9_999));
        assert!(rx.has_changed().unwrap_or(false), "the same version wakes again");
        p.heard(at(1));
        rx.borrow_and_update();
        assert!(!rx.has_changed().unwrap_or(true), "an older one is dropped");
    }

    /// An import that fails puts the notes back as they were: a symbol
    /// already taken over stays taken (a second, failed hand-over of it
    /// used to route it back to the old owner), one handed over stays
    /// handed over.
    #[test]
    fn a_failed_import_puts_the_notes_back() {
        let (p, _rx) = Placement::new(0, ClusterState::initial(3));
        let s = (0..1000)
            .map(|i| sym(&format!("S{i}")))
            .find(|s| p.owner(s) == 1)
            .unwrap();
        let first = p.note_moved_in(s);
        assert_eq!(p.owner(&s), 0);
        let second = p.note_moved_in(s);
        p.forget_moved_in(s, second);
        assert_eq!(p.owner(&s), 0, "still taken over");
        p.forget_moved_in(s, first);
        assert_eq!(p.owner(&s), 1, "the first undone: the map's owner again");
        p.note_moved(s, 2);
        let before = p.note_moved_in(s);
        p.forget_moved_in(s, before);
        assert_eq!(p.owner(&s), 2, "still handed over");
    }

    #[test]
    fn moves_override_the_committed_map_until_a_commit() {
        let (p, _rx) = Placement::new(0, ClusterState::initial(3));
        let s = (0..1000)
            .map(|i| sym(&format!("S{i}")))
            .find(|s| p.owner(s) == 0 && jump_consistent_hash(symbol_hash(s), 4) == 3)
            .unwrap();
        p.set_state(ClusterState {
            version: 1,
            committed: 3,
            target: Some(4),
        });
        assert_eq!(p.target_owner(&s), Some(3));
        assert!(p.is_local(&s));
        p.note_moved(s, 3);
        assert_eq!(p.owner(&s), 3, "subscriptions and reads go to the new owner");
        assert_eq!(
            p.publish_owner(&s),
            0,
            "publishes still pass the committer, which relays in order"
        );
        let (d, _rx) = Placement::new(3, p.state());
        let _ = d.note_moved_in(s);
        assert!(d.is_local(&s));
        assert_eq!(
            d.publish_owner(&s),
            0,
            "the new owner's clients go through the old one until the commit"
        );
        p.set_state(ClusterState {
            version: 2,
            committed: 4,
            target: None,
        });
        assert_eq!(p.moved_to(&s), None);
        assert_eq!(p.owner(&s), 3);
        assert_eq!(p.publish_owner(&s), 3);
    }
}
