//! The HTTP listener's accept loop and connections (contract §7).
//!
//! Plain HTTP connections (probes, metrics, the dashboard, the candles API)
//! and WebSockets are bounded separately, so that clients never starve the
//! probes:
//! - a WebSocket takes one of `--max-connections` permits when it upgrades
//!   (503 when none is free), for its whole life;
//! - a plain connection takes one of [`PLAIN_CONNECTIONS`] permits while it
//!   is HTTP. When they are all taken, one is closed to make room (the one
//!   idle the longest, else the oldest, after its current request), so a
//!   probe is always answered.
//!
//! A connection that has not sent a complete request head within the header
//! timeout (10 s), or sits idle between requests for the idle timeout (60 s),
//! is closed. Every connection task is tracked (the drain waits for it) and
//! runs in a span with the peer's address.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{config::HttpLimits, tls::ReloadingTls};

/// Plain (not upgraded) HTTP connections open at once, beside the WebSockets.
pub const PLAIN_CONNECTIONS: usize = 512;
/// How often a connection's timeouts are checked (their precision).
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a connection asked to close may take to finish its response.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Only a connection idle at least this long is closed to make room: one
/// that was just accepted is most likely a client about to send its request
/// (a burst of WebSocket handshakes), not a squatter.
const EVICT_AFTER_IDLE: Duration = Duration::from_millis(250);

/// Milliseconds since the first call (a clock the tracks can share atomically).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// What the accept loop and a connection's request handler share.
#[derive(Default)]
pub struct ConnTrack {
    id: u64,
    /// A request is being handled.
    busy: AtomicBool,
    /// Requests answered so far.
    answered: AtomicU64,
    /// Bytes arrived since the last answer (a next request head is coming).
    reading: AtomicBool,
    /// When the connection was accepted or last answered ([`now_ms`]).
    idle_since_ms: AtomicU64,
    /// When it was accepted ([`now_ms`]).
    accepted_ms: u64,
    /// Cancelled to make room for another connection.
    evict: CancellationToken,
}

impl ConnTrack {
    /// Called when a request head is complete (the handler starts).
    pub fn begin(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// Called when the handler has its response.
    pub fn end(&self) {
        self.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        self.reading.store(false, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
    }
}

/// Plain connections by age, for eviction.
#[derive(Default)]
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<ConnTrack>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnTrack>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks a connection to close to make room: the one idle the longest
    /// (no request in flight, not reading one) if one has been idle for at
    /// least [`EVICT_AFTER_IDLE`]; else the oldest connection older than
    /// that, whatever it is doing (it finishes its request first: a client
    /// that keeps every slot busy still cannot keep a probe out).
    fn evict(&self) -> bool {
        let now = now_ms();
        let min = EVICT_AFTER_IDLE.as_millis() as u64;
        let mut conns = self.lock();
        let aged = |c: &ConnTrack| now.saturating_sub(c.idle_since_ms.load(Ordering::Relaxed)) >= min;
        let idle = conns
            .iter()
            .filter(|(_, c)| {
                !c.evict.is_cancelled()
                    && !c.busy.load(Ordering::Relaxed)
                    && !c.reading.load(Ordering::Relaxed)
                    && aged(c)
            })
            .min_by_key(|(_, c)| c.idle_since_ms.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        let victim = idle.or_else(|| {
            conns
                .iter()
                .find(|(_, c)| !c.evict.is_cancelled() && now.saturating_sub(c.accepted_ms) >= min)
                .map(|(id, _)| *id)
        });
        match victim.and_then(|id| conns.remove(&id)) {
            Some(c) => {
                c.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves `listener` until `stop`; each connection is handed to `serve`
/// (hyper with the routes) with its [`ConnTrack`].
pub async fn accept_loop<F>(
    listener: TcpListener,
    limits: HttpLimits,
    tls: Option<Arc<ReloadingTls>>,
    tasks: TaskTracker,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(Tracked, SocketAddr, Arc<ConnTrack>) -> Conn + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let permits = Arc::new(Semaphore::new(PLAIN_CONNECTIONS));
    let registry = Arc::new(Registry::default());
    let mut next_id = 0u64;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room by closing the connection idle the longest
                // (its permit comes back when its task ends), else wait for
                // one, looking again as connections age.
                loop {
                    if registry.evict() {
                        tracing::debug!("plain HTTP connections full: closing one to make room");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        p = permits.clone().acquire_owned() => match p { Ok(p) => break p, Err(_) => return },
                        _ = tokio::time::sleep(EVICT_AFTER_IDLE / 2) => {}
                    }
                }
            }
        };
        let Some((stream, peer)) = accept(&listener, &stop).await else {
            return;
        };
        next_id += 1;
        let now = now_ms();
        let track = Arc::new(ConnTrack {
            id: next_id,
            idle_since_ms: AtomicU64::new(now),
            accepted_ms: now,
            ..ConnTrack::default()
        });
        registry.lock().insert(next_id, track.clone());
        let (registry, limits, stop, serve) = (registry.clone(), limits.clone(), stop.clone(), serve.clone());
        let tls = tls.as_ref().map(|t| t.acceptor());
        tickshard_shard::tasks::spawn(
            &tasks,
            async move {
                // The TLS handshake counts against the request-head timeout,
                // and a connection still in it can be evicted like an idle one.
                let accepted = Instant::now();
                let inner = match tls {
                    None => Some(ClientStream::Plain(stream)),
                    Some(acceptor) => tokio::select! {
                        r = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)) => match r {
                            Ok(Ok(s)) => Some(ClientStream::Tls(Box::new(s))),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!("no TLS handshake in time; closing");
                                None
                            }
                        },
                        _ = track.evict.cancelled() => None,
                        _ = stop.cancelled() => None,
                    },
                };
                if let Some(inner) = inner {
                    let io = Tracked {
                        inner,
                        track: track.clone(),
                    };
                    supervise(serve(io, peer, track.clone()), &track, &limits, &stop, accepted).await;
                }
                registry.lock().remove(&track.id);
                drop(permit);
            }
            .instrument(tracing::debug_span!("http", %peer)),
        );
    }
}

