//! The serving process: `run` takes bound listeners and a shutdown token, so a
//! test binds port 0 and never waits on a sleep. It owns the lifecycle:
//! start → ready → (signal) → drain → flush → exit.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{FutureExt as _, future::Either};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tickshard_shard::{
    domain::{HISTORY_LIMIT_MAX, HistoryQuery, Interval, Symbol},
    hub::Close,
    metrics as m,
    node::{Node, NodeError},
    tasks,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{Anonymous, Auth, AuthError, Denied, Principal},
    config::ServeConfig,
    grpc, http,
    shared::{Closable, ReadLimit, Shared},
    sim,
    tls::ReloadingTls,
    ws,
    ws::json,
};

/// Bound listeners, handed to [`run`].
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    /// The shard-to-shard listener (`--peer-addr`, the `Cluster` service only).
    pub peer: TcpListener,
    /// Where both gRPC listeners and their connections run: the binary gives
    /// them a runtime of their own (`tickshard-grpc`), so that a
    /// publish is read and its ack written at once instead of queueing behind
    /// thousands of WebSocket writers a popular tick woke on the main runtime
    /// (issue 14: publishers are never throttled by subscribers). `None`:
    /// the current runtime.
    pub grpc_runtime: Option<tokio::runtime::Handle>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Cluster(#[from] tickshard_shard::cluster::ClusterError),
    #[error("gRPC server: {0}")]
    Grpc(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("verification keys: {0}")]
    Keys(#[from] crate::auth::KeyError),
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Serves until `shutdown` is cancelled, then drains (contract §7) and returns.
/// `started` is called once the store is open and both listeners serve (the
/// binary prints the listening addresses then).
pub async fn run(
    cfg: ServeConfig,
    listeners: Listeners,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    started: impl FnOnce(),
) -> Result<(), RunError> {
    // The public TLS files serve two listeners with their own ALPN: HTTP/1.1
    // (with WebSocket upgrades) and HTTP/2 for gRPC.
    let http_tls = cfg
        .tls
        .clone()
        .map(|f| ReloadingTls::load(f, &[b"http/1.1"], "tls"))
        .transpose()?;
    let tls = cfg
        .tls
        .clone()
        .map(|f| ReloadingTls::load(f, &[b"h2"], "tls"))
        .transpose()?;
    let peer_tls = cfg
        .peer_tls
        .clone()
        .map(|f| ReloadingTls::load(f, &[b"h2"], "peer_tls"))
        .transpose()?;
    let auth = Auth::load(cfg.auth.clone())?;
    if peer_tls.is_none()
        && let Ok(addr) = listeners.peer.local_addr()
    {
        let why = "peer links are plaintext and unauthenticated: whoever reaches the peer port can act as a shard; \
                   set --peer-tls-cert, --peer-tls-key and --peer-tls-ca for mutual TLS";
        if auth.has_keys() {
            // tokens guard the public ports, but not this one
            tracing::error!(peer_addr = %addr, "{why} (tokens do not protect the peer port)");
        } else {
            tracing::warn!(peer_addr = %addr, "{why}");
        }
    }
    match (auth.has_keys(), auth.anonymous_mode()) {
        (_, Anonymous::All) => tracing::warn!(
            "anyone who reaches this server may read and publish every symbol (--anonymous all); \
             configure --auth-jwks or --auth-hs256-secret-file for tokens"
        ),
        (_, Anonymous::Subscribe) => {
            tracing::info!("callers without a token may read every symbol; publishing needs a token")
        }
        (true, Anonymous::None) => tracing::info!("every call needs a token"),
        (false, Anonymous::None) => {
            tracing::warn!("--anonymous none without a verification key: nobody can do anything")
        }
    }
    let node_cfg = cfg.node.clone();
    let node = tokio::task::spawn_blocking(move || Node::open(node_cfg)).await??;
    node.check_cluster().await?;
    let background = CancellationToken::new();
    let bg_tracker = TaskTracker::new();
    node.start_background(&bg_tracker, background.clone());

    let shared = Arc::new(Shared {
        node: node.clone(),
        ws: cfg.ws.clone(),
        publish_window: cfg.publish_window,
        publish_budget: Arc::new(Semaphore::new(cfg.publish_max_in_flight)),
        publish_max_in_flight: cfg.publish_max_in_flight,
        draining: CancellationToken::new(),
        stopping: CancellationToken::new(),
        ready: AtomicBool::new(false),
        metrics,
        conns: Mutex::new(HashMap::new()),
        tracker: TaskTracker::new(),
        ws_permits: Arc::new(Semaphore::new(cfg.max_connections)),
        auth: auth.clone(),
        allowed_origins: cfg.allowed_origins.clone(),
        reads: ReadLimit::new(cfg.grpc.max_reads),
        ws_sent: [
            metrics::counter!(m::MESSAGES_SENT, "protocol" => "ws"),
            metrics::counter!(m::BYTES_SENT, "protocol" => "ws"),
            metrics::counter!(m::WS_DIRECT_WRITES, "outcome" => "whole"),
            metrics::counter!(m::WS_DIRECT_WRITES, "outcome" => "partial"),
        ],
    });

    let http_stop = CancellationToken::new();
    let http_conns = TaskTracker::new();
    // The listeners' and the simulator's own tasks (awaited one by one below).
    let lifecycle = TaskTracker::new();
    let http_task = {
        let shared = shared.clone();
        tasks::spawn(
            &lifecycle,
            http::accept_loop(
                listeners.http,
                cfg.http.clone(),
                http_tls.clone(),
                http_conns.clone(),
                http_stop.clone(),
                move |io, peer, track| {
                    let shared = shared.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let (shared, track) = (shared.clone(), track.clone());
                        async move {
                            track.begin();
                            let r = handle(req, shared, peer).await;
                            track.end();
                            r
                        }
                    });
                    Box::pin(
                        hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(io), svc)
                            .with_upgrades(),
                    )
                },
            ),
        )
    };
    let grpc_stop = CancellationToken::new();
    let grpc::Servers {
        health,
        tasks: grpc_tasks,
    } = grpc::start(
        [(listeners.grpc, tls.clone()), (listeners.peer, peer_tls.clone())],
        shared.clone(),
        cfg.grpc.clone(),
        &lifecycle,
        listeners.grpc_runtime.as_ref(),
        grpc_stop.clone(),
    )
    .map_err(RunError::Grpc)?;

    let tls_stop = CancellationToken::new();
    for t in http_tls.iter().chain(tls.iter()).chain(peer_tls.iter()) {
        tasks::spawn(&lifecycle, crate::watch::watch(t.clone(), tls_stop.clone()));
    }
    if auth.has_keys() {
        tasks::spawn(&lifecycle, crate::watch::watch(auth.clone(), tls_stop.clone()));
    }

    let sim_stop = CancellationToken::new();
    let sim_task = cfg
        .sim
        .map(|rate| tasks::spawn(&lifecycle, sim::run(node.clone(), rate, sim_stop.clone())));

    shared.ready.store(true, Ordering::Relaxed);
    node.set_ready(true);
    metrics::gauge!(m::READY).set(1.0);
    grpc::set_serving(&health, true).await;
    tracing::info!(
        shard = node.placement().me(),
        shards = node.placement().shards(),
        "ready"
    );
    started();

    shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + cfg.drain + Duration::from_secs(15);

    // 1. Not ready; refuse new WebSockets and subscriptions (publishes and
    //    peer streams go on until the clients are closed).
    tracing::info!(drain_ms = cfg.drain.as_millis() as u64, "draining");
    shared.draining.cancel();
    node.set_ready(false);
    metrics::gauge!(m::READY).set(0.0);
    grpc::set_serving(&health, false).await;
    sim_stop.cancel();
    if let Some(t) = sim_task {
        let _ = t.await;
    }

    // 2. Close every client with 1012, paced over --drain-ms.
    let conns: Vec<Arc<dyn Closable>> = shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let start = tokio::time::Instant::now();
    let n = conns.len().max(1) as u32;
    for (i, c) in conns.into_iter().enumerate() {
        tokio::time::sleep_until(start + cfg.drain * i as u32 / n).await;
        c.close(Close::Restart);
    }
    shared.tracker.close();
    if tokio::time::timeout_at(deadline, shared.tracker.wait()).await.is_err() {
        tracing::warn!("some client connections did not close in time");
    }

    // 3. gRPC: publish and peer streams ack what they took and end; wait.
    shared.stopping.cancel();
    grpc_stop.cancel();
    if tokio::time::timeout_at(deadline, futures_util::future::join_all(grpc_tasks))
        .await
        .is_err()
    {
        tracing::warn!("gRPC servers did not stop in time");
    }
    let streams = node.stream_tasks();
    streams.close();
    if tokio::time::timeout_at(deadline, streams.wait()).await.is_err() {
        tracing::warn!("some publish or peer stream tasks did not end in time");
    }

    // 4. Commit and flush everything accepted, stop background work.
    node.shutdown().await;
    background.cancel();
    bg_tracker.close();
    let _ = tokio::time::timeout_at(deadline, bg_tracker.wait()).await;
    http_stop.cancel();
    tls_stop.cancel();
    let _ = http_task.await;
    http_conns.close();
    let _ = tokio::time::timeout_at(deadline, http_conns.wait()).await;
    lifecycle.close();
    let _ = tokio::time::timeout_at(deadline, lifecycle.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>, peer: SocketAddr) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(secured(r, false));
    }
    let api = req.uri().path().starts_with("/api/");
    let resp = match req.uri().path() {
        "/healthz" => {
            if shared.node.is_healthy() {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "store failed\n")
            }
        }
        "/readyz" => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if shared.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            // (read off the budget when scraped, not kept per request)
            let free = shared.publish_budget.available_permits();
            metrics::gauge!(m::PUBLISH_IN_FLIGHT).set(shared.publish_max_in_flight.saturating_sub(free) as f64);
            let mut text = shared.metrics.render();
            m::PUBLISH_LATENCY_HISTOGRAM.render(
                m::PUBLISH_LATENCY,
                "Publish request received to durable ack.",
                &mut text,
            );
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/ws" => {
            if shared.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining: connect to another server\n")
            } else if !fastwebsockets::upgrade::is_upgrade_request(&req) {
                text(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required\n")
            } else if !origin_allowed(&req, &shared) {
                text(
                    StatusCode::FORBIDDEN,
                    "this Origin may not open a WebSocket here (--allowed-origins)\n",
                )
            } else {
                match upgrade_caller(&req, &shared) {
                    Err(e) => {
                        let mut r = text(StatusCode::UNAUTHORIZED, "invalid token\n");
                        *r.body_mut() = Full::new(Bytes::from(format!("{e}\n")));
                        r.headers_mut()
                            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                        r
                    }
                    Ok(principal) => upgrade(req, &shared, peer, principal),
                }
            }
        }
        "/api/candles" => match upgrade_caller(&req, &shared) {
            Ok(caller) => candles_api(req.uri().query().unwrap_or_default(), &shared, &caller).await,
            Err(e) => {
                let mut r = api_error(StatusCode::UNAUTHORIZED, &e.to_string());
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                r
            }
        },
        path => match crate::dashboard::asset(path) {
            Some((content_type, body)) => {
                let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
                r
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    };
    Ok(secured(resp, api))
}

