//! The one harness every integration test uses: start the real `tickshard`
//! binary on port 0 with a temp data dir, find its listeners from the lines it
//! prints, talk to it with real clients, and always clean up.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stderr)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tickshard_client::{
    publisher::{Acked, Publisher, PublisherConfig},
    ws::{Incoming, ServerMsg, WsConn},
};
use tickshard_proto::v1 as pb;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// The three listeners of one server.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub peer: SocketAddr,
}

pub struct Server {
    child: Option<Child>,
    /// The binary it runs (`tickshard` of this build unless changed).
    bin: PathBuf,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The shard-to-shard listener (`--peer-addr`).
    pub peer: SocketAddr,
    pub dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    /// In a process group of its own (see [`TestCluster::start_apart`]).
    apart: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh temp data dir.
    pub fn start(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, args);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `dir` (kept across restarts by the caller).
    pub fn start_in(dir: &Path, args: &[&str]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Server::spawn(&this_bin(), dir, args, None, false).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Starts a server on fixed addresses (cluster pods: peers must be known
    /// before they start).
    pub fn start_at(dir: &Path, ports: Ports, args: &[&str]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Server::spawn(&this_bin(), dir, args, Some(ports), false)
            .unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Like [`Server::start_at`], but returns the log if the server refuses.
    pub fn try_start_at(dir: &Path, ports: Ports, args: &[&str]) -> Result<Server, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Server::spawn(&this_bin(), dir, args, Some(ports), false)
    }

    /// Tries to start; returns the exit status and stderr if it refuses.
    pub fn try_start_in(dir: &Path, args: &[&str]) -> Result<Server, (ExitStatus, String)> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Server::spawn(&this_bin(), dir, args.clone(), None, false).map_err(|_| {
            let log = dir.with_extension("log");
            let mut c = base_command(
                &this_bin(),
                dir,
                &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                &log,
            );
            let status = c.status().unwrap();
            (status, std::fs::read_to_string(&log).unwrap_or_default())
        })
    }

    fn spawn(bin: &Path, dir: &Path, args: Vec<String>, ports: Option<Ports>, apart: bool) -> Result<Server, String> {
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let log = dir.with_extension(format!("{}.log", fastrand::u32(..)));
        let [http, grpc, peer] = ports.map_or(
            ["127.0.0.1:0".to_string(), "127.0.0.1:0".into(), "127.0.0.1:0".into()],
            |p| [p.http.to_string(), p.grpc.to_string(), p.peer.to_string()],
        );
        let mut full = vec![
            "--http-addr".to_string(),
            http,
            "--grpc-addr".to_string(),
            grpc,
            "--peer-addr".to_string(),
            peer,
        ];
        full.extend(args.iter().cloned());
        let mut cmd = base_command(bin, dir, &full.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &log);
        cmd.stdout(Stdio::piped());
        if apart {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut h, mut g, mut p) = (None, None, None);
        let deadline = Instant::now() + WAIT;
        while h.is_none() || g.is_none() || p.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let addr = line.rsplit(' ').next().and_then(|a| a.parse().ok());
                    if line.starts_with("tickshard: http listening on ") {
                        h = addr;
                    } else if line.starts_with("tickshard: grpc listening on ") {
                        g = addr;
                    } else if line.starts_with("tickshard: peer listening on ") {
                        p = addr;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        Ok(Server {
            child: Some(child),
            bin: bin.to_path_buf(),
            http: h.unwrap(),
            grpc: g.unwrap(),
            peer: p.unwrap(),
            dir: dir.to_path_buf(),
            log,
            args,
            apart,
            _tmp: None,
        })
    }

    /// Restarts with another binary (a rolling upgrade to it).
    pub fn restart_with(&mut self, bin: &Path) {
        self.bin = bin.to_path_buf();
        self.restart();
    }

    /// Restarts on the same data dir and the same ports (after a stop or kill).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the server first");
        let deadline = Instant::now() + WAIT;
        loop {
            match Server::spawn(&self.bin, &self.dir, self.args.clone(), Some(self.ports()), self.apart) {
                Ok(mut s) => {
                    self.child = s.child.take();
                    self.log = s.log.clone();
                    return;
                }
                // the old process's ports may linger for a moment
                Err(e) if Instant::now() < deadline && e.contains("Address already in use") => {
                    std::thread::yield_now();
                }
                Err(e) => panic!("restart failed: {e}"),
            }
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }

    pub fn ports(&self) -> Ports {
        Ports {
            http: self.http,
            grpc: self.grpc,
            peer: self.peer,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM (the drain), without waiting.
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Sends a signal (`-STOP`, `-CONT`, …) to the process. (SIGKILL, which
    /// the drop sends, ends a stopped process too; a pod to be stopped runs
    /// apart: see [`TestCluster::start_apart`].)
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill {sig}");
    }

    /// Waits for the process to exit (bounded), returning its status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().unwrap();
        let pid = c.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(c.wait());
        });
        match rx.recv_timeout(within) {
            Ok(st) => st.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                let _ = rx.recv_timeout(WAIT);
                panic!("server did not exit within {within:?}\n{}", self.log_text());
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn ws(&self) -> WsConn {
        WsConn::connect(&self.ws_url(), WAIT).await.unwrap()
    }

    pub async fn publisher(&self, id: &str) -> Publisher {
        Publisher::connect(PublisherConfig::new(vec![self.grpc_url()], id))
            .await
            .unwrap()
    }

    pub async fn feed(&self) -> pb::feed_client::FeedClient<tonic::transport::Channel> {
        pb::feed_client::FeedClient::connect(self.grpc_url()).await.unwrap()
    }

    /// A client of the standard health service on the public gRPC port.
    pub async fn health(&self) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
        let channel = tonic::transport::Endpoint::from_shared(self.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
    }

    /// A client of the shard-to-shard `Cluster` service on the peer port.
    pub async fn peer(&self) -> pb::cluster_client::ClusterClient<tonic::transport::Channel> {
        pb::cluster_client::ClusterClient::connect(self.peer_url())
            .await
            .unwrap()
    }

    /// A gRPC `Subscribe`: its `Subscribed` event and the rest of the stream.
    pub async fn grpc_subscribe(&self, req: pb::SubscribeRequest) -> (pb::Subscribed, tonic::Streaming<pb::Event>) {
        use futures_util::StreamExt as _;
        let mut stream = self.feed().await.subscribe(req).await.unwrap().into_inner();
        match tokio::time::timeout(WAIT, stream.next()).await.expect("timed out") {
            Some(Ok(pb::Event {
                kind: Some(pb::event::Kind::Subscribed(s)),
            })) => (s, stream),
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    pub async fn list_symbols(&self) -> pb::ListSymbolsResponse {
        self.feed()
            .await
            .list_symbols(pb::ListSymbolsRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// GET a path on the HTTP listener: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }

    /// The value of a metric (sum over its label sets), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        metric_in(&body, name)
    }
}

/// The value of metric `name` (sum over its label sets) in a Prometheus
/// scrape `body`, 0 if absent.
pub fn metric_in(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- server log ({}) ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// The `tickshard` binary of this build.
pub fn this_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tickshard"))
}

fn base_command(bin: &Path, dir: &Path, args: &[&str], log: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--data-dir").arg(dir).args(args);
    c.env_remove("TICKSHARD_SHARD_ID");
    c.env("TICKSHARD_LOG", "info,tickshard_feed=debug,tickshard_shard::hub=debug");
    c.stdin(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
    c
}

/// Runs `tickshard args…` (stdout discarded, stderr kept) and waits for it
/// within [`WAIT`]; one still running then is killed and `stuck` is the
/// failure.
pub fn cli_output(args: &[&str], stuck: &str) -> std::process::Output {
    let child = Command::new(this_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // (never left running: the test failed)
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{stuck}");
        }
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A tick with the given decimals (ts must be unique per symbol in most tests).
pub fn tick(symbol: &str, ts: i64, price: &str, size: &str) -> pb::Tick {
    pb::Tick {
        symbol: symbol.into(),
        ts_micros: ts,
        price: price.into(),
        size: size.into(),
        ..Default::default()
    }
}

/// Publishes `ticks` and waits for every ack; panics on any rejection.
pub async fn publish_all(p: &mut Publisher, ticks: impl IntoIterator<Item = pb::Tick>) -> Vec<Acked> {
    for t in ticks {
        p.send(t).await.unwrap();
    }
    let mut acks = tokio::time::timeout(WAIT, p.flush()).await.unwrap().unwrap();
    acks.sort_by_key(|a| a.request_id);
    for a in &acks {
        assert!(a.error.is_none(), "rejected: {a:?}");
    }
    acks
}

/// Receives the next parsed message, bounded in time.
pub async fn recv(c: &mut WsConn) -> ServerMsg {
    match recv_any(c).await {
        Incoming::Text(t) => ServerMsg::parse(&t).unwrap_or_else(|| panic!("not a protocol message: {t}")),
        Incoming::Close { code, reason } => panic!("unexpected close {code} {reason}"),
    }
}

pub async fn recv_any(c: &mut WsConn) -> Incoming {
    tokio::time::timeout(WAIT, c.recv())
        .await
        .expect("timed out waiting for a frame")
        .unwrap()
}

/// The next message, which must be `subscribed`: its symbols.
pub async fn recv_subscribed(c: &mut WsConn) -> Vec<tickshard_client::ws::SymbolStatus> {
    match recv(c).await {
        ServerMsg::Subscribed { symbols, .. } => symbols,
        other => panic!("expected subscribed, got {other:?}"),
    }
}

/// The next message, which must be a snapshot.
pub async fn recv_snapshot(c: &mut WsConn) -> tickshard_client::ws::TickMsg {
    match recv(c).await {
        ServerMsg::Snapshot(s) => s,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// Waits (bounded) until the connection closes; returns the close code.
pub async fn recv_close(c: &mut WsConn) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, c.recv())
            .await
            .expect("timed out waiting for a close")
        {
            Ok(Incoming::Close { code, .. }) => return code,
            Ok(Incoming::Text(_)) => {}
            Err(e) => panic!("connection broke without a close frame: {e}"),
        }
    }
}

/// Polls `cond` until true, bounded by [`WAIT`]. For conditions with no event
/// to wait on (a metric, a background prune); never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// N pods of one cluster on loopback. Each pod gets its own address
/// 127.a.b.(10+i) (random a, b per cluster, fixed ports), so the peer list is
/// known before any pod starts and a pod restarts on the same address.
pub struct TestCluster {
    pub pods: Vec<Server>,
    pub peers: String,
    pub args: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl TestCluster {
    pub fn addrs(n: usize) -> Vec<Ports> {
        let (a, b) = (fastrand::u8(1..=254), fastrand::u8(0..=255));
        (0..n)
            .map(|i| {
                let ip = std::net::Ipv4Addr::new(127, a, b, 10 + i as u8);
                Ports {
                    http: SocketAddr::from((ip, 18080)),
                    grpc: SocketAddr::from((ip, 18051)),
                    peer: SocketAddr::from((ip, 18052)),
                }
            })
            .collect()
    }

    /// Starts `n` pods (all at once, as `podManagementPolicy: Parallel` does).
    pub fn start(n: usize, extra: &[&str]) -> TestCluster {
        Self::start_on(Self::addrs(n), extra)
    }

    /// Starts a pod on each of `addrs` (from [`TestCluster::addrs`]); peer
    /// URLs are `https://` when `extra` configures peer TLS.
    pub fn start_on(addrs: Vec<Ports>, extra: &[&str]) -> TestCluster {
        let n = addrs.len() as u32;
        Self::start_sized(addrs, n, extra)
    }

    /// Like [`TestCluster::start_on`] with `--shards shards` (pods at an
    /// ordinal at or above it own nothing until a rebalance, contract §9).
    pub fn start_sized(addrs: Vec<Ports>, shards: u32, extra: &[&str]) -> TestCluster {
        Self::start_binary(&this_bin(), addrs, shards, extra)
    }

    /// Like [`TestCluster::start_sized`], each pod in a process group of its
    /// own: for a test that stops one (SIGSTOP). In the test's group, a
    /// stopped pod is continued by the kernel (SIGHUP, then SIGCONT: the
    /// group is orphaned and has a stopped member) whenever a process of
    /// the group exits, e.g. a pod another test kills.
    pub fn start_apart(addrs: Vec<Ports>, shards: u32, extra: &[&str]) -> TestCluster {
        Self::start_with(&this_bin(), addrs, shards, extra, true)
    }

    /// Like [`TestCluster::start_sized`], every pod running `bin`.
    pub fn start_binary(bin: &Path, addrs: Vec<Ports>, shards: u32, extra: &[&str]) -> TestCluster {
        Self::start_with(bin, addrs, shards, extra, false)
    }

    fn start_with(bin: &Path, addrs: Vec<Ports>, shards: u32, extra: &[&str], apart: bool) -> TestCluster {
        let n = addrs.len();
        let tmp = tempfile::tempdir().unwrap();
        let scheme = if extra.contains(&"--peer-tls-ca") {
            "https"
        } else {
            "http"
        };
        let peers = addrs
            .iter()
            .map(|p| format!("{scheme}://{}", p.peer))
            .collect::<Vec<_>>()
            .join(",");
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let dir = tmp.path().join(format!("pod-{i}"));
                let ports = addrs[i];
                let mut a = vec![
                    "--no-sim".to_string(),
                    "--shards".into(),
                    shards.to_string(),
                    "--shard-id".into(),
                    i.to_string(),
                    "--peers".into(),
                    peers.clone(),
                ];
                a.extend(args.iter().cloned());
                let bin = bin.to_path_buf();
                std::thread::spawn(move || {
                    Server::spawn(&bin, &dir, a, Some(ports), apart)
                        .unwrap_or_else(|e| panic!("server did not start: {e}"))
                })
            })
            .collect();
        let pods = handles.into_iter().map(|h| h.join().unwrap()).collect();
        TestCluster {
            pods,
            peers,
            args,
            _tmp: tmp,
        }
    }

    pub fn ws_urls(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.ws_url()).collect()
    }

    pub fn grpc_urls(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.grpc_url()).collect()
    }

    /// Waits (bounded) until every pod's peer links are up.
    pub async fn wait_linked(&self) {
        let n = self.pods.len() as f64;
        for p in &self.pods {
            eventually("peer links up", || async {
                p.metric("tickshard_peer_up").await >= n - 1.0
            })
            .await;
        }
    }
}

/// A masked client text frame (mask key 0, so the payload reads as is).
pub fn client_frame(payload: &[u8]) -> Vec<u8> {
    raw_frame(0x81, payload, true)
}

/// Any frame by hand: `first` is the first header byte (FIN, RSV, opcode);
/// `masked` with mask key 0 (the payload reads as is).
pub fn raw_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => f.push(mask_bit | n as u8),
        n => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&[0, 0, 0, 0]);
    }
    f.extend_from_slice(payload);
    f
}

/// A WebSocket connection by hand: the upgrade request (and `first`, in the
/// same write); returns the stream and the bytes read past the response.
pub async fn raw_ws(srv: &Server, first: &[u8]) -> (tokio::net::TcpStream, Vec<u8>) {
    let s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(srv.http))
        .await
        .unwrap()
        .unwrap();
    raw_ws_over(s, first).await
}

