//! Who holds which device, across router nodes (`--amqp` only).
//!
//! Every node keeps the whole map `device -> node` in memory (200,000 entries are a
//! few MB), fed by the batched announcements on `hive.presence`; it is never a
//! per-device binding on the broker (see DESIGN.md, "Why bindings per node").
//!
//! **Who touches it.** Shards call [`Presence::local_gained`] / [`Presence::local_lost`]
//! when a device connects or goes (once per connection, never per message); the API
//! thread reads owners; the bridge thread applies remote announcements, expires silent
//! nodes and drains the outbox of local changes into `Delta` messages. One mutex
//! guards the map: it is held for a hash-map operation at a time, never across I/O.
//!
//! **Remote requests.** A request the local API sends to another node registers a
//! channel here under its request UUID; the bridge hands it every `Reply` for that
//! UUID (tagged with the answering node, so a late `Offline` from a node the device
//! has left is not taken as the final word).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::envelope::{NodeMsg, Outcome, PresenceBody};

/// A node that has not been heard from for this long is considered dead.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Where a device is, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    Remote(String),
}

/// Work for the bridge's cluster task: an envelope for another node.
#[derive(Debug)]
pub struct Outgoing {
    pub node: String,
    pub msg: NodeMsg,
}

struct NodeRec {
    name: String,
    incarnation: u64,
    last_seen: Instant,
    /// Devices it held at its last heartbeat (for the consistency check).
    announced: u64,
    /// Consecutive heartbeats whose count disagreed with our map.
    mismatches: u32,
}

#[derive(Default)]
struct Inner {
    /// device -> index into `nodes`; index 0 is this node. A device connected here
    /// but since claimed by another node (it reconnected there) counts as theirs: the
    /// newest announcement wins, and our own snapshot leaves it out.
    owners: HashMap<Uuid, u32>,
    /// Index 0 is this node. Slots of expired nodes are reused.
    nodes: Vec<Option<NodeRec>>,
    by_name: HashMap<String, u32>,
    /// Local changes not yet announced, in order.
    outbox: Vec<(u128, bool)>,
    /// Devices per node index (kept in step with `owners`).
    counts: Vec<u64>,
}

impl Inner {
    fn set_owner(&mut self, d: Uuid, ix: u32) {
        if let Some(old) = self.owners.insert(d, ix) {
            self.counts[old as usize] -= 1;
        }
        self.counts[ix as usize] += 1;
    }

    fn remove_if_owner(&mut self, d: &Uuid, ix: u32) -> bool {
        if self.owners.get(d) == Some(&ix) {
            self.owners.remove(d);
            self.counts[ix as usize] -= 1;
            true
        } else {
            false
        }
    }

    fn forget_node_devices(&mut self, ix: u32) -> u64 {
        let before = self.owners.len();
        self.owners.retain(|_, o| *o != ix);
        self.counts[ix as usize] = 0;
        (before - self.owners.len()) as u64
    }

    /// The index of a remote node, created on first sight. A new incarnation under a
    /// known name forgets what the old one held.
    fn node_ix(&mut self, name: &str, incarnation: u64, now: Instant) -> u32 {
        if let Some(&ix) = self.by_name.get(name) {
            let restarted = self.nodes[ix as usize]
                .as_ref()
                .is_some_and(|n| n.incarnation != incarnation);
            if restarted {
                self.forget_node_devices(ix);
            }
            if let Some(n) = self.nodes[ix as usize].as_mut() {
                n.incarnation = incarnation;
                n.last_seen = now;
            }
            return ix;
        }
        let rec = NodeRec {
            name: name.to_string(),
            incarnation,
            last_seen: now,
            announced: 0,
            mismatches: 0,
        };
        let ix = match self.nodes.iter().skip(1).position(|n| n.is_none()) {
            Some(p) => {
                let ix = p + 1;
                self.nodes[ix] = Some(rec);
                ix
            }
            None => {
                self.nodes.push(Some(rec));
                self.counts.push(0);
                self.nodes.len() - 1
            }
        };
        self.by_name.insert(name.to_string(), ix as u32);
        ix as u32
    }
}

#[derive(Default)]
pub struct ClusterMetrics {
    pub presence_sent: AtomicU64,
    pub presence_received: AtomicU64,
    pub envelopes_sent: AtomicU64,
    pub envelopes_received: AtomicU64,
    pub bad_envelopes: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub requests_forwarded: AtomicU64,
    pub requests_rerouted: AtomicU64,
    pub requests_served_for_peers: AtomicU64,
    pub nodes_expired: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub outgoing_dropped: AtomicU64,
}

