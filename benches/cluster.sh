#!/usr/bin/env bash
# Cross-shard figures (BENCHMARKS.md): three pods on loopback; clients on the
# owner pod of their symbols vs on a non-owner pod (one extra hop: the follow
# stream). Usage: benches/cluster.sh    (release build, ~1 min)
# SERVER_BIN=path runs those pods from another release (to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/tickshard
SERVER_BIN=${SERVER_BIN:-$BIN}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
PEERS="http://127.0.0.11:18482,http://127.0.0.12:18482,http://127.0.0.13:18482"
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

run() { # $1 = label, $2 = pod serving the subscribers, rest = bench args
  local label=$1 pod=$2; shift 2
  echo "### $label (subscribers on pod $pod, symbols owned by pod 0)"
  "$BIN" bench --ws ws://127.0.0.1$((pod + 1)):18480/ws --grpc http://127.0.0.11:18481 \
    --owned-by 0 --of 3 --server-pid "${PIDS[$pod]}" "$@"
}
for round in 1 2; do
  echo "## round $round: 200 subscribers x 10 symbols, 1000 ticks/s"
  run owner 0 --prefix "LAT$round-" --subscribers 200 --symbols 10 --rate 1000 --publishers 1 --duration 8 --warmup 2
  run non-owner 1 --prefix "LAT$round-" --subscribers 200 --symbols 10 --rate 1000 --publishers 1 --duration 8 --warmup 2
  echo "## round $round: 200 subscribers x 10 symbols, max rate"
  run owner 0 --prefix "MAX$round-" --subscribers 200 --symbols 10 --publishers 1 --window 256 --duration 8 --warmup 2
  run non-owner 1 --prefix "MAX$round-" --subscribers 200 --symbols 10 --publishers 1 --window 256 --duration 8 --warmup 2
done
