"""Device tokens from an identity service, minted by an independent library (PyJWT with
`cryptography`), verified by the router against public keys: a PEM file and a JWKS
document served over HTTPS by a server whose certificate comes from an openssl-made CA.

Checks: every algorithm (RS256/384/512, PS256/384/512, ES256, ES384, EdDSA) connects; a
token is refused (4401, counted by reason) when expired, signed by another key, naming an
unknown kid, HS256 signed with the public key (algorithm confusion), `alg: none`, with a
tampered payload, without the configured issuer or audience, with an algorithm its key's
type does not allow, with a `crit` header, or pointing at a key with `jku` (never
fetched); rotation: a key added to the JWKS is accepted at once through one refetch, a
key removed stops new connections only (a device connected with it stays), refetches for
unknown kids are rate-limited; a JWKS URL that is down at start is said and retried; a
JWKS file is read again on SIGHUP."""

import asyncio
import base64
import hashlib
import hmac
import http.server as httpserver
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import jwt
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from router_harness import http, metric, start_router

ROUTER = sys.argv[1]
D = tempfile.mkdtemp(prefix="hive-jwt-")
ISS, AUD = "https://id.example", "hive-router"
SECRET = "jwt-test-secret-0123456789abcdef0123456789"


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


# --- keys (PyJWT/cryptography) -------------------------------------------------------
KEYS = {
    "rsa1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ec256": ec.generate_private_key(ec.SECP256R1()),
    "ec384": ec.generate_private_key(ec.SECP384R1()),
    "ed1": ed25519.Ed25519PrivateKey.generate(),
    "pemkey": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}
ROGUE = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(kid):
    pub = KEYS[kid].public_key()
    if kid.startswith("rsa"):
        d = json.loads(RSAAlgorithm.to_jwk(pub))
    elif kid.startswith("ec"):
        d = json.loads(ECAlgorithm.to_jwk(pub))
    else:
        d = json.loads(OKPAlgorithm.to_jwk(pub))
    d["kid"] = kid
    d["use"] = "sig"
    return d


def pem_public(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


with open(f"{D}/pemkey.pem", "wb") as f:
    f.write(pem_public(KEYS["pemkey"]))


def token(kid, alg, key=None, claims=None, headers=None, with_kid=True, drop=()):
    now = int(time.time())
    c = {"sub": str(uuid.uuid4()), "acc": str(uuid.uuid4()), "exp": now + 600, "iat": now,
         "iss": ISS, "aud": AUD}
    c.update(claims or {})
    for k in drop:
        c.pop(k)
    h = dict(headers or {})
    if with_kid and kid:
        h["kid"] = kid
    return jwt.encode(c, key if key is not None else KEYS[kid], algorithm=alg, headers=h)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256_by_hand(secret, kid):
    """What an attacker sends for the HS/RS confusion: HS256 "signed" with the public key's
    PEM bytes (PyJWT itself refuses to make one)."""
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps({"sub": str(uuid.uuid4()), "acc": str(uuid.uuid4()), "exp": now + 600,
                           "iss": ISS, "aud": AUD}).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


# --- the identity service: JWKS over HTTPS (openssl CA) --------------------------------
sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
   "-keyout", f"{D}/ca.key", "-out", f"{D}/ca.pem", "-days", "2", "-subj", "/CN=hive-test-ca")
sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
   "-keyout", f"{D}/id.key", "-out", f"{D}/id.csr", "-subj", "/CN=127.0.0.1")
with open(f"{D}/id.ext", "w") as f:
    f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
sh("openssl", "x509", "-req", "-in", f"{D}/id.csr", "-CA", f"{D}/ca.pem", "-CAkey", f"{D}/ca.key",
   "-CAcreateserial", "-out", f"{D}/id.pem", "-days", "2", "-extfile", f"{D}/id.ext")

JWKS = {"keys": [jwk("rsa1"), jwk("ec256"), jwk("ec384"), jwk("ed1")]}
FETCHES = []


class IdService(httpserver.BaseHTTPRequestHandler):
    def do_GET(self):
        FETCHES.append(time.time())
        body = json.dumps(JWKS).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        # Long: every fetch after the first is one the router asked for (an unknown kid).
        self.send_header("cache-control", "public, max-age=3600")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


