#!/usr/bin/env bash
# Chaos test: faults injected into a router cluster under load, judged against what the
# cluster promises (README "Several nodes"; docs/architecture.md "The cluster").
#
#   scripts/chaos.sh FAULT [--devices N] [--nodes K] [--duration S] [--at T] [--small]
#                          [--json OUT] [--port P] [--request-rate R]
#
#   FAULT: kill | broker-restart | rolling-restart | close-connection | all
#
# Each fault: a fresh RabbitMQ vhost (rabbitmqctl add_vhost, deleted at the end), K
# `router serve --amqp --node-id` processes sharing one device port (SO_REUSEPORT, as
# scripts/capacity.sh starts them), loadgen with --amqp (its own hive.events consumer
# counts every device's event seqs), periodic device events and backend requests at a
# steady rate, the fault T seconds after the steady phase began, a short idle hold at
# the end during which every node's /metrics is read, then scripts/chaos_judge.py prints
# the loss figures and a PASS/FAIL verdict per criterion, writes the JSON summary and
# sets the exit status (non-zero on any FAIL). `all` runs the four in sequence.
#
#   kill              kill -9 node 0 (requests --request-via cross, all APIs)
#   broker-restart    rabbitmqctl stop_app, 20 s (10 s --small), start_app (--request-via owner,
#                     --amqp-durable-events)
#   rolling-restart   SIGTERM each node in turn, wait for its exit, start it again with
#                     the same id and ports, wait for /readyz 200, settle, next
#   close-connection  rabbitmqctl close_connection on node 1's cluster connection
#
# --small (CI): 3 nodes, 3,000 devices, events every 10 s per device, 200 requests/s,
# about 30-40 s of steady phase per fault. Default: 5 nodes, 50,000 devices, events every
# 60 s, 500 requests/s.
#
# ROUTER_BIN / LOADGEN_BIN: binaries to run (default: cargo build --release, then
# target/release/*). They are hard-linked (or copied) into the run directory first, so a
# rebuild during the run does not change what rolling-restart starts again.
#
# Machine sharing: with CHAOS_LOCK=FILE set, while FILE exists nothing is
# started (polled every 20 s); if it appears during a fault, the fault is stopped at once
# (a stopped broker is started again first) and retried once the lock is gone
# (`all`; a single fault exits 75). Only 127.0.0.1 is used. Everything started is stopped
# on exit, Ctrl-C or failure (trap); a broker stopped by this script is always started
# again. Logs, reports and metrics stay in target/chaos/<fault>-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,39p' "$0"; }

FAULT=${1:-}
[ -n "$FAULT" ] || { usage; exit 2; }
shift
case "$FAULT" in
  -h|--help) usage; exit 0 ;;
  kill|broker-restart|rolling-restart|close-connection|all) ;;
  *) echo "chaos: unknown fault '$FAULT'" >&2; usage >&2; exit 2 ;;
esac

DEVICES="" NODES="" DURATION="" AT="" SMALL=0 JSON="" PORT=9700 RATE=""
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --at) AT=$2; shift 2 ;;
    --small) SMALL=1; shift ;;
    --json) JSON=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --request-rate) RATE=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "chaos: unknown argument $1" >&2; exit 2 ;;
  esac
done

