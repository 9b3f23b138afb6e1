//! WebSocket client: raw connection and a resuming subscriber.

use std::{collections::HashMap, future::Future, time::Duration};

use bytes::Bytes;
pub use fastwebsockets::OpCode;
use fastwebsockets::{Frame, Payload, WebSocket, handshake};
use http_body_util::Empty;
use hyper::{Request, header, upgrade::Upgraded};
use hyper_util::rt::TokioIo;
use simd_json::{OwnedValue, prelude::*};
use tokio::net::TcpStream;

use super::{Backoff, ClientError};

struct Spawner;

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[expect(
        clippy::disallowed_methods,
        reason = "the client library's connection tasks: a client, not the server's drain"
    )]
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// A frame as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Text(String),
    Close { code: u16, reason: String },
}

/// Socket options for [`WsConn::connect_with`].
#[derive(Clone, Debug, Default)]
pub struct ConnectOpts {
    /// A bearer token for the upgrade (`Authorization: Bearer …`).
    pub token: Option<String>,
    /// The CAs a `wss://` server's certificate is verified against.
    pub trust: Option<crate::tls::Trust>,
    /// A small receive buffer makes a slow reader fall behind quickly (tests).
    pub recv_buffer: Option<u32>,
    /// Source address: spreading connections over 127.0.0.x gives each its own
    /// ephemeral port range (tens of thousands of connections).
    pub local_ip: Option<std::net::IpAddr>,
}

/// One WebSocket connection to a tickshard server.
pub struct WsConn {
    ws: WebSocket<TokioIo<Upgraded>>,
    /// Pings received from the server so far.
    pub pings: u64,
    /// Whether pings are answered. This connection answers them itself
    /// (fastwebsockets' own answer hides a ping from the reader, and a
    /// ping is what tells [`WsConn::recv_within`] that a quiet server lives).
    answer_pings: bool,
}

/// `ws[s]://host:port/path` → (`host:port`, `path`, TLS?).
fn split_url(url: &str) -> Result<(String, String, bool), ClientError> {
    let (tls, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(ClientError::BadAddress(format!("{url} (expected ws:// or wss://)"))),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/ws"),
    };
    Ok((host.to_string(), path.to_string(), tls))
}

/// The CAs a connection to `url` uses: none without TLS, and an error for
/// TLS without any.
fn trust_for(
    url: &str,
    tls: bool,
    trust: Option<&crate::tls::Trust>,
) -> Result<Option<crate::tls::Trust>, ClientError> {
    match (tls, trust) {
        (false, _) => Ok(None),
        (true, Some(t)) => Ok(Some(t.clone())),
        (true, None) => Err(ClientError::Input(format!(
            "{url} is TLS: pass --ca-cert with the CA that signed its certificate"
        ))),
    }
}

