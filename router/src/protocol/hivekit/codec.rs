//! The Hivekit wire format: actions read from a frame (three-letter keys as integers,
//! the members the router reads as spans), replies written back as one batch, the
//! authentication answers and the pubsub deliveries of backend events and requests.

use std::borrow::Cow;
use std::io::Write as _;
use std::ops::Range;

use uuid::Uuid;

use super::session::{Session, Subscriptions};
use super::REQUEST_EVENT;
use crate::protocol::json::{self, Member, Scratch};
use crate::protocol::simd::push_uuid;

/// A key of at most 4 bytes as one integer (0 for longer keys), so the key tables
/// (`spell`) and the dispatch on `typ`/`act` (`actions`) are one integer switch rather
/// than a byte comparison per entry.
pub(super) const fn short_key(k: &[u8]) -> u32 {
    if k.is_empty() || k.len() > 4 {
        return 0;
    }
    let mut b = [0u8; 4];
    let mut i = 0;
    while i < k.len() {
        b[i] = k[i];
        i += 1;
    }
    u32::from_le_bytes(b)
}

/// The members of one action the router reads: spans of their values in the action's
/// text. Where a key repeats, the last one counts (as JSON object readers keep it).
#[derive(Default)]
pub(super) struct Action {
    pub(super) typ: Option<Range<usize>>,
    pub(super) act: Option<Range<usize>>,
    pub(super) id: Option<Range<usize>>,
    pub(super) rea: Option<Range<usize>>,
    pub(super) dat: Option<Range<usize>>,
    pub(super) loc: Option<Range<usize>>,
    pub(super) cid: Option<Range<usize>>,
}

impl Action {
    pub(super) fn read(text: &[u8], members: &[Member]) -> Self {
        let mut a = Action::default();
        for m in members {
            let slot = match &*key(text, m) {
                b"typ" => &mut a.typ,
                b"act" => &mut a.act,
                b"id" => &mut a.id,
                b"rea" => &mut a.rea,
                b"dat" => &mut a.dat,
                b"loc" => &mut a.loc,
                b"cid" => &mut a.cid,
                _ => continue,
            };
            *slot = Some(m.value.clone());
        }
        a
    }
}

