//! Hostile input that cost the router more than its limits said: replies amplified past
//! --max-outbound, frames that carried no rate-limit cost, an SSE subscriber that never
//! reads, and protocol edges answered too leniently (close frames, RFC 6455 handshake
//! checks, the Bearer scheme, the API's own errors). Each case: its close code or
//! status, its metric, and what it costs printed as a figure (never asserted on time).

mod common;

use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const OP_TEXT: u8 = 0x1;
const OP_CONT: u8 = 0x0;
const OP_CLOSE: u8 = 0x8;
const OP_PONG: u8 = 0xA;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A frame with FIN as given (masked, as a client sends).
fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = masked_frame(op, payload);
    if !fin {
        f[0] &= 0x7f;
    }
    f
}

/// Read (unmasked) server frames until a close; its code and the bytes read before it.
/// Parses as it goes (megabytes of replies may come first).
async fn close_code_after(s: &mut tokio::net::TcpStream) -> (u16, usize) {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0;
    let mut chunk = vec![0u8; 1 << 16];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF before a close frame");
            buf.extend_from_slice(&chunk[..n]);
            loop {
                if buf.len() < 2 {
                    break;
                }
                let (hl, len) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                    127 if buf.len() >= 10 => (
                        10,
                        u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    ),
                    126 | 127 => break,
                    n => (2, n as usize),
                };
                if buf.len() < hl + len {
                    break;
                }
                if buf[0] & 0x0f == OP_CLOSE {
                    return (u16::from_be_bytes([buf[hl], buf[hl + 1]]), total);
                }
                total += hl + len;
                buf.drain(..hl + len);
            }
        }
    })
    .await
    .expect("a close frame within 30 s")
}

