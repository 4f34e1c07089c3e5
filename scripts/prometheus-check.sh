#!/usr/bin/env bash
# A real Prometheus (Debian's package) scrapes a real router under a little load and a real
# loadgen (`--metrics`, its own devices and requests against that router), both jobs as
# grafana/prometheus.yml has them, and every PromQL expression of grafana/dashboards/*.json
# (the loadgen row's too) is evaluated through its HTTP API: each must parse and return at
# least one series (and a non-zero value where the load exercises what it counts).
# One line per expression: OK / EMPTY / ZERO / ERROR / MISSING.
#   scripts/prometheus-check.sh [ROUTER_BIN [LOADGEN_BIN]]
#     (defaults target/debug/router and target/debug/loadgen; builds nothing)
# Needs target/pyenv (Python with websockets), as scripts/test.sh creates it.
# Everything it starts (router, loadgen, Prometheus, load) listens on and talks to 127.0.0.1
# only, in a temporary directory, and is stopped on exit; about 35 s once Prometheus is installed.
# Prometheus's own Debian service (/etc/init.d/prometheus, :9090, /var/lib/prometheus) is
# neither started nor stopped nor used here: our instance has its own port and data dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER=${1:-target/debug/router}
[ -x "$ROUTER" ] || { echo "no router binary at $ROUTER (cargo build -p router)" >&2; exit 2; }
LOADGEN=${2:-target/debug/loadgen}
[ -x "$LOADGEN" ] || { echo "no loadgen binary at $LOADGEN (cargo build -p loadgen)" >&2; exit 2; }
PY=target/pyenv/bin/python
[ -x "$PY" ] || { echo "no $PY: scripts/test.sh creates it (python3 -m venv target/pyenv; pip install websockets)" >&2; exit 2; }

ensure_prometheus() {
  command -v prometheus >/dev/null 2>&1 && return 0
  echo "== installing Prometheus (Debian package; only its binary is used, not its service)"
  # The package's postinst may start its SysV service (invoke-rc.d) where policy-rc.d
  # allows it; that instance (if any) is left alone: ours uses its own port and data dir.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  fi
  command -v prometheus >/dev/null 2>&1
}

ensure_prometheus
# Bounded: the check itself stops after about 45 s; this is the backstop.
exec timeout -k 5 90 "$PY" interop/python/check_prometheus.py "$ROUTER" "$(command -v prometheus)" "$LOADGEN"
