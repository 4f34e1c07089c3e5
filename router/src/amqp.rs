//! What the router's three AMQP connections share: the events publisher
//! ([`crate::bus::publisher`]), backend delivery ([`crate::backend`]) and the cluster
//! ([`crate::cluster::session`]) each open a connection of their own, from the same
//! `--amqp` value, with the same TLS settings, timeouts and failover.

use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};

/// The exchange every device event is published to.
pub(crate) const EXCHANGE: &str = "hive.events";
/// Connecting and declaring the topology must finish within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connected session ended (the connection loops reconnect after `Lost`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    Lost,
    Shutdown,
}

/// The `--amqp` value: one URL, or the nodes of one RabbitMQ cluster, comma-separated.
/// Each of the router's connections (events, cluster, backend delivery) starts at the
/// first and, whenever an attempt fails or an established connection is lost, moves on
/// to the next (round robin), with the usual backoff between attempts: a broker node
/// that dies is left for the next reachable one.
#[derive(Debug, Clone)]
pub(crate) struct Failover {
    urls: Vec<String>,
    next: usize,
}

impl Failover {
    pub(crate) fn new(spec: &str) -> Self {
        Failover {
            urls: urls(spec),
            next: 0,
        }
    }

    /// The URL to connect to now.
    pub(crate) fn current(&self) -> &str {
        self.urls
            .get(self.next % self.urls.len().max(1))
            .map_or("", String::as_str)
    }

    /// The current URL failed (or its connection was lost): the next one.
    pub(crate) fn advance(&mut self) {
        self.next = self.next.wrapping_add(1);
    }

    /// Every URL changed by `f` (the cluster connection's heartbeat and frame size).
    pub(crate) fn map(mut self, f: impl Fn(&str) -> String) -> Self {
        self.urls = self.urls.iter().map(|u| f(u)).collect();
        self
    }
}

/// TLS settings of `amqps://` connections (`--amqp-ca`, `--amqp-cert`, `--amqp-key`);
/// None: the system's roots and no client certificate.
pub(crate) fn tls_config(
    config: &crate::config::ServeConfig,
) -> anyhow::Result<Option<lapin::tcp::OwnedTLSConfig>> {
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
    };
    let cert_chain = match &config.amqp_ca {
        Some(p) => Some(
            String::from_utf8(read("--amqp-ca", p)?)
                .map_err(|_| anyhow::anyhow!("--amqp-ca {}: not PEM text", p.display()))?,
        ),
        None => None,
    };
    let identity = match (&config.amqp_cert, &config.amqp_key) {
        (Some(c), Some(k)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("--amqp-cert", c)?,
            key: read("--amqp-key", k)?,
        }),
        _ => None,
    };
    Ok(
        (cert_chain.is_some() || identity.is_some()).then_some(lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain,
        }),
    )
}

/// Open an AMQP connection (`amqp://` or `amqps://`) with the configured TLS settings.
pub(crate) async fn connect(
    url: &str,
    props: lapin::ConnectionProperties,
    tls: Option<&lapin::tcp::OwnedTLSConfig>,
) -> lapin::Result<lapin::Connection> {
    match tls {
        None => lapin::Connection::connect(url, props).await,
        Some(t) => {
            let rt = lapin::runtime::default_runtime()?;
            lapin::Connection::connect_with_config(url, props, t.clone(), rt).await
        }
    }
}

/// The URLs of an `--amqp` value (comma-separated, blanks ignored).
fn urls(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Refuse at startup a URL that can never work, rather than retrying it forever.
pub(crate) fn check_url(spec: &str) -> anyhow::Result<()> {
    let urls = urls(spec);
    if urls.is_empty() {
        anyhow::bail!("--amqp: no URL");
    }
    for url in &urls {
        // amqp:// or amqps:// (TLS: rustls, the system's roots or --amqp-ca).
        let _: lapin::uri::AMQPUri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--amqp {}: {e}", crate::redact_url(url)))?;
    }
    Ok(())
}

/// Close a connection, best effort: a lost connection may not answer at all.
pub(crate) async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into())).await;
}

/// Declare `hive.events` (topic, durable): the publisher publishes to it, backend
/// delivery binds its queue to it; both declare it, whichever connects first.
pub(crate) async fn declare_events_exchange(ch: &Channel) -> lapin::Result<()> {
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_goes_round_the_urls() {
        let mut f = Failover::new(" amqp://a , amqp://b,,amqp://c ");
        assert_eq!(f.current(), "amqp://a");
        f.advance();
        assert_eq!(f.current(), "amqp://b");
        f.advance();
        f.advance();
        assert_eq!(f.current(), "amqp://a");
        let one = Failover::new("amqp://x").map(|u| format!("{u}?h=5"));
        assert_eq!(one.current(), "amqp://x?h=5");
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(check_url("amqps://h/").is_ok());
        assert!(check_url("amqp://a:5681/%2f, amqp://b:5682/%2f").is_ok());
        assert!(check_url("amqp://a:5681/%2f,http://b/").is_err());
        assert!(check_url(" , ").is_err());
        assert!(check_url("not a url").is_err());
    }
}
