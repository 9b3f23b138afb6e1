//! A gRPC publisher that loses nothing and duplicates nothing across failures.
//!
//! Every request gets a `publisher_seq` that increases per symbol. Requests stay
//! in `unacked` until their ack arrives; when the stream breaks, the publisher
//! reconnects (next endpoint, back-off with jitter) and resends all of them, in
//! order, with the same `publisher_seq`: the server acks already-stored ones as
//! `duplicate` instead of storing them twice. An ack with error `unavailable`
//! (the owner shard is down) is retried the same way, on a new stream after a
//! pause: the server refuses every later request of that `(publisher_id,
//! symbol)` on the old stream (contract §5), so that an in-order resend always
//! fills the hole.
//!
//! What no resend can fix is not retried for ever ([`is_final`]):
//! - a request over the server's size limit (it ends the stream
//!   OUT_OF_RANGE after answering everything before it) is answered here as
//!   rejected (`message_too_large`) and the rest goes on on a new stream; one
//!   over the contract's 4 MiB is refused by [`Publisher::send`] at once;
//! - a stream every endpoint refuses to open (no valid token, not entitled),
//!   or one the server ends as malformed, ends the call with
//!   [`ClientError::Refused`]. Unacked requests are kept; the next call
//!   tries again (after [`Publisher::set_token`], say).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use tickshard_proto::v1::{self as pb, feed_client::FeedClient};
use tokio::sync::mpsc;
use tonic::Streaming;

use super::{Backoff, ClientError};

#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// gRPC endpoints (`http://host:port`), tried in turn.
    pub endpoints: Vec<String>,
    /// Stable id of this publisher (de-dup key with the symbol).
    pub publisher_id: String,
    /// Unacked requests in flight before `send` waits.
    pub window: usize,
    pub connect_timeout: Duration,
    /// Give up after this long without an ack, or without a stream while
    /// reconnecting (0 = never).
    pub give_up_after: Duration,
    /// A bearer token sent with every stream (`authorization` metadata);
    /// set a fresh one before it expires: the next reconnect uses it.
    pub token: Option<String>,
    /// For `https://` endpoints: the CAs to trust.
    pub trust: Option<crate::tls::Trust>,
}

impl PublisherConfig {
    pub fn new(endpoints: Vec<String>, publisher_id: impl Into<String>) -> PublisherConfig {
        PublisherConfig {
            endpoints,
            publisher_id: publisher_id.into(),
            window: 4_096,
            connect_timeout: Duration::from_secs(2),
            give_up_after: Duration::ZERO,
            token: None,
            trust: None,
        }
    }
}

/// The final outcome of one published tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub request_id: u64,
    pub symbol: String,
    /// The tick's seq (0 for a duplicate whose original seq the server no longer knows).
    pub seq: u64,
    pub epoch: String,
    pub duplicate: bool,
    /// Set when the tick was rejected (`invalid_symbol`, `invalid_tick`).
    pub error: Option<(String, String)>,
    /// How many times the request was sent.
    pub attempts: u32,
}

struct Pending {
    req: pb::PublishRequest,
    attempts: u32,
    /// Its owner shard answered `unavailable`: it waits for the next stream
    /// and does not hold a window slot, so other shards' symbols keep flowing.
    parked: bool,
}

struct Stream {
    tx: mpsc::Sender<pb::PublishRequest>,
    acks: Streaming<pb::PublishAck>,
}

pub struct Publisher {
    cfg: PublisherConfig,
    /// When to move to a new stream because a request was acked `unavailable`
    /// (its owner is down): everything unacked is resent there, in order.
    new_stream_at: Option<tokio::time::Instant>,
    /// How many unacked requests are parked.
    parked: usize,
    next_endpoint: usize,
    next_request: u64,
    publisher_seqs: HashMap<String, u64>,
    unacked: BTreeMap<u64, Pending>,
    ready: VecDeque<Acked>,
    stream: Option<Stream>,
    backoff: Backoff,
    /// The last final ack, or the last request sent with nothing in flight.
    progress: tokio::time::Instant,
    /// When the current public call ([`Publisher::send`],
    /// [`Publisher::next_ack`]) began: `give_up_after` counts from the later
    /// of the two, so time the caller spends elsewhere (a paced replay)
    /// never counts.
    called: tokio::time::Instant,
    /// Reconnects so far (for reports and tests).
    pub reconnects: u64,
}

/// The contract's bound on one gRPC message (§5): a request over it is
/// refused by [`Publisher::send`] before it is queued.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

