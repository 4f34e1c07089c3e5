//! What a connection sends: one path for every frame ([`Conn::send`], or
//! [`Conn::send_or_close`] for a frame that may not be dropped), written at once with
//! `writev` when nothing is queued, queued within a [`Limit`] otherwise, and flushed
//! when the socket takes more. TLS connections write through rustls.

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;

use super::{Conn, Phase};
use crate::protocol::msgpack;
use crate::protocol::phoenix::Vsn;
use crate::protocol::ws::{self, CloseCode, OP_BINARY, OP_TEXT};
use crate::shard::{Protocol, ShardCtx};

/// How far a frame may fill the connection's outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Not sent if the bytes waiting would pass this many (--max-outbound; twice that
    /// for requests).
    Bounded(usize),
    /// Always sent: the close frame (at most 127 bytes, once) and the greeting (once,
    /// on an empty queue).
    Exempt,
}

impl Limit {
    /// --max-outbound: events, replies, errors, pings and pongs.
    pub(crate) fn outbound(ctx: &ShardCtx) -> Limit {
        Limit::Bounded(ctx.shared.config.max_outbound)
    }

    /// Requests may queue up to twice --max-outbound: a device that far behind is not
    /// reading at all, so it is closed rather than buffered without end.
    pub(crate) fn requests(ctx: &ShardCtx) -> Limit {
        Limit::Bounded(ctx.shared.config.max_outbound.saturating_mul(2))
    }

    pub(crate) fn admits(self, queued: usize, more: usize) -> bool {
        match self {
            Limit::Bounded(max) => queued + more <= max,
            Limit::Exempt => true,
        }
    }
}

/// What became of a frame handed to the connection.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendOutcome {
    /// Written to the socket, or queued behind bytes it has not taken yet.
    Sent,
    /// Not sent: the outbound queue would have passed the frame's [`Limit`].
    Dropped,
    /// Not sent: the connection is closing or gone (nothing more goes out but what was
    /// queued before its close frame, and that frame).
    Closing,
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

impl Conn {
    /// Send a frame the device asked for (a reply, an error), as the protocol adapter
    /// wrote it (JSON text; MessagePack in a binary frame for a Phoenix V3 device):
    /// counted against --max-outbound like everything queued for it (see
    /// [`Conn::send_or_close`]).
    pub(crate) fn send_text(&mut self, ctx: &mut ShardCtx, payload: &[u8]) {
        let wire = self.to_wire(payload);
        let limit = Limit::outbound(ctx);
        let _ = self.send_or_close(ctx, self.data_op(), &wire, limit);
    }

    /// The opcode of this connection's data frames: binary for Phoenix V3 (MessagePack).
    pub(crate) fn data_op(&self) -> u8 {
        match self.protocol {
            Protocol::Phoenix(Vsn::V3) => OP_BINARY,
            _ => OP_TEXT,
        }
    }

    /// As [`Conn::to_wire`], for a frame the caller owns (no copy unless converted).
    pub(super) fn wire_owned(&self, json: Vec<u8>) -> Vec<u8> {
        match self.protocol {
            Protocol::Phoenix(Vsn::V3) => msgpack::from_json(&json),
            _ => json,
        }
    }

    /// A frame the adapter wrote (JSON) in this connection's wire format.
    pub(super) fn to_wire<'a>(&self, json: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
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
    pub(crate) fn send_or_close(
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
    pub(crate) fn send(
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
    pub(crate) fn send_greeting(
        &mut self,
        ctx: &mut ShardCtx,
        preface: &[u8],
        greeting: Option<&[u8]>,
    ) {
        let _ = match greeting {
            Some(g) => self.send_frame(ctx, preface, OP_TEXT, g, Limit::Exempt),
            None if !preface.is_empty() => self.write_parts(ctx, &[preface], Limit::Exempt),
            None => return,
        };
    }

    /// A frame, after `preface` raw bytes (usually none): compressed if
    /// permessage-deflate applies, then written or queued (see [`Conn::write_parts`]).
    pub(super) fn send_frame(
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
            && self.st.deflate.compresses();
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
    pub(super) fn write_parts(
        &mut self,
        ctx: &mut ShardCtx,
        parts: &[&[u8]],
        limit: Limit,
    ) -> SendOutcome {
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

    pub(super) fn flush(&mut self) {
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
}
