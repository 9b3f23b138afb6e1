//! WebSocket protocol v1 (contract §4) over fastwebsockets.
//!
//! One task per connection runs three futures: the *reader* (frames → requests;
//! never inside a `select!` that could cancel `read_frame` and then read again;
//! it holds a read buffer only while client frames are arriving, `client_read`),
//! the *writer* (drains the connection's [`Outbox`] and writes everything queued
//! with one flush through a buffer that grows on demand, `FrameWriter`), and
//! a *housekeeping* tick (server pings, idle timeout, slow-client close, close
//! deadline). Tick frames are encoded once
//! per chunk and shared by every connection ([`json::encode_ticks`]).

pub(crate) mod client_read;
mod frame_writer;
pub mod json;
pub mod protocol;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocket, WebSocketError};
use futures_util::future::Either;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper_util::rt::TokioIo;
use simd_json::Buffers;
use tickshard_shard::{
    domain::{ErrorCode, Symbol},
    hub::{AfterWrite, Channel, Close, Data, Format, Msg, Outbox},
    metrics as m,
    node::{SubRequest, SubResult},
    session::{self, Session, SessionGuard},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWrite},
    time::Instant,
};
use tracing::Instrument as _;

use self::{
    client_read::{ClientRead, ReadSide, Tracked},
    frame_writer::FrameWriter,
};
use crate::{
    auth::{Denied, Principal},
    http::ClientStream,
    shared::Shared,
};
use tokio_util::either::Either as EitherIo;

/// Size of the per-connection write buffer: frames are copied into it and
/// written with one syscall per drain.
const WRITE_BUFFER: usize = 64 * 1024;
/// How long a requested close may take before the connection is dropped (a
/// client that stopped reading never takes the close frame).
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a closed connection keeps reading (and discarding) what the
/// client still sends, waiting for its close or end of stream.
const LINGER: Duration = Duration::from_secs(2);

/// Protocol-specific items of a WebSocket outbox.
pub enum Ctl {
    /// A pre-encoded JSON text message (replies, errors).
    Text(Vec<u8>),
    Ping,
    Pong(Vec<u8>),
}

type WsOutbox = Outbox<Ctl>;

/// Takes over an upgraded HTTP connection: the future that serves it until it
/// closes. Set up here, outside the future, so that the connection's
/// long-lived task holds only what it needs (no copy of the set-up state).
pub fn serve(
    upgraded: hyper::upgrade::Upgraded,
    shared: Arc<Shared>,
    peer: SocketAddr,
    principal: Principal,
) -> impl Future<Output = ()> + Send {
    // Take the TCP stream back from hyper so the halves are split without a lock.
    let parts = match upgraded.downcast::<TokioIo<crate::http::Tracked>>() {
        Ok(p) => p,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return Either::Right(std::future::ready(()));
        }
    };
    // Bytes the client sent after the upgrade request, if any. Copied out, so
    // hyper's whole 8 KiB read buffer is not kept alive for the connection's life.
    let early = bytes::Bytes::copy_from_slice(&parts.read_buf);
    drop(parts.read_buf);
    let sent: Arc<Sent> = Arc::default();
    let mut direct = None;
    let (rx, w) = match parts.io.into_inner().into_inner() {
        ClientStream::Plain(stream) => {
            let _ = stream.set_nodelay(true);
            let (r, w) = stream.into_split();
            let w = Arc::new(w);
            if shared.ws.direct_write_bytes > 0 {
                direct = Some(Arc::new(Direct {
                    socket: w.clone(),
                    sent: sent.clone(),
                    rest: Mutex::new((Vec::new(), 0)),
                }));
            }
            (
                ClientRead::new(early, ReadSide::Tcp(r)),
                EitherIo::Left(frame_writer::SharedTcp(w)),
            )
        }
        ClientStream::Tls(stream) => {
            let _ = stream.get_ref().0.set_nodelay(true);
            let (r, w) = tokio::io::split(*stream);
            (ClientRead::new(early, ReadSide::Tls(r)), EitherIo::Right(w))
        }
    };
    // The reader builds its fastwebsockets reader (and buffer) when data
    // arrives (`client_read`).
    let tx = FrameWriter::new(WRITE_BUFFER, w);
    let conn = Connection::new(shared, principal, sent, direct.as_ref());
    let span = tracing::debug_span!("ws", %peer, conn = conn.outbox.id());
    Either::Left(conn.run(rx, tx, direct).instrument(span))
}

