//! Serving one gRPC publish stream: the public `Feed.Publish` and the peer
//! `Cluster.Forward` share it. Requests are read while fewer than `window` are
//! unacked, validated (bad ones are rejected at once and consume no seq),
//! submitted (locally, or forwarded to the owner), and acked when durable.
//! While draining, the stream stops taking requests, acks what it took, and ends
//! with UNAVAILABLE so the publisher resends the rest elsewhere.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures_util::{Stream, StreamExt, stream};
use tickshard_proto::v1 as pb;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::{
    committer::{Ack, AckError, AckTx, PublishCmd},
    domain::{ErrorCode, MAX_SYMBOL_LEN, validate_publisher_id},
    metrics as m,
    node::Node,
    wire,
};

pub type AckStream = Pin<Box<dyn Stream<Item = Result<pb::PublishAck, Status>> + Send>>;

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

pub fn reject(request_id: u64, symbol: &str, code: ErrorCode, message: String) -> pb::PublishAck {
    metrics::counter!(m::TICKS_REJECTED, "code" => code.as_str()).increment(1);
    pb::PublishAck {
        request_id,
        // Echoed for correlation, but never more than a symbol can be: a
        // rejected request may carry a megabyte in that field.
        symbol: symbol.chars().take(MAX_SYMBOL_LEN).collect(),
        seq: 0,
        epoch: String::new(),
        duplicate: false,
        error: Some(pb::Error {
            code: code.as_str().to_owned(),
            message,
        }),
    }
}

pub fn ack_to_pb(a: Ack) -> pb::PublishAck {
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
            let code = e.code();
            reject(a.request_id, a.symbol.as_str(), code, e.to_string())
        }
    }
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

/// Serves one publish stream until the client ends it, or the drain starts.
pub fn serve(
    node: Arc<Node>,
    mut inbound: Streaming<pb::PublishRequest>,
    window: usize,
    draining: CancellationToken,
    origin: Origin,
) -> AckStream {
    let (ack_tx, ack_rx) = AckTx::new();
    let (rej_tx, rej_rx) = tokio::sync::mpsc::unbounded_channel::<pb::PublishAck>();
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
                    _ = draining.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                // `Streaming::message` is cancel-safe: a message is never lost.
                let msg = tokio::select! {
                    _ = draining.cancelled() => break,
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
                        ErrorCode::InvalidRequest,
                        "request has no tick".into(),
                    ));
                    continue;
                };
                if let Err(e) = validate_publisher_id(&r.publisher_id) {
                    let _ = rej_tx.send(reject(r.request_id, &t.symbol, e.code(), e.to_string()));
                    continue;
                }
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
            if draining.is_cancelled() {
                drained.store(true, Ordering::Relaxed);
                // Requests the client has already sent each get an answer
                // (contract §7: `unavailable`, never silence), for a bounded
                // time; the stream then ends with UNAVAILABLE.
                let until = tokio::time::Instant::now() + DRAIN_READ;
                while let Ok(Ok(Some(r))) = tokio::time::timeout_at(until, inbound.message()).await {
                    let symbol = r.tick.as_ref().map_or("", |t| t.symbol.as_str());
                    let why = "server is draining: resend on another server".to_string();
                    let _ = rej_tx.send(reject(r.request_id, symbol, ErrorCode::Unavailable, why));
                }
            }
            // Dropping the senders ends the response stream once every
            // in-flight request has been acked.
        });
    }
    let acks = UnboundedReceiverStream::new(ack_rx)
        .flat_map(stream::iter)
        .map(ack_to_pb);
    let rejects = UnboundedReceiverStream::new(rej_rx);
    let out = stream::select(acks, rejects)
        .map(move |a| {
            permits.add_permits(1);
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
    Box::pin(out)
}
