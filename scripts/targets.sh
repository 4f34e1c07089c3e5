#!/usr/bin/env bash
# The performance targets of issue #7, each measured by the command the README names, one
# after the other on this machine, and printed as one table (figures and whether met).
#
#   scripts/targets.sh [--connect-runs 3] [--rounds 5] [--no-capacity] [--json FILE]
#
#   1. router RSS per idle authenticated device <= 1 KiB: `router serve --shards 2`, then
#      `--shards 1`, each with `loadgen --devices 15000 --request-rate 0 --duration 3
#      --connect-rate 8000` (the router's growth over its baseline, per device);
#   2. authenticated connects/s >= 20,000: `router serve` (2 shards) + `loadgen --devices
#      15000 --connect-rate 50000 --workers 2 --request-rate 0 --duration 0`, N runs;
#   3. event throughput >= 0.9x the bare echo: `scripts/event-throughput.sh 64 10 ROUNDS`;
#   4. ack p99 <= 2 ms on one node: `router serve --shards 1` + `loadgen --devices 15000
#      --connect-rate 8000 --request-rate 2000 --duration 15 --realtime`;
#   5. ack p99 <= 2 ms at 200,000 devices: `scripts/capacity.sh --devices 200000
#      --duration 20` (about 2.5 minutes; --no-capacity skips it).
#
# Takes ~5 minutes with the capacity run; each run's report, output and router log are
# kept in target/targets/ (the capacity run's as capacity.json and capacity.log). Refuses
# to start while anything listens on its ports: the router listens with SO_REUSEPORT, so a
# leftover router on the same port would silently take half the connections and the
# figures would be wrong. Exit code 0 whether or not the targets are met (the table says);
# 1 when a run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECT_RUNS=3 ROUNDS=5 CAPACITY=1 JSON=
while [ $# -gt 0 ]; do
  case "$1" in
    --connect-runs) CONNECT_RUNS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --no-capacity) CAPACITY=0; shift ;;
    --json) JSON=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WS=9960 API=9961
for p in $WS $API 9800 9900 9901 9910; do
  if ss -Hltn "sport = :$p" | grep -q .; then
    echo "targets.sh: something already listens on port $p (a leftover router?); stop it first" >&2
    ss -Hltnp "sport = :$p" >&2 || true
    exit 1
  fi
done
cargo build --release --quiet -p router -p loadgen
# Every run's report (loadgen --json), log and router log stay here for a look afterwards.
OUT=target/targets
rm -rf "$OUT"; mkdir -p "$OUT"
ROUTER=; trap '[ -n "$ROUTER" ] && kill "$ROUTER" 2>/dev/null' EXIT

# One router, one loadgen run against it, the router stopped; the report JSON in $OUT/$1.
run() {
  local name=$1 shards=$2; shift 2
  target/release/router serve --dev --listen 127.0.0.1:$WS --api 127.0.0.1:$API --shards "$shards" \
    >"$OUT/$name.router.log" 2>&1 &
  ROUTER=$!
  sleep 0.5
  if ! target/release/loadgen --url ws://127.0.0.1:$WS --api http://127.0.0.1:$API --quiet \
      --json "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1; then
    echo "targets.sh: loadgen failed in $name:" >&2; tail -20 "$OUT/$name.log" >&2; exit 1
  fi
  kill "$ROUTER" 2>/dev/null || true; wait "$ROUTER" 2>/dev/null || true; ROUTER=
}

echo "== 1. RSS per idle device" >&2
run rss2 2 --devices 15000 --request-rate 0 --duration 3 --connect-rate 8000
run rss1 1 --devices 15000 --request-rate 0 --duration 3 --connect-rate 8000
echo "== 2. connects/s, $CONNECT_RUNS runs" >&2
for ((k = 1; k <= CONNECT_RUNS; k++)); do
  run "cps$k" 2 --devices 15000 --connect-rate 50000 --workers 2 --request-rate 0 --duration 0
done
echo "== 3. event throughput, $ROUNDS rounds" >&2
scripts/event-throughput.sh 64 10 "$ROUNDS" >"$OUT/events.log" 2>&1 \
  || { echo "targets.sh: event-throughput.sh failed:" >&2; tail -20 "$OUT/events.log" >&2; exit 1; }