/// The fan-out's direct writes to a plain TCP connection
/// ([`tickshard_shard::hub::Outbox::write_or_wake`]): when the writer task
/// is idle, the waker thread formats the queued tick frames and writes them
/// with `try_write`, and the task is not woken at all.
struct Direct {
    socket: Arc<tokio::net::tcp::OwnedWriteHalf>,
    /// The connection's sent counters.
    sent: Arc<Sent>,
    /// What the socket did not take, and its queue weight: the writer task
    /// writes it before anything else (the outbox sees to that).
    rest: Mutex<(Vec<u8>, usize)>,
}

/// A connection's counts since the housekeeping tick last reported them, in
/// the order of `Shared::ws_sent`: messages, bytes, direct writes whole and
/// partial.
type Sent = [AtomicU64; 4];
const MSGS: usize = 0;
const BYTES: usize = 1;
const DIRECT_WHOLE: usize = 2;
const DIRECT_PARTIAL: usize = 3;

/// Largest scratch buffer a waker thread keeps between direct writes.
const DIRECT_SCRATCH: usize = 64 << 10;

impl tickshard_shard::hub::DirectWrite<Ctl> for Direct {
    fn write(&self, q: &VecDeque<Msg<Ctl>>, weight: usize) -> bool {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            let (mut msgs, mut bytes) = (0u64, 0u64);
            for m in q {
                if let Msg::Data(Data::Ticks { chunk, from }) = m {
                    let enc = chunk.encoded(Format::Json, json::encode_ticks);
                    for f in enc.frames_from(*from) {
                        msgs += 1;
                        bytes += f.len() as u64;
                        frame_writer::put_text(buf, f);
                    }
                }
            }
            let (mut done, mut broken) = (0, false);
            while done < buf.len() {
                match self.socket.try_write(&buf[done..]) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // a broken connection: the writer task meets the error
                    // itself (on the rest) and ends; nothing counted as sent
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            let complete = done == buf.len();
            if !broken {
                // (the outcome before the messages, which `report_sent` reads
                // first: a report that has a write's messages has its outcome)
                self.sent[if complete { DIRECT_WHOLE } else { DIRECT_PARTIAL }].fetch_add(1, Ordering::Relaxed);
                self.sent[BYTES].fetch_add(bytes, Ordering::Relaxed);
                self.sent[MSGS].fetch_add(msgs, Ordering::Release);
            }
            if !complete {
                *self.rest.lock().unwrap_or_else(|p| p.into_inner()) = (buf[done..].to_vec(), weight);
            }
            if buf.capacity() > DIRECT_SCRATCH {
                *buf = Vec::new();
            }
            complete
        })
    }
}

/// While alive, the connection's reader is held up by the server
/// ([`Connection::hold`]).
struct Held<'a>(&'a AtomicBool);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

struct Connection {
    shared: Arc<Shared>,
    outbox: Arc<WsOutbox>,
    /// The subscriptions (and their deferred retries) of this connection.
    session: SessionGuard<Ctl>,
    started: Instant,
    /// Milliseconds since `started` of the last frame from the client (or,
    /// while `held`, of the last write it took).
    last_seen: AtomicU64,
    /// The reader is held up by the server: it is handling a request (a
    /// subscribe's replay can take long) or waiting for the client to take
    /// its queue. The client cannot show it is alive with a frame then, so
    /// what it takes counts instead (a client that takes nothing is still
    /// closed as idle).
    held: AtomicBool,
    /// Messages and bytes written since the housekeeping tick last added
    /// them to the process-wide counters (two shared counters bumped by
    /// every writer on every flush cost more than the write at low rates);
    /// shared with the connection's `Direct`.
    sent: Arc<Sent>,
    /// Who the client is and what it may do: from the upgrade's token (or
    /// the anonymous grant), replaced by an `auth` op.
    principal: Mutex<Arc<Principal>>,
}

/// A connection that may not read must authenticate within this long (1008).
pub const AUTH_DEADLINE: Duration = Duration::from_secs(10);

