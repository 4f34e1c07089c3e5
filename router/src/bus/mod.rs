//! The event bus: where device events leave the shards, and what drains it.
//!
//! Data flow: a shard batches the events one pass produced and hands the batch to the
//! [`Bus`] (one unbounded crossbeam channel, bounded in events by `--queue-capacity`).
//! Shards apply backpressure rather than drop: above three quarters of the capacity
//! they stop reading their devices until the queue is back under half (TCP then pushes
//! back on the devices); an event that still finds the queue full is dropped and
//! counted. One consumer drains the [`BusRx`]:
//!
//! - `embedded` (the default, no broker): into the SSE ring (`sse`) that
//!   `GET /v1/events` subscribers read;
//! - `publisher` (`--amqp`): to RabbitMQ's `hive.events` with publisher confirms,
//!   mapping each event's fields to AMQP headers (`headers`), and into the same ring.
//!
//! From RabbitMQ on, delivery to the backend (`--backend-url`) is [`crate::backend`];
//! the AMQP connection code both share is [`crate::amqp`].

pub mod embedded;
pub mod headers;
pub mod publisher;
pub mod sse;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

/// A device event on its way to the backend.
#[derive(Debug, Clone)]
pub struct BusEvent {
    /// `<service>.<type>`, e.g. `hive-device.instances`.
    pub routing_key: RoutingKey,
    /// The JSON object with metadata injected.
    pub body: Bytes,
}

/// A routing key, `<service>.<type>`, kept inline when it is short (every usual event
/// type is), so an event costs the shard one allocation (its body) and the bus thread
/// one cross-thread free, not two of each.
#[derive(Clone)]
pub struct RoutingKey(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    Inline {
        len: u8,
        bytes: [u8; RoutingKey::INLINE],
    },
    Heap(Box<str>),
}

impl RoutingKey {
    /// Longest key kept inline.
    pub const INLINE: usize = 46;

    /// The concatenation of `parts`.
    pub fn concat(parts: &[&str]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > Self::INLINE {
            return RoutingKey(KeyRepr::Heap(parts.concat().into_boxed_str()));
        }
        let mut bytes = [0u8; Self::INLINE];
        let mut at = 0;
        for p in parts {
            bytes[at..at + p.len()].copy_from_slice(p.as_bytes());
            at += p.len();
        }
        RoutingKey(KeyRepr::Inline {
            len: len as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Whole `&str`s concatenated: valid UTF-8 (checked again, cheaply, rather
            // than trusted without a check).
            KeyRepr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default()
            }
            KeyRepr::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for RoutingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for RoutingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub struct Bus {
    /// Batches: a shard hands over what one pass published in one message.
    tx: crossbeam_channel::Sender<Vec<BusEvent>>,
    /// Events handed over and not yet taken by the consumer (the queue's length in
    /// events; the channel itself counts batches).
    queued: Arc<AtomicUsize>,
    capacity: usize,
    notify: Notify,
    /// Above this many queued events shards stop reading their devices until the
    /// queue is back under `resume`: TCP pushes back on devices before anything
    /// has to be dropped.
    high: usize,
    resume: usize,
}

impl Bus {
    pub fn new(capacity: usize) -> (Self, BusRx) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let capacity = capacity.max(4);
        (
            Bus {
                tx,
                queued: queued.clone(),
                capacity,
                notify: Notify::new(),
                high: capacity - capacity / 4,
                resume: capacity / 2,
            },
            BusRx {
                rx,
                cur: Vec::new().into_iter(),
                queued,
            },
        )
    }

    /// Room for one more event besides `pending` not yet handed over? A shard drops
    /// (and counts) an event that finds the queue full; it never blocks on the queue
    /// (it stops reading devices before that: see [`Bus::congested`]).
    pub fn has_room(&self, pending: usize) -> bool {
        self.queued.load(Relaxed) + pending < self.capacity
    }

    /// Hand over a batch without waking the consumer: a shard wakes it once per pass
    /// with [`Bus::wake`] (a wake per event cost more than the queue itself).
    /// Err: the consumer is gone (shutdown); the caller counts the events as dropped.
    pub fn send_batch(&self, batch: Vec<BusEvent>) -> Result<(), Vec<BusEvent>> {
        let n = batch.len();
        self.queued.fetch_add(n, Relaxed);
        self.tx.send(batch).map_err(|e| {
            self.queued.fetch_sub(n, Relaxed);
            e.into_inner()
        })
    }

    pub fn wake(&self) {
        self.notify.notify_one();
    }

    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Nearly full, counting the `pending` events a shard has not handed over yet:
    /// stop reading devices.
    pub fn congested(&self, pending: usize) -> bool {
        self.queued.load(Relaxed) + pending >= self.high
    }

    /// Drained enough to read again.
    pub fn relieved(&self) -> bool {
        self.queued.load(Relaxed) <= self.resume
    }
}

/// The consumer's end of the bus: events one at a time, in the order each shard
/// published them.
pub struct BusRx {
    rx: crossbeam_channel::Receiver<Vec<BusEvent>>,
    cur: std::vec::IntoIter<BusEvent>,
    queued: Arc<AtomicUsize>,
}

impl BusRx {
    pub fn try_recv(&mut self) -> Option<BusEvent> {
        loop {
            if let Some(ev) = self.cur.next() {
                return Some(ev);
            }
            let batch = self.rx.try_recv().ok()?;
            self.queued.fetch_sub(batch.len(), Relaxed);
            self.cur = batch.into_iter();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cur.len() == 0 && self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn routing_keys_read_back_as_written_inline_or_not() {
        let long = |n: usize| "t".repeat(n);
        for ty in [
            "",
            "instances",
            "ü-type",
            &long(super::RoutingKey::INLINE - 12),
            &long(super::RoutingKey::INLINE - 11),
            &long(200),
        ] {
            let key = super::RoutingKey::concat(&["hive-device", ".", ty]);
            assert_eq!(key.as_str(), format!("hive-device.{ty}"));
            assert_eq!(key.to_string(), key.as_str());
            assert_eq!(key.clone().as_str(), key.as_str());
        }
    }
}
