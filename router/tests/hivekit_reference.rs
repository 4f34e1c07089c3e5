//! The Hivekit adapter against the one it replaced: the `serde_json::Value` version of
//! `hivekit::on_text`, kept here whole as the reference. On generated frames (actions
//! with any of the known keys, repeated and escaped keys, arbitrary JSON values, batches,
//! non-object actions, results of requests) both must give the same effects, with every
//! JSON they write equal as JSON (key order and number spelling aside).

use proptest::prelude::*;
use router::protocol::effect::Effect;
use router::protocol::hive::Meta;
use router::protocol::hivekit;
use router::protocol::json::Scratch;
use serde_json::Value;
use uuid::Uuid;

/// The `serde_json::Value` adapter as it was (router `95618a3`).
mod reference {
    use router::protocol::effect::Effect;
    use router::protocol::hive::{Meta, DEVICE_SERVICE};
    use serde_json::{json, Map, Value};
    use uuid::Uuid;

    const LOC_KEYS: [(&str, &str); 7] = [
        ("lon", "longitude"),
        ("lat", "latitude"),
        ("acc", "accuracy"),
        ("spe", "speed"),
        ("hea", "heading"),
        ("alt", "altitude"),
        ("tim", "time"),
    ];

    fn err(cid: Option<&Value>, msg: &str, code: u16) -> Value {
        let mut o = Map::new();
        if let Some(c) = cid {
            o.insert("cid".into(), c.clone());
        }
        o.insert("res".into(), "err".into());
        o.insert("err".into(), msg.into());
        o.insert("erc".into(), code.into());
        Value::Object(o)
    }

    /// Handle one text frame from an authenticated device. Replies to all its actions go
    /// back as one batch (one frame), as they came.
    pub fn on_text(meta: &Meta, text: &[u8], out: &mut Vec<Effect>) {
        let actions = match serde_json::from_slice::<Value>(text) {
            Ok(Value::Array(a)) => a,
            _ => {
                out.push(Effect::Error("bad-frame"));
                out.push(Effect::Send(
                    json!([err(None, "frame must be a JSON array of actions", 400)])
                        .to_string()
                        .into_bytes(),
                ));
                return;
            }
        };
        let mut replies = Vec::new();
        for a in &actions {
            on_action(meta, a, out, &mut replies);
        }
        if !replies.is_empty() {
            out.push(Effect::Send(Value::Array(replies).to_string().into_bytes()));
        }
    }

    fn on_action(meta: &Meta, a: &Value, out: &mut Vec<Effect>, replies: &mut Vec<Value>) {
        let Some(obj) = a.as_object() else {
            out.push(Effect::Error("bad-action"));
            replies.push(err(None, "an action must be an object", 400));
            return;
        };
        let cid = obj.get("cid");
        let s = |k: &str| obj.get(k).and_then(Value::as_str);
        // An answer to a request the router sent: {"cid":R,"res":"suc"|"err"}.
        if obj.get("typ").is_none() {
            if let Some(res) = s("res") {
                let Some(request) = cid
                    .and_then(Value::as_str)
                    .and_then(|c| Uuid::parse_str(c).ok())
                else {
                    out.push(Effect::Error("bad-cid"));
                    replies.push(err(cid, "cid of a result must be the request id", 400));
                    return;
                };
                match res {
                    "err" => {
                        let detail = json!({"err": obj.get("err"), "erc": obj.get("erc")});
                        out.push(Effect::Response {
                            request,
                            ok: false,
                            result: Some(detail.to_string().into_bytes()),
                        });
                    }
                    _ => {
                        out.push(Effect::Ack(request));
                        if let Some(d) = obj.get("dat") {
                            out.push(Effect::Response {
                                request,
                                ok: true,
                                result: Some(d.to_string().into_bytes()),
                            });
                        }
                    }
                }
                return;
            }
        }
        let ok = |replies: &mut Vec<Value>| {
            if let Some(c) = cid {
                replies.push(json!({"cid": c, "res": "suc"}));
            }
        };
        match (s("typ"), s("act")) {
            (Some("sys"), Some("hbt")) | (Some("sys"), Some("aut")) => ok(replies),
            (Some("obj"), Some(act @ ("set" | "upd"))) => {
                let own = meta.device.to_string();
                if s("id") != Some(own.as_str()) {
                    out.push(Effect::Error("forbidden"));
                    replies.push(err(cid, "a device may only update its own object", 403));
                    return;
                }
                let mut ev = Map::new();
                let ty = if obj.contains_key("loc") {
                    "location"
                } else {
                    "object-data"
                };
                ev.insert("type".into(), ty.into());
                ev.insert("action".into(), act.into());
                ev.insert("id".into(), own.clone().into());
                if let Some(r) = obj.get("rea") {
                    ev.insert("realm".into(), r.clone());
                }
                if let Some(Value::Object(loc)) = obj.get("loc") {
                    let spelled: Map<String, Value> = loc
                        .iter()
                        .map(|(k, v)| {
                            let name = LOC_KEYS
                                .iter()
                                .find(|(s, _)| s == k)
                                .map_or(k.as_str(), |(_, l)| l);
                            (name.to_string(), v.clone())
                        })
                        .collect();
                    ev.insert("location".into(), Value::Object(spelled));
                }
                if let Some(d) = obj.get("dat") {
                    ev.insert("data".into(), d.clone());
                }
                if let Some(l) = obj.get("lab") {
                    ev.insert("labels".into(), l.clone());
                }
                ev.insert("device".into(), own.into());
                ev.insert("account".into(), meta.account.to_string().into());
                ev.insert("service".into(), DEVICE_SERVICE.into());
                out.push(Effect::Publish {
                    ty: ty.into(),
                    body: Value::Object(ev).to_string().into_bytes(),
                });
                ok(replies);
            }
            _ => {
                out.push(Effect::Error("bad-action"));
                replies.push(err(cid, "unknown action (typ/act)", 400));
            }
        }
    }
}

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
        "\"hbt\"",
        "\"aut\"",
        "\"set\"",
        "\"upd\"",
        "\"suc\"",
        "\"err\"",
        "\"war\"",
        "\"zzz\"",
        "\"s\\u0079s\"",
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
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

