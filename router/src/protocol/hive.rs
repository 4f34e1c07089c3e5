//! Hive native protocol (`/ws`): one JSON object per text frame. Turns a device's
//! frame into an internal message with metadata injected, and internal messages into
//! frames. Pure functions over bytes: the shard does all I/O.

use std::borrow::Cow;
use std::ops::Range;

use uuid::Uuid;

use super::json::{as_str, key_is, push_str, JsonError, Member, Scratch};
use super::simd::push_uuid;

/// Routing keys are `<service>.<type>` and AMQP allows 255 bytes; keep headroom.
pub const MAX_TYPE_LEN: usize = 200;
pub const DEVICE_SERVICE: &str = "hive-device";
pub const BACKEND_SERVICE: &str = "hive-backend";

/// Who is speaking, pre-formatted once per connection: injected into every event.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub device: Uuid,
    pub account: Uuid,
}

/// What a device's text frame means.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A device event, with `device`/`account`/`service` overwritten; its type is
    /// borrowed from the frame unless it had to be unescaped.
    Event { ty: Cow<'a, str>, body: Vec<u8> },
    /// `{"type":"ack","request":R}`.
    Ack { request: Uuid },
    /// `{"type":"response","request":R,"status":..,"result":..}`.
    Response {
        request: Uuid,
        ok: bool,
        result: Option<Vec<u8>>,
    },
}

/// Why a frame was refused; the code goes back to the device in an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HiveError {
    #[error("frame is not valid JSON")]
    BadJson,
    #[error("frame is not a JSON object")]
    NotObject,
    #[error("object has no string `type`")]
    NoType,
    #[error("`type` is empty or longer than 200 bytes")]
    BadType,
    #[error("`request` must be a request UUID string")]
    BadRequestId,
}

impl HiveError {
    pub const ALL: [HiveError; 5] = [
        HiveError::BadJson,
        HiveError::NotObject,
        HiveError::NoType,
        HiveError::BadType,
        HiveError::BadRequestId,
    ];
    pub fn code(self) -> &'static str {
        match self {
            HiveError::BadJson => "bad-json",
            HiveError::NotObject => "not-object",
            HiveError::NoType => "no-type",
            HiveError::BadType => "bad-type",
            HiveError::BadRequestId => "bad-request-id",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

impl From<JsonError> for HiveError {
    fn from(e: JsonError) -> Self {
        match e {
            JsonError::Invalid => HiveError::BadJson,
            JsonError::NotObject => HiveError::NotObject,
        }
    }
}

const INJECTED: [&str; 3] = ["device", "account", "service"];

/// Decode one text frame from an authenticated device.
pub fn decode<'a>(
    text: &'a [u8],
    meta: &Meta,
    scratch: &mut Scratch,
) -> Result<Inbound<'a>, HiveError> {
    scratch.parse_object(text)?;
    let ty_member = scratch.find(text, "type").ok_or(HiveError::NoType)?;
    let ty = as_str(text, &ty_member.value).ok_or(HiveError::NoType)?;
    if ty.is_empty() || ty.len() > MAX_TYPE_LEN {
        return Err(HiveError::BadType);
    }
    match &*ty {
        "ack" => Ok(Inbound::Ack {
            request: request_id(text, scratch)?,
        }),
        "response" => {
            let request = request_id(text, scratch)?;
            let ok = scratch
                .find(text, "status")
                .and_then(|m| as_str(text, &m.value))
                .is_none_or(|s| s == "ok");
            let result = scratch
                .find(text, "result")
                .map(|m| text[m.value.clone()].to_vec());
            Ok(Inbound::Response {
                request,
                ok,
                result,
            })
        }
        _ => {
            let body = inject(text, scratch, meta, DEVICE_SERVICE);
            Ok(Inbound::Event { ty, body })
        }
    }
}

fn request_id(text: &[u8], scratch: &Scratch) -> Result<Uuid, HiveError> {
    scratch
        .find(text, "request")
        .and_then(|m| as_str(text, &m.value))
        .and_then(|s| Uuid::parse_str(&s).ok())
        .ok_or(HiveError::BadRequestId)
}