LOCK=${CHAOS_LOCK:-}
BROKER=127.0.0.1:5672
JUDGE=scripts/chaos_judge.py
RMQ=(timeout 90 rabbitmqctl)
now_ms() { local t=$EPOCHREALTIME; local f=${t#*.}; echo "${t%.*}${f:0:3}"; }
log() { printf 'chaos [%s] %s\n' "$(date +%T)" "$*" >&2; }

command -v rabbitmqctl >/dev/null || { echo "chaos: rabbitmqctl not found (needed for vhosts and faults)" >&2; exit 2; }
command -v curl >/dev/null || { echo "chaos: curl not found" >&2; exit 2; }

wait_for_lock() {
  local waited=0
  while [ -n "$LOCK" ] && [ -e "$LOCK" ]; do
    [ $((waited % 300)) -eq 0 ] && log "$LOCK exists (someone is measuring): waiting, polling every 20 s"
    sleep 20; waited=$((waited + 20))
  done
}

# Binaries: build once (unless given), then pin them for the whole run.
if [ -z "${CHAOS_PINNED:-}" ]; then
  BUILD=()
  [ -n "${ROUTER_BIN:-}" ] || BUILD+=(-p router)
  [ -n "${LOADGEN_BIN:-}" ] || BUILD+=(-p loadgen)
  [ ${#BUILD[@]} -eq 0 ] || cargo build --release --quiet "${BUILD[@]}"
  ROUTER_BIN=${ROUTER_BIN:-target/release/router}
  LOADGEN_BIN=${LOADGEN_BIN:-target/release/loadgen}
  mkdir -p target/chaos
  PIN=$(mktemp -d "$PWD/target/chaos/bin.XXXXXX")
  for b in "$ROUTER_BIN:router" "$LOADGEN_BIN:loadgen"; do
    ln -f "${b%%:*}" "$PIN/${b##*:}" 2>/dev/null || cp "${b%%:*}" "$PIN/${b##*:}"
  done
  export ROUTER_BIN="$PIN/router" LOADGEN_BIN="$PIN/loadgen" CHAOS_PINNED=$PIN
  OWN_PIN=$PIN
  trap 'rm -rf "$OWN_PIN"' EXIT
fi

if [ "$FAULT" = all ]; then
  # Each fault in a process of its own (own vhost, own trap), then one summary.
  TOP=$(mktemp -d "$PWD/target/chaos/all.XXXXXX")
  JSON=${JSON:-target/chaos/all.json}
  rc_all=0
  start=$(date +%s)
  for f in kill broker-restart rolling-restart close-connection; do
    for attempt in 1 2 3; do
      set +e
      CHAOS_PINNED=$CHAOS_PINNED "$0" "$f" "${ARGS[@]}" --json "$TOP/$f.json"
      rc=$?
      set -e
      [ $rc -eq 75 ] || break
      log "$f interrupted by $LOCK (attempt $attempt); retrying once it is gone"
      wait_for_lock
    done
    [ $rc -eq 0 ] || rc_all=1
    [ -f "$TOP/$f.json" ] || echo "{\"fault\":\"$f\",\"verdict\":\"FAIL\",\"error\":\"no summary (exit $rc)\"}" >"$TOP/$f.json"
  done
  python3 "$JUDGE" --merge "$TOP" --json "$JSON" --seconds $(( $(date +%s) - start )) || rc_all=1
  rm -rf "$TOP"
  exit $rc_all
fi

# ---- one fault ----------------------------------------------------------------------
if [ "$SMALL" = 1 ]; then
  NODES=${NODES:-3} DEVICES=${DEVICES:-3000} RATE=${RATE:-200}
  EVENT_INTERVAL=10 CONNECT_RATE=5000 DRAIN=2 OUTAGE=10 SETTLE=3 HOLD=6 RAMP_TIMEOUT=60
  case "$FAULT" in
    kill) D_AT=8 D_DUR=30 ;;
    broker-restart) D_AT=6 D_DUR=40 ;;
    rolling-restart) D_AT=5 D_DUR=$(( 5 + NODES * 9 + 8 )) ;;
    close-connection) D_AT=6 D_DUR=24 ;;
  esac
else
  NODES=${NODES:-5} DEVICES=${DEVICES:-50000} RATE=${RATE:-500}
  EVENT_INTERVAL=60 CONNECT_RATE=10000 DRAIN=5 OUTAGE=20 SETTLE=5 HOLD=8 RAMP_TIMEOUT=180
  case "$FAULT" in
    kill) D_AT=20 D_DUR=60 ;;
    broker-restart) D_AT=20 D_DUR=75 ;;
    rolling-restart) D_AT=15 D_DUR=$(( 15 + NODES * 16 + 15 )) ;;
    close-connection) D_AT=20 D_DUR=50 ;;
  esac
