//! The API that protocol layers (WebSocket, gRPC, peers) call: publish,
//! subscribe, reads. It hides where data lives: the local store and hub for
//! symbols this pod owns, the owner pod over its peer link for the others.
//! [`rebalance`]: changing the shard count of a running cluster (contract §9).

pub mod rebalance;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Error,
    backoff::Backoff,
    cluster::{Cluster, ClusterConfig, ClusterError, MirrorLease, Peer},
    committer::{CommitError, Committer, CommitterConfig, PublishCmd, Relay, Setup},
    domain::{Candle, Epoch, HistoryQuery, Interval, Position, Symbol, Tick},
    hub::{CandleData, Channel, Chunk, Data, Head, Hub, Outbox, SnapshotData, SymbolHub},
    metrics as m,
    placement::{ClusterState, Placement},
    store::{MoveMark, Store, StoreError, StoreOptions},
};

/// How long a route switch waits for publishes in flight (see `adopt`).
const SWITCH_DRAIN: Duration = Duration::from_secs(5);
/// Then how long it waits for the links it cut to refuse what they had.
const CUT_WAIT: Duration = Duration::from_secs(2);
/// Ticks read per page during a resume replay (~160 KiB queued at a time).
const REPLAY_PAGE: usize = 1_024;
/// Longest a resume replay waits for an owner that went away mid-replay;
/// then the subscriber gets a conflated snapshot instead (it knows it
/// missed data, and may resume again later).
pub const REPLAY_OWNER_WAIT: Duration = Duration::from_secs(30);

/// Everything the shard needs to know, validated by the binary's config.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub store: StoreOptions,
    pub shard_id: u32,
    pub shards: u32,
    /// Ticks retained per symbol (at least).
    pub history_ticks: u64,
    /// Candle retention per interval, indexed by `Interval::index`, measured
    /// back from the symbol's newest tick time.
    pub candle_retention: [Duration; 3],
    /// How often retention runs.
    pub prune_interval: Duration,
    /// A subscriber's unsent-bytes limit; also bounds held data during setup.
    pub client_queue_bytes: usize,
    /// Peer URL of every shard, by id (used when `shards > 1`).
    pub peers: Vec<String>,
    /// `--peers` as a template (`{}` for the id), when it was given as one:
    /// a rebalance may then grow the cluster to any size.
    pub peer_template: Option<String>,
    /// Mutual TLS of peer links (`https://` peers), else plaintext.
    pub peer_tls: Option<crate::cluster::PeerTls>,
    /// Unsent bytes per peer follower before its stream is closed.
    pub peer_queue_bytes: usize,
    /// Symbol limit, clock check, forgetting of never-ticked symbols.
    pub committer: CommitterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "data dir {path} belongs to shard {found_id}, but this pod is shard {id}; \
         refusing to start (point --data-dir at the right volume, or fix --shard-id)"
    )]
    WrongShard { path: PathBuf, found_id: u32, id: u32 },
    #[error(transparent)]
    Start(#[from] crate::committer::StartError),
}

/// One requested subscription.
#[derive(Clone, Copy, Debug)]
pub struct SubRequest {
    pub symbol: Symbol,
    pub channel: Channel,
    pub resume: Option<Position>,
}

/// The outcome of one subscription, as the `subscribed` reply reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubResult {
    pub symbol: Symbol,
    pub channel: Channel,
    pub epoch: Epoch,
    /// The position the client will be at once the initial data is delivered.
    pub seq: u64,
    pub recovered: bool,
}

impl SubResult {
    /// One entry per symbol for a `subscribed` reply: the symbol's ticks
    /// subscription if it has one, else its first.
    /// (Linear in the results: a position per symbol, not a scan.)
    pub fn per_symbol(results: &[SubResult]) -> Vec<SubResult> {
        let mut out: Vec<SubResult> = Vec::new();
        let mut at: std::collections::HashMap<Symbol, usize> = std::collections::HashMap::with_capacity(results.len());
        for r in results {
            match at.get(&r.symbol) {
                Some(&i) if r.channel == Channel::Ticks => out[i] = *r,
                Some(_) => {}
                None => {
                    at.insert(r.symbol, out.len());
                    out.push(*r);
                }
            }
        }
        out
    }
}

enum Plan {
    /// Nothing to send first: the client already has everything up to the head.
    Live,
    Snapshot(Option<Tick>),
    Replay {
        from: u64,
        to: u64,
    },
    Candle(Option<Candle>),
}

/// Subscriptions registered but not yet live: send the `subscribed` reply,
/// then call [`Node::activate`].
pub struct Prepared {
    pub results: Vec<SubResult>,
    plans: Vec<Plan>,
    /// Requests that cannot be served now (their owner shard is unavailable),
    /// with why. Nothing of them is registered; the caller may retry them.
    pub failed: Vec<(SubRequest, String)>,
    /// What the registration holds of each pair until it is activated (or
    /// dropped): the session's claim on it (`session::Claims`).
    hold: HashMap<(Symbol, Channel), Hold>,
}

/// Something a registration holds of one pair until its activation.
pub(crate) type Hold = Box<dyn Send>;

