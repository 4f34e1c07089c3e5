"""Independent Hivekit client, written from the protocol as docs/protocols.md gives it
(Python `websockets`), against the real `router` binary started with
`--hivekit-realm plant-7`. Each flow a device app uses through the public Hivekit
client: authentication (a failed `Bearer`, then a good one on the same socket; the
attempt limit), its realm (list, get, the subscriptions the client makes on its own),
writes of its own object (every shortcode spelled out in the published event), pubsub
subscriptions, backend events and requests as realm pubsub messages, a request acked and
one answered by publishing into the realm, a request resent after a reconnect, and the
refusals (403, 400, 501). Exits non-zero on any failure."""

import asyncio
import json
import subprocess
import sys
import threading
import uuid

import websockets

from router_harness import Sse, http, metric, start_router
from router_harness import token as mint

ROUTER = sys.argv[1]
SECRET = "py-hivekit-secret-0123456789abcdef0123456789abcdef"
REALM = "plant-7"


def token(device, account):
    return mint(ROUTER, device, account, SECRET)


async def recv(ws, timeout=5):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send(ws, actions):
    await ws.send(json.dumps(actions))


async def call(ws, action):
    """One action with a fresh cid; the reply carrying that cid (pushes seen meanwhile
    are returned too)."""
    cid = uuid.uuid4().hex[:12]
    await send(ws, [dict(action, cid=cid)])
    pushes = []
    while True:
        for m in await recv(ws):
            if m.get("cid") == cid:
                return m, pushes
            pushes.append(m)


async def authenticated(ws_addr, device, account):
    ws = await websockets.connect(f"ws://{ws_addr}/v1/ws")
    await ws.send(f"Bearer {token(device, account)}")
    ok = await recv(ws)
    assert ok[0]["act"] == "aut" and ok[0]["res"] == "suc", ok
    return ws, ok


def pub(event, data, idp="*"):
    return {"typ": "rea", "act": "pub", "id": REALM, "dat": {"eve": event, "idp": idp, "dat": data}}


def sub(event, idp="*", act="sub"):
    return {"typ": "rea", "act": act, "id": REALM, "dat": {"eve": event, "idp": idp}}


