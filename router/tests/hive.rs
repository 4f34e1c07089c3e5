//! The Hive native protocol on /ws, end to end: real router, real sockets,
//! tokio-tungstenite as the device, reqwest as the backend.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[tokio::test]
async fn three_ways_to_authenticate() {
    let r = TestRouter::start();
    // 1. Authorization header.
    let (d, a) = ids();
    let _ws = r.device(d, a).await;
    // 2. ?token= query parameter.
    let (d2, a2) = ids();
    let url = format!("{}/ws?token={}", r.ws, r.token(d2, a2));
    let (mut ws2, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = next_json(&mut ws2).await;
    assert_eq!(
        hello,
        json!({"type":"authenticated","device":d2,"account":a2})
    );
    // 3. First text frame `Bearer T`.
    let (d3, a3) = ids();
    let (mut ws3, _) = tokio_tungstenite::connect_async(format!("{}/ws", r.ws))
        .await
        .unwrap();
    ws3.send(Message::text(format!("Bearer {}", r.token(d3, a3))))
        .await
        .unwrap();
    let hello = next_json(&mut ws3).await;
    assert_eq!(
        hello,
        json!({"type":"authenticated","device":d3,"account":a3})
    );
    assert_eq!(
        r.metric("router_connections{shard=\"0\"}").await
            + r.metric("router_connections{shard=\"1\"}").await,
        3.0
    );
}

#[tokio::test]
async fn bad_tokens_close_4401_and_are_counted() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let forged = router::auth::mint("not-the-secret", d, a, 60);
    let expired = router::auth::mint_with_exp(SECRET, d, a, router::auth::unix_now() - 10);
    for (token, _why) in [
        (forged, "forged"),
        (expired, "expired"),
        ("garbage".to_string(), "garbage"),
    ] {
        let url = format!("{}/ws?token={token}", r.ws);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(close_code(&mut ws).await, 4401);
    }
    // A first frame that is not `Bearer T` is not parsed as anything else.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/ws", r.ws))
        .await
        .unwrap();
    ws.send(Message::text(r#"{"type":"instances"}"#))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 4401);
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"invalid\"}")
            .await,
        2.0
    );
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"expired\"}")
            .await,
        1.0
    );
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"missing\"}")
            .await,
        1.0
    );
    assert_eq!(r.metric("router_closes_total{code=\"4401\"}").await, 4.0);
    assert_eq!(r.metric("router_events_published_total").await, 0.0);
}

#[tokio::test]
async fn no_auth_closes_4408() {
    let r = TestRouter::start_with(|c| c.auth_timeout = 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/ws", r.ws))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 4408);
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"timeout\"}")
            .await,
        1.0
    );
    assert_eq!(r.metric("router_closes_total{code=\"4408\"}").await, 1.0);
}

#[tokio::test]
async fn spoofed_metadata_is_overwritten() {
    let r = TestRouter::start();
    let mut events = Events::subscribe(&r).await;
    let (d, a) = ids();
    let victim = Uuid::new_v4();
    let mut ws = r.device(d, a).await;
    send_json(&mut ws, json!({"type":"instances","device":victim,"account":victim,"service":"hive-backend","apps":[{"name":"db","healthy":true}]})).await;
    let ev = events.find(|v| v["type"] == "instances").await;
    assert_eq!(ev["device"], d.to_string());
    assert_eq!(ev["account"], a.to_string());
    assert_eq!(ev["service"], "hive-device");
    assert_eq!(ev["apps"][0]["name"], "db");
    assert!(!ev.to_string().contains(&victim.to_string()));
    assert_eq!(r.metric("router_events_published_total").await, 1.0);
}