impl Prepared {
    /// Keeps each pair's hold until that pair is activated (or these are
    /// dropped).
    pub(crate) fn holding(mut self, holds: impl IntoIterator<Item = ((Symbol, Channel), Hold)>) -> Prepared {
        self.hold.extend(holds);
        self
    }

    /// Leaves out the subscriptions `keep` refuses (they are not activated).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&SubResult) -> bool) {
        let mut plans = std::mem::take(&mut self.plans).into_iter();
        let results = std::mem::take(&mut self.results);
        for r in results {
            let plan = plans.next();
            if keep(&r)
                && let Some(plan) = plan
            {
                self.results.push(r);
                self.plans.push(plan);
            }
        }
    }
}

pub struct Node {
    cfg: NodeConfig,
    store: Arc<Store>,
    hub: Arc<Hub>,
    committer: Committer,
    committer_thread: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    placement: Arc<Placement>,
    /// Taken by `start_background`: states heard from peers, relayed publishes.
    background: std::sync::Mutex<Option<Background>>,
    /// One state change at a time (see [`Node::adopt_state`]).
    adopting: tokio::sync::Mutex<()>,
    /// The cluster state came from this pod's store (not from `--shards`).
    state_stored: bool,
    /// The relay task runs (before it does, nothing was relayed: a commit
    /// adopted at start-up has nothing to drain).
    relay_running: std::sync::atomic::AtomicBool,
    /// Hand-overs of this pod (contract §9): see `rebalance`.
    pub(crate) moves: rebalance::Moves,
    next_sink: AtomicU64,
    cluster: Option<Arc<Cluster>>,
    instance: String,
    ready: std::sync::atomic::AtomicBool,
    /// Tasks serving publish and peer streams (their readers, follow
    /// handlers): the drain waits for them once the gRPC listener stopped.
    stream_tasks: TaskTracker,
    /// The cluster-wide symbol lists (see [`Node::all_symbols`]).
    pub(crate) symbol_lists: SymbolLists,
}

/// Cluster-wide symbol lists (see [`Node::all_symbols`]).
#[derive(Default)]
pub(crate) struct SymbolLists {
    /// Lists started so far (each gets the next number).
    pub(crate) started: AtomicU64,
    /// The last list made, with its number; held while one is made.
    pub(crate) done: tokio::sync::Mutex<Option<(u64, Arc<Vec<crate::domain::SymbolInfo>>)>>,
}

impl Node {
    /// Opens the store (checking format and identity) and starts the committer.
    pub fn open(cfg: NodeConfig) -> Result<Arc<Node>, NodeError> {
        let store = Arc::new(Store::open(&cfg.data_dir, &cfg.store)?);
        let old_n = match store.identity()? {
            None => {
                store.set_identity(cfg.shard_id, cfg.shards)?;
                None
            }
            Some((id, n)) if id == cfg.shard_id => Some(n),
            Some((found_id, _)) => {
                return Err(NodeError::WrongShard {
                    path: cfg.data_dir.clone(),
                    found_id,
                    id: cfg.shard_id,
                });
            }
        };
        // The committed count lives in the cluster (contract §9): this store's
        // copy, else (a data dir of the first release) the count it was made
        // for, else `--shards` (a new pod; peers may know a newer one).
        let stored = store.cluster_state()?;
        let state_stored = stored.is_some() || old_n.is_some();
        let (state, sealed) = match stored {
            Some(s) => s,
            None => (ClusterState::initial(old_n.unwrap_or(cfg.shards)), false),
        };
        if state.committed != cfg.shards {
            tracing::warn!(
                flag = cfg.shards, committed = state.committed, target = ?state.target,
                "--shards differs from the cluster's committed shard count; following the cluster"
            );
        }
        let marks = store.load_move_marks()?;
        let records = store.load_symbols()?;
        let dedup = store.load_dedup()?;
        tracing::info!(symbols = records.len(), dir = %cfg.data_dir.display(), cluster = %state, "store open");
        let hub = Arc::new(Hub::new(cfg.client_queue_bytes));
        let (placement, heard) = Placement::new(cfg.shard_id, state);
        if let Some(t) = state.target {
            // A rebalance runs: what this pod handed over, and what it took
            // over (stored here, its owner under the target, not under the
            // committed map), route as before the restart.
            for mk in marks.iter().filter(|m| m.done) {
                placement.note_moved(mk.symbol, mk.to);
            }
            let me = cfg.shard_id;
            let owner =
                |s: &Symbol, n: u32| crate::ownership::jump_consistent_hash(crate::ownership::symbol_hash(s), n);
            for r in records
                .iter()
                .filter(|r| owner(&r.symbol, state.committed) != me && owner(&r.symbol, t) == me)
            {
                let _ = placement.note_moved_in(r.symbol);
            }
        }
        let unresolved: Vec<MoveMark> = marks.iter().filter(|m| !m.done).copied().collect();
        for mk in &unresolved {
            placement.note_unsettled(mk.symbol, true);
        }
        let (relay_tx, relay_rx) = tokio::sync::mpsc::unbounded_channel();
        let setup = Setup {
            me: cfg.shard_id,
            state,
            sealed,
            marks,
            relay: relay_tx,
        };
        let (committer, join) =
            Committer::start(store.clone(), hub.clone(), records, dedup, cfg.committer.clone(), setup)?;
        let clustered = cfg.peers.len() > 1 || cfg.peer_template.is_some() || state.span() > 1;
        let cluster = clustered.then(|| {
            Cluster::new(
                ClusterConfig {
                    shard_id: cfg.shard_id,
                    peers: cfg.peers.clone(),
                    peer_template: cfg.peer_template.clone(),
                    peer_tls: cfg.peer_tls.clone(),
                    peer_queue_bytes: cfg.peer_queue_bytes,
                    connect_timeout: Duration::from_secs(2),
                },
                hub.clone(),
                placement.clone(),
            )
        });
        let instance = cluster
            .as_ref()
            .map_or_else(|| format!("{:016x}", fastrand::u64(..)), |c| c.instance().to_string());
        m::set_cluster_gauges(&state);
        Ok(Arc::new(Node {
            placement,
            background: std::sync::Mutex::new(Some(Background { heard, relay: relay_rx })),
            adopting: tokio::sync::Mutex::new(()),
            relay_running: std::sync::atomic::AtomicBool::new(false),
            state_stored,
            moves: rebalance::Moves::new(unresolved, cfg.history_ticks),
            cfg,
            store,
            hub,
            committer,
            committer_thread: std::sync::Mutex::new(Some(join)),
            next_sink: AtomicU64::new(1),
            cluster,
            instance,
            ready: std::sync::atomic::AtomicBool::new(false),
            stream_tasks: TaskTracker::new(),
            symbol_lists: SymbolLists::default(),
        }))
    }

