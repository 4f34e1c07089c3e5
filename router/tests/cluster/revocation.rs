//! Revocation across the cluster: a disconnect asked of one node closes the device on
//! another (4403) within a second; a block holds on every node, also on a node started
//! after it (the stream is replayed); an entry not sealed by a node is dropped.

use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::json;
use uuid::Uuid;

use crate::common::amqp::*;
use crate::common::*;
use crate::nodes::wait_metric;
use crate::nodes::*;

/// Does the node authenticate this device now? (false: refused with 4401.)
async fn admitted(r: &TestRouter, d: Uuid, a: Uuid) -> bool {
    match r.try_token(&r.token(d, a)).await {
        Ok(_) => true,
        Err(code) => {
            assert_eq!(code, 4401);
            false
        }
    }
}

async fn refused_within(r: &TestRouter, d: Uuid, a: Uuid, within: Duration) {
    let t0 = Instant::now();
    while admitted(r, d, a).await {
        assert!(t0.elapsed() < within, "still admitted after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_reaches_every_node_and_outlives_a_node_restart() {
    let vh = Vhost::new("hive-revoke");
    let a = process_node(&vh, "rev-a");
    let b = process_node(&vh, "rev-b");
    wait_ready(&a).await;
    wait_ready(&b).await;
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let mut on_b = b.device(d, acc).await;
    wait_owner(&a, d, Some("rev-b")).await;

    // Asked of node A, the device on B goes at once.
    let t0 = Instant::now();
    let r = a
        .http
        .post(format!("{}/v1/devices/{d}/disconnect", a.api))
        .json(&json!({"block_for_s": 120}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(close_code(&mut on_b).await, 4403);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Refused on both nodes while blocked.
    assert!(!admitted(&a, d, acc).await);
    assert!(!admitted(&b, d, acc).await);

    // A node started afterwards replays the stream and refuses it too.
    drop(b);
    let c = process_node(&vh, "rev-c");
    wait_ready(&c).await;
    refused_within(&c, d, acc, Duration::from_secs(3)).await;
    let list = c.get_json("/v1/denylist").await;
    assert_eq!(list["count"], 1, "{list}");

    // An entry published by a broker user, not sealed by a node: dropped and counted.
    let (d2, acc2) = (Uuid::new_v4(), Uuid::new_v4());
    let conn = connect(&vh.url()).await;
    let ch = conn.create_channel().await.unwrap();
    let now = router::auth::unix_now();
    let forged = json!({"kind":"device","id":d2.to_string(),"until":now + 600,"at":now});
    ch.basic_publish(
        "".into(),
        "hive.denylist".into(),
        BasicPublishOptions::default(),
        forged.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_metric(&a, "router_denylist_forged_total", 1.0).await;
    wait_metric(&c, "router_denylist_forged_total", 1.0).await;
    assert!(admitted(&a, d2, acc2).await);

    // Withdrawn through node C: admitted everywhere again.
    let r = c
        .http
        .delete(format!("{}/v1/denylist/device/{d}", c.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let t0 = Instant::now();
    while !admitted(&a, d, acc).await {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "never admitted again on A"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}
