//! One frame's actions, each answered: the dispatch on `typ` and `act`, and what the
//! router does for each (realm reads, pubsub subscriptions and publishes, writes of the
//! device's own object); the rest is refused or left to the backend.

use std::borrow::Cow;
use std::ops::Range;

use uuid::Uuid;

use super::codec::{push_realm, short_key, Action, Replies};
use super::session::{Session, Subscriptions};
use super::spell;
use super::{
    ACK_EVENT, BAD_FRAME, MAX_ACTIONS, MAX_NAME, MAX_SUBSCRIPTIONS, REQUEST_EVENT, RESPONSE_EVENT,
};
use crate::protocol::effect::Effect;
use crate::protocol::hive::{push_meta, service_json, DEVICE_SERVICE};
use crate::protocol::json::{self, Scratch};

/// The `typ` and `act` codes the router answers.
const SYS: u32 = short_key(b"sys");
const HBT: u32 = short_key(b"hbt");
const AUT: u32 = short_key(b"aut");
const STA: u32 = short_key(b"sta");
const REA: u32 = short_key(b"rea");
const LIS: u32 = short_key(b"lis");
const SUB: u32 = short_key(b"sub");
const UNS: u32 = short_key(b"uns");
const PUB: u32 = short_key(b"pub");
const CRE: u32 = short_key(b"cre");
const UPD: u32 = short_key(b"upd");
const DEL: u32 = short_key(b"del");
const SEA: u32 = short_key(b"sea");
const SET: u32 = short_key(b"set");
const OBJ: u32 = short_key(b"obj");
const ARE: u32 = short_key(b"are");
const INS: u32 = short_key(b"ins");
const HIS: u32 = short_key(b"his");
const TSK: u32 = short_key(b"tsk");
const LOG: u32 = short_key(b"log");

/// Handle one text frame from an authenticated device. Replies to all its actions go
/// back as one batch (one frame), in order.
pub fn on_text(
    s: &Session,
    subs: &mut Subscriptions,
    text: &[u8],
    scratch: &mut Scratch,
    out: &mut Vec<Effect>,
) {
    if scratch.parse_array(text).is_err() {
        out.push(Effect::Error(BAD_FRAME));
        let mut r = Replies::default();
        r.err(None, "frame must be a JSON array of actions", 400);
        out.extend(r.finish().map(Effect::Send));
        return;
    }
    if scratch.elements.len() > MAX_ACTIONS {
        // A refusal, not a malformed frame: it does not count toward 4400.
        out.push(Effect::Refused("too-many-actions"));
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
        let mut cx = Cx {
            s,
            text: &text[e.clone()],
            scratch: &mut *scratch,
            out: &mut *out,
            replies: &mut replies,
            subs: &mut *subs,
        };
        cx.action();
    }
    scratch.elements = elements;
    out.extend(replies.finish().map(Effect::Send));
}

/// A pubsub action's `dat`: event name, id pattern, the data (raw JSON) if any.
type PubsubDat<'x> = (Cow<'x, str>, Cow<'x, str>, Option<&'x [u8]>);

/// One action being handled.
struct Cx<'x, 'a> {
    s: &'x Session<'a>,
    text: &'x [u8],
    scratch: &'x mut Scratch,
    out: &'x mut Vec<Effect>,
    replies: &'x mut Replies,
    subs: &'x mut Subscriptions,
}

