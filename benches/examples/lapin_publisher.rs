//! The reference for the bridge's throughput: a bare lapin publisher, publisher confirms
//! with WINDOW publishes outstanding, the same event body, routing key and headers the
//! router would send, to `hive.events`, for S seconds. Prints `msgs/s` confirmed.
//! `lapin_publisher amqp://guest:guest@127.0.0.1:5672/%2f S WINDOW`
//! `lapin_publisher URL setup` declares `hive.events` and a durable queue `bench` bound
//! with `#` (capped at 200,000 messages, oldest dropped), so both publishers' messages
//! are routed and persisted as with a backend queue in production.

use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let url = a
        .get(1)
        .cloned()
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let setup = a.get(2).is_some_and(|s| s == "setup");
    let secs: f64 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let window: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
    // What the router publishes for one flood event (metadata injected).
    let body = serde_json::json!({"type": "instances", "apps": [{"name": "db", "healthy": true, "restarts": 0}, {"name": "web", "healthy": true, "restarts": 2}], "device": "00000000-0000-0000-0000-000f100d0000", "account": "00000000-0000-0000-0000-000000000001", "service": "hive-device"}).to_string().into_bytes();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        "hive.events".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    if setup {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            lapin::types::AMQPValue::LongInt(200_000),
        );
        args.insert(
            "x-overflow".into(),
            lapin::types::AMQPValue::LongString("drop-head".into()),
        );
        ch.queue_declare(
            "bench".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("queue");
        ch.queue_bind(
            "bench".into(),
            "hive.events".into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let _ = conn.close(200, "bye".into()).await;
        return;
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut inflight = FuturesUnordered::new();
    let mut confirmed = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        while inflight.len() < window {
            // The headers are mapped per message, as the bridge does.
            let h = router::bus::headers::from_json(&body).expect("headers");
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(h.table);
            let ch = ch.clone();
            let body = body.clone();
            inflight.push(async move {
                let c = ch
                    .basic_publish(
                        "hive.events".into(),
                        "hive-device.instances".into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .expect("publish");
                c.await.map(|c| c.is_ack()).unwrap_or(false)
            });
        }
        if let Some(true) = inflight.next().await {
            confirmed += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "lapin confirmed {confirmed} in {elapsed:.2}s = {:.0} msgs/s (window {window})",
        confirmed as f64 / elapsed
    );
    let _ = conn.close(200, "bye".into()).await;
}
