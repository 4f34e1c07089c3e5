//! Per-account limits on one node: most devices connected at once (close 4429), messages
//! per second of all the account's devices (`rate-limited`), and what the accounts API
//! says.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

async fn connect(r: &TestRouter, d: Uuid, a: Uuid) -> Result<Ws, u16> {
    r.try_token(&r.token(d, a)).await
}

async fn account(r: &TestRouter, a: Uuid) -> Value {
    r.get_json(&format!("/v1/accounts/{a}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_at_its_device_limit_is_refused_4429_and_others_are_not() {
    let r = TestRouter::start_with(|c| c.account_max_devices = 3);
    let (full, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            connect(&r, Uuid::new_v4(), full)
                .await
                .expect("under the limit"),
        );
    }
    assert_eq!(connect(&r, Uuid::new_v4(), full).await.err(), Some(4429));
    assert!(connect(&r, Uuid::new_v4(), other).await.is_ok());
    let v = account(&r, full).await;
    assert_eq!(
        (v["connected"].as_u64(), v["limits"]["max_devices"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
    assert_eq!(
        r.metric("router_account_limit_refusals_total{limit=\"devices\"}")
            .await,
        1.0
    );
    // One leaves: room for one more.
    let mut gone = held.pop().unwrap();
    gone.close(None).await.unwrap();
    let t0 = std::time::Instant::now();
    while account(&r, full).await["connected"] != 2 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _again = connect(&r, Uuid::new_v4(), full).await.expect("room again");
    let top = r.get_json("/v1/accounts?top=1").await;
    assert_eq!(top["accounts"][0]["account"], full.to_string(), "{top}");
    assert_eq!(top["accounts"][0]["connected"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_over_its_message_rate_is_told_so() {
    let r = TestRouter::start_with(|c| {
        c.account_max_rate = 10;
        c.device_rate = 1000;
        c.device_burst = 1000;
    });
    let a = Uuid::new_v4();
    let mut ws = connect(&r, Uuid::new_v4(), a).await.unwrap();
    for i in 0..40 {
        ws.send(Message::text(json!({"type":"instances","i":i}).to_string()))
            .await
            .unwrap();
    }
    let limited = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["code"] == "rate-limited" {
                    return true;
                }
            }
        }
    })
    .await
    .unwrap();
    assert!(limited);
    // Every message past the account's share was refused (counted as the shard reads
    // them: the reply above came at the first).
    let t0 = std::time::Instant::now();
    while r
        .metric("router_account_limit_refusals_total{limit=\"rate\"}")
        .await
        < 20.0
    {
        assert!(t0.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The accounts API says what the account offered in the last whole second.
    let t0 = std::time::Instant::now();
    while account(&r, a).await["messages_per_s_here"]
        .as_u64()
        .unwrap_or(0)
        < 40
    {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{}",
            account(&r, a).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another account is not held back by it.
    let mut other = connect(&r, Uuid::new_v4(), Uuid::new_v4()).await.unwrap();
    for i in 0..4 {
        other
            .send(Message::text(json!({"type":"instances","i":i}).to_string()))
            .await
            .unwrap();
    }
    let answered = tokio::time::timeout(Duration::from_millis(500), other.next()).await;
    assert!(
        answered.is_err(),
        "the other account was answered: {answered:?}"
    );
}
