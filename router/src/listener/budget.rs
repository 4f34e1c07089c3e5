//! The budget of unauthenticated device connections: what a peer that never sends a
//! valid token can hold. Per process (`--max-unauthenticated`, at most half of
//! `--max-connections`, so authenticated devices always keep the other half) and per
//! source address (`--max-unauthenticated-per-ip`). A connection whose upgrade request
//! carries its credentials is authenticated at accept and never takes a place here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::shard::admission::Refusal;

/// How long a connection over the process's budget has to bring its credentials on
/// the upgrade request (TLS handshake included) before it is refused with 503.
pub(crate) const OVER_BUDGET_GRACE: Duration = Duration::from_secs(1);

pub(crate) struct Unauthenticated {
    /// Places in the process: min(--max-unauthenticated, --max-connections / 2).
    limit: i64,
    /// Places per source address; 0: no limit.
    per_ip: u32,
    held: AtomicI64,
    /// Unauthenticated connections per source address (only with a per-IP limit).
    by_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl Unauthenticated {
    pub(crate) fn new(max: u32, per_ip: u32, max_connections: usize) -> Arc<Self> {
        let half = i64::try_from(max_connections / 2)
            .unwrap_or(i64::MAX)
            .max(1);
        Arc::new(Unauthenticated {
            limit: i64::from(max).min(half),
            per_ip,
            held: AtomicI64::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a new unauthenticated connection from `ip`. Err: that address holds
    /// its whole budget already. A place over the process's budget is still given
    /// ([`Place::over`]): the connection may only authenticate on its upgrade request,
    /// within [`OVER_BUDGET_GRACE`].
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Place, Refusal> {
        if self.per_ip > 0 {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= self.per_ip {
                return Err(Refusal::UnauthenticatedIp);
            }
            *n += 1;
        }
        let within = self.held.fetch_add(1, Relaxed) < self.limit;
        if !within {
            self.held.fetch_sub(1, Relaxed);
        }
        Ok(Place {
            budget: self.clone(),
            ip,
            within,
        })
    }

    /// Unauthenticated connections within the process's budget now.
    pub(crate) fn held(&self) -> i64 {
        self.held.load(Relaxed)
    }
}

/// A connection's place in the budget, given back when it is dropped (authenticated,
/// refused or gone).
pub(crate) struct Place {
    budget: Arc<Unauthenticated>,
    ip: IpAddr,
    within: bool,
}

impl Place {
    /// Over the process's budget: authenticate on the upgrade request, quickly, or go.
    pub(crate) fn over(&self) -> bool {
        !self.within
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.within {
            self.budget.held.fetch_sub(1, Relaxed);
        }
        if self.budget.per_ip > 0 {
            let mut by_ip = self.budget.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Occupied(mut e) = by_ip.entry(self.ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_then_per_process() {
        let b = Unauthenticated::new(3, 2, 1000);
        let a1 = b.take(ip("10.0.0.1")).unwrap();
        let a2 = b.take(ip("10.0.0.1")).unwrap();
        assert_eq!(
            b.take(ip("10.0.0.1")).err(),
            Some(Refusal::UnauthenticatedIp)
        );
        let c1 = b.take(ip("10.0.0.2")).unwrap();
        assert!(!a1.over() && !a2.over() && !c1.over());
        let c2 = b.take(ip("10.0.0.2")).unwrap();
        assert!(c2.over(), "the process holds 3 already");
        assert_eq!(b.held(), 3);
        drop(a1);
        assert_eq!(b.held(), 2);
        let a3 = b.take(ip("10.0.0.1")).unwrap();
        assert!(!a3.over());
        drop((a2, a3, c1, c2));
        assert_eq!(b.held(), 0);
        assert!(b.by_ip.lock().unwrap().is_empty());
    }

    #[test]
    fn at_most_half_of_the_connections() {
        let b = Unauthenticated::new(2000, 0, 40);
        let held: Vec<_> = (0..20).map(|_| b.take(ip("10.0.0.1")).unwrap()).collect();
        assert!(held.iter().all(|p| !p.over()));
        assert!(b.take(ip("10.0.0.1")).unwrap().over());
        assert!(
            b.by_ip.lock().unwrap().is_empty(),
            "no per-address table without a limit"
        );
    }
}
