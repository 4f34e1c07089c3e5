//! Hostile input: each case gets its close code or error, its metric moves, and an
//! honest device on the same router is unaffected (its request/ack still works).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// An honest device answers a request through the API.
async fn honest_device_works(r: &TestRouter) {
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    let dev = tokio::spawn(async move {
        let req = next_json(&mut ws).await;
        send_json(&mut ws, json!({"type":"ack","request":req["request"]})).await;
        ws
    });
    let (status, body) = r
        .request(d, json!({"command":"Ping","payload":{}}), "")
        .await;
    assert_eq!(status, 200, "honest device: {body}");
    dev.await.unwrap();
}

#[tokio::test]
async fn message_flood_is_rate_limited_then_closed_1008() {
    let r = TestRouter::start_with(|c| {
        c.device_rate = 10;
        c.device_burst = 20;
    });
    let mut ws = r.device(Uuid::new_v4(), Uuid::new_v4()).await;
    for i in 0..60 {
        let _ = ws
            .send(Message::text(json!({"type":"instances","i":i}).to_string()))
            .await;
    }
    let mut saw_rate_limited = false;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("answer")
        {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                saw_rate_limited |= v["code"] == "rate-limited";
            }
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(saw_rate_limited);
    assert_eq!(code, 1008);
    assert!(r.metric("router_rate_limited_total").await >= 20.0);
    assert!(r.metric("router_events_published_total").await <= 21.0);
    honest_device_works(&r).await;
}

#[tokio::test]
async fn connection_cap_and_ip_rate_refuse_with_http_status() {
    let r = TestRouter::start_with(|c| c.max_connections = 3);
    let mut keep = Vec::new();
    for _ in 0..3 {
        keep.push(r.device(Uuid::new_v4(), Uuid::new_v4()).await);
    }
    let err = tokio_tungstenite::connect_async(format!("{}/ws", r.ws))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(
        r.metric("router_connections_refused_total{reason=\"max_connections\"}")
            .await,
        1.0
    );
    assert_eq!(r.metric("router_open_connections").await, 3.0);
    drop(keep);

    let r = TestRouter::start_with(|c| {
        c.ip_connect_rate = 2;
        c.shards = 1;
    });
    let mut refused = 0;
    for _ in 0..10 {
        if let Err(e) = tokio_tungstenite::connect_async(format!("{}/ws", r.ws)).await {
            assert!(e.to_string().contains("429"), "{e}");
            refused += 1;
        }
    }
    assert!(refused >= 5, "refused {refused}");
    assert_eq!(
        r.metric("router_connections_refused_total{reason=\"ip_rate\"}")
            .await,
        refused as f64
    );
}

