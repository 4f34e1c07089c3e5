//! One authenticated device connection: its socket, its compact state (a `Phase`
//! and a few counters), and what the shard's loop calls when the poller reports it
//! ready (`readiness`). It has no task of its own. Idle, it holds no buffer (the shard
//! lends its read buffer) and no timer (the shard's tick pings it). It never blocks the
//! shard. Everything it sends goes through [`Conn::send`] or [`Conn::send_or_close`],
//! within a [`Limit`].

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
use crate::listener::OpenConnection;
use crate::protocol::hive::Meta;
use crate::protocol::hivekit::Subscriptions;
use crate::protocol::msgpack;
use crate::protocol::phoenix::PhxState;
use crate::protocol::phoenix::Vsn;
use crate::protocol::ws::{self, CloseCode, WsError, OP_BINARY, OP_CLOSE, OP_TEXT};

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
    st: State,
    /// What the protocol keeps per connection (Phoenix joins, Hivekit pubsub
    /// subscriptions); None while there is nothing (and always for Hive).
    adapter: Option<Box<Adapter>>,
    /// This socket's place in `router_open_connections`, given back when the
    /// connection is dropped (after the shard released it).
    _open: OpenConnection,
}

/// How far a frame may fill the connection's outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Not sent if the bytes waiting would pass this many (--max-outbound; twice that
    /// for requests).
    Bounded(usize),
    /// Always sent: the close frame (at most 127 bytes, once) and the greeting (once,
    /// on an empty queue).
    Exempt,
}

impl Limit {
    /// --max-outbound: events, replies, errors, pings and pongs.
    pub fn outbound(ctx: &mut ShardCtx) -> Limit {
        Limit::Bounded(ctx.shared.config.max_outbound)
    }

    /// Requests may queue up to twice --max-outbound: a device that far behind is not
    /// reading at all, so it is closed rather than buffered without end.
    pub fn requests(ctx: &mut ShardCtx) -> Limit {
        Limit::Bounded(ctx.shared.config.max_outbound.saturating_mul(2))
    }

    fn admits(self, queued: usize, more: usize) -> bool {
        match self {
            Limit::Bounded(max) => queued + more <= max,
            Limit::Exempt => true,
        }
    }
}

/// What became of a frame handed to the connection.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Written to the socket, or queued behind bytes it has not taken yet.
    Sent,
    /// Not sent: the outbound queue would have passed the frame's [`Limit`].
    Dropped,
    /// Not sent: the connection is closing or gone (nothing more goes out but what was
    /// queued before its close frame, and that frame).
    Closing,
}

/// Where a connection is in its life. Only an open connection sends; a closing one
/// flushes what is queued (its close frame last) and lingers for the peer's FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Our close frame is queued, or the device's close was answered.
    Closing {
        reads: Reads,
        linger: Linger,
    },
    /// The socket is gone (EOF, reset, a write error): released at once.
    Dead,
}

/// What a closing connection still reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// Nothing: what the peer still sends is discarded until its FIN.
    Nothing,
    /// Closing by drain: what the peer sent before it saw our close frame (events,
    /// acks) is still read and handled, until its close frame or FIN (or the linger
    /// deadline).
    UntilPeerCloses,
    /// The peer sent its close frame (answered): once the answer is out the close
    /// handshake is complete and the socket is closed at once, no shutdown, no linger.
    PeerClosed,
}

/// How far a closing connection has gone on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    /// Not settled by the shard since it began closing.
    NotStarted,
    /// The shard runs the linger deadline (TLS: close_notify queued).
    Started,
    /// All flushed and our write side shut down: waiting for the peer's FIN.
    WriteShut,
}

impl Phase {
    /// Frames from the peer are still parsed and handled.
    fn reads(self) -> bool {
        matches!(
            self,
            Phase::Open
                | Phase::Closing {
                    reads: Reads::UntilPeerCloses,
                    ..
                }
        )
    }
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

struct State {
    bufs: Option<Box<Bufs>>,
    /// TLS session (wss); None for plain connections.
    tls: Option<Box<rustls::ServerConnection>>,
    phase: Phase,
    last_seen: u32,
    next_ping: u32,
    /// The first second a pong is reported as device-alive again (0: the next one).
    next_alive: u32,
    bad_frames: u8,
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
    fn new(now: u32, next_ping: u32, tokens: u32, deflate: bool) -> Self {
        State {
            bufs: None,
            tls: None,
            phase: Phase::Open,
            last_seen: now,
            next_ping,
            next_alive: 0,
            bad_frames: 0,
            interest: IN,
            deflate,
            tokens,
            refilled_at: now,
            excess: 0,
        }
    }

