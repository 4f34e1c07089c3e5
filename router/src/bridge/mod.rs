//! The bridge: where device events leave the shards. Shards hand events to it over
//! one bounded crossbeam queue (a full queue drops and counts, never blocks a shard).
//! Embedded mode (the default) delivers them to an in-process sink that feeds
//! `GET /v1/events`; with `--amqp` the RabbitMQ bridge (`amqp`) publishes them to
//! `hive.events` with publisher confirms (and feeds the same sink); with `--backend-url`
//! too, `backend` consumes them back from RabbitMQ and POSTs them to the backend.

pub mod amqp;
pub mod backend;
pub mod cluster;
pub mod embedded;
pub mod envelope;
pub mod headers;
pub mod presence;

use bytes::Bytes;
use tokio::sync::Notify;

/// A device event on its way to the backend.
#[derive(Debug, Clone)]
pub struct BusEvent {
    /// `<service>.<type>`, e.g. `hive-device.instances`.
    pub routing_key: String,
    /// The JSON object with metadata injected.
    pub body: Bytes,
}

pub struct Bus {
    tx: crossbeam_channel::Sender<BusEvent>,
    notify: Notify,
    /// Above this many queued events shards stop reading their devices until the
    /// queue is back under `resume`: TCP pushes back on devices before anything
    /// has to be dropped (a shard's pass can still add a few thousand events).
    high: usize,
    resume: usize,
}

impl Bus {
    pub fn new(capacity: usize) -> (Self, crossbeam_channel::Receiver<BusEvent>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (
            Bus {
                tx,
                notify: Notify::new(),
                high: capacity - capacity / 4,
                resume: capacity / 2,
            },
            rx,
        )
    }

    /// Never blocks. Err: the queue is full; the caller counts the drop.
    pub fn publish(&self, ev: BusEvent) -> Result<(), BusEvent> {
        self.publish_quiet(ev)?;
        self.notify.notify_one();
        Ok(())
    }

    /// Queue without waking the consumer: a shard publishing a burst wakes it once, with
    /// [`Bus::wake`], when its pass is over (a wake per event cost more than the queue).
    pub fn publish_quiet(&self, ev: BusEvent) -> Result<(), BusEvent> {
        self.tx.try_send(ev).map_err(|e| e.into_inner())
    }

    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Nearly full: stop reading devices.
    pub fn congested(&self) -> bool {
        self.tx.len() >= self.high
    }

    /// Drained enough to read again.
    pub fn relieved(&self) -> bool {
        self.tx.len() <= self.resume
    }

    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// Delay before retry `attempt` (0-based): `base` doubling per attempt, capped at `cap`,
/// with jitter in [d/2, d] so a fleet of routers does not retry in lockstep.
pub fn jittered_backoff(
    base: std::time::Duration,
    cap: std::time::Duration,
    attempt: u32,
) -> std::time::Duration {
    use std::hash::BuildHasher;
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let d = exp.min(cap).as_millis() as u64;
    let half = d / 2;
    let r = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    std::time::Duration::from_millis(half + r % (half + 1))
}
