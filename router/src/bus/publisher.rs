//! The RabbitMQ publisher, or "AMQP bridge" in logs and metrics (`--amqp URL`): device
//! events from the shards' bus to the durable topic exchange `hive.events`, with
//! publisher confirms.
//!
//! **What it owns.** The event connection (one of the process's two AMQP connections;
//! the cluster has the other, so flow control on events never holds back requests) and
//! its one publishing channel; the receiving end of the shards' bus queue; a bounded in-memory buffer of
//! events waiting for the broker; the `router_amqp_*` metrics; and, in AMQP mode, the
//! readiness flag (`shared.ready`, so `/readyz` answers 503 while the broker is away).
//!
//! **What it does.** Each event is published to `hive.events` with routing key
//! `<service>.<type>`, the JSON body as is, `content-type: application/json`,
//! `delivery-mode: 2` (persistent) and the event's top-level fields as headers
//! ([`super::headers`]). Up to `--amqp-confirm-window` publishes await their confirm at
//! once (one at a time caps out at a few thousand a second). An event leaves the bridge
//! only when the broker acks it; a nack, or a connection lost before the confirm,
//! puts it back at the head of the buffer and it is published again (at-least-once: a
//! consumer may see a duplicate after a reconnect). While the broker is unreachable,
//! events wait in the buffer (`--amqp-buffer`, oldest dropped first when full, counted
//! as `router_amqp_dropped_total{reason="buffer_full"}`) and the bridge reconnects with
//! exponential backoff and jitter (100 ms doubling, capped at 5 s), re-declares its
//! topology and flushes the buffer oldest first. Every event taken from the bus is
//! also offered to the `/v1/events` SSE ring, as the embedded bus does.
//!
//! **Why its own thread.** The bridge runs on a dedicated OS thread with a
//! single-threaded tokio runtime (which also drives lapin's socket), not as a task on
//! the API runtime: at tens of thousands of events a second, mapping headers and
//! settling confirms is steady CPU work that would otherwise queue in front of HTTP
//! requests on the API's single-threaded runtime and inflate request/ack latency, and
//! a broker that stalls (flow control, memory alarm) must not make the API sluggish
//! either. The thread is joined by the thread running the API after the shutdown
//! signal, so on a graceful stop the bridge gets up to [`FLUSH_ON_SHUTDOWN`] to publish
//! what the shards handed it; anything still unconfirmed then is counted as dropped
//! (`shutdown`).
//!
//! **What it must never do.** Block or slow a shard: nothing here waits on a shard,
//! and shards never wait on the bus queue (above its high-water mark they stop reading
//! their devices instead; an event that finds it full is dropped and counted). While the broker is slow to confirm, events keep moving from the
//! bus into the buffer, so the shards keep reading their devices (and their acks) until
//! the buffer itself is full. Lose an event silently: every event taken from the bus ends
//! confirmed by the broker or counted in `router_amqp_dropped_total`. Panic on
//! anything the broker or a device controls. Declare anything but its own exchange.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use tokio::sync::watch;

use super::{headers, BusEvent, BusRx};
use crate::amqp::{self, declare_events_exchange, Failover, SessionEnd, CONNECT_TIMEOUT, EXCHANGE};
use crate::metrics::BridgeMetrics;
use crate::retry::Backoff;
use crate::{redact_url, Shared};

/// How long a graceful stop waits for the buffer to be published and confirmed.
pub(crate) const FLUSH_ON_SHUTDOWN: Duration = Duration::from_secs(4);
/// Events published per batch before the bridge lets confirms and I/O run.
const BATCH: usize = 256;
/// Pause after a nack before publishing again, so a broker that refuses
/// (e.g. a full queue with `reject-publish`) is not hammered in a tight loop.
const NACK_PAUSE: Duration = Duration::from_millis(50);
/// Room left in a frame for the content header's fixed fields and other properties.
const HEADER_FRAME_OVERHEAD: usize = 256;

/// Start the bridge thread. It runs until `shared.shutdown` flips, then flushes
/// (bounded by [`FLUSH_ON_SHUTDOWN`]) and returns.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    rx: BusRx,
    sink: Arc<super::sse::SseHub>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::runtime_thread("amqp-bridge", move |rt| {
        let Some(url) = shared.config.amqp.clone() else {
            return;
        };
        let bridge = Bridge {
            shutdown: shared.shutdown.subscribe(),
            buffer: VecDeque::new(),
            cap: shared.config.amqp_buffer.max(1),
            window: shared.config.amqp_confirm_window.max(1) as usize,
            name: format!("hive-router {}", shared.node_id),
            urls: Failover::new(&url),
            tls: amqp::tls_config(&shared.config).ok().flatten(),
            shared,
            rx,
            sink,
        };
        rt.block_on(bridge.run());
    })
}

