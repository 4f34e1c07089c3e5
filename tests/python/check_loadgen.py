"""CI check of loadgen against the real router: a small fleet connects fully, requests
are acked, percentiles are present and ordered, zero errors; a mixed-protocol fleet too;
and with --no-ack the report shows timeouts (the measurement can fail)."""

import json
import subprocess
import sys
import tempfile

ROUTER, LOADGEN = sys.argv[1], sys.argv[2]
DEVICES = int(sys.argv[3]) if len(sys.argv) > 3 else 3000

proc = subprocess.Popen([ROUTER, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--auth-secret", "lg"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
line = proc.stdout.readline()
assert line.startswith("router ready"), line
f = dict(kv.split("=", 1) for kv in line.split()[2:])


def run(*extra):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [LOADGEN, "--url", f"ws://{f['ws']}", "--api", f"http://{f['api']}", "--secret", "lg", "--quiet",
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
        lg = subprocess.Popen([LOADGEN, "--url", f"ws://{f['ws']}", "--api", f"http://{f['api']}", "--secret", "lg",
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
finally:
    proc.terminate()
    proc.wait(timeout=30)
