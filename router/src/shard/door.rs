//! The shard's door: all a connection sees of its shard before it is authenticated.
//!
//! The shard's loop owns its connections alone. The handshake tasks it spawns (TLS,
//! a slow upgrade, a PROXY header) run beside it on the same thread and reach it only
//! through this: the process's shared state, the admission table (a proxied
//! connection is counted against its device's address once the header names it) and
//! the queue on which they hand an authenticated connection back to the loop.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::admission::{Admission, Refusal};
use super::{coarse_secs, Adopt};
use crate::metrics::ShardMetrics;
use crate::Shared;

pub(crate) struct Door {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    /// Connects per source IP in the current second (only with --ip-connect-rate).
    admission: RefCell<Admission>,
    /// `coarse_secs()` when the door opened: the admission table's clock.
    started: u64,
    /// Authenticated connections for this shard, from its handshake tasks.
    adopted: mpsc::UnboundedSender<Adopt>,
}

impl Door {
    /// The door and the receiving end of its hand-back queue (for the shard's loop).
    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> (Door, mpsc::UnboundedReceiver<Adopt>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let admission =
            Admission::new(shared.config.ip_connect_rate, shared.config.max_connections);
        let door = Door {
            id,
            shared,
            admission: RefCell::new(admission),
            started: coarse_secs(),
            adopted: tx,
        };
        (door, rx)
    }

    pub(crate) fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.id]
    }

    fn now_secs(&self) -> u32 {
        coarse_secs().saturating_sub(self.started) as u32
    }

    /// An authenticated connection of a device this shard owns, from a handshake task:
    /// the loop adopts it on its next pass. (Gone with the loop: the connection closes.)
    pub(crate) fn hand_back(&self, a: Adopt) {
        let _ = self.adopted.send(a);
    }

    /// May a new connection from `ip` be accepted?
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.admit_connection()?;
        self.admit_ip(ip)
    }

    /// Draining and the connection cap: decided at accept, before a byte is read. (A
    /// draining shard has stopped accepting; the process-wide drain is checked here.)
    pub(crate) fn admit_connection(&self) -> Result<(), Refusal> {
        let draining = self.shared.draining.load(Relaxed);
        let open = self.shared.metrics.open_connections.load(Relaxed);
        let r = self.admission.borrow().connection(draining, open);
        self.counted(r)
    }

    /// The per-IP connect rate (`--ip-connect-rate`), for the device's address.
    pub(crate) fn admit_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        let now = self.now_secs();
        let r = self.admission.borrow_mut().ip(ip, now);
        self.counted(r)
    }

    /// A place among the process's unauthenticated connections, for a connection from
    /// `ip` that was not authenticated at accept (refused: that address holds its
    /// budget already; counted).
    pub(crate) fn unauthenticated(
        &self,
        ip: IpAddr,
    ) -> Result<crate::listener::budget::Place, Refusal> {
        self.shared
            .unauthenticated
            .take(ip)
            .inspect_err(|why| self.refused(*why))
    }

    /// Count a refusal decided elsewhere (a connection over the budget that did not
    /// authenticate on its upgrade request).
    pub(crate) fn refused(&self, why: Refusal) {
        let _ = self.counted(Err(why));
    }

    /// Forget the addresses of past seconds.
    pub(super) fn sweep(&self) {
        let now = self.now_secs();
        self.admission.borrow_mut().sweep(now);
    }

    fn counted(&self, r: Result<(), Refusal>) -> Result<(), Refusal> {
        if let Err(why) = r {
            let m = self.metrics();
            let counter = match why {
                Refusal::Draining => &m.refused_draining,
                Refusal::MaxConnections => &m.refused_max_connections,
                Refusal::IpRate => &m.refused_ip_rate,
                Refusal::Unauthenticated => &m.refused_unauthenticated,
                Refusal::UnauthenticatedIp => &m.refused_unauthenticated_ip,
            };
            counter.fetch_add(1, Relaxed);
        }
        r
    }
}