type Publish = Pin<Box<dyn Future<Output = (u64, PublishOutcome)>>>;

struct Bridge {
    shared: Arc<Shared>,
    rx: BusRx,
    sink: Arc<super::sse::SseHub>,
    shutdown: watch::Receiver<bool>,
    /// Events waiting for the broker, oldest first.
    buffer: VecDeque<BusEvent>,
    cap: usize,
    window: usize,
    urls: Failover,
    name: String,
    tls: Option<lapin::tcp::OwnedTLSConfig>,
}

impl Bridge {
    fn m(&self) -> &BridgeMetrics {
        &self.shared.metrics.bridge
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// One new event from the shards, offered to SSE subscribers on the way.
    fn take_new(&mut self) -> Option<BusEvent> {
        let ev = self.rx.try_recv()?;
        // No subscriber is fine: nothing is offered then.
        if self.sink.subscriber_count() > 0 {
            self.sink.publish(ev.body.clone());
        }
        Some(ev)
    }

    /// Append to the buffer; when full, the oldest event is dropped and counted.
    fn buffer_push(&mut self, ev: BusEvent) {
        if self.buffer.len() >= self.cap {
            self.buffer.pop_front();
            self.m().dropped_buffer_full.fetch_add(1, Relaxed);
        }
        self.buffer.push_back(ev);
    }

    /// Put unconfirmed events (oldest first) back at the head of the buffer. They are
    /// the oldest of all, so if the buffer overflows they are the ones dropped.
    fn requeue(&mut self, evs: Vec<BusEvent>) {
        for ev in evs.into_iter().rev() {
            if self.buffer.len() >= self.cap {
                self.m().dropped_buffer_full.fetch_add(1, Relaxed);
                continue;
            }
            self.buffer.push_front(ev);
        }
    }

    /// While not publishing: move everything the shards handed over into the buffer,
    /// so their queue never fills because of the broker.
    fn drain_rx(&mut self) {
        while let Some(ev) = self.take_new() {
            self.buffer_push(ev);
        }
        self.m().buffered.store(self.buffer.len() as i64, Relaxed);
    }

    fn set_ready(&self, up: bool) {
        self.m().connected.store(i64::from(up), Relaxed);
        self.shared.update_ready();
    }

    /// Drive `fut` while buffering new events; None if shutdown came first.
    async fn buffering<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(fut);
        loop {
            self.drain_rx();
            tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => return None,
                v = &mut fut => return Some(v),
                _ = self.shared.bus.wait() => {}
            }
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::RECONNECT;
        let mut ever_connected = false;
        while !self.stopping() {
            let connecting = tokio::time::timeout(
                CONNECT_TIMEOUT,
                connect(
                    self.urls.current().to_string(),
                    self.name.clone(),
                    self.tls.clone(),
                ),
            );
            match self.buffering(connecting).await {
                None => break,
                Some(Ok(Ok((conn, ch)))) => {
                    backoff.reset();
                    self.m().connects.fetch_add(1, Relaxed);
                    if ever_connected {
                        self.m().reconnects.fetch_add(1, Relaxed);
                        tracing::info!(buffered = self.buffer.len(), "AMQP bridge reconnected");
                    } else {
                        tracing::info!(url = %redact_url(self.urls.current()), "AMQP bridge connected");
                    }
                    ever_connected = true;
                    self.set_ready(true);
                    let end = self.session(&conn, &ch).await;
                    self.set_ready(false);
                    amqp::close(&conn).await;
                    if end == SessionEnd::Shutdown {
                        break;
                    }
                    tracing::warn!(
                        buffered = self.buffer.len(),
                        url = %redact_url(self.urls.current()),
                        "AMQP connection lost; events are buffered until it is back"
                    );
                    self.urls.advance();
                }
                Some(Ok(Err(e))) => {
                    self.m().connect_failures.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, attempt = backoff.attempt(), url = %redact_url(self.urls.current()), "cannot connect to RabbitMQ");
                    self.urls.advance();
                }
                Some(Err(_)) => {
                    self.m().connect_failures.fetch_add(1, Relaxed);
                    tracing::warn!(attempt = backoff.attempt(), url = %redact_url(self.urls.current()), "connecting to RabbitMQ timed out");
                    self.urls.advance();
                }
            }
            let delay = backoff.next_delay();
            if self.buffering(tokio::time::sleep(delay)).await.is_none() {
                break;
            }
        }
        // Stopping: what never reached the broker is dropped, and counted.
        self.drain_rx();
        let left = self.buffer.len() as u64;
        if left > 0 {
            tracing::warn!(
                events = left,
                "AMQP bridge stopping with unpublished events"
            );
        }
        self.m().dropped_shutdown.fetch_add(left, Relaxed);
        self.buffer.clear();
        self.m().buffered.store(0, Relaxed);
        self.set_ready(false);
    }

    /// Publish while the connection lives. Returns why it ended; on return every
    /// event not confirmed is back in the buffer.
    async fn session(&mut self, conn: &Connection, ch: &Channel) -> SessionEnd {
        let mut conn_events = conn.events_listener();
        let mut p = Publishing::new(conn, ch, self.window);
        let mut tick = tokio::time::interval(Duration::from_millis(100));

        let end = loop {
            // 1. Fill the confirm window: retries first (oldest), then new events.
            let paused = p.paused();
            let more = self.fill_window(&mut p, paused);
            // With the window full (the broker is slow to confirm), keep taking events
            // from the shards into the buffer, up to its bound: shards that find the bus
            // full stop reading their devices, and a device's acks and responses would
            // then wait behind its unread events. Only a full buffer pushes back.
            if p.held.len() >= self.window || paused {
                self.take_up_to_cap();
            }
            self.m().buffered.store(self.buffer.len() as i64, Relaxed);
            self.m().unconfirmed.store(p.held.len() as i64, Relaxed);
            if self.flush_over(&p) {
                break SessionEnd::Shutdown;
            }

            // 2. Wait for a confirm, new events, or trouble.
            let can_take = !paused && p.held.len() < self.window;
            let wake = tokio::select! {
                biased;
                Some((id, res)) = p.inflight.next(), if !p.inflight.is_empty() => Wake::Confirm(id, res),
                ev = conn_events.next() => Wake::Conn(ev),
                _ = self.shutdown.wait_for(|s| *s), if p.flush_until.is_none() => Wake::Shutdown,
                _ = self.shared.bus.wait(), if (can_take && !more) || self.buffer.len() < self.cap => Wake::Work,
                _ = async {}, if more => Wake::Work,
                _ = tick.tick() => Wake::Tick,
            };
            if let Some(end) = self.on_wake(&mut p, wake) {
                break end;
            }
        };
        self.requeue_unconfirmed(p, end == SessionEnd::Lost);
        end
    }

    /// Publish up to a batch while the confirm window has room: retries first
    /// (oldest), then new events. True if a whole batch went out and there is room
    /// for more (the loop comes straight back).
    fn fill_window(&mut self, p: &mut Publishing, paused: bool) -> bool {
        let mut sent = 0;
        while !paused && p.held.len() < self.window && sent < BATCH {
            let Some(ev) = self.buffer.pop_front().or_else(|| self.take_new()) else {
                break;
            };
            sent += 1;
            let Some((rk, props)) = self.prepare(&ev, p.header_limit) else {
                continue;
            };
            p.send(ev, rk, props);
            self.m().published.fetch_add(1, Relaxed);
        }
        !paused && p.held.len() < self.window && sent == BATCH
    }

    /// Move new events from the shards into the buffer until it is full.
    fn take_up_to_cap(&mut self) {
        while self.buffer.len() < self.cap {
            let Some(ev) = self.take_new() else { break };
            self.buffer.push_back(ev);
        }
    }

    /// Flushing on shutdown, and done: everything confirmed, or out of time.
    fn flush_over(&self, p: &Publishing) -> bool {
        let Some(deadline) = p.flush_until else {
            return false;
        };
        (p.held.is_empty() && self.buffer.is_empty() && self.rx.is_empty())
            || Instant::now() >= deadline
    }

    /// Act on what woke the publishing loop; Some when the session ends.
    fn on_wake(&mut self, p: &mut Publishing, wake: Wake) -> Option<SessionEnd> {
        match wake {
            Wake::Confirm(id, res) => return self.on_confirms(p, id, res),
            Wake::Conn(Some(Event::Error(e))) => {
                tracing::warn!(error = %e, "AMQP connection error");
                return Some(SessionEnd::Lost);
            }
            Wake::Conn(Some(Event::ConnectionBlocked(reason))) => {
                tracing::warn!(%reason, "RabbitMQ blocked publishing (resource alarm)");
            }
            Wake::Conn(Some(_)) => {}
            Wake::Conn(None) => return Some(SessionEnd::Lost),
            Wake::Shutdown => p.flush_until = Some(Instant::now() + FLUSH_ON_SHUTDOWN),
            Wake::Work => {}
            Wake::Tick => {
                if !p.conn.status().connected() || !p.ch.status().connected() {
                    return Some(SessionEnd::Lost);
                }
            }
        }
        None
    }

    /// Settle one confirm, then every other already in without waiting; Some when
    /// the session ends (a broken publish, or a channel that refuses everything).
    fn on_confirms(
        &mut self,
        p: &mut Publishing,
        id: u64,
        res: PublishOutcome,
    ) -> Option<SessionEnd> {
        let mut next = Some((id, res));
        while let Some((id, res)) = next.take() {
            match self.settle(id, res, &mut p.held) {
                PublishOutcome::Ack => p.nacks_in_a_row = 0,
                PublishOutcome::Nack => {
                    p.paused_until = Some(tokio::time::Instant::now() + NACK_PAUSE);
                    p.nacks_in_a_row += 1;
                    // A whole window refused and none accepted: the channel may
                    // be what is refused (after a broker node died, a quorum
                    // queue's new leader can keep refusing a publisher it lost
                    // track of). A new connection, on the next node, starts over.
                    if p.nacks_in_a_row > self.window.max(100) {
                        tracing::warn!(
                            nacks = p.nacks_in_a_row,
                            "RabbitMQ refuses every publish on this channel: reconnecting"
                        );
                        return Some(SessionEnd::Lost);
                    }
                }
                PublishOutcome::Broken(e) => {
                    tracing::warn!(error = %e, "AMQP publish failed");
                    return Some(SessionEnd::Lost);
                }
            }
            // Settle everything already confirmed without waiting.
            next = p.inflight.next().now_or_never().flatten();
        }
        None
    }

    /// At the end of a session: whatever was not confirmed goes back to the buffer,
    /// oldest first (counted as retried if the connection was lost).
    fn requeue_unconfirmed(&mut self, p: Publishing, lost: bool) {
        let Publishing {
            inflight, mut held, ..
        } = p;
        drop(inflight);
        let mut left: Vec<(u64, BusEvent)> = held.drain().collect();
        left.sort_unstable_by_key(|(id, _)| *id);
        if lost {
            self.m().retried.fetch_add(left.len() as u64, Relaxed);
        }
        self.requeue(left.into_iter().map(|(_, ev)| ev).collect());
        self.m().unconfirmed.store(0, Relaxed);
        self.m().buffered.store(self.buffer.len() as i64, Relaxed);
    }

    /// Routing key and properties for one event; None (dropped, counted) if the
    /// routing key cannot be an AMQP short string.
    fn prepare(
        &self,
        ev: &BusEvent,
        header_limit: usize,
    ) -> Option<(ShortString, BasicProperties)> {
        let m = self.m();
        let Ok(rk) = ShortString::try_new(ev.routing_key.as_str()) else {
            m.dropped_bad_routing_key.fetch_add(1, Relaxed);
            return None;
        };
        let table = match headers::from_json(&ev.body) {
            Ok(h) => {
                if h.skipped_keys > 0 {
                    m.header_keys_skipped.fetch_add(h.skipped_keys, Relaxed);
                }
                if h.reserved_keys > 0 {
                    m.header_keys_reserved.fetch_add(h.reserved_keys, Relaxed);
                }
                if h.wire_len <= header_limit {
                    h.table
                } else {
                    // A content header must fit one frame; the body has it all anyway.
                    m.headers_omitted.fetch_add(1, Relaxed);
                    FieldTable::default()
                }
            }
            Err(_) => {
                m.headers_omitted.fetch_add(1, Relaxed);
                FieldTable::default()
            }
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(table);
        Some((rk, props))
    }

    fn settle(
        &mut self,
        id: u64,
        outcome: PublishOutcome,
        held: &mut HashMap<u64, BusEvent>,
    ) -> PublishOutcome {
        match outcome {
            PublishOutcome::Ack => {
                held.remove(&id);
                self.m().confirmed.fetch_add(1, Relaxed);
            }
            PublishOutcome::Nack => {
                self.m().nacked.fetch_add(1, Relaxed);
                if let Some(ev) = held.remove(&id) {
                    self.m().retried.fetch_add(1, Relaxed);
                    self.requeue(vec![ev]);
                }
            }
            // The event stays held: the session ends and requeues it.
            PublishOutcome::Broken(_) => {}
        }
        outcome
    }
}

