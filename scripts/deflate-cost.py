"""permessage-deflate cost: N Phoenix V2 devices (Python websockets, which compresses
every message it sends) against `router serve` without and with --permessage-deflate;
prints router RSS per idle connection and router CPU for 5 pushes per device.
Usage: target/pyenv/bin/python scripts/deflate-cost.py target/release/router 2000"""
import asyncio, subprocess, sys, time, json, uuid
from websockets.asyncio.client import connect
ROUTER = sys.argv[1]; N = int(sys.argv[2])
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / 100
async def run(flag):
    args = [ROUTER, "serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--shards", "2", "--auth-secret", "m-0123456789abcdef0123456789abcdef"]
    if flag: args.append("--permessage-deflate")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    f = dict(kv.split("=", 1) for kv in p.stdout.readline().split()[2:])
    acct = str(uuid.uuid4())
    tok = lambda d: subprocess.run([ROUTER, "token", "--device", d, "--account", acct, "--secret", "m-0123456789abcdef0123456789abcdef"], capture_output=True, text=True).stdout.strip()
    base = rss(p.pid)
    conns = []
    toks = [tok(str(uuid.uuid4())) for _ in range(N)]
    for t in toks:
        ws = await connect(f"ws://{f['ws']}/socket/websocket?vsn=2.0.0&token={t}", compression="deflate", max_queue=4)
        await ws.send(json.dumps(["1","1","device","phx_join",{"device_api_version":"2.3.0"}]))
        await ws.recv()
        conns.append(ws)
    await asyncio.sleep(1)
    idle = rss(p.pid)
    msg = json.dumps(["1","2","device","status_update",{"status":"update-progress","metrics":{"cpu_temp":51.5,"load_1min":0.42,"mem_used_percent":37.1},"connectivity":{"wlan0":{"type":"wifi","signal":-61}}}])
    c0 = cpu(p.pid); t0 = time.time()
    for r in range(5):
        await asyncio.gather(*(ws.send(msg) for ws in conns))
    await asyncio.sleep(2)
    c1 = cpu(p.pid)
    busy = rss(p.pid)
    ext = conns[0].response.headers.get("sec-websocket-extensions")
    print(f"deflate={flag} ext={ext!r} conns={N} base={base}KB idle={idle}KB per_conn={(idle-base)*1024/N:.0f}B after_msgs={busy}KB cpu_for_{5*N}_msgs={c1-c0:.2f}s")
    for ws in conns: await ws.close()
    p.terminate(); p.wait(30)
for flag in (False, True):
    asyncio.run(run(flag))
