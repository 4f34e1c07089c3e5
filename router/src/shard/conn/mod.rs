//! One authenticated device connection: its socket, its compact state (a `Phase`
//! and a few counters), and what the shard's loop calls when the poller reports it
//! ready (`readiness`). It has no task of its own. Idle, it holds no buffer (the shard
//! lends its read buffer) and no timer (the shard's tick pings it). It never blocks the
//! shard. Everything it sends goes through [`Conn::send`] or [`Conn::send_or_close`],
//! within a [`Limit`].
//!
//! Here: the connection's state and its closes. `readiness`: reads and readiness
//! events; `frames`: bytes to WebSocket frames; `messages`: whole messages to the
//! protocol adapter and the shard; `send`: the one send path and the flush.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

mod frames;
mod messages;
mod readiness;
mod send;

pub(crate) use send::{Limit, SendOutcome};

use super::poller::IN;
use super::{Protocol, ShardCtx};
use crate::auth::Identity;
use crate::listener::OpenConnection;
use crate::protocol::hive::Meta;
use crate::protocol::hivekit::Subscriptions;
use crate::protocol::phoenix::PhxState;
use crate::protocol::ws::{self, CloseCode, WsError, OP_CLOSE};

/// How long a closing connection may take to flush and see the peer's FIN.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Reads per readiness event before yielding to other connections.
const READS_PER_WAKE: usize = 4;

pub(crate) struct Conn {
    pub(crate) id: u64,
    /// Index in the shard's slab, and the key of its epoll registration.
    pub(crate) slot: u32,
    pub(crate) meta: Meta,
    pub(crate) peer: SocketAddr,
    pub(crate) protocol: Protocol,
    pub(crate) connected_at_ms: u64,
    stream: TcpStream,
    st: State,
    /// What the protocol keeps per connection (Phoenix joins, Hivekit pubsub
    /// subscriptions); None while there is nothing (and always for Hive).
    adapter: Option<Box<Adapter>>,
    /// This socket's place in `router_open_connections`, given back when the
    /// connection is dropped (after the shard released it).
    _open: OpenConnection,
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
    /// Frames of `msg` so far (bounded by --max-fragments: see `frames`).
    msg_frames: u32,
    /// `msg` is compressed (its first frame had RSV1).
    msg_deflated: bool,
    /// How far a fragmented text message is known to be UTF-8 (checked fragment by
    /// fragment, unless compressed: see `frames`).
    msg_utf8: usize,
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
    /// permessage-deflate as negotiated (no context takeover: no state kept for it).
    deflate: ws::Deflate,
    /// Per-device rate limit: tokens left, the second they were last refilled, and
    /// messages refused since the last one admitted.
    tokens: u32,
    refilled_at: u32,
    excess: u32,
}

impl State {
    fn new(now: u32, next_ping: u32, tokens: u32, deflate: ws::Deflate) -> Self {
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
    pub(crate) fn new(
        ctx: &ShardCtx,
        id: u64,
        slot: u32,
        stream: TcpStream,
        tls: Option<Box<rustls::ServerConnection>>,
        ident: Identity,
        peer: SocketAddr,
        protocol: Protocol,
        deflate: ws::Deflate,
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

    pub(crate) fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    pub(crate) fn ping_due(&self, now: u32) -> bool {
        let st = &self.st;
        st.phase == Phase::Open && now >= st.next_ping
    }
    pub(crate) fn set_next_ping(&mut self, at: u32) {
        self.st.next_ping = at;
    }
    pub(crate) fn idle_for(&self, now: u32) -> u32 {
        now.saturating_sub(self.st.last_seen)
    }

    /// Queue a close frame with `code` and stop reading; the shard's loop flushes it
    /// and lingers (see `readiness`). Counted in `router_closes_total`.
    pub(crate) fn fail(&mut self, ctx: &mut ShardCtx, code: CloseCode, reason: &str) {
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
    pub(crate) fn close_reading(&mut self, ctx: &mut ShardCtx, code: CloseCode, reason: &str) {
        if self.is_done() {
            return;
        }
        self.fail(ctx, code, reason);
        let st = &mut self.st;
        if let Phase::Closing { reads, .. } = &mut st.phase {
            *reads = Reads::UntilPeerCloses;
        }
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
