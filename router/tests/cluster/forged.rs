//! Broker credentials are not enough to command a device: an envelope published on
//! `hive.nodes` by anyone but a node of the cluster (unsealed, sealed under another key,
//! a captured one edited) is dropped and counted, and never reaches a device.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use router::cluster::envelope::{encode_node, NodeMsg, What};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::common::amqp::*;
use crate::common::*;
use crate::nodes::wait_metric;
use crate::nodes::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_not_sealed_by_a_node_reaches_no_device() {
    let vh = Vhost::new("hive-forged");
    let url = vh.url();
    let r = TestRouter::start_with(|c| {
        c.amqp = Some(url.clone());
        c.node_id = Some("node-x".into());
    });
    wait_ready(&r).await;
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    wait_metric(&r, "router_cluster_directory_entries", 1.0).await;

    // What a backend consumer holding the broker's credentials can publish: envelopes
    // for the node's queue, as a captured one would look, with its routing key.
    let conn = connect(&url).await;
    let ch = conn.create_channel().await.unwrap();
    let request = |what: What| NodeMsg::Request {
        request: Uuid::new_v4().as_u128(),
        device: d.as_u128(),
        origin: "node-x".into(),
        hops: 1,
        deadline_unix_ms: router::unix_ms() + 30_000,
        what,
    };
    let unsealed = encode_node(&request(What::Command {
        command: "wipe".into(),
        payload: b"{}".to_vec(),
        wait_response: false,
    }));
    // Sealed-looking: the right length, the wrong key.
    let mut wrong_key = encode_node(&request(What::Event {
        body: br#"{"type":"forged"}"#.to_vec(),
    }));
    wrong_key.extend_from_slice(&[7u8; 40]);
    for bytes in [&unsealed, &wrong_key] {
        ch.basic_publish(
            "hive.nodes".into(),
            "node-x".into(),
            BasicPublishOptions::default(),
            bytes,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    wait_metric(&r, "router_cluster_envelopes_forged_total", 2.0).await;
    // Nothing reached the device.
    let got = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(_)) => continue,
                other => return format!("{other:?}"),
            }
        }
    })
    .await;
    assert!(got.is_err(), "the device received {got:?}");
    // The node still serves its own API's requests (its own envelopes are sealed).
    let dev = acking(ws, 1);
    let (s, body) = r.request(d, json!({"command":"ping"}), "").await;
    assert_eq!(s, 200, "{body}");
    let seen = tokio::time::timeout(Duration::from_secs(5), dev)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen[0]["command"], "ping");
}
