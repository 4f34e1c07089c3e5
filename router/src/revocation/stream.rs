//! The deny-list on the broker: the stream `hive.denylist`, read from its first entry
//! by every node's cluster session and followed from then on; entries added through this
//! node's API are published there and confirmed by the broker before the API answers.
//! Entries are sealed with the cluster key ([`crate::cluster::seal`]): one that does not
//! verify is dropped and counted (`router_denylist_forged_total`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};

use super::Entry;
use crate::cluster::seal::Domain;
use crate::Shared;

/// The stream every node reads.
pub const STREAM: &str = "hive.denylist";
/// Its retention: longer than any entry may last ([`super::MAX_BLOCK_SECS`]).
const MAX_AGE: &str = "31D";

/// Declare the stream (idempotent: every node declares it the same way).
pub(crate) async fn declare(ch: &Channel) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(LongString::from(MAX_AGE)),
    );
    ch.queue_declare(
        STREAM.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map(|_| ())
}

/// For one cluster session: replay the stream, follow it, and publish what the API adds.
/// Returns when the connection fails (the session's end aborts it sooner).
pub(crate) async fn run(shared: Arc<Shared>, read: Channel, write: Channel) -> lapin::Result<()> {
    let c = shared
        .cluster
        .as_ref()
        .expect("the deny-list stream runs in cluster mode");
    declare(&read).await?;
    // A stream is consumed with acks and a prefetch; from its first entry, every time.
    read.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut entries = read
        .basic_consume(
            STREAM.into(),
            format!("{}-denylist", shared.node_id).as_str().into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    write
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // Held for the session: a session that ends (aborted) gives it back to the next.
    let mut rx_guard = shared.revocation.publish_rx.lock().await;
    let Some(rx) = rx_guard.as_mut() else {
        return Ok(());
    };
    loop {
        tokio::select! {
            d = entries.next() => {
                let Some(d) = d else { return Ok(()) };
                let d = d?;
                match c.key.open(Domain::Revocation, "", &d.data) {
                    Ok((body, _)) => match serde_json::from_slice::<Entry>(body) {
                        Ok(e) => super::arrived(&shared, &e),
                        Err(e) => tracing::warn!(error = %e, "deny-list entry that does not parse: skipped"),
                    },
                    Err(_) => {
                        shared.revocation.metrics.forged.fetch_add(1, Relaxed);
                    }
                }
                d.ack(BasicAckOptions::default()).await?;
            }
            Some((e, done)) = rx.recv() => {
                let r = publish(&write, c, &e).await;
                let _ = done.send(r);
            }
        }
    }
}

async fn publish(ch: &Channel, c: &crate::cluster::Cluster, e: &Entry) -> Result<(), String> {
    let body = serde_json::to_vec(e).map_err(|e| e.to_string())?;
    let sealed = c.key.seal(Domain::Revocation, "", body);
    let confirm = ch
        .basic_publish(
            "".into(),
            STREAM.into(),
            BasicPublishOptions::default(),
            &sealed,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(|e| format!("publishing to {STREAM}: {e}"))?
        .await
        .map_err(|e| format!("publishing to {STREAM}: {e}"))?;
    if confirm.is_nack() {
        return Err(format!("the broker refused the entry (nack on {STREAM})"));
    }
    Ok(())
}
