//! The gRPC listener's accept loop and connections (contract §5, §7), served
//! with hyper's HTTP/2 directly instead of tonic's built-in server, so that
//! every connection is bounded and accounted for:
//!
//! - a permit per connection, taken *before* `accept` (`--max-grpc-connections`);
//! - an HTTP/2 handshake (the client preface and its SETTINGS) within
//!   [`GrpcLimits::handshake_timeout`], or the connection is closed;
//! - at most `--grpc-max-streams` concurrent streams per connection;
//! - keep-alive pings that tolerate a starved machine (see [`KEEPALIVE_TIMEOUT`]);
//! - a span per connection with the peer's address, and **a log line for
//!   every connection the server ends or loses, with the reason**;
//! - on shutdown, a graceful close (GOAWAY, in-flight streams finish), then
//!   a bounded wait, so a client that never lets go cannot hold the drain.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Sleep,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;
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

/// Bounds of the gRPC listener, from the configuration.
#[derive(Clone, Debug)]
pub struct GrpcLimits {
    /// Concurrent connections (`--max-grpc-connections`).
    pub max_connections: usize,
    /// Concurrent streams per connection (`--grpc-max-streams`).
    pub max_streams: u32,
    /// Time to complete the HTTP/2 handshake (10 s, contract §5).
    pub handshake_timeout: Duration,
}

/// Serves `routes` on `listener` until `stop`, then closes every connection
/// gracefully and returns once they are gone (each bounded by [`CLOSE_GRACE`]).
pub async fn serve(listener: TcpListener, routes: Routes, limits: GrpcLimits, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => { backoff = Duration::from_millis(5); c }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Handshake::new(stream, limits.handshake_timeout));
        let conn = h2.serve_connection(io, TowerToHyperService::new(routes.clone()));
        let stop = stop.clone();
        let span = tracing::info_span!("grpc", %peer);
        conns.spawn(
            async move {
                run_connection(conn, peer, stop).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    conns.close();
    conns.wait().await;
}

type Conn = hyper::server::conn::http2::Connection<TokioIo<Handshake>, TowerToHyperService<Routes>, TokioExecutor>;

/// Drives one connection to its end and says why it ended.
async fn run_connection(conn: Conn, peer: SocketAddr, stop: CancellationToken) {
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(%peer, grace_s = CLOSE_GRACE.as_secs(), "gRPC connection still busy after shutdown's grace; dropping it");
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
        let take = (self.head.len() - self.seen.min(self.head.len())).min(bytes.len());
        self.head[self.seen..self.seen + take].copy_from_slice(&bytes[..take]);
        self.seen += bytes.len();
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
        let pending = tokio::time::timeout(Duration::from_secs(60), hs.read(&mut buf)).await;
        assert!(
            pending.is_err(),
            "an idle connection after the handshake is not timed out here"
        );
    }
}
