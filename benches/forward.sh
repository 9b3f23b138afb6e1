#!/usr/bin/env bash
# The forward path (BENCHMARKS.md, "Issue 14, thirteenth session"): three pods
# on loopback, the publishers on pod 1 and every symbol owned by pod 0, so each
# publish is forwarded once; durable ingest, no subscribers. "server CPU" is
# the forwarding pod's. Usage: benches/forward.sh [ROUNDS]   (release build)
# SERVER_BIN=path runs the pods from another release (to compare; interleave).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/tickshard
SERVER_BIN=${SERVER_BIN:-$BIN}
ROUNDS=${1:-1}
PEERS="http://127.0.0.11:18482,http://127.0.0.12:18482,http://127.0.0.13:18482"
for round in $(seq "$ROUNDS"); do
  DIR=$(mktemp -d)
  PIDS=()
  for i in 0 1 2; do
    ip=127.0.0.1$((i + 1))
    "$SERVER_BIN" --no-sim --shards 3 --shard-id $i --peers "$PEERS" --data-dir "$DIR/pod-$i" \
      --http-addr $ip:18480 --grpc-addr $ip:18481 --peer-addr $ip:18482 --log warn > "$DIR/out-$i" 2> "$DIR/err-$i" &
    PIDS+=($!)
  done
  for i in 0 1 2; do
    for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out-$i" 2>/dev/null && break; sleep 0.1; done
  done
  sleep 1 # let the peer links come up (they retry every <= 200 ms)
  echo "## round $round: 64 symbols owned by pod 0, 4 publishers on pod 1, window 256"
  "$BIN" bench --ws ws://127.0.0.12:18480/ws --grpc http://127.0.0.12:18481 --owned-by 0 --of 3 \
    --server-pid "${PIDS[1]}" --prefix "F$round-" --subscribers 0 --symbols 64 --publishers 4 \
    --window 256 --duration 8 --warmup 2
  kill "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
  rm -rf "$DIR"
done
