//! Several router nodes on one RabbitMQ (`--amqp`): presence, envelopes between nodes,
//! and routing a backend request to whichever node holds the device.
//!
//! **Topology** (declared by every node on every (re)connect):
//! - `hive.nodes` (direct, durable) with one queue per node, `hive.node.<node-id>`,
//!   bound **once** with routing key = the node id. The queue is exclusive to the
//!   node's connection: when a node dies its queue goes with it, so nothing piles up
//!   for a node that will never read it (its requests are retried elsewhere by the
//!   node that took them, see [`route_request`]).
//! - `hive.presence` (fanout, durable) with one server-named exclusive queue per node.
//!   A node announces the devices it gains and loses in batches ([`DELTA_EVERY`]),
//!   a heartbeat with its device count every second, a full snapshot when it (re)joins
//!   or when asked; every node keeps `device -> node` in memory ([`super::presence`]).
//!   A node silent for [`super::presence::NODE_TIMEOUT`] is forgotten.
//!
//! There is never a binding per device: a connect storm of 200,000 devices is a few
//! hundred presence messages, and a node dying is one queue with one binding going.
//!
//! **A request for a device on another node** ([`route_request`], called by the API):
//! sent as an rkyv envelope to the owner's queue; the owner hands it to the device's
//! shard exactly like a local request and sends the outcome back to the origin's
//! queue. Whenever the presence map says the device moved (or its node died and it
//! reconnected elsewhere), the origin sends the request again to the new owner,
//! within the original deadline; a node drops a second delivery of a request UUID it
//! already holds, and answers a duplicate of a finished one with the same outcome.
//!
//! This runs as one task beside the event publisher on the bridge thread, on its own
//! channel of the bridge's single connection. It never blocks a shard: it reaches
//! them through their bounded inboxes and gives up (answering `Full`) when one is full.

use std::collections::HashMap;
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
use lapin::{BasicProperties, Channel, ExchangeKind};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::envelope::{
    encode_node, encode_presence, ArchivedNodeMsg, ArchivedOutcome, ArchivedPresenceBody, NodeMsg,
    Outcome, PresenceBody, PresenceMsg, Received, MAX_DEADLINE_MS,
};
use super::presence::{Owner, Presence, HEARTBEAT};
use crate::shard::{shard_of, RequestMsg, RequestReply, ShardMsg};
use crate::{unix_ms, Shared};

pub const NODES_EXCHANGE: &str = "hive.nodes";
pub const PRESENCE_EXCHANGE: &str = "hive.presence";
/// Local presence changes are batched this long before they are announced.
pub const DELTA_EVERY: Duration = Duration::from_millis(100);
/// Devices per snapshot message (16 bytes each).
const SNAPSHOT_PART: usize = 10_000;
/// After a node says a device is offline, wait this long for news of it elsewhere
/// before answering 404.
const OFFLINE_GRACE: Duration = Duration::from_millis(1000);
/// How long a finished request's outcome is remembered (to answer duplicates).
const REMEMBER: Duration = Duration::from_secs(30);

pub fn node_queue(node: &str) -> String {
    format!("hive.node.{node}")
}

fn presence(shared: &Shared) -> &Presence {
    // Only called in --amqp mode, where `start` always creates it.
    shared
        .presence
        .as_ref()
        .expect("cluster code runs only with --amqp")
}

/// Declare the cluster topology on `ch` (a channel of the bridge's connection).
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

/// A request this node serves for a peer.
enum Served {
    InFlight,
    Done(Outcome, Instant),
}

type ServeFut =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u128, String, Outcome)> + Send>>;

