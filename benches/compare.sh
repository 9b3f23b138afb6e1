#!/usr/bin/env bash
# tickshard side by side with what a user would pick instead (BENCHMARKS.md):
#   - NATS over WebSocket: Debian's nats-server with a `websocket {}` block;
#     subscribers speak the NATS text protocol over WebSocket (one subject per
#     symbol), the publishers publish over NATS TCP;
#   - naive: the ~60-line tokio-tungstenite broadcast server in benches/naive_ws.rs;
#   - floor: benches/floor.rs, one thread writing each tick frame to every
#     socket with one write(2) each: what the kernel alone costs here.
# Same generator (`tickshard bench --target …`), same workloads, interleaved over
# ROUNDS rounds; prints every run and the median ratios.
#
#   benches/compare.sh                              # W1 + W2, 3 rounds (~6 min)
#   ROUNDS=1 WORKLOADS="W1" benches/compare.sh
#   WORKLOADS="L100 W2" SYSTEMS="tickshard nats floor" benches/compare.sh
#   WORKLOADS="W7" W7_RATES="100 200 400" benches/compare.sh   # W7 rate sweep
#
# Workloads (1,000 subscribers × 10 symbols unless said):
#   W1 max publish rate · W2 1,000 ticks/s (1M deliveries/s) · L100 100 ticks/s
#   (100k deliveries/s) · W5 W2 + 10 stuck readers · W7 the dashboard workload:
#   10,000 symbols, 5,000 subscribers with a 50-symbol watchlist drawn by Zipf
#   popularity (s = 1.1, seeded), each tick's symbol drawn by the same
#   popularity, 8 publish streams, W7_DURATION s (30) at each rate of W7_RATES
#   (100) ticks/s. naive broadcasts every tick to every client, so it takes
#   no part in W7; the floor (one write per tick per watching socket, no
#   back-pressure) runs L100 and W7 (it reads each client's watchlist from
#   its first message; its 8 publisher threads may reorder a symbol's ticks,
#   which the generator counts as gaps).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-"W1 W2"}
SYSTEMS=${SYSTEMS:-"tickshard nats naive"}
DURATION=${DURATION:-8}
W7_DURATION=${W7_DURATION:-30}
W7_RATES=${W7_RATES:-100}
ulimit -n 20000
if ! command -v nats-server >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >/dev/null
fi
# BIN=path: measure that tickshard binary (a before/after), else build this tree
[ -n "${BIN:-}" ] || cargo build --release --locked -q
cargo bench --locked --no-run --bench naive_ws -q 2>/dev/null
cargo bench --locked --no-run --bench floor -q 2>/dev/null
NAIVE=$(ls -t target/release/deps/naive_ws-* | grep -v '\.d$' | head -1)
FLOOR=$(ls -t target/release/deps/floor-* | grep -v '\.d$' | head -1)
BIN=${BIN:-target/release/tickshard}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true; rm -rf "$DIR"' EXIT

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
"$FLOOR" 127.0.0.1:19180 127.0.0.1:19181 2> "$DIR/floor.err" & FLOOR_PID=$!
# every server up (a port still held by an earlier run's draining server
# would make one exit here)
until grep -q "grpc listening" "$DIR/ts.out" 2>/dev/null; do
  kill -0 $TS_PID 2>/dev/null || { cat "$DIR/ts.err" >&2; exit 1; }
  sleep 0.1
done
sleep 1
for p in $NATS_PID $NAIVE_PID $FLOOR_PID; do kill -0 "$p" || { echo "a server did not start" >&2; exit 1; }; done

