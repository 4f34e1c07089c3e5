//! The shard's timer: pings and dead-peer checks spread over the second, request expiry,
//! lingering closes and the drain.

use std::time::{Duration, Instant};

use super::conn::Limit;
use super::owner::Shard;
use crate::protocol::ws::{CloseCode, OP_PING};

/// The shard's timer: each tick looks at 1/PING_SLOTS of the connections (pings, idle
/// checks), so every connection is looked at once a second and a shard's pings go out
/// a fiftieth at a time. Pinging all due connections at once made one burst a second
/// (devices that connected in the same second stay due together): with 200,000 devices
/// that burst was the ack-latency tail (p99 ~200 ms with pings, 2.5 ms without,
/// `scripts/capacity.sh --devices 200000`).
pub(super) const TICK: Duration = Duration::from_millis(20);
const PING_SLOTS: usize = 50;
/// The rest of the housekeeping (request expiry, lingering closes, drain) runs every
/// this many ticks (100 ms).
const HOUSEKEEPING_EVERY: u64 = 5;

/// Seconds from authentication to a connection's first ping: spread over the second half
/// of the interval by the connection's id. Devices that (re)connect together, after a
/// restart or a reconnect storm, would otherwise stay due in the same seconds at every
/// round: a 20 s ramp of 200,000 devices gave 10,000 pings/s for 20 s of each 30, where
/// the fleet's steady rate is 6,700/s. After the first ping, every `interval`.
pub(super) fn first_ping_after(interval: u32, id: u64) -> u32 {
    // splitmix64 of the id: consecutive ids land anywhere in the window.
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let half = interval / 2;
    interval - half + (z % (u64::from(half) + 1)) as u32
}

impl Shard {
    /// Pings, dead-peer detection and request expiry, spread over the shard's connections.
    pub(super) fn tick(&mut self) {
        self.ctx.refresh_clock();
        let now = self.ctx.now_secs();
        let interval = self.ctx.shared.config.ping_interval.max(1) as u32;
        let tick = self.ticks;
        self.ticks = tick + 1;
        // This tick's share of the slab: every PING_SLOTS-th slot. (A connection that
        // fails here is only marked; the loop releases it after the tick.)
        let ctx = &mut self.ctx;
        let share = self
            .slab
            .share((tick % PING_SLOTS as u64) as usize, PING_SLOTS);
        for c in share.filter(|c| c.ping_due(now)) {
            if c.idle_for(now) > interval.saturating_mul(3) {
                c.fail(ctx, CloseCode::GoingAway, "ping timeout");
            } else {
                let limit = Limit::outbound(ctx);
                let _ = c.send_or_close(ctx, OP_PING, b"", limit);
                c.set_next_ping(now + interval);
            }
        }
        // Device-alive events of the last 20 ms (see `publish_lazy`).
        self.ctx.wake_bus();
        if !tick.is_multiple_of(HOUSEKEEPING_EVERY) {
            return;
        }
        let instant = Instant::now();
        self.close_expired_sessions();
        if let Some(r) = &mut self.ctx.account_rates {
            r.sweep(now);
        }
        self.ctx.pending.expire(instant);
        self.ctx.door.sweep();
        // Closes whose peer never sent its FIN within the linger: release them.
        let expired = self.slab.lingered(instant);
        for (slot, id) in expired {
            if self.slab.get(slot).is_some_and(|c| c.id == id) {
                self.release(slot);
            }
        }
        if let Some(plan) = self.drain {
            self.drain_step(instant, plan);
        }
    }

    /// --close-on-token-expiry: close with 4401 the connections whose newest token has
    /// expired (checked every housekeeping tick).
    fn close_expired_sessions(&mut self) {
        let Some(e) = &mut self.ctx.expiries else {
            return;
        };
        let due = e.due(crate::auth::unix_now());
        for (slot, id) in due {
            if let Some(c) = self.slab.get_mut(slot).filter(|c| c.id == id) {
                self.ctx
                    .metrics()
                    .auth_failure(crate::auth::AuthError::Expired);
                c.fail(&mut self.ctx, CloseCode::Unauthorized, "token expired");
            }
        }
    }

