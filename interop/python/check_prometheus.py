"""The Grafana dashboard against a real Prometheus scraping a real router under load and a
real loadgen.

    check_prometheus.py ROUTER_BIN PROMETHEUS_BIN [LOADGEN_BIN]   (scripts/prometheus-check.sh
                                                  runs it; LOADGEN_BIN: target/debug/loadgen)

1. The router: `serve --listen 127.0.0.1:0 --api 127.0.0.1:0 --shards 2`, plus the flags in
   ROUTER_FLAGS (each says which dashboard series it lets the load exercise).
2. Prometheus (its own --storage.tsdb.path in a temporary directory, --web.listen-address on a
   free 127.0.0.1 port) with a configuration derived from grafana/prometheus.yml: the router's
   job and the loadgen job as written there (job names, labels, comments), their targets
   replaced by the router's API address and by a free port for loadgen's --metrics,
   scrape_interval 1s, and for the router the `authorization` block that file's comment gives
   for --api-token. Other jobs in that file (things not running here) are left out; promtool
   checks the result. We wait for /-/ready and for `up` == 1 on the router's target, and check
   the target's job, URL and interval.
3. loadgen (LOADGEN_FLAGS): 20 devices of its own against the same router (--secret, the
   router's device-token secret; --api-token, its API token), ramped over 4 s so that connects
   move between scrapes, then 20 requests/s and an event a second per device, its metrics on
   --metrics at that port. It starts before the check's own load, so that the devices its
   backend lists (once, at the end of its ramp) are its own; we wait for its steady phase and
   for `up` == 1 on its target (job, URL, interval checked as for the router). Its --duration
   (60 s) outlasts the check: it must still run at the queries (else the check fails), and it
   is stopped on exit, or stops by itself.
4. Load, from then on until the end (so that every counter moves between scrapes): DEVICES
   Hive devices on ws://.../ws?token=T, each sending an `instances` event a second and acking
   the requests it gets; the API sends each device an event a second (POST
   /v1/devices/{d}/events) and a request every 200 ms (POST /v1/devices/{d}/requests), and an
   SSE reader stays on /v1/events. On top, every CYCLE seconds: a forged token (4401), a bad
   upgrade request, a frame that is not JSON, a takeover (4409), a request to a device that
   never acks (504), a request to an unknown device (404), a bad device id (400), an API call
   without the token (401), and a few devices connecting and leaving; once: a burst of frames
   past the per-device rate limit, a burst of connects past --ip-connect-rate (429), a device
   that stops reading (events dropped, request refused 503, closed 1008), and an SSE
   subscriber that stops reading while big events go by (lagged); and one connection always
   open and not authenticated (handshakes in progress; closed 4408 at --auth-timeout).
5. After SETTLE seconds of that (rate() over [1m] with 1 s scrapes has its samples), every
   PromQL expression of every panel (rows' nested panels too) of grafana/dashboards/*.json
   goes to /api/v1/query, Grafana's template variables replaced first (SUBSTITUTIONS).

One line per expression, then a summary; exit 1 if any line fails:
  OK     success, at least one series, and (unless exempt below) some value that is not 0 or
         NaN: the load really moved what the panel shows
  EMPTY  success but no series                                                  (fails)
  ZERO   series, but every value 0 or NaN: the load does not exercise it         (fails)
         -> make the load exercise it, or list its metric in NOT_EXERCISED with the reason
  ERROR  Prometheus refused the query (bad PromQL) or a template variable is unknown (fails)
  MISSING a metric it names is neither in the router's nor in loadgen's /metrics  (fails)
An expression naming a metric of NOT_EXERCISED, or containing one of its longer keys (a
selector or a sub-expression, spaces ignored: e.g. loadgen's failed requests, which a fleet
that acks everything leaves at 0), may be 0 (or empty), said so on its OK line, but every
metric it names must still be in /metrics.

Standard library and websockets only; talks to 127.0.0.1 only; everything it starts is
stopped on exit (SIGTERM included; the children also die with this process).
"""

import asyncio
import base64
import collections
import concurrent.futures
import ctypes
import glob
import inspect
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import websockets

ROUTER, PROMETHEUS = os.path.abspath(sys.argv[1]), sys.argv[2]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.abspath(sys.argv[3] if len(sys.argv) > 3 else os.path.join(REPO, "target", "debug", "loadgen"))
HOST = "127.0.0.1"

DEVICES = 40          # steady devices
CYCLE = 2.0           # seconds between rounds of the small error exercises
SETTLE = 12.0         # seconds of load after the first successful scrape, before the queries
CHURN = 3             # devices that connect and leave each cycle (connects, handoffs, 1000)
API_TOKEN = "prometheus-check-" + uuid.uuid4().hex
# The router's device-token secret: it runs with --dev and without --auth-secret (nor
# ROUTER_AUTH_SECRET: CHILD_ENV drops ROUTER_*), so `router token --dev` and the router use
# the public development secret.
AUTH_SECRET = "hive-dev-secret"

