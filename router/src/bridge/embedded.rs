//! Embedded bus: no broker. Drains the shards' event queue into a broadcast that
//! `GET /v1/events` subscribers read; with no subscriber the sink just counts.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::BusRx;
use crate::Shared;

/// Events a slow SSE subscriber may fall behind by before it misses some (counted).
pub const SSE_BACKLOG: usize = 16 * 1024;

pub async fn run(shared: Arc<Shared>, mut rx: BusRx, sink: broadcast::Sender<Bytes>) {
    loop {
        let mut n = 0u64;
        // No subscriber is fine: the sink is then a counter and skips the broadcast
        // (whose lock is taken even to count receivers: asked once per round).
        let mut subscribed = sink.receiver_count() > 0;
        while let Some(ev) = rx.try_recv() {
            if subscribed {
                let _ = sink.send(ev.body);
            }
            n += 1;
            if n.is_multiple_of(1024) {
                tokio::task::yield_now().await;
                subscribed = sink.receiver_count() > 0;
            }
        }
        shared.metrics.api.bus_events.fetch_add(n, Relaxed);
        shared.bus.wait().await;
    }
}