#[tokio::test]
async fn api_token_is_required_when_set() {
    let r = TestRouter::start_with(|c| c.api_token = Some("backend-secret".into()));
    let url = format!("{}/v1/devices/{}/requests", r.api, Uuid::new_v4());
    let resp = r
        .http
        .post(&url)
        .json(&json!({"command":"X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = r
        .http
        .post(&url)
        .bearer_auth("wrong")
        .json(&json!({"command":"X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = r
        .http
        .post(&url)
        .bearer_auth("backend-secret")
        .json(&json!({"command":"X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "authorized, device offline");
    assert_eq!(
        r.http
            .get(format!("{}/healthz", r.api))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        r.http
            .get(format!("{}/metrics", r.api))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let m = r
        .http
        .get(format!("{}/metrics", r.api))
        .bearer_auth("backend-secret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric_value(&m, "router_api_unauthorized_total"), 3.0);
}

#[tokio::test]
async fn hostile_json_and_tokens() {
    let r = TestRouter::start();
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    let deep = format!(
        r#"{{"type":"x","a":{}1{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    ws.send(Message::text(deep)).await.unwrap();
    let huge = r#"{"type":"instances","n":1e400,"m":123456789012345678901234567890,"s":"\ud800"}"#;
    ws.send(Message::text(huge)).await.unwrap();
    send_json(&mut ws, json!({"type":"device-state","ok":true})).await;
    // Whatever the verdict on the first two, the connection is alive and answers.
    let mut events = Events::subscribe(&r).await;
    send_json(&mut ws, json!({"type":"device-version","v":1})).await;
    events.find(|v| v["type"] == "device-version").await;

    // Wrong algorithm with the right secret, and alg:none: 4401.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = json!({"sub": d, "acc": a, "exp": router::auth::unix_now() + 60});
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    );
    for t in [hs512, none] {
        let (mut bad, _) = tokio_tungstenite::connect_async(format!("{}/ws?token={t}", r.ws))
            .await
            .unwrap();
        assert_eq!(close_code(&mut bad).await, 4401);
    }
    honest_device_works(&r).await;
}

#[tokio::test]
async fn slowloris_and_half_open_do_not_hurt_devices() {
    let r = TestRouter::start_with(|c| c.auth_timeout = 1);
    let addr = r.ws.trim_start_matches("ws://").to_string();
    let mut idle = Vec::new();
    // 200 connections that never finish their HTTP request, 200 that never say anything.
    for i in 0..400 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpg")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    honest_device_works(&r).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The router hung up on every one of them.
    for mut s in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed by the router")
            .unwrap_or(0);
        assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"timeout\"}")
            .await,
        400.0
    );
    assert_eq!(r.metric("router_open_connections").await, 0.0);
    honest_device_works(&r).await;
}

#[tokio::test]
async fn slow_reader_drops_events_and_refuses_requests() {
    let r = TestRouter::start_with(|c| {
        c.max_outbound = 64 * 1024;
        c.shards = 1;
    });
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    // A raw device that authenticates and then never reads.
    let addr = r.ws.trim_start_matches("ws://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!("GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", r.token(d, a));
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pad = "x".repeat(60_000);
    let mut statuses = Vec::new();
    for _ in 0..200 {
        let resp = r
            .http
            .post(format!("{}/v1/devices/{d}/events", r.api))
            .json(&json!({"type":"big","pad":pad}))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 503 {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&503),
        "never refused: {} sent",
        statuses.len()
    );
    assert_eq!(
        r.metric("router_events_dropped_total{reason=\"slow_device\"}")
            .await,
        1.0
    );
    // Requests are kept up to twice the limit; beyond it the connection is closed (1008).
    let mut last = 0;
    for _ in 0..20 {
        let (status, _) = r
            .request(
                d,
                json!({"command":"X","payload":{"pad":pad},"timeout_ms":100}),
                "",
            )
            .await;
        last = status;
        if status == 503 {
            break;
        }
    }
    assert_eq!(last, 503);
    assert_eq!(r.metric("router_closes_total{code=\"1008\"}").await, 1.0);
    assert_eq!(r.metric("router_requests_rejected_total").await, 1.0);
    // Same shard, another device: unaffected.
    honest_device_works(&r).await;
    drop(s);
}

#[tokio::test]
async fn connect_storm_is_refused_fast_not_queued() {
    // 600 devices at once against a cap of 300: the excess is refused with 503 at once,
    // the admitted ones all authenticate, and the router keeps serving.
    let r = TestRouter::start_with(|c| c.max_connections = 300);
    let mut tasks = Vec::new();
    for _ in 0..600 {
        let url = format!(
            "{}/ws?token={}",
            r.ws,
            r.token(Uuid::new_v4(), Uuid::new_v4())
        );
        tasks.push(tokio::spawn(async move {
            match tokio_tungstenite::connect_async(url).await {
                Ok((mut ws, _)) => {
                    let hello = next_json(&mut ws).await;
                    assert_eq!(hello["type"], "authenticated");
                    Ok(ws)
                }
                Err(e) => Err(e.to_string()),
            }
        }));
    }
    let (mut ok, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(ws) => ok.push(ws),
            Err(e) => {
                assert!(e.contains("503"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(ok.len(), 300);
    assert_eq!(refused, 300);
    assert_eq!(
        r.metric("router_connections_refused_total{reason=\"max_connections\"}")
            .await,
        300.0
    );
    drop(ok);
    tokio::time::sleep(Duration::from_millis(300)).await;
    honest_device_works(&r).await;
}
