#!/usr/bin/env bash
# End-to-end figures of one tickshard node on loopback (BENCHMARKS.md).
# Usage: benches/e2e.sh [ingest|fanout|latency|connections|all]   (release build, ~2 min for all)
# SERVER_BIN=path runs that server binary (another release, to compare);
# GEN_BIN=path runs that load generator (`tickshard bench` of another build;
# it must take the flags used below) instead of this tree's. Relative paths
# are from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/tickshard
SERVER_BIN=${SERVER_BIN:-$BIN}
GEN_BIN=${GEN_BIN:-$BIN}
DIR=$(mktemp -d)
HTTP=127.0.0.1:18480
GRPC=127.0.0.1:18481
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

start() {
  rm -rf "$DIR/data"
  "$SERVER_BIN" --no-sim --data-dir "$DIR/data" --http-addr $HTTP --grpc-addr $GRPC --peer-addr 127.0.0.1:0 --max-connections 19500 --log warn > "$DIR/out" 2> "$DIR/err" &
  PID=$!
  for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out" 2>/dev/null && return; sleep 0.1; done
  echo "server did not start"; cat "$DIR/err"; exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; }
bench() { "$GEN_BIN" bench --ws ws://$HTTP/ws --grpc http://$GRPC --server-pid "$PID" "$@"; }

what=${1:-all}
if [[ $what == ingest || $what == all ]]; then
  echo "## ingest: durable acked publishes, 64 symbols, 4 streams, no subscribers"
  start
  for w in ${WINDOWS:-64 256 1024 4096}; do
    echo "### window $w per stream"
    bench --subscribers 0 --symbols 64 --publishers 4 --window $w --duration 8 --warmup 2
  done
  stop
fi
if [[ $what == fanout || $what == all ]]; then
  echo "## fan-out: 1000 subscribers x 10 symbols, max publish rate"
  start
  bench --subscribers 1000 --symbols 10 --publishers 1 --window 256 --duration 8 --warmup 2
  stop
fi
if [[ $what == latency || $what == all ]]; then
  echo "## latency: 1000 subscribers x 10 symbols, 1000 ticks/s in"
  start
  bench --subscribers 1000 --symbols 10 --publishers 1 --rate 1000 --duration 8 --warmup 2
  stop
fi
if [[ $what == connections || $what == all ]]; then
  echo "## connections: 19,000 idle subscribers (the open-file hard limit here is 20,000)"
  start
  bench --idle --subscribers 19000 --source-ips 8 --connect-concurrency 512
  stop
fi