fi
AT=${AT:-$D_AT} DURATION=${DURATION:-$D_DUR}
REQ_TIMEOUT_MS=5000
[ "$NODES" -ge 2 ] || { echo "chaos: --nodes must be at least 2" >&2; exit 2; }
VIA=cross DURABLE=()
if [ "$FAULT" = broker-restart ]; then VIA=owner DURABLE=(--amqp-durable-events); fi

RUN_ID=c$(date +%H%M%S)$RANDOM
DIR=$PWD/target/chaos/$FAULT-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$DIR"
# Keep the newest 24 run directories.
ls -dt "$PWD"/target/chaos/*-20[0-9][0-9][01][0-9][0-3][0-9]-*/ 2>/dev/null | tail -n +25 | xargs -r rm -rf
JSON=${JSON:-$DIR/summary.json}
EV=$DIR/events.txt
: >"$EV"
VHOST=chaos-$RUN_ID
AMQP="amqp://guest:guest@$BROKER/$VHOST"
SECRET=chaos-$RANDOM$RANDOM-0123456789abcdef0123456789abcdef
ROUTER=$ROUTER_BIN LOADGEN=$LOADGEN_BIN

PIDS=()          # router pid per node index ("" = not running)
LG=""
BROKER_STOPPED=0
VHOST_MADE=0
cleanup() {
  local rc=$?
  set +e
  if [ "$BROKER_STOPPED" = 1 ]; then
    log "starting the broker again (rabbitmqctl start_app)"
    "${RMQ[@]}" start_app >/dev/null 2>&1 || rabbitmqctl start_app >/dev/null 2>&1
    BROKER_STOPPED=0
  fi
  if [ -n "$LG" ] && kill -0 "$LG" 2>/dev/null; then
    local kids; kids=$(pgrep -P "$LG" 2>/dev/null)
    kill -TERM "$LG" $kids 2>/dev/null
  fi
  for p in "${PIDS[@]}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 1 30); do
    local alive=0
    for p in "${PIDS[@]}" $LG; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${PIDS[@]}" $LG; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null; done
  [ "$VHOST_MADE" = 1 ] && "${RMQ[@]}" delete_vhost "$VHOST" >/dev/null 2>&1
  [ -n "${OWN_PIN:-}" ] && rm -rf "$OWN_PIN"
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'rc=$?; [[ $- == *e* ]] && log "$FAULT: command failed (exit $rc) at line $LINENO: $BASH_COMMAND"' ERR

# A lock that appears mid-run stops the fault (exit 75; the trap cleans up).
check_lock() {
  if [ -n "$LOCK" ] && [ -e "$LOCK" ]; then
    log "$LOCK appeared: stopping this fault now"
    echo "lock_abort $(now_ms)" >>"$EV"
    exit 75
  fi
}
# Sleep $1 seconds, watching the lock.
nap() {
  local end=$(( $(now_ms) + ${1%.*} * 1000 ))
  while [ "$(now_ms)" -lt "$end" ]; do check_lock; sleep 0.2; done
}
api_of() { echo "127.0.0.1:$((PORT + 1 + $1))"; }
node_id() { echo "$RUN_ID-n$1"; }

start_node() {
  local i=$1
  local args=(serve --listen "127.0.0.1:$PORT" --api "$(api_of "$i")" --shards 1 --node-id "$(node_id "$i")"
              --amqp "$AMQP" --auth-secret "$SECRET" --max-connections 19000 --queue-capacity 16384
              --drain-seconds "$DRAIN")
  echo "--- start $(date +%T.%N)" >>"$DIR/router-$i.err"
  "$ROUTER" "${args[@]}" >>"$DIR/router-$i.out" 2>>"$DIR/router-$i.err" &
  PIDS[$i]=$!
}
# /readyz 200 within $2 seconds.
wait_ready() {
  local i=$1 limit=$(( $(now_ms) + $2 * 1000 ))
  while [ "$(now_ms)" -lt "$limit" ]; do
    check_lock
    kill -0 "${PIDS[$i]}" 2>/dev/null || return 1
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$(api_of "$i")/readyz")" = 200 ] && return 0
    sleep 0.2
  done
  return 1
}
metric() {  # metric NODE NAME: the sum of NAME's samples on that node (empty if unreachable)
  curl -s -m 5 "http://$(api_of "$1")/metrics" | awk -v n="$2" '{k=$1; sub(/\{.*/, "", k)} k==n {s+=$NF; f=1} END {if (f) print s+0}'
}
snapshot() {  # every running node's /metrics into $DIR/metrics-<tag>-<i>.txt
  local tag=$1 i
  for i in $(seq 0 $((NODES - 1))); do
    [ -n "${PIDS[$i]:-}" ] && kill -0 "${PIDS[$i]}" 2>/dev/null || continue
    curl -s -m 10 "http://$(api_of "$i")/metrics" >"$DIR/metrics-$tag-$i.txt" || rm -f "$DIR/metrics-$tag-$i.txt"
  done
  echo "snapshot_$tag $(now_ms)" >>"$EV"
}

