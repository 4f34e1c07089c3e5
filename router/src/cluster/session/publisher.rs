//! The session's publisher: envelopes to other nodes (over a direct link when one is
//! up, else through the broker) and presence messages, published in order by a task of
//! its own.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::super::envelope::{encode_node, encode_presence, NodeMsg, PresenceBody, PresenceMsg};
use super::super::link::Links;
use super::super::seal::Domain;
use super::super::Cluster;
use super::state::State;
use super::topology::{NODES_EXCHANGE, PRESENCE_EXCHANGE};

/// One publish for the session's publisher task.
pub(super) struct Publish {
    exchange: &'static str,
    key: String,
    bytes: Vec<u8>,
    mandatory: bool,
}

/// Envelopes to publish are handed to a task of their own, so that a publish waiting
/// for the broker (flow control stops it reading our socket) never stops this node from
/// consuming its queue: a node that stopped consuming because it could not publish would
/// back up its own queue, and the broker would throttle every node publishing to it.
pub(super) struct Publisher {
    tx: mpsc::UnboundedSender<Publish>,
    backlog: Arc<AtomicUsize>,
    links: Arc<Links>,
}

/// While more than this many publishes wait, the API's envelopes are left in their
/// (bounded) queue: new requests get 503 rather than pile up behind a slow broker.
pub(super) const PUBLISH_BACKLOG: usize = 10_000;

impl Publisher {
    /// The publisher of a session on `ch`, and its task (which ends, with the error,
    /// when the channel fails).
    pub(super) fn start(ch: &Channel, links: Arc<Links>) -> (Publisher, JoinHandle<lapin::Error>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(publish_all(ch.clone(), rx, backlog.clone()));
        (Publisher { tx, backlog, links }, task)
    }

    fn push(&mut self, c: &Cluster, p: Publish) -> lapin::Result<()> {
        self.backlog.fetch_add(1, Relaxed);
        c.metrics
            .publish_backlog
            .store(self.backlog.load(Relaxed) as u64, Relaxed);
        // The task is gone only when the session is ending (it reports why).
        let _ = self.tx.send(p);
        Ok(())
    }

    /// Send an envelope to a node: requests and replies over its direct link when one
    /// is up, everything else (and those when none is) to the node's queue,
    /// `mandatory`: if the queue is gone the broker returns it, and the tick finds it.
    /// Not confirmed: a lost envelope is covered by the origin asking again, and
    /// confirms would double the messages the broker sends on the latency path.
    /// Directory changes always go through the broker: they must not be lost, and a
    /// node's queue being declared anew tells its peers when some were.
    pub(super) async fn node(&mut self, c: &Cluster, to: &str, m: &NodeMsg) -> lapin::Result<()> {
        c.metrics.envelopes_sent.fetch_add(1, Relaxed);
        let mut bytes = c.key.seal(Domain::Node, to, encode_node(m));
        if matches!(m, NodeMsg::Request { .. } | NodeMsg::Reply { .. }) {
            // The link takes the bytes as they are; they come back if it is not up.
            match self.links.send(to, bytes) {
                Ok(()) => return Ok(()),
                Err(back) => bytes = back,
            }
        }
        self.push(
            c,
            Publish {
                exchange: NODES_EXCHANGE,
                key: to.to_string(),
                bytes,
                mandatory: true,
            },
        )
    }

    pub(super) async fn presence(&mut self, st: &State, body: PresenceBody) -> lapin::Result<()> {
        let message = encode_presence(&PresenceMsg {
            node: st.me().to_string(),
            incarnation: st.c().incarnation,
            session: st.session,
            link: st.links.advertised.clone(),
            link_token: st.links.token,
            body,
        });
        let bytes = st.c().key.seal(Domain::Presence, "", message);
        st.c().metrics.presence_sent.fetch_add(1, Relaxed);
        self.push(
            st.c(),
            Publish {
                exchange: PRESENCE_EXCHANGE,
                key: String::new(),
                bytes,
                mandatory: false,
            },
        )
    }

    pub(super) fn backlog(&self) -> usize {
        self.backlog.load(Relaxed)
    }
}

/// The session's publisher: publishes in order until the channel fails.
async fn publish_all(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    backlog: Arc<AtomicUsize>,
) -> lapin::Error {
    while let Some(p) = rx.recv().await {
        let r = ch
            .basic_publish(
                p.exchange.into(),
                p.key.as_str().into(),
                BasicPublishOptions {
                    mandatory: p.mandatory,
                    ..BasicPublishOptions::default()
                },
                &p.bytes,
                BasicProperties::default(),
            )
            .await;
        backlog.fetch_sub(1, Relaxed);
        if let Err(e) = r {
            return e;
        }
    }
    lapin::Error::from(std::io::Error::other("publisher stopped"))
}
