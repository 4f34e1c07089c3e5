#!/usr/bin/env bash
# WebSocket conformance: the Autobahn TestSuite (autobahntestsuite 0.8.2, Python 2.7)
# against the router's WebSocket code and loadgen's.
#
#   scripts/autobahn.sh [all|router|loadgen]      (default: all)
#
# router:  `wstest -m fuzzingclient` against `router serve --websocket-conformance-echo`
#          (/conformance/echo, a token in ?token=): sections 1-7, 9 and 10 without
#          permessage-deflate, then 12 and 13 with --permessage-deflate (without their
#          128 KiB cases when AUTOBAHN_QUICK=1, as scripts/test.sh runs it).
# loadgen: `wstest -m fuzzingserver`, driven by `loadgen autobahn-client` (loadgen's own
#          ws.rs): sections 1-7, 9 and 10.
#
# Every case must be OK, INFORMATIONAL, or NON-STRICT where scripts/autobahn_judge.py
# says why; anything else (FAILED, WRONG CODE, UNCLEAN, an undocumented NON-STRICT, a
# case that did not run) fails the script. Reports: target/autobahn/<agent>/index.html,
# and a per-section table in target/autobahn/summary.md.
#
# The suite needs Python 2.7 (found as $AUTOBAHN_PYTHON2, python2.7 on PATH, or under
# ~/.pyenv/versions/2.7*). It is installed with pinned versions
# (scripts/autobahn-requirements.txt) into target/autobahn-venv. Without Python 2.7 this
# script fails, loudly, unless AUTOBAHN_ALLOW_SKIP=1 (then it says so and exits 0).
#
# Binaries: $ROUTER_BIN and $LOADGEN_BIN, else target/debug/{router,loadgen} (built if
# missing, honouring CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHAT=${1:-all}
case "$WHAT" in all | router | loadgen) ;; *)
  echo "usage: scripts/autobahn.sh [all|router|loadgen]" >&2
  exit 2
  ;;
esac

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$ROOT/target/autobahn
VENV=$ROOT/target/autobahn-venv
mkdir -p "$OUT"

loud() {
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!!! %s\n' "$@" >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
}

