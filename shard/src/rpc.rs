//! The gRPC edges of the shard: the `Cluster` service (the owner side of
//! shard-to-shard sync: it serves this pod's data to its peers), the adapter
//! that serves a gRPC publish stream with [`publish::serve`] (the public
//! `Feed.Publish` and the peer `Cluster.Forward`), and the conversions that
//! need the node's types. Above the node; the peer links (`cluster`) below it.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{Stream, StreamExt as _};
use tickshard_proto::{
    admin,
    v1::{self as pb, cluster_server::Cluster as ClusterApi},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    committer::Ack,
    domain::{
        Epoch, ErrorCode, InputError, Interval, MAX_SYMBOL_LEN, Position, Symbol, SymbolListError, SymbolSet,
        now_micros,
    },
    events::outbox_events,
    hub::{Channel, Close, Data, Outbox},
    node::{Node, SubResult},
    publish::{self, Origin},
    session::{self, Session, SessionGuard},
    wire::{self, tick_from_pb},
};

pub fn parse_symbol(s: &str) -> Result<Symbol, Status> {
    Symbol::parse(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The distinct symbols of a request (repeats count once), or
/// INVALID_ARGUMENT for the first bad one, or RESOURCE_EXHAUSTED for more than
/// `max` (checked while reading: linear in the request's size).
pub fn parse_symbols(symbols: &[String], max: usize) -> Result<Vec<Symbol>, Status> {
    SymbolSet::parse(symbols.iter().map(String::as_str), max).map_err(|e| match e {
        SymbolListError::Invalid(e) => Status::invalid_argument(e.to_string()),
        SymbolListError::TooMany { .. } => Status::resource_exhausted(e.to_string()),
    })
}

/// At most one log line a minute about callers with another shard count.
static DISAGREEMENT_LOG: LogLimit = LogLimit::new(Duration::from_secs(60));

/// Lets an event be logged at most once per `every` (a caller can trigger it
/// at will; the log must not become the attack).
pub struct LogLimit {
    every: Duration,
    last: Mutex<Option<std::time::Instant>>,
}

impl LogLimit {
    pub const fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            last: Mutex::new(None),
        }
    }

    /// True if the event may be logged now.
    pub fn allow(&self) -> bool {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

pub struct ClusterService {
    node: Arc<Node>,
    stopping: CancellationToken,
    window: usize,
    /// Most symbols one request may name.
    max_symbols: usize,
}

impl ClusterService {
    pub fn new(node: Arc<Node>, stopping: CancellationToken, window: usize, max_symbols: usize) -> ClusterService {
        ClusterService {
            node,
            stopping,
            window,
            max_symbols,
        }
    }
}

type FollowStream = Pin<Box<dyn Stream<Item = Result<pb::FollowEvent, Status>> + Send>>;

const CHANNELS: [Channel; 4] = [
    Channel::Ticks,
    Channel::Candles(Interval::S1),
    Channel::Candles(Interval::M1),
    Channel::Candles(Interval::H1),
];

/// The follows of one peer stream in progress: at most one task per symbol.
/// A Follow of a symbol whose task still runs does not start another (a
/// flood of Follows of one symbol costs one slot, not a task and a replay
/// each): it becomes what that task does next, the newest resume winning.
/// An Unfollow drops what was to come next and tells the running task to
/// stop before its next registration or activation (it may be waiting for
/// an unreachable owner, and would register the symbol again). Bounded by
/// the symbols this pod serves (a Follow of another is refused before it
/// gets here).
#[derive(Default)]
struct Following(Mutex<HashMap<Symbol, Slot>>);

/// The task of one symbol: what it does next, and whether it was unfollowed.
#[derive(Debug, Default, PartialEq)]
struct Slot {
    next: Option<Option<Position>>,
    unfollowed: bool,
}

impl Following {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Symbol, Slot>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A Follow of `sym` (from `resume`): `Some` if the caller starts its
    /// task with it, `None` if the running task does it next.
    fn follow(&self, sym: Symbol, resume: Option<Position>) -> Option<Option<Position>> {
        match self.map().entry(sym) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert(Slot {
                    next: Some(resume),
                    unfollowed: false,
                });
                None
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Slot::default());
                Some(resume)
            }
        }
    }

    /// The task of `sym` did one follow: what it does next, or `None`
    /// (then it ends, and the next Follow starts a new one).
    fn done(&self, sym: Symbol) -> Option<Option<Position>> {
        let mut map = self.map();
        match map.get_mut(&sym) {
            Some(Slot {
                next: next @ Some(_), ..
            }) => next.take(),
            _ => {
                map.remove(&sym);
                None
            }
        }
    }

    /// An Unfollow of `sym`: a Follow still to come is dropped, and the
    /// running one stops at its next step (the session's unsubscribe
    /// detaches what it registered).
    fn unfollow(&self, sym: Symbol) {
        if let Some(slot) = self.map().get_mut(&sym) {
            *slot = Slot {
                next: None,
                unfollowed: true,
            };
        }
    }

    /// Whether the running follow of `sym` was unfollowed since it began.
    fn unfollowed(&self, sym: Symbol) -> bool {
        self.map().get(&sym).is_some_and(|s| s.unfollowed)
    }
}

