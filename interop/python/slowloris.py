"""Hostile load for measurements: keep N connections open to the router that never
authenticate (half of them send a partial HTTP request, half upgrade and then say
nothing), reopening each one the router closes. Runs until killed or --seconds pass."""

import argparse
import asyncio
import base64
import os

ap = argparse.ArgumentParser()
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--connections", type=int, default=10000)
ap.add_argument("--seconds", type=float, default=60)
args = ap.parse_args()
stats = {"open": 0, "reopened": 0}


async def one(i):
    while True:
        try:
            r, w = await asyncio.open_connection(args.host, args.port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        stats["open"] += 1
        key = base64.b64encode(os.urandom(16)).decode()
        if i % 2:
            w.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr")          # never finished
        else:
            w.write(f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n".encode())  # never authenticates
        try:
            while await r.read(4096):
                pass
        except OSError:
            pass
        stats["open"] -= 1
        stats["reopened"] += 1
        w.close()


async def main():
    tasks = []
    for i in range(args.connections):
        tasks.append(asyncio.create_task(one(i)))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    await asyncio.sleep(args.seconds)
    print(f"slowloris: {stats['open']} open at the end, {stats['reopened']} reopened after the router closed them", flush=True)


asyncio.run(main())
