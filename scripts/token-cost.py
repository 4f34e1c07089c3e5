#!/usr/bin/env python3
"""Connects/s by token algorithm, side by side in one run: HS256 (minted by loadgen)
against RS256, ES256 and EdDSA tokens minted by PyJWT (`cryptography`), all verified by
one router that holds the secret and the three public keys. Rounds alternate the
algorithms; the table gives each one's median connects/s and its ratio to HS256.

    scripts/token-cost.py [--devices 15000] [--rounds 3]
    (needs target/release/router and loadgen, and a Python with pyjwt[crypto])
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTER = os.path.join(ROOT, "target/release/router")
LOADGEN = os.path.join(ROOT, "target/release/loadgen")
SECRET = "token-cost-secret-0123456789abcdef0123456789"

ap = argparse.ArgumentParser()
ap.add_argument("--devices", type=int, default=15000)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--connect-rate", type=int, default=50000)
a = ap.parse_args()

D = tempfile.mkdtemp(prefix="hive-token-cost-")
keys = {
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}
pub_files = []
account = "00000000-0000-4000-8000-00000000beef"
exp = int(time.time()) + 6 * 3600
for alg, key in keys.items():
    path = f"{D}/{alg.lower()}.pem"
    with open(path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    pub_files.append(path)
    t0 = time.time()
    with open(f"{D}/{alg}.tokens", "w") as f:
        for i in range(a.devices):
            sub = f"00000000-0000-4000-8000-{i:012x}"
            f.write(jwt.encode({"sub": sub, "acc": account, "exp": exp}, key, algorithm=alg,
                               headers={"kid": alg.lower()}) + "\n")
    print(f"minted {a.devices} {alg} tokens in {time.time() - t0:.1f} s", file=sys.stderr)

router = subprocess.Popen([ROUTER, "serve", "--listen", "127.0.0.1:9760", "--api", "127.0.0.1:9761", "--shards", "2",
                           "--auth-public-key", ",".join(pub_files), "--max-connections", "19000"],
                          env={**os.environ, "ROUTER_AUTH_SECRET": SECRET},
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
assert router.stdout.readline().startswith("router ready")
results = {alg: [] for alg in ["HS256", *keys]}
try:
    for r in range(a.rounds):
        for alg in results:
            out = f"{D}/{alg}-{r}.json"
            cmd = [LOADGEN, "--url", "ws://127.0.0.1:9760", "--api", "http://127.0.0.1:9761", "--devices",
                   str(a.devices), "--connect-rate", str(a.connect_rate), "--workers", "2", "--request-rate", "0",
                   "--duration", "0", "--quiet", "--json", out, "--account", account]
            if alg != "HS256":
                cmd += ["--token-file", f"{D}/{alg}.tokens"]
            subprocess.run(cmd, check=True, env={**os.environ, "LOADGEN_SECRET": SECRET},
                           stdout=subprocess.DEVNULL)
            rep = json.load(open(out))
            dev = rep["devices"]
            assert dev["connected"] == a.devices, (alg, dev)
            results[alg].append(dev["connects_per_sec"])
            time.sleep(1)
finally:
    router.terminate()
    router.wait(20)

hs = statistics.median(results["HS256"])
print(f"\n{time.strftime('%Y-%m-%d')}: scripts/token-cost.py --devices {a.devices} --rounds {a.rounds}")
print(f"{'algorithm':<10} {'connects/s (median)':>20} {'each round':>30} {'vs HS256':>9}")
for alg, v in results.items():
    m = statistics.median(v)
    print(f"{alg:<10} {m:>20,.0f} {', '.join(f'{x:,.0f}' for x in v):>30} {m / hs:>9.2f}")
