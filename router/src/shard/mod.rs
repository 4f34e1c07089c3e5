//! Shards: one OS thread and one single-threaded runtime each. A shard owns its
//! connections, its route table `device -> connection` and its pending requests.
//! It never blocks and never takes a lock on the message path: other threads reach
//! it only through its bounded crossbeam inbox.

mod admission;
mod batch;
pub mod conn;
mod door;
mod handle;
mod msg;
mod pending;
pub mod poller;
mod slab;
mod thread;
mod timer;

pub use admission::Refusal;
pub(crate) use door::Door;
pub use handle::ShardHandle;
pub use msg::{Adopt, Delivery, DeviceInfo, RequestMsg, RequestReply, ShardMsg};
pub(crate) use thread::run_shard;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::bus::RoutingKey;
use crate::metrics::ShardMetrics;
use crate::protocol::json::Scratch;
use crate::protocol::ws::CloseCode;
use crate::Shared;
use batch::{Batch, HandedOver, Queued};
use conn::{Conn, Limit, SendOutcome};
use pending::Pending;
use poller::Poller;
use slab::Slab;

/// One read buffer per shard, shared by all its connections: an idle connection
/// holds none. Big enough for a max-size message plus headers in one read.
pub const READ_BUF: usize = 64 * 1024;
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
pub enum Protocol {
    /// Hive native JSON on `/ws`.
    Hive,
    /// Phoenix channels on `/socket/websocket`.
    Phoenix(crate::protocol::phoenix::Vsn),
    /// Hivekit-style compact actions on `/v1/ws`.
    Hivekit,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Hive => "hive",
            Protocol::Phoenix(_) => "phoenix",
            Protocol::Hivekit => "hivekit",
        }
    }
}

/// Stable device -> shard mapping (the same in every process, so a bridge can fan out).
pub fn shard_of(device: &Uuid, shards: usize) -> usize {
    let (hi, lo) = device.as_u64_pair();
    let h = (hi ^ lo.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) % shards as u64) as usize
}

/// Everything one shard owns: its connections, their routes and its pending requests.
/// Owned by the shard's loop (`thread.rs`) alone; the connections' methods borrow it
/// while the loop runs them.
pub struct ShardCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// What the shard's handshake tasks share with it (admission, the hand-back queue).
    door: Rc<Door>,
    pub routes: RefCell<HashMap<Uuid, Rc<Conn>>>,
    pending: RefCell<Pending>,
    pub read_buf: RefCell<Vec<u8>>,
    /// Decrypted bytes of TLS connections (allocated on first use).
    pub plain_buf: RefCell<Vec<u8>>,
    pub scratch: RefCell<Scratch>,
    next_conn_id: Cell<u64>,
    /// Ticks so far: which ping slot this tick serves.
    ticks: Cell<u64>,
    /// `coarse_secs()` when the shard started.
    started: u64,
    /// `now_secs()` as of the start of this driver pass or tick (two reads of the
    /// clock per frame were 1.3% of a shard under an event flood).
    clock: Cell<u32>,
    /// Set on drain: connections are closed gradually until its `until`.
    drain: Cell<Option<timer::DrainPlan>>,
    /// Readiness of every authenticated connection (one epoll per shard).
    poller: Poller,
    /// Authenticated connections by slot (the poller's key), those to settle next
    /// and those closing.
    slab: RefCell<Slab<Rc<Conn>>>,
    /// Events published in this pass and the bus's backpressure on reading.
    batch: RefCell<Batch>,
}

