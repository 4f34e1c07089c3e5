//! Node messages: requests this node serves (for a peer, or for its own API as the
//! device's owner or home), replies to requests it sent, and directory changes.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use lapin::Channel;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::super::directory::Lookup;
use super::super::envelope::{
    ArchivedNodeMsg, NodeMsg, PresenceBody, Received, RequestOutcome, What, MAX_DEADLINE_MS,
};
use super::super::membership::ME;
use super::super::route::cluster;
use super::super::seal::{unsealed, Domain};
use super::super::{Cluster, Dest, Outgoing};
use super::publisher::Publisher;
use super::state::{ServeFut, Served, State};
use crate::shard::{Delivery, RequestMsg, RequestReply, ShardHandle, ShardMsg};
use crate::unix_ms;

/// How long a finished request's outcome is remembered (to answer duplicates).
const REMEMBER: Duration = Duration::from_secs(30);

/// An envelope from the API or a shard here: to its node, or handled here when that is
/// this node.
pub(super) async fn on_outgoing(
    st: &mut State,
    pubr: &mut Publisher,
    c: &Cluster,
    o: Outgoing,
) -> lapin::Result<()> {
    let Dest::HomeOf(d) = o.to;
    let home = st.members.home(d.as_u128());
    match st.members.name(home).map(str::to_string) {
        Some(n) if home != ME => pubr.node(c, &n, &o.msg).await,
        _ => on_node_msg(st, pubr, o.msg).await,
    }
}

/// A request served here has its outcome: remember it (to answer duplicates) unless it
/// may change, and tell its origin.
pub(super) async fn on_served(
    st: &mut State,
    pubr: &mut Publisher,
    request: u128,
    origin: String,
    outcome: RequestOutcome,
) -> lapin::Result<()> {
    let terminal = !matches!(outcome, RequestOutcome::Offline | RequestOutcome::Moving);
    if terminal {
        st.served.insert(
            request,
            Served::Done(outcome.clone(), Instant::now() + REMEMBER),
        );
    } else {
        st.served.remove(&request);
    }
    reply(st, pubr, &origin, request, outcome).await
}

/// An envelope from this node's queue.
pub(super) async fn on_node_delivery(
    st: &mut State,
    pubr: &mut Publisher,
    c: &Cluster,
    data: &[u8],
) -> lapin::Result<()> {
    c.metrics.envelopes_received.fetch_add(1, Relaxed);
    let Some(data) = open(c, data) else {
        return Ok(());
    };
    match decode(data) {
        Some(m) => on_node_msg(st, pubr, m).await,
        None => {
            c.metrics.bad_envelopes.fetch_add(1, Relaxed);
            Ok(())
        }
    }
}

/// An envelope from a peer's direct link. Only the latency path travels on links;
/// anything else is refused (directory changes must come through the broker, in order).
pub(super) async fn on_link_envelope(
    st: &mut State,
    pubr: &mut Publisher,
    c: &Cluster,
    from: &str,
    bytes: &[u8],
) -> lapin::Result<()> {
    c.metrics.envelopes_received.fetch_add(1, Relaxed);
    let Some(bytes) = open(c, bytes) else {
        tracing::debug!(peer = %from, "forged envelope on a cluster link");
        return Ok(());
    };
    match decode(bytes) {
        Some(m @ (NodeMsg::Request { .. } | NodeMsg::Reply { .. })) => {
            on_node_msg(st, pubr, m).await
        }
        _ => {
            tracing::debug!(peer = %from, "bad envelope on a cluster link");
            c.metrics.bad_envelopes.fetch_add(1, Relaxed);
            Ok(())
        }
    }
}

/// The envelope inside sealed bytes addressed to this node; None (counted) when the
/// seal does not verify.
fn open<'a>(c: &Cluster, sealed: &'a [u8]) -> Option<&'a [u8]> {
    match c.key.open(Domain::Node, &c.node, sealed) {
        Ok((message, _)) => Some(message),
        Err(_) => {
            c.metrics.forged.fetch_add(1, Relaxed);
            None
        }
    }
}

fn decode(bytes: &[u8]) -> Option<NodeMsg> {
    let r = Received::new(bytes);
    let a = r.node().ok()?;
    rkyv::deserialize::<NodeMsg, rkyv::rancor::Error>(a).ok()
}

