//! Shards: one OS thread and one single-threaded runtime each. A shard owns its
//! connections, its route table `device -> connection` and its pending requests.
//! It never blocks and never takes a lock on the message path: other threads reach
//! it only through its bounded crossbeam inbox.

pub(crate) mod admission;
mod batch;
mod conn;
mod door;
mod expiry;
mod handle;
mod msg;
mod owner;
mod pending;
mod poller;
mod slab;
mod thread;
mod timer;

pub(crate) use door::Door;
pub use handle::ShardHandle;
pub(crate) use msg::RequestReply;
pub use msg::{Adopt, Delivery, DeviceInfo, RequestMsg, ShardMsg};
pub(crate) use thread::run_shard;

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use uuid::Uuid;

use crate::bus::RoutingKey;
use crate::metrics::ShardMetrics;
use crate::protocol::json::Scratch;
use crate::Shared;
use batch::{Batch, HandedOver, Queued};
use conn::{Conn, Limit, SendOutcome};
use pending::Pending;

/// One read buffer per shard, shared by all its connections: an idle connection
/// holds none. Big enough for a max-size message plus headers in one read.
const READ_BUF: usize = 64 * 1024;
/// Whole seconds of the coarse monotonic clock: per-frame timekeeping (last seen, rate
/// limits) needs seconds, and the coarse clock is a plain read where the precise one
/// costs a TSC read and arithmetic on every frame (6% of a shard under an event flood).
fn coarse_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC_COARSE exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64
}

/// Which device protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// Hive native JSON on `/ws`.
    Hive,
    /// Phoenix channels on `/socket/websocket`.
    Phoenix(crate::protocol::phoenix::Vsn),
    /// Hivekit-style compact actions on `/v1/ws`.
    Hivekit,
    /// `/conformance/echo` (--websocket-conformance-echo): every text and binary message
    /// sent back as it came, nothing else (not routed, no events, no device-alive).
    ConformanceEcho,
}

impl Protocol {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Protocol::Hive => "hive",
            Protocol::Phoenix(_) => "phoenix",
            Protocol::Hivekit => "hivekit",
            Protocol::ConformanceEcho => "conformance-echo",
        }
    }
}

/// Stable device -> shard mapping (the same in every process, so a bridge can fan out).
pub fn shard_of(device: &Uuid, shards: usize) -> usize {
    let (hi, lo) = device.as_u64_pair();
    let h = (hi ^ lo.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) % shards as u64) as usize
}

/// What a connection's methods see of their shard: the buffers it lends them, its
/// pending requests, its clock, the bus batch, and where they mark themselves to be
/// settled. Part of the [`owner::Shard`] its loop owns; the connections themselves are
/// not reachable from here.
pub(crate) struct ShardCtx {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    /// What the shard's handshake tasks share with it (admission, the hand-back queue).
    door: Rc<Door>,
    pending: Pending,
    read_buf: Vec<u8>,
    /// Decrypted bytes of TLS connections (allocated on first use).
    plain_buf: Vec<u8>,
    pub(crate) scratch: Scratch,
    /// `coarse_secs()` when the shard started.
    started: u64,
    /// `now_secs()` as of the start of this pass of the loop or tick (two reads of the
    /// clock per frame were 1.3% of a shard under an event flood).
    clock: u32,
    /// Connections changed outside a readiness event, for the loop to settle at the end
    /// of its pass.
    dirty: Vec<u32>,
    /// Events published in this pass and the bus's backpressure on reading.
    batch: Batch,
    /// With --close-on-token-expiry: when each token-authenticated connection's token ends.
    expiries: Option<expiry::Expiries>,
    /// With --account-max-rate: this shard's token bucket per account.
    account_rates: Option<crate::tenants::AccountRates>,
}

