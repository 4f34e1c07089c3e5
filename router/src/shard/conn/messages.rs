//! What a connection does with a complete message: the per-device rate limit, then the
//! protocol adapter (Hive decode, or Phoenix/Hivekit effects) and the shard calls that
//! follow; and how messages for the device are encoded in its protocol.

use std::sync::atomic::Ordering::Relaxed;

use super::{Adapter, Conn};
use crate::bus::RoutingKey;
use crate::protocol::effect::Effect;
use crate::protocol::hive::{self, Inbound, Meta};
use crate::protocol::hivekit::{self, Subscriptions};
use crate::protocol::phoenix::{self, Vsn};
use crate::protocol::ws::{CloseCode, WsError, OP_BINARY, OP_TEXT};
use crate::shard::{Protocol, ShardCtx};

/// Malformed frames in a row before the router gives up with 4400.
const MAX_BAD_FRAMES: u8 = 10;

impl Conn {
    /// Token bucket per device: refill at --device-rate per second up to --device-burst.
    /// A refused message is not parsed; the first refusal of a run is answered, and a
    /// whole burst's worth of refusals in a row closes the connection with 1008.
    pub(super) fn admit(&mut self, ctx: &mut ShardCtx) -> bool {
        let now = ctx.now_secs();
        // --account-max-rate: the account's share on this shard, before the device's own.
        let account_ok = match &mut ctx.account_rates {
            Some(r) => {
                let tenants = &ctx.shared.tenants;
                let share = tenants.max_rate.div_ceil(ctx.shared.shards.len() as u32);
                let ok = r.admit(self.meta.account, now, share);
                if !ok {
                    tenants.metrics.refused_rate.fetch_add(1, Relaxed);
                }
                ok
            }
            None => true,
        };
        let cfg = &ctx.shared.config;
        let excess = {
            let st = &mut self.st;
            if now > st.refilled_at {
                let add = (now - st.refilled_at).saturating_mul(cfg.device_rate);
                st.tokens = st.tokens.saturating_add(add).min(cfg.device_burst.max(1));
                st.refilled_at = now;
            }
            if account_ok && st.tokens > 0 {
                st.tokens -= 1;
                st.excess = 0;
                return true;
            }
            st.excess += 1;
            st.excess
        };
        ctx.metrics().rate_limited.fetch_add(1, Relaxed);
        if excess >= cfg.device_burst.max(1) {
            self.fail(ctx, CloseCode::PolicyViolation, "rate limit exceeded");
        } else if excess == 1 {
            let frame = match self.protocol {
                Protocol::Hive => hive::error("rate-limited", "too many messages; slow down"),
                Protocol::Phoenix(vsn) => phoenix::encode(
                    vsn,
                    None,
                    None,
                    "phoenix",
                    "rate_limited",
                    br#"{"reason":"too many messages"}"#,
                ),
                Protocol::Hivekit => br#"[{"res":"err","err":"rate-limited","erc":429}]"#.to_vec(),
                // Echoes nothing but what it received.
                Protocol::ConformanceEcho => return false,
            };
            self.send_text(ctx, &frame);
        }
        false
    }

    /// A complete message (its frames were admitted by the rate limit one by one).
    pub(super) fn on_message(&mut self, ctx: &mut ShardCtx, op: u8, payload: &mut [u8]) {
        if self.protocol == Protocol::ConformanceEcho {
            self.echo(ctx, op, payload);
            return;
        }
        if self.protocol == Protocol::Phoenix(Vsn::V3) {
            // MessagePack in binary frames only; converted to the V2 text the adapter
            // reads. A frame that is not MessagePack is a bad frame, as in V2.
            if op != OP_BINARY {
                self.fail(
                    ctx,
                    CloseCode::BadFrames,
                    "vsn 3.0.0 frames are binary (MessagePack)",
                );
                return;
            }
            let mut effects = Vec::new();
            match crate::protocol::msgpack::to_json(payload) {
                Ok(text) => {
                    if let Some(Adapter::Phoenix(phx)) = self.adapter.as_deref_mut() {
                        phx.on_text(&self.meta, &text, &mut ctx.scratch, &mut effects);
                    }
                }
                Err(_) => effects.push(Effect::Error(phoenix::BAD_FRAME)),
            }
            self.apply(ctx, effects);
            return;
        }
        if op == OP_BINARY {
            self.fail(
                ctx,
                CloseCode::BadFrames,
                "binary frames are not part of this protocol",
            );
            return;
        }
        // Hive, Hivekit and Phoenix V2 frames go through the JSON validator first, which
        // accepts only valid UTF-8 (a byte >= 0x80 may only stand inside a string, and
        // such a string is checked): a frame it refuses is checked for UTF-8 then, to
        // answer 1007 rather than a protocol error. Phoenix V1 objects go through
        // serde_json, which does not check the strings it skips: checked here.
        if matches!(self.protocol, Protocol::Phoenix(Vsn::V1)) && !self.utf8_or_fail(ctx, payload) {
            return;
        }
        match self.protocol {
            // (Answered above.)
            Protocol::ConformanceEcho => {}
            Protocol::Hive => self.on_hive(ctx, payload),
            Protocol::Phoenix(_) => {
                let mut effects = Vec::new();
                if let Some(Adapter::Phoenix(phx)) = self.adapter.as_deref_mut() {
                    phx.on_text(&self.meta, payload, &mut ctx.scratch, &mut effects);
                }
                self.apply_unless_not_utf8(ctx, payload, phoenix::BAD_FRAME, effects);
            }
            Protocol::Hivekit => {
                let mut effects = Vec::new();
                let slot = &mut self.adapter;
                hivekit_session(&self.meta, &ctx.shared.config.hivekit_realm, |s| {
                    let mut fresh = Subscriptions::default();
                    let subs = match slot.as_deref_mut() {
                        Some(Adapter::Hivekit(subs)) => subs,
                        _ => &mut fresh,
                    };
                    hivekit::on_text(s, subs, payload, &mut ctx.scratch, &mut effects);
                    // Kept only while there are subscriptions.
                    if !fresh.is_empty() {
                        *slot = Some(Box::new(Adapter::Hivekit(fresh)));
                    } else if matches!(slot.as_deref(), Some(Adapter::Hivekit(s)) if s.is_empty()) {
                        *slot = None;
                    }
                });
                self.apply_unless_not_utf8(ctx, payload, hivekit::BAD_FRAME, effects);
            }
        }
    }