/// Upgrade `path` with a small receive buffer (so the kernel holds few of the replies a
/// device that never reads leaves there) and the token in the Authorization header.
async fn small_rcvbuf_upgrade(r: &TestRouter, path: &str, token: &str) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = r.ws.trim_start_matches("ws://").parse().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let std_stream: std::net::TcpStream = sock.into();
    std_stream.set_nonblocking(true).unwrap();
    let mut s = tokio::net::TcpStream::from_std(std_stream).unwrap();
    let up = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(up.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A Phoenix device that sends heartbeats with 60 KB refs (each echoed in its reply)
/// and never reads is closed with 1008 once the replies pass --max-outbound.
#[tokio::test]
async fn phoenix_replies_to_a_device_that_never_reads_are_bounded() {
    let r = TestRouter::start_with(|c| {
        c.device_rate = 100_000;
        c.device_burst = 100_000;
    });
    let (d, a) = ids();
    let mut s = small_rcvbuf_upgrade(&r, "/socket/websocket?vsn=2.0.0", &r.token(d, a)).await;
    let big_ref = "7".repeat(60_000);
    let hb = format!(r#"[null,"{big_ref}","phoenix","heartbeat",{{}}]"#);
    let one = masked_frame(OP_TEXT, hb.as_bytes());
    let writer = tokio::spawn(async move {
        for _ in 0..300 {
            if s.write_all(&one).await.is_err() {
                break;
            }
        }
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.metric("router_outbound_overflow_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "replies to a reader that never reads were not bounded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = writer.await.unwrap();
    let (code, read) = close_code_after(&mut s).await;
    assert_eq!(code, 1008);
    eprintln!("phoenix: {read} bytes of replies before the 1008");
}

/// A Hivekit device that sends frames of 2,000 malformed actions alternating with
/// valid ones and never reads: before, every frame was answered in full and memory
/// grew without bound; now a frame of more than 256 actions gets one small error, and
/// once what waits for the device passes --max-outbound it is closed with 1008.
#[tokio::test]
async fn a_device_that_makes_the_router_amplify_is_closed_1008() {
    let r = TestRouter::start_with(|c| {
        c.max_outbound = 16 * 1024;
        c.device_rate = 100_000;
        c.device_burst = 100_000;
    });
    let (d, a) = ids();
    let mut s = small_rcvbuf_upgrade(&r, "/v1/ws", &r.token(d, a)).await;
    let bad = format!("[{}]", vec!["1"; 2000].join(","));
    // 255 actions, each a malformed object: one error reply per action.
    let many = format!("[{}]", vec![r#"{"typ":"x"}"#; 255].join(","));
    let valid = r#"[{"typ":"sys","act":"hbt","cid":1}]"#;
    let before = rss_kib();
    let mut sent = 0usize;
    for _ in 0..400 {
        for f in [&bad, &many, &valid.to_string()] {
            if s.write_all(&masked_frame(OP_TEXT, f.as_bytes()))
                .await
                .is_err()
            {
                break;
            }
            sent += f.len();
        }
    }
    // Only once the router gave up on the device does it read what came back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.metric("router_outbound_overflow_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the router kept answering a device that never reads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, read) = close_code_after(&mut s).await;
    assert_eq!(code, 1008);
    assert!(r.metric("router_outbound_overflow_total").await >= 1.0);
    assert!(
        r.metric("router_hivekit_errors_total{code=\"too-many-actions\"}")
            .await
            >= 1.0
    );
    eprintln!(
        "amplification: {sent} bytes sent, {read} bytes of replies read before the 1008; process RSS {before} -> {} KiB",
        rss_kib()
    );
}

/// Frames that carry nothing still cost a token: a flood of empty continuation frames
/// (after an unfinished text frame) or of unsolicited pongs is closed with 1008 after
/// a bounded number of frames, and a device on the same shard keeps working.
#[tokio::test]
async fn empty_continuations_and_pongs_are_rate_limited() {
    let r = TestRouter::start_with(|c| {
        c.shards = 1;
        c.device_rate = 50;
        c.device_burst = 100;
    });
    for flood in ["continuation", "pong"] {
        let (d, a) = ids();
        let mut s = raw_upgrade(&r, &r.token(d, a)).await;
        let mut batch = Vec::new();
        if flood == "continuation" {
            batch.extend(frame(false, OP_TEXT, b"{"));
        }
        let one = if flood == "continuation" {
            frame(false, OP_CONT, b"")
        } else {
            frame(true, OP_PONG, b"")
        };
        for _ in 0..2000 {
            batch.extend_from_slice(&one);
        }
        let t0 = Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..50 {
                if s.write_all(&batch).await.is_err() {
                    break;
                }
            }
            s
        });
        // Beside it, on the same shard, an honest device's request is acked.
        let (hd, ha) = ids();
        let mut ws = r.device(hd, ha).await;
        let dev = tokio::spawn(async move {
            let req = next_json(&mut ws).await;
            send_json(&mut ws, json!({"type":"ack","request":req["request"]})).await;
        });
        let t1 = Instant::now();
        let (status, body) = r.request(hd, json!({"command":"Ping"}), "").await;
        assert_eq!(status, 200, "{body}");
        let neighbour = t1.elapsed();
        dev.await.unwrap();
        let mut s = writer.await.unwrap();
        let code = read_close_code(&mut s).await;
        assert_eq!(code, 1008, "{flood} flood");
        eprintln!(
            "{flood} flood: closed 1008 after {:?}; the neighbour's request took {neighbour:?}",
            t0.elapsed()
        );
    }
    assert!(r.metric("router_closes_total{code=\"1008\"}").await >= 2.0);
    assert!(r.metric("router_rate_limited_total").await >= 2.0);
}

/// A message in more fragments than the bound is refused with 1009 even within the
/// rate limit.
#[tokio::test]
async fn a_message_in_too_many_fragments_is_closed_1009() {
    let r = TestRouter::start_with(|c| {
        c.device_rate = 100_000;
        c.device_burst = 100_000;
    });
    let (d, a) = ids();
    let mut s = raw_upgrade(&r, &r.token(d, a)).await;
    let mut batch = frame(false, OP_TEXT, b"{");
    for _ in 0..1100 {
        batch.extend(frame(false, OP_CONT, b" "));
    }
    let _ = s.write_all(&batch).await;
    assert_eq!(read_close_code(&mut s).await, 1009);
}

/// An SSE subscriber that never reads holds at most the ring's bytes, is told what it
/// missed, and when it leaves the memory is given back.
#[tokio::test]
async fn a_subscriber_that_never_reads_is_bounded_in_bytes() {
    let r = TestRouter::start_with(|c| {
        c.device_rate = 1000;
        c.device_burst = 1000;
    });
    // Subscribe and never read the body.
    let addr = r.api.trim_start_matches("http://").to_string();
    let mut sub = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sub.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metric("router_sse_subscribers").await < 1.0 {
        assert!(Instant::now() < deadline, "subscriber never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (d, a) = ids();
    let mut ws = r.device(d, a).await;
    let pad = "x".repeat(50_000);
    let before = rss_kib();
    for i in 0..400 {
        ws.send(Message::text(
            json!({"type":"big","i":i,"pad":pad}).to_string(),
        ))
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.metric("router_bus_events_total").await < 400.0 {
        assert!(
            Instant::now() < deadline,
            "events not all taken from the bus"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = r.metric("router_sse_buffered_bytes").await;
    eprintln!(
        "SSE: 400 events of 50 KB, subscriber never reads: {held} bytes held; process RSS {before} -> {} KiB",
        rss_kib()
    );
    assert!(held > 0.0);
    assert!(
        held <= (router::bus::sse::SSE_BUFFER_BYTES + 51_000) as f64,
        "{held}"
    );
    // It reads now: the first thing it learns is how many events went by.
    let mut buf = vec![0u8; 1 << 16];
    let mut text = String::new();
    while !text.contains(": lagged") {
        let n = tokio::time::timeout(Duration::from_secs(5), sub.read(&mut buf))
            .await
            .expect("stream data")
            .unwrap();
        assert!(n > 0);
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(r.metric("router_sse_lagged_total").await >= 1.0);
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metric("router_sse_buffered_bytes").await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "ring not emptied after the subscriber left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Close frames: a code no peer may send or a 1-byte payload is answered 1002, a reason
/// that is not UTF-8 1007, a valid one is echoed; every answer is counted.
#[tokio::test]
async fn close_frames_are_checked_and_counted() {
    let r = TestRouter::start();
    let mut cases: Vec<(Vec<u8>, u16)> = [1005u16, 1006, 1015, 999, 5000, 65535, 1004, 2000]
        .iter()
        .map(|c| (c.to_be_bytes().to_vec(), 1002))
        .collect();
    cases.push((vec![3], 1002));
    let mut bad_utf8 = 1000u16.to_be_bytes().to_vec();
    bad_utf8.extend_from_slice(b"\xff\xfe");
    cases.push((bad_utf8, 1007));
    cases.push((4000u16.to_be_bytes().to_vec(), 4000));
    cases.push((1000u16.to_be_bytes().to_vec(), 1000));
    for (payload, want) in &cases {
        let (d, a) = ids();
        let mut s = raw_upgrade(&r, &r.token(d, a)).await;
        s.write_all(&masked_frame(OP_CLOSE, payload)).await.unwrap();
        assert_eq!(
            read_close_code(&mut s).await,
            *want,
            "close payload {payload:?}"
        );
    }
    assert_eq!(
        r.metric("router_device_closes_total").await,
        cases.len() as f64
    );
    assert_eq!(r.metric("router_closes_total{code=\"1002\"}").await, 9.0);
    assert_eq!(r.metric("router_closes_total{code=\"1007\"}").await, 1.0);
    assert_eq!(r.metric("router_closes_total{code=\"other\"}").await, 1.0);
}

/// RFC 6455 §4: no key, a key that is not a 16-byte nonce, or HTTP/1.0 is a 400.
#[tokio::test]
async fn bad_opening_handshakes_get_400() {
    let r = TestRouter::start();
    let addr = r.ws.trim_start_matches("ws://").to_string();
    let reqs = [
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: not base64!\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n",
        "GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ];
    for req in reqs {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp)).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 400"), "{req:?} -> {resp}");
    }
}

/// The Bearer scheme in any case and with a tab, in the header or the first frame, and
/// a first-frame `Bearer` split into fragments, all authenticate.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_everywhere() {
    let r = TestRouter::start();
    for scheme in ["BEARER ", "bearer\t", "Bearer  "] {
        let (d, a) = ids();
        let mut s =
            raw_upgrade_with(&r, &format!("Authorization: {scheme}{}\r\n", r.token(d, a))).await;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).contains("authenticated"),
            "{scheme:?}"
        );
    }
    // First frame, lower case.
    let (d, a) = ids();
    let mut s = raw_upgrade_no_token(&r).await;
    s.write_all(&masked_frame(
        OP_TEXT,
        format!("bearer {}", r.token(d, a)).as_bytes(),
    ))
    .await
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("authenticated"));
    // First frame in three fragments.
    let (d, a) = ids();
    let msg = format!("Bearer {}", r.token(d, a));
    let (p1, rest) = msg.as_bytes().split_at(4);
    let (p2, p3) = rest.split_at(10);
    let mut s = raw_upgrade_no_token(&r).await;
    let mut batch = frame(false, OP_TEXT, p1);
    batch.extend(frame(false, OP_CONT, p2));
    batch.extend(frame(true, OP_CONT, p3));
    s.write_all(&batch).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("authenticated"));
    // Another scheme in the header is refused at the upgrade, not left to time out.
    let addr = r.ws.trim_start_matches("ws://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Basic dTpw\r\n\r\n").await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp)).await;
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 401"));
}

/// Every API error is JSON: 413, a bad query string, 405, an out-of-range timeout_ms,
/// and a body that never completes (408 after the body deadline).
#[tokio::test]
async fn api_errors_are_json_and_bodies_have_a_deadline() {
    let r = TestRouter::start();
    let d = Uuid::new_v4();
    let json_err = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body: Value = resp.json().await.expect("a JSON body");
        assert!(ct.starts_with("application/json"), "{status} {ct}");
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{body}"
        );
        (status, body)
    };
    let big = vec![b'x'; router::api::MAX_BODY + 10];
    let resp = r
        .http
        .post(format!("{}/v1/devices/{d}/requests", r.api))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(json_err(resp).await.0, 413);
    let resp = r
        .http
        .get(format!("{}/v1/devices?limit=lots", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(json_err(resp).await.0, 400);
    let resp = r
        .http
        .delete(format!("{}/v1/devices/{d}/requests", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(json_err(resp).await.0, 405);
    let resp = r
        .http
        .post(format!("{}/v1/devices/{d}/requests", r.api))
        .json(&json!({"command":"x","timeout_ms":400_000}))
        .send()
        .await
        .unwrap();
    let (status, body) = json_err(resp).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad-timeout")));

    // A body announced and never sent.
    let addr = r.api.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        format!("POST /v1/devices/{d}/requests HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").as_bytes(),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let mut resp = vec![0u8; 4096];
    let n = tokio::time::timeout(
        router::api::BODY_TIMEOUT + Duration::from_secs(5),
        s.read(&mut resp),
    )
    .await
    .expect("answered at the body deadline")
    .unwrap();
    let text = String::from_utf8_lossy(&resp[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body-timeout"), "{text}");
    eprintln!("unfinished body answered 408 after {:?}", t0.elapsed());
}

/// A token whose `nbf` is in the future is refused with 4401 (and counted); the same
/// device with a valid token then connects.
#[tokio::test]
async fn a_token_not_valid_yet_is_refused_4401() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let now = router::auth::unix_now();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": d.to_string(), "acc": a.to_string(), "exp": now + 600, "nbf": now + 120}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut s = raw_upgrade(&r, &token).await;
    assert_eq!(read_close_code(&mut s).await, 4401);
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"not_yet_valid\"}")
            .await,
        1.0
    );
    let _ws = r.device(d, a).await;
}
