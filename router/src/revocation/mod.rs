//! Revocation: the deny-list of devices and token ids (`jti`), and disconnecting a device
//! wherever it is. The design and its reasons are in docs/architecture.md
//! ("Revocation: the deny-list"): in a cluster the entries live in a RabbitMQ stream that
//! every node replays and follows ([`stream`]); with the embedded bus, in a redb file under
//! `--data-dir` ([`store`]). Every node keeps the newest entry per (kind, id) in memory and
//! checks it when a device authenticates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

pub(crate) mod store;
pub(crate) mod stream;

/// Longest an entry may last (a block, a revoked token): the longest token lifetime.
pub const MAX_BLOCK_SECS: u64 = 30 * 86_400;
/// A plain disconnect (no block) closes the device when it arrives this soon after it was
/// issued; replayed later (a node that restarts reads the whole stream) it does nothing.
pub(crate) const FRESH_SECS: u64 = 60;
/// How long the API waits for the broker to confirm an entry.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Device,
    Jti,
}

/// One revocation. `until` 0 withdraws an earlier entry of the same (kind, id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub id: String,
    /// Unix seconds the block ends (the entry's `at` for a plain disconnect).
    pub until: u64,
    /// Unix seconds it was issued.
    pub at: u64,
}

impl Entry {
    /// Does this entry close the device it names now, if it is connected?
    pub(crate) fn kicks(&self, now: u64) -> Option<Uuid> {
        if self.kind != Kind::Device || self.until == 0 {
            return None;
        }
        let blocking = self.until > now;
        let fresh = now.saturating_sub(self.at) <= FRESH_SECS;
        if blocking || fresh {
            Uuid::parse_str(&self.id).ok()
        } else {
            None
        }
    }
}

#[derive(Default)]
pub(crate) struct RevocationMetrics {
    pub(crate) entries_applied: AtomicU64,
    pub(crate) kicks: AtomicU64,
    pub(crate) forged: AtomicU64,
}

/// An entry to publish on the stream, with where to say whether the broker confirmed it.
pub(crate) type ToPublish = (Entry, oneshot::Sender<Result<(), String>>);

/// The deny-list as this node knows it, and the way to add to it.
pub struct DenyList {
    entries: RwLock<HashMap<(Kind, String), Entry>>,
    /// Embedded bus with --data-dir: where entries are kept.
    store: Option<store::Store>,
    /// Cluster mode: entries to publish on the stream, each with its confirmation.
    publish: Option<mpsc::Sender<ToPublish>>,
    pub(crate) publish_rx: tokio::sync::Mutex<Option<mpsc::Receiver<ToPublish>>>,
    pub(crate) metrics: RevocationMetrics,
}

impl DenyList {
    /// Cluster mode: entries go through the broker's stream.
    pub(crate) fn clustered() -> Self {
        let (tx, rx) = mpsc::channel(1024);
        DenyList {
            entries: RwLock::default(),
            store: None,
            publish: Some(tx),
            publish_rx: tokio::sync::Mutex::new(Some(rx)),
            metrics: RevocationMetrics::default(),
        }
    }

    /// Embedded bus: entries kept in `store` (None: in memory only), read now.
    pub(crate) fn local(store: Option<store::Store>) -> anyhow::Result<Self> {
        let d = DenyList {
            entries: RwLock::default(),
            store,
            publish: None,
            publish_rx: tokio::sync::Mutex::new(None),
            metrics: RevocationMetrics::default(),
        };
        if let Some(s) = &d.store {
            for e in s.load()? {
                d.apply(&e);
            }
        }
        Ok(d)
    }

    /// Take `e` into the list (newer than what is there for its (kind, id), or equal);
    /// true when it changed something.
    pub(crate) fn apply(&self, e: &Entry) -> bool {
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let key = (e.kind, e.id.clone());
        if map.get(&key).is_some_and(|old| old.at > e.at) {
            return false;
        }
        self.metrics.entries_applied.fetch_add(1, Relaxed);
        if e.until == 0 {
            map.remove(&key);
        } else {
            map.insert(key, e.clone());
        }
        true
    }

