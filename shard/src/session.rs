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

use tokio::sync::OwnedMutexGuard;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Error,
    backoff::Backoff,
    domain::{Position, Symbol},
    hub::{Channel, Outbox},
    node::{Hold, Node, Prepared, SubRequest, SubResult},
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

type Pair = (Symbol, Channel);

/// The pairs being registered, each with its lock (see [`Claims`]).
type ClaimMap = Arc<Mutex<HashMap<Pair, Arc<tokio::sync::Mutex<()>>>>>;

fn claim_map(m: &ClaimMap) -> MutexGuard<'_, HashMap<Pair, Arc<tokio::sync::Mutex<()>>>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes `pair`'s lock from the map if nobody holds or waits for it any
/// more (the map holds only pairs being registered).
fn release(map: &ClaimMap, pair: Pair) {
    let mut map = claim_map(map);
    if map.get(&pair).is_some_and(|l| Arc::strong_count(l) == 1) {
        map.remove(&pair);
    }
}

/// The pairs one registration holds, from its start until each is
/// activated (they travel in its `Prepared`, one claim per pair, each let
/// go after its pair's activation): another registration of one of them
/// waits, so two registrations of a pair (a subscribe and a retry) never
/// interleave, and one's activation never takes the other's entry. Per
/// pair: a subscribe never waits for a registration of other pairs, nor
/// for the activation of pairs before its own. Taken in one order, so two
/// registrations never wait for each other.
pub(crate) struct Claims {
    map: ClaimMap,
    held: Vec<PairClaim>,
    /// The pair being waited for (cleaned up if the wait is dropped).
    waiting: Option<Pair>,
}

/// One pair's claim: its lock, held until dropped.
struct PairClaim {
    map: ClaimMap,
    pair: Pair,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for PairClaim {
    fn drop(&mut self) {
        drop(self.guard.take());
        release(&self.map, self.pair);
    }
}

impl Claims {
    async fn take(map: &ClaimMap, reqs: &[SubRequest]) -> Claims {
        let mut pairs: Vec<Pair> = reqs.iter().map(|r| (r.symbol, r.channel)).collect();
        pairs.sort_unstable_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
        pairs.dedup();
        let mut claims = Claims {
            map: map.clone(),
            held: Vec::with_capacity(pairs.len()),
            waiting: None,
        };
        for pair in pairs {
            let lock = claim_map(map).entry(pair).or_default().clone();
            claims.waiting = Some(pair);
            let guard = lock.lock_owned().await;
            claims.waiting = None;
            claims.held.push(PairClaim {
                map: map.clone(),
                pair,
                guard: Some(guard),
            });
        }
        claims
    }

    /// Each pair's claim on its own, for `Prepared::holding`.
    fn each(mut self) -> impl Iterator<Item = (Pair, Hold)> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|c| (c.pair, Box::new(c) as Hold))
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        // (the pairs held let themselves go)
        if let Some(p) = self.waiting.take() {
            release(&self.map, p);
        }
    }
}

/// Leaves out of a registration the pairs no longer `wanted`: unsubscribed
/// while they were registered (an unsubscribe takes no claim), so neither
/// announced nor activated. Returns them, to be detached (their claims
/// still held: the entries are this registration's).
fn leave_out(p: &mut Prepared, mut wanted: impl FnMut(Pair) -> bool) -> Vec<Pair> {
    let mut gone = Vec::new();
    p.retain(|r| {
        let pair = (r.symbol, r.channel);
        let keep = wanted(pair);
        if !keep {
            gone.push(pair);
        }
        keep
    });
    gone
}

#[derive(Default)]
struct Pairs {
    /// Registered with the node (or being registered, or deferred).
    active: HashSet<(Symbol, Channel)>,
    /// Deferred: their owner was down; a retry task registers them later.
    /// The value is the retry that holds the pair: a later subscribe of
    /// it supersedes an earlier one, whose task then lets it go (one retry
    /// per pair, however often the client asks).
    retrying: HashMap<(Symbol, Channel), u64>,
    /// The next retry's number.
    next_retry: u64,
}