# ---- set up -------------------------------------------------------------------------
wait_for_lock
(exec 3<>"/dev/tcp/${BROKER%:*}/${BROKER#*:}") 2>/dev/null || {
  log "RabbitMQ is not listening on $BROKER: rabbitmq-server -detached"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do (exec 3<>"/dev/tcp/${BROKER%:*}/${BROKER#*:}") 2>/dev/null && break; sleep 1; done
}
for p in $(seq "$PORT" $((PORT + 1 + NODES))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "chaos: port $p is in use (--port)" >&2; exit 2; fi
done
"${RMQ[@]}" add_vhost "$VHOST" >/dev/null
VHOST_MADE=1
"${RMQ[@]}" set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null

cat >"$DIR/params.json" <<EOF
{"fault":"$FAULT","small":$SMALL,"nodes":$NODES,"devices":$DEVICES,"duration":$DURATION,"at":$AT,
 "request_rate":$RATE,"request_timeout_ms":$REQ_TIMEOUT_MS,"request_via":"$VIA","event_interval":$EVENT_INTERVAL,
 "drain_seconds":$DRAIN,"outage_seconds":$OUTAGE,"settle_seconds":$SETTLE,"hold":$HOLD,"port":$PORT,
 "vhost":"$VHOST","run_id":"$RUN_ID","killed_node":0,"closed_node":1,"router_bin":"$ROUTER","loadgen_bin":"$LOADGEN"}
EOF

log "$FAULT: $DEVICES devices over $NODES nodes on 127.0.0.1:$PORT, vhost $VHOST, $RATE requests/s ($VIA), events every ${EVENT_INTERVAL}s, fault at +${AT}s of ${DURATION}s (logs: $DIR)"
for i in $(seq 0 $((NODES - 1))); do start_node "$i"; done
for i in $(seq 0 $((NODES - 1))); do
  wait_ready "$i" 60 || { echo "chaos: router node $i not ready:" >&2; tail -20 "$DIR/router-$i.err" >&2; exit 1; }
done
echo "nodes_ready $(now_ms)" >>"$EV"

APIS=""
for i in $(seq 0 $((NODES - 1))); do APIS="$APIS${APIS:+,}http://$(api_of "$i")"; done
# The plain progress lines (stderr is a file) carry the steady phase's elapsed time; each is
# stamped here on arrival, which gives when the steady phase began.
"$LOADGEN" --devices "$DEVICES" --url "ws://127.0.0.1:$PORT" --api "$APIS" --secret "$SECRET" \
  --connect-rate "$CONNECT_RATE" --ramp-timeout "$RAMP_TIMEOUT" --request-rate "$RATE" \
  --request-via "$VIA" --request-timeout-ms "$REQ_TIMEOUT_MS" --duration "$DURATION" --hold "$HOLD" \
  --event-interval "$EVENT_INTERVAL" --amqp "$AMQP" "${DURABLE[@]}" --source-ips 127.0.0.2-127.0.0.250 \
  --json "$DIR/loadgen.json" --request-log "$DIR/requests.csv" \
  >"$DIR/loadgen.out" 2> >(while IFS= read -r l; do printf '%s %s\n' "$(now_ms)" "$l"; done >"$DIR/loadgen.err") &
LG=$!
LG_LIMIT=$(( $(now_ms) + (RAMP_TIMEOUT + DURATION + HOLD + 90) * 1000 ))

# The steady phase's start: first " steady" line, minus the elapsed time it shows.
STEADY=""
while [ -z "$STEADY" ]; do
  check_lock
  kill -0 "$LG" 2>/dev/null || { echo "chaos: loadgen ended before the steady phase:" >&2; tail -20 "$DIR/loadgen.err" "$DIR/loadgen.out" >&2; exit 1; }
  [ "$(now_ms)" -lt "$LG_LIMIT" ] || { echo "chaos: no steady phase in time" >&2; exit 1; }
  line=$(grep -m1 -E '^[0-9]+ +steady ' "$DIR/loadgen.err" || true)
  if [ -n "$line" ]; then
    stamp=${line%% *}
    secs=$(sed -E 's/.* connected, ([0-9.]+)s,.*/\1/' <<<"$line")
    STEADY=$(awk -v a="$stamp" -v b="$secs" 'BEGIN {printf "%d", a - b * 1000}')
  else
    sleep 0.1
  fi
done
echo "steady_start $STEADY" >>"$EV"
log "steady phase began; fault at +${AT}s"
FAULT_AT=$(( STEADY + ${AT%.*} * 1000 ))
while [ "$(now_ms)" -lt "$FAULT_AT" ]; do check_lock; sleep 0.05; done

# ---- the fault ----------------------------------------------------------------------
case "$FAULT" in
  kill)
    echo "fault_start $(now_ms)" >>"$EV"
    kill -KILL "${PIDS[0]}"
    wait "${PIDS[0]}" 2>/dev/null || true
    echo "fault_end $(now_ms)" >>"$EV"
    PIDS[0]=""
    log "node 0 killed with SIGKILL"
    ;;
  broker-restart)
    check_lock
    echo "stop_begin $(now_ms)" >>"$EV"
    BROKER_STOPPED=1
    "${RMQ[@]}" stop_app >"$DIR/rabbitmqctl.log" 2>&1 || log "stop_app failed (see $DIR/rabbitmqctl.log)"
    echo "stop_done $(now_ms)" >>"$EV"
    log "broker stopped (stop_app); ${OUTAGE}s outage"
    end=$(( $(now_ms) + OUTAGE * 1000 ))
    while [ "$(now_ms)" -lt "$end" ]; do check_lock; sleep 0.2; done
    echo "start_begin $(now_ms)" >>"$EV"
    "${RMQ[@]}" start_app >>"$DIR/rabbitmqctl.log" 2>&1 || { log "start_app failed; retrying"; sleep 2; "${RMQ[@]}" start_app >>"$DIR/rabbitmqctl.log" 2>&1; }
    BROKER_STOPPED=0
    echo "start_done $(now_ms)" >>"$EV"
    log "broker started again (start_app)"
    ;;
  rolling-restart)
    for i in $(seq 0 $((NODES - 1))); do
      echo "term_$i $(now_ms)" >>"$EV"
      kill -TERM "${PIDS[$i]}"
      limit=$(( $(now_ms) + (DRAIN + 20) * 1000 ))
      while kill -0 "${PIDS[$i]}" 2>/dev/null && [ "$(now_ms)" -lt "$limit" ]; do check_lock; sleep 0.1; done
      if kill -0 "${PIDS[$i]}" 2>/dev/null; then
        log "node $i did not exit within $((DRAIN + 20))s of SIGTERM: SIGKILL"
        kill -KILL "${PIDS[$i]}"; echo "exit_code_$i killed" >>"$EV"
      fi
      set +e; wait "${PIDS[$i]}" 2>/dev/null; code=$?; set -e
      echo "exit_$i $(now_ms)" >>"$EV"
      grep -q "^exit_code_$i " "$EV" || echo "exit_code_$i $code" >>"$EV"
      start_node "$i"
      echo "restart_$i $(now_ms)" >>"$EV"
      if wait_ready "$i" 60; then echo "ready_$i $(now_ms)" >>"$EV"; else log "node $i not ready 60 s after its restart"; fi
      log "node $i restarted (exit $code), ready; settling ${SETTLE}s"
      nap "$SETTLE"
    done
    echo "fault_end $(now_ms)" >>"$EV"
    ;;
  close-connection)
    name="hive-router $(node_id 1) cluster"
    pid=""
    for _ in 1 2 3 4 5; do
      # (rabbitmqctl may fail while some connection is closing: retried)
      pid=$("${RMQ[@]}" list_connections -q --no-table-headers pid vhost client_properties 2>>"$DIR/rabbitmqctl.log" \
            | awk -F'\t' -v v="$VHOST" -v n="{\"connection_name\",\"$name\"}" '$2 == v && index($3, n) {print $1; exit}') || true
      [ -n "$pid" ] && break
      sleep 1
    done
    [ -n "$pid" ] || { echo "chaos: connection '$name' not listed by rabbitmqctl" >&2; exit 1; }
    echo "sessions_before $(metric 1 router_cluster_sessions_total)" >>"$EV"
    echo "fault_start $(now_ms)" >>"$EV"
    "${RMQ[@]}" close_connection "$pid" "chaos: forced close" >>"$DIR/rabbitmqctl.log" 2>&1 || log "close_connection failed (see $DIR/rabbitmqctl.log)"
    echo "fault_end $(now_ms)" >>"$EV"
    log "closed node 1's cluster connection ($pid)"
    limit=$(( $(now_ms) + 30000 ))
    while [ "$(now_ms)" -lt "$limit" ]; do
      check_lock
      s=$(metric 1 router_cluster_sessions_total)
      if [ -n "$s" ] && [ "$s" -ge 2 ]; then echo "reconnected $(now_ms)" >>"$EV"; break; fi
      sleep 0.2
    done
    ;;
