"""Independent consumer check: Python `pika` (nobody here wrote it) reads `hive.events`
through its own queue while a Python `websockets` device talks to the real `router`
binary started with --amqp. Checks routing key, body, properties and the headers of
each event type (the amqp-value-json mapping). Exits non-zero on any failure.

Usage: test_amqp_events.py ROUTER_BINARY   (broker: $HIVE_AMQP_URL or local guest)"""

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pika
import websockets

ROUTER = sys.argv[1]
SECRET = "py-amqp-secret-0123456789abcdef0123456789abcdef"
AMQP_URL = os.environ.get("HIVE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

# pika (1.x) decodes double ('d') and float ('f') field values through its integer
# `long` type, truncating 0.25 to 0. Decode those two tags as IEEE floats and leave
# every other tag to pika, so a float header is checked for what it is on the wire.
_pika_decode_value = pika.data.decode_value


def _decode_value(encoded, offset):
    kind = encoded[offset:offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    return _pika_decode_value(encoded, offset)


pika.data.decode_value = _decode_value


def token(device, account):
    out = subprocess.run([ROUTER, "token", "--device", device, "--account", account, "--secret", SECRET],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def start_router():
    p = subprocess.Popen([ROUTER, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0",
                          "--shards", "2", "--auth-secret", SECRET, "--amqp", AMQP_URL],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("router ready"), line
    fields = dict(kv.split("=", 1) for kv in line.split()[2:])
    return p, fields["ws"], fields["api"]


def readyz(api):
    try:
        with urllib.request.urlopen(f"http://{api}/readyz", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_ready(api):
    deadline = time.time() + 15
    while readyz(api) != 200:
        assert time.time() < deadline, "/readyz never turned 200 (bridge not connected?)"
        time.sleep(0.05)


def open_tap():
    """Our own exclusive queue bound to hive.events with '#': deleted when we disconnect."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ch.exchange_declare(exchange="hive.events", exchange_type="topic", durable=True)
    q = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(queue=q, exchange="hive.events", routing_key="#")
    return conn, ch, q


def collect(ch, q, device, want, timeout=15):
    """Deliveries whose `device` header is ours, until `want` of them or the timeout."""
    got = []
    deadline = time.time() + timeout
    for method, props, body in ch.consume(q, auto_ack=True, inactivity_timeout=0.5):
        if method is not None and (props.headers or {}).get("device") == device:
            got.append((method, props, body))
            if len(got) == want:
                break
        assert time.time() < deadline, f"only {len(got)} of {want} events arrived"
    ch.cancel()
    return got


async def device_sends(ws_addr, device, account, frames):
    hdr = {"Authorization": f"Bearer {token(device, account)}"}
    async with websockets.connect(f"ws://{ws_addr}/ws", additional_headers=hdr) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "authenticated", hello
        for f in frames:
            await ws.send(f)
        # No error reply may come back for any of them.
        try:
            reply = await asyncio.wait_for(ws.recv(), 0.5)
            raise AssertionError(f"router answered {reply}")
        except asyncio.TimeoutError:
            pass


def main():
    conn, ch, q = open_tap()
    proc, ws_addr, api = start_router()
    try:
        wait_ready(api)
        device, account = str(uuid.uuid4()), str(uuid.uuid4())
        long_key = "L" * 300
        frames = [
            # Raw text so u64::MAX reaches the router exactly as written.
            '{"type":"instances","apps":[{"name":"db","healthy":true,"cpu":0.25,"tags":["a",null]}],'
            '"count":3,"big":18446744073709551615,"ok":false,"nothing":null,"%s":"too long for a header"}' % long_key,
            json.dumps({"type": "device-version", "version": "1.2.3", "firmware": {"build": 42, "channel": "stable"}}),
            json.dumps({"type": "device-state", "state": "online", "battery": 0.87,
                        "sensors": [1, 2.5, "x", True, None, {"k": "v"}]}),
        ]
        asyncio.run(device_sends(ws_addr, device, account, frames))
        got = collect(ch, q, device, 3)
        by_key = {m.routing_key: (p, b) for m, p, b in got}
        assert set(by_key) == {"hive-device.instances", "hive-device.device-version",
                               "hive-device.device-state"}, set(by_key)

        for rk, (props, body) in by_key.items():
            assert props.content_type == "application/json", (rk, props.content_type)
            assert props.delivery_mode == 2, (rk, props.delivery_mode)
            ev = json.loads(body)
            h = props.headers
            for k in ("device", "account", "service"):
                assert h[k] == ev[k], (rk, k, h[k], ev[k])
            assert ev["device"] == device and ev["account"] == account and ev["service"] == "hive-device", ev
            assert h["type"] == rk.split(".", 1)[1], (rk, h["type"])

        props, body = by_key["hive-device.instances"]
        h = props.headers
        assert b"18446744073709551615" in body, body
        assert json.loads(body)["big"] == 18446744073709551615
        assert h["apps"] == [{"name": "db", "healthy": True, "cpu": 0.25, "tags": ["a", None]}], h["apps"]
        assert isinstance(h["apps"][0]["cpu"], float), "a JSON float is an AMQP double"
        assert h["count"] == 3 and isinstance(h["count"], int), h["count"]
        assert h["big"] == "18446744073709551615", h["big"]  # exact text, not a rounded double
        assert h["ok"] is False and h["nothing"] is None, h
        assert long_key not in h and long_key in json.loads(body), "long key: body only"

        props, body = by_key["hive-device.device-version"]
        assert props.headers["version"] == "1.2.3"
        assert props.headers["firmware"] == {"build": 42, "channel": "stable"}, props.headers["firmware"]

        props, body = by_key["hive-device.device-state"]
        assert props.headers["battery"] == 0.87 and isinstance(props.headers["battery"], float)
        assert props.headers["sensors"] == [1, 2.5, "x", True, None, {"k": "v"}], props.headers["sensors"]
        assert json.loads(body)["sensors"] == [1, 2.5, "x", True, None, {"k": "v"}]

        with urllib.request.urlopen(f"http://{api}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert "router_amqp_connected 1" in metrics
        assert "router_amqp_header_keys_skipped_total 1" in metrics
        print("python pika consumer: hive.events routing keys, bodies, properties and headers ok")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        conn.close()


main()