    /// The conformance echo: a text message that is UTF-8, or a binary message, goes back
    /// whole with its opcode (compressed again under permessage-deflate), within
    /// --max-outbound like any reply; nothing else happens.
    fn echo(&mut self, ctx: &mut ShardCtx, op: u8, payload: &[u8]) {
        if op == OP_TEXT && !self.utf8_or_fail(ctx, payload) {
            return;
        }
        let limit = crate::shard::conn::Limit::outbound(ctx);
        let _ = self.send_or_close(ctx, op, payload, limit);
    }

    /// A frame the adapter refused as not its format (`bad_frame` first) may not be
    /// UTF-8 either (see `on_message`): then it closes 1007; otherwise the effects apply.
    fn apply_unless_not_utf8(
        &mut self,
        ctx: &mut ShardCtx,
        payload: &[u8],
        bad_frame: &str,
        effects: Vec<Effect>,
    ) {
        if matches!(effects.first(), Some(Effect::Error(code)) if *code == bad_frame)
            && !self.utf8_or_fail(ctx, payload)
        {
            return;
        }
        self.apply(ctx, effects);
    }

    /// RFC 6455: a text message that is not UTF-8 fails the connection with 1007.
    fn utf8_or_fail(&mut self, ctx: &mut ShardCtx, payload: &[u8]) -> bool {
        if simdutf8::basic::from_utf8(payload).is_ok() {
            return true;
        }
        self.fail_ws(ctx, WsError::Utf8);
        false
    }

    fn on_hive(&mut self, ctx: &mut ShardCtx, payload: &[u8]) {
        if payload.first() == Some(&b'B') {
            if let Some(token) = std::str::from_utf8(payload)
                .ok()
                .and_then(crate::auth::bearer_token)
            {
                self.reauthenticate(ctx, token);
                return;
            }
        }
        let decoded = hive::decode(payload, &self.meta, &mut ctx.scratch);
        match decoded {
            Ok(msg) => {
                self.st.bad_frames = 0;
                match msg {
                    Inbound::Event { ty, body } => publish_event(ctx, &ty, body),
                    Inbound::Ack { request } => ctx.on_ack(self.meta.device, request),
                    Inbound::Response {
                        request,
                        ok,
                        result,
                    } => ctx.on_response(self.meta.device, request, ok, result),
                }
            }
            Err(e) => {
                if !self.utf8_or_fail(ctx, payload) {
                    return;
                }
                ctx.metrics().protocol_errors[e.index()].fetch_add(1, Relaxed);
                self.send_text(ctx, &hive::error(e.code(), &e.to_string()));
                self.bad_frame(ctx);
            }
        }
    }

    /// `Bearer T` on an open Hive connection: a newer token for the same device and
    /// account moves the connection's expiry (--close-on-token-expiry) and is answered
    /// `authenticated`; any other is refused with an `unauthorized` error (counted by
    /// reason) and counts as a bad frame, the connection keeping its current token.
    fn reauthenticate(&mut self, ctx: &mut ShardCtx, token: &str) {
        let verdict = ctx.shared.verifier.verify(token).and_then(|ident| {
            if ident.device == self.meta.device && ident.account == self.meta.account {
                Ok(ident)
            } else {
                Err(crate::auth::AuthError::Invalid)
            }
        });
        match verdict {
            Ok(ident) => {
                if let Some(e) = &mut ctx.expiries {
                    e.track(self.slot, self.id, ident.expires);
                }
                self.send_text(ctx, &hive::authenticated(&self.meta));
            }
            Err(e) => {
                ctx.metrics().auth_failure(e);
                self.send_text(ctx, &hive::error("unauthorized", &e.to_string()));
                self.bad_frame(ctx);
            }
        }
    }

