//! `tickshard bench`: an end-to-end load generator.
//!
//! Opens C WebSocket subscribers (spread over 127.0.0.x source addresses), each
//! subscribed to the same S symbols or to a watchlist of them drawn by Zipf
//! popularity, publishes through K gRPC Publish streams at P ticks/s (or as
//! fast as acks allow; each tick's symbol round-robin or by the same
//! popularity), and reports deliveries/s against deliveries owed (ticks
//! published inside the window, counted whenever they arrive), publish→receive
//! latency (the publish wall-clock time travels in `ts`), ack latency, bytes/s,
//! gaps, conflations, connection setup rate and the CPU and RSS of the server and
//! of the generator itself (from `/proc`). Subscribers scan frames for `seq` and
//! `ts` instead of parsing them, so the generator stays cheap next to the server.
#![allow(
    clippy::disallowed_methods,
    reason = "the load generator is a client: its tasks are not the server's to drain"
)]

mod args;
mod grpc;
mod lines;
mod measure;
mod pacer;
mod raw_ws;
mod report;
mod workload;

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

pub use crate::{args::BenchArgs, report::Report};
use crate::{
    grpc::publisher,
    lines::{line_publisher, nats_messages},
    measure::{Lasts, SubResult, SubStats, hist, on_frame, proc_usage, quantiles},
    raw_ws::RawWs,
    workload::{Picker, Popularity},
};

