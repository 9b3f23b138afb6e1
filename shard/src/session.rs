//! One subscriber session: what a WebSocket connection, a gRPC `Subscribe`
//! stream and a peer's `Follow` stream have in common. A session owns the
//! subscriber's outbox and the set of (symbol, channel) pairs it is
//! subscribed to; it builds subscription requests, registers them with the
//! node (recording them first, so a session that ends mid-subscribe still
//! detaches everything), retries the ones whose owner shard is down, and
//! detaches everything when it ends. The protocols only parse requests and
//! render replies.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backoff::Backoff,
    domain::{Position, Symbol},
    hub::{Channel, Outbox},
    node::{Node, Prepared, SubRequest, SubResult, SubscribeError},
};

/// First and longest wait between retries of a deferred subscription.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Every symbol × every channel, in request order; a resume position applies
/// to the ticks channel only.
pub fn requests(symbols: &[Symbol], channels: &[Channel], resume: &HashMap<Symbol, Position>) -> Vec<SubRequest> {
    let mut out = Vec::with_capacity(symbols.len().saturating_mul(channels.len()));
    for &symbol in symbols {
        for &channel in channels {
            out.push(SubRequest {
                symbol,
                channel,
                resume: if channel == Channel::Ticks {
                    resume.get(&symbol).copied()
                } else {
                    None
                },
            });
        }
    }
    out
}

#[derive(Default)]
struct Pairs {
    /// Registered with the node (or being registered, or deferred).
    active: HashSet<(Symbol, Channel)>,
    /// Deferred: their owner was down; a retry task registers them later.
    retrying: HashSet<(Symbol, Channel)>,
}

/// A subscriber's outbox and subscriptions. Cheap to share (`Arc`); ends
/// (detaching everything) at [`Session::end`] or when the last reference is
/// dropped.
pub struct Session<C: Send + 'static> {
    node: Arc<Node>,
    outbox: Arc<Outbox<C>>,
    /// A std mutex: never held across `.await`.
    pairs: Mutex<Pairs>,
    /// Cancelled at the end: stops deferred retries.
    ended: CancellationToken,
}

