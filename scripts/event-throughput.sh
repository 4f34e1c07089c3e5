#!/usr/bin/env bash
# Event path throughput, router vs a bare tokio-tungstenite echo server, same client,
# same run: devices send `instances` events as fast as TCP takes them; the router's
# figure is what its (embedded) bus delivered, the reference's what it echoed back.
# With rounds > 1 the two alternate (router, echo, router, echo...) and the ratio of the
# medians is printed too: on a shared 2-core guest one 10 s pair varies by +-10%.
#   scripts/event-throughput.sh [connections=64] [seconds=10] [rounds=1]
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-64} S=${2:-10} N=${3:-1}
# --bins too: naming examples alone builds only them, and the router binary could be stale.
cargo build --release --quiet -p router --bins && cargo build --release --quiet -p hive-benches --example echo_reference --example flood
PIDS=(); trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
target/release/router serve --listen 127.0.0.1:9900 --api 127.0.0.1:9901 --auth-secret tp-0123456789abcdef0123456789abcdef \
  --device-rate 10000000 --device-burst 10000000 >/dev/null 2>&1 &
PIDS+=($!)
target/release/examples/echo_reference 127.0.0.1:9910 >/dev/null &
PIDS+=($!)
sleep 0.5
R=() E=()
for ((k = 1; k <= N; k++)); do
  r=$(target/release/examples/flood router ws://127.0.0.1:9900/ws http://127.0.0.1:9901 tp-0123456789abcdef0123456789abcdef "$C" "$S")
  e=$(target/release/examples/flood echo ws://127.0.0.1:9910 - - "$C" "$S")
  echo "$r"; echo "$e"
  R+=("$(echo "$r" | sed 's/.*= \([0-9.]*\) msgs.*/\1/')")
  E+=("$(echo "$e" | sed 's/.*= \([0-9.]*\) msgs.*/\1/')")
  python3 -c "print(f'router / echo reference = {${R[-1]}/${E[-1]}:.2f}')"
done
if [ "$N" -gt 1 ]; then
  python3 -c "
import statistics as s
r=[$(IFS=,; echo "${R[*]}")]; e=[$(IFS=,; echo "${E[*]}")]
print(f'median of {len(r)} rounds: router {s.median(r):.0f} / echo {s.median(e):.0f} msgs/s = {s.median(r)/s.median(e):.2f}')"
fi
