//! One authenticated device connection: its socket, compact state and the single
//! loop that reads it. Idle, it holds no buffer (the shard lends its read buffer)
//! and no timer (the shard's tick pings it). It never blocks the shard.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

mod frames;
mod messages;
mod readiness;

use super::poller::IN;
use super::{Protocol, ShardCtx};
use crate::auth::Identity;
use crate::protocol::hive::Meta;
use crate::protocol::hivekit::Subscriptions;
use crate::protocol::msgpack;
use crate::protocol::phoenix::PhxState;
use crate::protocol::phoenix::Vsn;
use crate::protocol::ws::{self, OP_BINARY, OP_CLOSE, OP_TEXT};

/// How long a closing connection may take to flush and see the peer's FIN.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Reads per readiness event before yielding to other connections.
const READS_PER_WAKE: usize = 4;

pub struct Conn {
    pub id: u64,
    /// Index in the shard's slab, and the key of its epoll registration.
    pub slot: u32,
    pub meta: Meta,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    pub connected_at_ms: u64,
    stream: TcpStream,
    st: RefCell<State>,
    /// What the protocol keeps per connection (Phoenix joins, Hivekit pubsub
    /// subscriptions); None while there is nothing (and always for Hive).
    adapter: RefCell<Option<Box<Adapter>>>,
}

/// Per-connection state of a protocol adapter, boxed: an idle connection pays one
/// pointer for it.
enum Adapter {
    Phoenix(PhxState),
    Hivekit(Subscriptions),
}

/// Buffers a connection needs only while bytes are in flight; freed when all are
/// empty, so an idle connection carries one null pointer instead of three vectors.
#[derive(Default)]
struct Bufs {
    /// Bytes of an incomplete frame.
    inbuf: Vec<u8>,
    /// A fragmented message being reassembled, and its opcode (0: none).
    msg: Vec<u8>,
    msg_op: u8,
    /// Frames of `msg` so far (bounded: see `frames`).
    msg_frames: u16,
    /// `msg` is compressed (its first frame had RSV1).
    msg_deflated: bool,
    /// Outbound bytes the socket did not take yet; `out_pos` is how far they went.
    out: Vec<u8>,
    out_pos: usize,
}

impl Bufs {
    fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }
    fn is_empty(&self) -> bool {
        self.inbuf.is_empty() && self.msg_op == 0 && self.queued() == 0
    }
}

#[derive(Default)]
struct State {
    bufs: Option<Box<Bufs>>,
    /// TLS session (wss); None for plain connections.
    tls: Option<Box<rustls::ServerConnection>>,
    /// A close frame was queued: nothing more is read or sent but the flush.
    closing: bool,
    /// The socket is gone (EOF, reset): stop at once.
    dead: bool,
    last_seen: u32,
    next_ping: u32,
    last_alive: u32,
    alive_sent: bool,
    bad_frames: u8,
    /// Closing: the close frame is out, waiting for the peer's FIN (or the deadline).
    lingering: bool,
    /// Our write side is shut down.
    shut: bool,
    /// The peer sent its close frame (we answer it): once the answer is out the close
    /// handshake is complete and the socket is closed at once, no shutdown, no linger.
    peer_closed: bool,
    /// Closing by drain: what the peer sent before it saw our close frame (events, acks)
    /// is still read and handled, until its close frame or FIN (or the linger deadline).
    read_on: bool,
    /// Events registered with the shard's poller.
    interest: u32,
    /// permessage-deflate was negotiated (no context takeover: no state kept for it).
    deflate: bool,
    /// Per-device rate limit: tokens left, the second they were last refilled, and
    /// messages refused since the last one admitted.
    tokens: u32,
    refilled_at: u32,
    excess: u32,
}

