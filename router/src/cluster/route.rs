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

/// Route a request or event for `device` until `deadline`: to its shard while it is
/// here, else through its home, sending again as answers and member changes say.
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
    let trip = Trip {
        shared,
        c,
        device,
        request,
        deadline_unix: unix_ms()
            + deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
        what,
        local_msg,
    };
    let mut tries = Tries::new();
    loop {
        if tries.send_now {
            tries.send_now = false;
            changes.borrow_and_update();
            if let Err(step) = trip.send(&mut tries, &mut local_rx) {
                return step;
            }
        }
        let give_up = tries.give_up(deadline);
        let retry = tries.retry_at.unwrap_or(give_up);
        tokio::select! {
            r = async { local_rx.as_mut().expect("guarded").await }, if local_rx.is_some() => {
                local_rx = None;
                if let Some(step) = tries.local_answer(r) {
                    return step;
                }
            }
            Some((from, outcome)) = replies.rx.recv() => {
                if let Some(step) = tries.remote_answer(from, outcome) {
                    return step;
                }
            }
            // The member set changed: the home may have too, and the directory is being
            // rebuilt (claims move to their new homes): "not found" said before this is
            // stale, so the grace starts again.
            _ = changes.changed() => tries.members_changed(),
            _ = tokio::time::sleep_until(retry.into()), if tries.retry_at.is_some() => {
                tries.send_now = true;
            }
            _ = tokio::time::sleep_until(give_up.into()) => return tries.gave_up(deadline),
        }
        if tries.retry_at.is_some_and(|t| t >= give_up) {
            tries.retry_at = None;
        }
    }
}

/// One routed request or event: what is sent, for which device, until when.
struct Trip<'a, F> {
    shared: &'a Arc<Shared>,
    c: &'a Cluster,
    device: Uuid,
    request: Uuid,
    /// The deadline as envelopes carry it (Unix milliseconds).
    deadline_unix: u64,
    what: What,
    /// The shard message for the device when it is here, answering on the sender given.
    local_msg: F,
}

impl<F: Fn(oneshot::Sender<RequestReply>) -> ShardMsg> Trip<'_, F> {
    /// One try: to the shard if the device is here, else to its home. Err: the end now.
    fn send(
        &self,
        tries: &mut Tries,
        local_rx: &mut Option<oneshot::Receiver<RequestReply>>,
    ) -> Result<(), Step> {
        // Look again if nothing answers (an answer sets its own retry).
        tries.retry_at = Some(Tries::backoff(REASK, &mut tries.reasks));
        if self.c.is_local(&self.device) {
            if local_rx.is_none() {
                *local_rx = Some(self.send_local()?);
            }
        } else if !self.c.joined() {
            // Not here, and no broker to ask where: say so now rather than at the
            // deadline.
            if !tries.sent_once {
                return Err(Step::Busy);
            }
        } else {
            // (A request still held by the local shard stays there: if the device
            // comes back here, the shard sends it again.)
            self.send_home(tries.sent_once)?;
        }
        tries.sent_once = true;
        Ok(())
    }

    /// Hand the request to the shard that holds the device; Err(Busy) when its inbox is full.
    fn send_local(&self) -> Result<oneshot::Receiver<RequestReply>, Step> {
        let (tx, rx) = oneshot::channel();
        if ShardHandle::send_to_owner(&self.shared.shards, &self.device, (self.local_msg)(tx))
            .is_err()
        {
            self.shared
                .metrics
                .api
                .shard_queue_full
                .fetch_add(1, Relaxed);
            return Err(Step::Busy);
        }
        Ok(rx)
    }

    /// Send the request to the device's home, counted as retried when `again`, else
    /// forwarded; Err(Busy) when the envelope queue is full.
    fn send_home(&self, again: bool) -> Result<(), Step> {
        let msg = NodeMsg::Request {
            request: self.request.as_u128(),
            device: self.device.as_u128(),
            origin: self.c.node.clone(),
            hops: 0,
            deadline_unix_ms: self.deadline_unix,
            what: self.what.clone(),
        };
        if self.c.send(Dest::HomeOf(self.device), msg).is_err() {
            return Err(Step::Busy);
        }
        let m = &self.c.metrics;
        if again {
            m.requests_retried.fetch_add(1, Relaxed);
        } else {
            m.requests_forwarded.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

/// Where a routed request stands between tries: when to send again, and why.
#[derive(Default)]
struct Tries {
    /// Send (again) at the top of the next pass.
    send_now: bool,
    sent_once: bool,
    retry_at: Option<Instant>,
    /// When the device was first reported not connected (reset by "moving").
    offline_since: Option<Instant>,
    // Tries so far of each kind, for their backoff.
    reasks: u32,
    offline_tries: u32,
    moving_tries: u32,
}

impl Tries {
    /// Nothing sent yet: the first pass sends.
    fn new() -> Self {
        Tries {
            send_now: true,
            ..Tries::default()
        }
    }

    /// When to try next: `base` doubled per try of its kind so far (`n`, counted), capped.
    fn backoff(base: Duration, n: &mut u32) -> Instant {
        let d = base.saturating_mul(1 << (*n).min(5)).min(RETRY_CAP);
        *n += 1;
        Instant::now() + d
    }

    /// When waiting ends: the deadline, or sooner when the grace of a device not found ends.
    fn give_up(&self, deadline: Instant) -> Instant {
        match self.offline_since {
            Some(t) => deadline.min(t + OFFLINE_GRACE),
            None => deadline,
        }
    }

    /// The end once waiting ended: offline if the grace ran out before the deadline.
    fn gave_up(&self, deadline: Instant) -> Step {
        if self.offline_since.is_some() && Instant::now() < deadline {
            Step::Offline
        } else {
            Step::TimedOut
        }
    }

    /// The device is not connected (yet): the grace starts, and it is asked for again.
    fn not_found(&mut self) {
        self.offline_since.get_or_insert_with(Instant::now);
        self.retry_at = Some(Self::backoff(RETRY_OFFLINE, &mut self.offline_tries));
    }

    /// The member set changed: send again now, with the grace and its backoff reset.
    fn members_changed(&mut self) {
        self.send_now = true;
        self.offline_since = None;
        self.offline_tries = 0;
    }

    /// The local shard's answer: the end, or None to keep waiting.
    fn local_answer(&mut self, r: Result<RequestReply, oneshot::error::RecvError>) -> Option<Step> {
        match r {
            Ok(RequestReply::Offline) => self.not_found(),
            Ok(other) => return Some(Step::Local(other)),
            // The shard dropped it: its deadline passed.
            Err(_) => {}
        }
        None
    }

    /// Node `from`'s answer: the end, or None to keep waiting (and maybe send again).
    fn remote_answer(&mut self, from: String, outcome: RequestOutcome) -> Option<Step> {
        let reply = match outcome {
            RequestOutcome::Acked => RequestReply::Acked,
            RequestOutcome::Responded { ok, result } => RequestReply::Responded { ok, result },
            RequestOutcome::Full => RequestReply::Full,
            RequestOutcome::NotJoined => RequestReply::Responded {
                ok: false,
                result: None,
            },
            RequestOutcome::Offline => {
                self.not_found();
                return None;
            }
            RequestOutcome::Moving => {
                self.offline_since = None;
                self.retry_at = Some(Self::backoff(RETRY_MOVING, &mut self.moving_tries));
                return None;
            }
            RequestOutcome::At { .. } | RequestOutcome::Expired => return None,
        };
        Some(Step::Remote(from, reply))
    }
}