impl<C: Send + 'static> Session<C> {
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox<C>>) -> Arc<Session<C>> {
        Arc::new(Session {
            node,
            outbox,
            pairs: Mutex::new(Pairs::default()),
            ended: CancellationToken::new(),
        })
    }

    pub fn outbox(&self) -> &Arc<Outbox<C>> {
        &self.outbox
    }

    pub fn id(&self) -> u64 {
        self.outbox.id()
    }

    fn pairs(&self) -> MutexGuard<'_, Pairs> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many pairs the session would hold after `reqs` (for a
    /// per-session subscription limit, checked before anything changes).
    pub fn count_after(&self, reqs: &[SubRequest]) -> usize {
        let pairs = self.pairs();
        let new = reqs
            .iter()
            .map(|r| (r.symbol, r.channel))
            .filter(|p| !pairs.active.contains(p))
            .collect::<HashSet<_>>()
            .len();
        pairs.active.len() + new
    }

    /// Registers `reqs` with the node (see [`Node::prepare`]): send the
    /// reply for `results`, then [`Session::activate`]. A refusal
    /// (`Err`) changes nothing: pairs the session already had stay. A
    /// request supersedes a deferred one for the same pair. Requests in
    /// `failed` (owner down) stay recorded; hand them to [`Session::retry`]
    /// or end the session.
    pub async fn prepare(&self, reqs: &[SubRequest]) -> Result<Prepared, SubscribeError> {
        let mut added = Vec::new();
        {
            let mut pairs = self.pairs();
            for r in reqs {
                if pairs.active.insert((r.symbol, r.channel)) {
                    added.push((r.symbol, r.channel));
                }
                pairs.retrying.remove(&(r.symbol, r.channel));
            }
        }
        let prepared = self.register(reqs).await;
        if prepared.is_err() {
            let mut pairs = self.pairs();
            for pair in &added {
                pairs.active.remove(pair);
            }
        }
        prepared
    }

    /// [`Node::prepare`], unless the session has ended (before or meanwhile).
    async fn register(&self, reqs: &[SubRequest]) -> Result<Prepared, SubscribeError> {
        if self.is_ended() {
            return Err(SubscribeError::Unavailable("the subscriber is gone".into()));
        }
        let prepared = self.node.prepare(&self.outbox, reqs).await;
        if self.is_ended() {
            // Ended while registering: `end` may have run before these were
            // attached, so detach them here (detaching twice is harmless).
            for r in reqs {
                self.node.unsubscribe(self.outbox.id(), &r.symbol, r.channel);
            }
            return Err(SubscribeError::Unavailable("the subscriber is gone".into()));
        }
        prepared
    }

    /// Sends the initial data of prepared subscriptions and makes them live.
    pub async fn activate(&self, prepared: Prepared) {
        self.node.activate(&self.outbox, prepared).await;
    }

    /// Ends one subscription (or a deferred one); `false` if there was none.
    pub fn unsubscribe(&self, symbol: &Symbol, channel: Channel) -> bool {
        let removed = {
            let mut pairs = self.pairs();
            pairs.retrying.remove(&(*symbol, channel));
            pairs.active.remove(&(*symbol, channel))
        };
        if removed {
            self.node.unsubscribe(self.outbox.id(), symbol, channel);
        }
        removed
    }

    /// Keeps retrying `failed` (with back-off, on `tracker`) until each is
    /// registered, unsubscribed, superseded or the session ends. `ready` is
    /// called with the results of each successful retry before they are
    /// activated (to queue the protocol's reply).
    pub fn retry<F>(self: &Arc<Self>, tracker: &TaskTracker, failed: Vec<(SubRequest, String)>, mut ready: F)
    where
        F: FnMut(&Session<C>, &[SubResult]) + Send + 'static,
    {
        let mut reqs: Vec<SubRequest> = Vec::with_capacity(failed.len());
        {
            let mut pairs = self.pairs();
            for (r, _) in failed {
                if pairs.active.contains(&(r.symbol, r.channel)) {
                    pairs.retrying.insert((r.symbol, r.channel));
                    reqs.push(r);
                }
            }
        }
        if reqs.is_empty() {
            return;
        }
        let session = self.clone();
        crate::tasks::spawn(tracker, async move {
            let mut delay = Backoff::new(RETRY_MIN, RETRY_MAX);
            loop {
                tokio::select! {
                    () = session.ended.cancelled() => return,
                    () = delay.wait() => {}
                }
                reqs.retain(|r| session.pairs().retrying.contains(&(r.symbol, r.channel)));
                if reqs.is_empty() {
                    return;
                }
                let Ok(mut prepared) = session.register(&reqs).await else {
                    continue;
                };
                reqs = std::mem::take(&mut prepared.failed)
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                if !prepared.results.is_empty() {
                    {
                        let mut pairs = session.pairs();
                        for r in &prepared.results {
                            pairs.retrying.remove(&(r.symbol, r.channel));
                        }
                    }
                    ready(&session, &prepared.results);
                    session.activate(prepared).await;
                }
                if reqs.is_empty() {
                    return;
                }
            }
        });
    }

    /// Whether the session has ended.
    pub fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Ends the session: the outbox is finished (a replay in progress
    /// stops), retries stop, and every subscription is detached. Idempotent.
    pub fn end(&self) {
        self.outbox.finish();
        self.ended.cancel();
        let active = std::mem::take(&mut *self.pairs());
        for (symbol, channel) in active.active {
            self.node.unsubscribe(self.outbox.id(), &symbol, channel);
        }
    }
}

impl<C: Send + 'static> Drop for Session<C> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Ends its session when dropped, even while tasks (a retry, an activation)
/// still hold references to it: what a protocol keeps for a subscriber's
/// life.
pub struct SessionGuard<C: Send + 'static>(Arc<Session<C>>);

impl<C: Send + 'static> SessionGuard<C> {
    pub fn new(session: Arc<Session<C>>) -> SessionGuard<C> {
        SessionGuard(session)
    }
}

impl<C: Send + 'static> std::ops::Deref for SessionGuard<C> {
    type Target = Arc<Session<C>>;

    fn deref(&self) -> &Arc<Session<C>> {
        &self.0
    }
}

impl<C: Send + 'static> Drop for SessionGuard<C> {
    fn drop(&mut self) {
        self.0.end();
    }
}