srv = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), IdService)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(f"{D}/id.pem", f"{D}/id.key")
srv.socket = tls.wrap_socket(srv.socket, server_side=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
JWKS_URL = f"https://127.0.0.1:{srv.server_address[1]}/jwks.json"

# A listener that counts connections: a `jku` pointing here must never be followed.
jku_hits = []
jku_srv = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), IdService)
jku_srv.RequestHandlerClass = type("Jku", (IdService,), {"do_GET": lambda self: jku_hits.append(1)})
threading.Thread(target=jku_srv.serve_forever, daemon=True).start()
JKU = f"http://127.0.0.1:{jku_srv.server_address[1]}/evil.json"


async def outcome(ws_addr, tok):
    """'ok' if the router authenticates the token, else the close code."""
    async with websockets.connect(f"ws://{ws_addr}/ws?token={tok}") as ws:
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return "ok" if first.get("type") == "authenticated" else first
        except websockets.ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None


def run(coro):
    return asyncio.run(coro)


def wait_for(pred, what, timeout=15):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


proc, WS, API = start_router(ROUTER, "--auth-jwks", JWKS_URL, "--auth-jwks-ca", f"{D}/ca.pem",
                             "--auth-public-key", f"{D}/pemkey.pem", "--auth-secret", SECRET,
                             "--auth-issuer", ISS, "--auth-audience", AUD)
try:
    wait_for(lambda: metric(API, "router_auth_jwks_loads_total") >= 1, "the first JWKS fetch")
    assert metric(API, "router_auth_public_keys") == 6, metric(API, "router_auth_public_keys")  # 4 JWKS + pem twice

    # Every algorithm, each key's own.
    for kid, alg in [("rsa1", "RS256"), ("rsa1", "RS384"), ("rsa1", "RS512"), ("rsa1", "PS256"),
                     ("rsa1", "PS384"), ("rsa1", "PS512"), ("ec256", "ES256"), ("ec384", "ES384"),
                     ("ed1", "EdDSA"), ("pemkey", "RS256")]:
        got = run(outcome(WS, token(kid, alg)))
        assert got == "ok", (kid, alg, got)
    # A PEM key without a kid in the token: tried by its type.
    assert run(outcome(WS, token("pemkey", "PS256", with_kid=False))) == "ok"
    # HS256 with the router's secret still works beside the keys.
    assert run(outcome(WS, token(None, "HS256", key=SECRET))) == "ok"
    print("every algorithm accepted: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, PEM, HS256")

    fetches_before = len(FETCHES)
    refused = {
        "expired": token("rsa1", "RS256", claims={"exp": int(time.time()) - 120}),
        "another key": token("rsa1", "RS256", key=ROGUE),
        "HS256 signed with the public key": hs256_by_hand(pem_public(KEYS["rsa1"]), "rsa1"),
        "alg none": jwt.encode({"sub": str(uuid.uuid4()), "acc": str(uuid.uuid4()), "exp": int(time.time()) + 60,
                                "iss": ISS, "aud": AUD}, None, algorithm="none", headers={"kid": "rsa1"}),
        "no issuer": token("rsa1", "RS256", drop=("iss",)),
        "wrong audience": token("rsa1", "RS256", claims={"aud": "someone-else"}),
        "ES256 under an RSA kid": token("rsa1", "ES256", key=KEYS["ec256"]),
        "crit header": token("rsa1", "RS256", headers={"crit": ["exp"]}),
        "jku to a key of the attacker": token("rsa1", "RS256", key=ROGUE, headers={"jku": JKU}),
    }
    good = token("ec256", "ES256").split(".")
    payload = json.loads(base64.urlsafe_b64decode(good[1] + "=="))
    payload["sub"] = str(uuid.uuid4())
    good[1] = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    refused["tampered payload"] = ".".join(good)
    for what, tok in refused.items():
        got = run(outcome(WS, tok))
        assert got == 4401, (what, got)
    assert not jku_hits, "the router followed a jku"
    assert len(FETCHES) == fetches_before, "a refusal above made the router fetch the JWKS"
    for reason, at_least in [("expired", 1), ("invalid", 3), ("issuer_audience", 2), ("weak_algorithm", 1),
                             ("crit", 1)]:
        n = metric(API, f'router_auth_failures_total{{reason="{reason}"}}')
        assert n >= at_least, (reason, n)
    print("refused with 4401:", ", ".join(refused))

    # Rotation. A device connected with rsa1 stays through all of it.
    async def rotation():
        kept_dev = str(uuid.uuid4())
        kept = await websockets.connect(f"ws://{WS}/ws?token=" + token("rsa1", "RS256", claims={"sub": kept_dev}))
        assert json.loads(await kept.recv())["type"] == "authenticated"
        # rsa2 is published: a token naming it makes the router fetch once, then it is in.
        JWKS["keys"].append(jwk("rsa2"))
        n = len(FETCHES)
        assert await outcome(WS, token("rsa2", "RS256")) == "ok"
        assert len(FETCHES) == n + 1, (n, len(FETCHES))
        # Unknown kids right after: refused without another fetch (one per 10 s at most).
        for _ in range(5):
            assert await outcome(WS, token("forged-kid", "RS256", key=ROGUE)) == 4401
        assert len(FETCHES) == n + 1, "refetches were not rate-limited"
        assert metric(API, "router_auth_jwks_refetches_limited_total") >= 5
        assert metric(API, 'router_auth_failures_total{reason="unknown_key"}') >= 5
        # rsa1 is withdrawn; after the rate limit's 10 s, an unknown kid brings the new set.
        JWKS["keys"] = [k for k in JWKS["keys"] if k["kid"] != "rsa1"]
        await asyncio.sleep(10.5)
        assert await outcome(WS, token("rotate-now", "RS256", key=ROGUE)) == 4401
        assert len(FETCHES) == n + 2
        assert await outcome(WS, token("rsa1", "RS256")) == 4401, "a withdrawn key still admits"
        assert await outcome(WS, token("rsa2", "RS256")) == "ok"
        # The device that connected with rsa1 is still there and answers a request.
        status, body = await asyncio.to_thread(
            http, "POST", f"http://{API}/v1/devices/{kept_dev}/requests", {"command": "ping"})
        req = json.loads(await asyncio.wait_for(kept.recv(), 5))
        assert req["type"] == "device-request", req
        await kept.send(json.dumps({"type": "ack", "request": req["request"]}))
        await kept.close()
    run(rotation())
    print("rotation: new key accepted through one refetch, withdrawn key refuses new connections only")
