//! Properties of the Hivekit adapter on generated frames (actions made of the
//! protocol's keys and values, repeated and escaped keys, any JSON, batches):
//! it never panics; every action that carries a `cid` gets exactly one reply with that
//! `cid` and nothing else does except errors; every reply and every published event is
//! JSON whose keys the router wrote once each, and every event names the device, its
//! account and its realm.

use proptest::prelude::*;
use router::protocol::effect::Effect;
use router::protocol::hive::Meta;
use router::protocol::hivekit::{self, Session, Subscriptions};
use router::protocol::json::Scratch;
use serde_json::Value;
use uuid::Uuid;

const REALM: &str = "r1";

fn meta() -> Meta {
    Meta {
        device: Uuid::from_u128(0xd00d),
        account: Uuid::from_u128(0xacc),
    }
}

const REQUEST: u128 = 0x5eed;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object written member by member, so keys can repeat; `sep` between members.
fn object(members: Vec<(String, String)>, sep: &str) -> String {
    let body: Vec<String> = members
        .into_iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    format!("{{{}}}", body.join(sep))
}

/// A `loc` value: mostly objects with short, unknown and escaped keys, some repeated.
fn loc() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "lon",
        "lat",
        "acc",
        "spe",
        "hea",
        "alt",
        "tim",
        "gcs",
        "alc",
        "x",
        "l\\u0061t",
        "y\\u0041",
    ]);
    prop_oneof![
        4 => prop::collection::vec((key, json_value().prop_map(|v| v.to_string())), 0..6)
            .prop_map(|m| object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), ",")),
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

