//! The shard as its loop owns it: the connections (by slot, and routed by device), the
//! poller that watches them, and the environment they run in ([`ShardCtx`]). Every
//! method here takes `&mut self`: only the loop (`thread.rs`) calls them. A
//! connection's own methods get `&ShardCtx`, never this: they cannot reach another
//! connection, and what they change that the loop must act on (a slot to settle) they
//! mark in the context.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use uuid::Uuid;

use super::conn::{self, Conn, Limit, SendOutcome};
use super::poller::{self, Poller};
use super::slab::Slab;
use super::timer::DrainPlan;
use super::{Adopt, Delivery, DeviceInfo, Protocol, RequestMsg, RequestReply, ShardCtx, ShardMsg};
use crate::protocol::ws::CloseCode;

pub(super) struct Shard {
    /// What a connection's methods see: buffers, pending requests, the bus batch.
    pub(crate) ctx: ShardCtx,
    /// The newest connection of each device on this shard, by slot.
    pub(crate) routes: HashMap<Uuid, u32>,
    /// Authenticated connections by slot (the poller's key) and the closes lingering.
    pub(super) slab: Slab<Box<Conn>>,
    /// Readiness of every authenticated connection (one epoll per shard).
    pub(crate) poller: Poller,
    next_conn_id: u64,
    /// Ticks so far: which ping slot this tick serves.
    pub(super) ticks: u64,
    /// Set on drain: connections are closed gradually until its `until`.
    pub(super) drain: Option<DrainPlan>,
}

impl Shard {
    pub(super) fn new(ctx: ShardCtx, poller: Poller) -> Shard {
        Shard {
            ctx,
            routes: HashMap::new(),
            slab: Slab::default(),
            poller,
            next_conn_id: 0,
            ticks: 0,
            drain: None,
        }
    }

    /// The end of the drain this shard was asked for, if any.
    pub(super) fn drain_until(&self) -> Option<Instant> {
        self.drain.map(|d| d.until)
    }

    /// Throttled, checked every millisecond: once the bus has drained enough, reading
    /// goes on, first with the connections that stopped mid-buffer.
    /// True if it was relieved.
    pub(super) fn relieve_if_drained(&mut self) -> bool {
        if !self.ctx.shared.bus.relieved() {
            return false;
        }
        let held = self.ctx.batch.relieve();
        for slot in held {
            if let Some(c) = self.slab.get_mut(slot) {
                c.resume(&mut self.ctx);
                self.settle(slot);
            }
        }
        true
    }

    /// The newest connection of `device` on this shard.
    fn route(&mut self, device: &Uuid) -> Option<&mut Conn> {
        let slot = *self.routes.get(device)?;
        self.slab.get_mut(slot).map(|c| &mut **c)
    }

    /// Readiness from the poller for the connection in `slot`.
    pub(super) fn on_event(&mut self, slot: u32, events: u32) {
        if let Some(c) = self.slab.get_mut(slot) {
            c.on_event(&mut self.ctx, events);
            self.settle(slot);
        }
    }

    /// Bring a connection's registration in line with its state; release it if done.
    fn settle(&mut self, slot: u32) {
        let Some(c) = self.slab.get_mut(slot) else {
            return;
        };
        let mut started = false;
        let Some(want) = c.settle(&mut started) else {
            self.release(slot);
            return;
        };
        let (id, fd) = (c.id, c.fd());
        let changed = c.set_interest(want);
        if started {
            self.slab
                .linger(slot, id, Instant::now() + conn::CLOSE_LINGER);
        }
        if let Some(w) = changed {
            if self.poller.modify(fd, u64::from(slot), w).is_err() {
                self.release(slot);
            }
        }
    }

    /// The connection is finished: out of the slab and the route table, and closed
    /// (closing its descriptor takes it out of the epoll set: no EPOLL_CTL_DEL, one
    /// system call per connection less).
    pub(super) fn release(&mut self, slot: u32) {
        let Some(conn) = self.slab.take(slot) else {
            return; // already released
        };
        if let Some(e) = &mut self.ctx.expiries {
            e.forget(conn.id);
        }
        self.ctx.shared.tenants.lost(conn.meta.account);
        if self.routes.get(&conn.meta.device) == Some(&slot) {
            self.routes.remove(&conn.meta.device);
            if let Some(c) = &self.ctx.shared.cluster {
                // Closed by a drain: the device is expected back on another node.
                let back = self.drain.is_some() || self.ctx.shared.draining.load(Relaxed);
                c.local_lost(conn.meta.device, conn.connected_at_ms, back);
            }
        }
        let m = self.ctx.metrics();
        m.connections.fetch_sub(1, Relaxed);
        m.disconnects.fetch_add(1, Relaxed);
        // (`router_open_connections` follows as `conn` drops: see `OpenConnection`.)
    }

    pub(super) fn settle_dirty(&mut self) {
        for slot in self.ctx.take_dirty() {
            self.settle(slot);
        }
    }