    /// Before serving: refuses an inconsistent cluster (see
    /// [`Cluster::check_topology`]) and adopts a newer cluster state a peer
    /// has (a pod started with a stale `--shards`, or one that was down
    /// during a rebalance, follows the cluster).
    pub async fn check_cluster(&self) -> Result<(), ClusterError> {
        let Some(c) = &self.cluster else { return Ok(()) };
        let ours = self.placement.state();
        // (a new data dir has no state of its own: the cluster's wins)
        if let Some(newer) = c.check_topology().await?
            && (newer.version > ours.version || (!self.state_stored && newer != ours))
        {
            tracing::info!(ours = %ours, theirs = %newer, "adopting the cluster's newer shard layout");
            if let Err(e) = self.adopt(newer, false, true).await {
                tracing::warn!(error = %e, "could not adopt the cluster's state");
            }
        }
        Ok(())
    }

    /// Adopts a cluster state if it is newer than this pod's (or the same
    /// one, now sealed): durable in the store first, then in the routes.
    /// Committing a rebalance switches every route at once (publish gates
    /// closed, relayed publishes drained), moves mirrors to the symbols' new
    /// owners and stops links to shards beyond the new count.
    pub async fn adopt_state(&self, state: ClusterState, seal: bool) -> Result<ClusterState, Error> {
        self.adopt(state, seal, false).await
    }

    /// `force`: adopt even an equal version (a new data dir joining a cluster).
    async fn adopt(&self, state: ClusterState, seal: bool, force: bool) -> Result<ClusterState, Error> {
        let _one = self.adopting.lock().await;
        let cur = self.placement.state();
        if !force && (state.version < cur.version || (state.version == cur.version && !seal)) {
            return Ok(cur);
        }
        if let Some(c) = &self.cluster {
            // (links only grow while a rebalance runs: every pod that may
            // hold a symbol stays reachable until the commit)
            c.resize(state.span().max(c.span()));
        }
        if state.target.is_none() && state.version > cur.version {
            let gates = self.placement.close_gates().await;
            self.committer.set_state(state, seal).await?;
            // Before the routes switch: every relayed publish is on its link,
            // and every publish already sent to an old owner is answered (a
            // later one of its pair must not overtake it on the new route).
            // Bounded: past SWITCH_DRAIN the links with forwards unanswered
            // are cut, which refuses each as UNAVAILABLE and marks its pair's
            // hole on its stream, so no later request of the pair passes it
            // on the new route (one that did could make the refused one, when
            // resent, look like a retry of it: acked as a duplicate, lost).
            if self.relay_running.load(Ordering::Acquire) {
                let drained = async {
                    let _ = self.committer.barrier().await;
                    if let Some(c) = &self.cluster {
                        c.forwards_answered().await;
                    }
                };
                if tokio::time::timeout(SWITCH_DRAIN, drained).await.is_err()
                    && let Some(c) = &self.cluster
                {
                    let links = c.cut_forwarding_links();
                    let refused = tokio::time::timeout(CUT_WAIT, c.forwards_answered()).await.is_ok();
                    if refused {
                        tracing::warn!(
                            links,
                            "switching routes: links with publishes unanswered by an old owner were cut (they are refused, retryable)"
                        );
                    } else {
                        tracing::error!(links, "switching routes with publishes still in flight to an old owner");
                    }
                }
            }
            self.placement.set_state(state);
            drop(gates);
            self.rehome_mirrors();
            if let Some(c) = &self.cluster {
                c.resize(state.span());
            }
        } else {
            self.committer.set_state(state, seal).await?;
            self.placement.set_state(state);
        }
        m::set_cluster_gauges(&state);
        if state.version > cur.version {
            tracing::info!(from = %cur, to = %state, "cluster state adopted");
        }
        Ok(state)
    }

