//! Direct links between nodes: a node without them is reached through the broker, and
//! a stranger without the token is refused.

use std::time::Duration;

use crate::common::amqp::*;
use serde_json::json;
use uuid::Uuid;

use crate::nodes::wait_metric;
use crate::nodes::*;

/// A node with `--cluster-link off` is reached through the broker, both ways; a
/// connection to a link listener without the node's token is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_links_is_reached_through_the_broker_and_strangers_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vh = Vhost::new("hive-test");
    let link_port = free_port();
    let link = format!("127.0.0.1:{link_port}");
    let pa = Proc::start_with(
        &vh,
        "la",
        free_port(),
        free_port(),
        &["--cluster-link", &link],
    );
    let pc = Proc::start_with(
        &vh,
        "lc",
        free_port(),
        free_port(),
        &["--cluster-link", "off"],
    );
    let (a, c) = (pa.as_router(), pc.as_router());
    wait_ready(&a).await;
    wait_ready(&c).await;
    let (d, e, acc) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let dev_c = acking(c.device(d, acc).await, 1);
    let dev_a = acking(a.device(e, acc).await, 1);
    wait_owner(&a, d, Some("lc")).await;
    wait_owner(&c, e, Some("la")).await;
    let (s, body) = a.request(d, json!({"command":"reboot"}), "").await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = c.request(e, json!({"command":"reboot"}), "").await;
    assert_eq!(s, 200, "{body}");
    for dev in [dev_a, dev_c] {
        tokio::time::timeout(Duration::from_secs(5), dev)
            .await
            .expect("each device got its request")
            .unwrap();
    }
    assert_eq!(a.metric("router_cluster_links_up").await, 0.0);
    assert_eq!(c.metric("router_cluster_links_up").await, 0.0);
    assert!(a.metric("router_cluster_link_via_broker_total").await >= 1.0);
    assert_eq!(a.metric("router_cluster_link_sent_total").await, 0.0);

    // A stranger: right magic and version, a guessed token.
    let mut s = tokio::net::TcpStream::connect(&link).await.unwrap();
    let mut hello = b"HIVL\x01".to_vec();
    hello.extend_from_slice(&42u128.to_le_bytes());
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.push(b'x');
    s.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "a wrong token is closed without an answer");
    wait_metric(&a, "router_cluster_link_refused_total", 1.0).await;
}
