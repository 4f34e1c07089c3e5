#!/usr/bin/env bash
# Capacity test: start as many router nodes as the open-file limit needs (all sharing one
# port with SO_REUSEPORT), start loadgen with enough worker processes and source
# addresses, ramp up, hold a steady phase with requests flowing, print the report, and stop
# everything it started (also on Ctrl-C or failure).
#
#   scripts/capacity.sh --devices 200000 [--amqp URL] [--protocol hive|phoenix|hivekit|mixed]
#                       [--request-rate 2000] [--duration 20] [--connect-rate 10000]
#                       [--per-node 12000] [--port 9800] [--json FILE] [--no-priority]
#                       [--request-log FILE] [--ping-interval S]
#
# --ping-interval is the routers' (default 30 s): at a million devices on two cores the pings
# alone take the machine (performance.md, "One million devices").
#
# As root it sets the kernel limits a large ramp needs for the run and restores them
# (somaxconn, SYN backlog, the ephemeral port range, conntrack if loaded, the loopback
# backlog, TCP buffer memory), and at the end
# prints where the memory went at its peak: routers, loadgen, kernel slab and TCP buffers.
#
# Priority (off with --no-priority): on a machine with scheduler autogroups the whole
# run (routers, workers, coordinator) is one group, weighted like one nice-0 process
# against every other session; this raises the group to nice -10 for the run (restored
# after), and loadgen's coordinator runs SCHED_FIFO (--realtime) so its own waits for a
# CPU are not counted as ack latency. Routers and simulated devices keep their normal
# priority among themselves. With --amqp and a broker on this machine, the broker's own
# autogroup is raised to the same nice for the run (restored after): otherwise the run
# would outweigh the broker ten to one and starve it (every connection in flow control,
# events minutes late). Needs root; otherwise it says so and runs without.
set -euo pipefail
cd "$(dirname "$0")/.."

PRIORITY=1 DEVICES=10000 AMQP="" PROTOCOL=hive RATE=2000 DURATION=20 CONNECT_RATE=10000 PER_NODE=12000 PORT=9800 JSON=target/capacity-report.json EVENTS=0 REQLOG="" PING=30
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --amqp) AMQP=$2; shift 2 ;;
    --protocol) PROTOCOL=$2; shift 2 ;;
    --request-rate) RATE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connect-rate) CONNECT_RATE=$2; shift 2 ;;
    --per-node) PER_NODE=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    --event-interval) EVENTS=$2; shift 2 ;;
    --no-priority) PRIORITY=0; shift ;;
    --request-log) REQLOG=$2; shift 2 ;;
    --ping-interval) PING=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

# ROUTER_BIN / LOADGEN_BIN: run other builds (e.g. to compare two commits in one session).
BUILD=()
[ -n "${ROUTER_BIN:-}" ] || BUILD+=(-p router)
[ -n "${LOADGEN_BIN:-}" ] || BUILD+=(-p loadgen)
[ ${#BUILD[@]} -eq 0 ] || cargo build --release --quiet "${BUILD[@]}"
ROUTER=${ROUTER_BIN:-target/release/router} LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
SECRET=capacity-$RANDOM$RANDOM-0123456789abcdef0123456789abcdef
# SO_REUSEPORT spreads by hash, not evenly: aim each node well under the 20,000-file cap.
NODES=$(( (DEVICES + PER_NODE - 1) / PER_NODE ))
SHARDS=$([ "$NODES" -gt 1 ] && echo 1 || echo 0)
LOGDIR=$(mktemp -d)
PIDS=()
AUTOGROUP_BEFORE=""
BROKER_AUTOGROUPS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$LOGDIR"
  if [ -n "$AUTOGROUP_BEFORE" ]; then echo "$AUTOGROUP_BEFORE" >/proc/self/autogroup 2>/dev/null || true; fi
  for entry in "${BROKER_AUTOGROUPS[@]}"; do
    echo "${entry#*:}" >"/proc/${entry%%:*}/autogroup" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Kernel settings a large ramp needs (root only; restored on exit): accept and SYN queues
# deep enough for a reconnect storm over every node, and the whole ephemeral port range
# (loopback gives one port per connection per source/destination pair). Conntrack, if
# loaded, needs an entry per connection.
SYSCTL_BEFORE=()
tune() {
  local key=$1 value=$2 before
  before=$(sysctl -n "$key" 2>/dev/null) || return 0
  # Only ever raised (a single number already as high stays).
  case "$before" in *[!0-9]*) ;; *) [ "$before" -ge "$value" ] 2>/dev/null && return 0 ;; esac
  if sysctl -q -w "$key=$value" 2>/dev/null; then
    SYSCTL_BEFORE+=("$key=$before")
    echo "capacity: $key = $value for the run (was $before)" >&2
  fi
}
if [ "$(id -u)" = 0 ]; then
  tune net.core.somaxconn 65535
  tune net.ipv4.tcp_max_syn_backlog 65535
  tune net.ipv4.ip_local_port_range "1024 65535"
  [ -e /proc/sys/net/netfilter/nf_conntrack_max ] && tune net.netfilter.nf_conntrack_max $((DEVICES * 2 + 65536))
  # Loopback packets queue per CPU before the stack takes them (1000 by default): a ramp's
  # bursts of SYNs and upgrade requests overflow it, and every drop is a retransmit 1 s on.
  tune net.core.netdev_max_backlog 16384
  # TCP buffer memory, in pages: the default ceiling (about a tenth of RAM) is reached
  # while a ramp's upgrade requests and replies sit queued on both ends of a million
  # sockets; past "pressure" the kernel shrinks buffers, past the ceiling it drops
  # packets and resets. Raised to a quarter of RAM for the run (pressure at a fifth).
  page_kib=$(( $(getconf PAGESIZE) / 1024 ))
  mem_pages=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / page_kib ))
  tcp_mem_before=$(sysctl -n net.ipv4.tcp_mem | tr -s '\t ' ' ')
  if [ "$(echo "$tcp_mem_before" | awk '{print $3}')" -lt $((mem_pages / 4)) ] &&
     sysctl -q -w net.ipv4.tcp_mem="$((mem_pages / 8)) $((mem_pages / 5)) $((mem_pages / 4))" 2>/dev/null; then
    SYSCTL_BEFORE+=("net.ipv4.tcp_mem=$tcp_mem_before")
    echo "capacity: net.ipv4.tcp_mem = $((mem_pages / 8)) $((mem_pages / 5)) $((mem_pages / 4)) pages for the run (was $tcp_mem_before)" >&2
  fi
