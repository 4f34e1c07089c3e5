//! A per-account device limit holds across a 3-node cluster: each node adds its peers'
//! counts (from their heartbeats) to its own.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::common::amqp::*;
use crate::common::*;
use crate::nodes::*;

async fn connect(r: &TestRouter, a: Uuid) -> Result<Ws, u16> {
    let mut req = format!("{}/ws", r.ws).into_client_request().unwrap();
    let token = r.token(Uuid::new_v4(), a);
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(_)))) => Ok(ws),
        Ok(Some(Ok(Message::Close(Some(f))))) => Err(f.code.into()),
        other => panic!("{other:?}"),
    }
}

async fn connected(r: &TestRouter, a: Uuid) -> u64 {
    let v: Value = r
        .http
        .get(format!("{}/v1/accounts/{a}", r.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["connected"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_limit_holds_across_three_nodes() {
    let vh = Vhost::new("hive-tenants");
    let limit = ["--account-max-devices", "4"];
    let procs: Vec<Proc> = ["ten-a", "ten-b", "ten-c"]
        .iter()
        .map(|id| Proc::start_with(&vh, id, free_port(), free_port(), &limit))
        .collect();
    let nodes: Vec<TestRouter> = procs.iter().map(|p| p.as_router()).collect();
    for n in &nodes {
        wait_ready(n).await;
    }
    let acc = Uuid::new_v4();
    let mut held = Vec::new();
    for n in &nodes[..2] {
        for _ in 0..2 {
            held.push(connect(n, acc).await.expect("under the limit"));
        }
    }
    // Within a heartbeat, node C counts the four devices on A and B.
    let t0 = Instant::now();
    while connected(&nodes[2], acc).await != 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "C never counted A's and B's devices"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connect(&nodes[2], acc).await.err(), Some(4429));
    assert_eq!(connect(&nodes[0], acc).await.err(), Some(4429));
    // Another account is not affected.
    let _other = connect(&nodes[2], Uuid::new_v4())
        .await
        .expect("another account");
    assert_eq!(
        nodes[2]
            .metric("router_account_limit_refusals_total{limit=\"devices\"}")
            .await,
        1.0
    );
    drop(held);
    drop(procs);
}
