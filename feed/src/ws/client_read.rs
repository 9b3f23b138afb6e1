//! The client → server byte stream of a connection, and a read buffer that
//! exists only while a message is arriving.
//!
//! fastwebsockets gives every reader an 8 KiB buffer for its whole life (not
//! configurable in 0.10), which is most of an idle connection's memory. So the
//! reader is built when the socket becomes readable and dropped again as soon
//! as its buffer is provably empty: [`Tracked`] sees every byte handed to the
//! reader and [`FrameTracker`] follows the RFC 6455 frame boundaries in them;
//! when the reader has returned as many frames as were completed and the bytes
//! end on a boundary, nothing is left in its buffer. An idle connection then
//! holds no read buffer at all (one 8 KiB allocation per burst of client
//! messages, none per tick).

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf},
    net::tcp::OwnedReadHalf,
};

use crate::http::TlsStream;

/// The read half of a client connection.
pub enum ReadSide {
    Tcp(OwnedReadHalf),
    /// A TLS connection: readiness of the socket says nothing about whole
    /// TLS records, so such a connection keeps its reader (and buffer)
    /// while it waits; rustls holds buffers of its own anyway.
    Tls(ReadHalf<TlsStream>),
}

/// The client's side of the socket: bytes hyper read past the upgrade request
/// first, then the socket.
pub struct ClientRead {
    early: Bytes,
    half: ReadSide,
}

impl ClientRead {
    pub fn new(early: Bytes, half: ReadSide) -> ClientRead {
        ClientRead { early, half }
    }

    /// Waits until a read would not block (data, end of stream or an error),
    /// without reading (at once for TLS).
    ///
    /// Through the socket's read-readiness slot (`poll_read_ready`), the one
    /// `poll_read` uses, not `readable()`'s waiter list: registering here
    /// replaces the waker the HTTP task left in that slot when it read the
    /// upgrade request. Left there, that waker kept the finished HTTP task
    /// (~1.9 KiB) allocated for the whole life of an idle connection.
    pub async fn readable(&self) -> io::Result<()> {
        match &self.half {
            ReadSide::Tcp(half) if self.early.is_empty() => {
                std::future::poll_fn(|cx| half.as_ref().poll_read_ready(cx)).await
            }
            _ => Ok(()),
        }
    }
}

impl AsyncRead for ClientRead {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        match &mut self.half {
            ReadSide::Tcp(h) => Pin::new(h).poll_read(cx, buf),
            ReadSide::Tls(h) => Pin::new(h).poll_read(cx, buf),
        }
    }
}

/// Follows frame boundaries in a WebSocket byte stream (RFC 6455 §5.2): only
/// lengths, nothing is validated here (the reader does that).
#[derive(Default, Debug)]
pub struct FrameTracker {
    /// Header bytes of the current frame seen so far (at most 14).
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes of the current frame still to come, once its header is whole.
    payload_left: Option<u64>,
    /// Frames whose last byte has been seen.
    completed: u64,
    /// A frame header without the mask bit was seen (a client must mask
    /// every frame, RFC 6455 §5.1), or a control frame declaring more than
    /// 125 bytes (§5.5): the connection is failed with 1002. (The second is
    /// seen here because fastwebsockets checks the message size limit
    /// first, and would answer 1009 for a control frame past it.)
    violation: bool,
}

impl FrameTracker {
    /// The header's full length, once its first two bytes are known.
    fn head_needed(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.payload_left {
                Some(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.payload_left = Some(left - n);
                }
                None => {
                    let need = self.head_needed();
                    let n = (need - self.head_len).min(bytes.len());
                    self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                    self.head_len += n;
                    bytes = &bytes[n..];
                    if self.head_len >= 2 && self.head[1] & 0x80 == 0 {
                        self.violation = true;
                    }
                    // The first two bytes may have made the header longer.
                    if self.head_len == need && self.head_needed() == need {
                        let len = self.payload_len();
                        // (a control frame's length, once its header is whole:
                        // a short one may use a longer length encoding)
                        if self.head[0] & 0x08 != 0 && len > 125 {
                            self.violation = true;
                        }
                        self.payload_left = Some(len);
                    }
                }
            }
            if self.payload_left == Some(0) {
                self.completed += 1;
                self.head_len = 0;
                self.payload_left = None;
            }
        }
    }

    /// True once a frame without the mask bit, or a control frame over 125
    /// bytes, was seen.
    pub fn saw_violation(&self) -> bool {
        self.violation
    }

    /// `Some(frames completed)` when the bytes seen end exactly after a frame.
    pub fn at_boundary(&self) -> Option<u64> {
        (self.head_len == 0 && self.payload_left.is_none()).then_some(self.completed)
    }
}

/// The error [`Tracked`] reads fail with once the client sent an unmasked
/// frame or an oversized control frame (the reader never sees that frame).
#[derive(Debug, thiserror::Error)]
#[error("the client sent an unmasked frame or a control frame over 125 bytes")]
pub struct FramingViolation;

/// True if a read failed on a [`FramingViolation`].
pub fn is_framing_violation(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<FramingViolation>())
}

/// Published by [`Tracked`] after every read: the frames completed if the
/// bytes so far end on a frame boundary, else this.
pub const MID_FRAME: u64 = u64::MAX;

/// A client's byte stream ([`ClientRead`]) with a [`FrameTracker`] over
/// everything it hands out.
pub struct Tracked<'a, R = ClientRead> {
    inner: R,
    frames: FrameTracker,
    boundary: &'a AtomicU64,
}

