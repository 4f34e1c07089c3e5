//! Embedded bus: no broker. Drains the shards' event queue into the SSE ring
//! (`super::sse`) that `GET /v1/events` subscribers read; with no subscriber the sink
//! just counts.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::sse::SseHub;
use super::BusRx;
use crate::Shared;

pub(crate) async fn run(shared: Arc<Shared>, mut rx: BusRx, sink: Arc<SseHub>) {
    loop {
        let mut n = 0u64;
        // No subscriber is fine: the sink is then a counter and skips the ring.
        let mut subscribed = sink.subscriber_count() > 0;
        while let Some(ev) = rx.try_recv() {
            if subscribed {
                sink.publish(ev.body);
            }
            n += 1;
            if n.is_multiple_of(1024) {
                tokio::task::yield_now().await;
                subscribed = sink.subscriber_count() > 0;
            }
        }
        shared.metrics.api.bus_events.fetch_add(n, Relaxed);
        shared.bus.wait().await;
    }
}
