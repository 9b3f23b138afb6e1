#!/usr/bin/env bash
# Two tickshard server binaries side by side, interleaved in one run (so the
# machine's noise hits both alike): W1 (fan-out at max rate), W2 (1M
# deliveries/s), W3 (durable ingest, windows 64 and 256), W5 (W2 + 10 stuck
# readers); with WORKLOADS=…, also L100 (1,000 × 10 at 100 ticks/s) and W7
# (the dashboard workload, see compare.sh). Each server is fresh per run; the
# load generator is this tree's.
#
# Usage: benches/before_after.sh OLD_BIN [NEW_BIN]     (ROUNDS=3 DURATION=8)
#   e.g. git worktree add /tmp/base <commit> && (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target cargo build --release)
#        benches/before_after.sh /tmp/base-target/release/tickshard
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: benches/before_after.sh OLD_BIN [NEW_BIN]}
cargo build --release --locked -q
NEW=${2:-target/release/tickshard}
GEN=target/release/tickshard
ROUNDS=${ROUNDS:-3}
ulimit -n 20000
DURATION=${DURATION:-8}
DIR=$(mktemp -d)
HTTP=127.0.0.1:18580
GRPC=127.0.0.1:18581
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

start() { # binary
  rm -rf "$DIR/data"
  TICKSHARD_PEER_ADDR=127.0.0.1:0 "$1" --no-sim --data-dir "$DIR/data" --http-addr $HTTP --grpc-addr $GRPC --max-connections 19500 --log warn > "$DIR/out" 2> "$DIR/err" &
  PID=$!
  for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out" 2>/dev/null && return; sleep 0.1; done
  echo "server did not start"; cat "$DIR/err"; exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; }

run() { # workload
  local args=()
  case $1 in
    W1) args=(--subscribers 1000 --symbols 10 --publishers 1 --window 256) ;;
    W2) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000) ;;
    W3-64) args=(--subscribers 0 --symbols 64 --publishers 4 --window 64) ;;
    W3-256) args=(--subscribers 0 --symbols 64 --publishers 4 --window 256) ;;
    W3-384) args=(--subscribers 0 --symbols 64 --publishers 4 --window 384) ;;
    W3-512) args=(--subscribers 0 --symbols 64 --publishers 4 --window 512) ;;
    W5) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000 --slow 10) ;;
    L100) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 100) ;;
    W7) args=(--subscribers 5000 --symbols 10000 --watchlist 50 --zipf 1.1 --seed 7 --publishers 8 --rate 100
              --connect-concurrency 512) ;;
  esac
  "$GEN" bench --ws ws://$HTTP/ws --grpc http://$GRPC --server-pid "$PID" "${args[@]}" \
    --duration "$DURATION" --warmup 2 --json
}

: > "$DIR/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for w in ${WORKLOADS:-W1 W2 W3-64 W3-256 W5}; do
    for which in old new; do
      bin=$OLD; [[ $which == new ]] && bin=$NEW
      start "$bin"
      line=$(run "$w" || echo '{}')
      stop
      echo "{\"round\":$round,\"workload\":\"$w\",\"bin\":\"$which\",\"r\":$line}" | tee -a "$DIR/results.jsonl"
    done
  done
done

python3 benches/summary.py "$DIR/results.jsonl" bin old new
