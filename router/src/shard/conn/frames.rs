//! Bytes in, frames out: a connection's received bytes parsed into WebSocket frames
//! (an incomplete frame's bytes, only those, held for the next read), control frames
//! answered, and complete messages handed to `messages`.

use std::sync::atomic::Ordering::Relaxed;

use super::{Conn, Limit, Linger, Phase, Reads};
use crate::bus::RoutingKey;
use crate::protocol::hive;
use crate::protocol::ws::{
    self, CloseCode, FrameHeader, WsError, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT,
};
use crate::shard::{Protocol, ShardCtx};

impl Conn {
    /// Feed received bytes; keeps an incomplete frame's bytes (only those) for later.
    /// Bytes held from an earlier read are completed with only what their frame still
    /// lacks, and the rest of `data` is parsed where it lies: appending a whole 64 KiB
    /// read to a held partial frame copied nearly every byte of a flood once more.
    pub(super) fn on_bytes(&mut self, ctx: &mut ShardCtx, data: &mut [u8]) {
        let held = self
            .st
            .bufs
            .as_mut()
            .map(|b| std::mem::take(&mut b.inbuf))
            .unwrap_or_default();
        let mut from = 0;
        if !held.is_empty() {
            let mut held = held;
            from = complete_frame(&mut held, data, ctx.shared.config.max_frame);
            let used = self.parse_frames(ctx, &mut held);
            if used < held.len() {
                // Still short of a frame (`data` is used up), or paused by backpressure:
                // everything not handled waits, in order.
                held.drain(..used);
                held.extend_from_slice(&data[from..]);
                self.keep_unparsed(Some(held));
                return;
            }
        }
        let data = &mut data[from..];
        let used = self.parse_frames(ctx, data);
        self.keep_unparsed((used < data.len()).then(|| data[used..].to_vec()));
    }

    fn keep_unparsed(&mut self, rest: Option<Vec<u8>>) {
        let st = &mut self.st;
        match rest {
            Some(rest) if st.phase.reads() => st.bufs.get_or_insert_with(Box::default).inbuf = rest,
            _ => {
                if st.bufs.as_ref().is_some_and(|b| b.is_empty()) {
                    st.bufs = None;
                }
            }
        }
    }

