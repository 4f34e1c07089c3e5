//! Device events in AMQP mode: a consumer of `hive.events` (bound with `#`) times each
//! event stamped `sent_us` by a simulated device (same host clock) and counts each
//! device's `seq`s (`seqs::SeqCounter`). Only this run's account counts: the exchange
//! carries every account's events, and device ids repeat from run to run.
//!
//! The queue is either exclusive and auto-deleted, consumed without acks (default: it
//! vanishes with the connection, and events published meanwhile are lost to loadgen),
//! or with --amqp-durable-events a named durable queue `loadgen.events.<random>` with
//! `x-expires`, consumed with a prefetch limit and acks in batches, so that the router's
//! persistent events wait in it across a broker stop_app/start_app or a lost connection.
//!
//! When the connection goes (broker stopped, connection closed by the broker, consumer
//! cancelled), the consumer reconnects with jittered exponential backoff and declares its
//! queue again (for the durable one, the same queue). At the end of the run the durable
//! queue is deleted (`Watcher::finish`): left bound to hive.events, it would take in
//! every persistent event of the runs after it until it expires. `x-expires` is for a
//! run that could not delete it.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, Event, ExchangeKind};
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::hist;
use crate::seqs::{Seen, SeqCounter};

/// The durable queue outlives its last consumer by this long (RabbitMQ's `x-expires`),
/// enough for a broker restart, then goes away by itself.
const QUEUE_EXPIRES_MS: i32 = 600_000;

/// Unacked deliveries at most on the durable queue (basic.qos prefetch).
const PREFETCH: u16 = 2000;

/// Acks go out (with `multiple`) after this many deliveries, or after `ACK_EVERY` when
/// fewer are pending.
const ACK_BATCH: u32 = 500;
const ACK_EVERY: Duration = Duration::from_millis(100);

/// Reconnect backoff: 100 ms doubling to 5 s, each wait jittered by 0.5-1.5x.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A connection attempt (TCP, AMQP handshake, declarations) that takes longer is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Config {
    pub url: String,
    /// --realtime: the connection's I/O thread runs SCHED_FIFO too (see
    /// `coordinator::realtime_threads`).
    pub realtime: bool,
    /// --amqp-durable-events.
    pub durable: bool,
    /// The run's account (hyphenated UUID, as the router writes it).
    pub account: String,
}

/// What the consumer fills in, read by the coordinator.
#[derive(Clone)]
pub struct Sink {
    /// Event latency, µs.
    pub hist: Arc<Mutex<Histogram<u64>>>,
    /// Deliveries of stamped events (duplicates included, consumer redeliveries not).
    pub received: Arc<Mutex<u64>>,
    pub seqs: Arc<Mutex<SeqCounter>>,
    /// Times the consumer lost its connection and connected again.
    pub reconnects: Arc<AtomicU64>,
    /// The consumer has its connection now.
    pub connected: Arc<AtomicBool>,
}

/// What a delivery's body holds for loadgen. The router writes `device` and `account` at
/// the top level of every event; a device's `sent_us` and `seq` are at the top level
/// (hive), in `payload` (Phoenix) or in `data` (hivekit object updates).
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    device: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    account: Option<Cow<'a, str>>,
    #[serde(default)]
    sent_us: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Stamp {
    #[serde(default)]
    sent_us: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
}

/// The (sent_us, seq) a body carries, where the device's protocol puts them.
fn stamp(b: &Body) -> Option<(u64, Option<u64>)> {
    if let Some(sent) = b.sent_us {
        return Some((sent, b.seq));
    }
    [b.payload, b.data].into_iter().flatten().find_map(|raw| {
        let s: Stamp = serde_json::from_str(raw.get()).ok()?;
        Some((s.sent_us?, s.seq))
    })
}

/// Count one delivery.
fn count(sink: &Sink, account: &str, body: &[u8], redelivered: bool, now_us: u64) {
    let Ok(b) = serde_json::from_slice::<Body>(body) else {
        return;
    };
    if b.account.as_deref() != Some(account) {
        return;
    }
    let Some((sent, seq)) = stamp(&b) else {
        return;
    };
    let device = b.device.as_deref().and_then(crate::cli::device_index);
    if let (Some(d), Some(seq)) = (device, seq) {
        let seen = sink
            .seqs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(d, seq, redelivered);
        // Counted (and timed) at its first delivery already.
        if seen == Some(Seen::Redelivered) {
            return;
        }
    }
    hist::record(
        &mut sink.hist.lock().unwrap_or_else(|e| e.into_inner()),
        now_us.saturating_sub(sent),
    );
    *sink.received.lock().unwrap_or_else(|e| e.into_inner()) += 1;
}

