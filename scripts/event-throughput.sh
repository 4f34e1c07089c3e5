#!/usr/bin/env bash
# Event path throughput, router vs a bare tokio-tungstenite echo server, same client,
# same run: devices send `instances` events as fast as TCP takes them; the router's
# figure is what its (embedded) bus delivered, the reference's what it echoed back.
#   scripts/event-throughput.sh [connections=64] [seconds=10]
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-64} S=${2:-10}
# --bins too: naming examples alone builds only them, and the router binary could be stale.
cargo build --release --quiet -p router --bins --example echo_reference --example flood
PIDS=(); trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
target/release/router serve --listen 127.0.0.1:9900 --api 127.0.0.1:9901 --auth-secret tp \
  --device-rate 10000000 --device-burst 10000000 >/dev/null 2>&1 &
PIDS+=($!)
target/release/examples/echo_reference 127.0.0.1:9910 >/dev/null &
PIDS+=($!)
sleep 0.5
r=$(target/release/examples/flood router ws://127.0.0.1:9900/ws http://127.0.0.1:9901 tp "$C" "$S")
e=$(target/release/examples/flood echo ws://127.0.0.1:9910 - - "$C" "$S")
echo "$r"; echo "$e"
python3 -c "
r=float('$r'.split('= ')[1].split()[0]); e=float('$e'.split('= ')[1].split()[0])
print(f'router / echo reference = {r/e:.2f}')"
