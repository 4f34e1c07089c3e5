#!/usr/bin/env bash
# Run every fuzz target for N seconds each (default 120) on the stable toolchain
# (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags), growing the committed corpora.
# Prints the executions and crashes per target. Needs: cargo install cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
for t in hive_frame phoenix hivekit $(ls fuzz_targets | sed -n 's/^\(amqp_headers\)\.rs$/\1/p'); do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  RUSTC_BOOTSTRAP=1 cargo fuzz run -s none "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || { echo "$t: CRASH"; tail -30 "$log"; exit 1; }
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  echo "$t: $runs executions in ${secs}s, 0 crashes, corpus $(ls corpus/$t | wc -l) inputs"
  rm -f "$log"
done
