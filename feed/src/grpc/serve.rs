//! The gRPC listener's accept loop and connections (contract §5, §7), served
//! with hyper's HTTP/2 directly instead of tonic's built-in server, so that
//! every connection is bounded and accounted for:
//!
//! - a permit per connection, taken *before* `accept` (`--max-grpc-connections`);
//! - with TLS, the TLS handshake within the handshake timeout too (the
//!   configuration in force at that moment: certificates rotate without
//!   touching established connections);
//! - an HTTP/2 handshake (the client preface and its SETTINGS) within
//!   [`GrpcLimits::handshake_timeout`], or the connection is closed;
//! - at most `--grpc-max-streams` concurrent streams per connection;
//! - on the public port, the request message of a unary or server-streaming
//!   call within the handshake timeout too (tonic reads it whole before the handler, and so
//!   before any token is looked at: a stream that never finishes it would
//!   keep its connection from idling out for ever), else DEADLINE_EXCEEDED;
//! - keep-alive pings that tolerate a starved machine (see [`KEEPALIVE_TIMEOUT`]);
//! - a span per connection with the peer's address, and **a log line for
//!   every connection the server ends or loses, with the reason**;
//! - on shutdown, a graceful close (GOAWAY, in-flight streams finish), then
//!   a bounded wait, so a client that never lets go cannot hold the drain.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Sleep,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{codegen::http, service::Routes};

use crate::{config::GrpcLimits, tls::ReloadingTls};
use tracing::Instrument as _;

/// The server pings a connection it has read nothing from for this long.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A ping not answered within this long ends the connection. Generous on
/// purpose: hyper counts as "read" only what the application has taken, so
/// a stream whose reader is held up by backpressure looks idle, and on a
/// starved two-core machine a pong can wait for a worker thread. A dead
/// peer is also found by TCP keep-alive.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight streams get to finish once shutdown has asked a
/// connection to close (GOAWAY) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Serves `routes` on `listener` until `stop`, then closes every connection
/// gracefully and returns once they are gone (each bounded by [`CLOSE_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    limits: GrpcLimits,
    tls: Option<Arc<ReloadingTls>>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let Some((stream, peer)) = crate::http::accept(&listener, &stop).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let one = One {
            h2: h2.clone(),
            routes: routes.clone(),
            handshake: limits.handshake_timeout,
            request_timeout: limits.request_timeout,
            idle: limits.idle_timeout,
            peer,
            stop: stop.clone(),
        };
        let tls = tls.as_ref().map(|t| t.acceptor());
        let span = tracing::info_span!("grpc", %peer);
        tickshard_shard::tasks::spawn(
            &conns,
            async move {
                // TLS and HTTP/2 handshakes together within the timeout
                let deadline = tokio::time::Instant::now() + one.handshake;
                match tls {
                    None => one.run(stream, deadline).await,
                    Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => one.run(s, deadline).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "no TLS handshake in time; closing"),
                    },
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    conns.close();
    conns.wait().await;
}

/// What serving one accepted connection needs.
struct One {
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    routes: Routes,
    handshake: Duration,
    request_timeout: Option<Duration>,
    idle: Duration,
    peer: SocketAddr,
    stop: CancellationToken,
}

impl One {
    /// Serves the connection (TLS already done, if any): the HTTP/2
    /// handshake by `deadline`, then streams until it ends.
    async fn run<S>(self, stream: S, deadline: tokio::time::Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let io = TokioIo::new(Handshake::new(stream, left));
        let streams = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        let conn = self.h2.serve_connection(
            io,
            counted(self.routes, streams.clone(), self.request_timeout, close.clone()),
        );
        run_connection(conn, &streams, self.idle, self.peer, self.stop, close).await;
    }
}

/// A request's handle on its connection (a request extension): cancelled,
/// the connection is dropped at once, with every stream on it (a publisher
/// that stopped reading its acks while holding some of the pod's budget:
/// see `tickshard_shard::publish::PodBudget`).
#[derive(Clone)]
pub(crate) struct CloseConnection(pub CancellationToken);

/// Services any stranger may call (no token): their streams do not keep
/// a connection from idling out, so that nobody can hold every connection
/// permit with health watches or reflection streams that never end.
const OPEN_SERVICES: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

