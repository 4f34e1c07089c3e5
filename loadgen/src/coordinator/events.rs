//! The event side of a run: the events the devices send, watched as they arrive (a
//! hive.events consumer with --amqp, else the routers' /v1/events streams), timed and
//! counted (per device with --amqp), and at the end the wait for those still in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;

use super::now_us;
use crate::cli::Args;
use crate::hist;
use crate::scenario;
use crate::seqs::SeqCounter;

/// Events in flight at the end count once no new one arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

/// The event side of a run: latency, counts, per-device seqs, the AMQP consumer.
pub(super) struct Events {
    pub(super) hist: Arc<Mutex<Histogram<u64>>>,
    pub(super) received: Arc<Mutex<u64>>,
    /// Per-device seqs counted (--amqp with events on).
    pub(super) counted: bool,
    pub(super) seqs: Arc<Mutex<SeqCounter>>,
    pub(super) consumer_reconnects: Arc<AtomicU64>,
    consumer_connected: Arc<AtomicBool>,
    pub(super) consumer: Option<crate::amqp_events::Watcher>,
}

impl Events {
    pub(super) fn received(&self) -> u64 {
        *self.received.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Start watching events when any part of the run has devices send them: through a
/// hive.events consumer with --amqp, else the routers' /v1/events streams.
pub(super) async fn start(
    args: &Args,
    http: &reqwest::Client,
    apis: &[String],
    account: uuid::Uuid,
) -> anyhow::Result<Events> {
    let on = scenario::events_on(args);
    // Per-device seq counts: with --amqp only (see cli's --amqp). 8 bytes per device.
    let counted = args.amqp.is_some() && on;
    let mut ev = Events {
        hist: Arc::new(Mutex::new(hist::new_hist())),
        received: Arc::new(Mutex::new(0u64)),
        counted,
        seqs: Arc::new(Mutex::new(SeqCounter::new(if counted {
            args.devices
        } else {
            0
        }))),
        consumer_reconnects: Arc::new(AtomicU64::new(0)),
        consumer_connected: Arc::new(AtomicBool::new(false)),
        consumer: None,
    };
    match (&args.amqp, on) {
        (_, false) => {}
        // AMQP mode: the events' real way out, a hive.events consumer.
        (Some(url), true) => {
            let cfg = crate::amqp_events::Config {
                realtime: args.realtime,
                url: url.clone(),
                durable: args.amqp_durable_events,
                account: account.to_string(),
            };
            let sink = crate::amqp_events::Sink {
                hist: ev.hist.clone(),
                received: ev.received.clone(),
                seqs: ev.seqs.clone(),
                reconnects: ev.consumer_reconnects.clone(),
                connected: ev.consumer_connected.clone(),
            };
            ev.consumer = Some(
                crate::amqp_events::watch(cfg, sink)
                    .await
                    .map_err(|e| anyhow::anyhow!("--amqp {url}: {e}"))?,
            );
        }
        (None, true) => watch_events(
            http.clone(),
            apis.to_vec(),
            ev.hist.clone(),
            ev.received.clone(),
        ),
    }
    Ok(ev)
}

/// Follow every node's /v1/events and time each event stamped with `sent_us`.
fn watch_events(
    http: reqwest::Client,
    apis: Vec<String>,
    hist: Arc<Mutex<Histogram<u64>>>,
    received: Arc<Mutex<u64>>,
) {
    for api in apis {
        let (http, hist, received) = (http.clone(), hist.clone(), received.clone());
        tokio::spawn(async move {
            let Ok(resp) = http.get(format!("{api}/v1/events")).send().await else {
                return;
            };
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                let now = now_us();
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = buf.drain(..pos + 2).collect();
                    for line in block.split(|b| *b == b'\n') {
                        let Some(data) = line
                            .strip_prefix(b"data: ")
                            .or_else(|| line.strip_prefix(b"data:"))
                        else {
                            continue;
                        };
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                            continue;
                        };
                        let sent = v["sent_us"]
                            .as_u64()
                            .or(v["payload"]["sent_us"].as_u64())
                            .or(v["data"]["sent_us"].as_u64());
                        if let Some(sent) = sent {
                            hist::record(
                                &mut hist.lock().unwrap_or_else(|e| e.into_inner()),
                                now.saturating_sub(sent),
                            );
                            *received.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        }
                    }
                }
            }
        });
    }
}

/// Events still in flight (queued in the routers, the bridge, the broker): counted once
/// the consumer saw none arrive for DRAIN_QUIET, or at --event-drain-timeout. Quiet
/// while the consumer is reconnecting does not count. The seconds spent.
pub(super) async fn drain(ev: &Events, limit: f64) -> f64 {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(limit);
    let (mut last, mut since) = (ev.received(), Instant::now());
    while start.elapsed() < limit && since.elapsed() < DRAIN_QUIET {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = ev.received();
        if now != last || !ev.consumer_connected.load(Ordering::Relaxed) {
            (last, since) = (now, Instant::now());
        }
    }
    start.elapsed().as_secs_f64()
}