/// A subscriber's outbox and subscriptions. Cheap to share (`Arc`); ends
/// (detaching everything) at [`Session::end`] or when the last reference is
/// dropped.
pub struct Session<C: Send + 'static> {
    node: Arc<Node>,
    outbox: Arc<Outbox<C>>,
    /// A std mutex: never held across `.await`.
    pairs: Mutex<Pairs>,
    /// The pairs being registered (see [`Claims`]).
    claims: ClaimMap,
    /// Cancelled at the end: stops deferred retries.
    ended: CancellationToken,
}

impl<C: Send + 'static> Session<C> {
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox<C>>) -> Arc<Session<C>> {
        Arc::new(Session {
            node,
            outbox,
            pairs: Mutex::new(Pairs::default()),
            claims: ClaimMap::default(),
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

    /// The symbols the session holds (subscribed or being retried), each once.
    pub fn symbols(&self) -> Vec<Symbol> {
        let pairs = self.pairs();
        let mut out: Vec<Symbol> = pairs.active.iter().map(|(s, _)| *s).collect();
        out.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        out.dedup();
        out
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
    /// (`Err`) changes nothing: pairs the session already had stay, and so
    /// do deferred ones, still retried. A registered request supersedes a
    /// deferred one for the same pair. Requests in `failed` (owner down)
    /// stay recorded; hand them to [`Session::retry`] or end the session.
    pub async fn prepare(&self, reqs: &[SubRequest]) -> Result<Prepared, Error> {
        let claims = Claims::take(&self.claims, reqs).await;
        let mut added = Vec::new();
        {
            let mut pairs = self.pairs();
            for r in reqs {
                if pairs.active.insert((r.symbol, r.channel)) {
                    added.push((r.symbol, r.channel));
                }
            }
        }
        // (a deferred pair's retry waits for the claims taken above, so it
        // cannot register the pair meanwhile: it is superseded only once
        // this registration went through)
        let mut prepared = match self.register(reqs, claims).await {
            Ok(p) => Ok(p),
            Err((e, claims)) => {
                // (the claims go only after the pairs are put back, so a
                // registration of them waiting meanwhile sees this done)
                let mut pairs = self.pairs();
                for pair in &added {
                    pairs.active.remove(pair);
                }
                drop(pairs);
                drop(claims);
                Err(e)
            }
        };
        match &mut prepared {
            Err(_) => {}
            Ok(p) => {
                {
                    let mut pairs = self.pairs();
                    for r in reqs {
                        pairs.retrying.remove(&(r.symbol, r.channel));
                    }
                }
                let gone = leave_out(p, |pair| self.pairs().active.contains(&pair));
                self.detach(gone);
            }
        }
        prepared
    }

    /// [`Node::prepare`], unless the session has ended (before or
    /// meanwhile); `claims` go with the result, until its activation, or
    /// back with a refusal (to be let go once the caller has undone what
    /// it recorded).
    async fn register(&self, reqs: &[SubRequest], claims: Claims) -> Result<Prepared, (Error, Claims)> {
        if self.is_ended() {
            return Err((Error::unavailable("the subscriber is gone"), claims));
        }
        let prepared = self.node.prepare(&self.outbox, reqs).await;
        if self.is_ended() {
            // Ended while registering: `end` may have run before these were
            // attached, so detach them here (detaching twice is harmless).
            for r in reqs {
                self.node.unsubscribe(self.outbox.id(), &r.symbol, r.channel);
            }
            return Err((Error::unavailable("the subscriber is gone"), claims));
        }
        match prepared {
            Ok(p) => Ok(p.holding(claims.each())),
            Err(e) => Err((e, claims)),
        }
    }

    /// Detaches pairs [`leave_out`] took out of a registration.
    fn detach(&self, gone: Vec<Pair>) {
        for (symbol, channel) in gone {
            self.node.unsubscribe(self.outbox.id(), &symbol, channel);
        }
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
    /// registered, unsubscribed, superseded or the session ends, or the
    /// owner refuses them. `ready` is told of each successful retry before
    /// it is activated (to queue the protocol's reply), and of a refusal
    /// (`symbol_limit` from the owner once it is back): the pairs still
    /// retried are then dropped whole, as their subscribe would have been
    /// refused whole had the owner been up (contract §4).
    pub fn retry<F>(self: &Arc<Self>, tracker: &TaskTracker, failed: Vec<(SubRequest, String)>, mut ready: F)
    where
        F: FnMut(&Session<C>, Retried<'_>) + Send + 'static,
    {
        let mut reqs: Vec<SubRequest> = Vec::with_capacity(failed.len());
        let me = {
            let mut pairs = self.pairs();
            let me = pairs.next_retry;
            pairs.next_retry += 1;
            for (r, _) in failed {
                if pairs.active.contains(&(r.symbol, r.channel)) {
                    pairs.retrying.insert((r.symbol, r.channel), me);
                    reqs.push(r);
                }
            }
            me
        };
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
                let mine = |r: &SubRequest, p: &Pairs| p.retrying.get(&(r.symbol, r.channel)) == Some(&me);
                reqs.retain(|r| mine(r, &session.pairs()));
                if reqs.is_empty() {
                    return;
                }
                // Its pairs' claims first: a subscribe that supersedes one
                // of them is either seen below or waits until this
                // registration is activated.
                let claims = tokio::select! {
                    () = session.ended.cancelled() => return,
                    c = Claims::take(&session.claims, &reqs) => c,
                };
                reqs.retain(|r| mine(r, &session.pairs()));
                if reqs.is_empty() {
                    return;
                }
                let mut prepared = match session.register(&reqs, claims).await {
                    Ok(p) => p,
                    Err((e @ Error::Refused { .. }, _claims)) => {
                        // (`_claims` held until the pairs are dropped: a
                        // subscribe of them waiting meanwhile comes after)
                        let mut pairs = session.pairs();
                        reqs.retain(|r| mine(r, &pairs));
                        for r in &reqs {
                            pairs.retrying.remove(&(r.symbol, r.channel));
                            pairs.active.remove(&(r.symbol, r.channel));
                        }
                        // (under the lock, like a success's reply)
                        if !reqs.is_empty() {
                            ready(&session, Retried::Refused(&reqs, &e));
                        }
                        return;
                    }
                    Err(_) => continue,
                };
                reqs = std::mem::take(&mut prepared.failed)
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                if !prepared.results.is_empty() {
                    let gone;
                    {
                        let mut pairs = session.pairs();
                        gone = leave_out(&mut prepared, |pair| pairs.retrying.get(&pair) == Some(&me));
                        for r in &prepared.results {
                            pairs.retrying.remove(&(r.symbol, r.channel));
                        }
                        // (announced under the lock: an unsubscribe comes
                        // either before, and the pair is left out, or after
                        // its reply)
                        if !prepared.results.is_empty() {
                            ready(&session, Retried::Subscribed(&prepared.results));
                        }
                    }
                    session.detach(gone);
                    if !prepared.results.is_empty() {
                        session.activate(prepared).await;
                    }
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

/// What became of a deferred subscription's retry (see [`Session::retry`]).
pub enum Retried<'a> {
    /// These pairs are registered, about to be activated.
    Subscribed(&'a [SubResult]),
    /// The owner refused these pairs (their registration changed nothing);
    /// the session no longer holds them.
    Refused(&'a [SubRequest], &'a Error),
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

#[cfg(test)]
mod tests {
    //! The session against a real node (a sled store in a temp dir, its
    //! committer thread), in-process, on tokio's paused clock: retries wait
    //! with back-off, so virtual time makes them deterministic and instant.

    use std::path::Path;

    use super::*;
    use crate::ownership::remote_symbols;

    fn node(dir: &Path, shards: u32, max_symbols: usize) -> Arc<Node> {
        crate::node::test_node(dir, shards, max_symbols)
    }

    fn session(node: &Arc<Node>) -> Arc<Session<()>> {
        Session::new(node.clone(), node.outbox(Duration::from_secs(10)))
    }

    fn sym(s: &str) -> Symbol {
        Symbol::parse(s).expect("symbol")
    }

    /// A tick of `s` with `seq`, `at` µs after a fixed time.
    fn tick(s: &str, seq: u64, at: i64) -> crate::domain::Tick {
        crate::domain::Tick {
            symbol: sym(s),
            seq,
            ts: 1_700_000_000_000_000 + at,
            price: rust_decimal::Decimal::ONE,
            size: rust_decimal::Decimal::ONE,
            bid: None,
            ask: None,
            bid_size: None,
            ask_size: None,
        }
    }

    /// Publishes one tick of each of `symbols`, in order, each acked
    /// (durable) before the next.
    async fn publish(node: &Node, symbols: &[&str]) {
        let (reply, mut acks) = crate::committer::AckTx::new();
        for (i, s) in symbols.iter().enumerate() {
            let cmd = crate::committer::PublishCmd {
                tick: tick(s, 0, i as i64),
                publisher: None,
                request_id: i as u64,
                reply: reply.clone(),
                received: std::time::Instant::now(),
            };
            node.publish(cmd).await.expect("queued");
            acks.recv().await.expect("acked");
        }
    }

    fn subscribers(node: &Node, s: &str) -> usize {
        node.hub().get(&sym(s)).map_or(0, |h| h.subscriber_count())
    }

    #[test]
    fn requests_are_symbols_times_channels_with_resume_on_ticks_only() {
        let pos = Position {
            seq: 7,
            epoch: crate::domain::Epoch::default(),
        };
        let resume = HashMap::from([(sym("A"), pos)]);
        let candles = Channel::Candles(crate::domain::Interval::M1);
        let reqs = requests(&[sym("A"), sym("B")], &[Channel::Ticks, candles], &resume);
        let got: Vec<_> = reqs.iter().map(|r| (r.symbol, r.channel, r.resume)).collect();
        assert_eq!(
            got,
            vec![
                (sym("A"), Channel::Ticks, Some(pos)),
                (sym("A"), candles, None),
                (sym("B"), Channel::Ticks, None),
                (sym("B"), candles, None),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_subscribe_changes_nothing_and_the_end_detaches_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 1, 1);
        let s = session(&node);
        let first = requests(&[sym("AAA")], &[Channel::Ticks], &HashMap::new());
        let prepared = s.prepare(&first).await.expect("first symbol");
        assert_eq!(prepared.results.len(), 1);
        s.activate(prepared).await;
        assert_eq!(subscribers(&node, "AAA"), 1);

        // a second symbol would pass --max-symbols 1: refused whole
        let both = requests(&[sym("AAA"), sym("BBB")], &[Channel::Ticks], &HashMap::new());
        let err = s.prepare(&both).await.err().expect("symbol limit");
        assert_eq!(err.code(), crate::domain::ErrorCode::SymbolLimit, "{err}");
        assert_eq!(s.count_after(&first), 1, "the pair it had stays");
        assert_eq!(subscribers(&node, "AAA"), 1);

        assert!(s.unsubscribe(&sym("AAA"), Channel::Ticks));
        assert!(!s.unsubscribe(&sym("AAA"), Channel::Ticks), "only once");
        let prepared = s.prepare(&first).await.expect("again");
        s.activate(prepared).await;
        assert_eq!(subscribers(&node, "AAA"), 1);
        s.end();
        assert_eq!(subscribers(&node, "AAA"), 0, "the end detaches");
        assert!(s.outbox().is_gone());
        let err = s.prepare(&first).await.err().expect("ended");
        assert!(matches!(err, Error::Unavailable(_)));
        assert_eq!(subscribers(&node, "AAA"), 0, "nothing attached after the end");
        node.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_guard_ends_the_session_while_a_task_still_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 1, 10);
        let s = session(&node);
        let held = s.clone();
        let reqs = requests(&[sym("AAA")], &[Channel::Ticks], &HashMap::new());
        {
            let guard = SessionGuard::new(s.clone());
            let prepared = guard.prepare(&reqs).await.expect("subscribe");
            guard.activate(prepared).await;
            assert_eq!(subscribers(&node, "AAA"), 1);
        }
        assert!(held.is_ended());
        assert_eq!(subscribers(&node, "AAA"), 0);
        node.shutdown().await;
    }

    /// Symbols another (down) shard owns: the subscribe is deferred; the
    /// retries go on with back-off until the pair is unsubscribed (or the
    /// session ends), and then the retry task ends.
    #[tokio::test(start_paused = true)]
    async fn deferred_retries_stop_when_unsubscribed_or_ended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 2, 10);
        let remote = remote_symbols(2, 2);
        for end in [false, true] {
            let s = session(&node);
            let reqs = requests(&remote, &[Channel::Ticks], &HashMap::new());
            let mut prepared = s.prepare(&reqs).await.expect("deferred, not refused");
            assert!(prepared.results.is_empty());
            assert_eq!(prepared.failed.len(), 2, "the owner is down");
            let failed = std::mem::take(&mut prepared.failed);
            drop(prepared); // (its claims: nothing to activate)
            let tracker = TaskTracker::new();
            let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = calls.clone();
            s.retry(&tracker, failed, move |_, _| {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
            tracker.close();
            // a minute of virtual time: many retries, all failing
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert!(!tracker.is_empty(), "still retrying while the owner is down");
            if end {
                s.end();
            } else {
                for r in &remote {
                    assert!(s.unsubscribe(r, Channel::Ticks));
                }
            }
            tokio::time::timeout(Duration::from_secs(10), tracker.wait())
                .await
                .expect("the retry task ends");
            assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0);
            assert_eq!(s.count_after(&[]), 0);
        }
        node.shutdown().await;
    }

    /// A registration holding a pair (a retry, say) delays another
    /// registration of that pair until it is activated, and no other: a
    /// subscribe of other symbols goes on. The claims go with their
    /// registrations.
    #[tokio::test]
    async fn a_registration_waits_only_for_its_own_pairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 1, 10);
        let s = session(&node);
        let x = requests(&[sym("XXX")], &[Channel::Ticks], &HashMap::new());
        let y = requests(&[sym("YYY"), sym("ZZZ")], &[Channel::Ticks], &HashMap::new());
        let held = Claims::take(&s.claims, &x).await;
        let other = tokio::time::timeout(Duration::from_secs(10), s.prepare(&y)).await;
        let other = other.expect("other pairs do not wait").expect("subscribed");
        s.activate(other).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), s.prepare(&x))
                .await
                .is_err(),
            "the same pair waits"
        );
        drop(held);
        let same = s.prepare(&x).await.expect("subscribed once the claim went");
        s.activate(same).await;
        assert_eq!(subscribers(&node, "XXX"), 1);
        assert!(claim_map(&s.claims).is_empty(), "no claim left behind");
        node.shutdown().await;
    }

    /// A pair's claim goes with its own activation, and replays are
    /// activated last: a replay that waits (here for a subscriber that
    /// takes nothing) holds up no other pair of its registration. Fails
    /// when the claims go only at the end of the whole activation.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_replay_holds_up_no_other_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 1, 10);
        publish(&node, &["XXX", "XXX", "XXX", "YYY"]).await;
        // a subscriber already past its queue's limit: a replay waits for room
        let outbox: Arc<Outbox<()>> = Arc::new(Outbox::new(9_999, 4_096, Duration::from_secs(3_600)));
        let backlog = (1..=100).map(|seq| tick("QQQ", seq, 0));
        crate::hub::Sink::force(
            &*outbox,
            crate::hub::Data::Ticks {
                chunk: Arc::new(crate::hub::Chunk::new(sym("QQQ"), backlog.collect())),
                from: 0,
            },
        );
        let s = Session::new(node.clone(), outbox.clone());
        let epoch = node.head(&sym("XXX")).expect("head").epoch;
        let resume = HashMap::from([(sym("XXX"), Position { seq: 1, epoch })]);
        // the replay first in the request
        let both = requests(&[sym("XXX"), sym("YYY")], &[Channel::Ticks], &resume);
        let prepared = s.prepare(&both).await.expect("subscribed");
        let activation = crate::tasks::spawn(&TaskTracker::new(), {
            let s = s.clone();
            async move { s.activate(prepared).await }
        });
        let y = requests(&[sym("YYY")], &[Channel::Ticks], &HashMap::new());
        let again = tokio::time::timeout(Duration::from_secs(10), s.prepare(&y))
            .await
            .expect("YYY is not held up by XXX's replay")
            .expect("subscribed");
        s.activate(again).await;
        assert!(!activation.is_finished(), "the replay still waits");
        // the subscriber takes its queue: the replay goes on and ends
        let mut q = std::collections::VecDeque::new();
        let _ = outbox.take(&mut q).await;
        let _ = outbox.written(q.iter().map(|m| m.weight()).sum());
        activation.await.expect("activation");
        assert!(claim_map(&s.claims).is_empty(), "no claim left behind");
        s.end();
        node.shutdown().await;
    }

    /// A replay whose owner stays away (here: the symbol unsettled, as
    /// during a hand-over's import) waits [`crate::node::REPLAY_OWNER_WAIT`]
    /// at most, then sends a conflated snapshot: nothing waits without
    /// bound. Fails (the activation never ends) without the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_replay_waits_for_a_missing_owner_only_so_long() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 1, 10);
        publish(&node, &["XXX"; 3]).await;
        let s = session(&node);
        let epoch = node.head(&sym("XXX")).expect("head").epoch;
        let resume = HashMap::from([(sym("XXX"), Position { seq: 1, epoch })]);
        let reqs = requests(&[sym("XXX")], &[Channel::Ticks], &resume);
        let prepared = s.prepare(&reqs).await.expect("subscribed");
        node.placement().note_unsettled(sym("XXX"), true);
        tokio::time::timeout(crate::node::REPLAY_OWNER_WAIT * 2, s.activate(prepared))
            .await
            .expect("the replay gave up waiting");
        let mut q = std::collections::VecDeque::new();
        let _ = s.outbox().take(&mut q).await;
        let got: Vec<(u64, bool)> = q
            .iter()
            .filter_map(|m| match m {
                crate::hub::Msg::Data(crate::hub::Data::Snapshot(snap)) => Some((snap.tick.seq, snap.conflated)),
                crate::hub::Msg::Data(crate::hub::Data::Ticks { .. }) => Some((0, false)),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![(3, true)], "a conflated snapshot of the head, no ticks");
        node.placement().note_unsettled(sym("XXX"), false);
        s.end();
        node.shutdown().await;
    }

    /// A subscription unsubscribed between its registration and its
    /// activation gets nothing more: no snapshot, no replay.
    #[tokio::test]
    async fn a_pair_unsubscribed_before_its_activation_gets_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 1, 10);
        publish(&node, &["XXX"]).await;
        let x = requests(&[sym("XXX")], &[Channel::Ticks], &HashMap::new());
        for unsubscribe in [true, false] {
            let s = session(&node);
            let prepared = s.prepare(&x).await.expect("subscribed");
            if unsubscribe {
                assert!(s.unsubscribe(&sym("XXX"), Channel::Ticks));
            }
            s.activate(prepared).await;
            assert_eq!(
                s.outbox().unsent() > 0,
                !unsubscribe,
                "a snapshot only if still subscribed"
            );
            s.end();
        }
        node.shutdown().await;
    }

    /// `n` new symbols shard 0 (of 2) owns.
    fn local_symbols(n: usize) -> Vec<Symbol> {
        let own = crate::ownership::Ownership::new(2, 0);
        (0..)
            .map(|i| sym(&format!("L{i}")))
            .filter(|s| own.is_local(s))
            .take(n)
            .collect()
    }

    /// A subscribe refused whole (`symbol_limit`) that names a deferred
    /// pair leaves it deferred and still retried: the refusal changes
    /// nothing (it used to take the pair from its retry, which then let it
    /// go: subscribed on paper, never attached, never retried).
    #[tokio::test(start_paused = true)]
    async fn a_refused_subscribe_leaves_a_deferred_pair_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 2, 3);
        let remote = remote_symbols(2, 1);
        let s = session(&node);
        let deferred = requests(&remote, &[Channel::Ticks], &HashMap::new());
        let mut prepared = s.prepare(&deferred).await.expect("deferred, not refused");
        let failed = std::mem::take(&mut prepared.failed);
        drop(prepared);
        let tracker = TaskTracker::new();
        s.retry(&tracker, failed, |_, _| {});
        tracker.close();
        let pair = (remote[0], Channel::Ticks);
        let retry = s.pairs().retrying.get(&pair).copied();
        assert!(retry.is_some());

        let mut both = remote.clone();
        both.extend(local_symbols(4));
        let refused = s.prepare(&requests(&both, &[Channel::Ticks], &HashMap::new())).await;
        let Err(e) = refused else {
            panic!("four new symbols past --max-symbols 3")
        };
        assert_eq!(e.code(), crate::domain::ErrorCode::SymbolLimit);
        assert_eq!(s.pairs().retrying.get(&pair).copied(), retry, "still deferred");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!tracker.is_empty(), "and still retried");
        assert_eq!(s.symbols(), remote);
        s.end();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("the retry task ends");
        node.shutdown().await;
    }

    /// A retry the owner refuses (`symbol_limit` once it is back) drops its
    /// pairs whole and says so, once; it used to retry them for the
    /// session's life, and the client was never told.
    #[tokio::test(start_paused = true)]
    async fn a_refused_retry_drops_its_pairs_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 2, 3);
        let s = session(&node);
        let reqs = requests(&local_symbols(4), &[Channel::Ticks], &HashMap::new());
        // (as a subscribe deferred while the owner was down records them)
        s.pairs().active.extend(reqs.iter().map(|r| (r.symbol, r.channel)));
        let failed = reqs.iter().map(|r| (*r, "down".to_string())).collect();
        let told = Arc::new(Mutex::new(Vec::new()));
        let seen = told.clone();
        let tracker = TaskTracker::new();
        s.retry(&tracker, failed, move |_, retried| {
            let Retried::Refused(reqs, e) = retried else {
                panic!("refused")
            };
            seen.lock().expect("lock").push((reqs.len(), e.code()));
        });
        tracker.close();
        // (the committer answers in real time, and a paused clock's timeout
        // would run out while it does: bounded in real time instead)
        let real = std::time::Instant::now();
        while !tracker.is_empty() {
            assert!(real.elapsed() < Duration::from_secs(20), "the retry task ends");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            *told.lock().expect("lock"),
            vec![(4, crate::domain::ErrorCode::SymbolLimit)]
        );
        assert_eq!(s.count_after(&[]), 0, "the session no longer holds them");
        node.shutdown().await;
    }

    /// A deferred pair subscribed again is retried by the later subscribe's
    /// task alone: the earlier task lets it go and ends. (Each subscribe
    /// used to add a task that kept retrying the pair, and when the owner
    /// came back they all registered it: duplicate and reordered ticks.)
    #[tokio::test(start_paused = true)]
    async fn a_deferred_pair_subscribed_again_is_retried_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), 2, 10);
        let reqs = requests(&remote_symbols(2, 1), &[Channel::Ticks], &HashMap::new());
        let s = session(&node);
        let tracker = TaskTracker::new();
        for _ in 0..3 {
            let mut prepared = s.prepare(&reqs).await.expect("deferred, not refused");
            assert_eq!(prepared.failed.len(), 1, "the owner is down");
            let failed = std::mem::take(&mut prepared.failed);
            drop(prepared); // (its claims: nothing to activate)
            s.retry(&tracker, failed, |_, _| {});
        }
        // (each task sees the pair superseded at its next attempt)
        tokio::time::sleep(RETRY_MAX * 2).await;
        assert_eq!(tracker.len(), 1, "one retry task for the pair");
        s.end();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("the retry task ends");
        node.shutdown().await;
    }
}