impl WsConn {
    /// Connects and upgrades, within `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<WsConn, ClientError> {
        Self::connect_with(url, timeout, ConnectOpts::default()).await
    }

    /// Like [`WsConn::connect`], with socket options.
    pub async fn connect_with(url: &str, timeout: Duration, opts: ConnectOpts) -> Result<WsConn, ClientError> {
        let (host, path, tls) = split_url(url)?;
        let trust = trust_for(url, tls, opts.trust.as_ref())?;
        let fut = async {
            let addr = tokio::net::lookup_host(&host)
                .await
                .map_err(|e| ClientError::Connect {
                    addr: host.clone(),
                    message: e.to_string(),
                })?
                .next()
                .ok_or_else(|| ClientError::BadAddress(host.clone()))?;
            let sock = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(|e| ClientError::Connect {
                addr: host.clone(),
                message: e.to_string(),
            })?;
            if let Some(n) = opts.recv_buffer {
                let _ = sock.set_recv_buffer_size(n);
            }
            if let Some(ip) = opts.local_ip {
                sock.bind(std::net::SocketAddr::new(ip, 0))
                    .map_err(|e| ClientError::Connect {
                        addr: host.clone(),
                        message: format!("bind {ip}: {e}"),
                    })?;
            }
            let stream: TcpStream = sock.connect(addr).await.map_err(|e| ClientError::Connect {
                addr: host.clone(),
                message: e.to_string(),
            })?;
            let _ = stream.set_nodelay(true);
            let req = Request::builder()
                .method("GET")
                .uri(&path)
                .header(header::HOST, &host)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "upgrade")
                .header("Sec-WebSocket-Key", handshake::generate_key())
                .header("Sec-WebSocket-Version", "13");
            let req = match &opts.token {
                Some(t) => req.header(header::AUTHORIZATION, format!("Bearer {t}")),
                None => req,
            };
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| ClientError::BadAddress(e.to_string()))?;
            let upgraded = match trust {
                None => handshake::client(&Spawner, req, stream).await,
                Some(t) => {
                    let s = t.connect(crate::tls::host_of(&host), stream).await?;
                    handshake::client(&Spawner, req, s).await
                }
            };
            let (ws, _) = upgraded.map_err(|e| ClientError::Connect {
                addr: host.clone(),
                message: e.to_string(),
            })?;
            let mut ws = ws;
            ws.set_auto_pong(false);
            Ok(WsConn {
                ws,
                pings: 0,
                answer_pings: true,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout("websocket connect"))?
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.ws
            .write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    /// Sends any frame (tests use it for binary, fragmented and oversized frames).
    pub async fn send_frame(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) -> Result<(), ClientError> {
        self.ws
            .write_frame(Frame::new(fin, opcode, None, Payload::Borrowed(payload)))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    /// The next text or close frame (pings are answered automatically).
    pub async fn recv(&mut self) -> Result<Incoming, ClientError> {
        self.recv_within(None).await
    }

    /// [`recv`](Self::recv), failing with [`ClientError::Timeout`] when no
    /// frame at all (a ping included) comes for `silence`: a connection
    /// whose server or path died without a FIN (a lost node, a partition)
    /// is noticed in that time, not the kernel's minutes. After a timeout
    /// the connection may be cut inside a frame: drop it.
    pub async fn recv_within(&mut self, silence: Option<Duration>) -> Result<Incoming, ClientError> {
        loop {
            let read = self.ws.read_frame();
            let f = match silence {
                Some(s) => tokio::time::timeout(s, read)
                    .await
                    .map_err(|_| ClientError::Timeout("no frame from the server (not even a ping)"))?,
                None => read.await,
            }
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
            match f.opcode {
                OpCode::Text => return Ok(Incoming::Text(String::from_utf8_lossy(&f.payload).into_owned())),
                OpCode::Close => {
                    let code = f.payload.get(..2).map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default()).into_owned();
                    return Ok(Incoming::Close { code, reason });
                }
                OpCode::Ping => {
                    let payload = f.payload.to_vec();
                    match silence {
                        Some(s) => tokio::time::timeout(s, self.pong(payload))
                            .await
                            .map_err(|_| ClientError::Timeout("the server takes no pong"))??,
                        None => self.pong(payload).await?,
                    }
                }
                _ => {}
            }
        }
    }

    /// Counts a ping and answers it (unless told not to).
    async fn pong(&mut self, payload: Vec<u8>) -> Result<(), ClientError> {
        self.pings += 1;
        if self.answer_pings {
            self.ws
                .write_frame(Frame::pong(Payload::Owned(payload)))
                .await
                .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether server pings are answered (the default); tests turn it off to
    /// play a dead client.
    pub fn set_auto_pong(&mut self, on: bool) {
        self.answer_pings = on;
    }

    /// The next frame's payload, for load generators: text payloads are
    /// returned raw (no UTF-8 copy); `None` on close or error.
    pub async fn recv_raw(&mut self, mut f: impl FnMut(&[u8])) -> Option<()> {
        loop {
            let frame = self.ws.read_frame().await.ok()?;
            match frame.opcode {
                OpCode::Text => {
                    f(&frame.payload);
                    return Some(());
                }
                OpCode::Close => return None,
                OpCode::Ping => {
                    let payload = frame.payload.to_vec();
                    self.pong(payload).await.ok()?;
                }
                _ => {}
            }
        }
    }

    /// Sends a close frame.
    pub async fn close(&mut self) {
        let _ = self.ws.write_frame(Frame::close(1000, b"")).await;
    }
}

/// A tick or snapshot as received, decimals kept as the exact strings sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickMsg {
    pub symbol: String,
    pub seq: u64,
    pub ts: i64,
    pub price: String,
    pub size: String,
    pub bid: Option<String>,
    pub ask: Option<String>,
    pub bid_size: Option<String>,
    pub ask_size: Option<String>,
    /// Snapshots only.
    pub epoch: Option<String>,
    pub conflated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandleMsg {
    pub symbol: String,
    pub interval: String,
    pub start: i64,
    pub open: String,
    pub high: String,
    pub low: String,
    pub close: String,
    pub volume: String,
    pub count: u64,
    pub closed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolStatus {
    pub symbol: String,
    pub epoch: String,
    pub seq: u64,
    pub recovered: bool,
}

/// A server message of protocol v1, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMsg {
    Subscribed {
        id: Option<String>,
        symbols: Vec<SymbolStatus>,
    },
    Snapshot(TickMsg),
    Tick(TickMsg),
    Candle(CandleMsg),
    Unsubscribed {
        id: Option<String>,
        symbols: Vec<String>,
    },
    Pong {
        id: Option<String>,
    },
    Symbols {
        id: Option<String>,
        symbols: Vec<String>,
    },
    Error {
        id: Option<String>,
        code: String,
        message: String,
        symbol: Option<String>,
    },
}

fn s(v: &OwnedValue, k: &str) -> Option<String> {
    v.get(k).and_then(|x| x.as_str()).map(str::to_owned)
}

fn strings(v: &OwnedValue, k: &str) -> Vec<String> {
    v.get(k)
        .and_then(|x| x.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The id as the raw JSON text it was sent as (`1`, `"abc"`).
fn id(v: &OwnedValue) -> Option<String> {
    v.get("id").map(|x| x.encode())
}

impl ServerMsg {
    /// Parses a text frame; `None` if it is not a protocol v1 message.
    pub fn parse(text: &str) -> Option<ServerMsg> {
        let mut buf = text.as_bytes().to_vec();
        let v = simd_json::to_owned_value(&mut buf).ok()?;
        let tick = |v: &OwnedValue| -> Option<TickMsg> {
            Some(TickMsg {
                symbol: s(v, "symbol")?,
                seq: v.get("seq")?.as_u64()?,
                ts: v.get("ts")?.as_i64()?,
                price: s(v, "price")?,
                size: s(v, "size")?,
                bid: s(v, "bid"),
                ask: s(v, "ask"),
                bid_size: s(v, "bid_size"),
                ask_size: s(v, "ask_size"),
                epoch: s(v, "epoch"),
                conflated: v.get("conflated").and_then(|c| c.as_bool()).unwrap_or(false),
            })
        };
        Some(match v.get("type")?.as_str()? {
            "tick" => ServerMsg::Tick(tick(&v)?),
            "snapshot" => ServerMsg::Snapshot(tick(&v)?),
            "candle" => ServerMsg::Candle(CandleMsg {
                symbol: s(&v, "symbol")?,
                interval: s(&v, "interval")?,
                start: v.get("start")?.as_i64()?,
                open: s(&v, "open")?,
                high: s(&v, "high")?,
                low: s(&v, "low")?,
                close: s(&v, "close")?,
                volume: s(&v, "volume")?,
                count: v.get("count")?.as_u64()?,
                closed: v.get("closed")?.as_bool()?,
            }),
            "subscribed" => ServerMsg::Subscribed {
                id: id(&v),
                symbols: v
                    .get("symbols")?
                    .as_array()?
                    .iter()
                    .filter_map(|e| {
                        Some(SymbolStatus {
                            symbol: s(e, "symbol")?,
                            epoch: s(e, "epoch")?,
                            seq: e.get("seq")?.as_u64()?,
                            recovered: e.get("recovered")?.as_bool()?,
                        })
                    })
                    .collect(),
            },
            "unsubscribed" => ServerMsg::Unsubscribed {
                id: id(&v),
                symbols: strings(&v, "symbols"),
            },
            "pong" => ServerMsg::Pong { id: id(&v) },
            "symbols" => ServerMsg::Symbols {
                id: id(&v),
                symbols: strings(&v, "symbols"),
            },
            "error" => ServerMsg::Error {
                id: id(&v),
                code: s(&v, "code")?,
                message: s(&v, "message").unwrap_or_default(),
                symbol: s(&v, "symbol"),
            },
            _ => return None,
        })
    }
}

/// What a [`Subscriber`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// (Re)connected to this URL and (re)subscribed.
    Connected {
        url: String,
    },
    Message(ServerMsg),
    /// The connection ended (close code, or `None` for a broken connection);
    /// the next call reconnects and resumes.
    Disconnected {
        code: Option<u16>,
        reason: String,
    },
}

/// The default [`SubscriberConfig::silence`]: four of the server's default
/// ping intervals.
pub const SILENCE: Duration = Duration::from_secs(60);

/// Subscriber configuration.
#[derive(Clone, Debug)]
pub struct SubscriberConfig {
    pub urls: Vec<String>,
    pub symbols: Vec<String>,
    pub channels: Vec<String>,
    pub connect_timeout: Duration,
    /// A connection that brings no frame (a ping included) for this long is
    /// taken for dead and replaced, resuming ([`SILENCE`]; the server pings
    /// every 15 s by default).
    pub silence: Duration,
    /// A bearer token for every (re)connection.
    pub token: Option<String>,
    /// For `wss://` URLs: the CAs to trust.
    pub trust: Option<crate::tls::Trust>,
}

/// The last position seen of a symbol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub seq: u64,
    pub epoch: String,
}

/// A WebSocket subscriber that reconnects to any address in its list and
/// resumes every symbol from the last `{seq, epoch}` it saw.
pub struct Subscriber {
    cfg: SubscriberConfig,
    conn: Option<WsConn>,
    next_url: usize,
    backoff: Backoff,
    positions: HashMap<String, Pos>,
    /// The text of the last message received, as the server sent it.
    raw: String,
    /// The current (or last) connection has brought no data (tick,
    /// snapshot, candle) yet: a server that closes such connections at once
    /// (a subscribe it refuses whole, 1008, 1009) is retried with growing
    /// pauses, not in a hot loop.
    quiet: bool,
}

impl Subscriber {
    /// Checks the configuration first: at least one URL, each `ws://` or
    /// `wss://`, and CAs to trust for `wss://` (a mistake no reconnect
    /// fixes is an error here, not a silent retry loop).
    pub fn new(cfg: SubscriberConfig) -> Result<Subscriber, ClientError> {
        if cfg.urls.is_empty() {
            return Err(ClientError::BadAddress("no WebSocket URL given".into()));
        }
        for url in &cfg.urls {
            let (_, _, tls) = split_url(url)?;
            trust_for(url, tls, cfg.trust.as_ref())?;
        }
        let start = fastrand::usize(..cfg.urls.len());
        Ok(Subscriber {
            cfg,
            conn: None,
            next_url: start,
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(250)),
            positions: HashMap::new(),
            raw: String::new(),
            quiet: false,
        })
    }

    /// The JSON text of the message [`Subscriber::next`] returned last.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Starts from the given next URL index (tests use it to pick a pod).
    pub fn starting_at(mut self, index: usize) -> Subscriber {
        self.next_url = index;
        self
    }

    pub fn positions(&self) -> &HashMap<String, Pos> {
        &self.positions
    }

    fn subscribe_message(&self) -> String {
        // Every string escaped: a symbol or epoch with a quote in it (typed
        // by a user, or sent by a server) cannot change the request's shape.
        let quoted = |s: &str| OwnedValue::String(s.to_owned()).encode();
        let mut resume = String::new();
        for (sym, p) in &self.positions {
            if p.epoch.is_empty() {
                continue;
            }
            if !resume.is_empty() {
                resume.push(',');
            }
            resume.push_str(&format!(
                "{}:{{\"seq\":{},\"epoch\":{}}}",
                quoted(sym),
                p.seq,
                quoted(&p.epoch)
            ));
        }
        let list = |v: &[String]| v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(",");
        format!(
            "{{\"op\":\"subscribe\",\"id\":\"sub\",\"symbols\":[{}],\"channels\":[{}],\"resume\":{{{resume}}}}}",
            list(&self.cfg.symbols),
            list(&self.cfg.channels)
        )
    }

    async fn connect(&mut self) -> String {
        loop {
            let url = self.cfg.urls[self.next_url % self.cfg.urls.len()].clone();
            self.next_url = self.next_url.wrapping_add(1);
            let opts = ConnectOpts {
                token: self.cfg.token.clone(),
                trust: self.cfg.trust.clone(),
                ..ConnectOpts::default()
            };
            match WsConn::connect_with(&url, self.cfg.connect_timeout, opts).await {
                Ok(mut c) => {
                    let msg = self.subscribe_message();
                    if c.send_text(&msg).await.is_ok() {
                        self.conn = Some(c);
                        self.quiet = true;
                        return url;
                    }
                }
                Err(e) => tracing::debug!(%url, error = %e, "connect failed"),
            }
            tokio::time::sleep(self.backoff.next_delay()).await;
        }
    }

    /// The next event; connects (and resumes) first when not connected.
    /// Not cancel-safe: a call dropped while it reads (raced in a `select!`
    /// or under a timeout) may cut the connection inside a frame; keep
    /// calling it from one place.
    pub async fn next(&mut self) -> Event {
        let Some(conn) = self.conn.as_mut() else {
            if self.quiet {
                tokio::time::sleep(self.backoff.next_delay()).await;
            }
            let url = self.connect().await;
            return Event::Connected { url };
        };
        match conn.recv_within(Some(self.cfg.silence)).await {
            Ok(Incoming::Text(t)) => {
                let msg = match ServerMsg::parse(&t) {
                    Some(m) => {
                        self.track(&m);
                        if matches!(m, ServerMsg::Tick(_) | ServerMsg::Snapshot(_) | ServerMsg::Candle(_)) {
                            // (data came: the connection works; a reply alone,
                            // then a close, is retried with pauses)
                            self.quiet = false;
                            self.backoff.reset();
                        }
                        m
                    }
                    None => ServerMsg::Error {
                        id: None,
                        code: "client_parse".into(),
                        message: t.clone(),
                        symbol: None,
                    },
                };
                self.raw = t;
                Event::Message(msg)
            }
            Ok(Incoming::Close { code, reason }) => {
                self.conn = None;
                Event::Disconnected {
                    code: Some(code),
                    reason,
                }
            }
            Err(e) => {
                self.conn = None;
                Event::Disconnected {
                    code: None,
                    reason: e.to_string(),
                }
            }
        }
    }

    fn track(&mut self, m: &ServerMsg) {
        match m {
            ServerMsg::Subscribed { symbols, .. } => {
                for s in symbols {
                    let p = self.positions.entry(s.symbol.clone()).or_default();
                    if p.epoch != s.epoch {
                        // A new history: the snapshot that follows sets the seq.
                        *p = Pos {
                            seq: 0,
                            epoch: s.epoch.clone(),
                        };
                    }
                }
            }
            ServerMsg::Snapshot(t) => {
                let p = self.positions.entry(t.symbol.clone()).or_default();
                p.seq = t.seq;
                if let Some(e) = &t.epoch {
                    p.epoch = e.clone();
                }
            }
            ServerMsg::Tick(t) => {
                let p = self.positions.entry(t.symbol.clone()).or_default();
                p.seq = p.seq.max(t.seq);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(urls: &[&str], symbols: &[&str]) -> SubscriberConfig {
        SubscriberConfig {
            urls: urls.iter().map(|s| s.to_string()).collect(),
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            channels: vec!["ticks".into()],
            connect_timeout: Duration::from_secs(1),
            silence: SILENCE,
            token: None,
            trust: None,
        }
    }

    #[test]
    fn a_configuration_no_reconnect_can_fix_is_refused_up_front() {
        assert!(matches!(
            Subscriber::new(cfg(&[], &["A"])),
            Err(ClientError::BadAddress(_))
        ));
        assert!(matches!(
            Subscriber::new(cfg(&["ws://127.0.0.1:1/ws", "http://127.0.0.1:1/ws"], &["A"])),
            Err(ClientError::BadAddress(_))
        ));
        assert!(matches!(
            Subscriber::new(cfg(&["wss://localhost:1/ws"], &["A"])),
            Err(ClientError::Input(_))
        ));
        assert!(Subscriber::new(cfg(&["ws://127.0.0.1:1"], &["A"])).is_ok());
    }

    #[test]
    fn the_subscribe_request_keeps_its_shape_whatever_the_strings() {
        let odd = "A\",\"channels\":[\"x\\\n";
        let mut sub = Subscriber::new(cfg(&["ws://127.0.0.1:1/ws"], &[odd, "B"])).expect("valid configuration");
        sub.positions.insert(
            "C\"}".into(),
            Pos {
                seq: 7,
                epoch: "e\"1".into(),
            },
        );
        let mut text = sub.subscribe_message().into_bytes();
        let v = simd_json::to_owned_value(&mut text).expect("the request is JSON");
        let symbols: Vec<&str> = v["symbols"]
            .as_array()
            .expect("symbols")
            .iter()
            .filter_map(|s| s.as_str())
            .collect();
        assert_eq!(symbols, [odd, "B"]);
        assert_eq!(v["channels"].as_array().map(|a| a.len()), Some(1));
        assert_eq!(v["resume"]["C\"}"]["seq"].as_u64(), Some(7));
        assert_eq!(v["resume"]["C\"}"]["epoch"].as_str(), Some("e\"1"));
    }
}
