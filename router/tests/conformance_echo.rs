//! `--websocket-conformance-echo`: `/conformance/echo` echoes every message through the
//! devices' connection code, requires a token, and is not there without the flag. The
//! full conformance run is scripts/autobahn.sh (the Autobahn TestSuite).

mod common;

use std::time::Duration;

use common::raw::{masked_frame, raw_upgrade_at, read_close_code};
use common::{ids, TestRouter};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::{self, Message};

async fn next(ws: &mut common::Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message within 5 s")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test]
async fn conformance_echo_is_not_there_without_its_flag() {
    let r = TestRouter::start();
    let (d, a) = ids();
    let url = format!("{}/conformance/echo?token={}", r.ws, r.token(d, a));
    match tokio_tungstenite::connect_async(url).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn conformance_echo_sends_every_message_back_and_nothing_else() {
    let r = TestRouter::start_with(|c| c.websocket_conformance_echo = true);
    let (d, a) = ids();
    // A token is required, as on /ws.
    let mut s = raw_upgrade_at(&r, "/conformance/echo", "").await;
    assert_eq!(read_close_code(&mut s).await, 4401);

    let url = format!("{}/conformance/echo?token={}", r.ws, r.token(d, a));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // No greeting: the first message is the echo of ours.
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("héllo"));
    ws.send(Message::binary(vec![0u8, 255, 1])).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 255, 1]));
    // A Hive event is echoed, not published; a pong reports no device alive.
    let event = r#"{"type":"event","event":"status","data":{}}"#;
    ws.send(Message::text(event)).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text(event));
    ws.send(Message::Pong(b"x".to_vec().into())).await.unwrap();
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::Pong(b"p".to_vec().into()));
    assert_eq!(r.metric("router_events_published_total").await, 0.0);
    assert_eq!(r.metric("router_device_alive_events_total").await, 0.0);
    // Not a device: not routed, so the API does not know it.
    let info = r
        .http
        .get(format!("{}/v1/devices/{d}", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 404);
    ws.close(None).await.unwrap();

    // A fragmented text message fails with 1007 at its first fragment that no
    // continuation can make UTF-8, before the message is complete.
    let mut s = raw_upgrade_at(
        &r,
        &format!("/conformance/echo?token={}", r.token(d, a)),
        "",
    )
    .await;
    let mut first = masked_frame(0x1, "κόσμε".as_bytes());
    first[0] &= 0x7f; // not FIN
    let mut second = masked_frame(0x0, b"\xf4\x90\x80\x80");
    second[0] &= 0x7f;
    s.write_all(&[first, second].concat()).await.unwrap();
    assert_eq!(read_close_code(&mut s).await, 1007);
}