    /// Close what the plan says should be gone by now. Devices with a request in flight
    /// are kept to the end of the drain, so it can finish: they go once it has, or at
    /// `until` with the rest.
    fn drain_step(&mut self, now: Instant, plan: DrainPlan) {
        let open = self.routes.len();
        let to_close = open.saturating_sub(plan.may_remain(now));
        if to_close == 0 {
            return;
        }
        let last = now >= plan.until;
        let slots: Vec<u32> = {
            let pending = &self.ctx.pending;
            self.routes
                .iter()
                .filter(|(device, _)| last || !pending.has_device(device))
                .map(|(_, &slot)| slot)
                .take(to_close)
                .collect()
        };
        for slot in slots {
            if let Some(c) = self.slab.get_mut(slot) {
                c.close_reading(&mut self.ctx, CloseCode::GoingAway, "router draining");
            }
        }
    }
}

/// A shard's drain: `initial` connections at `from`, the last closed at `until`.
#[derive(Clone, Copy, Debug)]
pub(super) struct DrainPlan {
    pub(crate) from: Instant,
    pub(crate) until: Instant,
    pub(crate) initial: usize,
}

impl DrainPlan {
    /// How many connections may still be open at `now`: falls evenly from `initial` at
    /// `from` to 0 at `until` (the last one goes at `until`, not early).
    fn may_remain(&self, now: Instant) -> usize {
        let span = self.until.saturating_duration_since(self.from).as_micros();
        let left = self.until.saturating_duration_since(now).as_micros();
        if span == 0 || left == 0 {
            return 0;
        }
        (self.initial as u128 * left).div_ceil(span) as usize
    }
}

#[cfg(test)]
mod tests {
    /// First pings of connections that authenticated together fall anywhere in the second
    /// half of the interval, about evenly; never before it, never after a whole interval.
    #[test]
    fn first_pings_spread_over_the_second_half_of_the_interval() {
        let mut per_second = [0u32; 31];
        for id in 0..30_000u64 {
            let s = super::first_ping_after(30, id);
            assert!((15..=30).contains(&s), "{s}");
            per_second[s as usize] += 1;
        }
        // 16 possible seconds, 1,875 each on average: none empty, none twice the mean.
        for (s, &n) in per_second.iter().enumerate().skip(15) {
            assert!((1_000..3_750).contains(&n), "second {s}: {n}");
        }
        assert_eq!(super::first_ping_after(1, 7), 1);
        assert_eq!(
            super::first_ping_after(2, 7).clamp(1, 2),
            super::first_ping_after(2, 7)
        );
    }

    /// The drain closes evenly over its span: a quarter of the way, a quarter is gone;
    /// the last connection stays until the end (10 over 2 s used to be gone after 1 s).
    #[test]
    fn drain_plan_spreads_closes_to_the_deadline() {
        use std::time::{Duration, Instant};
        let from = Instant::now();
        let plan = super::DrainPlan {
            from,
            until: from + Duration::from_secs(2),
            initial: 10,
        };
        assert_eq!(plan.may_remain(from), 10);
        assert_eq!(plan.may_remain(from + Duration::from_millis(500)), 8);
        assert_eq!(plan.may_remain(from + Duration::from_millis(1000)), 5);
        assert_eq!(plan.may_remain(from + Duration::from_millis(1900)), 1);
        assert_eq!(plan.may_remain(from + Duration::from_millis(1999)), 1);
        assert_eq!(plan.may_remain(from + Duration::from_secs(2)), 0);
        assert_eq!(plan.may_remain(from + Duration::from_secs(3)), 0);
        let none = super::DrainPlan {
            until: from,
            ..plan
        };
        assert_eq!(none.may_remain(from), 0);
    }
}