impl<'x> Cx<'x, '_> {
    /// A member's value: the raw JSON, or the string it holds.
    fn raw(&self, r: &Option<Range<usize>>) -> Option<&'x [u8]> {
        let text = self.text;
        r.as_ref().map(|r| &text[r.clone()])
    }

    fn str(&self, r: &Option<Range<usize>>) -> Option<Cow<'x, str>> {
        let text = self.text;
        r.as_ref().and_then(|r| json::as_str(text, r))
    }

    /// A malformed action: counted toward the bad-frame limit.
    fn bad(&mut self, cid: Option<&[u8]>, code: &'static str, msg: &str, erc: u16) {
        self.out.push(Effect::Error(code));
        self.replies.err(cid, msg, erc);
    }

    /// A well-formed action the router does not do for a device: counted, answered.
    fn refuse(&mut self, cid: Option<&[u8]>, code: &'static str, msg: &str, erc: u16) {
        self.out.push(Effect::Refused(code));
        self.replies.err(cid, msg, erc);
    }

    fn action(&mut self) {
        // The frame was validated whole: an element that is not an object is the only error.
        if self.scratch.parse_object(self.text).is_err() {
            self.bad(None, "bad-action", "an action must be an object", 400);
            return;
        }
        let text = self.text;
        let a = Action::read(text, &self.scratch.members);
        let cid = a.cid.as_ref().map(|r| &text[r.clone()]);
        let typ = a.typ.as_ref().and_then(|r| json::as_str(text, r));
        let act = a.act.as_ref().and_then(|r| json::as_str(text, r));
        // One integer per code (`short_key`): the dispatch is a switch, not a string
        // comparison per arm.
        let code = |v: &Option<Cow<str>>| v.as_deref().map_or(0, |v| short_key(v.as_bytes()));
        match (code(&typ), code(&act)) {
            (SYS, HBT | AUT) => self.replies.ok(cid),
            (REA, REA) => {
                if self.own_realm(cid, &a.id, "id") {
                    let realm = self.s.realm;
                    self.replies.ok_with(cid, |o| push_realm(o, realm, true));
                }
            }
            (REA, LIS) => {
                let realm = self.s.realm;
                self.replies.ok_with(cid, |o| {
                    o.push(b'{');
                    json::push_str(o, realm);
                    o.push(b':');
                    push_realm(o, realm, false);
                    o.push(b'}');
                });
            }
            (REA, act @ (SUB | UNS | PUB)) => {
                if self.own_realm(cid, &a.id, "id") {
                    match act {
                        PUB => self.publish(cid, &a),
                        _ => self.pubsub_subscription(cid, &a, act == SUB),
                    }
                }
            }
            (REA, CRE | UPD | DEL) => self.refuse(
                cid,
                "forbidden",
                "a device cannot create, change or delete realms",
                403,
            ),
            (SUB, CRE) => self.subscription(cid, &a),
            (SUB, DEL) => self.replies.ok(cid),
            (OBJ, act @ (CRE | UPD | SET)) => {
                let act = match act {
                    CRE => "cre",
                    UPD => "upd",
                    _ => "set",
                };
                self.object(cid, &a, act)
            }
            (OBJ, DEL) => self.refuse(
                cid,
                "forbidden",
                "a device cannot delete objects; the backend owns them",
                403,
            ),
            (OBJ, REA | LIS) | (REA, SEA) | (SYS, STA) | (SUB, UPD) => self.unsupported(cid),
            (ARE | INS | HIS | TSK | LOG, act) if act != 0 => self.unsupported(cid),
            _ => self.bad(cid, "bad-action", "unknown action (typ/act)", 400),
        }
    }

    fn unsupported(&mut self, cid: Option<&[u8]>) {
        self.refuse(
            cid,
            "unsupported",
            "not served by the gateway: objects, areas, tasks, instructions and history \
             are kept by the backend",
            501,
        );
    }

    /// Is the realm named by `field` the device's? Answers 400/403 when not.
    fn own_realm(&mut self, cid: Option<&[u8]>, field: &Option<Range<usize>>, name: &str) -> bool {
        match self.str(field) {
            Some(r) if r == self.s.realm => true,
            Some(_) => {
                let msg = format!("a device may only use its own realm ({})", self.s.realm);
                self.refuse(cid, "forbidden", &msg, 403);
                false
            }
            None => {
                let msg = format!("`{name}` must name the realm");
                self.bad(cid, "bad-action", &msg, 400);
                false
            }
        }
    }

    /// `sub cre`: the realm's own data (which the client's `Realm` subscribes to on its
    /// own) and the realm list are accepted; nothing about them changes for a device, so
    /// nothing is ever pushed. Object, area, task and log subscriptions are the backend's.
    fn subscription(&mut self, cid: Option<&[u8]>, a: &Action) {
        let kind = match self.raw(&a.dat) {
            Some(d) => match self.scratch.parse_object(d) {
                Ok(()) => self
                    .scratch
                    .find(d, "typ")
                    .and_then(|m| json::as_str(d, &m.value)),
                Err(_) => None,
            },
            None => None,
        };
        match kind.as_deref() {
            Some("rea") if self.own_realm(cid, &a.rea, "rea") => self.replies.ok(cid),
            Some("rea") => {}
            Some("sys") => self.replies.ok(cid),
            Some("obj" | "are" | "ins" | "log" | "tsk") => self.refuse(
                cid,
                "unsupported",
                "subscriptions to objects, areas, tasks, instructions and logs are not served \
                 by the gateway; subscribe to the realm's pubsub events",
                501,
            ),
            _ => self.bad(
                cid,
                "bad-subscription",
                "`dat.typ` must name what to subscribe to",
                400,
            ),
        }
    }

    /// `dat: {"eve": E, "idp": P}` of a pubsub action (`idp` defaults to `*`).
    fn event_and_pattern(&mut self, a: &Action) -> Option<PubsubDat<'x>> {
        let d = self.raw(&a.dat)?;
        self.scratch.parse_object(d).ok()?;
        let field = |name| self.scratch.find(d, name).map(|m| m.value.clone());
        let (eve, idp, data) = (field("eve"), field("idp"), field("dat"));
        let eve = json::as_str(d, eve.as_ref()?)?;
        let idp = match idp {
            Some(r) => json::as_str(d, &r)?,
            None => Cow::Borrowed("*"),
        };
        let data = data.map(|r| &d[r]);
        (!eve.is_empty() && eve.len() <= MAX_NAME && !idp.is_empty() && idp.len() <= MAX_NAME)
            .then_some((eve, idp, data))
    }

    /// `rea sub` / `rea uns`: a pubsub subscription of this connection.
    fn pubsub_subscription(&mut self, cid: Option<&[u8]>, a: &Action, subscribe: bool) {
        let Some((eve, idp, _)) = self.event_and_pattern(a) else {
            let msg = format!(
                "`dat` must be {{\"eve\": event, \"idp\": id pattern}} (strings of 1 to {MAX_NAME} bytes)"
            );
            self.bad(cid, "bad-subscription", &msg, 400);
            return;
        };
        if !subscribe {
            self.subs.remove(&eve, &idp);
            self.replies.ok(cid);
            return;
        }
        let received = self.subs.receives_requests(&self.s.meta.device);
        if !self.subs.add(&eve, &idp) {
            let msg = format!("at most {MAX_SUBSCRIPTIONS} pubsub subscriptions per connection");
            self.refuse(cid, "too-many-subscriptions", &msg, 413);
            return;
        }
        if !received && self.subs.receives_requests(&self.s.meta.device) {
            // Pending requests go out now (after a reconnect too: the client
            // subscribes anew on the new connection).
            self.out.push(Effect::Ready);
        }
        self.replies.ok(cid);
    }

    /// `rea pub`: an ack or an answer to a request, or any other event of the device's,
    /// published to the backend as a `pubsub` device event.
    fn publish(&mut self, cid: Option<&[u8]>, a: &Action) {
        let Some((eve, idp, data)) = self.event_and_pattern(a) else {
            let msg = format!(
                "`dat` must be {{\"eve\": event, \"idp\": id pattern, \"dat\": data}} (names of 1 to {MAX_NAME} bytes)"
            );
            self.bad(cid, "bad-action", &msg, 400);
            return;
        };
        let data = data.unwrap_or(b"null");
        match &*eve {
            ACK_EVENT | RESPONSE_EVENT => {
                let Some(request) = self.request_id(data) else {
                    let msg = format!(
                        "{eve}: `dat` must be {{\"id\": request id}} (the id of a {REQUEST_EVENT})"
                    );
                    self.bad(cid, "bad-request-id", &msg, 400);
                    return;
                };
                if eve == ACK_EVENT {
                    self.out.push(Effect::Ack(request));
                } else {
                    // `scratch` holds `data`'s members (read by request_id).
                    let member = |name| {
                        self.scratch
                            .find(data, name)
                            .map(|m| data[m.value.clone()].to_vec())
                    };
                    match (member("error"), member("result")) {
                        (Some(e), _) => self.out.push(Effect::Response {
                            request,
                            ok: false,
                            result: Some(e),
                        }),
                        (None, r) => {
                            self.out.push(Effect::Ack(request));
                            self.out.push(Effect::Response {
                                request,
                                ok: true,
                                result: r,
                            });
                        }
                    }
                }
            }
            _ => {
                let mut ev = Vec::with_capacity(data.len() + eve.len() + idp.len() + 200);
                ev.extend_from_slice(br#"{"type":"pubsub","realm":"#);
                json::push_str(&mut ev, self.s.realm);
                ev.extend_from_slice(br#","event":"#);
                json::push_str(&mut ev, &eve);
                ev.extend_from_slice(br#","idPattern":"#);
                json::push_str(&mut ev, &idp);
                ev.extend_from_slice(br#","data":"#);
                ev.extend_from_slice(data);
                ev.push(b',');
                push_meta(&mut ev, self.s.meta, &service_json(DEVICE_SERVICE));
                ev.push(b'}');
                self.out.push(Effect::Publish {
                    ty: "pubsub".into(),
                    body: ev,
                });
            }
        }
        self.replies.ok(cid);
    }

    /// The request id of an ack or answer: `{"id": R}` or the string `R`.
    fn request_id(&mut self, data: &[u8]) -> Option<Uuid> {
        let id = if data.first() == Some(&b'"') {
            json::as_str(data, &(0..data.len()))?
        } else {
            self.scratch.parse_object(data).ok()?;
            let m = self.scratch.find(data, "id")?;
            json::as_str(data, &m.value)?
        };
        Uuid::parse_str(&id).ok()
    }

    /// `obj cre|upd|set` of the device's own object: published as a `location` event
    /// (with `loc`) or an `object-data` event, every member spelled out.
    fn object(&mut self, cid: Option<&[u8]>, a: &Action, act: &str) {
        let mut buf = Uuid::encode_buffer();
        let own = self.s.meta.device.hyphenated().encode_lower(&mut buf);
        if self.str(&a.id).as_deref() != Some(own) {
            self.refuse(
                cid,
                "forbidden",
                "a device may only write its own object",
                403,
            );
            return;
        }
        if a.rea.is_some() && !self.own_realm(cid, &a.rea, "rea") {
            return;
        }
        let ty = if a.loc.is_some() {
            "location"
        } else {
            "object-data"
        };
        let text = self.text;
        let mut ev = Vec::with_capacity(text.len() + 256);
        ev.extend_from_slice(b"{\"type\":\"");
        ev.extend_from_slice(ty.as_bytes());
        ev.extend_from_slice(b"\",\"action\":\"");
        ev.extend_from_slice(act.as_bytes());
        ev.extend_from_slice(b"\",\"id\":\"");
        ev.extend_from_slice(own.as_bytes());
        ev.extend_from_slice(b"\",\"realm\":");
        json::push_str(&mut ev, self.s.realm);
        // The action's own members, minus the ones read above, spelled out.
        let members = std::mem::take(&mut self.scratch.members);
        spell::push_members(&mut ev, text, &members, self.scratch);
        self.scratch.members = members;
        ev.push(b',');
        push_meta(&mut ev, self.s.meta, &service_json(DEVICE_SERVICE));
        ev.push(b'}');
        self.out.push(Effect::Publish {
            ty: ty.into(),
            body: ev,
        });
        self.replies.ok(cid);
    }
}
