//! Against a real 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh start`; its
//! URLs in HIVE_RMQ_CLUSTER_URLS, node 1 first): kill -9 the broker node the routers are
//! connected to while a device streams events. The routers fail over to another node,
//! publish again, every confirmed event is in a quorum queue (duplicates counted), the
//! backend delivery (quorum queue, `--amqp-queue-type quorum`) resumes with nothing lost,
//! and requests across router nodes work again. The failover times are printed.
//!
//! Skipped when HIVE_RMQ_CLUSTER_URLS is not set, unless HIVE_REQUIRE_RMQ_CLUSTER is
//! (scripts/test.sh sets both).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::amqp::*;
use common::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};
use uuid::Uuid;

fn cluster_urls() -> Option<String> {
    match std::env::var("HIVE_RMQ_CLUSTER_URLS") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var_os("HIVE_REQUIRE_RMQ_CLUSTER").is_none(),
                "HIVE_REQUIRE_RMQ_CLUSTER is set but HIVE_RMQ_CLUSTER_URLS is not"
            );
            None
        }
    }
}

fn cluster_script(args: &[&str]) {
    let ok = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/rabbitmq-cluster.sh"
    ))
    .args(args)
    .status()
    .expect("the cluster script runs")
    .success();
    assert!(ok, "rabbitmq-cluster.sh {args:?}");
}

