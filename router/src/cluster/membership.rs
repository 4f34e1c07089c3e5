//! Which router nodes are alive, and which node is a device's directory *home*.
//!
//! Nodes hear of each other from the heartbeats on `hive.presence` (one small message
//! per node per [`super::HEARTBEAT`], never per device). Silence alone never removes a
//! node: a node silent for [`SUSPECT_AFTER`] is only *suspected*, and the broker is
//! asked whether its queue `hive.node.<id>` still exists (a passive declare of a queue
//! that is exclusive to another connection answers 405 RESOURCE_LOCKED while that
//! connection lives, 404 NOT_FOUND once it is gone). Only the broker's "gone" removes
//! it. A node that is slow, stalled or behind a flow-controlled connection keeps its
//! queue, so it stays a member; a node killed with -9 loses its connection and queue at
//! once, and is removed at the next probe.
//!
//! The home of a device is chosen by rendezvous hashing over the live nodes: every node
//! computes the same home from the same member list, and a node joining or leaving moves
//! only the devices whose home it becomes or was (about 1/N of them).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A member silent this long is probed (its queue looked up on the broker).
pub(crate) const SUSPECT_AFTER: Duration = Duration::from_secs(3);
/// After a probe that could not decide (broker error), wait this long before the next.
pub(crate) const PROBE_RETRY: Duration = Duration::from_secs(2);

/// A node's id in this process's table (never reused, so a stale id never names a
/// different node).
pub(crate) type NodeId = u32;
/// This node's own id in its table.
pub(crate) const ME: NodeId = 0;

#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) name: String,
    /// Stable across processes: the rendezvous weight of a device at this node.
    seed: u64,
    pub(crate) incarnation: u64,
    pub(crate) session: u64,
    pub(crate) last_seen: Instant,
    pub(crate) devices: u64,
    /// No probe before this instant.
    probe_after: Option<Instant>,
    /// When the probe under way started.
    probing: Option<Instant>,
}

/// What a heartbeat (or join) told us about its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heard {
    /// Already known, same process, same broker session.
    Same,
    /// First heard of (or heard again after it was removed).
    New,
    /// Same process, a new broker session: its queue was declared anew.
    Reconnected,
    /// The same name, a new process: what the old one held is gone.
    Restarted,
}

#[derive(Debug)]
pub(crate) struct Membership {
    peers: HashMap<NodeId, Peer>,
    by_name: HashMap<String, NodeId>,
    next_id: NodeId,
    /// No member is probed before this (set when our own session starts, while every
    /// node may still be reconnecting after a broker restart).
    hold_probes_until: Instant,
    /// Bumped whenever the member set changes.
    pub(crate) epoch: u64,
    /// Nodes that said they were leaving: name -> the incarnation that left, and when.
    /// Its directory changes travel on another queue than its Leaving and may arrive
    /// after it; they must not make it a member again (it would then be found dead).
    left: HashMap<String, (u64, Instant)>,
}

/// How long a departed incarnation is remembered (messages it sent before leaving are
/// long delivered by then).
const LEFT_REMEMBERED: Duration = Duration::from_secs(300);

