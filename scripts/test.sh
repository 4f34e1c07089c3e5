#!/usr/bin/env bash
# The test command (README): formatting, lints, every test, independent clients.
# Runs from a fresh clone: installs what it needs under target/ and starts RabbitMQ if down.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

ensure_rabbitmq() {
  if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then return 0; fi
  step "starting RabbitMQ"
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && return 0
    sleep 1
  done
  echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2
  return 1
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "fuzz targets build (cargo check; fuzz/ is its own workspace, run by fuzz/run.sh)"
cargo check --quiet --manifest-path fuzz/Cargo.toml --bins

ensure_haproxy() {
  command -v haproxy >/dev/null 2>&1 && return 0
  step "installing HAProxy (Debian package; the PROXY protocol test runs it in front of the router)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
  fi
  command -v haproxy >/dev/null 2>&1
}

step "cargo test"
ensure_rabbitmq
ensure_haproxy
# The HAProxy test may not skip itself here.
HIVE_REQUIRE_HAPROXY=1 cargo test --workspace --quiet

step "a 3-node RabbitMQ cluster: kill -9 the broker node under load (failover, quorum queues, nothing lost)"
scripts/rabbitmq-cluster.sh stop >/dev/null 2>&1 || true
trap 'scripts/rabbitmq-cluster.sh stop >/dev/null 2>&1 || true' EXIT
scripts/rabbitmq-cluster.sh start 2>/dev/null
HIVE_RMQ_CLUSTER_URLS=$(scripts/rabbitmq-cluster.sh urls) HIVE_REQUIRE_RMQ_CLUSTER=1 \
  cargo test --quiet -p router --test broker_cluster -- --nocapture
scripts/rabbitmq-cluster.sh stop

step "router and loadgen binaries"
cargo build --quiet -p router -p loadgen
ROUTER="$PWD/target/debug/router"
LOADGEN="$PWD/target/debug/loadgen"

step "independent client: Python websockets"
VENV=target/pyenv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import websockets' 2>/dev/null || "$VENV/bin/pip" install --quiet 'websockets>=13,<16'
"$VENV/bin/python" interop/python/test_hive_ws.py "$ROUTER"

step "independent client: Hivekit protocol (Python websockets; every flow a device app uses)"
"$VENV/bin/python" interop/python/test_hivekit.py "$ROUTER"

step "independent NervesHub device: shared-secret auth and vsn 3.0.0 MessagePack (Python websockets, msgpack, hashlib)"
"$VENV/bin/python" -c 'import msgpack' 2>/dev/null || "$VENV/bin/pip" install --quiet 'msgpack>=1,<2'
"$VENV/bin/python" interop/python/test_nerveshub.py "$ROUTER"

step "independent token minting: PyJWT (cryptography) tokens of every algorithm against PEM keys and an HTTPS JWKS (openssl CA), rotation, refusals"
"$VENV/bin/python" -c 'import jwt, cryptography' 2>/dev/null || "$VENV/bin/pip" install --quiet 'pyjwt[crypto]>=2.8,<3'
"$VENV/bin/python" interop/python/test_jwt_keys.py "$ROUTER"

step "WebSocket conformance: the Autobahn TestSuite against the router (/conformance/echo; sections 12-13 with --permessage-deflate, their 128 KiB cases left out here: scripts/autobahn.sh runs them) and loadgen's client (Python 2.7; fails without it)"
AUTOBAHN_QUICK=1 ROUTER_BIN="$ROUTER" LOADGEN_BIN="$LOADGEN" scripts/autobahn.sh all

step "independent AMQP consumer: Python pika reads hive.events (router --amqp)"
ensure_rabbitmq
"$VENV/bin/python" -c 'import pika' 2>/dev/null || "$VENV/bin/pip" install --quiet 'pika>=1.3,<2'
"$VENV/bin/python" interop/python/test_amqp_events.py "$ROUTER"

step "independent TLS client: Python ssl + websockets, certificates from openssl"
"$VENV/bin/python" interop/python/test_tls.py "$ROUTER"

step "a real Prometheus (Debian package) scrapes a router under load; every dashboard expression evaluated"
scripts/prometheus-check.sh "$ROUTER" "$LOADGEN"

step "loadgen against the router: small fleet, mixed protocols, and --no-ack timeouts"
"$VENV/bin/python" interop/python/check_loadgen.py "$ROUTER" "$PWD/target/debug/loadgen" 3000

step "loadgen in CI pipelines: --assert, compare, --html, --metrics, --scenario against the router"
"$VENV/bin/python" interop/python/check_loadgen_ci.py "$ROUTER" "$PWD/target/debug/loadgen"

step "chaos: kill -9, broker restart, rolling restart, closed cluster connection under load (3 nodes, 3,000 devices)"
ensure_rabbitmq
ROUTER_BIN="$ROUTER" LOADGEN_BIN="$PWD/target/debug/loadgen" scripts/chaos.sh all --small

step "independent client: the official Phoenix JS client (npm phoenix + ws)"
(cd interop/js && npm ci --no-audit --no-fund --loglevel=error)
node interop/js/phoenix_client.mjs "$ROUTER"

step "performance regression check (instruction counts under callgrind vs benches/baseline.json)"
scripts/perf-check.sh --quick

step "all tests passed"