/// Copy the object's members, minus any `device`/`account`/`service` the device sent,
/// then append the real ones. Of members with the same key only the last is copied (the
/// one `Scratch::find` reads the routing key's `type` from): a published body never holds
/// a duplicate top-level key, so no consumer can read another value than the router
/// routed on, whichever duplicate it keeps. Values are copied as bytes, never
/// re-serialised, into a buffer of exactly the right size (so it becomes the bus's
/// `Bytes` without a reallocation).
fn inject(text: &[u8], scratch: &Scratch, meta: &Meta, service: &str) -> Vec<u8> {
    let injected = |m: &Member| {
        if m.key_escaped {
            return INJECTED.iter().any(|k| key_is(text, m, k));
        }
        matches!(
            &text[m.key.start + 1..m.key.end - 1],
            b"device" | b"account" | b"service"
        )
    };
    let members = &scratch.members;
    // Which members are left out, decided once: a bit each (objects of more than 64
    // members, rare, decide per member each time).
    let decide = |i: usize, m: &Member| {
        injected(m)
            || members[i + 1..]
                .iter()
                .any(|later| same_key(text, m, later))
    };
    let few = members.len() <= 64;
    let mut left_out: u64 = 0;
    if few {
        for (i, m) in members.iter().enumerate() {
            if decide(i, m) {
                left_out |= 1 << i;
            }
        }
    }
    let skip = |i: usize, m: &Member| {
        if few {
            left_out & (1 << i) != 0
        } else {
            decide(i, m)
        }
    };
    let service = service_json(service);
    let kept: usize = members
        .iter()
        .enumerate()
        .filter(|(i, m)| !skip(*i, m))
        .map(|(_, m)| m.value.end - m.key.start + 1)
        .sum();
    let len = kept + META_LEN + service.len() + 2;
    let mut out = Vec::with_capacity(len);
    out.push(b'{');
    for (i, m) in members.iter().enumerate() {
        if skip(i, m) {
            continue;
        }
        let member: Range<usize> = m.key.start..m.value.end;
        out.extend_from_slice(&text[member]);
        out.push(b',');
    }
    push_meta(&mut out, meta, &service);
    out.push(b'}');
    debug_assert_eq!(out.len(), len);
    out
}

/// Do two members have the same key once unescaped? (Raw bytes when neither has an
/// escape, the usual case: no allocation.)
fn same_key(text: &[u8], a: &Member, b: &Member) -> bool {
    if !a.key_escaped && !b.key_escaped {
        return a.key.len() == b.key.len() && text[a.key.clone()] == text[b.key.clone()];
    }
    let unescaped = |m: &Member| serde_json::from_slice::<String>(&text[m.key.clone()]).ok();
    matches!((unescaped(a), unescaped(b)), (Some(x), Some(y)) if x == y)
}

/// `"device":"<36>","account":"<36>","service":` without the service's value.
pub(super) const META_LEN: usize = 10 + 36 + 13 + 36 + 12;

/// A service name as a JSON string; the two the router uses are plain ASCII.
pub(super) fn service_json(service: &str) -> Cow<'static, [u8]> {
    match service {
        DEVICE_SERVICE => Cow::Borrowed(b"\"hive-device\""),
        BACKEND_SERVICE => Cow::Borrowed(b"\"hive-backend\""),
        _ => {
            let mut v = Vec::new();
            push_str(&mut v, service);
            Cow::Owned(v)
        }
    }
}

/// The metadata members every device event carries: `"device":D,"account":A,"service":S`.
pub(super) fn push_meta(out: &mut Vec<u8>, meta: &Meta, service_json: &[u8]) {
    out.extend_from_slice(b"\"device\":\"");
    push_uuid(out, &meta.device);
    out.extend_from_slice(b"\",\"account\":\"");
    push_uuid(out, &meta.account);
    out.extend_from_slice(b"\",\"service\":");
    out.extend_from_slice(service_json);
}

/// `{"type":"authenticated","device":D,"account":A}`.
pub fn authenticated(meta: &Meta) -> Vec<u8> {
    format!(
        r#"{{"type":"authenticated","device":"{}","account":"{}"}}"#,
        meta.device, meta.account
    )
    .into_bytes()
}