    /// After a commit: each mirror is fed by its symbol's owner under the
    /// new map (subscribers stay attached; the new owner resumes it at its
    /// position).
    fn rehome_mirrors(&self) {
        let Some(c) = &self.cluster else { return };
        for link in c.peers() {
            for sym in link.mirrored() {
                let owner = self.placement.owner(&sym);
                if owner == link.id {
                    continue;
                }
                if owner == self.placement.me() {
                    // (this pod owns it: nothing to mirror)
                    link.take_mirror(&sym);
                    continue;
                }
                match c.peer(owner) {
                    Some(to) => {
                        if let Some(hub) = link.take_mirror(&sym) {
                            to.adopt_mirror(hub);
                        }
                    }
                    None => tracing::warn!(symbol = %sym, owner, "a mirror whose owner has no link here"),
                }
            }
        }
    }

    pub fn placement(&self) -> &Arc<Placement> {
        &self.placement
    }

    /// A symbol whose interrupted hand-over is not settled is not served
    /// here (this pod's copy may be behind its new owner's).
    pub(crate) fn check_settled(&self, symbol: &Symbol) -> Result<(), Error> {
        if self.placement.is_unsettled(symbol) {
            return Err(Error::Unavailable(format!(
                "{symbol} is in the middle of a move between shards; retry"
            )));
        }
        Ok(())
    }

    pub(crate) fn committer(&self) -> &Committer {
        &self.committer
    }

