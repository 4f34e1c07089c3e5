//! Property tests of the pure protocol functions (the same ones the fuzz targets in
//! fuzz/ drive): arbitrary bytes never panic, and metadata injection keeps every
//! member of any object while overwriting device/account/service.

use proptest::prelude::*;
use router::protocol::effect::Effect;
use router::protocol::hive::{self, Inbound, Meta};
use router::protocol::json::Scratch;
use router::protocol::phoenix::{PhxState, Vsn};
use router::protocol::{hivekit, ws};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Pieces of JSON text, valid and nearly valid, for the validator's property test.
const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    " ",
    "\n",
    "\"",
    "\"k\"",
    "\"a b\"",
    "\"\\n\"",
    "\"\\u00e9\"",
    "\"\\u12\"",
    "\"\\x\"",
    "\"é\"",
    "\"\u{1}\"",
    "\\",
    "0",
    "1",
    "9",
    "-",
    "+",
    ".",
    "e",
    "E",
    "true",
    "false",
    "null",
    "tru",
    "nul",
    "01",
    "1.5",
    "-0",
    "1e5",
    "\t",
];

fn meta() -> Meta {
    Meta {
        device: Uuid::from_u128(0xd),
        account: Uuid::from_u128(0xa),
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ws_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..32), max in 0usize..100_000) {
        if let Ok(Some(h)) = ws::parse_header(&bytes, max) {
            prop_assert!(h.payload_len <= max || h.is_control());
            prop_assert!(h.header_len >= 6 && h.header_len <= 14);
        }
    }

    #[test]
    fn ws_mask_round_trip(payload in prop::collection::vec(any::<u8>(), 0..300), mask in any::<[u8; 4]>()) {
        let mut p = payload.clone();
        ws::unmask(&mut p, mask);
        ws::unmask(&mut p, mask);
        prop_assert_eq!(p, payload);
    }

    #[test]
    fn adapters_never_panic_on_junk(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = hive::decode(&bytes, &meta(), &mut Scratch::default());
        let mut out = Vec::new();
        hivekit::on_text(&hivekit::Session { meta: &meta(), realm: "r" }, &mut hivekit::Subscriptions::default(), &bytes, &mut Scratch::default(), &mut out);
        for vsn in [Vsn::V1, Vsn::V2] {
            PhxState::new(vsn).on_text(&meta(), &bytes, &mut Scratch::default(), &mut out);
        }
    }

    #[test]
    fn adapters_never_panic_on_json(v in json_value()) {
        let text = v.to_string();
        let _ = hive::decode(text.as_bytes(), &meta(), &mut Scratch::default());
        let mut out = Vec::new();
        hivekit::on_text(&hivekit::Session { meta: &meta(), realm: "r" }, &mut hivekit::Subscriptions::default(), text.as_bytes(), &mut Scratch::default(), &mut out);
        let wrapped = Value::Array(vec![v.clone()]).to_string();
        hivekit::on_text(&hivekit::Session { meta: &meta(), realm: "r" }, &mut hivekit::Subscriptions::default(), wrapped.as_bytes(), &mut Scratch::default(), &mut out);
        let mut st = PhxState::new(Vsn::V2);
        let frame = serde_json::json!(["1", "1", "device", "phx_join", v]).to_string();
        st.on_text(&meta(), frame.as_bytes(), &mut Scratch::default(), &mut out);
        for e in &out {
            if let Effect::Send(b) | Effect::Publish { body: b, .. } = e {
                prop_assert!(serde_json::from_slice::<Value>(b).is_ok(), "invalid JSON out: {}", String::from_utf8_lossy(b));
            }
        }
    }

    #[test]
    fn injection_keeps_members_and_overwrites_identity(
        members in prop::collection::btree_map("[a-z]{1,6}|device|account|service", json_value(), 0..8),
        ty in "[a-z][a-z-]{0,15}",
        pretty in any::<bool>(),
    ) {
        let mut obj: Map<String, Value> = members.into_iter().collect();
        obj.insert("type".into(), Value::from(ty.clone()));
        if ty == "ack" || ty == "response" {
            return Ok(());
        }
        let text = if pretty { serde_json::to_string_pretty(&obj).unwrap() } else { serde_json::to_string(&obj).unwrap() };
        let Ok(Inbound::Event { ty: got, body }) = hive::decode(text.as_bytes(), &meta(), &mut Scratch::default()) else {
            return Err(TestCaseError::fail(format!("not an event: {text}")));
        };
        prop_assert_eq!(got, ty);
        let out: Map<String, Value> = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(&out["device"], &Value::from(meta().device.to_string()));
        prop_assert_eq!(&out["account"], &Value::from(meta().account.to_string()));
        prop_assert_eq!(&out["service"], &Value::from("hive-device"));
        // Compare with the same text parsed the same way (serde_json's float parsing
        // is not exact; the router copies the bytes and never parses them).
        let obj: Map<String, Value> = serde_json::from_str(&text).unwrap();
        for (k, v) in &obj {
            if !["device", "account", "service"].contains(&k.as_str()) {
                prop_assert_eq!(out.get(k), Some(v), "member {} changed", k);
            }
        }
        let extra = ["device", "account", "service"].iter().filter(|k| !obj.contains_key(**k)).count();
        prop_assert_eq!(out.len(), obj.len() + extra);
    }

    /// The one-pass validator agrees with serde_json on text glued from JSON's own
    /// tokens and near-misses (no `\uD8xx` surrogate escapes: we refuse lone ones on
    /// purpose, serde_json's validation lets them through).
    #[test]
    fn validator_agrees_with_serde_json(
        v in json_value(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(JSON_TOKENS), any::<bool>()), 0..3),
        glued in prop::collection::vec(prop::sample::select(JSON_TOKENS), 0..6),
    ) {
        // A valid document with a few tokens inserted or characters deleted (near
        // misses), or else tokens glued together.
        let mut text = if glued.is_empty() { v.to_string() } else { glued.concat() };
        for (at, token, insert) in edits {
            let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
            let i = cuts[at.index(cuts.len())];
            if insert {
                text.insert_str(i, token);
            } else if i < text.len() {
                text.remove(i);
            }
        }
        let serde_ok = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
        prop_assert_eq!(router::protocol::json::validate(text.as_bytes()), serde_ok, "{:?}", text);
        let object_ok = serde_ok && text.trim_start().starts_with('{');
        prop_assert_eq!(Scratch::default().parse_object(text.as_bytes()).is_ok(), object_ok, "{:?}", text);
    }

    /// Any serialised value is valid, and an object's members are found with exactly
    /// the keys and values serde_json sees.
    #[test]
    fn members_are_the_objects_members(
        members in prop::collection::btree_map(".{0,8}", json_value(), 0..8),
        pretty in any::<bool>(),
    ) {
        let obj: Map<String, Value> = members.into_iter().collect();
        let text = if pretty { serde_json::to_string_pretty(&obj).unwrap() } else { serde_json::to_string(&obj).unwrap() };
        prop_assert!(router::protocol::json::validate(text.as_bytes()));
        let mut s = Scratch::default();
        s.parse_object(text.as_bytes()).unwrap();
        prop_assert_eq!(s.members.len(), obj.len());
        let b = text.as_bytes();
        for m in &s.members {
            let k: String = serde_json::from_slice(&b[m.key.clone()]).unwrap();
            let v: Value = serde_json::from_slice(&b[m.value.clone()]).unwrap();
            let want: Value = serde_json::from_str::<Map<String, Value>>(&text).unwrap()[&k].clone();
            prop_assert_eq!(v, want, "member {}", k);
        }
    }
}
