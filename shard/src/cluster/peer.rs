//! One link to another shard: its connection, the Forward stream, the Follow
//! stream and the mirrors it feeds.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;
use tickshard_proto::v1::{self as pb, cluster_client::ClusterClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Channel;

use super::ClusterConfig;
use crate::{
    backoff::Backoff,
    committer::{Accepted, Ack, AckError, PublishCmd},
    domain::{Epoch, ErrorCode, History, HistoryQuery, LastTick, Symbol, SymbolInfo, Tick, now_micros},
    hub::{Channel as SubChannel, Chunk, Head, Hub, SymbolHub},
    metrics as m,
    placement::ClusterState,
    wire,
};

/// How long a subscribe waits for the owner to start a new follow.
const FOLLOW_START_TIMEOUT: Duration = Duration::from_secs(5);
/// A mirror without local subscribers is unfollowed after this long.
const MIRROR_IDLE: Duration = Duration::from_secs(5);
/// Why a session ended when it was cut (see [`Peer::cut_if_forwarding`]).
const CUT_REASON: &str = "cut: routes switched with forwards unanswered";
/// Unary calls to a peer (reads, topology).
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// A SetState call: a commit waits up to `SWITCH_DRAIN` (5 s) for forwarded
/// publishes before its routes switch, then writes its store; the caller
/// waits longer than that, so that it is told the outcome (the callee goes
/// to the end either way).
const SET_STATE_TIMEOUT: Duration = Duration::from_secs(15);
/// Forwarded publishes queued in front of the link.
const FORWARD_QUEUE: usize = 16_384;
/// The largest reply of a peer's unary call this pod reads (tonic's default
/// is 4 MiB): a shard's symbol list is ~66 bytes a symbol, so one holding
/// `--max-symbols` (100,000) of them is ~6.6 MB; a reply past the default
/// was dropped, and with it the whole shard from every cluster-wide list.
/// Peers are trusted (contract §8): the bound is for sanity, not defence.
pub const PEER_REPLY_BYTES: usize = 256 << 20;
/// Reconnect back-off bounds (each wait is in the upper half of its step:
/// 20–40 ms first, then at most 150–300 ms). The cap is low on purpose: a
/// restarting owner is back within about a second in a rolling upgrade, and
/// every extra millisecond of back-off is client-visible gap for its symbols.
const RECONNECT_MIN: Duration = Duration::from_millis(40);
const RECONNECT_MAX: Duration = Duration::from_millis(300);
/// Ticks of one symbol folded into one mirror chunk when they arrive together.
const MIRROR_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("shard {0} is unavailable")]
    Down(u32),
    #[error("shard {0} did not answer in time")]
    Timeout(u32),
    #[error("shard {shard}: {status}")]
    Rpc { shard: u32, status: tonic::Status },
    /// The owner answered, and will not serve this (`symbol_limit`, ...).
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
}

impl PeerError {
    /// The peer's message, if it refused the call as the caller's mistake
    /// (not worth a retry).
    pub fn refusal(&self) -> Option<String> {
        match self {
            PeerError::Rpc { status, .. }
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange
                ) =>
            {
                Some(status.message().to_string())
            }
            PeerError::Refused { message, .. } => Some(message.clone()),
            _ => None,
        }
    }
}

/// Where a mirror stands with its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MirrorState {
    /// Following asked, the owner's head not known yet.
    Pending,
    /// The mirror's head is the owner's (after `started`, and the snapshot if
    /// one was needed).
    Ready,
    /// The owner refused to serve the symbol.
    Refused(ErrorCode, String),
}

/// Asks the session to follow a new symbol (unfollows come from the sweep,
/// inside the session).
enum FollowCmd {
    Follow(Symbol),
    /// A mirror taken off this link (see [`Peer::take_mirror`]).
    Unfollow(Symbol),
}

struct Mirror {
    hub: Arc<SymbolHub>,
    ready: watch::Sender<MirrorState>,
    /// Subscribes between "mirror found" and "attached".
    leases: u32,
    /// The link session that last sent its follow (see `Peer::session`).
    followed_in: u64,
    idle_since: Option<Instant>,
}

/// A forwarded publish waiting for the owner's ack.
struct Forwarded {
    reply: crate::committer::AckTx,
    /// `(publisher_id, publisher_seq)`.
    publisher: Option<(Arc<str>, u64)>,
    request_id: u64,
    symbol: Symbol,
}

