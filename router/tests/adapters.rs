//! Phoenix channels (/socket/websocket) and Hivekit (/v1/ws) end to end, from the
//! documented frames. The official Phoenix JS client test lives in interop/js/.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

async fn connect(url: String) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade")
        .0
}

async fn text(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

#[tokio::test]
async fn hivekit_auth_quarantine_retries_and_failure() {
    let r = TestRouter::start_with(|c| c.auth_timeout = 2);
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    // A frame before auth is not parsed: answered aut/err; the socket stays open for a
    // `Bearer`, and a bad one is answered the same way; then a good one gets in.
    let mut ws = connect(format!("{}/v1/ws", r.ws)).await;
    text(&mut ws, json!([{"typ":"sys","act":"hbt","cid":1}])).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (reply[0]["act"].as_str(), reply[0]["res"].as_str()),
        (Some("aut"), Some("err"))
    );
    assert!(reply[0].get("cid").is_none());
    ws.send(Message::text("Bearer nope")).await.unwrap();
    assert_eq!(next_json(&mut ws).await[0]["err"], "invalid token");
    ws.send(Message::text(format!("Bearer {}", r.token(d, a))))
        .await
        .unwrap();
    let ok = next_json(&mut ws).await;
    assert_eq!(
        (
            ok[0]["typ"].as_str(),
            ok[0]["act"].as_str(),
            ok[0]["res"].as_str()
        ),
        (Some("sys"), Some("aut"), Some("suc"))
    );
    text(&mut ws, json!([{"typ":"sys","act":"hbt","cid":"h"}])).await;
    assert_eq!(next_json(&mut ws).await, json!([{"cid":"h","res":"suc"}]));
    // Five failures close with 4401.
    let mut ws = connect(format!("{}/v1/ws", r.ws)).await;
    for i in 0..router::listener::MAX_AUTH_ATTEMPTS {
        ws.send(Message::text("Bearer nope")).await.unwrap();
        assert_eq!(next_json(&mut ws).await[0]["res"], "err", "attempt {i}");
    }
    assert_eq!(close_code(&mut ws).await, 4401);
    // No good token within the auth timeout: 4408.
    let mut ws = connect(format!("{}/v1/ws", r.ws)).await;
    ws.send(Message::text("Bearer nope")).await.unwrap();
    assert_eq!(next_json(&mut ws).await[0]["res"], "err");
    assert_eq!(next_json(&mut ws).await[0]["res"], "err");
    assert_eq!(close_code(&mut ws).await, 4408);
    // By header.
    let d2 = Uuid::new_v4();
    let mut req = format!("{}/v1/ws", r.ws).into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", r.token(d2, a)).parse().unwrap(),
    );
    let (mut ws2, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_json(&mut ws2).await[0]["res"], "suc");
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"missing\"}")
            .await,
        1.0
    );
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"invalid\"}")
            .await,
        (1 + router::listener::MAX_AUTH_ATTEMPTS + 1) as f64
    );
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn hivekit_realm_objects_requests_and_events_as_pubsub() {
    let r = TestRouter::start();
    let mut events = Events::subscribe(&r).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let realm = a.to_string();
    let mut ws = connect(format!("{}/v1/ws?token={}", r.ws, r.token(d, a))).await;
    assert_eq!(next_json(&mut ws).await[0]["res"], "suc");
    text(
        &mut ws,
        json!([
            {"typ":"sys","act":"hbt","cid":"h"},
            {"typ":"rea","act":"lis","cid":"l"},
            {"typ":"rea","act":"rea","id":realm,"cid":"g"},
            {"typ":"obj","act":"upd","id":d,"rea":realm,"cid":"u1","loc":{"lon":24.9,"lat":60.2,"spe":3,"alc":2}},
            {"typ":"obj","act":"set","id":Uuid::new_v4(),"cid":"u2","dat":{"x":1}},
            {"typ":"obj","act":"lis","rea":realm,"cid":"u3"},
            {"typ":"nope","act":"x","cid":"u4"}
        ]),
    )
    .await;
    let replies = next_json(&mut ws).await;
    assert_eq!(replies[0], json!({"cid":"h","res":"suc"}));
    assert_eq!(
        replies[1],
        json!({"cid":"l","res":"suc","dat":{(realm.clone()):{"lab":realm,"dat":{}}}})
    );
    assert_eq!(replies[2]["dat"]["id"], realm);
    assert_eq!(replies[3], json!({"cid":"u1","res":"suc"}));
    let codes: Vec<Option<u64>> = replies.as_array().unwrap()[4..]
        .iter()
        .map(|r| r["erc"].as_u64())
        .collect();
    assert_eq!(codes, vec![Some(403), Some(501), Some(400)]);
    let ev = events.find(|v| v["type"] == "location").await;
    assert_eq!(ev["device"], d.to_string());
    assert_eq!(ev["realm"], realm);
    assert_eq!(
        ev["location"],
        json!({"longitude":24.9,"latitude":60.2,"speed":3,"altitudeAccuracy":2})
    );
    for (code, n) in [
        ("forbidden", 1.0),
        ("unsupported", 1.0),
        ("bad-action", 1.0),
    ] {
        let m = format!("router_hivekit_errors_total{{code=\"{code}\"}}");
        assert_eq!(r.metric(&m).await, n, "{m}");
    }

    // An event before any subscription: the device does not take it (409).
    let send_event = |body: Value| {
        r.http
            .post(format!("{}/v1/devices/{d}/events", r.api))
            .json(&body)
            .send()
    };
    assert_eq!(
        send_event(json!({"type":"cfg","k":0}))
            .await
            .unwrap()
            .status(),
        409
    );
    // A request sent before the device subscribes to requests waits for it.
    let api = r.api.clone();
    let http = r.http.clone();
    let pending = tokio::spawn(async move {
        let resp = http
            .post(format!("{api}/v1/devices/{d}/requests?wait=response"))
            .json(&json!({"command":"reboot","payload":{"in":5}}))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    text(
        &mut ws,
        json!([
            {"typ":"rea","act":"sub","id":realm,"dat":{"eve":"hive.request","idp":"*"},"cid":"s1"},
            {"typ":"rea","act":"sub","id":realm,"dat":{"eve":"cfg","idp":"*"},"cid":"s2"}
        ]),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(next_json(&mut ws).await.as_array().unwrap().clone());
    }
    let req = got
        .iter()
        .find(|m| m["dat"]["eve"] == "hive.request")
        .unwrap_or_else(|| panic!("no request in {got:?}"))
        .clone();
    assert!(req.get("cid").is_none());
    assert_eq!(
        (req["typ"].as_str(), req["act"].as_str()),
        (Some("rea"), Some("pub"))
    );
    assert_eq!(
        (req["rea"].as_str(), req["sid"].as_str()),
        (Some(realm.as_str()), Some("*"))
    );
    assert_eq!(req["dat"]["dat"]["command"], "reboot");
    assert_eq!(req["dat"]["dat"]["payload"], json!({"in":5}));
    let id = req["dat"]["dat"]["id"].clone();
    // Acked and answered by publishing into the realm.
    text(
        &mut ws,
        json!([
            {"typ":"rea","act":"pub","id":realm,"dat":{"eve":"hive.ack","idp":"*","dat":{"id":id}},"cid":"p1"},
            {"typ":"rea","act":"pub","id":realm,"dat":{"eve":"hive.response","idp":"*","dat":{"id":id,"result":{"up":true}}},"cid":"p2"}
        ]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"cid":"p1","res":"suc"},{"cid":"p2","res":"suc"}])
    );
    let (status, body) = pending.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!({"up":true}));
    // Events arrive as realm pubsub messages.
    assert_eq!(
        send_event(json!({"type":"cfg","k":1}))
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"typ":"rea","act":"pub","rea":realm,"sid":"*","dat":{"eve":"cfg","dat":{"type":"cfg","k":1}}}])
    );
    // Malformed frames get an error reply, and ten in a row close with 4400.
    for _ in 0..10 {
        ws.send(Message::text("{not an array")).await.unwrap();
    }
    assert_eq!(next_json(&mut ws).await[0]["res"], "err");
    assert_eq!(close_code(&mut ws).await, 4400);
}

