//! The server in-process (no subprocess): two `tickshard_feed::server::run`
//! shards on loopback in this test's runtime, so a WebSocket session, the
//! node and the peer link are exercised through their library entry points
//! (and a debugger or a profiler sees them in one process).

use std::net::SocketAddr;

use clap::Parser as _;
use tickshard_client::ws::{ServerMsg, WsConn};
use tickshard_feed::{
    config::ServeArgs,
    server::{Listeners, run},
};
use tickshard_shard::{domain::Symbol, ownership::Ownership};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::{WAIT, publish_all, recv, recv_close, recv_subscribed, tick};

#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    serve: ServeArgs,
}

struct InProcess {
    http: SocketAddr,
    grpc: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tickshard_feed::server::RunError>>,
    _dir: tempfile::TempDir,
}

/// Starts shard `id` of `peers.len()` in this process; returns once it serves.
async fn start(id: usize, [http, grpc, peer]: [TcpListener; 3], peers: &[SocketAddr]) -> InProcess {
    let dir = tempfile::tempdir().unwrap();
    let peers = peers
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let (id, shards, data) = (
        id.to_string(),
        peers.split(',').count().to_string(),
        dir.path().display().to_string(),
    );
    let flags = Flags::try_parse_from([
        "tickshard",
        "--no-sim",
        "--shard-id",
        &id,
        "--shards",
        &shards,
        "--peers",
        &peers,
        "--data-dir",
        &data,
        "--drain-ms",
        "100",
    ])
    .unwrap();
    let cfg = flags.serve.validate().unwrap();
    let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
    // a recorder of our own (the global one may be another test's)
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run(
        cfg,
        Listeners {
            http,
            grpc,
            peer,
            grpc_runtime: None,
        },
        metrics,
        shutdown.clone(),
        move || {
            let _ = ready_tx.send(());
        },
    ));
    tokio::time::timeout(WAIT, ready_rx).await.unwrap().unwrap();
    InProcess {
        http: http_addr,
        grpc: grpc_addr,
        shutdown,
        task,
        _dir: dir,
    }
}

async fn listeners() -> [TcpListener; 3] {
    let bind = || TcpListener::bind("127.0.0.1:0");
    [bind().await.unwrap(), bind().await.unwrap(), bind().await.unwrap()]
}

/// A subscriber on shard 0 to a symbol shard 1 owns: the subscribe and the
/// ticks published on the owner reach it through the in-process peer link,
/// gapless and with exact decimals; SIGTERM's drain closes it with 1012 and
/// `run` returns cleanly.
#[tokio::test]
async fn a_websocket_session_served_through_a_peer_in_process() {
    let (l0, l1) = (listeners().await, listeners().await);
    let peers = [l0[2].local_addr().unwrap(), l1[2].local_addr().unwrap()];
    // both must be up for the startup topology check: start them together
    let (s0, s1) = tokio::join!(start(0, l0, &peers), start(1, l1, &peers));
    let own = Ownership::new(2, 0);
    let symbol = (0..)
        .map(|i| format!("IP{i}"))
        .find(|s| own.owner(&Symbol::parse(s).unwrap()) == 1)
        .unwrap();

    let mut c = WsConn::connect(&format!("ws://{}/ws", s0.http), WAIT).await.unwrap();
    c.send_text(&format!(r#"{{"op":"subscribe","id":1,"symbols":["{symbol}"]}}"#))
        .await
        .unwrap();
    let symbols = recv_subscribed(&mut c).await;
    assert_eq!(symbols[0].seq, 0);

    let mut p = tickshard_client::publisher::Publisher::connect(tickshard_client::publisher::PublisherConfig::new(
        vec![format!("http://{}", s1.grpc)],
        "in-process",
    ))
    .await
    .unwrap();
    let acks = publish_all(
        &mut p,
        (1..=50).map(|i| tick(&symbol, 1_700_000_000_000_000 + i, &format!("100.{i:02}0"), "0.001")),
    )
    .await;
    assert_eq!(acks.last().unwrap().seq, 50);
    for i in 1..=50u64 {
        let ServerMsg::Tick(t) = recv(&mut c).await else {
            panic!("a tick")
        };
        assert_eq!(
            (t.seq, t.price.as_str(), t.size.as_str()),
            (i, format!("100.{i:02}0").as_str(), "0.001")
        );
    }

    for s in [&s0, &s1] {
        s.shutdown.cancel();
    }
    assert_eq!(recv_close(&mut c).await, 1012);
    for s in [s0, s1] {
        let r = tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}