/// Calls whose client sends a stream of messages: their request stays open
/// for the call's life. Every other call's request (one message) must have
/// arrived within the request timeout.
const STREAMED_REQUESTS: [&str; 5] = [
    "/tickshard.v1.Feed/Publish",
    "/tickshard.v1.Cluster/Forward",
    "/tickshard.v1.Cluster/Follow",
    "/tickshard.v1.Cluster/MoveIn",
    "/grpc.reflection.",
];

/// The routes, counting the connection's open streams (a stream is open
/// from its request until its response body ends or is dropped; see
/// [`OPEN_SERVICES`] for those that do not count), with a deadline of
/// `request_timeout` (if any) on a one-message request (see
/// [`STREAMED_REQUESTS`]).
fn counted(
    routes: Routes,
    streams: Arc<AtomicUsize>,
    request_timeout: Option<Duration>,
    close: CancellationToken,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<tonic::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(CloseConnection(close.clone()));
        let mut routes = routes.clone();
        let path = req.uri().path();
        let open = (!OPEN_SERVICES.iter().any(|s| path.starts_with(s))).then(|| OpenStream::new(streams.clone()));
        let timeout = request_timeout.filter(|_| !STREAMED_REQUESTS.iter().any(|s| path.starts_with(s)));
        let req = req.map(|body| Deadlined {
            body,
            deadline: timeout.map(|t| (Box::pin(tokio::time::sleep(t)), t)),
        });
        async move {
            std::future::poll_fn(|cx| {
                tonic::codegen::Service::<http::Request<hyper::body::Incoming>>::poll_ready(&mut routes, cx)
            })
            .await?;
            let resp = tonic::codegen::Service::call(&mut routes, req).await?;
            Ok(resp.map(|body| tonic::body::Body::new(Counted { body, _open: open })))
        }
    })
}

