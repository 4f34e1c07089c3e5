"""CI check of loadgen against the real router: a small fleet connects fully, requests
are acked, percentiles are present and ordered, zero errors; a mixed-protocol fleet too;
with --no-ack the report shows timeouts (the measurement can fail); and against a router
with --amqp, loadgen's own hive.events consumer counts every event each device sent
(per-device seqs: nothing lost, nothing twice), with a per-second timeline that adds up.

Broker for the --amqp case: $HIVE_AMQP_URL or the local guest account."""

import json
import os
import subprocess
import sys
import tempfile

ROUTER, LOADGEN = sys.argv[1], sys.argv[2]
DEVICES = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
AMQP_URL = os.environ.get("HIVE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")


def start_router(*extra):
    p = subprocess.Popen([ROUTER, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--auth-secret", "lg-0123456789abcdef0123456789abcdef",
                          *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("router ready"), line
    return p, dict(kv.split("=", 1) for kv in line.split()[2:])


proc, f = start_router()


def run(*extra, node=None):
    node = node or f
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [LOADGEN, "--url", f"ws://{node['ws']}", "--api", f"http://{node['api']}", "--secret", "lg-0123456789abcdef0123456789abcdef", "--quiet",
               "--json", out.name, *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=300)
        return json.load(open(out.name))


def ordered(s, name):
    assert s["count"] > 0, (name, s)
    assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["p999"] <= s["max"], (name, s)


try:
    r = run("--devices", str(DEVICES), "--connect-rate", "3000", "--request-rate", "300", "--duration", "4",
            "--event-interval", "2")
    assert r["devices"]["connected"] == DEVICES, r["devices"]
    for k in ("connect", "auth", "ack", "event"):
        ordered(r["latency_ms"][k], k)
    q = r["requests"]
    assert q["sent"] > 500 and q["acked"] == q["sent"] and q["timeout"] == 0 and q["offline"] == 0, q
    # The sender's lateness: one sample per request sent, and part of each ack's latency.
    late = r["latency_ms"]["late"]
    assert late["count"] == q["sent"], (late, q)
    assert 0 <= late["p50"] <= late["p99"] <= late["max"] <= r["latency_ms"]["ack"]["max"], (late, r["latency_ms"]["ack"])
    assert r["errors"] == {}, r["errors"]
    assert r["events"]["received"] > 0, r["events"]
    # Without --amqp loadgen does not count events per device: null, and says so.
    e = r["events"]
    assert e["counted"] is False and e["lost"] is None and e["received_unique"] is None, e
    tl = r["timeline"]
    assert tl and [s["t"] for s in tl] == list(range(len(tl))), tl
    assert sum(s["acked"] for s in tl) == q["acked"] and max(s["connected"] for s in tl) == DEVICES, tl
    print(f"loadgen {DEVICES} devices: connected in {r['devices']['connect_seconds']:.2f}s, ack p50 "
          f"{r['latency_ms']['ack']['p50']} ms p99 {r['latency_ms']['ack']['p99']} ms, 0 errors")

    m = run("--devices", "600", "--protocol", "mixed", "--request-rate", "200", "--duration", "3")
    assert m["devices"]["connected"] == 600 and m["requests"]["acked"] == m["requests"]["sent"] > 0, m
    assert m["errors"] == {}, m["errors"]
    print("loadgen mixed fleet (hive, phoenix, hivekit): all connected, all acked")

    s = run("--devices", "1000", "--request-rate", "0", "--duration", "8", "--storm-at", "1")
    st = s["storm"]
    assert st and st["complete"] and st["devices"] == 1000, st
    assert s["devices"]["connected"] == 1000 and s["errors"] == {}, s
    print(f"loadgen --storm-at: 1000 devices dropped at once, all back in {st['seconds_to_reconnect']:.2f} s, router unharmed")

    # Transparent huge pages: off in the coordinator and its worker processes unless asked.
    def thp(pid):
        return next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("THP_enabled:"))

    def children(pid):
        import os
        return [int(c) for c in os.listdir("/proc") if c.isdigit() and os.path.exists(f"/proc/{c}/stat")
                and open(f"/proc/{c}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid)]

    import time
    for extra, want in (((), "0"), (("--transparent-hugepages",), thp("self"))):
        lg = subprocess.Popen([LOADGEN, "--url", f"ws://{f['ws']}", "--api", f"http://{f['api']}", "--secret", "lg-0123456789abcdef0123456789abcdef",
                               "--quiet", "--devices", "50", "--workers", "2", "--request-rate", "0", "--duration", "0",
                               "--hold", "3", *extra], stdout=subprocess.DEVNULL)
        time.sleep(1.5)
        workers = children(lg.pid)
        got = [thp(lg.pid)] + [thp(w) for w in workers]
        assert lg.wait(timeout=60) == 0
        assert len(workers) == 2 and got == [want] * 3, (extra, workers, got)
    print("loadgen: transparent huge pages off in the coordinator and both workers, kept with --transparent-hugepages")

    n = run("--devices", "200", "--no-ack", "--request-rate", "50", "--duration", "2", "--request-timeout-ms", "300")
    assert n["requests"]["acked"] == 0 and n["requests"]["timeout"] > 0, n["requests"]
    assert n["errors"].get("request_timeout", 0) > 0, n["errors"]
    print(f"loadgen --no-ack: {n['requests']['timeout']} timeouts reported")
    # Per-device event counting through RabbitMQ: each device numbers its events, loadgen's
    # hive.events consumer counts them, and after the drain every seq sent has arrived once.
    amqp_proc, a = start_router("--amqp", AMQP_URL)
    try:
        m = run("--devices", "200", "--protocol", "mixed", "--event-interval", "0.2", "--duration", "5",
                "--amqp", AMQP_URL, node=a)
    finally:
        amqp_proc.terminate()
        amqp_proc.wait(timeout=30)
    e = m["events"]
    assert e["counted"] is True and e["sent"] > 0, e
    assert e["lost"] == 0 and e["lost_in_broken_connections"] == 0, e
    assert e["received_unique"] == e["sent"] and e["duplicated"] == 0, e
    assert e["received"] == e["received_unique"] + e["duplicated"], e
    tl = m["timeline"]
    assert sum(s["events_sent"] for s in tl) == e["sent"], (e, tl)
    assert sum(s["events_received"] for s in tl) == e["received"], (e, tl)
    assert m["errors"] == {}, m["errors"]
    print(f"loadgen --amqp: {e['sent']} events from 200 devices, {e['received_unique']} received once each, "
          f"0 lost, {e['reordered']} reordered")
finally:
    proc.terminate()
    proc.wait(timeout=30)