find_python2() {
  local c
  for c in "${AUTOBAHN_PYTHON2:-}" "$(command -v python2.7 2>/dev/null || true)" \
    "$HOME"/.pyenv/versions/2.7*/bin/python /root/.pyenv/versions/2.7*/bin/python; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

# The suite, in its own virtualenv under target/ (virtualenv itself from PyPI into
# target/autobahn-bootstrap: the interpreter's site-packages stay untouched).
ensure_suite() {
  # Installed already, from these very pins.
  if [ -x "$VENV/bin/wstest" ] && cmp -s scripts/autobahn-requirements.txt "$VENV/requirements.txt"; then
    return 0
  fi
  local py
  if ! py=$(find_python2); then
    loud "Autobahn TestSuite NOT RUN: no Python 2.7 on this machine" \
      "(set AUTOBAHN_PYTHON2, or install python2.7; the suite runs on nothing else)."
    if [ "${AUTOBAHN_ALLOW_SKIP:-}" = 1 ]; then
      loud "AUTOBAHN_ALLOW_SKIP=1: skipping the WebSocket conformance step."
      exit 0
    fi
    exit 1
  fi
  echo "installing autobahntestsuite 0.8.2 with $py into target/autobahn-venv"
  rm -rf "$VENV"
  "$py" -m pip install --quiet --disable-pip-version-check --target "$ROOT/target/autobahn-bootstrap" 'virtualenv<20.22' 2>&1 |
    grep -v DEPRECATION || true
  PYTHONPATH="$ROOT/target/autobahn-bootstrap" "$py" -m virtualenv --quiet "$VENV"
  "$VENV/bin/pip" install --quiet -r scripts/autobahn-requirements.txt 2>&1 | grep -v DEPRECATION || true
  "$VENV/bin/python" -c 'import autobahntestsuite, wsaccel' 2>/dev/null || {
    loud "installing the Autobahn TestSuite failed"
    exit 1
  }
  cp scripts/autobahn-requirements.txt "$VENV/requirements.txt"
}

binary() { # name -> path
  local var=$1 name=$2
  if [ -n "${!var:-}" ]; then
    echo "${!var}"
    return
  fi
  if [ ! -x "$TARGET/debug/$name" ]; then
    cargo build --quiet -p "$name" >&2
  fi
  echo "$TARGET/debug/$name"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # port seconds
  local i
  for i in $(seq 1 $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after $2 s" >&2
  return 1
}

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# The suite prints a warning for its Python 2 cryptography on every start. (Run with
# exec in a subshell: the pid kept is the suite's own.)
export PYTHONWARNINGS=ignore

CASES_SERVER='["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]'
# AUTOBAHN_QUICK=1 (scripts/test.sh): sections 12 and 13 without their 128 KiB cases
# (N.M.10 and N.M.15-18: 1,000 messages of 128 KiB each, most of the sections' time, spent
# in the suite's Python). Every subsection, every offer, and messages up to 64 KiB whole
# and in fragments still run.
DEFLATE_128K='["12.*.10", "12.*.15", "12.*.16", "12.*.17", "12.*.18", "13.*.10", "13.*.15", "13.*.16", "13.*.17", "13.*.18"]'

# The router, its conformance echo on, with limits raised so that section 9's 16 MiB
# messages and 4 MiB messages in 64-byte fragments (65,537 frames) are echoed (--max-frame,
# --max-fragments, --max-outbound, --device-rate/--device-burst); every other setting
# as deployed.
start_router() { # port extra-args... ; prints the pid
  local port=$1
  shift
  env -u ROUTER_AUTH_SECRET "$ROUTER" serve --listen "127.0.0.1:$port" --api "127.0.0.1:$(free_port)" \
    --auth-secret-file "$OUT/secret" --websocket-conformance-echo \
    --max-frame 16777216 --max-fragments 100000 --max-outbound 67108864 \
    --device-rate 1000000 --device-burst 1000000 "$@" \
    >"$OUT/router-$port.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port" 20
}

# One fuzzingclient run: agent name, report directory, port, cases and cases left out
# (JSON lists).
fuzz_router() {
  local agent=$1 dir=$2 port=$3 cases=$4 exclude=${5:-[]}
  rm -rf "${OUT:?}/$dir"
  cat >"$OUT/$dir.json" <<EOF
{
  "options": {"failByDrop": false},
  "outdir": "$OUT/$dir",
  "servers": [{"agent": "$agent", "url": "ws://127.0.0.1:$port/conformance/echo?token=$TOKEN"}],
  "cases": $cases,
  "exclude-cases": $exclude,
  "exclude-agent-cases": {}
}
EOF
  (cd "$OUT" && exec "$VENV/bin/wstest" -m fuzzingclient -s "$OUT/$dir.json") >"$OUT/$dir.log" 2>&1 || {
    tail -20 "$OUT/$dir.log"
    loud "wstest fuzzingclient failed ($dir)"
    return 1
  }
}

run_router() {
  ROUTER=$(binary ROUTER_BIN router)
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$OUT/secret"
  TOKEN=$(ROUTER_AUTH_SECRET=$(cat "$OUT/secret") "$ROUTER" token \
    --device 00000000-0000-4000-8000-00000000a0b1 --account 00000000-0000-4000-8000-00000000a0b2 --ttl 7200)
  local p1 p2 t0
  p1=$(free_port)
  p2=$(free_port)
  start_router "$p1"
  start_router "$p2" --permessage-deflate
  echo "== Autobahn fuzzingclient -> router: $CASES_SERVER"
  t0=$SECONDS
  fuzz_router router router "$p1" "$CASES_SERVER"
  echo "   $((SECONDS - t0)) s"
  # Sections 12 and 13 (the suite's slowest: its Python compresses and inflates 1,000
  # messages of up to 128 KiB per case) side by side, one suite process each.
  local exclude='[]'
  if [ "${AUTOBAHN_QUICK:-}" = 1 ]; then
    exclude=$DEFLATE_128K
  fi
  echo "== Autobahn fuzzingclient -> router --permessage-deflate: [\"12.*\"] and [\"13.*\"] side by side; left out: $exclude"
  t0=$SECONDS
  fuzz_router router-deflate router-deflate-12 "$p2" '["12.*"]' "$exclude" &
  local j12=$!
  fuzz_router router-deflate router-deflate-13 "$p2" '["13.*"]' "$exclude" &
  local j13=$!
  local failed=0
  wait "$j12" || failed=1
  wait "$j13" || failed=1
  [ "$failed" = 0 ] || exit 1
  echo "   $((SECONDS - t0)) s"
}

run_loadgen() {
  LOADGEN=$(binary LOADGEN_BIN loadgen)
  local port
  port=$(free_port)
  rm -rf "${OUT:?}/loadgen"
  cat >"$OUT/loadgen-server.json" <<EOF
{
  "url": "ws://127.0.0.1:$port",
  "options": {"failByDrop": false},
  "outdir": "$OUT/loadgen",
  "webport": 0,
  "cases": $CASES_SERVER,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
  echo "== Autobahn fuzzingserver <- loadgen autobahn-client: $CASES_SERVER"
  (cd "$OUT" && exec "$VENV/bin/wstest" -m fuzzingserver -s "$OUT/loadgen-server.json") >"$OUT/loadgen-server.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port" 60
  local t0=$SECONDS
  "$LOADGEN" autobahn-client --url "ws://127.0.0.1:$port" --agent loadgen || {
    loud "loadgen autobahn-client failed"
    exit 1
  }
  echo "   $((SECONDS - t0)) s"
}

ensure_suite
T0=$SECONDS
AGENTS=()
if [ "$WHAT" = all ] || [ "$WHAT" = router ]; then
  run_router
  AGENTS+=("router=$OUT/router/index.json"
    "router-deflate=$OUT/router-deflate-12/index.json" "router-deflate=$OUT/router-deflate-13/index.json")
fi
if [ "$WHAT" = all ] || [ "$WHAT" = loadgen ]; then
  run_loadgen
  AGENTS+=("loadgen=$OUT/loadgen/index.json")
fi
cleanup
PIDS=()
echo "Autobahn TestSuite: $((SECONDS - T0)) s; reports in target/autobahn/*/index.html"
python3 scripts/autobahn_judge.py --summary "$OUT/summary.md" "${AGENTS[@]}"
