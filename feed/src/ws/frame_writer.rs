//! The server → client side of a connection: frames are formatted straight
//! into one write buffer (fastwebsockets' [`Frame::fmt_head`] for the header)
//! and written with one syscall per drain.
//!
//! Not fastwebsockets' `WebSocketWrite`: its `write_frame` copies every frame
//! into a buffer of its own and then hands it to the stream, an async call
//! (and a ~320-byte future in every connection's task) per frame. Here a
//! frame is one synchronous copy, and only a drain awaits the socket.
//!
//! The buffer starts empty (`tokio::io::BufWriter` allocates its whole
//! capacity up front, ~8 KiB resident for a connection that only ever writes
//! pings) and grows with use up to `cap`, where it stays: a connection
//! that once took a batch that large keeps the buffer for its life (as it
//! would a `BufWriter`'s). Only a single frame longer than `cap` takes it
//! further, and the drain after it gives that back.
//!
//! [`SharedTcp`] is the writer's stream for a plain TCP connection: a write
//! half shared with the fan-out's direct writes (`ws::Direct`).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use fastwebsockets::{Frame, OpCode, Payload};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, tcp::OwnedWriteHalf},
};

/// Bytes of the longest frame header: 2 + 8 (length) + 4 (mask, unused by a server).
const MAX_HEAD: usize = 14;

/// Bytes of a server (unmasked) frame's header for a payload of `len` bytes
/// (RFC 6455 §5.2).
fn head_len(len: usize) -> usize {
    match len {
        0..126 => 2,
        126..65_536 => 4,
        _ => 10,
    }
}

/// Appends one frame to `buf`.
fn put(buf: &mut Vec<u8>, mut frame: Frame<'_>) {
    let mut head = [0u8; MAX_HEAD];
    let n = frame.fmt_head(&mut head);
    buf.reserve(n + frame.payload.len());
    buf.extend_from_slice(&head[..n]);
    buf.extend_from_slice(&frame.payload);
}

/// Appends one unfragmented text frame to `buf`.
pub fn put_text(buf: &mut Vec<u8>, payload: &[u8]) {
    put(buf, Frame::new(true, OpCode::Text, None, Payload::Borrowed(payload)));
}

/// A plain TCP connection's write half, shared by its writer task (this
/// stream) and the fan-out's direct writes (`try_write` on the same half).
/// The outbox lets only one of them write at a time. The write side is shut
/// down when the last handle drops (`OwnedWriteHalf`'s drop): the writer
/// task drops the other handles when it ends (`ws::Connection::write_loop`).
pub struct SharedTcp(pub Arc<OwnedWriteHalf>);

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let s: &TcpStream = (*self.0).as_ref();
        loop {
            std::task::ready!(s.poll_write_ready(cx))?;
            match s.try_write(buf) {
                // (the readiness was stale; try_write cleared it)
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    cap: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(cap: usize, inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            cap: cap.max(1),
        }
    }

    /// Appends one unfragmented frame.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        self.put(Frame::new(true, opcode, None, Payload::Borrowed(payload)));
    }

    /// Appends a close frame (RFC 6455 §5.5.1).
    pub fn close(&mut self, code: u16, reason: &[u8]) {
        self.put(Frame::close(code, reason));
    }

    fn put(&mut self, frame: Frame<'_>) {
        put(&mut self.buf, frame);
    }

    /// Appends bytes that are already frames (what a direct write left).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether a frame of `payload` bytes fits in the buffer without taking
    /// it past `cap`; if not, [`drain`](Self::drain) first. (Draining before
    /// the frame that would not fit, not after, keeps the buffer's capacity
    /// at `cap`: only a single frame longer than that overshoots, and the
    /// drain after it gives the memory back.) An empty buffer takes any frame.
    pub fn fits(&self, payload: usize) -> bool {
        self.buf.is_empty() || self.buf.len() + head_len(payload) + payload <= self.cap
    }

    /// Writes out everything buffered (without flushing the stream).
    pub async fn drain(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        if self.buf.capacity() > self.cap {
            self.buf.shrink_to(self.cap);
        }
        Ok(())
    }

    /// Writes out everything buffered and flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.drain().await?;
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use fastwebsockets::{Role, WebSocket};
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[tokio::test]
    #[expect(clippy::disallowed_methods, reason = "a test's reader task")]
    async fn frames_arrive_whole_and_in_order_and_memory_grows_only_with_use() {
        // A small pipe forces partial writes; a client-side reader checks
        // that what arrives is the frames written, whole and in order.
        let (a, b) = tokio::io::duplex(7);
        let mut w = FrameWriter::new(64, a);
        assert_eq!(w.buf.capacity(), 0, "nothing allocated before the first frame");
        let payloads: Vec<Vec<u8>> = [3usize, 0, 125, 126, 200, 65_535, 65_536, 1]
            .into_iter()
            .enumerate()
            .map(|(i, len)| (0..len).map(|k| (i * 31 + k) as u8).collect())
            .collect();
        let want = payloads.clone();
        let reader = tokio::spawn(async move {
            let mut ws = WebSocket::after_handshake(b, Role::Client);
            ws.set_max_message_size(1 << 20);
            // nobody reads this side's replies (a full pipe would block it)
            ws.set_auto_close(false);
            ws.set_auto_pong(false);
            let mut got = Vec::new();
            for _ in 0..want.len() {
                let f = ws.read_frame().await.unwrap();
                assert!(f.fin);
                assert_eq!(f.opcode, OpCode::Binary);
                got.push(f.payload.to_vec());
            }
            let f = ws.read_frame().await.unwrap();
            assert_eq!(f.opcode, OpCode::Close);
            assert_eq!(&f.payload[..2], &1001u16.to_be_bytes());
            assert_eq!(&f.payload[2..], b"bye");
            got
        });
        for p in &payloads {
            if !w.fits(p.len()) {
                w.drain().await.unwrap();
                assert!(w.buf.is_empty());
                assert!(
                    w.buf.capacity() <= 64,
                    "a large frame's buffer is given back after the drain"
                );
            }
            w.frame(OpCode::Binary, p);
            assert!(
                w.buf.len() <= 64 || w.buf.len() == head_len(p.len()) + p.len(),
                "past `cap` only with a single frame longer than it"
            );
        }
        w.close(1001, b"bye");
        w.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), payloads);
    }

    #[tokio::test]
    async fn nothing_reaches_the_socket_before_a_drain() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(8, a);
        w.frame(OpCode::Text, b"abc");
        assert!(w.fits(1), "2 + 3, then 2 + 1, bytes of a cap of 8");
        w.frame(OpCode::Text, b"d");
        assert!(!w.fits(0), "8 bytes of a cap of 8: no room for a header");
        let mut got = [0u8; 16];
        assert!(
            futures_util::FutureExt::now_or_never(b.read(&mut got)).is_none(),
            "buffered bytes were sent before a drain"
        );
        w.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], &[0x81, 3, b'a', b'b', b'c', 0x81, 1, b'd']);
    }
}
