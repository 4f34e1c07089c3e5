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
        hivekit::on_text(&meta(), &bytes, &mut out);
        for vsn in [Vsn::V1, Vsn::V2] {
            PhxState::new(vsn).on_text(&meta(), &bytes, &mut out);
        }
    }

    #[test]
    fn adapters_never_panic_on_json(v in json_value()) {
        let text = v.to_string();
        let _ = hive::decode(text.as_bytes(), &meta(), &mut Scratch::default());
        let mut out = Vec::new();
        hivekit::on_text(&meta(), text.as_bytes(), &mut out);
        let wrapped = Value::Array(vec![v.clone()]).to_string();
        hivekit::on_text(&meta(), wrapped.as_bytes(), &mut out);
        let mut st = PhxState::new(Vsn::V2);
        let frame = serde_json::json!(["1", "1", "device", "phx_join", v]).to_string();
        st.on_text(&meta(), frame.as_bytes(), &mut out);
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
}