/// A value for one member: the strings that steer the adapter, or any JSON.
fn member_value() -> impl Strategy<Value = String> {
    let own = format!("\"{}\"", meta().device);
    let other = format!("\"{}\"", Uuid::from_u128(7));
    let request = format!("\"{}\"", Uuid::from_u128(REQUEST));
    let words: Vec<String> = [
        "\"sys\"",
        "\"obj\"",
        "\"rea\"",
        "\"sub\"",
        "\"are\"",
        "\"hbt\"",
        "\"aut\"",
        "\"set\"",
        "\"upd\"",
        "\"cre\"",
        "\"del\"",
        "\"lis\"",
        "\"pub\"",
        "\"uns\"",
        "\"suc\"",
        "\"err\"",
        "\"zzz\"",
        "\"s\\u0079s\"",
        "\"r1\"",
        "\"r2\"",
        "\"*\"",
        "\"hive.ack\"",
        "\"hive.response\"",
        "\"hive.request\"",
        "1",
        "null",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([own, other, request])
    .collect();
    prop_oneof![
        3 => prop::sample::select(words),
        1 => loc(),
        1 => pubsub_dat(),
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

/// A pubsub `dat`: `{"eve":..,"idp":..,"dat":..}` with the request events and ids.
fn pubsub_dat() -> impl Strategy<Value = String> {
    let eve = prop::sample::select(vec![
        "\"hive.ack\"",
        "\"hive.response\"",
        "\"hive.request\"",
        "\"cfg\"",
        "\"*\"",
        "1",
        "\"\"",
    ]);
    let idp = prop::sample::select(vec!["\"*\"", "\"x\"", "null"]);
    let id = format!("\"{}\"", Uuid::from_u128(REQUEST));
    let data = prop_oneof![
        Just(format!("{{\"id\":{id}}}")),
        Just(format!("{{\"id\":{id},\"result\":[1]}}")),
        Just(format!("{{\"id\":{id},\"error\":\"no\"}}")),
        Just(id.clone()),
        json_value().prop_map(|v| v.to_string()),
    ];
    (eve, proptest::option::of(idp), proptest::option::of(data)).prop_map(|(e, i, d)| {
        let mut m = vec![("eve".to_string(), e.to_string())];
        m.extend(i.map(|i| ("idp".to_string(), i.to_string())));
        m.extend(d.map(|d| ("dat".to_string(), d)));
        object(m, ",")
    })
}

/// One action: mostly objects made of the adapter's keys (escaped spellings too).
fn action() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "typ",
        "act",
        "id",
        "rea",
        "dat",
        "loc",
        "lab",
        "cid",
        "tds",
        "atr",
        "res",
        "zz",
        "t\\u0079p",
        "lo\\u0063",
    ]);
    let typ_act = prop::sample::select(vec![
        ("obj", "upd"),
        ("obj", "set"),
        ("obj", "cre"),
        ("obj", "del"),
        ("obj", "lis"),
        ("rea", "rea"),
        ("rea", "lis"),
        ("rea", "sub"),
        ("rea", "uns"),
        ("rea", "pub"),
        ("rea", "upd"),
        ("sub", "cre"),
        ("sub", "del"),
        ("sys", "hbt"),
        ("are", "lis"),
    ]);
    let pubsub = (
        prop::sample::select(vec!["pub", "sub", "uns"]),
        prop::sample::select(vec!["\"r1\"", "\"r2\"", "1"]),
        pubsub_dat(),
        proptest::option::of(prop::sample::select(vec!["\"c\"", "7", "null"])),
    )
        .prop_map(|(act, id, dat, cid)| {
            let mut m = vec![
                ("typ".to_string(), "\"rea\"".to_string()),
                ("act".to_string(), format!("\"{act}\"")),
                ("id".to_string(), id.to_string()),
                ("dat".to_string(), dat),
            ];
            m.extend(cid.map(|c| ("cid".to_string(), c.to_string())));
            object(m, ",")
        });
    let own_object = (
        prop::sample::select(vec!["set", "upd", "cre"]),
        proptest::option::of(loc()),
        prop::collection::vec((key.clone(), member_value()), 0..4),
    )
        .prop_map(|(act, loc, rest)| {
            let mut m = vec![
                ("typ".to_string(), "\"obj\"".to_string()),
                ("act".to_string(), format!("\"{act}\"")),
                ("id".to_string(), format!("\"{}\"", meta().device)),
            ];
            m.extend(loc.map(|l| ("loc".to_string(), l)));
            m.extend(rest.into_iter().map(|(k, v)| (k.to_string(), v)));
            object(m, ",")
        });
    prop_oneof![
        3 => own_object,
        4 => pubsub,
        6 => (typ_act, prop::collection::vec((key.clone(), member_value()), 0..6)).prop_map(|((t, a), rest)| {
            let mut m = vec![
                ("typ".to_string(), format!("\"{t}\"")),
                ("act".to_string(), format!("\"{a}\"")),
            ];
            m.extend(rest.into_iter().map(|(k, v)| (k.to_string(), v)));
            object(m, ",")
        }),
        3 => (prop::collection::vec((key, member_value()), 0..8), prop::bool::ANY).prop_map(|(m, spaced)| {
            object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), if spaced { " , " } else { "," })
        }),
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

/// The keys the adapter writes itself, each once: an object's top-level keys, and those
/// of its member `nested` if given (values the device wrote are copied as they are).
fn keys_once(text: &[u8], nested: Option<&str>) {
    let mut s = Scratch::default();
    s.parse_object(text).expect("an object");
    let keys: Vec<&[u8]> = s.members.iter().map(|m| &text[m.key.clone()]).collect();
    for (i, k) in keys.iter().enumerate() {
        assert!(
            !keys[i + 1..].contains(k),
            "{} twice in {}",
            String::from_utf8_lossy(k),
            String::from_utf8_lossy(text)
        );
    }
    if let Some(v) = nested
        .and_then(|n| s.find(text, n))
        .map(|m| m.value.clone())
    {
        if Scratch::default().parse_object(&text[v.clone()]).is_ok() {
            keys_once(&text[v], None);
        }
    }
}

