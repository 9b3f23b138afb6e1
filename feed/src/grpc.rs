//! The public gRPC API (`tickshard.v1.Feed`, contract §5), plus the standard
//! health service and server reflection, on the gRPC listener.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures_util::{Stream, StreamExt, stream};
use tickshard_proto::v1::{
    self as pb,
    feed_server::{Feed, FeedServer},
};
use tickshard_shard::{
    committer::{Ack, AckError, AckTx, PublishCmd},
    domain::{Epoch, ErrorCode, Interval, Position, Symbol},
    hub::{AfterWrite, Channel, Close, Data, Msg, Outbox},
    metrics as m,
    node::{HISTORY_LIMIT_MAX, SubRequest, SubResult},
    wire,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, transport::server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::server::Shared;

/// Default number of ticks or candles a history read returns.
const HISTORY_LIMIT_DEFAULT: usize = 1_000;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Starts the gRPC server; returns the health reporter and the server task.
pub fn start(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<
    (
        HealthReporter,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ),
    String,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tickshard_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let feed = FeedServer::new(FeedService { shared });
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(feed)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
    );
    Ok((reporter, task))
}

/// Health of `""` and `tickshard.v1.Feed` (contract §5).
pub async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(<FeedServer<FeedService> as tonic::server::NamedService>::NAME, status)
        .await;
}

pub struct FeedService {
    shared: Arc<Shared>,
}

fn parse_symbol(s: &str) -> Result<Symbol, Status> {
    Symbol::parse(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn reject(request_id: u64, symbol: &str, code: ErrorCode, message: String) -> pb::PublishAck {
    metrics::counter!(m::TICKS_REJECTED, "code" => code.as_str()).increment(1);
    pb::PublishAck {
        request_id,
        symbol: symbol.to_owned(),
        seq: 0,
        epoch: String::new(),
        duplicate: false,
        error: Some(pb::Error {
            code: code.as_str().to_owned(),
            message,
        }),
    }
}

fn ack_to_pb(a: Ack) -> pb::PublishAck {
    match a.result {
        Ok(ok) => pb::PublishAck {
            request_id: a.request_id,
            symbol: a.symbol.as_str().to_owned(),
            seq: ok.seq,
            epoch: ok.epoch.to_string(),
            duplicate: ok.duplicate,
            error: None,
        },
        Err(e) => {
            let code = match &e {
                AckError::Input(i) => i.code(),
                AckError::Unavailable(_) => ErrorCode::Unavailable,
            };
            reject(a.request_id, a.symbol.as_str(), code, e.to_string())
        }
    }
}

/// One subscription request, validated.
fn sub_requests(r: &pb::SubscribeRequest, max: usize) -> Result<Vec<SubRequest>, Status> {
    if r.symbols.is_empty() {
        return Err(Status::invalid_argument("symbols is empty"));
    }
    let mut channels = Vec::new();
    for c in &r.channels {
        let ch = Channel::parse(c).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown channel '{c}'; expected ticks, candles:1s, candles:1m or candles:1h"
            ))
        })?;
        if !channels.contains(&ch) {
            channels.push(ch);
        }
    }
    if channels.is_empty() {
        channels.push(Channel::Ticks);
    }
    let mut resume = HashMap::new();
    for (k, p) in &r.resume {
        resume.insert(
            parse_symbol(k)?,
            Position {
                seq: p.seq,
                epoch: Epoch::parse(&p.epoch).unwrap_or_default(),
            },
        );
    }
    let mut out = Vec::new();
    for s in &r.symbols {
        let symbol = parse_symbol(s)?;
        for &channel in &channels {
            if out
                .iter()
                .any(|q: &SubRequest| q.symbol == symbol && q.channel == channel)
            {
                continue;
            }
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
    if out.len() > max {
        return Err(Status::resource_exhausted(format!(
            "{} symbol×channel subscriptions requested; the limit per stream is {max}",
            out.len()
        )));
    }
    Ok(out)
}

fn per_symbol(results: &[SubResult]) -> Vec<pb::SymbolState> {
    let mut out: Vec<SubResult> = Vec::new();
    for r in results {
        match out.iter_mut().find(|o| o.symbol == r.symbol) {
            Some(o) if r.channel == Channel::Ticks => *o = *r,
            Some(_) => {}
            None => out.push(*r),
        }
    }
    out.iter().map(wire::sub_result_to_pb).collect()
}

fn event(kind: pb::event::Kind) -> pb::Event {
    pb::Event { kind: Some(kind) }
}

/// Cleans a gRPC subscriber up when tonic drops its stream (client gone).
struct SubGuard {
    shared: Arc<Shared>,
    outbox: Arc<Outbox<pb::Event>>,
    subs: Vec<(Symbol, Channel)>,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        self.outbox.finish();
        for (s, c) in &self.subs {
            self.shared.node.unsubscribe(self.outbox.id(), s, *c);
        }
        self.shared.deregister(self.outbox.id());
        metrics::gauge!(m::CLIENTS_CONNECTED, "protocol" => "grpc").decrement(1.0);
    }
}

