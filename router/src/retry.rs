//! Delays between attempts: every reconnect and retry loop (the AMQP connections,
//! backend POSTs, cluster links) waits by the same schedule, an exponential backoff with
//! jitter.

use std::time::Duration;

/// Retry delays: `base` doubling per failed attempt, capped at `cap`, each jittered
/// into [d/2, d] so a fleet of routers does not retry in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// The AMQP connections (events publisher, cluster): 100 ms doubling to 5 s.
    pub(crate) const RECONNECT: Backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

    pub(crate) const fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// Failed attempts since the last success.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt; counts one more failed attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Succeeded: the next failure starts over at `base`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before retry `attempt` (0-based).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(16));
        let d = exp.min(self.cap).as_millis() as u64;
        let half = d / 2;
        Duration::from_millis(half + crate::random_u64() % (half + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jitters_caps_and_resets() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        let mut b = Backoff::new(base, cap);
        for attempt in 0..40 {
            assert_eq!(b.attempt(), attempt);
            let d = b.next_delay();
            let full = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(b.next_delay() >= cap / 2);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert!(b.next_delay() <= base);
        assert!(Backoff::RECONNECT.delay(0) >= Duration::from_millis(50));
        assert!(Backoff::RECONNECT.delay(30) <= Duration::from_secs(5));
    }
}
