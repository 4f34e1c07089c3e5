//! The run second by second, for the JSON report's `timeline`: what chaos tests read to
//! judge, say, "after second X every request was acked". Second t covers [t, t+1) from
//! the start of the ramp (the report's `timeline_start_unix_ms`).
//!
//! Requests are counted in the second they were due (when the open-loop clock sent them,
//! as in --request-log), whenever their answer came; the other counts are what happened
//! within the second as the coordinator saw it: devices' counts from the workers'
//! progress lines (every 100 ms), events from the event consumer.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// A request's outcome, as the timeline counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    Acked,
    Timeout,
    Offline,
    /// Any other HTTP answer, or none (`requests.errors` of the report).
    Error,
}

/// The fleet's running totals, sampled at the end of each second.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub connected: u64,
    pub device_errors: u64,
    pub events_sent: u64,
    pub events_received: u64,
}

/// One second of the report's timeline (stable JSON field names).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Second {
    /// Seconds since the start of the ramp.
    pub t: u64,
    /// Devices connected at the end of the second (a gauge).
    pub connected: u64,
    /// Requests due in this second, by outcome.
    pub acked: u64,
    pub timeout: u64,
    pub offline: u64,
    /// http_error + transport_error.
    pub errors: u64,
    /// Device connection errors (failed connects, lost connections) in this second.
    pub device_errors: u64,
    pub events_sent: u64,
    pub events_received: u64,
}

pub struct Timeline {
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By second of due time: [acked, timeout, offline, errors].
    requests: Vec<[u64; 4]>,
    /// The totals at the end of second 0, 1, 2, ...
    samples: Vec<Totals>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A request due at `due` ended with `outcome`.
    pub fn request(&self, due: Instant, outcome: Req) {
        let t = due.saturating_duration_since(self.start).as_secs() as usize;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.requests.len() <= t {
            g.requests.resize(t + 1, [0; 4]);
        }
        g.requests[t][outcome as usize] += 1;
    }

    /// The totals at the end of the next second (the coordinator calls this once a
    /// second, and once more at the end for the last, partial, second).
    pub fn sample(&self, totals: Totals) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.samples.push(totals);
    }

    /// Every second sampled, with the counts within it.
    pub fn seconds(&self) -> Vec<Second> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut prev = Totals::default();
        let mut out = Vec::with_capacity(g.samples.len());
        for (t, s) in g.samples.iter().enumerate() {
            let r = g.requests.get(t).copied().unwrap_or([0; 4]);
            out.push(Second {
                t: t as u64,
                connected: s.connected,
                acked: r[Req::Acked as usize],
                timeout: r[Req::Timeout as usize],
                offline: r[Req::Offline as usize],
                errors: r[Req::Error as usize],
                device_errors: s.device_errors.saturating_sub(prev.device_errors),
                events_sent: s.events_sent.saturating_sub(prev.events_sent),
                events_received: s.events_received.saturating_sub(prev.events_received),
            });
            prev = *s;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_per_second() {
        let start = Instant::now();
        let tl = Timeline::new(start);
        let at = |ms| start + Duration::from_millis(ms);
        tl.request(at(100), Req::Acked);
        tl.request(at(900), Req::Acked);
        tl.request(at(1500), Req::Timeout);
        tl.request(at(2999), Req::Error);
        tl.request(at(2000), Req::Offline);
        let tot = |connected, device_errors, events_sent, events_received| Totals {
            connected,
            device_errors,
            events_sent,
            events_received,
        };
        tl.sample(tot(10, 0, 5, 4));
        tl.sample(tot(8, 2, 12, 10));
        tl.sample(tot(10, 2, 20, 20));
        let s = tl.seconds();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            Second {
                t: 0,
                connected: 10,
                acked: 2,
                events_sent: 5,
                events_received: 4,
                ..Default::default()
            }
        );
        assert_eq!(
            (s[1].t, s[1].connected, s[1].timeout, s[1].device_errors),
            (1, 8, 1, 2)
        );
        assert_eq!((s[1].events_sent, s[1].events_received), (7, 6));
        assert_eq!((s[2].offline, s[2].errors, s[2].device_errors), (1, 1, 0));
        assert_eq!((s[2].events_sent, s[2].events_received), (8, 10));
    }
}