/// The task of one symbol of a [`Following`]: if it ends unfinished (a
/// panic), its slot goes, so the symbol's next Follow starts a new one.
struct FollowTask {
    following: Arc<Following>,
    sym: Symbol,
    finished: bool,
}

impl Drop for FollowTask {
    fn drop(&mut self) {
        if !self.finished {
            self.following.map().remove(&self.sym);
        }
    }
}

/// Serves one Follow of `sym` on a peer's stream: registers it (waiting
/// while its owner is unreachable), says `Started` and activates it, or
/// says `Refused`.
async fn serve_follow(
    session: &Session<pb::FollowEvent>,
    following: &Following,
    sym: Symbol,
    resume: Option<Position>,
) {
    let resume: HashMap<Symbol, Position> = resume.map(|p| (sym, p)).into_iter().collect();
    let reqs = session::requests(&[sym], &CHANNELS, &resume);
    let mut wait = crate::backoff::Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        if following.unfollowed(sym) {
            return;
        }
        match session.prepare(&reqs).await {
            // Every pair left out: unsubscribed while it was registered.
            Ok(prepared) if prepared.results.is_empty() && prepared.failed.is_empty() => return,
            // Nothing served yet: a symbol this pod handed over whose new
            // owner it cannot reach yet (after a restart). The follower
            // waits; it is not told to give the symbol up.
            Ok(prepared) if prepared.results.is_empty() => {
                if session.outbox().is_gone() {
                    return;
                }
                tracing::debug!(symbol = %sym, failed = ?prepared.failed, "a follow waits for the symbol's owner");
                drop(prepared); // (its claims: not while it waits)
                wait.wait().await;
            }
            Ok(prepared) => {
                if following.unfollowed(sym) {
                    return; // (its claims go with it)
                }
                let r = prepared.results[0];
                session
                    .outbox()
                    .control(event(sym, pb::follow_event::Kind::Started(sub_result_to_pb(&r))), 64);
                session.activate(prepared).await;
                return;
            }
            // Transient (an owner this pod relays from is not reachable
            // yet): wait, do not refuse.
            Err(crate::Error::Unavailable(why)) => {
                if session.outbox().is_gone() {
                    return;
                }
                tracing::debug!(symbol = %sym, %why, "a follow waits");
                wait.wait().await;
            }
            Err(e) => {
                tracing::debug!(symbol = %sym, error = %e, "refusing a follow");
                let why = pb::Error {
                    code: e.code().as_str().to_owned(),
                    message: e.to_string(),
                };
                session
                    .outbox()
                    .control(event(sym, pb::follow_event::Kind::Refused(why)), 64);
                return;
            }
        }
    }
}

fn event(symbol: Symbol, kind: pb::follow_event::Kind) -> pb::FollowEvent {
    pb::FollowEvent {
        symbol: symbol.as_str().to_owned(),
        kind: Some(kind),
        owner_micros: now_micros(),
    }
}

#[tonic::async_trait]
impl ClusterApi for ClusterService {
    type ForwardStream = AckStream;
    type FollowStream = FollowStream;