/// One connected session of the cluster side. Returns when the channel fails or the
/// process stops (after announcing `Leaving`).
pub async fn session(shared: Arc<Shared>, ch: Channel) -> lapin::Result<()> {
    let p = presence(&shared);
    let node = shared.node_id.clone();
    let pq = declare(&ch, &node).await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let mut node_in = ch
        .basic_consume(
            node_queue(&node).as_str().into(),
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
    let mut out = p.outgoing().await;
    let pub_ = Publisher {
        ch: ch.clone(),
        node: node.clone(),
        incarnation: p.incarnation,
        shared: shared.clone(),
    };
    // (Re)joining: ask everyone for their devices and tell them ours.
    pub_.presence(PresenceBody::SnapshotRequest { target: None })
        .await?;
    pub_.snapshot().await?;

    let mut served: HashMap<u128, Served> = HashMap::new();
    let mut serving: FuturesUnordered<ServeFut> = FuturesUnordered::new();
    let mut delta_tick = tokio::time::interval(DELTA_EVERY);
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            d = node_in.next() => {
                let Some(d) = d else { return Ok(()) };
                let d = d?;
                p.metrics.envelopes_received.fetch_add(1, Relaxed);
                let r = Received::new(&d.data);
                match r.node() {
                    Ok(m) => on_node_msg(&shared, &pub_, m, &mut served, &mut serving).await?,
                    Err(e) => {
                        p.metrics.bad_envelopes.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "bad envelope on the node queue");
                    }
                }
            }
            d = presence_in.next() => {
                let Some(d) = d else { return Ok(()) };
                let d = d?;
                let r = Received::new(&d.data);
                let m = match r.presence() {
                    Ok(m) => m,
                    Err(e) => {
                        p.metrics.bad_envelopes.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "bad presence message");
                        continue;
                    }
                };
                if m.node.as_str() == node {
                    continue;
                }
                p.metrics.presence_received.fetch_add(1, Relaxed);
                // The archived form is read in place for the common messages.
                let body = match &m.body {
                    ArchivedPresenceBody::SnapshotRequest { target } => {
                        let for_us = target.as_ref().is_none_or(|t| t.as_str() == node);
                        if for_us {
                            pub_.snapshot().await?;
                        }
                        PresenceBody::SnapshotRequest { target: None }
                    }
                    other => match rkyv::deserialize::<PresenceBody, rkyv::rancor::Error>(other) {
                        Ok(b) => b,
                        Err(_) => {
                            p.metrics.bad_envelopes.fetch_add(1, Relaxed);
                            continue;
                        }
                    },
                };
                if let Some(ask) = p.apply(m.node.as_str(), m.incarnation.to_native(), &body) {
                    tracing::info!(node = %ask, "presence out of step with a peer: asking for its snapshot");
                    pub_.presence(PresenceBody::SnapshotRequest { target: Some(ask) }).await?;
                }
            }
            o = out.recv() => {
                let Some(o) = o else { return Ok(()) };
                pub_.node(&o.node, &o.msg).await?;
            }
            Some((request, origin, outcome)) = serving.next(), if !serving.is_empty() => {
                served.insert(request, Served::Done(outcome.clone(), Instant::now() + REMEMBER));
                let from = node.clone();
                pub_.node(&origin, &NodeMsg::Reply { request, from, outcome }).await?;
            }
            _ = delta_tick.tick() => {
                let changes = p.take_outbox();
                if !changes.is_empty() {
                    pub_.presence(PresenceBody::Delta { changes }).await?;
                }
            }
            _ = beat.tick() => {
                pub_.presence(PresenceBody::Heartbeat { devices: p.local_count() }).await?;
                for gone in p.expire() {
                    tracing::warn!(node = %gone, "router node stopped announcing: forgetting its devices");
                }
                let now = Instant::now();
                served.retain(|_, s| match s {
                    Served::InFlight => true,
                    Served::Done(_, until) => *until > now,
                });
            }
            _ = shutdown.changed() => {
                if !*shutdown.borrow_and_update() {
                    continue;
                }
                let changes = p.take_outbox();
                if !changes.is_empty() {
                    pub_.presence(PresenceBody::Delta { changes }).await?;
                }
                pub_.presence(PresenceBody::Leaving).await?;
                return Ok(());
            }
        }
    }
}

struct Publisher {
    ch: Channel,
    node: String,
    incarnation: u64,
    shared: Arc<Shared>,
}

impl Publisher {
    async fn presence(&self, body: PresenceBody) -> lapin::Result<()> {
        let bytes = encode_presence(&PresenceMsg {
            node: self.node.clone(),
            incarnation: self.incarnation,
            body,
        });
        presence(&self.shared)
            .metrics
            .presence_sent
            .fetch_add(1, Relaxed);
        self.ch
            .basic_publish(
                PRESENCE_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                &bytes,
                BasicProperties::default(),
            )
            .await?;
        Ok(())
    }

    async fn snapshot(&self) -> lapin::Result<()> {
        let p = presence(&self.shared);
        let (pending, all) = p.snapshot();
        drop(pending); // the snapshot below supersedes these changes
        p.metrics.snapshots_sent.fetch_add(1, Relaxed);
        let parts = all.chunks(SNAPSHOT_PART).count().max(1);
        for i in 0..parts {
            let devices = all
                .get(i * SNAPSHOT_PART..((i + 1) * SNAPSHOT_PART).min(all.len()))
                .unwrap_or_default()
                .to_vec();
            self.presence(PresenceBody::Snapshot {
                part: i as u32,
                last: i + 1 == parts,
                devices,
            })
            .await?;
        }
        Ok(())
    }

    async fn node(&self, to: &str, m: &NodeMsg) -> lapin::Result<()> {
        let bytes = encode_node(m);
        presence(&self.shared)
            .metrics
            .envelopes_sent
            .fetch_add(1, Relaxed);
        self.ch
            .basic_publish(
                NODES_EXCHANGE.into(),
                to.into(),
                BasicPublishOptions::default(),
                &bytes,
                BasicProperties::default(),
            )
            .await?;
        Ok(())
    }
}

