//! One simulated device: connect, authenticate, answer pings, send periodic events,
//! ack every request at once, reconnect with exponential backoff plus jitter. Speaks
//! the three device protocols. Runs on a worker's single-threaded runtime.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::cli::Proto;
use crate::hist;
use crate::ws::{Incoming, Ws};

/// Per-worker counters and histograms (single thread: plain RefCell).
pub struct Stats {
    pub connect: Histogram<u64>,
    pub auth: Histogram<u64>,
    pub connected: usize,
    pub connecting: usize,
    pub ever_connected: usize,
    pub reconnects: u64,
    pub errors: BTreeMap<String, u64>,
    pub events_sent: u64,
    pub storm_drops: u64,
    pub requests_received: u64,
    /// Unix µs of this worker's first connect attempt (0: none yet).
    pub first_attempt_us: u64,
    /// Unix µs when `connected` first reached `target` (0: not yet).
    pub full_us: u64,
    /// This worker's share of the fleet.
    pub target: usize,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            connect: hist::new_hist(),
            auth: hist::new_hist(),
            connected: 0,
            connecting: 0,
            ever_connected: 0,
            reconnects: 0,
            errors: BTreeMap::new(),
            events_sent: 0,
            storm_drops: 0,
            requests_received: 0,
            first_attempt_us: 0,
            full_us: 0,
            target: 0,
        }
    }
    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// What every device of a worker shares.
