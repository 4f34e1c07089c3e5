#!/usr/bin/env bash
# The RabbitMQ figures, on this machine, in one run, in a vhost of their own (deleted
# at the end):
#  1. events/s confirmed by RabbitMQ through the router (--amqp, devices flooding
#     events) next to a bare lapin publisher (same body, headers, routing key, confirm
#     window) in the same run;
#  2. request ack latency across two nodes: loadgen's backend sends each request
#     through the node that holds the device (owner) and then through the other node
#     (cross: envelope over hive.nodes, ack back the same way), same fleet, same rate.
#   scripts/amqp-bench.sh [flood-connections=32] [seconds=10] [devices=2000] [rate=1000] [offered-events/s=25000]
# The devices offer a fixed event rate above what the broker confirms (so the bridge
# always has a backlog) rather than flooding without limit: on two cores an unpaced
# flood would spend the CPU RabbitMQ needs on events dropped at the full bus.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-32} S=${2:-10} N=${3:-2000} RATE=${4:-1000} OFFER=${5:-25000}
VH="hive-bench-$$"
URL="amqp://guest:guest@127.0.0.1:5672/$VH"
# --bins too: naming examples alone builds only them, and the binaries could be stale.
cargo build --release --quiet -p router -p loadgen --bins && cargo build --release --quiet -p hive-benches --example flood --example lapin_publisher
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rabbitmqctl delete_vhost "$VH" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM
rabbitmqctl add_vhost "$VH" >/dev/null
rabbitmqctl set_permissions -p "$VH" guest '.*' '.*' '.*' >/dev/null
target/release/examples/lapin_publisher "$URL" setup

wait_ready() { for _ in $(seq 1 100); do curl -sf "$1/readyz" >/dev/null && return 0; sleep 0.1; done; echo "not ready: $1" >&2; return 1; }

echo "== 1. events/s with publisher confirms (window 1000), $C devices offering $OFFER events/s, ${S}s each"
target/release/router serve --listen 127.0.0.1:9920 --api 127.0.0.1:9921 --auth-secret tp-0123456789abcdef0123456789abcdef \
  --amqp "$URL" --node-id bench-1 --device-rate 10000000 --device-burst 10000000 >/dev/null 2>&1 &
PIDS+=($!)
wait_ready http://127.0.0.1:9921
r=$(target/release/examples/flood amqp ws://127.0.0.1:9920/ws http://127.0.0.1:9921 tp "$C" "$S" "$OFFER")
drops=$(curl -s http://127.0.0.1:9921/metrics | grep -E '^router_events_dropped_total\{reason="bus_full"\}' | awk '{print $2}')
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
l=$(target/release/examples/lapin_publisher "$URL" "$S" 1000)
echo "router: $r (bus_full drops while flooding: ${drops:-0})"
echo "bare:   $l"
python3 -c "
r=float('''$r'''.split('= ')[1].split()[0]); l=float('''$l'''.split('= ')[1].split()[0])
print(f'router / bare lapin publisher = {r/l:.2f}')"

echo "== 2. request ack latency, $N devices on two nodes, $RATE req/s, ${S}s: owner vs cross"
for i in 1 2; do
  target/release/router serve --listen 127.0.0.1:99${i}0 --api 127.0.0.1:99${i}1 --auth-secret tp-0123456789abcdef0123456789abcdef \
    --amqp "$URL" --node-id "bench-$i" >/dev/null 2>&1 &
  PIDS+=($!)
done
wait_ready http://127.0.0.1:9911; wait_ready http://127.0.0.1:9921
for via in owner cross; do
  target/release/loadgen --devices "$N" --url ws://127.0.0.1:9910/ws,ws://127.0.0.1:9920/ws \
    --api http://127.0.0.1:9911,http://127.0.0.1:9921 --secret tp-0123456789abcdef0123456789abcdef --connect-rate 2000 \
    --duration "$S" --request-rate "$RATE" --request-via "$via" --json "target/amqp-bench-$via.json" >/dev/null 2>&1
  python3 - "$via" "target/amqp-bench-$via.json" <<'PY'
import json, sys
via, f = sys.argv[1], sys.argv[2]
j = json.load(open(f))
a = j["latency_ms"]["ack"]; rq = j["requests"]
print(f"{via:5}: ack p50 {a['p50']:.3f} p90 {a['p90']:.3f} p99 {a['p99']:.3f} p99.9 {a['p999']:.3f} max {a['max']:.3f} ms; sent {rq['sent']} acked {rq['acked']} timeout {rq['timeout']} errors {rq['http_error']+rq['transport_error']}")
PY
done