fi
restore_sysctls() {
  for kv in "${SYSCTL_BEFORE[@]}"; do sysctl -q -w "$kv" 2>/dev/null || true; done
}
trap 'cleanup; restore_sysctls' EXIT

# Where the memory goes, sampled every 2 s while loadgen runs; the sample with the most
# memory in use is printed at the end: routers' and loadgen's private resident memory
# (RssAnon: summing VmRSS would count the shared binary once per process), and the
# kernel's (slab, which holds sockets, and TCP buffer pages from /proc/net/sockstat).
MEMLOG=$LOGDIR/memory.csv
SLAB_BEFORE=$(awk '/^Slab:/{print $2}' /proc/meminfo)
USED_BEFORE=$(awk '/MemTotal/{t=$2} /MemAvailable/{a=$2} END{print t-a}' /proc/meminfo)
rss_kib() {  # private memory (RssAnon: the binary's file pages are shared); 0 when gone
  local v; v=$(awk '/RssAnon/{print $2}' "/proc/$1/status" 2>/dev/null)
  echo "${v:-0}"
}
sample_memory() {
  local page; page=$(getconf PAGESIZE)
  while sleep 2; do
    local r=0 l=0 pid
    for pid in $(pgrep -f -- "--node-id cap-" || true); do r=$((r + $(rss_kib "$pid"))); done
    for pid in $(pgrep -x loadgen || true); do l=$((l + $(rss_kib "$pid"))); done
    local used slab tcp conns
    used=$(awk '/MemTotal/{t=$2} /MemAvailable/{a=$2} END{print t-a}' /proc/meminfo)
    slab=$(awk '/^Slab:/{print $2}' /proc/meminfo)
    tcp=$(awk '/^TCP:/{for(i=1;i<=NF;i++) if($i=="mem") print $(i+1)*'"$page"'/1024}' /proc/net/sockstat)
    conns=$(awk '/^TCP:/{for(i=1;i<=NF;i++) if($i=="inuse") print $(i+1)}' /proc/net/sockstat)
    echo "$used,$r,$l,$slab,$tcp,$conns" >>"$MEMLOG"
  done
}
# The kernel's own account of the run's TCP trouble: accept queues that overflowed, sockets
# reset for want of memory, memory pressure, drops. Printed as changes over the run.
TCP_COUNTERS="ListenOverflows ListenDrops TCPAbortOnMemory TCPMemoryPressures TCPBacklogDrop TCPRcvQDrop TCPAbortOnData"
tcp_counters() {
  awk -v want="$TCP_COUNTERS" '/^TcpExt:/ { if (!n) { split($0, k); n = 1 } else { split($0, v); for (i = 2; i in k; i++) if (index(" " want " ", " " k[i] " ")) print k[i], v[i] } }' /proc/net/netstat
}
softnet_drops() {  # packets dropped because a CPU's backlog queue was full
  local sum=0 d; for d in $(awk '{print $2}' /proc/net/softnet_stat); do sum=$((sum + 16#$d)); done; echo $sum
}
TCP_BEFORE=$(tcp_counters) SOFTNET_BEFORE=$(softnet_drops)
tcp_report() {
  local after; after=$(tcp_counters)
  echo "kernel TCP counters over the run: $(join <(sort <<<"$TCP_BEFORE") <(sort <<<"$after") | awk '{printf "%s%s +%d", sep, $1, $3 - $2; sep = ", "}'), backlog drops +$(( $(softnet_drops) - SOFTNET_BEFORE ))" >&2
}
memory_report() {
  tcp_report
  [ -s "$MEMLOG" ] || return 0
  sort -t, -k1,1n "$MEMLOG" | tail -1 | awk -F, -v d="$DEVICES" -v slab0="$SLAB_BEFORE" -v used0="$USED_BEFORE" '{
    s = $4 - slab0; n = ($6 > 0 ? $6 : 1)
    printf "memory at its peak over the start (KiB): in use +%d; routers %d (%.0f B/device); loadgen %d (%.0f B/device); kernel slab +%d and TCP buffers %d (%.0f B per socket, %d sockets, both ends)\n",
      $1 - used0, $2, $2*1024/d, $3, $3*1024/d, s, $5, (s + $5)*1024/n, $6 }' >&2
}

REALTIME=()
if [ "$PRIORITY" = 1 ]; then
  REALTIME=(--realtime)
  if [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] && [ -w /proc/self/autogroup ]; then
    before=$(sed -n 's/.* nice //p' /proc/self/autogroup)
    if echo -10 >/proc/self/autogroup 2>/dev/null; then
      AUTOGROUP_BEFORE=$before
      echo "capacity: this shell's scheduler autogroup at nice -10 for the run (--no-priority: off)" >&2
      # A broker on this machine gets the same weight (RabbitMQ's VM is beam.smp).
      case "$AMQP" in
        *@127.*|*@localhost*|amqp://127.*|amqp://localhost*)
          for bp in $(pgrep -x beam.smp 2>/dev/null); do
            bbefore=$(sed -n 's/.* nice //p' "/proc/$bp/autogroup" 2>/dev/null) || continue
            if echo -10 >"/proc/$bp/autogroup" 2>/dev/null; then
              BROKER_AUTOGROUPS+=("$bp:$bbefore")
              echo "capacity: the local broker's autogroup (pid $bp) at nice -10 too" >&2
            fi
          done ;;
      esac
    else
      echo "capacity: cannot raise the autogroup's priority (not root?); running without" >&2
    fi
  fi
fi

APIS=""
for i in $(seq 0 $((NODES - 1))); do
  api=127.0.0.1:$((PORT + 1 + i))
  args=(serve --listen "127.0.0.1:$PORT" --api "$api" --shards "$SHARDS" --node-id "cap-$i"
        --auth-secret "$SECRET" --max-connections 19000 --queue-capacity 16384 --drain-seconds 1
        --ping-interval "$PING")
  [ -n "$AMQP" ] && args+=(--amqp "$AMQP")
  "$ROUTER" "${args[@]}" >"$LOGDIR/router-$i.out" 2>"$LOGDIR/router-$i.err" &
  PIDS+=($!)
  APIS="$APIS${APIS:+,}http://$api"
done
for i in $(seq 0 $((NODES - 1))); do
  for _ in $(seq 1 100); do grep -q "router ready" "$LOGDIR/router-$i.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "router ready" "$LOGDIR/router-$i.out" || { echo "router node $i did not start:"; cat "$LOGDIR/router-$i.err"; exit 1; }
done
echo "capacity: $DEVICES $PROTOCOL devices over $NODES router node(s) on 127.0.0.1:$PORT, $RATE requests/s for ${DURATION}s" >&2

set +e
"$LOADGEN" --devices "$DEVICES" --protocol "$PROTOCOL" --url "ws://127.0.0.1:$PORT" --api "$APIS" \
  --secret "$SECRET" --connect-rate "$CONNECT_RATE" --request-rate "$RATE" --duration "$DURATION" \
  --event-interval "$EVENTS" ${AMQP:+--amqp "$AMQP"} --source-ips 127.0.0.2-127.0.0.250 --ramp-timeout 300 --json "$JSON" "${REALTIME[@]}" ${REQLOG:+--request-log "$REQLOG"} &
LG=$!
PIDS+=($LG)
sample_memory &
PIDS+=($!)
wait $LG
rc=$?
set -e
memory_report
echo "report JSON: $JSON" >&2
exit $rc