# loadgen (the dashboard's loadgen row): its own devices and backend against the same router,
# its /metrics scraped by the loadgen job. A slow ramp (4 s) so that connects move between
# scrapes; requests and events at a small rate; its run outlasts the check (killed at the
# end), so that it is in its steady phase when the queries go.
LOADGEN_FLAGS = [
    "--devices", "20", "--connect-rate", "5", "--request-rate", "20", "--event-interval", "1",
    "--request-timeout-ms", "2000", "--duration", "60", "--quiet",
]

ROUTER_FLAGS = [
    "--listen", f"{HOST}:0", "--api", f"{HOST}:0", "--shards", "2", "--dev",
    # router_api_unauthorized_total (panel "Bus and API", API 401) only moves with a token;
    # Prometheus then scrapes with the `authorization` block grafana/prometheus.yml documents.
    "--api-token", API_TOKEN,
    # router_connections_refused_total{reason="ip_rate"}: one burst of 300 connects goes past
    # it; the steady load connects 40 devices over 2 shards, well under it.
    "--ip-connect-rate", "100",
]

# Grafana's template variables, as this check replaces them before Prometheus sees an
# expression. Rate windows: Grafana's $__rate_interval is max(4 x scrape interval, $__interval
# + scrape interval); with the 1 s scrapes here 10s holds about 10 samples. $__range is the
# dashboard's time range; 30s covers this whole check. $job/$instance/$node name this
# check's single target. An unknown $variable is an ERROR (add it here).
SUBSTITUTIONS = {
    "__rate_interval": "10s",
    "__interval": "2s",
    "__interval_ms": "2000",
    "__range": "30s",
    "__range_s": "30",
    "__range_ms": "30000",
    "job": None,        # the router's job name, from grafana/prometheus.yml
    "instance": None,   # the router's API address (the scrape target)
    "node": None,       # the router's --node-id (router_info{node})
}

# Metrics that this check cannot make move, and why. An expression naming one may read 0;
# the metric must still be exported.
NOT_EXERCISED = {
    "router_tls_handshake_failures_total":
        "TLS handshakes happen only on a --tls-cert listener; this router serves plain ws://",
    "router_bus_backpressure_total":
        "a shard pauses only when its queue to the bus is nearly full (--queue-capacity 65536):"
        " not with a few dozen devices, and a tiny queue would make the steady load fail at random",
    "router_shard_queue_full_total":
        "only when a shard's inbox (--queue-capacity 65536) is full: not with a few dozen devices",
    **{m: "only with --amqp (a RabbitMQ broker): this router runs the embedded bus"
       for m in ("router_amqp_buffered_events", "router_amqp_unconfirmed_events",
                 "router_amqp_confirmed_total", "router_amqp_dropped_total", "router_amqp_connected")},
    **{m: "only with --amqp and --backend-url (a broker and a backend to deliver to)"
       for m in ("router_backend_backlog", "router_backend_unacked")},
}
NOT_EXERCISED.update({
    "loadgen_device_errors_total":
        "loadgen's devices stay connected here (no storm, no router restart): no connection error",
    "loadgen_reconnects_total": "loadgen reconnects only after a device error (none here)",
})
# Expressions (or selectors) that may be 0 although their metrics move elsewhere: a key with
# more than a metric name is matched in the expression as written (spaces ignored).
NOT_EXERCISED.update({
    'loadgen_requests_total{outcome=~"timeout|offline|error"}':
        "loadgen's requests go to its own devices, which ack every one: none times out, finds"
        " its device offline or fails",
    "sum(loadgen_events_sent_total) - sum(loadgen_events_received_total)":
        "events in flight at the instant of the query: 0 whenever every event sent came back",
})
NAME_RE = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")

# Never through an HTTP proxy from the environment: everything here is 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
WS_KW = {"proxy": None} if "proxy" in inspect.signature(websockets.connect).parameters else {}
WS_KW["open_timeout"] = 5
CHILD_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "LOADGEN_"))}
stats = collections.Counter()


def log(msg):
    print(msg, flush=True)


def _die_with_parent():
    # PR_SET_PDEATHSIG: the child gets SIGKILL if this process dies without cleaning up.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


# ---------------------------------------------------------------- HTTP and processes