impl Connection {
    fn principal(&self) -> Arc<Principal> {
        self.principal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Housekeeping of credentials: a connection that may not read and has
    /// not authenticated in [`AUTH_DEADLINE`], or whose token lapsed, is told
    /// why and closed with 1008.
    fn check_credentials(&self, now: Instant) {
        if self.outbox.is_closing() {
            return;
        }
        let p = self.principal();
        let (code, close, message) = if let Some(at) = p.lapses_at()
            && crate::auth::now_secs() >= at
        {
            (
                ErrorCode::TokenExpired,
                Close::TokenExpired,
                "the token expired; refresh it with the auth op before it does",
            )
        } else if !p.is_authenticated() && !p.may_read() && now.duration_since(self.started) >= AUTH_DEADLINE {
            (
                ErrorCode::Unauthorized,
                Close::Unauthenticated,
                "no valid token within 10 s of connecting",
            )
        } else {
            return;
        };
        metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
        let mut out = Vec::new();
        json::error(&mut out, None, code.as_str(), message);
        let w = out.len();
        self.outbox.control(Ctl::Text(out), w);
        self.outbox.close(close);
    }

    /// Counts messages and bytes written (reported by [`report_sent`](Self::report_sent)).
    fn count_sent(&self, msgs: u64, bytes: u64) {
        self.sent[MSGS].fetch_add(msgs, Ordering::Relaxed);
        self.sent[BYTES].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds what was written since the last call to the metrics; true if
    /// anything was. The messages are read first and reach the metrics
    /// last, so that whoever sees a direct write's messages counted sees its
    /// outcome too.
    fn report_sent(&self) -> bool {
        let msgs = self.sent[MSGS].swap(0, Ordering::Acquire);
        if msgs == 0 {
            return false;
        }
        for i in [DIRECT_PARTIAL, DIRECT_WHOLE, BYTES] {
            let n = self.sent[i].swap(0, Ordering::Relaxed);
            if n > 0 {
                self.shared.ws_sent[i].increment(n);
            }
        }
        self.shared.ws_sent[MSGS].increment(msgs);
        true
    }

    /// The client showed it is alive now (see `last_seen`).
    fn seen(&self) {
        self.last_seen
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks the reader held up by the server until the guard is dropped.
    fn hold(&self) -> Held<'_> {
        self.held.store(true, Ordering::Relaxed);
        Held(&self.held)
    }

    fn new(shared: Arc<Shared>, principal: Principal, sent: Arc<Sent>, direct: Option<&Arc<Direct>>) -> Connection {
        let outbox: Arc<WsOutbox> = shared.node.outbox(shared.ws.slow_client);
        if let Some(d) = direct {
            outbox.set_direct(d.clone(), shared.ws.direct_write_bytes);
        }
        let session = SessionGuard::new(Session::new(shared.node.clone(), outbox.clone()));
        Connection {
            shared,
            outbox,
            session,
            started: Instant::now(),
            last_seen: AtomicU64::new(0),
            held: AtomicBool::new(false),
            sent,
            principal: Mutex::new(Arc::new(principal)),
        }
    }

    /// `direct`: the fan-out's direct writes to this connection (plain TCP
    /// only), which the writer task holds while it runs.
    async fn run<W>(self, rx: ClientRead, tx: FrameWriter<W>, direct: Option<Arc<Direct>>)
    where
        W: AsyncWrite + Unpin,
    {
        let entered = self.shared.enter("ws", self.outbox.clone());
        tracing::debug!("connected");

        let mut reader = Box::pin(self.read_loop(rx));
        let mut writer = Box::pin(self.write_loop(tx, direct));
        let house = self
            .shared
            .ws
            .ping_interval
            .min(Duration::from_secs(1))
            .min(self.shared.ws.slow_client / 4)
            .max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(house);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_ping = Instant::now() + self.shared.ws.ping_interval;
        let mut close_deadline: Option<Instant> = None;
        let mut reader_done = false;
        // False when the connection is dropped for not taking its close frame.
        let mut linger = true;
        loop {
            tokio::select! {
                () = &mut writer => break,
                () = &mut reader, if !reader_done => {
                    reader_done = true;
                    // The client went away or broke the protocol: make sure the
                    // writer ends too (it writes a close frame if it still can).
                    self.outbox.close(Close::Normal);
                }
                _ = tick.tick() => {
                    let wrote = self.report_sent();
                    if wrote && self.held.load(Ordering::Relaxed) {
                        self.seen();
                    }
                    let now = Instant::now();
                    let seen = self.started + Duration::from_millis(self.last_seen.load(Ordering::Relaxed));
                    if now.duration_since(seen) >= self.shared.ws.idle_timeout {
                        tracing::debug!("idle timeout");
                        self.outbox.close(Close::Idle);
                    }
                    self.outbox.check_slow();
                    self.check_credentials(now);
                    if now >= next_ping {
                        next_ping = now + self.shared.ws.ping_interval;
                        self.outbox.control(Ctl::Ping, 16);
                    }
                    if self.outbox.is_closing() {
                        let d = *close_deadline.get_or_insert(now + CLOSE_GRACE);
                        if now >= d {
                            tracing::debug!("close not delivered in time; dropping the connection");
                            linger = false;
                            break;
                        }
                    }
                }
            }
        }
        // Lingering close: our close frame is out and the write side shut
        // down; give the reader a bounded time to see the client's close or
        // end of stream, so that the socket is not closed with unread bytes
        // (which makes the kernel send a reset instead of our close).
        if linger && !reader_done {
            let _ = tokio::time::timeout(LINGER, &mut reader).await;
        }
        self.report_sent();
        self.session.end();
        drop(entered);
        tracing::debug!("disconnected");
    }

    async fn write_loop<W: AsyncWrite + Unpin>(&self, tx: FrameWriter<W>, direct: Option<Arc<Direct>>) {
        self.write_frames(tx, direct.as_deref()).await;
        // The write half shuts (FIN) when its last handle goes: `tx`'s is
        // gone, this one and the outbox's go now, not at the connection's end
        // (a client waiting for the FIN after a close would wait the linger).
        self.outbox.end_direct();
    }

    async fn write_frames<W: AsyncWrite + Unpin>(&self, mut tx: FrameWriter<W>, direct: Option<&Direct>) {
        let mut q = VecDeque::new();
        // Grown on first use: an idle connection never needs it.
        let mut buf = Vec::new();
        loop {
            let close = self.outbox.take(&mut q).await;
            let (mut weight, mut msgs, mut bytes) = (0usize, 0u64, 0u64);
            if let Some(d) = direct {
                // What the socket did not take of a direct write goes first.
                let (rest, w) = std::mem::take(&mut *d.rest.lock().unwrap_or_else(|p| p.into_inner()));
                if !rest.is_empty() {
                    tx.raw(&rest);
                    weight += w;
                }
            }
            for msg in q.drain(..) {
                weight += msg.weight();
                let (opcode, payload): (OpCode, &[u8]) = match &msg {
                    Msg::Data(d) => {
                        buf.clear();
                        let frame: &[u8] = match d {
                            Data::Ticks { chunk, from } => {
                                let enc = chunk.encoded(Format::Json, json::encode_ticks);
                                for f in enc.frames_from(*from) {
                                    msgs += 1;
                                    bytes += f.len() as u64;
                                    if !tx.fits(f.len())
                                        && let Err(e) = tx.drain().await
                                    {
                                        tracing::debug!(error = %e, "write failed");
                                        return;
                                    }
                                    tx.frame(OpCode::Text, f);
                                }
                                continue;
                            }
                            // (encoded once per event, shared like a chunk's frames)
                            Data::Candle(c) => {
                                c.encoded(Format::Json, |candle, closed, out| json::candle(out, candle, closed))
                            }
                            Data::Snapshot(s) => {
                                json::snapshot(&mut buf, &s.epoch, &s.tick, s.conflated);
                                &buf
                            }
                            Data::Unavailable(sym) => {
                                json::unavailable(
                                    &mut buf,
                                    None,
                                    sym,
                                    "the shard that owns this symbol is unavailable; data resumes without a gap when it is back",
                                );
                                &buf
                            }
                        };
                        msgs += 1;
                        bytes += frame.len() as u64;
                        (OpCode::Text, frame)
                    }
                    Msg::Control(Ctl::Text(t), _) => {
                        msgs += 1;
                        bytes += t.len() as u64;
                        (OpCode::Text, t)
                    }
                    Msg::Control(Ctl::Ping, _) => (OpCode::Ping, &[]),
                    Msg::Control(Ctl::Pong(p), _) => (OpCode::Pong, p),
                };
                if !tx.fits(payload.len())
                    && let Err(e) = tx.drain().await
                {
                    tracing::debug!(error = %e, "write failed");
                    return;
                }
                tx.frame(opcode, payload);
            }
            if let Some(c) = close {
                let (code, reason) = close_frame(c);
                tx.close(code, reason.as_bytes());
                if tx.flush().await.is_ok() {
                    self.count_sent(msgs, bytes);
                }
                return;
            }
            if let Err(e) = tx.flush().await {
                tracing::debug!(error = %e, "flush failed");
                return;
            }
            self.count_sent(msgs, bytes);
            if let AfterWrite::Repair(stalled) = self.outbox.written(weight) {
                self.shared.node.hub().repair(self.outbox.id(), &stalled);
            }
        }
    }

    /// Reads client frames. The fastwebsockets reader (and its 8 KiB buffer)
    /// exists only while frames are arriving: it is built when the socket is
    /// readable and dropped when the frame tracker proves its buffer empty
    /// (`client_read`).
    async fn read_loop(&self, rx: ClientRead) {
        let limits = &self.shared.ws;
        let mut state = Reader {
            conn: self,
            limiter: RateLimiter::direct(Quota::per_second(limits.max_client_rate).allow_burst(limits.client_burst)),
            flood: Flood::new(limits.max_client_rate.get().saturating_mul(10)),
            buffers: None,
        };
        // A fragmented message being assembled: (binary, bytes so far).
        let mut assembly: Option<(bool, Vec<u8>)> = None;
        let boundary = AtomicU64::new(0);
        let mut frames_read = 0u64;
        let mut idle = Some(rx);
        // Boxed, like the read future below: both exist only while frames
        // arrive (with the reader's 8 KiB buffer), and inline they would be
        // ~600 bytes of every idle connection's future.
        let mut active: Option<Box<WebSocket<Tracked<'_>>>> = None;
        let end = 'read: loop {
            // Back-pressure: a client that does not read what it asked for
            // (its unsent bytes past its queue's limit) is not read either
            // until it has caught up to half of it. TCP then pushes back on
            // it, and its requests (each queues a reply, a pong or
            // snapshots, which the limit does not refuse) cannot pile up
            // here: a connection's queue stays within its limit plus one
            // message's replies.
            if self.outbox.over_limit() {
                let _held = self.hold();
                self.outbox.room().await;
            }
            let reader = match (&mut active, idle.take()) {
                (Some(ws), _) => ws,
                (None, Some(raw)) => {
                    if let Err(e) = raw.readable().await {
                        tracing::debug!(error = %e, "read ended");
                        break 'read ReadEnd::Gone;
                    }
                    let mut ws = WebSocket::after_handshake(Tracked::new(raw, frames_read, &boundary), Role::Server);
                    ws.set_auto_close(false);
                    ws.set_auto_pong(false);
                    ws.set_max_message_size(limits.max_message_bytes + 1);
                    active.insert(Box::new(ws))
                }
                (None, None) => break 'read ReadEnd::Gone,
            };
            let frame = match Box::pin(reader.read_frame()).await {
                Ok(f) => f,
                Err(WebSocketError::FrameTooLarge) => {
                    state.too_large();
                    break 'read ReadEnd::Stopped;
                }
                Err(e) => match violation(&e) {
                    Some(close) => {
                        tracing::debug!(error = %e, code = close_frame(close).0, "protocol violation");
                        self.outbox.close(close);
                        break 'read ReadEnd::Stopped;
                    }
                    None => {
                        tracing::debug!(error = %e, "read ended");
                        break 'read ReadEnd::Gone;
                    }
                },
            };
            frames_read += 1;
            // Everything the reader buffered has been returned: let its buffer go.
            if boundary.load(Ordering::Relaxed) == frames_read
                && let Some(ws) = active.take()
            {
                idle = Some(ws.into_inner().into_inner());
            }
            self.seen();
            match frame.opcode {
                OpCode::Text | OpCode::Binary if frame.fin && assembly.is_none() => {
                    let binary = frame.opcode == OpCode::Binary;
                    let mut payload = frame.payload;
                    // Boxed: handling a message (subscribe: prepare, replay)
                    // is a large future, and inline it would make every
                    // connection's task ~3 KiB bigger for its whole life.
                    // One allocation per client message, never per tick.
                    let _held = self.hold();
                    if !Box::pin(state.message(payload.to_mut(), binary)).await {
                        break 'read ReadEnd::Stopped;
                    }
                }
                OpCode::Text | OpCode::Binary if assembly.is_some() => {
                    tracing::debug!("new message before the last fragment");
                    self.outbox.close(Close::Protocol);
                    break 'read ReadEnd::Stopped;
                }
                OpCode::Text | OpCode::Binary => {
                    assembly = Some((frame.opcode == OpCode::Binary, frame.payload.to_vec()));
                }
                OpCode::Continuation => {
                    let Some((_, a)) = assembly.as_mut() else {
                        tracing::debug!("continuation frame without a first frame");
                        self.outbox.close(Close::Protocol);
                        break 'read ReadEnd::Stopped;
                    };
                    if a.len() + frame.payload.len() > limits.max_message_bytes {
                        state.too_large();
                        break 'read ReadEnd::Stopped;
                    }
                    a.extend_from_slice(&frame.payload);
                    if frame.fin
                        && let Some((binary, mut msg)) = assembly.take()
                    {
                        // fastwebsockets checks single-frame text messages;
                        // a fragmented one is checked whole (contract §4: 1007).
                        if !binary && std::str::from_utf8(&msg).is_err() {
                            self.outbox.close(Close::InvalidData);
                            break 'read ReadEnd::Stopped;
                        }
                        let _held = self.hold();
                        if !Box::pin(state.message(&mut msg, binary)).await {
                            // boxed: see above
                            break 'read ReadEnd::Stopped;
                        }
                    }
                }
                // Control frames carry at most 125 bytes (RFC 6455 §5.5);
                // fastwebsockets checks pings only.
                OpCode::Pong | OpCode::Close
                    if frame.payload.len() > 125 || frame.payload.len() == 1 && frame.opcode == OpCode::Close =>
                {
                    tracing::debug!(len = frame.payload.len(), "malformed control frame");
                    self.outbox.close(Close::Protocol);
                    break 'read ReadEnd::Stopped;
                }
                OpCode::Ping => {
                    let w = 16 + frame.payload.len();
                    self.outbox.control(Ctl::Pong(frame.payload.to_vec()), w);
                }
                OpCode::Pong => {}
                // A close code one may not send or a reason that is not
                // UTF-8 is a protocol violation (RFC 6455 §7.4, contract
                // §4: 1002).
                OpCode::Close if !protocol::close_payload_is_valid(&frame.payload) => {
                    tracing::debug!("malformed close frame");
                    self.outbox.close(Close::Protocol);
                    break 'read ReadEnd::Stopped;
                }
                OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map_or(1000, |b| u16::from_be_bytes([b[0], b[1]]));
                    tracing::debug!(code, "client closed");
                    self.outbox.close(Close::Normal);
                    break 'read ReadEnd::Gone;
                }
            }
        };
        if let ReadEnd::Stopped = end {
            // Lingering close: this side asked to close, but the client may
            // still be sending. Read and discard until it closes (bounded by
            // `run`'s linger), so that closing a socket with unread bytes does
            // not make the kernel answer with a reset, which can destroy our
            // close frame before the client reads it.
            let stream = match active.take() {
                Some(ws) => Some(ws.into_inner().into_inner()),
                None => idle.take(),
            };
            if let Some(mut s) = stream {
                // On the heap: an array here would be part of every
                // connection's future for its whole life.
                let mut scratch = vec![0u8; 512];
                while let Ok(n) = s.read(&mut scratch).await
                    && n > 0
                {}
            }
        }
    }
}

