//! Requests and events across nodes: through the device's node, a device moving with
//! a request in flight, duplicate deliveries, the same device on two nodes.

use std::time::{Duration, Instant};

use crate::common::amqp::*;
use crate::common::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::nodes::wait_metric;
use crate::nodes::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_node_a_reaches_a_device_on_node_b() {
    let vh = Vhost::new("hive-test");
    let a = process_node(&vh, "node-a");
    let b = process_node(&vh, "node-b");
    wait_ready(&a).await;
    wait_ready(&b).await;
    // Each has heard the other's heartbeat and opened its direct link.
    wait_metric(&a, "router_cluster_links_up", 1.0).await;
    wait_metric(&b, "router_cluster_links_up", 1.0).await;
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let ws = b.device(d, acc).await;
    wait_owner(&a, d, Some("node-b")).await;
    let dev = acking(ws, 3);

    let (s, body) = a
        .request(d, json!({"command":"reboot","payload":{"delay":1}}), "")
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "acked");
    let (s, body) = a
        .request(d, json!({"command":"Respond"}), "?wait=response")
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["result"], json!({"on":"remote"}));
    // An event through node A is forwarded to B and reaches the device.
    let r = a
        .http
        .post(format!("{}/v1/devices/{d}/events", a.api))
        .json(&json!({"type":"config-changed","n":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "sent");
    assert_eq!(v["node"], "node-b");

    let seen = tokio::time::timeout(Duration::from_secs(10), dev)
        .await
        .expect("device got both requests and the event")
        .unwrap();
    assert_eq!(seen[0]["command"], "reboot");
    assert_eq!(seen[0]["device"], d.to_string());
    assert_eq!(seen[0]["payload"], json!({"delay":1}));
    assert_eq!(seen[1]["command"], "Respond");

    // Counted on both sides (two requests and the event).
    assert_eq!(
        a.metric("router_cluster_requests_forwarded_total").await,
        3.0
    );
    assert_eq!(b.metric("router_cluster_requests_served_total").await, 3.0);
    assert_eq!(a.metric("router_requests_acked_total").await, 1.0);
    assert_eq!(a.metric("router_cluster_nodes").await, 2.0);
    // Requests went to B, and replies came back, over the direct links, none through
    // the broker.
    assert!(a.metric("router_cluster_link_sent_total").await >= 3.0);
    assert!(b.metric("router_cluster_link_sent_total").await >= 3.0);
    assert!(b.metric("router_cluster_link_received_total").await >= 3.0);
    assert_eq!(a.metric("router_cluster_link_via_broker_total").await, 0.0);
    assert_eq!(b.metric("router_cluster_link_via_broker_total").await, 0.0);

    // A device nobody holds: 404 from any node, at once.
    let t0 = Instant::now();
    let (s, body) = a
        .request(Uuid::new_v4(), json!({"command":"reboot"}), "")
        .await;
    assert_eq!(s, 404, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_and_a_device_that_moves_with_a_request_in_flight() {
    let vh = Vhost::new("hive-test");
    let a = process_node(&vh, "n1");
    let b = process_node(&vh, "n2");
    let c = process_node(&vh, "n3");
    for r in [&a, &b, &c] {
        wait_ready(r).await;
    }
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    // Requests through A and through B to a device on C.
    let ws = c.device(d, acc).await;
    wait_owner(&a, d, Some("n3")).await;
    wait_owner(&b, d, Some("n3")).await;
    let dev = acking(ws, 2);
    let (s1, _) = a.request(d, json!({"command":"one"}), "").await;
    let (s2, _) = b.request(d, json!({"command":"two"}), "").await;
    assert_eq!((s1, s2), (200, 200));
    let seen = dev.await.unwrap();
    assert_eq!(seen.len(), 2);

    // A second device on C gets a request through A but does not ack it; it then
    // moves to B. The request follows it there, within its deadline.
    let (d2, acc2) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws2 = c.device(d2, acc2).await;
    wait_owner(&a, d2, Some("n3")).await;
    let pending = {
        let http = a.http.clone();
        let url = format!("{}/v1/devices/{d2}/requests", a.api);
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"command":"update","timeout_ms":15000}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let first = next_json(&mut ws2).await;
    assert_eq!(first["command"], "update");
    drop(ws2); // gone without acking
    let ws2b = b.device(d2, acc2).await;
    let again = acking(ws2b, 1);
    let (s, body) = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("request finished")
        .unwrap();
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "acked");
    let seen = again.await.unwrap();
    assert_eq!(
        seen[0]["request"], first["request"],
        "the same request UUID"
    );
    assert!(a.metric("router_cluster_requests_retried_total").await >= 1.0);
}

/// Envelopes straight onto a node's queue, as a peer would send them: a request
/// delivered twice reaches the device once; a duplicate of a finished request is
/// answered again with the same outcome, without bothering the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_of_a_request_reach_the_device_once() {
    use futures_util::StreamExt;
    use lapin::options::BasicPublishOptions;
    use router::cluster::envelope::{decode_node, encode_node, NodeMsg, RequestOutcome, What};
    use router::cluster::seal::{ClusterKey, Domain};
    // We hold the cluster's key (derived from the token secret, as the nodes do).
    let key = ClusterKey::derived(SECRET.as_bytes()).for_cluster("hive");

    let vh = Vhost::new("hive-test");
    let b = node(&vh, "holder");
    wait_ready(&b).await;
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = b.device(d, acc).await;

    // We play node "peer": our own queue on hive.nodes receives the replies.
    let conn = connect(&vh.url()).await;
    let ch = conn.create_channel().await.unwrap();
    let mut replies = consume_bound(&ch, "hive.nodes", "peer").await;
    let request = Uuid::new_v4();
    let env = key.seal(
        Domain::Node,
        "holder",
        encode_node(&NodeMsg::Request {
            request: request.as_u128(),
            device: d.as_u128(),
            origin: "peer".into(),
            hops: 0,
            deadline_unix_ms: router::unix_ms() + 10_000,
            what: What::Command {
                command: "identify".into(),
                payload: b"{}".to_vec(),
                wait_response: false,
            },
        }),
    );
    let publish = |bytes: Vec<u8>| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "hive.nodes".into(),
                "holder".into(),
                BasicPublishOptions::default(),
                &bytes,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        }
    };
    publish(env.clone()).await;
    publish(env.clone()).await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["request"], request.to_string());
    // No second copy reaches the device.
    let again = tokio::time::timeout(Duration::from_millis(700), next_json(&mut ws)).await;
    assert!(again.is_err(), "duplicate reached the device: {again:?}");
    send_json(&mut ws, json!({"type":"ack","request":request})).await;
    async fn next_reply(replies: &mut lapin::Consumer, key: &ClusterKey) -> NodeMsg {
        let d = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        let (env, _) = key
            .open(Domain::Node, "peer", &d.data)
            .expect("sealed for us");
        decode_node(env).unwrap()
    }
    let want = NodeMsg::Reply {
        request: request.as_u128(),
        from: "holder".into(),
        outcome: RequestOutcome::Acked,
    };
    assert_eq!(next_reply(&mut replies, &key).await, want);
    // A late duplicate of the finished request: answered again, device untouched.
    publish(env).await;
    assert_eq!(next_reply(&mut replies, &key).await, want);
    let again = tokio::time::timeout(Duration::from_millis(500), next_json(&mut ws)).await;
    assert!(again.is_err());
    assert_eq!(
        b.metric("router_cluster_duplicates_dropped_total").await,
        2.0
    );
    // Garbage on the node queue is counted, not fatal: sealed (bad envelope) or not
    // (forged).
    publish(key.seal(Domain::Node, "holder", b"not an envelope".to_vec())).await;
    publish(b"not an envelope".to_vec()).await;
    let t0 = Instant::now();
    while b.metric("router_cluster_bad_envelopes_total").await != 1.0
        || b.metric("router_cluster_envelopes_forged_total").await != 1.0
    {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&b, "/readyz").await.0, 200);
    let _ = conn.close(200, "bye".into()).await;
}

/// The same device connects to node B while still connected on node A: A closes the
/// old connection with 4409 within a second, and requests through A reach the device
/// on B only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_connects_to_another_node_is_closed_4409_on_the_first() {
    let vh = Vhost::new("hive-test");
    let a = process_node(&vh, "take-a");
    let b = process_node(&vh, "take-b");
    wait_ready(&a).await;
    wait_ready(&b).await;
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let mut old = a.device(d, acc).await;
    wait_owner(&b, d, Some("take-a")).await;
    let new = b.device(d, acc).await;
    let t0 = Instant::now();
    let code = close_code(&mut old).await;
    assert_eq!(code, 4409);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(a.metric("router_cluster_evictions_total").await, 1.0);
    wait_owner(&a, d, Some("take-b")).await;
    let dev = acking(new, 1);
    let (s, body) = a.request(d, json!({"command":"where"}), "").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(dev.await.unwrap()[0]["command"], "where");
    // One entry for the device in the whole cluster.
    let entries = a.metric("router_cluster_directory_entries").await
        + b.metric("router_cluster_directory_entries").await;
    assert_eq!(entries, 1.0);
}