pub async fn run(a: BenchArgs) -> Result<Report, String> {
    let access = raw_ws::Access {
        token: a.token.as_deref().map(std::sync::Arc::from),
        trust: a
            .ca_cert
            .as_deref()
            .map(tickshard_client::tls::Trust::from_pem_file)
            .transpose()
            .map_err(|e| e.to_string())?,
    };
    let server_pid = a.server_pid.map(|p| p.to_string());
    let usage0_server = server_pid.as_deref().and_then(proc_usage);
    let stop = CancellationToken::new();
    let recording = Arc::new(AtomicBool::new(false));
    let window = Arc::new(measure::Window::new());
    let own = a
        .owned_by
        .zip(a.of)
        .map(|(s, n)| (s, tickshard_shard::ownership::Ownership::new(n, 0)));
    let symbols: Vec<String> = (0..)
        .map(|i| format!("{}{i}", a.prefix))
        .filter(|s| {
            own.is_none_or(|(shard, o)| {
                tickshard_shard::domain::Symbol::parse(s).is_ok_and(|sym| o.owner(&sym) == shard)
            })
        })
        .take(a.symbols)
        .collect();
    // gap checks index by the number in the name
    let nums: Vec<u64> = symbols
        .iter()
        .map(|s| s[a.prefix.len()..].parse::<u64>().unwrap_or(0))
        .collect();
    let max_index = nums.iter().copied().max().unwrap_or(0) as usize;
    let nats = a.target == "nats";
    let naive = a.target == "naive";
    // Who watches what: everybody everything, or seeded watchlists by
    // popularity (the same seed gives every system the same workload).
    let popularity = Arc::new(Popularity::zipf(symbols.len(), a.zipf));
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let watchlists: Vec<Option<Vec<usize>>> = (0..a.subscribers + a.slow)
        .map(|_| (a.watchlist > 0 && !a.idle).then(|| popularity.watchlist(&mut rng, a.watchlist)))
        .collect();
    let mut watchers = vec![0u64; symbols.len()];
    for w in watchlists.iter().take(a.subscribers) {
        match w {
            Some(w) => w.iter().for_each(|&s| watchers[s] += 1),
            None => watchers.iter_mut().for_each(|n| *n += 1),
        }
    }
    if a.idle || (naive && a.watchlist == 0) {
        // idle: nobody is owed anything; naive: everybody gets everything
        // (with watchlists only the floor serves it: it honours them)
        watchers
            .iter_mut()
            .for_each(|n| *n = if naive { a.subscribers as u64 } else { 0 });
    }
    let watchers = Arc::new(watchers);
    let owed = Arc::new(AtomicU64::new(0));
    let sub_msg = |watch: Option<&[usize]>| -> Option<String> {
        let all: Vec<usize>;
        let watch = match watch {
            Some(w) => w,
            None => {
                all = (0..symbols.len()).collect();
                &all
            }
        };
        if a.idle {
            None
        } else if nats {
            let subs: String = watch
                .iter()
                .map(|&i| format!("SUB ticks.{} {i}\r\n", symbols[i]))
                .collect();
            Some(format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\n{subs}PING\r\n"
            ))
        } else if naive && a.watchlist == 0 {
            // the baseline broadcasts everything; it ignores client messages
            Some("{}".to_string())
        } else {
            // tickshard's subscribe; the floor reads its `symbols` too
            let list = watch
                .iter()
                .map(|&i| format!("\"{}\"", symbols[i]))
                .collect::<Vec<_>>()
                .join(",");
            Some(format!("{{\"op\":\"subscribe\",\"symbols\":[{list}]}}"))
        }
    };

    // 1. Subscribers (connection setup rate measured here).
    let setup = Instant::now();
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let results: Arc<Mutex<Vec<SubResult>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let connected = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(a.subscribers + a.slow + 1);
    for (i, watch) in watchlists.iter().enumerate() {
        let slow = i >= a.subscribers;
        let idle = a.idle;
        let url = a.ws[i % a.ws.len()].clone();
        let local_ip =
            (a.source_ips > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % a.source_ips as usize) as u8)));
        let access = access.clone();
        let watch = watch.as_deref();
        let mut last = match watch {
            Some(w) => Lasts::sparse(&w.iter().map(|&s| nums[s] as usize).collect::<Vec<_>>()),
            _ => Lasts::dense(max_index + 1),
        };
        let (gate, stop, window, results, ready, msg, prefix, connected) = (
            gate.clone(),
            stop.clone(),
            window.clone(),
            results.clone(),
            ready_tx.clone(),
            sub_msg(watch),
            a.prefix.clone().into_bytes(),
            connected.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let buf_bytes = if idle { 4096 } else { 256 * 1024 };
            let mut c = match RawWs::connect(&url, local_ip, slow.then_some(4096), buf_bytes, &access).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e)).await;
                    return;
                }
            };
            if let Some(m) = &msg {
                let mut subscribed = naive; // the baseline has no reply
                if c.send_text(m).await.is_err() {
                    let _ = ready.send(Err("subscribe failed".into())).await;
                    return;
                }
                while !subscribed {
                    // tickshard: `subscribed`; NATS: the PONG after our SUBs
                    let ok = c
                        .read_frames(|p, _| {
                            subscribed |=
                                p.starts_with(b"{\"type\":\"subscribed\"") || p.windows(4).any(|w| w == b"PONG")
                        })
                        .await;
                    if ok.is_none() {
                        let _ = ready.send(Err("closed while subscribing".into())).await;
                        return;
                    }
                }
            }
            connected.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            let _ = ready.send(Ok(())).await;
            if slow || idle {
                // slow: never read; idle: only connections are measured, and a
                // latency histogram (~150 KB to zero) per connection would
                // make the generator's page faults the connect rate's limit
                stop.cancelled().await;
                return;
            }
            let mut st = SubStats::default();
            let mut h = hist();
            let mut nats_buf: Vec<u8> = Vec::new();
            loop {
                let r = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    r = c.read_frames(|p, now| {
                        if nats {
                            nats_messages(&mut nats_buf, p, |m| on_frame(m, now, &prefix, &mut last, &mut st, &mut h, &window));
                        } else {
                            on_frame(p, now, &prefix, &mut last, &mut st, &mut h, &window)
                        }
                    }) => r,
                };
                if r.is_none() {
                    st.closed = true;
                    break;
                }
            }
            results.lock().await.push((st, h));
        }));
    }
    drop(ready_tx);
    let mut failures = 0;
    for _ in 0..a.subscribers + a.slow {
        let Some(r) = ready_rx.recv().await else { break };
        if let Err(e) = r {
            failures += 1;
            if failures <= 3 {
                let _ = writeln!(std::io::stderr(), "bench: subscriber failed: {e}");
            }
        }
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    let n_conn = connected.load(Ordering::Relaxed);
    let mut report = Report {
        subscribers: n_conn as usize,
        symbols: a.symbols,
        connect_per_sec: n_conn as f64 / setup_secs.max(1e-9),
        ..Report::default()
    };
    if a.idle {
        let usage1 = server_pid.as_deref().and_then(proc_usage);
        if let (Some((_, r0)), Some((_, r1))) = (usage0_server, usage1) {
            report.server_rss_mb = Some(r1 as f64 / 1_048_576.0);
            report.server_rss_per_conn_kb = Some(r1.saturating_sub(r0) as f64 / 1024.0 / n_conn.max(1) as f64);
        }
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        return Ok(report);
    }

    // 2. Publishers. Paced ones on a runtime of their own: a paced publish
    //    or its ack must not queue behind thousands of subscriber tasks of
    //    the generator (that would measure the generator, not the server).
    //    Unpaced ones (W1, "as fast as acks allow") share the subscribers'
    //    runtime as they always did: on their own thread they publish
    //    faster than any server fans out to 1,000 subscribers of the same
    //    machine, and the figure would be conflation, not throughput.
    let pub_rt = if a.rate > 0 {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("bench-publish")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the publishers' runtime: {e}"))?,
        )
    } else {
        None
    };
    let spawn_pub = |f| match &pub_rt {
        Some(rt) => rt.spawn(f),
        None => tokio::spawn(f),
    };
    let line_seqs: Arc<Vec<AtomicU64>> = Arc::new((0..symbols.len()).map(|_| AtomicU64::new(0)).collect());
    let published = Arc::new(AtomicU64::new(0));
    let ack_hists: Arc<Mutex<Vec<Histogram<u64>>>> = Arc::new(Mutex::new(Vec::new()));
    let mut pubs = Vec::new();
    for k in 0..a.publishers.max(1) {
        let url = a.grpc[k % a.grpc.len()].clone();
        let (stop, recording, published, ack_hists, symbols) = (
            stop.clone(),
            recording.clone(),
            published.clone(),
            ack_hists.clone(),
            symbols.clone(),
        );
        let access = access.clone();
        // the rate split over the streams, remainder included (100 over 8 is 100)
        let n_pub = a.publishers.max(1) as u64;
        let rate = a.rate / n_pub + u64::from((k as u64) < a.rate % n_pub);
        let picker = Picker::new(
            (a.zipf > 0.0).then(|| popularity.clone()),
            a.seed.wrapping_add(1 + k as u64),
            symbols.len(),
            watchers.clone(),
            owed.clone(),
            window.clone(),
        );
        let seqs = line_seqs.clone();
        let window = a.window.max(1);
        let (target, line_addr) = (
            a.target.clone(),
            if nats { a.nats.clone() } else { a.naive_pub.clone() },
        );
        pubs.push(spawn_pub(async move {
            let r = if target == "tickshard" {
                publisher(
                    k, url, symbols, picker, rate, window, stop, recording, published, ack_hists, access,
                )
                .await
            } else {
                line_publisher(&target, &line_addr, symbols, picker, seqs, rate, stop, published).await
            };
            if let Err(e) = r {
                let _ = writeln!(std::io::stderr(), "bench: publisher {k}: {e}");
            }
        }));
    }

    // 3. Warm up, measure, stop.
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let self_pid = std::process::id().to_string();
    let (u_srv0, u_gen0) = (server_pid.as_deref().and_then(proc_usage), proc_usage(&self_pid));
    let pub0 = published.load(Ordering::Relaxed);
    window.open(measure::now_us());
    recording.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    window.close(measure::now_us());
    recording.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let pub1 = published.load(Ordering::Relaxed);
    let (u_srv1, u_gen1) = (server_pid.as_deref().and_then(proc_usage), proc_usage(&self_pid));
    // late deliveries of the window's ticks still count (the load goes on)
    tokio::time::sleep(Duration::from_secs(a.grace)).await;
    stop.cancel();
    for t in pubs.into_iter().chain(tasks) {
        let _ = t.await;
    }
    if let Some(rt) = pub_rt {
        rt.shutdown_background();
    }

    let mut lat = hist();
    for (st, h) in results.lock().await.iter() {
        report.deliveries += st.deliveries;
        report.bytes_per_sec += st.bytes as f64;
        report.gaps += st.gaps;
        report.conflated += st.conflated;
        report.closed += u64::from(st.closed);
        let _ = lat.add(h);
    }
    let mut acks = hist();
    for h in ack_hists.lock().await.iter() {
        let _ = acks.add(h);
    }
    report.seconds = secs;
    report.published = pub1 - pub0;
    report.publish_per_sec = report.published as f64 / secs;
    report.deliveries_per_sec = report.deliveries as f64 / secs;
    report.bytes_per_sec /= secs;
    report.latency_us = quantiles(&lat);
    report.ack_us = quantiles(&acks);
    if let (Some((c0, _)), Some((c1, rss))) = (u_srv0, u_srv1) {
        report.server_cpu_pct = Some((c1 - c0) / secs * 100.0);
        report.server_rss_mb = Some(rss as f64 / 1_048_576.0);
    }
    if let (Some((c0, _)), Some((c1, _))) = (u_gen0, u_gen1) {
        report.gen_cpu_pct = (c1 - c0) / secs * 100.0;
        // every frame a subscriber read (ticks, snapshots) plus every ack
        let msgs = report.deliveries + report.published;
        report.gen_us_per_msg = (msgs > 0).then(|| (c1 - c0) * 1e6 / msgs as f64);
    }
    if let (Some((c0, _)), Some((c1, _))) = (u_srv0, u_srv1)
        && report.deliveries > 0
    {
        report.server_us_per_delivery = Some((c1 - c0) * 1e6 / report.deliveries as f64);
    }
    report.owed = owed.load(Ordering::Relaxed);
    report.delivered_pct = (report.owed > 0).then(|| report.deliveries as f64 * 100.0 / report.owed as f64);
    Ok(report)
}
