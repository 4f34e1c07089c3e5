#!/usr/bin/env bash
# io_uring (tokio-uring) vs epoll for shard-style socket reads, measured.
#
#   scripts/uring-vs-epoll.sh [--idle N] [--hold SECS] [--conns N] [--secs SECS]
#                             [--rate-conns N] [--rate LINES_PER_S] [--rate-secs SECS]
#                             [--no-uring64k] [--no-pin]
#
# Builds the standalone crate benches/uring/ (not a workspace member; CI never builds it),
# then for each server:
#   1. idle memory: VmRSS before, N idle connections (default 15,000), VmRSS after;
#      prints bytes per idle connection;
#   2. throughput: 64 connections writing 64-byte lines as fast as possible for 5 s;
#      lines/s counted by the server, plus the server's CPU seconds over the run;
#   3. many small messages (the router's regime): 10,000 connections x 5 lines/s each
#      for 10 s, one 64-byte write per line; server CPU microseconds per line received.
# Servers:
#   epoll      one thread, raw level-triggered epoll, ONE shared 64 KiB read buffer
#   uring      tokio-uring, one thread, a task per connection, 4 KiB owned buffer per pending read
#   uring64k   same with 64 KiB buffers (the same read size as epoll; idle cost 16x)
# With taskset available the server is pinned to CPU 0 and the client to CPU 1 (--no-pin to
# turn off). The machine is shared: the load average is printed with the table.
# Everything started here is stopped on exit.
set -euo pipefail

IDLE=15000; HOLD=60; CONNS=64; SECS=5; UR64=1; PIN=1
RCONNS=10000; RATE=5; RSECS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --idle) IDLE=$2; shift 2;;
    --hold) HOLD=$2; shift 2;;
    --conns) CONNS=$2; shift 2;;
    --secs) SECS=$2; shift 2;;
    --rate-conns) RCONNS=$2; shift 2;;
    --rate) RATE=$2; shift 2;;
    --rate-secs) RSECS=$2; shift 2;;
    --no-uring64k) UR64=0; shift;;
    --no-pin) PIN=0; shift;;
    *) echo "unknown arg $1" >&2; exit 2;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --manifest-path benches/uring/Cargo.toml >&2
BIN="$ROOT/benches/uring/target/release"
SRV=(); CLI=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  SRV=(taskset -c 0); CLI=(taskset -c 1)
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && wait "$p" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

rss_bytes() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$1/status"; }
# CPU nanoseconds of all the process's threads (scheduler runtime, not tick sampling)
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%d", s}'; }
last_stat() { # $1 = stats file, $2 = field name
  grep '^stats ' "$1" | tail -1 | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k {print $2}'
}
wait_for() { # $1 = seconds, rest = command that must succeed
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@"; do
    [ "$(date +%s)" -ge "$deadline" ] && { echo "timeout waiting for: $*" >&2; return 1; }
    sleep 0.1
  done
}
has_stats() { grep -q '^stats ' "$1" 2>/dev/null; }
conns_at_least() { [ "$(last_stat "$1" conns)" -ge "$2" ] 2>/dev/null; }
conns_at_most() { [ "$(last_stat "$1" conns)" -le "$2" ] 2>/dev/null; }
client_connected() { grep -q '^connected ' "$1" 2>/dev/null; }
HZ=1000000000  # cpu_ns units

