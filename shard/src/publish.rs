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
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures_util::{Stream, StreamExt, stream};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    committer::{Ack, AckError, AckTx, PublishCmd},
    domain::{ErrorCode, InputError, MAX_SYMBOL_LEN, Tick, validate_publisher_id},
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
            // Echoed for correlation, but never more than a symbol can be: a
            // refused request may carry a megabyte in that field.
            symbol: symbol.chars().take(MAX_SYMBOL_LEN).collect(),
            code,
            message,
        }
    }
}

/// The end of a stream that the drain stopped: retryable (resend unacked
/// requests elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained;

/// Most distinct publisher ids a stream keeps interned.
const MAX_INTERNED_IDS: usize = 1_024;

/// Once draining, how long a stream keeps reading requests the client has
/// already sent, to answer each `unavailable`.
pub const DRAIN_READ: std::time::Duration = std::time::Duration::from_secs(1);

/// Who is publishing: a client (route to the owner) or a peer forwarding to us
/// as the owner (never forward again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Client,
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
/// server's drain, once its clients are closed). `inbound` ends (or fails:
/// logged) when the client does.
pub fn serve<S, E>(
    node: Arc<Node>,
    mut inbound: S,
    window: usize,
    stop: CancellationToken,
    origin: Origin,
) -> impl Stream<Item = Result<Answer, Drained>> + Send + 'static
where
    S: Stream<Item = Result<Request, E>> + Send + Unpin + 'static,
    E: Display + Send,
{
    let (ack_tx, ack_rx) = AckTx::new();
    let (rej_tx, rej_rx) = tokio::sync::mpsc::unbounded_channel::<Answer>();
    let permits = Arc::new(Semaphore::new(window.max(1)));
    let drained = Arc::new(AtomicBool::new(false));
    {
        let permits = permits.clone();
        let drained = drained.clone();
        let tasks = node.stream_tasks().clone();
        crate::tasks::spawn(&tasks, async move {
            let mut publishers: HashMap<String, Arc<str>> = HashMap::new();
            loop {
                // Bound the requests in flight: wait for acks past the window.
                let permit = tokio::select! {
                    _ = stop.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                // `next` is cancel-safe: a message is never lost.
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = inbound.next() => m,
                };
                let r = match msg {
                    Some(Ok(r)) => r,
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "publish stream ended");
                        break;
                    }
                };
                permit.forget();
                let received = Instant::now();
                let tick = match validate_publisher_id(&r.publisher_id).and(r.tick) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = rej_tx.send(Answer::refused(r.request_id, &r.symbol, e.code(), e.to_string()));
                        continue;
                    }
                };
                let publisher = if r.publisher_id.is_empty() {
                    None
                } else {
                    // (an intern table of this stream's ids, kept small)
                    if publishers.len() >= MAX_INTERNED_IDS && !publishers.contains_key(&r.publisher_id) {
                        publishers.clear();
                    }
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
                if cmd.is_behind_a_hole() {
                    // An earlier request of this (publisher, symbol) was
                    // refused: accepting this one would leave a hole that
                    // the publisher's resend could never fill (contract §5).
                    cmd.unavailable("an earlier request of this publisher_id and symbol was refused on this stream; resend from it on a new stream".into());
                    continue;
                }
                // Answered in every case (an error here was acked UNAVAILABLE).
                let _ = match origin {
                    Origin::Client => node.publish(cmd).await,
                    Origin::Peer => node.publish_as_owner(cmd).await,
                };
            }
            if stop.is_cancelled() {
                drained.store(true, Ordering::Relaxed);
                // Requests the client has already sent each get an answer
                // (contract §7: `unavailable`, never silence), for a bounded
                // time; the stream then ends with UNAVAILABLE.
                let until = tokio::time::Instant::now() + DRAIN_READ;
                while let Ok(Some(Ok(r))) = tokio::time::timeout_at(until, inbound.next()).await {
                    let why = "server is draining: resend on another server".to_string();
                    let _ = rej_tx.send(Answer::refused(r.request_id, &r.symbol, ErrorCode::Unavailable, why));
                }
            }
            // Dropping the senders ends the response stream once every
            // in-flight request has been acked.
        });
    }
    let acks = UnboundedReceiverStream::new(ack_rx).flat_map(stream::iter).map(|a| {
        if let Err(e) = &a.result {
            metrics::counter!(m::TICKS_REJECTED, "code" => e.code().as_str()).increment(1);
        }
        Answer::Ack(a)
    });
    let refusals = UnboundedReceiverStream::new(rej_rx);
    stream::select(acks, refusals)
        .map(move |a| {
            permits.add_permits(1);
            Ok(a)
        })
        .chain(
            stream::once(async move { drained.load(Ordering::Relaxed).then_some(Err(Drained)) })
                .filter_map(|x| async move { x }),
        )
}
