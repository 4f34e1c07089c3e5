//! Token expiry of open connections (`--close-on-token-expiry`): a min-heap of
//! (expiry, slot, connection id) and each connection's current expiry, so a device that
//! presented a newer token is not closed by its first token's entry. Exists only when
//! the option is on: a fleet without it pays nothing per connection.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

#[derive(Default)]
pub(crate) struct Expiries {
    heap: BinaryHeap<Reverse<(u64, u32, u64)>>,
    /// Connection id -> the expiry that counts (its newest token's `exp`).
    current: HashMap<u64, u64>,
}

impl Expiries {
    /// Connection `id` at `slot` holds a token that ends at `exp` (Unix seconds; 0:
    /// never). A later call for the same connection replaces the earlier expiry.
    pub(crate) fn track(&mut self, slot: u32, id: u64, exp: u64) {
        if exp == 0 {
            self.current.remove(&id);
            return;
        }
        self.current.insert(id, exp);
        self.heap.push(Reverse((exp, slot, id)));
    }

    /// The connection is gone: forget it (its heap entries are dropped when they come due).
    pub(crate) fn forget(&mut self, id: u64) {
        self.current.remove(&id);
    }

    /// Connections whose current token has expired by `now`, as (slot, id); each is
    /// returned once and forgotten.
    pub(crate) fn due(&mut self, now: u64) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        while let Some(&Reverse((exp, slot, id))) = self.heap.peek() {
            if exp > now {
                break;
            }
            self.heap.pop();
            if self.current.get(&id) == Some(&exp) {
                self.current.remove(&id);
                out.push((slot, id));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Expiries;

    #[test]
    fn due_in_order_once_and_a_newer_token_wins() {
        let mut e = Expiries::default();
        e.track(1, 10, 100);
        e.track(2, 20, 50);
        e.track(3, 30, 0); // no expiry
        assert_eq!(e.due(49), vec![]);
        assert_eq!(e.due(50), vec![(2, 20)]);
        // Connection 10 presented a newer token before 100.
        e.track(1, 10, 200);
        assert_eq!(e.due(150), vec![]);
        assert_eq!(e.due(200), vec![(1, 10)]);
        assert_eq!(e.due(1000), vec![]);
        // A connection that went away is not reported.
        e.track(4, 40, 300);
        e.forget(40);
        assert_eq!(e.due(300), vec![]);
        assert!(e.current.is_empty());
    }
}