    fn bad_frame(&mut self, ctx: &mut ShardCtx) {
        let bad = {
            let st = &mut self.st;
            st.bad_frames = st.bad_frames.saturating_add(1);
            st.bad_frames
        };
        if bad >= MAX_BAD_FRAMES {
            self.fail(ctx, CloseCode::BadFrames, "too many malformed frames");
        }
    }

    /// Carry out what a Phoenix or Hivekit frame asked for, in order.
    fn apply(&mut self, ctx: &mut ShardCtx, effects: Vec<Effect>) {
        let mut had_error = false;
        for e in effects {
            match e {
                Effect::Send(frame) => self.send_text(ctx, &frame),
                Effect::Publish { ty, body } => publish_event(ctx, &ty, body),
                Effect::Ack(r) => ctx.on_ack(self.meta.device, r),
                Effect::AckCommand(c) => ctx.ack_command(self.meta.device, c),
                Effect::Response {
                    request,
                    ok,
                    result,
                } => ctx.on_response(self.meta.device, request, ok, result),
                Effect::Ready => ctx.resend_pending(self),
                Effect::Error(code) => {
                    had_error = true;
                    ctx.metrics().adapter_error(self.protocol, code);
                }
                Effect::Refused(code) => ctx.metrics().adapter_error(self.protocol, code),
                Effect::Close(code, reason) => self.fail(ctx, code, reason),
            }
        }
        if had_error {
            self.bad_frame(ctx);
        } else {
            self.st.bad_frames = 0;
        }
    }

    /// The greeting after authentication, in this connection's protocol.
    pub(crate) fn greeting(&self, ctx: &ShardCtx) -> Option<Vec<u8>> {
        match self.protocol {
            Protocol::Hive => Some(hive::authenticated(&self.meta)),
            Protocol::Phoenix(_) | Protocol::ConformanceEcho => None,
            Protocol::Hivekit => Some(hivekit_session(
                &self.meta,
                &ctx.shared.config.hivekit_realm,
                |s| hivekit::auth_ok(s.realm),
            )),
        }
    }

    /// A request frame in this connection's protocol; None while it cannot receive
    /// one (a Phoenix device that has not joined its topic yet).
    pub(crate) fn encode_request(
        &self,
        ctx: &ShardCtx,
        request: uuid::Uuid,
        command: &str,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        match (self.protocol, self.adapter.as_deref()) {
            (Protocol::Hive, _) => {
                Some(hive::device_request(&self.meta, request, command, payload))
            }
            (Protocol::Phoenix(_), Some(Adapter::Phoenix(phx))) => phx
                .encode_request(request, command, payload)
                .map(|f| self.wire_owned(f)),
            (Protocol::Hivekit, Some(Adapter::Hivekit(subs))) => {
                hivekit_session(&self.meta, &ctx.shared.config.hivekit_realm, |s| {
                    hivekit::encode_request(s, subs, request, command, payload)
                })
            }
            _ => None,
        }
    }

    /// A backend event (JSON object) in this connection's protocol; None while the
    /// device does not take it (not joined, not subscribed).
    pub(crate) fn encode_event(&self, ctx: &ShardCtx, body: &[u8]) -> Option<Vec<u8>> {
        match (self.protocol, self.adapter.as_deref()) {
            (Protocol::Hive, _) => Some(body.to_vec()),
            (Protocol::Phoenix(_), Some(Adapter::Phoenix(phx))) => {
                phx.encode_event(body).map(|f| self.wire_owned(f))
            }
            (Protocol::Hivekit, Some(Adapter::Hivekit(subs))) => {
                hivekit_session(&self.meta, &ctx.shared.config.hivekit_realm, |s| {
                    hivekit::encode_event(s, subs, body)
                })
            }
            _ => None,
        }
    }
}

fn publish_event(ctx: &mut ShardCtx, ty: &str, body: Vec<u8>) {
    ctx.publish(RoutingKey::concat(&[hive::DEVICE_SERVICE, ".", ty]), body);
}

/// The device as Hivekit sees it: its realm is `--hivekit-realm`, else its account.
fn hivekit_session<R>(
    meta: &Meta,
    realm: &Option<String>,
    f: impl FnOnce(&hivekit::Session) -> R,
) -> R {
    let mut buf = uuid::Uuid::encode_buffer();
    let realm = match realm {
        Some(r) => r.as_str(),
        None => meta.account.hyphenated().encode_lower(&mut buf),
    };
    f(&hivekit::Session { meta, realm })
}