async def main():
    proc, ws_addr, api = start_router(ROUTER, "--auth-secret", SECRET, "--auth-timeout", "3",
                                      "--hivekit-realm", REALM)
    try:
        sse = Sse(api)
        device, account = str(uuid.uuid4()), str(uuid.uuid4())

        # 1. Authentication: a frame that is not `Bearer`, then a stale token, are
        #    answered aut/err on a socket that stays open; the good token gets in.
        ws = await websockets.connect(f"ws://{ws_addr}/v1/ws")
        await send(ws, [{"typ": "sys", "act": "hbt", "cid": "early"}])
        r = await recv(ws)
        assert r[0]["typ"] == "sys" and r[0]["act"] == "aut" and r[0]["res"] == "err" and "cid" not in r[0], r
        expired = subprocess.run([ROUTER, "token", "--device", device, "--account", account, "--secret", "wrong-0123456789abcdef0123456789abcdef"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        await ws.send(f"Bearer {expired}")
        r = await recv(ws)
        assert r[0]["res"] == "err" and r[0]["err"] == "invalid token", r
        await ws.send(f"Bearer {token(device, account)}")
        r = await recv(ws)
        assert r[0]["res"] == "suc" and r[0]["dat"]["realm"] == REALM, r
        print("auth: aut/err twice on one socket, then aut/suc in realm", REALM)

        # 2. The realm: listed, read; another realm is refused; the subscriptions the
        #    client makes on its own (realm data, realm list) are accepted, object ones not.
        r, _ = await call(ws, {"typ": "rea", "act": "lis"})
        assert r["res"] == "suc" and list(r["dat"]) == [REALM], r
        r, _ = await call(ws, {"typ": "rea", "act": "rea", "id": REALM})
        assert r["dat"] == {"id": REALM, "lab": REALM, "dat": {}}, r
        r, _ = await call(ws, {"typ": "rea", "act": "rea", "id": "someone-elses"})
        assert r["res"] == "err" and r["erc"] == 403, r
        r, _ = await call(ws, {"typ": "sub", "act": "cre", "id": f"realm-data-{REALM}-x", "rea": REALM,
                               "dat": {"typ": "rea", "sty": "rea"}})
        assert r["res"] == "suc", r
        r, _ = await call(ws, {"typ": "sub", "act": "cre", "id": "realm-subscription--y", "rea": "sys",
                               "dat": {"typ": "sys", "sty": "rea"}})
        assert r["res"] == "suc", r
        r, _ = await call(ws, {"typ": "sub", "act": "cre", "id": "object-subscription-z", "rea": REALM,
                               "dat": {"typ": "obj", "sty": "rea"}})
        assert r["res"] == "err" and r["erc"] == 501, r
        print("realm: lis, rea, 403 for another, realm subscriptions suc, object subscription 501")

        # 3. Its own object: create, update (location with every location key), set
        #    (no cid: no answer on success); every shortcode spelled out in the event.
        r, _ = await call(ws, {"typ": "obj", "act": "cre", "id": device, "rea": REALM, "lab": "pump 7",
                               "dat": {"kind": "pump"}, "tds": ["t-1"]})
        assert r["res"] == "suc", r
        ev = sse.find(lambda e: e.get("device") == device and e.get("action") == "cre")
        assert ev["type"] == "object-data" and ev["label"] == "pump 7" and ev["taskIds"] == ["t-1"], ev
        assert ev["data"] == {"kind": "pump"} and ev["realm"] == REALM and ev["account"] == account, ev
        r, _ = await call(ws, {"typ": "obj", "act": "upd", "id": device, "rea": REALM,
                               "loc": {"lon": 24.9, "lat": 60.2, "acc": 3, "alt": 12, "alc": 2, "spe": 1.5,
                                       "hea": 90, "gcs": "wgs84", "time": "2026-12-03T10:00:00Z"}})
        assert r["res"] == "suc", r
        ev = sse.find(lambda e: e.get("device") == device and e.get("type") == "location")
        assert ev["location"] == {"longitude": 24.9, "latitude": 60.2, "accuracy": 3, "altitude": 12,
                                  "altitudeAccuracy": 2, "speed": 1.5, "heading": 90,
                                  "coordinateSystem": "wgs84", "time": "2026-12-03T10:00:00Z"}, ev
        await send(ws, [{"typ": "obj", "act": "set", "id": device, "dat": {"rpm": 1200}, "atr": ["x"]},
                        {"typ": "sys", "act": "hbt", "cid": "after-set"}])
        r = await recv(ws)
        assert r == [{"cid": "after-set", "res": "suc"}], r
        ev = sse.find(lambda e: e.get("device") == device and e.get("action") == "set")
        assert ev["data"] == {"rpm": 1200} and ev["attribute"] == ["x"], ev
        r, _ = await call(ws, {"typ": "obj", "act": "upd", "id": str(uuid.uuid4()), "rea": REALM, "dat": {}})
        assert r["res"] == "err" and r["erc"] == 403, r
        print("objects: cre/upd/set published spelled out; another device's object 403")

        # 4. Backend events: refused (409) until subscribed, then realm pubsub messages,
        #    one per matching subscription.
        st, body = http("POST", f"http://{api}/v1/devices/{device}/events", {"type": "config", "v": 1})
        assert st == 409, (st, body)
        for s in (sub("config"), sub("config", idp=device), sub("hive.request")):
            r, _ = await call(ws, s)
            assert r["res"] == "suc", r
        st, body = http("POST", f"http://{api}/v1/devices/{device}/events", {"type": "config", "v": 2})
        assert st == 202, (st, body)
        msgs = await recv(ws)
        assert sorted(m["sid"] for m in msgs) == sorted(["*", device]), msgs
        for m in msgs:
            assert m["typ"] == "rea" and m["act"] == "pub" and m["rea"] == REALM and "cid" not in m, m
            assert m["dat"] == {"eve": "config", "dat": {"type": "config", "v": 2}}, m
        print("events: 409 before a subscription, then one rea/pub per matching subscription")

        # 5. Requests: delivered as `hive.request`, acked by publishing `hive.ack` (at most
        #    once: a second ack counts as unmatched), answered with `hive.response`.
        results = {}

        def request(name, body, wait):
            results[name] = http("POST", f"http://{api}/v1/devices/{device}/requests?wait={wait}", body)

        t = threading.Thread(target=request, args=("ack", {"command": "reboot", "payload": {"in": 5}}, "ack"))
        t.start()
        m = (await recv(ws))[0]
        assert m["dat"]["eve"] == "hive.request" and "cid" not in m, m
        req = m["dat"]["dat"]
        assert req["command"] == "reboot" and req["payload"] == {"in": 5}, req
        r, _ = await call(ws, pub("hive.ack", {"id": req["id"]}))
        assert r["res"] == "suc", r
        t.join()
        st, body = results["ack"]
        assert st == 200 and json.loads(body)["status"] == "acked", (st, body)
        before = metric(api, "router_acks_unmatched_total")
        r, _ = await call(ws, pub("hive.ack", {"id": req["id"]}))
        assert metric(api, "router_acks_unmatched_total") == before + 1
        t = threading.Thread(target=request, args=("resp", {"command": "read", "payload": {}}, "response"))
        t.start()
        req = (await recv(ws))[0]["dat"]["dat"]
        r, _ = await call(ws, pub("hive.response", {"id": req["id"], "result": {"temp": 21.5}}))
        t.join()
        st, body = results["resp"]
        assert st == 200 and json.loads(body)["result"] == {"temp": 21.5}, (st, body)
        t = threading.Thread(target=request, args=("fail", {"command": "read", "payload": {}}, "response"))
        t.start()
        req = (await recv(ws))[0]["dat"]["dat"]
        await call(ws, pub("hive.response", {"id": req["id"], "error": {"reason": "sensor offline"}}))
        t.join()
        st, body = results["fail"]
        assert st == 200 and json.loads(body)["status"] == "error", (st, body)
        r, _ = await call(ws, pub("hive.ack", {"id": "not-a-request-id"}))
        assert r["res"] == "err" and r["erc"] == 400, r
        print("requests: acked once by hive.ack, answered by hive.response (result and error)")

        # 6. Resent on reconnect before the deadline: unacked, the device goes away;
        #    it comes back, subscribes, and gets the same request again.
        t = threading.Thread(target=request, args=("again", {"command": "update", "payload": {},
                                                                "timeout_ms": 10000}, "ack"))
        t.start()
        first = (await recv(ws))[0]["dat"]["dat"]
        await ws.close()
        ws, _ = await authenticated(ws_addr, device, account)
        _, pushes = await call(ws, sub("hive.request"))
        while not pushes:
            pushes = await recv(ws)
        again = pushes[0]["dat"]["dat"]
        assert again["id"] == first["id"], (first, again)
        await call(ws, pub("hive.ack", {"id": again["id"]}))
        t.join()
        st, body = results["again"]
        assert st == 200, (st, body)
        print("reconnect: the unacked request was resent to the new connection and acked")

        # 7. Device publishes reach the backend; refusals come with erc and err.
        r, _ = await call(ws, pub("door", {"open": True}))
        ev = sse.find(lambda e: e.get("device") == device and e.get("type") == "pubsub")
        assert ev["event"] == "door" and ev["data"] == {"open": True} and ev["realm"] == REALM, ev
        for action, erc in [({"typ": "are", "act": "lis", "rea": REALM}, 501),
                            ({"typ": "obj", "act": "lis", "rea": REALM}, 501),
                            ({"typ": "rea", "act": "cre", "id": "new-realm"}, 403),
                            ({"typ": "obj", "act": "del", "id": device, "rea": REALM}, 403),
                            ({"typ": "zzz", "act": "q"}, 400)]:
            r, _ = await call(ws, action)
            assert r["res"] == "err" and r["erc"] == erc and isinstance(r["err"], str), (action, r)
        print("publishes reach the backend as pubsub events; refusals 403/400/501 with err")

        # 8. Too many failed `Bearer`s close with 4401.
        bad = await websockets.connect(f"ws://{ws_addr}/v1/ws")
        for _ in range(5):
            await bad.send("Bearer nope")
        code = None
        try:
            while True:
                await asyncio.wait_for(bad.recv(), 5)
        except websockets.ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
        assert code == 4401, code
        assert metric(api, 'router_auth_failures_total{reason="invalid"}') >= 6
        print("five failed Bearer frames: closed 4401")
        await ws.close()
        print("hivekit protocol: all flows passed")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
