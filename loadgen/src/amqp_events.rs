//! Event latency in AMQP mode: an exclusive, server-named queue bound to `hive.events`
//! with `#`, consumed without acks; each event stamped `sent_us` by a simulated device is
//! timed from that stamp to its arrival here (same host clock).

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::hist;

/// Connect and start consuming; returns once the queue is bound, so no event sent after
/// it is missed. The consumer runs as a task until the process ends.
pub async fn watch(
    url: &str,
    h: Arc<Mutex<Histogram<u64>>>,
    received: Arc<Mutex<u64>>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        "hive.events".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        "hive.events".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "loadgen".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        let _keep = conn;
        while let Some(Ok(d)) = consumer.next().await {
            let now = crate::coordinator::now_us();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&d.data) else {
                continue;
            };
            let sent = v["sent_us"]
                .as_u64()
                .or(v["payload"]["sent_us"].as_u64())
                .or(v["data"]["sent_us"].as_u64());
            if let Some(sent) = sent {
                hist::record(
                    &mut h.lock().unwrap_or_else(|e| e.into_inner()),
                    now.saturating_sub(sent),
                );
                *received.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            }
        }
    });
    Ok(())
}