impl Forwarded {
    fn unavailable(self, why: String) {
        self.reply.unavailable(
            self.publisher.as_ref().map(|(p, s)| (p, *s)),
            self.request_id,
            self.symbol,
            why,
        );
    }
}

pub struct Peer {
    pub id: u32,
    addr: String,
    tls: Option<super::PeerTls>,
    me: u32,
    placement: Arc<crate::placement::Placement>,
    connect_timeout: Duration,
    hub: Arc<Hub>,
    up: AtomicBool,
    /// Forwards queued or sent and not answered yet.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The cluster protocol the peer spoke at its last connect (0: unknown,
    /// or the first release, which did not say).
    protocol: std::sync::atomic::AtomicU32,
    channel: Mutex<Option<Channel>>,
    fwd_tx: mpsc::Sender<(u64, PublishCmd)>,
    fwd_rx: tokio::sync::Mutex<mpsc::Receiver<(u64, PublishCmd)>>,
    /// Incremented when a session ends (after its unacked forwards are
    /// refused): a forward queued in an earlier session is never sent in a
    /// later one, where it could be accepted past a refused request of its
    /// pair (contract §5, see `AckTx`).
    generation: AtomicU64,
    follow_tx: mpsc::UnboundedSender<FollowCmd>,
    follow_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<FollowCmd>>,
    /// Link sessions started (numbers them for `Mirror::followed_in`).
    sessions: AtomicU64,
    /// Ends the running session (see [`Peer::cut_if_forwarding`]).
    cut: tokio::sync::Notify,
    mirrors: Mutex<HashMap<Symbol, Mirror>>,
    up_gauge: metrics::Gauge,
    lag_gauge: metrics::Gauge,
}

fn follow_request(sym: Symbol, head: Option<Head>) -> pb::FollowRequest {
    let resume = head.filter(|h| !h.epoch.is_none()).map(|h| pb::Position {
        seq: h.seq,
        epoch: h.epoch.to_string(),
    });
    pb::FollowRequest {
        kind: Some(pb::follow_request::Kind::Follow(pb::FollowSymbol {
            symbol: sym.as_str().to_owned(),
            channels: vec![
                SubChannel::Ticks.as_str().into(),
                "candles:1s".into(),
                "candles:1m".into(),
                "candles:1h".into(),
            ],
            resume,
        })),
    }
}

/// A subscription's hold on a mirror: while held, the mirror is not unfollowed.
pub struct MirrorLease {
    pub hub: Arc<SymbolHub>,
    peer: Arc<Peer>,
}

impl Drop for MirrorLease {
    fn drop(&mut self) {
        let mut mirrors = self.peer.lock_mirrors();
        if let Some(m) = mirrors.get_mut(&self.hub.symbol()) {
            m.leases = m.leases.saturating_sub(1);
        }
    }
}

impl Peer {
    pub(super) fn new(
        id: u32,
        addr: String,
        cfg: &ClusterConfig,
        hub: Arc<Hub>,
        placement: Arc<crate::placement::Placement>,
    ) -> Peer {
        let (fwd_tx, fwd_rx) = mpsc::channel(FORWARD_QUEUE);
        let (follow_tx, follow_rx) = mpsc::unbounded_channel();
        let label = id.to_string();
        let up_gauge = metrics::gauge!(m::PEER_UP, "peer" => label.clone());
        up_gauge.set(0.0);
        Peer {
            id,
            addr,
            tls: cfg.peer_tls.clone(),
            me: cfg.shard_id,
            placement,
            connect_timeout: cfg.connect_timeout,
            hub,
            up: AtomicBool::new(false),
            protocol: std::sync::atomic::AtomicU32::new(0),
            in_flight: Arc::default(),
            channel: Mutex::new(None),
            fwd_tx,
            fwd_rx: tokio::sync::Mutex::new(fwd_rx),
            generation: AtomicU64::new(0),
            follow_tx,
            follow_rx: tokio::sync::Mutex::new(follow_rx),
            sessions: AtomicU64::new(0),
            cut: tokio::sync::Notify::new(),
            mirrors: Mutex::new(HashMap::new()),
            up_gauge,
            lag_gauge: metrics::gauge!(m::PEER_LAG, "peer" => label),
        }
    }

    fn lock_mirrors(&self) -> MutexGuard<'_, HashMap<Symbol, Mirror>> {
        self.mirrors.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Forwards queued or sent and not answered yet.
    pub fn forwards_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts `n` forwards answered. Called after their answers: a refusal
    /// has marked its pair's hole on its stream by then (a route switch
    /// waits for "nothing in flight", then lets later requests through).
    fn answered(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
    }

