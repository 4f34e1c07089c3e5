//! Per-device event sequence accounting. Every simulated device numbers its events
//! `seq` = 1, 2, 3, ... (continuing across its reconnects); the hive.events consumer
//! records here which seqs arrived, and at the end of the run the devices' own record
//! (each device's last seq, and the seqs sent on each connection that broke) turns that
//! into losses.
//!
//! Memory (the consumer runs in the coordinator, for up to a million devices): 8 bytes
//! per device, a `Window` (the highest seq received and a 32-bit map of the 32 seqs up
//! to it). A seq that leaves a device's window unreceived becomes a hole: one entry per
//! run of consecutive missing seqs in a map shared by all devices (12 bytes of key and
//! value plus the map's node overhead, about 20 bytes). A device that lost nothing, or
//! whose events arrive less than 32 apart out of order, has no hole. Seqs are kept as
//! u32: four billion events per device.

use std::collections::BTreeMap;

/// Seqs per device remembered as a bitmap below the highest one received.
const WINDOW: u32 = 32;

/// One device's recent seqs: bit k of `bits` is set when seq `high - k` was received.
/// `high` = 0: nothing received yet.
#[derive(Clone, Copy, Default)]
struct Window {
    high: u32,
    bits: u32,
}

/// How one delivery was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Above every seq received so far from the device.
    New,
    /// Below the device's highest seq, and its first arrival.
    Reordered,
    /// A seq received before.
    Duplicate,
    /// A seq received before, arriving again marked redelivered by RabbitMQ: the consumer
    /// had it but its ack was lost with the consumer's connection. Not the router's
    /// doing, so not a duplicate.
    Redelivered,
}

/// The seqs the consumer has seen, for every device of the run.
pub struct SeqCounter {
    windows: Vec<Window>,
    /// (device, first seq) -> last seq: runs of seqs below their device's window that
    /// have not arrived (yet; a late arrival is taken out of its run).
    holes: BTreeMap<(u32, u32), u32>,
    pub unique: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub redelivered: u64,
}

/// What the devices' record says was lost, beside what the consumer counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Losses {
    /// Seqs sent and never received, outside `in_broken_connections`.
    pub lost: u64,
    /// Seqs never received that were the trailing ones of a connection that broke: sent
    /// on it, and no seq sent later on the same connection was received.
    pub in_broken_connections: u64,
}

impl SeqCounter {
    /// Devices are 0..devices (`cli::device_index`).
    pub fn new(devices: usize) -> Self {
        SeqCounter {
            windows: vec![Window::default(); devices],
            holes: BTreeMap::new(),
            unique: 0,
            duplicated: 0,
            reordered: 0,
            redelivered: 0,
        }
    }

    /// Count one delivery of `seq` from `device`; None when it is none of this run's
    /// (device out of range, seq 0 or beyond u32).
    pub fn record(&mut self, device: usize, seq: u64, redelivered: bool) -> Option<Seen> {
        let seq = u32::try_from(seq).ok().filter(|s| *s > 0)?;
        let w = *self.windows.get(device)?;
        let d = device as u32;
        let seen = if seq > w.high {
            // The window moves up: what leaves it unreceived becomes holes, in ascending
            // order (window positions from the oldest, then the seqs it jumps over).
            let shift = seq - w.high;
            for k in (WINDOW.saturating_sub(shift)..WINDOW).rev() {
                if w.high > k && w.bits & (1 << k) == 0 {
                    self.add_hole(d, w.high - k, w.high - k);
                }
            }
            if shift > WINDOW {
                self.add_hole(d, w.high + 1, seq - WINDOW);
            }
            let bits = if shift >= WINDOW { 0 } else { w.bits << shift };
            self.windows[device] = Window {
                high: seq,
                bits: bits | 1,
            };
            Seen::New
        } else {
            let back = w.high - seq;
            let first_time = if back < WINDOW {
                let fresh = w.bits & (1 << back) == 0;
                self.windows[device].bits |= 1 << back;
                fresh
            } else {
                self.take_hole(d, seq)
            };
            match (first_time, redelivered) {
                (true, _) => Seen::Reordered,
                (false, true) => Seen::Redelivered,
                (false, false) => Seen::Duplicate,
            }
        };
        match seen {
            Seen::New => self.unique += 1,
            Seen::Reordered => {
                self.unique += 1;
                self.reordered += 1;
            }
            Seen::Duplicate => self.duplicated += 1,
            Seen::Redelivered => self.redelivered += 1,
        }
        Some(seen)
    }

    /// The highest seq received from a device (0: none).
    pub fn highest(&self, device: usize) -> u64 {
        self.windows.get(device).map_or(0, |w| u64::from(w.high))
    }

