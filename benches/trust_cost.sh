#!/usr/bin/env bash
# What TLS and tokens cost (issue 12): the same release binary, W1 (fan-out at
# max rate), W3 (durable ingest, windows 64 and 256) with trust off (ws://,
# http://, anonymous) and on (wss://, https:// with a CA made here, HS256
# tokens required: --anonymous none), interleaved in one run so the machine's
# noise hits both alike. Needs openssl (for the test CA).
#
# Usage: benches/trust_cost.sh      (ROUNDS=3 DURATION=8)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/tickshard
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
DIR=$(mktemp -d)
HTTP=127.0.0.1:18680
GRPC=127.0.0.1:18681
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

# a CA and a server certificate for 127.0.0.1, an HS256 secret, a token
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$DIR/tls.key" -out "$DIR/tls.csr" 2>/dev/null
openssl x509 -req -in "$DIR/tls.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial -days 2 \
  -copy_extensions copy -out "$DIR/tls.crt" 2>/dev/null
head -c 48 /dev/urandom | base64 > "$DIR/secret"
TOKEN=$("$BIN" token --secret-file "$DIR/secret" --sub bench --subscribe '*' --publish '*' --ttl 1h)

start() { # off|on
  rm -rf "$DIR/data"
  local trust=()
  [[ $1 == on ]] && trust=(--tls-cert "$DIR/tls.crt" --tls-key "$DIR/tls.key" --auth-hs256-secret-file "$DIR/secret" --anonymous none)
  "$BIN" --no-sim --data-dir "$DIR/data" --http-addr $HTTP --grpc-addr $GRPC --peer-addr 127.0.0.1:0 \
    --max-connections 19500 --log warn "${trust[@]}" > "$DIR/out" 2> "$DIR/err" &
  PID=$!
  for _ in $(seq 100); do grep -q "grpc listening" "$DIR/out" 2>/dev/null && return; sleep 0.1; done
  echo "server did not start"; cat "$DIR/err"; exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; }

run() { # workload off|on
  local args=() conn=(--ws ws://$HTTP/ws --grpc http://$GRPC)
  [[ $2 == on ]] && conn=(--ws wss://$HTTP/ws --grpc https://$GRPC --ca-cert "$DIR/ca.pem" --token "$TOKEN")
  case $1 in
    W1) args=(--subscribers 1000 --symbols 10 --publishers 1 --window 256) ;;
    W3-64) args=(--subscribers 0 --symbols 64 --publishers 4 --window 64) ;;
    W3-256) args=(--subscribers 0 --symbols 64 --publishers 4 --window 256) ;;
  esac
  "$BIN" bench "${conn[@]}" --server-pid "$PID" "${args[@]}" --duration "$DURATION" --warmup 2 --json
}

: > "$DIR/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for w in W1 W3-64 W3-256; do
    for mode in off on; do
      start "$mode"
      line=$(run "$w" "$mode" || echo '{}')
      stop
      echo "{\"round\":$round,\"workload\":\"$w\",\"mode\":\"$mode\",\"r\":$line}" | tee -a "$DIR/results.jsonl"
    done
  done
done

python3 benches/summary.py "$DIR/results.jsonl" mode off on
