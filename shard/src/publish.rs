//! Serving one publish stream, in domain terms: the public `Feed.Publish` and
//! the peer `Cluster.Forward` share it (each converts its protocol at its
//! edge: `wire::publish_stream` for gRPC). Requests are read while fewer than
//! `window` are unacked, validated (bad ones are refused at once and consume
//! no seq), kept in order per `(publisher_id, symbol)` (see `AckTx`),
//! submitted (locally, or forwarded to the owner), and acked when durable.
//! While draining, the stream stops taking requests, acks what it took,
//! answers what it reads in the next [`DRAIN_READ`] `unavailable`, and ends
//! with [`Drained`] so the publisher resends the rest elsewhere.

use std::{
    collections::HashMap,
    fmt::Display,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use futures_util::{Stream, StreamExt, stream};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    committer::{Ack, AckError, AckTx, PublishCmd},
    domain::{
        ErrorCode, InputError, MAX_SYMBOL_LEN, Symbol, Tick, scoped_publisher_id, validate_forwarded_publisher_id,
        validate_publisher_id,
    },
    metrics as m,
    node::Node,
};

/// One request of a publish stream, as its protocol decoded it.
#[derive(Debug)]
pub struct Request {
    pub request_id: u64,
    /// The symbol as sent (echoed in a refusal, cut to a symbol's length).
    pub symbol: String,
    /// The validated tick, or why the request is refused (its contract code).
    pub tick: Result<Tick, InputError>,
    pub publisher_id: String,
    pub publisher_seq: u64,
}

/// The stream's answer to one request.
#[derive(Debug)]
pub enum Answer {
    /// The committer's (or the owner's) ack: accepted, duplicate or refused.
    Ack(Ack),
    /// Refused before it reached a committer.
    Refused {
        request_id: u64,
        /// The symbol as sent, at most a symbol's length.
        symbol: String,
        code: ErrorCode,
        message: String,
    },
}

impl Answer {
    fn refused(request_id: u64, symbol: &str, code: ErrorCode, message: String) -> Answer {
        metrics::counter!(m::TICKS_REJECTED, "code" => code.as_str()).increment(1);
        Answer::Refused {
            request_id,
            // Echoed for correlation: upper-case like every symbol out
            // (contract §1) where it is one, and never more than a symbol
            // can be (a refused request may carry a megabyte in that field).
            symbol: match Symbol::parse(symbol) {
                Ok(s) => s.as_str().to_string(),
                Err(_) => symbol.chars().take(MAX_SYMBOL_LEN).collect(),
            },
            code,
            message,
        }
    }
}

/// Why a stream ended before its client ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The drain stopped it: retryable (resend unacked requests elsewhere).
    Drained,
    /// The caller's credentials lapsed: retry with fresh ones (nothing is
    /// lost or duplicated: unacked requests are resent with their seqs).
    Expired,
    /// More `(publisher_id, symbol)` pairs were refused on it than a stream
    /// remembers ([`crate::committer::MAX_BROKEN_PAIRS`]): retryable on a
    /// new stream.
    Full,
    /// The client's side failed (a message past the size limit, one that
    /// does not decode): the stream ends with that error once what it took
    /// is answered, never as if the client had ended it.
    Inbound,
}

/// Whether a symbol is allowed.
pub type SymbolCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A publishing client in domain terms, as its protocol edge established it
/// from its credentials (contract §8).
#[derive(Clone, Default)]
pub struct Caller {
    /// The authenticated identity: de-duplication is keyed by it too,
    /// `(sub, publisher_id, symbol)`, so no caller can shadow another's
    /// requests. `None`: anonymous.
    pub sub: Option<Arc<str>>,
    /// The symbols it may publish; `None`: every symbol. Another symbol's
    /// request is refused `forbidden` and the stream goes on.
    pub may_publish: Option<SymbolCheck>,
    /// When its credentials lapse: the stream then stops taking requests,
    /// acks what it took and ends with [`Ended::Expired`].
    pub until: Option<tokio::time::Instant>,
}