/// Every [`super::DIRECTORY_EVERY`]: requests held for devices that just left are told
/// "moving", the directory changes go out, and envelopes the broker returned are
/// answered.
pub(super) async fn on_directory_tick(
    st: &mut State,
    pubr: &mut Publisher,
    c: &Cluster,
    ch: &Channel,
) -> lapin::Result<()> {
    for (request, origin) in st.take_local() {
        reply(st, pubr, &origin, request, RequestOutcome::Moving).await?;
    }
    st.flush_directory(pubr).await?;
    // Envelopes the broker returned (no confirms are pending on this channel, so this
    // only collects what came back).
    for r in ch.wait_for_confirms().await? {
        let to = r.delivery.routing_key.as_str().to_string();
        // Our own envelope, as we sealed it.
        let msg = Received::new(unsealed(&r.delivery.data));
        let request = match msg.node() {
            Ok(ArchivedNodeMsg::Request {
                request, origin, ..
            }) => Some((request.to_native(), origin.as_str().to_string())),
            _ => None,
        };
        c.metrics.envelopes_returned.fetch_add(1, Relaxed);
        // The node's queue is gone: it died, or it is reconnecting (its connection was
        // closed). Only silence makes it a suspect: a node that is back within
        // SUSPECT_AFTER has said so by then.
        tracing::debug!(node = %to, "envelope returned: the node's queue is gone");
        if let Some((request, origin)) = request {
            reply(st, pubr, &origin, request, RequestOutcome::Moving).await?;
        }
    }
    Ok(())
}

/// Shutdown: releases of the devices the drain closed go out first, then the leave.
pub(super) async fn on_shutdown(st: &mut State, pubr: &mut Publisher) -> lapin::Result<()> {
    for (request, origin) in st.take_local() {
        reply(st, pubr, &origin, request, RequestOutcome::Moving).await?;
    }
    st.flush_directory(pubr).await?;
    pubr.presence(st, PresenceBody::Leaving).await
}

pub(super) async fn on_node_msg(
    st: &mut State,
    pubr: &mut Publisher,
    m: NodeMsg,
) -> lapin::Result<()> {
    match m {
        NodeMsg::Reply {
            request,
            from,
            outcome,
        } => {
            st.c()
                .deliver_reply(Uuid::from_u128(request), from, outcome);
            Ok(())
        }
        NodeMsg::Directory {
            from,
            incarnation,
            session,
            changes,
        } => {
            if from != st.me() {
                st.c()
                    .metrics
                    .directory_changes_received
                    .fetch_add(changes.len() as u64, Relaxed);
                // Not from a node that has left since (its changes are stale).
                if let Some(id) = st.heard(&from, incarnation, session, None) {
                    st.apply_directory(id, &changes);
                }
            }
            Ok(())
        }
        NodeMsg::Resync { from } => {
            if let Some(id) = st.members.id(&from) {
                st.reset.push(id);
                st.schedule_reregister();
            }
            Ok(())
        }
        NodeMsg::Request {
            request,
            device,
            origin,
            hops,
            deadline_unix_ms,
            what,
        } => {
            let r = Request {
                request,
                device,
                origin,
                hops,
                deadline_unix_ms,
                what,
            };
            on_request(st, pubr, r).await
        }
    }
}

/// The fields of a `NodeMsg::Request`.
struct Request {
    request: u128,
    device: u128,
    origin: String,
    hops: u8,
    deadline_unix_ms: u64,
    what: What,
}

async fn on_request(st: &mut State, pubr: &mut Publisher, r: Request) -> lapin::Result<()> {
    let shared = st.shared.clone();
    let c = cluster(&shared);
    // A duplicate of a request finished here gets the same answer again.
    if let Some(Served::Done(o, _)) = st.served.get(&r.request) {
        c.metrics.duplicates_dropped.fetch_add(1, Relaxed);
        let o = o.clone();
        return reply(st, pubr, &r.origin, r.request, o).await;
    }
    let Some(deadline) = local_deadline(r.deadline_unix_ms) else {
        return reply(st, pubr, &r.origin, r.request, RequestOutcome::Expired).await;
    };
    let dev = Uuid::from_u128(r.device);
    if c.is_local(&dev) {
        return on_local_request(st, pubr, r, dev, deadline).await;
    }
    if r.hops > 0 {
        return reply(st, pubr, &r.origin, r.request, RequestOutcome::Offline).await;
    }
    // We are (or were told we are) the device's home.
    on_request_at_home(st, pubr, r, &dev).await
}

/// A request for a device connected here.
async fn on_local_request(
    st: &mut State,
    pubr: &mut Publisher,
    r: Request,
    dev: Uuid,
    deadline: Instant,
) -> lapin::Result<()> {
    let c = st.c();
    // Held by the shard here already: the device gets it once (again on its reconnect
    // here, by the shard).
    if let Some(Served::InFlight { .. }) = st.served.get(&r.request) {
        c.metrics.duplicates_dropped.fetch_add(1, Relaxed);
        return Ok(());
    }
    if matches!(r.what, What::Locate) {
        let node = st.me().to_string();
        return reply(st, pubr, &r.origin, r.request, RequestOutcome::At { node }).await;
    }
    if r.origin != st.me() {
        c.metrics.requests_served_for_peers.fetch_add(1, Relaxed);
    }
    serve_here(st, pubr, r.request, dev, r.origin, deadline, r.what).await
}

