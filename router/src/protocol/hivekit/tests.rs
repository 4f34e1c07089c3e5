use serde_json::{json, Value};
use uuid::Uuid;

use super::*;
use crate::protocol::effect::Effect;
use crate::protocol::hive::Meta;
use crate::protocol::json::Scratch;

const REALM: &str = "fleet-a";

fn meta() -> Meta {
    Meta {
        device: Uuid::from_u128(1),
        account: Uuid::from_u128(2),
    }
}

struct Dev {
    meta: Meta,
    subs: Subscriptions,
}

impl Dev {
    fn new() -> Self {
        Dev {
            meta: meta(),
            subs: Subscriptions::default(),
        }
    }
    fn run(&mut self, frame: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        let s = Session {
            meta: &self.meta,
            realm: REALM,
        };
        on_text(
            &s,
            &mut self.subs,
            frame.as_bytes(),
            &mut Scratch::default(),
            &mut out,
        );
        out
    }
    fn session(&self) -> Session<'_> {
        Session {
            meta: &self.meta,
            realm: REALM,
        }
    }
}

fn run(frame: &str) -> Vec<Effect> {
    Dev::new().run(frame)
}

fn last_send(out: &[Effect]) -> Value {
    match out.last() {
        Some(Effect::Send(b)) => serde_json::from_slice(b).unwrap(),
        other => panic!("no reply: {other:?}"),
    }
}

fn published(out: &[Effect]) -> Vec<Value> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Publish { body, .. } => Some(serde_json::from_slice(body).unwrap()),
            _ => None,
        })
        .collect()
}

