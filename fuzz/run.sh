#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 10) each; exits non-zero on the
# first crash. Used by .ci/run; needs cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-10}
export RUSTC_BOOTSTRAP=1
TARGETS=(ws_message ws_frames tick_fields store_records tick_files grpc_requests)
cargo fuzz build --release "${TARGETS[@]/#/}" 2>/dev/null || cargo fuzz build --release
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzz: $t for ${SECONDS_EACH}s"
  cargo fuzz run --release "$t" -- -max_total_time="$SECONDS_EACH" -max_len=8192 -print_final_stats=1 2>&1 \
    | grep -E '^(stat::number_of_executed_units|stat::new_units_added|==[0-9]+== ERROR|SUMMARY)|panicked|Done' || true
  test "${PIPESTATUS[0]}" -eq 0 || { echo "fuzz: $t crashed (see fuzz/artifacts/$t)"; exit 1; }
done
