//! Backend delivery (`--amqp URL --backend-url URL`): device events from RabbitMQ to
//! the backend (the "Device Service") by HTTP POST, acknowledged to RabbitMQ only once
//! the backend answered 2xx. At-least-once: nothing is dropped while the backend is
//! down; a batch may reach it twice (a retry after a timeout that the backend did
//! process, or a redelivery after a lost connection or a restart).
//!
//! **What it owns.** Its own AMQP connection (not the events publisher's: RabbitMQ recommends
//! separate connections for publishing and consuming, because flow control blocks a
//! *publishing* connection, and a consumer sharing it would stop acking too, which
//! deadlocks the very backlog that triggered the alarm); one consuming channel and one
//! channel for the backlog probe; the durable queue `--backend-queue` (default
//! `hive.backend`) bound to `hive.events` with each of `--backend-bindings` (default
//! `#`); an HTTP client; the `router_backend_*` metrics.
//!
//! **What it does.** It declares `hive.events` (topic, durable, as the publisher does), the
//! queue (durable; every router node consumes the same queue, so RabbitMQ spreads the
//! events over the nodes), the bindings, `basic.qos` with `--backend-prefetch`, and
//! consumes with manual acks. Deliveries are batched: up to `--backend-batch` events, or
//! whatever arrived `--backend-batch-wait-ms` after the oldest one, are POSTed to
//! `--backend-url` as one JSON array of the event bodies (built by concatenating the
//! bodies, never re-parsed; the router only publishes JSON objects to `hive.events`),
//! `content-type: application/json`, `Authorization: Bearer` with `--backend-token`
//! (never logged), within `--backend-timeout-ms`. One batch is in flight at a time,
//! and the next one forms meanwhile. On a 2xx the batch is acked with one
//! `basic.ack(multiple)` on its last delivery tag. On any other answer, a transport
//! error or a timeout the same batch is POSTed again after an exponential backoff with
//! jitter (100 ms doubling, capped at 10 s), forever: a 4xx (other than 408/429) is
//! retried too, since dropping is never our call, but logged at warn with its status
//! (rate-limited) because it usually needs a human. Meanwhile the held deliveries stay
//! unacked (at most `--backend-prefetch`) and the rest waits in the durable queue.
//! Every second a passive `queue.declare` reads the queue's ready count
//! (`router_backend_backlog`).
//!
//! **Failures.** A lost AMQP connection (or a cancelled consumer, e.g. the queue was
//! deleted) drops everything held without acking it, so RabbitMQ redelivers it, and
//! the thread reconnects with backoff (same schedule) and declares everything again.
//! On shutdown, a POST already in flight gets up to [`SHUTDOWN_GRACE`] to finish (and
//! its batch is acked if it succeeded); everything else held is left unacked and
//! redelivered to whichever consumer comes next.
//!
//! **Why its own thread.** Like the events publisher ([`crate::bus::publisher`]) it
//! runs on a dedicated OS thread with a single-threaded tokio runtime (driving lapin and
//! reqwest), so a slow backend or a busy broker never delays the HTTP API or the shards.
//! It is joined by the thread running the API after the shutdown signal.
//!
//! The HTTP side (config checks, batches, POSTs, failure accounting) is in `http.rs`;
//! the AMQP side (connect, declare, consume, probe) in `consume.rs`.

mod consume;
mod http;

use consume::{connect, probe, Session};
use http::{take_batch, Batch, Post, PostFuture};

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::ShortString;
use lapin::{Channel, Connection, Event};
use reqwest::header::HeaderValue;
use tokio::sync::watch;

use crate::amqp::{Failover, SessionEnd, CONNECT_TIMEOUT};
use crate::metrics::BackendMetrics;
use crate::retry::Backoff;
use crate::{redact_url as redact, Shared};

/// Delay before a retry or reconnect: 100 ms doubling, capped at 10 s, jittered so
/// routers do not hammer a recovering backend in step.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
/// How often the queue's ready count is read (passive queue.declare).
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// At most one warning per this long about a failing backend.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// On shutdown, how long a POST already in flight may still take (then acked if 2xx).
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub(crate) use http::check_config;