/// One connection's publishing state (see [`Bridge::session`]).
struct Publishing<'c> {
    conn: &'c Connection,
    ch: &'c Channel,
    inflight: FuturesUnordered<Publish>,
    /// Events published and awaiting their confirm, by publish sequence number.
    held: HashMap<u64, BusEvent>,
    seq: u64,
    /// The largest headers table a content header frame can carry.
    header_limit: usize,
    /// Set on shutdown: publishing goes on until everything is confirmed, or then.
    flush_until: Option<Instant>,
    /// After a nack, nothing is published until then.
    paused_until: Option<tokio::time::Instant>,
    /// Nacks since the last ack (see [`Bridge::on_confirms`]).
    nacks_in_a_row: usize,
}

impl<'c> Publishing<'c> {
    /// Nothing in flight yet, on a connection whose frame size bounds the headers.
    fn new(conn: &'c Connection, ch: &'c Channel, window: usize) -> Self {
        let frame_max = conn.configuration().frame_max() as usize;
        let header_limit = if frame_max == 0 {
            usize::MAX
        } else {
            frame_max.saturating_sub(HEADER_FRAME_OVERHEAD)
        };
        Publishing {
            conn,
            ch,
            inflight: FuturesUnordered::new(),
            held: HashMap::with_capacity(window),
            seq: 0,
            header_limit,
            flush_until: None,
            paused_until: None,
            nacks_in_a_row: 0,
        }
    }

