//! The API's side of the cluster: a request, event or lookup for a device, wherever it
//! is connected.
//!
//! A device connected to this node is served by its shard directly, with no broker in
//! the way (so requests to local devices keep working while the broker is away).
//! Otherwise the envelope goes to the device's home, which hands it to the node holding
//! the device (or answers itself: unknown, or moving); that node answers this one.
//! While the answer is "not found" the request is sent again after [`RETRY_OFFLINE`]
//! (doubling) for [`OFFLINE_GRACE`] (a device that just connected may not be registered
//! yet), then it is a 404. While the answer is "moving" (its node died or drained it) it
//! is sent again after [`RETRY_MOVING`] (doubling, capped) until its deadline, and
//! whenever the member set changes. Every try goes through the home, so it follows the
//! device wherever it reconnected. A node drops a second delivery of a request UUID it already holds and
//! answers a duplicate of a finished one with the same outcome.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::envelope::{NodeMsg, RequestOutcome, What};
use super::{Cluster, Dest};
use crate::shard::{Delivery, RequestMsg, RequestReply, ShardHandle, ShardMsg};
use crate::{unix_ms, Shared};

/// After a device was reported not connected, how long it is looked for before 404.
pub(crate) const OFFLINE_GRACE: Duration = Duration::from_millis(1000);
/// A device not found yet is asked for again after this, doubling (within the grace).
pub(crate) const RETRY_OFFLINE: Duration = Duration::from_millis(150);
/// A moving device (its node died or drained it) is asked for again after this,
/// doubling up to [`RETRY_CAP`].
pub(crate) const RETRY_MOVING: Duration = Duration::from_millis(250);
/// Without any answer for this long, where the device is is checked again (its node may
/// have died with the request, or the device moved), doubling up to [`RETRY_CAP`]: a
/// duplicate is dropped where it is already held, and a slow broker is not sent more
/// the slower it gets.
pub(crate) const REASK: Duration = Duration::from_millis(2000);
/// The longest wait between two tries.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(4);
/// A lookup (`GET /v1/devices/{id}`) gives up after this.
const LOCATE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn cluster(shared: &Shared) -> &Cluster {
    // Only called in --amqp mode, where `start` always creates it.
    shared
        .cluster
        .as_ref()
        .expect("cluster code runs only with --amqp")
}

/// What became of a request routed through the cluster.
#[derive(Debug)]
pub(crate) enum Routed {
    Reply(RequestReply),
    /// No ack or response before the deadline.
    TimedOut,
    /// A shard inbox or the envelope queue is full, or the broker is away: 503.
    Busy,
}

/// What became of an event routed through the cluster.
#[derive(Debug)]
pub(crate) enum EventRouted {
    /// Handed to the device's connection, at this node (None: here).
    Sent(Option<String>),
    Delivery(Delivery),
    Busy,
}

/// A backend request for `r.device`, wherever it is, following the device if it moves,
/// until `r.deadline`.
pub(crate) async fn route_request(shared: &Arc<Shared>, r: RequestMsg) -> Routed {
    let RequestMsg {
        device,
        request,
        command,
        payload,
        wait_response,
        deadline,
        ..
    } = r;
    let what = What::Command {
        command: command.clone(),
        payload: payload.clone(),
        wait_response,
    };
    let local = |reply| {
        ShardMsg::Request(Box::new(RequestMsg {
            device,
            request,
            command: command.clone(),
            payload: payload.clone(),
            wait_response,
            deadline,
            reply,
        }))
    };
    match route(shared, device, request, deadline, what, local).await {
        Step::Local(r) | Step::Remote(_, r) => Routed::Reply(r),
        Step::Offline => Routed::Reply(RequestReply::Offline),
        Step::TimedOut => Routed::TimedOut,
        Step::Busy => Routed::Busy,
    }
}