/// The device-alive event the router emits for a pong.
pub fn device_alive(meta: &Meta, address: &str) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"type\":\"device-alive\",";
    const ADDRESS: &[u8] = b",\"address\":";
    let service = service_json(BACKEND_SERVICE);
    // Exact for an address that needs no escaping (a socket address never does), so the
    // event becomes `Bytes` without a reallocation.
    let len = HEAD.len() + META_LEN + service.len() + ADDRESS.len() + address.len() + 3;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(HEAD);
    push_meta(&mut out, meta, &service);
    out.extend_from_slice(ADDRESS);
    push_str(&mut out, address);
    out.push(b'}');
    out
}

/// A request to the device. `payload` is raw JSON (already validated by the API).
pub fn device_request(meta: &Meta, request: Uuid, command: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(200 + command.len() + payload.len());
    out.extend_from_slice(
        b"{\"type\":\"device-request\",\"service\":\"hive-backend\",\"account\":\"",
    );
    push_uuid(&mut out, &meta.account);
    out.extend_from_slice(b"\",\"device\":\"");
    push_uuid(&mut out, &meta.device);
    out.extend_from_slice(b"\",\"request\":\"");
    push_uuid(&mut out, &request);
    out.extend_from_slice(b"\",\"command\":");
    push_str(&mut out, command);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(if payload.is_empty() { b"null" } else { payload });
    out.push(b'}');
    out
}