def http(method, url, body=None, token=API_TOKEN, timeout=10):
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["content-type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_router(tmp):
    err = open(os.path.join(tmp, "router.log"), "wb")
    p = subprocess.Popen([ROUTER, "serve", *ROUTER_FLAGS], stdout=subprocess.PIPE, stderr=err,
                         text=True, env=CHILD_ENV, preexec_fn=_die_with_parent)
    line = p.stdout.readline()
    if not line.startswith("router ready"):
        p.kill()
        raise SystemExit(f"router did not start: {line!r}\n{tail(os.path.join(tmp, 'router.log'))}")
    f = dict(kv.split("=", 1) for kv in line.split()[2:])
    return p, f["ws"], f["api"], f["node"]


def token(device, account):
    out = subprocess.run([ROUTER, "token", "--dev", "--device", device, "--account", account],
                         check=True, capture_output=True, text=True, env=CHILD_ENV, timeout=20)
    return out.stdout.strip()


def start_loadgen(tmp, ws_addr, api, metrics_addr):
    """loadgen against the router, serving its metrics on metrics_addr; returns once it is in
    its steady phase (its backend has listed the router's devices: only its own, as the check's
    load has not started yet). Its run ends by itself (--duration); it is killed on exit."""
    log_path = os.path.join(tmp, "loadgen.log")
    p = subprocess.Popen([LOADGEN, "--url", f"ws://{ws_addr}", "--api", f"http://{api}",
                          "--api-token", API_TOKEN, "--secret", AUTH_SECRET,
                          "--metrics", metrics_addr, *LOADGEN_FLAGS],
                         stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                         env=CHILD_ENV, preexec_fn=_die_with_parent)
    end, page = time.monotonic() + 30, ""
    while time.monotonic() < end and p.poll() is None:
        try:
            st, body = http("GET", f"http://{metrics_addr}/metrics", token=None, timeout=2)
            page = body.decode(errors="replace")
            if st == 200 and 'loadgen_phase{phase="steady"} 1' in page:
                return p
        except OSError:
            pass
        time.sleep(0.2)
    p.kill()
    p.wait()
    raise SystemExit(f"loadgen did not reach its steady phase (exit {p.returncode})\n"
                     f"{page[-1500:]}\n{tail(log_path)}")


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- Prometheus configuration

JOB_RE = re.compile(r"^(\s*)-\s*job_name:\s*['\"]?([^'\"\s#]+)")


def derive_config(text, api_addr, loadgen_addr):
    """grafana/prometheus.yml with the router job's targets pointed at api_addr (with the
    bearer token) and the loadgen job's at loadgen_addr, 1 s scrapes; other jobs dropped.
    Returns (yaml, router job name, loadgen job name, dropped job names)."""
    lines = text.splitlines()
    starts = [i for i, l in enumerate(lines) if JOB_RE.match(l)]
    if not starts:
        raise SystemExit("grafana/prometheus.yml: no scrape job found")
    blocks = []  # (start, end, name)
    for i in starts:
        indent = len(JOB_RE.match(lines[i]).group(1))
        end = i + 1
        while end < len(lines):
            l = lines[end]
            if l.strip() and not l.lstrip().startswith("#") and len(l) - len(l.lstrip()) <= indent:
                break
            end += 1
        blocks.append((i, end, JOB_RE.match(lines[i]).group(2)))
    router_jobs = [b for b in blocks if not b[2].startswith("loadgen")]
    loadgen_jobs = [b for b in blocks if b[2].startswith("loadgen")]
    if not router_jobs or not loadgen_jobs:
        raise SystemExit("grafana/prometheus.yml: expected a router job and a loadgen job, found"
                         f" {[b[2] for b in blocks]}")
    kept = [(router_jobs[0], api_addr, True), (loadgen_jobs[0], loadgen_addr, False)]
    dropped = [b[2] for b in blocks if b is not router_jobs[0] and b is not loadgen_jobs[0]]
    job_lines = []
    for (start, end, job), addr, auth in sorted(kept, key=lambda k: k[0][0]):
        job_lines += job_block(lines[start:end], job, addr, auth)
    # Everything outside the scrape jobs (comments, global:, scrape_configs:) stays as it is.
    head = lines[:starts[0]]
    tail_lines = lines[blocks[-1][1]:]
    out = "\n".join(head + job_lines + tail_lines) + "\n"
    out = re.sub(r"(^\s*scrape_interval:\s*)[0-9a-z]+", r"\g<1>1s", out, flags=re.M)
    return out, router_jobs[0][2], loadgen_jobs[0][2], dropped


def job_block(block, job, addr, auth):
    """One scrape job's lines with its targets replaced by addr, 1 s scrapes and, for the
    router (auth), the `authorization` block for --api-token."""
    key_indent = " " * (len(JOB_RE.match(block[0]).group(1)) + 2)
    body = "\n".join(block[1:]) + "\n"
    # targets: flow list ["a", "b"] or block list (- a / - b), any number of entries.
    body, n = re.subn(r"(targets:\s*)\[[^\]]*\]", lambda m: f'{m.group(1)}["{addr}"]', body)
    if n == 0:
        body, n = re.subn(r"(targets:[ \t]*(#[^\n]*)?\n)([ \t]*)(-[^\n]*\n(?:[ \t]*-[^\n]*\n)*)",
                          lambda m: f'{m.group(1)}{m.group(3)}- "{addr}"\n', body)
    if n != 1:
        raise SystemExit(f"grafana/prometheus.yml: job {job}: expected one targets list, found {n}")
    body = re.sub(r"(scrape_interval:\s*)[0-9a-z]+", r"\g<1>1s", body)
    body = re.sub(r"(scrape_timeout:\s*)[0-9a-z]+", r"\g<1>1s", body)
    extra = [] if re.search(r"^\s*scrape_interval:", body, re.M) else [f"{key_indent}scrape_interval: 1s"]
    if re.search(r"^\s*authorization:", body, re.M):
        raise SystemExit("grafana/prometheus.yml now has an authorization block: teach derive_config it")
    if auth:
        extra.append(f'{key_indent}authorization: {{ type: Bearer, credentials: "{API_TOKEN}" }}'
                     "   # router --api-token (added by this check)")
    return [block[0], *extra, *body.rstrip("\n").split("\n")]


def start_prometheus(tmp, config):
    cfg = os.path.join(tmp, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(config)
    promtool = os.path.join(os.path.dirname(PROMETHEUS), "promtool")
    if os.access(promtool, os.X_OK):
        r = subprocess.run([promtool, "check", "config", cfg], capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise SystemExit(f"promtool check config failed:\n{r.stdout}{r.stderr}\n--- config:\n{config}")
    for _ in range(3):
        addr = f"{HOST}:{free_port()}"
        data = tempfile.mkdtemp(prefix="tsdb-", dir=tmp)
        logf = open(os.path.join(tmp, "prometheus.log"), "ab")
        p = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                              f"--web.listen-address={addr}", "--storage.tsdb.retention.time=1h",
                              "--log.level=warn"],
                             stdout=logf, stderr=logf, env=CHILD_ENV, preexec_fn=_die_with_parent)
        end = time.monotonic() + 20
        while time.monotonic() < end and p.poll() is None:
            try:
                if http("GET", f"http://{addr}/-/ready", token=None, timeout=2)[0] == 200:
                    return p, addr
            except OSError:
                pass
            time.sleep(0.2)
        p.kill()
        p.wait()
    raise SystemExit(f"Prometheus did not become ready\n{tail(os.path.join(tmp, 'prometheus.log'))}")


def query(prom, expr):
    status, body = http("GET", f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                        token=None, timeout=10)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"status": "error", "error": body[:200].decode(errors="replace")}