/// A backend event for a device, wherever it is (202 when handed to its connection).
pub(crate) async fn route_event(shared: &Arc<Shared>, device: Uuid, body: Vec<u8>) -> EventRouted {
    let deadline = Instant::now() + Duration::from_secs(5);
    let what = What::Event { body: body.clone() };
    // Events have no request UUID of their own: one is made for the trip.
    let local_event = move |reply: oneshot::Sender<RequestReply>| {
        let (etx, erx) = oneshot::channel();
        let msg = ShardMsg::Event {
            device,
            body: body.clone(),
            reply: etx,
        };
        tokio::spawn(async move {
            let r = match erx.await {
                Ok(Delivery::Sent) => RequestReply::Acked,
                Ok(Delivery::Full) => RequestReply::Full,
                Ok(Delivery::NotJoined) => RequestReply::Responded {
                    ok: false,
                    result: None,
                },
                _ => RequestReply::Offline,
            };
            let _ = reply.send(r);
        });
        msg
    };
    match route(shared, device, Uuid::new_v4(), deadline, what, local_event).await {
        Step::Local(RequestReply::Acked) => EventRouted::Sent(None),
        Step::Remote(node, RequestReply::Acked) => EventRouted::Sent(Some(node)),
        Step::Local(RequestReply::Full) | Step::Remote(_, RequestReply::Full) => {
            EventRouted::Delivery(Delivery::Full)
        }
        Step::Local(RequestReply::Responded { .. })
        | Step::Remote(_, RequestReply::Responded { .. }) => {
            EventRouted::Delivery(Delivery::NotJoined)
        }
        Step::Local(_) | Step::Remote(..) | Step::Offline | Step::TimedOut => {
            EventRouted::Delivery(Delivery::Offline)
        }
        Step::Busy => EventRouted::Busy,
    }
}

/// Which node holds `device`, if any (asked of its home).
pub(crate) async fn locate(shared: &Arc<Shared>, device: Uuid) -> Result<Option<String>, ()> {
    let c = cluster(shared);
    if c.is_local(&device) {
        return Ok(Some(c.node.clone()));
    }
    if !c.joined() {
        return Err(());
    }
    let request = Uuid::new_v4();
    let mut replies = c.expect_replies(request);
    let msg = NodeMsg::Request {
        request: request.as_u128(),
        device: device.as_u128(),
        origin: c.node.clone(),
        hops: 0,
        deadline_unix_ms: unix_ms() + LOCATE_TIMEOUT.as_millis() as u64,
        what: What::Locate,
    };
    if c.send(Dest::HomeOf(device), msg).is_err() {
        return Err(());
    }
    match tokio::time::timeout(LOCATE_TIMEOUT, replies.rx.recv()).await {
        Ok(Some((_, RequestOutcome::At { node }))) => Ok(Some(node)),
        Ok(Some(_)) => Ok(None),
        _ => Err(()),
    }
}

enum Step {
    /// The local shard's answer.
    Local(RequestReply),
    /// A node's answer (the node that served it).
    Remote(String, RequestReply),
    Offline,
    TimedOut,
    Busy,
}