/// The weight of `device` at a node with `seed`: the highest weight is the home.
fn weight(device: u128, seed: u64) -> u64 {
    splitmix((device as u64) ^ splitmix(((device >> 64) as u64) ^ seed))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of the node name: the same on every node (std's hasher is seeded per process).
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Membership {
    pub(crate) fn new(me: &str, incarnation: u64, now: Instant) -> Self {
        let mut m = Membership {
            peers: HashMap::new(),
            by_name: HashMap::new(),
            next_id: 1,
            hold_probes_until: now,
            epoch: 0,
            left: HashMap::new(),
        };
        m.peers.insert(ME, Peer::new(me, incarnation, 0, now));
        m.by_name.insert(me.to_string(), ME);
        m
    }

    pub(crate) fn name(&self, id: NodeId) -> Option<&str> {
        self.peers.get(&id).map(|p| p.name.as_str())
    }

    pub(crate) fn id(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }

    pub(crate) fn set_my_session(&mut self, session: u64) {
        if let Some(p) = self.peers.get_mut(&ME) {
            p.session = session;
        }
    }

    /// Our own session (re)started: whatever we heard before is as fresh as now, and
    /// nobody is probed until `hold` has passed (they may all be reconnecting too).
    pub(crate) fn restart_clock(&mut self, now: Instant, hold: Duration) {
        for p in self.peers.values_mut() {
            p.last_seen = now;
            p.probe_after = None;
        }
        self.hold_probes_until = now + hold;
    }

    /// A heartbeat or join from `name`.
    pub(crate) fn heard(
        &mut self,
        name: &str,
        incarnation: u64,
        session: u64,
        devices: Option<u64>,
        now: Instant,
    ) -> (NodeId, Heard) {
        if let Some(&id) = self.by_name.get(name) {
            let p = self.peers.get_mut(&id).expect("by_name and peers agree");
            let heard = if p.incarnation != incarnation {
                Heard::Restarted
            } else if p.session != session {
                Heard::Reconnected
            } else {
                Heard::Same
            };
            p.incarnation = incarnation;
            p.session = session;
            p.last_seen = now;
            p.probe_after = None;
            if let Some(d) = devices {
                p.devices = d;
            }
            return (id, heard);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut p = Peer::new(name, incarnation, session, now);
        p.devices = devices.unwrap_or(0);
        self.peers.insert(id, p);
        self.by_name.insert(name.to_string(), id);
        self.epoch += 1;
        (id, Heard::New)
    }

    /// A member said it is leaving: removed, and its incarnation remembered so that what
    /// it sent before leaving does not bring it back (see [`Membership::has_left`]).
    pub(crate) fn leave(&mut self, id: NodeId, now: Instant) -> Option<Peer> {
        let p = self.remove(id)?;
        self.left
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < LEFT_REMEMBERED);
        self.left.insert(p.name.clone(), (p.incarnation, now));
        Some(p)
    }

    /// Whether this incarnation of `name` said it was leaving (a restarted node has
    /// another incarnation and is a member again).
    pub(crate) fn has_left(&self, name: &str, incarnation: u64) -> bool {
        self.left
            .get(name)
            .is_some_and(|&(inc, _)| inc == incarnation)
    }

    /// Remove a member (it left, or the broker says its queue is gone).
    pub(crate) fn remove(&mut self, id: NodeId) -> Option<Peer> {
        if id == ME {
            return None;
        }
        let p = self.peers.remove(&id)?;
        self.by_name.remove(&p.name);
        self.epoch += 1;
        Some(p)
    }

    /// Members to probe now: silent for [`SUSPECT_AFTER`], not already being probed.
    pub(crate) fn suspects(&mut self, now: Instant) -> Vec<(NodeId, String)> {
        if now < self.hold_probes_until {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&id, p) in self.peers.iter_mut() {
            if id == ME || p.probing.is_some() {
                continue;
            }
            let silent = now.duration_since(p.last_seen) >= SUSPECT_AFTER;
            let due = p.probe_after.is_none_or(|t| now >= t);
            if silent && due {
                p.probing = Some(now);
                out.push((id, p.name.clone()));
            }
        }
        out
    }

    /// A probe ended: `Some(true)` alive (its queue exists), `Some(false)` gone,
    /// `None` undecided. Returns the removed peer when gone. A node heard from since
    /// the probe started is alive whatever the probe found (it had just reconnected).
    pub(crate) fn probed(&mut self, id: NodeId, alive: Option<bool>, now: Instant) -> Option<Peer> {
        let p = self.peers.get_mut(&id)?;
        let started = p.probing.take().unwrap_or(now);
        let alive = if p.last_seen > started {
            Some(true)
        } else {
            alive
        };
        match alive {
            Some(false) => self.remove(id),
            Some(true) => {
                // Alive but silent: look again after another SUSPECT_AFTER.
                p.probe_after = Some(now + SUSPECT_AFTER);
                None
            }
            None => {
                p.probe_after = Some(now + PROBE_RETRY);
                None
            }
        }
    }

    /// The home of `device` among the live members.
    pub(crate) fn home(&self, device: u128) -> NodeId {
        let mut best = (0u64, ME);
        for (&id, p) in &self.peers {
            let w = weight(device, p.seed);
            // Ties (practically never) go to the lower seed, the same on every node.
            if w > best.0 || (w == best.0 && self.peers[&best.1].seed > p.seed) {
                best = (w, id);
            }
        }
        best.1
    }
}

impl Peer {
    fn new(name: &str, incarnation: u64, session: u64, now: Instant) -> Self {
        Peer {
            name: name.to_string(),
            seed: seed_of(name),
            incarnation,
            session,
            last_seen: now,
            devices: 0,
            probe_after: None,
            probing: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_agree_across_nodes_and_move_little() {
        let now = Instant::now();
        let names: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
        // Each node's table lists the same members (itself first, others in another order).
        let tables: Vec<Membership> = names
            .iter()
            .map(|me| {
                let mut m = Membership::new(me, 1, now);
                for other in names.iter().rev().filter(|n| *n != me) {
                    m.heard(other, 1, 1, None, now);
                }
                m
            })
            .collect();
        let devices: Vec<u128> = (0..4000u128)
            .map(|i| i.wrapping_mul(0x1234_5678_9abc_def1_2345))
            .collect();
        let mut per_node = HashMap::new();
        for &d in &devices {
            let homes: Vec<&str> = tables.iter().map(|t| t.name(t.home(d)).unwrap()).collect();
            assert!(homes.windows(2).all(|w| w[0] == w[1]), "{homes:?}");
            *per_node.entry(homes[0].to_string()).or_insert(0) += 1;
        }
        // Spread: each of 5 nodes is home to roughly a fifth.
        for (n, c) in &per_node {
            assert!((600..1000).contains(c), "{n}: {c}");
        }
        // A sixth node joins: only devices whose home becomes n5 move.
        let mut t = Membership::new("n0", 1, now);
        for n in &names[1..] {
            t.heard(n, 1, 1, None, now);
        }
        let before: Vec<NodeId> = devices.iter().map(|&d| t.home(d)).collect();
        let (n5, _) = t.heard("n5", 1, 1, None, now);
        let mut moved = 0;
        for (i, &d) in devices.iter().enumerate() {
            let h = t.home(d);
            if h != before[i] {
                assert_eq!(h, n5);
                moved += 1;
            }
        }
        assert!((450..900).contains(&moved), "{moved}");
    }

    #[test]
    fn a_node_that_left_is_not_brought_back_by_what_it_sent_before() {
        let t0 = Instant::now();
        let mut m = Membership::new("a", 1, t0);
        let (b, _) = m.heard("b", 7, 1, None, t0);
        assert!(m.leave(b, t0).is_some());
        assert_eq!((m.len(), m.has_left("b", 7)), (1, true));
        // A restart of b is another incarnation: a member again.
        assert!(!m.has_left("b", 8));
        let (_, h) = m.heard("b", 8, 1, None, t0);
        assert_eq!((h, m.len()), (Heard::New, 2));
        // Remembered for a while, then forgotten (at the next departure).
        let (c, _) = m.heard("c", 3, 1, None, t0);
        m.leave(c, t0 + LEFT_REMEMBERED + Duration::from_secs(1));
        assert!(!m.has_left("b", 7) && m.has_left("c", 3));
    }

    #[test]
    fn silence_only_suspects_and_the_broker_decides() {
        let t0 = Instant::now();
        let mut m = Membership::new("a", 1, t0);
        let (b, h) = m.heard("b", 7, 1, Some(10), t0);
        assert_eq!(h, Heard::New);
        assert!(m.suspects(t0 + Duration::from_secs(1)).is_empty());
        let later = t0 + SUSPECT_AFTER;
        assert_eq!(m.suspects(later), vec![(b, "b".to_string())]);
        // Being probed: not suspected twice.
        assert!(m.suspects(later).is_empty());
        // The broker says its queue exists: still a member, probed again later.
        assert!(m.probed(b, Some(true), later).is_none());
        assert_eq!(m.len(), 2);
        assert!(m.suspects(later + Duration::from_secs(1)).is_empty());
        assert_eq!(m.suspects(later + SUSPECT_AFTER).len(), 1);
        // Gone: removed, and the epoch moves.
        let e = m.epoch;
        assert!(m.probed(b, Some(false), later + SUSPECT_AFTER).is_some());
        assert_eq!(m.len(), 1);
        assert!(m.epoch > e);
        // A gone verdict for a node heard from while the probe ran does not count.
        let (b2, _) = m.heard("b", 7, 1, None, later);
        let t = later + SUSPECT_AFTER * 2;
        assert_eq!(m.suspects(t).len(), 1);
        m.heard("b", 7, 1, None, t + Duration::from_millis(1));
        assert!(m
            .probed(b2, Some(false), t + Duration::from_millis(2))
            .is_none());
        assert_eq!(m.len(), 2);
        assert!(m.remove(b2).is_some());
        // Heard again: a new member with a new id.
        let (b2, h) = m.heard("b", 7, 1, None, later);
        assert_eq!(h, Heard::New);
        assert_ne!(b2, b);
        assert_eq!(m.heard("b", 7, 2, None, later).1, Heard::Reconnected);
        assert_eq!(m.heard("b", 8, 2, None, later).1, Heard::Restarted);
        assert_eq!(m.heard("b", 8, 2, None, later).1, Heard::Same);
    }

    #[test]
    fn no_probes_while_held_after_our_own_reconnect() {
        let t0 = Instant::now();
        let mut m = Membership::new("a", 1, t0);
        m.heard("b", 1, 1, None, t0);
        let t1 = t0 + Duration::from_secs(20);
        m.restart_clock(t1, Duration::from_secs(10));
        assert!(m.suspects(t1 + SUSPECT_AFTER).is_empty());
        assert_eq!(m.suspects(t1 + Duration::from_secs(10)).len(), 1);
    }
}
