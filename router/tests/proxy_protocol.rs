//! `--proxy-protocol`: the device's address is the one a load balancer's PROXY header
//! names (v1 and v2 written by hand here, and HAProxy itself in front of the router);
//! a connection without a valid header is closed and counted; the per-IP connect rate
//! counts the header's address.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::amqp::get;
use common::*;
use router::listener::proxy::Mode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

fn v1(src: &str, sport: u16) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 {sport} 8080\r\n").into_bytes()
}

fn v2(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h
}

/// Open a connection, send `header` then an upgrade with the device's token; returns
/// the HTTP status line (or "" if the router closed without answering).
async fn connect_with(
    r: &TestRouter,
    header: &[u8],
    device: Uuid,
    account: Uuid,
) -> (String, tokio::net::TcpStream) {
    let addr = r.ws.trim_start_matches("ws://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut req = header.to_vec();
    req.extend_from_slice(format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n", r.token(device, account)).as_bytes());
    s.write_all(&req).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer or a close")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    (text.lines().next().unwrap_or("").to_string(), s)
}

async fn address_of(r: &TestRouter, device: Uuid) -> String {
    let (status, v) = get(r, &format!("/v1/devices/{device}")).await;
    assert_eq!(status, 200, "{v}");
    v["address"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_header_names_the_device_address() {
    let r = TestRouter::start_with(|c| c.proxy_protocol = Mode::Any);
    let (d1, a) = ids();
    let (status, _s1) = connect_with(&r, &v1("192.0.2.7", 51000), d1, a).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    assert_eq!(address_of(&r, d1).await, "192.0.2.7:51000");
    let d2 = Uuid::new_v4();
    let (status, _s2) = connect_with(&r, &v2([198, 51, 100, 9], 4242), d2, a).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    assert_eq!(address_of(&r, d2).await, "198.51.100.9:4242");
    // No header where one is required: closed without an answer, counted.
    let (status, _) = connect_with(&r, b"", Uuid::new_v4(), a).await;
    assert_eq!(status, "");
    let (status, _) = connect_with(&r, b"PROXY TCP4 nonsense\r\n", Uuid::new_v4(), a).await;
    assert_eq!(status, "");
    assert_eq!(r.metric("router_proxy_protocol_refused_total").await, 2.0);
}

#[tokio::test]
async fn v2_only_refuses_v1_and_the_connect_rate_counts_the_header_address() {
    let r = TestRouter::start_with(|c| {
        c.proxy_protocol = Mode::V2;
        c.ip_connect_rate = 1;
        c.shards = 1;
    });
    let a = Uuid::new_v4();
    let (status, _) = connect_with(&r, &v1("192.0.2.7", 1), Uuid::new_v4(), a).await;
    assert_eq!(status, "");
    assert_eq!(r.metric("router_proxy_protocol_refused_total").await, 1.0);
    // Every connection comes from 127.0.0.1 (the "balancer"); the rate is per client.
    let (s1, _k1) = connect_with(&r, &v2([203, 0, 113, 1], 1), Uuid::new_v4(), a).await;
    let (s2, _k2) = connect_with(&r, &v2([203, 0, 113, 1], 2), Uuid::new_v4(), a).await;
    let (s3, _k3) = connect_with(&r, &v2([203, 0, 113, 2], 3), Uuid::new_v4(), a).await;
    assert!(s1.starts_with("HTTP/1.1 101"), "{s1}");
    // The same client again within the second (unless the second turned over).
    assert!(
        s2.starts_with("HTTP/1.1 429") || s2.starts_with("HTTP/1.1 101"),
        "{s2}"
    );
    assert!(s3.starts_with("HTTP/1.1 101"), "{s3}");
    let mut refused = 0;
    for port in 10..20 {
        let (s, _k) = connect_with(&r, &v2([203, 0, 113, 1], port), Uuid::new_v4(), a).await;
        refused += usize::from(s.starts_with("HTTP/1.1 429"));
    }
    assert!(refused >= 8, "{refused} of 10 refused");
    assert!(
        r.metric("router_connections_refused_total{reason=\"ip_rate\"}")
            .await
            >= 8.0
    );
}

fn haproxy() -> Option<&'static str> {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .map(|_| "haproxy")
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy in TCP mode in front of the router, `send-proxy-v2` and `send-proxy`: a
/// device connecting from 127.0.0.7 is seen as 127.0.0.7, not as HAProxy's 127.0.0.1.
/// scripts/test.sh installs HAProxy and sets HIVE_REQUIRE_HAPROXY=1, so CI cannot skip it.
#[tokio::test]
async fn behind_haproxy_the_device_keeps_its_address() {
    let Some(bin) = haproxy() else {
        assert!(
            std::env::var_os("HIVE_REQUIRE_HAPROXY").is_none(),
            "HIVE_REQUIRE_HAPROXY is set but haproxy is not installed"
        );
        eprintln!("haproxy not installed: skipping (scripts/test.sh installs it)");
        return;
    };
    let r = TestRouter::start_with(|c| c.proxy_protocol = Mode::Any);
    let backend = r.ws.trim_start_matches("ws://").to_string();
    for send in ["send-proxy-v2", "send-proxy"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("hive-haproxy-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend devices\n  bind 127.0.0.1:{port}\n  default_backend routers\n\
                 backend routers\n  server r1 {backend} {send}\n"
            ),
        )
        .unwrap();
        let _hp = Kill(
            Command::new(bin)
                .args(["-db", "-f"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("haproxy starts"),
        );
        // Connect from 127.0.0.7 through HAProxy once it listens.
        let t0 = Instant::now();
        let sock = loop {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.7:0".parse().unwrap()).unwrap();
            match s
                .connect(format!("127.0.0.1:{port}").parse().unwrap())
                .await
            {
                Ok(c) => break c,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("haproxy never listened: {e}"),
            }
        };
        let (d, a) = ids();
        let mut s = sock;
        s.write_all(format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n", r.token(d, a)).as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer through haproxy")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"),
            "{send}: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        let addr = address_of(&r, d).await;
        assert!(addr.starts_with("127.0.0.7:"), "{send}: seen as {addr}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert_eq!(r.metric("router_proxy_protocol_refused_total").await, 0.0);
}