#[tokio::test]
async fn frames_split_across_reads_arrive_whole_and_in_order() {
    // Forty frames of 7- and 16-bit lengths, and a ping, written in pieces of 1 to 233
    // bytes with pauses, so the router holds partial headers and partial payloads
    // between reads and completes them from the next read.
    let r = TestRouter::start();
    let mut events = Events::subscribe(&r).await;
    let (d, a) = ids();
    let mut raw = raw_upgrade(&r, &r.token(d, a)).await;
    raw.set_nodelay(true).unwrap();
    let mut stream = Vec::new();
    for n in 0..40usize {
        let pad = "p".repeat(n * 7 % 300);
        let ev = json!({"type": "split", "n": n, "pad": pad}).to_string();
        stream.extend_from_slice(&masked_frame(0x1, ev.as_bytes()));
        if n == 20 {
            stream.extend_from_slice(&masked_frame(0x9, b"hi"));
        }
    }
    let pieces = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233];
    let mut at = 0;
    for k in 0.. {
        if at == stream.len() {
            break;
        }
        let end = (at + pieces[k % pieces.len()]).min(stream.len());
        raw.write_all(&stream[at..end]).await.unwrap();
        at = end;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for n in 0..40usize {
        let ev = events.find(|v| v["type"] == "split").await;
        assert_eq!(ev["n"], n);
        assert_eq!(ev["pad"], "p".repeat(n * 7 % 300));
        assert_eq!(ev["device"], d.to_string());
    }
    assert_eq!(r.metric("router_events_published_total").await, 40.0);
}

#[tokio::test]
async fn malformed_json_gets_error_replies_then_4400() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    ws.send(Message::text("{not json")).await.unwrap();
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad-json"))
    );
    send_json(&mut ws, json!({"no":"type"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "no-type");
    // The connection still works after errors.
    send_json(&mut ws, json!({"type":"device-state","disk":"low"})).await;
    // Ten malformed frames in a row: protocol violation.
    for _ in 0..10 {
        ws.send(Message::text("[]")).await.unwrap();
    }
    assert_eq!(close_code(&mut ws).await, 4400);
    assert_eq!(
        r.metric("router_protocol_errors_total{code=\"bad-json\"}")
            .await,
        1.0
    );
    assert_eq!(
        r.metric("router_protocol_errors_total{code=\"not-object\"}")
            .await,
        10.0
    );
    assert_eq!(r.metric("router_events_published_total").await, 1.0);
}

#[tokio::test]
async fn binary_and_invalid_utf8_are_refused() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    ws.send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef]))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 4400);
    // Invalid UTF-8 in a text frame, written by hand (tungstenite will not send it):
    // junk, and an otherwise valid frame whose string holds a bad byte (which the JSON
    // validator is the one to catch), in the Hive and Hivekit protocols.
    let frames: [&[u8]; 4] = [
        &[0xff, 0xfe, b'{'],
        b"{\"type\":\"x\",\"a\":\"\xc3\x28\"}",
        b"[{\"typ\":\"sys\",\"act\":\"hbt\",\"cid\":\"\xff\"}]",
        b"[\xe2\x82]",
    ];
    for path in ["/ws", "/v1/ws"] {
        for frame in frames {
            let (d2, a2) = ids();
            let auth = format!("Authorization: Bearer {}\r\n", r.token(d2, a2));
            let mut raw = raw_upgrade_at(&r, path, &auth).await;
            raw.write_all(&masked_frame(0x1, frame)).await.unwrap();
            assert_eq!(
                read_close_code(&mut raw).await,
                1007,
                "{path} {}",
                String::from_utf8_lossy(frame)
            );
        }
    }
    // Phoenix: V2 frames are checked by the validator (a refused one then for UTF-8),
    // V1 objects before serde_json (which skips unknown members unchecked).
    let phoenix: [(&str, &[u8]); 6] = [
        ("2.0.0", &[0xff, 0xfe, b'[']),
        ("2.0.0", b"[\"1\",\"1\",\"device\",\"phx_join\",{\"a\":\"\xc3\x28\"}]"),
        ("2.0.0", b"[\"1\",\"1\",\"d\xffvice\",\"phx_join\",{}]"),
        ("2.0.0", b"[\xe2\x82]"),
        ("1.0.0", b"{\"topic\":\"device\",\"event\":\"phx_join\",\"payload\":{},\"ref\":\"1\",\"x\":\"\xff\"}"),
        ("1.0.0", &[0xff, 0xfe, b'{']),
    ];
    for (vsn, frame) in phoenix {
        let (d2, a2) = ids();
        let path = format!("/socket/websocket?token={}&vsn={vsn}", r.token(d2, a2));
        let mut raw = raw_upgrade_at(&r, &path, "").await;
        raw.write_all(&masked_frame(0x1, frame)).await.unwrap();
        assert_eq!(
            read_close_code(&mut raw).await,
            1007,
            "phoenix {vsn} {}",
            String::from_utf8_lossy(frame)
        );
    }
    // Refused as bad UTF-8, not counted as bad JSON or a bad Phoenix frame.
    assert_eq!(
        r.metric("router_protocol_errors_total{code=\"bad-json\"}")
            .await,
        0.0
    );
    assert_eq!(
        r.metric("router_phoenix_errors_total{code=\"bad-frame\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn oversize_frame_closes_1009() {
    let r = TestRouter::start_with(|c| c.max_frame = 1024);
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let big = format!(r#"{{"type":"instances","pad":"{}"}}"#, "x".repeat(2000));
    ws.send(Message::text(big)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);
    assert_eq!(r.metric("router_closes_total{code=\"1009\"}").await, 1.0);
}

#[tokio::test]
async fn same_device_again_replaces_with_4409() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut first = r.device(d, a).await;
    let mut second = r.device(d, a).await;
    assert_eq!(close_code(&mut first).await, 4409);
    // The newest connection is the one requests reach.
    let dev = tokio::spawn(async move {
        let req = next_json(&mut second).await;
        send_json(&mut second, json!({"type":"ack","request":req["request"]})).await;
        second
    });
    let (status, body) = r
        .request(d, json!({"command":"DeviceCommand","payload":{}}), "")
        .await;
    assert_eq!(status, 200, "{body}");
    dev.await.unwrap();
    assert_eq!(r.metric("router_takeovers_total").await, 1.0);
    assert_eq!(r.metric("router_closes_total{code=\"4409\"}").await, 1.0);
}

#[tokio::test]
async fn request_ack_round_trip() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let dev = tokio::spawn(async move {
        let req = next_json(&mut ws).await;
        send_json(&mut ws, json!({"type":"ack","request":req["request"]})).await;
        req
    });
    let (status, body) = r
        .request(
            d,
            json!({"command":"SchedulerAction","payload":{"action":"stop","app":"db"}}),
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "acked");
    assert!(body["latency_ms"].as_f64().unwrap() >= 0.0);
    let req = dev.await.unwrap();
    assert_eq!(req["type"], "device-request");
    assert_eq!(req["service"], "hive-backend");
    assert_eq!(req["device"], d.to_string());
    assert_eq!(req["account"], a.to_string());
    assert_eq!(req["command"], "SchedulerAction");
    assert_eq!(req["payload"], json!({"action":"stop","app":"db"}));
    assert_eq!(req["request"], body["request"]);
    assert_eq!(r.metric("router_requests_acked_total").await, 1.0);
    assert_eq!(r.metric("router_ack_latency_seconds_count").await, 1.0);
}

