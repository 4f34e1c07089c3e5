// The official Phoenix JavaScript client (npm `phoenix`, over npm `ws`) against the
// real `router` binary: join `device` with NervesHub-like metadata, heartbeats,
// `reboot` and `update` requests acked by the stock follow-ups, `fwup_progress` as
// an event, another device's topic refused, reconnect after a router restart.
// Usage: node phoenix_client.mjs /path/to/router
import { spawn, execFileSync } from "node:child_process";
import { createServer } from "node:net";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { Socket } from "phoenix";
import WebSocket from "ws";

const ROUTER = process.argv[2];
const SECRET = "js-secret-0123456789abcdef0123456789abcdef";
const fail = (msg) => { console.error("FAIL:", msg); process.exit(1); };
setTimeout(() => fail("timed out after 60 s"), 60_000).unref();

const freePort = () => new Promise((res) => {
  const s = createServer().listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => res(p)); });
});
const wsPort = await freePort();
const apiPort = await freePort();
const api = `http://127.0.0.1:${apiPort}`;

function startRouter() {
  const p = spawn(ROUTER, ["serve", "--listen", `127.0.0.1:${wsPort}`, "--api", `127.0.0.1:${apiPort}`,
    "--shards", "2", "--auth-secret", SECRET], { stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((res, rej) => {
    p.stdout.once("data", (d) => d.toString().startsWith("router ready") ? res(p) : rej(new Error(d.toString())));
    p.once("exit", (c) => rej(new Error(`router exited ${c}`)));
  });
}
const stopRouter = (p) => new Promise((res) => { p.once("exit", res); p.kill("SIGTERM"); });
const token = (d, a) => execFileSync(ROUTER, ["token", "--device", d, "--account", a, "--secret", SECRET]).toString().trim();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const post = async (path, body) => {
  const r = await fetch(api + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return [r.status, await r.json()];
};

// Watch /v1/events for an event matching a predicate.
async function watchEvents(pred) {
  const r = await fetch(`${api}/v1/events`);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  return (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) fail("event stream ended");
      buf += dec.decode(value);
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) {
            const ev = JSON.parse(line.slice(5).trim());
            if (pred(ev)) { reader.cancel().catch(() => {}); return ev; }
          }
        }
      }
    }
  })();
}

let router = await startRouter();
const device = randomUUID(), account = randomUUID();
const socket = new Socket(`ws://127.0.0.1:${wsPort}/socket`, {
  transport: WebSocket, params: { token: token(device, account) }, heartbeatIntervalMs: 300,
  reconnectAfterMs: () => 200, rejoinAfterMs: () => 200,
});
let heartbeats = 0;
socket.onMessage((m) => { if (m.topic === "phoenix" && m.event === "phx_reply" && m.payload.status === "ok") heartbeats++; });
socket.connect();

const fwup = watchEvents((ev) => ev.type === "fwup_progress" && ev.device === device);
const joined = watchEvents((ev) => ev.type === "device-join" && ev.device === device);
await sleep(100);

const channel = socket.channel("device", {
  nerves_fw_uuid: randomUUID(), nerves_fw_version: "1.2.3", nerves_fw_platform: "rpi4",
  nerves_fw_architecture: "arm", device_api_version: "2.2.0",
});
// A stock NervesHub device: `reboot` -> `rebooting`, `update` -> `fwup_progress`.
channel.on("reboot", () => channel.push("rebooting", {}));
channel.on("update", () => channel.push("fwup_progress", { value: 0 }));
await new Promise((res) => channel.join().receive("ok", res).receive("error", (e) => fail(`join refused ${JSON.stringify(e)}`)));
const joinEv = await joined;
if (joinEv.payload.nerves_fw_version !== "1.2.3") fail(`device-join payload ${JSON.stringify(joinEv)}`);

let [status, body] = await post(`/v1/devices/${device}/requests`, { command: "reboot", payload: {}, timeout_ms: 5000 });
if (status !== 200 || body.status !== "acked") fail(`reboot: ${status} ${JSON.stringify(body)}`);
[status, body] = await post(`/v1/devices/${device}/requests`, { command: "update", payload: { firmware_url: "http://fw/x.fw" }, timeout_ms: 5000 });
if (status !== 200 || body.status !== "acked") fail(`update: ${status} ${JSON.stringify(body)}`);
const fw = await fwup;
if (fw.payload.value !== 0 || fw.topic !== "device") fail(`fwup_progress event ${JSON.stringify(fw)}`);

// Another device's topic is refused.
const other = socket.channel(`device:${randomUUID()}`, {});
const refused = await new Promise((res) => other.join().receive("error", res).receive("ok", () => fail("joined another device's topic")));
if (refused.reason !== "unmatched topic") fail(`refusal reason ${JSON.stringify(refused)}`);
other.leave();

await sleep(1000);
if (heartbeats < 2) fail(`heartbeats answered: ${heartbeats}`);

// Restart the router on the same ports: the client reconnects and rejoins by itself.
await stopRouter(router);
router = await startRouter();
const rejoinDeadline = Date.now() + 15_000;
for (;;) {
  const r = await fetch(`${api}/v1/devices/${device}`);
  if (r.status === 200) {
    [status, body] = await post(`/v1/devices/${device}/requests`, { command: "reboot", payload: {}, timeout_ms: 3000 });
    if (status === 200) break;
  }
  if (Date.now() > rejoinDeadline) fail("device did not come back after the router restarted");
  await sleep(200);
}
socket.disconnect();
await stopRouter(router);
const phxVersion = JSON.parse(readFileSync(new URL("./node_modules/phoenix/package.json", import.meta.url))).version;
console.log(`phoenix JS client ${phxVersion}: join, heartbeats (${heartbeats}), reboot/update acked by follow-ups, fwup_progress event, foreign topic refused, reconnect after restart: ok`);
process.exit(0);