finally:
    proc.terminate()
    proc.wait(10)

# A JWKS URL that is down at start: the router starts, says so, retries, refuses tokens.
dead_port = srv.server_address[1] + 0
srv.shutdown()
srv.server_close()
proc, WS, API = start_router(ROUTER, "--auth-jwks", f"https://127.0.0.1:{dead_port}/jwks.json",
                             "--auth-jwks-ca", f"{D}/ca.pem")
try:
    wait_for(lambda: metric(API, "router_auth_jwks_failures_total") >= 2, "retried fetches", timeout=20)
    assert metric(API, "router_auth_jwks_age_seconds") == -1
    assert run(outcome(WS, token("ec256", "ES256"))) == 4401
    print("JWKS down at start: router up, fetch retried, tokens refused until keys arrive")
finally:
    proc.terminate()
    proc.wait(10)

# A JWKS file, read again on SIGHUP.
with open(f"{D}/jwks.json", "w") as f:
    json.dump({"keys": [jwk("ec256")]}, f)
proc, WS, API = start_router(ROUTER, "--auth-jwks", f"{D}/jwks.json")
try:
    assert run(outcome(WS, token("ec256", "ES256", drop=("iss", "aud")))) == "ok"
    assert run(outcome(WS, token("ed1", "EdDSA", drop=("iss", "aud")))) == 4401
    with open(f"{D}/jwks.json", "w") as f:
        json.dump({"keys": [jwk("ed1")]}, f)
    loads = metric(API, "router_auth_jwks_loads_total")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: metric(API, "router_auth_jwks_loads_total") > loads, "the SIGHUP reload")
    assert run(outcome(WS, token("ed1", "EdDSA", drop=("iss", "aud")))) == "ok"
    assert run(outcome(WS, token("ec256", "ES256", drop=("iss", "aud")))) == 4401
    print("JWKS file: read again on SIGHUP")
finally:
    proc.terminate()
    proc.wait(10)

print("PASS jwt keys: PyJWT tokens for every algorithm, JWKS over HTTPS with rotation, refusals")
