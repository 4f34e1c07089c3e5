//! Phoenix channels as NervesHub devices speak them (`/socket/websocket`,
//! `/device-socket/websocket`): V1 JSON objects, V2 arrays (`vsn=2.0.0`), and V3
//! (`vsn=3.0.0`), V2's envelope in MessagePack, converted to V2 text at the edge (see
//! [`super::msgpack`]). Topics: `device` (or `device:<own id>`), `console`, and
//! `extensions`. A device whose `device` join carries `device_api_version` is a
//! NervesHub device and gets NervesHub's behaviour: its pushes are not answered (its
//! client has no handler for such answers), and after the join it is asked which
//! extensions it runs (`extensions:get`). Pure: frames in, effects and frames out.
//! Keeps the per-connection join state; never does I/O.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use super::effect::Effect;
use super::hive::{push_meta, service_json, Meta, DEVICE_SERVICE, MAX_TYPE_LEN, META_LEN};
use super::json::{self, push_str, Scratch};

/// A frame that is not a Phoenix message (not JSON, or not its shape).
pub const BAD_FRAME: &str = "bad-frame";

/// Error codes counted in `router_phoenix_errors_total{code}`.
pub const ERROR_CODES: [&str; 5] = [
    BAD_FRAME,
    "unmatched-topic",
    "stale-join-ref",
    "bad-event",
    "unknown-extension",
];

/// Console events a backend sends to a device (pushed on `console` once it is joined).
const CONSOLE_EVENTS: [&str; 6] = [
    "dn",
    "window_size",
    "restart",
    "file-data/start",
    "file-data",
    "file-data/stop",
];

/// Extensions one device may run at once.
const MAX_EXTENSIONS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
    /// V2's envelope in MessagePack, binary frames.
    V3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Join {
    topic: String,
    join_ref: Option<String>,
}

/// Per-connection channel state.
#[derive(Debug)]
pub struct PhxState {
    pub vsn: Vsn,
    device: Option<Join>,
    console: Option<Join>,
    extensions: Option<Extensions>,
    /// The device joined as a NervesHub device (its join had `device_api_version`).
    nerves: bool,
    /// Extensions the router accepts (`--nerves-extensions`).
    allowed: std::sync::Arc<[String]>,
}

/// The `extensions` channel: joined, with the extensions accepted at the join.
#[derive(Debug)]
struct Extensions {
    join: Join,
    accepted: Vec<String>,
}

/// A decoded Phoenix message; its strings borrowed from the frame unless escaped.
struct Msg<'a> {
    join_ref: Option<Cow<'a, str>>,
    reff: Option<Cow<'a, str>>,
    topic: Cow<'a, str>,
    event: Cow<'a, str>,
    payload: &'a [u8],
}

/// A ref as the client sent it (raw JSON): a string, or a number as serde_json spells
/// it; anything else (null, a bool, a container) is no ref. Err: a number serde_json
/// cannot hold (`1e400`), which makes the frame bad, as it always has.
fn ref_string(raw: Option<&[u8]>) -> Result<Option<Cow<'_, str>>, ()> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    Ok(match raw.first() {
        Some(b'"') => json::as_str(raw, &(0..raw.len())),
        Some(b'-' | b'0'..=b'9') => match serde_json::from_slice::<Value>(raw).map_err(|_| ())? {
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            _ => None,
        },
        _ => None,
    })
}

#[derive(Deserialize)]
struct V1<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(rename = "ref", default, borrow)]
    reff: Option<&'a RawValue>,
    #[serde(default, borrow)]
    join_ref: Option<&'a RawValue>,
}

