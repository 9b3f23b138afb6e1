//! Issue 10: nothing a client sends can hurt a shard. Each test is the
//! regression test of one defect seen when tickshard was tried as an attacker
//! (contract §4–§7), through the real binary.

use tickshard_client::ws::ServerMsg;
use tickshard_proto::v1 as pb;

use crate::common::*;

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn error_code(a: &pb::PublishAck) -> &str {
    a.error.as_ref().map_or("", |e| e.code.as_str())
}

/// Item 1: a `publisher_id` whose 65,535-byte cut fell inside a UTF-8
/// character was acked, and the shard could never start again. Now such an id
/// (and any id over 128 bytes or not printable ASCII) is `invalid_request`,
/// consumes no seq, and the shard restarts after kill -9 and after SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_id_that_could_break_recovery_is_refused_and_the_shard_restarts() {
    let mut srv = Server::start(&["--no-sim"]);
    let mut raw = RawStream::open(&srv).await;
    let t0 = now_micros();
    let evil = format!("a{}", "\u{e9}".repeat(32_767)) + "z"; // 65,536 bytes, byte 65,535 inside a char
    assert_eq!(evil.len(), 65_536);
    for (i, id) in [evil.clone(), "x".repeat(129), "tab\tid".into(), "caf\u{e9}".into()]
        .into_iter()
        .enumerate()
    {
        let ack = raw
            .call(req(i as u64 + 1, &id, 1, tick("BTC-USD", t0, "1.5", "1")))
            .await;
        assert_eq!(
            (error_code(&ack), ack.seq),
            ("invalid_request", 0),
            "{}",
            &id[..id.len().min(20)]
        );
        assert!(ack.error.unwrap().message.len() < 200, "the error echoes no megabyte");
    }
    let ok = raw
        .call(req(9, &"p".repeat(128), 1, tick("BTC-USD", t0, "1.5", "1")))
        .await;
    assert_eq!((error_code(&ok), ok.seq), ("", 1), "the rejected ones consumed no seq");
    drop(raw);

    srv.kill9();
    srv.restart();
    let mut raw = RawStream::open(&srv).await;
    let dup = raw
        .call(req(10, &"p".repeat(128), 1, tick("BTC-USD", t0, "1.5", "1")))
        .await;
    assert!(dup.duplicate && dup.seq == 1, "{dup:?}");
    drop(raw);
    srv.sigterm();
    assert!(srv.wait_exit(WAIT).success());
    srv.restart();
    let snap = srv
        .feed()
        .await
        .get_snapshot(pb::SnapshotRequest {
            symbols: vec!["BTC-USD".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.snapshots[0].last.as_ref().unwrap().seq, 1);
}

/// Item 2: request size costs linear time and the count is checked first. A
/// 4 MiB gRPC Subscribe (quadratic de-duplication used to take minutes) is
/// refused at once, now before it is decoded (past the request bound:
/// OUT_OF_RANGE); within the bound, 15,000 symbols are refused by their
/// count; `GetSnapshot` has the same cap (3.6 MB in used to give 34 MB out);
/// the same symbol named 15,000 times is one symbol.
#[tokio::test]
async fn oversized_symbol_lists_are_refused_whole_and_repeats_count_once() {
    let srv = Server::start(&["--no-sim"]);
    let mut feed = srv.feed().await;
    let many: Vec<String> = (0..430_000).map(|i| format!("S{i}")).collect();
    let e = tokio::time::timeout(
        WAIT,
        feed.subscribe(pb::SubscribeRequest {
            symbols: many.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("answered at once")
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    // (15,000 symbols of at most 6 bytes: ~120 KB, within 192,000)
    let e = tokio::time::timeout(
        WAIT,
        feed.subscribe(pb::SubscribeRequest {
            symbols: many[..15_000].to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("answered at once")
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    let e = feed
        .get_snapshot(pb::SnapshotRequest {
            symbols: many[..15_000].to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    let same = feed
        .get_snapshot(pb::SnapshotRequest {
            symbols: vec!["btc-usd".into(); 15_000],
        })
        .await
        .unwrap();
    assert!(same.into_inner().snapshots.is_empty());
    // WebSocket: a subscribe naming 9,900 symbols in under 64 KiB, refused
    // whole with its id echoed; the connection stays usable.
    let mut ws = srv.ws().await;
    let list: Vec<String> = (0..9_900).map(|i| format!("\"{i:x}\"")).collect();
    let msg = format!(r#"{{"op":"subscribe","id":"big","symbols":[{}]}}"#, list.join(","));
    assert!(msg.len() <= 65_536, "{}", msg.len());
    ws.send_text(&msg).await.unwrap();
    match recv(&mut ws).await {
        ServerMsg::Error { id, code, .. } => {
            assert_eq!(
                (id.as_deref(), code.as_str()),
                (Some("\"big\""), "too_many_subscriptions")
            )
        }
        other => panic!("{other:?}"),
    }
    ws.send_text(r#"{"op":"ping","id":2}"#).await.unwrap();
    assert_eq!(recv(&mut ws).await, ServerMsg::Pong { id: Some("2".into()) });
}

/// Item 3: `--max-symbols` bounds what clients can create (`symbol_limit` for
/// a subscribe or a publish that would create one more), and symbols created
/// by a subscribe that never got a tick are forgotten (here after 1 s, by
/// default an hour): their records are gone after a restart too.
#[tokio::test]
async fn symbols_are_bounded_and_never_ticked_ones_are_forgotten() {
    let mut srv = Server::start(&[
        "--no-sim",
        "--max-symbols",
        "3",
        "--forget-unticked-after",
        "1s",
        "--prune-interval-ms",
        "50",
    ]);
    let mut ws = srv.ws().await;
    ws.send_text(r#"{"op":"subscribe","id":1,"symbols":["A","B","C"]}"#)
        .await
        .unwrap();
    let ServerMsg::Subscribed { symbols: first, .. } = recv(&mut ws).await else {
        panic!()
    };
    ws.send_text(r#"{"op":"subscribe","id":2,"symbols":["D"]}"#)
        .await
        .unwrap();
    match recv(&mut ws).await {
        ServerMsg::Error { id, code, .. } => assert_eq!((id.as_deref(), code.as_str()), (Some("2"), "symbol_limit")),
        other => panic!("{other:?}"),
    }
    // Refused whole: the subscriptions the connection had stay.
    ws.send_text(r#"{"op":"subscribe","id":5,"symbols":["A","D"]}"#)
        .await
        .unwrap();
    match recv(&mut ws).await {
        ServerMsg::Error { id, code, .. } => assert_eq!((id.as_deref(), code.as_str()), (Some("5"), "symbol_limit")),
        other => panic!("{other:?}"),
    }
    let mut raw = RawStream::open(&srv).await;
    let t0 = now_micros();
    let ack = raw.call(req(1, "p", 1, tick("E", t0, "1", "1"))).await;
    assert_eq!((error_code(&ack), ack.seq), ("symbol_limit", 0));
    let ack = raw.call(req(2, "p", 1, tick("A", t0, "1", "1"))).await;
    assert_eq!(
        (error_code(&ack), ack.seq),
        ("", 1),
        "an existing symbol still takes ticks"
    );
    match recv(&mut ws).await {
        ServerMsg::Tick(t) => assert_eq!((t.symbol.as_str(), t.seq), ("A", 1), "A is still subscribed"),
        other => panic!("{other:?}"),
    }
    // B and C never get a tick; once nobody subscribes they are forgotten,
    // which makes room for D.
    ws.send_text(r#"{"op":"unsubscribe","id":3,"symbols":["B","C"]}"#)
        .await
        .unwrap();
    eventually("B and C are forgotten", || async {
        srv.metric("tickshard_symbols_forgotten_total").await >= 2.0
    })
    .await;
    let ack = raw.call(req(3, "p", 1, tick("E", t0, "1", "1"))).await;
    assert_eq!((error_code(&ack), ack.seq), ("", 1));
    drop(raw);
    // After a restart the forgotten ones stay forgotten: B gets a new epoch.
    srv.kill9();
    srv.restart();
    assert_eq!(srv.metric("tickshard_owned_symbols").await, 2.0, "A and E");
    let mut ws = srv.ws().await;
    ws.send_text(r#"{"op":"subscribe","id":4,"symbols":["A","B"]}"#)
        .await
        .unwrap();
    let ServerMsg::Subscribed { symbols: again, .. } = recv(&mut ws).await else {
        panic!()
    };
    assert_eq!(again[0].epoch, first[0].epoch, "A kept its epoch (it has a tick)");
    assert_ne!(again[1].epoch, first[1].epoch, "B was forgotten: a new epoch");
}

/// Item 5: a tick from the far future (a forged `ts` of 1.8e15 µs, or 2^53)
/// froze the symbol's candles for good. It is `invalid_tick` now
/// (`--max-future-ms`, default 5 minutes) and consumes no seq, and candles
/// keep closing.
#[tokio::test]
async fn far_future_ticks_are_refused_and_candles_keep_moving() {
    let srv = Server::start(&["--no-sim"]);
    let mut ws = srv.ws().await;
    ws.send_text(r#"{"op":"subscribe","symbols":["FX"],"channels":["candles:1s"]}"#)
        .await
        .unwrap();
    assert!(matches!(recv(&mut ws).await, ServerMsg::Subscribed { .. }));
    let mut raw = RawStream::open(&srv).await;
    let t0 = now_micros();
    for (i, ts) in [1_800_000_000_000_000, 1 << 53, t0 + 3_600_000_000]
        .into_iter()
        .enumerate()
    {
        let ack = raw
            .call(req(i as u64, "p", i as u64 + 1, tick("FX", ts, "1", "1")))
            .await;
        assert_eq!((error_code(&ack), ack.seq), ("invalid_tick", 0), "ts {ts}");
    }
    let a = raw.call(req(10, "p", 10, tick("FX", t0, "1.10", "1"))).await;
    let b = raw
        .call(req(11, "p", 11, tick("FX", t0 + 2_000_000, "1.20", "1")))
        .await;
    assert_eq!((a.seq, b.seq), (1, 2), "rejected ticks consumed no seq");
    let closed = loop {
        if let ServerMsg::Candle(c) = recv(&mut ws).await
            && c.closed
        {
            break c;
        }
    };
    assert_eq!((closed.close.as_str(), closed.count), ("1.10", 1));

    // 0 turns the check off (replaying recorded future data, say).
    let off = Server::start(&["--no-sim", "--max-future-ms", "0"]);
    let mut raw = RawStream::open(&off).await;
    let ack = raw.call(req(1, "p", 1, tick("FX", t0 + 3_600_000_000, "1", "1"))).await;
    assert_eq!((error_code(&ack), ack.seq), ("", 1));
}

/// Item 6: invalid UTF-8 closes with 1007; RSV bits, an unknown opcode, an
/// oversized or fragmented control frame, an unmasked frame and a stray
/// continuation close with 1002 (they all closed with 1000, and an unmasked
/// frame was accepted).
#[tokio::test]
async fn websocket_protocol_violations_close_with_1002_or_1007() {
    let srv = Server::start(&["--no-sim"]);
    let bad_utf8 = b"{\"op\":\"ping\",\"id\":\"\xff\xfe\"}";
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("text not UTF-8", raw_frame(0x81, bad_utf8, true), 1007),
        (
            "fragmented text not UTF-8",
            [
                raw_frame(0x01, &bad_utf8[..10], true),
                raw_frame(0x80, &bad_utf8[10..], true),
            ]
            .concat(),
            1007,
        ),
        ("ping over 125 bytes", raw_frame(0x89, &[b'p'; 126], true), 1002),
        ("fragmented ping", raw_frame(0x09, b"p", true), 1002),
        ("pong over 125 bytes", raw_frame(0x8a, &[b'p'; 126], true), 1002),
        // (past --max-message-bytes too: a protocol error, not 1009)
        (
            "pong declaring 100,000 bytes",
            [&[0x8a, 0xff][..], &100_000u64.to_be_bytes(), &[1, 2, 3, 4]].concat(),
            1002,
        ),
        ("RSV1 set", raw_frame(0xc1, br#"{"op":"ping"}"#, true), 1002),
        ("unknown opcode 3", raw_frame(0x83, b"x", true), 1002),
        ("unmasked frame", raw_frame(0x81, br#"{"op":"ping"}"#, false), 1002),
        ("continuation without a start", raw_frame(0x80, b"x", true), 1002),
        (
            "close code 1005 (may not be sent)",
            raw_frame(0x88, &1005u16.to_be_bytes(), true),
            1002,
        ),
        ("close code 999", raw_frame(0x88, &999u16.to_be_bytes(), true), 1002),
        ("close code 5000", raw_frame(0x88, &5000u16.to_be_bytes(), true), 1002),
        (
            "close reason not UTF-8",
            raw_frame(0x88, &[0x03, 0xe8, 0xff, 0xfe], true),
            1002,
        ),
        // (a valid close is answered with 1000)
        ("close code 4000", raw_frame(0x88, &4000u16.to_be_bytes(), true), 1000),
    ];
    for (what, frame, want) in cases {
        let (mut s, mut buf) = raw_ws(&srv, &[]).await;
        tokio::io::AsyncWriteExt::write_all(&mut s, &frame).await.unwrap();
        assert_eq!(read_close_code(&mut s, &mut buf).await, want, "{what}");
    }
    // The unmasked frame was never processed: no pong came before the close.
    let (mut s, mut buf) = raw_ws(&srv, &raw_frame(0x81, br#"{"op":"ping","id":1}"#, false)).await;
    assert_eq!(read_close_code(&mut s, &mut buf).await, 1002);
    assert!(!String::from_utf8_lossy(&buf).contains("pong"));
}

/// Item 7: a resume position of 2^64-1 with the right epoch, on a pod that
/// does not own the symbol, wrapped around (`recovered: true`, then a
/// conflated snapshot; a debug build panicked). A position beyond what the
/// owner has is answered like an unknown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_beyond_the_owner_is_not_recovered_and_does_not_overflow() {
    let cluster = TestCluster::start(2, &[]);
    cluster.wait_linked().await;
    let sym = crate::cluster::owned_by(1, 2, 1).remove(0);
    let mut p = cluster.pods[1].publisher("p").await;
    let t0 = now_micros();
    publish_all(&mut p, (0..3).map(|i| tick(&sym, t0 + i, "2.5", "1"))).await;
    for pod in &cluster.pods {
        // first learn the epoch
        let mut ws = pod.ws().await;
        ws.send_text(&format!(r#"{{"op":"subscribe","symbols":["{sym}"]}}"#))
            .await
            .unwrap();
        let ServerMsg::Subscribed { symbols, .. } = recv(&mut ws).await else {
            panic!()
        };
        let epoch = symbols[0].epoch.clone();
        for seq in [u64::MAX, 4] {
            let mut ws = pod.ws().await;
            ws.send_text(&format!(
                r#"{{"op":"subscribe","symbols":["{sym}"],"resume":{{"{sym}":{{"seq":{seq},"epoch":"{epoch}"}}}}}}"#
            ))
            .await
            .unwrap();
            let ServerMsg::Subscribed { symbols, .. } = recv(&mut ws).await else {
                panic!()
            };
            assert_eq!(
                (symbols[0].seq, symbols[0].recovered),
                (3, false),
                "seq {seq} on {}",
                pod.http
            );
            match recv(&mut ws).await {
                ServerMsg::Snapshot(s) => assert_eq!((s.seq, s.conflated), (3, false)),
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Item 8: a `rate_limited` error echoes the id of the message it answers.
#[tokio::test]
async fn rate_limited_errors_echo_the_id() {
    let srv = Server::start(&["--no-sim", "--max-client-rate", "1", "--client-burst", "1"]);
    let mut ws = srv.ws().await;
    for i in 0..3 {
        ws.send_text(&format!(r#"{{"op":"ping","id":{i}}}"#)).await.unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        match recv(&mut ws).await {
            ServerMsg::Pong { id } => ids.push((id, "pong".to_string())),
            ServerMsg::Error { id, code, .. } => ids.push((id, code)),
            other => panic!("{other:?}"),
        }
    }
    ids.sort();
    assert_eq!(
        ids,
        [
            (Some("0".into()), "pong".into()),
            (Some("1".into()), "rate_limited".into()),
            (Some("2".into()), "rate_limited".into())
        ]
    );
}

/// Item 9: an unparsable `from` or `limit` of `/api/candles` is a 400, not
/// silently the default.
#[tokio::test]
async fn the_candles_api_refuses_unparsable_numbers() {
    let srv = Server::start(&["--no-sim"]);
    for q in ["limit=abc", "from=1e9", "to=x", "limit=-1"] {
        let (status, body) = srv.get(&format!("/api/candles?symbol=BTC-USD&interval=1m&{q}")).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert!(body.contains("bad_request"), "{body}");
    }
    let (status, _) = srv.get("/api/candles?symbol=BTC-USD&interval=1m&limit=5").await;
    assert_eq!(status, 200);
}

/// Every HTTP answer forbids content sniffing and framing by another site
/// (the dashboard has a token form); API answers are not cached; a method
/// other than GET/HEAD gets 405 with `Allow`; a 401 names its scheme.
#[tokio::test]
async fn http_answers_carry_their_safety_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = Server::start(&["--no-sim"]);
    let head = |request: String| {
        let addr = srv.http;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(WAIT, s.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
            text.split("\r\n\r\n").next().unwrap_or_default().to_string()
        }
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    for path in ["/", "/healthz", "/api/candles?symbol=BTC-USD&interval=1m", "/nowhere"] {
        let h = head(get(path)).await;
        assert!(h.contains("x-content-type-options: nosniff"), "{path}: {h}");
        assert!(
            h.contains(&format!(
                "content-security-policy: {}",
                tickshard_feed::server::CONTENT_SECURITY_POLICY.to_ascii_lowercase()
            )),
            "{path}: {h}"
        );
        assert!(h.contains("referrer-policy: no-referrer"), "{path}: {h}");
        assert!(h.contains("frame-ancestors 'none'"), "{path}: {h}");
        assert_eq!(
            h.contains("cache-control: no-store"),
            path.starts_with("/api/"),
            "{path}: {h}"
        );
    }
    let h =
        head("POST /api/candles HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".into()).await;
    assert!(h.starts_with("http/1.1 405") && h.contains("allow: get, head"), "{h}");
}

/// Item 4: idle sockets starved the probes (20 silent connections with
/// `--max-connections 20` left `/healthz` unanswered). Now WebSockets and
/// plain HTTP are bounded apart, the plain connection idle the longest makes
/// room for a new one, and a connection without a complete request head in
/// time (or idle between requests too long) is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_never_starve_the_probes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = Server::start(&[
        "--no-sim",
        "--max-connections",
        "20",
        "--http-header-timeout-ms",
        "1500",
        "--http-idle-timeout-ms",
        "4000",
    ]);
    let probe = || async {
        tokio::time::timeout(std::time::Duration::from_secs(1), srv.get("/healthz"))
            .await
            .expect("/healthz answered within a second")
    };
    // More silent sockets than there are plain-connection slots (512).
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(tokio::net::TcpStream::connect(srv.http).await.unwrap());
        if idle.len() % 100 == 0 {
            assert_eq!(probe().await.0, 200);
        }
    }
    assert_eq!(probe().await.0, 200);
    drop(idle);

    // The same with half-sent request heads in every slot: the one evicted
    // has no request in flight, so it goes at once (no close grace).
    let mut partial = Vec::new();
    for _ in 0..600 {
        let mut s = tokio::net::TcpStream::connect(srv.http).await.unwrap();
        s.write_all(b"GET / HT").await.unwrap();
        partial.push(s);
        if partial.len() % 100 == 0 {
            assert_eq!(probe().await.0, 200);
        }
    }
    assert_eq!(probe().await.0, 200);
    drop(partial);

    // A silent connection and a half-sent request head are closed.
    let mut silent = tokio::net::TcpStream::connect(srv.http).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(srv.http).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    for s in [&mut silent, &mut slow] {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    // A keep-alive connection may sit idle past the header timeout (not past
    // the idle timeout) and be used again.
    let mut ka = tokio::net::TcpStream::connect(srv.http).await.unwrap();
    let get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    ka.write_all(get).await.unwrap();
    assert!(one_response(&mut ka).await.starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await; // idle, on purpose
    ka.write_all(get).await.unwrap();
    assert!(
        one_response(&mut ka).await.starts_with(b"HTTP/1.1 200"),
        "still open after 2 s idle"
    );
    let n = tokio::time::timeout(WAIT, ka.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed after the idle timeout");
}

/// Reads one whole HTTP/1.1 response (head and `Content-Length` body) from
/// a keep-alive connection; what was read if it closes first.
async fn one_response(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return out;
            }
        }
    }
}

/// Item 4, WebSockets: past `--max-connections` an upgrade gets 503 at once
/// (it used to wait for a slot, holding one of its own), and probes are
/// answered all along.
#[tokio::test]
async fn websockets_past_the_limit_get_503_and_probes_still_answer() {
    let srv = Server::start(&["--no-sim", "--max-connections", "2"]);
    let (_a, _b) = (srv.ws().await, srv.ws().await);
    let third = tickshard_client::ws::WsConn::connect(&srv.ws_url(), WAIT).await;
    let e = third.err().expect("a third WebSocket is refused").to_string();
    assert!(e.contains("503"), "{e}");
    assert_eq!(srv.get("/healthz").await.0, 200);
    assert_eq!(srv.get("/readyz").await.0, 200);
}

/// Item 4, gRPC: a connection that never completes the HTTP/2 handshake is
/// closed (and the log says why); connections and streams per connection
/// are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_and_streams_are_bounded() {
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    let srv = Server::start(&[
        "--no-sim",
        "--grpc-handshake-timeout-ms",
        "1000",
        "--max-grpc-connections",
        "3",
        "--grpc-max-streams",
        "2",
        "--grpc-idle-timeout-ms",
        "1500",
    ]);
    let mut silent = tokio::net::TcpStream::connect(srv.grpc).await.unwrap();
    let mut buf = [0u8; 64];
    // (the server's own SETTINGS come first; then the end of the stream)
    let closed = tokio::time::timeout(WAIT, async {
        while let Ok(n) = silent.read(&mut buf).await
            && n > 0
        {}
    })
    .await;
    assert!(closed.is_ok(), "a connection without a handshake is closed");
    eventually("the log says why", || async {
        srv.log_text().contains("no HTTP/2 handshake")
    })
    .await;
    drop(silent);

    // Streams: a third concurrent stream on one connection waits for a free one.
    let mut feed = srv.feed().await;
    let sub = |s: &str| pb::SubscribeRequest {
        symbols: vec![s.into()],
        ..Default::default()
    };
    let a = feed.subscribe(sub("A")).await.unwrap().into_inner();
    let _b = feed.subscribe(sub("B")).await.unwrap().into_inner();
    let mut f3 = feed.clone();
    let third = tokio::spawn(async move { f3.subscribe(sub("C")).await.map(|r| r.into_inner()) });
    let early = tokio::time::timeout(std::time::Duration::from_millis(700), async {
        while !third.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(early.is_err(), "a third stream was served past --grpc-max-streams 2");
    drop(a);
    let mut c = tokio::time::timeout(WAIT, third).await.unwrap().unwrap().unwrap();
    assert!(matches!(c.next().await, Some(Ok(_))), "served once a stream ended");

    // Connections: with 3 taken, a 4th is not served until one closes.
    let held: Vec<_> = futures_util::future::join_all((0..2).map(|_| srv.feed())).await;
    let url = srv.grpc_url();
    let fourth = tokio::spawn(async move {
        let mut f = pb::feed_client::FeedClient::connect(url).await?;
        f.list_symbols(pb::ListSymbolsRequest {})
            .await
            .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
    });
    let early = tokio::time::timeout(std::time::Duration::from_millis(700), async {
        while !fourth.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        early.is_err(),
        "a 4th connection was served past --max-grpc-connections 3"
    );
    drop(held);
    assert!(tokio::time::timeout(WAIT, fourth).await.unwrap().unwrap().is_ok());

    // A connection with no open stream is closed after the idle timeout (the
    // log says so); one with a stream open is not.
    let mut idle = srv.feed().await;
    idle.list_symbols(pb::ListSymbolsRequest {}).await.unwrap();
    eventually("an idle connection closed", || async {
        srv.log_text().contains("closing an idle gRPC connection")
    })
    .await;
    let mut still = c;
    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await; // past the idle timeout, on purpose
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(10), still.next())
            .await
            .is_err(),
        "the subscribe stream is still open, waiting for data"
    );
}

const T0: i64 = 1_732_530_000_000_000;

/// Waits until `pod`'s link to every other pod is up again.
async fn linked(pod: &Server, others: usize) {
    eventually("peer links up", || async {
        pod.metric("tickshard_peer_up").await >= others as f64
    })
    .await;
}

/// Item 11: with requests in flight and the owner restarting, request 129 of
/// a `(publisher_id, symbol)` was refused and 132 accepted, so the in-order
/// resend of 129-131 was de-duplicated away: lost. Now a stream refuses every
/// request of a pair after one was refused (here: forwarded while the owner
/// is down, then again once it is back), and a resend on a new stream stores
/// everything once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_never_overtaken_on_its_stream() {
    let mut c = TestCluster::start(2, &["--drain-ms", "200"]);
    c.wait_linked().await;
    let sym = crate::cluster::owned_by(1, 2, 1).remove(0);
    let t = |i: u64| tick(&sym, T0 + i as i64, &format!("{i}.5"), "1");
    c.pods[1].kill9();
    let mut raw = RawStream::open(&c.pods[0]).await;
    for i in 1..=20 {
        let ack = raw.call(req(i, "ord", i, t(i))).await;
        assert_eq!(
            (error_code(&ack), ack.seq),
            ("unavailable", 0),
            "{i} while the owner is down"
        );
    }
    c.pods[1].restart();
    linked(&c.pods[0], 1).await;
    for i in 21..=30 {
        let ack = raw.call(req(i, "ord", i, t(i))).await;
        assert_eq!(
            error_code(&ack),
            "unavailable",
            "{i} is behind the refused ones: never accepted"
        );
    }
    // Another publisher's pair on the same stream is not held back.
    let other = raw.call(req(31, "other", 1, t(0))).await;
    assert_eq!((error_code(&other), other.seq), ("", 1));
    drop(raw);
    let mut resend = RawStream::open(&c.pods[0]).await;
    for i in 1..=30 {
        let ack = resend.call(req(i, "ord", i, t(i))).await;
        assert_eq!(
            (error_code(&ack), ack.seq, ack.duplicate),
            ("", i + 1, false),
            "resent {i}"
        );
    }
    let stored: Vec<i64> = history(&c.pods[1], &sym, 1)
        .await
        .iter()
        .map(|t| t.ts_micros - T0)
        .collect();
    assert_eq!(stored, (0..=30).collect::<Vec<_>>());
}

/// Item 11, under load: a publisher (the client library) keeps 512 requests
/// in flight over 3 symbols owned by the other pod, through a pod that
/// forwards them, while the owner is killed (-9) and restarted, then stopped
/// (SIGTERM) and restarted. Every tick is stored exactly once and in
/// publisher order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_in_flight_across_owner_restarts_lose_nothing() {
    use tickshard_client::publisher::{Publisher, PublisherConfig};
    let mut c = TestCluster::start(2, &["--drain-ms", "200"]);
    c.wait_linked().await;
    let symbols = crate::cluster::owned_by(1, 2, 3);
    const N: u64 = 6_000;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let url = c.pods[0].grpc_url();
    let syms = symbols.clone();
    let publisher = tokio::spawn(async move {
        let mut cfg = PublisherConfig::new(vec![url], "inflight");
        cfg.window = 512;
        let mut p = Publisher::connect(cfg).await.unwrap();
        let mut done = 0u64;
        for i in 1..=N {
            let s = &syms[(i % 3) as usize];
            p.send(tick(s, T0 + i as i64, &format!("{i}.25"), "1")).await.unwrap();
            while let Some(a) = p.try_ack() {
                assert!(a.error.is_none(), "{a:?}");
                done += 1;
                let _ = progress_tx.send(done);
            }
        }
        for a in p.flush().await.unwrap() {
            assert!(a.error.is_none(), "{a:?}");
            done += 1;
        }
        assert_eq!(done, N);
        p.reconnects
    });
    progress.wait_for(|&n| n >= N / 4).await.unwrap();
    c.pods[1].kill9();
    c.pods[1].restart();
    progress.wait_for(|&n| n >= N / 2).await.unwrap();
    c.pods[1].sigterm();
    assert!(c.pods[1].wait_exit(WAIT).success());
    c.pods[1].restart();
    let reconnects = tokio::time::timeout(std::time::Duration::from_secs(120), publisher)
        .await
        .expect("the publisher finished")
        .unwrap();
    assert!(reconnects > 0, "the restarts were felt");
    for (k, s) in symbols.iter().enumerate() {
        let got: Vec<u64> = history(&c.pods[1], s, 1)
            .await
            .iter()
            .map(|t| (t.ts_micros - T0) as u64)
            .collect();
        let want: Vec<u64> = (1..=N).filter(|i| i % 3 == k as u64).collect();
        assert_eq!(got.len(), want.len(), "{s}: every tick once");
        assert_eq!(got, want, "{s}: in publisher order");
    }
}

/// Item 12: at SIGTERM, 70 of 195 requests in flight on one stream got
/// neither an ack nor an error. Now each request the server takes is acked
/// once durable, and each one it read after it stopped taking work is
/// answered `unavailable`: every request gets an answer, and what was acked
/// is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_request_in_flight() {
    let mut srv = Server::start(&["--no-sim", "--publish-window", "4", "--drain-ms", "100"]);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut acks = srv.feed().await.publish(out).await.unwrap().into_inner();
    const N: u64 = 2_000;
    for i in 1..=N {
        tx.send(req(i, "drain", i, tick("DRN", T0 + i as i64, "1.5", "1")))
            .unwrap();
    }
    // a first ack, so the stream is flowing, then SIGTERM
    let first = tokio::time::timeout(WAIT, acks.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    srv.sigterm();
    let mut answered = std::collections::BTreeMap::new();
    answered.insert(first.request_id, first);
    let end = loop {
        match tokio::time::timeout(WAIT, acks.message()).await.unwrap() {
            Ok(Some(a)) => {
                assert!(answered.insert(a.request_id, a).is_none(), "one answer per request");
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(
        end.map(|s| s.code()),
        Some(tonic::Code::Unavailable),
        "the stream ends retryable"
    );
    drop(tx);
    assert!(srv.wait_exit(WAIT).success());
    let refused = answered.values().filter(|a| error_code(a) == "unavailable").count();
    let ok: Vec<u64> = answered
        .values()
        .filter(|a| a.error.is_none())
        .map(|a| a.request_id)
        .collect();
    assert_eq!(
        answered.len() as u64,
        N,
        "every request answered ({} ok, {refused} unavailable)",
        ok.len()
    );
    assert!(refused > 0, "the drain came while requests were waiting");
    srv.restart();
    let stored: Vec<u64> = history(&srv, "DRN", 1)
        .await
        .iter()
        .map(|t| (t.ts_micros - T0) as u64)
        .collect();
    assert_eq!(stored, ok, "exactly the acked ones are durable, in order");
}

/// Replies count against a client's queue only until they are written: a
/// client that has had several times its queue's worth of replies still
/// gets every tick live, with no conflated snapshot. (Their weight used to
/// stay counted for the connection's life: such a client stalled at its
/// next tick and never left the stall, until 1013.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_stop_counting_against_a_client_once_written() {
    let srv = Server::start(&[
        "--no-sim",
        "--client-queue-bytes",
        "4096",
        "--max-client-rate",
        "100000",
        "--client-burst",
        "100000",
    ]);
    let mut ws = srv.ws().await;
    // ~400 × 20 bytes of pongs, each read before the next ping is sent
    for i in 0..400 {
        ws.send_text(&format!(r#"{{"op":"ping","id":{i}}}"#)).await.unwrap();
        match recv(&mut ws).await {
            ServerMsg::Pong { id } => assert_eq!(id, Some(i.to_string())),
            other => panic!("{other:?}"),
        }
    }
    ws.send_text(r#"{"op":"subscribe","symbols":["REPLY-A"]}"#)
        .await
        .unwrap();
    recv_subscribed(&mut ws).await;
    let mut p = srv.publisher("replies").await;
    for n in 1..=5i64 {
        publish_all(&mut p, [tick("REPLY-A", now_micros() + n, &format!("10.{n}"), "1")]).await;
        match recv(&mut ws).await {
            ServerMsg::Tick(t) => assert_eq!((t.seq, t.price.to_string()), (n as u64, format!("10.{n}"))),
            other => panic!("tick {n}: {other:?}"),
        }
    }
}

/// A client that sends pings (or requests) and never reads the answers is
/// not read either once its unsent bytes pass its queue's limit: the
/// server's queue for it stays within about the limit, however much it
/// sends. (It used to read on and queue a pong per ping without bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_grow_its_queue_with_pings() {
    use tokio::io::AsyncWriteExt;
    let limit = 16_384;
    let srv = Server::start(&["--no-sim", "--client-queue-bytes", &limit.to_string()]);
    let (mut s, _) = raw_ws(&srv, &[]).await;
    let ping = raw_frame(0x89, &[7; 125], true);
    let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1_000).collect();
    // 64 MB of pings: the server stops reading long before (the kernel's
    // buffers fill and the writes wait), so this ends at its time bound.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        for _ in 0..500 {
            if s.write_all(&burst).await.is_err() {
                break;
            }
        }
    })
    .await;
    drop(s);
    // (the peak is recorded when the connection ends)
    eventually("the connection ends", || async {
        srv.metric("tickshard_clients_connected").await == 0.0
    })
    .await;
    let peak = srv.metric("tickshard_client_queue_peak_bytes").await;
    assert!(
        peak > 0.0 && peak <= 2.0 * limit as f64,
        "peak queue {peak} bytes, limit {limit}"
    );
}

/// A health watch (which needs no token and never ends) does not keep its
/// connection from idling out: strangers cannot hold every gRPC connection
/// permit with watches. (It counted as an open stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_does_not_hold_its_connection() {
    use futures_util::StreamExt;
    let srv = Server::start(&["--no-sim", "--grpc-idle-timeout-ms", "1000"]);
    let mut health = srv.health().await;
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(watch.next().await, Some(Ok(_))), "the watch is served");
    eventually("the connection idles out, its watch open", || async {
        srv.log_text().contains("closing an idle gRPC connection")
    })
    .await;
}

/// A unary gRPC call whose request message never completes is answered
/// DEADLINE_EXCEEDED once `--grpc-handshake-timeout-ms` has passed. tonic
/// reads a unary request whole before its handler (and the handler's token
/// check) runs: before, such a stream stayed open for good and kept its
/// connection from idling out, so strangers could hold every connection
/// permit. A streamed request (Publish) has no such deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_request_that_never_completes_is_answered_deadline_exceeded() {
    use http_body_util::BodyExt as _;
    use hyper::body::{Bytes, Frame};
    let srv = Server::start(&["--no-sim", "--grpc-handshake-timeout-ms", "300"]);
    let tcp = tokio::net::TcpStream::connect(srv.ports().grpc).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let call = |path: &str| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let body = http_body_util::StreamBody::new(Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|f| (f, rx))
        })));
        let req = hyper::Request::post(format!("http://{}{path}", srv.ports().grpc))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        (tx, req)
    };
    // a message announced as 100 bytes, of which 10 come, and then nothing
    let (tx, req) = call("/tickshard.v1.Feed/GetHistory");
    let mut part = vec![0u8, 0, 0, 0, 100];
    part.extend_from_slice(&[0x0a; 10]);
    tx.send(Ok(Frame::data(Bytes::from(part.clone())))).await.unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("no answer to a request that never completes")
        .unwrap();
    let status = match resp.headers().get("grpc-status") {
        Some(s) => s.to_str().unwrap().to_owned(),
        None => {
            let body = tokio::time::timeout(WAIT, resp.into_body().collect())
                .await
                .expect("the answer never ended")
                .unwrap();
            let trailers = body.trailers().cloned().unwrap_or_default();
            trailers
                .get("grpc-status")
                .map(|s| s.to_str().unwrap().to_owned())
                .unwrap_or_default()
        }
    };
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    drop(tx);

    // a Publish stream opened the same way stays open past the deadline:
    // its one message, sent late, is acked
    let (tx, req) = call("/tickshard.v1.Feed/Publish");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers().get("grpc-status"), None, "{:?}", resp.headers());
    let mut body = resp.into_body();
    // (the time passing is what is tested here, not a synchronisation)
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    let t = now_micros();
    let msg = prost::Message::encode_to_vec(&req_of("stream-probe", tick("DEADLINE-2", t, "1", "1")));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    tx.send(Ok(Frame::data(Bytes::from(framed)))).await.unwrap();
    let frame = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("no ack")
        .expect("the stream ended")
        .unwrap();
    let data = frame.into_data().expect("an ack, not trailers");
    let ack: pb::PublishAck = prost::Message::decode(&data[5..]).unwrap();
    assert_eq!(error_code(&ack), "", "{ack:?}");
}

fn req_of(publisher: &str, t: pb::Tick) -> pb::PublishRequest {
    req(1, publisher, 1, t)
}

/// `/api/candles` without `from` answers the last `limit` candles up to
/// `to` (before, it counted back from the newest tick and ignored `to`: a
/// `to` older than `limit` intervals gave an empty list), and a `to` at
/// `i64::MIN` is an empty answer, not an overflow.
#[tokio::test]
async fn the_candles_api_counts_back_from_to() {
    let srv = Server::start(&["--no-sim"]);
    let minute = 60_000_000i64;
    let t0 = (now_micros() / minute - 20) * minute; // 20 minutes ago, on the grid
    let mut p = srv.publisher("candles-to").await;
    publish_all(
        &mut p,
        (0..10).map(|m| tick("CANDLE-TO", t0 + m * minute + 5, "1.5", "2")),
    )
    .await;
    let starts = |body: &str| -> Vec<i64> {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["candles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["start"].as_i64().unwrap())
            .collect()
    };
    let to = t0 + 5 * minute + 30_000_000;
    let (status, body) = srv
        .get(&format!("/api/candles?symbol=CANDLE-TO&interval=1m&limit=3&to={to}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        starts(&body),
        vec![t0 + 3 * minute, t0 + 4 * minute, t0 + 5 * minute],
        "{body}"
    );
    let (status, body) = srv.get("/api/candles?symbol=CANDLE-TO&interval=1m&limit=3").await;
    assert_eq!((status, starts(&body).len()), (200, 3), "{body}");
    assert_eq!(starts(&body)[2], t0 + 9 * minute);
    let (status, body) = srv
        .get(&format!("/api/candles?symbol=CANDLE-TO&interval=1m&to={}", i64::MIN))
        .await;
    assert_eq!((status, starts(&body)), (200, vec![]), "{body}");
}

/// A publisher that stops reading its acks (an HTTP/2 client that grants
/// the server no flow-control window) holds at most
/// `--publish-max-in-flight` answers, and only for `--slow-client-ms`:
/// then its connection is dropped and what it held goes back, so another
/// publisher, waiting for that budget meanwhile, is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_stops_reading_its_acks_loses_its_connection() {
    use futures_util::StreamExt as _;
    use hyper::body::{Bytes, Frame};
    let srv = Server::start(&["--no-sim", "--publish-max-in-flight", "100", "--slow-client-ms", "1000"]);
    let tcp = tokio::net::TcpStream::connect(srv.ports().grpc).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let greedy_conn = tokio::spawn(conn);
    // 300 requests without a tick, each refused at once: 100 answers held
    let mut body = Vec::new();
    for i in 0..300u64 {
        let msg = prost::Message::encode_to_vec(&pb::PublishRequest {
            request_id: i,
            ..Default::default()
        });
        body.push(0u8);
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
    }
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(body)))]).chain(
        futures_util::stream::pending::<Result<Frame<Bytes>, std::convert::Infallible>>(),
    );
    let req = hyper::Request::post(format!("http://{}/tickshard.v1.Feed/Publish", srv.ports().grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(Box::pin(frames)))
        .unwrap();
    let _held = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    eventually("the greedy publisher holds the whole budget", || async {
        srv.metric("tickshard_publish_in_flight").await == 100.0
    })
    .await;

    // Another publisher waits for the budget, and is answered once the
    // greedy connection is dropped.
    let mut p = srv.publisher("patient").await;
    let acks = publish_all(&mut p, [tick("PATIENT", now_micros(), "1.25", "1")]).await;
    assert_eq!(acks[0].seq, 1);
    tokio::time::timeout(WAIT, greedy_conn)
        .await
        .expect("the greedy connection was dropped")
        .unwrap()
        .expect_err("by the server");
    assert_eq!(srv.metric("tickshard_slow_publisher_closes_total").await, 1.0);
    eventually("the budget back", || async {
        srv.metric("tickshard_publish_in_flight").await == 0.0
    })
    .await;
}