/// The WebSocket close code and reason of a close (contract §4: 1012/1013
/// say "come back and resume", 1008/1009 "fix the client first").
pub(crate) fn close_frame(c: Close) -> (u16, &'static str) {
    match c {
        Close::Normal => (1000, ""),
        Close::Idle => (1001, "idle timeout"),
        Close::Protocol => (1002, "protocol error"),
        Close::InvalidData => (1007, "text message is not UTF-8"),
        Close::Flood => (1008, "message rate limit exceeded"),
        Close::TooBig => (1009, "message too large"),
        Close::Restart => (1012, "service restart"),
        Close::Slow => (1013, "client too slow"),
        Close::Unauthenticated => (1008, "authentication required"),
        Close::TokenExpired => (1008, "token expired"),
    }
}

/// The close a read error calls for: 1007 for a text message that is not
/// UTF-8, 1002 for any other violation of the WebSocket protocol (RSV bits,
/// an unknown opcode, a fragmented or oversized control frame, an unmasked
/// client frame); `None` for the end of the stream or an I/O failure.
pub(crate) fn violation(e: &WebSocketError) -> Option<Close> {
    match e {
        WebSocketError::InvalidUTF8 => Some(Close::InvalidData),
        WebSocketError::ReservedBitsNotZero
        | WebSocketError::ControlFrameFragmented
        | WebSocketError::PingFrameTooLarge
        | WebSocketError::InvalidValue
        | WebSocketError::InvalidFragment
        | WebSocketError::InvalidContinuationFrame
        | WebSocketError::InvalidCloseFrame
        | WebSocketError::InvalidCloseCode => Some(Close::Protocol),
        WebSocketError::IoError(io) if client_read::is_framing_violation(io) => Some(Close::Protocol),
        _ => None,
    }
}