def wait_scraped(prom, job, addr):
    """up == 1 for our target, and the target is the one we meant (job, URL, 1 s)."""
    end = time.monotonic() + 20
    last = None
    while time.monotonic() < end:
        _, r = query(prom, f'up{{job="{job}"}}')
        last = r
        res = r.get("data", {}).get("result", [])
        if any(s["metric"].get("instance") == addr and s["value"][1] == "1" for s in res):
            break
        time.sleep(0.3)
    else:
        _, t = http("GET", f"http://{prom}/api/v1/targets", token=None)
        raise SystemExit(f"Prometheus never scraped {addr} successfully: {last}\n{t[:2000]!r}")
    _, t = http("GET", f"http://{prom}/api/v1/targets", token=None)
    active = json.loads(t)["data"]["activeTargets"]
    mine = [a for a in active if a["labels"].get("instance") == addr]
    assert len(mine) == 1 and mine[0]["labels"]["job"] == job, active
    assert mine[0]["scrapeUrl"] == f"http://{addr}/metrics", mine[0]
    assert mine[0].get("scrapeInterval", "1s") == "1s", mine[0]
    return mine[0]["labels"]


# ---------------------------------------------------------------- load

class Device:
    """A Hive device: acks every request (unless ack=False); counts what it receives."""

    def __init__(self, ws_addr, device, tok, ack=True):
        self.ws_addr, self.device, self.tok, self.ack = ws_addr, device, tok, ack
        self.ws = None
        self.reader = None
        self.received = collections.Counter()
        self.closed_with = None

    async def connect(self):
        self.ws = await websockets.connect(f"ws://{self.ws_addr}/ws?token={self.tok}", max_size=None, **WS_KW)
        hello = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert hello.get("type") == "authenticated" and hello["device"] == self.device, hello
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self):
        try:
            async for raw in self.ws:
                m = json.loads(raw)
                t = m.get("type", "?")
                self.received[t] += 1
                stats[f"device got {t}" + (f" {m.get('code')}" if t == "error" else "")] += 1
                if t == "device-request" and self.ack:
                    await self.ws.send(json.dumps({"type": "ack", "request": m["request"]}))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_with = self.ws.close_code

    async def send(self, obj):
        await self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    async def close(self):
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 3)
            except Exception:
                pass
        if self.reader is not None:
            try:
                await asyncio.wait_for(self.reader, 3)
            except BaseException:
                self.reader.cancel()


def raw_connect(ws_addr, request, rcvbuf=None, timeout=5):
    host, port = ws_addr.rsplit(":", 1)
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect((host, int(port)))
    s.sendall(request)
    return s


def read_head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def upgrade_request(path, addr, extra=""):
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


