//! Event-path throughput client: C connections each sending `instances` events as fast
//! as TCP takes them for S seconds. Against the router it authenticates first and counts
//! what the router's bus delivered (from /metrics); against the echo reference it counts
//! echoes received. Prints `msgs/s`.
//! `flood router ws://127.0.0.1:9900/ws http://127.0.0.1:9901 SECRET C S`
//! `flood echo ws://127.0.0.1:9910 - - C S`
//! `flood amqp ws://127.0.0.1:9900/ws http://127.0.0.1:9901 SECRET C S` (router with
//! --amqp: counts events RabbitMQ confirmed, `router_amqp_confirmed_total`)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BATCH: usize = 32;

async fn bus_events(api: &str, metric: &str) -> u64 {
    let Ok(r) = reqwest::get(format!("{api}/metrics")).await else {
        return 0;
    };
    let body = r.text().await.unwrap_or_default();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(metric)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|v| v as u64)
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (mode, url, api, secret) = (a[1].clone(), a[2].clone(), a[3].clone(), a[4].clone());
    let conns: usize = a[5].parse().unwrap_or(64);
    let secs: f64 = a[6].parse().unwrap_or(10.0);
    // Optional 7th argument: offered events/s in total (paced); default: as fast as TCP.
    let rate: f64 = a.get(7).and_then(|r| r.parse().ok()).unwrap_or(0.0);
    let per_conn_batch_every =
        (rate > 0.0).then(|| Duration::from_secs_f64(BATCH as f64 * conns as f64 / rate));
    let event = serde_json::json!({"type": "instances", "apps": [{"name": "db", "healthy": true, "restarts": 0}, {"name": "web", "healthy": true, "restarts": 2}]}).to_string();
    // `amqp`: a router with --amqp; what counts is what RabbitMQ confirmed.
    let metric = if mode == "amqp" {
        "router_amqp_confirmed_total "
    } else {
        "router_bus_events_total "
    };
    let authed = mode == "router" || mode == "amqp";
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..conns {
        let mut req = url.as_str().into_client_request().expect("url");
        if authed {
            let d = uuid::Uuid::from_u128(0x000f_100d_0000 + i as u128);
            let t = router::auth::mint(&secret, d, uuid::Uuid::from_u128(1), 3600);
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        if authed {
            let _ = ws.next().await; // authenticated
        }
        sockets.push(ws);
    }
    let before = if authed {
        bus_events(&api, metric).await
    } else {
        0
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    for ws in sockets {
        let (mut tx, mut rx) = ws.split();
        let (event, sent, received) = (event.clone(), sent.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let reader = tokio::spawn(async move {
                while let Some(Ok(m)) = rx.next().await {
                    if m.is_text() {
                        received.fetch_add(1, Relaxed);
                    }
                }
            });
            let mut next = Instant::now();
            while Instant::now() < end {
                if let Some(every) = per_conn_batch_every {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
                for _ in 0..BATCH {
                    if tx.feed(Message::text(event.clone())).await.is_err() {
                        return;
                    }
                }
                if tx.flush().await.is_err() {
                    return;
                }
                sent.fetch_add(BATCH as u64, Relaxed);
            }
            let _ = tx.close().await;
            reader.abort();
        }));
    }
    // The rate is what was delivered inside the sending window [start, end]: kernel
    // socket buffers hold megabytes per connection, so what the senders have written by
    // the end says little about what the server has processed by then.
    tokio::time::sleep_until(end.into()).await;
    let in_window = if authed {
        bus_events(&api, metric).await - before
    } else {
        received.load(Relaxed)
    };
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    // Then, for the router, wait (up to 10 s) for the rest to arrive: nothing may be lost.
    let mut total = in_window;
    if mode == "router" {
        let s = sent.load(Relaxed);
        let give_up = Instant::now() + Duration::from_secs(10);
        while total < s && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(200)).await;
            total = bus_events(&api, metric).await - before;
        }
    }
    println!(
        "{mode} sent {} delivered {} (in window {}) in {:.2}s = {:.0} msgs/s",
        sent.load(Relaxed),
        total,
        in_window,
        elapsed,
        in_window as f64 / elapsed
    );
}
