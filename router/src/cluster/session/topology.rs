//! The cluster's broker topology: its exchanges and queues, the cluster connection's
//! URL, declaring it all on each (re)connect, consuming this node's queues, and the
//! liveness probe that asks the broker whether a silent node's queue still exists.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer, ExchangeKind};

use super::super::membership::NodeId;

pub(crate) const NODES_EXCHANGE: &str = "hive.nodes";
pub(crate) const PRESENCE_EXCHANGE: &str = "hive.presence";
/// A probe that has not answered by then decides nothing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// AMQP heartbeat of the cluster connection (seconds) unless the URL sets one: the
/// broker drops a connection that misses two, so a node that vanished without closing
/// its socket loses its queue (and membership) within about twice this.
const AMQP_HEARTBEAT: u16 = 5;
/// Frame size of the cluster connection unless the URL sets one: envelopes are small,
/// and lapin keeps 64 frames of buffer per connection (2 MiB at this size).
const FRAME_MAX: u32 = 16_384;

pub(crate) fn node_queue(node: &str) -> String {
    format!("hive.node.{node}")
}

/// The cluster connection's URL: the configured one with this connection's heartbeat
/// and frame size unless it names them itself.
pub(crate) fn cluster_url(url: &str) -> String {
    let mut u = url.to_string();
    for (key, value) in [
        ("heartbeat", AMQP_HEARTBEAT.to_string()),
        ("frame_max", FRAME_MAX.to_string()),
    ] {
        if !u.contains(&format!("{key}=")) {
            u.push(if u.contains('?') { '&' } else { '?' });
            u.push_str(&format!("{key}={value}"));
        }
    }
    u
}

/// Declare the cluster topology; returns the name of this node's presence queue.
pub(super) async fn declare(ch: &Channel, node: &str) -> lapin::Result<String> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        NODES_EXCHANGE.into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        PRESENCE_EXCHANGE.into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    let excl = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let q = node_queue(node);
    ch.queue_declare(q.as_str().into(), excl, FieldTable::default())
        .await?;
    ch.queue_bind(
        q.as_str().into(),
        NODES_EXCHANGE.into(),
        node.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let pq = ch
        .queue_declare("".into(), excl, FieldTable::default())
        .await?;
    let pq = pq.name().as_str().to_string();
    ch.queue_bind(
        pq.as_str().into(),
        PRESENCE_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(pq)
}

/// Ask the broker whether `node`'s queue exists: Some(true) it does (held by the node's
/// live connection), Some(false) it is gone, None undecided.
async fn probe(conn: &Connection, node: String) -> Option<bool> {
    let ch = conn.create_channel().await.ok()?;
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let r = ch
        .queue_declare(
            node_queue(&node).as_str().into(),
            opts,
            FieldTable::default(),
        )
        .await;
    let verdict = match r {
        // Not exclusive to someone else, yet there: a node's queue is always exclusive,
        // so some other client declared it. Not ours to judge dead.
        Ok(_) => Some(true),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(a) => match a.get_id() {
                405 => Some(true),  // RESOURCE_LOCKED: exclusive to a live connection
                404 => Some(false), // NOT_FOUND: its connection is gone
                _ => None,
            },
            _ => None,
        },
    };
    // A failed declare closed the channel already; otherwise close it.
    if ch.status().connected() {
        let _ = ch.close(200, "probe done".into()).await;
    }
    verdict
}

/// This node's two consumers (no acks, exclusive): its own queue and its presence queue.
pub(super) async fn consume(
    ch: &Channel,
    me: &str,
    presence_queue: &str,
) -> lapin::Result<(Consumer, Consumer)> {
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let node_in = ch
        .basic_consume(
            node_queue(me).as_str().into(),
            "node".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let presence_in = ch
        .basic_consume(
            presence_queue.into(),
            "presence".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    Ok((node_in, presence_in))
}

pub(super) async fn timed_probe(
    conn: &Connection,
    id: NodeId,
    name: String,
) -> (NodeId, Option<bool>) {
    let v = tokio::time::timeout(PROBE_TIMEOUT, probe(conn, name))
        .await
        .ok()
        .flatten();
    (id, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_url_gets_its_heartbeat_and_frame_size_unless_set() {
        assert_eq!(
            cluster_url("amqp://h/%2f"),
            "amqp://h/%2f?heartbeat=5&frame_max=16384"
        );
        assert_eq!(
            cluster_url("amqp://h/%2f?heartbeat=30"),
            "amqp://h/%2f?heartbeat=30&frame_max=16384"
        );
        assert_eq!(
            cluster_url("amqp://h/?frame_max=8192&heartbeat=2"),
            "amqp://h/?frame_max=8192&heartbeat=2"
        );
    }
}
