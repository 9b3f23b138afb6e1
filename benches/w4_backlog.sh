#!/usr/bin/env bash
# W4 connect rate before/after a change (BENCHMARKS.md, "W4 connect rate"): /tmp/ts-<which> binaries,
# interleaved, with the kernel accept-queue overflows (nstat) around each run.
# Usage: WHICH="before after" ROUNDS="1 2 3" benches/w4_backlog.sh
set -uo pipefail
DIR=$(mktemp -d)
HTTP=127.0.0.1:18780; GRPC=127.0.0.1:18781
for round in ${ROUNDS:-1 2 3}; do
  for which in ${WHICH:-before after}; do
    bin=/tmp/ts-$which
    rm -rf "$DIR/data"
    TICKSHARD_PEER_ADDR=127.0.0.1:0 "$bin" --no-sim --data-dir "$DIR/data" --http-addr $HTTP --grpc-addr $GRPC --max-connections 19500 --log warn > "$DIR/out" 2> "$DIR/err" &
    PID=$!
    for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out" 2>/dev/null && break; sleep 0.1; done
    ov0=$(nstat -az TcpExtListenOverflows | awk '/ListenOverflows/{print $2}')
    r=$("${GEN:-target/release/tickshard}" bench --ws ws://$HTTP/ws --grpc http://$GRPC --server-pid $PID --idle --subscribers 19000 --source-ips 8 --connect-concurrency 512 --duration 3 --warmup 1 --json)
    ov1=$(nstat -az TcpExtListenOverflows | awk '/ListenOverflows/{print $2}')
    kill -TERM $PID; wait $PID
    echo "$round $which overflows=$((ov1-ov0)) $(echo "$r" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("connects/s", r["connect_per_sec"], "rss/conn KiB", r["server_rss_per_conn_kb"])')"
  done
done
rm -rf "$DIR"