    /// Parse and handle every complete frame in `data`; returns the bytes consumed.
    fn parse_frames(&mut self, ctx: &mut ShardCtx, data: &mut [u8]) -> usize {
        let max = ctx.shared.config.max_frame;
        let mut pos = 0;
        while !self.is_done() {
            if pos < data.len() && !ctx.may_read() {
                // Backpressure: the rest waits (kept as this connection's pending bytes)
                // until the bus has drained; the shard resumes us then.
                ctx.hold(self.slot);
                break;
            }
            let h = match ws::parse_header(&data[pos..], max) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.fail_ws(ctx, e);
                    return data.len();
                }
            };
            if data.len() - pos < h.total_len() {
                break;
            }
            let payload = &mut data[pos + h.header_len..pos + h.total_len()];
            ws::unmask(payload, h.mask);
            pos += h.total_len();
            ctx.metrics().frames_in.fetch_add(1, Relaxed);
            self.on_frame(ctx, h, payload);
        }
        pos
    }

    fn on_frame(&mut self, ctx: &mut ShardCtx, h: FrameHeader, payload: &mut [u8]) {
        let now = ctx.now_secs();
        let deflate = {
            let st = &mut self.st;
            st.last_seen = now;
            st.deflate.receives()
        };
        // RSV1 (compressed) only with permessage-deflate, and only on a message's first
        // frame (RFC 7692 §6.1).
        if h.rsv1 && (!deflate || h.opcode == OP_CONT) {
            self.fail_ws(ctx, WsError::Reserved);
            return;
        }
        if h.opcode == OP_CLOSE {
            self.on_close(ctx, payload);
            return;
        }
        // Every other frame costs a token of the per-device rate limit: pongs, pings and
        // each fragment of a message too, so a flood of frames that carry nothing (empty
        // continuations, unsolicited pongs) is refused, then closed 1008, like a flood
        // of messages, and its shard neighbours keep their latency.
        if !self.admit(ctx) {
            // A fragment cannot be dropped without corrupting its message.
            let fragment = h.opcode == OP_CONT || !h.fin;
            if fragment {
                self.fail(
                    ctx,
                    CloseCode::PolicyViolation,
                    "rate limit exceeded inside a fragmented message",
                );
            }
            return;
        }
        match h.opcode {
            OP_PING => {
                let limit = Limit::outbound(ctx);
                let _ = self.send_or_close(ctx, OP_PONG, payload, limit);
            }
            OP_PONG => self.on_pong(ctx, now),
            OP_CONT => {
                let st = &mut self.st;
                let b = st.bufs.get_or_insert_with(Box::default);
                if b.msg_op == 0 {
                    self.fail_ws(ctx, WsError::OrphanContinuation);
                    return;
                }
                if b.msg.len() + payload.len() > ctx.shared.config.max_frame {
                    self.fail_ws(ctx, WsError::TooBig);
                    return;
                }
                // Frames one message may be split into (--max-fragments; each also
                // costs a rate-limit token).
                b.msg_frames = b.msg_frames.saturating_add(1);
                if b.msg_frames > ctx.shared.config.max_fragments {
                    self.fail_ws(ctx, WsError::TooManyFragments);
                    return;
                }
                b.msg.extend_from_slice(payload);
                if b.msg_op == OP_TEXT && !b.msg_deflated {
                    if let Err(e) = text_so_far(&b.msg, &mut b.msg_utf8) {
                        self.fail_ws(ctx, e);
                        return;
                    }
                }
                if h.fin {
                    let op = b.msg_op;
                    let mut msg = std::mem::take(&mut b.msg);
                    let deflated = std::mem::take(&mut b.msg_deflated);
                    b.msg_op = 0;
                    b.msg_frames = 0;
                    b.msg_utf8 = 0;
                    self.on_whole_message(ctx, op, deflated, &mut msg);
                }
            }
            op => {
                let st = &mut self.st;
                if st.bufs.as_ref().is_some_and(|b| b.msg_op != 0) {
                    self.fail_ws(ctx, WsError::NestedMessage);
                    return;
                }
                if h.fin {
                    self.on_whole_message(ctx, op, h.rsv1, payload);
                } else {
                    let mut checked = 0;
                    if op == OP_TEXT && !h.rsv1 {
                        if let Err(e) = text_so_far(payload, &mut checked) {
                            self.fail_ws(ctx, e);
                            return;
                        }
                    }
                    let b = st.bufs.get_or_insert_with(Box::default);
                    b.msg_op = op;
                    b.msg_frames = 1;
                    b.msg_deflated = h.rsv1;
                    b.msg_utf8 = checked;
                    b.msg = payload.to_vec();
                }
            }
        }
    }

    /// A complete message, inflated first when compressed (within --max-frame: a
    /// message that inflates past it closes 1009, data that is not deflate 1007).
    fn on_whole_message(&mut self, ctx: &mut ShardCtx, op: u8, deflated: bool, payload: &mut [u8]) {
        if !deflated {
            self.on_message(ctx, op, payload);
            return;
        }
        match ws::inflate(payload, ctx.shared.config.max_frame) {
            Ok(mut msg) => self.on_message(ctx, op, &mut msg),
            Err(e) => self.fail_ws(ctx, e),
        }
    }

    /// The device's close frame: answered with the same code (RFC 6455 §5.5.1), or, if
    /// the frame is malformed (see `ws::check_close`), with 1002 or 1007. Both counted.
    fn on_close(&mut self, ctx: &mut ShardCtx, payload: &[u8]) {
        ctx.metrics().peer_closes.fetch_add(1, Relaxed);
        // (Closing already: ours is out, and `fail` sends nothing more: the handshake
        // is complete.)
        match ws::check_close(payload) {
            Ok(code) => self.fail(ctx, code.unwrap_or(CloseCode::Normal), ""),
            Err(e) => self.fail_ws(ctx, e),
        }
        let st = &mut self.st;
        st.phase = match st.phase {
            Phase::Open => Phase::Closing {
                reads: Reads::PeerClosed,
                linger: Linger::NotStarted,
            },
            Phase::Closing { linger, .. } => Phase::Closing {
                reads: Reads::PeerClosed,
                linger,
            },
            Phase::Dead => Phase::Dead,
        };
    }

    fn on_pong(&mut self, ctx: &mut ShardCtx, now: u32) {
        if self.protocol == Protocol::ConformanceEcho {
            // No device: nothing to report alive.
            return;
        }
        // At most one device-alive per `device_alive_gap`: every solicited pong counts
        // (or one per --device-alive-interval), a device spraying unsolicited pongs does
        // not flood the backend.
        let min_gap = ctx.shared.config.device_alive_gap() as u32;
        {
            let st = &mut self.st;
            if now < st.next_alive {
                return;
            }
            st.next_alive = now.saturating_add(min_gap);
        }
        ctx.metrics().alive_events.fetch_add(1, Relaxed);
        let body = hive::device_alive(&self.meta, &self.peer.to_string());
        ctx.publish_lazy(RoutingKey::concat(&["hive-backend.device-alive"]), body);
    }
}

