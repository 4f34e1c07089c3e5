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
use lapin::{Channel, Event};
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
            mut stats,
            mut consumer,
        } = s;
        let queue: ShortString = self.shared.config.backend_queue.as_str().into();
        let mut conn_events = conn.events_listener();
        let mut pending: VecDeque<Held> = VecDeque::new();
        let mut batch: Option<Batch> = None;
        let mut post: Option<PostFuture> = None;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut backlog: Option<Pin<Box<dyn Future<Output = lapin::Result<u32>>>>> = None;
        let mut tick = tokio::time::interval(BACKLOG_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();

        let end = loop {
            let now = tokio::time::Instant::now();
            // A new batch when idle and the oldest held event is due (or enough are held).
            if batch.is_none() {
                if let Some(first) = pending.front() {
                    if pending.len() >= self.batch_max || first.at + self.batch_wait <= now {
                        let b = take_batch(&mut pending, self.batch_max);
                        post = Some(self.post(b.body.clone()));
                        batch = Some(b);
                    }
                }
            }
            // A failed batch whose backoff is over.
            if post.is_none() && retry_at.is_some_and(|t| t <= now) {
                if let Some(b) = &batch {
                    retry_at = None;
                    post = Some(self.post(b.body.clone()));
                }
            }
            let held = pending.len() + batch.as_ref().map_or(0, |b| b.count);
            self.m().unacked.store(held as i64, Relaxed);
            let batch_due = match (&batch, pending.front()) {
                (None, Some(first)) => Some(first.at + self.batch_wait),
                _ => None,
            };

            tokio::select! {
                biased;
                _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => {
                    // Let a POST in flight finish, so its batch is not delivered twice.
                    if let (Some(p), Some(b)) = (post.take(), batch.take()) {
                        if let Ok(Post::Ok) = tokio::time::timeout(SHUTDOWN_GRACE, p).await {
                            self.delivered(&ch, &b).await;
                        }
                    }
                    break SessionEnd::Shutdown;
                }
                ev = conn_events.next() => match ev {
                    Some(Event::Error(e)) => {
                        tracing::warn!(error = %e, "backend delivery: AMQP connection error");
                        break SessionEnd::Lost;
                    }
                    None => break SessionEnd::Lost,
                    Some(_) => {}
                },
                res = async { post.as_mut().expect("guarded").await }, if post.is_some() => {
                    post = None;
                    let Some(b) = batch.as_mut() else { continue };
                    match res {
                        Post::Ok => {
                            let b = batch.take().expect("just matched");
                            if !self.delivered(&ch, &b).await {
                                break SessionEnd::Lost;
                            }
                        }
                        failed => {
                            b.failures += 1;
                            let failures = b.failures;
                            self.failed(failed, failures);
                            retry_at = Some(tokio::time::Instant::now() + BACKOFF.delay(failures - 1));
                        }
                    }
                }
                d = consumer.next() => match d {
                    Some(Ok(d)) => pending.push_back(Held {
                        tag: d.delivery_tag,
                        body: d.data,
                        at: tokio::time::Instant::now(),
                    }),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "backend delivery: consumer failed");
                        break SessionEnd::Lost;
                    }
                    None => {
                        tracing::warn!("backend delivery: consumer cancelled by the broker");
                        break SessionEnd::Lost;
                    }
                },
                _ = sleep_until(batch_due), if batch_due.is_some() => {}
                _ = sleep_until(retry_at), if retry_at.is_some() && post.is_none() => {}
                n = async { backlog.as_mut().expect("guarded").await }, if backlog.is_some() => {
                    backlog = None;
                    match n {
                        Ok(n) => self.m().backlog.store(i64::from(n), Relaxed),
                        Err(e) => tracing::debug!(error = %e, "backend queue probe failed"),
                    }
                }
                _ = tick.tick() => {
                    if !conn.status().connected() || !ch.status().connected() {
                        break SessionEnd::Lost;
                    }
                    if backlog.is_none() {
                        if !stats.status().connected() {
                            // The probe's channel was closed (e.g. the queue vanished).
                            match tokio::time::timeout(Duration::from_secs(1), conn.create_channel()).await {
                                Ok(Ok(c)) => stats = c,
                                _ => continue,
                            }
                        }
                        backlog = Some(Box::pin(probe(stats.clone(), queue.clone())));
                    }
                }
            }
        };
        drop(consumer);
        crate::amqp::close(&conn).await;
        end
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

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