/// Takes a WebSocket slot and upgrades (the caller is already authenticated).
fn upgrade(mut req: Request<Incoming>, shared: &Arc<Shared>, peer: SocketAddr, principal: Principal) -> Response<Body> {
    if let Some(permit) = shared.subscriber_permit() {
        match fastwebsockets::upgrade::upgrade(&mut req) {
            Err(e) => {
                tracing::debug!(error = %e, "bad upgrade request");
                text(StatusCode::BAD_REQUEST, "bad WebSocket upgrade request\n")
            }
            Ok((resp, fut)) => {
                let s = shared.clone();
                // Only the raw stream is kept: `ws::serve` splits it and
                // sets the WebSocket up itself. Combinators rather than an
                // async block, which would hold a second copy of the
                // connection's future: the task is no bigger than it.
                let task = fut
                    .then(move |upgraded| match upgraded {
                        Ok(websocket) => {
                            Either::Left(ws::serve(websocket.into_inner().into_inner(), s, peer, principal))
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "upgrade failed");
                            Either::Right(std::future::ready(()))
                        }
                    })
                    .map(move |()| drop(permit));
                tasks::spawn(&shared.tracker, task);
                resp.map(|_| ws::empty_body())
            }
        }
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server holds its --max-connections WebSockets: connect to another one\n",
        )
    }
}

