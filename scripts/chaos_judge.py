#!/usr/bin/env python3
"""Judge one scripts/chaos.sh fault run, or merge the summaries of `chaos.sh all`.

    chaos_judge.py --dir RUN_DIR --json OUT      one fault: table, verdicts, JSON; exit 1 on FAIL
    chaos_judge.py --merge DIR --json OUT        all faults: one table, one JSON; exit 1 on FAIL

RUN_DIR holds what chaos.sh collected: params.json, events.txt (`name unix_ms` lines: the
steady phase's start, the fault's moments), loadgen.json (the report, with its per-second
`timeline`), requests.csv (loadgen --request-log: `due_ms,node,latency_us,late_us,outcome`,
due time from the start of the steady phase, node = index in --api = router node index),
metrics-hold-<i>.txt (each running node's /metrics during loadgen's idle hold, the fleet
still connected) and metrics-end-<i>.txt (after loadgen exited).

Time: every moment is unix ms on this host's clock. A request is placed by its due time
(steady start + due_ms); a timeline second t covers [start + t s, start + t+1 s) of the
ramp's start (`timeline_start_unix_ms`), its `connected` is sampled at its end, its
request counts are by due time. Standard library only.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import sys

OUTCOMES = ["acked", "timeout", "offline", "http_error", "transport_error"]


def read_events(path):
    ev = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                ev[parts[0]] = parts[1:] if len(parts) > 2 else parts[1]
    return ev


def read_metrics(path):
    """{name: sum over label sets}, and {name{labels}: value}."""
    sums, full = {}, {}
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            key, _, val = line.rstrip().rpartition(" ")
            try:
                v = float(val)
            except ValueError:
                continue
            name = re.split(r"[{ ]", key, 1)[0]
            sums[name] = sums.get(name, 0.0) + v
            full[key] = v
    return sums, full


def node_metrics(d, tag, nodes):
    out = {}
    for i in range(nodes):
        p = os.path.join(d, f"metrics-{tag}-{i}.txt")
        if os.path.exists(p) and os.path.getsize(p) > 0:
            out[i] = read_metrics(p)
    return out


def read_requests(path, steady_ms):
    reqs = []
    if not os.path.exists(path):
        return reqs
    with open(path) as f:
        for row in csv.DictReader(f):
            reqs.append(
                {
                    "due": steady_ms + float(row["due_ms"]),
                    "node": int(row["node"]),
                    "outcome": row["outcome"],
                    "latency_ms": int(row["latency_us"]) / 1000.0,
                }
            )
    return reqs


def count(reqs):
    c = {k: 0 for k in ["sent"] + OUTCOMES}
    for r in reqs:
        c["sent"] += 1
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


def not_acked(c):
    return c["sent"] - c["acked"]


class Judge:
    def __init__(self, d):
        self.d = d
        self.p = json.load(open(os.path.join(d, "params.json")))
        self.ev = read_events(os.path.join(d, "events.txt"))
        lg = os.path.join(d, "loadgen.json")
        self.lg = json.load(open(lg)) if os.path.exists(lg) else None
        self.steady = int(self.ev["steady_start"])
        self.reqs = read_requests(os.path.join(d, "requests.csv"), self.steady)
        n = self.p["nodes"]
        self.hold = node_metrics(d, "hold", n)
        self.end = node_metrics(d, "end", n)
        self.criteria = []
        self.phases = []  # (label, counts, api-group label)
        self.notes = []
        self.extra = {}
        self.tl0 = self.lg["timeline_start_unix_ms"] if self.lg else 0
        self.timeline = self.lg["timeline"] if self.lg else []
        self.target = self.p["devices"]
        self.timeout_ms = self.p["request_timeout_ms"]

    # -- helpers ---------------------------------------------------------------------
    def t(self, name):
        v = self.ev.get(name)
        return int(v if isinstance(v, str) else v[-1]) if v is not None else None

    def rel(self, ms):
        """Seconds after the start of the steady phase."""
        return (ms - self.steady) / 1000.0

    def crit(self, name, ok, value, required, judged=True):
        self.criteria.append(
            {"name": name, "pass": bool(ok), "value": value, "required": required, "judged": judged}
        )

    def phase(self, label, lo, hi, nodes=None, group="all APIs"):
        rs = [
            r
            for r in self.reqs
            if (lo is None or r["due"] >= lo)
            and (hi is None or r["due"] < hi)
            and (nodes is None or r["node"] in nodes)
        ]
        c = count(rs)
        self.phases.append(
            {
                "phase": label,
                "apis": group,
                "from_s": None if lo is None else round(self.rel(lo), 2),
                "to_s": None if hi is None else round(self.rel(hi), 2),
                **c,
            }
        )
        return c

    def seconds(self, lo, hi):
        """Timeline seconds lying wholly inside [lo, hi) (unix ms)."""
        out = []
        for s in self.timeline:
            a = self.tl0 + s["t"] * 1000
            if a >= lo and a + 1000 <= hi:
                out.append(s)
        return out

    def samples_between(self, lo, hi):
        """Timeline seconds whose end-of-second sample falls in [lo, hi]."""
        return [s for s in self.timeline if lo <= self.tl0 + (s["t"] + 1) * 1000 <= hi]

    def steady_end(self):
        return self.steady + self.p["duration"] * 1000

    def hold_end(self):
        v = self.ev.get("hold_connected")
        if isinstance(v, list):
            return int(v[1])
        return self.steady_end()

    def metric(self, snap, i, name):
        m = snap.get(i)
        if m is None:
            return None
        v = m[0].get(name)
        return None if v is None else int(v)

    def events_lost(self):
        e = self.lg["events"]
        lost = e.get("lost")
        ok = e.get("counted") and lost == 0 and e.get("sent", 0) > 0
        self.crit(
            "events: none lost (loadgen's seq count)",
            ok,
            f"lost {lost}, sent {e.get('sent')}, counted {e.get('counted')}",
            "lost == 0 (events counted, some sent)",
        )
        self.crit(
            "events: lost in broken connections (shown, not judged)",
            True,
            e.get("lost_in_broken_connections"),
            "-",
            judged=False,
        )

    def all_acked(self, name, lo, hi, nodes=None, group="all APIs", judged=True):
        c = self.phase(name, lo, hi, nodes, group)
        self.crit(
            f"requests {name} ({group}): all acked",
            c["sent"] > 0 and not_acked(c) == 0,
            f"{c['acked']}/{c['sent']} acked" + self.outcome_text(c),
            "all acked (and some sent)",
            judged,
        )
        return c

    @staticmethod
    def outcome_text(c):
        bad = [f"{k} {c[k]}" for k in OUTCOMES[1:] if c.get(k)]
        return (" (" + ", ".join(bad) + ")") if bad else ""

    def nodes_metric_eq(self, name, metric, want, nodes, snap=None):
        snap = self.hold if snap is None else snap
        vals = {i: self.metric(snap, i, metric) for i in nodes}
        ok = all(v == want for v in vals.values()) and len(vals) > 0
        self.crit(name, ok, ", ".join(f"node {i}: {v}" for i, v in vals.items()), f"== {want} on each")
        return vals

    def hold_connected(self):
        v = self.ev.get("hold_connected")
        return int(v[0]) if isinstance(v, list) else None

    # -- setup -----------------------------------------------------------------------
    def setup(self):
        if self.lg is None:
            self.crit("setup: loadgen report written", False, "no loadgen.json", "report")
            return False
        dev = self.lg["devices"]
        self.crit(
            "setup: whole fleet connected before the steady phase",
            dev["connected"] >= self.target,
            f"{dev['connected']}/{dev['target']} in {dev['connect_seconds']:.1f}s",
            f"{self.target}",
        )
        code = self.ev.get("loadgen_exit")
        code = code[0] if isinstance(code, list) else code
        self.crit("setup: loadgen exited 0", code == "0", code, "0")
        if "loadgen_overrun" in self.ev:
            self.crit("setup: loadgen finished within its time bound", False, "overran", "bounded")
        if not self.hold:
            self.crit("setup: metrics read during the idle hold", False, "none", "every running node")
        return True

    # -- faults ----------------------------------------------------------------------
    def kill(self):
        k, n = self.p["killed_node"], self.p["nodes"]
        kill = self.t("fault_start")
        survivors = [i for i in range(n) if i != k]
        deadline = kill + 10_000 + self.timeout_ms
        grp = f"nodes {','.join(map(str, survivors))}"
        # Reconnect: the first sample after the kill showing the dip, then the first
        # sample back at the target.
        after = [s for s in self.timeline if self.tl0 + (s["t"] + 1) * 1000 > kill]
        dip = next((s for s in after[:4] if s["connected"] < self.target), None)
        back = None
        if dip is not None:
            back = next(
                (s for s in after if s["t"] > dip["t"] and s["connected"] >= self.target), None
            )
        if dip is None:
            first = after[0] if after else None
            secs = None if first is None else (self.tl0 + (first["t"] + 1) * 1000 - kill) / 1000.0
            rec = secs
            txt = f"no dip in the samples: back within {secs:.1f}s" if secs is not None else "no samples"
        elif back is None:
            rec, txt = None, f"never back to {self.target} (min {min(s['connected'] for s in after)})"
        else:
            rec = (self.tl0 + (back["t"] + 1) * 1000 - kill) / 1000.0
            lowest = min(s["connected"] for s in after if s["t"] < back["t"] + 1)
            txt = f"{rec:.1f}s (lowest {lowest}, back at timeline t={back['t']})"
        self.extra["reconnect_seconds"] = rec
        self.crit(
            f"devices: connected back to {self.target} after the kill (timeline)",
            rec is not None and rec <= 10.0,
            txt,
            "<= 10 s",
        )
        # A request sent less than a timeout before the kill may still be in flight
        # when it happens: it belongs to the kill's window, not to "before".
        in_flight = kill - self.timeout_ms
        self.all_acked("due a timeout or more before the kill", None, in_flight, survivors, grp)
        c = self.phase("kill-timeout .. kill+10s+timeout", in_flight, deadline, survivors, grp)
        self.crit(
            "requests kill-timeout .. kill+10s+timeout (shown, not judged)",
            True,
            f"{c['acked']}/{c['sent']} acked" + self.outcome_text(c),
            "404/504 allowed for devices not back",
            judged=False,
        )
        self.all_acked("after kill+10s+timeout", deadline, None, survivors, grp)
        kb = self.phase("before the kill", None, kill, [k], f"node {k} (killed)")
        ka = self.phase("after the kill", kill, None, [k], f"node {k} (killed)")
        self.crit(
            f"requests to the killed node {k}'s own API (shown, not judged: never accepted)",
            True,
            f"before: {kb['acked']}/{kb['sent']} acked{self.outcome_text(kb)}; after: "
            f"{ka['acked']}/{ka['sent']} acked{self.outcome_text(ka)}",
            "-",
            judged=False,
        )
        self.events_lost()
        self.nodes_metric_eq(
            "cluster: survivors count K-1 nodes (router_cluster_nodes, hold)",
            "router_cluster_nodes",
            n - 1,
            survivors,
        )

    def broker_restart(self):
        n = self.p["nodes"]
        sb, sd = self.t("stop_begin"), self.t("stop_done")
        gb, gd = self.t("start_begin"), self.t("start_done")
        # Devices stay connected: from the steady phase's start to the end of the hold.
        span = self.samples_between(self.steady + 1000, self.hold_end())
        lowest = min((s["connected"] for s in span), default=None)
        errs = sum(s["device_errors"] for s in self.timeline)
        self.crit(
            "devices: stay connected (timeline connected never drops, device_errors 0)",
            lowest == self.target and errs == 0,
            f"lowest connected {lowest} over {len(span)} s, device_errors {errs}",
            f"connected == {self.target} throughout, device_errors == 0",
        )
        self.all_acked("before stop_app", None, sb)
        out = self.seconds(sd, gb)
        per = [s["acked"] for s in out]
        self.crit(
            "requests during the outage: acked > 0 every second (timeline)",
            len(out) > 0 and all(a > 0 for a in per),
            f"{len(out)} s: acked/s {per}",
            "> 0 each second",
        )
        c = self.phase("outage (stop_app done .. start_app)", sd, gb)
        self.crit(
            "requests during the outage (shown)",
            True,
            f"{c['acked']}/{c['sent']} acked" + self.outcome_text(c),
            "-",
            judged=False,
        )
        self.phase("stop_app running", sb, sd)
        self.phase("start_app running", gb, gd)
        self.phase("recovery (start_app done .. +15s)", gd, gd + 15_000)
        self.all_acked("after start_app+15s", gd + 15_000, None)
        self.events_lost()
        self.nodes_metric_eq(
            "cluster: no node expired (router_cluster_nodes_expired_total)",
            "router_cluster_nodes_expired_total",
            0,
            range(n),
        )
        self.extra["outage_seconds"] = round((gb - sd) / 1000.0, 1)
        self.extra["stop_app_seconds"] = round((sd - sb) / 1000.0, 1)
        self.extra["start_app_seconds"] = round((gd - gb) / 1000.0, 1)

    def rolling_restart(self):
        n, rate = self.p["nodes"], self.p["request_rate"]
        first = self.t("term_0")
        last = self.t("fault_end")
        # Windows in which node i's own API may refuse (503 draining) or be down: from its
        # SIGTERM (0.5 s earlier: a request sent just before may meet the drain) to 1 s
        # after its /readyz said 200 again.
        windows = {}
        restarts = []
        for i in range(n):
            term, ex = self.t(f"term_{i}"), self.t(f"exit_{i}")
            ready = self.t(f"ready_{i}")
            code = self.ev.get(f"exit_code_{i}")
            windows[i] = (term - 500, (ready or last) + 1000)
            restarts.append(
                {
                    "node": i,
                    "exit_code": code,
                    "drain_s": round((ex - term) / 1000.0, 1),
                    "ready_after_restart_s": None if ready is None else round((ready - self.t(f"restart_{i}")) / 1000.0, 1),
                }
            )
        self.extra["restarts"] = restarts
        ok = all(r["exit_code"] == "0" and r["ready_after_restart_s"] is not None for r in restarts)
        self.crit(
            "restarts: each node drained and exited 0 by itself, then /readyz 200",
            ok,
            "; ".join(
                f"node {r['node']}: exit {r['exit_code']} after {r['drain_s']}s, ready {r['ready_after_restart_s']}s"
                for r in restarts
            ),
            "exit 0, ready",
        )
        self.crit(
            "setup: restarts finished within the steady phase",
            last <= self.steady_end(),
            f"last restart settled at +{self.rel(last):.1f}s of {self.p['duration']}s",
            "<= --duration",
        )
        self.all_acked("before the first SIGTERM (-0.5s)", None, first - 500)
        during = self.phase("restarts (SIGTERM-0.5s .. settled+timeout)", first - 500, last + self.timeout_ms)
        self.phase("after", last + self.timeout_ms, None)
        lost = sum(1 for r in self.reqs if r["outcome"] in ("offline", "timeout"))
        # The bound: a request targets a device drawn uniformly from loadgen's targets, so
        # the requests that met their device disconnected number about
        # rate x (device-seconds disconnected) / devices; only those can end offline or
        # timeout. Device-seconds from the timeline (target - connected, each second) over
        # the restarts; Poisson upper tail (+3 sigma) + 1.
        span = self.samples_between(first, last + self.timeout_ms + 1000)
        absent = sum(max(0, self.target - s["connected"]) for s in span)
        lam = rate * absent / self.target
        bound = int(math.floor(lam + 3 * math.sqrt(lam) + 1))
        self.extra["absent_device_seconds"] = absent
        self.extra["expected_requests_meeting_an_absent_device"] = round(lam, 2)
        self.crit(
            "requests: offline + timeout within what the timeline allows",
            lost <= bound,
            f"{lost} (offline {sum(1 for r in self.reqs if r['outcome'] == 'offline')}, "
            f"timeout {sum(1 for r in self.reqs if r['outcome'] == 'timeout')}); "
            f"{absent} device-seconds disconnected -> {lam:.2f} requests expected to meet an absent device",
            f"<= {bound} (rate x absent device-seconds / devices, +3 sigma +1)",
        )
        inside = [
            r for r in self.reqs
            if r["outcome"] in ("http_error", "transport_error")
            and windows[r["node"]][0] <= r["due"] < windows[r["node"]][1]
        ]
        outside = [
            r for r in self.reqs
            if r["outcome"] in ("http_error", "transport_error")
            and not (windows[r["node"]][0] <= r["due"] < windows[r["node"]][1])
        ]
        self.crit(
            "requests via a node while it restarted: HTTP/transport errors (shown: 503 draining, refused)",
            True,
            len(inside),
            "-",
            judged=False,
        )
        self.crit(
            "requests via nodes that were up and ready: no HTTP/transport errors",
            len(outside) == 0,
            len(outside),
            "0",
        )
        self.events_lost()
        self.nodes_metric_eq(
            "cluster: all nodes back (router_cluster_nodes == K, hold)",
            "router_cluster_nodes",
            n,
            range(n),
        )
        hc = self.hold_connected()
        self.crit("devices: whole fleet connected at the end (hold)", hc == self.target, hc, f"{self.target}")
        del during

    def close_connection(self):
        n, j = self.p["nodes"], self.p["closed_node"]
        close = self.t("fault_start")
        rec = self.t("reconnected")
        self.extra["reconnect_seconds"] = None if rec is None else round((rec - close) / 1000.0, 1)
        s = self.metric(self.hold, j, "router_cluster_sessions_total")
        self.crit(
            f"cluster: node {j} reconnected (router_cluster_sessions_total == 2, hold)",
            s == 2,
            f"{s}" + ("" if rec is None else f", second session seen {(rec - close) / 1000.0:.1f}s after the close"),
            "2",
        )
        self.all_acked("before the close", None, close)
        secs = self.seconds(self.steady, self.steady_end())
        zero = [s2["t"] for s2 in secs if s2["acked"] == 0]
        self.crit(
            "requests keep being acked: acked > 0 every second of the steady phase (timeline)",
            len(secs) > 0 and not zero,
            f"{len(secs)} s, seconds without an ack: {zero or 'none'}",
            "> 0 each second",
        )
        c = self.phase("close .. close+10s+timeout", close, close + 10_000 + self.timeout_ms)
        self.crit(
            "requests close .. close+10s+timeout (shown)",
            True,
            f"{c['acked']}/{c['sent']} acked" + self.outcome_text(c),
            "-",
            judged=False,
        )
        self.all_acked("after close+10s+timeout", close + 10_000 + self.timeout_ms, None)
        dirs = [self.metric(self.hold, i, "router_cluster_directory_entries") for i in range(n)]
        locs = [self.metric(self.hold, i, "router_cluster_local_devices") for i in range(n)]
        hc = self.hold_connected()
        ok = None not in dirs and None not in locs and sum(dirs) == hc == sum(locs)
        self.crit(
            "directory: each device once (sum directory_entries == connected == sum local_devices, hold)",
            ok,
            f"directory {dirs} = {sum(d or 0 for d in dirs)}, local {locs} = {sum(x or 0 for x in locs)}, loadgen connected {hc}",
            "all equal",
        )
        self.nodes_metric_eq(
            "cluster: no node expired (router_cluster_nodes_expired_total)",
            "router_cluster_nodes_expired_total",
            0,
            range(n),
        )

    # -- report ----------------------------------------------------------------------
    def node_table(self):
        rows = []
        for i in range(self.p["nodes"]):
            snap = self.hold.get(i) or self.end.get(i)
            if snap is None:
                rows.append({"node": i, "running": False})
                continue
            sums, full = snap
            dropped = {
                re.search(r'reason="([^"]*)"', k).group(1): int(v)
                for k, v in full.items()
                if k.startswith("router_amqp_dropped_total{") and v
            }
            g = lambda name: int(sums[name]) if name in sums else None  # noqa: E731
            rows.append(
                {
                    "node": i,
                    "running": True,
                    "cluster_nodes": g("router_cluster_nodes"),
                    "directory_entries": g("router_cluster_directory_entries"),
                    "local_devices": g("router_cluster_local_devices"),
                    "nodes_expired": g("router_cluster_nodes_expired_total"),
                    "evictions": g("router_cluster_evictions_total"),
                    "sessions": g("router_cluster_sessions_total"),
                    "amqp_reconnects": g("router_amqp_reconnects_total"),
                    "amqp_dropped": dropped,
                    "outgoing_dropped": g("router_cluster_outgoing_dropped_total"),
                }
            )
        return rows

    def run(self):
        if self.setup():
            {
                "kill": self.kill,
                "broker-restart": self.broker_restart,
                "rolling-restart": self.rolling_restart,
                "close-connection": self.close_connection,
            }[self.p["fault"]]()
        verdict = "PASS" if all(c["pass"] for c in self.criteria if c["judged"]) else "FAIL"
        summary = {
            "fault": self.p["fault"],
            "verdict": verdict,
            "params": self.p,
            "criteria": self.criteria,
            "requests": self.phases,
            "requests_total": self.lg["requests"] if self.lg else None,
            "events": self.lg["events"] if self.lg else None,
            "nodes": self.node_table(),
            "moments_s": {
                k: round(self.rel(int(v if isinstance(v, str) else v[-1])), 2)
                for k, v in self.ev.items()
                if k not in ("steady_start", "hold_connected", "loadgen_exit", "sessions_before")
                and not k.startswith("exit_code")
                and str(v if isinstance(v, str) else v[-1]).isdigit()
                and len(str(v if isinstance(v, str) else v[-1])) >= 12
            },
            "timeline_steady_offset_s": round((self.steady - self.tl0) / 1000.0, 2) if self.lg else None,
            "extra": self.extra,
            "dir": self.d,
        }
        print(render(summary))
        return summary


def render(s):
    p = s["params"]
    o = []
    o.append("")
    o.append(
        f"== chaos {s['fault']}: {p['devices']} devices, {p['nodes']} nodes, {p['request_rate']} requests/s "
        f"(--request-via {p['request_via']}), events every {p['event_interval']}s, fault at +{p['at']}s "
        f"of a {p['duration']}s steady phase"
    )
    if s.get("moments_s"):
        o.append("   moments (s after the steady phase began): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(s["moments_s"].items(), key=lambda x: x[1])))
    o.append("")
    hdr = f"   {'requests (by due time)':44} {'APIs':14} {'sent':>7} {'acked':>7} {'timeout':>7} {'offline':>7} {'http_err':>8} {'transport':>9}"
    o.append(hdr)
    for r in s["requests"]:
        o.append(
            f"   {r['phase'][:44]:44} {r['apis'][:14]:14} {r['sent']:>7} {r['acked']:>7} {r['timeout']:>7} "
            f"{r['offline']:>7} {r['http_error']:>8} {r['transport_error']:>9}"
        )
    t = s.get("requests_total")
    if t:
        o.append(
            f"   {'whole run':44} {'all':14} {t['sent']:>7} {t['acked']:>7} {t['timeout']:>7} {t['offline']:>7} "
            f"{t['http_error']:>8} {t['transport_error']:>9}"
        )
    e = s.get("events")
    if e:
        o.append("")
        o.append(
            f"   events: sent {e.get('sent')}, received unique {e.get('received_unique')}, lost {e.get('lost')}, "
            f"lost in broken connections {e.get('lost_in_broken_connections')} ({e.get('broken_connections')} broken), "
            f"duplicated {e.get('duplicated')}, reordered {e.get('reordered')}, redelivered {e.get('redelivered')}, "
            f"consumer reconnects {e.get('consumer_reconnects')}"
        )
    o.append("")
    o.append(f"   {'node':>4} {'cl.nodes':>8} {'dir.entries':>11} {'local':>7} {'expired':>7} {'evict':>6} {'sessions':>8} {'amqp_reconn':>11}  amqp_dropped")
    for n in s["nodes"]:
        if not n.get("running"):
            o.append(f"   {n['node']:>4} (not running)")
            continue
        f = lambda v: "-" if v is None else str(v)  # noqa: E731
        o.append(
            f"   {n['node']:>4} {f(n['cluster_nodes']):>8} {f(n['directory_entries']):>11} {f(n['local_devices']):>7} "
            f"{f(n['nodes_expired']):>7} {f(n['evictions']):>6} {f(n['sessions']):>8} {f(n['amqp_reconnects']):>11}  "
            f"{n['amqp_dropped'] or 0}"
        )
    o.append("")
    for c in s["criteria"]:
        tag = ("PASS" if c["pass"] else "FAIL") if c["judged"] else "info"
        o.append(f"   {tag}  {c['name']}: {c['value']}" + (f"  [required: {c['required']}]" if c["judged"] else ""))
    o.append(f"   verdict: {s['verdict']}   (details: {s['dir']})")
    return "\n".join(o)


def merge(d, out, seconds):
    faults = []
    for f in ["kill", "broker-restart", "rolling-restart", "close-connection"]:
        p = os.path.join(d, f + ".json")
        if os.path.exists(p):
            faults.append(json.load(open(p)))
    verdict = "PASS" if faults and all(x.get("verdict") == "PASS" for x in faults) else "FAIL"
    print("")
    print(f"== chaos all: {verdict} in {seconds}s")
    for x in faults:
        failed = [c["name"] for c in x.get("criteria", []) if c["judged"] and not c["pass"]]
        print(f"   {x.get('verdict', 'FAIL'):4}  {x['fault']:17} " + ("; ".join(failed) if failed else x.get("error", "")))
    with open(out, "w") as f:
        json.dump({"verdict": verdict, "seconds": seconds, "faults": faults}, f, indent=2)
    print(f"   summary JSON: {out}")
    return verdict == "PASS"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--merge")
    ap.add_argument("--json", required=True)
    ap.add_argument("--seconds", type=int, default=0)
    a = ap.parse_args()
    if a.merge:
        sys.exit(0 if merge(a.merge, a.json, a.seconds) else 1)
    try:
        s = Judge(a.dir).run()
    except Exception as e:  # a run too broken to judge is a FAIL, with the reason
        import traceback

        traceback.print_exc()
        s = {"fault": "?", "verdict": "FAIL", "error": f"cannot judge: {e}", "dir": a.dir}
        try:
            s["fault"] = json.load(open(os.path.join(a.dir, "params.json")))["fault"]
        except Exception:
            pass
    with open(a.json, "w") as f:
        json.dump(s, f, indent=2)
    print(f"   summary JSON: {a.json}")
    sys.exit(0 if s["verdict"] == "PASS" else 1)


if __name__ == "__main__":
    main()