esac

# ---- the rest of the run; metrics during the idle hold -------------------------------
SNAP=0
while kill -0 "$LG" 2>/dev/null; do
  check_lock
  [ "$(now_ms)" -lt "$LG_LIMIT" ] || { log "loadgen overran its time bound: stopping it"; echo "loadgen_overrun $(now_ms)" >>"$EV"; kill -TERM "$LG"; sleep 2; break; }
  if [ $SNAP = 0 ]; then
    hold=$(grep -E '^[0-9]+ +hold ' "$DIR/loadgen.err" | head -1 || true)
    if [ -n "$hold" ] && [ "$(now_ms)" -ge $(( ${hold%% *} + 2000 )) ]; then
      snapshot hold
      grep -E '^[0-9]+ +hold ' "$DIR/loadgen.err" | tail -1 | sed -E 's/^([0-9]+) +hold ([0-9]+)\/.*/hold_connected \2 \1/' >>"$EV"
      SNAP=1
    fi
  fi
  sleep 0.2
done
set +e; wait "$LG"; LG_RC=$?; set -e
LG=""
echo "loadgen_exit $LG_RC $(now_ms)" >>"$EV"
snapshot end
[ $SNAP = 1 ] || log "no hold snapshot (no 'hold' line from loadgen): judging on the end snapshot"

trap - ERR
set +e
python3 "$JUDGE" --dir "$DIR" --json "$JSON"
rc=$?
set -e
exit $rc