struct SubState {
    guard: SubGuard,
    queue: VecDeque<Msg<pb::Event>>,
    /// The rest of a chunk being sent tick by tick.
    expanded: VecDeque<pb::Event>,
    /// Weight of the items taken from the outbox and not yet reported written.
    taken: usize,
    close: Option<Close>,
    done: bool,
}

async fn next_event(mut st: SubState) -> Option<(Result<pb::Event, Status>, SubState)> {
    loop {
        if st.done {
            return None;
        }
        if let Some(ev) = st.expanded.pop_front() {
            return Some((Ok(ev), st));
        }
        if let Some(msg) = st.queue.pop_front() {
            let ev = match msg {
                Msg::Control(ev) => ev,
                Msg::Data(d) => {
                    st.taken += d.weight();
                    match d {
                        Data::Ticks { chunk, from } => {
                            let ticks = chunk.ticks.get(from..).unwrap_or_default();
                            st.expanded
                                .extend(ticks.iter().map(|t| event(pb::event::Kind::Tick(wire::tick_to_pb(t)))));
                            continue;
                        }
                        Data::Snapshot(s) => event(pb::event::Kind::Snapshot(wire::snapshot_to_pb(&s, false))),
                        Data::Candle(c) => event(pb::event::Kind::Candle(wire::candle_to_pb(&c.candle, c.closed))),
                    }
                }
            };
            return Some((Ok(ev), st));
        }
        if let Some(c) = st.close.take() {
            st.done = true;
            let status = match c {
                Close::SLOW => Status::resource_exhausted("client too slow: resume from your last position"),
                _ => Status::unavailable("server is restarting: reconnect and resume"),
            };
            return Some((Err(status), st));
        }
        let outbox = st.guard.outbox.clone();
        if let AfterWrite::Repair(stalled) = outbox.written(std::mem::take(&mut st.taken)) {
            st.guard.shared.node.hub().repair(outbox.id(), &stalled);
        }
        st.close = outbox.take(&mut st.queue).await;
    }
}

#[tonic::async_trait]
impl Feed for FeedService {
    type PublishStream = BoxStream<pb::PublishAck>;
    type SubscribeStream = BoxStream<pb::Event>;

