//! The loopback API under attack (issue #32): sockets that never finish their headers,
//! more connections or subscribers than it should serve, requests piling up for one
//! device, and what a browser page could make it do. Each case: refused with its status
//! and a message, counted, and devices (or a well-behaved caller) still served.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn ws_addr(r: &TestRouter) -> SocketAddr {
    r.ws.trim_start_matches("ws://").parse().unwrap()
}

fn api_addr(r: &TestRouter) -> SocketAddr {
    r.api.trim_start_matches("http://").parse().unwrap()
}

/// A device with its token on the upgrade request: upgraded and greeted.
async fn device(r: &TestRouter) -> Result<Ws, String> {
    let (d, a) = ids();
    let tcp = TcpStream::connect(ws_addr(r)).await.unwrap();
    let mut req = format!("{}/ws", r.ws).into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", r.token(d, a)).parse().unwrap(),
    );
    let (mut ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .map_err(|e| e.to_string())?;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "authenticated", "{hello}");
    Ok(ws)
}

/// An API client that sends its headers a byte at a time is cut off at the header
/// deadline (10 s), not served for ever.
#[tokio::test]
async fn api_headers_have_a_deadline() {
    let r = TestRouter::start();
    let mut s = TcpStream::connect(api_addr(&r)).await.unwrap();
    let t0 = Instant::now();
    let req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in req.iter().cycle() {
        if t0.elapsed() > Duration::from_secs(16) {
            break;
        }
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    eprintln!("API header trickle ended after {:?}", t0.elapsed());
    assert!(closed, "still open after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(14));
    assert!(
        r.metric("router_api_refused_total{reason=\"header_timeout\"}")
            .await
            >= 1.0
    );
}

/// More API connections than --api-max-connections (1,024 by default): the next is
/// answered 503 and closed, counted; devices are not affected, and the API serves
/// again once they are gone.
#[tokio::test]
async fn api_connections_are_capped() {
    let r = TestRouter::start();
    let api = api_addr(&r);
    let mut idle = Vec::new();
    for _ in 0..1024 {
        idle.push(TcpStream::connect(api).await.unwrap());
    }
    let mut extra = TcpStream::connect(api).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(read.is_ok(), "the connection over the cap was not closed");
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("connections"), "{text}");
    // Devices do not notice.
    let ws = device(&r).await.expect("device admitted");
    drop(ws);
    assert!(refused_after_close(&r, &mut idle).await >= 1.0);
}

/// Free the API's sockets, then read the refusal counter (once the API serves again).
async fn refused_after_close(r: &TestRouter, idle: &mut Vec<TcpStream>) -> f64 {
    idle.clear();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match r.http.get(format!("{}/metrics", r.api)).send().await {
            Ok(resp) => {
                let text = resp.text().await.unwrap();
                return metric_value(&text, "router_api_refused_total{reason=\"connections\"}");
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "API not serving again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A web page cannot use the loopback API: a foreign Origin is refused (403), so is a
/// Host that is not the API's (DNS rebinding), and a POST body must be JSON (415).
/// Clients without an Origin (curl, reqwest, Python) are served as before.
#[tokio::test]
async fn the_api_refuses_browsers_and_foreign_hosts() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let url = format!("{}/v1/devices/{d}/events", r.api);
    // What any page can send without a preflight: text/plain with its Origin.
    let resp = r
        .http
        .post(&url)
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body(r#"{"type":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "forbidden-origin", "{body}");
    // The same with a JSON content type: still the Origin.
    let resp = r
        .http
        .post(&url)
        .header("origin", "http://evil.example")
        .json(&json!({"type":"x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // DNS rebinding: the page's own name in Host, no Origin on a simple GET.
    for path in ["/v1/events", "/v1/devices", "/metrics"] {
        let resp = r
            .http
            .get(format!("{}{path}", r.api))
            .header("host", format!("evil.example:{}", api_addr(&r).port()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "forbidden-host", "{body}");
    }
    // No Origin, not JSON: 415.
    let resp = r
        .http
        .post(&url)
        .header("content-type", "text/plain")
        .body(r#"{"type":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unsupported-media-type", "{body}");
    let resp = r
        .http
        .post(format!("{}/v1/devices/{d}/requests", r.api))
        .body(r#"{"command":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    // The API's own origin, localhost, and clients without an Origin are served.
    let port = api_addr(&r).port();
    for (host, origin) in [
        (format!("127.0.0.1:{port}"), None),
        (
            format!("localhost:{port}"),
            Some(format!("http://localhost:{port}")),
        ),
        (
            format!("127.0.0.1:{port}"),
            Some(format!("http://127.0.0.1:{port}")),
        ),
    ] {
        let mut req = r
            .http
            .post(&url)
            .header("host", host.clone())
            .json(&json!({"type":"ok"}));
        if let Some(o) = &origin {
            req = req.header("origin", o);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 202, "{host} {origin:?}");
        assert_eq!(next_json(&mut ws).await["type"], "ok");
    }
    for reason in ["origin", "host", "media_type"] {
        assert!(
            r.metric(&format!("router_api_refused_total{{reason=\"{reason}\"}}"))
                .await
                >= 1.0,
            "{reason}"
        );
    }
    // Nothing refused reached the device.
    ws.send(Message::Ping(vec![].into())).await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(
        !matches!(next, Ok(Some(Ok(Message::Text(_))))),
        "a refused event was delivered: {next:?}"
    );
}

/// More /v1/events subscribers than --max-sse-subscribers (64 by default): 503,
/// counted; the others keep their stream.
#[tokio::test]
async fn sse_subscribers_are_capped() {
    let r = TestRouter::start();
    let mut subs = Vec::new();
    for _ in 0..64 {
        let resp = r
            .http
            .get(format!("{}/v1/events", r.api))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        subs.push(resp);
    }
    let resp = r
        .http
        .get(format!("{}/v1/events", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too-many-subscribers", "{body}");
    assert_eq!(
        r.metric("router_api_refused_total{reason=\"sse_subscribers\"}")
            .await,
        1.0
    );
    assert_eq!(r.metric("router_sse_subscribers").await, 64.0);
    subs.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metric("router_sse_subscribers").await > 63.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = r
        .http
        .get(format!("{}/v1/events", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Requests waiting for one device are capped (--max-pending, 256 by default): the
/// next gets 429 with a message, counted; another device is not affected.
#[tokio::test]
async fn pending_requests_per_device_are_capped() {
    let r = TestRouter::start();
    let (d, a) = ids();
    // Connected, never acks.
    let _silent = r.device(d, a).await;
    let mut calls = Vec::new();
    for _ in 0..300 {
        let http = r.http.clone();
        let url = format!("{}/v1/devices/{d}/requests", r.api);
        calls.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .json(&json!({"command":"x","timeout_ms":4000}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut by_status = std::collections::BTreeMap::new();
    for c in calls {
        let (status, body) = c.await.unwrap();
        if status == 429 {
            assert_eq!(body["error"], "too-many-pending", "{body}");
        }
        *by_status.entry(status).or_insert(0) += 1;
    }
    eprintln!("300 requests to a device that never acks: {by_status:?}");
    assert_eq!(by_status.get(&429), Some(&44), "{by_status:?}");
    assert_eq!(by_status.get(&504), Some(&256), "{by_status:?}");
    assert_eq!(
        r.metric("router_requests_pending_refused_total").await,
        44.0
    );
}

/// A console on an allowed origin (--api-allowed-origins) and a name the API is
/// reached by (--api-allowed-hosts) are served; another origin on the same host is not.
#[tokio::test]
async fn allowed_origins_and_hosts_are_served() {
    let r = TestRouter::start_with(|c| {
        c.api_allowed_origins = vec!["https://console.example.com".into()];
        c.api_allowed_hosts = vec!["router.internal".into()];
    });
    let port = api_addr(&r).port();
    let get = |host: String, origin: &'static str| {
        r.http
            .get(format!("{}/v1/devices", r.api))
            .header("host", host)
            .header("origin", origin)
            .send()
    };
    let ok = get(
        format!("router.internal:{port}"),
        "https://console.example.com",
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    let origin = get(
        format!("router.internal:{port}"),
        "https://other.example.com",
    )
    .await
    .unwrap();
    assert_eq!(origin.status(), 403);
    let host = get(
        format!("other.internal:{port}"),
        "https://console.example.com",
    )
    .await
    .unwrap();
    assert_eq!(host.status(), 403);
}