/// A backend that accepts every batch and records the `n` of each event of `ty`.
async fn backend(seen: Arc<Mutex<BTreeMap<u64, u32>>>) -> String {
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |body: bytes::Bytes| {
            let seen = seen.clone();
            async move {
                let arr: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
                let mut s = seen.lock().unwrap();
                for v in arr {
                    if let Some(n) = v["n"].as_u64() {
                        *s.entry(n).or_default() += 1;
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", l.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_broker_node_loses_no_confirmed_event() {
    let Some(urls) = cluster_urls() else {
        eprintln!("no RabbitMQ cluster (HIVE_RMQ_CLUSTER_URLS): skipping");
        return;
    };
    let node2 = urls.split(',').nth(1).unwrap().to_string();
    let ty = format!("fo{}", Uuid::new_v4().simple());
    let key = format!("hive-device.{ty}");

    // The test's own quorum queue, through node 2 (it outlives node 1).
    let conn = connect(&node2).await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "hive.events".into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let tap = format!("test.failover.{}", Uuid::new_v4().simple());
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        tap.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await
    .unwrap();
    ch.queue_bind(
        tap.as_str().into(),
        "hive.events".into(),
        key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let backend_url = backend(seen.clone()).await;
    let backend_queue = format!("test.failover.backend.{}", Uuid::new_v4().simple());
    let (u1, bq, bk, bu) = (
        urls.clone(),
        backend_queue.clone(),
        key.clone(),
        backend_url,
    );
    let a = TestRouter::start_with(move |c| {
        c.amqp = Some(u1);
        c.node_id = Some(format!("fo-a-{}", Uuid::new_v4().simple()));
        c.backend_url = Some(bu);
        c.backend_queue = bq;
        c.backend_bindings = vec![bk];
        c.amqp_queue_type = router::config::QueueType::Quorum;
        fast_device(c);
    });
    let u2 = urls.clone();
    let b = TestRouter::start_with(move |c| {
        c.amqp = Some(u2);
        c.node_id = Some(format!("fo-b-{}", Uuid::new_v4().simple()));
        fast_device(c);
    });
    for r in [&a, &b] {
        let t0 = Instant::now();
        while get(r, "/readyz").await.0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(15), "router not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A device on B answers requests; events from a device on A.
    let (dr, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let mut responder = b.device(dr, acc).await;
    let answering = tokio::spawn(async move {
        while let Some(Ok(msg)) = responder.next().await {
            let Ok(text) = msg.to_text() else { continue };
            let Ok(m) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if m["type"] == "device-request" {
                send_json(&mut responder, json!({"type":"ack","request":m["request"]})).await;
            }
        }
    });
    let (de, _) = ids();
    let mut ws = a.device(de, acc).await;
    let t_owner = Instant::now();
    loop {
        let (s, _) = a.request(dr, json!({"command":"before"}), "").await;
        if s == 200 {
            break;
        }
        assert!(
            t_owner.elapsed() < Duration::from_secs(10),
            "cross-node request never acked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Events every 5 ms; node 1 killed after the first 100 are confirmed.
    let sender = tokio::spawn(async move {
        for n in 0..1200u64 {
            send_json(&mut ws, json!({"type": ty, "n": n})).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ws
    });
    wait_metric(
        &a,
        "router_amqp_confirmed_total",
        Duration::from_secs(10),
        |v| v >= 100.0,
    )
    .await;
    let confirmed_before = a.metric("router_amqp_confirmed_total").await;
    let killed = Instant::now();
    cluster_script(&["kill", "1"]);

    // Publishing again through another node.
    loop {
        let m = a.metrics().await;
        if metric_value(&m, "router_amqp_confirmed_total") > confirmed_before + 50.0 {
            break;
        }
        let show: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("router_amqp_"))
            .collect();
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "not publishing again after 30 s: {show:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let publishing_again = killed.elapsed();
    // Requests across router nodes.
    let cross_again = loop {
        let (s, _) = b.request(dr, json!({"command":"after"}), "").await;
        let (s2, _) = a.request(dr, json!({"command":"after"}), "").await;
        if s == 200 && s2 == 200 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "requests never worked again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ws = sender.await.unwrap();
    // Everything published is confirmed (or still buffered: wait for it).
    let t0 = Instant::now();
    loop {
        let m = a.metrics().await;
        if metric_value(&m, "router_amqp_unconfirmed_events") == 0.0
            && metric_value(&m, "router_amqp_buffered_events") == 0.0
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "events never all confirmed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        a.metric("router_amqp_dropped_total{reason=\"buffer_full\"}")
            .await,
        0.0
    );

    // Every one of the 1,200 events is in the quorum queue (duplicates allowed).
    let mut consumer = ch
        .basic_consume(
            tap.as_str().into(),
            "tap".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut in_queue: BTreeMap<u64, u32> = BTreeMap::new();
    while in_queue.len() < 1200 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of 1200 events in the queue", in_queue.len()))
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        *in_queue.entry(v["n"].as_u64().unwrap()).or_default() += 1;
    }
    let duplicates: u32 = in_queue.values().map(|c| c - 1).sum();
    // And at the backend, through the backend delivery's own failover.
    let t0 = Instant::now();
    while seen.lock().unwrap().len() < 1200 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the backend got {} of 1200 events",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backend_dups: u32 = seen.lock().unwrap().values().map(|c| c - 1).sum();
    eprintln!(
        "broker node killed: publishing again after {publishing_again:?}, requests across nodes after {cross_again:?}; \
         1200/1200 events in the quorum queue ({duplicates} duplicates), 1200/1200 at the backend ({backend_dups} duplicates)"
    );
    answering.abort();
    drop(a);
    drop(b);
    let _ = ch
        .queue_delete(tap.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(backend_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    cluster_script(&["restart", "1"]);
}

/// `amqps://` to node 2's TLS listener, which requires a client certificate: with the
/// broker's CA (`--amqp-ca`) and a client certificate the router connects and its events
/// are confirmed; without the certificate, or with another CA, it does not connect
/// (counted in `router_amqp_connect_failures_total`) and is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    if cluster_urls().is_none() {
        eprintln!("no RabbitMQ cluster (HIVE_RMQ_CLUSTER_URLS): skipping");
        return;
    }
    let tls = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/rabbitmq-cluster/tls"
    );
    let url = "amqps://guest:guest@127.0.0.1:5692/%2f".to_string();
    let f = |name: &str| std::path::PathBuf::from(format!("{tls}/{name}"));
    let start = |ca: &str, client: bool| {
        let (url, ca, cert, key) = (url.clone(), f(ca), f("client.pem"), f("client.key"));
        TestRouter::start_with(move |c| {
            c.amqp = Some(url);
            c.node_id = Some(format!("tls-{}", Uuid::new_v4().simple()));
            c.amqp_ca = Some(ca);
            if client {
                c.amqp_cert = Some(cert);
                c.amqp_key = Some(key);
            }
            fast_device(c);
        })
    };

    let good = start("ca.pem", true);
    let t0 = Instant::now();
    while get(&good, "/readyz").await.0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "not ready over amqps"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = good.device(Uuid::new_v4(), Uuid::new_v4()).await;
    send_json(&mut ws, json!({"type":"over-tls"})).await;
    wait_metric(
        &good,
        "router_amqp_confirmed_total",
        Duration::from_secs(10),
        |v| v >= 1.0,
    )
    .await;

    for (ca, client) in [("ca.pem", false), ("wrong-ca.pem", true)] {
        let bad = start(ca, client);
        wait_metric(
            &bad,
            "router_amqp_connect_failures_total",
            Duration::from_secs(15),
            |v| v >= 1.0,
        )
        .await;
        assert_eq!(
            bad.metric("router_amqp_connected").await,
            0.0,
            "{ca} {client}"
        );
        assert_eq!(get(&bad, "/readyz").await.0, 503, "{ca} {client}");
    }
}
