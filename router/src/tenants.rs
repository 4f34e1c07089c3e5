//! Tenants: devices connected per account, here and in the whole cluster, and the
//! per-account limits (`--account-max-devices`, `--account-max-rate`).
//!
//! Each node counts its own devices per account (on connect and disconnect, one map
//! operation under a mutex, as the cluster's device table) and puts its largest counts
//! (at most [`SHARED_ACCOUNTS`] accounts) in its heartbeat, once a second; a node adds
//! what its peers said to its own count. A new connection is refused (close 4429) when
//! its account's count is at the limit. The cluster-wide count is up to a heartbeat old
//! (one second), so an account connecting on several nodes at once can pass its limit by
//! what those nodes admit in that second (a few percent of a large account at fleet
//! connect rates); an account that is not among a node's largest there counts only
//! where it is. Messages per account are limited per shard (each shard allows its share
//! of `--account-max-rate`), with no lock on the message path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Accounts a node shares in each heartbeat: its largest.
pub(crate) const SHARED_ACCOUNTS: usize = 256;
/// A peer's counts older than this are ignored (the peer stopped sending them).
const STALE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct TenantMetrics {
    pub(crate) refused_devices: AtomicU64,
    pub(crate) refused_rate: AtomicU64,
}

/// When a peer said, and its largest accounts' counts.
type PeerCounts = (Instant, HashMap<Uuid, u32>);

pub struct Tenants {
    pub(crate) max_devices: u32,
    pub(crate) max_rate: u32,
    local: Mutex<HashMap<Uuid, u32>>,
    /// Per peer node: when it said, and its accounts' counts.
    remote: Mutex<HashMap<String, PeerCounts>>,
    pub(crate) metrics: TenantMetrics,
}

impl Tenants {
    pub(crate) fn new(max_devices: u32, max_rate: u32) -> Self {
        Tenants {
            max_devices,
            max_rate,
            local: Mutex::default(),
            remote: Mutex::default(),
            metrics: TenantMetrics::default(),
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, u32>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn gained(&self, account: Uuid) {
        *self.local().entry(account).or_default() += 1;
    }

    pub(crate) fn lost(&self, account: Uuid) {
        let mut m = self.local();
        if let Some(n) = m.get_mut(&account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&account);
            }
        }
    }

    /// (in the cluster, on this node) for `account`.
    pub(crate) fn connected(&self, account: &Uuid) -> (u64, u64) {
        let here = u64::from(self.local().get(account).copied().unwrap_or(0));
        let remote: u64 = self
            .remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(at, _)| at.elapsed() < STALE)
            .map(|(_, m)| u64::from(m.get(account).copied().unwrap_or(0)))
            .sum();
        (here + remote, here)
    }

    /// Is `account` at its device limit now?
    pub(crate) fn full(&self, account: &Uuid) -> bool {
        self.max_devices > 0 && self.connected(account).0 >= u64::from(self.max_devices)
    }

    /// May a device of `account` connect now? (Counted when refused.)
    pub(crate) fn admits(&self, account: &Uuid) -> bool {
        let full = self.full(account);
        if full {
            self.metrics.refused_devices.fetch_add(1, Relaxed);
        }
        !full
    }

    /// This node's largest accounts, for its heartbeat.
    pub(crate) fn largest(&self, n: usize) -> Vec<(u128, u32)> {
        let m = self.local();
        let mut v: Vec<(u128, u32)> = m.iter().map(|(a, c)| (a.as_u128(), *c)).collect();
        if v.len() > n {
            v.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            v.truncate(n);
        }
        v
    }

    /// The largest accounts in the cluster as this node knows them: (account, count).
    pub(crate) fn top(&self, n: usize) -> Vec<(Uuid, u64)> {
        let mut all: HashMap<Uuid, u64> = self
            .local()
            .iter()
            .map(|(a, c)| (*a, u64::from(*c)))
            .collect();
        for (at, m) in self
            .remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if at.elapsed() < STALE {
                for (a, c) in m {
                    *all.entry(*a).or_default() += u64::from(*c);
                }
            }
        }
        let mut v: Vec<(Uuid, u64)> = all.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// A peer's heartbeat said these counts.
    pub(crate) fn heard(&self, node: &str, counts: impl Iterator<Item = (u128, u32)>) {
        let m = counts.map(|(a, c)| (Uuid::from_u128(a), c)).collect();
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), (Instant::now(), m));
    }

    /// A peer left the cluster.
    pub(crate) fn forget(&self, node: &str) {
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }
}

