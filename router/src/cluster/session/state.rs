//! What outlives a broker session: the members, this node's directory partition and
//! the directory changes waiting to be sent, the requests served here.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use uuid::Uuid;

use super::super::directory::Directory;
use super::super::envelope::{DirChange, DirKind, NodeMsg, RequestOutcome};
use super::super::link::{Links, PeerAddr};
use super::super::membership::{Heard, Membership, NodeId, ME};
use super::super::route::cluster;
use super::super::Cluster;
use super::publisher::Publisher;
use crate::shard::{ShardHandle, ShardMsg};
use crate::Shared;

/// After the member set changes, wait this long for more changes before the devices
/// whose home moved are registered again (one pass for a burst of joins).
const REREGISTER_AFTER: Duration = Duration::from_millis(200);
/// Directory changes per message (24 bytes each on the wire).
const DIRECTORY_PART: usize = 4096;

/// A request this node serves for a peer (or for its own API, as the device's owner).
pub(super) enum Served {
    /// Handed to the device's shard here; `origin` is told if the device leaves.
    InFlight {
        device: u128,
        origin: String,
    },
    Done(RequestOutcome, Instant),
}

pub(super) type ServeFut = Pin<Box<dyn Future<Output = (u128, String, RequestOutcome)>>>;

/// What outlives a broker session: members, the directory partition, served requests.
pub(super) struct State {
    pub(super) shared: Arc<Shared>,
    pub(super) members: Membership,
    pub(super) dir: Directory,
    pub(super) served: HashMap<u128, Served>,
    pub(super) serving: FuturesUnordered<ServeFut>,
    pub(super) session: u64,
    /// Directory changes to send, per node (ME: applied here).
    pub(super) dir_out: HashMap<NodeId, Vec<DirChange>>,
    /// Homes whose queue was declared anew since the last registration pass.
    pub(super) reset: Vec<NodeId>,
    pub(super) reregister_all: bool,
    pub(super) reregister_at: Option<Instant>,
    /// The member epoch the last registration pass was for.
    pub(super) registered_epoch: u64,
    pub(super) last_heartbeat: Option<Instant>,
    /// Nodes just counted in, to be sent a `Resync`.
    pub(super) resync: Vec<String>,
    /// Direct links to the other nodes (the latency path without the broker).
    pub(super) links: Arc<Links>,
}

impl State {
    pub(super) fn new(shared: Arc<Shared>, links: Links) -> State {
        let c = cluster(&shared);
        State {
            members: Membership::new(&shared.node_id, c.incarnation, Instant::now()),
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
            shared,
        }
    }

    pub(super) fn c(&self) -> &Cluster {
        cluster(&self.shared)
    }

    pub(super) fn me(&self) -> &str {
        &self.shared.node_id
    }

    pub(super) fn gauges(&self) {
        let m = &self.c().metrics;
        m.nodes.store(self.members.len() as u64, Relaxed);
        m.directory_entries.store(self.dir.len() as u64, Relaxed);
        m.directory_moving
            .store(self.dir.moving_len() as u64, Relaxed);
    }

    pub(super) fn schedule_reregister(&mut self) {
        let at = Instant::now() + REREGISTER_AFTER;
        self.reregister_at = Some(self.reregister_at.map_or(at, |t| t.min(at)));
    }

    /// What a heartbeat, join or directory message told us about its sender. None: the
    /// sender said it was leaving, and this message was sent before that (it is ignored).
    pub(super) fn heard(
        &mut self,
        name: &str,
        incarnation: u64,
        session: u64,
        devices: Option<u64>,
    ) -> Option<NodeId> {
        if self.members.has_left(name, incarnation) {
            return None;
        }
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
        Some(id)
    }

    /// A member said it is leaving: remove it and forget what it held.
    pub(super) fn gone(&mut self, id: NodeId) {
        if let Some(p) = self.members.leave(id, Instant::now()) {
            self.forget(id, &p.name);
        }
    }

    /// A heartbeat or join said where the node's direct link listens.
    pub(super) fn heard_link(&self, name: &str, link: &str, token: u128) {
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
    pub(super) fn forget(&mut self, id: NodeId, name: &str) {
        self.shared.tenants.forget(name);
        self.links.forget(name);
        let n = self.dir.owner_gone(id, Instant::now());
        tracing::warn!(node = %name, devices = n, "router node gone from the cluster");
        self.dir_out.remove(&id);
        self.schedule_reregister();
        self.gauges();
    }

    /// Register again the devices whose home changed (or was reset), and drop the
    /// entries this node is no longer home for.
    pub(super) fn reregister(&mut self) {
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
    pub(super) fn take_local(&mut self) -> Vec<(u128, String)> {
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
    pub(super) fn apply_directory(&mut self, from: NodeId, changes: &[DirChange]) {
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
    pub(super) fn evict_local(&self, ch: &DirChange) {
        let device = Uuid::from_u128(ch.device);
        let c = self.c();
        if c.local_since(&device).is_some_and(|s| s <= ch.since) {
            let msg = ShardMsg::Evict {
                device,
                since_ms: ch.since,
            };
            // Counted before the shard can act on it (a reader of /metrics who saw the
            // close sees the count).
            c.metrics.evictions.fetch_add(1, Relaxed);
            if ShardHandle::send_to_owner(&self.shared.shards, &device, msg).is_err() {
                c.metrics.evictions.fetch_sub(1, Relaxed);
                self.shared
                    .metrics
                    .api
                    .shard_queue_full
                    .fetch_add(1, Relaxed);
            }
        }
    }

    /// Send the gathered directory changes: to other nodes in batches, ours applied here.
    pub(super) async fn flush_directory(&mut self, pubr: &mut Publisher) -> lapin::Result<()> {
        for to in std::mem::take(&mut self.resync) {
            let m = NodeMsg::Resync {
                from: self.me().to_string(),
            };
            pubr.node(cluster(&self.shared), &to, &m).await?;
        }
        // Our own first: applying them may queue evictions for others.
        if let Some(mine) = self.dir_out.remove(&ME) {
            self.apply_directory(ME, &mine);
            // Evictions of our own connections come back under ME.
            if let Some(again) = self.dir_out.remove(&ME) {
                for ch in &again {
                    self.evict_local(ch);
                }
            }
        }
        if self.dir_out.is_empty() {
            return Ok(());
        }
        let batches = std::mem::take(&mut self.dir_out);
        let c = cluster(&self.shared);
        for (to, changes) in batches {
            let Some(name) = self.members.name(to).map(str::to_string) else {
                continue; // gone meanwhile: the next registration pass covers it
            };
            c.metrics
                .directory_changes_sent
                .fetch_add(changes.len() as u64, Relaxed);
            for part in changes.chunks(DIRECTORY_PART) {
                let m = NodeMsg::Directory {
                    from: self.me().to_string(),
                    incarnation: c.incarnation,
                    session: self.session,
                    changes: part.to_vec(),
                };
                pubr.node(c, &name, &m).await?;
            }
        }
        Ok(())
    }
}
