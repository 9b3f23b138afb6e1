#!/usr/bin/env bash
# Two tickshard server binaries side by side, interleaved in one run (so the
# machine's noise hits both alike): W1 (fan-out at max rate), W2 (1M
# deliveries/s), W3 (durable ingest, windows 64 and 256), W5 (W2 + 10 stuck
# readers). Each server is fresh per run; the load generator is this tree's.
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
    W5) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000 --slow 10) ;;
  esac
  "$GEN" bench --ws ws://$HTTP/ws --grpc http://$GRPC --server-pid "$PID" "${args[@]}" \
    --duration "$DURATION" --warmup 2 --json
}

: > "$DIR/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for w in W1 W2 W3-64 W3-256 W5; do
    for which in old new; do
      bin=$OLD; [[ $which == new ]] && bin=$NEW
      start "$bin"
      line=$(run "$w" || echo '{}')
      stop
      echo "{\"round\":$round,\"workload\":\"$w\",\"bin\":\"$which\",\"r\":$line}" | tee -a "$DIR/results.jsonl"
    done
  done
done

python3 - "$DIR/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def vals(w, b, key, sub=None):
    out = []
    for r in runs:
        if r["workload"] == w and r["bin"] == b and r["r"]:
            v = r["r"].get(key)
            if sub is not None and isinstance(v, dict):
                v = v.get(sub)
            if isinstance(v, (int, float)):
                out.append(v)
    return out
def med(w, b, key, sub=None):
    v = vals(w, b, key, sub)
    return statistics.median(v) if v else float("nan")
print("\n| workload | figure | old (median) | new (median) | new/old | all runs old / new |")
print("| --- | --- | ---: | ---: | ---: | --- |")
for w, key, sub, name, scale in [
    ("W1", "deliveries_per_sec", None, "deliveries/s", 1e6),
    ("W1", "latency_us", "p99", "p99 latency ms", 1e3),
    ("W2", "latency_us", "p99", "p99 latency ms", 1e3),
    ("W2", "server_cpu_pct", None, "server CPU %", 1),
    ("W3-64", "publish_per_sec", None, "acked/s", 1e3),
    ("W3-64", "ack_us", "p99", "ack p99 ms", 1e3),
    ("W3-256", "publish_per_sec", None, "acked/s", 1e3),
    ("W3-256", "ack_us", "p99", "ack p99 ms", 1e3),
    ("W5", "latency_us", "p99", "p99 latency ms", 1e3),
]:
    o, n = med(w, "old", key, sub), med(w, "new", key, sub)
    fmt = lambda xs: ", ".join(f"{x/scale:.2f}" for x in xs)
    unit = {1e6: "M", 1e3: "k", 1: ""}[scale] if "latency" not in name and "p99" not in name else ""
    print(f"| {w} | {name} | {o/scale:.2f}{unit} | {n/scale:.2f}{unit} | {n/o:.2f} | {fmt(vals(w,'old',key,sub))} / {fmt(vals(w,'new',key,sub))} |")
PY
