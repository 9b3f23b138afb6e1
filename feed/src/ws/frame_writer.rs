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
//! pings), grows with use, and is given back down to `cap` after a drain
//! that needed more (one large reply does not pin its size for the
//! connection's life).

use std::io;

use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

/// Bytes of the longest frame header: 2 + 8 (length) + 4 (mask, unused by a server).
const MAX_HEAD: usize = 14;

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

    fn put(&mut self, mut frame: Frame<'_>) {
        let mut head = [0u8; MAX_HEAD];
        let n = frame.fmt_head(&mut head);
        self.buf.reserve(n + frame.payload.len());
        self.buf.extend_from_slice(&head[..n]);
        self.buf.extend_from_slice(&frame.payload);
    }

    /// Whether the buffer holds `cap` bytes or more: time to [`drain`](Self::drain).
    pub fn full(&self) -> bool {
        self.buf.len() >= self.cap
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
            w.frame(OpCode::Binary, p);
            if w.full() {
                w.drain().await.unwrap();
                assert!(w.buf.is_empty());
                assert!(
                    w.buf.capacity() <= 64,
                    "a large frame's buffer is given back after the drain"
                );
            }
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
        assert!(!w.full(), "2 + 3 bytes of a cap of 8");
        w.frame(OpCode::Text, b"d");
        assert!(w.full(), "2 + 3 + 2 + 1 bytes of a cap of 8");
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