fn decode<'a>(vsn: Vsn, text: &'a [u8], scratch: &mut Scratch) -> Option<Msg<'a>> {
    match vsn {
        Vsn::V1 => {
            let m: V1 = serde_json::from_slice(text).ok()?;
            Some(Msg {
                join_ref: ref_string(m.join_ref.map(|r| r.get().as_bytes())).ok()?,
                reff: ref_string(m.reff.map(|r| r.get().as_bytes())).ok()?,
                topic: m.topic,
                event: m.event,
                payload: m.payload.get().as_bytes(),
            })
        }
        Vsn::V2 | Vsn::V3 => {
            // `[join_ref, ref, topic, event, payload]`: the one-pass validator splits the
            // frame into its five elements' spans; topic and event must be strings.
            scratch.parse_array(text).ok()?;
            let [j, r, topic, event, payload] = scratch.elements.as_slice() else {
                return None;
            };
            Some(Msg {
                join_ref: ref_string(Some(&text[j.clone()])).ok()?,
                reff: ref_string(Some(&text[r.clone()])).ok()?,
                topic: json::as_str(text, topic)?,
                event: json::as_str(text, event)?,
                payload: &text[payload.clone()],
            })
        }
    }
}

/// Encode one message in the connection's wire format.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    reff: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut o = Vec::with_capacity(64 + topic.len() + event.len() + payload.len());
    let opt = |o: &mut Vec<u8>, v: Option<&str>| match v {
        Some(s) => push_str(o, s),
        None => o.extend_from_slice(b"null"),
    };
    match vsn {
        Vsn::V2 | Vsn::V3 => {
            o.push(b'[');
            opt(&mut o, join_ref);
            o.push(b',');
            opt(&mut o, reff);
            o.push(b',');
            push_str(&mut o, topic);
            o.push(b',');
            push_str(&mut o, event);
            o.push(b',');
            o.extend_from_slice(payload);
            o.push(b']');
        }
        Vsn::V1 => {
            o.extend_from_slice(b"{\"topic\":");
            push_str(&mut o, topic);
            o.extend_from_slice(b",\"event\":");
            push_str(&mut o, event);
            o.extend_from_slice(b",\"payload\":");
            o.extend_from_slice(payload);
            o.extend_from_slice(b",\"ref\":");
            opt(&mut o, reff);
            o.extend_from_slice(b",\"join_ref\":");
            opt(&mut o, join_ref);
            o.push(b'}');
        }
    }
    o
}

const OK: &[u8] = br#"{"status":"ok","response":{}}"#;
const UNMATCHED: &[u8] = br#"{"status":"error","response":{"reason":"unmatched topic"}}"#;

impl PhxState {
    pub fn new(vsn: Vsn) -> Self {
        Self::with_extensions(vsn, std::sync::Arc::from([]))
    }

    /// A connection whose device may run the extensions named in `allowed`.
    pub fn with_extensions(vsn: Vsn, allowed: std::sync::Arc<[String]>) -> Self {
        PhxState {
            vsn,
            device: None,
            console: None,
            extensions: None,
            nerves: false,
            allowed,
        }
    }

    fn reply(&self, m: &Msg, payload: &[u8]) -> Effect {
        Effect::Send(encode(
            self.vsn,
            m.join_ref.as_deref(),
            m.reff.as_deref(),
            &m.topic,
            "phx_reply",
            payload,
        ))
    }

    /// Is the device's own topic joined (can it receive requests)?
    pub fn joined(&self) -> bool {
        self.device.is_some()
    }

    /// Handle one text frame from an authenticated device.
    pub fn on_text(
        &mut self,
        meta: &Meta,
        text: &[u8],
        scratch: &mut Scratch,
        out: &mut Vec<Effect>,
    ) {
        let Some(m) = decode(self.vsn, text, scratch) else {
            out.push(Effect::Error(BAD_FRAME));
            return;
        };
        match (&*m.topic, &*m.event) {
            ("phoenix", "heartbeat") => out.push(self.reply(&m, OK)),
            ("extensions", "phx_join") => self.join_extensions(meta, &m, out),
            (_, "phx_join") => self.join(meta, &m, out),
            ("extensions", "phx_leave") => {
                self.extensions = None;
                out.push(self.reply(&m, OK));
            }
            (_, "phx_leave") => self.leave(&m, out),
            ("extensions", _) => self.on_extension_push(meta, &m, out),
            _ => self.on_joined_push(meta, &m, out),
        }
    }

    /// An unmatched topic: counted, and answered with an error.
    fn unmatched(&self, m: &Msg, out: &mut Vec<Effect>) {
        out.push(Effect::Error("unmatched-topic"));
        out.push(self.reply(m, UNMATCHED));
    }

