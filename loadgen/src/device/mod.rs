//! One simulated device: connect, authenticate, answer pings, send periodic events,
//! ack every request at once, reconnect with exponential backoff plus jitter. Speaks
//! the three device protocols. Runs on a worker's single-threaded runtime.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::cli::Proto;
use crate::hist;
pub use crate::signal::{storm_hits, Control, Signal};
use crate::ws::{Incoming, Ws};

mod stats;
mod wire;

pub use stats::Stats;
pub use wire::device_url;
use wire::{answer, event_frame};

/// What every device of a worker shares.
pub struct Fleet {
    pub stats: RefCell<Stats>,
    /// Stop, storms and the event interval (see `Control`).
    pub signal: Signal,
    pub handshake_timeout: Duration,
    pub no_ack: bool,
    /// Tokens are minted at each connect attempt (a few µs), not kept per device.
    pub secret: String,
    pub account: Uuid,
    /// --token-file: device i's token at i (else minted with `secret`).
    pub tokens: Option<std::sync::Arc<[String]>>,
}

const STORM: &str = "storm";

/// How a connected device's session ended.
enum End {
    /// loadgen stopped the device (it sent a close frame).
    Stopped,
    /// The router closed the connection with a close frame (the error kind, `closed_<code>`).
    Closed(String),
    /// The connection broke: reset, end of stream without a close frame, a send or
    /// protocol error, or a storm drop (the error kind).
    Broke(String),
}

/// One device's identity and route: kept small, it lives as long as the device.
pub struct DeviceSpec {
    pub id: Uuid,
    /// Its place among its worker's devices (index into `Stats::seqs`).
    pub slot: u32,
    pub proto: Proto,
    /// The router it connects to (shared by the devices aimed at it).
    pub target: Rc<Target>,
    pub source: Option<IpAddr>,
}

/// A router a worker's devices connect to.
pub struct Target {
    /// Its base WebSocket URL.
    pub base: String,
    pub dest: SocketAddr,
}

/// Phoenix channel clients' heartbeat period.
const PHOENIX_HEARTBEAT: Duration = Duration::from_secs(30);

use crate::coordinator::now_us;

