//! The bridge: where device events leave the shards. Shards hand events to it over
//! one bounded crossbeam queue (a full queue drops and counts, never blocks a shard).
//! Embedded mode (the default) delivers them to an in-process sink that feeds
//! `GET /v1/events`; with `--amqp` the RabbitMQ bridge (`amqp`) publishes them to
//! `hive.events` with publisher confirms (and feeds the same sink); with `--backend-url`
//! too, `backend` consumes them back from RabbitMQ and POSTs them to the backend.

pub mod amqp;
pub mod backend;
pub mod embedded;
pub mod headers;
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

    /// Room for `n` more events besides `pending` not yet handed over? A shard drops
    /// (and counts) an event that finds the queue full; it never blocks.
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

/// The `--amqp` value: one URL, or the nodes of one RabbitMQ cluster, comma-separated.
/// Each of the router's connections (events, cluster, backend delivery) starts at the
/// first and, whenever an attempt fails or an established connection is lost, moves on
/// to the next (round robin), with the usual backoff between attempts: a broker node
/// that dies is left for the next reachable one.
#[derive(Debug, Clone)]
pub struct Failover {
    urls: Vec<String>,
    next: usize,
}

impl Failover {
    pub fn new(spec: &str) -> Self {
        Failover {
            urls: amqp_urls(spec),
            next: 0,
        }
    }

    /// The URL to connect to now.
    pub fn current(&self) -> &str {
        self.urls
            .get(self.next % self.urls.len().max(1))
            .map_or("", String::as_str)
    }

    /// The current URL failed (or its connection was lost): the next one.
    pub fn advance(&mut self) {
        self.next = self.next.wrapping_add(1);
    }

    /// Every URL changed by `f` (the cluster connection's heartbeat and frame size).
    pub fn map(mut self, f: impl Fn(&str) -> String) -> Self {
        self.urls = self.urls.iter().map(|u| f(u)).collect();
        self
    }
}

/// TLS settings of `amqps://` connections (`--amqp-ca`, `--amqp-cert`, `--amqp-key`);
/// None: the system's roots and no client certificate.
pub fn amqp_tls(
    config: &crate::config::ServeConfig,
) -> anyhow::Result<Option<lapin::tcp::OwnedTLSConfig>> {
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
    };
    let cert_chain = match &config.amqp_ca {
        Some(p) => Some(
            String::from_utf8(read("--amqp-ca", p)?)
                .map_err(|_| anyhow::anyhow!("--amqp-ca {}: not PEM text", p.display()))?,
        ),
        None => None,
    };
    let identity = match (&config.amqp_cert, &config.amqp_key) {
        (Some(c), Some(k)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("--amqp-cert", c)?,
            key: read("--amqp-key", k)?,
        }),
        _ => None,
    };
    Ok(
        (cert_chain.is_some() || identity.is_some()).then_some(lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain,
        }),
    )
}

/// Open an AMQP connection (`amqp://` or `amqps://`) with the configured TLS settings.
pub async fn amqp_connect(
    url: &str,
    props: lapin::ConnectionProperties,
    tls: Option<&lapin::tcp::OwnedTLSConfig>,
) -> lapin::Result<lapin::Connection> {
    match tls {
        None => lapin::Connection::connect(url, props).await,
        Some(t) => {
            let rt = lapin::runtime::default_runtime()?;
            lapin::Connection::connect_with_config(url, props, t.clone(), rt).await
        }
    }
}

/// The URLs of an `--amqp` value (comma-separated, blanks ignored).
pub fn amqp_urls(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
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

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn failover_goes_round_the_urls() {
        let mut f = super::Failover::new(" amqp://a , amqp://b,,amqp://c ");
        assert_eq!(f.current(), "amqp://a");
        f.advance();
        assert_eq!(f.current(), "amqp://b");
        f.advance();
        f.advance();
        assert_eq!(f.current(), "amqp://a");
        let one = super::Failover::new("amqp://x").map(|u| format!("{u}?h=5"));
        assert_eq!(one.current(), "amqp://x?h=5");
    }

    use std::time::Duration;

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

    /// `backoff(attempt)` is `base` doubled per attempt, capped at `cap`, and jittered
    /// into [d/2, d].
    pub fn assert_jittered_doubling(backoff: fn(u32) -> Duration, base: Duration, cap: Duration) {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let full = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}
