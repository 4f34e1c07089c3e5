#!/usr/bin/env bash
# The slowloris figure: ack latency of authenticated devices without and then with
# 10,000 hostile never-authenticating connections, against the same router, same run.
#   scripts/slowloris.sh [--devices 2000] [--hostile 10000] [--rate 1000] [--duration 15]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=2000 HOSTILE=10000 RATE=1000 DURATION=15
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;; --hostile) HOSTILE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;; --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet -p router -p loadgen
[ -x target/pyenv/bin/python ] || python3 -m venv target/pyenv
OUT=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$OUT"' EXIT
target/release/router serve --listen 127.0.0.1:9700 --api 127.0.0.1:9701 --auth-secret slow-0123456789abcdef0123456789abcdef >"$OUT/r.out" 2>/dev/null &
PIDS+=($!); sleep 0.5
lg() { target/release/loadgen --devices "$DEVICES" --url ws://127.0.0.1:9700 --api http://127.0.0.1:9701 --secret slow-0123456789abcdef0123456789abcdef \
         --request-rate "$RATE" --duration "$DURATION" --quiet --json "$OUT/$1.json" >/dev/null; }
lg calm
target/pyenv/bin/python interop/python/slowloris.py --port 9700 --connections "$HOSTILE" --seconds $((DURATION + 40)) &
PIDS+=($!); sleep 15
hostile_open=$(curl -s http://127.0.0.1:9701/metrics | awk '/^router_handshakes_in_progress/ {s+=$2} END {print s}')
lg hostile
python3 - "$OUT" "$hostile_open" <<'PY'
import json, sys
d, hostile = sys.argv[1], sys.argv[2]
for name in ("calm", "hostile"):
    r = json.load(open(f"{d}/{name}.json"))
    a = r["latency_ms"]["ack"]
    print(f"{name:8} devices {r['devices']['connected']}/{r['devices']['target']}  ack p50 {a['p50']:.3f} p99 {a['p99']:.3f} "
          f"p99.9 {a['p999']:.3f} ms  acked {r['requests']['acked']}/{r['requests']['sent']}  errors {r['errors']}")
print(f"hostile connections held open by the router during the second run: {hostile}")
PY