    async fn topology(&self, req: Request<pb::TopologyRequest>) -> Result<Response<pb::TopologyResponse>, Status> {
        let own = self.node.placement();
        let ours = own.state();
        let r = req.get_ref();
        match r.state.as_ref().and_then(wire::cluster_state_from_pb) {
            // A newer layout (a rebalance this pod missed): adopt it.
            Some(theirs) => own.heard(theirs),
            None if r.shards != ours.committed && DISAGREEMENT_LOG.allow() => {
                // Anyone can call this: a warning at most once a minute, never an
                // error (nothing is wrong here).
                tracing::warn!(
                    caller = r.caller_shard,
                    their_shards = r.shards,
                    our_shards = ours.committed,
                    "a caller disagrees on the shard count (logged at most once a minute)"
                );
            }
            None => {}
        }
        Ok(Response::new(pb::TopologyResponse {
            shard_id: own.me(),
            shards: ours.committed,
            ready: self.node.is_ready() && !self.stopping.is_cancelled(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance: self.node.instance().to_string(),
            state: Some(wire::cluster_state_to_pb(&ours)),
            protocol: crate::cluster::PROTOCOL,
        }))
    }

    async fn forward(
        &self,
        req: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        if self.stopping.is_cancelled() {
            return Err(Status::unavailable("stopping"));
        }
        Ok(Response::new(publish_stream(
            self.node.clone(),
            req.into_inner(),
            publish::Window::stream_only(self.window),
            self.stopping.clone(),
            Origin::Peer,
        )))
    }

    async fn follow(&self, req: Request<Streaming<pb::FollowRequest>>) -> Result<Response<Self::FollowStream>, Status> {
        if self.stopping.is_cancelled() {
            return Err(Status::unavailable("stopping"));
        }
        let mut inbound = req.into_inner();
        let node = self.node.clone();
        let outbox: Arc<Outbox<pb::FollowEvent>> = Arc::new(
            Outbox::new(
                node.new_sink_id(),
                node.config().peer_queue_bytes,
                Duration::from_secs(10),
            )
            .closing_on_stall(),
        );
        let session = Session::new(node.clone(), outbox.clone());
        let following = Arc::new(Following::default());
        {
            let (node, outbox, session, stopping) =
                (node.clone(), outbox.clone(), session.clone(), self.stopping.clone());
            crate::tasks::spawn(&self.node.stream_tasks().clone(), async move {
                loop {
                    let msg = tokio::select! {
                        _ = stopping.cancelled() => { outbox.close(Close::Restart); break }
                        m = inbound.message() => m,
                    };
                    let Ok(Some(msg)) = msg else {
                        outbox.close(Close::Normal);
                        break;
                    };
                    match msg.kind {
                        Some(pb::follow_request::Kind::Follow(f)) => {
                            let refuse = |code: ErrorCode, message: String| {
                                let symbol = f.symbol.chars().take(MAX_SYMBOL_LEN).collect();
                                let kind = pb::follow_event::Kind::Refused(pb::Error {
                                    code: code.as_str().to_owned(),
                                    message,
                                });
                                pb::FollowEvent {
                                    symbol,
                                    kind: Some(kind),
                                    owner_micros: now_micros(),
                                }
                            };
                            let sym = match Symbol::parse(&f.symbol) {
                                Ok(s) => s,
                                Err(e) => {
                                    outbox.control(refuse(e.code(), e.to_string()), 64);
                                    continue;
                                }
                            };
                            // A symbol this pod handed over is served from its
                            // mirror of the new owner (peers route by the
                            // committed map until the rebalance commits).
                            let p = node.placement();
                            if !p.is_local(&sym) && p.moved_to(&sym).is_none() {
                                tracing::warn!(symbol = %sym, "asked to serve a symbol this shard does not own");
                                let why = format!("shard {} does not own {sym}", p.me());
                                outbox.control(refuse(ErrorCode::Unavailable, why), 64);
                                continue;
                            }
                            let resume = f.resume.map(|p| Position {
                                seq: p.seq,
                                epoch: Epoch::parse(&p.epoch).unwrap_or_default(),
                            });
                            // (one task per symbol: a Follow while it runs
                            // is what it does next)
                            if let Some(resume) = following.follow(sym, resume) {
                                let (session, following) = (session.clone(), following.clone());
                                crate::tasks::spawn(node.stream_tasks(), async move {
                                    let mut task = FollowTask {
                                        following,
                                        sym,
                                        finished: false,
                                    };
                                    let mut next = Some(resume);
                                    while let Some(resume) = next {
                                        serve_follow(&session, &task.following, sym, resume).await;
                                        next = task.following.done(sym);
                                    }
                                    task.finished = true;
                                });
                            }
                        }
                        Some(pb::follow_request::Kind::Unfollow(u)) => {
                            let Ok(sym) = Symbol::parse(&u.symbol) else { continue };
                            following.unfollow(sym);
                            for ch in CHANNELS {
                                session.unsubscribe(&sym, ch);
                            }
                        }
                        None => {}
                    }
                }
            });
        }
        let hub = node.hub().clone();
        let events = outbox_events(
            outbox.clone(),
            hub,
            // dropped with the stream (the follower gone): detaches everything
            SessionGuard::new(session),
            |d, out| match d {
                Data::Ticks { chunk, from } => {
                    let ticks = chunk.ticks.get(from..).unwrap_or_default();
                    out.extend(
                        ticks
                            .iter()
                            .map(|t| event(chunk.symbol, pb::follow_event::Kind::Tick(wire::tick_to_pb(t)))),
                    );
                }
                Data::Snapshot(s) => out.push_back(event(
                    s.tick.symbol,
                    pb::follow_event::Kind::Snapshot(wire::snapshot_to_pb(&s, false)),
                )),
                Data::Candle(c) => out.push_back(event(
                    c.candle.symbol,
                    pb::follow_event::Kind::Candle(wire::candle_to_pb(&c.candle, c.closed)),
                )),
                Data::Unavailable(_) => {} // owners never send it
            },
        )
        .map(|r| r.map_err(wire::close_status));
        Ok(Response::new(Box::pin(events)))
    }

    async fn local_snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let syms = parse_symbols(&req.get_ref().symbols, self.max_symbols)?;
        let snapshots = self
            .node
            .local_snapshots(&syms)
            .await
            .map_err(wire::error_status)?
            .iter()
            .map(wire::last_tick_to_pb)
            .collect();
        Ok(Response::new(pb::SnapshotResponse { snapshots }))
    }