bench() { # system workload
  local sys=$1 w=$2 args=() secs=$DURATION
  case $w in
    W1) args=(--subscribers 1000 --symbols 10 --publishers 1 --window 256) ;;  # max publish rate
    W2) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000) ;;  # 1M deliveries/s
    L100) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 100) ;;  # 100k deliveries/s
    W5) args=(--subscribers 1000 --symbols 10 --publishers 1 --rate 1000 --slow 10) ;;  # W2 + 10 stuck readers
    W7@*) args=(--subscribers 5000 --symbols 10000 --watchlist 50 --zipf 1.1 --seed 7 --publishers 8
                --rate "${w#W7@}" --connect-concurrency 512)
          secs=$W7_DURATION ;;
  esac
  case $sys in
    tickshard) "$BIN" bench --target tickshard --ws ws://127.0.0.1:18480/ws --grpc http://127.0.0.1:18481 \
                 --server-pid $TS_PID --prefix "${w//@/R}X$RANDOM-" "${args[@]}" --duration "$secs" --warmup 2 --json ;;
    nats) "$BIN" bench --target nats --ws ws://127.0.0.1:14223/ --nats 127.0.0.1:14222 \
                 --server-pid $NATS_PID --prefix "${w//@/R}X$RANDOM-" "${args[@]}" --duration "$secs" --warmup 2 --json ;;
    naive) "$BIN" bench --target naive --ws ws://127.0.0.1:19080/ --naive-pub 127.0.0.1:19081 \
                 --server-pid $NAIVE_PID --prefix "${w//@/R}X$RANDOM-" "${args[@]}" --duration "$secs" --warmup 2 --json ;;
    floor) "$BIN" bench --target naive --ws ws://127.0.0.1:19180/ --naive-pub 127.0.0.1:19181 \
                 --server-pid $FLOOR_PID --prefix "${w//@/R}X$RANDOM-" "${args[@]}" --duration "$secs" --warmup 2 --json ;;
  esac
}

# W7 runs once per rate of the sweep
expanded=()
for w in $WORKLOADS; do
  if [ "$w" = W7 ]; then for r in $W7_RATES; do expanded+=("W7@$r"); done; else expanded+=("$w"); fi
done

: > "$DIR/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for w in "${expanded[@]}"; do
    for sys in $SYSTEMS; do
      case $w:$sys in W7@*:naive|W1:floor|W2:floor|W5:floor) continue ;; esac
      line=$(bench $sys "$w" || echo '{}')
      echo "{\"round\":$round,\"workload\":\"$w\",\"system\":\"$sys\",\"r\":$line}" | tee -a "$DIR/results.jsonl"
    done
  done
done
cp "$DIR/results.jsonl" "${RESULTS:-/tmp/compare-results.jsonl}"

python3 - "$DIR/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
SYSTEMS = ("tickshard", "nats", "naive", "floor")
def med(w, s, key, sub=None):
    vals = []
    for r in runs:
        if r["workload"] == w and r["system"] == s and r["r"]:
            v = r["r"].get(key)
            if sub: v = (v or {}).get(sub)
            if v is not None: vals.append(v)
    return statistics.median(vals) if vals else None
def f(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)
print("\n| workload | system | published/s | deliveries/s | delivered/owed | p50 µs | p99 µs | p99.9 µs | server CPU % | server µs/delivery | generator CPU % | generator µs/msg |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
workloads = sorted({r["workload"] for r in runs}, key=lambda w: (w.split("@")[0], int(w.split("@")[1]) if "@" in w else 0))
for w in workloads:
    for s in SYSTEMS:
        d = med(w, s, "deliveries_per_sec")
        if d is None: continue
        print(f"| {w} | {s} | {f(med(w,s,'publish_per_sec'))} | {f(d)} | {f(med(w,s,'delivered_pct'), '{:.1f}%')} | "
              f"{f(med(w,s,'latency_us','p50'))} | {f(med(w,s,'latency_us','p99'))} | {f(med(w,s,'latency_us','p999'))} | "
              f"{f(med(w,s,'server_cpu_pct'))} | {f(med(w,s,'server_us_per_delivery'), '{:.2f}')} | "
              f"{f(med(w,s,'gen_cpu_pct'))} | {f(med(w,s,'gen_us_per_msg'), '{:.2f}')} |")
for w in workloads:
    t, n, v, fl = (med(w, s, "deliveries_per_sec") for s in SYSTEMS)
    tp99, np99, vp99, _ = (med(w, s, "latency_us", "p99") for s in SYSTEMS)
    tc, _, _, fc = (med(w, s, "server_us_per_delivery") for s in SYSTEMS)
    if t and n: print(f"{w}: tickshard/NATS deliveries {t/n:.2f}x, p99 NATS/tickshard {np99/max(tp99,1):.2f}x")
    if t and v: print(f"{w}: tickshard/naive deliveries {t/v:.2f}x, p99 naive/tickshard {vp99/max(tp99,1):.2f}x")
    if tc and fc: print(f"{w}: server CPU per delivery, tickshard/floor {tc/fc:.2f}x")
PY
