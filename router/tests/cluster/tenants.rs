//! A per-account device limit holds across a 3-node cluster: each node adds its peers'
//! counts (from their heartbeats) to its own.

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::common::amqp::*;
use crate::common::*;
use crate::nodes::*;

async fn connect(r: &TestRouter, a: Uuid) -> Result<Ws, u16> {
    r.try_token(&r.token(Uuid::new_v4(), a)).await
}

async fn connected(r: &TestRouter, a: Uuid) -> u64 {
    r.get_json(&format!("/v1/accounts/{a}")).await["connected"]
        .as_u64()
        .unwrap()
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
