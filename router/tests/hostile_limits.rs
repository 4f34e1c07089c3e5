//! What a device-side attacker could hold or make the router do at no cost to itself
//! (issue #32): connections that never authenticate, pings before authentication, and
//! upgrades and frames answered otherwise than documented. Each case: the attacker is
//! answered with its status or close code, the refusal is counted, and a real device
//! still gets through.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const OP_PING: u8 = 0x9;

fn ws_addr(r: &TestRouter) -> SocketAddr {
    r.ws.trim_start_matches("ws://").parse().unwrap()
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.x).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// A device from `from` with its token on the upgrade request: upgraded and greeted.
async fn device_from(r: &TestRouter, from: &str) -> Result<Ws, String> {
    let (d, a) = ids();
    let tcp = connect_from(from, ws_addr(r)).await;
    let mut req = format!("{}/ws", r.ws).into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", r.token(d, a)).parse().unwrap(),
    );
    let (ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .map_err(|e| e.to_string())?;
    let mut ws = ws;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "authenticated", "{hello}");
    Ok(ws)
}

/// An upgrade that never finishes (no token, request cut short), from `from`.
async fn unfinished_upgrade(from: &str, to: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, to).await;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    s
}

/// Wait until `name` reaches at least `want` (within 5 s).
async fn metric_at_least(r: &TestRouter, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = r.metric(name).await;
        if v >= want {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} = {v}, want >= {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 1,250 upgrades without a token from one address, held until the auth timeout: the
/// address keeps at most its own budget (--max-unauthenticated-per-ip, 512 by default),
/// the rest are refused at once with 429, and a device from another address connects,
/// with its token on the request or in its first frame.
#[tokio::test]
async fn one_address_without_tokens_cannot_lock_out_devices() {
    let r = TestRouter::start_with(|c| c.max_connections = 1200);
    let to = ws_addr(&r);
    let mut held = Vec::new();
    for _ in 0..1250 {
        held.push(unfinished_upgrade("127.0.0.1", to).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ws = device_from(&r, "127.0.0.2").await.expect("device admitted");
    drop(ws);
    let refused = metric_at_least(
        &r,
        "router_connections_refused_total{reason=\"unauthenticated_ip\"}",
        1.0,
    )
    .await;
    eprintln!(
        "1,250 unauthenticated upgrades from one address: {} open, {refused} refused",
        r.metric("router_open_connections").await
    );
    assert!(r.metric("router_open_connections").await <= 513.0);
    // A device that sends its token in the first frame gets an unauthenticated place too.
    let tcp = connect_from("127.0.0.3", to).await;
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("{}/ws", r.ws),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("upgrade");
    let (d, a) = ids();
    ws.send(Message::text(format!("Bearer {}", r.token(d, a))))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    // Some of those refused were answered 429 with a message.
    let mut answered = 0;
    for s in held.iter_mut().rev().take(50) {
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with("HTTP/1.1 429") {
                assert!(text.contains("unauthenticated"), "{text}");
                answered += 1;
            }
        }
    }
    assert!(answered > 0);
}

/// Unauthenticated connections from many addresses: the process keeps at most its
/// budget of them (--max-unauthenticated, at most half of --max-connections), so a
/// device with a token is admitted while they are held.
#[tokio::test]
async fn many_addresses_without_tokens_leave_room_for_devices() {
    let r = TestRouter::start_with(|c| c.max_connections = 40);
    let to = ws_addr(&r);
    let mut held = Vec::new();
    for i in 0..60 {
        held.push(unfinished_upgrade(&format!("127.0.0.{}", 10 + i % 12), to).await);
    }
    // Those over the budget have 1 s to bring credentials, then are answered 503.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ws = device_from(&r, "127.0.0.2").await.expect("device admitted");
    drop(ws);
    // Those beyond the budget were refused once their short grace was over.
    metric_at_least(
        &r,
        "router_connections_refused_total{reason=\"unauthenticated\"}",
        1.0,
    )
    .await;
    let open = r.metric("router_open_connections").await;
    eprintln!("60 unauthenticated upgrades from 12 addresses, --max-connections 40: {open} open");
    assert!(open <= 20.0, "{open}");
    drop(held);
}

/// Pings before authentication are answered a few times, then the connection is
/// closed 1008 and counted.
#[tokio::test]
async fn pings_before_authentication_are_limited() {
    let r = TestRouter::start();
    let mut s = raw_upgrade_no_token(&r).await;
    for _ in 0..50 {
        if s.write_all(&masked_frame(OP_PING, b"p")).await.is_err() {
            break;
        }
    }
    assert_eq!(read_close_code(&mut s).await, 1008);
    assert!(r.metric("router_rate_limited_total").await >= 1.0);
    assert_eq!(r.metric("router_closes_total{code=\"1008\"}").await, 1.0);
}

/// More than 32 header fields on a device upgrade: 431, as documented.
#[tokio::test]
async fn too_many_upgrade_headers_get_431() {
    let r = TestRouter::start();
    let mut s = TcpStream::connect(ws_addr(&r)).await.unwrap();
    let mut req = String::from("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.contains("header"), "{text}");
    assert_eq!(r.metric("router_handshake_failures_total").await, 1.0);
}

/// A Phoenix upgrade without any credential is refused before the upgrade: HTTP 401.
#[tokio::test]
async fn a_phoenix_upgrade_without_a_token_gets_401() {
    let r = TestRouter::start();
    for path in ["/socket/websocket?vsn=2.0.0", "/device-socket/websocket"] {
        let err = tokio_tungstenite::connect_async(format!("{}{path}", r.ws))
            .await
            .unwrap_err();
        let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
            panic!("{path}: {err}");
        };
        assert_eq!(resp.status(), 401, "{path}");
        let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("token"),
            "{body}"
        );
    }
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"missing\"}")
            .await,
        2.0
    );
    assert_eq!(r.metric("router_closes_total{code=\"4401\"}").await, 0.0);
}

/// Hivekit frames of too many actions are refusals: each is answered 413, none counts
/// toward the ten bad frames that close 4400.
#[tokio::test]
async fn hivekit_frames_of_too_many_actions_do_not_close_4400() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/v1/ws?token={}", r.ws, r.token(d, a)))
            .await
            .unwrap();
    next_json(&mut ws).await; // aut suc
    let many = vec![r#"{"typ":"sys","act":"hbt"}"#; 300].join(",");
    for i in 0..15 {
        ws.send(Message::text(format!("[{many}]"))).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert_eq!(reply[0]["erc"], 413, "frame {i}: {reply}");
    }
    ws.send(Message::text(r#"[{"typ":"sys","act":"hbt","cid":"h"}]"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await, json!([{"cid":"h","res":"suc"}]));
    assert_eq!(
        r.metric("router_hivekit_errors_total{code=\"too-many-actions\"}")
            .await,
        15.0
    );
    assert_eq!(r.metric("router_closes_total{code=\"4400\"}").await, 0.0);
}
