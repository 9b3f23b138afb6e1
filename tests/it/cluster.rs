//! Three real processes as one feed (contract §2, §4, §7).

use std::{collections::HashMap, time::Duration};

use tickshard_client::ws::{Event, ServerMsg, Subscriber, SubscriberConfig};
use tickshard_proto::v1 as pb;
use tickshard_shard::{domain::Symbol, ownership::Ownership};

use crate::common::*;

const T0: i64 = 1_732_530_000_000_000;

/// `n` symbols owned by `shard` (of `shards`).
pub fn owned_by(shard: u32, shards: u32, n: usize) -> Vec<String> {
    let own = Ownership::new(shards, 0);
    (0..)
        .map(|i| format!("SYM-{i}"))
        .filter(|s| own.owner(&Symbol::parse(s).unwrap()) == shard)
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_serve_every_symbol_from_any_pod() {
    let c = TestCluster::start(3, &[]);
    c.wait_linked().await;
    // 30 symbols spread over all shards, published through pod 0
    let symbols: Vec<String> = (0..30).map(|i| format!("SPREAD-{i}")).collect();
    let own = Ownership::new(3, 0);
    let owners: Vec<u32> = symbols.iter().map(|s| own.owner(&Symbol::parse(s).unwrap())).collect();
    for shard in 0..3 {
        assert!(
            owners.contains(&shard),
            "the 30 symbols land on every shard: {owners:?}"
        );
    }
    let mut p = c.pods[0].publisher("spread").await;
    publish_all(
        &mut p,
        symbols
            .iter()
            .enumerate()
            .map(|(i, s)| tick(s, T0 + i as i64, "1", "1")),
    )
    .await;
    // every pod lists every symbol with its one owner
    let mut lists = Vec::new();
    for pod in &c.pods {
        let l = pod.list_symbols().await;
        lists.push(l.symbols);
    }
    assert_eq!(lists[0].len(), 30);
    for (s, o) in symbols.iter().zip(&owners) {
        let info = lists[0].iter().find(|i| &i.symbol == s).unwrap();
        assert_eq!((info.owner_shard, info.seq), (*o, 1));
    }
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[0], lists[2]);
    // A peer's history read goes to the owner; a pod asked for a symbol it
    // does not own (a caller with a stale map) says so rather than answering
    // from what it holds.
    let (one, &owner) = symbols.iter().zip(&owners).next().unwrap();
    let mut at_owner = c.pods[owner as usize].peer().await;
    let mut at_other = c.pods[((owner + 1) % 3) as usize].peer().await;
    let not_owner = |r: Result<_, tonic::Status>| {
        let e = r.expect_err("not the owner");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains("does not own"), "{e}");
    };
    let req = pb::HistoryRequest {
        symbol: one.clone(),
        from_seq: 1,
        ..Default::default()
    };
    let h = at_owner.local_history(req.clone()).await.unwrap().into_inner();
    assert_eq!(h.ticks.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![1]);
    not_owner(at_other.local_history(req).await.map(|_| ()));
    // So does a peer's snapshot read (it left the symbol out, as if it had
    // no ticks).
    let req = pb::SnapshotRequest {
        symbols: vec![one.clone()],
    };
    let s = at_owner.local_snapshot(req.clone()).await.unwrap().into_inner();
    let seqs: Vec<u64> = s.snapshots.iter().filter_map(|s| Some(s.last.as_ref()?.seq)).collect();
    assert_eq!(seqs, vec![1]);
    not_owner(at_other.local_snapshot(req).await.map(|_| ()));

    // a client on pod 2 gets every tick of symbols owned by pods 0 and 1, once, in order
    let foreign: Vec<String> = owned_by(0, 3, 3).into_iter().chain(owned_by(1, 3, 3)).collect();
    let mut sub = Subscriber::new(SubscriberConfig {
        urls: vec![c.pods[2].ws_url()],
        symbols: foreign.clone(),
        channels: vec!["ticks".into()],
        connect_timeout: Duration::from_secs(2),
        silence: tickshard_client::ws::SILENCE,
        token: None,
        trust: None,
    })
    .expect("a valid subscriber configuration");
    assert!(matches!(sub.next().await, Event::Connected { .. }));
    let Event::Message(ServerMsg::Subscribed { symbols: st, .. }) = sub.next().await else {
        panic!()
    };
    assert_eq!(st.len(), 6);
    // publishing through any pod gives the same seq stream
    let mut pubs = Vec::new();
    for (i, pod) in c.pods.iter().enumerate() {
        pubs.push(pod.publisher(&format!("via-{i}")).await);
    }
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    for round in 0..30i64 {
        for (i, p) in pubs.iter_mut().enumerate() {
            let acks = publish_all(
                p,
                foreign
                    .iter()
                    .map(|s| tick(s, T0 + round * 10 + i as i64, &format!("1{round}.{i}"), "1")),
            )
            .await;
            for (s, a) in foreign.iter().zip(acks) {
                acked.entry(s.clone()).or_default().push(a.seq);
            }
        }
    }
    for (s, seqs) in &acked {
        assert_eq!(
            seqs,
            &(1..=90).collect::<Vec<u64>>(),
            "{s}: one gapless seq stream whichever pod took the publish"
        );
    }
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    while seen.values().map(Vec::len).sum::<usize>() < 6 * 90 {
        match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
            Event::Message(ServerMsg::Tick(t)) => seen.entry(t.symbol).or_default().push(t.seq),
            other => panic!("{other:?}"),
        }
    }
    for s in &foreign {
        assert_eq!(
            seen[s],
            (1..=90).collect::<Vec<u64>>(),
            "{s} on pod 2: exactly once, in order"
        );
    }
    // reads of foreign symbols are answered from the owner
    let h = c.pods[2]
        .feed()
        .await
        .get_history(pb::HistoryRequest {
            symbol: foreign[0].clone(),
            from_seq: 89,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.ticks.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![89, 90]);
    let snap = c.pods[1]
        .feed()
        .await
        .get_snapshot(pb::SnapshotRequest {
            symbols: foreign.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.snapshots.len(), 6);
    assert!(snap.snapshots.iter().all(|s| s.last.as_ref().unwrap().seq == 90));
    // and the WebSocket symbols op lists every shard's symbols
    let mut ws = c.pods[1].ws().await;
    ws.send_text(r#"{"op":"symbols"}"#).await.unwrap();
    let ServerMsg::Symbols { symbols: all, .. } = recv(&mut ws).await else {
        panic!()
    };
    assert_eq!(all.len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inconsistent_cluster_configs_are_refused() {
    let c = TestCluster::start(3, &[]);
    c.wait_linked().await;
    let tmp = tempfile::tempdir().unwrap();
    let extra = TestCluster::addrs(1)[0];
    // another N than the running pods: a new pod follows the cluster's
    // committed count (contract §9), and at ordinal 3 of 3 it owns nothing
    let four = format!("{},http://{}", c.peers, extra.peer);
    let joined = Server::try_start_at(
        &tmp.path().join("a"),
        extra,
        &["--no-sim", "--shards", "4", "--shard-id", "3", "--peers", &four],
    )
    .expect("a pod with a stale --shards follows the cluster");
    assert!(joined.log_text().contains("adopting the cluster's newer shard layout"));
    let mut p = joined.publisher("joined").await;
    let acks = publish_all(&mut p, (0..8).map(|i| tick(&format!("JOIN-{i}"), T0, "1", "1"))).await;
    assert!(acks.iter().all(|a| a.error.is_none() && a.seq == 1));
    let listed = joined.list_symbols().await.symbols;
    assert!(
        listed.iter().all(|i| i.owner_shard < 3),
        "nothing is owned by shard 3: {listed:?}"
    );
    assert_eq!(listed.iter().filter(|i| i.symbol.starts_with("JOIN-")).count(), 8);
    drop(joined);
    // a second process claiming shard 1 (pod 1's address answers first)
    let e = Server::try_start_at(
        &tmp.path().join("b"),
        extra,
        &["--no-sim", "--shards", "3", "--shard-id", "1", "--peers", &c.peers],
    )
    .err()
    .expect("a duplicate shard id must refuse to start");
    assert!(e.contains("shard id 1 is already served"), "{e}");
    // a pod started on another shard's data dir
    let e = Server::try_start_at(
        &c.pods[0].dir,
        extra,
        &["--no-sim", "--shards", "3", "--shard-id", "2", "--peers", &c.peers],
    )
    .err()
    .expect("must refuse");
    assert!(e.contains("belongs to shard 0,") || e.contains("locked"), "{e}");
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    seqs: HashMap<String, Vec<u64>>,
    snapshots: u64,
    unavailable: u64,
    reconnects: u64,
    max_gap: Duration,
}

/// `kubectl rollout restart` with load: a publisher at ~2,000 ticks/s over 30
/// symbols, six resuming subscribers spread over the pods, pods restarted 2, 1, 0 one at a
/// time (stop, start on the same data dir, wait until ready).
async fn rolling_restart(kill: bool) -> Duration {
    let mut c = TestCluster::start(3, &["--drain-ms", "300"]);
    c.wait_linked().await;
    let (ws, grpc) = (c.ws_urls(), c.grpc_urls());
    rollout_under_load(ws, grpc, "ROLL", 30, &[2, 1, 0], None, async |pod| {
        if kill {
            c.pods[pod].kill9();
        } else {
            c.pods[pod].sigterm();
            assert!(c.pods[pod].wait_exit(Duration::from_secs(30)).success());
        }
        c.pods[pod].restart();
        let p = &c.pods[pod];
        eventually("restarted pod ready", || async { p.get("/readyz").await.0 == 200 }).await;
    })
    .await
}

/// Runs `kubectl rollout`-like restarts under load and checks the guarantees:
/// a publisher at ~2,000 ticks/s over `n_symbols` symbols (`<prefix>-<i>`)
/// through the client library, six resuming subscribers spread over the pods
/// (starting at pod `i % pods`); `restart(pod)` is called
/// for each pod of `order` (it must return once the pod is ready again).
/// Asserts that every acked tick reached every subscriber exactly once, in
/// order, and is in the owners' stores; returns the max client-visible gap.
pub(crate) async fn rollout_under_load(
    ws_urls: Vec<String>,
    grpc_urls: Vec<String>,
    prefix: &str,
    n_symbols: usize,
    order: &[usize],
    token: Option<String>,
    mut restart: impl AsyncFnMut(usize),
) -> Duration {
    let symbols: Vec<String> = (0..n_symbols).map(|i| format!("{prefix}-{i}")).collect();
    let pods = ws_urls.len();
    let stop = tokio_util::sync::CancellationToken::new();
    let (acked_tx, acked_rx) = tokio::sync::watch::channel(0u64);

    let sub_stop = tokio_util::sync::CancellationToken::new();
    let mut subscribers = Vec::new();
    let mut progress = Vec::new();
    for i in 0..6 {
        let mut sub = Subscriber::new(SubscriberConfig {
            urls: ws_urls.clone(),
            symbols: symbols.clone(),
            channels: vec!["ticks".into()],
            connect_timeout: Duration::from_secs(2),
            silence: tickshard_client::ws::SILENCE,
            token: token.clone(),
            trust: None,
        })
        .expect("a valid subscriber configuration")
        .starting_at(i % pods);
        assert!(matches!(
            tokio::time::timeout(WAIT, sub.next()).await.unwrap(),
            Event::Connected { .. }
        ));
        // Every symbol subscribed before publishing starts: a pod whose link to
        // an owner is not up yet answers `unavailable` for that owner's symbols
        // and completes them (their own `subscribed`) once the link is up; a
        // symbol subscribed after its first ticks would rightly start with a
        // snapshot.
        let mut waiting: std::collections::HashSet<&str> = symbols.iter().map(String::as_str).collect();
        while !waiting.is_empty() {
            match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
                Event::Message(ServerMsg::Subscribed { symbols, .. }) => {
                    for s in &symbols {
                        waiting.remove(s.symbol.as_str());
                    }
                }
                Event::Message(ServerMsg::Error { code, symbol, .. }) if code == "unavailable" => {
                    eprintln!("subscriber {i}: {symbol:?} unavailable at subscribe; its subscribe is deferred");
                }
                other => panic!("subscriber {i}: {other:?} while subscribing"),
            }
        }
        let stop = sub_stop.clone();
        let first_url = ws_urls[i % pods].clone();
        let count = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, u64>::new()));
        progress.push(count.clone());
        subscribers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut url = first_url;
            let mut last = tokio::time::Instant::now();
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = sub.next() => ev,
                };
                match ev {
                    Event::Message(ServerMsg::Tick(t)) => {
                        let now = tokio::time::Instant::now();
                        seen.max_gap = seen.max_gap.max(now - last);
                        last = now;
                        count.lock().unwrap().insert(t.symbol.clone(), t.seq);
                        seen.seqs.entry(t.symbol).or_default().push(t.seq);
                    }
                    Event::Message(ServerMsg::Snapshot(s)) => {
                        let had = seen.seqs.get(&s.symbol).and_then(|v| v.last());
                        eprintln!(
                            "subscriber {i}: unexpected snapshot {s:?} (had seq {had:?}, connected to {url:?}, {} reconnects)",
                            seen.reconnects
                        );
                        seen.snapshots += 1
                    }
                    Event::Message(ServerMsg::Error { code, .. }) if code == "unavailable" => seen.unavailable += 1,
                    Event::Connected { url: u } => {
                        url = u;
                        seen.reconnects += 1
                    }
                    _ => {}
                }
            }
            seen
        }));
    }

    let publisher = {
        let (stop, urls, symbols) = (stop.clone(), grpc_urls.clone(), symbols.clone());
        let mut cfg = tickshard_client::publisher::PublisherConfig::new(urls, "roller");
        cfg.token = token.clone();
        tokio::spawn(async move {
            let mut p = tickshard_client::publisher::Publisher::connect(cfg).await.unwrap();
            let mut acked: HashMap<String, u64> = HashMap::new();
            let mut n = 0i64;
            let mut total = 0u64;
            let mut every = tokio::time::interval(Duration::from_millis(1));
            let t_start = tokio::time::Instant::now();
            let mut last_ack = t_start;
            let mut record = |a: tickshard_client::publisher::Acked, total: &mut u64| {
                assert!(a.error.is_none(), "{a:?}");
                let e = acked.entry(a.symbol).or_default();
                *e = (*e).max(a.seq);
                *total += 1;
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {
                        for _ in 0..2 {
                            let s = &symbols[n as usize % n_symbols];
                            let sent = tokio::time::timeout(Duration::from_secs(30), p.send(tick(s, T0 + n, "100.25", "1"))).await;
                            assert!(sent.is_ok(), "publisher stuck: {} unacked ({:?})", p.in_flight(), p.unacked_summary());
                            n += 1;
                        }
                    }
                    // (only while something is in flight: with nothing unacked,
                    // `next_ack` returns at once and this loop would spin)
                    a = p.next_ack(), if p.in_flight() > 0 => {
                        if let Some(a) = a.unwrap() {
                            let now = tokio::time::Instant::now();
                            if now - last_ack > Duration::from_millis(500) {
                                eprintln!("publisher: no ack for {:?} (until {:?} after start); in flight {}", now - last_ack, now - t_start, p.in_flight());
                            }
                            last_ack = now;
                            record(a, &mut total);
                            let _ = acked_tx.send(total);
                        }
                    }
                }
            }
            let flushed = tokio::time::timeout(Duration::from_secs(30), p.flush()).await;
            let Ok(flushed) = flushed else {
                panic!(
                    "publisher: {} requests never acked ({:?}), {} reconnects",
                    p.in_flight(),
                    p.unacked_summary(),
                    p.reconnects
                );
            };
            for a in flushed.unwrap() {
                record(a, &mut total);
            }
            (acked, n as u64)
        })
    };

    let mut acked_rx = acked_rx;
    let wait_acks = |more: u64| {
        let target = *acked_rx.borrow() + more;
        let mut rx = acked_rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|n| *n >= target))
                .await
                .expect("publishing stalled")
                .unwrap();
        }
    };
    let t0 = std::time::Instant::now();
    wait_acks(2_000).await;
    for &pod in order {
        eprintln!("restarting pod {pod} at {:?}", t0.elapsed());
        restart(pod).await;
        eprintln!("pod {pod} ready at {:?}", t0.elapsed());
        wait_acks(2_000).await;
    }
    let _ = &mut acked_rx;
    // stop publishing; every acked tick must reach every subscriber
    stop.cancel();
    let (acked, sent) = publisher.await.unwrap();
    let min = 2_000 * (order.len() as u64 + 1);
    assert!(
        sent >= min,
        "only {sent} ticks were published (expected at least {min})"
    );
    for (i, p) in progress.iter().enumerate() {
        let behind = || {
            let p = p.lock().unwrap();
            acked
                .iter()
                .filter(|(sym, seq)| p.get(*sym).is_none_or(|got| got < *seq))
                .map(|(sym, seq)| format!("{sym}: {:?}/{seq}", p.get(sym)))
                .collect::<Vec<_>>()
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !behind().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "subscriber {i} is missing acked ticks: {:?}",
                behind()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    sub_stop.cancel();
    let mut max_gap = Duration::ZERO;
    for (i, s) in subscribers.into_iter().enumerate() {
        let seen = s.await.unwrap();
        assert_eq!(seen.snapshots, 0, "subscriber {i}: a resume never needs a snapshot");
        for sym in &symbols {
            let got = seen.seqs.get(sym).cloned().unwrap_or_default();
            let want: Vec<u64> = (1..=got.len() as u64).collect();
            assert_eq!(got, want, "subscriber {i}, {sym}: every tick once, in order");
        }
        max_gap = max_gap.max(seen.max_gap);
        eprintln!(
            "subscriber {i}: {} ticks, {} reconnects, {} unavailable notices, max gap {:?}",
            seen.seqs.values().map(Vec::len).sum::<usize>(),
            seen.reconnects,
            seen.unavailable,
            seen.max_gap
        );
    }
    // nothing acked was lost: every acked seq is in the owner's store
    let mut feed = pb::feed_client::FeedClient::connect(grpc_urls[0].clone())
        .await
        .unwrap();
    for (sym, &seq) in &acked {
        let q = pb::HistoryRequest {
            symbol: sym.clone(),
            from_seq: 1,
            limit: 10_000,
            ..Default::default()
        };
        let req = match &token {
            Some(t) => crate::common::with_token(q, t),
            None => tonic::Request::new(q),
        };
        let h = feed.get_history(req).await.unwrap().into_inner();
        assert!(
            h.ticks.len() as u64 >= seq,
            "{sym}: acked {seq}, stored {}",
            h.ticks.len()
        );
        assert_eq!(
            h.ticks.iter().map(|t| t.seq).collect::<Vec<_>>(),
            (1..=h.ticks.len() as u64).collect::<Vec<_>>()
        );
    }
    max_gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigterm_loses_and_duplicates_nothing() {
    let gap = rolling_restart(false).await;
    eprintln!(
        "rolling restart (SIGTERM): max client-visible gap {} ms",
        gap.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigkill_loses_nothing_acked() {
    let gap = rolling_restart(true).await;
    eprintln!(
        "rolling restart (SIGKILL): max client-visible gap {} ms",
        gap.as_millis()
    );
}

/// A TCP proxy that can cut every connection through it (a network partition
/// between two pods) and heal.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(listen: std::net::SocketAddr, target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let task = {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: the partition refuses new links too
                    }
                    conns.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    }));
                }
            })
        };
        Proxy {
            addr: listen,
            cut,
            conns,
            task,
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_partition_heals_without_gap_or_duplicate() {
    let tmp = tempfile::tempdir().unwrap();
    let addrs = TestCluster::addrs(4); // three pods and the proxy
    let proxy = Proxy::start(addrs[3].peer, addrs[0].peer).await;
    let real: Vec<String> = addrs[..3].iter().map(|p| format!("http://{}", p.peer)).collect();
    let via_proxy = format!(
        "http://{},http://{},http://{}",
        proxy.addr, addrs[1].peer, addrs[2].peer
    );
    let mut pods = Vec::new();
    for (i, &ports) in addrs.iter().take(3).enumerate() {
        let peers = if i == 2 { via_proxy.clone() } else { real.join(",") };
        pods.push(Server::start_at(
            &tmp.path().join(format!("pod-{i}")),
            ports,
            &[
                "--no-sim",
                "--shards",
                "3",
                "--shard-id",
                &i.to_string(),
                "--peers",
                &peers,
            ],
        ));
    }
    for (i, p) in pods.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + WAIT;
        while p.metric("tickshard_peer_up").await < 2.0 {
            let (_, m) = p.get("/metrics").await;
            let up: Vec<&str> = m.lines().filter(|l| l.starts_with("tickshard_peer_up")).collect();
            assert!(tokio::time::Instant::now() < deadline, "pod {i} not linked: {up:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // a client on pod 2 follows symbols owned by pod 0 (through the proxy)
    let symbols = owned_by(0, 3, 3);
    let mut sub = Subscriber::new(SubscriberConfig {
        urls: vec![pods[2].ws_url()],
        symbols: symbols.clone(),
        channels: vec!["ticks".into()],
        connect_timeout: Duration::from_secs(2),
        silence: tickshard_client::ws::SILENCE,
        token: None,
        trust: None,
    })
    .expect("a valid subscriber configuration");
    assert!(matches!(
        tokio::time::timeout(WAIT, sub.next()).await.unwrap(),
        Event::Connected { .. }
    ));
    assert!(matches!(
        tokio::time::timeout(WAIT, sub.next()).await.unwrap(),
        Event::Message(ServerMsg::Subscribed { .. })
    ));
    // the publisher talks to pod 0 directly: the partition does not stop it
    let mut p = pods[0].publisher("partition").await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut publish = async |p: &mut tickshard_client::publisher::Publisher, round: i64| {
        let acks = publish_all(
            p,
            symbols
                .iter()
                .enumerate()
                .map(|(i, s)| tick(s, T0 + round * 10 + i as i64, "7.5", "1")),
        )
        .await;
        for (s, a) in symbols.iter().zip(acks) {
            acked.insert(s.clone(), a.seq);
        }
    };
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut notices = 0;
    for round in 0..20 {
        publish(&mut p, round).await;
    }
    proxy.cut();
    // ticks keep coming on pod 0 while pod 2 is cut off from it
    for round in 20..40 {
        publish(&mut p, round).await;
    }
    // pod 2 notices the partition and tells the client
    while notices == 0 {
        match tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("no unavailable notice")
        {
            Event::Message(ServerMsg::Tick(t)) => seen.entry(t.symbol).or_default().push(t.seq),
            Event::Message(ServerMsg::Error { code, symbol, .. }) if code == "unavailable" => {
                assert!(symbol.is_some_and(|s| symbols.contains(&s)));
                notices += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    proxy.heal();
    for round in 40..60 {
        publish(&mut p, round).await;
    }
    // after healing, the mirror re-follows from where it was: no gap, no duplicate
    let caught_up = |seen: &HashMap<String, Vec<u64>>| {
        acked
            .iter()
            .all(|(s, &q)| seen.get(s).and_then(|v| v.last()) == Some(&q))
    };
    while !caught_up(&seen) {
        match tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("the follower did not catch up")
        {
            Event::Message(ServerMsg::Tick(t)) => seen.entry(t.symbol).or_default().push(t.seq),
            Event::Message(ServerMsg::Error { code, .. }) if code == "unavailable" => {}
            other => panic!("{other:?}"),
        }
    }
    for s in &symbols {
        assert_eq!(
            seen[s],
            (1..=60).collect::<Vec<u64>>(),
            "{s}: every tick once, in order, across the partition"
        );
    }
    assert!(pods[2].metric("tickshard_peer_up").await >= 2.0, "the link is back up");
}

/// A subscribe deferred because its symbol's owner is down is answered
/// with an `unavailable` error that echoes its `id` (contract §4: every
/// reply to a message with an `id` echoes it), then completes with its own
/// `subscribed` (same `id`) once the owner is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_subscribe_echoes_its_id() {
    let mut c = TestCluster::start(2, &[]);
    c.wait_linked().await;
    let symbol = owned_by(1, 2, 1).remove(0);
    c.pods[1].kill9();
    let mut ws = c.pods[0].ws().await;
    ws.send_text(&format!(r#"{{"op":"subscribe","id":9,"symbols":["{symbol}"]}}"#))
        .await
        .unwrap();
    match recv(&mut ws).await {
        ServerMsg::Error {
            id, code, symbol: s, ..
        } => {
            assert_eq!(
                (id.as_deref(), code.as_str(), s),
                (Some("9"), "unavailable", Some(symbol.clone()))
            )
        }
        other => panic!("{other:?}"),
    }
    c.pods[1].restart();
    match recv(&mut ws).await {
        ServerMsg::Subscribed { id, symbols } => {
            assert_eq!(id.as_deref(), Some("9"));
            assert_eq!(
                symbols.iter().map(|s| s.symbol.as_str()).collect::<Vec<_>>(),
                [symbol.as_str()]
            );
        }
        other => panic!("{other:?}"),
    }
}

/// `/api/candles` and the gRPC reads share `--grpc-max-reads` (contract §5):
/// a candles read held up by a frozen owner (SIGSTOP: its relay waits for
/// the peer call's timeout) takes the one slot, so another candles read is
/// shed at once with 503 and `Retry-After: 1`, a gRPC read with
/// UNAVAILABLE, and both are counted; once the owner is back, reads are
/// served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candles_reads_share_the_read_limit_with_grpc_reads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // (each pod in its own process group: one is stopped below)
    let c = TestCluster::start_apart(TestCluster::addrs(2), 2, &["--grpc-max-reads", "1"]);
    c.wait_linked().await;
    let here = owned_by(0, 2, 1).remove(0);
    let there = owned_by(1, 2, 1).remove(0);
    let mut p = c.pods[0].publisher("candles").await;
    publish_all(&mut p, [tick(&here, T0, "1.5", "2"), tick(&there, T0, "2.5", "1")]).await;
    let pod0 = &c.pods[0];
    let candles = |sym: &str| format!("/api/candles?symbol={sym}&interval=1m");
    assert_eq!(pod0.get(&candles(&here)).await.0, 200);

    c.pods[1].signal("-STOP");
    let held = {
        let (addr, path) = (pod0.ports().http, candles(&there));
        // (until it is admitted: it is shed while one of the polls below
        // holds the slot)
        tokio::spawn(async move {
            loop {
                let (status, body) = http_get(addr, &path).await;
                if status != 503 || !body.contains("--grpc-max-reads") {
                    break status;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // The full response of a GET, headers included.
    let raw_get = |path: String| async move {
        let mut s = tokio::net::TcpStream::connect(pod0.ports().http)
            .await
            .expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        String::from_utf8_lossy(&buf).into_owned()
    };
    // (polled, as `eventually` does: the only other read is the held one,
    // so a poll shed means that one is in flight)
    let deadline = tokio::time::Instant::now() + WAIT;
    let shed = loop {
        let text = raw_get(candles(&here)).await;
        if text.starts_with("HTTP/1.1 503") {
            break text;
        }
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(tokio::time::Instant::now() < deadline, "no candles read was shed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(shed.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "{shed}");
    assert!(shed.contains("--grpc-max-reads"), "{shed}");
    // a gRPC read meets the same limit (it may come after the held read
    // timed out: then it is served, and that is not this test's failure)
    let grpc = pod0
        .feed()
        .await
        .get_history(pb::HistoryRequest {
            symbol: here.clone(),
            from_seq: 1,
            ..Default::default()
        })
        .await;
    if let Err(e) = &grpc {
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains("--grpc-max-reads"), "{e}");
    }
    let (_, metrics) = pod0.get("/metrics").await;
    let shed_candles = metrics
        .lines()
        .filter(|l| l.starts_with("tickshard_grpc_shed_total{") && l.contains("method=\"/api/candles\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(shed_candles >= 1.0, "{metrics}");

    c.pods[1].signal("-CONT");
    let status = tokio::time::timeout(WAIT, held)
        .await
        .expect("the held read ended")
        .expect("task");
    // (served, or 503 if the owner's call timed out)
    assert!(status == 200 || status == 503, "the held read: {status}");
    eventually("candles served again", || async {
        pod0.get(&candles(&here)).await.0 == 200
    })
    .await;
}

/// A shard's symbol list past 4 MiB (tonic's default reply size: ~78k
/// symbols of 32 characters, 54 bytes each; `--max-symbols` is 100,000) still reaches every other pod:
/// such a reply was dropped, and with it the whole shard from `ListSymbols`
/// on every other pod (contract §4: every symbol with ticks, on any shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_many_symbols_stays_in_every_list() {
    const N: usize = 90_000;
    let c = TestCluster::start(2, &[]);
    c.wait_linked().await;
    // 32-character symbols of shard 1, published on shard 1 itself
    let own = Ownership::new(2, 0);
    let symbols: Vec<String> = (0..)
        .map(|i| format!("MANY-SYMBOLS-OF-ONE-SHARD-{i:06}"))
        .filter(|s| own.owner(&Symbol::parse(s).unwrap()) == 1)
        .take(N)
        .collect();
    let mut p = c.pods[1].publisher("many").await;
    let acks = publish_all(
        &mut p,
        symbols
            .iter()
            .enumerate()
            .map(|(i, s)| tick(s, T0 + i as i64, "1.5", "1")),
    )
    .await;
    assert_eq!(acks.len(), N);
    let mut feed = c.pods[0].feed().await.max_decoding_message_size(64 << 20);
    let listed = tokio::time::timeout(WAIT, feed.list_symbols(pb::ListSymbolsRequest {}))
        .await
        .expect("in time")
        .expect("ListSymbols")
        .into_inner()
        .symbols;
    let of_shard_1 = listed.iter().filter(|s| s.owner_shard == 1).count();
    assert_eq!(of_shard_1, N, "every symbol of shard 1, listed on pod 0");
    let first = &symbols[0];
    let info = listed.iter().find(|s| &s.symbol == first).expect("listed");
    assert_eq!(info.seq, 1);
}
