//! Shards: one OS thread and one single-threaded runtime each. A shard owns its
//! connections, its route table `device -> connection` and its pending requests.
//! It never blocks and never takes a lock on the message path: other threads reach
//! it only through its bounded crossbeam inbox.

pub mod conn;
mod handle;
pub mod poller;
mod thread;
mod timer;

pub use handle::ShardHandle;
pub use thread::run_shard;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

use crate::auth::Identity;
use crate::bus::{BusEvent, RoutingKey};
use crate::metrics::ShardMetrics;
use crate::protocol::json::Scratch;
use crate::Shared;
use bytes::Bytes;
use conn::Conn;
use poller::Poller;

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

/// Events a shard may queue on the bus in one pass before it wakes the consumer anyway.
const WAKE_EVERY: usize = 512;

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

/// What other threads may ask of a shard.
pub enum ShardMsg {
    /// An authenticated socket accepted by another shard; this shard owns its device.
    Adopt(Box<Adopt>),
    /// Deliver a backend event (a JSON object) to a device; replies whether it was connected.
    Event {
        device: Uuid,
        body: Vec<u8>,
        reply: oneshot::Sender<Delivery>,
    },
    Request(Box<RequestMsg>),
    Lookup {
        device: Uuid,
        reply: oneshot::Sender<Option<DeviceInfo>>,
    },
    /// Up to `limit` devices connected to this shard.
    List {
        limit: usize,
        reply: oneshot::Sender<Vec<Uuid>>,
    },
    /// Another node holds a newer connection of this device (the cluster directory
    /// decided): close ours with 4409 if it was made at or before `since_ms`.
    Evict {
        device: Uuid,
        since_ms: u64,
    },
    /// Stop accepting and close every connection with 1001, spread until this instant;
    /// the shard stops when its last connection is gone.
    Drain(Instant),
}

pub struct Adopt {
    pub stream: std::net::TcpStream,
    /// The TLS session, for wss connections (rustls state moves with the socket).
    pub tls: Option<Box<rustls::ServerConnection>>,
    pub ident: Identity,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// permessage-deflate negotiated on the upgrade.
    pub deflate: bool,
    pub leftover: Vec<u8>,
    /// Bytes the listener left for the owner to send first (the HTTP 101 when the
    /// upgrade request carried the credentials), so the 101 and the greeting leave
    /// in one write after the device is routable. Empty: already sent.
    pub preface: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    Offline,
    /// The device's outbound queue is full (slow reader).
    Full,
    /// Connected but cannot receive yet (a Phoenix device that has not joined).
    NotJoined,
}

pub struct RequestMsg {
    pub device: Uuid,
    pub request: Uuid,
    pub command: String,
    pub payload: Vec<u8>,
    pub wait_response: bool,
    pub deadline: Instant,
    pub reply: oneshot::Sender<RequestReply>,
}

#[derive(Debug)]
pub enum RequestReply {
    Offline,
    Full,
    Acked,
    Responded { ok: bool, result: Option<Vec<u8>> },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub device: Uuid,
    pub account: Uuid,
    pub connected: bool,
    pub since_unix_ms: u64,
    pub address: String,
    pub protocol: &'static str,
    pub shard: usize,
}

/// A request sent to a device, waiting for its ack or response.
struct Pending {
    device: Uuid,
    wait_response: bool,
    acked: bool,
    deadline: Instant,
    reply: oneshot::Sender<RequestReply>,
    /// Kept to re-send if the device reconnects before acking.
    frame_parts: (String, Vec<u8>),
}

