//! The directory: where each device is connected, partitioned across the nodes.
//!
//! Every device has one *home* node (rendezvous hash over the live members, see
//! [`super::membership`]), and only its home records where it is. The node a device
//! connects to (its *owner*) sends its home a `Claim`; when the connection ends, a
//! `Release`. So the cluster holds one directory entry per device, whatever the number
//! of nodes: memory grows with devices, not devices x nodes.
//!
//! **Newest connection wins.** A claim carries the time its connection was made. When a
//! home holds a device at node A and a claim for it comes from node B, the newer of the
//! two keeps the entry and the other node is told to close its connection (`Evict`,
//! closed with 4409 if it is not newer than the evicted claim). Requests follow the
//! entry, so none goes to the stale connection once the home has decided.
//!
//! **Expected back.** A device whose node died, or that its node closed to drain, is
//! kept for [`MOVING_TTL`] as *moving*: a request for it waits for it to reconnect
//! (within the request's deadline) instead of answering 404.
//!
//! The directory is soft state, rebuilt from the owners: a node re-registers its
//! devices whenever their home changes (a member joined or left) or their home's queue
//! was declared anew (it reconnected or restarted). Nothing here is ever resent on a
//! timer, so no resync can snowball.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::envelope::{DirChange, DirKind};
use super::membership::NodeId;

/// How long a device whose node died or drained is waited for.
pub(crate) const MOVING_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    owner: NodeId,
    since: u64,
}

/// What the home knows of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    At(NodeId),
    /// Its node went away or drained it: expected back.
    Moving,
    Unknown,
}

#[derive(Default)]
pub(crate) struct Directory {
    entries: HashMap<Uuid, Entry>,
    moving: HashMap<Uuid, Instant>,
}

impl Directory {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn moving_len(&self) -> usize {
        self.moving.len()
    }

    pub(crate) fn lookup(&self, device: &Uuid) -> Lookup {
        match self.entries.get(device) {
            Some(e) => Lookup::At(e.owner),
            None if self.moving.contains_key(device) => Lookup::Moving,
            None => Lookup::Unknown,
        }
    }

    /// Apply one change from `from`. Returns an eviction to send: (node, change).
    pub(crate) fn apply(
        &mut self,
        from: NodeId,
        c: &DirChange,
        now: Instant,
    ) -> Option<(NodeId, DirChange)> {
        let device = Uuid::from_u128(c.device);
        match c.kind {
            DirKind::Claim => {
                self.moving.remove(&device);
                let new = Entry {
                    owner: from,
                    since: c.since,
                };
                match self.entries.get_mut(&device) {
                    None => {
                        self.entries.insert(device, new);
                        None
                    }
                    Some(e) if e.owner == from => {
                        e.since = e.since.max(c.since);
                        None
                    }
                    // The newer connection wins (an equal age goes to the later claim).
                    Some(e) if c.since >= e.since => {
                        let loser = *e;
                        *e = new;
                        Some((loser.owner, evict(c.device, loser.since)))
                    }
                    Some(_) => Some((from, evict(c.device, c.since))),
                }
            }
            DirKind::Release | DirKind::ReleaseBack => {
                let ours = self
                    .entries
                    .get(&device)
                    .is_some_and(|e| e.owner == from && e.since <= c.since);
                if ours {
                    self.entries.remove(&device);
                    if c.kind == DirKind::ReleaseBack {
                        self.moving.insert(device, now + MOVING_TTL);
                    }
                }
                None
            }
            // Evictions are for owners, not homes.
            DirKind::Evict => None,
        }
    }

    /// A node is gone: its devices are expected back elsewhere. Returns how many.
    pub(crate) fn owner_gone(&mut self, owner: NodeId, now: Instant) -> usize {
        let mut n = 0;
        let moving = &mut self.moving;
        self.entries.retain(|d, e| {
            if e.owner == owner {
                moving.insert(*d, now + MOVING_TTL);
                n += 1;
                false
            } else {
                true
            }
        });
        n
    }

