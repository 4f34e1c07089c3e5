//! Hivekit-style compact protocol (`/v1/ws`): every frame a JSON array of actions
//! with three-letter keys. Pure: frames in, effects out; no I/O, no state.
//!
//! Frames are read with the one-pass validator of [`super::json`] (element and member
//! spans, no tree): the values the router passes on (`cid`, `dat`, `lab`, `rea`, `loc`
//! members, `err`, `erc`) are copied as the device wrote them, and replies and events are
//! written straight into their buffers. A `serde_json::Value` tree per frame cost ~32,000
//! instructions for a one-action location update (`scripts/perf-check.sh`, `hivekit`).

use std::borrow::Cow;
use std::io::Write as _;
use std::ops::Range;

use serde_json::json;
use uuid::Uuid;

use super::effect::Effect;
use super::hive::{push_meta, service_json, Meta, DEVICE_SERVICE};
use super::json::{self, Member, Scratch};
use super::simd::push_uuid;

/// Error codes counted in `router_hivekit_errors_total{code}`.
pub const ERROR_CODES: [&str; 5] = [
    "bad-frame",
    "bad-action",
    "forbidden",
    "bad-cid",
    "too-many-actions",
];

/// Actions one frame may carry. Each is answered, so without a bound one small frame of
/// thousands of malformed actions was answered by a frame thirty times its size.
pub const MAX_ACTIONS: usize = 256;

/// The answer to a successful authentication.
pub fn auth_ok() -> Vec<u8> {
    format!(
        r#"[{{"typ":"sys","act":"aut","res":"suc","dat":{{"version":"{}"}}}}]"#,
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// The answer to a failed authentication (a 4401 close follows).
pub fn auth_err(reason: &str) -> Vec<u8> {
    json!([{"typ":"sys","act":"aut","res":"err","err":reason}])
        .to_string()
        .into_bytes()
}

/// `loc` keys spelled out in published events.
const LOC_KEYS: [(&str, &str); 7] = [
    ("lon", "longitude"),
    ("lat", "latitude"),
    ("acc", "accuracy"),
    ("spe", "speed"),
    ("hea", "heading"),
    ("alt", "altitude"),
    ("tim", "time"),
];

/// The members of one action the router reads: spans of their values in the action's
/// text. Where a key repeats, the last one counts (as JSON object readers keep it).
#[derive(Default)]
struct Action {
    typ: Option<Range<usize>>,
    act: Option<Range<usize>>,
    id: Option<Range<usize>>,
    rea: Option<Range<usize>>,
    dat: Option<Range<usize>>,
    loc: Option<Range<usize>>,
    lab: Option<Range<usize>>,
    cid: Option<Range<usize>>,
    res: Option<Range<usize>>,
    err: Option<Range<usize>>,
    erc: Option<Range<usize>>,
}

impl Action {
    fn read(text: &[u8], members: &[Member]) -> Self {
        let mut a = Action::default();
        for m in members {
            let slot = match &*key(text, m) {
                b"typ" => &mut a.typ,
                b"act" => &mut a.act,
                b"id" => &mut a.id,
                b"rea" => &mut a.rea,
                b"dat" => &mut a.dat,
                b"loc" => &mut a.loc,
                b"lab" => &mut a.lab,
                b"cid" => &mut a.cid,
                b"res" => &mut a.res,
                b"err" => &mut a.err,
                b"erc" => &mut a.erc,
                _ => continue,
            };
            *slot = Some(m.value.clone());
        }
        a
    }
}

/// A member's key without its quotes, unescaped only when it holds an escape.
fn key<'t>(text: &'t [u8], m: &Member) -> Cow<'t, [u8]> {
    if !m.key_escaped {
        return Cow::Borrowed(&text[m.key.start + 1..m.key.end - 1]);
    }
    // The validator accepted the key, so only a key that is not a Rust string (a lone
    // surrogate, refused there too) could fail here; it matches nothing.
    serde_json::from_slice::<String>(&text[m.key.clone()])
        .map_or(Cow::Borrowed(&[][..]), |k| Cow::Owned(k.into_bytes()))
}