    /// `phx_join` on the device's own topic or `console`: (re)joins that channel,
    /// closing an earlier instance first; any other topic is unmatched.
    fn join(&mut self, meta: &Meta, m: &Msg, out: &mut Vec<Effect>) {
        let own = own_topic(meta, &m.topic);
        let slot = if own {
            &mut self.device
        } else if m.topic == "console" {
            &mut self.console
        } else {
            self.unmatched(m, out);
            return;
        };
        let join = Join {
            topic: m.topic.to_string(),
            join_ref: join_ref(m),
        };
        if let Some(old) = slot.replace(join) {
            // A rejoin closes the earlier channel first, as Phoenix does.
            let close = encode(
                self.vsn,
                old.join_ref.as_deref(),
                old.join_ref.as_deref(),
                &old.topic,
                "phx_close",
                b"{}",
            );
            out.push(Effect::Send(close));
        }
        out.push(self.reply(m, OK));
        if own {
            self.device_joined(meta, m, out);
        }
    }

    /// After the device's own topic is joined: `device-join` published, NervesHub
    /// devices recognised (and asked for their extensions), the connection ready.
    fn device_joined(&mut self, meta: &Meta, m: &Msg, out: &mut Vec<Effect>) {
        out.push(Effect::Publish {
            ty: "device-join".into(),
            body: event_body(meta, "device-join", &m.topic, m.payload),
        });
        let api = api_version(m.payload);
        self.nerves = api.is_some();
        // NervesHub asks devices of API 2.2.0 and later for their extensions.
        if api.is_some_and(|v| v >= (2, 2, 0)) && !self.allowed.is_empty() {
            let j = self
                .device
                .as_ref()
                .map(|j| j.join_ref.clone())
                .unwrap_or_default();
            out.push(Effect::Send(encode(
                self.vsn,
                j.as_deref(),
                None,
                &m.topic,
                "extensions:get",
                b"{}",
            )));
        }
        out.push(Effect::Ready);
    }

    /// `phx_leave` on the device's topic or `console`: that channel is left (if joined).
    fn leave(&mut self, m: &Msg, out: &mut Vec<Effect>) {
        let slot = self.slot(&m.topic);
        if let Some(slot) = slot {
            *slot = None;
        }
        out.push(self.reply(m, OK));
    }

    /// A push on the device's topic or `console`: handled if that channel is joined
    /// and the push is from its current instance (a stale one is ignored).
    fn on_joined_push(&mut self, meta: &Meta, m: &Msg, out: &mut Vec<Effect>) {
        let current = match self.slot(&m.topic) {
            Some(Some(j)) => j.join_ref.clone(),
            _ => {
                self.unmatched(m, out);
                return;
            }
        };
        if m.join_ref.is_some() && m.join_ref.as_deref() != current.as_deref() {
            // A frame from a channel instance that was since rejoined: ignored.
            out.push(Effect::Error("stale-join-ref"));
            return;
        }
        self.on_push(meta, m, out);
    }

    fn slot(&mut self, topic: &str) -> Option<&mut Option<Join>> {
        if self.device.as_ref().is_some_and(|j| j.topic == topic) {
            Some(&mut self.device)
        } else if self.console.as_ref().is_some_and(|j| j.topic == topic) || topic == "console" {
            Some(&mut self.console)
        } else {
            None
        }
    }

