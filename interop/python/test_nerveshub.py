"""Independent NervesHub device, written from the published protocol (Python
`websockets`, `msgpack`, `hashlib.pbkdf2_hmac`, `hmac`), against the real `router`
binary: shared-secret authentication exactly as a stock device computes it (device and
product keys; expired, wrong-secret, wrong-algorithm, weaker and replayed signatures
refused with 401; the key file reloaded on SIGHUP without dropping connections), then
Phoenix `vsn=3.0.0` (MessagePack in binary frames) on `/device-socket/websocket`: join
with firmware metadata, heartbeat, `extensions:get`, the extensions channel (accepted
list, an event published, an unknown extension answered `detach`), a `reboot` request
acked by `rebooting`, console events, and a malformed frame counted. Exits non-zero on
any failure."""

import asyncio
import email.utils
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import msgpack
import websockets
from websockets.asyncio.client import connect

from router_harness import Sse, http, metric, start_router

ROUTER = sys.argv[1]
ACCOUNT = str(uuid.uuid4())
DEVICE = str(uuid.uuid4())
ALG = "NH1-HMAC-sha256-1000-32"


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def etf_int(n):
    """An Erlang integer in the external term format, as term_to_binary writes it."""
    if 0 <= n <= 255:
        return bytes([97, n])
    if -2**31 <= n < 2**31:
        return bytes([98]) + n.to_bytes(4, "big", signed=True)
    mag = abs(n).to_bytes((abs(n).bit_length() + 7) // 8, "little")
    return bytes([110, len(mag), 1 if n < 0 else 0]) + mag


def nh_headers(key, secret, identifier, alg=ALG, t=None, signed_ms=None):
    """The four x-nh-* headers: PBKDF2 key from the secret and a salt naming the
    algorithm, key and time; a token {identifier, signed_at_ms, 86400} MACed with it."""
    t = int(time.time()) if t is None else t
    signed_ms = t * 1000 if signed_ms is None else signed_ms
    _, _, digest, iterations, length = alg.split("-")
    salt = f"NH1:device-socket:shared-secret:connect\n\nx-nh-alg={alg}\nx-nh-key={key}\nx-nh-time={t}\n"
    # `sha` is Erlang's name for SHA-1 (what `key_digest: :sha` sends).
    name = {"sha": "sha1"}.get(digest.lower(), digest.lower())
    k = hashlib.pbkdf2_hmac(name, secret.encode(), salt.encode(), int(iterations), int(length))
    ident = identifier.encode()
    term = bytes([131, 104, 3, 109]) + len(ident).to_bytes(4, "big") + ident + etf_int(signed_ms) + etf_int(86400)
    plain = "SFMyNTY." + b64url(term)
    sig = plain + "." + b64url(hmac.new(k, plain.encode(), hashlib.sha256).digest())
    return {"x-nh-alg": alg, "x-nh-key": key, "x-nh-time": str(t), "x-nh-signature": sig}


def write_keys(path, with_device=True):
    text = ""
    if with_device:
        text += (f'[[device]]\nkey = "nhd_dev1"\nsecret = "device-secret"\nidentifier = "serial-001"\n'
                 f'device = "{DEVICE}"\naccount = "{ACCOUNT}"\n\n')
    text += f'[[product]]\nkey = "nhp_prod"\nsecret = "product-secret"\naccount = "{ACCOUNT}"\n'
    # A product whose devices are configured with `key_digest: :sha, key_iterations: 500`.
    text += (f'\n[[product]]\nkey = "nhp_old"\nsecret = "old-secret"\naccount = "{ACCOUNT}"\n'
             f'digests = ["sha", "sha256"]\nmin_iterations = 500\n')
    with open(path, "w") as f:
        f.write(text)


async def refused_answer(ws_addr, headers):
    """The HTTP answer that refused the upgrade (before any WebSocket)."""
    try:
        async with connect(f"ws://{ws_addr}/device-socket/websocket?vsn=3.0.0", additional_headers=headers):
            raise AssertionError("connected")
    except websockets.InvalidStatus as e:
        return e.response


async def refused(ws_addr, headers):
    """The upgrade is answered 401 (before any WebSocket)."""
    return (await refused_answer(ws_addr, headers)).status_code


class Device:
    """A vsn 3.0.0 Phoenix client: [join_ref, ref, topic, event, payload] in MessagePack."""

    def __init__(self, ws):
        self.ws, self.ref, self.inbox = ws, 0, []

    async def push(self, topic, event, payload, join_ref=None):
        self.ref += 1
        ref = str(self.ref)
        await self.ws.send(msgpack.packb([join_ref, ref, topic, event, payload]))
        return ref

    async def recv(self, pred, timeout=5):
        end = time.monotonic() + timeout
        while True:
            for m in self.inbox:
                if pred(m):
                    self.inbox.remove(m)
                    return m
            frame = await asyncio.wait_for(self.ws.recv(), max(0.01, end - time.monotonic()))
            assert isinstance(frame, bytes), f"a text frame on vsn 3.0.0: {frame!r}"
            self.inbox.append(msgpack.unpackb(frame, raw=False, unicode_errors="surrogateescape"))

    async def reply(self, ref, timeout=5):
        return await self.recv(lambda m: m[1] == ref and m[3] == "phx_reply", timeout)


async def main():
    tmp = tempfile.mkdtemp()
    keys = os.path.join(tmp, "keys.toml")
    write_keys(keys)
    proc, ws_addr, api = start_router(ROUTER, "--nerves-keys", keys, "--nerves-extensions", "health,geo",
                                      "--permessage-deflate")
    try:
        sse = Sse(api)
        await asyncio.sleep(0.3)
        # 1. Refusals, each 401 before the upgrade.
        now = int(time.time())
        cases = {
            "expired (120 s old)": nh_headers("nhd_dev1", "device-secret", "serial-001", t=now - 120),
            "wrong secret": nh_headers("nhd_dev1", "not-the-secret", "serial-001"),
            "wrong algorithm (sha1)": nh_headers("nhd_dev1", "device-secret", "serial-001", alg="NH1-HMAC-sha1-1000-32"),
            "fewer iterations": nh_headers("nhd_dev1", "device-secret", "serial-001", alg="NH1-HMAC-sha256-500-32"),
            "another identifier for a device key": nh_headers("nhd_dev1", "device-secret", "serial-002"),
            "unknown key": nh_headers("nhd_nope", "device-secret", "serial-001"),
            "signed in the future": nh_headers("nhd_dev1", "device-secret", "serial-001", t=now + 60),
        }
        for name, h in cases.items():
            status = await refused(ws_addr, h)
            assert status == 401, (name, status)
        print("shared secret: expired, wrong secret, sha1, 500 iterations, other identifier, unknown key, future: 401")

        # 1b. A device without a real-time clock (it thinks it is 1970): refused, it reads
        #     the server's time from the answer's `date` header (as nerves_hub_link does)
        #     and signs again with it: accepted.
        answer = await refused_answer(ws_addr, nh_headers("nhp_prod", "product-secret", "serial-rtc", t=86400))
        assert answer.status_code == 401
        server_time = email.utils.parsedate_to_datetime(answer.headers["date"]).timestamp()
        assert abs(server_time - time.time()) < 5, answer.headers["date"]
        rtc = await connect(f"ws://{ws_addr}/device-socket/websocket?vsn=3.0.0",
                            additional_headers=nh_headers("nhp_prod", "product-secret", "serial-rtc",
                                                          t=int(server_time)))
        await rtc.close()
        print(f"clock recovery: 401 carried date: {answer.headers['date']}; signed with it, connected")

        # 1c. Per key: a product configured for sha and 500 iterations is accepted with
        #     them; the device key keeps the defaults (refused above).
        old = await connect(f"ws://{ws_addr}/device-socket/websocket?vsn=3.0.0",
                            additional_headers=nh_headers("nhp_old", "old-secret", "serial-old",
                                                          alg="NH1-HMAC-sha-500-32"))
        await old.close()
        assert await refused(ws_addr, nh_headers("nhp_old", "old-secret", "serial-old2",
                                                 alg="NH1-HMAC-sha-100-32")) == 401
        print("per-key algorithms: NH1-HMAC-sha-500-32 accepted where the key allows it")

        # 1d. A device that reconnects within the second it signed presents the same
        #     signature: accepted once its first connection is gone (NervesHub accepts
        #     it too); while that connection is open, a copy is refused as a replay.
        same = nh_headers("nhp_prod", "product-secret", "serial-again")
        first = await connect(f"ws://{ws_addr}/device-socket/websocket?vsn=3.0.0", additional_headers=same)
        assert await refused(ws_addr, same) == 401
        await first.close()
        again_id = str(uuid.uuid5(uuid.UUID(ACCOUNT), "serial-again"))
        for _ in range(50):
            if http("GET", f"http://{api}/v1/devices/{again_id}")[0] == 404:
                break
            await asyncio.sleep(0.05)
        second = await connect(f"ws://{ws_addr}/device-socket/websocket?vsn=3.0.0", additional_headers=same)
        await second.close()
        assert metric(api, 'router_auth_failures_total{reason="replayed"}') == 1
        print("same-second reconnect: the same signature accepted after the first connection closed")

        # 2. A device key: connects; the same headers again are a replay.
        h = nh_headers("nhd_dev1", "device-secret", "serial-001")
        ws = await connect(f"ws://{ws_addr}/device-socket/websocket?vsn=3.0.0", additional_headers=h)
        ext = ws.response.headers.get("sec-websocket-extensions", "")
        assert ext.startswith("permessage-deflate"), ext
        assert await refused(ws_addr, h) == 401
        assert metric(api, 'router_auth_failures_total{reason="replayed"}') == 2
        assert metric(api, 'router_auth_failures_total{reason="weak_algorithm"}') == 3
        print(f"device key: connected ({ext}); the same signature again refused as a replay")

        # 3. vsn 3.0.0: join with firmware metadata, heartbeat, extensions.
        dev = Device(ws)
        meta = {"nerves_fw_uuid": str(uuid.uuid4()), "nerves_fw_version": "1.4.0", "nerves_fw_platform": "rpi4",
                "nerves_fw_architecture": "arm", "nerves_fw_product": "pump", "fwup_version": "1.10.1",
                "device_api_version": "2.3.0", "console_version": "2.0.0",
                "meta": {"firmware_validated": True, "firmware_auto_revert_detected": False}}
        ref = await dev.push("device", "phx_join", meta, join_ref="1")
        r = await dev.reply(ref)
        assert r[4] == {"status": "ok", "response": {}} and r[2] == "device", r
        ev = sse.find(lambda e: e.get("type") == "device-join" and e.get("device") == DEVICE)
        assert ev["payload"]["nerves_fw_version"] == "1.4.0" and ev["payload"]["meta"]["firmware_validated"] is True, ev
        m = await dev.recv(lambda m: m[3] == "extensions:get")
        assert m[1] is None and m[2] == "device", m
        ref = await dev.push("phoenix", "heartbeat", {})
        r = await dev.reply(ref)
        assert r[4] == {"status": "ok", "response": {}}, r
        ref = await dev.push("extensions", "phx_join", {"health": "0.0.1", "geo": "0.0.1", "local_shell": "0.0.1"},
                             join_ref="2")
        r = await dev.reply(ref)
        assert r[4]["status"] == "ok" and sorted(r[4]["response"]) == ["geo", "health"], r
        await dev.push("extensions", "health:attached", {}, join_ref="2")
        await dev.push("extensions", "health:report",
                       {"value": {"metrics": {"cpu_temp": 51.5}, "timestamp": msgpack.Timestamp(1760000000)}},
                       join_ref="2")
        ev = sse.find(lambda e: e.get("type") == "health:report" and e.get("device") == DEVICE)
        assert ev["payload"]["value"]["metrics"]["cpu_temp"] == 51.5, ev
        assert ev["payload"]["value"]["timestamp"] == "2025-10-09T08:53:20Z", ev
        ref = await dev.push("extensions", "local_shell:request_status", {"status": "started"}, join_ref="2")
        r = await dev.reply(ref)
        assert r[4] == {"status": "error", "response": "detach"}, r
        st, _ = http("POST", f"http://{api}/v1/devices/{DEVICE}/events", {"type": "health:check"})
        assert st == 202
        m = await dev.recv(lambda m: m[3] == "health:check")
        assert m[2] == "extensions" and m[1] is None, m
        print("vsn 3.0.0: join (metadata in device-join), heartbeat, extensions:get, extensions [geo, health],"
              " health:report published, unknown extension detached, health:check delivered")

        # 4. A reboot request, acked by the device's `rebooting`; pushes are not answered.
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=http("POST", f"http://{api}/v1/devices/{DEVICE}/requests", {"command": "reboot", "payload": {}})))
        t.start()
        m = await dev.recv(lambda m: m[3] == "reboot")
        assert m[2] == "device" and m[1] is None and "request" in m[4], m
        ref = await dev.push("device", "rebooting", {}, join_ref="1")
        t.join()
        st, body = result["r"]
        assert st == 200 and json.loads(body)["status"] == "acked", (st, body)
        await asyncio.sleep(0.3)
        assert not any(x[1] == ref for x in dev.inbox), "a push was answered"
        print("reboot request acked by the device's rebooting push; the push itself not answered")

        # 5. Console: joined; `dn` from the backend arrives on it; `up` is published.
        ref = await dev.push("console", "phx_join", {"console_version": "2.0.0", "device_api_version": "2.3.0"},
                             join_ref="3")
        assert (await dev.reply(ref))[4]["status"] == "ok"
        http("POST", f"http://{api}/v1/devices/{DEVICE}/events", {"type": "dn", "data": "ls\n"})
        m = await dev.recv(lambda m: m[3] == "dn")
        assert m[2] == "console" and m[4]["data"] == "ls\n", m
        await dev.push("console", "up", {"data": "file1\n"}, join_ref="3")
        ev = sse.find(lambda e: e.get("type") == "up" and e.get("device") == DEVICE)
        assert ev["topic"] == "console" and ev["payload"]["data"] == "file1\n", ev
        print("console: dn delivered on the console channel, up published")

        # 6. A malformed MessagePack frame: counted as a bad Phoenix frame; the socket stays.
        before = metric(api, 'router_phoenix_errors_total{code="bad-frame"}')
        await ws.send(b"\xa5ab")
        ref = await dev.push("phoenix", "heartbeat", {})
        await dev.reply(ref)
        assert metric(api, 'router_phoenix_errors_total{code="bad-frame"}') == before + 1
        print("malformed MessagePack: bad-frame counted, connection kept")

        # 7. A product key: any serial, the device UUID derived from it (UUID v5 in the
        #    account's namespace); JSON (vsn 2.0.0) on /socket/websocket works too.
        h = nh_headers("nhp_prod", "product-secret", "serial-777")
        ws2 = await connect(f"ws://{ws_addr}/socket/websocket?vsn=2.0.0", additional_headers=h)
        derived = str(uuid.uuid5(uuid.UUID(ACCOUNT), "serial-777"))
        await ws2.send(json.dumps(["1", "1", "device", "phx_join", {"device_api_version": "2.3.0"}]))
        assert json.loads(await ws2.recv())[4]["status"] == "ok"
        st, body = http("GET", f"http://{api}/v1/devices/{derived}")
        assert st == 200 and json.loads(body)["connected"], (st, body)
        print(f"product key: serial-777 connected as {derived}")

        # 7b. Compressed both ways (the client compresses what it sends): a large event
        #     arrives whole; a message that inflates past --max-frame closes 1009.
        big = {"type": "config", "blob": "x" * 20000}
        st, _ = http("POST", f"http://{api}/v1/devices/{derived}/events", big)
        assert st == 202, st
        m = None
        while m is None or m[3] != "config":  # (extensions:get comes first)
            m = json.loads(await asyncio.wait_for(ws2.recv(), 5))
        assert len(m[4]["blob"]) == 20000, m[3]
        await ws2.send(json.dumps(["1", "9", "device", "status_update", {"pad": "y" * 100000}]))
        try:
            while True:
                await asyncio.wait_for(ws2.recv(), 5)
        except websockets.ConnectionClosed as e:
            assert e.rcvd and e.rcvd.code == 1009, e
        print("permessage-deflate: a 20 KB event delivered compressed; a bomb past --max-frame closed 1009")

        # 8. SIGHUP: the device key removed; new connections with it refused, the open
        #    connection kept.
        write_keys(keys, with_device=False)
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert await refused(ws_addr, nh_headers("nhd_dev1", "device-secret", "serial-001")) == 401
        ref = await dev.push("phoenix", "heartbeat", {})
        assert (await dev.reply(ref))[4]["status"] == "ok"
        print("SIGHUP: key file read again; the removed key refused, the open connection kept")

        # 9. A text frame on vsn 3.0.0 closes with 4400.
        await ws.send("[]")
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as e:
            assert e.rcvd and e.rcvd.code == 4400, e
        print("a text frame on vsn 3.0.0: closed 4400")
        print("nerveshub: all flows passed")
    finally:
        proc.terminate()
        # A drain lets open connections finish their close handshake (bounded).
        proc.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
