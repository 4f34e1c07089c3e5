//! The run second by second, for the JSON report's `timeline`: what chaos tests read to
//! judge, say, "after second X every request was acked". Second t covers [t, t+1) from
//! the start of the ramp (the report's `timeline_start_unix_ms`).
//!
//! Requests are counted in the second they were due (when the open-loop clock sent them,
//! as in --request-log), whenever their answer came; the other counts are what happened
//! within the second as the coordinator saw it: devices' counts from the workers'
//! progress lines (every 100 ms), events from the event consumer, the routers' RSS from
//! their /metrics (the latest scrape, see --router-rss-interval).
//!
//! Each second's ack latency comes from a small HDR histogram of its own (1 significant
//! digit: within about 6%, some 2 KB a second that had acks): enough for a chart over
//! time; the report's `latency_ms.ack` is the exact one.

use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
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
    /// Connections ever made (a running count).
    pub ever: u64,
    pub device_errors: u64,
    pub events_sent: u64,
    pub events_received: u64,
    /// The routers' RSS summed over the --api nodes, when sampled.
    pub router_rss: Option<u64>,
}

/// One second of the report's timeline (stable JSON field names).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Second {
    /// Seconds since the start of the ramp.
    pub t: u64,
    /// Devices connected at the end of the second (a gauge).
    pub connected: u64,
    /// Connections made in this second (first connects and reconnects).
    pub connects: u64,
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
    /// Ack latency of the requests due in this second that were acked (ms, within ~6%);
    /// null when none was.
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub ack_max_ms: Option<f64>,
    /// The routers' RSS at the end of the second (sum over the --api nodes); null when
    /// not sampled.
    pub router_rss_bytes: Option<u64>,
}

pub struct Timeline {
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default, Clone)]
struct Requests {
    /// [acked, timeout, offline, errors].
    counts: [u64; 4],
    /// Ack latency, µs; created at the second's first ack.
    acks: Option<Histogram<u32>>,
}

impl Requests {
    fn record_ack(&mut self, us: u64) {
        let h = self.acks.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, 3_600_000_000, 1).expect("static bounds are valid")
        });
        let _ = h.record(us.clamp(1, 3_600_000_000));
    }

    /// (p50, p99, max) in ms, when any request was acked.
    fn percentiles(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        match &self.acks {
            Some(h) if !h.is_empty() => {
                let ms = |us: u64| Some(us as f64 / 1000.0);
                (
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max()),
                )
            }
            _ => (None, None, None),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// By second of due time.
    requests: Vec<Requests>,
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

    /// A request due at `due` ended with `outcome`, after `latency_us` (its ack latency
    /// when acked).
    pub fn request(&self, due: Instant, outcome: Req, latency_us: u64) {
        let t = due.saturating_duration_since(self.start).as_secs() as usize;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.requests.len() <= t {
            g.requests.resize(t + 1, Requests::default());
        }
        let second = &mut g.requests[t];
        second.counts[outcome as usize] += 1;
        if outcome == Req::Acked {
            second.record_ack(latency_us);
        }
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
        let none = Requests::default();
        for (t, s) in g.samples.iter().enumerate() {
            let r = g.requests.get(t).unwrap_or(&none);
            let (p50, p99, max) = r.percentiles();
            out.push(Second {
                t: t as u64,
                connected: s.connected,
                connects: s.ever.saturating_sub(prev.ever),
                acked: r.counts[Req::Acked as usize],
                timeout: r.counts[Req::Timeout as usize],
                offline: r.counts[Req::Offline as usize],
                errors: r.counts[Req::Error as usize],
                device_errors: s.device_errors.saturating_sub(prev.device_errors),
                events_sent: s.events_sent.saturating_sub(prev.events_sent),
                events_received: s.events_received.saturating_sub(prev.events_received),
                ack_p50_ms: p50,
                ack_p99_ms: p99,
                ack_max_ms: max,
                router_rss_bytes: s.router_rss,
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
        tl.request(at(100), Req::Acked, 2_000);
        tl.request(at(900), Req::Acked, 40_000);
        tl.request(at(1500), Req::Timeout, 5_000_000);
        tl.request(at(2999), Req::Error, 10);
        tl.request(at(2000), Req::Offline, 10);
        let tot = |connected, device_errors, events_sent, events_received| Totals {
            connected,
            ever: connected + device_errors,
            device_errors,
            events_sent,
            events_received,
            router_rss: None,
        };
        tl.sample(tot(10, 0, 5, 4));
        tl.sample(tot(8, 2, 12, 10));
        tl.sample(Totals {
            router_rss: Some(7 << 20),
            ..tot(10, 2, 20, 20)
        });
        let s = tl.seconds();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            Second {
                t: 0,
                connected: 10,
                connects: 10,
                acked: 2,
                events_sent: 5,
                events_received: 4,
                ack_p50_ms: s[0].ack_p50_ms,
                ack_p99_ms: s[0].ack_p99_ms,
                ack_max_ms: s[0].ack_max_ms,
                ..Default::default()
            }
        );
        // Two acks, 2 ms and 40 ms: within the per-second histogram's ~6%.
        let near = |got: Option<f64>, want: f64| (got.unwrap() - want).abs() <= want * 0.07;
        assert!(near(s[0].ack_p50_ms, 2.0), "{:?}", s[0]);
        assert!(
            near(s[0].ack_p99_ms, 40.0) && near(s[0].ack_max_ms, 40.0),
            "{:?}",
            s[0]
        );
        // No ack in second 1: no latency, not zero.
        assert_eq!((s[1].ack_p50_ms, s[1].ack_max_ms), (None, None));
        assert_eq!((s[1].connects, s[2].connects), (0, 2));
        assert_eq!(
            (s[1].router_rss_bytes, s[2].router_rss_bytes),
            (None, Some(7 << 20))
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