fn backoff(attempt: u32) -> Duration {
    let d = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(6))
        .min(BACKOFF_CAP);
    d.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

struct Session {
    conn: Connection,
    ch: Channel,
    consumer: Consumer,
}

/// Connect, declare the exchange and the queue, bind, consume.
async fn open(cfg: &Config, queue: &str) -> lapin::Result<Session> {
    let props = ConnectionProperties::default().with_connection_name("loadgen events".into());
    let conn = Connection::connect(&cfg.url, props).await?;
    if cfg.realtime {
        crate::coordinator::realtime_threads("lapin-io-loop");
    }
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
    let q = if cfg.durable {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), opts, args).await?
    } else {
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        ch.queue_declare("".into(), opts, FieldTable::default())
            .await?
    };
    ch.queue_bind(
        q.name().clone(),
        "hive.events".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    if cfg.durable {
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    }
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "loadgen".into(),
            BasicConsumeOptions {
                no_ack: !cfg.durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(Session { conn, ch, consumer })
}

async fn open_timed(cfg: &Config, queue: &str) -> anyhow::Result<Session> {
    match tokio::time::timeout(CONNECT_TIMEOUT, open(cfg, queue)).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("no answer within {CONNECT_TIMEOUT:?}"),
    }
}

/// How a session ended.
enum Ended {
    /// The run is over (`Watcher::finish`).
    Finished,
    /// The connection or the consumer went; why.
    Lost(String),
}

/// Consume until the connection or the consumer ends, or the run does.
async fn consume(
    s: Session,
    cfg: &Config,
    queue: &str,
    sink: &Sink,
    finish: &mut tokio::sync::watch::Receiver<bool>,
) -> Ended {
    let Session {
        conn,
        ch,
        mut consumer,
    } = s;
    let mut conn_events = conn.events_listener();
    let mut tick = tokio::time::interval(ACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The latest delivery not yet acked, and how many are pending up to it.
    let (mut last_tag, mut pending) = (0u64, 0u32);
    let ack = |tag: u64| ch.basic_ack(tag, BasicAckOptions { multiple: true });
    let end = loop {
        tokio::select! {
            _ = async { finish.wait_for(|f| *f).await.is_ok() } => {
                if pending > 0 {
                    let _ = ack(last_tag).await;
                }
                if cfg.durable {
                    let deleted = ch
                        .queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await;
                    if let Err(e) = deleted {
                        eprintln!(
                            "loadgen: could not delete the event queue {queue} ({e}); RabbitMQ drops it after {} s unused",
                            QUEUE_EXPIRES_MS / 1000
                        );
                    }
                }
                break Ended::Finished;
            }
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    count(sink, &cfg.account, &d.data, d.redelivered, crate::coordinator::now_us());
                    if cfg.durable {
                        (last_tag, pending) = (d.delivery_tag, pending + 1);
                        if pending >= ACK_BATCH {
                            if let Err(e) = ack(last_tag).await {
                                break Ended::Lost(format!("ack failed: {e}"));
                            }
                            pending = 0;
                        }
                    }
                }
                Some(Err(e)) => break Ended::Lost(format!("consumer: {e}")),
                None => break Ended::Lost("consumer cancelled by the broker".into()),
            },
            ev = conn_events.next() => match ev {
                Some(Event::Error(e)) => break Ended::Lost(format!("connection: {e}")),
                None => break Ended::Lost("connection gone".into()),
                Some(_) => {}
            },
            _ = tick.tick() => {
                if pending > 0 {
                    if let Err(e) = ack(last_tag).await {
                        break Ended::Lost(format!("ack failed: {e}"));
                    }
                    pending = 0;
                }
                if !conn.status().connected() || !ch.status().connected() {
                    break Ended::Lost("connection closed".into());
                }
            }
        }
    };
    drop(consumer);
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
    end
}

