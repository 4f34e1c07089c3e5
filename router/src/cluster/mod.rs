//! Several router nodes on one RabbitMQ (`--amqp`): membership, a partitioned device
//! directory, and routing a backend request to whichever node holds the device.
//!
//! The design and its reasons are in `docs/architecture.md` ("The cluster"). In short:
//! - **Own connection.** The cluster has its own AMQP connection and thread, apart from
//!   the event publisher's: RabbitMQ applies flow control per connection, so a broker
//!   slowed by device events slows event publishing, not requests, acks, directory
//!   changes or heartbeats.
//! - **Liveness from the broker.** Each node's queue `hive.node.<id>` is exclusive to its
//!   connection; a silent node is only removed once the broker says that queue is gone
//!   ([`membership`]).
//! - **Partitioned directory.** Each device's location is kept by one node, its home
//!   ([`directory`]); a request goes to the home, which hands it to the owner.
//!
//! This file is what the rest of the router sees: shards report the devices they gain
//! and lose ([`Cluster::local_gained`], [`Cluster::local_lost`]); the API asks whether a
//! device is here and queues envelopes for the cluster thread ([`route`]). One mutex
//! guards the local device table; it is held for a map operation at a time, never
//! across I/O, and only on connect and disconnect, never per message.

pub(crate) mod directory;
pub mod envelope;
pub(crate) mod link;
pub(crate) mod membership;
pub(crate) mod route;
pub mod seal;
pub(crate) mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use envelope::{DirKind, NodeMsg, RequestOutcome};
use membership::NodeId;

/// How often a node says it is alive on `hive.presence`.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

/// Where an envelope from the API goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Dest {
    /// Whichever node is this device's home at the moment it is sent.
    HomeOf(Uuid),
}

/// Work for the cluster thread: an envelope to send.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) to: Dest,
    pub(crate) msg: NodeMsg,
}

/// A change to this node's devices, not yet sent to their homes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalChange {
    pub(crate) device: Uuid,
    pub(crate) since: u64,
    pub(crate) kind: DirKind,
    /// For a release: the home the claim went to (the device may have moved since).
    pub(crate) home: Option<NodeId>,
}

/// A device connected to this process: when, and which home holds its claim.
#[derive(Debug, Clone, Copy)]
struct LocalDevice {
    since: u64,
    home: Option<NodeId>,
}

#[derive(Default)]
struct Local {
    devices: HashMap<Uuid, LocalDevice>,
    outbox: Vec<LocalChange>,
}

#[derive(Default)]
pub(crate) struct ClusterMetrics {
    pub(crate) presence_sent: AtomicU64,
    pub(crate) presence_received: AtomicU64,
    pub(crate) envelopes_sent: AtomicU64,
    pub(crate) envelopes_received: AtomicU64,
    pub(crate) envelopes_returned: AtomicU64,
    pub(crate) bad_envelopes: AtomicU64,
    /// Envelopes, presence messages and link hellos whose seal did not verify.
    pub(crate) forged: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
    pub(crate) requests_forwarded: AtomicU64,
    pub(crate) requests_relayed: AtomicU64,
    pub(crate) requests_retried: AtomicU64,
    pub(crate) requests_served_for_peers: AtomicU64,
    pub(crate) nodes_expired: AtomicU64,
    pub(crate) nodes_left: AtomicU64,
    pub(crate) probes_alive: AtomicU64,
    pub(crate) probes_gone: AtomicU64,
    pub(crate) probes_failed: AtomicU64,
    pub(crate) directory_changes_sent: AtomicU64,
    pub(crate) directory_changes_received: AtomicU64,
    pub(crate) reregistered: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) outgoing_dropped: AtomicU64,
    pub(crate) sessions: AtomicU64,
    /// Gauges kept by the cluster thread.
    pub(crate) nodes: AtomicU64,
    pub(crate) directory_entries: AtomicU64,
    pub(crate) directory_moving: AtomicU64,
    pub(crate) publish_backlog: AtomicU64,
}

