//! The Hivekit protocol (`/v1/ws`), as the public Hivekit client speaks it: after a text
//! frame `Bearer <token>`, every frame is a JSON array of actions with three-letter keys.
//! A reply carries the `cid` of the action it answers; what the router sends on its own
//! (pubsub deliveries) carries none, because the client treats every `cid` as the answer
//! to one of its own calls.
//!
//! A device lives in one realm (`Session::realm`: `--hivekit-realm`, else its account
//! UUID). Through the client's public calls it can read that realm (`realm.get`,
//! `realm.list`), create, update and set its own object (each published as a device
//! event), subscribe to its realm's pubsub events, and publish into it. The backend's
//! events and requests reach the device as pubsub messages of its realm; it acks and
//! answers a request by publishing [`ACK_EVENT`] or [`RESPONSE_EVENT`]. Everything a
//! Hivekit server keeps (objects, areas, tasks, history, object subscriptions) is the
//! backend's: those actions are answered `erc` 501, never left without an answer.
//!
//! Pure: frames in, effects out, plus the connection's pubsub subscriptions. Frames are
//! read with the one-pass validator of [`super::json`] (member spans, no tree): values
//! the router passes on are copied as the device wrote them.

use std::borrow::Cow;
use std::io::Write as _;
use std::ops::Range;

use uuid::Uuid;

use super::effect::Effect;
use super::hive::{push_meta, service_json, Meta, DEVICE_SERVICE};
use super::json::{self, Member, Scratch};
use super::simd::push_uuid;

/// Error codes counted in `router_hivekit_errors_total{code}`.
pub const ERROR_CODES: [&str; 8] = [
    "bad-frame",
    "bad-action",
    "forbidden",
    "bad-request-id",
    "too-many-actions",
    "unsupported",
    "too-many-subscriptions",
    "bad-subscription",
];

/// Actions one frame may carry. Each is answered, so without a bound one small frame of
/// thousands of malformed actions was answered by a frame thirty times its size.
pub const MAX_ACTIONS: usize = 256;
/// Pubsub subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 32;
/// Longest event name or id pattern of a subscription, in bytes.
pub const MAX_NAME: usize = 128;

/// The pubsub event a backend request arrives as: `{"id":R,"command":C,"payload":P}`.
pub const REQUEST_EVENT: &str = "hive.request";
/// Published by the device to ack request `R`: data `{"id":R}` (or the string `R`).
pub const ACK_EVENT: &str = "hive.ack";
/// Published by the device to answer request `R`: data `{"id":R,"result":X}`, or
/// `{"id":R,"error":X}` for a failure.
pub const RESPONSE_EVENT: &str = "hive.response";

/// What an action is judged against: who the device is and its realm.
pub struct Session<'a> {
    pub meta: &'a Meta,
    pub realm: &'a str,
}

/// A connection's pubsub subscriptions: (event name, id pattern), in the order made.
#[derive(Debug, Default)]
pub struct Subscriptions {
    subs: Vec<(Box<str>, Box<str>)>,
}

impl Subscriptions {
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// The subscriptions a backend event of type `ty` (or a request) reaches: the event
    /// named exactly, or `*` for every backend event (requests excluded), with the id
    /// pattern `*` or the device's own id.
    fn receiving<'s>(
        &'s self,
        ty: &'s str,
        device: &'s str,
    ) -> impl Iterator<Item = (&'s str, &'s str)> + 's {
        self.subs.iter().filter_map(move |(eve, idp)| {
            let by_name = &**eve == ty || (&**eve == "*" && ty != REQUEST_EVENT);
            (by_name && (&**idp == "*" || &**idp == device)).then_some((&**eve, &**idp))
        })
    }

    /// Does the connection receive requests?
    pub fn receives_requests(&self, device: &Uuid) -> bool {
        let mut buf = Uuid::encode_buffer();
        let own = device.hyphenated().encode_lower(&mut buf);
        let found = self.receiving(REQUEST_EVENT, own).next().is_some();
        found
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

/// A key of at most 4 bytes as one integer (0 for longer keys), so the tables below
/// are one integer switch rather than a byte comparison per entry.
const fn short_key(k: &[u8]) -> u32 {
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

/// `spelled!(key, short => long, ...)`: a table lookup as integer comparisons.
macro_rules! spelled {
    ($key:expr, $($short:literal => $long:literal),* $(,)?) => {{
        let k = short_key($key);
        $(
            if k == const { short_key($short) } {
                return Some($long);
            }
        )*
        None
    }};
}

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

/// An action key spelled out in published events (the client's field table); None:
/// not in it, kept as written.
fn field_name(short: &[u8]) -> Option<&'static [u8]> {
    spelled!(short,
        b"typ" => b"type",
        b"sty" => b"scopeType",
        b"sid" => b"scopeId",
        b"exe" => b"executeImmediately",
        b"act" => b"action",
        b"res" => b"result",
        b"cid" => b"correlationId",
        b"id" => b"id",
        b"rea" => b"realm",
        b"dat" => b"data",
        b"loc" => b"location",
        b"err" => b"error",
        b"lab" => b"label",
        b"atr" => b"attribute",
        b"uty" => b"updateType",
        b"ins" => b"instruction",
        b"cst" => b"connectionStatus",
        b"sha" => b"shape",
        b"fie" => b"field",
        b"val" => b"value",
        b"sta" => b"start",
        b"end" => b"end",
        b"lvl" => b"level",
        b"eve" => b"event",
        b"idp" => b"idPattern",
        b"erc" => b"errorCode",
        b"int" => b"interval",
        b"tim" => b"time",
        b"r" => b"radius",
        b"sts" => b"status",
        b"stp" => b"steps",
        b"dsc" => b"description",
        b"tid" => b"targetId",
        b"tds" => b"taskIds",
    )
}

/// A `loc` key spelled out in published events.
fn location_name(short: &[u8]) -> Option<&'static [u8]> {
    spelled!(short,
        b"gcs" => b"coordinateSystem",
        b"lon" => b"longitude",
        b"lat" => b"latitude",
        b"acc" => b"accuracy",
        b"spe" => b"speed",
        b"hea" => b"heading",
        b"alt" => b"altitude",
        b"alc" => b"altitudeAccuracy",
        b"tim" => b"time",
    )
}