/// A member's key without its quotes, unescaped only when it holds an escape.
pub(super) fn key<'t>(text: &'t [u8], m: &Member) -> Cow<'t, [u8]> {
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
pub(super) struct Replies(Vec<u8>);

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

    /// `{"cid":C,"res":"suc"}`; nothing for an action without a `cid` (the client's
    /// fire-and-forget `set`: an answer without a `cid` would be an unknown message).
    pub(super) fn ok(&mut self, cid: Option<&[u8]>) {
        if let Some(c) = cid {
            let out = self.next();
            out.extend_from_slice(b"{\"cid\":");
            out.extend_from_slice(c);
            out.extend_from_slice(br#","res":"suc"}"#);
        }
    }

    /// `{"cid":C,"res":"suc","dat":...}` with `dat` written by `dat`.
    pub(super) fn ok_with(&mut self, cid: Option<&[u8]>, dat: impl FnOnce(&mut Vec<u8>)) {
        if let Some(c) = cid {
            let out = self.next();
            out.extend_from_slice(b"{\"cid\":");
            out.extend_from_slice(c);
            out.extend_from_slice(br#","res":"suc""#);
            let mark = out.len();
            out.extend_from_slice(b",\"dat\":");
            let before = out.len();
            dat(out);
            if out.len() == before {
                out.truncate(mark);
            }
            out.push(b'}');
        }
    }

    /// `{"cid":C,"res":"err","err":msg,"erc":code}` (no `cid` when the action had none:
    /// the client reports it as a server error).
    pub(super) fn err(&mut self, cid: Option<&[u8]>, msg: &str, code: u16) {
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

    pub(super) fn finish(mut self) -> Option<Vec<u8>> {
        if self.0.is_empty() {
            return None;
        }
        self.0.push(b']');
        Some(self.0)
    }
}

/// The answer to a successful authentication (no `cid`: the client routes it by type),
/// naming the router's version and the device's realm.
pub fn auth_ok(realm: &str) -> Vec<u8> {
    let mut out = br#"[{"typ":"sys","act":"aut","res":"suc","dat":{"version":""#.to_vec();
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(br#"","realm":"#);
    json::push_str(&mut out, realm);
    out.extend_from_slice(b"}}]");
    out
}

/// The answer to a failed authentication. The socket stays open for another `Bearer`
/// (until the auth timeout, or the attempt limit).
pub fn auth_err(reason: &str) -> Vec<u8> {
    let mut out = br#"[{"typ":"sys","act":"aut","res":"err","err":"#.to_vec();
    json::push_str(&mut out, reason);
    out.extend_from_slice(b"}]");
    out
}

/// A realm as the client reads it: `{"id":R,"lab":R,"dat":{}}` (no `id` in a list).
pub(super) fn push_realm(o: &mut Vec<u8>, realm: &str, with_id: bool) {
    o.push(b'{');
    if with_id {
        o.extend_from_slice(b"\"id\":");
        json::push_str(o, realm);
        o.push(b',');
    }
    o.extend_from_slice(b"\"lab\":");
    json::push_str(o, realm);
    o.extend_from_slice(b",\"dat\":{}}");
}

/// `{"typ":"rea","act":"pub","rea":R,"sid":P,"dat":{"eve":E,"dat":`, the start of
/// one pubsub delivery (the data and `}}` follow).
fn push_delivery_head(out: &mut Vec<u8>, realm: &str, eve: &str, idp: &str) {
    out.push(if out.is_empty() { b'[' } else { b',' });
    out.extend_from_slice(br#"{"typ":"rea","act":"pub","rea":"#);
    json::push_str(out, realm);
    out.extend_from_slice(br#","sid":"#);
    json::push_str(out, idp);
    out.extend_from_slice(br#","dat":{"eve":"#);
    json::push_str(out, eve);
    out.extend_from_slice(br#","dat":"#);
}

/// A backend event as pubsub messages of the device's realm, one per subscription it
/// reaches (the client matches each to one callback by event and id pattern), in one
/// frame. The event's name is its `type` member. None: no subscription receives it.
pub fn encode_event(s: &Session, subs: &Subscriptions, body: &[u8]) -> Option<Vec<u8>> {
    let mut scratch = Scratch::default();
    let (ty, ev): (Cow<str>, &[u8]) = match scratch.parse_object(body) {
        Ok(()) => (
            scratch
                .find(body, "type")
                .and_then(|m| json::as_str(body, &m.value))
                .unwrap_or(Cow::Borrowed("")),
            body,
        ),
        Err(json::JsonError::NotObject) => (Cow::Borrowed(""), body),
        Err(json::JsonError::Invalid) => (Cow::Borrowed(""), b"null"),
    };
    let mut buf = Uuid::encode_buffer();
    let own = s.meta.device.hyphenated().encode_lower(&mut buf);
    let mut out = Vec::new();
    for (eve, idp) in subs.receiving(&ty, own) {
        push_delivery_head(&mut out, s.realm, eve, idp);
        out.extend_from_slice(ev);
        out.extend_from_slice(b"}}");
    }
    if out.is_empty() {
        return None;
    }
    out.push(b']');
    Some(out)
}

/// A backend request as a [`REQUEST_EVENT`] pubsub message:
/// `dat: {"id":R,"command":C,"payload":P}` (`P` as the backend sent it; `null` if that
/// is not JSON). None: the device has not subscribed to requests (yet).
pub fn encode_request(
    s: &Session,
    subs: &Subscriptions,
    request: Uuid,
    command: &str,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let p: &[u8] = if json::validate(payload) {
        payload
    } else {
        b"null"
    };
    let mut buf = Uuid::encode_buffer();
    let own = s.meta.device.hyphenated().encode_lower(&mut buf);
    let mut out = Vec::new();
    for (eve, idp) in subs.receiving(REQUEST_EVENT, own) {
        push_delivery_head(&mut out, s.realm, eve, idp);
        out.extend_from_slice(br#"{"id":""#);
        push_uuid(&mut out, &request);
        out.extend_from_slice(br#"","command":"#);
        json::push_str(&mut out, command);
        out.extend_from_slice(br#","payload":"#);
        out.extend_from_slice(p);
        out.extend_from_slice(b"}}}");
    }
    if out.is_empty() {
        return None;
    }
    out.push(b']');
    Some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn auth_frames() {
        let v: Value = serde_json::from_slice(&auth_ok("fleet-a")).unwrap();
        assert_eq!(v[0]["res"], "suc");
        assert_eq!(v[0]["dat"]["realm"], "fleet-a");
        assert!(v[0].get("cid").is_none());
        assert!(v[0]["dat"]["version"].is_string());
        let v: Value = serde_json::from_slice(&auth_err("token \"expired\"")).unwrap();
        assert_eq!(
            v,
            json!([{"typ":"sys","act":"aut","res":"err","err":"token \"expired\""}])
        );
    }
}
