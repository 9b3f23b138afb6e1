#!/usr/bin/env bash
# Elastic shards (issue 13, contract §9): what a rebalance costs. Two release
# pods on loopback; a cluster of 1 shard grows to 2 (`tickshard admin
# rebalance --shards 2`), so every symbol whose owner under 2 is shard 1 moves.
#
# 1. One symbol with >= 100,000 retained ticks moves alone: its whole move
#    (history copy included) and its publish hold.
# 2. 1,000 symbols (a few hundred ticks each) move: the rebalance's wall time
#    and the publish hold per symbol (p50/p99/max).
# 3. W1 (1,000 subscribers x 10 symbols, max rate) and W2 (the same at 1,000
#    ticks/s) on symbols that stay on pod 0, with and without a rebalance of
#    1,000 symbols running in the measured window; interleaved, ROUNDS rounds.
#
# Usage: benches/rebalance.sh        (ROUNDS=2 DURATION=8)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/tickshard
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
PEERS="http://127.0.0.21:18582,http://127.0.0.22:18582"
PEER0=http://127.0.0.21:18582
PIDS=()

start() {
  rm -rf "$DIR"/pod-*
  for i in 0 1; do
    local ip=127.0.0.2$((i + 1))
    "$BIN" --no-sim --shards 1 --shard-id $i --peers "$PEERS" --data-dir "$DIR/pod-$i" \
      --http-addr $ip:18580 --grpc-addr $ip:18581 --peer-addr $ip:18582 --max-connections 19500 \
      --log "warn,tickshard_shard::node::rebalance=info" > "$DIR/out-$i" 2> "$DIR/err-$i" &
    PIDS[i]=$!
  done
  for i in 0 1; do
    for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out-$i" 2>/dev/null && break; sleep 0.1; done
  done
  sleep 1 # pod 1's link to pod 0
}
stop() {
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
}
# preload PREFIX OWNER(of 2) SYMBOLS SECONDS: durable ingest at max rate
preload() {
  "$BIN" bench --ws ws://127.0.0.21:18580/ws --grpc http://127.0.0.21:18581 --owned-by "$2" --of 2 \
    --prefix "$1" --subscribers 0 --symbols "$3" --publishers 4 --window 256 --duration "$4" --warmup 0 --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  preloaded", r.get("published", "?"), "ticks")'
}
rebalance() { # prints the wall time of `admin rebalance --shards 2`
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN" admin rebalance --shards 2 --peer $PEER0 --timeout 10m 2>> "$DIR/admin"
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
holds() { # summary of pod 0's "symbol moved" lines (and pod 1's "taken over")
  python3 - "$DIR/err-0" "$DIR/err-1" <<'PY'
import re, sys
took = {}
for line in open(sys.argv[2], errors="replace"):
    if "symbol taken over" in line:
        f = dict(re.findall(r"(\w+)=(\S+)", line))
        took[f["symbol"]] = (int(f["ticks"]), int(f["candles"]))
rows = []
for line in open(sys.argv[1], errors="replace"):
    if "symbol moved" not in line:
        continue
    f = dict(re.findall(r"(\w+)=(\S+)", line))
    rows.append((int(f["held_ms"]), int(f["total_ms"]), int(f["seq"]), f["symbol"]))
if not rows:
    print("  no moves logged"); sys.exit()
held = sorted(r[0] for r in rows)
q = lambda p: held[min(len(held) - 1, int(p * len(held)))]
print(f"  {len(rows)} symbols moved; publish hold p50 {q(0.5)} ms, p99 {q(0.99)} ms, max {held[-1]} ms;"
      f" whole move p50 {sorted(r[1] for r in rows)[len(rows)//2]} ms, max {max(r[1] for r in rows)} ms;"
      f" ticks per symbol p50 {sorted(r[2] for r in rows)[len(rows)//2]}")
big = max(rows, key=lambda r: r[2])
shipped = took.get(big[3], ("?", "?"))
print(f"  largest: {big[3]} at seq {big[2]}, {shipped[0]} retained ticks and {shipped[1]} closed candles shipped:"
      f" whole move {big[1]} ms, publish hold {big[0]} ms")
PY
}

PARTS=${PARTS:-"1 2 3"}
if [[ $PARTS == *1* ]]; then
echo "## 1. one symbol with >= 100,000 retained ticks"
start
preload HEAVY- 1 1 3
echo "  rebalance wall time: $(rebalance) s"
holds
stop

fi
if [[ $PARTS == *2* ]]; then
echo "## 2. 1,000 symbols moving (and 1,000 staying)"
start
preload MOVE- 1 1000 3
preload STAY- 0 1000 1
echo "  rebalance wall time: $(rebalance) s"
holds
stop

fi
[[ $PARTS == *3* ]] || exit 0
echo "## 3. W1 and W2 on pod 0 with and without a rebalance of 1,000 symbols"
: > "$DIR/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for w in W1 W2; do
    for mode in quiet rebalancing; do
      start
      preload MOVE- 1 1000 2 > /dev/null
      case $w in
        W1) args=(--window 256) ;;
        W2) args=(--rate 1000 --window 64) ;;
      esac
      RB=""
      if [[ $mode == rebalancing ]]; then
        (sleep 3 && rebalance > "$DIR/rebalance-time") &
        RB=$!
      fi
      line=$("$BIN" bench --ws ws://127.0.0.21:18580/ws --grpc http://127.0.0.21:18581 --owned-by 0 --of 2 \
        --prefix "$w-" --subscribers 1000 --symbols 10 --publishers 1 "${args[@]}" --server-pid "${PIDS[0]}" \
        --duration "$DURATION" --warmup 2 --json || echo '{}')
      if [[ -n $RB ]]; then wait "$RB" || true; fi
      took=$([[ $mode == rebalancing ]] && cat "$DIR/rebalance-time" || echo null)
      stop
      echo "{\"round\":$round,\"workload\":\"$w\",\"mode\":\"$mode\",\"rebalance_s\":${took:-null},\"r\":$line}" | tee -a "$DIR/results.jsonl"
    done
  done
done
python3 benches/summary.py "$DIR/results.jsonl" mode quiet rebalancing