    /// The symbols this pod still has to move (see `rebalance`).
    pub async fn committer_moves(&self) -> Result<Vec<(Symbol, u32)>, CommitError> {
        self.committer.moves().await
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The link to the owner of `symbol`; `None` if this pod owns it.
    pub fn peer_of(&self, symbol: &Symbol) -> Option<Arc<Peer>> {
        let owner = self.placement.owner(symbol);
        self.cluster.as_ref().and_then(|c| c.peer(owner))
    }

    /// Where reads of `symbol` go: `None` if this pod owns it, the owner's
    /// link if another shard does, `Unavailable` if there is no link to that
    /// shard (yet).
    ///
    /// Asked again after a read of this pod's own copy: a hand-over notes
    /// the new owner before it deletes this pod's copy, so a read that met
    /// the deletion (and found nothing) sees the new owner here and is asked
    /// again there.
    pub(crate) fn owner_link(&self, symbol: &Symbol) -> Result<Option<Arc<Peer>>, Error> {
        if self.placement.is_local(symbol) {
            return Ok(None);
        }
        self.peer_of(symbol).map(Some).ok_or_else(|| {
            let owner = self.placement.owner(symbol);
            Error::Unavailable(format!("no link to shard {owner}, the owner of {symbol}; retry"))
        })
    }

    /// Random per process start (peers see a restart as a new instance).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Set by the server once it serves, cleared when it drains.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.is_healthy()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Where tasks serving publish and peer streams are spawned.
    pub fn stream_tasks(&self) -> &TaskTracker {
        &self.stream_tasks
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// False once the store failed: the pod must not be ready or live.
    pub fn is_healthy(&self) -> bool {
        !self.committer.has_failed()
    }

    /// A fresh id for a subscriber's outbox.
    pub fn new_sink_id(&self) -> u64 {
        self.next_sink.fetch_add(1, Ordering::Relaxed)
    }

    /// A new outbox for a subscriber, with the configured limit.
    pub fn outbox<C: Send + 'static>(&self, slow: Duration) -> Arc<Outbox<C>> {
        Arc::new(Outbox::new(self.new_sink_id(), self.cfg.client_queue_bytes, slow))
    }

    /// Routes a publish to the symbol's owner: this pod's group commit, or the
    /// owner over its peer link. The ack arrives on `cmd.reply` once the tick is
    /// durable, or as UNAVAILABLE (also when this returns an error): every
    /// request is answered.
    pub async fn publish(&self, cmd: PublishCmd) -> Result<(), CommitError> {
        let _gate = self.placement.gate(&cmd.tick.symbol).await;
        let owner = self.placement.publish_owner(&cmd.tick.symbol);
        if owner == self.placement.me() {
            return self.committer.publish(cmd).await;
        }
        match self.cluster.as_ref().and_then(|c| c.peer(owner)) {
            Some(peer) => {
                peer.forward(cmd).await;
                Ok(())
            }
            None => {
                let e = CommitError::NotOwner(cmd.tick.symbol.to_string(), self.placement.me());
                cmd.unavailable(e.to_string());
                Err(e)
            }
        }
    }

    /// A publish forwarded by a peer: stored here only if this pod owns the
    /// symbol, by the committed map or by taking it over (never forwarded
    /// again; the committer relays one it handed over to the new owner,
    /// contract §9). No gate: a peer's stream keeps its own order, and once
    /// this pod refuses a symbol it refuses every later request of it.
    pub async fn publish_as_owner(&self, cmd: PublishCmd) -> Result<(), CommitError> {
        let s = &cmd.tick.symbol;
        let me = self.placement.me();
        if self.placement.publish_owner(s) != me && !self.placement.is_local(s) {
            let e = CommitError::NotOwner(cmd.tick.symbol.to_string(), self.placement.me());
            cmd.unavailable(e.to_string());
            return Err(e);
        }
        self.committer.publish(cmd).await
    }

    /// Makes sure symbols this pod owns have a durable epoch.
    pub async fn ensure_local(&self, symbols: Vec<Symbol>) -> Result<(), CommitError> {
        let missing: Vec<Symbol> = symbols.into_iter().filter(|s| self.hub.get(s).is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.committer.ensure(missing).await
    }

    /// The hub a subscription of `symbol` attaches to: the symbol's own (owned
    /// here) or its mirror (followed from the owner; the lease holds the mirror
    /// until the subscription is attached).
    async fn hub_for(&self, symbol: Symbol) -> Result<(Arc<SymbolHub>, Option<MirrorLease>), Error> {
        self.check_settled(&symbol)?;
        if let Some(peer) = self.peer_of(&symbol) {
            let lease = peer.mirror(symbol).await?;
            return Ok((lease.hub.clone(), Some(lease)));
        }
        self.ensure_local(vec![symbol]).await?;
        self.hub
            .get(&symbol)
            .map(|h| (h, None))
            .ok_or_else(|| Error::unavailable(format!("symbol {symbol} has no state")))
    }

    /// Attaches `sink` to the hub of `r.symbol` in setup mode. A hub retired
    /// meanwhile (its never-ticked symbol was forgotten) is looked up again.
    async fn attach<C: Send + 'static>(
        &self,
        sink: &Arc<Outbox<C>>,
        r: &SubRequest,
    ) -> Result<(Arc<SymbolHub>, Head, Option<MirrorLease>), Error> {
        for _ in 0..3 {
            let (h, lease) = self.hub_for(r.symbol).await?;
            let dyn_sink: Arc<dyn crate::hub::Sink> = sink.clone();
            if let Some(head) = h.attach(dyn_sink, r.channel) {
                return Ok((h, head, lease));
            }
        }
        Err(Error::Unavailable(format!(
            "symbol {} is being re-created; retry",
            r.symbol
        )))
    }

    /// Registers subscriptions (live data is held), creating epochs for
    /// symbols without one (all at once: a subscribe that would take the
    /// shard past `--max-symbols` creates none and fails with
    /// [`Error::Refused`] with `symbol_limit`) and deciding for each whether its
    /// resume can be served.
    pub async fn prepare<C: Send + 'static>(
        &self,
        sink: &Arc<Outbox<C>>,
        reqs: &[SubRequest],
    ) -> Result<Prepared, Error> {
        let mut local: Vec<Symbol> = reqs
            .iter()
            .map(|r| r.symbol)
            .filter(|s| self.placement.is_local(s) && self.hub.get(s).is_none())
            .collect();
        local.sort_unstable();
        local.dedup();
        self.ensure_local(local).await?;
        // Every hub first (mirrors are followed, and leased until attached),
        // so that a refusal (`symbol_limit` from another owner) comes before
        // anything is attached: a refused subscribe changes nothing.
        let mut hubs = Vec::with_capacity(reqs.len());
        let mut failed = Vec::new();
        for r in reqs {
            match self.hub_for(r.symbol).await {
                Ok(h) => hubs.push((r, h)),
                Err(Error::Unavailable(why))
                    if !self.placement.is_local(&r.symbol) || self.placement.is_unsettled(&r.symbol) =>
                {
                    failed.push((*r, why));
                }
                Err(e) => return Err(e),
            }
        }
        let mut results: Vec<SubResult> = Vec::with_capacity(reqs.len());
        let mut plans = Vec::with_capacity(reqs.len());
        for (r, (h, lease)) in hubs {
            let dyn_sink: Arc<dyn crate::hub::Sink> = sink.clone();
            let attached = match h.attach(dyn_sink, r.channel) {
                Some(head) => Ok((h, head, lease)),
                // Retired meanwhile (its never-ticked symbol was forgotten).
                None => self.attach(sink, r).await,
            };
            let (h, head, _lease) = match attached {
                Ok(a) => a,
                Err(e) => {
                    failed.push((*r, e.to_string()));
                    continue;
                }
            };
            let (plan, seq, recovered) = match r.channel {
                Channel::Candles(i) => (Plan::Candle(head.candles[i.index()]), head.seq, false),
                Channel::Ticks => match r.resume {
                    Some(p) if p.epoch == head.epoch && p.seq == head.seq => (Plan::Live, head.seq, true),
                    // (p.seq < head.seq, so p.seq + 1 cannot overflow)
                    Some(p) if p.epoch == head.epoch && p.seq < head.seq => {
                        let from = p.seq + 1;
                        match self.read_ticks(r.symbol, from, from, 1).await {
                            Ok(t) if t.first().is_some_and(|t| t.seq == from) => {
                                (Plan::Replay { from, to: head.seq }, head.seq, true)
                            }
                            // The owner is down: this cannot be decided now.
                            Err(e @ Error::Unavailable(_)) => {
                                h.detach(sink.id(), r.channel);
                                failed.push((*r, e.to_string()));
                                continue;
                            }
                            _ => {
                                tracing::info!(symbol = %r.symbol, resume = ?r.resume, head = head.seq, "a resume's ticks are not readable; snapshot");
                                let now = h.restart_from_head(sink.id(), r.channel);
                                (Plan::Snapshot(now.last), now.seq, false)
                            }
                        }
                    }
                    // Ahead of this pod's mirror: the mirror may lag the owner
                    // (skip what the client has; live ticks follow), or the
                    // position is beyond anything the owner has (contract §4:
                    // answered like an unknown one). The owner says which.
                    Some(p) if p.epoch == head.epoch && p.seq > head.seq && h.is_foreign() => {
                        match self.read_ticks(r.symbol, p.seq, p.seq, 1).await {
                            Ok(t) if t.first().is_some_and(|t| t.seq == p.seq) => {
                                h.deliver_after(sink.id(), r.channel, p.seq);
                                (Plan::Live, p.seq, true)
                            }
                            Err(e @ Error::Unavailable(_)) => {
                                h.detach(sink.id(), r.channel);
                                failed.push((*r, e.to_string()));
                                continue;
                            }
                            _ => (Plan::Snapshot(head.last), head.seq, false),
                        }
                    }
                    _ => {
                        if r.resume.is_some() {
                            tracing::info!(symbol = %r.symbol, resume = ?r.resume, head = head.seq, epoch = %head.epoch, foreign = h.is_foreign(), "a resume cannot be served; snapshot");
                        }
                        (Plan::Snapshot(head.last), head.seq, false)
                    }
                },
            };
            results.push(SubResult {
                symbol: r.symbol,
                channel: r.channel,
                epoch: head.epoch,
                seq,
                recovered,
            });
            plans.push(plan);
        }
        Ok(Prepared {
            results,
            plans,
            failed,
            hold: HashMap::new(),
        })
    }