/// Why the reader ended.
enum ReadEnd {
    /// The client closed, or the stream ended or broke.
    Gone,
    /// This side is closing the connection (limits, protocol error).
    Stopped,
}

/// Counts client messages per second: a client at ≥ 10× the allowed rate for
/// 10 consecutive seconds is closed with 1008 (contract §4).
struct Flood {
    threshold: u32,
    window_start: Instant,
    count: u32,
    streak: u32,
}

impl Flood {
    const WINDOW: Duration = Duration::from_secs(1);
    const WINDOWS: u32 = 10;

    fn new(threshold: u32) -> Flood {
        Flood {
            threshold,
            window_start: Instant::now(),
            count: 0,
            streak: 0,
        }
    }

    /// Records one message; true if the client must be closed.
    fn record(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Self::WINDOW {
            let elapsed = now.duration_since(self.window_start);
            // a full window passed: did it flood? (a longer gap breaks the streak)
            self.streak = if self.count >= self.threshold && elapsed < 2 * Self::WINDOW {
                self.streak + 1
            } else {
                0
            };
            self.count = 0;
            self.window_start = now;
        }
        self.count += 1;
        self.count >= self.threshold && self.streak + 1 >= Self::WINDOWS
    }
}

/// The reader's state: limits and scratch buffers.
struct Reader<'a> {
    conn: &'a Connection,
    limiter: DefaultDirectRateLimiter,
    flood: Flood,
    /// simd-json's scratch space, made on the first message and kept while
    /// messages are small (it grows to the largest one: dropped after a
    /// message over [`KEEP_SCRATCH_UP_TO`], so one big message does not
    /// cost an idle connection its size for good).
    buffers: Option<Buffers>,
}

