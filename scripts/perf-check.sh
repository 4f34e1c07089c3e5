#!/usr/bin/env bash
# Performance regression check. Gate: instruction counts (valgrind callgrind, identical on
# every run of the same binary, whatever else the machine does) of fixed workloads over
# the hot paths, against benches/baseline.json: a workload 10% or more above its baseline
# fails. Then, unless --quick, a short loadgen scenario against the router is reported
# (latency on a shared 2-core machine is noise, so it is shown, not gated).
#   scripts/perf-check.sh [--quick] [--update-baseline]
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0 UPDATE=0
for a in "$@"; do
  case "$a" in --quick) QUICK=1 ;; --update-baseline) UPDATE=1 ;; *) echo "unknown argument $a" >&2; exit 2 ;; esac
done
command -v valgrind >/dev/null || { echo "perf-check needs valgrind" >&2; exit 2; }
cargo build --release --quiet -p hive-benches --example perf_workload
BIN=target/release/examples/perf_workload
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
declare -A IR
for w in hive_decode ws_frames phoenix hivekit token; do
  valgrind --tool=callgrind --callgrind-out-file="$OUT/$w.cg" "$BIN" "$w" >/dev/null 2>"$OUT/$w.err"
  IR[$w]=$(grep -m1 '^summary:' "$OUT/$w.cg" | awk '{print $2}')
done
if [ "$UPDATE" = 1 ]; then
  { echo "{"; first=1
    for w in hive_decode ws_frames phoenix hivekit token; do
      [ $first = 1 ] || echo ","; first=0; printf '  "%s": %s' "$w" "${IR[$w]}"; done
    echo; echo "}"; } > benches/baseline.json
  echo "baseline updated: benches/baseline.json"; cat benches/baseline.json
  exit 0
fi
fail=0
printf '%-12s %15s %15s %8s\n' workload instructions baseline ratio
for w in hive_decode ws_frames phoenix hivekit token; do
  base=$(python3 -c "import json;print(json.load(open('benches/baseline.json'))['$w'])")
  ratio=$(python3 -c "print(f'{${IR[$w]}/$base:.3f}')")
  verdict=ok
  if python3 -c "import sys; sys.exit(0 if ${IR[$w]} >= 1.10*$base else 1)"; then verdict=REGRESSION; fail=1; fi
  printf '%-12s %15s %15s %8s %s\n' "$w" "${IR[$w]}" "$base" "$ratio" "$verdict"
done
if [ "$QUICK" = 0 ]; then
  cargo build --release --quiet -p router -p loadgen
  target/release/router serve --listen 127.0.0.1:9650 --api 127.0.0.1:9651 --auth-secret perf-0123456789abcdef0123456789abcdef >/dev/null 2>&1 &
  RP=$!; sleep 0.5
  target/release/loadgen --devices 2000 --url ws://127.0.0.1:9650 --api http://127.0.0.1:9651 --secret perf-0123456789abcdef0123456789abcdef \
    --request-rate 1000 --duration 5 --quiet --json "$OUT/lg.json" | sed 's/^/  /' || fail=1
  kill $RP 2>/dev/null || true
  python3 - "$OUT/lg.json" <<'PY' || fail=1
import json, sys
r = json.load(open(sys.argv[1]))
assert r["devices"]["connected"] == r["devices"]["target"], r["devices"]
assert r["errors"] == {}, r["errors"]
print(f"loadgen scenario: {r['devices']['connected']} devices, ack p50 {r['latency_ms']['ack']['p50']} ms, p99 {r['latency_ms']['ack']['p99']} ms (reported, not gated)")
PY
fi
if [ $fail = 1 ]; then echo "perf-check: FAILED (10% or more above baseline, or scenario errors)"; exit 1; fi
echo "perf-check: ok"
