//! RabbitMQ itself restarts (`rabbitmqctl stop_app` / `start_app`) under a steady
//! event stream, with two router nodes: devices never disconnect, every event the
//! routers took ends in the queue afterwards (or is counted as dropped), the nodes
//! re-declare their topology and re-announce their devices, and a request through
//! one node reaches a device on the other again.
//!
//! The only test in this binary on purpose: it stops the broker for everyone, and
//! cargo runs test binaries one after another. It uses its own vhost (deleted at the
//! end) and a durable queue of its own in it.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::amqp::*;
use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use uuid::Uuid;

/// The test's vhost; on drop (also when the test failed mid-restart) the broker is
/// first brought back for everyone else, then the vhost is deleted.
struct RestartGuard(Vhost);
impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

async fn until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_under_load_loses_nothing_and_reannounces() {
    let vh = RestartGuard(Vhost::new("hive-restart"));
    let url = vh.0.url();

    // A durable queue of our own on hive.events: what the routers published must be
    // there after the restart.
    {
        let conn = connect(&url).await;
        let ch = conn.create_channel().await.unwrap();
        declare_events_exchange(&ch).await;
        ch.queue_declare(
            "restart-check".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "restart-check".into(),
            "hive.events".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    let mk = |id: &str| {
        let (url, id) = (url.clone(), id.to_string());
        TestRouter::start_with(move |c| {
            c.amqp = Some(url);
            c.node_id = Some(id);
            fast_device(c);
        })
    };
    let a = mk("ra");
    let b = mk("rb");
    for r in [&a, &b] {
        until("ready", Duration::from_secs(15), async || {
            get(r, "/readyz").await.0 == 200
        })
        .await;
    }
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = b.device(d, acc).await;
    until(
        "A sees the device on B",
        Duration::from_secs(10),
        async || get(&a, &format!("/v1/devices/{d}")).await.1["node"] == "rb",
    )
    .await;

    // A steady stream of events (about 400/s) while the broker stops and starts.
    const N: u32 = 4000;
    let sender = tokio::spawn(async move {
        let t0 = Instant::now();
        for n in 0..N {
            send_json(&mut ws, json!({"type":"status","n":n})).await;
            let due = t0 + Duration::from_micros(2500 * u64::from(n + 1));
            tokio::time::sleep_until(due.into()).await;
        }
        ws
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctl(&["stop_app"]);
    until("both nodes notice", Duration::from_secs(10), async || {
        get(&a, "/readyz").await.0 == 503 && get(&b, "/readyz").await.0 == 503
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctl(&["start_app"]);
    let mut ws = sender.await.unwrap();

    for r in [&a, &b] {
        until("reconnected", Duration::from_secs(30), async || {
            get(r, "/readyz").await.0 == 200
        })
        .await;
    }
    until("buffer flushed", Duration::from_secs(20), async || {
        b.metric("router_amqp_buffered_events").await == 0.0
            && b.metric("router_amqp_unconfirmed_events").await == 0.0
    })
    .await;
    assert!(b.metric("router_amqp_reconnects_total").await >= 1.0);
    assert!(a.metric("router_amqp_reconnects_total").await >= 1.0);
    // The device never noticed.
    let conns = b.metric("router_connections{shard=\"0\"}").await
        + b.metric("router_connections{shard=\"1\"}").await;
    assert_eq!(conns, 1.0);

    // Every event is in the durable queue (a duplicate is allowed: at-least-once),
    // or counted as dropped.
    let dropped = b
        .metric("router_amqp_dropped_total{reason=\"buffer_full\"}")
        .await
        + b.metric("router_events_dropped_total{reason=\"bus_full\"}")
            .await;
    let conn = connect(&url).await;
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "restart-check".into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    while let Ok(Some(Ok(dl))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        let v: Value = serde_json::from_slice(&dl.data).unwrap();
        if v["type"] == "status" && v["device"] == d.to_string() {
            seen.insert(v["n"].as_u64().unwrap() as u32);
            total += 1;
        }
        dl.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let missing = N as usize - seen.len();
    assert_eq!(
        missing as f64, dropped,
        "{missing} events missing, {dropped} counted as dropped (received {total})"
    );
    assert_eq!(dropped, 0.0, "the buffer is large enough for this outage");
    let _ = conn.close(200, "bye".into()).await;

    // The nodes registered their devices again: A reaches the device on B again.
    until(
        "device registered again",
        Duration::from_secs(15),
        async || get(&a, &format!("/v1/devices/{d}")).await.1["node"] == "rb",
    )
    .await;
    let dev = tokio::spawn(async move {
        loop {
            let m = next_json(&mut ws).await;
            if m["type"] == "device-request" {
                send_json(&mut ws, json!({"type":"ack","request":m["request"]})).await;
                return m;
            }
        }
    });
    let (s, body) = a.request(d, json!({"command":"after-restart"}), "").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(dev.await.unwrap()["command"], "after-restart");
    // Everyone was away together: no node was taken for dead.
    assert_eq!(a.metric("router_cluster_nodes_expired_total").await, 0.0);
    assert_eq!(b.metric("router_cluster_nodes_expired_total").await, 0.0);
}