/// Run one device until the fleet stops.
pub async fn run(fleet: Rc<Fleet>, spec: DeviceSpec) {
    let mut attempt: u32 = 0;
    loop {
        if fleet.signal.stopped() {
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
        // Boxed, with its timer: the handshake's state is large and short-lived; inline,
        // it would size every device's task for its whole connected life.
        let session = Box::pin(tokio::time::timeout(
            fleet.handshake_timeout,
            connect_and_auth(&fleet, &spec, t0),
        ))
        .await;
        fleet.stats.borrow_mut().connecting -= 1;
        match session {
            Ok(Ok(ws)) => {
                attempt = 0;
                {
                    let mut s = fleet.stats.borrow_mut();
                    s.connected += 1;
                    s.ever_connected += 1;
                    s.up[spec.slot as usize] = true;
                    if s.full_us == 0 && s.connected >= s.target {
                        s.full_us = now_us();
                    }
                }
                let seq_before = fleet.stats.borrow().seqs[spec.slot as usize];
                let end = serve(&fleet, &spec, ws).await;
                let mut s = fleet.stats.borrow_mut();
                s.connected -= 1;
                s.up[spec.slot as usize] = false;
                // The seqs this connection carried: those after the ones before it.
                let seq_after = s.seqs[spec.slot as usize];
                if matches!(end, End::Broke(_)) && seq_after > seq_before {
                    s.broken.push((spec.slot, seq_before + 1, seq_after));
                }
                match end {
                    End::Stopped => return,
                    End::Broke(kind) if kind == STORM => {
                        // The storm's point: the whole fleet back at once, no backoff.
                        s.storm_drops += 1;
                        continue;
                    }
                    End::Closed(kind) | End::Broke(kind) => s.error(&kind),
                }
            }
            Ok(Err(kind)) => fleet.stats.borrow_mut().error(&kind),
            Err(_) => fleet.stats.borrow_mut().error("handshake_timeout"),
        }
        if fleet.signal.stopped() {
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
        if !fleet.signal.pause(spec.slot, base.mul_f64(jitter)).await {
            return;
        }
    }
}

/// One device's connect and authentication, exactly as the fleet makes it, then a
/// close: Ok when the router let it in, else the error kind (`connect_refused`,
/// `closed_4401`, `http_401`, `handshake_timeout`, ...). The coordinator probes each
/// router with it before starting the ramp, so that a router that is not there or a
/// wrong --secret is told in a second, not after --ramp-timeout.
pub async fn probe(
    secret: &str,
    account: Uuid,
    proto: Proto,
    id: Uuid,
    target: Rc<Target>,
    handshake_timeout: Duration,
) -> Result<(), String> {
    let control = Control {
        stop: false,
        storm: 0,
        fraction: 1.0,
        event_interval: None,
    };
    let fleet = Fleet {
        stats: RefCell::new(Stats::new(1)),
        signal: Signal::new(1, control),
        handshake_timeout,
        no_ack: false,
        secret: secret.to_string(),
        account,
        tokens: None,
    };
    let spec = DeviceSpec {
        id,
        slot: 0,
        proto,
        target,
        source: None,
    };
    let attempt = connect_and_auth(&fleet, &spec, Instant::now());
    match tokio::time::timeout(handshake_timeout, attempt).await {
        Ok(Ok(mut ws)) => {
            ws.close().await;
            Ok(())
        }
        Ok(Err(kind)) => Err(kind),
        Err(_) => Err("handshake_timeout".into()),
    }
}

async fn connect_and_auth(
    fleet: &Fleet,
    spec: &DeviceSpec,
    t0: Instant,
) -> Result<Box<Ws>, String> {
    let tcp = crate::net::connect(spec.target.dest, spec.source)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connect_refused".to_string(),
            std::io::ErrorKind::AddrNotAvailable => "no_source_port".to_string(),
            _ => "connect_error".to_string(),
        })?;
    let given = fleet.tokens.as_ref().and_then(|t| {
        let i = crate::cli::device_index(&spec.id.to_string())?;
        t.get(i).cloned()
    });
    let token = given.unwrap_or_else(|| crate::token::mint(&fleet.secret, spec.id, fleet.account));
    let url = device_url(&spec.target.base, spec.proto, &token);
    let (host, target) = crate::ws::split_url(&url).ok_or_else(|| "bad_url".to_string())?;
    let bearer = (spec.proto != Proto::Phoenix).then(|| format!("Bearer {token}"));
    // Boxed: a connected device's task then holds a pointer, not the socket's state
    // (which async fns would otherwise store twice, as argument and as local).
    let mut ws = Box::new(
        crate::ws::handshake(tcp, host, target, bearer.as_deref())
            .await
            .map_err(|e| match e {
                crate::ws::WsError::Http(_) => e.kind(),
                _ => "upgrade_error".to_string(),
            })?,
    );
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
                if ok && spec.proto == Proto::Hivekit {
                    // Requests arrive as pubsub messages of the device's realm (named
                    // in the greeting) once it subscribes to them.
                    let sub = json!([{"typ": "rea", "act": "sub", "id": v[0]["dat"]["realm"],
                        "dat": {"eve": "hive.request", "idp": "*"}, "cid": "requests"}]);
                    ws.send_text(&sub.to_string())
                        .await
                        .map_err(|_| "send_error".to_string())?;
                }
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
            Ok(Incoming::Binary(_)) => {}
            Ok(Incoming::Close(code)) => return Err(format!("closed_{code}")),
            Err(e) if e.close_code().is_some() => return Err("protocol_error".into()),
            Err(_) => return Err("reset_before_auth".into()),
        }
    }
}

/// What woke a connected device.
enum Wake {
    /// A message, or `None`: pongs are owed.
    Frame(Result<Option<Incoming>, crate::ws::WsError>),
    Event,
    Heartbeat,
    /// The worker changed its `Control`.
    Signal,
}

