#!/usr/bin/env bash
# What a durable tick costs the disk at W3 (64 symbols, 4 publish streams ×
# WINDOW in flight, no subscribers), per acked tick, over a window of SAMPLE
# seconds in the middle of the run (BENCHMARKS.md, "what a W3 commit writes"):
#   committed: the log records and tick blocks the committer hands sled
#              (`tickshard_store_written_bytes_total{kind}`);
#   sled writes: what the server's threads write to files (`/proc/<pid>/task/*/io`
#              `wchar`: sled's I/O threads, and the committer's own blob files);
#   disk:      what reaches the block layer (`write_bytes` of the same threads).
# Usage: benches/w3_bytes.sh [WINDOW]     (WINDOW=256; SERVER_BIN=path for another build)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/tickshard
SERVER_BIN=${SERVER_BIN:-$BIN}
WINDOW=${1:-256}
SAMPLE=${SAMPLE:-2}
DIR=$(mktemp -d)
HTTP=127.0.0.1:18490
GRPC=127.0.0.1:18491
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

"$SERVER_BIN" --no-sim --data-dir "$DIR/data" --http-addr $HTTP --grpc-addr $GRPC --peer-addr 127.0.0.1:0 --log warn > "$DIR/out" 2> "$DIR/err" &
PID=$!
for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out" 2>/dev/null && break; sleep 0.1; done
grep -q "grpc listening" "$DIR/out" || { echo "server did not start"; cat "$DIR/err"; exit 1; }

# One line per figure: thread name (or metric), wchar, write_bytes.
snap() {
  for t in /proc/$PID/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ < "$t/comm")" \
      "$(awk '/^wchar/ {print $2}' "$t/io")" "$(awk '/^write_bytes/ {print $2}' "$t/io")"
  done
  curl -s http://$HTTP/metrics | awk '
    /^tickshard_ticks_accepted_total / {print "M_ticks", $2, 0}
    /^tickshard_store_written_bytes_total\{kind="log"\}/ {print "M_log", $2, 0}
    /^tickshard_store_written_bytes_total\{kind="blocks"\}/ {print "M_blocks", $2, 0}'
}
( sleep 4; snap > "$DIR/a"; sleep "$SAMPLE"; snap > "$DIR/b" ) &
SNAPS=$!
"$BIN" bench --ws ws://$HTTP/ws --grpc http://$GRPC --server-pid "$PID" --subscribers 0 --symbols 64 \
  --publishers 4 --window "$WINDOW" --duration $((SAMPLE + 6)) --warmup 2 --json > "$DIR/bench.json"
wait $SNAPS
kill -TERM $PID; wait $PID || true

python3 - "$DIR/a" "$DIR/b" "$DIR/bench.json" <<'EOF'
import collections, json, sys
def load(path):
    out = collections.defaultdict(lambda: [0.0, 0.0])
    for line in open(path):
        name, w, d = line.split()
        out[name][0] += float(w)
        out[name][1] += float(d)
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
delta = {k: (b[k][0] - a[k][0], b[k][1] - a[k][1]) for k in b}
ticks = delta["M_ticks"][0]
files = [k for k in delta if k.startswith("sled-io") or k.startswith("tickshard-commi")]
wchar = sum(delta[k][0] for k in files)
disk = sum(delta[k][1] for k in files)
log, blocks = delta["M_log"][0], delta["M_blocks"][0]
r = json.load(open(sys.argv[3]))
print(f"acked/s {r['publish_per_sec']:.0f}, ack p99 {r['ack_us']['p99'] / 1e3:.1f} ms, server CPU {r['server_cpu_pct']:.0f}%")
print(f"sample: {ticks:.0f} ticks")
print(f"committed: {(log + blocks) / ticks:.1f} B/tick (log {log / ticks:.1f}, blocks {blocks / ticks:.1f})")
print(f"sled writes: {wchar / ticks:.1f} B/tick (the committer's own: {delta.get('tickshard-commi', (0, 0))[0] / ticks:.1f})")
print(f"disk: {disk / ticks:.1f} B/tick")
EOF