    fn on_push(&mut self, meta: &Meta, m: &Msg, out: &mut Vec<Effect>) {
        if m.event.is_empty() || m.event.len() > MAX_TYPE_LEN {
            out.push(Effect::Error("bad-event"));
            out.push(self.reply(
                m,
                br#"{"status":"error","response":{"reason":"bad event name"}}"#,
            ));
            return;
        }
        let payload = m.payload;
        match &*m.event {
            "ack" | "response" => {
                let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
                let Some(request) = v
                    .get("request")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok())
                else {
                    out.push(Effect::Error("bad-event"));
                    out.push(self.reply(m, br#"{"status":"error","response":{"reason":"request must be a request UUID"}}"#));
                    return;
                };
                if m.event == "ack" {
                    out.push(Effect::Ack(request));
                } else {
                    let ok = v
                        .get("status")
                        .and_then(Value::as_str)
                        .is_none_or(|s| s == "ok");
                    let result = v.get("result").map(|r| r.to_string().into_bytes());
                    out.push(Effect::Response {
                        request,
                        ok,
                        result,
                    });
                }
            }
            event => {
                match event {
                    "rebooting" => out.push(Effect::AckCommand("reboot")),
                    "fwup_progress" | "status_update" => out.push(Effect::AckCommand("update")),
                    _ => {}
                }
                out.push(Effect::Publish {
                    ty: event.to_string(),
                    body: event_body(meta, event, &m.topic, payload),
                });
            }
        }
        // NervesHub answers no push (its device client has no handler for an answer).
        if m.reff.is_some() && !self.nerves {
            out.push(self.reply(m, OK));
        }
    }

    /// `phx_join` on `extensions` with `{name: version}`: answered with the list of
    /// those the router accepts (allowed, with a version); the others are left out, as
    /// NervesHub does.
    fn join_extensions(&mut self, meta: &Meta, m: &Msg, out: &mut Vec<Effect>) {
        let offered: serde_json::Map<String, Value> =
            serde_json::from_slice(m.payload).unwrap_or_default();
        let accepted: Vec<String> = offered
            .iter()
            .filter(|(name, v)| {
                self.allowed.iter().any(|a| a == *name) && v.as_str().is_some_and(is_version)
            })
            .map(|(name, _)| name.clone())
            .take(MAX_EXTENSIONS)
            .collect();
        let join = Join {
            topic: "extensions".into(),
            join_ref: join_ref(m),
        };
        let mut reply = br#"{"status":"ok","response":"#.to_vec();
        reply.extend_from_slice(&serde_json::to_vec(&accepted).unwrap_or_default());
        reply.push(b'}');
        self.extensions = Some(Extensions { join, accepted });
        out.push(self.reply(m, &reply));
        out.push(Effect::Publish {
            ty: "extensions-join".into(),
            body: event_body(meta, "extensions-join", "extensions", m.payload),
        });
    }

    /// A push on `extensions`: `<extension>:<event>` of an accepted extension is
    /// published (unanswered, as NervesHub); any other is answered
    /// `{"status":"error","response":"detach"}`, which makes the device detach it.
    fn on_extension_push(&mut self, meta: &Meta, m: &Msg, out: &mut Vec<Effect>) {
        let Some(ext) = &self.extensions else {
            self.unmatched(m, out);
            return;
        };
        if m.join_ref.is_some() && m.join_ref != ext.join.join_ref.as_deref().map(Cow::Borrowed) {
            out.push(Effect::Error("stale-join-ref"));
            return;
        }
        let known = m
            .event
            .split_once(':')
            .is_some_and(|(name, ev)| !ev.is_empty() && ext.accepted.iter().any(|a| a == name));
        if !known || m.event.len() > MAX_TYPE_LEN {
            out.push(Effect::Refused("unknown-extension"));
            out.push(self.reply(m, br#"{"status":"error","response":"detach"}"#));
            return;
        }
        out.push(Effect::Publish {
            ty: m.event.to_string(),
            body: event_body(meta, &m.event, "extensions", m.payload),
        });
    }

    /// The channel a backend message named `name` goes out on: an accepted extension's
    /// `<extension>:<event>` on `extensions`, console events on `console`, the rest on
    /// the device's topic. None: that channel is not joined.
    fn channel_for(&self, name: &str) -> Option<&Join> {
        if let Some(ext) = &self.extensions {
            if name
                .split_once(':')
                .is_some_and(|(e, _)| ext.accepted.iter().any(|a| a == e))
            {
                return Some(&ext.join);
            }
        }
        if CONSOLE_EVENTS.contains(&name) {
            if let Some(c) = &self.console {
                return Some(c);
            }
        }
        self.device.as_ref()
    }

    /// A backend event for the device (a JSON object with `type`), pushed on its topic.
    /// None until the device joined.
    pub fn encode_event(&self, body: &[u8]) -> Option<Vec<u8>> {
        let name = event_name(body);
        let j = self.channel_for(&name)?;
        Some(encode(
            self.vsn,
            j.join_ref.as_deref(),
            None,
            &j.topic,
            &name,
            body,
        ))
    }

    /// A request pushed as `[join_ref, null, topic, command, payload + request]`.
    pub fn encode_request(&self, request: Uuid, command: &str, payload: &[u8]) -> Option<Vec<u8>> {
        // Requests wait for the device's own topic (its join is when it can take them).
        self.device.as_ref()?;
        let j = self.channel_for(command)?;
        let p = with_request(request, payload);
        Some(encode(
            self.vsn,
            j.join_ref.as_deref(),
            None,
            &j.topic,
            command,
            &p,
        ))
    }
}

/// Is `topic` the device's own: `device`, or `device:<its id>`?
fn own_topic(meta: &Meta, topic: &str) -> bool {
    topic == "device"
        || topic
            .strip_prefix("device:")
            .is_some_and(|id| Uuid::parse_str(id).is_ok_and(|u| u == meta.device))
}

/// The ref a join is known by: its `join_ref`, else its `ref`.
fn join_ref(m: &Msg) -> Option<String> {
    m.join_ref
        .as_deref()
        .or(m.reff.as_deref())
        .map(str::to_string)
}

/// `device_api_version` of a join payload as (major, minor, patch); None without one.
/// NervesHub reads a version it cannot parse as 1.0.0.
fn api_version(payload: &[u8]) -> Option<(u32, u32, u32)> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let s = v.get("device_api_version")?;
    Some(s.as_str().and_then(parse_version).unwrap_or((1, 0, 0)))
}

/// `MAJOR.MINOR.PATCH` (a pre-release or build suffix allowed).
fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let core = s.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u32>().ok());
    let v = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(v)
}

