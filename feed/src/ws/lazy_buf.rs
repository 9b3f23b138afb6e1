//! A write buffer that grows on demand: `tokio::io::BufWriter` allocates its
//! whole capacity up front, which for 19,000 idle WebSockets that only ever
//! write a ping is ~8 KiB of resident memory each (the allocator touches both
//! ends of every 64 KiB block). This one starts empty, grows (amortised, so a
//! busy connection stops allocating after its first drains) up to `cap`, and
//! writes through when a write would not fit.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::AsyncWrite;

pub struct LazyBufWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    written: usize,
    cap: usize,
}

impl<W: AsyncWrite + Unpin> LazyBufWriter<W> {
    pub fn new(cap: usize, inner: W) -> Self {
        LazyBufWriter {
            inner,
            buf: Vec::new(),
            written: 0,
            cap: cap.max(1),
        }
    }

    /// Writes out everything buffered (not flushing `inner`).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LazyBufWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > this.cap {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= this.cap {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    #[expect(clippy::disallowed_methods, reason = "a test's reader task")]
    async fn writes_arrive_whole_and_in_order_and_memory_grows_only_with_use() {
        // a small pipe forces partial writes from the inner writer
        let (a, mut b) = tokio::io::duplex(7);
        let mut w = LazyBufWriter::new(16, a);
        assert_eq!(w.buf.capacity(), 0, "nothing allocated before the first write");
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            b.read_to_end(&mut out).await.unwrap();
            out
        });
        let mut want = Vec::new();
        for (i, len) in [3usize, 5, 0, 9, 16, 40, 1, 15].into_iter().enumerate() {
            let chunk: Vec<u8> = (0..len).map(|k| (i * 31 + k) as u8).collect();
            w.write_all(&chunk).await.unwrap();
            want.extend_from_slice(&chunk);
            assert!(w.buf.len() <= 16);
        }
        w.flush().await.unwrap();
        assert!(w.buf.is_empty());
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), want);
    }

    #[tokio::test]
    async fn nothing_reaches_the_socket_before_a_flush_unless_the_buffer_is_full() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = LazyBufWriter::new(8, a);
        w.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 16];
        assert!(
            futures_util::FutureExt::now_or_never(b.read(&mut got)).is_none(),
            "buffered bytes were sent before a flush"
        );
        w.write_all(b"defgh").await.unwrap(); // fills it: still buffered (8)
        w.write_all(b"i").await.unwrap(); // does not fit: the 8 go out
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"abcdefgh");
        w.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"i");
    }
}
