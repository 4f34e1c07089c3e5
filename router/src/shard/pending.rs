//! A shard's pending requests: sent to a device, waiting for its ack or its response.
//!
//! Found two ways: by request id (acks and responses name it) and by device (a
//! reconnect re-sends that device's unacked requests; a stock device's follow-up acks
//! the oldest of a command), so neither looks at other devices' requests. The requests
//! live in one slab; each device's are chained through it in the order they were sent,
//! and the device index holds only the chain's ends. A device with nothing pending
//! costs nothing here.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::time::Instant;

use uuid::Uuid;

use super::msg::{RequestMsg, RequestReply};

/// No slot: the end of a chain.
const NIL: u32 = u32::MAX;
/// Slots kept once the table is empty again; beyond that a burst's memory is given back.
const KEEP: usize = 1024;

struct Entry {
    req: RequestMsg,
    /// Acked, waiting for the response (only with `wait_response`).
    acked: bool,
    /// The device's previous and next request, in the order they were sent.
    prev: u32,
    next: u32,
}

/// The ends of a device's chain.
#[derive(Clone, Copy)]
struct Chain {
    head: u32,
    tail: u32,
}

#[derive(Default)]
pub(crate) struct Pending {
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    by_id: HashMap<Uuid, u32>,
    by_device: HashMap<Uuid, Chain>,
}

impl Pending {
    /// Does `device` have a request in flight?
    pub(crate) fn has_device(&self, device: &Uuid) -> bool {
        self.by_device.contains_key(device)
    }

    /// Does `device` have `n` requests in flight or more? (Walks at most `n` of them.)
    pub(crate) fn has_at_least(&self, device: &Uuid, n: u32) -> bool {
        self.chain(*device).take(n as usize).count() >= n as usize
    }

    /// A request sent (or to send when the device can take it). An earlier request with
    /// the same id is dropped: its caller sees the reply channel close.
    pub(crate) fn insert(&mut self, req: RequestMsg) {
        if let Some(&old) = self.by_id.get(&req.request) {
            self.remove_at(old);
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let prev = match self.by_device.entry(req.device) {
            MapEntry::Occupied(mut c) => {
                let prev = std::mem::replace(&mut c.get_mut().tail, slot);
                entry_mut(&mut self.slots, prev).next = slot;
                prev
            }
            MapEntry::Vacant(c) => {
                c.insert(Chain {
                    head: slot,
                    tail: slot,
                });
                NIL
            }
        };
        self.by_id.insert(req.request, slot);
        self.slots[slot as usize] = Some(Entry {
            req,
            acked: false,
            prev,
            next: NIL,
        });
    }

    /// The device acked `request`: answered now, or marked and kept for its response.
    /// False: no such request to this device.
    pub(crate) fn ack(&mut self, device: Uuid, request: Uuid) -> bool {
        let Some(slot) = self.find(device, request) else {
            return false;
        };
        let e = entry_mut(&mut self.slots, slot);
        if e.req.wait_response {
            e.acked = true;
        } else {
            let _ = self.remove_at(slot).reply.send(RequestReply::Acked);
        }
        true
    }

    /// The device answered `request`. False: no such request to this device.
    pub(crate) fn respond(
        &mut self,
        device: Uuid,
        request: Uuid,
        ok: bool,
        result: Option<Vec<u8>>,
    ) -> bool {
        let Some(slot) = self.find(device, request) else {
            return false;
        };
        let _ = self
            .remove_at(slot)
            .reply
            .send(RequestReply::Responded { ok, result });
        true
    }

    /// Ack the device's oldest (earliest deadline) request of `command` not yet acked.
    /// False: none.
    pub(crate) fn ack_command(&mut self, device: Uuid, command: &str) -> bool {
        let oldest = self
            .chain(device)
            .filter(|e| !e.acked && e.req.command == command)
            .min_by_key(|e| e.req.deadline)
            .map(|e| e.req.request);
        oldest.is_some_and(|id| self.ack(device, id))
    }

    /// What a new connection of `device` is sent again, in the order first sent:
    /// (request id, command, payload) of its requests not yet acked whose caller waits.
    pub(crate) fn unacked(&self, device: Uuid) -> impl Iterator<Item = (Uuid, &str, &[u8])> {
        self.chain(device)
            .filter(|e| !e.acked && !e.req.reply.is_closed())
            .map(|e| {
                (
                    e.req.request,
                    e.req.command.as_str(),
                    e.req.payload.as_slice(),
                )
            })
    }

    /// Drop the requests past their deadline and those whose caller stopped waiting (the
    /// caller sees its reply channel close).
    pub(crate) fn expire(&mut self, now: Instant) {
        for slot in 0..self.slots.len() {
            let done = self.slots[slot]
                .as_ref()
                .is_some_and(|e| e.req.deadline <= now || e.req.reply.is_closed());
            if done {
                self.remove_at(slot as u32);
            }
        }
        if self.by_id.is_empty() && self.slots.capacity() > KEEP {
            *self = Pending::default();
        }
    }

    fn find(&self, device: Uuid, request: Uuid) -> Option<u32> {
        let slot = *self.by_id.get(&request)?;
        (entry(&self.slots, slot).req.device == device).then_some(slot)
    }

    /// The device's requests, in the order they were sent.
    fn chain(&self, device: Uuid) -> impl Iterator<Item = &Entry> {
        let mut at = self.by_device.get(&device).map_or(NIL, |c| c.head);
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let e = entry(&self.slots, at);
            at = e.next;
            Some(e)
        })
    }

    /// Out of the table: unlinked from its device's chain, its slot free.
    fn remove_at(&mut self, slot: u32) -> RequestMsg {
        let Some(e) = self.slots[slot as usize].take() else {
            unreachable!("pending slot {slot} indexed but empty");
        };
        self.free.push(slot);
        self.by_id.remove(&e.req.request);
        if e.prev != NIL {
            entry_mut(&mut self.slots, e.prev).next = e.next;
        }
        if e.next != NIL {
            entry_mut(&mut self.slots, e.next).prev = e.prev;
        }
        if e.prev == NIL && e.next == NIL {
            self.by_device.remove(&e.req.device);
        } else if e.prev == NIL || e.next == NIL {
            if let Some(c) = self.by_device.get_mut(&e.req.device) {
                if e.prev == NIL {
                    c.head = e.next;
                }
                if e.next == NIL {
                    c.tail = e.prev;
                }
            }
        }
        e.req
    }
}

