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
}

impl Bus {
    pub fn new(capacity: usize) -> (Self, crossbeam_channel::Receiver<BusEvent>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (
            Bus {
                tx,
                notify: Notify::new(),
            },
            rx,
        )
    }

    /// Never blocks. Err: the queue is full; the caller counts the drop.
    pub fn publish(&self, ev: BusEvent) -> Result<(), BusEvent> {
        match self.tx.try_send(ev) {
            Ok(()) => {
                self.notify.notify_one();
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}