    /// Ends the link's session if it has forwards unanswered: they are
    /// refused as UNAVAILABLE (each marking its pair's hole on its stream),
    /// and the link connects again. For a route switch that cannot wait any
    /// longer for an old owner: a forward still in flight there could
    /// otherwise be overtaken by a later request of its pair on the new
    /// route, and then be taken for a retry of it (acked as a duplicate,
    /// never stored).
    pub fn cut_if_forwarding(&self) -> bool {
        let cut = self.forwards_in_flight() > 0 && self.is_up();
        if cut {
            self.cut.notify_one();
        }
        cut
    }

    /// The cluster protocol version the peer spoke at its last connect.
    pub fn protocol(&self) -> u32 {
        self.protocol.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: Option<Channel>) {
        self.up.store(up.is_some(), Ordering::Relaxed);
        self.up_gauge.set(if up.is_some() { 1.0 } else { 0.0 });
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = up;
    }

    /// Sends a publish for a symbol this peer owns; the ack comes back on
    /// `cmd.reply` once the owner made it durable, or as UNAVAILABLE.
    pub async fn forward(&self, cmd: PublishCmd) {
        // The generation is read before the stream's order is checked: a
        // session that ends refuses its unacked forwards (marking their
        // pairs) before it moves the generation on, so a request that passes
        // the check either carries the old generation (and is refused with
        // it) or saw every refusal of its pair.
        let generation = self.generation.load(Ordering::Acquire);
        if !self.is_up() || cmd.is_behind_a_hole() {
            self.unavailable(cmd);
            return;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.fwd_tx.send((generation, cmd)).await {
            self.unavailable(e.0.1);
            self.answered(1);
        }
    }

    fn unavailable(&self, cmd: PublishCmd) {
        let why = format!("shard {} (owner of {}) is unavailable; retry", self.id, cmd.tick.symbol);
        cmd.unavailable(why);
    }

    /// The mirror of `sym`, followed from this peer, once its head is the
    /// owner's. The lease keeps it followed until the subscriber is attached.
    pub async fn mirror(self: &Arc<Self>, sym: Symbol) -> Result<MirrorLease, PeerError> {
        let mut ready = {
            let mut mirrors = self.lock_mirrors();
            let m = mirrors.entry(sym).or_insert_with(|| {
                let hub = self.hub.get_or_insert_foreign(sym, || Head {
                    epoch: Epoch::default(),
                    seq: 0,
                    last: None,
                    candles: [None; 3],
                });
                let _ = self.follow_tx.send(FollowCmd::Follow(sym));
                Mirror {
                    hub,
                    ready: watch::channel(MirrorState::Pending).0,
                    leases: 0,
                    idle_since: None,
                    followed_in: 0,
                }
            });
            m.leases += 1;
            m.idle_since = None;
            m.ready.subscribe()
        };
        let lease = MirrorLease {
            hub: self
                .lock_mirrors()
                .get(&sym)
                .map(|m| m.hub.clone())
                .ok_or(PeerError::Down(self.id))?,
            peer: self.clone(),
        };
        if *ready.borrow() == MirrorState::Ready {
            return Ok(lease);
        }
        if !self.is_up() {
            return Err(PeerError::Down(self.id));
        }
        let state = tokio::time::timeout(FOLLOW_START_TIMEOUT, ready.wait_for(|r| *r != MirrorState::Pending)).await;
        match state.as_ref().map(|r| r.as_ref().map(|s| (**s).clone())) {
            Ok(Ok(MirrorState::Ready)) => Ok(lease),
            Ok(Ok(MirrorState::Refused(code, message))) => Err(PeerError::Refused { code, message }),
            _ => Err(PeerError::Down(self.id)),
        }
    }

    fn client(&self) -> Result<ClusterClient<Channel>, PeerError> {
        let ch = self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ch.filter(|_| self.is_up())
            .map(|ch| ClusterClient::new(ch).max_decoding_message_size(PEER_REPLY_BYTES))
            .ok_or(PeerError::Down(self.id))
    }

    async fn call<T, F>(&self, f: impl FnOnce(ClusterClient<Channel>) -> F) -> Result<T, PeerError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(RPC_TIMEOUT, f).await
    }

