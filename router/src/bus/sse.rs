//! The `GET /v1/events` fan-out: one ring of recent device events, bounded in bytes and
//! in count, that every SSE subscriber reads at its own pace.
//!
//! A subscriber that does not keep up (it reads slower than events arrive, or not at
//! all) falls off the back of the ring: it is told how many it missed (counted as
//! `router_sse_lagged_total`, and sent as an SSE comment `: lagged N`) and goes on from
//! the oldest one still held. So the
//! memory the stream holds is at most [`SSE_BUFFER_BYTES`] (plus one event larger than
//! that), however many subscribers there are and however slow; with no subscriber,
//! nothing is kept, and when the last one leaves the ring is emptied and its memory
//! returned. (A count-bounded broadcast channel, used before, held up to 16,384 events
//! whatever their size: 50 KB events took a router from 9 to 243 MB for one subscriber
//! that never read, and its slots kept them after the subscriber left.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// Bytes of events the ring holds for its subscribers.
pub const SSE_BUFFER_BYTES: usize = 8 << 20;
/// Events the ring holds at most, whatever their size.
pub const SSE_BUFFER_EVENTS: usize = 16 * 1024;

#[derive(Default)]
struct Ring {
    events: VecDeque<Bytes>,
    /// Sequence number of `events[0]`.
    base: u64,
    bytes: usize,
}

pub struct SseHub {
    ring: Mutex<Ring>,
    notify: Notify,
    subscribers: AtomicUsize,
    max_bytes: usize,
    max_events: usize,
}

/// What a subscriber reads next.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Event(Bytes),
    /// This many events went by before the subscriber read them.
    Lagged(u64),
}

impl SseHub {
    pub fn new(max_bytes: usize, max_events: usize) -> Self {
        SseHub {
            ring: Mutex::default(),
            notify: Notify::new(),
            subscribers: AtomicUsize::new(0),
            max_bytes,
            max_events: max_events.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load(Relaxed)
    }

    /// Bytes held for subscribers now.
    pub fn buffered_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Offer an event to the subscribers (nothing is kept when there are none).
    pub fn publish(&self, body: Bytes) {
        if self.subscriber_count() == 0 {
            return;
        }
        {
            let mut r = self.lock();
            r.bytes += body.len();
            r.events.push_back(body);
            while r.events.len() > 1
                && (r.bytes > self.max_bytes || r.events.len() > self.max_events)
            {
                if let Some(old) = r.events.pop_front() {
                    r.bytes -= old.len();
                    r.base += 1;
                }
            }
        }
        self.notify.notify_waiters();
    }

    /// A new subscriber: it reads the events published from now on.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribers.fetch_add(1, Relaxed);
        let r = self.lock();
        Subscription {
            hub: self.clone(),
            next: r.base + r.events.len() as u64,
        }
    }
}

pub struct Subscription {
    hub: Arc<SseHub>,
    next: u64,
}

impl Subscription {
    /// The next event (or how many went by unread), waiting for one to arrive.
    pub async fn recv(&mut self) -> Item {
        loop {
            let notified = self.hub.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a publish in between is not missed.
            notified.as_mut().enable();
            {
                let r = self.hub.lock();
                if self.next < r.base {
                    let missed = r.base - self.next;
                    self.next = r.base;
                    return Item::Lagged(missed);
                }
                if let Some(b) = r.events.get((self.next - r.base) as usize) {
                    self.next += 1;
                    return Item::Event(b.clone());
                }
            }
            notified.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.hub.subscribers.fetch_sub(1, Relaxed) == 1 {
            // The last one left: nobody will read what is held; give it back.
            let mut r = self.hub.lock();
            let held = r.events.len() as u64;
            r.base += held;
            r.events = VecDeque::new();
            r.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slow_subscriber_is_bounded_in_bytes_and_told_what_it_missed() {
        let hub = Arc::new(SseHub::new(1000, 100));
        hub.publish(Bytes::from_static(b"before anyone listens"));
        assert_eq!(hub.buffered_bytes(), 0);
        let mut fast = hub.subscribe();
        let mut slow = hub.subscribe();
        for i in 0..50u8 {
            hub.publish(Bytes::from(vec![i; 100]));
            assert_eq!(fast.recv().await, Item::Event(Bytes::from(vec![i; 100])));
        }
        // 50 x 100 bytes went by; the ring keeps the last 1000 bytes' worth.
        assert_eq!(hub.buffered_bytes(), 1000);
        assert_eq!(slow.recv().await, Item::Lagged(40));
        for i in 40..50u8 {
            assert_eq!(slow.recv().await, Item::Event(Bytes::from(vec![i; 100])));
        }
        // Bounded by count too.
        let hub2 = Arc::new(SseHub::new(1 << 20, 3));
        let mut s = hub2.subscribe();
        for i in 0..5u8 {
            hub2.publish(Bytes::from(vec![i]));
        }
        assert_eq!(s.recv().await, Item::Lagged(2));
        // The last subscriber leaving empties the ring.
        drop(s);
        assert_eq!(hub2.buffered_bytes(), 0);
        drop(fast);
        assert_eq!(hub.buffered_bytes(), 1000);
        drop(slow);
        assert_eq!(hub.buffered_bytes(), 0);
        // A waiting subscriber wakes for the next event.
        let mut w = hub.subscribe();
        let h = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                hub.publish(Bytes::from_static(b"late"));
            })
        };
        assert_eq!(w.recv().await, Item::Event(Bytes::from_static(b"late")));
        h.await.unwrap();
    }
}