    async fn local_history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let (symbol, q, limit) =
            wire::history_query(req.get_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let h = self
            .node
            .local_history(symbol, q, limit)
            .await
            .map_err(wire::error_status)?;
        Ok(Response::new(wire::history_to_pb(&h)))
    }

    async fn local_symbols(
        &self,
        _req: Request<pb::ListSymbolsRequest>,
    ) -> Result<Response<pb::ListSymbolsResponse>, Status> {
        let symbols = self.node.local_symbols().iter().map(wire::symbol_info_to_pb).collect();
        Ok(Response::new(pb::ListSymbolsResponse { symbols }))
    }

    async fn set_state(&self, req: Request<pb::SetStateRequest>) -> Result<Response<pb::ClusterState>, Status> {
        let r = req.into_inner();
        let state = r
            .state
            .as_ref()
            .and_then(wire::cluster_state_from_pb)
            .ok_or_else(|| Status::invalid_argument("a cluster state with 1 to 1024 shards"))?;
        let node = self.node.clone();
        let now = to_the_end(&self.node, async move { node.adopt_state(state, r.seal).await }).await?;
        Ok(Response::new(wire::cluster_state_to_pb(&now)))
    }

    async fn moves(&self, _req: Request<pb::MovesRequest>) -> Result<Response<pb::MovesResponse>, Status> {
        let state = self.node.placement().state();
        let me = self.node.placement().me();
        let list = self
            .node
            .committer_moves()
            .await
            .map_err(|e| wire::error_status(e.into()))?;
        Ok(Response::new(pb::MovesResponse {
            state: Some(wire::cluster_state_to_pb(&state)),
            moves: list
                .into_iter()
                .map(|(s, to)| pb::MoveLeft {
                    symbol: s.as_str().to_owned(),
                    from: me,
                    to,
                })
                .collect(),
        }))
    }