/// Run one frame and check the properties; the effects' kinds for coverage.
fn check(frame: &str, subs: &mut Subscriptions) -> Vec<String> {
    let m = meta();
    let s = Session {
        meta: &m,
        realm: REALM,
    };
    let mut out = Vec::new();
    hivekit::on_text(
        &s,
        subs,
        frame.as_bytes(),
        &mut Scratch::default(),
        &mut out,
    );
    // The cids of the frame's object actions, in order (the last `cid` member counts).
    let cids: Vec<Value> = match serde_json::from_str::<Value>(frame) {
        Ok(Value::Array(actions)) if actions.len() <= hivekit::MAX_ACTIONS => actions
            .iter()
            .filter_map(|a| a.as_object()?.get("cid").cloned())
            .collect(),
        _ => Vec::new(),
    };
    let mut kinds = Vec::new();
    let mut sends = 0;
    for e in &out {
        match e {
            Effect::Send(b) => {
                sends += 1;
                let v: Value = serde_json::from_slice(b).expect("replies are JSON");
                let replies = v.as_array().expect("replies are an array");
                let mut s = Scratch::default();
                s.parse_array(b).unwrap();
                for r in &s.elements {
                    keys_once(&b[r.clone()], None);
                }
                // Each action with a cid answered once, in order; the rest (no cid) only errors.
                let mut want = cids.iter();
                for r in replies {
                    match r.get("cid") {
                        Some(c) => assert_eq!(Some(c), want.next(), "reply order in {frame}"),
                        None => assert_eq!(r["res"], "err", "a success without cid in {frame}"),
                    }
                    if r["res"] == "err" {
                        assert!(r["erc"].is_u64() && r["err"].is_string(), "{r}");
                    }
                }
                assert!(
                    want.next().is_none(),
                    "an action with a cid unanswered in {frame}"
                );
            }
            Effect::Publish { ty, body } => {
                keys_once(body, Some("location"));
                let v: Value = serde_json::from_slice(body).expect("events are JSON");
                assert_eq!(v["device"], m.device.to_string());
                assert_eq!(v["account"], m.account.to_string());
                assert_eq!(v["realm"], REALM);
                assert_eq!(v["type"], ty.as_str());
                kinds.push(ty.clone());
            }
            Effect::Ack(_) => kinds.push("ack".into()),
            Effect::Response { ok, .. } => kinds.push(format!("response-{ok}")),
            other => kinds.push(format!("{other:?}")),
        }
    }
    assert!(sends <= 1, "one reply frame at most: {frame}");
    if !cids.is_empty() {
        assert_eq!(sends, 1, "no reply to {frame}");
    }
    kinds
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn every_cid_answered_once_and_every_output_well_formed(
        actions in prop::collection::vec(action(), 0..5),
        spaced in prop::bool::ANY,
    ) {
        let frame = format!("[{}]", actions.join(if spaced { " ,\n" } else { "," }));
        check(&frame, &mut Subscriptions::default());
    }

    #[test]
    fn any_json_is_answered(v in json_value()) {
        check(&v.to_string(), &mut Subscriptions::default());
    }
}

/// The generator reaches the paths that matter.
#[test]
fn generated_frames_reach_every_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(action(), 1..5);
    let mut seen = std::collections::BTreeSet::new();
    let mut subs = Subscriptions::default();
    for _ in 0..5_000 {
        let actions = strategy.new_tree(&mut runner).unwrap().current();
        seen.extend(check(&format!("[{}]", actions.join(",")), &mut subs));
    }
    for want in [
        "location",
        "object-data",
        "pubsub",
        "ack",
        "response-true",
        "response-false",
        "Ready",
        "Refused(\"forbidden\")",
        "Refused(\"unsupported\")",
        "Error(\"bad-action\")",
        "Error(\"bad-request-id\")",
        "Error(\"bad-subscription\")",
    ] {
        assert!(seen.contains(want), "{want} never produced: {seen:?}");
    }
}

/// Frames that are not arrays of JSON are refused with one error reply.
#[test]
fn refusals() {
    for bad in [
        "",
        "{}",
        "nope",
        "[",
        "\"x\"",
        "[1,]",
        "[{\"typ\":}]",
        "[] []",
    ] {
        let m = meta();
        let s = Session {
            meta: &m,
            realm: REALM,
        };
        let mut out = Vec::new();
        hivekit::on_text(
            &s,
            &mut Subscriptions::default(),
            bad.as_bytes(),
            &mut Scratch::default(),
            &mut out,
        );
        assert_eq!(out[0], Effect::Error("bad-frame"), "{bad:?}");
    }
}