/// Start the backend delivery thread. It runs until `shared.shutdown` flips.
pub(crate) fn spawn(shared: Arc<Shared>) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::runtime_thread("backend-delivery", move |rt| {
        let Some(delivery) = Delivery::new(shared) else {
            return;
        };
        rt.block_on(delivery.run());
    })
}

/// One delivery held (received, not yet acked).
struct Held {
    tag: u64,
    body: Vec<u8>,
    at: tokio::time::Instant,
}

struct Delivery {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    amqp_urls: Failover,
    url: String,
    client: reqwest::Client,
    auth: Option<HeaderValue>,
    name: String,
    batch_max: usize,
    batch_wait: Duration,
    /// Last warning about a failing backend, and how many were suppressed since.
    last_warn: Option<Instant>,
    suppressed: u64,
}

impl Delivery {
    fn new(shared: Arc<Shared>) -> Option<Delivery> {
        let c = &shared.config;
        let (amqp_url, url) = (c.amqp.clone()?, c.backend_url.clone()?);
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(c.backend_timeout_ms))
            .use_rustls_tls();
        if let Some(path) = &c.backend_ca {
            // Checked at startup (http::check_config); read again here.
            match http::backend_ca(path) {
                Ok(certs) => {
                    for cert in certs {
                        builder = builder.add_root_certificate(cert);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read --backend-ca");
                    return None;
                }
            }
        }
        let client = match builder.build() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the backend HTTP client");
                return None;
            }
        };
        let auth = c.backend_token.as_ref().and_then(|t| {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Some(Delivery {
            shutdown: shared.shutdown.subscribe(),
            amqp_urls: Failover::new(&amqp_url),
            url,
            client,
            auth,
            name: format!("hive-router {} backend-delivery", shared.node_id),
            batch_max: c.backend_batch.max(1) as usize,
            batch_wait: Duration::from_millis(c.backend_batch_wait_ms),
            last_warn: None,
            suppressed: 0,
            shared,
        })
    }

    fn m(&self) -> &BackendMetrics {
        &self.shared.metrics.backend
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Drive `fut` unless shutdown comes first (None).
    async fn or_shutdown<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|s| *s) => None,
            v = fut => Some(v),
        }
    }

    async fn run(mut self) {
        let mut backoff = BACKOFF;
        while !self.stopping() {
            let c = &self.shared.config;
            let connecting = tokio::time::timeout(
                CONNECT_TIMEOUT,
                connect(
                    self.amqp_urls.current().to_string(),
                    self.name.clone(),
                    c.backend_queue.clone(),
                    c.backend_bindings.clone(),
                    c.backend_prefetch,
                    c.amqp_queue_type,
                    crate::amqp::tls_config(c).ok().flatten(),
                ),
            );
            match self.or_shutdown(connecting).await {
                None => break,
                Some(Ok(Ok(session))) => {
                    backoff.reset();
                    self.m().connected.store(1, Relaxed);
                    tracing::info!(
                        queue = %self.shared.config.backend_queue,
                        backend = %redact(&self.url),
                        "backend delivery consuming"
                    );
                    // The session closes the connection: RabbitMQ redelivers what it held.
                    let end = self.session(session).await;
                    self.m().connected.store(0, Relaxed);
                    self.m().unacked.store(0, Relaxed);
                    if end == SessionEnd::Shutdown {
                        break;
                    }
                    tracing::warn!(
                        "backend delivery lost its AMQP connection; unacked events will be redelivered"
                    );
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(error = %e, attempt = backoff.attempt(), "backend delivery cannot connect to RabbitMQ");
                }
                Some(Err(_)) => {
                    tracing::warn!(
                        attempt = backoff.attempt(),
                        "backend delivery: connecting to RabbitMQ timed out"
                    );
                }
            }
            // Failed, or lost: the next broker node of --amqp.
            self.amqp_urls.advance();
            let delay = backoff.next_delay();
            if self.or_shutdown(tokio::time::sleep(delay)).await.is_none() {
                break;
            }
        }
        self.m().connected.store(0, Relaxed);
        self.m().unacked.store(0, Relaxed);
    }

    /// Consume, batch, POST and ack while the connection lives.
    async fn session(&mut self, s: Session) -> SessionEnd {
        let Session {
            conn,
            ch,
            stats,
            mut consumer,
        } = s;
        let mut c = Consuming {
            queue: self.shared.config.backend_queue.as_str().into(),
            conn,
            ch,
            stats,
            pending: VecDeque::new(),
            batch: None,
            post: None,
            retry_at: None,
            backlog: None,
        };
        let mut conn_events = c.conn.events_listener();
        let mut tick = tokio::time::interval(BACKLOG_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();

        let end = loop {
            self.start_post(&mut c);
            self.m().unacked.store(c.held() as i64, Relaxed);
            let batch_due = c.batch_due(self.batch_wait);

            tokio::select! {
                biased;
                _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => {
                    self.finish_post(&mut c).await;
                    break SessionEnd::Shutdown;
                }
                ev = conn_events.next() => if let Some(end) = conn_event(ev) {
                    break end;
                },
                res = in_slot(&mut c.post), if c.post.is_some() => {
                    if let Some(end) = self.posted(&mut c, res).await {
                        break end;
                    }
                }
                d = consumer.next() => if let Some(end) = c.hold(d) {
                    break end;
                },
                _ = sleep_until(batch_due), if batch_due.is_some() => {}
                _ = sleep_until(c.retry_at), if c.retry_at.is_some() && c.post.is_none() => {}
                n = in_slot(&mut c.backlog), if c.backlog.is_some() => {
                    c.backlog = None;
                    match n {
                        Ok(n) => self.m().backlog.store(i64::from(n), Relaxed),
                        Err(e) => tracing::debug!(error = %e, "backend queue probe failed"),
                    }
                }
                _ = tick.tick() => if let Some(end) = c.on_tick().await {
                    break end;
                },
            }
        };
        drop(consumer);
        crate::amqp::close(&c.conn).await;
        end
    }

    /// Start a POST if one is due: a new batch when idle and the oldest held event is
    /// due (or enough are held), or a failed batch whose backoff is over.
    fn start_post(&self, c: &mut Consuming) {
        let now = tokio::time::Instant::now();
        // A new batch when idle and the oldest held event is due (or enough are held).
        if c.batch.is_none() {
            if let Some(first) = c.pending.front() {
                if c.pending.len() >= self.batch_max || first.at + self.batch_wait <= now {
                    let b = take_batch(&mut c.pending, self.batch_max);
                    c.post = Some(self.post(b.body.clone()));
                    c.batch = Some(b);
                }
            }
        }
        // A failed batch whose backoff is over.
        if c.post.is_none() && c.retry_at.is_some_and(|t| t <= now) {
            if let Some(b) = &c.batch {
                c.retry_at = None;
                c.post = Some(self.post(b.body.clone()));
            }
        }
    }

    /// On shutdown: a POST in flight may finish (and its batch is acked if it
    /// succeeded), so that batch is not delivered twice.
    async fn finish_post(&mut self, c: &mut Consuming) {
        if let (Some(p), Some(b)) = (c.post.take(), c.batch.take()) {
            if let Ok(Post::Ok) = tokio::time::timeout(SHUTDOWN_GRACE, p).await {
                self.delivered(&c.ch, &b).await;
            }
        }
    }

    /// A POST ended: on success its batch is acked (Some(Lost) if the ack fails);
    /// otherwise the failure is counted and the batch is retried after a backoff.
    async fn posted(&mut self, c: &mut Consuming, res: Post) -> Option<SessionEnd> {
        c.post = None;
        let b = c.batch.as_mut()?;
        match res {
            Post::Ok => {
                let b = c.batch.take().expect("just matched");
                if !self.delivered(&c.ch, &b).await {
                    return Some(SessionEnd::Lost);
                }
            }
            failed => {
                b.failures += 1;
                let failures = b.failures;
                self.failed(failed, failures);
                c.retry_at = Some(tokio::time::Instant::now() + BACKOFF.delay(failures - 1));
            }
        }
        None
    }

    /// The backend took the batch: ack it. False if the ack could not be sent (the
    /// connection is gone; RabbitMQ will redeliver, and the backend sees it twice).
    async fn delivered(&mut self, ch: &Channel, b: &Batch) -> bool {
        let m = self.m();
        m.batches_ok.fetch_add(1, Relaxed);
        if b.failures > 0 {
            tracing::info!(
                failed_attempts = b.failures,
                "backend accepted events again after failures"
            );
            self.last_warn = None;
            self.suppressed = 0;
        }
        match ch
            .basic_ack(b.last_tag, BasicAckOptions { multiple: true })
            .await
        {
            Ok(()) => {
                self.m().delivered.fetch_add(b.count as u64, Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "backend delivery: ack failed");
                false
            }
        }
    }
}