#[tokio::test]
async fn phoenix_v2_join_request_ack_and_followups() {
    let r = TestRouter::start();
    let mut events = Events::subscribe(&r).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = connect(format!(
        "{}/socket/websocket?token={}&vsn=2.0.0",
        r.ws,
        r.token(d, a)
    ))
    .await;
    text(&mut ws, json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([null, "1", "phoenix", "phx_reply", {"status":"ok","response":{}}])
    );
    // Another device's topic is refused.
    text(
        &mut ws,
        json!([
            "2",
            "2",
            format!("device:{}", Uuid::new_v4()),
            "phx_join",
            {}
        ]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await[4],
        json!({"status":"error","response":{"reason":"unmatched topic"}})
    );

    // A request sent before the join is delivered once the device joins.
    let api = r.api.clone();
    let http = r.http.clone();
    let early = tokio::spawn(async move {
        let resp = http
            .post(format!("{api}/v1/devices/{d}/requests"))
            .json(&json!({"command":"reboot","payload":{}}))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    text(&mut ws, json!(["3", "3", "device", "phx_join", {"nerves_fw_uuid":"fw-1","nerves_fw_version":"1.0.0","device_api_version":"2.2.0"}])).await;
    let mut got_reply = false;
    let mut reboot = Value::Null;
    while !got_reply || reboot.is_null() {
        let m = next_json(&mut ws).await;
        match m[3].as_str() {
            Some("phx_reply") => got_reply = true,
            Some("reboot") => reboot = m,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(reboot[0], "3");
    assert_eq!(reboot[2], "device");
    let join = events.find(|v| v["type"] == "device-join").await;
    assert_eq!(join["payload"]["nerves_fw_uuid"], "fw-1");
    assert_eq!(join["device"], d.to_string());
    // The stock follow-up `rebooting` acks the reboot.
    // A NervesHub device (its join had device_api_version): the push is not answered;
    // the next frame it gets answers its heartbeat.
    text(&mut ws, json!(["3", "4", "device", "rebooting", {}])).await;
    text(&mut ws, json!([null, "5", "phoenix", "heartbeat", {}])).await;
    let next = next_json(&mut ws).await;
    assert_eq!(
        (next[1].as_str(), next[2].as_str()),
        (Some("5"), Some("phoenix"))
    );
    let (status, body) = early.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["request"], reboot[4]["request"]);

    // Explicit ack push for an `update`.
    let dev = tokio::spawn(async move {
        let m = next_json(&mut ws).await;
        text(
            &mut ws,
            json!(["3", null, "device", "ack", {"request": m[4]["request"]}]),
        )
        .await;
        (m, ws)
    });
    let (status, _) = r
        .request(
            d,
            json!({"command":"update","payload":{"firmware_url":"http://x/fw"}}),
            "",
        )
        .await;
    assert_eq!(status, 200);
    let (m, mut ws) = dev.await.unwrap();
    assert_eq!(m[3], "update");
    assert_eq!(m[4]["firmware_url"], "http://x/fw");
    // fwup_progress is published as an event.
    text(
        &mut ws,
        json!(["3", null, "device", "fwup_progress", {"value": 42}]),
    )
    .await;
    let ev = events.find(|v| v["type"] == "fwup_progress").await;
    assert_eq!(ev["payload"]["value"], 42);
    assert_eq!(ev["topic"], "device");
}

#[tokio::test]
async fn phoenix_v1_and_refusals() {
    let r = TestRouter::start();
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = connect(format!("{}/socket/websocket?token={}", r.ws, r.token(d, a))).await;
    text(
        &mut ws,
        json!({"topic":"device","event":"phx_join","payload":{},"ref":"1"}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (reply["event"].as_str(), reply["payload"]["status"].as_str()),
        (Some("phx_reply"), Some("ok"))
    );
    // No token: HTTP 401 before the upgrade. Unknown serializer: HTTP 400.
    let err = tokio_tungstenite::connect_async(format!("{}/socket/websocket?vsn=2.0.0", r.ws))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let err = tokio_tungstenite::connect_async(format!("{}/socket/websocket?vsn=9.0.0", r.ws))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    // Junk frames: a bad-frame count, then 4400 after ten.
    let (d2, _) = (Uuid::new_v4(), ());
    let mut ws = connect(format!(
        "{}/socket/websocket?token={}&vsn=2.0.0",
        r.ws,
        r.token(d2, a)
    ))
    .await;
    for _ in 0..10 {
        ws.send(Message::text("[1,2")).await.unwrap();
    }
    assert_eq!(close_code(&mut ws).await, 4400);
    assert_eq!(
        r.metric("router_phoenix_errors_total{code=\"bad-frame\"}")
            .await,
        10.0
    );
}

/// `--nerves-extensions` left at its empty default offers no extension (the empty value
/// once parsed as one extension with an empty name, and devices of API 2.2.0 and later
/// were pushed `extensions:get`).
#[test]
fn no_nerves_extensions_by_default() {
    use clap::Parser;
    use router::config::{Cli, Command};
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "router",
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--shards",
            "1",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(c) => *c,
            _ => unreachable!(),
        }
    };
    for (extra, want) in [
        (&[][..], Vec::<&str>::new()),
        (&["--nerves-extensions", ""][..], vec![]),
        (
            &["--nerves-extensions", "health,,geo"][..],
            vec!["health", "geo"],
        ),
    ] {
        let h = router::start(parse(extra)).unwrap();
        let got: Vec<&str> = h
            .shared
            .nerves_extensions
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(got, want, "{extra:?}");
        h.shutdown();
    }
}
