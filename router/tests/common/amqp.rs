//! Helpers shared by the tests against the real RabbitMQ (127.0.0.1:5672, guest/guest,
//! or $HIVE_AMQP_URL): broker URLs, vhosts via `rabbitmqctl`, a test's own tap on
//! `hive.events`, forcing the broker to close a connection, polling metrics.

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{send_json, TestRouter, Ws};

/// The broker for tests on the default vhost.
pub fn amqp_url() -> String {
    std::env::var("HIVE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The local broker, vhost `vhost`.
pub fn vhost_url(vhost: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")
}

/// The test's own connection to the broker.
pub async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("test connects to RabbitMQ (is it running? scripts/test.sh starts it)")
}

/// `hive.events` declared as the router declares it (idempotent; a bind needs it).
pub async fn declare_events_exchange(ch: &Channel) {
    ch.exchange_declare(
        "hive.events".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// `rabbitmqctl args...`, which must succeed.
pub fn ctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (RabbitMQ is installed on this machine)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `rabbitmqctl` can be run at all (tests that need it skip otherwise).
pub fn have_rabbitmqctl() -> bool {
    Command::new("rabbitmqctl").arg("--help").output().is_ok()
}

/// A vhost of our own on the local broker (guest may do anything in it), deleted on
/// drop, also when the test fails.
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    /// `<prefix>-<uuid>`, created and opened to guest.
    pub fn new(prefix: &str) -> Vhost {
        // Built first, so a failed `set_permissions` still deletes the vhost.
        let vh = Vhost {
            name: format!("{prefix}-{}", Uuid::new_v4().simple()),
        };
        ctl(&["add_vhost", &vh.name]);
        ctl(&["set_permissions", "-p", &vh.name, "guest", ".*", ".*", ".*"]);
        vh
    }

    pub fn url(&self) -> String {
        vhost_url(&self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

/// Have the broker close the (first) connection whose client properties contain
/// `needle`; `what` names it in the failure message. Returns whether
/// `rabbitmqctl close_connection` succeeded.
pub async fn broker_close_connection(needle: String, what: &'static str) -> bool {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ])
            .output()
            .expect("rabbitmqctl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let pid = text
            .lines()
            .find(|l| l.contains(&needle))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{what} connection not listed:\n{text}"));
        Command::new("rabbitmqctl")
            .args(["close_connection", &pid, "test: forced close"])
            .status()
            .expect("rabbitmqctl runs")
            .success()
    })
    .await
    .unwrap()
}

/// A test's own view of `hive.events`: an exclusive, server-named queue bound with
/// `#` (deleted by the broker when the test's connection closes), consumed no-ack.
pub struct Tap {
    _conn: Connection,
    consumer: Consumer,
}

/// A server-named exclusive queue of the test's own, bound to `exchange` with `key` and
/// consumed without acks (it goes with the test's connection).
pub async fn consume_bound(ch: &Channel, exchange: &str, key: &str) -> Consumer {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_consume(
        q.name().clone(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
}

impl Tap {
    pub async fn new() -> Tap {
        let conn = connect(&amqp_url()).await;
        let ch = conn.create_channel().await.unwrap();
        declare_events_exchange(&ch).await;
        let consumer = consume_bound(&ch, "hive.events", "#").await;
        Tap {
            _conn: conn,
            consumer,
        }
    }

    /// The next delivery, skipping those whose `device` header is not `device`.
    async fn next_of(&mut self, want: &AMQPValue) -> Delivery {
        loop {
            let d = self
                .consumer
                .next()
                .await
                .expect("consumer open")
                .expect("delivery");
            let h = d.properties.headers().clone().unwrap_or_default();
            if h.inner().get("device") == Some(want) {
                return d;
            }
        }
    }

    /// The next delivery whose `device` header is `device`, within `within`.
    pub async fn next_for(&mut self, device: Uuid, within: Duration) -> Delivery {
        let want = device_header(device);
        tokio::time::timeout(within, self.next_of(&want))
            .await
            .expect("event within the deadline")
    }

    /// Raw bodies of the next `n` messages whose `device` header is `device`, all
    /// within `within`.
    pub async fn bodies_for(&mut self, device: Uuid, n: usize, within: Duration) -> Vec<String> {
        let want = device_header(device);
        let mut out = Vec::new();
        tokio::time::timeout(within, async {
            while out.len() < n {
                let d = self.next_of(&want).await;
                out.push(String::from_utf8(d.data).unwrap());
            }
        })
        .await
        .expect("published events within the deadline");
        out
    }
}

fn device_header(device: Uuid) -> AMQPValue {
    AMQPValue::LongString(LongString::from(device.to_string()))
}

/// Poll a metric until `ok(value)`, or fail after `within`.
pub async fn wait_metric(
    r: &TestRouter,
    name: &str,
    within: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let t0 = Instant::now();
    loop {
        let v = r.metric(name).await;
        if ok(v) {
            return v;
        }
        assert!(t0.elapsed() < within, "{name} = {v} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `path` on the router's API: status and JSON body (`(0, Null)` while the
/// router still refuses connections).
pub async fn get(r: &TestRouter, path: &str) -> (u16, Value) {
    let Ok(resp) = r.http.get(format!("{}{path}", r.api)).send().await else {
        return (0, Value::Null);
    };
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

/// No per-device rate limit to speak of.
pub fn fast_device(c: &mut router::config::ServeConfig) {
    c.device_rate = 1_000_000;
    c.device_burst = 1_000_000;
}

/// Send events `{"type":ty,"n":i,"pad":"x"*pad}` for `i` in `range`.
pub async fn send_seq(ws: &mut Ws, ty: &str, range: std::ops::Range<u64>, pad: usize) {
    for n in range {
        send_json(ws, json!({"type": ty, "n": n, "pad": "x".repeat(pad)})).await;
    }
}

/// One text frame, sent as is (not necessarily JSON).
pub async fn ws_send_text(ws: &mut Ws, text: &str) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        text.to_string(),
    ))
    .await
    .unwrap();
}