impl Publisher {
    /// Creates a publisher and opens its first stream.
    pub async fn connect(cfg: PublisherConfig) -> Result<Publisher, ClientError> {
        if cfg.endpoints.is_empty() {
            return Err(ClientError::BadAddress("no gRPC endpoint given".into()));
        }
        let mut p = Publisher {
            new_stream_at: None,
            parked: 0,
            next_endpoint: fastrand::usize(..cfg.endpoints.len()),
            cfg,
            next_request: 1,
            publisher_seqs: HashMap::new(),
            unacked: BTreeMap::new(),
            ready: VecDeque::new(),
            stream: None,
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(250)),
            progress: tokio::time::Instant::now(),
            called: tokio::time::Instant::now(),
            reconnects: 0,
        };
        // Every endpoint once (from a random one) before giving up.
        let mut last = None;
        for _ in 0..p.cfg.endpoints.len() {
            match p.open().await {
                Ok(s) => {
                    p.stream = Some(s);
                    return Ok(p);
                }
                Err(e) => {
                    tracing::info!(error = %e, "cannot open a publish stream; trying the next endpoint");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::BadAddress("no gRPC endpoint given".into())))
    }

    /// Starts from endpoint `index` (tests use it to pick a pod).
    pub fn set_next_endpoint(&mut self, index: usize) {
        self.next_endpoint = index;
    }