/// Most distinct publisher ids a stream keeps interned.
const MAX_INTERNED_IDS: usize = 1_024;

/// Once draining, how long a stream keeps reading requests the client has
/// already sent, to answer each `unavailable`.
pub const DRAIN_READ: std::time::Duration = std::time::Duration::from_secs(1);

/// How many requests a stream may hold unanswered (read, and not yet
/// answered to its client): its own window, and for a client's stream one
/// permit of the pod's budget each (`--publish-max-in-flight`), so that
/// clients who never read their answers hold a bounded total across all
/// their streams and connections, not streams × window. (A peer's stream
/// takes none: it carries many clients' requests, and pods are trusted.)
#[derive(Clone, Debug)]
pub struct Window {
    pub stream: usize,
    pub pod: Option<PodBudget>,
}

impl Window {
    /// A window of `stream` requests, with no pod budget.
    pub fn stream_only(stream: usize) -> Window {
        Window { stream, pod: None }
    }
}

/// The pod's budget of unanswered client requests, and what is done to a
/// client that holds some of it and stops reading its answers: whoever
/// else waits for the budget must not wait on it for good, so once it has
/// not taken an answer for `slow_reader` (`--slow-client-ms`), its
/// connection is closed (`close_connection`) and what it held comes back.
#[derive(Clone, Debug)]
pub struct PodBudget {
    pub permits: Arc<Semaphore>,
    pub slow_reader: std::time::Duration,
    pub close_connection: CancellationToken,
}

/// Most answers taken before their permits go back (see `serve`).
const ANSWERS_PER_RETURN: usize = 64;

/// The largest window a stream may have (`--publish-window` is cut to it).
pub const MAX_WINDOW: usize = 1 << 24;

/// At most how often a waiting stream checks whether its own client
/// stopped reading (see [`PodBudget`]): a quarter of its `slow_reader`
/// time, up to this.
const READER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream's unanswered requests: permits of its window and of the pod's
/// budget, given back as answers go out; what the pod lent it and did not
/// get back is returned whole when the stream is gone.
struct InFlight {
    stream: Semaphore,
    pod: Option<PodBudget>,
    /// Pod permits this stream holds.
    lent: AtomicUsize,
    /// Answers made: acks sent by whoever acks (the committer, a peer
    /// link) and refusals made by the stream itself.
    acked: Arc<AtomicU64>,
    refused: AtomicU64,
    /// Answers the protocol took for its client so far.
    handed: AtomicU64,
    /// Refusals of requests that took no pod permit (the drain's, a stop
    /// or a lapse while waiting for one): their answers give none back.
    unborrowed: AtomicUsize,
}

impl InFlight {
    fn new(w: Window, acked: Arc<AtomicU64>) -> InFlight {
        InFlight {
            // (far below the semaphore's maximum: the drain's refusals give
            // back permits they never took)
            stream: Semaphore::new(w.stream.clamp(1, MAX_WINDOW)),
            pod: w.pod,
            lent: AtomicUsize::new(0),
            acked,
            refused: AtomicU64::new(0),
            handed: AtomicU64::new(0),
            unborrowed: AtomicUsize::new(0),
        }
    }

    /// Answers made and not yet taken by the protocol: while some wait
    /// and none is taken, its client is not reading them (HTTP/2 flow
    /// control: the answers pile up here).
    fn waiting(&self) -> u64 {
        let made = self.acked.load(Ordering::Relaxed) + self.refused.load(Ordering::Relaxed);
        made.saturating_sub(self.handed.load(Ordering::Relaxed))
    }