    async fn move_in(&self, req: Request<Streaming<pb::MoveChunk>>) -> Result<Response<pb::MoveInResponse>, Status> {
        if self.stopping.is_cancelled() {
            return Err(Status::unavailable("stopping"));
        }
        let parts = req.into_inner().map(|c| match c {
            Ok(c) => wire::move_part_from_pb(&c),
            Err(s) => Err(s.to_string()),
        });
        let seq = crate::node::rebalance::receive_move(&self.node, Box::pin(parts))
            .await
            .map_err(wire::error_status)?;
        Ok(Response::new(pb::MoveInResponse { seq }))
    }

    async fn start_rebalance(
        &self,
        req: Request<pb::StartRebalanceRequest>,
    ) -> Result<Response<pb::ClusterState>, Status> {
        let (node, shards) = (self.node.clone(), req.get_ref().shards);
        let s = to_the_end(&self.node, async move {
            crate::node::rebalance::start_rebalance(&node, shards).await
        })
        .await?;
        Ok(Response::new(wire::cluster_state_to_pb(&s)))
    }

    async fn move_status(
        &self,
        req: Request<pb::MoveStatusRequest>,
    ) -> Result<Response<pb::MoveStatusResponse>, Status> {
        let r = req.get_ref();
        let symbol = parse_symbol(&r.symbol)?;
        let epoch = Epoch::parse(&r.epoch).ok_or_else(|| Status::invalid_argument("bad epoch"))?;
        let held = crate::node::rebalance::move_status(&self.node, symbol, epoch, r.seq, r.attempt)
            .await
            .map_err(wire::error_status)?;
        Ok(Response::new(pb::MoveStatusResponse { held }))
    }

    async fn ensure(&self, req: Request<pb::EnsureRequest>) -> Result<Response<pb::EnsureResponse>, Status> {
        let syms = parse_symbols(&req.get_ref().symbols, self.max_symbols)?;
        if let Some(s) = syms.iter().find(|s| !self.node.placement().is_local(s)) {
            return Err(Status::failed_precondition(format!(
                "shard {} does not own {s}",
                self.node.placement().me()
            )));
        }
        self.node
            .ensure_local(syms.clone())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let symbols = syms
            .iter()
            .filter_map(|s| {
                self.node.head(s).map(|h| pb::SymbolState {
                    symbol: s.as_str().to_owned(),
                    epoch: h.epoch.to_string(),
                    seq: h.seq,
                    recovered: false,
                })
            })
            .collect();
        Ok(Response::new(pb::EnsureResponse { symbols }))
    }
}

/// A gRPC publish stream's answers (the public `Feed.Publish` and the peer
/// `Cluster.Forward`).
pub type AckStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::PublishAck, tonic::Status>> + Send>>;

/// Serves a gRPC publish stream: [`publish::serve`] with the requests decoded
/// from prost and the answers encoded back (a drained stream ends with
/// UNAVAILABLE: resend the unacked requests elsewhere).
pub fn publish_stream(
    node: Arc<Node>,
    inbound: tonic::Streaming<pb::PublishRequest>,
    window: publish::Window,
    stop: CancellationToken,
    origin: publish::Origin,
) -> AckStream {
    // (the client side's error, e.g. OUT_OF_RANGE for a message past the
    // size limit, ends the stream once what it took is answered)
    let inbound_error = Arc::new(std::sync::Mutex::new(None::<tonic::Status>));
    let slot = inbound_error.clone();
    let requests = inbound.map(move |r| {
        r.map(publish_request_from_pb).map_err(|s| {
            let shown = s.to_string();
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
            shown
        })
    });
    let answers = publish::serve(node, requests, window, stop, origin).map(move |a| match a {
        Err(publish::Ended::Inbound) => Err(inbound_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| tonic::Status::internal("the request stream failed"))),
        Ok(a) => Ok(answer_to_pb(a)),
        Err(publish::Ended::Drained) => Err(tonic::Status::unavailable(
            "server is draining: reconnect and resend unacked requests",
        )),
        Err(publish::Ended::Expired) => Err(tonic::Status::unauthenticated(
            "the token expired: reconnect with a fresh one and resend unacked requests",
        )),
        Err(publish::Ended::Full) => Err(tonic::Status::unavailable(
            "too many publisher_id×symbol pairs were refused on this stream: reconnect and resend unacked requests",
        )),
    });
    Box::pin(answers)
}