    /// Is publishing paused after a nack?
    fn paused(&self) -> bool {
        self.paused_until
            .is_some_and(|t| t > tokio::time::Instant::now())
    }

    /// Publish `ev` under the next sequence number and hold it until its confirm.
    fn send(&mut self, ev: BusEvent, rk: ShortString, props: BasicProperties) {
        self.seq += 1;
        self.inflight.push(Box::pin(publish(
            self.ch.clone(),
            self.seq,
            rk,
            ev.body.clone(),
            props,
        )));
        self.held.insert(self.seq, ev);
    }
}

/// What woke the publishing loop.
enum Wake {
    Confirm(u64, PublishOutcome),
    Conn(Option<Event>),
    Shutdown,
    Work,
    Tick,
}

/// How one publish ended.
enum PublishOutcome {
    Ack,
    Nack,
    /// The channel or connection failed before the confirm came.
    Broken(String),
}

/// Connect, open the publishing channel, declare the exchange, enable confirms. (The
/// cluster has a connection of its own: see [`crate::cluster::session`].)
async fn connect(
    url: String,
    name: String,
    tls: Option<lapin::tcp::OwnedTLSConfig>,
) -> lapin::Result<(Connection, Channel)> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = amqp::connect(&url, props, tls.as_ref()).await?;
    let declared = async {
        let ch = conn.create_channel().await?;
        declare_events_exchange(&ch).await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>(ch)
    }
    .await;
    match declared {
        Ok(ch) => Ok((conn, ch)),
        Err(e) => {
            amqp::close(&conn).await;
            Err(e)
        }
    }
}

/// One publish and its confirm.
async fn publish(
    ch: Channel,
    id: u64,
    routing_key: ShortString,
    body: Bytes,
    props: BasicProperties,
) -> (u64, PublishOutcome) {
    let res = match ch
        .basic_publish(
            EXCHANGE.into(),
            routing_key,
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
    {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    let outcome = match res {
        Ok(Confirmation::Ack(_)) => PublishOutcome::Ack,
        Ok(Confirmation::Nack(_)) => PublishOutcome::Nack,
        // Confirms were not enabled on this channel: nothing here can be trusted.
        Ok(Confirmation::NotRequested) => {
            PublishOutcome::Broken("publisher confirms not enabled".into())
        }
        Err(e) => PublishOutcome::Broken(e.to_string()),
    };
    (id, outcome)
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted_in_logs() {
        use crate::redact_url as redact;
        assert_eq!(
            redact("amqp://user:secret@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host/"), "amqp://host/");
    }
}