    /// Takes one permit of the pod's budget at once, if there is one (or
    /// this stream draws on none).
    fn try_borrow(&self) -> bool {
        let Some(pod) = &self.pod else { return true };
        match pod.permits.try_acquire() {
            Ok(p) => {
                p.forget();
                self.lent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes one permit of the pod's budget, waiting while other streams
    /// hold it all.
    async fn borrow(&self) {
        if let Some(pod) = &self.pod
            && let Ok(p) = pod.permits.acquire().await
        {
            p.forget();
            self.lent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` answers went out to the client.
    fn answered(&self, n: usize) {
        self.handed.fetch_add(n as u64, Ordering::Relaxed);
        self.stream.add_permits(n);
        // (answers of requests that took no pod permit come first, as far
        // as the count goes: the totals are what matter)
        let unborrowed = self
            .unborrowed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u > 0).then(|| u.saturating_sub(n))
            })
            .unwrap_or(0);
        let n = n - unborrowed.min(n);
        if n > 0
            && let Some(pod) = &self.pod
            && let Ok(lent) = self.lent.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                (l > 0).then(|| l.saturating_sub(n))
            })
        {
            pod.permits.add_permits(lent.min(n));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(pod) = &self.pod {
            pod.permits.add_permits(*self.lent.get_mut());
        }
    }
}

/// Watches whether a stream's client stopped reading its answers while
/// the stream holds some of the pod's budget (see [`PodBudget`]): ticks
/// only for a stream that draws on the budget.
struct ReaderWatch {
    tick: Option<tokio::time::Interval>,
    /// Since when, and at which answer, the client has not taken the next.
    stuck: Option<(tokio::time::Instant, u64)>,
}

impl ReaderWatch {
    fn new(flow: &InFlight) -> ReaderWatch {
        let tick = flow.pod.as_ref().map(|pod| {
            let every = (pod.slow_reader / 4).clamp(std::time::Duration::from_millis(10), READER_CHECK);
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        ReaderWatch { tick, stuck: None }
    }

    /// The next check (never, without a pod budget).
    async fn next(&mut self) {
        match &mut self.tick {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Whether the client holds some of the budget, has answers waiting,
    /// and has taken none for its `slow_reader` time; if so its connection
    /// is closed.
    fn stalled(&mut self, flow: &InFlight) -> bool {
        let Some(pod) = &flow.pod else { return false };
        if flow.lent.load(Ordering::Relaxed) == 0 || flow.waiting() == 0 {
            self.stuck = None;
            return false;
        }
        let handed = flow.handed.load(Ordering::Relaxed);
        match self.stuck {
            Some((since, at)) if at == handed => {
                if since.elapsed() < pod.slow_reader {
                    return false;
                }
                metrics::counter!(m::SLOW_PUBLISHERS).increment(1);
                tracing::warn!(
                    held = flow.lent.load(Ordering::Relaxed),
                    slow_ms = pod.slow_reader.as_millis() as u64,
                    "closing a gRPC connection whose client stopped reading its publish acks"
                );
                pod.close_connection.cancel();
                true
            }
            _ => {
                self.stuck = Some((tokio::time::Instant::now(), handed));
                false
            }
        }
    }
}

/// Resolves when the caller's credentials lapse (never without a lapse).
async fn lapsed(lapse: Option<tokio::time::Instant>) {
    match lapse {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Who is publishing: a client (route to the owner) or a peer forwarding to us
/// as the owner (never forward again; the client was checked where it
/// published, and its publisher ids arrive scoped).
#[derive(Clone)]
pub enum Origin {
    Client(Caller),
    Peer,
}

impl AckError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AckError::Input(i) => i.code(),
            AckError::Rejected { code, .. } => *code,
            AckError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

/// Serves one publish stream until the client ends it, or `stop` (the
/// server's drain, once its clients are closed), or its caller's credentials
/// lapse. `inbound` ends (or fails: logged) when the client does.
pub fn serve<S, E>(
    node: Arc<Node>,
    mut inbound: S,
    window: Window,
    stop: CancellationToken,
    origin: Origin,
) -> impl Stream<Item = Result<Answer, Ended>> + Send + 'static
where
    S: Stream<Item = Result<Request, E>> + Send + Unpin + 'static,
    E: Display + Send,
{
    let (ack_tx, ack_rx) = match origin {
        Origin::Client(_) => AckTx::new(),
        Origin::Peer => AckTx::for_peer(),
    };
    let (rej_tx, rej_rx) = tokio::sync::mpsc::unbounded_channel::<Answer>();
    let permits = Arc::new(InFlight::new(window, ack_tx.sent()));
    // (cancelled when the protocol drops the answers stream)
    let answers_gone = CancellationToken::new();
    let answers_gone_guard = answers_gone.clone().drop_guard();
    let drained = Arc::new(AtomicBool::new(false));
    let expired = Arc::new(AtomicBool::new(false));
    let full = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let lapse = match &origin {
        Origin::Client(c) => c.until,
        Origin::Peer => None,
    };
    {
        let permits = permits.clone();
        let drained = drained.clone();
        let expired = expired.clone();
        let full = full.clone();
        let failed = failed.clone();
        let ack_tx = ack_tx.clone();
        let tasks = node.stream_tasks().clone();
        crate::tasks::spawn(&tasks, async move {
            let mut publishers: HashMap<String, Arc<str>> = HashMap::new();
            // (every wait below also checks, now and then, whether this
            // stream's client stopped reading while it holds pod budget)
            let mut watch = ReaderWatch::new(&permits);
            let refuse = |a: Answer| {
                permits.refused.fetch_add(1, Ordering::Relaxed);
                let _ = rej_tx.send(a);
            };
            // (a request answered without a permit of the pod's: its answer
            // gives none back)
            let refuse_unborrowed = |a: Answer| {
                permits.unborrowed.fetch_add(1, Ordering::Relaxed);
                refuse(a);
            };
            'serve: loop {
                if ack_tx.is_full() {
                    full.store(true, Ordering::Relaxed);
                    break;
                }
                // Bound the requests in flight: wait for acks past the window.
                // (a client gone with its window full leaves nobody to
                // give permits back: its answers' receiver is gone too)
                let permit = loop {
                    tokio::select! {
                        _ = stop.cancelled() => break 'serve,
                        () = lapsed(lapse) => { expired.store(true, Ordering::Relaxed); break 'serve }
                        () = rej_tx.closed() => break 'serve,
                        () = watch.next() => if watch.stalled(&permits) { break 'serve },
                        p = permits.stream.acquire() => match p { Ok(p) => break p, Err(_) => break 'serve },
                    }
                };
                // `next` is cancel-safe: a message is never lost.
                let msg = loop {
                    tokio::select! {
                        _ = stop.cancelled() => break 'serve,
                        () = lapsed(lapse) => { expired.store(true, Ordering::Relaxed); break 'serve }
                        () = watch.next() => if watch.stalled(&permits) { break 'serve },
                        m = inbound.next() => break m,
                    }
                };
                let r = match msg {
                    Some(Ok(r)) => r,
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "publish stream failed");
                        failed.store(true, Ordering::Relaxed);
                        break;
                    }
                };
                permit.forget();
                // (the pod's budget, taken with a request in hand, so an idle
                // stream holds none of it)
                if !permits.try_borrow() {
                    // (one wait, kept across the checks: a new one would
                    // queue behind every stream that came meanwhile)
                    let borrow = permits.borrow();
                    tokio::pin!(borrow);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => {
                                let why = "server is draining: resend on another server".to_string();
                                refuse_unborrowed(Answer::refused(r.request_id, &r.symbol, ErrorCode::Unavailable, why));
                                break 'serve;
                            }
                            () = lapsed(lapse) => {
                                let why = "the token expired: resend with a fresh one".to_string();
                                refuse_unborrowed(Answer::refused(r.request_id, &r.symbol, ErrorCode::Unavailable, why));
                                expired.store(true, Ordering::Relaxed);
                                break 'serve;
                            }
                            () = rej_tx.closed() => break 'serve,
                            () = watch.next() => if watch.stalled(&permits) { break 'serve },
                            () = &mut borrow => break,
                        }
                    }
                }
                let received = Instant::now();
                let valid_id = match &origin {
                    Origin::Client(_) => validate_publisher_id(&r.publisher_id),
                    Origin::Peer => validate_forwarded_publisher_id(&r.publisher_id),
                };
                let tick = match valid_id.and(r.tick) {
                    Ok(t) => t,
                    Err(e) => {
                        refuse(Answer::refused(r.request_id, &r.symbol, e.code(), e.to_string()));
                        continue;
                    }
                };
                let (request_id, publisher_seq) = (r.request_id, r.publisher_seq);
                // The caller's scope (its `sub`) is the same for the whole
                // stream: it is applied once per id, when the id is interned.
                let mut scope = None;
                if let Origin::Client(caller) = &origin {
                    if let Some(may) = &caller.may_publish
                        && !may(tick.symbol.as_str())
                    {
                        metrics::counter!(m::FORBIDDEN, "protocol" => "grpc", "right" => "publish").increment(1);
                        let why = format!("not entitled to publish {}", tick.symbol);
                        refuse(Answer::refused(r.request_id, &r.symbol, ErrorCode::Forbidden, why));
                        continue;
                    }
                    scope = caller.sub.as_deref();
                }
                let publisher = if r.publisher_id.is_empty() {
                    None
                } else {
                    // (an intern table of this stream's ids as sent, kept
                    // small; the value is the de-dup key, scoped if need be)
                    if publishers.len() >= MAX_INTERNED_IDS && !publishers.contains_key(&r.publisher_id) {
                        publishers.clear();
                    }
                    let id = publishers
                        .entry(r.publisher_id)
                        .or_insert_with_key(|k| match scope {
                            Some(sub) => Arc::from(scoped_publisher_id(sub, k)),
                            None => Arc::from(k.as_str()),
                        })
                        .clone();
                    Some((id, publisher_seq))
                };
                let cmd = PublishCmd {
                    tick,
                    publisher,
                    request_id,
                    reply: ack_tx.clone(),
                    received,
                };
                if cmd.is_behind_a_hole() {
                    // An earlier request of this (publisher, symbol) was
                    // refused: accepting this one would leave a hole that
                    // the publisher's resend could never fill (contract §5).
                    cmd.unavailable("an earlier request of this publisher_id and symbol was refused on this stream; resend from it on a new stream".into());
                    continue;
                }
                // Answered in every case (an error here was acked UNAVAILABLE).
                let _ = match origin {
                    Origin::Client(_) => node.publish(cmd).await,
                    Origin::Peer => node.publish_as_owner(cmd).await,
                };
            }
            if stop.is_cancelled() && !expired.load(Ordering::Relaxed) {
                drained.store(true, Ordering::Relaxed);
                // Requests the client has already sent each get an answer
                // (contract §7: `unavailable`, never silence), for a bounded
                // time; the stream then ends with UNAVAILABLE.
                let until = tokio::time::Instant::now() + DRAIN_READ;
                while let Ok(Some(Ok(r))) = tokio::time::timeout_at(until, inbound.next()).await {
                    let why = "server is draining: resend on another server".to_string();
                    refuse_unborrowed(Answer::refused(r.request_id, &r.symbol, ErrorCode::Unavailable, why));
                }
            }
            // Dropping the senders ends the response stream once every
            // in-flight request has been acked.
            drop((rej_tx, ack_tx));
            // The client may stop reading after it stopped sending (or its
            // stream failed, or ended Full or Expired): while it still holds
            // some of the pod's budget, keep watching it, until its answers
            // are all taken or gone.
            if permits.pod.is_some() && !stop.is_cancelled() {
                loop {
                    tokio::select! {
                        _ = answers_gone.cancelled() => break,
                        _ = stop.cancelled() => break,
                        () = watch.next() => {
                            if permits.lent.load(Ordering::Relaxed) == 0 && permits.waiting() == 0 {
                                break;
                            }
                            if watch.stalled(&permits) {
                                break;
                            }
                        }
                    }
                }
            }
        });
    }
    let acks = UnboundedReceiverStream::new(ack_rx).flat_map(stream::iter).map(|a| {
        if let Err(e) = &a.result {
            metrics::counter!(m::TICKS_REJECTED, "code" => e.code().as_str()).increment(1);
        }
        Answer::Ack(a)
    });
    let refusals = UnboundedReceiverStream::new(rej_rx);
    // Permits go back for the answers the protocol took, in one go when it
    // has taken what there is (or [`ANSWERS_PER_RETURN`]): each return
    // takes the semaphores' locks, one of them shared by every stream.
    let mut answers = stream::select(acks, refusals);
    let mut taken = 0;
    let gone_when_dropped = answers_gone_guard;
    stream::poll_fn(move |cx| {
        let _held = &gone_when_dropped;
        let next = answers.poll_next_unpin(cx);
        if let std::task::Poll::Ready(Some(_)) = &next {
            taken += 1;
        }
        if taken > 0 && (taken >= ANSWERS_PER_RETURN || !matches!(next, std::task::Poll::Ready(Some(_)))) {
            permits.answered(std::mem::take(&mut taken));
        }
        next.map(|a| a.map(Ok))
    })
    .chain(
        stream::once(async move {
            if expired.load(Ordering::Relaxed) {
                Some(Err(Ended::Expired))
            } else if full.load(Ordering::Relaxed) {
                Some(Err(Ended::Full))
            } else if failed.load(Ordering::Relaxed) {
                Some(Err(Ended::Inbound))
            } else {
                drained.load(Ordering::Relaxed).then_some(Err(Ended::Drained))
            }
        })
        .filter_map(|x| async move { x }),
    )
}

#[cfg(test)]
mod tests {
    use futures_util::{FutureExt, StreamExt};
    use rust_decimal::Decimal;

    use super::*;
    use crate::committer::MAX_BROKEN_PAIRS;

    /// During an owner's outage every request with a new `publisher_id` is
    /// refused and its pair remembered on the stream: past
    /// [`MAX_BROKEN_PAIRS`] the stream ends (retryable) instead of growing
    /// without bound, and nothing is accepted on it after the refusals.
    #[tokio::test]
    async fn a_stream_that_refuses_too_many_pairs_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::node::test_node(dir.path(), 2, 100);
        let remote = crate::ownership::remote_symbols(2, 1)[0];
        let n = MAX_BROKEN_PAIRS + 100;
        let requests = futures_util::stream::iter((0..n).map(move |i| {
            Ok::<_, String>(Request {
                request_id: i as u64,
                symbol: remote.to_string(),
                tick: Ok(Tick {
                    symbol: remote,
                    seq: 0,
                    ts: 1_700_000_000_000_000,
                    price: Decimal::ONE,
                    size: Decimal::ONE,
                    bid: None,
                    ask: None,
                    bid_size: None,
                    ask_size: None,
                }),
                publisher_id: format!("p{i}"),
                publisher_seq: 1,
            })
        }));
        let answers: Vec<_> = serve(
            node.clone(),
            requests,
            Window::stream_only(64),
            CancellationToken::new(),
            Origin::Client(Caller::default()),
        )
        .collect()
        .await;
        let (last, acks) = answers.split_last().expect("answers");
        assert!(matches!(last, Err(Ended::Full)), "ends Full");
        assert!(
            acks.len() > MAX_BROKEN_PAIRS && acks.len() < n,
            "{} answers",
            acks.len()
        );
        for a in acks {
            let refused = match a {
                Ok(Answer::Ack(a)) => matches!(a.result, Err(AckError::Unavailable(_))),
                Ok(Answer::Refused { code, .. }) => *code == ErrorCode::Unavailable,
                Err(_) => false,
            };
            assert!(refused, "every answer is unavailable");
        }
        node.shutdown().await;
    }

    #[test]
    fn a_refusal_echoes_the_symbol_upper_case_or_cut() {
        let Answer::Refused { symbol, .. } = Answer::refused(1, "btc-usd", ErrorCode::InvalidTick, String::new())
        else {
            panic!()
        };
        assert_eq!(symbol, "BTC-USD");
        let long = "b@d".repeat(100);
        let Answer::Refused { symbol, .. } = Answer::refused(1, &long, ErrorCode::InvalidSymbol, String::new()) else {
            panic!()
        };
        assert_eq!(symbol, long[..MAX_SYMBOL_LEN]);
    }

    fn refused_request(i: u64) -> Result<Request, String> {
        Ok(Request {
            request_id: i,
            symbol: "X".into(),
            tick: Err(InputError::InvalidTick("bad price".into())),
            publisher_id: "p".into(),
            publisher_seq: i,
        })
    }

    /// Runs the other tasks until `done` holds (bounded).
    async fn until(mut done: impl FnMut() -> bool) {
        // (real time: a paused clock does not move while this yields)
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "in time");
            tokio::task::yield_now().await;
        }
    }

    /// A client that holds some of the pod's budget, has answers waiting and
    /// takes none for `slow_reader` gets its connection closed (which gives
    /// the budget back), so others never wait on it for good; a client
    /// that waits for the budget but reads its answers is left alone.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_its_answers_loses_its_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::node::test_node(dir.path(), 1, 100);
        let pod = Arc::new(Semaphore::new(10));
        let (greedy_conn, patient_conn) = (CancellationToken::new(), CancellationToken::new());
        let client = |conn: &CancellationToken| {
            let (tx, rx) = tokio::sync::mpsc::channel(1_000);
            let window = Window {
                stream: 64,
                pod: Some(PodBudget {
                    permits: pod.clone(),
                    slow_reader: std::time::Duration::from_secs(10),
                    close_connection: conn.clone(),
                }),
            };
            let answers = serve(
                node.clone(),
                tokio_stream::wrappers::ReceiverStream::new(rx),
                window,
                CancellationToken::new(),
                Origin::Client(Caller::default()),
            );
            (tx, Box::pin(answers))
        };
        let (greedy_tx, greedy) = client(&greedy_conn);
        for i in 0..30 {
            greedy_tx.send(refused_request(i)).await.expect("send");
        }
        until(|| pod.available_permits() == 0).await;
        let (patient_tx, mut patient) = client(&patient_conn);
        patient_tx.send(refused_request(100)).await.expect("send");

        tokio::time::sleep(std::time::Duration::from_secs(9)).await;
        assert!(!greedy_conn.is_cancelled(), "not before --slow-client-ms");
        // (checked every second)
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(greedy_conn.is_cancelled(), "closed: answers waiting, none taken");
        assert!(!patient_conn.is_cancelled(), "the one waiting for the budget is not");
        // (what the closed connection's drop does)
        drop((greedy, greedy_tx));
        let Some(Ok(Answer::Refused { request_id, .. })) = patient.next().await else {
            panic!("an answer");
        };
        assert_eq!(request_id, 100);
        assert!(patient.next().now_or_never().is_none(), "nothing more yet");
        until(|| pod.available_permits() == 10).await;
        drop((patient, patient_tx));
        node.shutdown().await;
    }

    /// A client that stops sending and never reads what it was answered
    /// is watched all the same, after its stream's loop has ended.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_half_closes_and_stops_reading_loses_its_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::node::test_node(dir.path(), 1, 100);
        let conn = CancellationToken::new();
        let window = Window {
            stream: 64,
            pod: Some(PodBudget {
                permits: Arc::new(Semaphore::new(10)),
                slow_reader: std::time::Duration::from_secs(10),
                close_connection: conn.clone(),
            }),
        };
        let reads = Arc::new(AtomicUsize::new(0));
        let seen = reads.clone();
        let requests = futures_util::stream::iter((0..5).map(refused_request)).inspect(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let answers = serve(
            node.clone(),
            requests,
            window,
            CancellationToken::new(),
            Origin::Client(Caller::default()),
        );
        until(|| reads.load(Ordering::SeqCst) == 5).await;
        tokio::time::sleep(std::time::Duration::from_secs(13)).await;
        assert!(conn.is_cancelled(), "closed after --slow-client-ms");
        drop(answers);
        node.shutdown().await;
    }

    /// A client that never reads its answers holds at most the pod's budget
    /// of them, whatever its streams' windows; other clients' streams wait
    /// for it and go on when answers go out; and a stream that goes away
    /// gives back what it held, even while it was waiting for more.
    #[tokio::test]
    async fn unread_answers_hold_at_most_the_pods_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::node::test_node(dir.path(), 1, 100);
        let pod = Arc::new(Semaphore::new(10));
        let window = Window {
            stream: 64,
            pod: Some(PodBudget {
                permits: pod.clone(),
                slow_reader: std::time::Duration::from_secs(3600),
                close_connection: CancellationToken::new(),
            }),
        };
        let client = |reads: Arc<AtomicUsize>| {
            let (tx, rx) = tokio::sync::mpsc::channel(1_000);
            let inbound = tokio_stream::wrappers::ReceiverStream::new(rx).inspect(move |_| {
                reads.fetch_add(1, Ordering::SeqCst);
            });
            let answers = serve(
                node.clone(),
                inbound,
                window.clone(),
                CancellationToken::new(),
                Origin::Client(Caller::default()),
            );
            (tx, Box::pin(answers))
        };
        let a_reads = Arc::new(AtomicUsize::new(0));
        let (a_tx, mut a) = client(a_reads.clone());
        for i in 0..30 {
            a_tx.send(refused_request(i)).await.expect("send");
        }
        // Ten answered (unread), the eleventh read and waiting for the budget.
        until(|| a_reads.load(Ordering::SeqCst) == 11).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a_reads.load(Ordering::SeqCst), 11, "reads stop at the budget");
        assert_eq!(pod.available_permits(), 0);

        let b_reads = Arc::new(AtomicUsize::new(0));
        let (b_tx, mut b) = client(b_reads.clone());
        b_tx.send(refused_request(100)).await.expect("send");
        until(|| b_reads.load(Ordering::SeqCst) == 1).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            b.next().now_or_never().is_none(),
            "the other stream waits for the budget"
        );

        // A's ten answers read: once it has taken what there is, the budget
        // goes back, to the waiters in turn (A's eleventh, B's one, …).
        for i in 0..10 {
            let Some(Ok(Answer::Refused { request_id, code, .. })) = a.next().await else {
                panic!("an answer");
            };
            assert_eq!((request_id, code), (i, ErrorCode::InvalidTick));
        }
        assert!(a.next().now_or_never().is_none(), "nothing more yet");
        let b_answer = tokio::time::timeout(std::time::Duration::from_secs(10), b.next()).await;
        let Ok(Some(Ok(Answer::Refused { request_id, .. }))) = b_answer else {
            panic!("B's answer");
        };
        assert_eq!(request_id, 100);
        assert!(b.next().now_or_never().is_none(), "nothing more yet");

        // A goes away unread: everything it held comes back.
        drop(a);
        drop(a_tx);
        until(|| pod.available_permits() == 10).await;
        drop((b, b_tx));
        node.shutdown().await;
    }
}