pub struct Presence {
    pub node: String,
    pub incarnation: u64,
    inner: Mutex<Inner>,
    /// Bumped whenever an owner changes (API waiters re-check their device).
    changed: watch::Sender<u64>,
    replies: Mutex<HashMap<Uuid, mpsc::Sender<(String, Outcome)>>>,
    out_tx: mpsc::Sender<Outgoing>,
    out_rx: tokio::sync::Mutex<mpsc::Receiver<Outgoing>>,
    pub metrics: ClusterMetrics,
}

/// Room for envelopes waiting for the broker; beyond it, a send fails fast.
const OUTGOING_QUEUE: usize = 65_536;

impl Presence {
    /// The `router_cluster_*` metrics, Prometheus text.
    pub fn render_metrics(&self, o: &mut String) {
        use std::fmt::Write;
        let m = &self.metrics;
        let (devices, nodes) = self.sizes();
        for (name, help, v) in [
            (
                "router_cluster_nodes",
                "Router nodes this node knows to be alive, itself included.",
                nodes,
            ),
            (
                "router_cluster_devices",
                "Devices in the presence map (all nodes).",
                devices,
            ),
            (
                "router_cluster_local_devices",
                "Devices connected to this node, as announced.",
                self.local_count(),
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        for (name, help, c) in [
            (
                "router_cluster_presence_sent_total",
                "Presence messages published (deltas, heartbeats, snapshot parts, requests).",
                &m.presence_sent,
            ),
            (
                "router_cluster_presence_received_total",
                "Presence messages received from other nodes.",
                &m.presence_received,
            ),
            (
                "router_cluster_snapshots_sent_total",
                "Full snapshots of this node's devices published.",
                &m.snapshots_sent,
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
                "router_cluster_bad_envelopes_total",
                "Envelopes or presence messages that failed validation (dropped).",
                &m.bad_envelopes,
            ),
            (
                "router_cluster_duplicates_dropped_total",
                "Second deliveries of a request UUID this node already held.",
                &m.duplicates_dropped,
            ),
            (
                "router_cluster_requests_forwarded_total",
                "Requests sent to the node holding the device.",
                &m.requests_forwarded,
            ),
            (
                "router_cluster_requests_rerouted_total",
                "Requests sent again because the device moved or its node died.",
                &m.requests_rerouted,
            ),
            (
                "router_cluster_requests_served_total",
                "Requests from other nodes delivered to devices here.",
                &m.requests_served_for_peers,
            ),
            (
                "router_cluster_nodes_expired_total",
                "Nodes forgotten after they stopped announcing.",
                &m.nodes_expired,
            ),
            (
                "router_cluster_outgoing_dropped_total",
                "Envelopes refused because the outgoing queue was full (broker away).",
                &m.outgoing_dropped,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Relaxed)
            );
        }
    }

    pub fn new(node: String) -> Self {
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_QUEUE);
        let now = Instant::now();
        let inner = Inner {
            nodes: vec![Some(NodeRec {
                name: node.clone(),
                incarnation: 0,
                last_seen: now,
                announced: 0,
                mismatches: 0,
            })],
            counts: vec![0],
            by_name: HashMap::from([(node.clone(), 0)]),
            ..Inner::default()
        };
        Presence {
            node,
            incarnation: rand_u64(),
            inner: Mutex::new(inner),
            changed: watch::Sender::new(0),
            replies: Mutex::new(HashMap::new()),
            out_tx,
            out_rx: tokio::sync::Mutex::new(out_rx),
            metrics: ClusterMetrics::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it cannot leave the map half-updated in a way that
        // matters more than stopping routing: keep going with what is there.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A device connected to this process.
    pub fn local_gained(&self, device: Uuid) {
        {
            let mut g = self.lock();
            g.set_owner(device, 0);
            g.outbox.push((device.as_u128(), true));
        }
        self.bump();
    }

    /// A device's connection to this process ended (and no newer one replaced it).
    pub fn local_lost(&self, device: Uuid) {
        {
            let mut g = self.lock();
            g.remove_if_owner(&device, 0);
            g.outbox.push((device.as_u128(), false));
        }
        self.bump();
    }

    pub fn owner(&self, device: &Uuid) -> Option<Owner> {
        let g = self.lock();
        let ix = *g.owners.get(device)?;
        if ix == 0 {
            return Some(Owner::Local);
        }
        g.nodes[ix as usize]
            .as_ref()
            .map(|n| Owner::Remote(n.name.clone()))
    }

    /// Local changes to announce (empties the outbox).
    pub fn take_outbox(&self) -> Vec<(u128, bool)> {
        // Copied out, so the outbox keeps its capacity: no allocation churn between the
        // shard threads that fill it and the bridge thread that drains it.
        self.lock().outbox.drain(..).collect()
    }

    /// Everything this node holds, for a snapshot, together with the outbox taken in
    /// the same instant (announced first, so the snapshot is never older than a delta).
    pub fn snapshot(&self) -> (Vec<(u128, bool)>, Vec<u128>) {
        let mut g = self.lock();
        let out = g.outbox.drain(..).collect();
        let all = g
            .owners
            .iter()
            .filter(|(_, ix)| **ix == 0)
            .map(|(d, _)| d.as_u128())
            .collect();
        (out, all)
    }

    pub fn local_count(&self) -> u64 {
        self.lock().counts[0]
    }

    /// Known devices (all nodes) and live nodes (this one included).
    pub fn sizes(&self) -> (u64, u64) {
        let g = self.lock();
        (
            g.owners.len() as u64,
            g.nodes.iter().filter(|n| n.is_some()).count() as u64,
        )
    }

    /// Apply one announcement from another node. Returns the name of a node to ask
    /// for a snapshot, if its heartbeats keep disagreeing with our map.
    pub fn apply(&self, node: &str, incarnation: u64, body: &PresenceBody) -> Option<String> {
        if node == self.node {
            return None; // our own fanout copy
        }
        let now = Instant::now();
        let mut ask = None;
        let mut changed = false;
        {
            let mut g = self.lock();
            let ix = g.node_ix(node, incarnation, now);
            match body {
                PresenceBody::Heartbeat { devices } => {
                    let ours = g.counts[ix as usize];
                    if let Some(n) = g.nodes[ix as usize].as_mut() {
                        n.announced = *devices;
                        if ours != *devices {
                            n.mismatches += 1;
                            // Two in a row: not just a delta in flight.
                            if n.mismatches >= 2 {
                                n.mismatches = 0;
                                ask = Some(node.to_string());
                            }
                        } else {
                            n.mismatches = 0;
                        }
                    }
                }
                PresenceBody::Delta { changes } => {
                    for &(d, gained) in changes {
                        let d = Uuid::from_u128(d);
                        if gained {
                            g.set_owner(d, ix);
                        } else {
                            g.remove_if_owner(&d, ix);
                        }
                    }
                    changed = !changes.is_empty();
                }
                PresenceBody::Snapshot { part, devices, .. } => {
                    if *part == 0 {
                        g.forget_node_devices(ix);
                    }
                    for &d in devices {
                        g.set_owner(Uuid::from_u128(d), ix);
                    }
                    changed = true;
                }
                PresenceBody::SnapshotRequest { .. } => {}
                PresenceBody::Leaving => {
                    g.forget_node_devices(ix);
                    g.nodes[ix as usize] = None;
                    g.by_name.remove(node);
                    changed = true;
                }
            }
        }
        if changed {
            self.bump();
        }
        ask
    }

    /// Forget nodes not heard from within [`NODE_TIMEOUT`]; returns their names.
    pub fn expire(&self) -> Vec<String> {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut g = self.lock();
            for ix in 1..g.nodes.len() {
                let dead = g.nodes[ix]
                    .as_ref()
                    .is_some_and(|n| now.duration_since(n.last_seen) > NODE_TIMEOUT);
                if dead {
                    g.forget_node_devices(ix as u32);
                    if let Some(n) = g.nodes[ix].take() {
                        g.by_name.remove(&n.name);
                        gone.push(n.name);
                    }
                }
            }
        }
        if !gone.is_empty() {
            self.metrics
                .nodes_expired
                .fetch_add(gone.len() as u64, Relaxed);
            self.bump();
        }
        gone
    }

    /// Queue an envelope for another node. Err: the queue is full (broker away long).
    pub fn send(&self, node: String, msg: NodeMsg) -> Result<(), QueueFull> {
        self.out_tx.try_send(Outgoing { node, msg }).map_err(|_| {
            self.metrics.outgoing_dropped.fetch_add(1, Relaxed);
            QueueFull
        })
    }

    /// The bridge's end of the outgoing queue (one session at a time holds it).
    pub async fn outgoing(&self) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<Outgoing>> {
        self.out_rx.lock().await
    }

    /// Register for the replies to a request this node's API sends to other nodes.
    pub fn expect_replies(&self, request: Uuid) -> ReplyGuard<'_> {
        let (tx, rx) = mpsc::channel(8);
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request, tx);
        ReplyGuard {
            presence: self,
            request,
            rx,
        }
    }

    /// A reply arrived from `from`. False: nobody waits for it (late or unknown).
    pub fn deliver_reply(&self, request: Uuid, from: String, outcome: Outcome) -> bool {
        let tx = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&request)
            .cloned();
        tx.is_some_and(|tx| tx.try_send((from, outcome)).is_ok())
    }
}

