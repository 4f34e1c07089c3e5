//! A shard's connection slots: authenticated connections by slot (the poller's key),
//! free slots reused; the closes lingering.

use std::time::Instant;

pub(crate) struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    /// Closing connections and when their linger ends: (slot, conn id, deadline).
    lingering: Vec<(u32, u64, Instant)>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            lingering: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// A slot for a new connection, to [`Slab::fill`] (or [`Slab::give_back`]).
    pub(crate) fn vacant(&mut self) -> u32 {
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub(crate) fn fill(&mut self, slot: u32, v: T) {
        self.slots[slot as usize] = Some(v);
    }

    /// A vacant slot not filled after all.
    pub(crate) fn give_back(&mut self, slot: u32) {
        self.free.push(slot);
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&T> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Empty the slot (free for reuse); None: it was empty (already released).
    pub(crate) fn take(&mut self, slot: u32) -> Option<T> {
        let v = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        Some(v)
    }

    /// Every `step`-th slot's occupant from slot `first`: a timer tick's share.
    pub(crate) fn share(&mut self, first: usize, step: usize) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().skip(first).step_by(step).flatten()
    }

    /// The connection `id` in `slot` started closing: release it at `until` if its peer
    /// has not finished the close by then.
    pub(crate) fn linger(&mut self, slot: u32, id: u64, until: Instant) {
        self.lingering.push((slot, id, until));
    }

    /// The lingering closes due at `now`: (slot, conn id), forgotten here.
    pub(crate) fn lingered(&mut self, now: Instant) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        self.lingering.retain(|&(slot, id, until)| {
            if until <= now {
                out.push((slot, id));
                false
            } else {
                true
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Slab;

    #[test]
    fn slots_are_reused_once_released() {
        let mut s = Slab::default();
        let (a, b) = (s.vacant(), s.vacant());
        assert_eq!((a, b), (0, 1));
        s.fill(a, "a");
        s.fill(b, "b");
        assert_eq!(s.get(a), Some(&"a"));
        assert_eq!(s.get(7), None);
        // Released only if it still holds that connection.
        assert_eq!(s.take(a), Some("a"));
        assert_eq!(s.take(a), None, "released twice");
        assert_eq!(s.get(a), None);
        assert_eq!(s.vacant(), a);
        // A slot not filled after all.
        let c = s.vacant();
        assert_eq!(c, 2);
        s.give_back(c);
        assert_eq!(s.vacant(), c);
    }

    #[test]
    fn a_tick_sees_its_share_of_the_occupied_slots() {
        let mut s = Slab::default();
        for i in 0..10u32 {
            let slot = s.vacant();
            s.fill(slot, i);
        }
        assert_eq!(s.take(4), Some(4));
        assert_eq!(s.share(1, 3).map(|v| *v).collect::<Vec<_>>(), [1, 7]);
        assert_eq!(s.share(0, 5).map(|v| *v).collect::<Vec<_>>(), [0, 5]);
        assert_eq!(s.share(0, 1).count(), 9);
    }

    #[test]
    fn lingering_closes() {
        let mut s: Slab<()> = Slab::default();
        let now = Instant::now();
        s.linger(1, 10, now + Duration::from_secs(2));
        s.linger(2, 11, now + Duration::from_secs(1));
        assert!(s.lingered(now).is_empty());
        assert_eq!(s.lingered(now + Duration::from_secs(1)), [(2, 11)]);
        assert_eq!(s.lingered(now + Duration::from_secs(5)), [(1, 10)]);
        assert!(s.lingered(now + Duration::from_secs(9)).is_empty());
    }
}
