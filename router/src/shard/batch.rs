//! What a shard publishes to the bus, batched per pass of its loop, and the backpressure the
//! bus puts on the shard's reading.

use bytes::Bytes;

use crate::bus::{Bus, BusEvent, RoutingKey};

/// Events a shard may queue on the bus in one pass before it wakes the consumer anyway.
const WAKE_EVERY: usize = 512;

/// What became of a published event, and what the shard does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// The bus is full: dropped (and counted by the caller).
    Dropped,
    /// In the batch: handed over at the end of the pass if it is urgent (or an
    /// urgent event came before it), else with the next urgent one or the next tick.
    Batched,
    /// The batch is large: hand it over now ([`Batch::hand_over`]).
    Full,
}

/// A hand-over's outcome, for the shard's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandedOver {
    /// Nothing was waiting.
    Nothing,
    Sent(u64),
    /// The consumer is gone (shutdown): dropped.
    Dropped(u64),
}

/// A shard's bus batch and its backpressure state.
#[derive(Default)]
pub(crate) struct Batch {
    /// Events published in this pass, handed to the bus at its end.
    events: Vec<BusEvent>,
    /// The batch holds an event that must go at the end of this pass; without one
    /// (only device-alive events) it waits for the next tick.
    urgent: bool,
    /// Reading paused until the bus drains (backpressure).
    throttled: bool,
    /// Connections holding unparsed bytes because of it.
    held: Vec<u32>,
}

impl Batch {
    /// Queue an event; `urgent`: it goes at the end of this pass, else with the next
    /// urgent one or the next tick.
    pub(crate) fn push(
        &mut self,
        bus: &Bus,
        routing_key: RoutingKey,
        body: Vec<u8>,
        urgent: bool,
    ) -> Queued {
        if !bus.has_room(self.events.len()) {
            return Queued::Dropped;
        }
        self.events.push(BusEvent {
            routing_key,
            // Exactly sized, a Vec becomes `Bytes` without a separate shared header
            // (shrinking a little in place is free with mimalloc); one allocation less
            // per event.
            body: Bytes::from(body.into_boxed_slice()),
        });
        // Handed over once per pass of the loop, whoever published, and every
        // WAKE_EVERY events within a long pass so the consumer works meanwhile.
        self.urgent |= urgent;
        if self.events.len() >= WAKE_EVERY {
            Queued::Full
        } else {
            Queued::Batched
        }
    }

    pub(crate) fn is_urgent(&self) -> bool {
        self.urgent
    }

    /// Hand the batch to the bus and wake its consumer (only if there was something).
    pub(crate) fn hand_over(&mut self, bus: &Bus) -> HandedOver {
        self.urgent = false;
        if self.events.is_empty() {
            return HandedOver::Nothing;
        }
        let batch = std::mem::take(&mut self.events);
        let n = batch.len() as u64;
        let r = match bus.send_batch(batch) {
            Ok(()) => HandedOver::Sent(n),
            Err(_) => HandedOver::Dropped(n),
        };
        bus.wake();
        r
    }

    /// Before reading a device: Err while the bus is nearly full (reading pauses), with
    /// `true` the first time (counted by the caller).
    pub(crate) fn may_read(&mut self, bus: &Bus) -> Result<(), bool> {
        if self.throttled {
            return Err(false);
        }
        if bus.congested(self.events.len()) {
            self.throttled = true;
            return Err(true);
        }
        Ok(())
    }

    pub(crate) fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// A connection stopped mid-buffer for backpressure; resume it when relieved.
    pub(crate) fn hold(&mut self, slot: u32) {
        self.held.push(slot);
    }

    /// The bus drained enough: reading goes on, first with the connections held (each
    /// once, by slot).
    pub(crate) fn relieve(&mut self) -> Vec<u32> {
        self.throttled = false;
        let mut held = std::mem::take(&mut self.held);
        held.sort_unstable();
        held.dedup();
        held
    }
}

#[cfg(test)]
mod tests {
    use super::{Batch, HandedOver, Queued, WAKE_EVERY};
    use crate::bus::{Bus, RoutingKey};