/// [`raw_ws`] over a connection the caller made (to set socket options).
pub async fn raw_ws_over(mut s: tokio::net::TcpStream, first: &[u8]) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    req.extend_from_slice(first);
    s.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 1024];
        let got = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(got > 0, "no upgrade response");
        buf.extend_from_slice(&chunk[..got]);
    };
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
    buf.drain(..end);
    (s, buf)
}

/// Reads server text frames until `n` have arrived; returns their payloads.
pub async fn read_server_frames(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, n: usize) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    while out.len() < n {
        let frame = (buf.len() >= 2)
            .then(|| match buf[1] & 0x7f {
                126 if buf.len() >= 4 => Some((4, u16::from_be_bytes([buf[2], buf[3]]) as usize)),
                126 | 127 => None,
                l => Some((2, l as usize)),
            })
            .flatten()
            .filter(|(h, l)| buf.len() >= h + l);
        if let Some((h, l)) = frame {
            if buf[0] & 0x0f == 1 {
                out.push(String::from_utf8_lossy(&buf[h..h + l]).into_owned());
            }
            buf.drain(..h + l);
            continue;
        }
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(got > 0, "server closed; frames so far: {out:?}");
        buf.extend_from_slice(&chunk[..got]);
    }
    out
}

/// Reads until the server's close frame; returns its code (panics if the
/// connection ends without one).
pub async fn read_close_code(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> u16 {
    use tokio::io::AsyncReadExt;
    loop {
        // skip whole frames that are not a close
        while buf.len() >= 2 {
            let (h, l) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                126 | 127 => break,
                l => (2, l as usize),
            };
            if buf.len() < h + l {
                break;
            }
            if buf[0] & 0x0f == 8 && l >= 2 {
                return u16::from_be_bytes([buf[h], buf[h + 1]]);
            }
            buf.drain(..h + l);
        }
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(got > 0, "the connection ended without a close frame");
        buf.extend_from_slice(&chunk[..got]);
    }
}

