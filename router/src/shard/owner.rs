//! The shard as its loop owns it: the connections (by slot, and routed by device), the
//! poller that watches them, and the environment they run in ([`ShardCtx`]). Every
//! method here takes `&mut self`: only the loop (`thread.rs`) calls them. A
//! connection's own methods get `&ShardCtx`, never this: they cannot reach another
//! connection, and what they change that the loop must act on (a slot to settle) they
//! mark in the context.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use uuid::Uuid;

use super::conn::{self, Conn, Limit, SendOutcome};
use super::poller::{self, Poller};
use super::slab::Slab;
use super::timer::DrainPlan;
use super::{Adopt, Delivery, DeviceInfo, RequestMsg, RequestReply, ShardCtx, ShardMsg};
use crate::protocol::ws::CloseCode;

pub(super) struct Shard {
    /// What a connection's methods see: buffers, pending requests, the bus batch.
    pub ctx: ShardCtx,
    /// The newest connection of each device on this shard.
    pub routes: HashMap<Uuid, Rc<Conn>>,
    /// Authenticated connections by slot (the poller's key) and the closes lingering.
    pub(super) slab: Slab<Rc<Conn>>,
    /// Readiness of every authenticated connection (one epoll per shard).
    pub poller: Poller,
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
    pub(super) fn relieve_if_drained(&mut self) {
        if !self.ctx.shared.bus.relieved() {
            return;
        }
        let held = self.ctx.batch.borrow_mut().relieve();
        for slot in held {
            if let Some(c) = self.conn_at(slot) {
                c.resume(&self.ctx);
                self.settle(&c);
            }
        }
    }

    pub(super) fn conn_at(&self, slot: u32) -> Option<Rc<Conn>> {
        self.slab.get(slot).cloned()
    }

    /// Readiness from the poller for the connection in `slot`.
    pub(super) fn on_event(&mut self, slot: u32, events: u32) {
        if let Some(c) = self.conn_at(slot) {
            c.on_event(&self.ctx, events);
            self.settle(&c);
        }
    }

    /// Bring a connection's registration in line with its state; release it if done.
    fn settle(&mut self, c: &Rc<Conn>) {
        let mut started = false;
        match c.settle(&mut started) {
            None => self.release(c),
            Some(want) => {
                if started {
                    self.slab
                        .linger(c.slot, c.id, Instant::now() + conn::CLOSE_LINGER);
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
    pub(super) fn release(&mut self, c: &Rc<Conn>) {
        if !self.slab.remove_if(c.slot, |x| x.id == c.id) {
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

    pub(super) fn settle_dirty(&mut self) {
        let dirty = self.ctx.take_dirty();
        for slot in dirty {
            if let Some(c) = self.conn_at(slot) {
                self.settle(&c);
            }
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
        let conn = Rc::new(Conn::new(
            &self.ctx, id, slot, stream, tls, ident, peer, protocol, deflate, open,
        ));
        if let Err(e) = self.poller.add(fd, u64::from(slot), poller::IN) {
            tracing::warn!(error = %e, "cannot watch an adopted socket");
            self.slab.give_back(slot);
            return;
        }
        self.slab.fill(slot, conn.clone());
        let old = self.routes.insert(ident.device, conn.clone());
        self.ctx.metrics().connections.fetch_add(1, Relaxed);
        // Also after a takeover here: the directory keeps the newest connection's age.
        if let Some(c) = &self.ctx.shared.cluster {
            c.local_gained(ident.device, conn.connected_at_ms);
        }
        if let Some(old) = old {
            self.ctx.metrics().takeovers.fetch_add(1, Relaxed);
            old.fail(
                &self.ctx,
                CloseCode::Replaced,
                "replaced by a newer connection of the same device",
            );
        }
        conn.send_greeting(&self.ctx, &preface, conn.greeting(&self.ctx).as_deref());
        self.ctx.resend_pending(&conn);
        conn.start(&self.ctx, leftover);
        self.ctx.mark(slot);
    }

    /// A connection is released: out of the route table (unless a newer connection of
    /// its device took its place) and the gauges. (`router_open_connections` follows
    /// when the connection is dropped: see [`OpenConnection`].)
    fn unregister(&mut self, conn: &Conn) {
        let routes = &mut self.routes;
        if routes
            .get(&conn.meta.device)
            .is_some_and(|c| c.id == conn.id)
        {
            routes.remove(&conn.meta.device);
            if let Some(c) = &self.ctx.shared.cluster {
                // Closed by a drain: the device is expected back on another node.
                let back = self.drain.is_some() || self.ctx.shared.draining.load(Relaxed);
                c.local_lost(conn.meta.device, conn.connected_at_ms, back);
            }
        }
        self.ctx.metrics().connections.fetch_sub(1, Relaxed);
        self.ctx.metrics().disconnects.fetch_add(1, Relaxed);
    }

    pub(super) fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Adopt(a) => self.adopt(*a),
            ShardMsg::Event {
                device,
                body,
                reply,
            } => {
                let conn = self.routes.get(&device).cloned();
                let d = match conn {
                    None => Delivery::Offline,
                    Some(c) => match c.encode_event(&self.ctx, &body) {
                        None => Delivery::NotJoined,
                        Some(frame) => {
                            match c.send(&self.ctx, c.data_op(), &frame, Limit::outbound(&self.ctx))
                            {
                                // (Closing: the event goes the way of the connection.)
                                SendOutcome::Sent | SendOutcome::Closing => Delivery::Sent,
                                SendOutcome::Dropped => {
                                    let m = self.ctx.metrics();
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
                let info = self.routes.get(&device).map(|c| DeviceInfo {
                    device,
                    account: c.meta.account,
                    connected: true,
                    since_unix_ms: c.connected_at_ms,
                    address: c.peer.to_string(),
                    protocol: c.protocol.name(),
                    shard: self.ctx.id,
                });
                let _ = reply.send(info);
            }
            ShardMsg::List { limit, reply } => {
                let _ = reply.send(self.routes.keys().take(limit).copied().collect());
            }
            ShardMsg::Evict { device, since_ms } => {
                let conn = self.routes.get(&device).cloned();
                if let Some(c) = conn.filter(|c| c.connected_at_ms <= since_ms) {
                    self.ctx.metrics().takeovers.fetch_add(1, Relaxed);
                    c.fail(
                        &self.ctx,
                        CloseCode::Replaced,
                        "replaced by a newer connection of the same device on another node",
                    );
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

    fn start_request(&mut self, r: RequestMsg) {
        let conn = self.routes.get(&r.device).cloned();
        let Some(conn) = conn else {
            let _ = r.reply.send(RequestReply::Offline);
            return;
        };
        // A device that cannot take it yet (Phoenix, not joined) gets it when it can.
        if let Some(frame) = conn.encode_request(&self.ctx, r.request, &r.command, &r.payload) {
            // Requests may queue up to twice the event limit (see `Limit::requests`).
            let limit = Limit::requests(&self.ctx);
            if conn.send_or_close(&self.ctx, conn.data_op(), &frame, limit) == SendOutcome::Dropped
            {
                let _ = r.reply.send(RequestReply::Full);
                return;
            }
        }
        self.ctx.pending.borrow_mut().insert(r);
    }
}
