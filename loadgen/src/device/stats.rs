//! What a worker's devices count: connects, acks, events and errors, in per-worker
//! histograms and counters.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::hist;
use crate::signal::storm_hits;

/// Per-worker counters and histograms (single thread: plain RefCell).
pub struct Stats {
    pub connect: Histogram<u64>,
    pub auth: Histogram<u64>,
    pub connected: usize,
    pub connecting: usize,
    pub ever_connected: usize,
    pub reconnects: u64,
    pub errors: BTreeMap<String, u64>,
    pub events_sent: u64,
    pub storm_drops: u64,
    /// The last storm this worker was told of (`Control::storm`), and how many devices
    /// all its storms so far were to drop: the connected ones `storm_hits` picked.
    pub storm_gen: u64,
    pub storm_expected: u64,
    /// Which devices are connected, by slot (for `storm_expected`).
    pub up: Vec<bool>,
    pub requests_received: u64,
    /// Unix µs of this worker's first connect attempt (0: none yet).
    pub first_attempt_us: u64,
    /// Unix µs when `connected` first reached `target` (0: not yet).
    pub full_us: u64,
    /// This worker's share of the fleet.
    pub target: usize,
    /// Each device's last event seq, by its slot in this worker (`DeviceSpec::slot`). A
    /// device numbers its events 1, 2, 3, ... across all its connections; a seq counts
    /// as sent once its frame was handed to the socket whole.
    pub seqs: Vec<u64>,
    /// (slot, first seq, last seq) of every connection that broke (reset, end of stream
    /// without a close frame, an error, a storm drop) after sending events on it: its
    /// last events may have died with it. Connections that ended with a close frame, or
    /// by loadgen's own stop, are not kept.
    pub broken: Vec<(u32, u64, u64)>,
}

impl Stats {
    /// Counters for a worker holding `target` devices.
    pub fn new(target: usize) -> Self {
        Stats {
            connect: hist::new_hist(),
            auth: hist::new_hist(),
            connected: 0,
            connecting: 0,
            ever_connected: 0,
            reconnects: 0,
            errors: BTreeMap::new(),
            events_sent: 0,
            storm_drops: 0,
            storm_gen: 0,
            storm_expected: 0,
            up: vec![false; target],
            requests_received: 0,
            first_attempt_us: 0,
            full_us: 0,
            target,
            seqs: vec![0; target],
            broken: Vec::new(),
        }
    }
    pub(super) fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    /// Storm number `generation` of `fraction`: count the connected devices it drops.
    pub fn storm(&mut self, generation: u64, fraction: f64) {
        let hit = (0..self.up.len())
            .filter(|&slot| self.up[slot] && storm_hits(slot as u32, generation, fraction))
            .count();
        self.storm_gen = generation;
        self.storm_expected += hit as u64;
    }
}