/// A request at the device's home: relayed to the node the directory says holds it.
async fn on_request_at_home(
    st: &mut State,
    pubr: &mut Publisher,
    r: Request,
    dev: &Uuid,
) -> lapin::Result<()> {
    match st.dir.lookup(dev) {
        Lookup::At(owner) if owner != ME => {
            let Some(name) = st.members.name(owner).map(str::to_string) else {
                return reply(st, pubr, &r.origin, r.request, RequestOutcome::Moving).await;
            };
            if matches!(r.what, What::Locate) {
                return reply(
                    st,
                    pubr,
                    &r.origin,
                    r.request,
                    RequestOutcome::At { node: name },
                )
                .await;
            }
            let shared = st.shared.clone();
            let c = cluster(&shared);
            c.metrics.requests_relayed.fetch_add(1, Relaxed);
            let fwd = NodeMsg::Request {
                request: r.request,
                device: r.device,
                origin: r.origin,
                hops: 1,
                deadline_unix_ms: r.deadline_unix_ms,
                what: r.what,
            };
            pubr.node(c, &name, &fwd).await
        }
        Lookup::Moving => reply(st, pubr, &r.origin, r.request, RequestOutcome::Moving).await,
        Lookup::At(_) | Lookup::Unknown => {
            reply(st, pubr, &r.origin, r.request, RequestOutcome::Offline).await
        }
    }
}

pub(super) async fn reply(
    st: &mut State,
    pubr: &mut Publisher,
    origin: &str,
    request: u128,
    outcome: RequestOutcome,
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

fn outcome_of(r: RequestReply) -> RequestOutcome {
    match r {
        RequestReply::Offline => RequestOutcome::Offline,
        // (Told as a full queue: the caller on the other node gets 503.)
        RequestReply::Full | RequestReply::TooManyPending(_) => RequestOutcome::Full,
        RequestReply::Acked => RequestOutcome::Acked,
        RequestReply::Responded { ok, result } => RequestOutcome::Responded { ok, result },
    }
}

/// Unix-ms deadline -> local instant, capped so a skewed clock cannot keep it forever.
fn local_deadline(unix_deadline: u64) -> Option<Instant> {
    let now = unix_ms();
    let left = unix_deadline.checked_sub(now)?.min(MAX_DEADLINE_MS);
    (left > 0).then(|| Instant::now() + Duration::from_millis(left))
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
    let to = origin.clone();
    let fut = match what {
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
            command_to_shard(&st.shared.shards, msg, rx, to)
        }
        What::Event { body } => event_to_shard(&st.shared.shards, request, device, body, to),
        What::Locate => return Ok(()),
    };
    let Some(fut) = fut else {
        st.shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
        return reply(st, pubr, &origin, request, RequestOutcome::Full).await;
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

/// Hand a command to the device's shard; None if its inbox is full. The future ends
/// with the shard's answer, or `Expired` at the deadline.
fn command_to_shard(
    shards: &[ShardHandle],
    msg: RequestMsg,
    rx: oneshot::Receiver<RequestReply>,
    to: String,
) -> Option<ServeFut> {
    let (device, request, deadline) = (msg.device, msg.request.as_u128(), msg.deadline);
    ShardHandle::send_to_owner(shards, &device, ShardMsg::Request(Box::new(msg))).ok()?;
    Some(Box::pin(async move {
        let outcome = match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(r)) => outcome_of(r),
            _ => RequestOutcome::Expired,
        };
        (request, to, outcome)
    }))
}

/// Hand an event to the device's shard; None if its inbox is full.
fn event_to_shard(
    shards: &[ShardHandle],
    request: u128,
    device: Uuid,
    body: Vec<u8>,
    to: String,
) -> Option<ServeFut> {
    let (tx, rx) = oneshot::channel();
    let msg = ShardMsg::Event {
        device,
        body,
        reply: tx,
    };
    ShardHandle::send_to_owner(shards, &device, msg).ok()?;
    Some(Box::pin(async move {
        let outcome = match rx.await {
            Ok(Delivery::Sent) => RequestOutcome::Acked,
            Ok(Delivery::Full) => RequestOutcome::Full,
            Ok(Delivery::NotJoined) => RequestOutcome::NotJoined,
            Ok(Delivery::Offline) | Err(_) => RequestOutcome::Offline,
        };
        (request, to, outcome)
    }))
}