pub(crate) struct Cluster {
    pub(crate) node: String,
    pub(crate) incarnation: u64,
    local: Mutex<Local>,
    /// Bumped when the member set changes: requests waiting for a device ask again
    /// (its home may have changed).
    changed: watch::Sender<u64>,
    replies: Mutex<HashMap<Uuid, mpsc::Sender<(String, RequestOutcome)>>>,
    out_tx: mpsc::Sender<Outgoing>,
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// The cluster's broker session is up and has heard its peers.
    pub(crate) joined: AtomicBool,
    pub(crate) metrics: ClusterMetrics,
    /// The direct link listener bound at startup, with the address peers are told
    /// (taken by the cluster thread); None: links off.
    link_listener: Mutex<Option<(std::net::TcpListener, String)>>,
    pub(crate) link_metrics: std::sync::Arc<link::LinkMetrics>,
    /// Seals and checks every envelope between nodes (see [`seal`]).
    pub(crate) key: seal::ClusterKey,
}

/// Room for envelopes waiting for the broker; beyond it, a send fails fast.
const OUTGOING_QUEUE: usize = 65_536;

impl Cluster {
    /// `link`: the direct link listener and the address to advertise (see [`link`]).
    pub(crate) fn new(
        node: String,
        link: Option<(std::net::TcpListener, String)>,
        key: seal::ClusterKey,
    ) -> Self {
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_QUEUE);
        Cluster {
            node,
            incarnation: crate::random_u64(),
            local: Mutex::new(Local::default()),
            changed: watch::Sender::new(0),
            replies: Mutex::new(HashMap::new()),
            out_tx,
            out_rx: Mutex::new(Some(out_rx)),
            joined: AtomicBool::new(false),
            metrics: ClusterMetrics::default(),
            link_listener: Mutex::new(link),
            link_metrics: Default::default(),
            key,
        }
    }

    /// The link listener (taken once, by the cluster thread).
    pub(crate) fn take_link_listener(&self) -> Option<(std::net::TcpListener, String)> {
        self.link_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        // A panic while holding it cannot leave the map half-updated in a way that
        // matters more than stopping routing: keep going with what is there.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn joined(&self) -> bool {
        self.joined.load(Relaxed)
    }

    /// A device connected to this process (also when it replaced an older connection
    /// here: the claim carries the new connection's age).
    pub(crate) fn local_gained(&self, device: Uuid, since: u64) {
        {
            let mut g = self.lock();
            let home = g.devices.get(&device).and_then(|d| d.home);
            g.devices.insert(device, LocalDevice { since, home });
            g.outbox.push(LocalChange {
                device,
                since,
                kind: DirKind::Claim,
                home: None,
            });
        }
    }

    /// The device's connection here (made at `since`) ended and no newer one replaced
    /// it. `back`: the router closed it (draining), so it is expected elsewhere soon.
    pub(crate) fn local_lost(&self, device: Uuid, since: u64, back: bool) {
        {
            let mut g = self.lock();
            let home = match g.devices.get(&device) {
                Some(d) if d.since == since => {
                    let h = d.home;
                    g.devices.remove(&device);
                    h
                }
                _ => return,
            };
            g.outbox.push(LocalChange {
                device,
                since,
                kind: if back {
                    DirKind::ReleaseBack
                } else {
                    DirKind::Release
                },
                home,
            });
        }
    }

    pub(crate) fn is_local(&self, device: &Uuid) -> bool {
        self.lock().devices.contains_key(device)
    }

    /// The age of this node's connection of `device`, if it holds one.
    pub(crate) fn local_since(&self, device: &Uuid) -> Option<u64> {
        self.lock().devices.get(device).map(|d| d.since)
    }

    pub(crate) fn local_count(&self) -> u64 {
        self.lock().devices.len() as u64
    }

    /// Local changes to send (empties the outbox). `home` says where a claim goes;
    /// it is recorded, so a later release follows it.
    pub(crate) fn take_outbox(
        &self,
        mut home: impl FnMut(Uuid) -> NodeId,
    ) -> Vec<(NodeId, envelope::DirChange)> {
        let mut g = self.lock();
        let outbox = std::mem::take(&mut g.outbox);
        let mut out = Vec::with_capacity(outbox.len());
        for c in outbox {
            let to = match c.kind {
                DirKind::Claim => {
                    // Only if still the current connection (a release may follow).
                    let h = home(c.device);
                    if let Some(d) = g.devices.get_mut(&c.device) {
                        if d.since == c.since {
                            d.home = Some(h);
                        }
                    }
                    h
                }
                _ => c.home.unwrap_or_else(|| home(c.device)),
            };
            out.push((
                to,
                envelope::DirChange {
                    device: c.device.as_u128(),
                    since: c.since,
                    kind: c.kind,
                },
            ));
        }
        // Keep the allocation for the next round.
        g.outbox = Vec::with_capacity(out.len().min(4096));
        out
    }

    /// Claims to send again: every local device whose home is not where its claim went
    /// (the member set changed), or whose home is in `reset` (that home's queue was
    /// declared anew), or all of them with `all`. Records the new homes.
    pub(crate) fn reregister(
        &self,
        mut home: impl FnMut(Uuid) -> NodeId,
        reset: &[NodeId],
        all: bool,
    ) -> Vec<(NodeId, envelope::DirChange)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for (dev, d) in g.devices.iter_mut() {
            let h = home(*dev);
            let stale = all || d.home != Some(h) || d.home.is_some_and(|x| reset.contains(&x));
            if stale {
                d.home = Some(h);
                out.push((
                    h,
                    envelope::DirChange {
                        device: dev.as_u128(),
                        since: d.since,
                        kind: DirKind::Claim,
                    },
                ));
            }
        }
        out
    }

    /// Queue an envelope for the cluster thread. Err: the queue is full (broker away).
    pub(crate) fn send(&self, to: Dest, msg: NodeMsg) -> Result<(), QueueFull> {
        self.out_tx.try_send(Outgoing { to, msg }).map_err(|_| {
            self.metrics.outgoing_dropped.fetch_add(1, Relaxed);
            QueueFull
        })
    }

    /// The cluster thread's end of the outgoing queue (taken once).
    pub(crate) fn take_outgoing(&self) -> Option<mpsc::Receiver<Outgoing>> {
        self.out_rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Register for the replies to a request this node's API sends to other nodes.
    pub(crate) fn expect_replies(&self, request: Uuid) -> ReplyGuard<'_> {
        let (tx, rx) = mpsc::channel(8);
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request, tx);
        ReplyGuard {
            cluster: self,
            request,
            rx,
        }
    }

    /// A reply arrived from `from`. False: nobody waits for it (late or unknown).
    pub(crate) fn deliver_reply(
        &self,
        request: Uuid,
        from: String,
        outcome: RequestOutcome,
    ) -> bool {
        let tx = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&request)
            .cloned();
        tx.is_some_and(|tx| tx.try_send((from, outcome)).is_ok())
    }

    /// The `router_cluster_*` metrics, Prometheus text.
    pub(crate) fn render_metrics(&self, o: &mut String) {
        use std::fmt::Write;
        for (name, help, v) in self.gauges() {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let counters = self
            .broker_counters()
            .into_iter()
            .chain(self.request_counters())
            .chain(self.membership_counters())
            .chain(self.directory_counters())
            .chain(self.link_counters());
        for (name, help, c) in counters {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Relaxed)
            );
        }
    }

    /// The cluster's gauges: (name, help, value now), in the order they are written.
    fn gauges(&self) -> [(&'static str, &'static str, u64); 7] {
        let m = &self.metrics;
        [
            (
                "router_cluster_nodes",
                "Router nodes this node counts as members, itself included.",
                m.nodes.load(Relaxed),
            ),
            (
                "router_cluster_local_devices",
                "Devices connected to this node.",
                self.local_count(),
            ),
            (
                "router_cluster_directory_entries",
                "Devices whose location this node keeps (it is their home).",
                m.directory_entries.load(Relaxed),
            ),
            (
                "router_cluster_directory_moving",
                "Devices this node is home for whose node died or drained them, waited for.",
                m.directory_moving.load(Relaxed),
            ),
            (
                "router_cluster_publish_backlog",
                "Envelopes waiting to be published on the cluster connection (the broker is slow).",
                m.publish_backlog.load(Relaxed),
            ),
            (
                "router_cluster_joined",
                "1 while the cluster's broker session is up and its peers are known.",
                u64::from(self.joined()),
            ),
            (
                "router_cluster_links_up",
                "Direct links to other nodes that are connected now.",
                self.link_metrics.up.load(Relaxed),
            ),
        ]
    }

    /// Counters of the broker session: membership messages and envelopes.
    fn broker_counters(&self) -> [Counter<'_>; 9] {
        let m = &self.metrics;
        [
            (
                "router_cluster_sessions_total",
                "Broker sessions of the cluster connection (1 + reconnects).",
                &m.sessions,
            ),
            (
                "router_cluster_presence_sent_total",
                "Membership messages published (heartbeats, joins, leaving).",
                &m.presence_sent,
            ),
            (
                "router_cluster_presence_received_total",
                "Membership messages received from other nodes.",
                &m.presence_received,
            ),
            (
                "router_cluster_envelopes_sent_total",
                "Envelopes published to other nodes' queues.",
                &m.envelopes_sent,
            ),
            (
                "router_cluster_envelopes_received_total",
                "Envelopes received on this node's queue.",
                &m.envelopes_received,
            ),
            (
                "router_cluster_envelopes_returned_total",
                "Envelopes the broker returned as unroutable (the node's queue was gone).",
                &m.envelopes_returned,
            ),
            (
                "router_cluster_bad_envelopes_total",
                "Envelopes or membership messages that failed validation (dropped).",
                &m.bad_envelopes,
            ),
            (
                "router_cluster_envelopes_forged_total",
                "Envelopes, presence messages and link hellos whose cluster-key seal did not verify (forged, edited, another cluster's key, or a presence message too old): dropped.",
                &m.forged,
            ),
            (
                "router_cluster_duplicates_dropped_total",
                "Second deliveries of a request UUID this node already held.",
                &m.duplicates_dropped,
            ),
        ]
    }

    /// Counters of requests sent to and served for other nodes.
    fn request_counters(&self) -> [Counter<'_>; 4] {
        let m = &self.metrics;
        [
            (
                "router_cluster_requests_forwarded_total",
                "Requests and events this node's API sent to a device's home.",
                &m.requests_forwarded,
            ),
            (
                "router_cluster_requests_relayed_total",
                "Requests a home handed on to the node holding the device.",
                &m.requests_relayed,
            ),
            (
                "router_cluster_requests_retried_total",
                "Requests sent again (the device was not found yet, or was moving).",
                &m.requests_retried,
            ),
            (
                "router_cluster_requests_served_total",
                "Requests from other nodes delivered to devices here.",
                &m.requests_served_for_peers,
            ),
        ]
    }

    /// Counters of nodes removed and the liveness probes that decide it.
    fn membership_counters(&self) -> [Counter<'_>; 5] {
        let m = &self.metrics;
        [
            (
                "router_cluster_nodes_expired_total",
                "Nodes removed because the broker said their queue was gone.",
                &m.nodes_expired,
            ),
            (
                "router_cluster_nodes_left_total",
                "Nodes removed because they announced a graceful stop.",
                &m.nodes_left,
            ),
            (
                "router_cluster_liveness_probes_alive_total",
                "Probes of a silent node that found its queue (so it stayed a member).",
                &m.probes_alive,
            ),
            (
                "router_cluster_liveness_probes_gone_total",
                "Probes of a silent node that found its queue gone.",
                &m.probes_gone,
            ),
            (
                "router_cluster_liveness_probes_failed_total",
                "Probes that could not decide (broker error); retried.",
                &m.probes_failed,
            ),
        ]
    }

    /// Counters of directory changes, evictions and envelopes the full queue refused.
    fn directory_counters(&self) -> [Counter<'_>; 5] {
        let m = &self.metrics;
        [
            (
                "router_cluster_directory_changes_sent_total",
                "Claims, releases and evictions sent to other nodes.",
                &m.directory_changes_sent,
            ),
            (
                "router_cluster_directory_changes_received_total",
                "Claims, releases and evictions received.",
                &m.directory_changes_received,
            ),
            (
                "router_cluster_reregistered_total",
                "Claims sent again because a device's home changed or reconnected.",
                &m.reregistered,
            ),
            (
                "router_cluster_evictions_total",
                "Connections closed (4409) because the device connected to another node.",
                &m.evictions,
            ),
            (
                "router_cluster_outgoing_dropped_total",
                "Envelopes refused because the outgoing queue was full (broker away).",
                &m.outgoing_dropped,
            ),
        ]
    }

    /// Counters of the direct links between nodes.
    fn link_counters(&self) -> [Counter<'_>; 6] {
        [
        (
            "router_cluster_link_sent_total",
            "Requests, events and replies sent to another node over its direct link.",
            &self.link_metrics.sent,
        ),
        (
            "router_cluster_link_received_total",
            "Envelopes received over direct links.",
            &self.link_metrics.received,
        ),
        (
            "router_cluster_link_via_broker_total",
            "Requests, events and replies sent through the broker because no link to their node was up.",
            &self.link_metrics.via_broker,
        ),
        (
            "router_cluster_link_connects_total",
            "Direct links opened (accepted by their peer).",
            &self.link_metrics.connects,
        ),
        (
            "router_cluster_link_failures_total",
            "Direct link attempts or links that failed (refused, unreachable, broken).",
            &self.link_metrics.failures,
        ),
        (
            "router_cluster_link_refused_total",
            "Incoming links closed: bad hello, wrong token, or an oversized frame.",
            &self.link_metrics.refused,
        ),
        ]
    }
}

