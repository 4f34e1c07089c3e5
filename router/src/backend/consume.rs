//! Backend delivery, the AMQP side: its own connection, the declarations (exchange,
//! durable queue, bindings, prefetch), the consumer, and the backlog probe.

use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::amqp::{declare_events_exchange, EXCHANGE};

/// Messages ready in the queue (a passive declare creates nothing).
pub(super) async fn probe(ch: Channel, queue: ShortString) -> lapin::Result<u32> {
    let q = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

pub(super) struct Session {
    pub(super) conn: Connection,
    pub(super) ch: Channel,
    pub(super) stats: Channel,
    pub(super) consumer: Consumer,
}

/// Connect, declare exchange, queue and bindings, set the prefetch and consume.
pub(super) async fn connect(
    url: String,
    name: String,
    queue: String,
    bindings: Vec<String>,
    prefetch: u16,
    queue_type: crate::config::QueueType,
    tls: Option<lapin::tcp::OwnedTLSConfig>,
) -> lapin::Result<Session> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = crate::amqp::connect(&url, props, tls.as_ref()).await?;
    let declared = async {
        let ch = conn.create_channel().await?;
        declare_events_exchange(&ch).await?;
        let queue: ShortString = queue.as_str().into();
        let mut args = FieldTable::default();
        if queue_type == crate::config::QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString("quorum".into()),
            );
        }
        ch.queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
        for key in &bindings {
            ch.queue_bind(
                queue.clone(),
                EXCHANGE.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let stats = conn.create_channel().await?;
        Ok::<_, lapin::Error>((ch, stats, consumer))
    }
    .await;
    match declared {
        Ok((ch, stats, consumer)) => Ok(Session {
            conn,
            ch,
            stats,
            consumer,
        }),
        Err(e) => {
            crate::amqp::close(&conn).await;
            Err(e)
        }
    }
}