/// The next connection of `listener`, or `None` once `stop` is cancelled.
/// Accept errors (EMFILE: out of file descriptors) back off, doubling from
/// 5 ms up to 1 s, instead of spinning. Shared by the HTTP and gRPC listeners.
pub(crate) async fn accept(listener: &TcpListener, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    let mut backoff = tickshard_shard::backoff::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let err = tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => e,
            },
        };
        tracing::warn!(error = %err, addr = ?listener.local_addr().ok(), "accept failed; backing off");
        tokio::select! {
            _ = stop.cancelled() => return None,
            () = backoff.wait() => {}
        }
    }
}

/// A served connection: hyper's HTTP/1 connection with upgrades.
pub type Conn = Pin<Box<dyn HttpConn + Send>>;

/// What [`supervise`] needs of a connection.
pub trait HttpConn: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> HttpConn for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Drives a connection, closing it when a timeout passes, when it is
/// evicted, or at shutdown.
async fn supervise(
    mut conn: Conn,
    track: &ConnTrack,
    limits: &HttpLimits,
    stop: &CancellationToken,
    accepted: Instant,
) {
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answered = 0;
    let mut idle_since = accepted;
    let mut head_since: Option<Instant> = None;
    let why = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = track.evict.cancelled() => break "evicted to make room for a new connection",
            _ = stop.cancelled() => break "shutting down",
            _ = check.tick() => {
                let now = Instant::now();
                if track.busy.load(Ordering::Relaxed) {
                    head_since = None;
                    continue;
                }
                let n = track.answered.load(Ordering::Relaxed);
                if n != answered {
                    answered = n;
                    idle_since = now;
                    head_since = None;
                }
                if track.reading.load(Ordering::Relaxed) {
                    head_since.get_or_insert(now);
                }
                let started = if answered == 0 { Some(accepted) } else { head_since };
                if started.is_some_and(|t| now.duration_since(t) >= limits.header_timeout) {
                    break "no complete request head in time";
                }
                if head_since.is_none() && answered > 0 && now.duration_since(idle_since) >= limits.idle_timeout {
                    break "idle between requests";
                }
            }
        }
    };
    tracing::debug!(reason = why, "closing an HTTP connection");
    // A request in flight gets to finish (up to CLOSE_GRACE); a connection
    // with none (idle, or a request head not yet whole) is dropped at once:
    // its slot is what a probe may be waiting for (contract §7: probes
    // answer within a second).
    if track.busy.load(Ordering::Relaxed) {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
    }
}

/// A TLS connection of the HTTP listener.
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A client connection: plain TCP, or TLS with `--tls-cert`.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A client socket that notes when bytes of a request arrive.
pub struct Tracked {
    inner: ClientStream,
    track: Arc<ConnTrack>,
}

impl Tracked {
    pub fn into_inner(self) -> ClientStream {
        self.inner
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.track.reading.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