/// The largest message whose parse scratch a connection keeps.
const KEEP_SCRATCH_UP_TO: usize = 4_096;

impl Reader<'_> {
    fn send(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut out = Vec::new();
        encode(&mut out);
        let w = out.len();
        self.conn.outbox.control(Ctl::Text(out), w);
    }

    fn error(&mut self, id: Option<&[u8]>, code: ErrorCode, message: &str) {
        metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
        self.send(|o| json::error(o, id, code.as_str(), message));
    }

    fn too_large(&mut self) {
        let max = self.conn.shared.ws.max_message_bytes;
        self.error(
            None,
            ErrorCode::MessageTooLarge,
            &format!("messages are limited to {max} bytes"),
        );
        self.conn.outbox.close(Close::TooBig);
    }

    /// Handles one complete client message; false to end the connection.
    async fn message(&mut self, buf: &mut [u8], binary: bool) -> bool {
        let big = buf.len() > KEEP_SCRATCH_UP_TO;
        let go_on = self.handle(buf, binary).await;
        if big {
            self.buffers = None;
        }
        go_on
    }

    async fn handle(&mut self, buf: &mut [u8], binary: bool) -> bool {
        if self.flood.record() {
            // (answered with its id too, contract §4)
            let id = if binary {
                None
            } else {
                protocol::id_only(buf, self.buffers.get_or_insert_with(Buffers::default))
            };
            self.error(
                id.as_deref(),
                ErrorCode::RateLimited,
                "closing: sustained flood of messages",
            );
            self.conn.outbox.close(Close::Flood);
            return false;
        }
        if self.limiter.check().is_err() {
            // Not processed, but answered with its id (contract §4), so a
            // client that correlates replies never waits for one.
            let id = if binary {
                None
            } else {
                protocol::id_only(buf, self.buffers.get_or_insert_with(Buffers::default))
            };
            let rate = self.conn.shared.ws.max_client_rate;
            self.error(
                id.as_deref(),
                ErrorCode::RateLimited,
                &format!("more than {rate} messages per second; message dropped"),
            );
            return true;
        }
        if binary {
            self.error(
                None,
                ErrorCode::BadJson,
                "binary frames are not supported; send JSON text",
            );
            return true;
        }
        let max = self.conn.shared.ws.max_subscriptions;
        let req = match protocol::parse(buf, self.buffers.get_or_insert_with(Buffers::default), max) {
            Ok(r) => r,
            Err(e) => {
                self.error(e.id.as_deref(), e.code, &e.message);
                return true;
            }
        };
        let id = req.id.as_deref();
        let caller = self.conn.principal();
        match req.op {
            protocol::Op::Ping => self.send(|o| json::pong(o, id)),
            protocol::Op::Auth { token } => self.auth(id, &token),
            _ if !caller.may_read() => {
                crate::auth::AuthError::Missing.counted();
                self.error(
                    id,
                    ErrorCode::Unauthorized,
                    "authenticate first: {\"op\":\"auth\",\"token\":\"…\"} (or a token on the upgrade)",
                );
            }
            protocol::Op::Symbols => {
                let all = self.conn.shared.node.all_symbols().await;
                let list: Vec<Symbol> = all
                    .iter()
                    .map(|s| s.symbol)
                    .filter(|s| caller.subscribe.allows(s.as_str()))
                    .collect();
                self.send(|o| json::symbol_list(o, "symbols", id, &list));
            }
            protocol::Op::Unsubscribe { symbols, channels } => {
                for s in &symbols {
                    for c in &channels {
                        self.conn.session.unsubscribe(s, *c);
                    }
                }
                self.send(|o| json::symbol_list(o, "unsubscribed", id, &symbols));
            }
            protocol::Op::Subscribe {
                symbols,
                channels,
                resume,
            } => {
                // refused whole if it names a symbol the caller may not read
                match caller
                    .check_read(symbols.iter().map(|s| s.as_str()))
                    .map_err(|d| d.counted("ws"))
                {
                    Ok(()) => self.subscribe(id, symbols, channels, resume).await,
                    Err(Denied::Forbidden(why)) => self.error(id, ErrorCode::Forbidden, &why),
                    // (not reached: a caller that may not read was answered
                    // above; kept explicit so that no change lets it through)
                    Err(Denied::Unauthorized) => {
                        self.error(id, ErrorCode::Unauthorized, "a token is required to subscribe");
                    }
                }
            }
        }
        true
    }

    /// The `auth` op: a valid token replaces the connection's credentials if
    /// it grants every symbol the connection is subscribed to (else
    /// `forbidden`); an invalid one is `unauthorized`; either way a refusal
    /// keeps what the connection had.
    fn auth(&mut self, id: Option<&[u8]>, token: &str) {
        let p = match self.conn.shared.auth.verify(token) {
            Ok(p) => p,
            // (an expired token too: `token_expired` means "this connection is
            // being closed"; a refused refresh keeps the connection as it was)
            Err(e) => {
                self.error(id, ErrorCode::Unauthorized, &e.to_string());
                return;
            }
        };
        let held = self.conn.session.symbols();
        if let Some(list) = p.subscribe.denied(held.iter().map(|s| s.as_str())) {
            metrics::counter!(m::FORBIDDEN, "protocol" => "ws", "right" => "subscribe").increment(1);
            self.error(
                id,
                ErrorCode::Forbidden,
                &format!(
                    "the new token does not grant {list}, which this connection is subscribed to; the old token stays in force"
                ),
            );
            return;
        }
        let (sub, exp) = (p.sub.clone().unwrap_or_default(), p.exp.unwrap_or(0));
        *self.conn.principal.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
        self.send(|o| json::authed(o, id, &sub, exp));
    }

    async fn subscribe(
        &mut self,
        id: Option<&[u8]>,
        symbols: Vec<Symbol>,
        channels: Vec<Channel>,
        resume: HashMap<Symbol, tickshard_shard::domain::Position>,
    ) {
        if self.conn.shared.is_draining() {
            self.error(
                id,
                ErrorCode::Unavailable,
                "this server is shutting down; reconnect and resume elsewhere",
            );
            return;
        }
        let reqs = session::requests(&symbols, &channels, &resume);
        let max = self.conn.shared.ws.max_subscriptions;
        let after = self.conn.session.count_after(&reqs);
        if after > max {
            self.error(
                id,
                ErrorCode::TooManySubscriptions,
                &format!(
                    "this subscribe would make {after} symbol×channel subscriptions; the limit per connection is {max}"
                ),
            );
            return;
        }
        let session = &self.conn.session;
        let mut prepared = match session.prepare(&reqs).await {
            Ok(p) => p,
            // Refused whole, before anything was attached: the
            // subscriptions the connection already had stay.
            Err(e) => {
                self.error(id, e.code(), &e.to_string());
                return;
            }
        };
        let failed = std::mem::take(&mut prepared.failed);
        if !prepared.results.is_empty() {
            let reply = SubResult::per_symbol(&prepared.results);
            self.send(|o| json::subscribed(o, id, &reply));
            session.activate(prepared).await;
        }
        if !failed.is_empty() {
            self.defer(id, failed);
        }
    }

    /// Subscriptions whose owner shard is down: the client is told (an
    /// `unavailable` error per symbol) and the session keeps retrying them;
    /// when the owner is back they complete with their own `subscribed` reply
    /// and the usual snapshot or replay — the client need not do anything.
    fn defer(&mut self, id: Option<&[u8]>, failed: Vec<(SubRequest, String)>) {
        let mut told = std::collections::HashSet::new();
        for (r, why) in &failed {
            if told.insert(r.symbol) {
                let mut out = Vec::new();
                json::unavailable(
                    &mut out,
                    id,
                    &r.symbol,
                    &format!("{why}; subscribing as soon as it is back"),
                );
                let w = out.len();
                self.conn.outbox.control(Ctl::Text(out), w);
            }
        }
        let id = id.map(<[u8]>::to_vec);
        self.conn
            .session
            .retry(&self.conn.shared.tracker, failed, move |session, retried| {
                let mut out = Vec::new();
                match retried {
                    session::Retried::Subscribed(results) => {
                        json::subscribed(&mut out, id.as_deref(), &SubResult::per_symbol(results));
                    }
                    session::Retried::Refused(reqs, e) => {
                        // (the same code the subscribe would have had, the
                        // symbols named: they are no longer being retried)
                        let mut symbols: Vec<&str> = reqs.iter().map(|r| r.symbol.as_str()).collect();
                        symbols.dedup();
                        let shown = symbols.iter().take(10).copied().collect::<Vec<_>>().join(", ");
                        let more = symbols.len().saturating_sub(10);
                        let more = if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        };
                        metrics::counter!(m::CLIENT_ERRORS, "code" => e.code().as_str()).increment(1);
                        json::error(
                            &mut out,
                            id.as_deref(),
                            e.code().as_str(),
                            &format!("the deferred subscription of {shown}{more} was refused: {e}"),
                        );
                    }
                }
                let w = out.len();
                session.outbox().control(Ctl::Text(out), w);
            });
    }
}

/// Used by the HTTP layer for the upgrade response body.
pub fn empty_body() -> http_body_util::Full<Bytes> {
    http_body_util::Full::new(Bytes::new())
}
