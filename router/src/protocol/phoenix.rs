//! Phoenix channels as NervesHub devices speak them (`/socket/websocket`): V1 JSON
//! objects and V2 arrays (`vsn=2.0.0`). Pure: frames in, effects and frames out.
//! Keeps the per-connection join state; never does I/O.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use super::effect::Effect;
use super::hive::{push_meta, service_json, Meta, DEVICE_SERVICE, MAX_TYPE_LEN, META_LEN};
use super::json::{self, push_str, Scratch};

/// Error codes counted in `router_phoenix_errors_total{code}`.
pub const ERROR_CODES: [&str; 4] = [
    "bad-frame",
    "unmatched-topic",
    "stale-join-ref",
    "bad-event",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
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
}

/// A decoded Phoenix message; its strings borrowed from the frame unless escaped.
#[derive(Debug, PartialEq, Eq)]
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
        Vsn::V2 => {
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
        Vsn::V2 => {
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
        PhxState {
            vsn,
            device: None,
            console: None,
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
            out.push(Effect::Error("bad-frame"));
            return;
        };
        let own_topic = |t: &str| {
            t == "device"
                || t.strip_prefix("device:")
                    .is_some_and(|id| Uuid::parse_str(id).is_ok_and(|u| u == meta.device))
        };
        match (&*m.topic, &*m.event) {
            ("phoenix", "heartbeat") => out.push(self.reply(&m, OK)),
            (topic, "phx_join") => {
                let slot = if own_topic(topic) {
                    &mut self.device
                } else if topic == "console" {
                    &mut self.console
                } else {
                    out.push(Effect::Error("unmatched-topic"));
                    out.push(self.reply(&m, UNMATCHED));
                    return;
                };
                let join = Join {
                    topic: m.topic.to_string(),
                    join_ref: m
                        .join_ref
                        .as_deref()
                        .or(m.reff.as_deref())
                        .map(str::to_string),
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
                out.push(self.reply(&m, OK));
                if own_topic(topic) {
                    out.push(Effect::Publish {
                        ty: "device-join".into(),
                        body: event_body(meta, "device-join", &m.topic, m.payload),
                    });
                    out.push(Effect::Ready);
                }
            }
            (_, "phx_leave") => {
                let slot = self.slot(&m.topic);
                if let Some(slot) = slot {
                    *slot = None;
                }
                out.push(self.reply(&m, OK));
            }
            _ => {
                let current = match self.slot(&m.topic) {
                    Some(Some(j)) => j.join_ref.clone(),
                    _ => {
                        out.push(Effect::Error("unmatched-topic"));
                        out.push(self.reply(&m, UNMATCHED));
                        return;
                    }
                };
                if m.join_ref.is_some() && m.join_ref.as_deref() != current.as_deref() {
                    // A frame from a channel instance that was since rejoined: ignored.
                    out.push(Effect::Error("stale-join-ref"));
                    return;
                }
                self.on_push(meta, &m, out);
            }
        }
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
        if m.reff.is_some() {
            out.push(self.reply(m, OK));
        }
    }

    /// A backend event for the device (a JSON object with `type`), pushed on its topic.
    /// None until the device joined.
    pub fn encode_event(&self, body: &[u8]) -> Option<Vec<u8>> {
        let j = self.device.as_ref()?;
        let name = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "event".to_string());
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
        let j = self.device.as_ref()?;
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
mod tests {
    use super::*;
    use serde_json::json;

    fn meta() -> Meta {
        Meta {
            device: Uuid::from_u128(1),
            account: Uuid::from_u128(2),
        }
    }

    fn run(st: &mut PhxState, frame: Value) -> Vec<Effect> {
        let mut out = Vec::new();
        st.on_text(
            &meta(),
            frame.to_string().as_bytes(),
            &mut Scratch::default(),
            &mut out,
        );
        out
    }

    fn sent(e: &Effect) -> Value {
        match e {
            Effect::Send(b) => serde_json::from_slice(b).unwrap(),
            other => panic!("not a send: {other:?}"),
        }
    }

    #[test]
    fn v2_heartbeat_join_push_and_leave() {
        let mut st = PhxState::new(Vsn::V2);
        let out = run(&mut st, json!([null, "1", "phoenix", "heartbeat", {}]));
        assert_eq!(
            sent(&out[0]),
            json!([null, "1", "phoenix", "phx_reply", {"status":"ok","response":{}}])
        );

        let out = run(
            &mut st,
            json!(["3", "3", "device", "phx_join", {"nerves_fw_uuid":"u","device_api_version":"2.0.0"}]),
        );
        assert_eq!(
            sent(&out[0]),
            json!(["3", "3", "device", "phx_reply", {"status":"ok","response":{}}])
        );
        let Effect::Publish { ty, body } = &out[1] else {
            panic!()
        };
        assert_eq!(ty, "device-join");
        let b: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(b["payload"]["nerves_fw_uuid"], "u");
        assert_eq!(b["device"], meta().device.to_string());
        assert_eq!(out[2], Effect::Ready);
        assert!(st.joined());

        let out = run(
            &mut st,
            json!(["3", "4", "device", "fwup_progress", {"value": 10}]),
        );
        assert_eq!(out[0], Effect::AckCommand("update"));
        assert!(matches!(&out[1], Effect::Publish { ty, .. } if ty == "fwup_progress"));
        assert_eq!(sent(&out[2])[3], "phx_reply");

        let r = Uuid::from_u128(9);
        let out = run(&mut st, json!(["3", "5", "device", "ack", {"request": r}]));
        assert_eq!(out[0], Effect::Ack(r));

        // Stale join ref: ignored.
        let out = run(&mut st, json!(["1", "6", "device", "status_update", {}]));
        assert_eq!(out, vec![Effect::Error("stale-join-ref")]);

        // Rejoin closes the old channel.
        let out = run(&mut st, json!(["7", "7", "device", "phx_join", {}]));
        assert_eq!(sent(&out[0]), json!(["3", "3", "device", "phx_close", {}]));

        let req = st.encode_request(r, "reboot", br#"{"delay":1}"#).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&req).unwrap(),
            json!(["7", null, "device", "reboot", {"request": r, "delay": 1}])
        );

        let out = run(&mut st, json!(["7", "8", "device", "phx_leave", {}]));
        assert_eq!(sent(&out[0])[4]["status"], "ok");
        assert!(!st.joined());
        assert!(st.encode_request(r, "reboot", b"{}").is_none());
    }

    #[test]
    fn other_topics_are_refused() {
        let mut st = PhxState::new(Vsn::V2);
        let other = Uuid::from_u128(77);
        for topic in [
            format!("device:{other}"),
            "firmware".into(),
            "device:not-a-uuid".into(),
        ] {
            let out = run(&mut st, json!(["1", "1", topic, "phx_join", {}]));
            assert_eq!(out[0], Effect::Error("unmatched-topic"));
            assert_eq!(
                sent(&out[1])[4],
                json!({"status":"error","response":{"reason":"unmatched topic"}})
            );
        }
        // Own id topic works; pushes on a topic never joined are refused.
        let out = run(
            &mut st,
            json!(
                ["2", "2", format!("device:{}", meta().device), "phx_join", {
                }]
            ),
        );
        assert_eq!(sent(&out[0])[4]["status"], "ok");
        let out = run(&mut st, json!(["2", "3", "console", "up", {"data":"x"}]));
        assert_eq!(out[0], Effect::Error("unmatched-topic"));
    }

    #[test]
    fn v1_objects() {
        let mut st = PhxState::new(Vsn::V1);
        let out = run(
            &mut st,
            json!({"topic":"device","event":"phx_join","payload":{},"ref":"1"}),
        );
        let r = sent(&out[0]);
        assert_eq!(
            (
                r["event"].as_str(),
                r["ref"].as_str(),
                r["payload"]["status"].as_str()
            ),
            (Some("phx_reply"), Some("1"), Some("ok"))
        );
        let out = run(
            &mut st,
            json!({"topic":"console","event":"phx_join","payload":{},"ref":2}),
        );
        assert_eq!(sent(&out[0])["ref"], "2");
        let out = run(
            &mut st,
            json!({"topic":"console","event":"up","payload":{"data":"ls\n"},"ref":null}),
        );
        assert!(matches!(&out[0], Effect::Publish { ty, .. } if ty == "up"));
        assert_eq!(out.len(), 1, "no ref, no reply");
    }

    #[test]
    fn escaped_strings_and_odd_refs() {
        // Escaped topic, event and refs are unescaped; a ref that is neither a string nor
        // a number is no ref; a float ref keeps serde_json's spelling of the number.
        let mut st = PhxState::new(Vsn::V2);
        let frame = br#"["1\u0031","a\"b","dev\u0069ce","phx_j\u006fin",{}]"#;
        let mut out = Vec::new();
        st.on_text(&meta(), frame, &mut Scratch::default(), &mut out);
        assert_eq!(
            sent(&out[0]),
            json!(["11", "a\"b", "device", "phx_reply", {"status":"ok","response":{}}])
        );
        assert!(st.joined());
        let mut out = Vec::new();
        st.on_text(
            &meta(),
            br#"[true,1.5e1,"device","up",{}]"#,
            &mut Scratch::default(),
            &mut out,
        );
        assert!(matches!(&out[0], Effect::Publish { ty, .. } if ty == "up"));
        assert_eq!(
            sent(&out[1]),
            json!([null, "15.0", "device", "phx_reply", {"status":"ok","response":{}}])
        );
    }

    /// The V2 decoder before it read spans: serde into a tuple, refs as `Value`s.
    #[allow(clippy::type_complexity)]
    fn decode_v2_serde(
        text: &[u8],
    ) -> Option<(Option<String>, Option<String>, String, String, Vec<u8>)> {
        type V2<'a> = (Option<Value>, Option<Value>, String, String, &'a RawValue);
        let (j, r, topic, event, payload): V2 = serde_json::from_slice(text).ok()?;
        let as_ref = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Some((
            as_ref(j),
            as_ref(r),
            topic,
            event,
            payload.get().as_bytes().to_vec(),
        ))
    }

    /// One element of a generated V2 frame: valid JSON of every kind, escapes, numbers
    /// serde_json cannot hold, near misses.
    fn element() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            prop::sample::select(vec![
                "null",
                "true",
                "false",
                "\"3\"",
                "\"device\"",
                "\"phx_join\"",
                "\"d\\u0065vice\"",
                "\"a\\\"b\"",
                "\"\\ud83d\\ude00\"",
                "\"é\"",
                "12",
                "-0",
                "-1.5e3",
                "1E2",
                "0.25",
                "1e400",
                "{}",
                "[]",
                "{\"a\":[1,{\"b\":null}]}",
                " \"x\" ",
                "\n{}\t",
                "tru",
                "01",
                "1.",
                "\"open",
                "{\"a\"}",
                "[1,]",
                "nul",
            ])
            .prop_map(str::to_string),
            any::<String>().prop_map(|s| Value::String(s).to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:e}")),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        #[test]
        fn v2_spans_decode_as_serde_did(
            elems in proptest::collection::vec(element(), 0..7),
            pad in proptest::sample::select(vec!["", " ", "\n "]),
        ) {
            let text = format!("{pad}[{}]{pad}", elems.join(","));
            let new = decode(Vsn::V2, text.as_bytes(), &mut Scratch::default()).map(|m| {
                (
                    m.join_ref.map(Cow::into_owned),
                    m.reff.map(Cow::into_owned),
                    m.topic.into_owned(),
                    m.event.into_owned(),
                    m.payload.to_vec(),
                )
            });
            proptest::prop_assert_eq!(new, decode_v2_serde(text.as_bytes()), "{}", text);
        }
    }

    #[test]
    fn generated_v2_frames_reach_both_outcomes() {
        // The property above must see accepted frames, not only refusals.
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut ok, mut bad) = (0, 0);
        for _ in 0..2000 {
            let elems: Vec<String> = proptest::collection::vec(element(), 5..6)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            let text = format!("[{}]", elems.join(","));
            match decode(Vsn::V2, text.as_bytes(), &mut Scratch::default()) {
                Some(_) => ok += 1,
                None => bad += 1,
            }
        }
        assert!(ok > 50 && bad > 50, "accepted {ok}, refused {bad}");
    }

    #[test]
    fn a_lone_surrogate_is_refused_anywhere_in_a_v2_frame() {
        // serde_json let one through inside the payload; no backend could decode it,
        // and Hive events refuse it the same way.
        let frame = br#"["1","2","device","up",{"x":"\ud800"}]"#;
        assert!(decode_v2_serde(frame).is_some());
        assert!(decode(Vsn::V2, frame, &mut Scratch::default()).is_none());
    }

    #[test]
    fn malformed_frames_never_panic() {
        for vsn in [Vsn::V1, Vsn::V2] {
            let mut st = PhxState::new(vsn);
            for bad in [
                "",
                "[",
                "{}",
                "[1,2,3]",
                "[null,null,5,\"x\",{}]",
                "{\"topic\":1}",
                "nul",
                "[null,null,\"device\",\"phx_join\"]",
            ] {
                let mut out = Vec::new();
                st.on_text(&meta(), bad.as_bytes(), &mut Scratch::default(), &mut out);
                assert_eq!(out, vec![Effect::Error("bad-frame")], "{bad}");
            }
        }
    }

    #[test]
    fn request_payload_injection() {
        let r = Uuid::from_u128(3);
        for (p, want) in [
            (&b"{}"[..], json!({"request": r})),
            (b"", json!({"request": r})),
            (b"null", json!({"request": r})),
            (b" {\"a\":{\"b\":1}} ", json!({"request": r, "a": {"b": 1}})),
            (b"[1]", json!({"request": r, "value": [1]})),
        ] {
            assert_eq!(
                serde_json::from_slice::<Value>(&with_request(r, p)).unwrap(),
                want
            );
        }
    }
}