    /// Sends each subscription's initial data (snapshot, replayed history or
    /// current candle), then releases held live data: from here on the
    /// subscriber sees every tick in order.
    pub async fn activate<C: Send + 'static>(&self, sink: &Arc<Outbox<C>>, prepared: Prepared) {
        // Each pair's hold goes with its activation; the holds of pairs
        // without one (failed, left out) go now. Replays (which wait for the
        // subscriber to take each page, or for an owner that went away) go
        // last, so they hold up no other pair.
        let Prepared {
            results,
            plans,
            mut hold,
            ..
        } = prepared;
        let mut turns: Vec<(&SubResult, Plan, Option<Hold>)> = results
            .iter()
            .zip(plans)
            .map(|(r, plan)| (r, plan, hold.remove(&(r.symbol, r.channel))))
            .collect();
        drop(hold);
        turns.sort_by_key(|(_, plan, _)| matches!(plan, Plan::Replay { .. }));
        // (`_held` is let go at the end of its pair's turn, whichever way it ends)
        for (res, plan, _held) in turns {
            let Some(h) = self.hub.get(&res.symbol) else { continue };
            // (unsubscribed meanwhile: nothing more of it goes out; checked
            // with each send, under the lock a detach takes, and `activate`
            // finds no entry)
            let send = |d: Data| h.send_initial(sink.id(), res.channel, d);
            let mut lost = false;
            match plan {
                Plan::Snapshot(Some(tick)) => {
                    send(Data::Snapshot(Box::new(SnapshotData {
                        epoch: res.epoch,
                        tick,
                        conflated: false,
                    })));
                }
                Plan::Live | Plan::Snapshot(None) | Plan::Candle(None) => {}
                Plan::Candle(Some(candle)) => {
                    send(Data::Candle(CandleData::new(candle, false)));
                }
                Plan::Replay { mut from, to } => {
                    let mut wait = Backoff::new(Duration::from_millis(40), Duration::from_millis(250));
                    let mut waiting_since: Option<tokio::time::Instant> = None;
                    while from <= to && !lost {
                        sink.room().await;
                        // (a subscriber that left ends the replay: its task
                        // must not wait for an owner on nobody's behalf)
                        if sink.is_gone() {
                            return;
                        }
                        if !h.holds(sink.id(), res.channel) {
                            break;
                        }
                        match self.read_ticks(res.symbol, from, to, REPLAY_PAGE).await {
                            Ok(page) if page.first().is_some_and(|t| t.seq == from) => {
                                waiting_since = None;
                                from = page.last().map_or(to, |t| t.seq) + 1;
                                let page = Data::Ticks {
                                    chunk: Arc::new(Chunk::new(res.symbol, page)),
                                    from: 0,
                                };
                                if !send(page) {
                                    break;
                                }
                            }
                            // The owner went away mid-replay: wait for it (live
                            // data is held meanwhile, up to the queue limit),
                            // for a while; then the client gets a conflated
                            // snapshot, as for a replay that cannot go on
                            // (nothing waits without bound: a WebSocket's
                            // reader, say, is held until this ends).
                            Err(e @ Error::Unavailable(_)) => {
                                let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
                                if since.elapsed() >= REPLAY_OWNER_WAIT {
                                    tracing::info!(
                                        symbol = %res.symbol, sink = sink.id(), from, to, error = %e,
                                        "replay gave up waiting for the owner; sending a conflated snapshot"
                                    );
                                    lost = true;
                                } else {
                                    tracing::debug!(symbol = %res.symbol, error = %e, "replay waits for the owner");
                                    wait.wait().await;
                                }
                            }
                            // Pruned under our feet, or a store error: the client
                            // gets a conflated snapshot instead of a silent gap.
                            other => {
                                tracing::info!(
                                    symbol = %res.symbol, sink = sink.id(), from, to,
                                    got = ?other.as_ref().map(|p| p.first().map(|t| t.seq)),
                                    "replay cannot continue; sending a conflated snapshot"
                                );
                                lost = true;
                            }
                        }
                    }
                }
            }
            h.activate(sink.id(), res.channel, lost);
        }
    }

    pub fn unsubscribe(&self, sink_id: u64, symbol: &Symbol, channel: Channel) {
        if let Some(h) = self.hub.get(symbol) {
            h.detach(sink_id, channel);
        }
    }

    /// The published head of a symbol, if it has state here.
    pub fn head(&self, symbol: &Symbol) -> Option<Head> {
        self.hub.get(symbol).map(|h| h.head())
    }

    /// Every symbol with at least one tick, sorted, with its head.
    pub fn symbols(&self) -> Vec<(Symbol, Head)> {
        self.hub
            .all()
            .into_iter()
            .map(|h| (h.symbol(), h.head()))
            .filter(|(_, head)| head.seq > 0)
            .collect()
    }

    /// Durable ticks `from..=to` of any symbol: from this pod's store, or from
    /// the owner's.
    pub async fn read_ticks(&self, symbol: Symbol, from: u64, to: u64, limit: usize) -> Result<Vec<Tick>, Error> {
        self.check_settled(&symbol)?;
        let peer = match self.owner_link(&symbol)? {
            Some(peer) => peer,
            None => {
                let ticks = self.read_local_ticks(symbol, from, to, limit).await?;
                match self.owner_link(&symbol)? {
                    None => return Ok(ticks),
                    Some(peer) => peer,
                }
            }
        };
        Ok(peer
            .history(symbol, HistoryQuery::Ticks { from, to }, limit)
            .await?
            .ticks)
    }

    /// Durable ticks `from..=to` of a symbol this pod owns (clamped to the
    /// published head), at most `limit`: from the store's tick blocks, then
    /// from the chunks the committer holds until compaction moves them there.
    pub async fn read_local_ticks(
        &self,
        symbol: Symbol,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Tick>, StoreError> {
        let Some(hub) = self.hub.get(&symbol) else {
            return Ok(Vec::new());
        };
        // The head first, then what is held: compaction writes blocks before
        // it releases held chunks, so whatever is not held any more is in the
        // store by now; what was committed after the head is not read.
        let head = hub.head().seq;
        let recent = self.committer.held(&symbol).map(|h| h.recent(from)).unwrap_or_default();
        let first = recent.first.unwrap_or(head.saturating_add(1));
        let to = to.min(head);
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let mut out = if from < first {
            let store = self.store.clone();
            let stored_to = to.min(first - 1);
            blocking(move || store.read_ticks(&symbol, from, stored_to, limit)).await?
        } else {
            Vec::new()
        };
        let held = recent.chunks.iter().flat_map(|c| c.ticks.iter());
        let room = limit.saturating_sub(out.len());
        out.extend(held.filter(|t| t.seq >= from && t.seq <= to).take(room).copied());
        Ok(out)
    }

    /// Candles of a symbol this pod owns starting in `from..=to`: closed ones
    /// from the store, then the current one if it falls in the range.
    pub async fn read_local_candles(
        &self,
        symbol: Symbol,
        interval: Interval,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<(Candle, bool)>, StoreError> {
        let store = self.store.clone();
        let current = self.head(&symbol).and_then(|h| h.candles[interval.index()]);
        let mut out: Vec<(Candle, bool)> = blocking(move || store.read_candles(&symbol, interval, from, to, limit))
            .await?
            .into_iter()
            .map(|c| (c, true))
            .collect();
        if let Some(c) = current
            && (from..=to).contains(&c.start)
            && out.len() < limit
            && out.last().is_none_or(|(l, _)| l.start < c.start)
        {
            out.push((c, false));
        }
        Ok(out)
    }

    /// Runs retention (ticks beyond `history_ticks`, candles beyond their
    /// retention), the ≤ 10/s candle conflation tick and the peer links until
    /// `stop`.
    pub fn start_background(self: &Arc<Self>, tracker: &TaskTracker, stop: CancellationToken) {
        if let Some(c) = &self.cluster {
            c.start(tracker, stop.clone());
        }
        let taken = self.background.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Background { mut heard, mut relay }) = taken {
            self.relay_running.store(true, Ordering::Release);
            let node = self.clone();
            crate::tasks::spawn(tracker, async move {
                while let Some(cmd) = relay.recv().await {
                    match cmd {
                        Relay::Publish(to, cmd) => match node.cluster.as_ref().and_then(|c| c.peer(to)) {
                            Some(peer) => peer.forward(*cmd).await,
                            None => cmd.unavailable(format!("shard {to} has no link from this pod; retry")),
                        },
                        Relay::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
            let node = self.clone();
            let token = stop.clone();
            crate::tasks::spawn(tracker, async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        r = heard.changed() => if r.is_err() { break },
                    };
                    // (the newest heard since the last one taken)
                    let Some(state) = *heard.borrow_and_update() else {
                        continue;
                    };
                    if let Err(e) = node.adopt_state(state, false).await {
                        tracing::warn!(error = %e, "could not adopt a peer's cluster state");
                    }
                }
            });
            rebalance::start(self, tracker, stop.clone());
        }
        let node = self.clone();
        let token = stop.clone();
        crate::tasks::spawn(tracker, async move {
            let mut every = tokio::time::interval(node.cfg.prune_interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = every.tick() => {}
                }
                let n = node.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || n.prune()).await {
                    tracing::error!(error = %e, "retention task failed");
                }
            }
        });
        let hub = self.hub.clone();
        let committer = self.committer.clone();
        crate::tasks::spawn(tracker, async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {
                        hub.flush_candles();
                        committer.expire_holds();
                    }
                }
            }
        });
    }

    /// One retention pass over every symbol (blocking). Ticks still in the
    /// store's log are not in blocks yet: the pass asks for a compaction, so
    /// the next pass finds them there.
    pub fn prune(&self) {
        self.committer.request_compaction();
        let mut removed = 0;
        for h in self.hub.all() {
            let head = h.head();
            let sym = h.symbol();
            let keep_from = head.seq.saturating_sub(self.cfg.history_ticks) + 1;
            match self.store.prune_ticks(&sym, keep_from) {
                Ok(n) => removed += n,
                Err(e) => tracing::warn!(symbol = %sym, error = %e, "tick retention failed"),
            }
            let Some(newest) = head.last.map(|t| t.ts) else {
                continue;
            };
            for i in Interval::ALL {
                let keep = self.cfg.candle_retention[i.index()].as_micros() as i64;
                if let Err(e) = self.store.prune_candles(&sym, i, newest.saturating_sub(keep)) {
                    tracing::warn!(symbol = %sym, error = %e, "candle retention failed");
                }
            }
        }
        metrics::counter!(m::PRUNED_TICKS).increment(removed);
        metrics::gauge!(m::STORE_BYTES).set(self.store.size_on_disk() as f64);
    }

    /// Commits everything queued, flushes and stops the committer thread.
    /// Call after every publisher has stopped.
    pub async fn shutdown(&self) {
        self.committer.stop().await;
        let join = self.committer_thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(j) = join {
            let _ = tokio::task::spawn_blocking(move || j.join()).await;
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

/// What `start_background` takes over.
struct Background {
    heard: tokio::sync::watch::Receiver<Option<ClusterState>>,
    relay: tokio::sync::mpsc::UnboundedReceiver<Relay>,
}

/// Runs a store call on the blocking pool (never on an async worker). A panic
/// there is a bug, reported as one, not as a damaged store.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Bug(e.to_string())))
}

/// Shard 0 of `shards` on a sled store in `dir`, for in-process tests (its
/// committer thread runs; its peer links are never started, and the other
/// shards' addresses have nothing listening, so every other owner is down).
#[cfg(test)]
pub(crate) fn test_node(dir: &std::path::Path, shards: u32, max_symbols: usize) -> Arc<Node> {
    let cfg = NodeConfig {
        peer_template: None,
        data_dir: dir.to_path_buf(),
        store: StoreOptions::default(),
        shard_id: 0,
        shards,
        history_ticks: 1_000,
        candle_retention: [Duration::from_secs(3_600); 3],
        prune_interval: Duration::from_secs(60),
        client_queue_bytes: 1 << 20,
        peers: (0..shards).map(|i| format!("http://127.0.0.1:{}", 1 + i)).collect(),
        peer_tls: None,
        peer_queue_bytes: 1 << 20,
        committer: CommitterConfig {
            max_symbols,
            ..CommitterConfig::default()
        },
    };
    Node::open(cfg).expect("open node")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry per symbol, in first-seen order: its ticks subscription if
    /// it has one (wherever it comes), else its first.
    #[test]
    fn a_subscribed_reply_has_one_entry_per_symbol() {
        let r = |s: &str, channel: Channel, seq: u64| SubResult {
            symbol: Symbol::parse(s).expect("symbol"),
            channel,
            epoch: Epoch::default(),
            seq,
            recovered: false,
        };
        let m1 = Channel::Candles(crate::domain::Interval::M1);
        let got = SubResult::per_symbol(&[r("A", m1, 1), r("B", m1, 2), r("A", Channel::Ticks, 3), r("A", m1, 4)]);
        let got: Vec<_> = got
            .iter()
            .map(|o| (o.symbol.as_str().to_string(), o.channel, o.seq))
            .collect();
        assert_eq!(got, vec![("A".into(), Channel::Ticks, 3), ("B".into(), m1, 2)]);
    }
}