    /// Is this device blocked, or this token revoked, at `now`?
    pub(crate) fn denies(&self, device: &Uuid, jti: Option<&str>, now: u64) -> bool {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return false;
        }
        let blocked = |k: Kind, id: String| map.get(&(k, id)).is_some_and(|e| e.until > now);
        blocked(Kind::Device, device.to_string())
            || jti.is_some_and(|j| blocked(Kind::Jti, j.to_string()))
    }

    /// The entries in force at `now`.
    pub(crate) fn list(&self, now: u64) -> Vec<Entry> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Entry> = map.values().filter(|e| e.until > now).cloned().collect();
        v.sort_by(|a, b| (a.kind as u8, &a.id).cmp(&(b.kind as u8, &b.id)));
        v
    }

    /// Add an entry for the whole deployment: published on the stream and confirmed by
    /// the broker (cluster), or committed to the store (embedded); then applied here.
    pub(crate) async fn add(&self, e: Entry) -> Result<(), String> {
        if let Some(tx) = &self.publish {
            let (done, confirmed) = oneshot::channel();
            tx.try_send((e.clone(), done))
                .map_err(|_| "the deny-list's queue to the broker is full".to_string())?;
            match tokio::time::timeout(PUBLISH_TIMEOUT, confirmed).await {
                Ok(Ok(r)) => r?,
                Ok(Err(_)) => {
                    return Err("the cluster session ended before the broker confirmed".into())
                }
                Err(_) => return Err("the broker did not confirm within 5 s".into()),
            }
        } else if let Some(s) = &self.store {
            s.put(&e)
                .map_err(|err| format!("storing the entry: {err}"))?;
        }
        self.apply(&e);
        Ok(())
    }
}

/// The deny-list's metrics, in Prometheus text.
pub(crate) fn render_metrics(d: &DenyList, o: &mut String) {
    use crate::metrics::{counter, gauge};
    gauge(
        o,
        "router_denylist_entries",
        "Deny-list entries in force (blocked devices and revoked token ids).",
        d.list(crate::auth::unix_now()).len(),
    );
    counter(
        o,
        "router_denylist_disconnects_total",
        "Devices this node was told to close with 4403 (a disconnect, or a block in force).",
        d.metrics.kicks.load(Relaxed),
    );
    counter(
        o,
        "router_denylist_forged_total",
        "Entries on the hive.denylist stream whose cluster-key seal did not verify: dropped.",
        d.metrics.forged.load(Relaxed),
    );
}

/// Close `device` with 4403 on this process, wherever its shard is.
pub(crate) fn kick(shared: &crate::Shared, device: Uuid) {
    let msg = crate::shard::ShardMsg::Disconnect { device };
    if crate::shard::ShardHandle::send_to_owner(&shared.shards, &device, msg).is_ok() {
        shared.revocation.metrics.kicks.fetch_add(1, Relaxed);
    }
}

/// Apply an entry that arrived (from the stream, or added here) and close the device it
/// names if it should go now.
pub(crate) fn arrived(shared: &crate::Shared, e: &Entry) {
    shared.revocation.apply(e);
    if let Some(d) = e.kicks(crate::auth::unix_now()) {
        kick(shared, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: Kind, id: &str, until: u64, at: u64) -> Entry {
        Entry {
            kind,
            id: id.into(),
            until,
            at,
        }
    }

    #[test]
    fn newest_entry_wins_and_expired_ones_do_not_deny() {
        let d = DenyList::local(None).unwrap();
        let dev = Uuid::from_u128(7);
        assert!(!d.denies(&dev, None, 100));
        assert!(d.apply(&e(Kind::Device, &dev.to_string(), 200, 100)));
        assert!(d.denies(&dev, None, 150));
        assert!(!d.denies(&dev, None, 200));
        // An older entry arriving late (a replay) changes nothing.
        assert!(!d.apply(&e(Kind::Device, &dev.to_string(), 0, 90)));
        assert!(d.denies(&dev, None, 150));
        // A newer withdrawal does.
        assert!(d.apply(&e(Kind::Device, &dev.to_string(), 0, 120)));
        assert!(!d.denies(&dev, None, 150));
        d.apply(&e(Kind::Jti, "tok-1", 500, 100));
        assert!(d.denies(&Uuid::from_u128(1), Some("tok-1"), 300));
        assert!(!d.denies(&Uuid::from_u128(1), Some("tok-2"), 300));
        assert_eq!(d.list(300).len(), 1);
        assert_eq!(d.list(600).len(), 0);
    }

    #[test]
    fn what_kicks() {
        let dev = Uuid::from_u128(9).to_string();
        // A block in force kicks, also replayed late.
        assert!(e(Kind::Device, &dev, 1000, 10).kicks(500).is_some());
        // A plain disconnect kicks only while fresh.
        assert!(e(Kind::Device, &dev, 100, 100).kicks(130).is_some());
        assert!(e(Kind::Device, &dev, 100, 100).kicks(1000).is_none());
        assert!(e(Kind::Device, &dev, 0, 100).kicks(100).is_none());
        assert!(e(Kind::Jti, "x", 1000, 100).kicks(100).is_none());
    }
}