/// The connected life of a device, until it is stopped or its connection ends. One poll
/// loop over the socket, the timers and the worker's signal, rather than a `select!` of
/// futures: every future held across the wait would be part of the device's task for
/// its whole connected life (the loop is 1.3 KB as a select, multiplied by the fleet).
async fn serve(fleet: &Fleet, spec: &DeviceSpec, mut ws: Box<Ws>) -> End {
    let signal = &fleet.signal;
    // Storms and interval changes from before this connection do not count.
    let mut seen_generation = signal.generation();
    let mut seen = signal.get();
    let mut events = event_timer(seen.event_interval);
    // Phoenix clients send a heartbeat every 30 s; other protocols have no timer here.
    let mut heartbeat =
        (spec.proto == Proto::Phoenix).then(|| tokio::time::interval(PHOENIX_HEARTBEAT));
    let mut n: u64 = 0;
    loop {
        let wake = std::future::poll_fn(|cx| {
            if signal
                .poll_changed(spec.slot, seen_generation, cx)
                .is_ready()
            {
                return Poll::Ready(Wake::Signal);
            }
            if events.as_mut().is_some_and(|e| e.poll_tick(cx).is_ready()) {
                return Poll::Ready(Wake::Event);
            }
            if heartbeat
                .as_mut()
                .is_some_and(|h| h.poll_tick(cx).is_ready())
            {
                return Poll::Ready(Wake::Heartbeat);
            }
            ws.poll_recv(cx).map(Wake::Frame)
        })
        .await;
        match wake {
            Wake::Frame(Ok(Some(Incoming::Text(t)))) => {
                let replies = answer(fleet, spec, &t);
                if !replies.is_empty() && ws.send_texts(&replies).await.is_err() {
                    return End::Broke("send_error".into());
                }
            }
            // No protocol of loadgen's sends binary messages to devices.
            Wake::Frame(Ok(Some(Incoming::Binary(_)))) => {}
            Wake::Frame(Ok(Some(Incoming::Close(code)))) => {
                return End::Closed(format!("closed_{code}"))
            }
            Wake::Frame(Ok(None)) => {
                if ws.flush_control().await.is_err() {
                    return End::Broke("send_error".into());
                }
            }
            Wake::Frame(Err(e)) => return End::Broke(e.kind()),
            Wake::Event => {
                n += 1;
                // The seq is taken only once the frame went out whole: a frame cut short
                // by a failed write cannot reach the router, and its seq goes to the next
                // event, on the next connection.
                let seq = fleet.stats.borrow().seqs[spec.slot as usize] + 1;
                if ws.send_text(&event_frame(spec, seq)).await.is_err() {
                    return End::Broke("send_error".into());
                }
                let mut s = fleet.stats.borrow_mut();
                s.seqs[spec.slot as usize] = seq;
                s.events_sent += 1;
            }
            Wake::Heartbeat => {
                let hb = json!([null, format!("h{n}"), "phoenix", "heartbeat", {}]).to_string();
                if ws.send_text(&hb).await.is_err() {
                    return End::Broke("send_error".into());
                }
            }
            Wake::Signal => {
                seen_generation = signal.generation();
                let now = signal.get();
                if now.stop {
                    ws.close().await;
                    return End::Stopped;
                }
                if now.storm != seen.storm && storm_hits(spec.slot, now.storm, now.fraction) {
                    return End::Broke(STORM.into());
                }
                if now.event_interval != seen.event_interval {
                    events = event_timer(now.event_interval);
                }
                seen = now;
            }
        }
    }
}

