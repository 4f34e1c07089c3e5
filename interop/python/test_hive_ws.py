"""Independent client check: Python `websockets` (nobody here wrote it) against the
real `router` binary. Auth (header and first frame), an event seen on /v1/events,
and a request/ack round trip through the HTTP API. Exits non-zero on any failure."""

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
import uuid

import websockets

ROUTER = sys.argv[1]
SECRET = "py-secret-0123456789abcdef0123456789abcdef"


def token(device, account):
    out = subprocess.run([ROUTER, "token", "--device", device, "--account", account, "--secret", SECRET],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def start_router():
    p = subprocess.Popen([ROUTER, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0",
                          "--shards", "2", "--auth-secret", SECRET],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("router ready"), line
    fields = dict(kv.split("=", 1) for kv in line.split()[2:])
    return p, fields["ws"], fields["api"]


def sse_reader(api, found, want_type):
    with urllib.request.urlopen(f"http://{api}/v1/events", timeout=10) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data:"):
                ev = json.loads(line[5:].strip())
                if ev.get("type") == want_type:
                    found.append(ev)
                    return


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


async def main():
    proc, ws_addr, api = start_router()
    try:
        device, account = str(uuid.uuid4()), str(uuid.uuid4())
        found = []
        t = threading.Thread(target=sse_reader, args=(api, found, "instances"), daemon=True)
        t.start()
        await asyncio.sleep(0.3)

        # Auth by header, then an event with a spoofed device id.
        hdr = {"Authorization": f"Bearer {token(device, account)}"}
        async with websockets.connect(f"ws://{ws_addr}/ws", additional_headers=hdr) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert hello == {"type": "authenticated", "device": device, "account": account}, hello
            await ws.send(json.dumps({"type": "instances", "device": str(uuid.uuid4()), "apps": ["a"]}))
            t.join(timeout=5)
            assert found, "event not seen on /v1/events"
            assert found[0]["device"] == device and found[0]["service"] == "hive-device", found[0]

            # Request through the API; the device acks.
            loop = asyncio.get_running_loop()
            url = f"http://{api}/v1/devices/{device}/requests"
            call = loop.run_in_executor(None, post, url, {"command": "DeviceCommand", "payload": {"x": 1}})
            req = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert req["type"] == "device-request" and req["command"] == "DeviceCommand", req
            await ws.send(json.dumps({"type": "ack", "request": req["request"]}))
            status, body = await asyncio.wait_for(call, 5)
            assert status == 200 and body["status"] == "acked" and body["request"] == req["request"], body

        # Auth by first frame; a wrong token closes with 4401.
        d2 = str(uuid.uuid4())
        async with websockets.connect(f"ws://{ws_addr}/ws") as ws:
            await ws.send(f"Bearer {token(d2, account)}")
            hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert hello["device"] == d2, hello
        async with websockets.connect(f"ws://{ws_addr}/ws?token=forged.token.here") as ws:
            try:
                await asyncio.wait_for(ws.recv(), 5)
                raise AssertionError("forged token accepted")
            except websockets.ConnectionClosed as e:
                assert e.rcvd is not None and e.rcvd.code == 4401, e
        print("python websockets client: auth, event, request/ack, 4401 ok")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


asyncio.run(main())