    /// Mark `first..=last` missing; joins the device's run just below when adjacent.
    fn add_hole(&mut self, d: u32, first: u32, last: u32) {
        if let Some((&(pd, _), end)) = self.holes.range_mut(..(d, first)).next_back() {
            if pd == d && end.checked_add(1) == Some(first) {
                *end = last;
                return;
            }
        }
        self.holes.insert((d, first), last);
    }

    /// The run of missing seqs holding `seq`, if any.
    fn hole_at(&self, d: u32, seq: u32) -> Option<(u32, u32)> {
        let (&(pd, first), &last) = self.holes.range(..=(d, seq)).next_back()?;
        (pd == d && last >= seq).then_some((first, last))
    }

    /// `seq` arrived late: out of its run of missing seqs. False if it was in none (it
    /// was received before).
    fn take_hole(&mut self, d: u32, seq: u32) -> bool {
        let Some((first, last)) = self.hole_at(d, seq) else {
            return false;
        };
        self.holes.remove(&(d, first));
        if first < seq {
            self.holes.insert((d, first), seq - 1);
        }
        if seq < last {
            self.holes.insert((d, seq + 1), last);
        }
        true
    }

    fn received(&self, device: usize, seq: u32) -> bool {
        let Some(w) = self.windows.get(device) else {
            return false;
        };
        if seq == 0 || seq > w.high {
            false
        } else if w.high - seq < WINDOW {
            w.bits & (1 << (w.high - seq)) != 0
        } else {
            self.hole_at(device as u32, seq).is_none()
        }
    }

