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
//!
//! **Where things are.** This file: the thread, the connection loop, and one session's
//! wait loop, which hands each wake-up to a handler: `serve` (node messages:
//! requests, replies, directory changes), `presence` (heartbeats, joins, leaves,
//! probes), `state` (what outlives a session), `publisher` (what the session sends),
//! `topology` (exchanges, queues, probes).

mod presence;
mod publisher;
mod serve;
mod state;
mod topology;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::envelope::PresenceBody;
use super::link::{Inbound, Links};
use super::route::cluster;
use super::{Cluster, Outgoing, HEARTBEAT};
use crate::amqp::{Failover, SessionEnd, CONNECT_TIMEOUT};
use crate::retry::Backoff;
use crate::Shared;
use presence::ProbeFut;
use publisher::{Publisher, PUBLISH_BACKLOG};
use state::State;
use topology::cluster_url;

/// Local connects and disconnects are gathered this long before they are sent.
pub(crate) const DIRECTORY_EVERY: Duration = Duration::from_millis(100);
/// A session is ready (and the router with it) this long after its join, once its
/// peers have answered with their heartbeats.
const JOIN_WAIT: Duration = Duration::from_millis(1200);
/// After our own session starts again (a reconnect), nobody is probed for this long:
/// after a broker restart every node is reconnecting, and a queue not yet declared
/// again is not a dead node.
const PROBE_HOLD: Duration = Duration::from_secs(10);

/// Start the cluster thread (`--amqp`). It runs until `shared.shutdown` flips, then
/// announces that the node leaves (bounded) and returns.
pub(crate) fn spawn(shared: Arc<Shared>) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::runtime_thread("cluster", move |rt| {
        let Some(url) = shared.config.amqp.clone() else {
            return;
        };
        let Some(out) = cluster(&shared).take_outgoing() else {
            return;
        };
        let urls = Failover::new(&url).map(cluster_url);
        rt.block_on(run(shared, urls, out));
    })
}

/// This node's direct link listener, if it has one (else links are off).
fn start_links(shared: &Shared, c: &Cluster) -> (Links, mpsc::Receiver<Inbound>) {
    let off = || {
        (
            Links::off(&shared.node_id, c.key.clone()),
            mpsc::channel(1).1,
        )
    };
    let Some((listener, advertised)) = c.take_link_listener() else {
        return off();
    };
    match Links::start(
        &shared.node_id,
        listener,
        advertised,
        c.link_metrics.clone(),
        c.key.clone(),
    ) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cluster link listener failed: links off");
            off()
        }
    }
}

/// Connect, run a session, and after it ends (or connecting failed) reconnect with
/// backoff to the next broker node, until shutdown.
async fn run(shared: Arc<Shared>, mut urls: Failover, mut out: mpsc::Receiver<Outgoing>) {
    let c = cluster(&shared);
    let tls = crate::amqp::tls_config(&shared.config).ok().flatten();
    let (links, mut link_in) = start_links(&shared, c);
    let mut st = State::new(shared.clone(), links);
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
                if log_end(&shared, end) == SessionEnd::Shutdown {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, attempt = backoff.attempt(), "cluster: cannot connect to RabbitMQ")
            }
            Err(_) => {
                tracing::warn!(
                    attempt = backoff.attempt(),
                    "cluster: connecting to RabbitMQ timed out"
                )
            }
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

/// Say why a session ended (a failed one is `Lost`).
fn log_end(shared: &Shared, end: lapin::Result<SessionEnd>) -> SessionEnd {
    match end {
        Ok(SessionEnd::Shutdown) => return SessionEnd::Shutdown,
        Ok(SessionEnd::Lost) => tracing::warn!("cluster connection lost; reconnecting"),
        Err(e) => {
            if e.to_string().contains("RESOURCE_LOCKED") {
                tracing::error!(node = %shared.node_id, "another router holds this node's queue: every node needs its own --node-id");
            } else {
                tracing::warn!(error = %e, "cluster connection failed; reconnecting");
            }
        }
    }
    SessionEnd::Lost
}