    fn has_out(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| b.queued() > 0)
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &mut ShardCtx,
        id: u64,
        slot: u32,
        stream: TcpStream,
        tls: Option<Box<rustls::ServerConnection>>,
        ident: Identity,
        peer: SocketAddr,
        protocol: Protocol,
        deflate: bool,
        open: OpenConnection,
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
            st: State {
                tls: tls.map(|mut t| {
                    // Our own queue does the accounting (--max-outbound); rustls's default
                    // 64 KiB cap would make write_all fail midway through a frame.
                    t.set_buffer_limit(None);
                    t
                }),
                ..State::new(
                    now,
                    now + super::timer::first_ping_after(interval, id),
                    ctx.shared.config.device_burst,
                    deflate,
                )
            },
            adapter: match protocol {
                Protocol::Phoenix(vsn) => Some(Box::new(Adapter::Phoenix(
                    PhxState::with_extensions(vsn, ctx.shared.nerves_extensions.clone()),
                ))),
                _ => None,
            },
            _open: open,
        }
    }

    /// Something changed outside a readiness event (output queued, closing, dead):
    /// the shard's loop settles this connection at the end of its pass.
    fn wake(&self, ctx: &mut ShardCtx) {
        ctx.mark(self.slot);
    }

    pub fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    pub fn ping_due(&self, now: u32) -> bool {
        let st = &self.st;
        st.phase == Phase::Open && now >= st.next_ping
    }
    pub fn set_next_ping(&mut self, at: u32) {
        self.st.next_ping = at;
    }
    pub fn idle_for(&self, now: u32) -> u32 {
        now.saturating_sub(self.st.last_seen)
    }

    /// Send a frame the device asked for (a reply, an error), as the protocol adapter
    /// wrote it (JSON text; MessagePack in a binary frame for a Phoenix V3 device):
    /// counted against --max-outbound like everything queued for it (see
    /// [`Conn::send_or_close`]).
    pub fn send_text(&mut self, ctx: &mut ShardCtx, payload: &[u8]) {
        let wire = self.to_wire(payload);
        let limit = Limit::outbound(ctx);
        let _ = self.send_or_close(ctx, self.data_op(), &wire, limit);
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
    /// request sent again) within `limit`. A device whose queue is that full does not
    /// read what it keeps asking for (one frame of bad actions can be answered by a
    /// frame many times its size), so instead of costing the router more memory it is
    /// closed with 1008 and counted (`router_outbound_overflow_total`); `Dropped` then.
    pub fn send_or_close(
        &mut self,
        ctx: &mut ShardCtx,
        op: u8,
        payload: &[u8],
        limit: Limit,
    ) -> SendOutcome {
        // A frame over the whole budget is refused even when the queue is empty (it
        // would otherwise be written, and its rest queued, past the limit).
        if limit.admits(0, payload.len()) {
            match self.send(ctx, op, payload, limit) {
                SendOutcome::Dropped => {}
                sent => return sent,
            }
        }
        if self.is_done() {
            return SendOutcome::Dropped;
        }
        ctx.metrics().outbound_overflow.fetch_add(1, Relaxed);
        self.fail(
            ctx,
            CloseCode::PolicyViolation,
            "outbound limit: the device is not reading its replies",
        );
        SendOutcome::Dropped
    }

    /// Send a frame (a data frame already in the wire format, from
    /// [`Conn::encode_event`]; a control frame): written now if nothing is queued (no
    /// copy at all on the fast path), the rest queued; not sent past `limit`.
    pub fn send(
        &mut self,
        ctx: &mut ShardCtx,
        op: u8,
        payload: &[u8],
        limit: Limit,
    ) -> SendOutcome {
        self.send_frame(ctx, &[], op, payload, limit)
    }

    /// The first bytes a handed-over connection gets: the HTTP 101 the listener left
    /// for the owner to send, and the protocol's greeting if it has one, in one write
    /// (one segment, one wake-up of the device instead of two).
    pub fn send_greeting(&mut self, ctx: &mut ShardCtx, preface: &[u8], greeting: Option<&[u8]>) {
        let _ = match greeting {
            Some(g) => self.send_frame(ctx, preface, OP_TEXT, g, Limit::Exempt),
            None if !preface.is_empty() => self.write_parts(ctx, &[preface], Limit::Exempt),
            None => return,
        };
    }

    /// A frame, after `preface` raw bytes (usually none): compressed if
    /// permessage-deflate applies, then written or queued (see [`Conn::write_parts`]).
    fn send_frame(
        &mut self,
        ctx: &mut ShardCtx,
        preface: &[u8],
        op: u8,
        payload: &[u8],
        limit: Limit,
    ) -> SendOutcome {
        if self.is_done() {
            return SendOutcome::Closing;
        }
        // permessage-deflate: a data message of some size goes out compressed (RSV1).
        let compressed = (op == OP_TEXT || op == OP_BINARY)
            && payload.len() >= ws::DEFLATE_MIN
            && self.st.deflate;
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
        let sent = self.write_parts(ctx, &[preface, &h[..hl], payload], limit);
        if sent == SendOutcome::Sent {
            let m = ctx.metrics();
            m.frames_out.fetch_add(1, Relaxed);
            m.bytes_out.fetch_add(total, Relaxed);
        }
        sent
    }

    /// Write `parts` now if nothing is queued; queue what the socket did not take.
    /// Nothing is written while the connection is not open (its close frame is sent
    /// while it still is), nor when the queue would pass `limit`.
    fn write_parts(&mut self, ctx: &mut ShardCtx, parts: &[&[u8]], limit: Limit) -> SendOutcome {
        let st = &mut self.st;
        if st.phase != Phase::Open {
            return SendOutcome::Closing;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let queued = st.bufs.as_ref().map_or(0, |b| b.queued());
        let tls_busy = st.tls.as_ref().is_some_and(|t| t.wants_write());
        if queued > 0 || tls_busy {
            if !limit.admits(queued, total) {
                return SendOutcome::Dropped;
            }
            let b = st.bufs.get_or_insert_with(Box::default);
            for p in parts {
                b.out.extend_from_slice(p);
            }
            return SendOutcome::Sent;
        }
        if let Some(tls) = st.tls.as_mut() {
            // Plaintext into rustls, then as much ciphertext as the socket takes now.
            for p in parts {
                let _ = tls.writer().write_all(p);
            }
            return match flush_tls(tls, &self.stream) {
                Ok(true) => SendOutcome::Sent,
                Ok(false) => {
                    self.wake(ctx);
                    SendOutcome::Sent
                }
                Err(_) => {
                    st.phase = Phase::Dead;
                    self.wake(ctx);
                    SendOutcome::Closing
                }
            };
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
                st.phase = Phase::Dead;
                self.wake(ctx);
                return SendOutcome::Closing;
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
            self.wake(ctx);
        }
        SendOutcome::Sent
    }

    /// Queue a close frame with `code` and stop reading; the shard's loop flushes it
    /// and lingers (see `readiness`). Counted in `router_closes_total`.
    pub fn fail(&mut self, ctx: &mut ShardCtx, code: CloseCode, reason: &str) {
        if self.st.phase != Phase::Open {
            return;
        }
        ctx.metrics().close(code);
        // The close frame itself always goes (at most 127 bytes).
        let _ = self.send(
            ctx,
            OP_CLOSE,
            &ws::close_payload(code, reason),
            Limit::Exempt,
        );
        {
            let st = &mut self.st;
            // (Unless writing it found the socket gone.)
            if st.phase == Phase::Open {
                st.phase = Phase::Closing {
                    reads: Reads::Nothing,
                    linger: Linger::NotStarted,
                };
            }
        }
        self.wake(ctx);
    }

    /// [`Conn::fail`] for a WebSocket-level error: its close code, and why as the reason.
    pub(super) fn fail_ws(&mut self, ctx: &mut ShardCtx, e: WsError) {
        self.fail(ctx, e.close_code(), &e.to_string());
    }

    /// Like [`Conn::fail`], but the device may still finish what it was saying: frames it
    /// sent before it saw the close are handled, not dropped (a drain loses no event).
    pub fn close_reading(&mut self, ctx: &mut ShardCtx, code: CloseCode, reason: &str) {
        if self.is_done() {
            return;
        }
        self.fail(ctx, code, reason);
        let st = &mut self.st;
        if let Phase::Closing { reads, .. } = &mut st.phase {
            *reads = Reads::UntilPeerCloses;
        }
    }

    fn flush(&mut self) {
        let st = &mut self.st;
        if let Some(tls) = st.tls.as_mut() {
            loop {
                match flush_tls(tls, &self.stream) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(_) => {
                        st.phase = Phase::Dead;
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
                    st.phase = Phase::Dead;
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

    fn on_readable(&mut self, ctx: &mut ShardCtx) {
        let mut buf = std::mem::take(&mut ctx.read_buf);
        let tls = self.st.tls.is_some();
        for _ in 0..READS_PER_WAKE {
            if !ctx.may_read() {
                break;
            }
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.st.phase = Phase::Dead;
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
                    self.st.phase = Phase::Dead;
                    break;
                }
            }
        }
        ctx.read_buf = buf;
        if tls && self.has_out() {
            self.flush();
        }
    }

    /// TLS: feed ciphertext to rustls and handle the plaintext it yields.
    fn on_ciphertext(&mut self, ctx: &mut ShardCtx, mut data: &[u8]) {
        while !data.is_empty() && !self.is_done() {
            let ok = {
                let st = &mut self.st;
                let Some(tls) = st.tls.as_mut() else { return };
                tls.read_tls(&mut data).is_ok() && tls.process_new_packets().is_ok()
            };
            if !ok {
                // A TLS error (bad record, alert): nothing more can be said on this connection.
                self.st.phase = Phase::Dead;
                return;
            }
            self.drain_plaintext(ctx);
        }
    }

    /// Hand every decrypted byte rustls holds to the frame parser.
    fn drain_plaintext(&mut self, ctx: &mut ShardCtx) {
        let mut plain = std::mem::take(&mut ctx.plain_buf);
        if plain.is_empty() {
            plain = vec![0u8; super::READ_BUF];
        }
        while !self.is_done() {
            let r = match self.st.tls.as_mut() {
                Some(tls) => tls.reader().read(&mut plain),
                None => break,
            };
            match r {
                Ok(0) => {
                    // close_notify: the peer is done.
                    self.st.phase = Phase::Dead;
                    break;
                }
                Ok(n) => self.on_bytes(ctx, &mut plain[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.st.phase = Phase::Dead;
                    break;
                }
            }
        }
        ctx.plain_buf = plain;
    }

    /// Nothing more is read from the peer, nor sent to it but what is queued.
    fn is_done(&self) -> bool {
        !self.st.phase.reads()
    }

    /// Closing but still reading what the peer sends (see [`Conn::close_reading`]).
    fn reads_while_closing(&self) -> bool {
        matches!(
            self.st.phase,
            Phase::Closing {
                reads: Reads::UntilPeerCloses,
                ..
            }
        )
    }

    fn has_out(&self) -> bool {
        let st = &self.st;
        st.has_out() && st.phase != Phase::Dead
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
    use super::*;

    /// Memory per idle connection is a product feature: this guard fails when the
    /// per-connection struct grows past what the README's RSS figure was measured with.
    /// (160 bytes since the shard owns its connections outright: no RefCell flags for
    /// the state and the adapter, and no Rc around it; 176 before.)
    #[test]
    fn connection_state_stays_compact() {
        let conn = std::mem::size_of::<Conn>();
        let state = std::mem::size_of::<State>();
        println!(
            "size_of Conn {conn}, State {state}, Phase {}",
            std::mem::size_of::<Phase>()
        );
        assert!(conn <= 160, "Conn is {conn} bytes");
        assert!(state <= 48, "State is {state} bytes");
        assert_eq!(std::mem::size_of::<Phase>(), 2);
    }

    #[test]
    fn limits_and_phases_say_what_they_mean() {
        assert!(Limit::Bounded(10).admits(4, 6));
        assert!(!Limit::Bounded(10).admits(4, 7));
        assert!(Limit::Exempt.admits(usize::MAX, 1));
        let closing = |reads| Phase::Closing {
            reads,
            linger: Linger::Started,
        };
        assert!(Phase::Open.reads());
        assert!(closing(Reads::UntilPeerCloses).reads());
        assert!(!closing(Reads::Nothing).reads());
        assert!(!closing(Reads::PeerClosed).reads());
        assert!(!Phase::Dead.reads());
    }
}