/// The replies to one frame's actions: `[r1,r2,...]`, written as they come.
#[derive(Default)]
struct Replies(Vec<u8>);

impl Replies {
    /// Start the next reply; returns the buffer to write it into.
    fn next(&mut self) -> &mut Vec<u8> {
        if self.0.is_empty() {
            // Room for a few replies: one allocation, not a growth per reply.
            self.0.reserve(128);
            self.0.push(b'[');
        } else {
            self.0.push(b',');
        }
        &mut self.0
    }

    fn ok(&mut self, cid: Option<&[u8]>) {
        if let Some(c) = cid {
            let out = self.next();
            out.extend_from_slice(b"{\"cid\":");
            out.extend_from_slice(c);
            out.extend_from_slice(br#","res":"suc"}"#);
        }
    }

    /// `{"cid":C,"res":"err","err":msg,"erc":code}` (no `cid` when the action had none).
    fn err(&mut self, cid: Option<&[u8]>, msg: &str, code: u16) {
        let out = self.next();
        out.push(b'{');
        if let Some(c) = cid {
            out.extend_from_slice(b"\"cid\":");
            out.extend_from_slice(c);
            out.push(b',');
        }
        out.extend_from_slice(br#""res":"err","err":"#);
        json::push_str(out, msg);
        out.extend_from_slice(b",\"erc\":");
        // Writing into a Vec does not fail.
        let _ = write!(out, "{code}");
        out.push(b'}');
    }

    fn finish(mut self) -> Option<Vec<u8>> {
        if self.0.is_empty() {
            return None;
        }
        self.0.push(b']');
        Some(self.0)
    }
}

/// The error of a frame that is not a JSON array (always the first effect then).
pub const BAD_FRAME: &str = "bad-frame";

/// Handle one text frame from an authenticated device. Replies to all its actions go
/// back as one batch (one frame), as they came.
pub fn on_text(meta: &Meta, text: &[u8], scratch: &mut Scratch, out: &mut Vec<Effect>) {
    if scratch.parse_array(text).is_err() {
        out.push(Effect::Error(BAD_FRAME));
        let mut r = Replies::default();
        r.err(None, "frame must be a JSON array of actions", 400);
        out.extend(r.finish().map(Effect::Send));
        return;
    }
    if scratch.elements.len() > MAX_ACTIONS {
        out.push(Effect::Error("too-many-actions"));
        let mut r = Replies::default();
        r.err(
            None,
            &format!("at most {MAX_ACTIONS} actions in one frame"),
            413,
        );
        out.extend(r.finish().map(Effect::Send));
        return;
    }
    // The element list is borrowed out while each action reuses the member list.
    let elements = std::mem::take(&mut scratch.elements);
    let mut replies = Replies::default();
    for e in &elements {
        on_action(meta, &text[e.clone()], scratch, out, &mut replies);
    }
    scratch.elements = elements;
    out.extend(replies.finish().map(Effect::Send));
}

fn on_action(
    meta: &Meta,
    text: &[u8],
    scratch: &mut Scratch,
    out: &mut Vec<Effect>,
    replies: &mut Replies,
) {
    // The frame was validated whole: an element that is not an object is the only error.
    if scratch.parse_object(text).is_err() {
        out.push(Effect::Error("bad-action"));
        replies.err(None, "an action must be an object", 400);
        return;
    }
    let a = Action::read(text, &scratch.members);
    let raw = |r: &Option<Range<usize>>| r.as_ref().map(|r| &text[r.clone()]);
    let s = |r: &Option<Range<usize>>| r.as_ref().and_then(|r| json::as_str(text, r));
    let cid = raw(&a.cid);
    // An answer to a request the router sent: {"cid":R,"res":"suc"|"err"}.
    if a.typ.is_none() {
        if let Some(res) = s(&a.res) {
            let Some(request) = s(&a.cid).and_then(|c| Uuid::parse_str(&c).ok()) else {
                out.push(Effect::Error("bad-cid"));
                replies.err(cid, "cid of a result must be the request id", 400);
                return;
            };
            if res == "err" {
                let mut detail = b"{\"err\":".to_vec();
                detail.extend_from_slice(raw(&a.err).unwrap_or(b"null"));
                detail.extend_from_slice(b",\"erc\":");
                detail.extend_from_slice(raw(&a.erc).unwrap_or(b"null"));
                detail.push(b'}');
                out.push(Effect::Response {
                    request,
                    ok: false,
                    result: Some(detail),
                });
            } else {
                out.push(Effect::Ack(request));
                if let Some(d) = raw(&a.dat) {
                    out.push(Effect::Response {
                        request,
                        ok: true,
                        result: Some(d.to_vec()),
                    });
                }
            }
            return;
        }
    }
    match (s(&a.typ).as_deref(), s(&a.act).as_deref()) {
        (Some("sys"), Some("hbt" | "aut")) => replies.ok(cid),
        (Some("obj"), Some(act @ ("set" | "upd"))) => {
            let mut buf = Uuid::encode_buffer();
            let own = meta.device.hyphenated().encode_lower(&mut buf);
            if s(&a.id).as_deref() != Some(own) {
                out.push(Effect::Error("forbidden"));
                replies.err(cid, "a device may only update its own object", 403);
                return;
            }
            let ty = if a.loc.is_some() {
                "location"
            } else {
                "object-data"
            };
            let mut ev = Vec::with_capacity(text.len() + 256);
            ev.extend_from_slice(b"{\"type\":\"");
            ev.extend_from_slice(ty.as_bytes());
            ev.extend_from_slice(b"\",\"action\":\"");
            ev.extend_from_slice(act.as_bytes());
            ev.extend_from_slice(b"\",\"id\":\"");
            ev.extend_from_slice(own.as_bytes());
            ev.push(b'"');
            if let Some(r) = raw(&a.rea) {
                ev.extend_from_slice(b",\"realm\":");
                ev.extend_from_slice(r);
            }
            if let Some(loc) = raw(&a.loc) {
                // A `loc` that is not an object makes a location event without one.
                if scratch.parse_object(loc).is_ok() {
                    ev.extend_from_slice(b",\"location\":");
                    push_spelled(&mut ev, loc, &scratch.members);
                }
            }
            if let Some(d) = raw(&a.dat) {
                ev.extend_from_slice(b",\"data\":");
                ev.extend_from_slice(d);
            }
            if let Some(l) = raw(&a.lab) {
                ev.extend_from_slice(b",\"labels\":");
                ev.extend_from_slice(l);
            }
            ev.push(b',');
            push_meta(&mut ev, meta, &service_json(DEVICE_SERVICE));
            ev.push(b'}');
            out.push(Effect::Publish {
                ty: ty.into(),
                body: ev,
            });
            replies.ok(cid);
        }
        _ => {
            out.push(Effect::Error("bad-action"));
            replies.err(cid, "unknown action (typ/act)", 400);
        }
    }
}

/// The `loc` object with its short keys spelled out (`lon` -> `longitude`; others kept
/// as written). Where two members end up with the same name, the last one is written.
fn push_spelled(ev: &mut Vec<u8>, loc: &[u8], members: &[Member]) {
    fn spelled<'t>(loc: &'t [u8], m: &Member) -> Cow<'t, [u8]> {
        let k = key(loc, m);
        match LOC_KEYS.iter().find(|(short, _)| short.as_bytes() == &*k) {
            Some((_, long)) => Cow::Borrowed(long.as_bytes()),
            None => k,
        }
    }
    ev.push(b'{');
    let mut first = true;
    for (i, m) in members.iter().enumerate() {
        let name = spelled(loc, m);
        if members[i + 1..]
            .iter()
            .any(|later| spelled(loc, later) == name)
        {
            continue;
        }
        if !first {
            ev.push(b',');
        }
        first = false;
        if m.key_escaped && LOC_KEYS.iter().all(|(_, long)| long.as_bytes() != &*name) {
            // Kept as written, escapes and all.
            ev.extend_from_slice(&loc[m.key.clone()]);
        } else {
            ev.push(b'"');
            ev.extend_from_slice(&name);
            ev.push(b'"');
        }
        ev.push(b':');
        ev.extend_from_slice(&loc[m.value.clone()]);
    }
    ev.push(b'}');
}