fn outcome_of(r: RequestReply) -> Outcome {
    match r {
        RequestReply::Offline => Outcome::Offline,
        RequestReply::Full => Outcome::Full,
        RequestReply::Acked => Outcome::Acked,
        RequestReply::Responded { ok, result } => Outcome::Responded { ok, result },
    }
}

fn reply_of(o: Outcome) -> Option<RequestReply> {
    match o {
        Outcome::Acked => Some(RequestReply::Acked),
        Outcome::Responded { ok, result } => Some(RequestReply::Responded { ok, result }),
        Outcome::Full => Some(RequestReply::Full),
        Outcome::Offline => Some(RequestReply::Offline),
        Outcome::Expired => None,
    }
}

/// Unix-ms deadline -> local instant, capped so a skewed clock cannot keep it forever.
fn local_deadline(unix_deadline: u64) -> Option<Instant> {
    let now = unix_ms();
    let left = unix_deadline.checked_sub(now)?.min(MAX_DEADLINE_MS);
    (left > 0).then(|| Instant::now() + Duration::from_millis(left))
}

async fn on_node_msg(
    shared: &Arc<Shared>,
    pub_: &Publisher,
    m: &ArchivedNodeMsg,
    served: &mut HashMap<u128, Served>,
    serving: &mut FuturesUnordered<ServeFut>,
) -> lapin::Result<()> {
    let p = presence(shared);
    match m {
        ArchivedNodeMsg::Request {
            request,
            device,
            origin,
            command,
            payload,
            wait_response,
            deadline_unix_ms,
        } => {
            let request = request.to_native();
            match served.get(&request) {
                Some(Served::InFlight) => {
                    p.metrics.duplicates_dropped.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Some(Served::Done(o, _)) => {
                    p.metrics.duplicates_dropped.fetch_add(1, Relaxed);
                    let reply = NodeMsg::Reply {
                        request,
                        from: shared.node_id.clone(),
                        outcome: o.clone(),
                    };
                    return pub_.node(origin.as_str(), &reply).await;
                }
                None => {}
            }
            let origin = origin.as_str().to_string();
            let Some(deadline) = local_deadline(deadline_unix_ms.to_native()) else {
                let reply = NodeMsg::Reply {
                    request,
                    from: shared.node_id.clone(),
                    outcome: Outcome::Expired,
                };
                return pub_.node(&origin, &reply).await;
            };
            let device = Uuid::from_u128(device.to_native());
            let (tx, rx) = oneshot::channel();
            let msg = RequestMsg {
                device,
                request: Uuid::from_u128(request),
                command: command.as_str().to_string(),
                payload: payload.as_slice().to_vec(),
                wait_response: *wait_response,
                deadline,
                reply: tx,
            };
            let shard = shard_of(&device, shared.shards.len());
            if shared.shards[shard]
                .send(ShardMsg::Request(Box::new(msg)))
                .is_err()
            {
                shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
                let reply = NodeMsg::Reply {
                    request,
                    from: shared.node_id.clone(),
                    outcome: Outcome::Full,
                };
                return pub_.node(&origin, &reply).await;
            }
            p.metrics.requests_served_for_peers.fetch_add(1, Relaxed);
            served.insert(request, Served::InFlight);
            serving.push(Box::pin(async move {
                let outcome = match tokio::time::timeout_at(deadline.into(), rx).await {
                    Ok(Ok(r)) => outcome_of(r),
                    _ => Outcome::Expired,
                };
                (request, origin, outcome)
            }));
        }
        ArchivedNodeMsg::Reply {
            request,
            from,
            outcome,
        } => {
            let outcome = match outcome {
                ArchivedOutcome::Acked => Outcome::Acked,
                ArchivedOutcome::Offline => Outcome::Offline,
                ArchivedOutcome::Full => Outcome::Full,
                ArchivedOutcome::Expired => Outcome::Expired,
                ArchivedOutcome::Responded { ok, result } => Outcome::Responded {
                    ok: *ok,
                    result: result.as_ref().map(|r| r.as_slice().to_vec()),
                },
            };
            let request = Uuid::from_u128(request.to_native());
            p.deliver_reply(request, from.as_str().to_string(), outcome);
        }
        ArchivedNodeMsg::Event { device, body } => {
            let device = Uuid::from_u128(device.to_native());
            let (tx, _rx) = oneshot::channel();
            let shard = shard_of(&device, shared.shards.len());
            let msg = ShardMsg::Event {
                device,
                body: body.as_slice().to_vec(),
                reply: tx,
            };
            if shared.shards[shard].send(msg).is_err() {
                shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
            }
        }
    }
    Ok(())
}

/// What became of a request routed through the cluster.
#[derive(Debug)]
pub enum Routed {
    Reply(RequestReply),
    /// No ack or response before the deadline.
    TimedOut,
    /// A shard inbox or the envelope queue is full: 503.
    Busy,
}

/// A backend request for `r.device`, wherever it is: the local shard or another
/// node, following the device if it moves, until `r.deadline`.
pub async fn route_request(shared: &Arc<Shared>, r: RequestMsg) -> Routed {
    let p = presence(shared);
    let RequestMsg {
        device,
        request,
        command,
        payload,
        wait_response,
        deadline,
        ..
    } = r;
    let mut changes = p.subscribe();
    let mut replies = p.expect_replies(request);
    let mut local_rx: Option<oneshot::Receiver<RequestReply>> = None;
    let mut target: Option<Owner> = None;
    let mut offline_since: Option<Instant> = None;
    let deadline_unix = unix_ms()
        + deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
    loop {
        changes.borrow_and_update();
        let owner = p.owner(&device);
        match &owner {
            None if target.is_none() => return Routed::Reply(RequestReply::Offline),
            None => {}
            Some(o) if Some(o) == target.as_ref() => {}
            Some(Owner::Local) if local_rx.is_some() => {}
            Some(Owner::Local) => {
                let (tx, rx) = oneshot::channel();
                let msg = RequestMsg {
                    device,
                    request,
                    command: command.clone(),
                    payload: payload.clone(),
                    wait_response,
                    deadline,
                    reply: tx,
                };
                let shard = shard_of(&device, shared.shards.len());
                if shared.shards[shard]
                    .send(ShardMsg::Request(Box::new(msg)))
                    .is_err()
                {
                    shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
                    return Routed::Busy;
                }
                local_rx = Some(rx);
            }
            Some(Owner::Remote(n)) => {
                let msg = NodeMsg::Request {
                    request: request.as_u128(),
                    device: device.as_u128(),
                    origin: shared.node_id.clone(),
                    command: command.clone(),
                    payload: payload.clone(),
                    wait_response,
                    deadline_unix_ms: deadline_unix,
                };
                if p.send(n.clone(), msg).is_err() {
                    return Routed::Busy;
                }
                p.metrics.requests_forwarded.fetch_add(1, Relaxed);
            }
        }
        if let Some(o) = owner {
            if target.as_ref().is_some_and(|t| *t != o) {
                p.metrics.requests_rerouted.fetch_add(1, Relaxed);
            }
            if target.as_ref() != Some(&o) {
                offline_since = None;
            }
            target = Some(o);
        }
        let wait_until = match offline_since {
            Some(t) => deadline.min(t + OFFLINE_GRACE),
            None => deadline,
        };
        tokio::select! {
            r = async { local_rx.as_mut().expect("guarded").await }, if local_rx.is_some() => {
                local_rx = None;
                match r {
                    Ok(RequestReply::Offline) => {
                        if target == Some(Owner::Local) {
                            offline_since = Some(Instant::now());
                        }
                    }
                    Ok(other) => return Routed::Reply(other),
                    // The shard dropped it: its deadline passed.
                    Err(_) => {}
                }
            }
            Some((from, outcome)) = replies.rx.recv() => {
                let from_target = target.as_ref() == Some(&Owner::Remote(from));
                match reply_of(outcome) {
                    Some(RequestReply::Offline) | None => {
                        if from_target {
                            offline_since = Some(Instant::now());
                        }
                    }
                    Some(other) => return Routed::Reply(other),
                }
            }
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(wait_until.into()) => {
                return if offline_since.is_some() && Instant::now() < deadline {
                    Routed::Reply(RequestReply::Offline)
                } else {
                    Routed::TimedOut
                };
            }
        }
    }
}

/// Where to deliver a backend event: Ok(None) local shard, Ok(Some(node)) forwarded.
pub fn route_event(
    shared: &Shared,
    device: Uuid,
    body: &[u8],
) -> Result<Option<String>, super::presence::QueueFull> {
    let p = presence(shared);
    match p.owner(&device) {
        Some(Owner::Remote(n)) => {
            p.send(
                n.clone(),
                NodeMsg::Event {
                    device: device.as_u128(),
                    body: body.to_vec(),
                },
            )?;
            Ok(Some(n))
        }
        _ => Ok(None),
    }
}

/// The node holding `device`, when it is another node.
pub struct RemoteOwner(pub String);

pub fn remote_owner(p: &Presence, device: &Uuid) -> Option<RemoteOwner> {
    match p.owner(device)? {
        Owner::Remote(n) => Some(RemoteOwner(n)),
        Owner::Local => None,
    }
}