/// The running consumer.
pub struct Watcher {
    finish: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// End the consumer: ack what it holds, delete the durable queue, close. Waits a few
    /// seconds at most (a consumer without a connection just stops).
    pub async fn finish(self) {
        let _ = self.finish.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Connect and start consuming; returns once the queue is bound, so no event sent after
/// it is missed (a failure of this first connection is the caller's error). The consumer
/// then runs as a task, reconnecting as needed, until `Watcher::finish`.
pub async fn watch(cfg: Config, sink: Sink) -> anyhow::Result<Watcher> {
    let queue = format!("loadgen.events.{:016x}", rand::random::<u64>());
    let first = open_timed(&cfg, &queue).await?;
    let (finish_tx, mut finish) = tokio::sync::watch::channel(false);
    sink.connected.store(true, Ordering::Relaxed);
    let task = tokio::spawn(async move {
        let mut session = Some(first);
        loop {
            if let Some(s) = session.take() {
                let end = consume(s, &cfg, &queue, &sink, &mut finish).await;
                sink.connected.store(false, Ordering::Relaxed);
                match end {
                    Ended::Finished => return,
                    Ended::Lost(why) => eprintln!(
                        "loadgen: hive.events consumer lost its connection ({why}); reconnecting"
                    ),
                }
            }
            let lost_at = Instant::now();
            let mut attempt = 0u32;
            while session.is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = async { finish.wait_for(|f| *f).await.is_ok() } => return,
                }
                attempt = attempt.saturating_add(1);
                match open_timed(&cfg, &queue).await {
                    Ok(s) => session = Some(s),
                    Err(e) if attempt == 1 || attempt.is_multiple_of(10) => {
                        eprintln!("loadgen: hive.events consumer: reconnect attempt {attempt} failed: {e}")
                    }
                    Err(_) => {}
                }
            }
            sink.reconnects.fetch_add(1, Ordering::Relaxed);
            sink.connected.store(true, Ordering::Relaxed);
            eprintln!(
                "loadgen: hive.events consumer reconnected after {:.1} s{}",
                lost_at.elapsed().as_secs_f64(),
                if cfg.durable {
                    format!(" (durable queue {queue})")
                } else {
                    String::new()
                }
            );
        }
    });
    Ok(Watcher {
        finish: finish_tx,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(devices: usize) -> Sink {
        Sink {
            hist: Arc::new(Mutex::new(hist::new_hist())),
            received: Arc::new(Mutex::new(0)),
            seqs: Arc::new(Mutex::new(SeqCounter::new(devices))),
            reconnects: Arc::new(AtomicU64::new(0)),
            connected: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn bodies_of_the_three_protocols_are_counted() {
        // As the router publishes them (hive: top level; Phoenix: payload; hivekit: data).
        let acct = "4f3f4e4d-4cb4-4db0-b5d0-820764198d10";
        let d = |i| crate::cli::device_id(i);
        let hive = format!(
            r#"{{"sent_us":900,"seq":1,"type":"device-version","version":"1.0.0","device":"{}","account":"{acct}","service":"hive-device"}}"#,
            d(0)
        );
        let phoenix = format!(
            r#"{{"type":"status_update","topic":"device","payload":{{"sent_us":900,"seq":1,"status":"ok"}},"device":"{}","account":"{acct}","service":"hive-device"}}"#,
            d(1)
        );
        let hivekit = format!(
            r#"{{"type":"object-data","action":"upd","id":"{0}","data":{{"sent_us":900,"seq":1}},"device":"{0}","account":"{acct}","service":"hive-device"}}"#,
            d(2)
        );
        let join = format!(
            r#"{{"type":"device-join","topic":"device","payload":{{"nerves_fw_version":"1.0.0"}},"device":"{}","account":"{acct}"}}"#,
            d(1)
        );
        let other_account = hive.replace(acct, "00000000-0000-4000-8000-00000000abcd");
        let s = sink(3);
        for body in [
            &hive,
            &phoenix,
            &hivekit,
            &join,
            &other_account,
            &"not json".to_string(),
        ] {
            count(&s, acct, body.as_bytes(), false, 1000);
        }
        count(&s, acct, hive.as_bytes(), true, 1000);
        count(&s, acct, phoenix.as_bytes(), false, 1000);
        let c = s.seqs.lock().unwrap();
        assert_eq!((c.unique, c.duplicated, c.redelivered), (3, 1, 1));
        assert_eq!(*s.received.lock().unwrap(), 4);
        assert_eq!(s.hist.lock().unwrap().len(), 4);
        assert_eq!((c.highest(0), c.highest(1), c.highest(2)), (1, 1, 1));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in [0, 1, 5, 30] {
            let d = backoff(attempt);
            assert!(
                d >= BACKOFF_BASE / 2 && d <= BACKOFF_CAP.mul_f64(1.5),
                "{d:?}"
            );
        }
        assert!(backoff(30) >= BACKOFF_CAP / 2);
    }
}