/// A `PublishRequest` as the publish stream takes it: the tick validated (a
/// request without one is `invalid_request`).
pub fn publish_request_from_pb(r: pb::PublishRequest) -> publish::Request {
    let (symbol, tick) = match r.tick {
        Some(t) => {
            let tick = tick_from_pb(&t);
            (t.symbol, tick)
        }
        None => (
            String::new(),
            Err(InputError::InvalidRequest("request has no tick".into())),
        ),
    };
    publish::Request {
        request_id: r.request_id,
        symbol,
        tick,
        publisher_id: r.publisher_id,
        publisher_seq: r.publisher_seq,
    }
}

pub fn answer_to_pb(a: publish::Answer) -> pb::PublishAck {
    let refused = |request_id, symbol, code: ErrorCode, message| pb::PublishAck {
        request_id,
        symbol,
        seq: 0,
        epoch: String::new(),
        duplicate: false,
        error: Some(pb::Error {
            code: code.as_str().to_owned(),
            message,
        }),
    };
    match a {
        publish::Answer::Ack(Ack {
            request_id,
            symbol,
            result: Ok(ok),
        }) => pb::PublishAck {
            request_id,
            symbol: symbol.as_str().to_owned(),
            seq: ok.seq,
            epoch: ok.epoch.to_string(),
            duplicate: ok.duplicate,
            error: None,
        },
        publish::Answer::Ack(Ack {
            request_id,
            symbol,
            result: Err(e),
        }) => refused(request_id, symbol.as_str().to_owned(), e.code(), e.to_string()),
        publish::Answer::Refused {
            request_id,
            symbol,
            code,
            message,
        } => refused(request_id, symbol, code, message),
    }
}

/// A subscription's outcome as the `Subscribed` event and the follow's
/// `started` report it.
pub fn sub_result_to_pb(r: &SubResult) -> pb::SymbolState {
    pb::SymbolState {
        symbol: r.symbol.as_str().to_owned(),
        epoch: r.epoch.to_string(),
        seq: r.seq,
        recovered: r.recovered,
    }
}

/// Runs a change of the cluster state on a task of its own, so that it goes
/// to its end when the caller gives up (a timeout, a closed CLI): cut
/// between the store and the routes, a pod would route by another state
/// than the one it stored.
async fn to_the_end<T: Send + 'static>(
    node: &Arc<Node>,
    change: impl Future<Output = Result<T, crate::Error>> + Send + 'static,
) -> Result<T, Status> {
    crate::tasks::spawn(node.stream_tasks(), change)
        .await
        .map_err(|e| Status::internal(format!("the change ended early: {e}")))?
        .map_err(wire::error_status)
}