fn is_version(s: &str) -> bool {
    parse_version(s).is_some()
}

/// The event name a backend event is pushed under: its `type` when that is a string (the
/// last one, if repeated), else `event`. Found by the validator's member spans; the body
/// is not built into a tree.
fn event_name(body: &[u8]) -> Cow<'_, str> {
    let mut scratch = Scratch::default();
    if scratch.parse_object(body).is_err() {
        return Cow::Borrowed("event");
    }
    scratch
        .find(body, "type")
        .and_then(|m| json::as_str(body, &m.value))
        .unwrap_or(Cow::Borrowed("event"))
}

/// The payload object with `"request": R` added (a non-object payload is wrapped as `value`).
fn with_request(request: Uuid, payload: &[u8]) -> Vec<u8> {
    let mut o = Vec::with_capacity(payload.len() + 60);
    o.extend_from_slice(b"{\"request\":\"");
    super::simd::push_uuid(&mut o, &request);
    o.push(b'"');
    let trimmed = payload.trim_ascii();
    if trimmed.first() == Some(&b'{') {
        let inner = trimmed[1..trimmed.len() - 1].trim_ascii();
        if !inner.is_empty() {
            o.push(b',');
            o.extend_from_slice(inner);
        }
    } else if !trimmed.is_empty() && trimmed != b"null" {
        o.extend_from_slice(b",\"value\":");
        o.extend_from_slice(trimmed);
    }
    o.push(b'}');
    o
}

/// `{"type":E,"topic":T,"payload":P,"device":D,"account":A,"service":"hive-device"}`.
fn event_body(meta: &Meta, event: &str, topic: &str, payload: &[u8]) -> Vec<u8> {
    let service = service_json(DEVICE_SERVICE);
    let mut o = Vec::with_capacity(
        40 + event.len() + topic.len() + payload.len() + META_LEN + service.len(),
    );
    o.extend_from_slice(b"{\"type\":");
    push_str(&mut o, event);
    o.extend_from_slice(b",\"topic\":");
    push_str(&mut o, topic);
    o.extend_from_slice(b",\"payload\":");
    o.extend_from_slice(payload);
    o.push(b',');
    push_meta(&mut o, meta, &service);
    o.push(b'}');
    o
}

#[cfg(test)]
mod tests;
