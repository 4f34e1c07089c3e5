//! What a simulated device says in each protocol: its URL, its events, and its answers
//! to the router's requests.

use serde_json::{json, Value};

use super::{DeviceSpec, Fleet};
use crate::cli::Proto;
use crate::coordinator::now_us;

/// Replies to a frame from the router: acks (and responses) for requests.
pub(super) fn answer(fleet: &Fleet, spec: &DeviceSpec, text: &str) -> Vec<String> {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let (request, payload) = match spec.proto {
        Proto::Phoenix if v[1].is_null() && v[4]["request"].is_string() => {
            (v[4]["request"].clone(), v[4].clone())
        }
        Proto::Hivekit if v[0]["act"] == "pub" && v[0]["dat"]["eve"] == "hive.request" => {
            let r = &v[0]["dat"]["dat"];
            (r["id"].clone(), r["payload"].clone())
        }
        Proto::Hive | Proto::Mixed if v["type"] == "device-request" => {
            (v["request"].clone(), v["payload"].clone())
        }
        _ => return Vec::new(),
    };
    fleet.stats.borrow_mut().requests_received += 1;
    if fleet.no_ack {
        return Vec::new();
    }
    let respond = payload["respond"] == true;
    match spec.proto {
        Proto::Phoenix => {
            let mut out =
                vec![json!(["1", null, "device", "ack", {"request": request}]).to_string()];
            if respond {
                out.push(json!(["1", null, "device", "response", {"request": request, "status": "ok", "result": {"echo": true}}]).to_string());
            }
            out
        }
        Proto::Hivekit => {
            // Acked (and answered) by publishing into the realm; fire-and-forget (no
            // cid): the router answers only failures then.
            let publish = |eve: &str, dat: Value| json!({"typ": "rea", "act": "pub", "id": v[0]["rea"], "dat": {"eve": eve, "idp": "*", "dat": dat}});
            // An answer acks too.
            let action = if respond {
                publish(
                    "hive.response",
                    json!({"id": request, "result": {"echo": true}}),
                )
            } else {
                publish("hive.ack", json!({"id": request}))
            };
            vec![json!([action]).to_string()]
        }
        _ => {
            let mut out = vec![json!({"type": "ack", "request": request}).to_string()];
            if respond {
                out.push(json!({"type": "response", "request": request, "status": "ok", "result": {"echo": true}}).to_string());
            }
            out
        }
    }
}

/// The device's event number `seq`, stamped with `sent_us` for end-to-end latency. Both
/// go where the router passes them on to hive.events: the top level of a hive event,
/// the payload of a Phoenix one, the `dat` of a hivekit object update (published as
/// `data`).
pub(super) fn event_frame(spec: &DeviceSpec, seq: u64) -> String {
    let sent_us = now_us();
    match spec.proto {
        Proto::Phoenix => json!(["1", format!("e{seq}"), "device", "status_update", {"status": "ok", "sent_us": sent_us, "seq": seq}]).to_string(),
        Proto::Hivekit => json!([{"typ": "obj", "act": "upd", "id": spec.id, "dat": {"sent_us": sent_us, "seq": seq}}]).to_string(),
        _ => match seq % 3 {
            0 => json!({"type": "instances", "sent_us": sent_us, "seq": seq, "apps": [{"name": "app", "healthy": true}]}),
            1 => json!({"type": "device-version", "sent_us": sent_us, "seq": seq, "version": "1.0.0"}),
            _ => json!({"type": "device-state", "sent_us": sent_us, "seq": seq, "disk_free_pct": 42}),
        }
        .to_string(),
    }
}

/// The protocol's endpoint under a base URL that has no path of its own.
pub fn device_url(base: &str, proto: Proto, token: &str) -> String {
    let base = base.trim_end_matches('/');
    let has_path = base.splitn(4, '/').nth(3).is_some_and(|p| !p.is_empty());
    let path = match (has_path, proto) {
        (true, _) => "",
        (false, Proto::Phoenix) => "/socket/websocket",
        (false, Proto::Hivekit) => "/v1/ws",
        (false, _) => "/ws",
    };
    match proto {
        Proto::Phoenix => format!("{base}{path}?token={token}&vsn=2.0.0"),
        _ => format!("{base}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(device_url("ws://h:1", Proto::Hive, "t"), "ws://h:1/ws");
        assert_eq!(
            device_url("ws://h:1/", Proto::Hivekit, "t"),
            "ws://h:1/v1/ws"
        );
        assert_eq!(
            device_url("ws://h:1", Proto::Phoenix, "t"),
            "ws://h:1/socket/websocket?token=t&vsn=2.0.0"
        );
        assert_eq!(
            device_url("ws://h:1/custom", Proto::Hive, "t"),
            "ws://h:1/custom"
        );
    }
}
