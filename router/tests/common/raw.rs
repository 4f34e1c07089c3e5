//! Raw-socket helpers for what a well-behaved client library will not send: upgrades
//! written by hand, masked frames built byte by byte, close codes read off the wire.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::TestRouter;

pub async fn raw_upgrade_no_token(r: &TestRouter) -> tokio::net::TcpStream {
    raw_upgrade_with(r, "").await
}

pub async fn raw_upgrade(r: &TestRouter, token: &str) -> tokio::net::TcpStream {
    raw_upgrade_with(r, &format!("Authorization: Bearer {token}\r\n")).await
}

pub async fn raw_upgrade_with(r: &TestRouter, extra: &str) -> tokio::net::TcpStream {
    raw_upgrade_at(r, "/ws", extra).await
}

/// An upgrade of `path` (`/ws`, `/v1/ws`...) with `extra` header lines.
pub async fn raw_upgrade_at(r: &TestRouter, path: &str, extra: &str) -> tokio::net::TcpStream {
    let addr = r.ws.trim_start_matches("ws://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        buf.push(b[0]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 101"));
    s
}

pub fn masked_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9u8, 8, 7, 6];
    let mut f = vec![0x80 | op];
    assert!(payload.len() < 65536);
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Read raw frames until a close frame; return its code.
pub async fn read_close_code(s: &mut tokio::net::TcpStream) -> u16 {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF before close frame");
            buf.extend_from_slice(&chunk[..n]);
            // Server frames are unmasked; walk them.
            let mut pos = 0;
            while buf.len() >= pos + 2 {
                let op = buf[pos] & 0x0f;
                let len = (buf[pos + 1] & 0x7f) as usize;
                let (hl, len) = match len {
                    126 if buf.len() >= pos + 4 => {
                        (4, u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize)
                    }
                    126 | 127 => break,
                    n => (2, n),
                };
                if buf.len() < pos + hl + len {
                    break;
                }
                if op == 0x8 {
                    return u16::from_be_bytes([buf[pos + hl], buf[pos + hl + 1]]);
                }
                pos += hl + len;
            }
        }
    })
    .await
    .expect("close within 5 s")
}
