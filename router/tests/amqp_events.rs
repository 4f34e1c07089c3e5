//! The RabbitMQ bridge against the real broker (127.0.0.1:5672, or $HIVE_AMQP_URL):
//! events reach `hive.events` with routing key, body and headers; a lost connection is
//! ridden out with the buffer and a reconnect; the buffer is bounded and counted; a
//! graceful stop flushes. Each test consumes through its own exclusive, server-named
//! queue (deleted by the broker when the test's connection closes) and filters on its
//! own device UUID, so tests and other users of the broker do not disturb each other.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::amqp::*;
use common::*;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{json, Value};
use uuid::Uuid;

fn header(d: &Delivery, key: &str) -> AMQPValue {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
        .unwrap_or_else(|| panic!("header {key} missing"))
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn table(pairs: &[(&str, AMQPValue)]) -> AMQPValue {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    AMQPValue::FieldTable(t)
}

async fn readyz(r: &TestRouter) -> u16 {
    r.http
        .get(format!("{}/readyz", r.api))
        .send()
        .await
        .map(|x| x.status().as_u16())
        .unwrap_or(0)
}

async fn wait_ready(r: &TestRouter, want: u16, within: Duration) {
    let t0 = Instant::now();
    while readyz(r).await != want {
        assert!(t0.elapsed() < within, "/readyz never answered {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_hive_events_with_body_and_headers() {
    let mut tap = Tap::new().await;
    let r = TestRouter::start_with(|c| c.amqp = Some(amqp_url()));
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    assert_eq!(r.metric("router_amqp_connected").await, 1.0);
    let mut sse = Events::subscribe(&r).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;

    let long_key = "k".repeat(300);
    // Raw text: u64::MAX must reach the broker digit for digit. (Integers beyond u64
    // are refused by the shard's JSON validation as bad-json, so none arrive here;
    // headers.rs maps them exactly anyway, see its unit tests.)
    let instances = format!(
        r#"{{"type":"instances","apps":[{{"name":"db","healthy":true,"cpu":0.25,"tags":["a",null]}}],"count":3,"big":18446744073709551615,"neg":-5,"ok":false,"nothing":null,"{long_key}":"skipped"}}"#
    );
    ws_send_text(&mut ws, &instances).await;
    send_json(
        &mut ws,
        json!({"type":"device-version","version":"1.2.3","firmware":{"build":42,"channel":"stable"}}),
    )
    .await;
    send_json(
        &mut ws,
        json!({"type":"device-state","state":"online","battery":0.87,"sensors":[1,2.5,"x",true,null,{"k":"v"}]}),
    )
    .await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(tap.next_for(d, Duration::from_secs(10)).await);
    }
    got.sort_by_key(|x| x.routing_key.to_string());
    let keys: Vec<String> = got.iter().map(|x| x.routing_key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "hive-device.device-state",
            "hive-device.device-version",
            "hive-device.instances"
        ]
    );
    for x in &got {
        assert_eq!(x.exchange.as_str(), "hive.events");
        assert_eq!(
            x.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(*x.properties.delivery_mode(), Some(2), "persistent");
        // Metadata injected by the router, in body and headers alike.
        let body: Value = serde_json::from_slice(&x.data).expect("JSON body");
        assert_eq!(body["device"], d.to_string());
        assert_eq!(body["account"], a.to_string());
        assert_eq!(body["service"], "hive-device");
        assert_eq!(header(x, "device"), s(&d.to_string()));
        assert_eq!(header(x, "account"), s(&a.to_string()));
        assert_eq!(header(x, "service"), s("hive-device"));
    }
    let (state, version, inst) = (&got[0], &got[1], &got[2]);

    // instances: nesting, arrays, bools, null, float, a u64 integer, a long key.
    let body = std::str::from_utf8(&inst.data).unwrap();
    assert!(body.contains("18446744073709551615"), "{body}");
    assert!(body.contains(&long_key), "the long key stays in the body");
    assert_eq!(header(inst, "type"), s("instances"));
    assert_eq!(
        header(inst, "apps"),
        AMQPValue::FieldArray(
            vec![table(&[
                ("name", s("db")),
                ("healthy", AMQPValue::Boolean(true)),
                ("cpu", AMQPValue::Double(0.25)),
                (
                    "tags",
                    AMQPValue::FieldArray(vec![s("a"), AMQPValue::Void].into())
                ),
            ])]
            .into()
        )
    );
    assert_eq!(header(inst, "count"), AMQPValue::LongLongInt(3));
    assert_eq!(header(inst, "neg"), AMQPValue::LongLongInt(-5));
    assert_eq!(header(inst, "big"), s("18446744073709551615"));
    assert_eq!(header(inst, "ok"), AMQPValue::Boolean(false));
    assert_eq!(header(inst, "nothing"), AMQPValue::Void);
    let h = inst.properties.headers().clone().unwrap();
    assert!(!h.contains_key(&long_key));

    // device-version: nested table.
    assert_eq!(header(version, "version"), s("1.2.3"));
    assert_eq!(
        header(version, "firmware"),
        table(&[
            ("build", AMQPValue::LongLongInt(42)),
            ("channel", s("stable"))
        ])
    );
    let body: Value = serde_json::from_slice(&version.data).unwrap();
    assert_eq!(body["firmware"]["build"], 42);

    // device-state: a mixed array.
    assert_eq!(header(state, "battery"), AMQPValue::Double(0.87));
    assert_eq!(
        header(state, "sensors"),
        AMQPValue::FieldArray(
            vec![
                AMQPValue::LongLongInt(1),
                AMQPValue::Double(2.5),
                s("x"),
                AMQPValue::Boolean(true),
                AMQPValue::Void,
                table(&[("k", s("v"))]),
            ]
            .into()
        )
    );

    // The SSE stream still works in AMQP mode.
    let ev = sse
        .find(|v| v["type"] == "device-state" && v["device"] == d.to_string())
        .await;
    assert_eq!(ev["state"], "online");

    wait_metric(
        &r,
        "router_amqp_confirmed_total",
        Duration::from_secs(5),
        |v| v >= 3.0,
    )
    .await;
    assert_eq!(r.metric("router_amqp_header_keys_skipped_total").await, 1.0);
    assert_eq!(r.metric("router_amqp_nacked_total").await, 0.0);
    assert_eq!(
        r.metric("router_amqp_dropped_total{reason=\"buffer_full\"}")
            .await,
        0.0
    );
    assert_eq!(r.metric("router_amqp_reconnects_total").await, 0.0);
}

/// A TCP forwarder to the broker that the test can cut and restore, so the router
/// sees a real outage (connections reset, then refused) while RabbitMQ keeps running
/// for everyone else.
struct Proxy {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy binds");
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // Dropping the set (when stopped) aborts every forwarded connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut rx => return,
                    acc = listener.accept() => {
                        let Ok((mut down, _)) = acc else { continue };
                        conns.spawn(async move {
                            if let Ok(mut up) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                }
            }
        });
        Proxy {
            port,
            stop: Some(tx),
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn cut(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn collect_seq(tap: &mut Tap, d: Uuid, want: u32, within: Duration) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let t0 = Instant::now();
    while (seen.len() as u32) < want {
        let left = within.saturating_sub(t0.elapsed());
        assert!(
            !left.is_zero(),
            "only {} of {want} events arrived",
            seen.len()
        );
        let x = tap.next_for(d, left).await;
        let body: Value = serde_json::from_slice(&x.data).unwrap();
        seen.insert(body["n"].as_u64().unwrap() as u32);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_ridden_out_with_buffer_and_reconnect() {
    let mut tap = Tap::new().await;
    let mut proxy = Proxy::start(0).await;
    let url = proxy.url();
    let r = TestRouter::start_with(|c| {
        c.amqp = Some(url);
        fast_device(c);
    });
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;

    send_seq(&mut ws, "seq", 0..200, 64).await;
    wait_metric(
        &r,
        "router_amqp_confirmed_total",
        Duration::from_secs(10),
        |v| v >= 200.0,
    )
    .await;

    // The broker goes away: the bridge notices, /readyz turns 503.
    proxy.cut();
    wait_ready(&r, 503, Duration::from_secs(5)).await;
    assert_eq!(r.metric("router_amqp_connected").await, 0.0);

    // Events meanwhile wait in the buffer; the device stays connected.
    send_seq(&mut ws, "seq", 200..700, 64).await;
    wait_metric(
        &r,
        "router_amqp_buffered_events",
        Duration::from_secs(5),
        |v| v == 500.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(readyz(&r).await, 503);
    assert!(r.metric("router_amqp_connect_failures_total").await >= 1.0);
    let conns = r.metric("router_connections{shard=\"0\"}").await
        + r.metric("router_connections{shard=\"1\"}").await;
    assert_eq!(conns, 1.0, "the device never noticed the outage");

    // The broker is back on the same address: reconnect, flush, ready again.
    let _proxy2 = Proxy::start(proxy.port).await;
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    send_seq(&mut ws, "seq", 700..800, 64).await;
    let seen = collect_seq(&mut tap, d, 800, Duration::from_secs(20)).await;
    assert_eq!(seen, (0..800).collect::<BTreeSet<u32>>());
    wait_metric(
        &r,
        "router_amqp_buffered_events",
        Duration::from_secs(5),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(r.metric("router_amqp_reconnects_total").await, 1.0);
    assert_eq!(r.metric("router_amqp_connected").await, 1.0);
    assert_eq!(
        r.metric("router_amqp_dropped_total{reason=\"buffer_full\"}")
            .await,
        0.0
    );
    // A consumer can see a message before its confirm reaches the bridge: wait for it.
    wait_metric(
        &r,
        "router_amqp_confirmed_total",
        Duration::from_secs(10),
        |v| v >= 800.0,
    )
    .await;
    assert_eq!(
        r.metric("router_events_dropped_total{reason=\"bus_full\"}")
            .await,
        0.0
    );
}

/// The broker closes the router's connection itself (as on a node restart or an
/// operator's `rabbitmqctl close_connection`): reconnect, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_the_connection_forces_a_clean_reconnect() {
    if !have_rabbitmqctl() {
        eprintln!("rabbitmqctl not available: skipping");
        return;
    }
    let mut tap = Tap::new().await;
    let node = format!("amqp-close-{}", Uuid::new_v4().simple());
    let node_id = node.clone();
    let r = TestRouter::start_with(|c| {
        c.amqp = Some(amqp_url());
        c.node_id = Some(node_id);
        fast_device(c);
    });
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    send_seq(&mut ws, "seq", 0..100, 64).await;

    // Find the router's event connection by its name (`hive-router <node>`, not the
    // cluster's `hive-router <node> cluster`) and have the broker close it.
    let closed = broker_close_connection(format!("hive-router {node}\""), "router").await;
    assert!(closed);
    send_seq(&mut ws, "seq", 100..300, 64).await;
    wait_metric(
        &r,
        "router_amqp_reconnects_total",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    let seen = collect_seq(&mut tap, d, 300, Duration::from_secs(20)).await;
    assert_eq!(seen, (0..300).collect::<BTreeSet<u32>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_buffers_boundedly_and_counts_drops() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut r = TestRouter::start_with(|c| {
        c.amqp = Some(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
        c.amqp_buffer = 10;
        fast_device(c);
    });
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    send_seq(&mut ws, "seq", 0..25, 64).await;
    wait_metric(
        &r,
        "router_amqp_dropped_total{reason=\"buffer_full\"}",
        Duration::from_secs(5),
        |v| v == 15.0,
    )
    .await;
    assert_eq!(r.metric("router_amqp_buffered_events").await, 10.0);
    assert_eq!(readyz(&r).await, 503);
    assert_eq!(r.metric("router_amqp_connected").await, 0.0);
    assert!(r.metric("router_amqp_connect_failures_total").await >= 1.0);
    // The device is unaffected: still connected, still heard.
    send_json(&mut ws, json!({"type":"still-here"})).await;
    wait_metric(
        &r,
        "router_events_published_total",
        Duration::from_secs(5),
        |v| v == 26.0,
    )
    .await;
    // On stop, what never reached the broker is counted, not silently lost.
    let h = r.handle_take();
    let shared = h.shared.clone();
    tokio::task::spawn_blocking(move || h.shutdown())
        .await
        .unwrap();
    let m = &shared.metrics.bridge;
    assert_eq!(
        m.dropped_shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        10
    );
    assert_eq!(
        m.dropped_buffer_full
            .load(std::sync::atomic::Ordering::Relaxed),
        16
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_flushes_what_the_shards_accepted() {
    let mut tap = Tap::new().await;
    let mut r = TestRouter::start_with(|c| {
        c.amqp = Some(amqp_url());
        fast_device(c);
    });
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    send_seq(&mut ws, "seq", 0..2000, 64).await;
    wait_metric(
        &r,
        "router_events_published_total",
        Duration::from_secs(10),
        |v| v == 2000.0,
    )
    .await;
    // Stop at once: the bridge must publish and confirm what is still queued.
    let shared = r.handle.as_ref().unwrap().shared.clone();
    let h = r.handle_take();
    tokio::task::spawn_blocking(move || h.shutdown())
        .await
        .unwrap();
    let m = &shared.metrics.bridge;
    assert_eq!(
        m.dropped_shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(m.confirmed.load(std::sync::atomic::Ordering::Relaxed) >= 2000);
    let seen = collect_seq(&mut tap, d, 2000, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 2000);
}

trait TakeHandle {
    fn handle_take(&mut self) -> router::RouterHandle;
}

impl TakeHandle for TestRouter {
    fn handle_take(&mut self) -> router::RouterHandle {
        self.handle.take().expect("router running")
    }
}

/// A drain closes each device with 1001, and the device may already have sent more when
/// that close reaches it. Those frames are still handled: here an event written after
/// the device read the close (as if in flight when the close was sent), then its own
/// close. The event reaches hive.events: a rolling restart loses no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_still_takes_what_the_device_sent_before_it_saw_the_close() {
    use common::raw::*;
    use tokio::io::AsyncWriteExt;
    let mut tap = Tap::new().await;
    let mut r = TestRouter::start_with(|c| {
        c.amqp = Some(amqp_url());
        c.drain_seconds = 1;
    });
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let token = r.token(d, a);
    let mut s = raw_upgrade(&r, &token).await;
    let h = r.handle_take();
    let drain = tokio::task::spawn_blocking(move || h.drain());
    assert_eq!(read_close_code(&mut s).await, 1001);
    s.write_all(&masked_frame(0x1, br#"{"type":"last-word","n":7}"#))
        .await
        .unwrap();
    s.write_all(&masked_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let got = tap.next_for(d, Duration::from_secs(10)).await;
    let v: Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(v["type"], "last-word");
    assert_eq!(v["n"], 7);
    drain.await.unwrap();
}

/// A device cannot route its events through names the broker reads (`CC`, `BCC`,
/// `x-*`): they stay in the body but never become headers, so a queue bound only to a
/// router-owned key (or any other key) gets nothing from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_and_bcc_in_an_event_do_not_route_it() {
    let vh = Vhost::new("hive-cc");
    let url = vh.url();
    let conn = connect(&url).await;
    let ch = conn.create_channel().await.unwrap();
    declare_events_exchange(&ch).await;
    let mut all = consume_bound(&ch, "hive.events", "#").await;
    // Queues a device must not reach: a router-owned key and an unrelated one.
    let mut alive = consume_bound(&ch, "hive.events", "hive-backend.device-alive").await;
    let mut billing = consume_bound(&ch, "hive.events", "billing.invoice").await;
    let r = TestRouter::start_with(|c| c.amqp = Some(url.clone()));
    wait_ready(&r, 200, Duration::from_secs(10)).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    send_json(
        &mut ws,
        json!({"type":"x","CC":["hive-backend.device-alive"]}),
    )
    .await;
    send_json(
        &mut ws,
        json!({"type":"y","BCC":["billing.invoice"],"x-delay":1000}),
    )
    .await;
    send_json(
        &mut ws,
        json!({"type":"z","Cc":["billing.invoice"],"X-Death":[]}),
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let dl = tokio::time::timeout(Duration::from_secs(5), all.next())
            .await
            .expect("events on #")
            .unwrap()
            .unwrap();
        let body: Value = serde_json::from_slice(&dl.data).unwrap();
        if body["device"] != d.to_string() {
            continue;
        }
        let headers = dl.properties.headers().clone().unwrap_or_default();
        for k in ["CC", "BCC", "Cc", "x-delay", "X-Death"] {
            assert!(!headers.inner().contains_key(k), "header {k}: {headers:?}");
        }
        seen.push(body);
    }
    // The body keeps what the device sent.
    assert_eq!(seen[0]["CC"], json!(["hive-backend.device-alive"]));
    assert_eq!(seen[1]["BCC"], json!(["billing.invoice"]));
    // Everything published went to every bound queue at once: nothing on the others.
    for (name, q) in [("device-alive", &mut alive), ("billing", &mut billing)] {
        let got = tokio::time::timeout(Duration::from_millis(300), q.next()).await;
        assert!(
            got.is_err(),
            "a device event reached the {name} queue: {got:?}"
        );
    }
    assert_eq!(
        r.metric("router_amqp_header_keys_reserved_total").await,
        5.0
    );
}
