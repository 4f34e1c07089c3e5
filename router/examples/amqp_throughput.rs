//! Events/s through the router's RabbitMQ bridge next to a bare lapin publisher, in the
//! same run, against the same broker, exchange, queue, confirm window and payload.
//!
//! ```text
//! cargo run --release -p router --example amqp_throughput -- [EVENTS] [WINDOW] [PAYLOAD_BYTES] [ROUNDS]
//! ```
//! Defaults: 100000 events, window 1000, 256-byte JSON bodies, 3 rounds. Broker:
//! $HIVE_AMQP_URL or amqp://guest:guest@127.0.0.1:5672/%2f.
//!
//! - **bare**: one lapin channel with publisher confirms, `WINDOW` publishes awaiting
//!   their confirm at once, persistent, no headers: the ceiling for this broker.
//! - **bare+headers**: the same, with the event's headers computed once up front and
//!   cloned into every publish (what the bridge puts on the wire, minus its work).
//! - **bridge**: a router started in-process with `--amqp`; a producer thread pushes
//!   the events into the shards' bus queue as fast as it takes them; timed until the
//!   bridge has had all of them confirmed (`router_amqp_confirmed_total`).
//!
//! Every run publishes to `hive.events` with a routing key bound to one exclusive queue
//! of this process (persistent messages into a real queue, purged between runs), so
//! the broker does the same work in each.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use router::bridge::BusEvent;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn body(n: usize, size: usize) -> Bytes {
    let mut s = format!(
        r#"{{"type":"bench","n":{n},"apps":[{{"name":"db","healthy":true,"cpu":0.25}}],"device":"6d7a8a8e-3b1e-4a51-9d0a-0c1f2e3d4c5b","account":"0b9c7a1e-2f4d-4e6a-8b9c-1d2e3f4a5b6c","service":"hive-device","pad":""#
    );
    while s.len() + 2 < size {
        s.push('x');
    }
    s.push_str("\"}");
    Bytes::from(s)
}

async fn bare(
    ch: &Channel,
    rk: &str,
    bodies: &[Bytes],
    window: usize,
    headers: Option<&FieldTable>,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0;
    let mut acked = 0;
    while acked < bodies.len() {
        while inflight.len() < window && next < bodies.len() {
            let mut props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            if let Some(h) = headers {
                props = props.with_headers(h.clone());
            }
            let ch = ch.clone();
            let b = bodies[next].clone();
            let rk = rk.to_string();
            inflight.push(async move {
                let c = ch
                    .basic_publish(
                        "hive.events".into(),
                        rk.into(),
                        BasicPublishOptions::default(),
                        &b,
                        props,
                    )
                    .await?;
                c.await
            });
            next += 1;
        }
        match inflight.next().await {
            Some(Ok(Confirmation::Ack(_))) => acked += 1,
            Some(other) => anyhow::bail!("bare publisher: {other:?}"),
            None => break,
        }
    }
    Ok(bodies.len() as f64 / t0.elapsed().as_secs_f64())
}

fn through_bridge(url: &str, rk: &str, bodies: &[Bytes], window: usize) -> anyhow::Result<f64> {
    let mut cfg = router::config::ServeConfig::for_tests("bench");
    cfg.amqp = Some(url.to_string());
    cfg.amqp_confirm_window = window as u32;
    cfg.shards = 1;
    let h = router::start(cfg)?;
    let t_ready = Instant::now();
    while !h.shared.ready.load(Relaxed) {
        anyhow::ensure!(
            t_ready.elapsed() < Duration::from_secs(10),
            "bridge not connected"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = &h.shared.metrics.bridge;
    let base = m.confirmed.load(Relaxed);
    let shared = h.shared.clone();
    let evs: Vec<BusEvent> = bodies
        .iter()
        .map(|b| BusEvent {
            routing_key: rk.to_string(),
            body: b.clone(),
        })
        .collect();
    let n = evs.len() as u64;
    let t0 = Instant::now();
    let producer = std::thread::spawn(move || {
        for mut ev in evs {
            // As a shard would, but waiting instead of dropping when the queue is full.
            while let Err(back) = shared.bus.publish(ev) {
                ev = back;
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    });
    while m.confirmed.load(Relaxed) - base < n {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "bridge too slow");
        std::thread::sleep(Duration::from_micros(200));
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let _ = producer.join();
    anyhow::ensure!(
        m.dropped_buffer_full.load(Relaxed) == 0 && m.nacked.load(Relaxed) == 0,
        "drops or nacks during the run"
    );
    h.shutdown();
    Ok(rate)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let events = arg(1, 100_000);
    let window = arg(2, 1000).max(1);
    let size = arg(3, 256);
    let rounds = arg(4, 3).max(1);
    let url = std::env::var("HIVE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());

    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
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
    let rk = format!("bench.{}", uuid::Uuid::new_v4().simple());
    ch.queue_bind(
        q.name().clone(),
        "hive.events".into(),
        rk.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let pub_ch = conn.create_channel().await?;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let bodies: Vec<Bytes> = (0..events).map(|n| body(n, size)).collect();
    let headers = router::bridge::headers::from_json(&bodies[0])?.table;
    println!(
        "{events} events of {} bytes, confirm window {window}, {rounds} rounds, broker {}",
        bodies[0].len(),
        url.split('@').next_back().unwrap_or("")
    );
    let (mut b, mut bh, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let purge = || async {
            ch.queue_purge(q.name().clone(), QueuePurgeOptions::default())
                .await
                .map(|_| ())
        };
        purge().await?;
        let x = bare(&pub_ch, &rk, &bodies, window, None).await?;
        purge().await?;
        let y = bare(&pub_ch, &rk, &bodies, window, Some(&headers)).await?;
        purge().await?;
        let (u, rk2, bs) = (url.clone(), rk.clone(), bodies.clone());
        let z =
            tokio::task::spawn_blocking(move || through_bridge(&u, &rk2, &bs, window)).await??;
        purge().await?;
        println!(
            "round {round}: bare {x:>8.0} ev/s   bare+headers {y:>8.0} ev/s   bridge {z:>8.0} ev/s"
        );
        b.push(x);
        bh.push(y);
        r.push(z);
    }
    let (mb, mbh, mr) = (median(&mut b), median(&mut bh), median(&mut r));
    println!(
        "median: bare {mb:.0} ev/s, bare+headers {mbh:.0} ev/s, bridge {mr:.0} ev/s; bridge/bare = {:.2}, bridge/bare+headers = {:.2}",
        mr / mb,
        mr / mbh
    );
    conn.close(200, "done".into()).await?;
    Ok(())
}