#[tokio::test]
async fn wait_for_response() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let dev = tokio::spawn(async move {
        let req = next_json(&mut ws).await;
        send_json(&mut ws, json!({"type":"ack","request":req["request"]})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        send_json(&mut ws, json!({"type":"response","request":req["request"],"status":"ok","result":{"free_gb":12}})).await;
        ws
    });
    let (status, body) = r
        .request(
            d,
            json!({"command":"DeviceCommand","payload":{"check":"disk"}}),
            "?wait=response",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["result"], json!({"free_gb":12}));
    assert!(body["latency_ms"].as_f64().unwrap() >= 50.0);
    dev.await.unwrap();
}

#[tokio::test]
async fn offline_bad_input_and_timeout() {
    let r = TestRouter::start();
    let (status, body) = r
        .request(Uuid::new_v4(), json!({"command":"X","payload":{}}), "")
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("offline")));
    let resp = r
        .http
        .post(format!("{}/v1/devices/not-a-uuid/requests", r.api))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "bad-device-id"
    );
    let resp = r
        .http
        .post(format!("{}/v1/devices/{}/requests", r.api, Uuid::new_v4()))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "bad-json");
    let resp = r
        .http
        .post(format!("{}/v1/devices/{}/events", r.api, Uuid::new_v4()))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // A device that never acks: 504 after the timeout.
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let (status, body) = r
        .request(
            d,
            json!({"command":"X","payload":null,"timeout_ms":300}),
            "",
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("timeout")),
        "{body}"
    );
    assert_eq!(next_json(&mut ws).await["type"], "device-request");
    assert_eq!(r.metric("router_requests_timed_out_total").await, 1.0);
    assert_eq!(r.metric("router_requests_offline_total").await, 1.0);
    assert_eq!(r.metric("router_api_bad_requests_total").await, 2.0);
    // A late ack is counted as unmatched, not crashed on.
    send_json(&mut ws, json!({"type":"ack","request":Uuid::new_v4()})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(r.metric("router_acks_unmatched_total").await, 1.0);
}

