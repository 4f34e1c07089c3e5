//! Hivekit-style compact protocol (`/v1/ws`): every frame a JSON array of actions
//! with three-letter keys. Pure: frames in, effects out; no I/O, no state.

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::effect::Effect;
use super::hive::{Meta, DEVICE_SERVICE};

/// Error codes counted in `router_hivekit_errors_total{code}`.
pub const ERROR_CODES: [&str; 4] = ["bad-frame", "bad-action", "forbidden", "bad-cid"];

/// The answer to a successful authentication.
pub fn auth_ok() -> Vec<u8> {
    format!(
        r#"[{{"typ":"sys","act":"aut","res":"suc","dat":{{"version":"{}"}}}}]"#,
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// The answer to a failed authentication (a 4401 close follows).
pub fn auth_err(reason: &str) -> Vec<u8> {
    json!([{"typ":"sys","act":"aut","res":"err","err":reason}])
        .to_string()
        .into_bytes()
}

/// `loc` keys spelled out in published events.
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

/// A backend event: `[{"typ":"rea","act":"pub","dat":{"eve":<type>,"dat":<event>}}]`.
pub fn encode_event(body: &[u8]) -> Vec<u8> {
    let ev: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let ty = ev.get("type").cloned().unwrap_or(Value::Null);
    json!([{"typ":"rea","act":"pub","dat":{"eve": ty, "dat": ev}}])
        .to_string()
        .into_bytes()
}

/// A request: `[{"typ":"ins","act":"cre","cid":R,"dat":{"command":C,"payload":P}}]`.
pub fn encode_request(request: Uuid, command: &str, payload: &[u8]) -> Vec<u8> {
    let p: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    json!([{"typ":"ins","act":"cre","cid": request, "dat": {"command": command, "payload": p}}])
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            device: Uuid::from_u128(1),
            account: Uuid::from_u128(2),
        }
    }

    fn run(frame: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        on_text(&meta(), frame.as_bytes(), &mut out);
        out
    }

    fn last_send(out: &[Effect]) -> Value {
        match out.last() {
            Some(Effect::Send(b)) => serde_json::from_slice(b).unwrap(),
            other => panic!("no reply: {other:?}"),
        }
    }

    #[test]
    fn heartbeat_and_batches() {
        let out = run(r#"[{"typ":"sys","act":"hbt","cid":"h1"}]"#);
        assert_eq!(last_send(&out), json!([{"cid":"h1","res":"suc"}]));
        let d = meta().device;
        let out = run(&format!(
            r#"[{{"typ":"obj","act":"upd","id":"{d}","cid":1,"loc":{{"lon":1.5,"lat":2.5,"tim":3}}}},
                {{"typ":"obj","act":"set","id":"{d}","cid":2,"dat":{{"temp":20}},"lab":{{"a":"b"}}}},
                {{"typ":"obj","act":"upd","id":"{}","cid":3}}]"#,
            Uuid::from_u128(5)
        ));
        let pubs: Vec<Value> = out
            .iter()
            .filter_map(|e| match e {
                Effect::Publish { body, .. } => Some(serde_json::from_slice(body).unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(pubs.len(), 2);
        assert_eq!(pubs[0]["type"], "location");
        assert_eq!(
            pubs[0]["location"],
            json!({"longitude":1.5,"latitude":2.5,"time":3})
        );
        assert_eq!(pubs[1]["type"], "object-data");
        assert_eq!(pubs[1]["data"]["temp"], 20);
        assert_eq!(pubs[1]["labels"]["a"], "b");
        assert_eq!(pubs[1]["device"], d.to_string());
        let replies = last_send(&out);
        assert_eq!(replies[0], json!({"cid":1,"res":"suc"}));
        assert_eq!(replies[1], json!({"cid":2,"res":"suc"}));
        assert_eq!(
            (
                replies[2]["cid"].clone(),
                replies[2]["res"].clone(),
                replies[2]["erc"].clone()
            ),
            (json!(3), json!("err"), json!(403))
        );
    }

    #[test]
    fn results_ack_requests() {
        let r = Uuid::from_u128(8);
        assert_eq!(
            run(&format!(r#"[{{"cid":"{r}","res":"suc"}}]"#)),
            vec![Effect::Ack(r)]
        );
        let out = run(&format!(
            r#"[{{"cid":"{r}","res":"err","err":"no","erc":5}}]"#
        ));
        assert!(matches!(&out[0], Effect::Response { ok: false, .. }));
        let out = run(r#"[{"cid":"zzz","res":"suc"}]"#);
        assert_eq!(out[0], Effect::Error("bad-cid"));
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

    #[test]
    fn outbound_shapes() {
        let r = Uuid::from_u128(4);
        let v: Value = serde_json::from_slice(&encode_request(r, "reboot", br#"{"x":1}"#)).unwrap();
        assert_eq!(
            v,
            json!([{"typ":"ins","act":"cre","cid": r,"dat":{"command":"reboot","payload":{"x":1}}}])
        );
        let v: Value = serde_json::from_slice(&encode_event(br#"{"type":"cfg","k":1}"#)).unwrap();
        assert_eq!(
            v,
            json!([{"typ":"rea","act":"pub","dat":{"eve":"cfg","dat":{"type":"cfg","k":1}}}])
        );
        let v: Value = serde_json::from_slice(&auth_ok()).unwrap();
        assert_eq!(v[0]["res"], "suc");
    }
}