/// One session on `conn`: its channel and publisher, then the wait loop.
async fn session(
    st: &mut State,
    conn: &Connection,
    out: &mut mpsc::Receiver<Outgoing>,
    link_in: &mut mpsc::Receiver<Inbound>,
) -> lapin::Result<SessionEnd> {
    let ch = conn.create_channel().await?;
    let (mut pubr, mut publisher) = Publisher::start(&ch, st.links.clone());
    // The deny-list stream, replayed and followed for as long as the cluster session lasts.
    let deny = {
        let shared = st.shared.clone();
        let (read, write) = (conn.create_channel().await?, conn.create_channel().await?);
        tokio::spawn(async move {
            if let Err(e) = crate::revocation::stream::run(shared, read, write).await {
                tracing::warn!(error = %e, "deny-list stream failed; it is read again next session");
            }
        })
    };
    let end = session_loop(st, conn, &ch, &mut pubr, &mut publisher, out, link_in).await;
    deny.abort();
    if matches!(end, Ok(SessionEnd::Shutdown)) {
        // Let what is queued (releases, the leave) go out, briefly.
        drop(pubr);
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut publisher).await;
    }
    publisher.abort();
    end
}

/// A session begins: declare, count it, register every device again and join. Returns
/// when the session is ready (its peers have had time to answer the join).
async fn begin(st: &mut State, pubr: &mut Publisher) -> lapin::Result<Instant> {
    let shared = st.shared.clone();
    let c = cluster(&shared);
    c.metrics.sessions.fetch_add(1, Relaxed);
    st.session += 1;
    st.members.set_my_session(st.session);
    // After a reconnect, the others may be reconnecting too (a broker restart).
    let first = st.session == 1;
    let hold = if first { Duration::ZERO } else { PROBE_HOLD };
    st.members.restart_clock(Instant::now(), hold);
    // Our queue is new: whatever was sent to it before is gone. Register every device
    // again (at the homes known now; the registration pass after the join corrects what
    // the answers change), and tell everyone we are here.
    st.reregister_all = true;
    st.reregister();
    pubr.presence(st, PresenceBody::Join).await?;
    // A first session waits to hear its peers before it is ready; after a reconnect it
    // knows them already.
    if first {
        return Ok(Instant::now() + JOIN_WAIT);
    }
    c.joined.store(true, Relaxed);
    shared.update_ready();
    Ok(Instant::now())
}

/// Wait for whatever comes next (envelopes, presence, requests from the API, probe
/// verdicts, served outcomes, timers, trouble) and hand it to its handler.
async fn session_loop(
    st: &mut State,
    conn: &Connection,
    ch: &Channel,
    pubr: &mut Publisher,
    publisher: &mut JoinHandle<lapin::Error>,
    out: &mut mpsc::Receiver<Outgoing>,
    link_in: &mut mpsc::Receiver<Inbound>,
) -> lapin::Result<SessionEnd> {
    let pq = topology::declare(ch, st.me()).await?;
    let (mut node_in, mut presence_in) = topology::consume(ch, st.me(), &pq).await?;
    let joined_at = begin(st, pubr).await?;
    let shared = st.shared.clone();
    let c = cluster(&shared);
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
                serve::on_node_delivery(st, pubr, c, &d?.data).await?;
            }
            Some((from, bytes)) = link_in.recv() => {
                serve::on_link_envelope(st, pubr, c, &from, &bytes).await?;
            }
            d = presence_in.next() => {
                let Some(d) = d else { return Ok(SessionEnd::Lost) };
                presence::on_presence(st, pubr, c, &d?.data).await?;
            }
            e = &mut *publisher => {
                let e = e.unwrap_or_else(|j| lapin::Error::from(std::io::Error::other(j.to_string())));
                tracing::warn!(error = %e, "cluster publishing failed");
                return Ok(SessionEnd::Lost);
            }
            o = out.recv(), if pubr.backlog() < PUBLISH_BACKLOG => {
                let Some(o) = o else { return Ok(SessionEnd::Shutdown) };
                serve::on_outgoing(st, pubr, c, o).await?;
            }
            Some((id, verdict)) = probes.next(), if !probes.is_empty() => {
                presence::on_probe(st, c, id, verdict);
            }
            Some((request, origin, outcome)) = st.serving.next(), if !st.serving.is_empty() => {
                serve::on_served(st, pubr, request, origin, outcome).await?;
            }
            _ = dir_tick.tick() => serve::on_directory_tick(st, pubr, c, ch).await?,
            _ = async { tokio::time::sleep_until(reregister_at.expect("guarded").into()).await }, if reregister_at.is_some() => {
                st.reregister();
                st.flush_directory(pubr).await?;
            }
            _ = beat.tick() => {
                if !presence::on_beat(st, pubr, c, (conn, ch), &mut probes, joined_at).await? {
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
                serve::on_shutdown(st, pubr).await?;
                return Ok(SessionEnd::Shutdown);
            }
        }
    }
}
