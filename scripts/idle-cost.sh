#!/usr/bin/env bash
# What an idle fleet costs the broker: K router nodes on a local RabbitMQ, N devices that
# only answer pings, for S seconds; counts every message the routers publish (device-alive
# events, envelopes between nodes, membership messages) over that window from their
# /metrics, and prints messages/s in all and per 1,000 devices.
#
#   scripts/idle-cost.sh [--devices 10000] [--nodes 3] [--seconds 60] [--ping 30]
#                        [--alive 0] [--amqp URL]
#
# --ping and --alive are the routers' --ping-interval and --device-alive-interval. The
# window starts once every device is connected and has been pinged once (one ping
# interval after the ramp), so it sees the steady state, not the connect storm.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=10000 NODES=3 SECONDS_=60 PING=30 ALIVE=0 AMQP=amqp://guest:guest@127.0.0.1:5672/%2f PORT=9600
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --ping) PING=$2; shift 2 ;;
    --alive) ALIVE=$2; shift 2 ;;
    --amqp) AMQP=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
BUILD=()
[ -n "${ROUTER_BIN:-}" ] || BUILD+=(-p router)
[ -n "${LOADGEN_BIN:-}" ] || BUILD+=(-p loadgen)
[ ${#BUILD[@]} -eq 0 ] || cargo build --release --quiet "${BUILD[@]}"
ROUTER=${ROUTER_BIN:-target/release/router} LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
SECRET=idle-$RANDOM$RANDOM-0123456789abcdef0123456789abcdef
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
APIS=""
for i in $(seq 0 $((NODES - 1))); do
  api=127.0.0.1:$((PORT + 1 + i))
  "$ROUTER" serve --listen "127.0.0.1:$PORT" --api "$api" --shards 1 --node-id "idle-$i-$SECRET" \
    --auth-secret "$SECRET" --amqp "$AMQP" --ping-interval "$PING" --device-alive-interval "$ALIVE" \
    --max-connections 19000 >/dev/null 2>&1 &
  PIDS+=($!)
  APIS="$APIS${APIS:+,}http://$api"
done
for i in $(seq 0 $((NODES - 1))); do
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$((PORT + 1 + i))/readyz" >/dev/null && break
    sleep 0.2
  done
done
HOLD=$((PING + SECONDS_ + 30))
"$LOADGEN" --devices "$DEVICES" --url "ws://127.0.0.1:$PORT" --api "$APIS" --secret "$SECRET" \
  --request-rate 0 --duration "$HOLD" --connect-rate 5000 --quiet --source-ips 127.0.0.2-127.0.0.250 \
  >/dev/null 2>&1 &
PIDS+=($!)
# Sum of the counted messages over all nodes.
count() {
  local total=0 v
  for i in $(seq 0 $((NODES - 1))); do
    v=$(curl -s "http://127.0.0.1:$((PORT + 1 + i))/metrics" | awk '
      /^router_amqp_published_total / || /^router_cluster_envelopes_sent_total / ||
      /^router_cluster_presence_sent_total / { s += $2 } END { printf "%d", s }')
    total=$((total + v))
  done
  echo "$total"
}
connected() {
  local total=0 v
  for i in $(seq 0 $((NODES - 1))); do
    v=$(curl -s "http://127.0.0.1:$((PORT + 1 + i))/metrics" | awk '/^router_cluster_local_devices / {print $2}')
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
for _ in $(seq 1 120); do [ "$(connected)" -ge "$DEVICES" ] && break; sleep 1; done
sleep "$PING"
a=$(count); sleep "$SECONDS_"; b=$(count)
n=$(connected)
awk -v d=$((b - a)) -v s="$SECONDS_" -v n="$n" -v k="$NODES" -v p="$PING" -v al="$ALIVE" 'BEGIN {
  r = d / s
  printf "idle fleet: %d devices over %d nodes, ping %d s, device-alive interval %s\n", n, k, p, (al == 0 ? "one per ping" : al " s")
  printf "broker messages published: %.1f/s in all, %.2f/s per 1,000 devices\n", r, r * 1000 / n
}'