/// An update of the device's own object (`obj` `set`/`upd`) with any other members.
fn update() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec!["rea", "dat", "loc", "lab", "cid", "zz", "lo\\u0063"]);
    (
        prop::sample::select(vec!["set", "upd"]),
        prop::collection::vec((key, member_value()), 0..5),
    )
        .prop_map(|(act, rest)| {
            let mut m = vec![
                ("typ".to_string(), "\"obj\"".to_string()),
                ("act".to_string(), format!("\"{act}\"")),
                ("id".to_string(), format!("\"{}\"", meta().device)),
            ];
            m.extend(rest.into_iter().map(|(k, v)| (k.to_string(), v)));
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
        "res",
        "err",
        "erc",
        "zz",
        "t\\u0079p",
        "lo\\u0063",
    ]);
    prop_oneof![
        3 => update(),
        8 => (prop::collection::vec((key, member_value()), 0..8), prop::bool::ANY).prop_map(|(m, spaced)| {
            object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), if spaced { " , " } else { "," })
        }),
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

/// Effects with every JSON text parsed, so both adapters compare as JSON.
#[derive(Debug, PartialEq)]
enum Norm {
    Send(Value),
    Publish(String, Value),
    Ack(Uuid),
    Response(Uuid, bool, Option<Value>),
    Other(String),
}

/// Parsed, with numbers to 12 significant digits: serde_json without `float_roundtrip`
/// reads some long floats one ulp off, so a number the reference re-serialised can differ
/// in its last digit from the device's own text, which the adapter now copies.
fn parse(b: &[u8]) -> Value {
    fn round(v: Value) -> Value {
        match v {
            Value::Number(n) => Value::String(format!("{:.11e}", n.as_f64().unwrap_or(f64::NAN))),
            Value::Array(a) => Value::Array(a.into_iter().map(round).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, round(v))).collect()),
            other => other,
        }
    }
    round(
        serde_json::from_slice(b)
            .unwrap_or_else(|e| panic!("invalid JSON out ({e}): {}", String::from_utf8_lossy(b))),
    )
}

/// The keys the adapter writes itself, each once: an object's top-level keys, and those
/// of its member `nested` if given (values the device wrote are copied as they are, and
/// may repeat keys of their own, as in the Hive protocol's events).
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
    if let Some(m) = nested.and_then(|n| s.find(text, n)) {
        keys_once(&text[m.value.clone()], None);
    }
}

fn norm(effects: Vec<Effect>) -> Vec<Norm> {
    effects
        .into_iter()
        .map(|e| match e {
            Effect::Send(b) => {
                let mut s = Scratch::default();
                s.parse_array(&b).expect("replies are an array");
                for r in &s.elements {
                    keys_once(&b[r.clone()], None);
                }
                Norm::Send(parse(&b))
            }
            Effect::Publish { ty, body } => {
                keys_once(&body, Some("location"));
                Norm::Publish(ty, parse(&body))
            }
            Effect::Ack(r) => Norm::Ack(r),
            Effect::Response {
                request,
                ok,
                result,
            } => Norm::Response(request, ok, result.map(|r| parse(&r))),
            other => Norm::Other(format!("{other:?}")),
        })
        .collect()
}

fn both(frame: &str) -> (Vec<Norm>, Vec<Norm>) {
    let (mut new, mut old) = (Vec::new(), Vec::new());
    hivekit::on_text(&meta(), frame.as_bytes(), &mut Scratch::default(), &mut new);
    reference::on_text(&meta(), frame.as_bytes(), &mut old);
    (norm(new), norm(old))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn same_effects_as_the_value_adapter(actions in prop::collection::vec(action(), 0..4), spaced in prop::bool::ANY) {
        let frame = format!("[{}]", actions.join(if spaced { " ,\n" } else { "," }));
        let (new, old) = both(&frame);
        prop_assert_eq!(new, old, "frame {}", frame);
    }

    #[test]
    fn same_effects_on_any_json(v in json_value()) {
        let text = v.to_string();
        let (new, old) = both(&text);
        prop_assert_eq!(new, old, "frame {}", text);
    }
}

/// The generator reaches the paths that matter: published location and object events,
/// acks with and without results, error responses, refusals.
#[test]
fn generated_frames_reach_every_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(action(), 1..4);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20_000 {
        let actions = strategy.new_tree(&mut runner).unwrap().current();
        let (new, _) = both(&format!("[{}]", actions.join(",")));
        for e in new {
            seen.insert(match e {
                Norm::Publish(ty, _) => ty,
                Norm::Ack(_) => "ack".into(),
                Norm::Response(_, ok, Some(_)) => format!("response-{ok}"),
                Norm::Other(o) => o,
                _ => continue,
            });
        }
    }
    for want in [
        "location",
        "object-data",
        "ack",
        "response-true",
        "response-false",
        "Error(\"forbidden\")",
        "Error(\"bad-action\")",
        "Error(\"bad-cid\")",
    ] {
        assert!(seen.contains(want), "{want} never produced: {seen:?}");
    }
}

/// Frames that are not arrays of JSON get the same refusal from both.
#[test]
fn refusals_match() {
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
        let (new, old) = both(bad);
        assert_eq!(new, old, "{bad:?}");
        assert_eq!(new[0], Norm::Other("Error(\"bad-frame\")".into()));
    }
}