pub struct Fleet {
    pub stats: RefCell<Stats>,
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Bumped by `--storm-at`: every device drops its connection at once (no close
    /// handshake, as if the network went away) and reconnects without backoff.
    pub storm: tokio::sync::watch::Receiver<u64>,
    pub handshake_timeout: Duration,
    pub event_interval: Option<Duration>,
    pub no_ack: bool,
    /// Tokens are minted at each connect attempt (a few µs), not kept per device.
    pub secret: String,
    pub account: Uuid,
}

const STORM: &str = "storm";

/// One device's identity and route: kept small, it lives as long as the device.
pub struct DeviceSpec {
    pub id: Uuid,
    pub proto: Proto,
    /// The router's base WebSocket URL (shared by the devices aimed at it).
    pub base: Rc<str>,
    pub dest: SocketAddr,
    pub source: Option<IpAddr>,
}

/// Phoenix channel clients' heartbeat period.
const PHOENIX_HEARTBEAT: Duration = Duration::from_secs(30);

use crate::coordinator::now_us;

/// Run one device until the fleet stops.
pub async fn run(fleet: Rc<Fleet>, spec: DeviceSpec) {
    let mut attempt: u32 = 0;
    let mut stop = fleet.stop.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let t0 = Instant::now();
        {
            let mut s = fleet.stats.borrow_mut();
            s.connecting += 1;
            if s.first_attempt_us == 0 {
                s.first_attempt_us = now_us();
            }
        }
        let session =
            // Boxed: the handshake's state is large and short-lived; inline, it would size
            // every device's task for its whole connected life.
            tokio::time::timeout(
                fleet.handshake_timeout,
                Box::pin(connect_and_auth(&fleet, &spec, t0)),
            )
            .await;
        fleet.stats.borrow_mut().connecting -= 1;
        match session {
            Ok(Ok(ws)) => {
                attempt = 0;
                {
                    let mut s = fleet.stats.borrow_mut();
                    s.connected += 1;
                    s.ever_connected += 1;
                    if s.full_us == 0 && s.connected >= s.target {
                        s.full_us = now_us();
                    }
                }
                let why = serve(&fleet, &spec, ws, &mut stop).await;
                fleet.stats.borrow_mut().connected -= 1;
                match why {
                    None => return, // stopped
                    Some(kind) if kind == STORM => {
                        // The storm's point: the whole fleet back at once, no backoff.
                        fleet.stats.borrow_mut().storm_drops += 1;
                        continue;
                    }
                    Some(kind) => fleet.stats.borrow_mut().error(&kind),
                }
            }
            Ok(Err(kind)) => fleet.stats.borrow_mut().error(&kind),
            Err(_) => fleet.stats.borrow_mut().error("handshake_timeout"),
        }
        if *stop.borrow() {
            return;
        }
        // Exponential backoff with jitter: a fleet that lost its router must not come
        // back as one synchronized wave.
        attempt = attempt.saturating_add(1);
        fleet.stats.borrow_mut().reconnects += 1;
        let base = Duration::from_millis(100)
            .saturating_mul(1 << attempt.min(6))
            .min(Duration::from_secs(5));
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        tokio::select! {
            _ = tokio::time::sleep(base.mul_f64(jitter)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn connect_and_auth(fleet: &Fleet, spec: &DeviceSpec, t0: Instant) -> Result<Ws, String> {
    let tcp = crate::net::connect(spec.dest, spec.source)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connect_refused".to_string(),
            std::io::ErrorKind::AddrNotAvailable => "no_source_port".to_string(),
            _ => "connect_error".to_string(),
        })?;
    let token = crate::token::mint(&fleet.secret, spec.id, fleet.account);
    let url = device_url(&spec.base, spec.proto, &token);
    let (host, target) = crate::ws::split_url(&url).ok_or_else(|| "bad_url".to_string())?;
    let bearer = (spec.proto != Proto::Phoenix).then(|| format!("Bearer {token}"));
    let mut ws = crate::ws::handshake(tcp, host, target, bearer.as_deref())
        .await
        .map_err(|e| match e {
            crate::ws::WsError::Http(_) => e.kind(),
            _ => "upgrade_error".to_string(),
        })?;
    fleet
        .stats
        .borrow_mut()
        .connect
        .record(t0.elapsed().as_micros().max(1) as u64)
        .ok();
    if spec.proto == Proto::Phoenix {
        let join = json!(["1", "1", "device", "phx_join", {
            "nerves_fw_uuid": Uuid::new_v4(), "nerves_fw_version": "1.0.0",
            "nerves_fw_platform": "loadgen", "nerves_fw_architecture": "x86_64", "device_api_version": "2.2.0"
        }]);
        ws.send_text(&join.to_string())
            .await
            .map_err(|_| "send_error".to_string())?;
    }
    // Wait for the protocol's "you are in".
    loop {
        match ws.recv().await {
            Ok(Incoming::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                let ok = match spec.proto {
                    Proto::Phoenix => v[3] == "phx_reply" && v[1] == "1" && v[4]["status"] == "ok",
                    Proto::Hivekit => v[0]["act"] == "aut" && v[0]["res"] == "suc",
                    _ => v["type"] == "authenticated",
                };
                if ok {
                    hist::record(
                        &mut fleet.stats.borrow_mut().auth,
                        t0.elapsed().as_micros() as u64,
                    );
                    return Ok(ws);
                }
                if v[0]["res"] == "err" || v[4]["status"] == "error" {
                    return Err("auth_refused".into());
                }
            }
            Ok(Incoming::Close(code)) => return Err(format!("closed_{code}")),
            Err(crate::ws::WsError::Protocol) => return Err("protocol_error".into()),
            Err(_) => return Err("reset_before_auth".into()),
        }
    }
}

/// The connected life of a device. None: stopped on request; Some(kind): lost.
async fn serve(
    fleet: &Fleet,
    spec: &DeviceSpec,
    mut ws: Ws,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<String> {
    let first = fleet
        .event_interval
        .map(|iv| tokio::time::Instant::now() + iv.mul_f64(rand::thread_rng().gen_range(0.0..1.0)));
    let mut events =
        first.map(|at| tokio::time::interval_at(at, fleet.event_interval.unwrap_or(Duration::MAX)));
    // Phoenix clients send a heartbeat every 30 s; other protocols have no timer here.
    let mut heartbeat =
        (spec.proto == Proto::Phoenix).then(|| tokio::time::interval(PHOENIX_HEARTBEAT));
    let mut storm = fleet.storm.clone();
    storm.mark_unchanged();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            msg = ws.recv() => match msg {
                Ok(Incoming::Text(t)) => {
                    let replies = answer(fleet, spec, &t);
                    if !replies.is_empty() && ws.send_texts(&replies).await.is_err() {
                        return Some("send_error".into());
                    }
                }
                Ok(Incoming::Close(code)) => return Some(format!("closed_{code}")),
                Err(e) => return Some(e.kind()),
            },
            _ = async { match events.as_mut() { Some(e) => { e.tick().await; } None => std::future::pending().await } } => {
                n += 1;
                if ws.send_text(&event_frame(spec, n)).await.is_err() {
                    return Some("send_error".into());
                }
                fleet.stats.borrow_mut().events_sent += 1;
            }
            _ = async { match heartbeat.as_mut() { Some(h) => { h.tick().await; } None => std::future::pending().await } } => {
                let hb = json!([null, format!("h{n}"), "phoenix", "heartbeat", {}]).to_string();
                if ws.send_text(&hb).await.is_err() {
                    return Some("send_error".into());
                }
            }
            _ = stop.changed() => {
                ws.close().await;
                return None;
            }
            _ = storm.changed() => return Some(STORM.into()),
        }
    }
}

/// Replies to a frame from the router: acks (and responses) for requests.
fn answer(fleet: &Fleet, spec: &DeviceSpec, text: &str) -> Vec<String> {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let (request, payload) = match spec.proto {
        Proto::Phoenix if v[1].is_null() && v[4]["request"].is_string() => {
            (v[4]["request"].clone(), v[4].clone())
        }
        Proto::Hivekit if v[0]["typ"] == "ins" => {
            (v[0]["cid"].clone(), v[0]["dat"]["payload"].clone())
        }
        Proto::Hive | Proto::Mixed if v["type"] == "device-request" => {
            (v["request"].clone(), v["payload"].clone())
        }
        _ => return Vec::new(),
    };
    fleet.stats.borrow_mut().requests_received += 1;
    if fleet.no_ack {
        return Vec::new();
    }
    let respond = payload["respond"] == true;
    match spec.proto {
        Proto::Phoenix => {
            let mut out =
                vec![json!(["1", null, "device", "ack", {"request": request}]).to_string()];
            if respond {
                out.push(json!(["1", null, "device", "response", {"request": request, "status": "ok", "result": {"echo": true}}]).to_string());
            }
            out
        }
        Proto::Hivekit => {
            let mut a = json!({"cid": request, "res": "suc"});
            if respond {
                a["dat"] = json!({"echo": true});
            }
            vec![json!([a]).to_string()]
        }
        _ => {
            let mut out = vec![json!({"type": "ack", "request": request}).to_string()];
            if respond {
                out.push(json!({"type": "response", "request": request, "status": "ok", "result": {"echo": true}}).to_string());
            }
            out
        }
    }
}

/// The device's n-th periodic event, stamped with `sent_us` for end-to-end latency.
fn event_frame(spec: &DeviceSpec, n: u64) -> String {
    let sent_us = now_us();
    match spec.proto {
        Proto::Phoenix => json!(["1", format!("e{n}"), "device", "status_update", {"status": "ok", "sent_us": sent_us}]).to_string(),
        Proto::Hivekit => json!([{"typ": "obj", "act": "upd", "id": spec.id, "dat": {"sent_us": sent_us, "n": n}}]).to_string(),
        _ => match n % 3 {
            0 => json!({"type": "instances", "sent_us": sent_us, "apps": [{"name": "app", "healthy": true}]}),
            1 => json!({"type": "device-version", "sent_us": sent_us, "version": "1.0.0"}),
            _ => json!({"type": "device-state", "sent_us": sent_us, "disk_free_pct": 42}),
        }
        .to_string(),
    }
}

/// The protocol's endpoint under a base URL that has no path of its own.
pub fn device_url(base: &str, proto: Proto, token: &str) -> String {
    let base = base.trim_end_matches('/');
    let has_path = base.splitn(4, '/').nth(3).is_some_and(|p| !p.is_empty());
    let path = match (has_path, proto) {
        (true, _) => "",
        (false, Proto::Phoenix) => "/socket/websocket",
        (false, Proto::Hivekit) => "/v1/ws",
        (false, _) => "/ws",
    };
    match proto {
        Proto::Phoenix => format!("{base}{path}?token={token}&vsn=2.0.0"),
        _ => format!("{base}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_task_stays_small() {
        // Memory per simulated device is what lets 15,000 of them share one worker: the
        // handshake's state is boxed, so the task is sized by the connected loop.
        let (_tx, stop) = tokio::sync::watch::channel(false);
        let (_stx, storm) = tokio::sync::watch::channel(0u64);
        let fleet = Rc::new(Fleet {
            stats: RefCell::new(Stats::new()),
            stop,
            storm,
            handshake_timeout: Duration::from_secs(1),
            event_interval: None,
            no_ack: false,
            secret: String::new(),
            account: Uuid::nil(),
        });
        let spec = DeviceSpec {
            id: Uuid::nil(),
            proto: Proto::Hive,
            base: "ws://127.0.0.1:1".into(),
            dest: "127.0.0.1:1".parse().unwrap(),
            source: None,
        };
        let spec_size = std::mem::size_of::<DeviceSpec>();
        assert!(spec_size <= 96, "device spec is {spec_size} bytes");
        let task = run(fleet, spec);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "device task is {size} bytes");
    }

    #[test]
    fn urls() {
        assert_eq!(device_url("ws://h:1", Proto::Hive, "t"), "ws://h:1/ws");
        assert_eq!(
            device_url("ws://h:1/", Proto::Hivekit, "t"),
            "ws://h:1/v1/ws"
        );
        assert_eq!(
            device_url("ws://h:1", Proto::Phoenix, "t"),
            "ws://h:1/socket/websocket?token=t&vsn=2.0.0"
        );
        assert_eq!(
            device_url("ws://h:1/custom", Proto::Hive, "t"),
            "ws://h:1/custom"
        );
    }
}