/// A backend event: `[{"typ":"rea","act":"pub","dat":{"eve":<type>,"dat":<event>}}]`.
/// The event is copied as it is; `eve` is its `type` member (`null` without one, and
/// both `null` if the body is not JSON).
pub fn encode_event(body: &[u8]) -> Vec<u8> {
    let mut scratch = Scratch::default();
    let (ty, ev): (&[u8], &[u8]) = match scratch.parse_object(body) {
        Ok(()) => (
            scratch
                .find(body, "type")
                .map_or(&b"null"[..], |m| &body[m.value.clone()]),
            body,
        ),
        Err(json::JsonError::NotObject) => (b"null", body),
        Err(json::JsonError::Invalid) => (b"null", b"null"),
    };
    let mut out = Vec::with_capacity(ev.len() + ty.len() + 48);
    out.extend_from_slice(br#"[{"typ":"rea","act":"pub","dat":{"eve":"#);
    out.extend_from_slice(ty);
    out.extend_from_slice(br#","dat":"#);
    out.extend_from_slice(ev);
    out.extend_from_slice(b"}}]");
    out
}

/// A request: `[{"typ":"ins","act":"cre","cid":R,"dat":{"command":C,"payload":P}}]`
/// (`P` as the backend sent it; `null` if that is not JSON).
pub fn encode_request(request: Uuid, command: &str, payload: &[u8]) -> Vec<u8> {
    let p: &[u8] = if json::validate(payload) {
        payload
    } else {
        b"null"
    };
    let mut out = Vec::with_capacity(p.len() + command.len() + 96);
    out.extend_from_slice(br#"[{"typ":"ins","act":"cre","cid":""#);
    push_uuid(&mut out, &request);
    out.extend_from_slice(br#"","dat":{"command":"#);
    json::push_str(&mut out, command);
    out.extend_from_slice(br#","payload":"#);
    out.extend_from_slice(p);
    out.extend_from_slice(b"}}]");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn meta() -> Meta {
        Meta {
            device: Uuid::from_u128(1),
            account: Uuid::from_u128(2),
        }
    }

    fn run(frame: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        on_text(&meta(), frame.as_bytes(), &mut Scratch::default(), &mut out);
        out
    }

    fn last_send(out: &[Effect]) -> Value {
        match out.last() {
            Some(Effect::Send(b)) => serde_json::from_slice(b).unwrap(),
            other => panic!("no reply: {other:?}"),
        }
    }

    #[test]
    fn heartbeat_and_batches() {
        let out = run(r#"[{"typ":"sys","act":"hbt","cid":"h1"}]"#);
        assert_eq!(last_send(&out), json!([{"cid":"h1","res":"suc"}]));
        let d = meta().device;
        let out = run(&format!(
            r#"[{{"typ":"obj","act":"upd","id":"{d}","cid":1,"loc":{{"lon":1.5,"lat":2.5,"tim":3}}}},
                {{"typ":"obj","act":"set","id":"{d}","cid":2,"dat":{{"temp":20}},"lab":{{"a":"b"}}}},
                {{"typ":"obj","act":"upd","id":"{}","cid":3}}]"#,
            Uuid::from_u128(5)
        ));
        let pubs: Vec<Value> = out
            .iter()
            .filter_map(|e| match e {
                Effect::Publish { body, .. } => Some(serde_json::from_slice(body).unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(pubs.len(), 2);
        assert_eq!(pubs[0]["type"], "location");
        assert_eq!(
            pubs[0]["location"],
            json!({"longitude":1.5,"latitude":2.5,"time":3})
        );
        assert_eq!(pubs[1]["type"], "object-data");
        assert_eq!(pubs[1]["data"]["temp"], 20);
        assert_eq!(pubs[1]["labels"]["a"], "b");
        assert_eq!(pubs[1]["device"], d.to_string());
        let replies = last_send(&out);
        assert_eq!(replies[0], json!({"cid":1,"res":"suc"}));
        assert_eq!(replies[1], json!({"cid":2,"res":"suc"}));
        assert_eq!(
            (
                replies[2]["cid"].clone(),
                replies[2]["res"].clone(),
                replies[2]["erc"].clone()
            ),
            (json!(3), json!("err"), json!(403))
        );
    }

    #[test]
    fn a_frame_of_too_many_actions_is_refused_whole_with_one_small_reply() {
        let ok = vec![r#"{"typ":"sys","act":"hbt","cid":1}"#; MAX_ACTIONS].join(",");
        let out = run(&format!("[{ok}]"));
        assert_eq!(last_send(&out).as_array().unwrap().len(), MAX_ACTIONS);
        let bad = vec!["1"; 21_000].join(",");
        let frame = format!("[{bad}]");
        let out = run(&frame);
        assert_eq!(out[0], Effect::Error("too-many-actions"));
        let Some(Effect::Send(reply)) = out.last() else {
            panic!("no reply")
        };
        assert!(reply.len() < 200, "{} bytes", reply.len());
        assert_eq!(last_send(&out)[0]["erc"], 413);
    }

    #[test]
    fn results_ack_requests() {
        let r = Uuid::from_u128(8);
        assert_eq!(
            run(&format!(r#"[{{"cid":"{r}","res":"suc"}}]"#)),
            vec![Effect::Ack(r)]
        );
        let out = run(&format!(
            r#"[{{"cid":"{r}","res":"err","err":"no","erc":5}}]"#
        ));
        assert!(matches!(&out[0], Effect::Response { ok: false, .. }));
        let out = run(r#"[{"cid":"zzz","res":"suc"}]"#);
        assert_eq!(out[0], Effect::Error("bad-cid"));
    }

    #[test]
    fn malformed_frames_get_errors() {
        for bad in ["", "{}", "nope", "[", "\"x\""] {
            let out = run(bad);
            assert_eq!(out[0], Effect::Error("bad-frame"), "{bad}");
            assert_eq!(last_send(&out)[0]["res"], "err");
        }
        let out = run(r#"[5, {"typ":"zzz","act":"q","cid":"c"}]"#);
        assert_eq!(out[0], Effect::Error("bad-action"));
        let replies = last_send(&out);
        assert_eq!(replies[1]["cid"], "c");
        assert_eq!(replies[1]["erc"], 400);
    }

    #[test]
    fn outbound_shapes() {
        let r = Uuid::from_u128(4);
        let v: Value = serde_json::from_slice(&encode_request(r, "reboot", br#"{"x":1}"#)).unwrap();
        assert_eq!(
            v,
            json!([{"typ":"ins","act":"cre","cid": r,"dat":{"command":"reboot","payload":{"x":1}}}])
        );
        let v: Value = serde_json::from_slice(&encode_event(br#"{"type":"cfg","k":1}"#)).unwrap();
        assert_eq!(
            v,
            json!([{"typ":"rea","act":"pub","dat":{"eve":"cfg","dat":{"type":"cfg","k":1}}}])
        );
        let v: Value = serde_json::from_slice(&auth_ok()).unwrap();
        assert_eq!(v[0]["res"], "suc");
    }
}