impl State {
    fn has_out(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| b.queued() > 0)
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &ShardCtx,
        id: u64,
        slot: u32,
        stream: TcpStream,
        tls: Option<Box<rustls::ServerConnection>>,
        ident: Identity,
        peer: SocketAddr,
        protocol: Protocol,
        deflate: bool,
    ) -> Self {
        let now = ctx.now_secs();
        let interval = ctx.shared.config.ping_interval.max(1) as u32;
        Conn {
            id,
            slot,
            meta: Meta {
                device: ident.device,
                account: ident.account,
            },
            peer,
            protocol,
            connected_at_ms: crate::unix_ms(),
            stream,
            st: RefCell::new(State {
                last_seen: now,
                next_ping: now + super::timer::first_ping_after(interval, id),
                tokens: ctx.shared.config.device_burst,
                tls: tls.map(|mut t| {
                    // Our own queue does the accounting (--max-outbound); rustls's default
                    // 64 KiB cap would make write_all fail midway through a frame.
                    t.set_buffer_limit(None);
                    t
                }),
                refilled_at: now,
                interest: IN,
                deflate,
                ..State::default()
            }),
            adapter: RefCell::new(match protocol {
                Protocol::Phoenix(vsn) => Some(Box::new(Adapter::Phoenix(
                    PhxState::with_extensions(vsn, ctx.shared.nerves_extensions.clone()),
                ))),
                _ => None,
            }),
        }
    }

    /// Something changed outside a readiness event (output queued, closing, dead):
    /// the shard's driver settles this connection next.
    fn wake(&self, ctx: &ShardCtx) {
        ctx.mark(self.slot);
    }

    pub fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    pub fn ping_due(&self, now: u32) -> bool {
        let st = self.st.borrow();
        !st.closing && !st.dead && now >= st.next_ping
    }
    pub fn set_next_ping(&self, at: u32) {
        self.st.borrow_mut().next_ping = at;
    }
    pub fn idle_for(&self, now: u32) -> u32 {
        now.saturating_sub(self.st.borrow().last_seen)
    }

    /// Send a frame the device asked for (a reply, an error), as the protocol adapter
    /// wrote it (JSON text; MessagePack in a binary frame for a Phoenix V3 device):
    /// counted against --max-outbound like everything queued for it (see
    /// [`Conn::send_or_close`]).
    pub fn send_text(&self, ctx: &ShardCtx, payload: &[u8]) {
        let wire = self.to_wire(payload);
        self.send_or_close(ctx, self.data_op(), &wire, ctx.shared.config.max_outbound);
    }

    /// The opcode of this connection's data frames: binary for Phoenix V3 (MessagePack).
    pub fn data_op(&self) -> u8 {
        match self.protocol {
            Protocol::Phoenix(Vsn::V3) => OP_BINARY,
            _ => OP_TEXT,
        }
    }

    /// As [`Conn::to_wire`], for a frame the caller owns (no copy unless converted).
    fn wire_owned(&self, json: Vec<u8>) -> Vec<u8> {
        match self.protocol {
            Protocol::Phoenix(Vsn::V3) => msgpack::from_json(&json),
            _ => json,
        }
    }

    /// A frame the adapter wrote (JSON) in this connection's wire format.
    fn to_wire<'a>(&self, json: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match self.protocol {
            Protocol::Phoenix(Vsn::V3) => std::borrow::Cow::Owned(msgpack::from_json(json)),
            _ => std::borrow::Cow::Borrowed(json),
        }
    }

    /// Send a frame that may not be dropped (a reply, an error, a pong, a ping, a
    /// request sent again): queued unless the outbound queue would pass `limit` bytes.
    /// A device whose queue is that full does not read what it keeps asking for (one
    /// frame of bad actions can be answered by a frame many times its size), so it is
    /// closed with 1008 and counted (`router_outbound_overflow_total`) instead of
    /// costing the router more memory. False: not sent (closed, or closing).
    pub fn send_or_close(&self, ctx: &ShardCtx, op: u8, payload: &[u8], limit: usize) -> bool {
        // A frame over the whole budget is refused even when the queue is empty (it
        // would otherwise be written, and its rest queued, past the limit).
        if payload.len() <= limit && self.send(ctx, op, payload, limit) {
            return true;
        }
        if self.is_done() {
            return false;
        }
        ctx.metrics().outbound_overflow.fetch_add(1, Relaxed);
        self.fail(
            ctx,
            1008,
            "outbound limit: the device is not reading its replies",
        );
        false
    }

    /// Send a data frame already in the wire format (from [`Conn::encode_event`]) unless
    /// the outbound queue is over its limit; false = dropped.
    pub fn try_send_data(&self, ctx: &ShardCtx, payload: &[u8]) -> bool {
        self.send(ctx, self.data_op(), payload, ctx.shared.config.max_outbound)
    }

    /// A ping or pong, counted against --max-outbound (see [`Conn::send_or_close`]).
    pub fn send_control(&self, ctx: &ShardCtx, op: u8, payload: &[u8]) {
        self.send_or_close(ctx, op, payload, ctx.shared.config.max_outbound);
    }

    /// Write now if nothing is queued (no copy at all on the fast path); queue the rest.
    fn send(&self, ctx: &ShardCtx, op: u8, payload: &[u8], limit: usize) -> bool {
        self.send_after(ctx, &[], op, payload, limit)
    }

    /// The first bytes a handed-over connection gets: the HTTP 101 the listener left
    /// for the owner to send, and the protocol's greeting if it has one, in one write
    /// (one segment, one wake-up of the device instead of two).
    pub fn send_greeting(&self, ctx: &ShardCtx, preface: &[u8], greeting: Option<&[u8]>) {
        match greeting {
            Some(g) => {
                self.send_after(ctx, preface, OP_TEXT, g, usize::MAX);
            }
            None if !preface.is_empty() => {
                self.write_parts(ctx, &[preface], usize::MAX);
            }
            None => {}
        }
    }

    /// A frame, after `preface` raw bytes (usually none).
    fn send_after(
        &self,
        ctx: &ShardCtx,
        preface: &[u8],
        op: u8,
        payload: &[u8],
        limit: usize,
    ) -> bool {
        if self.is_done() {
            return true;
        }
        // permessage-deflate: a data message of some size goes out compressed (RSV1).
        let compressed = (op == OP_TEXT || op == OP_BINARY)
            && payload.len() >= ws::DEFLATE_MIN
            && self.st.borrow().deflate;
        let deflated;
        let payload = if compressed {
            deflated = ws::deflate(payload);
            &deflated[..]
        } else {
            payload
        };
        let mut h = [0u8; 10];
        let hl = ws::write_header(op, payload.len(), &mut h);
        if compressed {
            h[0] |= 0x40;
        }
        let total = (hl + payload.len()) as u64;
        let m = ctx.metrics();
        if !self.write_parts(ctx, &[preface, &h[..hl], payload], limit) {
            return false;
        }
        m.frames_out.fetch_add(1, Relaxed);
        m.bytes_out.fetch_add(total, Relaxed);
        true
    }

    /// Write `parts` now if nothing is queued; queue what the socket did not take.
    /// false: not sent, the queue would pass `limit` bytes.
    fn write_parts(&self, ctx: &ShardCtx, parts: &[&[u8]], limit: usize) -> bool {
        let mut st = self.st.borrow_mut();
        if st.closing || st.dead {
            return true;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let queued = st.bufs.as_ref().map_or(0, |b| b.queued());
        let tls_busy = st.tls.as_ref().is_some_and(|t| t.wants_write());
        if queued > 0 || tls_busy {
            if queued + total > limit {
                return false;
            }
            let b = st.bufs.get_or_insert_with(Box::default);
            for p in parts {
                b.out.extend_from_slice(p);
            }
            return true;
        }
        if let Some(tls) = st.tls.as_mut() {
            // Plaintext into rustls, then as much ciphertext as the socket takes now.
            for p in parts {
                let _ = tls.writer().write_all(p);
            }
            match flush_tls(tls, &self.stream) {
                Ok(true) => {}
                Ok(false) => {
                    drop(st);
                    self.wake(ctx);
                }
                Err(_) => {
                    st.dead = true;
                    drop(st);
                    self.wake(ctx);
                }
            }
            return true;
        }
        debug_assert!(
            parts.len() <= 3,
            "a preface, a header and a payload at most"
        );
        let mut slices = [IoSlice::new(&[]); 3];
        let n = parts.len().min(3);
        for (s, p) in slices.iter_mut().zip(parts) {
            *s = IoSlice::new(p);
        }
        let written = match (&self.stream).write_vectored(&slices[..n]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(_) => {
                st.dead = true;
                drop(st);
                self.wake(ctx);
                return true;
            }
        };
        if written < total {
            let b = st.bufs.get_or_insert_with(Box::default);
            b.out.clear();
            b.out_pos = 0;
            // Queue what is left: skip the `written` bytes across the parts.
            let mut skip = written;
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                b.out.extend_from_slice(&p[skip..]);
                skip = 0;
            }
            drop(st);
            self.wake(ctx);
        }
        true
    }

    /// Queue a close frame with `code` and stop reading; the task flushes and lingers.
    pub fn fail(&self, ctx: &ShardCtx, code: u16, reason: &str) {
        {
            let st = self.st.borrow();
            if st.closing || st.dead {
                return;
            }
        }
        ctx.metrics().close(code);
        // The close frame itself always goes (at most 125 bytes).
        self.send(ctx, OP_CLOSE, &ws::close_payload(code, reason), usize::MAX);
        self.st.borrow_mut().closing = true;
        self.wake(ctx);
    }

    /// Like [`Conn::fail`], but the device may still finish what it was saying: frames it
    /// sent before it saw the close are handled, not dropped (a drain loses no event).
    pub fn close_reading(&self, ctx: &ShardCtx, code: u16, reason: &str) {
        if self.is_done() {
            return;
        }
        self.fail(ctx, code, reason);
        self.st.borrow_mut().read_on = true;
    }

    fn flush(&self) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        if let Some(tls) = st.tls.as_mut() {
            loop {
                match flush_tls(tls, &self.stream) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(_) => {
                        st.dead = true;
                        return;
                    }
                }
                // rustls drained: hand it what queued meanwhile, and go again.
                match st.bufs.as_mut() {
                    Some(b) if b.queued() > 0 => {
                        let _ = tls.writer().write_all(&b.out[b.out_pos..]);
                        b.out = Vec::new();
                        b.out_pos = 0;
                    }
                    _ => break,
                }
            }
            if st.bufs.as_ref().is_some_and(|b| b.is_empty()) {
                st.bufs = None;
            }
            return;
        }
        let Some(b) = st.bufs.as_mut() else { return };
        while b.out_pos < b.out.len() {
            match (&self.stream).write(&b.out[b.out_pos..]) {
                Ok(n) => b.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    st.dead = true;
                    return;
                }
            }
        }
        // Drained: give the memory back, an idle connection keeps no buffer.
        b.out = Vec::new();
        b.out_pos = 0;
        if b.is_empty() {
            st.bufs = None;
        }
    }

    fn on_readable(&self, ctx: &ShardCtx) {
        let mut buf = ctx.read_buf.take();
        let tls = self.st.borrow().tls.is_some();
        for _ in 0..READS_PER_WAKE {
            if !ctx.may_read() {
                break;
            }
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.st.borrow_mut().dead = true;
                    break;
                }
                Ok(n) => {
                    ctx.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                    if tls {
                        self.on_ciphertext(ctx, &buf[..n]);
                    } else {
                        self.on_bytes(ctx, &mut buf[..n]);
                    }
                    // A short read emptied the socket: no second read that could only
                    // say WouldBlock (one syscall per pong or ack saved). The poller is
                    // level-triggered, so bytes that arrive meanwhile are reported again.
                    if self.is_done() || n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.st.borrow_mut().dead = true;
                    break;
                }
            }
        }
        *ctx.read_buf.borrow_mut() = buf;
        if tls && self.has_out() {
            self.flush();
        }
    }

    /// TLS: feed ciphertext to rustls and handle the plaintext it yields.
    fn on_ciphertext(&self, ctx: &ShardCtx, mut data: &[u8]) {
        while !data.is_empty() && !self.is_done() {
            let ok = {
                let mut st = self.st.borrow_mut();
                let Some(tls) = st.tls.as_mut() else { return };
                tls.read_tls(&mut data).is_ok() && tls.process_new_packets().is_ok()
            };
            if !ok {
                // A TLS error (bad record, alert): nothing more can be said on this connection.
                let mut st = self.st.borrow_mut();
                st.dead = true;
                return;
            }
            self.drain_plaintext(ctx);
        }
    }

    /// Hand every decrypted byte rustls holds to the frame parser.
    fn drain_plaintext(&self, ctx: &ShardCtx) {
        let mut plain = ctx.plain_buf.take();
        if plain.is_empty() {
            plain = vec![0u8; super::READ_BUF];
        }
        while !self.is_done() {
            let r = match self.st.borrow_mut().tls.as_mut() {
                Some(tls) => tls.reader().read(&mut plain),
                None => break,
            };
            match r {
                Ok(0) => {
                    // close_notify: the peer is done.
                    self.st.borrow_mut().dead = true;
                    break;
                }
                Ok(n) => self.on_bytes(ctx, &mut plain[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.st.borrow_mut().dead = true;
                    break;
                }
            }
        }
        *ctx.plain_buf.borrow_mut() = plain;
    }

    fn is_done(&self) -> bool {
        let st = self.st.borrow();
        st.dead || st.peer_closed || (st.closing && !st.read_on)
    }

    /// Closing but still reading what the peer sends (see [`Conn::close_reading`]).
    fn reads_while_closing(&self) -> bool {
        let st = self.st.borrow();
        st.closing && st.read_on && !st.peer_closed && !st.dead
    }

    fn has_out(&self) -> bool {
        let st = self.st.borrow();
        st.has_out() && !st.dead
    }
}

/// Write rustls's pending ciphertext; Ok(true) when all of it went out.
fn flush_tls(tls: &mut rustls::ServerConnection, stream: &TcpStream) -> io::Result<bool> {
    let mut w = stream;
    while tls.wants_write() {
        match tls.write_tls(&mut w) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    /// Memory per idle connection is a product feature: this guard fails when the
    /// per-connection struct grows past what the README's RSS figure was measured with.
    #[test]
    fn connection_state_stays_compact() {
        assert!(
            std::mem::size_of::<super::Conn>() <= 256,
            "{}",
            std::mem::size_of::<super::Conn>()
        );
    }
}