    /// Losses against the devices' record: `last[i]` is device i's last seq sent, and
    /// `broken` holds (device, first seq, last seq) of every connection that broke after
    /// sending events (connections never share a seq).
    pub fn losses(&self, last: &[u64], broken: &[(usize, u64, u64)]) -> Losses {
        let last_of = |d: usize| {
            last.get(d)
                .map_or(0, |&l| l.min(u64::from(u32::MAX)) as u32)
        };
        let mut missing = 0u64;
        for (d, w) in self.windows.iter().enumerate() {
            let l = last_of(d);
            // Sent but above anything received.
            missing += u64::from(l.saturating_sub(w.high));
            // Missing within the window: positions k (seq high - k) from high - last (seqs
            // above `last` were never sent) up to the window's end or seq 1.
            let (lo, hi) = (w.high.saturating_sub(l), WINDOW.min(w.high));
            if lo < hi {
                let span = ((1u64 << hi) - 1) & !((1u64 << lo) - 1);
                missing += u64::from((span & !u64::from(w.bits)).count_ones());
            }
        }
        for (&(d, first), &end) in &self.holes {
            let l = last_of(d as usize);
            if first <= l {
                missing += u64::from(end.min(l) - first + 1);
            }
        }
        let mut trailing = 0u64;
        for &(d, first, end) in broken {
            let end = end.min(u64::from(last_of(d)));
            let mut s = end;
            while s >= first.max(1) && !self.received(d, s as u32) {
                trailing += 1;
                s -= 1;
            }
        }
        Losses {
            lost: missing.saturating_sub(trailing),
            in_broken_connections: trailing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn feed(c: &mut SeqCounter, device: usize, seqs: impl IntoIterator<Item = u64>) -> Vec<Seen> {
        seqs.into_iter()
            .map(|s| c.record(device, s, false).unwrap())
            .collect()
    }

    #[test]
    fn a_device_costs_8_bytes() {
        assert_eq!(std::mem::size_of::<Window>(), 8);
    }

    #[test]
    fn in_order_is_all_new_and_nothing_lost() {
        let mut c = SeqCounter::new(2);
        assert!(feed(&mut c, 1, 1..=100).iter().all(|s| *s == Seen::New));
        assert_eq!((c.unique, c.duplicated, c.reordered), (100, 0, 0));
        assert_eq!(c.losses(&[0, 100], &[]), Losses::default());
        assert!(c.holes.is_empty());
    }

    #[test]
    fn a_gap_is_a_loss() {
        let mut c = SeqCounter::new(1);
        feed(&mut c, 0, [1, 2, 4, 5]);
        assert_eq!(
            c.losses(&[5], &[]),
            Losses {
                lost: 1,
                in_broken_connections: 0
            }
        );
        // The tail of a connection that ended cleanly, never received: lost too.
        assert_eq!(c.losses(&[7], &[]).lost, 3);
        // Only seqs up to the device's last one count (seq 3 is missing below it).
        assert_eq!(c.losses(&[4], &[]).lost, 1);
        assert_eq!(c.losses(&[2], &[]).lost, 0);
    }

    #[test]
    fn a_seq_seen_twice_is_a_duplicate() {
        let mut c = SeqCounter::new(1);
        assert_eq!(
            feed(&mut c, 0, [1, 2, 2, 3]),
            [Seen::New, Seen::New, Seen::Duplicate, Seen::New]
        );
        assert_eq!((c.unique, c.duplicated, c.reordered), (3, 1, 0));
        assert_eq!(c.losses(&[3], &[]), Losses::default());
    }

    #[test]
    fn late_arrivals_are_reordered_not_lost() {
        let mut c = SeqCounter::new(1);
        assert_eq!(
            feed(&mut c, 0, [1, 3, 2, 2]),
            [Seen::New, Seen::New, Seen::Reordered, Seen::Duplicate]
        );
        assert_eq!((c.unique, c.duplicated, c.reordered), (3, 1, 1));
        // Far below the window: from the holes.
        feed(&mut c, 0, [200]);
        assert_eq!(c.losses(&[200], &[]).lost, 196);
        assert_eq!(feed(&mut c, 0, [50]), [Seen::Reordered]);
        assert_eq!(feed(&mut c, 0, [50]), [Seen::Duplicate]);
        assert_eq!(feed(&mut c, 0, [4, 167, 168]), [Seen::Reordered; 3]);
        assert_eq!(c.losses(&[200], &[]).lost, 192);
        assert_eq!((c.unique, c.duplicated, c.reordered), (8, 2, 5));
    }

    #[test]
    fn trailing_seqs_of_a_broken_connection_are_counted_apart() {
        let mut c = SeqCounter::new(3);
        // Device 0: 1..=10 on a connection that broke, 11..=15 on the next one.
        feed(&mut c, 0, (1..=6).chain(11..=15));
        // Device 1: 1..=10 broke; 6 missing with 7 and 8 received after it (a loss),
        // 9 and 10 its trailing seqs.
        feed(&mut c, 1, (1..=5).chain([7, 8]));
        // Device 2: 1..=4 broke with nothing through, 5..=8 on a clean connection lost 8.
        feed(&mut c, 2, 5..=7);
        let broken = [(0, 1, 10), (1, 1, 10), (2, 1, 4)];
        assert_eq!(
            c.losses(&[15, 10, 8], &broken),
            Losses {
                lost: 2,
                in_broken_connections: 4 + 2 + 4
            }
        );
        // Without the broken connections, all of it is plain loss.
        assert_eq!(c.losses(&[15, 10, 8], &[]).lost, 12);
    }

    #[test]
    fn redeliveries_of_counted_seqs_are_not_duplicates() {
        let mut c = SeqCounter::new(1);
        feed(&mut c, 0, [1, 2]);
        assert_eq!(c.record(0, 2, true), Some(Seen::Redelivered));
        assert_eq!(c.record(0, 3, true), Some(Seen::New));
        assert_eq!((c.unique, c.duplicated, c.redelivered), (3, 0, 1));
        assert_eq!(c.record(1, 1, false), None);
        assert_eq!(c.record(0, 0, false), None);
        assert_eq!(c.record(0, u64::from(u32::MAX) + 1, false), None);
    }

    #[test]
    fn matches_a_plain_set_on_shuffled_duplicated_streams() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..200 {
            let sent: u64 = rng.gen_range(1..400);
            let mut stream: Vec<u64> = (1..=sent).filter(|_| rng.gen_bool(0.9)).collect();
            for _ in 0..rng.gen_range(0..20) {
                if let Some(&s) = stream.get(rng.gen_range(0..stream.len().max(1))) {
                    stream.push(s);
                }
            }
            // Local shuffles of various reach, some far beyond the window.
            let reach = [2, 10, 40, 500][round % 4];
            for i in 0..stream.len() {
                let j = (i + rng.gen_range(0..reach)).min(stream.len() - 1);
                if rng.gen_bool(0.1) {
                    stream.swap(i, j);
                }
            }
            if round % 10 == 0 {
                stream.shuffle(&mut rng);
            }
            let mut c = SeqCounter::new(1);
            let (mut seen, mut high) = (std::collections::HashSet::new(), 0);
            let (mut dup, mut reo) = (0, 0);
            for &s in &stream {
                let got = c.record(0, s, false).unwrap();
                let want = if !seen.insert(s) {
                    dup += 1;
                    Seen::Duplicate
                } else if s < high {
                    reo += 1;
                    Seen::Reordered
                } else {
                    Seen::New
                };
                high = high.max(s);
                assert_eq!(got, want, "round {round} seq {s}");
            }
            assert_eq!(
                (c.unique, c.duplicated, c.reordered),
                (seen.len() as u64, dup, reo)
            );
            assert_eq!(c.losses(&[sent], &[]).lost, sent - seen.len() as u64);
            for s in 1..=sent {
                assert_eq!(
                    c.received(0, s as u32),
                    seen.contains(&s),
                    "round {round} seq {s}"
                );
            }
        }
    }
}