/// How a member's key is written in an event.
struct Name<'t> {
    /// The name once spelled out (or unescaped).
    name: Cow<'t, [u8]>,
    /// Written as the device wrote it (escapes and all): an unknown key with escapes.
    as_written: bool,
}

/// A member's name spelled out by `spell` (unknown keys as written).
fn name_of<'t>(text: &'t [u8], m: &Member, spell: fn(&[u8]) -> Option<&'static [u8]>) -> Name<'t> {
    let k = key(text, m);
    match spell(&k) {
        Some(long) => Name {
            name: Cow::Borrowed(long),
            as_written: false,
        },
        None => Name {
            name: k,
            as_written: m.key_escaped,
        },
    }
}

/// Does one of `later` end up with the name `n`? (Spelled again rather than collected:
/// objects here have a handful of members, and collecting the names cost more.)
fn named_again(
    text: &[u8],
    later: &[Member],
    n: &Name,
    spell: fn(&[u8]) -> Option<&'static [u8]>,
) -> bool {
    later.iter().any(|m| name_of(text, m, spell).name == n.name)
}

/// `"name":` for a member.
fn push_name(out: &mut Vec<u8>, text: &[u8], m: &Member, n: &Name) {
    if n.as_written {
        out.extend_from_slice(&text[m.key.clone()]);
    } else {
        out.push(b'"');
        out.extend_from_slice(&n.name);
        out.push(b'"');
    }
    out.push(b':');
}

/// Members of an action the router writes itself (spelled out): the rest of an object
/// action is carried into its event.
fn is_control(name: &[u8]) -> bool {
    matches!(
        name,
        b"type" | b"action" | b"correlationId" | b"id" | b"realm"
    )
}

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
    cid: Option<Range<usize>>,
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
                b"cid" => &mut a.cid,
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

    /// `{"cid":C,"res":"suc"}`; nothing for an action without a `cid` (the client's
    /// fire-and-forget `set`: an answer without a `cid` would be an unknown message).
    fn ok(&mut self, cid: Option<&[u8]>) {
        if let Some(c) = cid {
            let out = self.next();
            out.extend_from_slice(b"{\"cid\":");
            out.extend_from_slice(c);
            out.extend_from_slice(br#","res":"suc"}"#);
        }
    }

    /// `{"cid":C,"res":"suc","dat":...}` with `dat` written by `dat`.
    fn ok_with(&mut self, cid: Option<&[u8]>, dat: impl FnOnce(&mut Vec<u8>)) {
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
        let list = &mut *self.subs;
        let at = list
            .subs
            .iter()
            .position(|(e, p)| **e == *eve && **p == *idp);
        if !subscribe {
            if let Some(i) = at {
                list.subs.remove(i);
            }
            self.replies.ok(cid);
            return;
        }
        let received = list.receives_requests(&self.s.meta.device);
        if at.is_none() {
            if list.subs.len() >= MAX_SUBSCRIPTIONS {
                let msg =
                    format!("at most {MAX_SUBSCRIPTIONS} pubsub subscriptions per connection");
                self.refuse(cid, "too-many-subscriptions", &msg, 413);
                return;
            }
            list.subs.push((eve.into(), idp.into()));
        }
        if !received && list.receives_requests(&self.s.meta.device) {
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
        // The action's own members, minus the ones read above; the location object
        // spelled out too. Where two members end up with the same name, the last counts.
        let members = std::mem::take(&mut self.scratch.members);
        for (i, m) in members.iter().enumerate() {
            // The router's own members, cheaply first (as written, unescaped: the usual case).
            if !m.key_escaped
                && matches!(
                    &text[m.key.start + 1..m.key.end - 1],
                    b"typ" | b"act" | b"id" | b"cid" | b"rea"
                )
            {
                continue;
            }
            let n = name_of(text, m, field_name);
            if is_control(&n.name) || named_again(text, &members[i + 1..], &n, field_name) {
                continue;
            }
            ev.push(b',');
            push_name(&mut ev, text, m, &n);
            let value = &text[m.value.clone()];
            if &*n.name == b"location" && self.scratch.parse_object(value).is_ok() {
                push_spelled_object(&mut ev, value, &self.scratch.members, location_name);
            } else {
                ev.extend_from_slice(value);
            }
        }
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

/// A realm as the client reads it: `{"id":R,"lab":R,"dat":{}}` (no `id` in a list).
fn push_realm(o: &mut Vec<u8>, realm: &str, with_id: bool) {
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

/// An object with its keys spelled out by `spell`, the values as written. Where two
/// members end up with the same name, the last is written.
fn push_spelled_object(
    out: &mut Vec<u8>,
    obj: &[u8],
    members: &[Member],
    spell: fn(&[u8]) -> Option<&'static [u8]>,
) {
    out.push(b'{');
    let mut first = true;
    for (i, m) in members.iter().enumerate() {
        let n = name_of(obj, m, spell);
        if named_again(obj, &members[i + 1..], &n, spell) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        push_name(out, obj, m, &n);
        out.extend_from_slice(&obj[m.value.clone()]);
    }
    out.push(b'}');
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
mod tests;
