//! `Feed.Subscribe` with encode-once tick events.
//!
//! tonic's generated server converts every response item with prost, which for
//! a stream of ticks would mean one protobuf encode (and a string per decimal)
//! per tick *per subscriber*. Instead each chunk's ticks are encoded once into
//! `tickshard.v1.Event` messages ([`Format::Protobuf`], cached in the chunk),
//! and every subscriber's stream yields reference-counted slices of those bytes
//! through [`PreEncodedCodec`]. [`FeedRoutes`] sends the `Subscribe` path to
//! that hand-built handler and everything else to the generated `FeedServer`;
//! the bytes on the wire are the same `Event` messages, so generated clients
//! (and grpcurl through reflection) see no difference.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes};
use futures_util::{FutureExt as _, StreamExt as _};
use prost::Message as _;
use tickshard_proto::v1::{self as pb, feed_server::FeedServer};
use tickshard_shard::{
    domain::{Epoch, Position, Tick},
    events::outbox_events,
    hub::{Channel, Data, Format, Frames, Outbox},
    node::{SubRequest, SubResult},
    rpc::{parse_symbol, parse_symbols},
    session::{self, Session, SessionGuard},
    wire,
};
use tonic::{
    Request, Response, Status,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    codegen::{Body, BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, ServerStreamingService},
};
use tonic_prost::ProstDecoder;

use super::{BoxStream, FeedService};

const SUBSCRIBE_PATH: &str = "/tickshard.v1.Feed/Subscribe";

/// `tickshard.v1.Feed`: `Subscribe` by [`subscribe`], the rest by the
/// generated server.
#[derive(Clone)]
pub struct FeedRoutes {
    generated: FeedServer<FeedService>,
    service: Arc<FeedService>,
}

impl FeedRoutes {
    pub fn new(service: FeedService) -> FeedRoutes {
        let service = Arc::new(service);
        FeedRoutes {
            generated: FeedServer::from_arc(service.clone()).max_decoding_message_size(service.max_request_bytes()),
            service,
        }
    }
}

impl NamedService for FeedRoutes {
    const NAME: &'static str = <FeedServer<FeedService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for FeedRoutes
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SUBSCRIBE_PATH {
            return self.generated.call(req);
        }
        let method = SubscribeSvc(self.service.clone());
        let max = self.service.max_request_bytes();
        Box::pin(async move {
            let mut grpc = Grpc::new(PreEncodedCodec).max_decoding_message_size(max);
            Ok(grpc.server_streaming(method, req).await)
        })
    }
}

struct SubscribeSvc(Arc<FeedService>);

impl ServerStreamingService<pb::SubscribeRequest> for SubscribeSvc {
    type Response = Bytes;
    type ResponseStream = BoxStream<Bytes>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<pb::SubscribeRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { subscribe(&service, req).await })
    }
}

/// Decodes `SubscribeRequest`s with prost; writes response items, which are
/// already-encoded `Event` messages, as they are.
#[derive(Clone, Copy, Default)]
pub struct PreEncodedCodec;

/// Writes one stream's events, counted by its [`SentCount`].
pub struct PreEncodedEncoder {
    sent: SentCount,
}

/// One gRPC stream's count of what it wrote, for
/// `tickshard_messages_sent_total` / `tickshard_bytes_sent_total`
/// (`protocol="grpc"`): added to the shared counters in batches, not per
/// message, so that subscribers do not contend on them per tick.
pub struct SentCount {
    messages: metrics::Counter,
    bytes: metrics::Counter,
    /// Written and not yet added to the counters: messages, bytes.
    unreported: (u64, u64),
    reported: Instant,
}

/// The stream adds what it wrote to the counters once it has this many
/// messages unreported, or when its unreported count reaches a power of two
/// a second or more after its last report (the clock is read at 1, 2, 4, …
/// 32 messages, not at each: a read costs as much as the rest of a
/// message's write, BENCHMARKS.md), and when it ends.
const REPORT_EVERY: u64 = 64;
const REPORT_AFTER: Duration = Duration::from_secs(1);

/// The length prefix gRPC puts before each message (flag + length).
const GRPC_PREFIX: u64 = 5;

impl SentCount {
    pub fn new() -> SentCount {
        use tickshard_shard::metrics as m;
        SentCount {
            messages: metrics::counter!(m::MESSAGES_SENT, "protocol" => "grpc"),
            bytes: metrics::counter!(m::BYTES_SENT, "protocol" => "grpc"),
            unreported: (0, 0),
            reported: Instant::now(),
        }
    }

    /// One message of `len` bytes written (its gRPC prefix counted too).
    pub fn wrote(&mut self, len: usize) {
        self.unreported.0 += 1;
        self.unreported.1 += len as u64 + GRPC_PREFIX;
        let n = self.unreported.0;
        if n >= REPORT_EVERY || (n.is_power_of_two() && self.reported.elapsed() >= REPORT_AFTER) {
            self.report();
        }
    }

    fn report(&mut self) {
        let (msgs, bytes) = std::mem::take(&mut self.unreported);
        if msgs > 0 {
            self.bytes.increment(bytes);
            self.messages.increment(msgs);
        }
        self.reported = Instant::now();
    }
}