    async fn open(&mut self) -> Result<Stream, ClientError> {
        let url = self.cfg.endpoints[self.next_endpoint % self.cfg.endpoints.len()].clone();
        self.next_endpoint = self.next_endpoint.wrapping_add(1);
        let ep = crate::tls::endpoint(&url, self.cfg.trust.as_ref())?
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true);
        let channel = ep.connect().await.map_err(|e| ClientError::Connect {
            addr: url.clone(),
            message: e.to_string(),
        })?;
        let mut client = FeedClient::new(channel);
        let (tx, rx) = mpsc::channel(self.cfg.window.max(16));
        let mut out = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(t) = &self.cfg.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Input("the token is not valid header text".into()))?;
            out.metadata_mut().insert("authorization", v);
        }
        let acks = client
            .publish(out)
            .await
            .map_err(|e| {
                if is_final(e.code(), true) {
                    ClientError::Refused(format!("{url}: {e}"))
                } else {
                    ClientError::Grpc(format!("{url}: {e}"))
                }
            })?
            .into_inner();
        Ok(Stream { tx, acks })
    }

    /// Publishes one tick: returns its request id once it is sent (waiting for
    /// acks while the window is full). Its outcome comes from [`Self::next_ack`].
    /// Cancel-safe: the tick is queued, and sent, only once the stream has
    /// room for it, without waiting after that. An error means the tick was
    /// not queued (a request over [`MAX_REQUEST_BYTES`], or no stream could
    /// be had): sending it again sends it once.
    pub async fn send(&mut self, tick: pb::Tick) -> Result<u64, ClientError> {
        self.called = tokio::time::Instant::now();
        use prost::Message as _;
        // (the request's other fields: ids, publisher_seq, the 5-byte prefix)
        let bytes = tick.encoded_len() + self.cfg.publisher_id.len() + 64;
        if bytes > MAX_REQUEST_BYTES {
            return Err(ClientError::Input(format!(
                "a tick of {bytes} bytes is over the {MAX_REQUEST_BYTES}-byte request bound"
            )));
        }
        // Parked requests (owner down) do not count against the window, up to
        // a hard cap on everything unacked.
        while self.unacked.len() - self.parked >= self.cfg.window || self.unacked.len() >= 4 * self.cfg.window {
            self.pump().await?;
        }
        // No stream (it broke earlier): reconnect first, which resends what
        // is unacked; waiting here is the publisher's backpressure while no
        // server takes its requests, and a failure leaves this tick unqueued.
        // Then room on the stream, before anything is queued.
        let permit = loop {
            if self.stream.is_none() {
                self.reconnect().await?;
            }
            let Some(tx) = self.stream.as_ref().map(|s| s.tx.clone()) else {
                continue;
            };
            match tx.reserve_owned().await {
                Ok(permit) => break permit,
                // The stream broke: a new one (which resends what is unacked).
                Err(_) => self.stream = None,
            }
        };
        if self.unacked.is_empty() {
            self.progress = tokio::time::Instant::now();
        }
        let seq = self.publisher_seqs.entry(tick.symbol.to_ascii_uppercase()).or_insert(0);
        *seq += 1;
        let request_id = self.next_request;
        self.next_request += 1;
        let req = pb::PublishRequest {
            request_id,
            publisher_id: self.cfg.publisher_id.clone(),
            publisher_seq: *seq,
            tick: Some(tick),
        };
        self.unacked.insert(
            request_id,
            Pending {
                req: req.clone(),
                attempts: 1,
                parked: false,
            },
        );
        permit.send(req);
        Ok(request_id)
    }

    /// The next final ack (accepted, duplicate or rejected), reconnecting and
    /// resending as needed. `None` when nothing is outstanding.
    pub async fn next_ack(&mut self) -> Result<Option<Acked>, ClientError> {
        self.called = tokio::time::Instant::now();
        loop {
            if let Some(a) = self.ready.pop_front() {
                return Ok(Some(a));
            }
            if self.unacked.is_empty() {
                return Ok(None);
            }
            self.pump().await?;
        }
    }

    /// An ack that already arrived, without waiting.
    pub fn try_ack(&mut self) -> Option<Acked> {
        self.ready.pop_front()
    }

    /// Waits for every outstanding request; returns their outcomes.
    pub async fn flush(&mut self) -> Result<Vec<Acked>, ClientError> {
        let mut out = Vec::new();
        while let Some(a) = self.next_ack().await? {
            out.push(a);
        }
        Ok(out)
    }

    /// (symbol, attempts) of the first few unacked requests, for diagnostics.
    pub fn unacked_summary(&self) -> Vec<(String, u32)> {
        self.unacked
            .values()
            .take(8)
            .map(|p| {
                (
                    p.req.tick.as_ref().map(|t| t.symbol.clone()).unwrap_or_default(),
                    p.attempts,
                )
            })
            .collect()
    }

    /// The token for the next (re)connection: set a fresh one before the
    /// current one expires (a stream whose token lapses ends UNAUTHENTICATED;
    /// the reconnect resends everything unacked, so nothing is lost).
    pub fn set_token(&mut self, token: Option<String>) {
        self.cfg.token = token;
    }

    /// Requests sent and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// Reads one ack from the stream, or repairs the stream: a broken one, or
    /// one that refused a request as `unavailable` once its pause is over.
    /// Cancel-safe: a request is only ever dropped from `unacked` by its final
    /// ack, and every reconnect resends all of them.
    async fn pump(&mut self) -> Result<(), ClientError> {
        let now = tokio::time::Instant::now();
        if self.new_stream_at.is_some_and(|at| at <= now) {
            self.stream = None;
        }
        let Some(s) = self.stream.as_mut() else {
            return self.reconnect().await;
        };
        let give_up =
            (!self.cfg.give_up_after.is_zero()).then(|| self.progress.max(self.called) + self.cfg.give_up_after);
        let new_stream_at = self.new_stream_at;
        let msg = tokio::select! {
            // (an ack that is there is taken before any timer)
            biased;
            m = s.acks.message() => m,
            _ = tokio::time::sleep_until(new_stream_at.unwrap_or(now)), if new_stream_at.is_some() => return Ok(()),
            _ = tokio::time::sleep_until(give_up.unwrap_or(now)), if give_up.is_some() => {
                return Err(ClientError::Timeout("no ack"));
            }
        };
        match msg {
            Ok(Some(ack)) => {
                self.on_ack(ack).await;
                Ok(())
            }
            Err(e) if e.code() == tonic::Code::OutOfRange && self.reject_first_sent(&e) => {
                // (answered as rejected; the rest goes on on a new stream)
                self.stream = None;
                Ok(())
            }
            Err(e) if is_final(e.code(), false) => {
                self.stream = None;
                Err(ClientError::Refused(format!(
                    "the server ended the publish stream: {e}"
                )))
            }
            Ok(None) | Err(_) => {
                if let Err(e) = &msg {
                    tracing::info!(status = %e, "publish stream ended; reconnecting");
                }
                self.stream = None;
                self.reconnect().await
            }
        }
    }

    async fn on_ack(&mut self, ack: pb::PublishAck) {
        let retry = ack.error.as_ref().is_some_and(|e| e.code == "unavailable");
        if retry {
            // The owner is down: a new stream, after a pause, with everything
            // unacked in order (this stream refuses the pair from now on).
            if let Some(p) = self.unacked.get_mut(&ack.request_id) {
                if !p.parked {
                    p.parked = true;
                    self.parked += 1;
                }
                // (the reconnect itself pauses, with back-off)
                self.new_stream_at.get_or_insert_with(tokio::time::Instant::now);
            }
            return;
        }
        self.backoff.reset();
        self.progress = tokio::time::Instant::now();
        if let Some(p) = self.unacked.remove(&ack.request_id) {
            if p.parked {
                self.parked -= 1;
            }
            self.ready.push_back(Acked {
                request_id: ack.request_id,
                symbol: ack.symbol,
                seq: ack.seq,
                epoch: ack.epoch,
                duplicate: ack.duplicate,
                error: ack.error.map(|e| (e.code, e.message)),
                attempts: p.attempts,
            });
        }
    }

    /// The server ended the stream OUT_OF_RANGE: a request was over its size
    /// limit. It answered every request before it first (contract §5), and
    /// this publisher sends in request order, so the culprit is the first
    /// unacked request that is not parked; it is answered here as rejected,
    /// and the rest is resent. Only if that request is indeed over the limit
    /// the status names: otherwise (or if the status names none) false, and
    /// the status is final.
    fn reject_first_sent(&mut self, status: &tonic::Status) -> bool {
        use prost::Message as _;
        let Some(limit) = limit_in(status.message()) else {
            return false;
        };
        let Some((&id, _)) = self
            .unacked
            .iter()
            .find(|(_, p)| !p.parked)
            .filter(|(_, p)| p.req.encoded_len() > limit)
        else {
            return false;
        };
        let Some(p) = self.unacked.remove(&id) else {
            return false;
        };
        self.progress = tokio::time::Instant::now();
        self.ready.push_back(Acked {
            request_id: id,
            symbol: p.req.tick.as_ref().map(|t| t.symbol.clone()).unwrap_or_default(),
            seq: 0,
            epoch: String::new(),
            duplicate: false,
            error: Some(("message_too_large".into(), status.message().to_owned())),
            attempts: p.attempts,
        });
        true
    }

    /// Opens a new stream (next endpoint) and resends everything unacked, in
    /// order, with the same `publisher_seq`.
    async fn reconnect(&mut self) -> Result<(), ClientError> {
        let started = tokio::time::Instant::now();
        let mut failures = 0u32;
        // Refusals in a row: final once every endpoint has refused (one
        // misconfigured address in the list does not stop the others).
        let mut refusals = 0usize;
        loop {
            tokio::time::sleep(self.backoff.next_delay()).await;
            match self.open().await {
                Ok(s) => {
                    refusals = 0;
                    self.reconnects += 1;
                    self.new_stream_at = None; // everything unacked is resent below
                    self.parked = 0;
                    let mut broke = false;
                    for p in self.unacked.values_mut() {
                        p.parked = false;
                        p.attempts += 1;
                        if s.tx.send(p.req.clone()).await.is_err() {
                            broke = true;
                            break;
                        }
                    }
                    if !broke {
                        self.stream = Some(s);
                        return Ok(());
                    }
                }
                // (the token is not header text: no endpoint takes it)
                Err(e @ ClientError::Input(_)) => return Err(e),
                Err(e @ ClientError::Refused(_)) => {
                    refusals += 1;
                    if refusals >= self.cfg.endpoints.len() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "an endpoint refused the publish stream; trying the next");
                }
                Err(e) => {
                    refusals = 0;
                    failures += 1;
                    // (the first failure and then ever fewer: 1, 2, 4, 8, …)
                    if failures.is_power_of_two() {
                        tracing::warn!(error = %e, failures, "cannot open a publish stream; retrying");
                    }
                }
            }
            if !self.cfg.give_up_after.is_zero() && started.elapsed() >= self.cfg.give_up_after {
                return Err(ClientError::Timeout("no server took a publish stream"));
            }
        }
    }
}

/// The size limit an OUT_OF_RANGE status of tonic's decoder names ("…, the
/// limit is: 192000 bytes").
fn limit_in(message: &str) -> Option<usize> {
    let (_, rest) = message.split_once("the limit is: ")?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())];
    digits.parse().ok()
}

/// True for a status that no resend of the same requests can fix.
/// `UNAUTHENTICATED` counts only when a stream is opened: one that ends a
/// running stream means its token lapsed, and the reconnect (with the token
/// [`Publisher::set_token`] set meanwhile) decides.
fn is_final(code: tonic::Code, opening: bool) -> bool {
    use tonic::Code;
    match code {
        Code::PermissionDenied | Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented => true,
        Code::Unauthenticated => opening,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::limit_in;

    #[test]
    fn the_limit_is_read_from_tonics_message() {
        let m = "Error, decoded message length too large: found 5242917 bytes, the limit is: 192000 bytes";
        assert_eq!(limit_in(m), Some(192_000));
        assert_eq!(limit_in("the limit is: 7"), Some(7));
        assert_eq!(limit_in("no limit here"), None);
        assert_eq!(limit_in("the limit is: bytes"), None);
        assert_eq!(limit_in("the limit is: 99999999999999999999999 bytes"), None);
    }
}