#[test]
fn heartbeat_realm_and_object_writes() {
    let out = run(r#"[{"typ":"sys","act":"hbt","cid":"h1"}]"#);
    assert_eq!(last_send(&out), json!([{"cid":"h1","res":"suc"}]));
    let out = run(
        r#"[{"typ":"rea","act":"rea","id":"fleet-a","cid":"r"},{"typ":"rea","act":"lis","cid":"l"}]"#,
    );
    assert_eq!(
        last_send(&out),
        json!([{"cid":"r","res":"suc","dat":{"id":"fleet-a","lab":"fleet-a","dat":{}}},
               {"cid":"l","res":"suc","dat":{"fleet-a":{"lab":"fleet-a","dat":{}}}}])
    );
    let out = run(r#"[{"typ":"rea","act":"rea","id":"other","cid":"r"}]"#);
    assert_eq!(last_send(&out)[0]["erc"], 403);
    assert_eq!(out[0], Effect::Refused("forbidden"));

    let d = meta().device;
    let out = run(&format!(
        r#"[{{"typ":"obj","act":"upd","id":"{d}","rea":"fleet-a","cid":1,"loc":{{"lon":1.5,"lat":2.5,"tim":3,"gcs":"wgs84","alc":4,"acc":2}}}},
            {{"typ":"obj","act":"set","id":"{d}","dat":{{"temp":20}},"lab":"pump 7","tds":["t1"],"atr":["x"],"zzz":1}},
            {{"typ":"obj","act":"cre","id":"{d}","rea":"fleet-a","cid":2,"lab":"pump 7","dat":{{"a":1}}}},
            {{"typ":"obj","act":"upd","id":"{}","cid":3}},
            {{"typ":"obj","act":"upd","id":"{d}","rea":"elsewhere","cid":4}}]"#,
        Uuid::from_u128(5)
    ));
    let pubs = published(&out);
    assert_eq!(pubs.len(), 3);
    assert_eq!(pubs[0]["type"], "location");
    assert_eq!(pubs[0]["realm"], "fleet-a");
    assert_eq!(
        pubs[0]["location"],
        json!({"longitude":1.5,"latitude":2.5,"time":3,"coordinateSystem":"wgs84","altitudeAccuracy":4,"accuracy":2})
    );
    assert_eq!(pubs[1]["type"], "object-data");
    assert_eq!(pubs[1]["action"], "set");
    assert_eq!(pubs[1]["data"]["temp"], 20);
    assert_eq!(pubs[1]["label"], "pump 7");
    assert_eq!(pubs[1]["taskIds"], json!(["t1"]));
    assert_eq!(pubs[1]["attribute"], json!(["x"]));
    assert_eq!(pubs[1]["zzz"], 1);
    assert_eq!(pubs[1]["device"], d.to_string());
    assert_eq!(pubs[2]["action"], "cre");
    let replies = last_send(&out);
    // The `set` had no cid: nothing for it on success.
    assert_eq!(replies[0], json!({"cid":1,"res":"suc"}));
    assert_eq!(replies[1], json!({"cid":2,"res":"suc"}));
    assert_eq!(
        (replies[2]["cid"].clone(), replies[2]["erc"].clone()),
        (json!(3), json!(403))
    );
    assert_eq!(
        (replies[3]["cid"].clone(), replies[3]["erc"].clone()),
        (json!(4), json!(403))
    );
    assert_eq!(replies.as_array().unwrap().len(), 4);
}

#[test]
fn requests_arrive_once_subscribed_and_are_acked_by_publishing() {
    let mut dev = Dev::new();
    let r = Uuid::from_u128(8);
    // Not subscribed: the request waits (None), as does an event.
    assert!(encode_request(&dev.session(), &dev.subs, r, "reboot", b"{}").is_none());
    let out = dev.run(
        r#"[{"typ":"rea","act":"sub","id":"fleet-a","dat":{"eve":"cfg","idp":"*"},"cid":"a"}]"#,
    );
    assert!(!out.contains(&Effect::Ready));
    assert!(encode_request(&dev.session(), &dev.subs, r, "reboot", b"{}").is_none());
    let out = dev.run(r#"[{"typ":"rea","act":"sub","id":"fleet-a","dat":{"eve":"hive.request","idp":"*"},"cid":"b"}]"#);
    assert_eq!(out[0], Effect::Ready);
    assert_eq!(last_send(&out), json!([{"cid":"b","res":"suc"}]));
    // Only the subscription that starts the flow of requests resends what waits.
    let out = dev.run(r#"[{"typ":"rea","act":"sub","id":"fleet-a","dat":{"eve":"hive.request","idp":"x"},"cid":"b2"}]"#);
    assert!(!out.contains(&Effect::Ready));
    dev.run(r#"[{"typ":"rea","act":"uns","id":"fleet-a","dat":{"eve":"hive.request","idp":"x"}}]"#);
    let frame = encode_request(&dev.session(), &dev.subs, r, "reboot", br#"{"x":1}"#).unwrap();
    let v: Value = serde_json::from_slice(&frame).unwrap();
    assert_eq!(
        v,
        json!([{"typ":"rea","act":"pub","rea":"fleet-a","sid":"*","dat":{"eve":"hive.request","dat":{"id":r,"command":"reboot","payload":{"x":1}}}}])
    );
    let out = dev.run(&format!(
        r#"[{{"typ":"rea","act":"pub","id":"fleet-a","dat":{{"eve":"hive.ack","idp":"*","dat":{{"id":"{r}"}}}},"cid":"c"}}]"#
    ));
    assert_eq!(out[0], Effect::Ack(r));
    let out = dev.run(&format!(
        r#"[{{"typ":"rea","act":"pub","id":"fleet-a","dat":{{"eve":"hive.response","dat":{{"id":"{r}","result":{{"up":1}}}}}},"cid":"d"}},
            {{"typ":"rea","act":"pub","id":"fleet-a","dat":{{"eve":"hive.response","dat":{{"id":"{r}","error":"busy"}}}},"cid":"e"}}]"#
    ));
    assert_eq!(out[0], Effect::Ack(r));
    assert_eq!(
        out[1],
        Effect::Response {
            request: r,
            ok: true,
            result: Some(br#"{"up":1}"#.to_vec())
        }
    );
    assert_eq!(
        out[2],
        Effect::Response {
            request: r,
            ok: false,
            result: Some(br#""busy""#.to_vec())
        }
    );
    let out = dev.run(r#"[{"typ":"rea","act":"pub","id":"fleet-a","dat":{"eve":"hive.ack","dat":{"id":"nope"}},"cid":"f"}]"#);
    assert_eq!(out[0], Effect::Error("bad-request-id"));
    assert_eq!(last_send(&out)[0]["erc"], 400);
    // Unsubscribed again: requests wait.
    dev.run(r#"[{"typ":"rea","act":"uns","id":"fleet-a","dat":{"eve":"hive.request","idp":"*"},"cid":"g"}]"#);
    assert!(encode_request(&dev.session(), &dev.subs, r, "reboot", b"{}").is_none());
}

#[test]
fn events_reach_each_matching_subscription() {
    let mut dev = Dev::new();
    let d = meta().device;
    dev.run(&format!(
        r#"[{{"typ":"rea","act":"sub","id":"fleet-a","dat":{{"eve":"cfg","idp":"*"}}}},
            {{"typ":"rea","act":"sub","id":"fleet-a","dat":{{"eve":"cfg","idp":"{d}"}}}},
            {{"typ":"rea","act":"sub","id":"fleet-a","dat":{{"eve":"cfg","idp":"someone-else"}}}},
            {{"typ":"rea","act":"sub","id":"fleet-a","dat":{{"eve":"*"}}}},
            {{"typ":"rea","act":"sub","id":"fleet-a","dat":{{"eve":"other"}}}}]"#
    ));
    let frame = encode_event(&dev.session(), &dev.subs, br#"{"type":"cfg","k":1}"#).unwrap();
    let v: Value = serde_json::from_slice(&frame).unwrap();
    let got: Vec<(Value, Value)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["sid"].clone(), m["dat"]["eve"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("*"), json!("cfg")),
            (json!(d.to_string()), json!("cfg")),
            (json!("*"), json!("*"))
        ]
    );
    assert_eq!(v[0]["rea"], "fleet-a");
    assert_eq!(v[0]["dat"]["dat"], json!({"type":"cfg","k":1}));
    assert!(v[0].get("cid").is_none());
    // `*` does not take requests.
    let r = Uuid::from_u128(3);
    assert!(encode_request(&dev.session(), &dev.subs, r, "x", b"1").is_none());
    // No subscription for this type but `*`.
    let frame = encode_event(&dev.session(), &dev.subs, br#"{"type":"zzz"}"#).unwrap();
    let v: Value = serde_json::from_slice(&frame).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert!(encode_event(
        &Dev::new().session(),
        &Subscriptions::default(),
        br#"{"type":"cfg"}"#
    )
    .is_none());
}

#[test]
fn device_publishes_go_to_the_backend() {
    let out = run(
        r#"[{"typ":"rea","act":"pub","id":"fleet-a","dat":{"eve":"door","idp":"*","dat":{"open":true}},"cid":"p"}]"#,
    );
    let p = published(&out);
    assert_eq!(p[0]["type"], "pubsub");
    assert_eq!(p[0]["event"], "door");
    assert_eq!(p[0]["data"], json!({"open":true}));
    assert_eq!(p[0]["realm"], "fleet-a");
    assert_eq!(last_send(&out), json!([{"cid":"p","res":"suc"}]));
    let out = run(r#"[{"typ":"rea","act":"pub","id":"other","dat":{"eve":"door"},"cid":"p"}]"#);
    assert_eq!(last_send(&out)[0]["erc"], 403);
    assert!(published(&out).is_empty());
}

#[test]
fn subscriptions_the_client_makes_on_its_own_are_accepted() {
    let out = run(
        r#"[{"typ":"sub","act":"cre","id":"realm-data-fleet-a-x","rea":"fleet-a","dat":{"typ":"rea","sty":"rea"},"cid":1},
                      {"typ":"sub","act":"cre","id":"realm-subscription--y","rea":"sys","dat":{"typ":"sys","sty":"rea"},"cid":2},
                      {"typ":"sub","act":"cre","id":"object-subscription-z","rea":"fleet-a","dat":{"typ":"obj","sty":"rea"},"cid":3},
                      {"typ":"sub","act":"del","id":"realm-data-fleet-a-x","rea":"fleet-a","cid":4}]"#,
    );
    let r = last_send(&out);
    assert_eq!(r[0], json!({"cid":1,"res":"suc"}));
    assert_eq!(r[1], json!({"cid":2,"res":"suc"}));
    assert_eq!(r[2]["erc"], 501);
    assert_eq!(r[3], json!({"cid":4,"res":"suc"}));
}

#[test]
fn everything_else_is_answered() {
    for (frame, erc) in [
        (
            r#"{"typ":"are","act":"lis","rea":"fleet-a","cid":"x"}"#,
            501,
        ),
        (
            r#"{"typ":"obj","act":"lis","rea":"fleet-a","cid":"x"}"#,
            501,
        ),
        (r#"{"typ":"his","act":"rea","cid":"x"}"#, 501),
        (r#"{"typ":"rea","act":"cre","id":"n","cid":"x"}"#, 403),
        (r#"{"typ":"zzz","act":"q","cid":"x"}"#, 400),
        (r#"{"cid":"x","res":"suc"}"#, 400),
        (r#"{"typ":"rea","act":"sub","id":"fleet-a","cid":"x"}"#, 400),
    ] {
        let out = run(&format!("[{frame}]"));
        let r = last_send(&out);
        assert_eq!(
            (r[0]["cid"].clone(), r[0]["erc"].clone()),
            (json!("x"), json!(erc)),
            "{frame}"
        );
    }
}

#[test]
fn subscriptions_are_bounded() {
    let mut dev = Dev::new();
    let many: Vec<String> = (0..MAX_SUBSCRIPTIONS + 1)
        .map(|i| {
            format!(
                r#"{{"typ":"rea","act":"sub","id":"fleet-a","dat":{{"eve":"e{i}"}},"cid":{i}}}"#
            )
        })
        .collect();
    let out = dev.run(&format!("[{}]", many.join(",")));
    let r = last_send(&out);
    assert_eq!(r[MAX_SUBSCRIPTIONS - 1]["res"], "suc");
    assert_eq!(r[MAX_SUBSCRIPTIONS]["erc"], 413);
    // The same subscription again is not a new one.
    let out =
        dev.run(r#"[{"typ":"rea","act":"sub","id":"fleet-a","dat":{"eve":"e0"},"cid":"again"}]"#);
    assert_eq!(last_send(&out)[0]["res"], "suc");
}

#[test]
fn a_frame_of_too_many_actions_is_refused_whole_with_one_small_reply() {
    let ok = vec![r#"{"typ":"sys","act":"hbt","cid":1}"#; MAX_ACTIONS].join(",");
    let out = run(&format!("[{ok}]"));
    assert_eq!(last_send(&out).as_array().unwrap().len(), MAX_ACTIONS);
    let bad = vec!["1"; 21_000].join(",");
    let frame = format!("[{bad}]");
    let out = run(&frame);
    assert_eq!(out[0], Effect::Refused("too-many-actions"));
    let Some(Effect::Send(reply)) = out.last() else {
        panic!("no reply")
    };
    assert!(reply.len() < 200, "{} bytes", reply.len());
    assert_eq!(last_send(&out)[0]["erc"], 413);
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

/// `obj upd` with the device's own `device`/`account`/`service` (or a long-form `type`)
/// published no duplicate key: the router's identity is the only one in the body, so a
/// consumer that keeps the first of two duplicates reads the real device too.
#[test]
fn an_object_write_cannot_put_another_identity_in_the_body() {
    let d = meta().device;
    let victim = Uuid::from_u128(77);
    let out = run(&format!(
        r#"[{{"typ":"obj","act":"upd","id":"{d}","device":"{victim}","account":"{victim}","service":"hive-backend","type":"x","dat":{{"a":1}}}}]"#
    ));
    let bodies: Vec<Vec<u8>> = out
        .iter()
        .filter_map(|e| match e {
            Effect::Publish { body, .. } => Some(body.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies.len(), 1);
    let text = String::from_utf8(bodies[0].clone()).unwrap();
    assert!(!text.contains(&victim.to_string()), "{text}");
    let mut s = Scratch::default();
    s.parse_object(&bodies[0]).unwrap();
    let mut keys: Vec<String> = s
        .members
        .iter()
        .map(|m| serde_json::from_slice::<String>(&bodies[0][m.key.clone()]).unwrap())
        .collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "duplicate key in {text}");
    let v: Value = serde_json::from_slice(&bodies[0]).unwrap();
    assert_eq!(v["device"], d.to_string());
    assert_eq!(v["service"], "hive-device");
    assert_eq!(v["type"], "object-data");
}