    fn key() -> RoutingKey {
        RoutingKey::concat(&["hive-backend.test"])
    }

    #[test]
    fn an_urgent_event_makes_the_batch_urgent_until_handed_over() {
        let (bus, mut rx) = Bus::new(10_000);
        let mut b = Batch::default();
        assert_eq!(b.push(&bus, key(), b"a".to_vec(), false), Queued::Batched);
        assert!(!b.is_urgent(), "a lazy event waits for the tick");
        assert_eq!(b.push(&bus, key(), b"b".to_vec(), true), Queued::Batched);
        assert!(b.is_urgent());
        assert_eq!(b.push(&bus, key(), b"c".to_vec(), false), Queued::Batched);
        assert!(b.is_urgent());
        assert_eq!(b.hand_over(&bus), HandedOver::Sent(3));
        assert!(!b.is_urgent());
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv())
            .map(|e| e.body)
            .collect();
        assert_eq!(got, [&b"a"[..], b"b", b"c"]);
        // A new batch: urgent again with its first urgent event.
        assert_eq!(b.push(&bus, key(), b"d".to_vec(), true), Queued::Batched);
        assert!(b.is_urgent());
        // Nothing waiting: nothing handed over, the urgency is gone all the same.
        assert_eq!(b.hand_over(&bus), HandedOver::Sent(1));
        assert_eq!(b.hand_over(&bus), HandedOver::Nothing);
    }

    #[test]
    fn a_large_batch_is_handed_over_within_the_pass() {
        let (bus, _rx) = Bus::new(10_000);
        let mut b = Batch::default();
        for i in 1..WAKE_EVERY {
            assert_ne!(b.push(&bus, key(), vec![1], false), Queued::Full, "{i}");
        }
        assert_eq!(b.push(&bus, key(), vec![1], false), Queued::Full);
        assert_eq!(b.hand_over(&bus), HandedOver::Sent(WAKE_EVERY as u64));
    }

    #[test]
    fn a_full_bus_drops_counting_what_the_batch_holds() {
        let (bus, mut rx) = Bus::new(4);
        let mut b = Batch::default();
        for _ in 0..3 {
            assert_ne!(b.push(&bus, key(), vec![1], true), Queued::Dropped);
        }
        // Three queued on the bus, one waiting in the batch: no room for a fifth.
        assert_eq!(b.hand_over(&bus), HandedOver::Sent(3));
        assert_ne!(b.push(&bus, key(), vec![1], true), Queued::Dropped);
        assert_eq!(b.push(&bus, key(), vec![1], true), Queued::Dropped);
        // The consumer takes the three: room again.
        assert!(rx.try_recv().is_some());
        assert_ne!(b.push(&bus, key(), vec![1], true), Queued::Dropped);
        // The consumer gone: handed-over events are dropped.
        drop(rx);
        assert_eq!(b.hand_over(&bus), HandedOver::Dropped(2));
    }

    #[test]
    fn congestion_throttles_reading_until_relieved() {
        // Capacity 8: congested at 6 queued, relieved at 4.
        let (bus, mut rx) = Bus::new(8);
        let mut b = Batch::default();
        assert_eq!(b.may_read(&bus), Ok(()));
        for _ in 0..5 {
            b.push(&bus, key(), vec![1], false);
        }
        assert_eq!(b.may_read(&bus), Ok(()));
        b.push(&bus, key(), vec![1], false);
        // Counting the batch not yet handed over.
        assert_eq!(b.may_read(&bus), Err(true), "throttled, counted once");
        assert_eq!(b.may_read(&bus), Err(false));
        assert!(b.is_throttled());
        b.hold(3);
        b.hold(1);
        b.hold(3);
        assert_eq!(b.hand_over(&bus), HandedOver::Sent(6));
        assert!(!bus.relieved());
        assert_eq!(b.may_read(&bus), Err(false), "still throttled");
        assert!(rx.try_recv().is_some());
        assert!(bus.relieved());
        assert_eq!(b.relieve(), vec![1, 3]);
        assert!(!b.is_throttled());
        assert!(b.relieve().is_empty());
        assert_eq!(b.may_read(&bus), Ok(()));
    }
}
