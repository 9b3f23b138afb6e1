//! A minimal raw WebSocket client.

use std::net::IpAddr;

/// A minimal WebSocket client for the generator: it reads raw bytes and walks
/// the (unmasked, unfragmented) server frames in its buffer, one `read` per
/// many frames — far cheaper than a general client, so the server, not the
/// generator, is what gets measured.
pub(crate) struct RawWs {
    sock: Sock,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A plain or a TLS connection.
type Sock =
    tokio_util::either::Either<tokio::net::TcpStream, Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

/// Credentials and trust of the generator's connections.
#[derive(Clone, Default)]
pub(crate) struct Access {
    /// A bearer token (`--token`) for every connection and stream.
    pub token: Option<std::sync::Arc<str>>,
    /// The CAs for `wss://` and `https://` (`--ca-cert`).
    pub trust: Option<tickshard_client::tls::Trust>,
}

impl RawWs {
    /// Connects and upgrades. `buf_bytes` is the initial read buffer (it grows
    /// for a frame that does not fit): small for idle connections, so the
    /// generator's own page faults do not bound the connect rate.
    pub(crate) async fn connect(
        url: &str,
        local_ip: Option<IpAddr>,
        recv_buffer: Option<u32>,
        buf_bytes: usize,
        access: &Access,
    ) -> Result<RawWs, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tls, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => return Err("ws:// or wss:// URL expected".into()),
        };
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "ws".to_string()), |(h, p)| (h, p.to_string()));
        let addr = tokio::net::lookup_host(host)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(ip) = local_ip {
            sock.bind(std::net::SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        if let Some(n) = recv_buffer {
            let _ = sock.set_recv_buffer_size(n);
        }
        let tcp = sock.connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut s: Sock = match (tls, &access.trust) {
            (false, _) => Sock::Left(tcp),
            (true, Some(t)) => Sock::Right(Box::new(
                t.connect(tickshard_client::tls::host_of(host), tcp)
                    .await
                    .map_err(|e| e.to_string())?,
            )),
            (true, None) => return Err(format!("{url} is TLS: pass --ca-cert")),
        };
        let auth = access
            .token
            .as_ref()
            .map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; buf_bytes.max(1024)];
        let mut end = 0;
        let head_end = loop {
            if end == buf.len() {
                return Err("handshake response larger than the read buffer".into());
            }
            let n = s.read(&mut buf[end..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during handshake".into());
            }
            end += n;
            if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            return Err(String::from_utf8_lossy(&buf[..head_end.min(64)]).into_owned());
        }
        Ok(RawWs {
            sock: s,
            buf,
            start: head_end,
            end,
        })
    }

    /// Sends a text frame (masked with a zero key, as a client must).
    pub(crate) async fn send_text(&mut self, text: &str) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let len = text.len();
        let mut f = vec![0x81u8];
        if len < 126 {
            f.push(0x80 | len as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(text.as_bytes());
        self.sock.write_all(&f).await.map_err(|e| e.to_string())
    }

    /// Reads once and calls `f` for every complete text frame with the time
    /// the read returned (µs since the epoch, read once per call: every frame
    /// in the buffer had arrived by then); `None` on close.
    pub(crate) async fn read_frames(&mut self, mut f: impl FnMut(&[u8], u64)) -> Option<usize> {
        use tokio::io::AsyncReadExt;
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                // a frame longer than the buffer
                self.buf.resize(self.buf.len() * 2, 0);
            } else {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
        }
        let mut frames = 0;
        // first use frames already buffered (from the handshake read)
        if self.start == self.end || !self.has_frame() {
            let n = self.sock.read(&mut self.buf[self.end..]).await.ok()?;
            if n == 0 {
                return None;
            }
            self.end += n;
        }
        let now = crate::measure::now_us();
        while let Some((opcode, hl, len)) = complete_frame(&self.buf[self.start..self.end]) {
            if opcode == 0x8 {
                return None;
            }
            if opcode == 0x1 || opcode == 0x2 {
                f(&self.buf[self.start + hl..self.start + hl + len], now);
                frames += 1;
            }
            self.start += hl + len;
        }
        Some(frames)
    }

    fn has_frame(&self) -> bool {
        complete_frame(&self.buf[self.start..self.end]).is_some()
    }
}

/// The first frame of `b` if it is complete: (opcode, header length, payload
/// length). Server frames are unmasked.
fn complete_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (hl, len): (usize, usize) = match *b.get(1)? & 0x7f {
        126 => (4, usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]))),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)).ok()?,
        ),
        l => (2, usize::from(l)),
    };
    (b.len() >= hl.checked_add(len)?).then_some((b[0] & 0x0f, hl, len))
}

#[cfg(test)]
mod tests {
    use super::complete_frame;

    #[test]
    fn complete_frames_only() {
        assert_eq!(complete_frame(&[0x81, 2, b'h', b'i']), Some((1, 2, 2)));
        assert_eq!(complete_frame(&[0x81, 3, b'h', b'i']), None);
        assert_eq!(complete_frame(&[0x81]), None);
        let mut long = vec![0x82, 126, 0, 200];
        long.extend(std::iter::repeat_n(0, 200));
        assert_eq!(complete_frame(&long), Some((2, 4, 200)));
        assert_eq!(complete_frame(&long[..100]), None);
        assert_eq!(
            complete_frame(&[0x81, 127, 255, 255, 255, 255, 255, 255, 255, 255]),
            None
        );
    }
}