impl ShardCtx {
    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.id]
    }

    /// Coarse shard clock in seconds, for per-connection timestamps that fit in a u32:
    /// read once per driver pass and per tick (every 20 ms), so it lags by at most a pass.
    pub fn now_secs(&self) -> u32 {
        self.clock.get()
    }

    /// Read the clock for [`ShardCtx::now_secs`].
    pub(super) fn refresh_clock(&self) {
        self.clock
            .set(coarse_secs().saturating_sub(self.started) as u32);
    }

    pub fn publish(&self, routing_key: RoutingKey, body: Vec<u8>) {
        self.publish_at(routing_key, body, true);
    }

    /// A device-alive event: it rides with the next urgent event or the next tick
    /// (at most 20 ms later). Pongs come one at a time, spread over the second; handing
    /// each one's event to the bus at once woke the bus thread thousands of times a
    /// second at 200,000 devices, and those wakeups were a large part of the ack tail.
    pub fn publish_lazy(&self, routing_key: RoutingKey, body: Vec<u8>) {
        self.publish_at(routing_key, body, false);
    }

    fn publish_at(&self, routing_key: RoutingKey, body: Vec<u8>, urgent: bool) {
        let queued = self
            .batch
            .borrow_mut()
            .push(&self.shared.bus, routing_key, body, urgent);
        match queued {
            Queued::Dropped => {
                self.metrics().events_dropped_bus_full.fetch_add(1, Relaxed);
            }
            Queued::Batched => {}
            // Handed over at the end of the loop's pass (see `wake_bus_if_urgent`).
            Queued::Urgent => {}
            Queued::Full => self.wake_bus(),
        }
    }

    /// End of a pass of the loop: hand the batch over if something in it is urgent.
    fn wake_bus_if_urgent(&self) {
        if self.batch.borrow().is_urgent() {
            self.wake_bus();
        }
    }

    /// Hand this pass's events to the bus in one batch and wake its consumer.
    fn wake_bus(&self) {
        let m = self.metrics();
        match self.batch.borrow_mut().hand_over(&self.shared.bus) {
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
    pub fn may_read(&self) -> bool {
        match self.batch.borrow_mut().may_read(&self.shared.bus) {
            Ok(()) => true,
            Err(first) => {
                if first {
                    self.metrics().bus_backpressure.fetch_add(1, Relaxed);
                }
                false
            }
        }
    }

    /// The end of the drain this shard was asked for, if any.
    pub(super) fn drain_until(&self) -> Option<Instant> {
        self.drain.get().map(|d| d.until)
    }

    fn throttled(&self) -> bool {
        self.batch.borrow().is_throttled()
    }

    /// A connection stopped mid-buffer for backpressure; resume it when relieved.
    pub fn hold(&self, slot: u32) {
        self.batch.borrow_mut().hold(slot);
    }

    /// While throttled: ask the bus to drain (hand it this pass's events and wake its
    /// consumer).
    fn press_bus(&self) {
        self.wake_bus();
        self.shared.bus.wake();
    }

    /// Throttled, checked every millisecond: once the bus has drained enough, reading
    /// goes on, first with the connections that stopped mid-buffer.
    fn relieve_if_drained(&self) {
        if !self.shared.bus.relieved() {
            return;
        }
        let held = self.batch.borrow_mut().relieve();
        for slot in held {
            if let Some(c) = self.conn_at(slot) {
                c.resume(self);
                self.settle(&c);
            }
        }
    }

    /// A connection changed outside a readiness event: settle it at the end of this
    /// pass of the loop.
    pub fn mark(&self, slot: u32) {
        self.slab.borrow_mut().mark(slot);
    }

    fn conn_at(&self, slot: u32) -> Option<Rc<Conn>> {
        self.slab.borrow().get(slot).cloned()
    }

    /// Readiness from the poller for the connection in `slot`.
    fn on_event(&self, slot: u32, events: u32) {
        if let Some(c) = self.conn_at(slot) {
            c.on_event(self, events);
            self.settle(&c);
        }
    }

    /// Bring a connection's registration in line with its state; release it if done.
    fn settle(&self, c: &Rc<Conn>) {
        let mut started = false;
        match c.settle(&mut started) {
            None => self.release(c),
            Some(want) => {
                if started {
                    self.slab.borrow_mut().linger(
                        c.slot,
                        c.id,
                        Instant::now() + conn::CLOSE_LINGER,
                    );
                }
                if let Some(w) = c.set_interest(want) {
                    if self.poller.modify(c.fd(), u64::from(c.slot), w).is_err() {
                        self.release(c);
                    }
                }
            }
        }
    }

    /// The connection is finished: out of the poller, the slab and the route table.
    fn release(&self, c: &Rc<Conn>) {
        if !self.slab.borrow_mut().remove_if(c.slot, |x| x.id == c.id) {
            return; // already released
        }
        self.unregister(c);
        // Closing the descriptor takes it out of the epoll set. When the caller's
        // reference is the last, it closes as the caller returns, before this thread
        // waits on the poller again: no EPOLL_CTL_DEL (one system call per connection).
        if Rc::strong_count(c) > 1 {
            self.poller.delete(c.fd());
        }
    }

    fn settle_dirty(&self) {
        let dirty = self.slab.borrow_mut().take_dirty();
        for slot in dirty {
            if let Some(c) = self.conn_at(slot) {
                self.settle(&c);
            }
        }
    }

    /// Take ownership of an authenticated socket: route it, greet it, watch it.
    pub fn adopt(&self, a: Adopt) {
        let Adopt {
            stream,
            tls,
            ident,
            peer,
            protocol,
            deflate,
            leftover,
            preface,
            open,
        } = a;
        let id = self.next_conn_id.get();
        self.next_conn_id.set(id + 1);
        let slot = self.slab.borrow_mut().vacant();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let conn = Rc::new(Conn::new(
            self, id, slot, stream, tls, ident, peer, protocol, deflate, open,
        ));
        if let Err(e) = self.poller.add(fd, u64::from(slot), poller::IN) {
            tracing::warn!(error = %e, "cannot watch an adopted socket");
            self.slab.borrow_mut().give_back(slot);
            return;
        }
        self.slab.borrow_mut().fill(slot, conn.clone());
        let old = self.routes.borrow_mut().insert(ident.device, conn.clone());
        self.metrics().connections.fetch_add(1, Relaxed);
        // Also after a takeover here: the directory keeps the newest connection's age.
        if let Some(c) = &self.shared.cluster {
            c.local_gained(ident.device, conn.connected_at_ms);
        }
        if let Some(old) = old {
            self.metrics().takeovers.fetch_add(1, Relaxed);
            old.fail(
                self,
                CloseCode::Replaced,
                "replaced by a newer connection of the same device",
            );
        }
        conn.send_greeting(self, &preface, conn.greeting(self).as_deref());
        self.resend_pending(&conn);
        conn.start(self, leftover);
        self.mark(slot);
    }

    /// Requests sent to an earlier connection of this device and not yet acked are
    /// sent again, in the order first sent: a request outlives a reconnect within its
    /// deadline.
    pub fn resend_pending(&self, conn: &Conn) {
        let pending = self.pending.borrow();
        let limit = Limit::requests(self);
        for (id, command, payload) in pending.unacked(conn.meta.device) {
            if let Some(frame) = conn.encode_request(self, id, command, payload) {
                if conn.send_or_close(self, conn.data_op(), &frame, limit) == SendOutcome::Dropped {
                    break;
                }
            }
        }
    }

    /// A stock device's follow-up (NervesHub `rebooting` after `reboot`) acks the
    /// oldest pending, not yet acked request of that command.
    pub fn ack_command(&self, device: Uuid, command: &str) {
        self.pending.borrow_mut().ack_command(device, command);
    }

    /// A connection is released: out of the route table (unless a newer connection of
    /// its device took its place) and the gauges. (`router_open_connections` follows
    /// when the connection is dropped: see [`OpenConnection`].)
    pub fn unregister(&self, conn: &Conn) {
        let mut routes = self.routes.borrow_mut();
        if routes
            .get(&conn.meta.device)
            .is_some_and(|c| c.id == conn.id)
        {
            routes.remove(&conn.meta.device);
            if let Some(c) = &self.shared.cluster {
                // Closed by a drain: the device is expected back on another node.
                let back = self.drain.get().is_some() || self.shared.draining.load(Relaxed);
                c.local_lost(conn.meta.device, conn.connected_at_ms, back);
            }
        }
        self.metrics().connections.fetch_sub(1, Relaxed);
        self.metrics().disconnects.fetch_add(1, Relaxed);
    }

    pub fn on_ack(&self, device: Uuid, request: Uuid) {
        if !self.pending.borrow_mut().ack(device, request) {
            self.metrics().acks_unmatched.fetch_add(1, Relaxed);
        }
    }

    pub fn on_response(&self, device: Uuid, request: Uuid, ok: bool, result: Option<Vec<u8>>) {
        if !self
            .pending
            .borrow_mut()
            .respond(device, request, ok, result)
        {
            self.metrics().acks_unmatched.fetch_add(1, Relaxed);
        }
    }

    fn handle(&self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Adopt(a) => self.adopt(*a),
            ShardMsg::Event {
                device,
                body,
                reply,
            } => {
                let conn = self.routes.borrow().get(&device).cloned();
                let d = match conn {
                    None => Delivery::Offline,
                    Some(c) => match c.encode_event(self, &body) {
                        None => Delivery::NotJoined,
                        Some(frame) => {
                            match c.send(self, c.data_op(), &frame, Limit::outbound(self)) {
                                // (Closing: the event goes the way of the connection.)
                                SendOutcome::Sent | SendOutcome::Closing => Delivery::Sent,
                                SendOutcome::Dropped => {
                                    let m = self.metrics();
                                    m.events_dropped_slow_device.fetch_add(1, Relaxed);
                                    Delivery::Full
                                }
                            }
                        }
                    },
                };
                let _ = reply.send(d);
            }
            ShardMsg::Request(r) => self.start_request(*r),
            ShardMsg::Lookup { device, reply } => {
                let info = self.routes.borrow().get(&device).map(|c| DeviceInfo {
                    device,
                    account: c.meta.account,
                    connected: true,
                    since_unix_ms: c.connected_at_ms,
                    address: c.peer.to_string(),
                    protocol: c.protocol.name(),
                    shard: self.id,
                });
                let _ = reply.send(info);
            }
            ShardMsg::List { limit, reply } => {
                let _ = reply.send(self.routes.borrow().keys().take(limit).copied().collect());
            }
            ShardMsg::Evict { device, since_ms } => {
                let conn = self.routes.borrow().get(&device).cloned();
                if let Some(c) = conn.filter(|c| c.connected_at_ms <= since_ms) {
                    self.metrics().takeovers.fetch_add(1, Relaxed);
                    c.fail(
                        self,
                        CloseCode::Replaced,
                        "replaced by a newer connection of the same device on another node",
                    );
                }
            }
            ShardMsg::Drain(until) => {
                self.drain.set(Some(timer::DrainPlan {
                    from: Instant::now(),
                    until,
                    initial: self.routes.borrow().len(),
                }));
                return false;
            }
        }
        true
    }

    fn start_request(&self, r: RequestMsg) {
        let conn = self.routes.borrow().get(&r.device).cloned();
        let Some(conn) = conn else {
            let _ = r.reply.send(RequestReply::Offline);
            return;
        };
        // A device that cannot take it yet (Phoenix, not joined) gets it when it can.
        if let Some(frame) = conn.encode_request(self, r.request, &r.command, &r.payload) {
            // Requests may queue up to twice the event limit (see `Limit::requests`).
            let limit = Limit::requests(self);
            if conn.send_or_close(self, conn.data_op(), &frame, limit) == SendOutcome::Dropped {
                let _ = r.reply.send(RequestReply::Full);
                return;
            }
        }
        self.pending.borrow_mut().insert(r);
    }
}
