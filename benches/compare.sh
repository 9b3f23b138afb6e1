#!/usr/bin/env bash
# tickshard side by side with what a user would pick instead (BENCHMARKS.md):
#   - NATS over WebSocket: Debian's nats-server with a `websocket {}` block;
#     subscribers speak the NATS text protocol over WebSocket, the publisher
#     publishes over NATS TCP;
#   - naive: the ~60-line tokio-tungstenite broadcast server in benches/naive_ws.rs.
# Same generator (`tickshard bench --target …`), same workloads, interleaved over
# ROUNDS rounds; prints every run and the median ratios.
#
#   benches/compare.sh                 # W1 + W2, 3 rounds (~6 min)
#   ROUNDS=1 WORKLOADS="W1" benches/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-"W1 W2"}
DURATION=${DURATION:-8}
if ! command -v nats-server >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >/dev/null
fi
cargo build --release --locked -q
cargo bench --locked --no-run --bench naive_ws -q 2>/dev/null
NAIVE=$(ls -t target/release/deps/naive_ws-* | grep -v '\.d$' | head -1)
BIN=target/release/tickshard
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

cat > "$DIR/nats.conf" <<CONF
listen: 127.0.0.1:14222
max_payload: 1MB
write_deadline: "10s"
websocket {
  listen: "127.0.0.1:14223"
  no_tls: true
}
CONF
nats-server -c "$DIR/nats.conf" > "$DIR/nats.log" 2>&1 & NATS_PID=$!
"$BIN" --no-sim --data-dir "$DIR/data" --http-addr 127.0.0.1:18480 --grpc-addr 127.0.0.1:18481 --peer-addr 127.0.0.1:0 \
  --max-connections 19500 --log warn > "$DIR/ts.out" 2> "$DIR/ts.err" & TS_PID=$!
"$NAIVE" 127.0.0.1:19080 127.0.0.1:19081 2> "$DIR/naive.err" & NAIVE_PID=$!
sleep 1

bench() { # system workload
  local sys=$1 w=$2 args=()
  case $w in
    W1) args=(--subscribers 1000 --symbols 10 --publishers 1 --window 256) ;;  # max publish rate
    W2) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000) ;;  # 1M deliveries/s
    W5) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000 --slow 10) ;;  # W2 + 10 stuck readers
  esac
  case $sys in
    tickshard) "$BIN" bench --target tickshard --ws ws://127.0.0.1:18480/ws --grpc http://127.0.0.1:18481 \
                 --server-pid $TS_PID --prefix "$w$RANDOM-" "${args[@]}" --duration "$DURATION" --warmup 2 --json ;;
    nats) "$BIN" bench --target nats --ws ws://127.0.0.1:14223/ --nats 127.0.0.1:14222 \
                 --server-pid $NATS_PID --prefix "$w$RANDOM-" "${args[@]}" --duration "$DURATION" --warmup 2 --json ;;
    naive) "$BIN" bench --target naive --ws ws://127.0.0.1:19080/ --naive-pub 127.0.0.1:19081 \
                 --server-pid $NAIVE_PID --prefix "$w$RANDOM-" "${args[@]}" --duration "$DURATION" --warmup 2 --json ;;
  esac
}

: > "$DIR/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for w in $WORKLOADS; do
    for sys in tickshard nats naive; do
      line=$(bench $sys "$w" || echo '{}')
      echo "{\"round\":$round,\"workload\":\"$w\",\"system\":\"$sys\",\"r\":$line}" | tee -a "$DIR/results.jsonl"
    done
  done
done

python3 - "$DIR/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(w, s, key, sub=None):
    vals = []
    for r in runs:
        if r["workload"] == w and r["system"] == s and r["r"]:
            v = r["r"].get(key)
            if sub: v = (v or {}).get(sub)
            if v is not None: vals.append(v)
    return statistics.median(vals) if vals else None
print("\n| workload | system | deliveries/s | p50 µs | p99 µs | p99.9 µs | server CPU % | generator CPU % |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for w in sorted({r["workload"] for r in runs}):
    for s in ("tickshard", "nats", "naive"):
        d = med(w, s, "deliveries_per_sec")
        if d is None: continue
        print(f"| {w} | {s} | {d:,.0f} | {med(w,s,'latency_us','p50'):,.0f} | {med(w,s,'latency_us','p99'):,.0f} | "
              f"{med(w,s,'latency_us','p999'):,.0f} | {med(w,s,'server_cpu_pct') or 0:.0f} | {med(w,s,'gen_cpu_pct'):.0f} |")
    t, n, v = (med(w, s, "deliveries_per_sec") for s in ("tickshard", "nats", "naive"))
    tp99, np99, vp99 = (med(w, s, "latency_us", "p99") for s in ("tickshard", "nats", "naive"))
    if t and n: print(f"\n{w}: tickshard/NATS deliveries {t/n:.2f}x, p99 NATS/tickshard {np99/max(tp99,1):.2f}x")
    if t and v: print(f"{w}: tickshard/naive deliveries {t/v:.2f}x, p99 naive/tickshard {vp99/max(tp99,1):.2f}x")
PY