/// Periodic events every `interval`, the first at a random point of the first interval
/// (so that a fleet's events spread out).
fn event_timer(interval: Option<Duration>) -> Option<tokio::time::Interval> {
    let iv = interval?;
    let first = tokio::time::Instant::now() + iv.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
    Some(tokio::time::interval_at(first, iv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_task_stays_small() {
        // Memory per simulated device is what lets 15,000 of them share one worker: the
        // handshake's state is boxed, so the task is sized by the connected loop.
        let fleet = Rc::new(Fleet {
            stats: RefCell::new(Stats::new(1)),
            signal: Signal::new(1, no_control(None)),
            handshake_timeout: Duration::from_secs(1),
            no_ack: false,
            secret: String::new(),
            account: Uuid::nil(),
            tokens: None,
        });
        let spec = DeviceSpec {
            id: Uuid::nil(),
            slot: 0,
            proto: Proto::Hive,
            target: Rc::new(Target {
                base: "ws://127.0.0.1:1".into(),
                dest: "127.0.0.1:1".parse().unwrap(),
            }),
            source: None,
        };
        let spec_size = std::mem::size_of::<DeviceSpec>();
        assert!(spec_size <= 48, "device spec is {spec_size} bytes");
        let task = run(fleet, spec);
        let size = std::mem::size_of_val(&task);
        eprintln!("device task future: {size} bytes");
        // 528 bytes today: with tokio's task header the cell is 640 bytes (it is aligned
        // to 128). A few more bytes here would make every device's task 768.
        assert!(size <= 544, "device task is {size} bytes");
    }

    fn no_control(event_interval: Option<Duration>) -> Control {
        Control {
            stop: false,
            storm: 0,
            fraction: 1.0,
            event_interval,
        }
    }

    #[test]
    fn a_storm_picks_its_fraction_of_the_connected_devices() {
        let mut s = Stats::new(10_000);
        s.up.iter_mut().step_by(2).for_each(|u| *u = true);
        s.storm(1, 1.0);
        assert_eq!((s.storm_gen, s.storm_expected), (1, 5_000));
        s.storm(2, 0.3);
        let second = s.storm_expected - 5_000;
        assert!((1_480..=1_520).contains(&second), "{second}");
        // Another storm of the same share picks other devices.
        let picked = |g| {
            (0..10_000u32)
                .filter(|&i| storm_hits(i, g, 0.3))
                .collect::<Vec<_>>()
        };
        let (a, b) = (picked(2), picked(3));
        assert!((2_990..=3_010).contains(&a.len()), "{}", a.len());
        assert_ne!(a, b);
        assert!(
            (0..100).all(|i| storm_hits(i, 9, 1.0)) && !(0..100).any(|i| storm_hits(i, 9, 0.0))
        );
    }

    fn fleet(event_interval: Option<Duration>) -> Fleet {
        Fleet {
            stats: RefCell::new(Stats::new(1)),
            signal: Signal::new(1, no_control(event_interval)),
            handshake_timeout: Duration::from_secs(2),
            no_ack: false,
            secret: "s".into(),
            account: Uuid::nil(),
            tokens: None,
        }
    }

    #[test]
    fn events_carry_seq_beside_sent_us() {
        let spec = |proto| DeviceSpec {
            id: Uuid::from_u128(9),
            slot: 0,
            proto,
            target: Rc::new(Target {
                base: "ws://127.0.0.1:1".into(),
                dest: "127.0.0.1:1".parse().unwrap(),
            }),
            source: None,
        };
        let v = |proto| serde_json::from_str::<Value>(&event_frame(&spec(proto), 41)).unwrap();
        let hive = v(Proto::Hive);
        assert_eq!(hive["seq"], 41);
        assert!(hive["sent_us"].as_u64().unwrap() > 0);
        let phoenix = v(Proto::Phoenix);
        assert_eq!(
            (phoenix[3].clone(), phoenix[4]["seq"].clone()),
            (json!("status_update"), json!(41))
        );
        assert!(phoenix[4]["sent_us"].as_u64().unwrap() > 0);
        let hivekit = v(Proto::Hivekit);
        assert_eq!(hivekit[0]["dat"]["seq"], 41);
        assert!(hivekit[0]["dat"]["sent_us"].as_u64().unwrap() > 0);
    }

    #[tokio::test]
    async fn seqs_continue_across_reconnects_and_broken_connections_are_kept() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fleet = Rc::new(fleet(Some(Duration::from_millis(15))));
        let stopper = fleet.clone();
        let spec = DeviceSpec {
            id: Uuid::from_u128(3),
            slot: 0,
            proto: Proto::Hive,
            target: Rc::new(Target {
                base: format!("ws://{addr}"),
                dest: addr,
            }),
            source: None,
        };
        // A router that drops the first connection without a close frame after 3 events,
        // closes the second with a close frame after 2, and on the third has loadgen
        // stop the device after 2. Returns the seqs it read on each connection.
        let router = async move {
            let mut conns: Vec<Vec<u64>> = Vec::new();
            for round in 0..3 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                ws.send(Message::text(r#"{"type":"authenticated"}"#))
                    .await
                    .unwrap();
                let mut seen = Vec::new();
                let seq = |m: Message| -> Option<u64> {
                    let v: Value = serde_json::from_str(m.to_text().ok()?).ok()?;
                    v["seq"].as_u64()
                };
                while seen.len() < [3, 2, 2][round] {
                    if let Some(s) = seq(ws.next().await.unwrap().unwrap()) {
                        seen.push(s);
                    }
                }
                match round {
                    0 => drop(ws),
                    _ => {
                        if round == 1 {
                            ws.close(None).await.unwrap();
                        } else {
                            stopper.signal.update(|c| c.stop = true);
                        }
                        // Whatever the device sent before it saw the end.
                        while let Some(Ok(m)) = ws.next().await {
                            seen.extend(seq(m));
                        }
                    }
                }
                conns.push(seen);
            }
            conns
        };
        let local = tokio::task::LocalSet::new();
        let (conns, ()) = local
            .run_until(async { tokio::join!(router, run(fleet.clone(), spec)) })
            .await;
        let s = fleet.stats.borrow();
        let consecutive = |c: &[u64]| c.windows(2).all(|w| w[1] == w[0] + 1);
        assert!(conns.iter().all(|c| consecutive(c)), "{conns:?}");
        assert_eq!(conns[0][0], 1);
        // Only the first connection broke; its range may hold events the router never read.
        assert_eq!(s.broken.len(), 1, "{:?}", s.broken);
        let (slot, first, last) = s.broken[0];
        assert_eq!((slot, first), (0, 1));
        assert!(
            last >= *conns[0].last().unwrap(),
            "{:?} {conns:?}",
            s.broken
        );
        // The next connection goes on from the broken one's last seq, and so on.
        assert_eq!(conns[1][0], last + 1, "{conns:?}");
        assert_eq!(conns[2][0], conns[1].last().unwrap() + 1, "{conns:?}");
        assert_eq!(s.seqs[0], *conns[2].last().unwrap());
        assert_eq!(s.events_sent, s.seqs[0]);
        assert_eq!(
            s.errors.get("connection_lost").copied().unwrap_or(0)
                + s.errors.get("send_error").copied().unwrap_or(0),
            1,
            "{:?}",
            s.errors
        );
        assert!(
            s.errors.keys().any(|k| k.starts_with("closed_")),
            "{:?}",
            s.errors
        );
    }
}