/// A request body that must end by a deadline (and the timeout it came
/// from; `None`: no deadline, or it has ended); past it, it fails with
/// DEADLINE_EXCEEDED, which the call answers.
struct Deadlined {
    body: hyper::body::Incoming,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl hyper::body::Body for Deadlined {
    type Data = bytes::Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if frame.is_none() || this.body.is_end_stream() {
                    this.deadline = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.deadline.as_mut().map(|(d, t)| (d.as_mut().poll(cx), *t)) {
                Some((Poll::Ready(()), timeout)) => {
                    this.deadline = None;
                    let why = format!("the request message did not arrive within {} ms", timeout.as_millis());
                    Poll::Ready(Some(Err(Box::new(tonic::Status::deadline_exceeded(why)))))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// One open stream of a connection (decrements the count when dropped).
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(count: Arc<AtomicUsize>) -> OpenStream {
        count.fetch_add(1, Ordering::Relaxed);
        OpenStream(count)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its stream counted while it lives.
struct Counted {
    body: tonic::body::Body,
    _open: Option<OpenStream>,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Drives one connection to its end and says why it ended; closes it
/// (gracefully) after `idle` without an open stream.
async fn run_connection<C>(
    conn: C,
    streams: &AtomicUsize,
    idle: Duration,
    peer: SocketAddr,
    stop: CancellationToken,
    close: CancellationToken,
) where
    C: Future<Output = Result<(), hyper::Error>> + GracefulShutdown,
{
    let mut conn = std::pin::pin!(conn);
    let mut check = tokio::time::interval((idle / 6).max(Duration::from_millis(10)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_since = tokio::time::Instant::now();
    let why = loop {
        tokio::select! {
            r = conn.as_mut() => break Some(r),
            _ = stop.cancelled() => break None,
            _ = close.cancelled() => {
                // (no graceful close: its client is not reading)
                tracing::warn!(%peer, "gRPC connection dropped: a publisher on it stopped reading its acks");
                return;
            }
            _ = check.tick() => {
                let now = tokio::time::Instant::now();
                if streams.load(Ordering::Relaxed) > 0 {
                    idle_since = now;
                } else if now.duration_since(idle_since) >= idle {
                    tracing::info!(%peer, idle_ms = idle.as_millis() as u64, "closing an idle gRPC connection");
                    break None;
                }
            }
        }
    };
    let result = match why {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(%peer, grace_s = CLOSE_GRACE.as_secs(), "gRPC connection still busy after its graceful close; dropping it");
                    return;
                }
            }
        }
    };
    match result {
        Ok(()) => tracing::debug!(%peer, "gRPC connection closed"),
        Err(e) => {
            let why = error_chain(&e);
            if is_client_gone(&e) {
                tracing::info!(%peer, reason = %why, "gRPC connection lost");
            } else {
                tracing::warn!(%peer, reason = %why, "gRPC connection closed by the server");
            }
        }
    }
}

/// hyper's `graceful_shutdown` of an HTTP/2 connection.
trait GracefulShutdown {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulShutdown for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// The error and its sources, for the log.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// The peer went away (reset, broken pipe, end of stream): not the server's doing.
fn is_client_gone(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionAborted
            );
        }
        src = s.source();
    }
    false
}

/// The HTTP/2 client preface (RFC 9113 §3.4), which a SETTINGS frame follows.
const PREFACE_LEN: usize = 24;
/// A frame header: 24-bit length, type, flags, stream id.
const FRAME_HEAD_LEN: usize = 9;

/// A TCP stream whose reads fail with `TimedOut` if the client has not sent
/// its preface and SETTINGS frame within the handshake timeout.
pub struct Handshake<S = TcpStream> {
    inner: S,
    /// The first bytes the client sent (preface + SETTINGS header).
    head: [u8; PREFACE_LEN + FRAME_HEAD_LEN],
    seen: usize,
    /// `None` once the handshake is complete.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Handshake<S> {
    pub fn new(inner: S, timeout: Duration) -> Handshake<S> {
        Handshake {
            inner,
            head: [0; PREFACE_LEN + FRAME_HEAD_LEN],
            seen: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }

    /// Counts bytes the client sent until its SETTINGS frame is whole.
    fn saw(&mut self, bytes: &[u8]) {
        if self.deadline.is_none() {
            return;
        }
        if self.seen < self.head.len() {
            let take = (self.head.len() - self.seen).min(bytes.len());
            self.head[self.seen..self.seen + take].copy_from_slice(&bytes[..take]);
        }
        self.seen = self.seen.saturating_add(bytes.len());
        if self.seen >= self.head.len() {
            let h = &self.head[PREFACE_LEN..];
            let settings_len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if self.seen >= self.head.len() + settings_len {
                self.deadline = None;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Handshake<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.deadline.is_some()
            && let Some(new) = buf.filled().get(before..)
        {
            this.saw(new);
        }
        if r.is_pending()
            && let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 handshake from the client in time",
            )));
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handshake<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    fn preface_and_settings(settings_len: usize) -> Vec<u8> {
        let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        v.extend_from_slice(&[0, 0, settings_len as u8, 4, 0, 0, 0, 0, 0]);
        v.extend(std::iter::repeat_n(0u8, settings_len));
        v
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out_and_a_handshake_ends_the_clock() {
        let (client, server) = duplex(1024);
        let mut hs = Handshake::new(server, Duration::from_secs(10));
        let mut buf = [0u8; 64];
        let e = hs.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(client);

        // The preface and SETTINGS cut anywhere: once whole, no timeout.
        let (mut client, server) = duplex(1024);
        let mut hs = Handshake::new(server, Duration::from_secs(10));
        let bytes = preface_and_settings(12);
        client.write_all(&bytes[..30]).await.unwrap();
        let mut got = 0;
        while got < 30 {
            got += hs.read(&mut buf).await.unwrap();
        }
        assert!(hs.deadline.is_some(), "not whole yet");
        client.write_all(&bytes[30..]).await.unwrap();
        while got < bytes.len() {
            got += hs.read(&mut buf).await.unwrap();
        }
        assert!(hs.deadline.is_none(), "handshake complete");

        // Pieces that end past the 33 bytes kept, mid-SETTINGS: no panic,
        // the clock stops once the payload is whole.
        for first in [34, 40, 44] {
            let (mut client, server) = duplex(1024);
            let mut hs = Handshake::new(server, Duration::from_secs(10));
            let bytes = preface_and_settings(18);
            client.write_all(&bytes[..first]).await.unwrap();
            let mut got = 0;
            while got < first {
                got += hs.read(&mut buf).await.unwrap();
            }
            assert!(hs.deadline.is_some());
            client.write_all(&bytes[first..]).await.unwrap();
            while got < bytes.len() {
                got += hs.read(&mut buf).await.unwrap();
            }
            assert!(hs.deadline.is_none(), "whole after a cut at {first}");
        }
        let pending = tokio::time::timeout(Duration::from_secs(60), hs.read(&mut buf)).await;
        assert!(
            pending.is_err(),
            "an idle connection after the handshake is not timed out here"
        );
    }
}