#[tokio::test]
async fn events_to_device_and_lookup() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let resp = r
        .http
        .post(format!("{}/v1/devices/{d}/events", r.api))
        .json(&json!({"type":"config-changed","key":"k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"config-changed","key":"k"})
    );
    let info: Value = r
        .http
        .get(format!("{}/v1/devices/{d}", r.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["connected"], true);
    assert_eq!(info["protocol"], "hive");
    assert_eq!(info["account"], a.to_string());
    assert!(info["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    let resp = r
        .http
        .get(format!("{}/v1/devices/{}", r.api, Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            r.http
                .get(format!("{}{path}", r.api))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn pongs_produce_device_alive() {
    let r = TestRouter::start_with(|c| c.ping_interval = 1);
    let mut events = Events::subscribe(&r).await;
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    // Reading drives tungstenite's automatic pong.
    let reader = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    });
    let ev = events.find(|v| v["type"] == "device-alive").await;
    assert_eq!(ev["device"], d.to_string());
    assert_eq!(ev["service"], "hive-backend");
    assert!(ev["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    reader.abort();
}

/// --device-alive-interval longer than the ping interval: every ping is answered, but
/// the backend hears of the device once per interval.
#[tokio::test]
async fn device_alive_interval_spaces_the_events_out() {
    let mut counts = Vec::new();
    for alive in [0, 60] {
        let r = TestRouter::start_with(|c| {
            c.ping_interval = 1;
            c.device_alive_interval = alive;
        });
        let (d, a) = ids();
        let mut ws = r.device(d, a).await;
        let reader = tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        });
        tokio::time::sleep(Duration::from_millis(3500)).await;
        counts.push(r.metric("router_device_alive_events_total").await);
        reader.abort();
    }
    assert!(counts[0] >= 2.0, "one per ping: {counts:?}");
    assert_eq!(counts[1], 1.0, "one per minute: {counts:?}");
}

/// One shard: the HTTP API, the embedded bus and the connections share the shard's
/// thread (no API thread). Requests, their acks, device events on /v1/events,
/// device-alive from pongs and /metrics all still work there.
#[tokio::test]
async fn one_shard_serves_the_api_on_its_own_thread() {
    let r = TestRouter::start_with(|c| {
        c.shards = 1;
        c.ping_interval = 1;
    });
    let mut events = Events::subscribe(&r).await;
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let dev = tokio::spawn(async move {
        for i in 0..3 {
            let req = next_json(&mut ws).await;
            assert_eq!(req["type"], "device-request");
            send_json(&mut ws, json!({"type":"ack","request":req["request"]})).await;
            send_json(&mut ws, json!({"type":"device-state","n":i})).await;
        }
        // Keep reading: tungstenite answers the router's pings.
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    });
    for i in 0..3 {
        let (status, body) = r
            .request(d, json!({"command":"DeviceCommand","payload":{"i":i}}), "")
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "acked");
        let ev = events
            .find(|v| v["type"] == "device-state" && v["n"] == i)
            .await;
        assert_eq!(ev["device"], d.to_string());
    }
    let alive = events.find(|v| v["type"] == "device-alive").await;
    assert_eq!(alive["device"], d.to_string());
    assert_eq!(r.metric("router_requests_acked_total").await, 3.0);
    assert_eq!(r.metric("router_connections{shard=\"0\"}").await, 1.0);
    dev.abort();
}

#[tokio::test]
async fn many_devices_across_shards() {
    // Devices hash to both shards; sockets accepted on one are handed to the other.
    let r = TestRouter::start_with(|c| c.shards = 3);
    let mut tasks = Vec::new();
    let mut devices = Vec::new();
    for _ in 0..30 {
        let (d, a) = ids();
        let mut ws = r.device(d, a).await;
        devices.push(d);
        tasks.push(tokio::spawn(async move {
            let req = next_json(&mut ws).await;
            send_json(&mut ws, json!({"type":"ack","request":req["request"]})).await;
            ws
        }));
    }
    for d in &devices {
        let (status, body) = r
            .request(*d, json!({"command":"Ping","payload":{}}), "")
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    let m = r.metrics().await;
    let per_shard: Vec<f64> = (0..3)
        .map(|i| metric_value(&m, &format!("router_connections{{shard=\"{i}\"}}")))
        .collect();
    assert_eq!(per_shard.iter().sum::<f64>(), 30.0, "{per_shard:?}");
    assert!(per_shard.iter().all(|n| *n > 0.0), "{per_shard:?}");
    assert!(metric_value(&m, "router_handoffs_total") > 0.0);
}

#[tokio::test]
async fn bursts_are_read_to_the_end() {
    // Devices write far more than one readiness event's read budget and then go quiet:
    // the shard must come back for the rest without any new traffic to wake it.
    let r = TestRouter::start_with(|c| {
        c.device_rate = 10_000_000;
        c.device_burst = 10_000_000;
    });
    const DEVICES: usize = 8;
    const EACH: usize = 40_000;
    let event =
        json!({"type":"instances","apps":[{"name":"db","healthy":true,"restarts":0}]}).to_string();
    let mut socks = Vec::new();
    for _ in 0..DEVICES {
        let (d, a) = ids();
        socks.push(r.device(d, a).await);
    }
    let writers: Vec<_> = socks
        .into_iter()
        .map(|mut ws| {
            let event = event.clone();
            tokio::spawn(async move {
                for _ in 0..EACH {
                    ws.feed(Message::text(event.clone())).await.unwrap();
                }
                ws.flush().await.unwrap();
                ws // kept open: no close frame or FIN to wake the router
            })
        })
        .collect();
    let mut open = Vec::new();
    for w in writers {
        open.push(w.await.unwrap());
    }
    let want = (DEVICES * EACH) as f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut got = 0.0;
    while std::time::Instant::now() < deadline {
        got = r.metric("router_events_published_total").await;
        if got >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, want, "events read from {DEVICES} quiet sockets");
    drop(open);
}

#[tokio::test]
async fn a_full_bus_pushes_back_instead_of_dropping() {
    // A bus queue of 16 events and a device writing 20,000 as fast as it can: the shard
    // stops reading while the queue is nearly full (TCP pushes back on the device), so
    // every event arrives and none is dropped; the pauses are counted.
    let r = TestRouter::start_with(|c| {
        c.queue_capacity = 16;
        c.device_rate = 10_000_000;
        c.device_burst = 10_000_000;
    });
    const N: usize = 20_000;
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let event = json!({"type":"instances","apps":[]}).to_string();
    for _ in 0..N {
        ws.feed(Message::text(event.clone())).await.unwrap();
    }
    ws.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut got = 0.0;
    while std::time::Instant::now() < deadline {
        got = r.metric("router_bus_events_total").await;
        if got >= N as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = r.metrics().await;
    assert_eq!(
        got,
        N as f64,
        "delivered by the bus: {}",
        m.lines()
            .filter(|l| l.starts_with("router_events")
                || l.starts_with("router_bus")
                || l.starts_with("router_frames_in"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert_eq!(
        metric_value(&m, "router_events_dropped_total{reason=\"bus_full\"}"),
        0.0
    );
    assert!(metric_value(&m, "router_bus_backpressure_total") > 0.0);
    drop(ws);
}
