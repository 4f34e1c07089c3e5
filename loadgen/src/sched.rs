//! Open-loop scheduling: the i-th event is due at start + i/rate whatever happened
//! before it, so a slow system cannot slow the load down (no coordinated omission):
//! latency is counted from the due time, not from when the request finally left.

use std::time::{Duration, Instant};

/// How early the sender wakes before a due time. Tokio's timer rounds a deadline up to
/// the next millisecond tick, and the runtime's park rounds its wait up to a whole
/// millisecond again (epoll's timeout), so a sleep can end up to 2 ms after its deadline:
/// sleeping until the due time itself would add that much of the load generator's own
/// lateness to the samples. Waking this much earlier and timing an early request from when
/// it really left removes the bias. (With 1 ms, the sender's lateness, the report's `late`
/// row, was 0.57 ms at p90 and 0.8-1.2 ms at p99 on an otherwise idle SCHED_FIFO thread.)
pub const TIMER_SLACK: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    start: Instant,
    interval: Duration,
}

impl OpenLoop {
    pub fn new(start: Instant, rate_per_sec: f64) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate_per_sec.max(1e-9));
        OpenLoop { start, interval }
    }

    /// When the i-th event is due.
    pub fn due(&self, i: u64) -> Instant {
        self.start + self.interval.mul_f64(i as f64)
    }

    /// When to wake up to send the i-th event (see `TIMER_SLACK`).
    pub fn wake(&self, i: u64) -> Instant {
        let due = self.due(i);
        due.checked_sub(TIMER_SLACK).unwrap_or(due).max(self.start)
    }
}

/// Latency of a request due at `due`, actually sent at `sent`, answered at `done`:
/// from the due time when the sender was late (coordinated-omission correction: the
/// wait for the sender counts), from the send when it left early (timer slack).
pub fn latency(due: Instant, sent: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(due.min(sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_evenly_spaced() {
        let t0 = Instant::now();
        let s = OpenLoop::new(t0, 1000.0);
        assert_eq!(s.due(0), t0);
        assert_eq!(s.due(1000) - t0, Duration::from_secs(1));
        assert_eq!(s.due(1) - t0, Duration::from_millis(1));
        assert_eq!(s.due(7) - s.due(6), Duration::from_millis(1));
        // Waking never precedes the start, and is at most TIMER_SLACK early.
        assert_eq!(s.wake(0), t0);
        assert_eq!(s.due(500) - s.wake(500), TIMER_SLACK);
        let slow = OpenLoop::new(t0, 0.5);
        assert_eq!(slow.due(3) - t0, Duration::from_secs(6));
    }

    #[test]
    fn behind_schedule_counts_from_due_time() {
        let t0 = Instant::now();
        let s = OpenLoop::new(t0, 100.0);
        let ms = Duration::from_millis;
        // Request 10 was due at 100 ms; the sender stalled until 300 ms and the answer
        // came at 350 ms: 250 ms, not the 50 ms a closed-loop tool would report.
        assert_eq!(latency(s.due(10), t0 + ms(300), t0 + ms(350)), ms(250));
        // On time: from the due time.
        assert_eq!(latency(s.due(10), s.due(10), t0 + ms(102)), ms(2));
        // Sent 1 ms early (timer slack): from the send, never shorter than real.
        assert_eq!(latency(s.due(10), t0 + ms(99), t0 + ms(102)), ms(3));
        // Answer "before" the due time: zero, not negative.
        assert_eq!(latency(s.due(10), t0, t0), Duration::ZERO);
    }
}
