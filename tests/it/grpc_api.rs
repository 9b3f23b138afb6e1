//! The gRPC `Feed` API (contract §5) end to end.

use futures_util::StreamExt;
use tickshard_client::ws::ServerMsg;
use tickshard_proto::v1::{self as pb, event::Kind};

use crate::common::*;

const T0: i64 = 1_732_530_000_000_000;

#[tokio::test]
async fn a_durable_ack_and_both_kinds_of_subscriber_get_the_exact_tick() {
    let srv = Server::start(&["--no-sim"]);
    let mut ws = srv.ws().await;
    ws.send_text(r#"{"op":"subscribe","symbols":["EUR/USD"]}"#)
        .await
        .unwrap();
    assert!(matches!(recv(&mut ws).await, ServerMsg::Subscribed { .. }));
    let (s, mut grpc) = srv
        .grpc_subscribe(pb::SubscribeRequest {
            symbols: vec!["eur/usd".into()],
            ..Default::default()
        })
        .await;
    assert_eq!((s.symbols[0].symbol.as_str(), s.symbols[0].seq), ("EUR/USD", 0));

    let mut raw = RawStream::open(&srv).await;
    let t = pb::Tick {
        bid: "1.08510".into(),
        ask: "1.08514".into(),
        bid_size: "1000000".into(),
        ask_size: "0.0".into(),
        ..tick("EUR/USD", T0 + 7, "1.08512", "250000.00")
    };
    let ack = raw.call(req(77, "p1", 1, t.clone())).await;
    assert_eq!(
        (ack.request_id, ack.seq, ack.duplicate, ack.error),
        (77, 1, false, None)
    );
    assert_eq!(ack.epoch, s.symbols[0].epoch);

    let ServerMsg::Tick(w) = recv(&mut ws).await else {
        panic!()
    };
    assert_eq!(
        (
            w.seq,
            w.ts,
            w.price.as_str(),
            w.size.as_str(),
            w.bid.as_deref(),
            w.ask.as_deref(),
            w.bid_size.as_deref(),
            w.ask_size.as_deref()
        ),
        (
            1,
            T0 + 7,
            "1.08512",
            "250000.00",
            Some("1.08510"),
            Some("1.08514"),
            Some("1000000"),
            Some("0.0")
        )
    );
    let ev = tokio::time::timeout(WAIT, grpc.next()).await.unwrap().unwrap().unwrap();
    let Some(Kind::Tick(g)) = ev.kind else { panic!("{ev:?}") };
    assert_eq!(
        g,
        pb::Tick {
            symbol: "EUR/USD".into(),
            seq: 1,
            ..t
        }
    );
    // and it is in the store
    let snap = srv
        .feed()
        .await
        .get_snapshot(pb::SnapshotRequest {
            symbols: vec!["EUR/USD".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.snapshots[0].last.as_ref().unwrap().price, "1.08512");
    let list = srv.list_symbols().await;
    assert_eq!(
        list.symbols,
        vec![pb::SymbolInfo {
            symbol: "EUR/USD".into(),
            owner_shard: 0,
            seq: 1,
            epoch: ack.epoch
        }]
    );
}

#[tokio::test]
async fn retries_are_deduplicated_and_bad_ticks_are_rejected_per_request() {
    let srv = Server::start(&["--no-sim"]);
    let mut raw = RawStream::open(&srv).await;
    let a = raw.call(req(1, "pub-A", 1, tick("BTC-USD", T0 + 1, "1", "1"))).await;
    let b = raw.call(req(2, "pub-A", 2, tick("BTC-USD", T0 + 2, "2", "1"))).await;
    assert_eq!((a.seq, b.seq), (1, 2));
    // the same publisher_seq again: a retry, acked with the original seq, not stored
    let again = raw.call(req(3, "pub-A", 2, tick("BTC-USD", T0 + 2, "2", "1"))).await;
    assert_eq!((again.seq, again.duplicate), (2, true));
    // an older one: duplicate, original seq no longer known
    let old = raw.call(req(4, "pub-A", 1, tick("BTC-USD", T0 + 1, "1", "1"))).await;
    assert_eq!((old.seq, old.duplicate), (0, true));
    // another publisher, or another symbol, has its own sequence
    assert_eq!(
        raw.call(req(5, "pub-B", 1, tick("BTC-USD", T0 + 3, "3", "1")))
            .await
            .seq,
        3
    );
    assert_eq!(
        raw.call(req(6, "pub-A", 1, tick("ETH-USD", T0 + 3, "3", "1")))
            .await
            .seq,
        1
    );
    // bad ticks: per-request error, no seq consumed, the stream goes on
    let cases = [
        (tick("b@d", T0, "1", "1"), "invalid_symbol"),
        (tick("BTC-USD", T0, "0", "1"), "invalid_tick"),
        (tick("BTC-USD", T0, "1", "-1"), "invalid_tick"),
        (tick("BTC-USD", 0, "1", "1"), "invalid_tick"),
        (tick("BTC-USD", T0, "1.0e3", "1"), "invalid_tick"),
        (
            pb::Tick {
                bid: "5".into(),
                ask: "4".into(),
                ..tick("BTC-USD", T0, "1", "1")
            },
            "invalid_tick",
        ),
    ];
    for (i, (t, code)) in cases.into_iter().enumerate() {
        let r = raw.call(req(100 + i as u64, "pub-C", 1 + i as u64, t)).await;
        assert_eq!((r.seq, r.error.as_ref().map(|e| e.code.as_str())), (0, Some(code)));
    }
    assert_eq!(
        raw.call(req(200, "pub-A", 3, tick("BTC-USD", T0 + 9, "9", "1")))
            .await
            .seq,
        4,
        "no seq was consumed"
    );
    // the store holds each tick once
    let h = srv
        .feed()
        .await
        .get_history(pb::HistoryRequest {
            symbol: "BTC-USD".into(),
            from_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.ticks.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(!h.truncated);
    let h = srv
        .feed()
        .await
        .get_history(pb::HistoryRequest {
            symbol: "BTC-USD".into(),
            from_seq: 2,
            to_seq: 3,
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((h.ticks.len(), h.ticks[0].seq, h.truncated), (1, 2, true));
}

/// A gRPC subscriber's events are counted in `tickshard_messages_sent_total`
/// and `tickshard_bytes_sent_total` under `protocol="grpc"`, exactly: each
/// event once, with its 5-byte gRPC prefix (the rest of a batch when the
/// stream ends).
#[tokio::test]
async fn grpc_deliveries_are_counted_in_the_sent_metrics() {
    use prost::Message as _;
    let srv = Server::start(&["--no-sim"]);
    let (s, mut stream) = srv
        .grpc_subscribe(pb::SubscribeRequest {
            symbols: vec!["MSFT".into()],
            ..Default::default()
        })
        .await;
    let mut sent = vec![pb::Event {
        kind: Some(Kind::Subscribed(s)),
    }];
    let mut p = srv.publisher("m").await;
    publish_all(&mut p, (1..=3).map(|i| tick("MSFT", T0 + i, "415.5", "3"))).await;
    while sent.len() < 4 {
        let ev = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        sent.push(ev);
    }
    assert!(matches!(&sent[3].kind, Some(Kind::Tick(t)) if t.seq == 3), "{sent:?}");
    drop(stream);
    let messages = sent.len() as f64;
    let bytes: usize = sent.iter().map(|e| e.encoded_len() + 5).sum();
    eventually("the gRPC stream's events counted", || async {
        srv.metric(r#"tickshard_messages_sent_total{protocol="grpc"}"#).await == messages
    })
    .await;
    assert_eq!(
        srv.metric(r#"tickshard_bytes_sent_total{protocol="grpc"}"#).await,
        bytes as f64
    );
}

#[tokio::test]
async fn grpc_subscribe_resumes_like_websocket() {
    let srv = Server::start(&["--no-sim"]);
    let mut p = srv.publisher("g").await;
    let acks = publish_all(&mut p, (1..=20).map(|i| tick("AAPL", T0 + i, "189.84", "10"))).await;
    let epoch = acks[0].epoch.clone();
    let mut resume = std::collections::HashMap::new();
    resume.insert("AAPL".to_string(), pb::Position { seq: 15, epoch });
    let (st, mut s) = srv
        .grpc_subscribe(pb::SubscribeRequest {
            symbols: vec!["AAPL".into()],
            resume,
            ..Default::default()
        })
        .await;
    assert_eq!((st.symbols[0].seq, st.symbols[0].recovered), (20, true));
    for want in 16..=20 {
        let ev = tokio::time::timeout(WAIT, s.next()).await.unwrap().unwrap().unwrap();
        let Some(Kind::Tick(t)) = ev.kind else { panic!("{ev:?}") };
        assert_eq!(t.seq, want);
    }
}

#[tokio::test]
async fn health_is_served_for_both_service_names() {
    let srv = Server::start(&["--no-sim"]);
    let mut health = srv.health().await;
    for service in ["", "tickshard.v1.Feed"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

/// Reflection v1 lists the public services and serves their descriptors
/// (what `grpcurl` needs without proto files).
#[tokio::test]
async fn reflection_lists_the_services_and_serves_their_descriptors() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let srv = Server::start(&["--no-sim"]);
    let channel = tonic::transport::Endpoint::from_shared(srv.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = futures_util::stream::iter(vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("tickshard.v1.Feed".into())),
    ]);
    let mut answers = client.server_reflection_info(reqs).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "tickshard.v1.Feed",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.contains("Cluster")),
        "the internal service is not advertised on the public port: {names:?}"
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) = answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor");
    };
    let feed = files
        .file_descriptor_proto
        .iter()
        .find(|f| f.windows(10).any(|w| w == b"feed.proto"))
        .expect("feed.proto's descriptor");
    for method in [
        &b"Publish"[..],
        b"Subscribe",
        b"GetSnapshot",
        b"GetHistory",
        b"ListSymbols",
    ] {
        assert!(
            feed.windows(method.len()).any(|w| w == method),
            "{}",
            String::from_utf8_lossy(method)
        );
    }
}

/// The public API reads at most max(`--max-message-bytes`, 192 bytes ×
/// `--max-subscriptions`) of one request message (tonic's default was
/// 4 MiB, all of it held before the handler, and its token check, ran): a
/// Subscribe naming `--max-subscriptions` 32-byte symbols, each with a
/// resume position, is served; a larger message is refused OUT_OF_RANGE
/// before it is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_message_is_bounded_by_the_subscription_limit() {
    let srv = Server::start(&["--no-sim", "--max-subscriptions", "1000"]);
    let symbols: Vec<String> = (0..1_000).map(|i| format!("S{i:04}-{}", "X".repeat(26))).collect();
    let resume = symbols
        .iter()
        .map(|s| {
            let p = pb::Position {
                seq: u64::from(u32::MAX),
                epoch: "00000000abcd".into(),
            };
            (s.clone(), p)
        })
        .collect();
    let req = pb::SubscribeRequest {
        symbols: symbols.clone(),
        channels: vec!["ticks".into()],
        resume,
    };
    assert!(
        prost::Message::encoded_len(&req) > 65_536,
        "the largest request is past --max-message-bytes"
    );
    let (subscribed, _stream) = srv.grpc_subscribe(req).await;
    assert_eq!(subscribed.symbols.len(), 1_000);

    // 7,000 such symbols: ~238 KB, past 192,000 bytes
    let symbols: Vec<String> = (0..7_000).map(|i| format!("S{i:04}-{}", "X".repeat(26))).collect();
    let e = srv
        .feed()
        .await
        .get_snapshot(pb::SnapshotRequest { symbols })
        .await
        .expect_err("a request past the bound");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert!(e.message().contains("192000"), "{e}");

    // On a Publish stream, a message past the bound ends the stream with
    // OUT_OF_RANGE once what came before it is acked (not with OK, as if
    // the client had ended it).
    let too_big = tick("BIG", 1_700_000_000_000_000, &"1".repeat(200_000), "1");
    let reqs = vec![
        crate::common::req(1, "p", 1, tick("BIG", 1_700_000_000_000_000, "1", "1")),
        crate::common::req(2, "p", 2, too_big),
    ];
    let mut answers = srv
        .feed()
        .await
        .publish(futures_util::stream::iter(reqs))
        .await
        .expect("publish")
        .into_inner();
    let first = answers.message().await.expect("an ack").expect("an ack");
    assert_eq!((first.request_id, first.seq), (1, 1));
    let e = answers.message().await.expect_err("the stream fails");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");

    // However high the flags, a request over 4 MiB is OUT_OF_RANGE (§5).
    let srv = Server::start(&["--no-sim", "--max-subscriptions", "30000"]);
    let symbols: Vec<String> = (0..30_000).map(|i| format!("{i:05}{}", "X".repeat(145))).collect();
    let e = srv
        .feed()
        .await
        .get_snapshot(pb::SnapshotRequest { symbols })
        .await
        .expect_err("a request past 4 MiB");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert!(e.message().contains("4194304"), "{e}");
}