echo "== 4. ack latency, one node" >&2
run ack 1 --devices 15000 --connect-rate 8000 --request-rate 2000 --duration 15 --realtime
if [ "$CAPACITY" = 1 ]; then
  echo "== 5. 200,000 devices" >&2
  scripts/capacity.sh --devices 200000 --duration 20 --json "$OUT/capacity.json" \
    >"$OUT/capacity.log" 2>&1 \
    || { echo "targets.sh: capacity.sh failed:" >&2; tail -20 "$OUT/capacity.log" >&2; exit 1; }
fi

OUT=$OUT CONNECT_RUNS=$CONNECT_RUNS CAPACITY=$CAPACITY JSON=$JSON python3 - <<'EOF'
import json, os, re
out = os.environ["OUT"]
def rep(name):
    return json.load(open(f"{out}/{name}.json"))
def whole(r):
    d, q = r["devices"], r["requests"]
    return d["connected"] == d["target"] and q["errors"] == 0 and q["acked"] == q["sent"]
rows, summary = [], {}
rss = [rep("rss2")["router"]["rss_per_device_delta_bytes"], rep("rss1")["router"]["rss_per_device_delta_bytes"]]
ok = max(rss) <= 1024 and whole(rep("rss2")) and whole(rep("rss1"))
rows.append(("router RSS per idle device <= 1 KiB (2 shards / 1 shard)", f"{rss[0]:,.0f} B / {rss[1]:,.0f} B", ok))
summary["rss_per_device_bytes"] = {"shards2": rss[0], "shards1": rss[1], "met": ok}
cps = [rep(f"cps{k}") for k in range(1, int(os.environ["CONNECT_RUNS"]) + 1)]
rates = [r["devices"]["connects_per_sec"] for r in cps]
ok = all(x >= 20000 for x in rates) and all(whole(r) for r in cps)
rows.append(("connects/s >= 20,000 (every run)", " / ".join(f"{x:,.0f}" for x in rates), ok))
summary["connects_per_sec"] = {"runs": rates, "met": ok}
ev = open(f"{out}/events.log").read()
m = re.search(r"= ([0-9.]+)\s*$", ev.strip().splitlines()[-1])
ratio = float(m.group(1)) if m else float("nan")
rows.append(("event throughput >= 0.9x the bare echo (ratio of medians)", f"{ratio:.2f}", ratio >= 0.9))
summary["event_throughput_ratio"] = {"ratio": ratio, "met": ratio >= 0.9}
def ack(r):
    a, l = r["latency_ms"]["ack"], r["latency_ms"]["late"]
    return a, l, a["p99"] <= 2.0 and whole(r)
a, l, ok = ack(rep("ack"))
rows.append(("ack p99 <= 2 ms, one node, 15,000 devices, 2,000 req/s (p50 / p99 / p99.9; late p99)",
             f"{a['p50']:.3f} / {a['p99']:.3f} / {a['p999']:.3f} ms; {l['p99']:.3f} ms", ok))
summary["ack_one_node_ms"] = {"p50": a["p50"], "p99": a["p99"], "p999": a["p999"], "late_p99": l["p99"], "met": ok}
if os.environ["CAPACITY"] == "1":
    r = rep("capacity")
    a, l, ok = ack(r)
    rows.append(("ack p99 <= 2 ms at 200,000 devices (p50 / p99 / p99.9; connected)",
                 f"{a['p50']:.3f} / {a['p99']:.3f} / {a['p999']:.3f} ms; {r['devices']['connected']:,}", ok))
    summary["ack_200k_ms"] = {"p50": a["p50"], "p99": a["p99"], "p999": a["p999"], "connected": r["devices"]["connected"], "met": ok}
print("| target | figures | met? |\n|---|---|---|")
for t, f, ok in rows:
    print(f"| {t} | {f} | {'yes' if ok else 'no'} |")
if os.environ["JSON"]:
    json.dump(summary, open(os.environ["JSON"], "w"), indent=2)
EOF