/// Everything one shard owns. Lives in an `Rc` on the shard's thread only.
pub struct ShardCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub routes: RefCell<HashMap<Uuid, Rc<Conn>>>,
    pending: RefCell<HashMap<Uuid, Pending>>,
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
    /// Connects per source IP in the current second (only with --ip-connect-rate).
    ip_rate: RefCell<HashMap<std::net::IpAddr, (u32, u32)>>,
    /// Readiness of every authenticated connection (one epoll per shard).
    poller: Poller,
    /// Authenticated connections by slot (the poller's key); free slots are reused.
    slab: RefCell<Vec<Option<Rc<Conn>>>>,
    free: RefCell<Vec<u32>>,
    /// Slots changed outside a readiness event, to settle next.
    dirty: RefCell<Vec<u32>>,
    dirty_notify: Notify,
    /// Closing connections and when their linger ends: (slot, conn id, deadline).
    lingering: RefCell<Vec<(u32, u64, Instant)>>,
    /// Events published in this pass, handed to the bus at its end.
    bus_batch: RefCell<Vec<BusEvent>>,
    /// The batch holds an event that must go at the end of this pass; without one
    /// (only device-alive events) it waits for the next tick.
    bus_urgent: Cell<bool>,
    /// Reading paused until the bus drains (backpressure).
    throttled: Cell<bool>,
    /// Connections holding unparsed bytes because of it.
    held: RefCell<Vec<u32>>,
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
        let m = self.metrics();
        let mut batch = self.bus_batch.borrow_mut();
        if !self.shared.bus.has_room(batch.len()) {
            m.events_dropped_bus_full.fetch_add(1, Relaxed);
            return;
        }
        batch.push(BusEvent {
            routing_key,
            // Exactly sized, a Vec becomes `Bytes` without a separate shared header
            // (shrinking a little in place is free with mimalloc); one allocation less
            // per event.
            body: Bytes::from(body.into_boxed_slice()),
        });
        let n = batch.len();
        drop(batch);
        // Handed over once per driver pass (see `wake_bus`), whoever published, and
        // every WAKE_EVERY events within a long pass so the consumer works meanwhile.
        if n >= WAKE_EVERY {
            self.wake_bus();
        } else if urgent && !self.bus_urgent.replace(true) {
            self.dirty_notify.notify_one();
        }
    }

    /// End of a driver pass: hand the batch over if something in it is urgent.
    fn wake_bus_if_urgent(&self) {
        if self.bus_urgent.get() {
            self.wake_bus();
        }
    }

    /// Hand this pass's events to the bus in one batch and wake its consumer.
    fn wake_bus(&self) {
        self.bus_urgent.set(false);
        let batch = std::mem::take(&mut *self.bus_batch.borrow_mut());
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let m = self.metrics();
        match self.shared.bus.send_batch(batch) {
            Ok(()) => m.events_published.fetch_add(n, Relaxed),
            Err(_) => m.events_dropped_bus_full.fetch_add(n, Relaxed),
        };
        self.shared.bus.wake();
    }

    /// Before reading a device: false (and the shard pauses reading) while the bus queue
    /// is nearly full. Level-triggered readiness brings the unread sockets back later.
    pub fn may_read(&self) -> bool {
        if self.throttled.get() {
            return false;
        }
        if self.shared.bus.congested(self.bus_batch.borrow().len()) {
            self.throttled.set(true);
            self.metrics().bus_backpressure.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    /// A connection stopped mid-buffer for backpressure; resume it when relieved.
    pub fn hold(&self, slot: u32) {
        self.held.borrow_mut().push(slot);
    }

    /// Paused for backpressure: wait until the bus has drained enough, then go on
    /// with the connections that stopped mid-buffer.
    async fn wait_relieved(&self) {
        loop {
            self.wake_bus();
            self.shared.bus.wake();
            while !self.shared.bus.relieved() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.throttled.set(false);
            let mut held = std::mem::take(&mut *self.held.borrow_mut());
            held.sort_unstable();
            held.dedup();
            for slot in held {
                if let Some(c) = self.conn_at(slot) {
                    c.resume(self);
                    self.settle(&c);
                }
            }
            if !self.throttled.get() {
                return;
            }
        }
    }

    /// A connection changed outside a readiness event: settle it soon.
    pub fn mark(&self, slot: u32) {
        self.dirty.borrow_mut().push(slot);
        self.dirty_notify.notify_one();
    }

    fn conn_at(&self, slot: u32) -> Option<Rc<Conn>> {
        self.slab.borrow().get(slot as usize).cloned().flatten()
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
                    self.lingering.borrow_mut().push((
                        c.slot,
                        c.id,
                        Instant::now() + conn::CLOSE_LINGER,
                    ));
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
        {
            let mut slab = self.slab.borrow_mut();
            match slab.get_mut(c.slot as usize) {
                Some(s) if s.as_ref().is_some_and(|x| x.id == c.id) => *s = None,
                _ => return, // already released
            }
        }
        self.free.borrow_mut().push(c.slot);
        self.unregister(c);
        // Closing the descriptor takes it out of the epoll set. When the caller's
        // reference is the last, it closes as the caller returns, before this thread
        // waits on the poller again: no EPOLL_CTL_DEL (one system call per connection).
        if Rc::strong_count(c) > 1 {
            self.poller.delete(c.fd());
        }
    }

    fn settle_dirty(&self) {
        let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        for slot in dirty {
            if let Some(c) = self.conn_at(slot) {
                self.settle(&c);
            }
        }
    }

    /// Take ownership of an authenticated socket: route it, greet it, watch it.
    pub fn adopt(self: &Rc<Self>, a: Adopt) {
        let Adopt {
            stream,
            tls,
            ident,
            peer,
            protocol,
            deflate,
            leftover,
            preface,
        } = a;
        let id = self.next_conn_id.get();
        self.next_conn_id.set(id + 1);
        let slot = match self.free.borrow_mut().pop() {
            Some(s) => s,
            None => {
                let mut slab = self.slab.borrow_mut();
                slab.push(None);
                (slab.len() - 1) as u32
            }
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let conn = Rc::new(Conn::new(
            self, id, slot, stream, tls, ident, peer, protocol, deflate,
        ));
        if let Err(e) = self.poller.add(fd, u64::from(slot), poller::IN) {
            tracing::warn!(error = %e, "cannot watch an adopted socket");
            self.free.borrow_mut().push(slot);
            self.shared.metrics.open_connections.fetch_sub(1, Relaxed);
            return;
        }
        self.slab.borrow_mut()[slot as usize] = Some(conn.clone());
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
                4409,
                "replaced by a newer connection of the same device",
            );
        }
        conn.send_greeting(self, &preface, conn.greeting(self).as_deref());
        self.resend_pending(&conn);
        conn.start(self, leftover);
        self.mark(slot);
    }

    /// Requests sent to an earlier connection of this device and not yet acked are
    /// sent again: a request outlives a reconnect within its deadline.
    pub fn resend_pending(&self, conn: &Conn) {
        let pending = self.pending.borrow();
        for (id, p) in pending.iter() {
            if p.device == conn.meta.device && !p.acked && !p.reply.is_closed() {
                let (command, payload) = &p.frame_parts;
                if let Some(frame) = conn.encode_request(self, *id, command, payload) {
                    let limit = self.shared.config.max_outbound.saturating_mul(2);
                    if !conn.send_or_close(self, conn.data_op(), &frame, limit) {
                        break;
                    }
                }
            }
        }
    }

    /// A stock device's follow-up (NervesHub `rebooting` after `reboot`) acks the
    /// oldest pending, not yet acked request of that command.
    pub fn ack_command(&self, device: Uuid, command: &str) {
        let oldest = self
            .pending
            .borrow()
            .iter()
            .filter(|(_, p)| p.device == device && !p.acked && p.frame_parts.0 == command)
            .min_by_key(|(_, p)| p.deadline)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.on_ack(device, id);
        }
    }

    /// May a new connection from `ip` be accepted? Err: the HTTP status line and why.
    pub fn admit(&self, ip: std::net::IpAddr) -> Result<(), (&'static str, &'static str)> {
        self.admit_connection()?;
        self.admit_ip(ip)
    }

    /// Draining and the connection cap: decided at accept, before a byte is read.
    pub fn admit_connection(&self) -> Result<(), (&'static str, &'static str)> {
        let m = self.metrics();
        if self.drain.get().is_some() || self.shared.draining.load(Relaxed) {
            m.refused_draining.fetch_add(1, Relaxed);
            return Err((
                "503 Service Unavailable",
                "router draining; reconnect elsewhere",
            ));
        }
        let open = self.shared.metrics.open_connections.load(Relaxed);
        if open >= self.shared.config.max_connections as i64 {
            m.refused_max_connections.fetch_add(1, Relaxed);
            return Err((
                "503 Service Unavailable",
                "connection limit reached; retry later",
            ));
        }
        Ok(())
    }

    /// The per-IP connect rate (`--ip-connect-rate`), for the device's address.
    pub fn admit_ip(&self, ip: std::net::IpAddr) -> Result<(), (&'static str, &'static str)> {
        let m = self.metrics();
        let rate = self.shared.config.ip_connect_rate;
        if rate > 0 {
            let now = self.now_secs();
            let mut map = self.ip_rate.borrow_mut();
            let e = map.entry(ip).or_insert((now, 0));
            if e.0 != now {
                *e = (now, 0);
            }
            e.1 += 1;
            if e.1 > rate {
                m.refused_ip_rate.fetch_add(1, Relaxed);
                return Err((
                    "429 Too Many Requests",
                    "too many connections from this address; slow down",
                ));
            }
        }
        Ok(())
    }

    /// Called when a connection ends (see `release`).
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
        self.shared.metrics.open_connections.fetch_sub(1, Relaxed);
    }

    pub fn on_ack(&self, device: Uuid, request: Uuid) {
        let mut pending = self.pending.borrow_mut();
        match pending.get_mut(&request) {
            Some(p) if p.device == device => {
                if p.wait_response {
                    p.acked = true;
                } else if let Some(p) = pending.remove(&request) {
                    let _ = p.reply.send(RequestReply::Acked);
                }
            }
            _ => {
                self.metrics().acks_unmatched.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn on_response(&self, device: Uuid, request: Uuid, ok: bool, result: Option<Vec<u8>>) {
        let mut pending = self.pending.borrow_mut();
        if pending.get(&request).is_some_and(|p| p.device == device) {
            if let Some(p) = pending.remove(&request) {
                let _ = p.reply.send(RequestReply::Responded { ok, result });
            }
        } else {
            self.metrics().acks_unmatched.fetch_add(1, Relaxed);
        }
    }

    fn handle(self: &Rc<Self>, msg: ShardMsg) -> bool {
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
                        Some(frame) if c.try_send_data(self, &frame) => Delivery::Sent,
                        Some(_) => {
                            let m = self.metrics();
                            m.events_dropped_slow_device.fetch_add(1, Relaxed);
                            Delivery::Full
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
                        4409,
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
            // Requests may queue up to twice the event limit; a device that far behind
            // is not reading at all, so it is closed rather than buffered without end.
            let limit = self.shared.config.max_outbound.saturating_mul(2);
            if !conn.send_or_close(self, conn.data_op(), &frame, limit) {
                let _ = r.reply.send(RequestReply::Full);
                return;
            }
        }
        self.pending.borrow_mut().insert(
            r.request,
            Pending {
                device: r.device,
                wait_response: r.wait_response,
                acked: false,
                deadline: r.deadline,
                reply: r.reply,
                frame_parts: (r.command, r.payload),
            },
        );
    }
}