declare -A R_RSS0 R_RSS1 R_IDLE R_BPC R_LPS R_CPU R_LPCPU R_SENT R_RLINES R_RCPU R_RUS R_RLPS
run_one() { # $1 = label, $2 = port, rest = server command
  local label=$1 port=$2; shift 2
  local out="$TMP/$label.out"
  "${SRV[@]}" "$@" >"$out" 2>"$TMP/$label.err" &
  local spid=$!; PIDS+=("$spid")
  wait_for 10 has_stats "$out"
  sleep 1
  local rss0; rss0=$(rss_bytes "$spid")

  # 1. idle connections
  local cout="$TMP/$label.idle.client"
  "${CLI[@]}" "$BIN/client" "127.0.0.1:$port" "$IDLE" "$HOLD" 0 >"$cout" 2>&1 &
  local cpid=$!; PIDS+=("$cpid")
  wait_for 120 client_connected "$cout"
  local got; got=$(awk '/^connected/ {print $2}' "$cout")
  wait_for 30 conns_at_least "$out" "$got"
  sleep 2
  local rss1; rss1=$(rss_bytes "$spid")
  local idle; idle=$(last_stat "$out" conns)
  kill "$cpid" 2>/dev/null || true; wait "$cpid" 2>/dev/null || true
  wait_for 60 conns_at_most "$out" 0
  sleep 1

  # 2. throughput
  local l0 c0 l1 c1
  l0=$(last_stat "$out" lines); c0=$(cpu_ns "$spid")
  local tout="$TMP/$label.tput.client"
  "${CLI[@]}" "$BIN/client" "127.0.0.1:$port" "$CONNS" "$SECS" max >"$tout" 2>&1
  c1=$(cpu_ns "$spid")
  sleep 0.6
  l1=$(last_stat "$out" lines)
  local el; el=$(awk '/^sent/ {print $5}' "$tout")
  local sent; sent=$(awk '/^sent/ {print $2}' "$tout")
  wait_for 60 conns_at_most "$out" 0
  sleep 1

  # 3. many connections, small messages at a fixed rate
  local rl0 rc0 rl1 rc1
  local rout="$TMP/$label.rate.client"
  "${CLI[@]}" "$BIN/client" "127.0.0.1:$port" "$RCONNS" "$RSECS" "$RATE" >"$rout" 2>&1 &
  local rpid=$!; PIDS+=("$rpid")
  wait_for 120 client_connected "$rout"
  rl0=$(last_stat "$out" lines); rc0=$(cpu_ns "$spid")
  wait "$rpid" 2>/dev/null || true
  rc1=$(cpu_ns "$spid")
  sleep 0.6
  rl1=$(last_stat "$out" lines)
  local rsent; rsent=$(awk '/^sent/ {print $2}' "$rout")
  local rel; rel=$(awk '/^sent/ {print $5}' "$rout")

  kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true

  R_RSS0[$label]=$rss0; R_RSS1[$label]=$rss1; R_IDLE[$label]=$idle
  R_BPC[$label]=$(( (rss1 - rss0) / idle ))
  R_LPS[$label]=$(awk -v a="$l0" -v b="$l1" -v t="$el" 'BEGIN {printf "%.0f", (b - a) / t}')
  R_CPU[$label]=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" 'BEGIN {printf "%.2f", (b - a) / hz}')
  R_LPCPU[$label]=$(awk -v a="$l0" -v b="$l1" -v c0="$c0" -v c1="$c1" -v hz="$HZ" \
    'BEGIN {c = (c1 - c0) / hz; if (c > 0) printf "%.0f", (b - a) / c; else print "n/a"}')
  R_SENT[$label]=$sent
  R_RLINES[$label]=$((rl1 - rl0))
  R_RCPU[$label]=$(awk -v a="$rc0" -v b="$rc1" -v hz="$HZ" 'BEGIN {printf "%.2f", (b - a) / hz}')
  R_RUS[$label]=$(awk -v a="$rc0" -v b="$rc1" -v hz="$HZ" -v n="$((rl1 - rl0))" \
    'BEGIN {if (n > 0) printf "%.2f", (b - a) / hz * 1e6 / n; else print "n/a"}')
  R_RLPS[$label]=$(awk -v n="$((rl1 - rl0))" -v t="$rel" 'BEGIN {printf "%.0f", n / t}')
  echo "$label: idle $idle conns, RSS $rss0 -> $rss1 B; throughput $((l1 - l0)) lines in $el s (client sent $sent); rate: $((rl1 - rl0)) lines received of $rsent sent in $rel s" >&2
}

LABELS=(epoll uring)
run_one epoll 9201 "$BIN/epoll_server" 127.0.0.1:9201
run_one uring 9202 "$BIN/uring_server" 127.0.0.1:9202 4096
if [ "$UR64" = 1 ]; then
  LABELS+=(uring64k)
  run_one uring64k 9203 "$BIN/uring_server" 127.0.0.1:9203 65536
fi

echo
echo "idle: $IDLE connections; throughput: $CONNS connections x 64-byte lines, as fast as possible, ${SECS} s"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); pinning: ${SRV[*]:-none} / ${CLI[*]:-none}"
echo "(2-core machine shared by server and client; server CPU = its threads' scheduler runtime during the throughput run)"
echo
printf '| %-9s | %12s | %12s | %11s | %12s | %12s | %14s |\n' server "RSS before" "RSS after" "B/idle conn" "lines/s" "server CPU s" "lines/CPU-s"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ----------- -------------- -------------- ------------- -------------- -------------- ----------------
for l in "${LABELS[@]}"; do
  printf '| %-9s | %12s | %12s | %11s | %12s | %12s | %14s |\n' "$l" "${R_RSS0[$l]}" "${R_RSS1[$l]}" "${R_BPC[$l]}" "${R_LPS[$l]}" "${R_CPU[$l]}" "${R_LPCPU[$l]}"
done

echo
echo "many small messages: $RCONNS connections x $RATE lines/s x ${RSECS} s, one 64-byte write per line"
echo
printf '| %-9s | %12s | %12s | %12s | %12s |\n' server "lines recv" "lines/s" "server CPU s" "CPU us/line"
printf '|%s|%s|%s|%s|%s|\n' ----------- -------------- -------------- -------------- --------------
for l in "${LABELS[@]}"; do
  printf '| %-9s | %12s | %12s | %12s | %12s |\n' "$l" "${R_RLINES[$l]}" "${R_RLPS[$l]}" "${R_RCPU[$l]}" "${R_RUS[$l]}"
done
