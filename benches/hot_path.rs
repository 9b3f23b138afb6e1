//! criterion micro-benchmarks of the tick hot path (BENCHMARKS.md):
//! client-message parse (simd-json vs serde_json), tick → frame encode, decimal
//! formatting, store append + group commit, fan-out of one tick to 1,000 queues.
//!
//! `cargo bench --bench hot_path` (add `-- --quick` for a fast pass).
#![allow(clippy::unwrap_used)]

use std::{collections::VecDeque, hint::black_box, io::Write as _, sync::Arc, time::Duration};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tickshard_feed::{
    grpc,
    ws::{json, protocol},
};
use tickshard_shard::{
    domain::{Epoch, Symbol, Tick, TickFields},
    hub::{Channel, Chunk, Format, Head, Hub, Msg, Outbox},
    store::{CommitBatch, Store, StoreOptions},
};

const SUBSCRIBE: &str = r#"{"op":"subscribe","id":17,"symbols":["BTC-USD","ETH-USD","SOL-USD","EUR/USD"],"channels":["ticks","candles:1m"],"resume":{"BTC-USD":{"seq":1042,"epoch":"9f2c41d07a3e"}}}"#;

fn tick(sym: &str, seq: u64) -> Tick {
    let mut t = TickFields {
        symbol: sym,
        ts: 1_732_530_000_123_456 + seq as i64,
        price: "67012.50",
        size: "0.0100",
        bid: "67012.40",
        ask: "67012.60",
        bid_size: "4.20",
        ask_size: "1.05",
    }
    .validate()
    .unwrap();
    t.seq = seq;
    t
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_subscribe");
    g.throughput(Throughput::Bytes(SUBSCRIBE.len() as u64));
    let mut buffers = simd_json::Buffers::default();
    g.bench_function("simd_json_in_place", |b| {
        b.iter_batched_ref(
            || SUBSCRIBE.as_bytes().to_vec(),
            |buf| black_box(protocol::parse(buf, &mut buffers, 1_000).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(SUBSCRIBE.as_bytes())).unwrap()))
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let t = tick("BTC-USD", 1043);
    let mut g = c.benchmark_group("encode");
    let mut out = Vec::with_capacity(256);
    g.bench_function("tick_frame", |b| {
        b.iter(|| {
            out.clear();
            json::tick(&mut out, black_box(&t));
            black_box(out.len())
        })
    });
    let ticks: Vec<Tick> = (1..=64).map(|s| tick("BTC-USD", s)).collect();
    g.throughput(Throughput::Elements(64));
    g.bench_function("chunk_of_64_once", |b| {
        b.iter(|| {
            let chunk = Chunk::new(ticks[0].symbol, ticks.clone());
            black_box(chunk.encoded(Format::Json, json::encode_ticks).frames_from(0).count())
        })
    });
    g.finish();
    let mut g = c.benchmark_group("decimal_format");
    let d = t.price;
    let mut out = Vec::with_capacity(64);
    g.bench_function("display_into_reused_vec", |b| {
        b.iter(|| {
            out.clear();
            let _ = write!(out, "{}", black_box(d));
            black_box(out.len())
        })
    });
    g.bench_function("to_string", |b| b.iter(|| black_box(black_box(d).to_string())));
    g.finish();
}

/// gRPC `Subscribe`: one chunk of 10 ticks rendered for 1,000 subscribers, as
/// tonic's generated code would (a prost encode per tick per subscriber) and
/// as tickshard does (one encode, a shared slice per subscriber).
fn grpc_render(c: &mut Criterion) {
    use prost::Message as _;
    use tickshard_proto::v1 as pb;
    let ticks: Vec<Tick> = (1..=10).map(|s| tick("BTC-USD", s)).collect();
    let mut g = c.benchmark_group("grpc_render_10_ticks_to_1000_subscribers");
    g.throughput(Throughput::Elements(10 * 1000));
    g.bench_function("encode_per_subscriber", |b| {
        b.iter(|| {
            let mut n = 0;
            for _ in 0..1000 {
                for t in &ticks {
                    let ev = pb::Event {
                        kind: Some(pb::event::Kind::Tick(tickshard_shard::wire::tick_to_pb(t))),
                    };
                    n += black_box(ev.encode_to_vec()).len();
                }
            }
            n
        })
    });
    let mut out = VecDeque::with_capacity(16);
    g.bench_function("encode_once_shared", |b| {
        b.iter(|| {
            let chunk = Chunk::new(ticks[0].symbol, ticks.clone());
            let mut n = 0;
            for _ in 0..1000 {
                out.extend(chunk.encoded(Format::Protobuf, grpc::encode_tick_events).shared_from(0));
                n += out.drain(..).map(|b| black_box(b).len()).sum::<usize>();
            }
            n
        })
    });
    g.finish();
}

/// gRPC `Subscribe`: what counting the sent messages (`grpc::SentCount`, per
/// message per stream) adds to writing them: 10 events of one chunk to 1,000
/// streams, copied into a reused buffer as tonic's encoder does, without and
/// with the count.
fn grpc_sent_count(c: &mut Criterion) {
    use bytes::BufMut as _;
    let ticks: Vec<Tick> = (1..=10).map(|s| tick("BTC-USD", s)).collect();
    let chunk = Chunk::new(ticks[0].symbol, ticks);
    let mut events = VecDeque::new();
    events.extend(chunk.encoded(Format::Protobuf, grpc::encode_tick_events).shared_from(0));
    let events: Vec<bytes::Bytes> = events.into_iter().collect();
    let mut g = c.benchmark_group("grpc_write_10_events_to_1000_streams");
    g.throughput(Throughput::Elements(10 * 1000));
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    g.bench_function("copy", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                for e in &events {
                    buf.put_slice(e);
                }
                black_box(&buf);
                buf.clear();
            }
        })
    });
    let mut counts: Vec<grpc::SentCount> = (0..1000).map(|_| grpc::SentCount::new()).collect();
    g.bench_function("copy_and_count", |b| {
        b.iter(|| {
            for sent in counts.iter_mut() {
                for e in &events {
                    buf.put_slice(e);
                    sent.wrote(e.len());
                }
                black_box(&buf);
                buf.clear();
            }
        })
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let symbols: Vec<String> = (0..64).map(|i| format!("S{i}")).collect();
    let mut next = vec![1u64; 64];
    let mut commit = 0u64;
    let mut g = c.benchmark_group("store_group_commit");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for per_symbol in [1usize, 16] {
        g.throughput(Throughput::Elements((64 * per_symbol) as u64));
        // What the committer writes per commit: one log record for all symbols.
        g.bench_function(format!("64_symbols_x_{per_symbol}_ticks_log_flush"), |b| {
            b.iter(|| {
                let mut batch = CommitBatch::default();
                next_ticks(&symbols, &mut next, per_symbol, |t| {
                    batch.log_ticks(t, std::iter::empty())
                });
                commit += 1;
                batch.seal_log(commit);
                store.commit(batch).unwrap()
            })
        });
        // The same ticks as one block key per symbol (format 2's commit, and
        // what compaction writes).
        g.bench_function(format!("64_symbols_x_{per_symbol}_ticks_blocks_flush"), |b| {
            b.iter(|| {
                let mut batch = CommitBatch::default();
                next_ticks(&symbols, &mut next, per_symbol, |t| batch.put_ticks(t, usize::MAX));
                store.commit(batch).unwrap()
            })
        });
    }
    g.finish();
}

/// Each symbol's next `per_symbol` ticks (seqs from `next`), passed to `put`.
fn next_ticks(symbols: &[String], next: &mut [u64], per_symbol: usize, mut put: impl FnMut(&[Tick])) {
    for (s, n) in symbols.iter().zip(next.iter_mut()) {
        let ticks: Vec<Tick> = (0..per_symbol as u64).map(|k| tick(s, *n + k)).collect();
        *n += per_symbol as u64;
        put(&ticks);
    }
}

fn fanout(c: &mut Criterion) {
    let hub = Hub::new(64 << 20);
    let sym = Symbol::parse("BTC-USD").unwrap();
    let h = hub.get_or_insert(sym, || Head {
        epoch: Epoch::random(),
        seq: 0,
        last: None,
        candles: [None; 3],
    });
    let outboxes: Vec<Arc<Outbox<()>>> = (0..1_000)
        .map(|i| Arc::new(Outbox::new(i, 64 << 20, Duration::from_secs(10))))
        .collect();
    for o in &outboxes {
        h.attach(o.clone(), Channel::Ticks);
        h.activate(o.id(), Channel::Ticks, false);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seq = 0u64;
    let mut q: VecDeque<Msg<()>> = VecDeque::new();
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("one_tick_to_1000_queues", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                seq += 1;
                let chunk = Arc::new(Chunk::new(sym, vec![tick("BTC-USD", seq)]));
                let t = std::time::Instant::now();
                h.publish(chunk, &[], [None; 3]);
                total += t.elapsed();
                // the writers' side, outside the measurement: drain every queue
                rt.block_on(async {
                    for o in &outboxes {
                        let _ = o.take(&mut q).await;
                        let w: usize = q
                            .drain(..)
                            .map(|m| if let Msg::Data(d) = m { d.weight() } else { 0 })
                            .sum();
                        o.written(w);
                    }
                });
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, parse, encode, grpc_render, grpc_sent_count, store, fanout);
criterion_main!(benches);
