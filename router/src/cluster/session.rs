//! The cluster thread: its own AMQP connection, its membership, its directory partition,
//! and the envelopes it sends and serves.
//!
//! **Topology** (declared on every (re)connect):
//! - `hive.nodes` (direct, durable) with one queue per node, `hive.node.<node-id>`,
//!   exclusive to the node's cluster connection and bound **once** with routing key =
//!   the node id. It lives exactly as long as the node's connection: that is what the
//!   liveness probe asks the broker about, and envelopes published (mandatory) to a node
//!   whose queue is gone come back at once instead of vanishing.
//! - `hive.presence` (fanout, durable) with one server-named exclusive queue per node:
//!   heartbeats ([`super::HEARTBEAT`]), joins and graceful leaves. One message per node,
//!   never per device.
//!
//! There is never a binding per device: a connect storm of 200,000 devices is a few
//! hundred batched directory messages, and a node dying is one queue going.
//!
//! **Why a connection and a thread of its own.** RabbitMQ's flow control throttles a
//! whole connection (it stops reading its socket) when what it publishes outruns the
//! queues; on the event publisher's connection that would hold back every request, ack,
//! directory change and heartbeat queued behind it, and heartbeats held long enough
//! used to make live nodes look dead. The event publisher's CPU work (header mapping,
//! confirms at tens of thousands a second) stays on its own thread too.
//!
//! It never blocks a shard: it reaches them through their bounded inboxes and answers
//! `Full` when one is full.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::directory::{Directory, Lookup};
use super::envelope::{
    encode_node, encode_presence, DirChange, DirKind, NodeMsg, Outcome, PresenceBody, PresenceMsg,
    Received, What, MAX_DEADLINE_MS,
};
use super::link::{Inbound, Links, PeerAddr};
use super::membership::{Heard, Membership, NodeId, ME};
use super::route::cluster;
use super::{Cluster, Dest, Outgoing, HEARTBEAT};
use crate::amqp::{SessionEnd, CONNECT_TIMEOUT};
use crate::retry::Backoff;
use crate::shard::{shard_of, Delivery, RequestMsg, RequestReply, ShardMsg};
use crate::{unix_ms, Shared};

pub const NODES_EXCHANGE: &str = "hive.nodes";
pub const PRESENCE_EXCHANGE: &str = "hive.presence";
/// Local connects and disconnects are gathered this long before they are sent.
pub const DIRECTORY_EVERY: Duration = Duration::from_millis(100);
/// After the member set changes, wait this long for more changes before the devices
/// whose home moved are registered again (one pass for a burst of joins).
const REREGISTER_AFTER: Duration = Duration::from_millis(200);
/// Directory changes per message (24 bytes each on the wire).
const DIRECTORY_PART: usize = 4096;
/// A session is ready (and the router with it) this long after its join, once its
/// peers have answered with their heartbeats.
const JOIN_WAIT: Duration = Duration::from_millis(1200);
/// After our own session starts again (a reconnect), nobody is probed for this long:
/// after a broker restart every node is reconnecting, and a queue not yet declared
/// again is not a dead node.
const PROBE_HOLD: Duration = Duration::from_secs(10);
/// A probe that has not answered by then decides nothing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a finished request's outcome is remembered (to answer duplicates).
const REMEMBER: Duration = Duration::from_secs(30);
/// AMQP heartbeat of the cluster connection (seconds) unless the URL sets one: the
/// broker drops a connection that misses two, so a node that vanished without closing
/// its socket loses its queue (and membership) within about twice this.
const AMQP_HEARTBEAT: u16 = 5;
/// Frame size of the cluster connection unless the URL sets one: envelopes are small,
/// and lapin keeps 64 frames of buffer per connection (2 MiB at this size).
const FRAME_MAX: u32 = 16_384;

pub fn node_queue(node: &str) -> String {
    format!("hive.node.{node}")
}

/// The cluster connection's URL: the configured one with this connection's heartbeat
/// and frame size unless it names them itself.
pub fn cluster_url(url: &str) -> String {
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

/// Start the cluster thread (`--amqp`). It runs until `shared.shutdown` flips, then
/// announces that the node leaves (bounded) and returns.
pub fn spawn(shared: Arc<Shared>) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::runtime_thread("cluster", move |rt| {
        let Some(url) = shared.config.amqp.clone() else {
            return;
        };
        let Some(out) = cluster(&shared).take_outgoing() else {
            return;
        };
        let urls = crate::amqp::Failover::new(&url).map(cluster_url);
        rt.block_on(run(shared, urls, out));
    })
}