/// `{"type":"error","code":C,"message":M}`.
pub fn error(code: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"{\"type\":\"error\",\"code\":");
    push_str(&mut out, code);
    out.extend_from_slice(b",\"message\":");
    push_str(&mut out, message);
    out.push(b'}');
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

    #[test]
    fn injected_metadata_names_each_service_as_json() {
        for service in [DEVICE_SERVICE, BACKEND_SERVICE, "other \"service\""] {
            let mut out = b"{".to_vec();
            push_meta(&mut out, &meta(), &service_json(service));
            out.push(b'}');
            let v: Value = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(v["service"], service);
            assert_eq!(v["device"], Uuid::from_u128(1).to_string());
            assert_eq!(v["account"], Uuid::from_u128(2).to_string());
        }
    }

    fn dec(s: &str) -> Result<Inbound<'_>, HiveError> {
        decode(s.as_bytes(), &meta(), &mut Scratch::default())
    }

    /// Top-level keys of a published body, in order, as a first-wins reader would list them.
    fn top_level_keys(body: &[u8]) -> Vec<String> {
        let mut s = Scratch::default();
        s.parse_object(body).unwrap();
        s.members
            .iter()
            .map(|m| serde_json::from_slice::<String>(&body[m.key.clone()]).unwrap())
            .collect()
    }

    #[test]
    fn a_published_body_has_no_duplicate_key_and_type_routes_as_the_body_says() {
        for c in [
            r#"{"type":"a","n":1,"type":"b","n":2}"#,
            r#"{"type":"a","t\u0079pe":"b","x":{"k":1,"k":2}}"#,
            r#"{"type":"a","device":"x","type":"b","device":"y"}"#,
        ] {
            let Ok(Inbound::Event { ty, body }) = dec(c) else {
                panic!("not an event: {c}");
            };
            let keys = top_level_keys(&body);
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                keys.len(),
                unique.len(),
                "duplicate keys in {}",
                String::from_utf8_lossy(&body)
            );
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(ty, "b", "{c}");
            assert_eq!(v["type"], "b", "the routing key's type is the body's: {c}");
            assert_eq!(v["device"], meta().device.to_string());
        }
    }

    #[test]
    fn events_get_metadata_overwritten() {
        let spoof = Uuid::from_u128(99);
        let cases = [
            format!(r#"{{"type":"instances","device":"{spoof}","apps":[{{"device":"x"}}]}}"#),
            format!(
                r#"{{"d\u0065vice":"{spoof}","type":"instances","service":"evil","apps":[{{"device":"x"}}],"account":7}}"#
            ),
            r#"{"type":"instances","apps":[{"device":"x"}]}"#.to_string(),
        ];
        for c in cases {
            let Ok(Inbound::Event { ty, body }) = dec(&c) else {
                panic!("not an event: {c}");
            };
            assert_eq!(ty, "instances");
            // Parse with a strict parser that errors on nothing: last key wins, so any
            // leftover spoofed key would have to come after ours to win; there must be none.
            let text = String::from_utf8(body.clone()).unwrap();
            assert_eq!(text.matches("\"device\"").count(), 2, "{text}"); // ours + nested
            assert!(!text.contains(&spoof.to_string()), "{text}");
            assert!(!text.contains("evil"));
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["device"], meta().device.to_string());
            assert_eq!(v["account"], meta().account.to_string());
            assert_eq!(v["service"], "hive-device");
            assert_eq!(v["apps"][0]["device"], "x");
        }
    }

    #[test]
    fn acks_and_responses() {
        let r = Uuid::from_u128(5);
        assert_eq!(
            dec(&format!(r#"{{"type":"ack","request":"{r}"}}"#)),
            Ok(Inbound::Ack { request: r })
        );
        assert_eq!(
            dec(&format!(
                r#"{{"type":"response","request":"{r}","status":"error","result":{{"a":[1]}}}}"#
            )),
            Ok(Inbound::Response {
                request: r,
                ok: false,
                result: Some(br#"{"a":[1]}"#.to_vec())
            })
        );
        assert_eq!(
            dec(r#"{"type":"ack","request":"nope"}"#),
            Err(HiveError::BadRequestId)
        );
        assert_eq!(dec(r#"{"type":"ack"}"#), Err(HiveError::BadRequestId));
    }

    #[test]
    fn malformed_frames_get_error_codes() {
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(201));
        let table: &[(&str, HiveError)] = &[
            ("", HiveError::BadJson),
            ("{", HiveError::BadJson),
            ("not json", HiveError::BadJson),
            ("[1,2]", HiveError::NotObject),
            ("42", HiveError::NotObject),
            ("{}", HiveError::NoType),
            (r#"{"type":5}"#, HiveError::NoType),
            (r#"{"type":""}"#, HiveError::BadType),
            (&long, HiveError::BadType),
        ];
        for (input, want) in table {
            assert_eq!(dec(input), Err(*want), "{input}");
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(dec(&deep).is_err());
        let deep_obj = format!(
            r#"{{"type":"x","a":{}1{}}}"#,
            "[".repeat(5_000),
            "]".repeat(5_000)
        );
        assert!(matches!(
            dec(&deep_obj),
            Ok(Inbound::Event { .. }) | Err(HiveError::BadJson)
        ));
    }

    #[test]
    fn outbound_frames_are_valid_json() {
        let r = Uuid::from_u128(7);
        let req = device_request(&meta(), r, "Scheduler\"Action", br#"{"x":1}"#);
        let v: Value = serde_json::from_slice(&req).unwrap();
        assert_eq!(v["type"], "device-request");
        assert_eq!(v["command"], "Scheduler\"Action");
        assert_eq!(v["request"], r.to_string());
        assert_eq!(v["payload"]["x"], 1);
        for address in ["127.0.0.1:5", "[2001:db8::1]:65535"] {
            let raw = device_alive(&meta(), address);
            // Sized exactly (Vec::with_capacity gives exactly what is asked).
            assert_eq!(raw.len(), raw.capacity());
            let a: Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(a["service"], "hive-backend");
            assert_eq!(a["address"], address);
        }
        let body = match dec(r#"{"type":"t","device":"x","a":[1,{"b":"c"}]}"#) {
            Ok(Inbound::Event { body, .. }) => body,
            other => panic!("{other:?}"),
        };
        assert_eq!(body.len(), body.capacity());
        let e: Value = serde_json::from_slice(&error("bad-json", "a \"b\"")).unwrap();
        assert_eq!(e["message"], "a \"b\"");
        let au: Value = serde_json::from_slice(&authenticated(&meta())).unwrap();
        assert_eq!(au["type"], "authenticated");
    }
}
