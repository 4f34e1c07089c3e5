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
        while let Some(ev) = rx.try_recv() {
            // No receiver is fine: the sink is then a counter.
            let _ = sink.send(ev.body);
            n += 1;
            if n.is_multiple_of(1024) {
                tokio::task::yield_now().await;
            }
        }
        shared.metrics.api.bus_events.fetch_add(n, Relaxed);
        shared.bus.wait().await;
    }
}