pub fn req(id: u64, publisher: &str, pseq: u64, t: pb::Tick) -> pb::PublishRequest {
    pb::PublishRequest {
        request_id: id,
        publisher_id: publisher.into(),
        publisher_seq: pseq,
        tick: Some(t),
    }
}

/// A raw Publish stream: send requests, read acks one by one.
pub struct RawStream {
    pub tx: tokio::sync::mpsc::Sender<pb::PublishRequest>,
    pub acks: tonic::Streaming<pb::PublishAck>,
}

impl RawStream {
    pub async fn open(srv: &Server) -> RawStream {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let acks = srv.feed().await.publish(out).await.unwrap().into_inner();
        RawStream { tx, acks }
    }

    pub async fn call(&mut self, r: pb::PublishRequest) -> pb::PublishAck {
        self.tx.send(r).await.unwrap();
        tokio::time::timeout(WAIT, self.acks.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }
}

/// Every tick of `symbol` from seq `from` on, through `GetHistory` pages.
pub async fn history(srv: &Server, symbol: &str, from: u64) -> Vec<pb::Tick> {
    let mut out = Vec::new();
    let mut from = from;
    loop {
        let h = srv
            .feed()
            .await
            .get_history(pb::HistoryRequest {
                symbol: symbol.into(),
                from_seq: from,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let more = h.truncated;
        from = h.ticks.last().map_or(from, |t| t.seq + 1);
        out.extend(h.ticks);
        if !more {
            return out;
        }
    }
}

/// A certificate authority made in the test (rcgen), for TLS tests.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), good for a
    /// server and a client: `(certificate PEM, key PEM)`.
    pub fn leaf(&self, names: &[String]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(names.to_vec()).unwrap();
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `ca.pem`, `NAME.crt` and `NAME.key` (a leaf for `names`) into
    /// `dir`; returns the three paths as strings.
    pub fn write(&self, dir: &Path, name: &str, names: &[String]) -> [String; 3] {
        let (cert, key) = self.leaf(names);
        let paths = [
            dir.join("ca.pem"),
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        ];
        for (p, body) in paths.iter().zip([self.pem(), cert, key]) {
            std::fs::write(p, body).unwrap();
        }
        paths.map(|p| p.display().to_string())
    }
}

/// A gRPC request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}