/// The queue of envelopes for other nodes is full (the broker has been away long).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue of envelopes for other nodes is full")]
pub struct QueueFull;

/// Replies to one request; unregisters on drop.
pub struct ReplyGuard<'a> {
    presence: &'a Presence,
    request: Uuid,
    pub rx: mpsc::Receiver<(String, Outcome)>,
}

impl Drop for ReplyGuard<'_> {
    fn drop(&mut self) {
        self.presence
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.request);
    }
}

fn rand_u64() -> u64 {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new();
    s.hash_one((std::process::id(), Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(changes: &[(Uuid, bool)]) -> PresenceBody {
        PresenceBody::Delta {
            changes: changes.iter().map(|(d, g)| (d.as_u128(), *g)).collect(),
        }
    }

    #[test]
    fn local_and_remote_owners() {
        let p = Presence::new("a".into());
        let (d1, d2) = (Uuid::new_v4(), Uuid::new_v4());
        p.local_gained(d1);
        assert_eq!(p.owner(&d1), Some(Owner::Local));
        p.apply("b", 1, &delta(&[(d2, true)]));
        assert_eq!(p.owner(&d2), Some(Owner::Remote("b".into())));
        // The device moves from b to us, then b's late "lost" must not erase it.
        p.local_gained(d2);
        p.apply("b", 1, &delta(&[(d2, false)]));
        assert_eq!(p.owner(&d2), Some(Owner::Local));
        // It moves to c; our connection then ends: c keeps it.
        p.apply("c", 1, &delta(&[(d2, true)]));
        p.local_lost(d2);
        assert_eq!(p.owner(&d2), Some(Owner::Remote("c".into())));
        assert_eq!(p.sizes(), (2, 3));
        let out = p.take_outbox();
        assert_eq!(
            out,
            vec![
                (d1.as_u128(), true),
                (d2.as_u128(), true),
                (d2.as_u128(), false)
            ]
        );
        assert!(p.take_outbox().is_empty());
    }

    #[test]
    fn snapshots_replace_and_restarts_forget() {
        let p = Presence::new("a".into());
        let ds: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        p.apply("b", 1, &delta(&[(ds[0], true), (ds[1], true)]));
        let snap = PresenceBody::Snapshot {
            part: 0,
            last: true,
            devices: vec![ds[2].as_u128()],
        };
        p.apply("b", 1, &snap);
        assert_eq!(p.owner(&ds[0]), None);
        assert_eq!(p.owner(&ds[2]), Some(Owner::Remote("b".into())));
        // b restarts (new incarnation): what it held is forgotten.
        p.apply("b", 2, &PresenceBody::Heartbeat { devices: 0 });
        assert_eq!(p.owner(&ds[2]), None);
        p.apply("b", 2, &delta(&[(ds[3], true)]));
        p.apply("b", 2, &PresenceBody::Leaving);
        assert_eq!(p.owner(&ds[3]), None);
        assert_eq!(p.sizes(), (0, 1));
    }

    #[test]
    fn heartbeat_mismatch_asks_for_a_snapshot_after_two() {
        let p = Presence::new("a".into());
        let d = Uuid::new_v4();
        p.apply("b", 1, &delta(&[(d, true)]));
        assert_eq!(
            p.apply("b", 1, &PresenceBody::Heartbeat { devices: 1 }),
            None
        );
        assert_eq!(
            p.apply("b", 1, &PresenceBody::Heartbeat { devices: 3 }),
            None
        );
        assert_eq!(
            p.apply("b", 1, &PresenceBody::Heartbeat { devices: 3 }),
            Some("b".into())
        );
    }

    #[test]
    fn replies_reach_the_registered_waiter_only() {
        let p = Presence::new("a".into());
        let r = Uuid::new_v4();
        assert!(!p.deliver_reply(r, "b".into(), Outcome::Acked));
        let mut g = p.expect_replies(r);
        assert!(p.deliver_reply(r, "b".into(), Outcome::Acked));
        assert_eq!(g.rx.try_recv().unwrap(), ("b".to_string(), Outcome::Acked));
        drop(g);
        assert!(!p.deliver_reply(r, "b".into(), Outcome::Acked));
    }
}