    /// Take ownership of an authenticated socket: route it, greet it, watch it.
    pub(super) fn adopt(&mut self, a: Adopt) {
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
        let id = self.next_conn_id;
        self.next_conn_id = id + 1;
        let slot = self.slab.vacant();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        if let Err(e) = self.poller.add(fd, u64::from(slot), poller::IN) {
            tracing::warn!(error = %e, "cannot watch an adopted socket");
            self.slab.give_back(slot);
            return;
        }
        let mut conn = Box::new(Conn::new(
            &self.ctx, id, slot, stream, tls, ident, peer, protocol, deflate, open,
        ));
        self.ctx.metrics().connections.fetch_add(1, Relaxed);
        if let Some(e) = &mut self.ctx.expiries {
            e.track(slot, id, ident.expires);
        }
        self.ctx.shared.tenants.gained(ident.account);
        // The conformance echo is no device: not routed (events, requests, takeovers,
        // the cluster's directory never see it), nothing resent to it.
        let device = protocol != Protocol::ConformanceEcho;
        // Also after a takeover here: the directory keeps the newest connection's age.
        if let (true, Some(c)) = (device, &self.ctx.shared.cluster) {
            c.local_gained(ident.device, conn.connected_at_ms);
        }
        let greeting = conn.greeting(&self.ctx);
        conn.send_greeting(&mut self.ctx, &preface, greeting.as_deref());
        if device {
            self.ctx.resend_pending(&mut conn);
        }
        conn.start(&mut self.ctx, leftover);
        self.slab.fill(slot, conn);
        self.ctx.mark(slot);
        if !device {
            return;
        }
        let old = self.routes.insert(ident.device, slot);
        if let Some(old) = old.and_then(|s| self.slab.get_mut(s)) {
            self.ctx.metrics().takeovers.fetch_add(1, Relaxed);
            old.fail(
                &mut self.ctx,
                CloseCode::Replaced,
                "replaced by a newer connection of the same device",
            );
        }
    }

    pub(super) fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Adopt(a) => self.adopt(*a),
            ShardMsg::Event {
                device,
                body,
                reply,
            } => {
                let d = self.deliver(&device, &body);
                let _ = reply.send(d);
            }
            ShardMsg::Request(r) => self.start_request(*r),
            ShardMsg::Lookup { device, reply } => {
                let shard = self.ctx.id;
                let info = self.route(&device).map(|c| DeviceInfo {
                    device,
                    account: c.meta.account,
                    connected: true,
                    since_unix_ms: c.connected_at_ms,
                    address: c.peer.to_string(),
                    protocol: c.protocol.name(),
                    shard,
                });
                let _ = reply.send(info);
            }
            ShardMsg::List { limit, reply } => {
                let _ = reply.send(self.routes.keys().take(limit).copied().collect());
            }
            ShardMsg::Evict { device, since_ms } => {
                let ctx = &mut self.ctx;
                let slot = self.routes.get(&device).copied();
                let conn = slot.and_then(|s| self.slab.get_mut(s));
                if let Some(c) = conn.filter(|c| c.connected_at_ms <= since_ms) {
                    ctx.metrics().takeovers.fetch_add(1, Relaxed);
                    c.fail(
                        ctx,
                        CloseCode::Replaced,
                        "replaced by a newer connection of the same device on another node",
                    );
                }
            }
            ShardMsg::AccountRate { account, reply } => {
                let now = self.ctx.now_secs();
                let rate = self
                    .ctx
                    .account_rates
                    .as_ref()
                    .map(|r| r.last_second(&account, now));
                let _ = reply.send(rate);
            }
            ShardMsg::Disconnect { device } => {
                let ctx = &mut self.ctx;
                let slot = self.routes.get(&device).copied();
                if let Some(c) = slot.and_then(|s| self.slab.get_mut(s)) {
                    c.fail(ctx, CloseCode::Disconnected, "disconnected by the operator");
                }
            }
            ShardMsg::Drain(until) => {
                self.drain = Some(DrainPlan {
                    from: Instant::now(),
                    until,
                    initial: self.routes.len(),
                });
                return false;
            }
        }
        true
    }

    /// A backend event for a device of this shard, in its protocol.
    fn deliver(&mut self, device: &Uuid, body: &[u8]) -> Delivery {
        let ctx = &mut self.ctx;
        let Some(slot) = self.routes.get(device).copied() else {
            return Delivery::Offline;
        };
        let Some(c) = self.slab.get_mut(slot) else {
            return Delivery::Offline;
        };
        let Some(frame) = c.encode_event(ctx, body) else {
            return Delivery::NotJoined;
        };
        let limit = Limit::outbound(ctx);
        match c.send(ctx, c.data_op(), &frame, limit) {
            // (Closing: the event goes the way of the connection.)
            SendOutcome::Sent | SendOutcome::Closing => Delivery::Sent,
            SendOutcome::Dropped => {
                ctx.metrics()
                    .events_dropped_slow_device
                    .fetch_add(1, Relaxed);
                Delivery::Full
            }
        }
    }

    fn start_request(&mut self, r: RequestMsg) {
        let ctx = &mut self.ctx;
        let slot = self.routes.get(&r.device).copied();
        let Some(conn) = slot.and_then(|s| self.slab.get_mut(s)) else {
            let _ = r.reply.send(RequestReply::Offline);
            return;
        };
        let max = ctx.shared.config.max_pending;
        if ctx.pending.has_at_least(&r.device, max) {
            let _ = r.reply.send(RequestReply::TooManyPending(max));
            return;
        }
        // A device that cannot take it yet (Phoenix, not joined) gets it when it can.
        if let Some(frame) = conn.encode_request(ctx, r.request, &r.command, &r.payload) {
            // Requests may queue up to twice the event limit (see `Limit::requests`).
            let limit = Limit::requests(ctx);
            if conn.send_or_close(ctx, conn.data_op(), &frame, limit) == SendOutcome::Dropped {
                let _ = r.reply.send(RequestReply::Full);
                return;
            }
        }
        ctx.pending.insert(r);
    }
}