impl<'a, R> Tracked<'a, R> {
    /// `boundary` must hold the frames completed before `inner` (which must
    /// itself start on a boundary).
    pub fn new(inner: R, completed: u64, boundary: &'a AtomicU64) -> Tracked<'a, R> {
        boundary.store(completed, Ordering::Relaxed);
        Tracked {
            inner,
            frames: FrameTracker {
                completed,
                ..FrameTracker::default()
            },
            boundary,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Tracked<'_, R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(new) = buf.filled().get(before..) {
            this.frames.feed(new);
            let b = this.frames.at_boundary().unwrap_or(MID_FRAME);
            this.boundary.store(b, Ordering::Relaxed);
        }
        if this.frames.saw_violation() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, FramingViolation)));
        }
        r
    }
}

/// fastwebsockets' unsplit reader wants a writable stream (for automatic
/// pongs and close replies, which are turned off here): nothing is written.
impl<R> AsyncWrite for Tracked<'_, R> {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the read side does not write",
        )))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use fastwebsockets::{Frame, OpCode, Payload};
    use proptest::prelude::*;

    use super::*;

    /// A frame as a client sends it (masked) or, with `mask: None`, unmasked.
    fn frame(len: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
        let payload = vec![b'x'; len];
        let mut f = Frame::new(true, OpCode::Text, mask, Payload::Owned(payload.clone()));
        let mut head = [0u8; 16];
        let n = f.fmt_head(&mut head);
        let mut out = head[..n].to_vec();
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn every_length_encoding_is_followed() {
        for (len, head) in [(0, 6), (125, 6), (126, 8), (65_535, 8), (65_536, 14)] {
            let f = frame(len, Some([1, 2, 3, 4]));
            assert_eq!(f.len(), head + len, "test frame of {len} bytes");
            let mut t = FrameTracker::default();
            t.feed(&f[..f.len() - 1]);
            assert_eq!(t.at_boundary(), None, "{len}: one byte short is mid-frame");
            t.feed(&f[f.len() - 1..]);
            assert_eq!(t.at_boundary(), Some(1), "{len}");
        }
        let mut t = FrameTracker::default();
        t.feed(&frame(10, Some([1, 2, 3, 4])));
        assert!(!t.saw_violation());
        t.feed(&frame(10, None));
        assert_eq!(t.at_boundary(), Some(2), "unmasked");
        assert!(t.saw_violation());
        // a control frame over 125 bytes, seen from its header
        let mut t = FrameTracker::default();
        t.feed(&[0x89, 0x80 | 125, 1, 2, 3, 4]);
        assert!(!t.saw_violation(), "a ping of 125 bytes");
        let mut t = FrameTracker::default();
        t.feed(&[0x89, 0x80 | 126, 0, 1, 1, 2, 3, 4]);
        assert!(!t.saw_violation(), "a ping of 1 byte in the 16-bit length encoding");
        let mut t = FrameTracker::default();
        t.feed(&[0x8a, 0x80 | 126, 0, 126, 1, 2, 3, 4]);
        assert!(t.saw_violation(), "a pong of more");
    }

    proptest! {
        /// Frames of any size and masking, cut into any pieces: the tracker is
        /// at a boundary exactly where a frame ends, with the right count.
        #[test]
        fn boundaries_match_wherever_the_stream_is_cut(
            lens in prop::collection::vec(prop_oneof![0usize..130, 65_530usize..65_540], 1..6),
            masked in prop::collection::vec(any::<bool>(), 6),
            cuts in prop::collection::vec(1usize..300, 1..40),
        ) {
            let mut stream = Vec::new();
            let mut ends = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                stream.extend(frame(len, masked[i].then_some([9, 8, 7, 6])));
                ends.push(stream.len());
            }
            let mut t = FrameTracker::default();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            while at < stream.len() {
                let n = (*cut.next().unwrap_or(&1)).min(stream.len() - at);
                t.feed(&stream[at..at + n]);
                at += n;
                let done = ends.iter().filter(|&&e| e <= at).count() as u64;
                let want = ends.contains(&at).then_some(done);
                prop_assert_eq!(t.at_boundary(), want, "after {} of {} bytes", at, stream.len());
            }
        }
    }

    /// The upgrade's HTTP task read the request through the socket's
    /// read-readiness slot and left its waker there; waiting for the idle
    /// connection's next byte must take that slot over, or the finished HTTP
    /// task stays allocated (its waker holds it) for the connection's life.
    #[tokio::test]
    async fn waiting_to_read_replaces_the_waker_the_http_task_left() {
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let http_task = std::sync::Arc::new(Noop);
        let waker = std::task::Waker::from(http_task.clone());
        let mut cx = Context::from_waker(&waker);
        // as hyper does: read until it would block, then wait in the slot
        let mut scratch = [0u8; 16];
        assert_eq!(
            server.try_read(&mut scratch).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(server.poll_read_ready(&mut cx).is_pending(), "nothing sent yet");
        drop(waker);
        assert_eq!(
            std::sync::Arc::strong_count(&http_task),
            2,
            "the socket holds the HTTP task's waker"
        );

        let (r, _w) = server.into_split();
        let read = ClientRead::new(Bytes::new(), ReadSide::Tcp(r));
        let mut wait = std::pin::pin!(read.readable());
        assert!(
            futures_util::FutureExt::now_or_never(wait.as_mut()).is_none(),
            "nothing sent yet"
        );
        assert_eq!(
            std::sync::Arc::strong_count(&http_task),
            1,
            "the idle connection's wait took the slot: the HTTP task's waker is gone"
        );
    }
}