/// The `Origin` check of a WebSocket upgrade (`--allowed-origins`): a request
/// without an `Origin` (not a browser) passes.
fn origin_allowed(req: &Request<Incoming>, shared: &Shared) -> bool {
    let Some(allowed) = &shared.allowed_origins else {
        return true;
    };
    match req.headers().get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(o)) => {
            let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
            allowed.contains(&o)
        }
        Some(Err(_)) => false,
    }
}

/// The caller of a WebSocket upgrade (contract §8): a token in the
/// `Authorization: Bearer` header or the `token` query parameter, else the
/// anonymous grant. A token that does not verify is refused (HTTP 401).
fn upgrade_caller(req: &Request<Incoming>, shared: &Shared) -> Result<Principal, AuthError> {
    if let Some(h) = req.headers().get(header::AUTHORIZATION) {
        return shared.auth.from_bearer(Some(h.as_bytes()));
    }
    let query = req.uri().query().unwrap_or_default();
    match query.split('&').find_map(|kv| kv.strip_prefix("token=")) {
        Some(t) if t.len() > crate::auth::MAX_TOKEN_BYTES * 3 => {
            Err(AuthError::Invalid("the token is too long".into()).counted())
        }
        Some(t) => shared.auth.verify(&percent_decode(t)),
        None => Ok(shared.auth.anonymous()),
    }
}