/// Declare the cluster topology; returns the name of this node's presence queue.
pub async fn declare(ch: &Channel, node: &str) -> lapin::Result<String> {
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

/// A request this node serves for a peer (or for its own API, as the device's owner).
enum Served {
    /// Handed to the device's shard here; `origin` is told if the device leaves.
    InFlight {
        device: u128,
        origin: String,
    },
    Done(Outcome, Instant),
}

type ServeFut = Pin<Box<dyn Future<Output = (u128, String, Outcome)>>>;
type ProbeFut<'a> = Pin<Box<dyn Future<Output = (NodeId, Option<bool>)> + 'a>>;

/// What outlives a broker session: members, the directory partition, served requests.
struct State {
    shared: Arc<Shared>,
    members: Membership,
    dir: Directory,
    served: HashMap<u128, Served>,
    serving: FuturesUnordered<ServeFut>,
    session: u64,
    /// Directory changes to send, per node (ME: applied here).
    dir_out: HashMap<NodeId, Vec<DirChange>>,
    /// Homes whose queue was declared anew since the last registration pass.
    reset: Vec<NodeId>,
    reregister_all: bool,
    reregister_at: Option<Instant>,
    /// The member epoch the last registration pass was for.
    registered_epoch: u64,
    last_heartbeat: Option<Instant>,
    /// Nodes just counted in, to be sent a `Resync`.
    resync: Vec<String>,
    /// Direct links to the other nodes (the latency path without the broker).
    links: Arc<Links>,
}

impl State {
    fn c(&self) -> &Cluster {
        cluster(&self.shared)
    }

    fn me(&self) -> &str {
        &self.shared.node_id
    }

    fn gauges(&self) {
        let m = &self.c().metrics;
        m.nodes.store(self.members.len() as u64, Relaxed);
        m.directory_entries.store(self.dir.len() as u64, Relaxed);
        m.directory_moving
            .store(self.dir.moving_len() as u64, Relaxed);
    }

    fn schedule_reregister(&mut self) {
        let at = Instant::now() + REREGISTER_AFTER;
        self.reregister_at = Some(self.reregister_at.map_or(at, |t| t.min(at)));
    }

    /// What a heartbeat, join or directory message told us about its sender.
    fn heard(
        &mut self,
        name: &str,
        incarnation: u64,
        session: u64,
        devices: Option<u64>,
    ) -> NodeId {
        let now = Instant::now();
        let (id, heard) = self.members.heard(name, incarnation, session, devices, now);
        match heard {
            Heard::Same => {}
            Heard::New => {
                tracing::info!(node = %name, "router node joined the cluster");
                self.schedule_reregister();
                self.resync.push(name.to_string());
            }
            Heard::Reconnected => {
                self.reset.push(id);
                self.schedule_reregister();
            }
            Heard::Restarted => {
                tracing::info!(node = %name, "router node restarted");
                self.dir.owner_gone(id, now);
                self.reset.push(id);
                self.schedule_reregister();
            }
        }
        self.gauges();
        id
    }

    /// A member left: remove it and forget what it held.
    fn gone(&mut self, id: NodeId) {
        if let Some(p) = self.members.remove(id) {
            self.forget(id, &p.name);
        }
    }

    /// A heartbeat or join said where the node's direct link listens.
    fn heard_link(&self, name: &str, link: &str, token: u128) {
        self.links.heard(
            name,
            PeerAddr {
                addr: link.to_string(),
                token,
            },
        );
    }

    /// A node is no longer a member: its devices are expected back elsewhere, and the
    /// devices it was home for are registered at their new homes.
    fn forget(&mut self, id: NodeId, name: &str) {
        self.links.forget(name);
        let n = self.dir.owner_gone(id, Instant::now());
        tracing::warn!(node = %name, devices = n, "router node gone from the cluster");
        self.dir_out.remove(&id);
        self.schedule_reregister();
        self.gauges();
    }

    /// Register again the devices whose home changed (or was reset), and drop the
    /// entries this node is no longer home for.
    fn reregister(&mut self) {
        self.reregister_at = None;
        let epoch_moved = self.members.epoch != self.registered_epoch;
        if !epoch_moved && self.reset.is_empty() && !self.reregister_all {
            return;
        }
        let members = &self.members;
        let changes = cluster(&self.shared).reregister(
            |d| members.home(d.as_u128()),
            &self.reset,
            self.reregister_all,
        );
        if epoch_moved {
            let dropped = self.dir.retain_homed(|d| members.home(d) == ME);
            if dropped > 0 {
                tracing::debug!(dropped, "directory entries now homed elsewhere");
            }
            self.c().bump();
        }
        self.registered_epoch = self.members.epoch;
        self.reset.clear();
        self.reregister_all = false;
        self.c()
            .metrics
            .reregistered
            .fetch_add(changes.len() as u64, Relaxed);
        for (to, ch) in changes {
            self.dir_out.entry(to).or_default().push(ch);
        }
        self.gauges();
    }

    /// Gather the local connects and disconnects into per-home batches. Returns the
    /// requests held here for devices whose connection just ended, with their origins:
    /// told "moving", so they look for the device where it reconnects (the shard keeps
    /// the request too, in case it comes back here).
    fn take_local(&mut self) -> Vec<(u128, String)> {
        let members = &self.members;
        let changes = cluster(&self.shared).take_outbox(|d| members.home(d.as_u128()));
        let mut gone = std::collections::HashSet::new();
        for (to, ch) in changes {
            if ch.kind != DirKind::Claim {
                gone.insert(ch.device);
            }
            self.dir_out.entry(to).or_default().push(ch);
        }
        if gone.is_empty() {
            return Vec::new();
        }
        self.served
            .iter()
            .filter_map(|(r, s)| match s {
                Served::InFlight { device, origin } if gone.contains(device) => {
                    Some((*r, origin.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Apply directory changes from node `from` (ME: our own).
    fn apply_directory(&mut self, from: NodeId, changes: &[DirChange]) {
        let now = Instant::now();
        for ch in changes {
            if ch.kind == DirKind::Evict {
                self.evict_local(ch);
            } else if let Some((to, ev)) = self.dir.apply(from, ch, now) {
                self.dir_out.entry(to).or_default().push(ev);
            }
        }
        self.gauges();
    }

    /// A home says a newer connection of the device is elsewhere: close ours (4409)
    /// unless ours is newer than the claim it evicted.
    fn evict_local(&self, ch: &DirChange) {
        let device = Uuid::from_u128(ch.device);
        let c = self.c();
        if c.local_since(&device).is_some_and(|s| s <= ch.since) {
            let shard = shard_of(&device, self.shared.shards.len());
            let msg = ShardMsg::Evict {
                device,
                since_ms: ch.since,
            };
            // Counted before the shard can act on it (a reader of /metrics who saw the
            // close sees the count).
            c.metrics.evictions.fetch_add(1, Relaxed);
            if self.shared.shards[shard].send(msg).is_err() {
                c.metrics.evictions.fetch_sub(1, Relaxed);
                self.shared
                    .metrics
                    .api
                    .shard_queue_full
                    .fetch_add(1, Relaxed);
            }
        }
    }
}

async fn run(
    shared: Arc<Shared>,
    mut urls: crate::amqp::Failover,
    mut out: mpsc::Receiver<Outgoing>,
) {
    let now = Instant::now();
    let c = cluster(&shared);
    let tls = crate::amqp::tls_config(&shared.config).ok().flatten();
    let (links, mut link_in) = match c.take_link_listener() {
        Some((listener, advertised)) => {
            match Links::start(
                &shared.node_id,
                listener,
                advertised,
                c.link_metrics.clone(),
            ) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cluster link listener failed: links off");
                    (Links::off(&shared.node_id), mpsc::channel(1).1)
                }
            }
        }
        None => (Links::off(&shared.node_id), mpsc::channel(1).1),
    };
    let mut st = State {
        members: Membership::new(&shared.node_id, c.incarnation, now),
        dir: Directory::default(),
        served: HashMap::new(),
        serving: FuturesUnordered::new(),
        session: 0,
        dir_out: HashMap::new(),
        reset: Vec::new(),
        reregister_all: true,
        reregister_at: None,
        registered_epoch: 0,
        last_heartbeat: None,
        resync: Vec::new(),
        links: Arc::new(links),
        shared: shared.clone(),
    };
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Backoff::RECONNECT;
    let name = format!("hive-router {} cluster", shared.node_id);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let props = ConnectionProperties::default().with_connection_name(name.clone().into());
        let url = urls.current().to_string();
        let connecting = tokio::time::timeout(
            CONNECT_TIMEOUT,
            crate::amqp::connect(&url, props, tls.as_ref()),
        );
        let conn = tokio::select! {
            r = connecting => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match conn {
            Ok(Ok(conn)) => {
                backoff.reset();
                let end = session(&mut st, &conn, &mut out, &mut link_in).await;
                c.joined.store(false, Relaxed);
                shared.update_ready();
                crate::amqp::close(&conn).await;
                match end {
                    Ok(SessionEnd::Shutdown) => return,
                    Ok(SessionEnd::Lost) => tracing::warn!("cluster connection lost; reconnecting"),
                    Err(e) => {
                        if e.to_string().contains("RESOURCE_LOCKED") {
                            tracing::error!(node = %shared.node_id, "another router holds this node's queue: every node needs its own --node-id");
                        } else {
                            tracing::warn!(error = %e, "cluster connection failed; reconnecting");
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, attempt = backoff.attempt(), "cluster: cannot connect to RabbitMQ")
            }
            Err(_) => tracing::warn!(
                attempt = backoff.attempt(),
                "cluster: connecting to RabbitMQ timed out"
            ),
        }
        // Failed, or lost: the next broker node (one cluster's nodes share the topology).
        urls.advance();
        let delay = backoff.next_delay();
        // Meanwhile, keep serving what needs no broker: nothing queued for other nodes
        // can go, so it waits in `out` (bounded; the API answers 503 when it is full).
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// One publish for the session's publisher task.
struct Publish {
    exchange: &'static str,
    key: String,
    bytes: Vec<u8>,
    mandatory: bool,
}

/// Envelopes to publish are handed to a task of their own, so that a publish waiting
/// for the broker (flow control stops it reading our socket) never stops this node from
/// consuming its queue: a node that stopped consuming because it could not publish would
/// back up its own queue, and the broker would throttle every node publishing to it.
struct Publisher {
    tx: mpsc::UnboundedSender<Publish>,
    backlog: Arc<std::sync::atomic::AtomicUsize>,
    links: Arc<Links>,
}

/// While more than this many publishes wait, the API's envelopes are left in their
/// (bounded) queue: new requests get 503 rather than pile up behind a slow broker.
const PUBLISH_BACKLOG: usize = 10_000;

impl Publisher {
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
    async fn node(&mut self, c: &Cluster, to: &str, m: &NodeMsg) -> lapin::Result<()> {
        c.metrics.envelopes_sent.fetch_add(1, Relaxed);
        let mut bytes = encode_node(m);
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

    async fn presence(&mut self, st: &State, body: PresenceBody) -> lapin::Result<()> {
        let bytes = encode_presence(&PresenceMsg {
            node: st.me().to_string(),
            incarnation: st.c().incarnation,
            session: st.session,
            link: st.links.advertised.clone(),
            link_token: st.links.token,
            body,
        });
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

    fn backlog(&self) -> usize {
        self.backlog.load(Relaxed)
    }
}

/// The session's publisher: publishes in order until the channel fails.
async fn publish_all(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    backlog: Arc<std::sync::atomic::AtomicUsize>,
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

async fn session(
    st: &mut State,
    conn: &Connection,
    out: &mut mpsc::Receiver<Outgoing>,
    link_in: &mut mpsc::Receiver<Inbound>,
) -> lapin::Result<SessionEnd> {
    let ch = conn.create_channel().await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut publisher = tokio::spawn(publish_all(ch.clone(), rx, backlog.clone()));
    let mut pubr = Publisher {
        tx,
        backlog,
        links: st.links.clone(),
    };
    let end = session_loop(st, conn, &ch, &mut pubr, &mut publisher, out, link_in).await;
    if matches!(end, Ok(SessionEnd::Shutdown)) {
        // Let what is queued (releases, the leave) go out, briefly.
        drop(pubr);
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut publisher).await;
    }
    publisher.abort();
    end
}

async fn session_loop(
    st: &mut State,
    conn: &Connection,
    ch: &Channel,
    pubr: &mut Publisher,
    publisher: &mut tokio::task::JoinHandle<lapin::Error>,
    out: &mut mpsc::Receiver<Outgoing>,
    link_in: &mut mpsc::Receiver<Inbound>,
) -> lapin::Result<SessionEnd> {
    let me = st.me().to_string();
    let pq = declare(ch, &me).await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let mut node_in = ch
        .basic_consume(
            node_queue(&me).as_str().into(),
            "node".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let mut presence_in = ch
        .basic_consume(
            pq.as_str().into(),
            "presence".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let shared = st.shared.clone();
    let c = cluster(&shared);
    c.metrics.sessions.fetch_add(1, Relaxed);
    st.session += 1;
    st.members.set_my_session(st.session);
    // After a reconnect, the others may be reconnecting too (a broker restart).
    let hold = if st.session > 1 {
        PROBE_HOLD
    } else {
        Duration::ZERO
    };
    st.members.restart_clock(Instant::now(), hold);
    // Our queue is new: whatever was sent to it before is gone. Register every device
    // again (at the homes known now; the registration pass after the join corrects what
    // the answers change), and tell everyone we are here.
    st.reregister_all = true;
    st.reregister();
    pubr.presence(st, PresenceBody::Join).await?;
    // A first session waits to hear its peers before it is ready; after a reconnect it
    // knows them already.
    let joined_at = if st.session > 1 {
        Instant::now()
    } else {
        Instant::now() + JOIN_WAIT
    };
    if st.session > 1 {
        c.joined.store(true, Relaxed);
        shared.update_ready();
    }

    let mut probes: FuturesUnordered<ProbeFut<'_>> = FuturesUnordered::new();
    let mut dir_tick = tokio::time::interval(DIRECTORY_EVERY);
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut shutdown = shared.shutdown.subscribe();
    let mut conn_events = conn.events_listener();
    loop {
        let reregister_at = st.reregister_at;
        tokio::select! {
            d = node_in.next() => {
                let Some(d) = d else { return Ok(SessionEnd::Lost) };
                let d = d?;
                c.metrics.envelopes_received.fetch_add(1, Relaxed);
                let r = Received::new(&d.data);
                let msg = r
                    .node()
                    .ok()
                    .and_then(|a| rkyv::deserialize::<NodeMsg, rkyv::rancor::Error>(a).ok());
                match msg {
                    Some(m) => on_node_msg(st, pubr, m).await?,
                    None => {
                        c.metrics.bad_envelopes.fetch_add(1, Relaxed);
                    }
                }
            }
            Some((from, bytes)) = link_in.recv() => {
                c.metrics.envelopes_received.fetch_add(1, Relaxed);
                let r = Received::new(&bytes);
                let msg = r
                    .node()
                    .ok()
                    .and_then(|a| rkyv::deserialize::<NodeMsg, rkyv::rancor::Error>(a).ok());
                match msg {
                    // Only the latency path travels on links; anything else is refused
                    // (directory changes must come through the broker, in order).
                    Some(m @ (NodeMsg::Request { .. } | NodeMsg::Reply { .. })) => {
                        on_node_msg(st, pubr, m).await?
                    }
                    _ => {
                        tracing::debug!(peer = %from, "bad envelope on a cluster link");
                        c.metrics.bad_envelopes.fetch_add(1, Relaxed);
                    }
                }
            }
            d = presence_in.next() => {
                let Some(d) = d else { return Ok(SessionEnd::Lost) };
                let d = d?;
                let r = Received::new(&d.data);
                let Ok(m) = r.presence() else {
                    c.metrics.bad_envelopes.fetch_add(1, Relaxed);
                    continue;
                };
                if m.node.as_str() == me {
                    continue; // our own fanout copy
                }
                c.metrics.presence_received.fetch_add(1, Relaxed);
                let (inc, sess) = (m.incarnation.to_native(), m.session.to_native());
                match &m.body {
                    super::envelope::ArchivedPresenceBody::Heartbeat { devices } => {
                        st.heard(m.node.as_str(), inc, sess, Some(devices.to_native()));
                        st.heard_link(m.node.as_str(), m.link.as_str(), m.link_token.to_native());
                    }
                    super::envelope::ArchivedPresenceBody::Join => {
                        st.heard(m.node.as_str(), inc, sess, None);
                        st.heard_link(m.node.as_str(), m.link.as_str(), m.link_token.to_native());
                        // Answer at once so the newcomer knows us before it is ready
                        // (at most one extra heartbeat per 100 ms, whoever joins).
                        let recent = st
                            .last_heartbeat
                            .is_some_and(|t| t.elapsed() < Duration::from_millis(100));
                        if !recent {
                            st.last_heartbeat = Some(Instant::now());
                            let devices = c.local_count();
                            pubr.presence(st, PresenceBody::Heartbeat { devices }).await?;
                        }
                    }
                    super::envelope::ArchivedPresenceBody::Leaving => {
                        if let Some(id) = st.members.id(m.node.as_str()) {
                            c.metrics.nodes_left.fetch_add(1, Relaxed);
                            st.gone(id);
                        }
                    }
                }
            }
            e = &mut *publisher => {
                let e = e.unwrap_or_else(|j| lapin::Error::from(std::io::Error::other(j.to_string())));
                tracing::warn!(error = %e, "cluster publishing failed");
                return Ok(SessionEnd::Lost);
            }
            o = out.recv(), if pubr.backlog() < PUBLISH_BACKLOG => {
                let Some(o) = o else { return Ok(SessionEnd::Shutdown) };
                match o.to {
                    Dest::Node(n) if n == me => on_node_msg(st, pubr, o.msg).await?,
                    Dest::Node(n) => pubr.node(c, &n, &o.msg).await?,
                    Dest::HomeOf(d) => {
                        let home = st.members.home(d.as_u128());
                        match st.members.name(home).map(str::to_string) {
                            Some(n) if home != ME => pubr.node(c, &n, &o.msg).await?,
                            _ => on_node_msg(st, pubr, o.msg).await?,
                        }
                    }
                }
            }
            Some((id, verdict)) = probes.next(), if !probes.is_empty() => {
                let m = &c.metrics;
                match verdict {
                    Some(true) => m.probes_alive.fetch_add(1, Relaxed),
                    Some(false) => m.probes_gone.fetch_add(1, Relaxed),
                    None => m.probes_failed.fetch_add(1, Relaxed),
                };
                let name = st.members.name(id).map(str::to_string);
                if let Some(p) = st.members.probed(id, verdict, Instant::now()) {
                    tracing::warn!(node = %p.name, "router node's queue is gone: removing it");
                    m.nodes_expired.fetch_add(1, Relaxed);
                    st.forget(id, &p.name);
                } else if verdict == Some(true) {
                    tracing::info!(node = ?name, "router node silent but its queue exists: kept");
                }
            }
            Some((request, origin, outcome)) = st.serving.next(), if !st.serving.is_empty() => {
                let terminal = !matches!(outcome, Outcome::Offline | Outcome::Moving);
                if terminal {
                    st.served.insert(request, Served::Done(outcome.clone(), Instant::now() + REMEMBER));
                } else {
                    st.served.remove(&request);
                }
                reply(st, pubr, &origin, request, outcome).await?;
            }
            _ = dir_tick.tick() => {
                for (request, origin) in st.take_local() {
                    reply(st, pubr, &origin, request, Outcome::Moving).await?;
                }
                flush_directory(st, pubr).await?;
                // Envelopes the broker returned (no confirms are pending on this channel,
                // so this only collects what came back).
                for r in ch.wait_for_confirms().await? {
                    let to = r.delivery.routing_key.as_str().to_string();
                    let msg = Received::new(&r.delivery.data);
                    let request = match msg.node() {
                        Ok(super::envelope::ArchivedNodeMsg::Request { request, origin, .. }) => {
                            Some((request.to_native(), origin.as_str().to_string()))
                        }
                        _ => None,
                    };
                    c.metrics.envelopes_returned.fetch_add(1, Relaxed);
                    // The node's queue is gone: it died, or it is reconnecting (its
                    // connection was closed). Only silence makes it a suspect: a node
                    // that is back within SUSPECT_AFTER has said so by then.
                    tracing::debug!(node = %to, "envelope returned: the node's queue is gone");
                    if let Some((request, origin)) = request {
                        reply(st, pubr, &origin, request, Outcome::Moving).await?;
                    }
                }
            }
            _ = async { tokio::time::sleep_until(reregister_at.expect("guarded").into()).await }, if reregister_at.is_some() => {
                st.reregister();
                flush_directory(st, pubr).await?;
            }
            _ = beat.tick() => {
                st.last_heartbeat = Some(Instant::now());
                let devices = c.local_count();
                pubr.presence(st, PresenceBody::Heartbeat { devices }).await?;
                for (id, name) in st.members.suspects(Instant::now()) {
                    tracing::info!(node = %name, "router node silent: asking the broker whether its queue exists");
                    probes.push(Box::pin(timed_probe(conn, id, name)));
                }
                let now = Instant::now();
                st.dir.expire(now);
                st.served.retain(|_, s| match s {
                    Served::InFlight { .. } => true,
                    Served::Done(_, until) => *until > now,
                });
                if !c.joined() && now >= joined_at {
                    c.joined.store(true, Relaxed);
                    shared.update_ready();
                    c.bump();
                }
                st.gauges();
                if !ch.status().connected() || !conn.status().connected() {
                    return Ok(SessionEnd::Lost);
                }
            }
            ev = conn_events.next() => {
                // A probe's channel closed by the broker (404/405) is reported here too:
                // only a connection that is no longer up ends the session.
                match ev {
                    None => return Ok(SessionEnd::Lost),
                    Some(lapin::Event::Error(e)) if !conn.status().connected() => {
                        tracing::warn!(error = %e, "cluster connection error");
                        return Ok(SessionEnd::Lost);
                    }
                    Some(_) => {}
                }
            }
            _ = shutdown.wait_for(|s| *s) => {
                // Releases of the devices the drain closed go out first, then the leave.
                for (request, origin) in st.take_local() {
                    reply(st, pubr, &origin, request, Outcome::Moving).await?;
                }
                flush_directory(st, pubr).await?;
                pubr.presence(st, PresenceBody::Leaving).await?;
                return Ok(SessionEnd::Shutdown);
            }
        }
    }
}

async fn timed_probe(conn: &Connection, id: NodeId, name: String) -> (NodeId, Option<bool>) {
    let v = tokio::time::timeout(PROBE_TIMEOUT, probe(conn, name))
        .await
        .ok()
        .flatten();
    (id, v)
}

/// Send the gathered directory changes: to other nodes in batches, ours applied here.
async fn flush_directory(st: &mut State, pubr: &mut Publisher) -> lapin::Result<()> {
    for to in std::mem::take(&mut st.resync) {
        let m = NodeMsg::Resync {
            from: st.me().to_string(),
        };
        pubr.node(cluster(&st.shared), &to, &m).await?;
    }
    // Our own first: applying them may queue evictions for others.
    if let Some(mine) = st.dir_out.remove(&ME) {
        st.apply_directory(ME, &mine);
        // Evictions of our own connections come back under ME.
        if let Some(again) = st.dir_out.remove(&ME) {
            for ch in &again {
                st.evict_local(ch);
            }
        }
    }
    if st.dir_out.is_empty() {
        return Ok(());
    }
    let batches = std::mem::take(&mut st.dir_out);
    let c = cluster(&st.shared);
    for (to, changes) in batches {
        let Some(name) = st.members.name(to).map(str::to_string) else {
            continue; // gone meanwhile: the next registration pass covers it
        };
        c.metrics
            .directory_changes_sent
            .fetch_add(changes.len() as u64, Relaxed);
        for part in changes.chunks(DIRECTORY_PART) {
            let m = NodeMsg::Directory {
                from: st.me().to_string(),
                incarnation: c.incarnation,
                session: st.session,
                changes: part.to_vec(),
            };
            pubr.node(c, &name, &m).await?;
        }
    }
    Ok(())
}

async fn reply(
    st: &mut State,
    pubr: &mut Publisher,
    origin: &str,
    request: u128,
    outcome: Outcome,
) -> lapin::Result<()> {
    let c = cluster(&st.shared);
    if origin == st.me() {
        c.deliver_reply(Uuid::from_u128(request), origin.to_string(), outcome);
        return Ok(());
    }
    let m = NodeMsg::Reply {
        request,
        from: st.me().to_string(),
        outcome,
    };
    pubr.node(c, origin, &m).await
}

fn outcome_of(r: RequestReply) -> Outcome {
    match r {
        RequestReply::Offline => Outcome::Offline,
        RequestReply::Full => Outcome::Full,
        RequestReply::Acked => Outcome::Acked,
        RequestReply::Responded { ok, result } => Outcome::Responded { ok, result },
    }
}

/// Unix-ms deadline -> local instant, capped so a skewed clock cannot keep it forever.
fn local_deadline(unix_deadline: u64) -> Option<Instant> {
    let now = unix_ms();
    let left = unix_deadline.checked_sub(now)?.min(MAX_DEADLINE_MS);
    (left > 0).then(|| Instant::now() + Duration::from_millis(left))
}

async fn on_node_msg(st: &mut State, pubr: &mut Publisher, m: NodeMsg) -> lapin::Result<()> {
    let shared = st.shared.clone();
    let c = cluster(&shared);
    match m {
        NodeMsg::Reply {
            request,
            from,
            outcome,
        } => {
            c.deliver_reply(Uuid::from_u128(request), from, outcome);
        }
        NodeMsg::Directory {
            from,
            incarnation,
            session,
            changes,
        } => {
            if from == st.me() {
                return Ok(());
            }
            c.metrics
                .directory_changes_received
                .fetch_add(changes.len() as u64, Relaxed);
            let id = st.heard(&from, incarnation, session, None);
            st.apply_directory(id, &changes);
        }
        NodeMsg::Resync { from } => {
            if let Some(id) = st.members.id(&from) {
                st.reset.push(id);
                st.schedule_reregister();
            }
        }
        NodeMsg::Request {
            request,
            device,
            origin,
            hops,
            deadline_unix_ms,
            what,
        } => {
            // A duplicate of a request finished here gets the same answer again.
            if let Some(Served::Done(o, _)) = st.served.get(&request) {
                c.metrics.duplicates_dropped.fetch_add(1, Relaxed);
                let o = o.clone();
                return reply(st, pubr, &origin, request, o).await;
            }
            let Some(deadline) = local_deadline(deadline_unix_ms) else {
                return reply(st, pubr, &origin, request, Outcome::Expired).await;
            };
            let dev = Uuid::from_u128(device);
            if c.is_local(&dev) {
                // Held by the shard here already: the device gets it once (again on
                // its reconnect here, by the shard).
                if let Some(Served::InFlight { .. }) = st.served.get(&request) {
                    c.metrics.duplicates_dropped.fetch_add(1, Relaxed);
                    return Ok(());
                }
                if matches!(what, What::Locate) {
                    let node = st.me().to_string();
                    return reply(st, pubr, &origin, request, Outcome::At { node }).await;
                }
                if origin != st.me() {
                    c.metrics.requests_served_for_peers.fetch_add(1, Relaxed);
                }
                return serve_here(st, pubr, request, dev, origin, deadline, what).await;
            }
            if hops > 0 {
                return reply(st, pubr, &origin, request, Outcome::Offline).await;
            }
            // We are (or were told we are) the device's home.
            match st.dir.lookup(&dev) {
                Lookup::At(owner) if owner != ME => {
                    let Some(name) = st.members.name(owner).map(str::to_string) else {
                        return reply(st, pubr, &origin, request, Outcome::Moving).await;
                    };
                    if matches!(what, What::Locate) {
                        return reply(st, pubr, &origin, request, Outcome::At { node: name }).await;
                    }
                    c.metrics.requests_relayed.fetch_add(1, Relaxed);
                    let fwd = NodeMsg::Request {
                        request,
                        device,
                        origin,
                        hops: 1,
                        deadline_unix_ms,
                        what,
                    };
                    pubr.node(c, &name, &fwd).await?;
                }
                Lookup::Moving => reply(st, pubr, &origin, request, Outcome::Moving).await?,
                Lookup::At(_) | Lookup::Unknown => {
                    reply(st, pubr, &origin, request, Outcome::Offline).await?
                }
            }
        }
    }
    Ok(())
}

/// Deliver a request or event to the local shard holding the device; its outcome goes
/// to `origin` when the shard answers (or the deadline passes).
async fn serve_here(
    st: &mut State,
    pubr: &mut Publisher,
    request: u128,
    device: Uuid,
    origin: String,
    deadline: Instant,
    what: What,
) -> lapin::Result<()> {
    let shard = shard_of(&device, st.shared.shards.len());
    let fut: ServeFut = match what {
        What::Command {
            command,
            payload,
            wait_response,
        } => {
            let (tx, rx) = oneshot::channel();
            let msg = RequestMsg {
                device,
                request: Uuid::from_u128(request),
                command,
                payload,
                wait_response,
                deadline,
                reply: tx,
            };
            if st.shared.shards[shard]
                .send(ShardMsg::Request(Box::new(msg)))
                .is_err()
            {
                st.shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
                return reply(st, pubr, &origin, request, Outcome::Full).await;
            }
            let to = origin.clone();
            Box::pin(async move {
                let outcome = match tokio::time::timeout_at(deadline.into(), rx).await {
                    Ok(Ok(r)) => outcome_of(r),
                    _ => Outcome::Expired,
                };
                (request, to, outcome)
            })
        }
        What::Event { body } => {
            let (tx, rx) = oneshot::channel();
            let msg = ShardMsg::Event {
                device,
                body,
                reply: tx,
            };
            if st.shared.shards[shard].send(msg).is_err() {
                st.shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
                return reply(st, pubr, &origin, request, Outcome::Full).await;
            }
            let to = origin.clone();
            Box::pin(async move {
                let outcome = match rx.await {
                    Ok(Delivery::Sent) => Outcome::Acked,
                    Ok(Delivery::Full) => Outcome::Full,
                    Ok(Delivery::NotJoined) => Outcome::NotJoined,
                    Ok(Delivery::Offline) | Err(_) => Outcome::Offline,
                };
                (request, to, outcome)
            })
        }
        What::Locate => return Ok(()),
    };
    st.served.insert(
        request,
        Served::InFlight {
            device: device.as_u128(),
            origin,
        },
    );
    st.serving.push(fut);
    Ok(())
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
