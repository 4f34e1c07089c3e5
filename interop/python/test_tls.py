"""TLS and mTLS with independent parts: certificates made here by the openssl CLI,
the client is Python's ssl + websockets. Checks: wss with a token; mTLS with a client
certificate (device = CN, account = OU) and no token; a certificate from another CA
refused; a plain-TCP client refused by the TLS listener; request/ack over mTLS."""

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid

import websockets

ROUTER = sys.argv[1]
SECRET = "tls-secret-0123456789abcdef0123456789abcdef"
D = tempfile.mkdtemp(prefix="hive-tls-")


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def make_ca(name):
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", f"{D}/{name}.key", "-out", f"{D}/{name}.pem", "-days", "2", "-subj", f"/CN={name}")


def make_cert(name, ca, subj, ext):
    sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", f"{D}/{name}.key", "-out", f"{D}/{name}.csr", "-subj", subj)
    with open(f"{D}/{name}.ext", "w") as f:
        f.write(ext)
    sh("openssl", "x509", "-req", "-in", f"{D}/{name}.csr", "-CA", f"{D}/{ca}.pem", "-CAkey", f"{D}/{ca}.key",
       "-CAcreateserial", "-out", f"{D}/{name}.pem", "-days", "2", "-extfile", f"{D}/{name}.ext")


device, account = str(uuid.uuid4()), str(uuid.uuid4())
make_ca("ca")
make_ca("rogue")
make_cert("server", "ca", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
make_cert("client", "ca", f"/OU={account}/CN={device}", "extendedKeyUsage=clientAuth\n")
make_cert("rogue-client", "rogue", f"/OU={account}/CN={device}", "extendedKeyUsage=clientAuth\n")

proc = subprocess.Popen([ROUTER, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--shards", "2",
                         "--auth-secret", SECRET, "--tls-cert", f"{D}/server.pem", "--tls-key", f"{D}/server.key",
                         "--client-ca", f"{D}/ca.pem"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
line = proc.stdout.readline()
assert line.startswith("router ready"), line
fields = dict(kv.split("=", 1) for kv in line.split()[2:])
WS, API = fields["ws"], fields["api"]


def ctx(client=None):
    c = ssl.create_default_context(cafile=f"{D}/ca.pem")
    if client:
        c.load_cert_chain(f"{D}/{client}.pem", f"{D}/{client}.key")
    return c


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def metric(name):
    text = urllib.request.urlopen(f"http://{API}/metrics").read().decode()
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))


async def main():
    # 1. wss with a token (no client certificate).
    tok = subprocess.run([ROUTER, "token", "--device", str(uuid.uuid4()), "--account", account, "--secret", SECRET],
                         check=True, capture_output=True, text=True).stdout.strip()
    async with websockets.connect(f"wss://localhost:{WS.split(':')[1]}/ws?token={tok}", ssl=ctx()) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "authenticated", hello

    # 2. mTLS: the certificate is the credential; then a request/ack round trip.
    async with websockets.connect(f"wss://localhost:{WS.split(':')[1]}/ws", ssl=ctx("client")) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello == {"type": "authenticated", "device": device, "account": account}, hello
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(None, post, f"http://{API}/v1/devices/{device}/requests",
                                    {"command": "DeviceCommand", "payload": {"big": "x" * 100000}})
        req = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert req["type"] == "device-request" and len(req["payload"]["big"]) == 100000
        await ws.send(json.dumps({"type": "ack", "request": req["request"]}))
        status, body = await asyncio.wait_for(call, 5)
        assert status == 200 and body["status"] == "acked", body

    # 3. A certificate from another CA: the TLS handshake fails.
    try:
        async with websockets.connect(f"wss://localhost:{WS.split(':')[1]}/ws", ssl=ctx("rogue-client")) as ws:
            await asyncio.wait_for(ws.recv(), 5)
        raise AssertionError("rogue certificate accepted")
    except (ssl.SSLError, websockets.ConnectionClosed, ConnectionResetError, websockets.InvalidHandshake, OSError):
        pass

    # 4. Plain ws:// against the TLS listener: refused, counted.
    try:
        async with websockets.connect(f"ws://{WS}/ws?token={tok}", open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)
        raise AssertionError("plain connection accepted by the TLS listener")
    except (websockets.InvalidHandshake, websockets.ConnectionClosed, ConnectionResetError, OSError, asyncio.TimeoutError):
        pass
    await asyncio.sleep(0.3)
    assert metric("router_tls_handshake_failures_total") >= 2, metric("router_tls_handshake_failures_total")
    print("python ssl + websockets: wss token auth, mTLS identity + request/ack, rogue CA refused, plain refused: ok")


try:
    asyncio.run(main())
finally:
    proc.terminate()
    proc.wait(timeout=15)
    shutil.rmtree(D, ignore_errors=True)