/// `GET /api/candles?symbol=BTC-USD&interval=1m&limit=500[&from=µs&to=µs]`: the
/// candle history the dashboard loads before it subscribes to live candles
/// (oldest first; without `from`, the most recent `limit` candles).
async fn candles_api(query: &str, shared: &Shared, caller: &Principal) -> Response<Body> {
    let mut symbol = "";
    let mut interval = "1m";
    let (mut limit, mut from, mut to) = (500u32, 0i64, 0i64);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |name: &str| {
            format!(
                "'{name}' must be an integer, got '{}'",
                v.chars().take(40).collect::<String>()
            )
        };
        match k {
            "symbol" => symbol = v,
            "interval" => interval = v,
            "limit" => match v.parse() {
                Ok(n) => limit = n,
                Err(_) => return api_error(StatusCode::BAD_REQUEST, &number("limit")),
            },
            "from" => match v.parse() {
                Ok(n) => from = n,
                Err(_) => return api_error(StatusCode::BAD_REQUEST, &number("from")),
            },
            "to" => match v.parse() {
                Ok(n) => to = n,
                Err(_) => return api_error(StatusCode::BAD_REQUEST, &number("to")),
            },
            _ => {}
        }
    }
    let symbol = match Symbol::parse(&percent_decode(symbol)) {
        Ok(s) => s,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match caller.check_read([symbol.as_str()]).map_err(|d| d.counted("http")) {
        Ok(()) => {}
        Err(Denied::Unauthorized) => {
            return api_error(StatusCode::UNAUTHORIZED, "a token is required to read");
        }
        Err(Denied::Forbidden(why)) => return api_error(StatusCode::FORBIDDEN, &why),
    }
    let Some(iv) = Interval::parse(interval) else {
        let shown: String = interval.chars().take(16).collect();
        return api_error(
            StatusCode::BAD_REQUEST,
            &format!("unknown interval '{shown}'; expected 1s, 1m or 1h"),
        );
    };
    let limit = match limit {
        0 => 500, // as when absent
        n => n as usize,
    };
    // A read like the gRPC ones, under the same limit (shed, not queued).
    let Some(_slot) = shared.reads.admit("/api/candles") else {
        let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, &shared.reads.overloaded());
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    };
    // Without `from`, the most recent `limit` candles up to `to`: back from
    // the interval of the symbol's newest tick, or of `to` if that is older
    // (event time, so replayed history works too).
    // (a failed snapshot read is the answer: without it the span would
    // start at the oldest candles, not end at the newest)
    let newest = if from == 0 {
        match shared.node.snapshots(&[symbol]).await {
            Ok(snap) => snap.first().map(|s| s.tick.ts),
            Err(e) => return read_error(e),
        }
    } else {
        None
    };
    if let Some(last_ts) = newest {
        let mut newest = iv.start_of(last_ts);
        if to != 0 {
            // (a client's number: clamped to where times live, 0..)
            newest = newest.min(iv.start_of(to.max(0)));
        }
        let span = iv.micros().saturating_mul(limit.clamp(1, HISTORY_LIMIT_MAX) as i64 - 1);
        from = newest.saturating_sub(span);
    }
    let q = HistoryQuery::Candles {
        interval: iv,
        from,
        to: if to == 0 { i64::MAX } else { to },
    };
    match shared.node.history(symbol, q, limit).await {
        Ok(h) => {
            let body = crate::dashboard::candles_json(symbol.as_str(), interval, &h);
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => read_error(e),
    }
}