/// The operator's `tickshard.admin.v1.Admin` service (contract §9), served
/// on the peer port only.
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> AdminService {
        AdminService { node }
    }

    async fn status_now(&self) -> admin::StatusResponse {
        let p = crate::node::rebalance::progress(&self.node).await;
        admin::StatusResponse {
            committed_shards: p.state.committed,
            target_shards: p.state.target.unwrap_or(0),
            moves_left: p
                .moves
                .into_iter()
                .map(|(s, from, to)| admin::Move {
                    symbol: s.as_str().to_owned(),
                    from,
                    to,
                })
                .collect(),
            unreachable: p.unreachable,
            error: self.node.moves.last_error().unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl admin::admin_server::Admin for AdminService {
    async fn status(&self, _req: Request<admin::StatusRequest>) -> Result<Response<admin::StatusResponse>, Status> {
        Ok(Response::new(self.status_now().await))
    }

    async fn rebalance(
        &self,
        req: Request<admin::RebalanceRequest>,
    ) -> Result<Response<admin::StatusResponse>, Status> {
        let (node, shards) = (self.node.clone(), req.get_ref().shards);
        to_the_end(&self.node, async move {
            crate::node::rebalance::start_rebalance(&node, shards).await
        })
        .await?;
        Ok(Response::new(self.status_now().await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64) -> Option<Position> {
        Some(Position {
            seq,
            epoch: Epoch::default(),
        })
    }

    /// A flood of Follows of one symbol while its task runs starts no other
    /// task and leaves one thing to do next, the newest; the task then ends
    /// and the next Follow starts one again. Before, each Follow spawned a
    /// task (and a registration, and a replay) of its own.
    #[test]
    fn follows_of_a_symbol_in_progress_coalesce_into_one_next() {
        let f = Following::default();
        let sym = Symbol::parse("BTC-USD").expect("symbol");
        let other = Symbol::parse("ETH-USD").expect("symbol");
        assert_eq!(f.follow(sym, at(1)), Some(at(1)), "the first Follow starts a task");
        for seq in 2..=10_000 {
            assert_eq!(f.follow(sym, at(seq)), None, "a second task for one symbol");
        }
        assert_eq!(f.follow(other, None), Some(None), "another symbol waits for none");
        assert_eq!(f.map().len(), 2);
        assert_eq!(f.done(sym), Some(at(10_000)), "the newest Follow is done next");
        assert_eq!(f.done(sym), None, "nothing more: the task ends");
        assert_eq!(f.map().len(), 1);
        assert_eq!(f.follow(sym, at(3)), Some(at(3)), "a new task once the last ended");
    }

    /// An Unfollow drops the Follow still to come (Follow, Follow,
    /// Unfollow ends unfollowed), and one after it is done next (Follow,
    /// Unfollow, Follow ends followed).
    #[test]
    fn an_unfollow_drops_the_follow_still_to_come() {
        let f = Following::default();
        let sym = Symbol::parse("BTC-USD").expect("symbol");
        assert!(f.follow(sym, at(1)).is_some());
        assert!(f.follow(sym, at(2)).is_none());
        f.unfollow(sym);
        assert_eq!(f.done(sym), None);
        assert!(f.map().is_empty());
        assert!(f.follow(sym, at(1)).is_some());
        f.unfollow(sym);
        assert!(f.follow(sym, at(4)).is_none());
        assert_eq!(f.done(sym), Some(at(4)));
        f.unfollow(sym); // (a symbol with nothing in progress: no entry made)
        assert_eq!(f.done(sym), None);
        f.unfollow(sym);
        assert!(f.map().is_empty());
    }

    /// An Unfollow tells the running task to stop (it checks before each
    /// registration and before its activation: waiting for an unreachable
    /// owner, it would register the symbol again); a Follow after it wants
    /// the symbol again. Before, a follow waiting for its owner outlived an
    /// Unfollow and activated the symbol once the owner was back.
    #[test]
    fn an_unfollow_stops_the_running_follow_and_a_follow_wants_it_again() {
        let f = Following::default();
        let sym = Symbol::parse("BTC-USD").expect("symbol");
        assert!(f.follow(sym, at(1)).is_some());
        assert!(!f.unfollowed(sym));
        f.unfollow(sym);
        assert!(f.unfollowed(sym), "the running task is told");
        assert!(f.follow(sym, at(2)).is_none());
        assert!(!f.unfollowed(sym), "followed again");
        assert_eq!(f.done(sym), Some(at(2)));
        assert!(!f.unfollowed(sym));
        assert_eq!(f.done(sym), None);
        assert!(!f.unfollowed(sym), "(no task: nothing to tell)");
    }

    /// A follow task that ends unfinished (a panic) gives its slot up, so
    /// the next Follow of its symbol starts a task again instead of queuing
    /// behind one that is gone.
    #[test]
    fn a_follow_task_that_dies_gives_its_slot_up() {
        let f = Arc::new(Following::default());
        let sym = Symbol::parse("BTC-USD").expect("symbol");
        assert!(f.follow(sym, at(1)).is_some());
        drop(FollowTask {
            following: f.clone(),
            sym,
            finished: false,
        });
        assert!(f.follow(sym, at(2)).is_some(), "queued behind a dead task");
        assert_eq!(f.done(sym), None);
        let finished = FollowTask {
            following: f.clone(),
            sym,
            finished: true,
        };
        assert!(f.follow(sym, at(3)).is_some());
        drop(finished); // (a finished task's drop leaves the new task's slot be)
        assert!(f.follow(sym, at(4)).is_none());
    }
}