    async fn publish(
        &self,
        req: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let mut inbound = req.into_inner();
        let (ack_tx, ack_rx) = AckTx::new();
        let (rej_tx, rej_rx) = tokio::sync::mpsc::unbounded_channel::<pb::PublishAck>();
        let window = Arc::new(Semaphore::new(self.shared.publish_window));
        let drained = Arc::new(AtomicBool::new(false));
        let node = self.shared.node.clone();
        let draining = self.shared.draining().clone();
        {
            let window = window.clone();
            let drained = drained.clone();
            tokio::spawn(async move {
                let mut publishers: HashMap<String, Arc<str>> = HashMap::new();
                loop {
                    // Bound the requests in flight: wait for acks past the window.
                    let permit = tokio::select! {
                        _ = draining.cancelled() => { drained.store(true, Ordering::Relaxed); break }
                        p = window.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    };
                    // `Streaming::message` is cancel-safe: a message is never lost.
                    let msg = tokio::select! {
                        _ = draining.cancelled() => { drained.store(true, Ordering::Relaxed); break }
                        m = inbound.message() => m,
                    };
                    let r = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "publish stream ended");
                            break;
                        }
                    };
                    permit.forget();
                    let received = Instant::now();
                    let Some(t) = r.tick.as_ref() else {
                        let _ = rej_tx.send(reject(
                            r.request_id,
                            "",
                            ErrorCode::InvalidTick,
                            "request has no tick".into(),
                        ));
                        continue;
                    };
                    let tick = match wire::tick_from_pb(t) {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = rej_tx.send(reject(r.request_id, &t.symbol, e.code(), e.to_string()));
                            continue;
                        }
                    };
                    let publisher = if r.publisher_id.is_empty() {
                        None
                    } else {
                        let id = publishers
                            .entry(r.publisher_id.clone())
                            .or_insert_with(|| Arc::from(r.publisher_id.as_str()))
                            .clone();
                        Some((id, r.publisher_seq))
                    };
                    let cmd = PublishCmd {
                        tick,
                        publisher,
                        request_id: r.request_id,
                        reply: ack_tx.clone(),
                        received,
                    };
                    if let Err(e) = node.publish(cmd).await {
                        let _ = rej_tx.send(reject(
                            r.request_id,
                            t.symbol.as_str(),
                            ErrorCode::Unavailable,
                            e.to_string(),
                        ));
                    }
                }
                // Dropping the senders ends the response stream once every
                // in-flight request has been acked.
            });
        }
        let acks = tokio_stream_from(ack_rx).flat_map(stream::iter).map(ack_to_pb);
        let rejects = tokio_stream_from(rej_rx);
        let out = stream::select(acks, rejects)
            .map(move |a| {
                window.add_permits(1);
                Ok(a)
            })
            .chain(
                stream::once(async move {
                    drained.load(Ordering::Relaxed).then(|| {
                        Err(Status::unavailable(
                            "server is draining: reconnect and resend unacked requests",
                        ))
                    })
                })
                .filter_map(|x| async move { x }),
            );
        Ok(Response::new(Box::pin(out)))
    }

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        if self.shared.is_draining() {
            return Err(Status::unavailable("server is draining: connect to another server"));
        }
        let reqs = sub_requests(req.get_ref(), self.shared.ws.max_subscriptions)?;
        let node = self.shared.node.clone();
        let outbox: Arc<Outbox<pb::Event>> = node.outbox(self.shared.ws.slow_client);
        metrics::gauge!(m::CLIENTS_CONNECTED, "protocol" => "grpc").increment(1.0);
        let guard = SubGuard {
            shared: self.shared.clone(),
            outbox: outbox.clone(),
            subs: reqs.iter().map(|r| (r.symbol, r.channel)).collect(),
        };
        self.shared.register(outbox.id(), outbox.clone());
        let prepared = node
            .prepare(&outbox, &reqs)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let subscribed = event(pb::event::Kind::Subscribed(pb::Subscribed {
            symbols: per_symbol(&prepared.results),
        }));
        outbox.control(subscribed, 64);
        {
            let outbox = outbox.clone();
            tokio::spawn(async move { node.activate(&outbox, prepared).await });
        }
        let st = SubState {
            guard,
            queue: VecDeque::new(),
            expanded: VecDeque::new(),
            taken: 0,
            close: None,
            done: false,
        };
        Ok(Response::new(Box::pin(stream::unfold(st, next_event))))
    }

    async fn get_snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<pb::SnapshotResponse>, Status> {
        let mut snapshots = Vec::new();
        for s in &req.get_ref().symbols {
            let sym = parse_symbol(s)?;
            if let Some(head) = self.shared.node.head(&sym)
                && let Some(last) = head.last
            {
                snapshots.push(pb::Snapshot {
                    last: Some(wire::tick_to_pb(&last)),
                    epoch: head.epoch.to_string(),
                    recovered: false,
                    conflated: false,
                });
            }
        }
        Ok(Response::new(pb::SnapshotResponse { snapshots }))
    }

    async fn get_history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let r = req.into_inner();
        let sym = parse_symbol(&r.symbol)?;
        let node = &self.shared.node;
        let epoch = node.head(&sym).map(|h| h.epoch.to_string()).unwrap_or_default();
        let limit = match r.limit {
            0 => HISTORY_LIMIT_DEFAULT,
            n => (n as usize).min(HISTORY_LIMIT_MAX),
        };
        let internal = |e: tickshard_shard::store::StoreError| Status::internal(format!("store read failed: {e}"));
        if r.interval.is_empty() {
            let to = if r.to_seq == 0 { u64::MAX } else { r.to_seq };
            let mut ticks = node
                .read_ticks(sym, r.from_seq.max(1), to, limit + 1)
                .await
                .map_err(internal)?;
            let truncated = ticks.len() > limit;
            ticks.truncate(limit);
            Ok(Response::new(pb::HistoryResponse {
                epoch,
                ticks: ticks.iter().map(wire::tick_to_pb).collect(),
                candles: Vec::new(),
                truncated,
            }))
        } else {
            let interval = Interval::parse(&r.interval).ok_or_else(|| {
                Status::invalid_argument(format!("unknown interval '{}'; expected 1s, 1m or 1h", r.interval))
            })?;
            let to = if r.to_micros == 0 { i64::MAX } else { r.to_micros };
            let mut candles = node
                .read_candles(sym, interval, r.from_micros, to, limit + 1)
                .await
                .map_err(internal)?;
            let truncated = candles.len() > limit;
            candles.truncate(limit);
            Ok(Response::new(pb::HistoryResponse {
                epoch,
                ticks: Vec::new(),
                candles: candles
                    .iter()
                    .map(|(c, closed)| wire::candle_to_pb(c, *closed))
                    .collect(),
                truncated,
            }))
        }
    }

    async fn list_symbols(
        &self,
        _req: Request<pb::ListSymbolsRequest>,
    ) -> Result<Response<pb::ListSymbolsResponse>, Status> {
        let own = self.shared.node.ownership();
        let symbols = self
            .shared
            .node
            .symbols()
            .into_iter()
            .map(|(s, h)| pb::SymbolInfo {
                symbol: s.as_str().to_owned(),
                owner_shard: own.owner(&s),
                seq: h.seq,
                epoch: h.epoch.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListSymbolsResponse { symbols }))
    }
}

/// A `Stream` over an unbounded receiver (what `tokio-stream`'s wrapper does).
fn tokio_stream_from<T: Send + 'static>(rx: tokio::sync::mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> + Send {
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