/// One connection's consuming state (see [`Delivery::session`]).
struct Consuming {
    conn: Connection,
    ch: Channel,
    /// The channel of the backlog probe.
    stats: Channel,
    queue: ShortString,
    /// Deliveries received and not yet in a batch, oldest first.
    pending: VecDeque<Held>,
    /// The batch being POSTed, or waiting to be POSTed again.
    batch: Option<Batch>,
    post: Option<PostFuture>,
    /// When a failed batch is POSTed again.
    retry_at: Option<tokio::time::Instant>,
    /// The backlog probe in flight.
    backlog: Option<Pin<Box<dyn Future<Output = lapin::Result<u32>>>>>,
}

impl Consuming {
    /// Deliveries held unacked: pending, and in the batch.
    fn held(&self) -> usize {
        self.pending.len() + self.batch.as_ref().map_or(0, |b| b.count)
    }

    /// When the next batch is due: with none in flight, the oldest pending event's
    /// wait over.
    fn batch_due(&self, wait: Duration) -> Option<tokio::time::Instant> {
        match (&self.batch, self.pending.front()) {
            (None, Some(first)) => Some(first.at + wait),
            _ => None,
        }
    }

    /// A delivery from the consumer is held; Some(Lost) if the consumer failed or
    /// was cancelled.
    fn hold(&mut self, d: Option<lapin::Result<lapin::message::Delivery>>) -> Option<SessionEnd> {
        match d {
            Some(Ok(d)) => self.pending.push_back(Held {
                tag: d.delivery_tag,
                body: d.data,
                at: tokio::time::Instant::now(),
            }),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "backend delivery: consumer failed");
                return Some(SessionEnd::Lost);
            }
            None => {
                tracing::warn!("backend delivery: consumer cancelled by the broker");
                return Some(SessionEnd::Lost);
            }
        }
        None
    }

    /// Every [`BACKLOG_EVERY`]: Some(Lost) if the connection or the channel is down;
    /// else a backlog probe starts unless one is running (on a new channel if the
    /// probe's was closed).
    async fn on_tick(&mut self) -> Option<SessionEnd> {
        if !self.conn.status().connected() || !self.ch.status().connected() {
            return Some(SessionEnd::Lost);
        }
        if self.backlog.is_none() {
            if !self.stats.status().connected() {
                // The probe's channel was closed (e.g. the queue vanished).
                match tokio::time::timeout(Duration::from_secs(1), self.conn.create_channel()).await
                {
                    Ok(Ok(c)) => self.stats = c,
                    _ => return None,
                }
            }
            self.backlog = Some(Box::pin(probe(self.stats.clone(), self.queue.clone())));
        }
        None
    }
}

/// An event on the AMQP connection; Some(Lost) on an error or its end.
fn conn_event(ev: Option<Event>) -> Option<SessionEnd> {
    match ev {
        Some(Event::Error(e)) => {
            tracing::warn!(error = %e, "backend delivery: AMQP connection error");
            Some(SessionEnd::Lost)
        }
        None => Some(SessionEnd::Lost),
        Some(_) => None,
    }
}

/// The future in `slot`, awaited; its select! branch is enabled only while there is one.
async fn in_slot<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    slot.as_mut().expect("guarded").await
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