/// The tenants' metrics, in Prometheus text (no label per account: the API has them).
pub(crate) fn render_metrics(t: &Tenants, o: &mut String) {
    use crate::metrics::gauge;
    use std::fmt::Write;
    gauge(
        o,
        "router_accounts_connected",
        "Accounts with at least one device connected to this node.",
        t.local().len(),
    );
    let _ = writeln!(
        o,
        "# HELP router_account_limit_refusals_total Connections (4429) and messages (rate-limited) refused by a per-account limit.\n# TYPE router_account_limit_refusals_total counter"
    );
    for (limit, v) in [
        ("devices", &t.metrics.refused_devices),
        ("rate", &t.metrics.refused_rate),
    ] {
        let _ = writeln!(
            o,
            "router_account_limit_refusals_total{{limit=\"{limit}\"}} {}",
            v.load(Relaxed)
        );
    }
}

/// One shard's view of `--account-max-rate`: a token bucket per account, refilled at the
/// shard's share of the rate (burst: one second's worth), and the messages it was offered
/// in this second and the last. Touched only by its shard.
#[derive(Default)]
pub(crate) struct AccountRates {
    buckets: HashMap<Uuid, Bucket>,
}

struct Bucket {
    tokens: u32,
    at: u32,
    /// Messages offered in second `at` and in the second before it.
    this_second: u32,
    last_second: u32,
}

impl AccountRates {
    /// Take one message of `account` at second `now` with `per_second` for this shard.
    pub(crate) fn admit(&mut self, account: Uuid, now: u32, per_second: u32) -> bool {
        let per_second = per_second.max(1);
        let b = self.buckets.entry(account).or_insert(Bucket {
            tokens: per_second,
            at: now,
            this_second: 0,
            last_second: 0,
        });
        if now > b.at {
            b.tokens = b
                .tokens
                .saturating_add((now - b.at).saturating_mul(per_second))
                .min(per_second);
            b.last_second = if now == b.at + 1 { b.this_second } else { 0 };
            b.this_second = 0;
            b.at = now;
        }
        b.this_second = b.this_second.saturating_add(1);
        if b.tokens == 0 {
            return false;
        }
        b.tokens -= 1;
        true
    }

    /// Messages the account's devices offered this shard in the last whole second.
    pub(crate) fn last_second(&self, account: &Uuid, now: u32) -> u32 {
        self.buckets
            .get(account)
            .map_or(0, |b| match now.saturating_sub(b.at) {
                0 => b.last_second,
                1 => b.this_second,
                _ => 0,
            })
    }

    /// Forget buckets untouched for a while (full again by now anyway).
    pub(crate) fn sweep(&mut self, now: u32) {
        self.buckets.retain(|_, b| now.saturating_sub(b.at) < 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_here_and_from_peers_decide_admission() {
        let t = Tenants::new(5, 0);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for _ in 0..3 {
            t.gained(a);
        }
        t.gained(b);
        assert_eq!(t.connected(&a), (3, 3));
        assert!(t.admits(&a));
        t.heard("peer", [(a.as_u128(), 2)].into_iter());
        assert_eq!(t.connected(&a), (5, 3));
        assert!(!t.admits(&a));
        assert_eq!(t.metrics.refused_devices.load(Relaxed), 1);
        assert!(t.admits(&b));
        t.lost(a);
        assert!(t.admits(&a));
        t.forget("peer");
        assert_eq!(t.connected(&a), (2, 2));
        assert_eq!(t.top(1), vec![(a, 2)]);
        assert_eq!(t.largest(1), vec![(a.as_u128(), 2)]);
        assert!(Tenants::new(0, 0).admits(&a));
    }

    #[test]
    fn account_rate_per_shard() {
        let mut r = AccountRates::default();
        let a = Uuid::from_u128(1);
        assert!((0..3).all(|_| r.admit(a, 10, 3)));
        assert!(!r.admit(a, 10, 3));
        assert!(r.admit(Uuid::from_u128(2), 10, 3));
        assert!(r.admit(a, 11, 3));
        // Offered in second 10: four (one refused); second 11 so far: one.
        assert_eq!(r.last_second(&a, 11), 4);
        assert_eq!(r.last_second(&a, 12), 1);
        assert_eq!(r.last_second(&a, 13), 0);
        r.sweep(30);
        assert!(r.buckets.is_empty());
    }
}