class Load:
    def __init__(self, ws_addr, api, tokens):
        self.ws_addr, self.api, self.tokens = ws_addr, api, tokens
        self.stop = asyncio.Event()
        self.tasks = []
        self.devices = []
        self.extra = {}       # dedicated devices by role
        self.raw = []         # raw sockets to close at the end
        self.notes = []       # what the one-off exercises saw

    def tok(self, role):
        d, t = self.tokens[role]
        return d, t

    async def run_http(self, *a, **k):
        return await asyncio.get_running_loop().run_in_executor(None, lambda: http(*a, **k))

    async def start(self):
        # Steady devices (connected now, after Prometheus's first scrape: connects count too).
        self.devices = await asyncio.gather(*(Device(self.ws_addr, d, t).connect()
                                              for d, t in self.tokens["steady"]))
        for role in ("badframe", "takeover", "noack", "flood", "sse1", "sse2", "sse3", "sse4", "sse5", "sse6"):
            d, t = self.tokens[role][0]
            self.extra[role] = await Device(self.ws_addr, d, t, ack=(role != "noack")).connect()
        self.sse_thread = threading.Thread(target=self.sse_reader, daemon=True)
        self.sse_thread.start()
        for coro in (self.device_events(), self.api_events(), self.requests(), self.unauthenticated(),
                     self.exercises()):
            self.tasks.append(asyncio.create_task(coro))

    async def pause(self, seconds):
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        return not self.stop.is_set()

    async def device_events(self):
        n = 0
        while await self.pause(1.0):
            n += 1
            for d in self.devices:
                try:
                    await d.send({"type": "instances", "apps": ["a", "b"], "n": n})
                    stats["event sent by device"] += 1
                except websockets.ConnectionClosed:
                    stats["FAIL steady device closed"] += 1

    async def api_events(self):
        n = 0
        while await self.pause(1.0):
            n += 1
            res = await asyncio.gather(*(self.run_http("POST", f"http://{self.api}/v1/devices/{d.device}/events",
                                                       {"type": "config", "n": n}) for d in self.devices),
                                       return_exceptions=True)
            for r in res:
                stats["api event 202" if not isinstance(r, BaseException) and r[0] == 202
                      else f"FAIL api event {r if isinstance(r, BaseException) else r[0]}"] += 1

    async def requests(self):
        i = 0
        pending = set()
        while await self.pause(0.2):
            d = self.devices[i % len(self.devices)]
            i += 1

            async def one(d=d):
                st, body = await self.run_http("POST", f"http://{self.api}/v1/devices/{d.device}/requests",
                                               {"command": "Ping", "payload": {"i": i}, "timeout_ms": 5000})
                ok = st == 200 and json.loads(body).get("status") == "acked"
                stats["request acked" if ok else f"FAIL request {st}"] += 1
            t = asyncio.create_task(one())
            pending.add(t)
            t.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=6)

    async def unauthenticated(self):
        """Always one connection upgraded but not authenticated (router_handshakes_in_progress);
        the router closes it with 4408 at --auth-timeout (auth failure "timeout"), and another
        takes its place."""
        while not self.stop.is_set():
            try:
                async with websockets.connect(f"ws://{self.ws_addr}/ws", **WS_KW) as ws:
                    while not self.stop.is_set():
                        try:
                            await asyncio.wait_for(ws.recv(), 0.5)
                        except asyncio.TimeoutError:
                            pass
            except websockets.ConnectionClosed as e:
                stats[f"unauthenticated closed {e.rcvd.code if e.rcvd else None}"] += 1
            except (OSError, websockets.InvalidStatus, asyncio.TimeoutError) as e:
                stats[f"unauthenticated refused {type(e).__name__}"] += 1
                await self.pause(0.2)

    def sse_reader(self):
        try:
            req = urllib.request.Request(f"http://{self.api}/v1/events",
                                         headers={"Authorization": f"Bearer {API_TOKEN}"})
            with OPENER.open(req, timeout=30) as resp:
                for raw in resp:
                    if raw.startswith(b"data:"):
                        stats["sse event"] += 1
                    elif raw.startswith(b": lagged"):
                        stats["sse (steady reader) lagged"] += 1
                    if self.stop.is_set():
                        return
        except Exception as e:  # the router stops at the end
            if not self.stop.is_set():
                stats[f"FAIL sse reader {type(e).__name__}"] += 1

    # -------------------------------------------------------- exercises

    async def exercises(self):
        cycle = 0
        while not self.stop.is_set():
            cycle += 1
            started = time.monotonic()
            if cycle == 1:
                await self.rate_limit_flood()
                await asyncio.get_running_loop().run_in_executor(None, self.slow_device)
                await self.sse_lag()
            if cycle == 2:
                await asyncio.get_running_loop().run_in_executor(None, self.connect_burst)
                # The burst used up this second's connects from 127.0.0.1 on both shards.
                if not await self.pause(1.1):
                    return
            await self.small_errors(cycle)
            if not await self.pause(max(0.1, CYCLE - (time.monotonic() - started))):
                return

    async def small_errors(self, cycle):
        api = self.api
        # 4401: forged token (auth failure "invalid").
        try:
            async with websockets.connect(f"ws://{self.ws_addr}/ws?token=forged.token.here", **WS_KW) as ws:
                await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as e:
            stats[f"forged token closed {e.rcvd.code if e.rcvd else None}"] += 1
        except Exception as e:
            stats[f"forged token {type(e).__name__}"] += 1
        # A bad upgrade request (router_handshake_failures_total).
        def bad_upgrade():
            with raw_connect(self.ws_addr, b"GET /no-such-path HTTP/1.1\r\nHost: x\r\n\r\n") as s:
                head = read_head(s)
                return head.split(b"\r\n", 1)[0].decode(errors="replace")
        try:
            stats[f"bad upgrade: {await asyncio.get_running_loop().run_in_executor(None, bad_upgrade)}"] += 1
        except OSError as e:
            stats[f"bad upgrade {type(e).__name__}"] += 1
        # A frame that is not JSON (router_protocol_errors_total{code="bad-json"}), then a good one.
        try:
            await self.extra["badframe"].send("this is not json")
            await self.extra["badframe"].send({"type": "instances", "apps": []})
        except websockets.ConnectionClosed:
            stats["FAIL bad-frame device closed"] += 1
        # Takeover: the same device again; the older connection is closed with 4409.
        d, t = self.tokens["takeover"][0]
        try:
            new = await Device(self.ws_addr, d, t).connect()
            old, self.extra["takeover"] = self.extra["takeover"], new
            await asyncio.wait_for(asyncio.shield(old.reader), 3)
            stats[f"takeover: old closed {old.closed_with}"] += 1
        except Exception as e:
            stats[f"takeover {type(e).__name__}"] += 1
        # Churn: a few devices connect and leave (accepted, handoffs, 1000).
        churn = self.tokens["churn"][(cycle - 1) * CHURN:cycle * CHURN]
        try:
            ds = await asyncio.gather(*(Device(self.ws_addr, d, t).connect() for d, t in churn))
            await asyncio.gather(*(x.close() for x in ds))
            stats["churn connected and left"] += len(ds)
        except Exception as e:
            stats[f"churn {type(e).__name__}"] += 1
        # API: no ack within 300 ms (504), unknown device (404), bad id (400), no token (401).
        noack = self.extra["noack"].device
        calls = [
            ("timeout", "POST", f"http://{api}/v1/devices/{noack}/requests",
             {"command": "Hang", "payload": {}, "timeout_ms": 300}, API_TOKEN, 504),
            ("offline", "POST", f"http://{api}/v1/devices/{uuid.uuid4()}/requests",
             {"command": "Ping", "payload": {}}, API_TOKEN, 404),
            ("bad id", "POST", f"http://{api}/v1/devices/not-a-uuid/events", {"type": "x"}, API_TOKEN, 400),
            ("no token", "GET", f"http://{api}/v1/devices", None, None, 401),
        ]
        res = await asyncio.gather(*(self.run_http(m, u, b, token=tk) for _, m, u, b, tk, _ in calls))
        for (name, *_, want), (st, _) in zip(calls, res):
            stats[f"api {name}: {st}" + ("" if st == want else f" (FAIL, wanted {want})")] += 1

    async def rate_limit_flood(self):
        """260 frames at once: 200 pass (--device-burst), the rest are refused (rate-limited)."""
        dev = self.extra["flood"]
        for i in range(260):
            await dev.send({"type": "instances", "apps": [], "i": i})
        await self.pause(0.5)
        self.notes.append(f"rate-limit flood: device answered {dev.received.get('error', 0)} error frame(s)")

    def slow_device(self):
        """A device that stops reading (tiny receive buffer): events to it are dropped once
        its outbound queue passes --max-outbound (events_dropped{slow_device}, 503), and a big
        request is then refused (requests_rejected, 503) and the device closed (1008)."""
        d, t = self.tokens["slow"][0]
        s = raw_connect(self.ws_addr, upgrade_request(f"/ws?token={t}", self.ws_addr), rcvbuf=4096)
        self.raw.append(s)
        head = read_head(s)
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        blob = "x" * 100_000
        codes = collections.Counter()
        for i in range(120):
            st, _ = http("POST", f"http://{self.api}/v1/devices/{d}/events", {"type": "blob", "i": i, "data": blob})
            codes[st] += 1
            if st == 503:
                break
        big = {"command": "Big", "payload": {"data": "y" * 600_000}, "timeout_ms": 2000}
        st, body = http("POST", f"http://{self.api}/v1/devices/{d}/requests", big)
        self.notes.append(f"slow device: events {dict(codes)}, then a 600 kB request: {st}")

    async def sse_lag(self):
        """An SSE subscriber that stops reading while ~20 MB of events go by (the ring holds
        8 MiB): when it reads again it is told what it missed (router_sse_lagged_total)."""
        t0 = time.monotonic()
        req = (f"GET /v1/events HTTP/1.1\r\nHost: {self.api}\r\nAuthorization: Bearer {API_TOKEN}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        s = await loop.run_in_executor(None, lambda: raw_connect(self.api, req, rcvbuf=4096))
        self.raw.append(s)
        head = await loop.run_in_executor(None, read_head, s)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        blob = "z" * 60_000
        for i in range(60):
            for role in ("sse1", "sse2", "sse3", "sse4", "sse5", "sse6"):
                await self.extra[role].send({"type": "blob", "i": i, "data": blob})
            await asyncio.sleep(0)

        def drain():
            s.settimeout(0.5)
            seen, end = b"", time.monotonic() + 8
            while time.monotonic() < end:
                try:
                    chunk = s.recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                seen = (seen + chunk)[-4096:]
                if b": lagged" in seen:
                    return True
            return False
        await asyncio.sleep(1.0)
        lagged = await loop.run_in_executor(None, drain)
        self.notes.append(f"SSE subscriber that stopped reading: {'told it lagged' if lagged else 'NOT told it lagged'}"
                          f" ({time.monotonic() - t0:.1f} s)")

    def connect_burst(self):
        """300 connects at once from 127.0.0.1: past --ip-connect-rate 100 per shard, 429."""
        socks, codes = [], collections.Counter()
        try:
            for _ in range(300):
                socks.append(raw_connect(self.ws_addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"))
            for s in socks:
                try:
                    codes[read_head(s).split(b" ", 2)[1].decode(errors="replace")] += 1
                except (OSError, IndexError):
                    codes["?"] += 1
        finally:
            for s in socks:
                s.close()
        self.notes.append(f"connect burst: HTTP answers {dict(sorted(codes.items()))}")

    async def shutdown(self):
        self.stop.set()
        await asyncio.wait(self.tasks, timeout=8)
        for t in self.tasks:
            t.cancel()
        for s in self.raw:
            s.close()
        await asyncio.gather(*(d.close() for d in [*self.devices, *self.extra.values()]),
                             return_exceptions=True)


# ---------------------------------------------------------------- the dashboard's expressions

def dashboard_exprs():
    out = []

    def walk(panels, path):
        for p in panels or []:
            title = p.get("title") or p.get("type") or "?"
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((f"{path}{title} [{t.get('refId', '?')}]", t["expr"]))
            walk(p.get("panels"), f"{path}{title} / ")  # a collapsed row keeps its panels here

    files = sorted(glob.glob(os.path.join(REPO, "grafana", "dashboards", "*.json")))
    if not files:
        raise SystemExit("no grafana/dashboards/*.json")
    for f in files:
        with open(f) as fh:
            d = json.load(fh)
        d = d.get("dashboard", d)  # an exported {dashboard: ...} wrapper
        walk(d.get("panels"), f"{os.path.basename(f)}: ")
        for row in d.get("rows") or []:  # the old schema
            walk(row.get("panels"), f"{os.path.basename(f)}: {row.get('title', 'row')} / ")
    return out


VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan", "atan2"}


def substitute(expr):
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        v = SUBSTITUTIONS.get(name)
        if v is None:
            unknown.append(name)
            return m.group(0)
        return v
    return VAR_RE.sub(repl, expr), unknown


def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)   # strings
    e = re.sub(r"\{[^}]*\}", "", e)                                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                      # range windows
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in KEYWORDS:
            continue
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # 1e3, 0.5
        names.add(m.group(0))
    return names


def exported_metrics(addr, token=API_TOKEN):
    st, body = http("GET", f"http://{addr}/metrics", token=token)
    assert st == 200, (addr, st, body[:200])
    names = set()
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


def squash(text):
    return re.sub(r"\s+", "", text)


def evaluate(prom, exprs, exported):
    """One verdict per expression: (status, title, expr, detail)."""
    verdicts = []
    for title, raw in exprs:
        names = metric_names(raw)
        expr, unknown = substitute(raw)
        if unknown:
            verdicts.append(("ERROR", title, raw, f"unknown template variable(s) {unknown}: add to SUBSTITUTIONS"))
            continue
        missing = sorted(n for n in names if n not in exported)
        exempt = sorted(k for k in NOT_EXERCISED
                        if (k in names if NAME_RE.fullmatch(k) else squash(k) in squash(raw)))
        st, r = query(prom, expr)
        if r.get("status") != "success":
            verdicts.append(("ERROR", title, expr, f"HTTP {st} {r.get('errorType', '')}: {r.get('error')}"))
            continue
        data = r["data"]
        if data["resultType"] == "vector":
            values = [float(s["value"][1]) for s in data["result"]]
        elif data["resultType"] == "scalar":
            values = [float(data["result"][1])]
        elif data["resultType"] == "matrix":
            values = [float(v[1]) for s in data["result"] for v in s["values"]]
        else:
            values = []
        real = [v for v in values if not math.isnan(v) and v != 0]
        shown = f"{len(values)} series" if data["resultType"] != "scalar" else "scalar"
        if real:
            shown += f", max {max(real, key=abs):.4g}"
        if missing:
            verdicts.append(("MISSING", title, expr,
                             f"not in the router's nor loadgen's /metrics: {', '.join(missing)}"))
        elif exempt:
            verdicts.append(("OK", title, expr, shown + ("" if real else
                             f"; may be 0, not exercised: {NOT_EXERCISED[exempt[0]]}"
                             + (f" ({', '.join(exempt)})" if len(exempt) > 1 else ""))))
        elif not values:
            verdicts.append(("EMPTY", title, expr, "no series"))
        elif not real:
            verdicts.append(("ZERO", title, expr, shown + ", every value 0 or NaN: the load does not exercise it"))
        else:
            verdicts.append(("OK", title, expr, shown))
    return verdicts


# ---------------------------------------------------------------- main

async def run_load_and_check(ws_addr, api, prom, tokens, first_scrape, exprs, lg, lg_addr):
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
    load = Load(ws_addr, api, tokens)
    try:
        await load.start()
        log(f"load: {DEVICES} devices connected, events, requests, SSE and the error exercises running")
        await asyncio.sleep(max(0.0, first_scrape + SETTLE - time.monotonic()))
        loop = asyncio.get_running_loop()
        if lg.poll() is not None:
            raise SystemExit(f"loadgen ended before the queries (exit {lg.returncode}): raise its --duration")
        exported = await loop.run_in_executor(None, exported_metrics, api)
        exported |= await loop.run_in_executor(None, exported_metrics, lg_addr, None)
        verdicts = await loop.run_in_executor(None, evaluate, prom, exprs, exported)
    finally:
        await load.shutdown()
    return verdicts, load.notes


def main():
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="prometheus-check-")
    procs = []
    ok = False
    try:
        router, ws_addr, api, node = start_router(tmp)
        procs.append(router)
        lg_addr = f"{HOST}:{free_port()}"
        with open(os.path.join(REPO, "grafana", "prometheus.yml")) as f:
            config, job, lg_job, dropped = derive_config(f.read(), api, lg_addr)
        SUBSTITUTIONS.update(job=job, instance=api, node=node)
        prom_proc, prom = start_prometheus(tmp, config)
        procs.append(prom_proc)
        log(f"router {ROUTER} ws={ws_addr} api={api}; Prometheus {prom} (jobs {job!r} and {lg_job!r}"
            f" -> loadgen {lg_addr}, scrape 1s" + (f"; jobs left out: {dropped}" if dropped else "") + ")")

        # Tokens while Prometheus gets its first scrape.
        account = str(uuid.uuid4())
        roles = {"steady": DEVICES, "churn": CHURN * 15, "slow": 1}
        roles.update({r: 1 for r in ("badframe", "takeover", "noack", "flood",
                                     "sse1", "sse2", "sse3", "sse4", "sse5", "sse6")})
        wanted = [(r, str(uuid.uuid4())) for r, n in roles.items() for _ in range(n)]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            toks = list(ex.map(lambda rd: token(rd[1], account), wanted))
        tokens = collections.defaultdict(list)
        for (r, d), t in zip(wanted, toks):
            tokens[r].append((d, t))

        labels = wait_scraped(prom, job, api)
        log(f"Prometheus scraped the router: up == 1, target labels {labels}")
        # loadgen before the check's own load: its backend lists the router's devices once,
        # at the end of its ramp, and must find only its own.
        lg = start_loadgen(tmp, ws_addr, api, lg_addr)
        procs.append(lg)
        lg_labels = wait_scraped(prom, lg_job, lg_addr)
        first_scrape = time.monotonic()
        log(f"loadgen {LOADGEN} in its steady phase; Prometheus scraped it: up == 1, target labels {lg_labels}")

        exprs = dashboard_exprs()
        verdicts, notes = asyncio.run(run_load_and_check(ws_addr, api, prom, tokens, first_scrape, exprs,
                                                         lg, lg_addr))

        for status, title, expr, detail in verdicts:
            log(f"{status:<7} {expr}    -- {title}: {detail}")
        counts = collections.Counter(v[0] for v in verdicts)
        load_fail = {k: v for k, v in stats.items() if k.startswith("FAIL") or "(FAIL" in k}
        log("load: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
        for n in notes:
            log(f"load: {n}")
        bad = sum(n for s, n in counts.items() if s != "OK")
        log(f"{len(verdicts)} expressions: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + f"; {time.monotonic() - t0:.1f} s")
        if load_fail:
            log(f"the steady load failed: {load_fail}")
        if stats["request acked"] == 0:
            log("no request was acked: the load did not run")
            load_fail["no acks"] = 1
        ok = bad == 0 and not load_fail
        if ok:
            log(f"{counts.get('OK', 0)} passed, 0 failed")
        else:
            log(f"{counts.get('OK', 0)} passed, {bad} failed")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not ok:
            for name in ("router.log", "prometheus.log", "loadgen.log"):
                t = tail(os.path.join(tmp, name), 15)
                if t.strip():
                    log(f"--- {name} (last lines)\n{t}")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