impl ShardCtx {
    pub(crate) fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.id]
    }

    /// Coarse shard clock in seconds, for per-connection timestamps that fit in a u32:
    /// read once per pass of the loop and per tick (every 20 ms), so it lags by at most a pass.
    fn now_secs(&self) -> u32 {
        self.clock
    }

    /// Read the clock for [`ShardCtx::now_secs`].
    pub(super) fn refresh_clock(&mut self) {
        self.clock = coarse_secs().saturating_sub(self.started) as u32;
    }

    pub(crate) fn publish(&mut self, routing_key: RoutingKey, body: Vec<u8>) {
        self.publish_at(routing_key, body, true);
    }

    /// A device-alive event: it rides with the next urgent event or the next tick
    /// (at most 20 ms later). Pongs come one at a time, spread over the second; handing
    /// each one's event to the bus at once woke the bus thread thousands of times a
    /// second at 200,000 devices, and those wakeups were a large part of the ack tail.
    fn publish_lazy(&mut self, routing_key: RoutingKey, body: Vec<u8>) {
        self.publish_at(routing_key, body, false);
    }

    fn publish_at(&mut self, routing_key: RoutingKey, body: Vec<u8>, urgent: bool) {
        let queued = self.batch.push(&self.shared.bus, routing_key, body, urgent);
        match queued {
            Queued::Dropped => {
                self.metrics().events_dropped_bus_full.fetch_add(1, Relaxed);
            }
            // Handed over at the end of the loop's pass if urgent (see
            // `wake_bus_if_urgent`), else with the next tick.
            Queued::Batched => {}
            Queued::Full => self.wake_bus(),
        }
    }

    /// End of a pass of the loop: hand the batch over if something in it is urgent.
    fn wake_bus_if_urgent(&mut self) {
        if self.batch.is_urgent() {
            self.wake_bus();
        }
    }

    /// Hand this pass's events to the bus in one batch and wake its consumer.
    fn wake_bus(&mut self) {
        let handed = self.batch.hand_over(&self.shared.bus);
        let m = self.metrics();
        match handed {
            HandedOver::Nothing => {}
            HandedOver::Sent(n) => {
                m.events_published.fetch_add(n, Relaxed);
            }
            HandedOver::Dropped(n) => {
                m.events_dropped_bus_full.fetch_add(n, Relaxed);
            }
        }
    }

    /// Before reading a device: false (and the shard pauses reading) while the bus queue
    /// is nearly full. Level-triggered readiness brings the unread sockets back later.
    fn may_read(&mut self) -> bool {
        match self.batch.may_read(&self.shared.bus) {
            Ok(()) => true,
            Err(first) => {
                if first {
                    self.metrics().bus_backpressure.fetch_add(1, Relaxed);
                }
                false
            }
        }
    }

    fn throttled(&self) -> bool {
        self.batch.is_throttled()
    }

    /// A connection stopped mid-buffer for backpressure; resume it when relieved.
    pub(crate) fn hold(&mut self, slot: u32) {
        self.batch.hold(slot);
    }

    /// While throttled: ask the bus to drain (hand it this pass's events and wake its
    /// consumer).
    fn press_bus(&mut self) {
        self.wake_bus();
        self.shared.bus.wake();
    }

    /// A connection changed outside a readiness event: settle it at the end of this
    /// pass of the loop.
    pub(crate) fn mark(&mut self, slot: u32) {
        self.dirty.push(slot);
    }

    /// The slots marked since last asked.
    fn take_dirty(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dirty)
    }

    /// Requests sent to an earlier connection of this device and not yet acked are
    /// sent again, in the order first sent: a request outlives a reconnect within its
    /// deadline.
    fn resend_pending(&mut self, conn: &mut Conn) {
        let limit = Limit::requests(self);
        // Encoded first (the table is borrowed while sending needs the context), up to
        // the first frame past the limit: that one closes the connection as it would
        // have one frame at a time.
        let ctx: &ShardCtx = self;
        let mut bytes = 0;
        let frames: Vec<Vec<u8>> = ctx
            .pending
            .unacked(conn.meta.device)
            .filter_map(|(id, command, payload)| conn.encode_request(ctx, id, command, payload))
            .take_while(|f| {
                let within = limit.admits(0, bytes);
                bytes += f.len();
                within
            })
            .collect();
        for frame in frames {
            if conn.send_or_close(self, conn.data_op(), &frame, limit) == SendOutcome::Dropped {
                break;
            }
        }
    }

    /// A stock device's follow-up (NervesHub `rebooting` after `reboot`) acks the
    /// oldest pending, not yet acked request of that command.
    fn ack_command(&mut self, device: Uuid, command: &str) {
        self.pending.ack_command(device, command);
    }

    fn on_ack(&mut self, device: Uuid, request: Uuid) {
        if !self.pending.ack(device, request) {
            self.metrics().acks_unmatched.fetch_add(1, Relaxed);
        }
    }

    fn on_response(&mut self, device: Uuid, request: Uuid, ok: bool, result: Option<Vec<u8>>) {
        if !self.pending.respond(device, request, ok, result) {
            self.metrics().acks_unmatched.fetch_add(1, Relaxed);
        }
    }
}