    /// Drop the entries (and moving marks) of devices this node is no longer home for:
    /// their owners register them at the new home.
    pub(crate) fn retain_homed(&mut self, mut homed_here: impl FnMut(u128) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|d, _| homed_here(d.as_u128()));
        self.moving.retain(|d, _| homed_here(d.as_u128()));
        before - self.entries.len()
    }

    pub(crate) fn expire(&mut self, now: Instant) {
        self.moving.retain(|_, until| *until > now);
    }
}

fn evict(device: u128, since: u64) -> DirChange {
    DirChange {
        device,
        since,
        kind: DirKind::Evict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(device: u128, since: u64, kind: DirKind) -> DirChange {
        DirChange {
            device,
            since,
            kind,
        }
    }

    #[test]
    fn the_newest_claim_wins_and_the_other_owner_is_evicted() {
        let now = Instant::now();
        let mut dir = Directory::default();
        let d = Uuid::from_u128(5);
        assert_eq!(dir.apply(1, &ch(5, 100, DirKind::Claim), now), None);
        assert_eq!(dir.lookup(&d), Lookup::At(1));
        // Node 2's connection is newer: it takes over, node 1 closes the one of 100.
        assert_eq!(
            dir.apply(2, &ch(5, 200, DirKind::Claim), now),
            Some((1, ch(5, 100, DirKind::Evict)))
        );
        assert_eq!(dir.lookup(&d), Lookup::At(2));
        // A late claim of an older connection (node 3) loses at once.
        assert_eq!(
            dir.apply(3, &ch(5, 150, DirKind::Claim), now),
            Some((3, ch(5, 150, DirKind::Evict)))
        );
        assert_eq!(dir.lookup(&d), Lookup::At(2));
        // Node 1's release of its old connection does not erase node 2's.
        dir.apply(1, &ch(5, 100, DirKind::Release), now);
        assert_eq!(dir.lookup(&d), Lookup::At(2));
        // Node 2 reconnects the device itself: no eviction, the entry stays.
        assert_eq!(dir.apply(2, &ch(5, 300, DirKind::Claim), now), None);
        // Its release of the connection of 300 removes it: unknown (404 after grace).
        dir.apply(2, &ch(5, 300, DirKind::Release), now);
        assert_eq!(dir.lookup(&d), Lookup::Unknown);
        assert_eq!(dir.len(), 0);
    }

    #[test]
    fn drained_and_orphaned_devices_are_moving_until_claimed_or_expired() {
        let now = Instant::now();
        let mut dir = Directory::default();
        dir.apply(1, &ch(1, 10, DirKind::Claim), now);
        dir.apply(1, &ch(2, 10, DirKind::Claim), now);
        dir.apply(2, &ch(3, 10, DirKind::Claim), now);
        dir.apply(1, &ch(1, 10, DirKind::ReleaseBack), now);
        assert_eq!(dir.lookup(&Uuid::from_u128(1)), Lookup::Moving);
        assert_eq!(dir.owner_gone(1, now), 1);
        assert_eq!(dir.lookup(&Uuid::from_u128(2)), Lookup::Moving);
        assert_eq!(dir.lookup(&Uuid::from_u128(3)), Lookup::At(2));
        assert_eq!(dir.moving_len(), 2);
        dir.apply(2, &ch(2, 20, DirKind::Claim), now);
        assert_eq!(dir.lookup(&Uuid::from_u128(2)), Lookup::At(2));
        dir.expire(now + MOVING_TTL);
        assert_eq!(dir.lookup(&Uuid::from_u128(1)), Lookup::Unknown);
        // Re-homing drops what is no longer ours.
        assert_eq!(dir.retain_homed(|d| d != 3), 1);
        assert_eq!(dir.lookup(&Uuid::from_u128(3)), Lookup::Unknown);
        assert_eq!(dir.len(), 1);
    }
}