/// A fragmented text message is checked for UTF-8 as its fragments come, from where the
/// last check stopped (`checked`): a device is failed with 1007 at the first fragment no
/// continuation can make valid, not once it has sent the whole message. (The whole
/// message is checked again by its protocol: this only fails earlier.)
fn text_so_far(msg: &[u8], checked: &mut usize) -> Result<(), WsError> {
    *checked += ws::utf8_prefix(&msg[*checked..])?;
    Ok(())
}

/// Move into `held` (bytes from the start of a frame) what that frame still lacks, as far
/// as `data` has it; returns how many bytes of `data` were taken. The header comes first,
/// a byte at a time (at most 14), since its length says how long the frame is.
fn complete_frame(held: &mut Vec<u8>, data: &[u8], max_payload: usize) -> usize {
    let mut taken = 0;
    loop {
        match ws::parse_header(held, max_payload) {
            Ok(Some(h)) => {
                let take = h
                    .total_len()
                    .saturating_sub(held.len())
                    .min(data.len() - taken);
                held.extend_from_slice(&data[taken..taken + take]);
                return taken + take;
            }
            Ok(None) if taken < data.len() => {
                held.push(data[taken]);
                taken += 1;
            }
            // Out of bytes, or a bad header (which parse_frames refuses).
            _ => return taken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(payload_len: usize) -> Vec<u8> {
        let payload = vec![b'x'; payload_len];
        let mut frame = Vec::new();
        ws::encode_frame(OP_TEXT, &payload, &mut frame);
        frame[1] |= 0x80;
        let header = frame.len() - payload.len();
        frame.splice(header..header, [1u8, 2, 3, 4]);
        frame
    }

    #[test]
    fn a_held_frame_takes_only_what_it_lacks() {
        // 7-bit and 16-bit lengths, cut at every byte, header included.
        for len in [0, 5, 125, 126, 300] {
            let frame = masked(len);
            for cut in 1..frame.len() {
                let mut held = frame[..cut].to_vec();
                let mut data = frame[cut..].to_vec();
                data.extend_from_slice(b"NEXT");
                let taken = complete_frame(&mut held, &data, 1 << 20);
                assert_eq!(held, frame, "len {len} cut {cut}");
                assert_eq!(&data[taken..], b"NEXT");
                // A read that stops short of the frame's end is taken whole.
                let mut held = frame[..cut].to_vec();
                let short = &frame[cut..frame.len() - 1];
                assert_eq!(complete_frame(&mut held, short, 1 << 20), short.len());
                assert_eq!(held, frame[..frame.len() - 1]);
            }
        }
        // A bad header takes nothing more (the frame parser refuses it).
        let mut held = vec![0x83];
        assert_eq!(complete_frame(&mut held, &[0x85, 1, 2, 3], 1 << 20), 1);
    }
}