async fn route(
    shared: &Arc<Shared>,
    device: Uuid,
    request: Uuid,
    deadline: Instant,
    what: What,
    local_msg: impl Fn(oneshot::Sender<RequestReply>) -> ShardMsg,
) -> Step {
    let c = cluster(shared);
    let mut changes = c.subscribe();
    let mut replies = c.expect_replies(request);
    let mut local_rx: Option<oneshot::Receiver<RequestReply>> = None;
    let deadline_unix = unix_ms()
        + deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
    // When the device was first reported not connected (reset by "moving").
    let mut offline_since: Option<Instant> = None;
    let mut send_now = true;
    let mut sent_once = false;
    let mut retry_at: Option<Instant> = None;
    // Tries so far of each kind, for their backoff.
    let (mut reasks, mut offline_tries, mut moving_tries) = (0u32, 0u32, 0u32);
    let backoff = |base: Duration, n: &mut u32| {
        let d = base.saturating_mul(1 << (*n).min(5)).min(RETRY_CAP);
        *n += 1;
        Instant::now() + d
    };
    loop {
        if send_now {
            send_now = false;
            changes.borrow_and_update();
            // Look again if nothing answers (an answer sets its own retry).
            retry_at = Some(backoff(REASK, &mut reasks));
            if c.is_local(&device) {
                if local_rx.is_none() {
                    let (tx, rx) = oneshot::channel();
                    if ShardHandle::send_to_owner(&shared.shards, &device, local_msg(tx)).is_err() {
                        shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
                        return Step::Busy;
                    }
                    local_rx = Some(rx);
                }
            } else if !c.joined() {
                // Not here, and no broker to ask where: say so now rather than at the
                // deadline.
                if !sent_once {
                    return Step::Busy;
                }
            } else {
                // (A request still held by the local shard stays there: if the device
                // comes back here, the shard sends it again.)
                let msg = NodeMsg::Request {
                    request: request.as_u128(),
                    device: device.as_u128(),
                    origin: c.node.clone(),
                    hops: 0,
                    deadline_unix_ms: deadline_unix,
                    what: what.clone(),
                };
                if c.send(Dest::HomeOf(device), msg).is_err() {
                    return Step::Busy;
                }
                let m = &c.metrics;
                if sent_once {
                    m.requests_retried.fetch_add(1, Relaxed);
                } else {
                    m.requests_forwarded.fetch_add(1, Relaxed);
                }
            }
            sent_once = true;
        }
        let give_up = match offline_since {
            Some(t) => deadline.min(t + OFFLINE_GRACE),
            None => deadline,
        };
        let retry = retry_at.unwrap_or(give_up);
        tokio::select! {
            r = async { local_rx.as_mut().expect("guarded").await }, if local_rx.is_some() => {
                local_rx = None;
                match r {
                    Ok(RequestReply::Offline) => {
                        offline_since.get_or_insert_with(Instant::now);
                        retry_at = Some(backoff(RETRY_OFFLINE, &mut offline_tries));
                    }
                    Ok(other) => return Step::Local(other),
                    // The shard dropped it: its deadline passed.
                    Err(_) => {}
                }
            }
            Some((from, outcome)) = replies.rx.recv() => {
                match outcome {
                    RequestOutcome::Acked => return Step::Remote(from, RequestReply::Acked),
                    RequestOutcome::Responded { ok, result } => {
                        return Step::Remote(from, RequestReply::Responded { ok, result })
                    }
                    RequestOutcome::Full => return Step::Remote(from, RequestReply::Full),
                    RequestOutcome::NotJoined => {
                        return Step::Remote(from, RequestReply::Responded { ok: false, result: None })
                    }
                    RequestOutcome::Offline => {
                        offline_since.get_or_insert_with(Instant::now);
                        retry_at = Some(backoff(RETRY_OFFLINE, &mut offline_tries));
                    }
                    RequestOutcome::Moving => {
                        offline_since = None;
                        retry_at = Some(backoff(RETRY_MOVING, &mut moving_tries));
                    }
                    RequestOutcome::At { .. } | RequestOutcome::Expired => {}
                }
            }
            // The member set changed: the home may have too, and the directory is being
            // rebuilt (claims move to their new homes): "not found" said before this is
            // stale, so the grace starts again.
            _ = changes.changed() => {
                send_now = true;
                offline_since = None;
                offline_tries = 0;
            }
            _ = tokio::time::sleep_until(retry.into()), if retry_at.is_some() => send_now = true,
            _ = tokio::time::sleep_until(give_up.into()) => {
                return if offline_since.is_some() && Instant::now() < deadline {
                    Step::Offline
                } else {
                    Step::TimedOut
                };
            }
        }
        if retry_at.is_some_and(|t| t >= give_up) {
            retry_at = None;
        }
    }
}
