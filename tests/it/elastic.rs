//! Elastic shards (contract §9): `tickshard admin rebalance` on a running
//! cluster under load, real processes.

use std::{collections::HashMap, time::Duration};

use tickshard_proto::v1 as pb;
use tickshard_shard::{
    domain::Symbol,
    ownership::{jump_consistent_hash, symbol_hash},
};

use crate::{cluster::rollout_under_load, common::*};

fn owner(sym: &str, shards: u32) -> u32 {
    jump_consistent_hash(symbol_hash(&Symbol::parse(sym).unwrap()), shards)
}

/// `tickshard admin <args>` against a pod's peer port: (success, stdout, stderr).
fn admin(pod: &Server, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tickshard"));
    cmd.arg("admin").args(args).args(["--peer", &pod.peer_url()]);
    if args[0] == "rebalance" {
        cmd.args(["--timeout", "60s"]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `pods` pods whose cluster has `shards` shards (pods at ordinals
/// at or above it own nothing yet).
fn cluster(pods: usize, shards: u32, extra: &[&str]) -> TestCluster {
    let mut args = vec!["--drain-ms", "300"];
    args.extend_from_slice(extra);
    // (a cluster smaller than its pods is what `kubectl scale` up leaves
    // before the rebalance)
    TestCluster::start_sized(TestCluster::addrs(pods), shards, &args)
}

/// Epoch and seq of every symbol, as ListSymbols says (with the owner).
async fn symbols(pod: &Server) -> HashMap<String, (String, u64, u32)> {
    pod.list_symbols()
        .await
        .symbols
        .into_iter()
        .map(|i| (i.symbol, (i.epoch, i.seq, i.owner_shard)))
        .collect()
}

/// The longest publish hold a pod logged for a moved symbol, in ms.
fn longest_hold(pods: &[Server]) -> (usize, u64) {
    let mut n = 0;
    let mut max = 0;
    for p in pods {
        for line in p.log_text().lines().filter(|l| l.contains("symbol moved")) {
            n += 1;
            if let Some(ms) = line
                .split("held_ms=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                max = max.max(ms);
            }
        }
    }
    (n, max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_3_to_4_under_load_loses_and_repeats_nothing() {
    let mut c = cluster(4, 3, &[]);
    let ws = c.ws_urls();
    let grpc = vec![c.pods[0].grpc_url(), c.pods[1].grpc_url()];
    let (ok, out, _) = admin(&c.pods[3], &["status", "--json"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        r#"{"committed_shards":3,"target_shards":null,"moves_left":[],"unreachable":[],"error":null}"#
    );
    let mut before = HashMap::new();
    let pods = &c.pods;
    rollout_under_load(ws, grpc, "ELASTIC", 40, &[0], None, async |_| {
        before = symbols(&pods[0]).await;
        assert_eq!(before.len(), 40, "every symbol has ticks before the rebalance");
        assert!(before.values().all(|(_, _, o)| *o < 3));
        let (ok, _, err) = admin(&pods[2], &["rebalance", "--shards", "4"]);
        assert!(ok, "rebalance failed: {err}");
        eprintln!("{err}");
    })
    .await;
    let (moves, hold) = longest_hold(&c.pods);
    let moved: Vec<&String> = before.keys().filter(|s| owner(s, 4) == 3).collect();
    eprintln!(
        "3 -> 4: {} symbols moved ({moves} logged), longest publish hold {hold} ms",
        moved.len()
    );
    assert!(!moved.is_empty(), "some of the 30 symbols move to the new shard");
    assert_eq!(moves, moved.len(), "each moving symbol moved once");
    assert!(hold <= 1_000, "a publish was held {hold} ms");
    // Owners follow the new map, epochs are the ones the symbols had.
    for (i, p) in c.pods.iter().enumerate() {
        let after = symbols(p).await;
        for (sym, (epoch, seq, o)) in &after {
            assert_eq!(*o, owner(sym, 4), "pod {i}: {sym} is owned by its shard under 4");
            assert_eq!(epoch, &before[sym].0, "pod {i}: {sym} keeps its epoch");
            assert!(*seq >= before[sym].1);
        }
    }
    let (ok, out, _) = admin(&c.pods[1], &["status", "--json"]);
    assert!(ok);
    assert!(
        out.starts_with(r#"{"committed_shards":4,"target_shards":null,"moves_left":[]"#),
        "{out}"
    );
    // The new owner serves the history of a moved symbol from seq 1.
    let sym = moved[0];
    let h = history(&c.pods[3], sym, 1).await;
    assert_eq!(h.first().map(|t| t.seq), Some(1));
    assert_eq!(
        h.iter().map(|t| t.seq).collect::<Vec<_>>(),
        (1..=h.len() as u64).collect::<Vec<_>>()
    );

    // A pod restarted with a stale --shards (all were started with 3)
    // follows the cluster: it keeps owning what the map of 4 gives it.
    c.pods[1].kill9();
    c.pods[1].restart();
    let p1 = &c.pods[1];
    eventually("pod 1 ready", || async { p1.get("/readyz").await.0 == 200 }).await;
    assert!(
        p1.log_text().contains("following the cluster"),
        "the pod says it follows the cluster"
    );
    let mine = before
        .keys()
        .find(|s| owner(s, 4) == 1 && owner(s, 3) == 1)
        .unwrap()
        .clone();
    // (asked of its owner: another pod's list leaves out a shard its link
    // has not reached again yet)
    let seq = symbols(&c.pods[1]).await[&mine].1;
    let mut publisher = c.pods[3].publisher("after-restart").await;
    let acks = publish_all(&mut publisher, [tick(&mine, 1_732_600_000_000_000, "1.5", "2")]).await;
    assert_eq!(acks[0].seq, seq + 1, "the restarted owner continues the seq");
    let (ok, out, _) = admin(&c.pods[1], &["status", "--json"]);
    assert!(ok && out.contains(r#""committed_shards":4"#), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_4_to_2_then_the_two_highest_pods_stop() {
    let mut c = cluster(4, 4, &[]);
    c.wait_linked().await;
    let ws = c.ws_urls();
    let grpc = vec![c.pods[0].grpc_url(), c.pods[1].grpc_url()];
    let mut before = HashMap::new();
    {
        let pods = &mut c.pods;
        rollout_under_load(ws, grpc, "SHRINK", 40, &[0], None, async |_| {
            before = symbols(&pods[0]).await;
            let (ok, _, err) = admin(&pods[0], &["rebalance", "--shards", "2"]);
            assert!(ok, "rebalance failed: {err}");
            eprintln!("{err}");
            // then `kubectl scale --replicas 2`: the two highest pods go
            for p in &pods[2..] {
                p.sigterm();
            }
            for p in &mut pods[2..] {
                assert!(p.wait_exit(Duration::from_secs(30)).success());
            }
        })
        .await;
    }
    let (_, hold) = longest_hold(&c.pods);
    assert!(hold <= 1_000, "a publish was held {hold} ms");
    for p in &c.pods[..2] {
        let after = symbols(p).await;
        assert_eq!(after.len(), before.len());
        for (sym, (epoch, _, o)) in &after {
            assert_eq!(*o, owner(sym, 2));
            assert_eq!(epoch, &before[sym].0, "{sym} keeps its epoch");
        }
    }
    let (ok, out, _) = admin(&c.pods[0], &["status", "--json"]);
    assert!(ok);
    assert!(
        out.starts_with(r#"{"committed_shards":2,"target_shards":null,"moves_left":[]"#),
        "{out}"
    );
    let _ = pb::ListSymbolsRequest {};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_old_owner_in_the_middle_of_a_move() {
    let mut c = cluster(4, 3, &[]);
    // A symbol with a long history on shard 0 that moves to shard 3, so that
    // the kill lands while moves are in flight.
    let big = (0..)
        .map(|i| format!("BIG-{i}"))
        .find(|s| owner(s, 3) == 0 && owner(s, 4) == 3)
        .unwrap();
    let mut p = c.pods[1].publisher("history").await;
    let acks = publish_all(
        &mut p,
        (0..20_000).map(|i| tick(&big, 1_732_530_000_000_000 + i, "7.25", "1")),
    )
    .await;
    assert_eq!(acks.last().map(|a| a.seq), Some(20_000));
    drop(p);
    let ws = c.ws_urls();
    let grpc = vec![c.pods[1].grpc_url(), c.pods[2].grpc_url()];
    {
        let pods = &mut c.pods;
        rollout_under_load(ws, grpc, "CUT", 40, &[0], None, async |_| {
            let (ok, _, err) = admin(&pods[1], &["rebalance", "--shards", "4", "--no-wait"]);
            assert!(ok, "{err}");
            let p0 = &pods[0];
            eventually("shard 0 ships a move", || async {
                p0.metric("tickshard_move_bytes_total").await > 0.0
            })
            .await;
            pods[0].kill9();
            pods[0].restart();
            let p0 = &pods[0];
            eventually("shard 0 ready again", || async { p0.get("/readyz").await.0 == 200 }).await;
            let p1 = &pods[1];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (ok, out, _) = admin(p1, &["status", "--json"]);
                if ok && out.starts_with(r#"{"committed_shards":4,"target_shards":null"#) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the rebalance did not finish: {out}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
    // The big symbol kept every tick, now on shard 3, from seq 1.
    let h = history(&c.pods[3], &big, 1).await;
    assert_eq!(h.len(), 20_000, "every tick of the big symbol is on its new owner");
    assert_eq!(h.first().map(|t| t.seq), Some(1));
    assert_eq!(
        h.iter().map(|t| t.seq).collect::<Vec<_>>(),
        (1..=h.len() as u64).collect::<Vec<_>>()
    );
    let listed = symbols(&c.pods[2]).await;
    assert_eq!(listed[&big].1, 20_000);
    assert_eq!(listed[&big].2, 3);
    let (_, hold) = longest_hold(&c.pods);
    eprintln!("kill -9 mid-move: longest logged publish hold {hold} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the previous release's binary in TICKSHARD_PREV_BIN (.ci/prev.sh builds it; .ci/run runs this)"]
async fn mixed_version_rolling_upgrade_from_the_previous_release() {
    let prev = std::path::PathBuf::from(
        std::env::var("TICKSHARD_PREV_BIN").expect("TICKSHARD_PREV_BIN: the previous release's binary"),
    );
    let mut c = TestCluster::start_binary(&prev, TestCluster::addrs(3), 3, &["--drain-ms", "300"]);
    c.wait_linked().await;
    let (ws, grpc) = (c.ws_urls(), c.grpc_urls());
    let new = this_bin();
    {
        let pods = &mut c.pods;
        rollout_under_load(ws, grpc, "MIXED", 30, &[2, 1, 0], None, async |pod| {
            pods[pod].sigterm();
            assert!(pods[pod].wait_exit(Duration::from_secs(30)).success());
            pods[pod].restart_with(&new);
            let p = &pods[pod];
            eventually("upgraded pod ready", || async { p.get("/readyz").await.0 == 200 }).await;
        })
        .await;
    }
    // Every pod runs this release now, on the data the previous one wrote,
    // and keeps the cluster's count.
    for p in &c.pods {
        let (ok, out, _) = admin(p, &["status", "--json"]);
        assert!(
            ok && out.starts_with(r#"{"committed_shards":3,"target_shards":null"#),
            "{out}"
        );
    }
}

/// A rebalance that names a pod which is down is refused before any pod
/// takes the target (it would wait for that pod forever): nothing changes,
/// and the same rebalance goes through once the pod is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_to_a_pod_that_is_down_is_refused_before_it_starts() {
    let mut c = cluster(4, 3, &[]);
    c.pods[3].kill9();
    // (pod 1 asks shard 0, which starts rebalances: once linked to it)
    let p1 = &c.pods[1];
    eventually("pod 1 linked to shards 0 and 2", || async {
        p1.metric("tickshard_peer_up").await >= 2.0
    })
    .await;
    let (ok, _, err) = admin(&c.pods[1], &["rebalance", "--shards", "4"]);
    assert!(!ok, "the rebalance started without shard 3");
    assert!(
        err.contains("not started") && err.contains("shard 3") && err.contains("does not answer"),
        "{err}"
    );
    for p in &c.pods[..3] {
        let (ok, out, err) = admin(p, &["status", "--json"]);
        assert!(ok, "{err}");
        assert_eq!(
            out.trim(),
            r#"{"committed_shards":3,"target_shards":null,"moves_left":[],"unreachable":[],"error":null}"#
        );
    }
    c.pods[3].restart();
    let p3 = &c.pods[3];
    eventually("shard 3 ready again", || async { p3.get("/readyz").await.0 == 200 }).await;
    let (ok, _, err) = admin(&c.pods[1], &["rebalance", "--shards", "4"]);
    assert!(ok, "{err}");
    let (_, out, _) = admin(&c.pods[0], &["status", "--json"]);
    assert!(
        out.starts_with(r#"{"committed_shards":4,"target_shards":null"#),
        "{out}"
    );
}

/// A route switch that cannot wait for an old owner (frozen by SIGSTOP)
/// cuts the links with publishes unanswered before it switches: the one in
/// flight is refused (retryable), and so is a later request of its pair on
/// the same stream, so the pair is never stored out of order on the new
/// owner, and resent in order it is stored whole. Before, the later request
/// was stored first on the new owner and the resent earlier one was then
/// acked as a duplicate of it: an acknowledged tick lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_switch_past_a_frozen_owner_keeps_every_publisher_pair_in_order() {
    // (each pod in its own process group: one is stopped below)
    let c = TestCluster::start_apart(TestCluster::addrs(3), 2, &["--drain-ms", "300"]);
    let sym = (0..)
        .map(|i| format!("CUT-{i}"))
        .find(|s| owner(s, 2) == 1 && owner(s, 3) == 2)
        .unwrap();
    let t = |i: u64, price: &str| tick(&sym, 1_732_530_000_000_000 + i as i64, price, "1");
    let pod0 = &c.pods[0];
    eventually("pod 0 linked to shard 1", || async {
        pod0.metric("tickshard_peer_up").await >= 1.0
    })
    .await;
    let mut raw = RawStream::open(pod0).await;
    let a = raw.call(req(1, "cut", 1, t(1, "1.00"))).await;
    assert!(a.error.is_none(), "{a:?}");
    let version = pod0
        .peer()
        .await
        .topology(pb::TopologyRequest {
            caller_shard: 0,
            shards: 2,
            state: None,
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap()
        .version;

    c.pods[1].signal("-STOP");
    raw.tx.send(req(2, "cut", 2, t(2, "2.00"))).await.unwrap();
    eventually("the publish is in flight to shard 1", || async {
        pod0.metric("tickshard_publish_in_flight").await >= 1.0
    })
    .await;
    // The cluster grows to 3 shards and the symbol's owner becomes shard 2
    // (set directly, as a commit does; pod 1 is frozen and misses it).
    let next = pb::ClusterState {
        version: version + 1,
        committed: 3,
        target: 0,
    };
    for i in [2, 0] {
        c.pods[i]
            .peer()
            .await
            .set_state(pb::SetStateRequest {
                state: Some(next),
                seal: false,
            })
            .await
            .unwrap();
    }
    // The next request of the pair, on the same stream, after the switch.
    raw.tx.send(req(3, "cut", 3, t(3, "3.00"))).await.unwrap();
    let mut acks = HashMap::new();
    while acks.len() < 2 {
        let a = tokio::time::timeout(WAIT, raw.acks.message())
            .await
            .expect("acks in time")
            .unwrap()
            .unwrap();
        acks.insert(a.request_id, a);
    }
    for id in [2, 3] {
        assert_eq!(
            acks[&id].error.as_ref().map(|e| e.code.as_str()),
            Some("unavailable"),
            "request {id} must be refused (retryable), not taken out of order: {:?}",
            acks[&id]
        );
    }
    c.pods[1].signal("-CONT");
    // Resent in order, on a new stream: both stored, on the new owner.
    let mut again = RawStream::open(pod0).await;
    for (id, price) in [(2, "2.00"), (3, "3.00")] {
        let a = again.call(req(id, "cut", id, t(id, price))).await;
        assert!(a.error.is_none() && !a.duplicate, "request {id}: {a:?}");
    }
    let h = history(&c.pods[2], &sym, 1).await;
    assert_eq!(h.iter().map(|t| t.price.as_str()).collect::<Vec<_>>(), ["2.00", "3.00"]);
}