/// A counter as the metrics text shows it: (name, help, the counter).
type Counter<'a> = (&'static str, &'static str, &'a AtomicU64);

/// The queue of envelopes for other nodes is full (the broker has been away long).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue of envelopes for other nodes is full")]
pub(crate) struct QueueFull;

/// Replies to one request; unregisters on drop.
pub(crate) struct ReplyGuard<'a> {
    cluster: &'a Cluster,
    request: Uuid,
    pub(crate) rx: mpsc::Receiver<(String, RequestOutcome)>,
}

impl Drop for ReplyGuard<'_> {
    fn drop(&mut self) {
        self.cluster
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.request);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_and_releases_follow_the_connection() {
        let c = Cluster::new("a".into(), None, seal::ClusterKey::new(b"k"));
        let (d1, d2) = (Uuid::new_v4(), Uuid::new_v4());
        c.local_gained(d1, 10);
        c.local_gained(d2, 10);
        // d2 reconnects here (a newer connection), then the old one's end is reported:
        // it must not remove the new one.
        c.local_gained(d2, 20);
        c.local_lost(d2, 10, false);
        assert!(c.is_local(&d2));
        assert_eq!(c.local_since(&d2), Some(20));
        let out = c.take_outbox(|d| if d == d1 { 3 } else { 4 });
        let kinds: Vec<_> = out
            .iter()
            .map(|(to, ch)| (*to, ch.since, ch.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (3, 10, DirKind::Claim),
                (4, 10, DirKind::Claim),
                (4, 20, DirKind::Claim)
            ]
        );
        // The release goes to the home the claim went to, whatever the home is now.
        c.local_lost(d1, 10, true);
        let out = c.take_outbox(|_| 9);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 3);
        assert_eq!(out[0].1.kind, DirKind::ReleaseBack);
        assert!(!c.is_local(&d1));
        assert_eq!(c.local_count(), 1);
    }

    #[test]
    fn reregistering_sends_only_what_moved_or_was_reset() {
        let c = Cluster::new("a".into(), None, seal::ClusterKey::new(b"k"));
        let ds: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
        for d in &ds {
            c.local_gained(*d, 1);
        }
        let home = |d: Uuid| (d.as_u128() % 3) as NodeId;
        c.take_outbox(home);
        assert!(c.reregister(home, &[], false).is_empty());
        // Home 1's queue was declared anew: its devices are claimed there again.
        let at1 = ds.iter().filter(|d| home(**d) == 1).count();
        assert_eq!(c.reregister(home, &[1], false).len(), at1);
        // The member set changed: everything whose home differs moves.
        let home2 = |d: Uuid| (d.as_u128() % 4) as NodeId;
        let moved = ds.iter().filter(|d| home(**d) != home2(**d)).count();
        assert_eq!(c.reregister(home2, &[], false).len(), moved);
        assert!(c.reregister(home2, &[], false).is_empty());
        assert_eq!(c.reregister(home2, &[], true).len(), ds.len());
    }
}