/// A failed read of the candles API: 400 refused, 503 unavailable, 500 fault.
fn read_error(e: tickshard_shard::Error) -> Response<Body> {
    match e {
        e @ tickshard_shard::Error::Refused { .. } => api_error(StatusCode::BAD_REQUEST, &e.to_string()),
        e @ tickshard_shard::Error::Unavailable(_) => api_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        e @ tickshard_shard::Error::Fault(_) => {
            // (its detail was logged where the fault became this error)
            tracing::debug!(error = ?e, endpoint = "/api/candles", "a candles read failed");
            api_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}

/// The dashboard's policy: its scripts, styles and connections are its own
/// origin's (no inline script; the chart library adds one `<style>` for its
/// logo, hence inline styles), the token form never posts anywhere, no page
/// frames it, and no address leaks in a `Referer`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; connect-src 'self'; \
     img-src 'self' data:; style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Headers every HTTP answer carries: no content-type sniffing, the
/// dashboard's [`CONTENT_SECURITY_POLICY`], no `Referer`; API answers are
/// not stored by caches (they may have been asked with a token).
fn secured(mut r: Response<Body>, api: bool) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    if api {
        h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    }
    r
}

/// A JSON error of the candles API: 400 `bad_request`, 503 `unavailable`
/// (with `Retry-After: 1` when the read was shed) or 500 `internal`.
fn api_error(status: StatusCode, message: &str) -> Response<Body> {
    let mut body = Vec::new();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::INTERNAL_SERVER_ERROR => "internal",
        _ => "unavailable",
    };
    json::error(&mut body, None, code, message);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Decodes `%XX` escapes (and `+` as a space) of a query parameter; invalid
/// escapes are kept as they are (the symbol check then rejects them).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(super::percent_decode("EUR%2FUSD"), "EUR/USD");
        assert_eq!(super::percent_decode("A%3aB"), "A:B");
        assert_eq!(super::percent_decode("100%"), "100%");
        assert_eq!(super::percent_decode("%zz"), "%zz");
    }
}