    async fn call_within<T, F>(
        &self,
        timeout: Duration,
        f: impl FnOnce(ClusterClient<Channel>) -> F,
    ) -> Result<T, PeerError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client()?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => Err(PeerError::Down(self.id)),
            Ok(Err(status)) => Err(PeerError::Rpc { shard: self.id, status }),
            Err(_) => Err(PeerError::Timeout(self.id)),
        }
    }

    /// History of a symbol this peer owns.
    pub async fn history(&self, symbol: Symbol, q: HistoryQuery, limit: usize) -> Result<History, PeerError> {
        let req = wire::history_request(symbol, q, limit);
        let resp = self.call(|mut c| async move { c.local_history(req).await }).await?;
        Ok(wire::history_from_pb(&resp))
    }

    /// The latest ticks of symbols this peer owns.
    pub async fn snapshots(&self, symbols: &[Symbol]) -> Result<Vec<LastTick>, PeerError> {
        let symbols = symbols.iter().map(|s| s.as_str().to_owned()).collect();
        let resp = self
            .call(|mut c| async move { c.local_snapshot(pb::SnapshotRequest { symbols }).await })
            .await?;
        Ok(resp.snapshots.iter().filter_map(wire::last_tick_from_pb).collect())
    }

    /// The symbols with ticks this peer owns.
    pub async fn symbols(&self) -> Result<Vec<SymbolInfo>, PeerError> {
        let resp = self
            .call(|mut c| async move { c.local_symbols(pb::ListSymbolsRequest {}).await })
            .await?;
        Ok(resp.symbols.iter().filter_map(wire::symbol_info_from_pb).collect())
    }

    /// Takes the mirror of `sym` off this link (this pod took the symbol
    /// over, or it now lives on another shard): no event of this link
    /// reaches the hub any more, and the owner is told to stop.
    pub fn take_mirror(&self, sym: &Symbol) -> Option<Arc<SymbolHub>> {
        let m = self.lock_mirrors().remove(sym)?;
        let _ = self.follow_tx.send(FollowCmd::Unfollow(*sym));
        Some(m.hub)
    }

    /// Feeds `hub` (already at its owner's position) from this peer from now
    /// on: a symbol that moved to this peer (contract §9).
    pub fn adopt_mirror(&self, hub: Arc<SymbolHub>) {
        let sym = hub.symbol();
        let mut mirrors = self.lock_mirrors();
        if mirrors.contains_key(&sym) {
            return;
        }
        mirrors.insert(
            sym,
            Mirror {
                hub,
                ready: watch::channel(MirrorState::Ready).0,
                leases: 0,
                idle_since: None,
                followed_in: 0,
            },
        );
        let _ = self.follow_tx.send(FollowCmd::Follow(sym));
    }

    /// The symbols mirrored from this peer.
    pub fn mirrored(&self) -> Vec<Symbol> {
        self.lock_mirrors().keys().copied().collect()
    }

    /// Offers a cluster state to this peer; answers the peer's state after.
    pub async fn set_state(&self, state: ClusterState, seal: bool) -> Result<ClusterState, PeerError> {
        let req = pb::SetStateRequest {
            state: Some(wire::cluster_state_to_pb(&state)),
            seal,
        };
        let resp = self
            .call_within(SET_STATE_TIMEOUT, |mut c| async move { c.set_state(req).await })
            .await?;
        wire::cluster_state_from_pb(&resp).ok_or(PeerError::Rpc {
            shard: self.id,
            status: tonic::Status::internal("bad cluster state"),
        })
    }

    /// The peer's state and the moves it still has to make.
    pub async fn moves(&self) -> Result<(ClusterState, Vec<(Symbol, u32, u32)>), PeerError> {
        let resp = self
            .call(|mut c| async move { c.moves(pb::MovesRequest {}).await })
            .await?;
        let state = resp
            .state
            .as_ref()
            .and_then(wire::cluster_state_from_pb)
            .ok_or(PeerError::Rpc {
                shard: self.id,
                status: tonic::Status::internal("bad cluster state"),
            })?;
        let moves = resp
            .moves
            .iter()
            .filter_map(|m| Some((Symbol::parse(&m.symbol).ok()?, m.from, m.to)))
            .collect();
        Ok((state, moves))
    }

    /// Hands a symbol over to this peer: `chunks` is the whole MoveIn stream
    /// (history, then the final chunk). Bounded by `deadline`.
    pub async fn move_in(&self, parts: mpsc::Receiver<super::MovePart>, deadline: Duration) -> Result<u64, PeerError> {
        use futures_util::StreamExt as _;
        let mut client = self.client()?;
        let bytes = metrics::counter!(m::MOVE_BYTES);
        let chunks = ReceiverStream::new(parts).map(move |p| {
            let c = wire::move_part_to_pb(&p);
            bytes.increment(prost::Message::encoded_len(&c) as u64);
            c
        });
        match tokio::time::timeout(deadline, client.move_in(chunks)).await {
            Ok(Ok(r)) => Ok(r.into_inner().seq),
            Ok(Err(status)) => Err(PeerError::Rpc { shard: self.id, status }),
            Err(_) => Err(PeerError::Timeout(self.id)),
        }
    }

    /// Whether the peer holds `sym` at `epoch` with a head at `seq` or later
    /// (final: a MoveIn still in flight there is refused from then on).
    pub async fn move_status(&self, sym: Symbol, epoch: Epoch, seq: u64, attempt: u64) -> Result<bool, PeerError> {
        let req = pb::MoveStatusRequest {
            symbol: sym.as_str().to_owned(),
            epoch: epoch.to_string(),
            seq,
            attempt,
        };
        Ok(self.call(|mut c| async move { c.move_status(req).await }).await?.held)
    }

    /// Asks this peer (shard 0) to start a rebalance to `shards`.
    pub async fn start_rebalance(&self, shards: u32, deadline: Duration) -> Result<ClusterState, PeerError> {
        let mut client = self.client()?;
        let req = pb::StartRebalanceRequest { shards };
        let r = match tokio::time::timeout(deadline, client.start_rebalance(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(PeerError::Rpc { shard: self.id, status }),
            Err(_) => return Err(PeerError::Timeout(self.id)),
        };
        wire::cluster_state_from_pb(&r).ok_or(PeerError::Rpc {
            shard: self.id,
            status: tonic::Status::internal("bad cluster state"),
        })
    }

    /// Connects (resolving DNS anew) and checks the peer's topology.
    async fn connect(&self) -> Result<Channel, String> {
        let ep = super::endpoint(&self.addr, self.tls.as_ref())
            .await?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // connect_timeout bounds the TCP connect only; the TLS handshake too
        let ch = tokio::time::timeout(self.connect_timeout, ep.connect())
            .await
            .map_err(|_| format!("connect {}: no handshake in time", self.addr))?
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let state = self.placement.state();
        let req = pb::TopologyRequest {
            caller_shard: self.me,
            shards: state.committed,
            state: Some(wire::cluster_state_to_pb(&state)),
        };
        let t = tokio::time::timeout(RPC_TIMEOUT, ClusterClient::new(ch.clone()).topology(req))
            .await
            .map_err(|_| "topology: timeout".to_string())?
            .map_err(|e| format!("topology: {e}"))?
            .into_inner();
        if t.shard_id != self.id {
            tracing::error!(
                peer = self.id, addr = %self.addr, their_id = t.shard_id,
                "the peer at this address is another shard; not syncing with it"
            );
            return Err("topology mismatch".into());
        }
        self.protocol.store(t.protocol, Ordering::Relaxed);
        if t.protocol != super::PROTOCOL {
            tracing::warn!(
                peer = self.id, theirs = t.protocol, ours = super::PROTOCOL, version = %t.version,
                "peer speaks another cluster protocol version (a rolling upgrade?): syncing with what both know"
            );
        }
        if let Some(s) = t.state.as_ref().and_then(wire::cluster_state_from_pb) {
            self.placement.heard(s);
        }
        if !t.ready {
            return Err("peer not ready".into());
        }
        Ok(ch)
    }

    /// Keeps the link up until `stop`: connect, sync, and on any failure back
    /// off (with jitter) and start over, resuming every followed symbol.
    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken, tasks: TaskTracker) {
        let mut fwd_rx = self.fwd_rx.lock().await;
        let mut follow_rx = self.follow_rx.lock().await;
        let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        loop {
            if stop.is_cancelled() {
                break;
            }
            match self.connect().await {
                Ok(ch) => {
                    backoff.reset();
                    self.set_up(Some(ch.clone()));
                    tracing::info!(peer = self.id, "peer link up");
                    let why = self.session(ch, &mut fwd_rx, &mut follow_rx, &stop, &tasks).await;
                    self.set_up(None);
                    tracing::info!(peer = self.id, reason = %why, "peer link down");
                    for m in self.lock_mirrors().values() {
                        m.hub.notify_unavailable();
                    }
                }
                Err(e) => tracing::debug!(peer = self.id, error = %e, "peer unreachable"),
            }
            // Forwards queued while the link was going down fail now.
            while let Ok((_, cmd)) = fwd_rx.try_recv() {
                self.unavailable(cmd);
                self.answered(1);
            }
            // Follow commands are replayed from the mirror map on reconnect.
            while follow_rx.try_recv().is_ok() {}
            tokio::select! {
                _ = stop.cancelled() => break,
                () = backoff.wait() => {}
            }
        }
        self.set_up(None);
    }

    /// One connected session: both streams until either breaks.
    async fn session(
        &self,
        ch: Channel,
        fwd_rx: &mut mpsc::Receiver<(u64, PublishCmd)>,
        follow_rx: &mut mpsc::UnboundedReceiver<FollowCmd>,
        stop: &CancellationToken,
        tasks: &TaskTracker,
    ) -> String {
        let mut client = ClusterClient::new(ch);
        // Forward: requests out through a bounded queue; acks read by their own
        // task so a full queue never stops acks from flowing.
        let (out_tx, out_rx) = mpsc::channel::<pb::PublishRequest>(FORWARD_QUEUE);
        let out = ReceiverStream::new(out_rx);
        let mut acks = match client.forward(out).await {
            Ok(r) => r.into_inner(),
            Err(e) => return format!("forward: {e}"),
        };
        let pending: Arc<Mutex<HashMap<u64, Forwarded>>> = Arc::new(Mutex::new(HashMap::new()));
        let mut ack_reader = {
            let pending = pending.clone();
            let in_flight = self.in_flight.clone();
            crate::tasks::spawn(tasks, async move {
                loop {
                    match acks.message().await {
                        Ok(Some(a)) => {
                            let f = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&a.request_id);
                            if let Some(f) = f {
                                match a.error {
                                    Some(e) if e.code == ErrorCode::Unavailable.as_str() => f.unavailable(e.message),
                                    error => {
                                        let result = match error {
                                            None => Ok(Accepted {
                                                seq: a.seq,
                                                epoch: Epoch::parse(&a.epoch).unwrap_or_default(),
                                                duplicate: a.duplicate,
                                            }),
                                            Some(e) => Err(AckError::Rejected {
                                                code: ErrorCode::parse(&e.code).unwrap_or(ErrorCode::InvalidTick),
                                                message: e.message,
                                            }),
                                        };
                                        let _ = f.reply.send(vec![Ack {
                                            request_id: f.request_id,
                                            symbol: f.symbol,
                                            result,
                                        }]);
                                    }
                                }
                                // (counted once answered: see `Peer::answered`)
                                in_flight.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        Ok(None) => return "forward stream ended".to_string(),
                        Err(e) => return format!("forward stream: {e}"),
                    }
                }
            })
        };

        // Follow: one stream for every mirror of this peer's symbols.
        let (fo_tx, fo_rx) = mpsc::unbounded_channel::<pb::FollowRequest>();
        let fo_out = UnboundedReceiverStream::new(fo_rx);
        let mut events = match client.follow(fo_out).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                ack_reader.abort();
                return format!("follow: {e}");
            }
        };
        // Every mirror is followed once per session: the map is replayed
        // here, so a queued follow of one already sent is skipped (a second
        // follow of a symbol on one stream would restart it at the owner).
        let session_id = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        for (sym, m) in self.lock_mirrors().iter_mut() {
            m.followed_in = session_id;
            let _ = fo_tx.send(follow_request(*sym, Some(m.hub.head())));
        }

        let mut next_id = 1u64;
        let mut reader_done = false;
        let generation = self.generation.load(Ordering::Acquire);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        // A cut asked for as the last session ended (it still looked up)
        // is not this one's.
        let _ = self.cut.notified().now_or_never();
        let cut = self.cut.notified();
        tokio::pin!(cut);
        let why = loop {
            tokio::select! {
                _ = stop.cancelled() => break "stopping".to_string(),
                _ = &mut cut => break CUT_REASON.to_string(),
                r = &mut ack_reader => {
                    reader_done = true;
                    break r.unwrap_or_else(|e| e.to_string());
                }
                cmd = fwd_rx.recv() => {
                    let Some((queued_in, cmd)) = cmd else { break "forward queue closed".into() };
                    if queued_in != generation || cmd.is_behind_a_hole() {
                        self.unavailable(cmd);
                        self.answered(1);
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let req = pb::PublishRequest {
                        request_id: id,
                        publisher_id: cmd.publisher.as_ref().map(|(p, _)| p.to_string()).unwrap_or_default(),
                        publisher_seq: cmd.publisher.as_ref().map_or(0, |(_, s)| *s),
                        tick: Some(wire::tick_to_pb(&cmd.tick)),
                    };
                    pending.lock().unwrap_or_else(|p| p.into_inner()).insert(
                        id,
                        Forwarded {
                            publisher: cmd.publisher,
                            reply: cmd.reply,
                            request_id: cmd.request_id,
                            symbol: cmd.tick.symbol,
                        },
                    );
                    // (a cut also ends a session blocked here: an owner that
                    // stopped reading fills the stream's queue)
                    tokio::select! {
                        sent = out_tx.send(req) => if sent.is_err() {
                            break "forward stream closed".into();
                        },
                        _ = &mut cut => break CUT_REASON.to_string(),
                    }
                }
                c = follow_rx.recv() => {
                    let req = match c {
                        Some(FollowCmd::Follow(sym)) => {
                            let head = {
                                let mut mirrors = self.lock_mirrors();
                                match mirrors.get_mut(&sym) {
                                    Some(m) if m.followed_in == session_id => continue,
                                    Some(m) => {
                                        m.followed_in = session_id;
                                        Some(m.hub.head())
                                    }
                                    None => continue, // gone meanwhile
                                }
                            };
                            follow_request(sym, head)
                        }
                        Some(FollowCmd::Unfollow(sym)) => pb::FollowRequest {
                            kind: Some(pb::follow_request::Kind::Unfollow(pb::UnfollowSymbol {
                                symbol: sym.as_str().to_owned(),
                            })),
                        },
                        None => break "follow queue closed".into(),
                    };
                    if fo_tx.send(req).is_err() {
                        break "follow stream closed".into();
                    }
                }
                ev = events.message() => {
                    let first = match ev {
                        Ok(Some(e)) => e,
                        Ok(None) => break "follow stream ended".into(),
                        Err(e) => break format!("follow stream: {e}"),
                    };
                    // Take every event that is already here, so consecutive
                    // ticks of a symbol reach its subscribers as one chunk.
                    let mut batch = vec![first];
                    while batch.len() < MIRROR_BATCH {
                        match events.message().now_or_never() {
                            Some(Ok(Some(e))) => batch.push(e),
                            _ => break,
                        }
                    }
                    if let Err(sym) = self.apply(batch) {
                        // A gap: start that symbol over from the mirror's head.
                        let _ = fo_tx.send(pb::FollowRequest {
                            kind: Some(pb::follow_request::Kind::Unfollow(pb::UnfollowSymbol { symbol: sym.as_str().to_owned() })),
                        });
                        let head = self.lock_mirrors().get(&sym).map(|m| m.hub.head());
                        let _ = fo_tx.send(follow_request(sym, head));
                    }
                }
                _ = sweep.tick() => self.sweep(&fo_tx),
            }
        };
        ack_reader.abort();
        if !reader_done {
            // Wait for it to be gone: it may have taken an entry off
            // `pending` and not yet answered it, and the generation must
            // move on only after every refusal (see `Peer::forward`).
            let _ = ack_reader.await;
        }
        // Forwards the owner never acked: the publisher must retry (de-dup makes
        // it exact if the owner did store them).
        let lost: Vec<Forwarded> = pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, f)| f)
            .collect();
        let n = lost.len();
        for f in lost {
            f.unavailable(format!("link to shard {} broke before the ack; retry", self.id));
        }
        self.answered(n);
        while let Ok((_, cmd)) = fwd_rx.try_recv() {
            self.unavailable(cmd);
            self.answered(1);
        }
        // Only now: a forward queued from here on carries the next
        // generation and has seen every refusal above; one queued before
        // with this generation is refused by the next session (see
        // `Peer::forward`).
        self.generation.fetch_add(1, Ordering::AcqRel);
        why
    }

    /// Applies follow events to the mirrors. `Err(symbol)` on a gap.
    fn apply(&self, events: Vec<pb::FollowEvent>) -> Result<(), Symbol> {
        let mut run: Option<(Arc<SymbolHub>, Vec<Tick>)> = None;
        let flush = |run: &mut Option<(Arc<SymbolHub>, Vec<Tick>)>| {
            if let Some((hub, ticks)) = run.take()
                && !ticks.is_empty()
            {
                hub.publish_ticks(Arc::new(Chunk::new(hub.symbol(), ticks)));
            }
        };
        let mut lag = None;
        let mut gap = None;
        for ev in events {
            lag = Some(ev.owner_micros);
            let Ok(sym) = Symbol::parse(&ev.symbol) else { continue };
            let Some(kind) = ev.kind else { continue };
            let mirrors = self.lock_mirrors();
            let Some(m) = mirrors.get(&sym) else { continue }; // unfollowed meanwhile
            match kind {
                pb::follow_event::Kind::Tick(t) => {
                    let Ok(mut tick) = wire::tick_from_pb(&t) else { continue };
                    tick.seq = t.seq;
                    if run.as_ref().is_some_and(|(h, _)| !Arc::ptr_eq(h, &m.hub)) {
                        flush(&mut run);
                    }
                    let (hub, ticks) = run.get_or_insert_with(|| (m.hub.clone(), Vec::new()));
                    let expected = ticks.last().map_or_else(|| hub.head().seq, |t| t.seq) + 1;
                    if tick.seq < expected {
                        continue; // already have it (overlap after a re-follow)
                    }
                    if tick.seq > expected {
                        tracing::warn!(symbol = %sym, expected, got = tick.seq, "gap from the owner; re-following");
                        gap = Some(sym);
                        continue;
                    }
                    ticks.push(tick);
                }
                pb::follow_event::Kind::Started(st) => {
                    flush(&mut run);
                    let epoch = Epoch::parse(&st.epoch).unwrap_or_default();
                    if st.recovered && m.hub.head().epoch == epoch {
                        m.ready.send_replace(MirrorState::Ready);
                    } else if st.seq == 0 {
                        m.hub.reset(epoch, None);
                        m.ready.send_replace(MirrorState::Ready);
                    }
                    // otherwise a snapshot follows
                }
                pb::follow_event::Kind::Snapshot(s) => {
                    flush(&mut run);
                    let last = s.last.as_ref().and_then(|t| {
                        let mut tick = wire::tick_from_pb(t).ok()?;
                        tick.seq = t.seq;
                        Some(tick)
                    });
                    let had = m.hub.head();
                    if !had.epoch.is_none() {
                        tracing::info!(
                            symbol = %sym, peer = self.id, our_seq = had.seq, our_epoch = %had.epoch,
                            their_seq = last.map(|t| t.seq), their_epoch = %s.epoch,
                            "the owner could not resume this mirror; starting over from its snapshot"
                        );
                    }
                    m.hub.reset(Epoch::parse(&s.epoch).unwrap_or_default(), last);
                    m.ready.send_replace(MirrorState::Ready);
                }
                pb::follow_event::Kind::Candle(c) => {
                    flush(&mut run);
                    if let Some(candle) = wire::candle_from_pb(&c) {
                        m.hub.publish_candle(candle, c.closed);
                    }
                }
                pb::follow_event::Kind::Refused(e) => {
                    flush(&mut run);
                    let code = ErrorCode::parse(&e.code).unwrap_or(ErrorCode::Unavailable);
                    tracing::debug!(symbol = %sym, peer = self.id, %code, message = %e.message, "the owner refused a follow");
                    // Waiters see the refusal; the next subscribe asks anew.
                    // Subscribers of a mirror that was live are told.
                    if *m.ready.borrow() == MirrorState::Ready {
                        m.hub.notify_unavailable();
                    }
                    m.ready.send_replace(MirrorState::Refused(code, e.message));
                    drop(mirrors);
                    if let Some(m) = self.lock_mirrors().remove(&sym)
                        && m.hub.is_foreign()
                    {
                        self.hub.remove(&m.hub);
                    }
                }
            }
        }
        flush(&mut run);
        if let Some(sent) = lag {
            self.lag_gauge.set((now_micros() - sent).max(0) as f64 / 1e6);
        }
        gap.map_or(Ok(()), Err)
    }

    /// Unfollows mirrors that have had no local subscriber for a while.
    fn sweep(&self, fo_tx: &mpsc::UnboundedSender<pb::FollowRequest>) {
        let now = Instant::now();
        let mut mirrors = self.lock_mirrors();
        let mut gone = Vec::new();
        for (sym, m) in mirrors.iter_mut() {
            if m.leases > 0 || m.hub.subscriber_count() > 0 {
                m.idle_since = None;
                continue;
            }
            let since = *m.idle_since.get_or_insert(now);
            if now.duration_since(since) >= MIRROR_IDLE {
                gone.push(*sym);
            }
        }
        for sym in gone {
            if let Some(m) = mirrors.remove(&sym) {
                self.hub.remove(&m.hub);
                let _ = fo_tx.send(pb::FollowRequest {
                    kind: Some(pb::follow_request::Kind::Unfollow(pb::UnfollowSymbol {
                        symbol: sym.as_str().to_owned(),
                    })),
                });
            }
        }
    }
}
