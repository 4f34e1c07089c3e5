"""What the independent Python clients share: start the real `router` binary, mint
tokens with it, call its HTTP API, read /metrics, and collect /v1/events."""

import json
import subprocess
import threading
import urllib.error
import urllib.request


def start_router(router, *args):
    """`router serve` on ephemeral loopback ports; (process, ws address, api address)."""
    p = subprocess.Popen([router, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--shards", "2",
                          *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("router ready"), line
    fields = dict(kv.split("=", 1) for kv in line.split()[2:])
    return p, fields["ws"], fields["api"]


def token(router, device, account, secret):
    out = subprocess.run([router, "token", "--device", device, "--account", account, "--secret", secret],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def http(method, url, body=None):
    """(status, body text); HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(api, name):
    """One sample of /metrics, by its full name (labels included)."""
    _, text = http("GET", f"http://{api}/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


class Sse:
    """Every event of /v1/events, collected by a thread."""

    def __init__(self, api):
        self.events, self.cond = [], threading.Condition()
        threading.Thread(target=self._read, args=(api,), daemon=True).start()

    def _read(self, api):
        with urllib.request.urlopen(f"http://{api}/v1/events", timeout=60) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    with self.cond:
                        self.events.append(json.loads(line[5:].strip()))
                        self.cond.notify_all()

    def find(self, pred, timeout=10):
        """The first event `pred` accepts, waiting up to `timeout` seconds for it."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(e) for e in self.events), timeout), self.events[-5:]
            return next(e for e in self.events if pred(e))