impl Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        self.sent.wrote(item.len());
        Ok(())
    }
}

impl Default for SentCount {
    fn default() -> SentCount {
        SentCount::new()
    }
}

impl Drop for SentCount {
    fn drop(&mut self) {
        self.report();
    }
}

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = pb::SubscribeRequest;
    type Encoder = PreEncodedEncoder;
    type Decoder = ProstDecoder<pb::SubscribeRequest>;

    fn encoder(&mut self) -> PreEncodedEncoder {
        PreEncodedEncoder { sent: SentCount::new() }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// Encodes every tick of a chunk once as an `Event`; shared by all gRPC
/// subscribers.
pub fn encode_tick_events(ticks: &[Tick], frames: &mut Frames) {
    frames.reserve(ticks.len(), ticks.len() * 96);
    for t in ticks {
        event(pb::event::Kind::Tick(wire::tick_to_pb(t))).encode_raw(&mut frames.bytes);
        frames.end_frame();
    }
}

fn event(kind: pb::event::Kind) -> pb::Event {
    pb::Event { kind: Some(kind) }
}

fn encoded(kind: pb::event::Kind) -> Bytes {
    Bytes::from(event(kind).encode_to_vec())
}

/// Renders one hub item into encoded `Event`s: a chunk's ticks are slices of
/// the chunk's shared encoding, a candle event the event's shared encoding;
/// the rarer snapshots (first data, conflation) are encoded per subscriber.
pub fn render(d: Data, out: &mut std::collections::VecDeque<Bytes>) {
    match d {
        Data::Ticks { chunk, from } => {
            out.extend(chunk.encoded(Format::Protobuf, encode_tick_events).shared_from(from));
        }
        Data::Snapshot(s) => out.push_back(encoded(pb::event::Kind::Snapshot(wire::snapshot_to_pb(&s, false)))),
        Data::Candle(c) => out.push_back(
            c.encoded(Format::Protobuf, |candle, closed, out| {
                event(pb::event::Kind::Candle(wire::candle_to_pb(candle, closed))).encode_raw(out);
            })
            .clone(),
        ),
        // gRPC has no such event; the stream resumes when the owner is back.
        Data::Unavailable(_) => {}
    }
}

async fn subscribe(
    service: &FeedService,
    req: Request<pb::SubscribeRequest>,
) -> Result<Response<BoxStream<Bytes>>, Status> {
    let shared = &service.shared;
    if shared.is_draining() {
        return Err(Status::unavailable("server is draining: connect to another server"));
    }
    let caller = service.caller(&req)?;
    let reqs = sub_requests(req.get_ref(), shared.ws.max_subscriptions)?;
    FeedService::check_read(&caller, reqs.iter().map(|r| r.symbol.as_str()))?;
    let permit = shared.subscriber_permit().ok_or_else(|| {
        Status::resource_exhausted("this server holds its --max-connections subscribers: connect to another one")
    })?;
    let outbox: Arc<Outbox<Bytes>> = shared.node.outbox(shared.ws.slow_client);
    let session = Session::new(shared.node.clone(), outbox.clone());
    // Dropped with the stream (client gone): the session ends (detaching
    // everything), then the drain registration and the slot go.
    let guard = (
        SessionGuard::new(session.clone()),
        shared.enter("grpc", outbox.clone()),
        permit,
    );
    let prepared = session.prepare(&reqs).await.map_err(wire::error_status)?;
    if let Some((r, why)) = prepared.failed.first() {
        // gRPC has no per-symbol error: the whole call is retryable.
        return Err(Status::unavailable(format!("{}: {why}", r.symbol)));
    }
    let subscribed = encoded(pb::event::Kind::Subscribed(pb::Subscribed {
        symbols: SubResult::per_symbol(&prepared.results)
            .iter()
            .map(tickshard_shard::rpc::sub_result_to_pb)
            .collect(),
    }));
    outbox.control(subscribed, 64);
    tickshard_shard::tasks::spawn(&shared.tracker, async move { session.activate(prepared).await });
    let events = outbox_events(outbox, shared.node.hub().clone(), guard, render).map(|r| r.map_err(wire::close_status));
    match caller.lapse_instant() {
        None => Ok(Response::new(Box::pin(events))),
        // The stream ends with UNAUTHENTICATED when the token lapses (contract
        // §8); the client resumes with a fresh one, losing nothing.
        Some(at) => {
            let lapsed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = lapsed.clone();
            let until =
                tokio::time::sleep_until(at).map(move |()| flag.store(true, std::sync::atomic::Ordering::Relaxed));
            let tail = futures_util::stream::once(async move {
                lapsed.load(std::sync::atomic::Ordering::Relaxed).then(|| {
                    Err(Status::unauthenticated(
                        "the token expired: resubscribe with a fresh one and resume",
                    ))
                })
            })
            .filter_map(|x| async move { x });
            Ok(Response::new(Box::pin(events.take_until(until).chain(tail))))
        }
    }
}

/// One subscription request, validated: counts first (symbols, repeats once;
/// resume entries; channels), then the per-symbol requests. Linear in the
/// request's size.
pub(crate) fn sub_requests(r: &pb::SubscribeRequest, max: usize) -> Result<Vec<SubRequest>, Status> {
    if r.symbols.is_empty() {
        return Err(Status::invalid_argument("symbols is empty"));
    }
    if r.resume.len() > max {
        return Err(Status::resource_exhausted(format!(
            "resume names more than {max} symbols"
        )));
    }
    let symbols = parse_symbols(&r.symbols, max)?;
    let mut channels = Vec::new();
    for c in &r.channels {
        let ch = Channel::parse(c).ok_or_else(|| {
            let shown: String = c.chars().take(40).collect();
            Status::invalid_argument(format!(
                "unknown channel '{shown}'; expected ticks, candles:1s, candles:1m or candles:1h"
            ))
        })?;
        if !channels.contains(&ch) {
            channels.push(ch);
        }
    }
    if channels.is_empty() {
        channels.push(Channel::Ticks);
    }
    let pairs = symbols.len() * channels.len();
    if pairs > max {
        return Err(Status::resource_exhausted(format!(
            "{pairs} symbol×channel subscriptions requested; the limit per stream is {max}"
        )));
    }
    let mut resume = HashMap::with_capacity(r.resume.len());
    for (k, p) in &r.resume {
        resume.insert(
            parse_symbol(k)?,
            Position {
                seq: p.seq,
                epoch: Epoch::parse(&p.epoch).unwrap_or_default(),
            },
        );
    }
    Ok(session::requests(&symbols, &channels, &resume))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tickshard_shard::{
        domain::{Symbol, TickFields},
        hub::Chunk,
    };

    use super::*;

    fn ticks() -> Vec<Tick> {
        (1..=3)
            .map(|seq| {
                let mut t = TickFields {
                    symbol: "BTC-USD",
                    ts: 1_732_530_000_000_000 + seq as i64,
                    price: "67012.50",
                    size: "0.0100",
                    bid: "67012.40",
                    ask: "67012.600",
                    bid_size: "4.20",
                    ask_size: "1.05",
                }
                .validate()
                .unwrap();
                t.seq = seq;
                t
            })
            .collect()
    }

    /// What tonic's generated code would have sent: the same `Event`s,
    /// decimals exact, from the requested index on.
    #[test]
    fn pre_encoded_ticks_decode_to_the_generated_events() {
        let ts = ticks();
        let chunk = Arc::new(Chunk::new(Symbol::parse("BTC-USD").unwrap(), ts.clone()));
        let mut out = VecDeque::new();
        render(Data::Ticks { chunk, from: 1 }, &mut out);
        let got: Vec<pb::Event> = out.iter().map(|b| pb::Event::decode(b.clone()).unwrap()).collect();
        let want: Vec<pb::Event> = ts[1..]
            .iter()
            .map(|t| event(pb::event::Kind::Tick(wire::tick_to_pb(t))))
            .collect();
        assert_eq!(got, want);
        let Some(pb::event::Kind::Tick(t)) = &got[0].kind else {
            panic!("not a tick: {:?}", got[0]);
        };
        assert_eq!((t.seq, t.price.as_str(), t.ask.as_str()), (2, "67012.50", "67012.600"));
    }

    /// Issue 10, item 2: counts are checked first and repeats count once.
    #[test]
    fn subscribe_requests_are_bounded_and_deduplicated() {
        let req = |symbols: Vec<String>, channels: &[&str]| pb::SubscribeRequest {
            symbols,
            channels: channels.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let many: Vec<String> = (0..80_000).map(|i| format!("S{i}")).collect();
        let e = sub_requests(&req(many, &[]), 1_000).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let same = vec!["btc-usd".to_string(); 80_000];
        let ok = sub_requests(&req(same, &["ticks", "ticks", "candles:1m"]), 2).unwrap();
        assert_eq!(ok.len(), 2);
        // symbols × channels is what counts
        let two = vec!["A".to_string(), "B".to_string()];
        let e = sub_requests(&req(two, &["ticks", "candles:1m"]), 3).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let mut r = req(vec!["A".into()], &[]);
        r.resume = (0..5).map(|i| (format!("S{i}"), pb::Position::default())).collect();
        assert_eq!(sub_requests(&r, 4).unwrap_err().code(), tonic::Code::ResourceExhausted);
    }

    /// Encode once: two subscribers of the same chunk get the same bytes, not
    /// two encodings.
    #[test]
    fn subscribers_share_one_encoding() {
        let chunk = Arc::new(Chunk::new(Symbol::parse("BTC-USD").unwrap(), ticks()));
        let (mut a, mut b) = (VecDeque::new(), VecDeque::new());
        render(
            Data::Ticks {
                chunk: chunk.clone(),
                from: 0,
            },
            &mut a,
        );
        render(Data::Ticks { chunk, from: 2 }, &mut b);
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 1);
        assert_eq!(a[2], b[0]);
        assert_eq!(
            a[2].as_ptr(),
            b[0].as_ptr(),
            "the second subscriber re-encoded the tick"
        );
    }
}
