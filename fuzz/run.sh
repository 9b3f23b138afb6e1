#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_EACH seconds (default 10); exits non-zero
# on the first crash. Used by .ci/run; needs cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-10}
export RUSTC_BOOTSTRAP=1
TARGETS=(ws_message ws_frames tick_fields store_records tick_files grpc_requests)
cargo fuzz build
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  rc=0
  cargo fuzz run "$t" -- -max_total_time="$SECONDS_EACH" -max_len=8192 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
  if [[ $rc -ne 0 ]]; then
    tail -40 "$log"
    echo "fuzz: $t crashed after ${runs} inputs (reproducer in fuzz/artifacts/$t)"
    exit 1
  fi
  echo "fuzz: $t: ${runs} inputs in ${SECONDS_EACH} s, no crash"
  rm -f "$log"
done