fn entry(slots: &[Option<Entry>], slot: u32) -> &Entry {
    match &slots[slot as usize] {
        Some(e) => e,
        None => unreachable!("pending slot {slot} linked but empty"),
    }
}

fn entry_mut(slots: &mut [Option<Entry>], slot: u32) -> &mut Entry {
    match &mut slots[slot as usize] {
        Some(e) => e,
        None => unreachable!("pending slot {slot} linked but empty"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::sync::oneshot;
    use uuid::Uuid;

    use super::{Entry, Pending, KEEP};
    use crate::shard::msg::{RequestMsg, RequestReply};

    struct Sent {
        id: Uuid,
        rx: oneshot::Receiver<RequestReply>,
    }

    fn send(
        p: &mut Pending,
        device: Uuid,
        command: &str,
        wait_response: bool,
        deadline: Instant,
    ) -> Sent {
        let (tx, rx) = oneshot::channel();
        let id = Uuid::new_v4();
        p.insert(RequestMsg {
            device,
            request: id,
            command: command.into(),
            payload: id.as_bytes().to_vec(),
            wait_response,
            deadline,
            reply: tx,
        });
        Sent { id, rx }
    }

    fn later(s: u64) -> Instant {
        Instant::now() + Duration::from_secs(s)
    }

    fn resent(p: &Pending, device: Uuid) -> Vec<Uuid> {
        p.unacked(device).map(|(id, _, _)| id).collect()
    }

    /// Index and chains agree with the slab: every request found by its id, every
    /// device's chain linked both ways, nothing left of a device without requests.
    fn check(p: &Pending) {
        let live = p.slots.iter().flatten().count();
        assert_eq!(live, p.by_id.len());
        assert_eq!(live + p.free.len(), p.slots.len());
        let mut chained = 0;
        for (device, c) in &p.by_device {
            let mut prev = super::NIL;
            let mut at = c.head;
            while at != super::NIL {
                let e = super::entry(&p.slots, at);
                assert_eq!(e.req.device, *device);
                assert_eq!(e.prev, prev);
                assert_eq!(p.by_id[&e.req.request], at);
                prev = at;
                at = e.next;
                chained += 1;
            }
            assert_eq!(c.tail, prev);
        }
        assert_eq!(chained, live);
    }

    #[test]
    fn an_ack_answers_a_request_that_waits_for_no_response() {
        let mut p = Pending::default();
        let d = Uuid::new_v4();
        let mut r = send(&mut p, d, "reboot", false, later(10));
        assert!(p.has_device(&d));
        assert!(p.ack(d, r.id));
        assert!(matches!(r.rx.try_recv(), Ok(RequestReply::Acked)));
        assert_eq!(p.by_id.len(), 0);
        assert!(!p.has_device(&d));
        // Acked twice: the second finds nothing.
        assert!(!p.ack(d, r.id));
        check(&p);
    }

    #[test]
    fn a_request_waiting_for_its_response_stays_after_the_ack_and_is_not_resent() {
        let mut p = Pending::default();
        let d = Uuid::new_v4();
        let mut r = send(&mut p, d, "identify", true, later(10));
        assert!(p.ack(d, r.id));
        assert!(r.rx.try_recv().is_err(), "answered at the ack");
        assert_eq!(p.by_id.len(), 1);
        assert!(
            resent(&p, d).is_empty(),
            "an acked request is not sent again"
        );
        // A second ack changes nothing.
        assert!(p.ack(d, r.id));
        assert!(p.respond(d, r.id, true, Some(b"{}".to_vec())));
        match r.rx.try_recv() {
            Ok(RequestReply::Responded { ok, result }) => {
                assert!(ok);
                assert_eq!(result.as_deref(), Some(&b"{}"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert!(!p.respond(d, r.id, true, None));
        assert!(!p.has_device(&d));
        check(&p);
    }

    #[test]
    fn acks_and_responses_of_unknown_ids_or_of_another_device_find_nothing() {
        let mut p = Pending::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut r = send(&mut p, a, "reboot", false, later(10));
        assert!(!p.ack(a, Uuid::new_v4()));
        assert!(!p.ack(b, r.id), "another device's request");
        assert!(!p.respond(b, r.id, true, None));
        assert!(!p.ack_command(b, "reboot"));
        assert!(!p.ack_command(a, "identify"));
        assert_eq!(p.by_id.len(), 1);
        assert!(r.rx.try_recv().is_err());
        assert!(!p.has_device(&b));
        check(&p);
    }

    #[test]
    fn resent_in_the_order_sent_skipping_acked_and_abandoned_requests() {
        let mut p = Pending::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut sent = Vec::new();
        for i in 0..6 {
            sent.push(send(&mut p, a, "x", true, later(10)));
            send(&mut p, b, "y", false, later(10));
            if i == 2 {
                check(&p);
            }
        }
        let ids: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
        assert_eq!(resent(&p, a), ids);
        // Acked (waits for its response), answered, caller gone: not sent again.
        assert!(p.ack(a, ids[1]));
        assert!(p.respond(a, ids[3], false, None));
        drop(sent.remove(5).rx);
        assert_eq!(resent(&p, a), vec![ids[0], ids[2], ids[4]]);
        let (_, command, payload) = p.unacked(a).next().unwrap();
        assert_eq!((command, payload), ("x", ids[0].as_bytes().as_slice()));
        // The head and the tail of the chain go.
        assert!(p.respond(a, ids[0], true, None));
        assert!(p.respond(a, ids[1], true, None));
        assert_eq!(resent(&p, a), vec![ids[2], ids[4]]);
        check(&p);
        // New requests land at the end, in freed slots.
        let slots = p.slots.len();
        let n = send(&mut p, a, "x", true, later(10));
        assert_eq!(resent(&p, a), vec![ids[2], ids[4], n.id]);
        assert_eq!(p.slots.len(), slots);
        check(&p);
    }

    #[test]
    fn a_follow_up_acks_the_oldest_unacked_request_of_its_command() {
        let mut p = Pending::default();
        let d = Uuid::new_v4();
        let mut late = send(&mut p, d, "reboot", false, later(30));
        let mut other = send(&mut p, d, "identify", false, later(5));
        let mut early = send(&mut p, d, "reboot", false, later(20));
        assert!(p.ack_command(d, "reboot"));
        assert!(matches!(early.rx.try_recv(), Ok(RequestReply::Acked)));
        assert!(late.rx.try_recv().is_err());
        assert!(p.ack_command(d, "reboot"));
        assert!(matches!(late.rx.try_recv(), Ok(RequestReply::Acked)));
        assert!(!p.ack_command(d, "reboot"));
        assert!(other.rx.try_recv().is_err());
        // Already acked (waiting for a response): not acked again by a follow-up.
        let w = send(&mut p, d, "update", true, later(30));
        assert!(p.ack(d, w.id));
        assert!(!p.ack_command(d, "update"));
        check(&p);
    }

    #[test]
    fn expiry_drops_requests_past_their_deadline_and_those_nobody_waits_for() {
        let mut p = Pending::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let now = Instant::now();
        let mut soon = send(&mut p, a, "x", false, now + Duration::from_secs(1));
        let keep = send(&mut p, a, "x", true, now + Duration::from_secs(5));
        let gone = send(&mut p, b, "x", false, now + Duration::from_secs(5));
        drop(gone.rx);
        p.expire(now);
        assert_eq!(p.by_id.len(), 2, "the abandoned request goes at once");
        assert!(!p.has_device(&b));
        p.expire(now + Duration::from_secs(1));
        assert_eq!(p.by_id.len(), 1);
        // Dropped unanswered: the caller sees the channel close (its timeout).
        assert!(matches!(
            soon.rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(resent(&p, a), vec![keep.id]);
        p.expire(now + Duration::from_secs(5));
        assert_eq!(p.by_id.len(), 0);
        assert!(!p.has_device(&a));
        check(&p);
    }

    /// Requests outlive the device's connection (re-sent on reconnect); once its last
    /// request is gone, by whatever way, nothing of the device is left in the table.
    #[test]
    fn a_device_is_forgotten_with_its_last_request() {
        let mut p = Pending::default();
        let d = Uuid::new_v4();
        let r1 = send(&mut p, d, "a", false, later(10));
        let r2 = send(&mut p, d, "b", true, later(10));
        let r3 = send(&mut p, d, "c", false, Instant::now());
        assert!(p.ack(d, r1.id));
        assert!(p.has_device(&d));
        p.expire(Instant::now());
        assert!(p.has_device(&d));
        assert_eq!(resent(&p, d), vec![r2.id]);
        assert!(p.respond(d, r2.id, true, None));
        assert!(!p.has_device(&d));
        assert!(p.by_device.is_empty() && p.by_id.is_empty());
        drop(r3);
        check(&p);
    }

    #[test]
    fn a_device_with_many_requests() {
        let mut p = Pending::default();
        let d = Uuid::new_v4();
        let others: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
        let mut sent = Vec::new();
        for i in 0..5_000 {
            sent.push(send(&mut p, d, "x", false, later(10)));
            send(&mut p, others[i % others.len()], "x", false, later(10));
        }
        check(&p);
        let ids: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
        assert_eq!(resent(&p, d), ids);
        // Acked in a scattered order: the rest keep theirs.
        let mut left: Vec<Uuid> = ids.clone();
        for k in 0..2_500usize {
            let i = (k * 7_919) % left.len();
            assert!(p.ack(d, left.remove(i)));
        }
        check(&p);
        assert_eq!(resent(&p, d), left);
        for id in left {
            assert!(p.ack(d, id));
        }
        assert!(!p.has_device(&d));
        assert_eq!(p.by_id.len(), 5_000, "the other devices' requests");
        check(&p);
        // All gone: a table grown by a burst gives its memory back.
        p.expire(later(11));
        assert_eq!(p.by_id.len(), 0);
        assert!(p.slots.capacity() <= KEEP);
    }

    #[test]
    fn a_request_id_sent_again_replaces_the_first() {
        let mut p = Pending::default();
        let d = Uuid::new_v4();
        let mut first = send(&mut p, d, "x", false, later(10));
        let second = send(&mut p, d, "y", false, later(10));
        let (tx, mut rx) = oneshot::channel();
        p.insert(RequestMsg {
            device: d,
            request: first.id,
            command: "z".into(),
            payload: Vec::new(),
            wait_response: false,
            deadline: later(10),
            reply: tx,
        });
        assert!(matches!(
            first.rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(resent(&p, d), vec![second.id, first.id]);
        assert!(p.ack(d, first.id));
        assert!(matches!(rx.try_recv(), Ok(RequestReply::Acked)));
        check(&p);
    }

    /// The free slot marker costs nothing: a slot is the size of its request and links.
    #[test]
    fn a_slot_is_no_larger_than_its_entry() {
        assert_eq!(
            std::mem::size_of::<Option<Entry>>(),
            std::mem::size_of::<Entry>()
        );
    }
}
