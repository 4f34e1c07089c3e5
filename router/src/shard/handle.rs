//! How other threads reach a shard: its inbox and the wake-up that goes with it.

use tokio::sync::Notify;
use uuid::Uuid;

use super::{shard_of, ShardMsg};

/// A shard's inbox, for every other thread (API, listener, bridge).
///
/// Bounded by a count, not by a preallocated ring: crossbeam's bounded channel writes
/// every slot of its ring when it is made, which at the default `--queue-capacity`
/// (65,536 messages of ~56 bytes) kept 3.6 MiB resident per shard whether or not a message
/// ever came. The unbounded (linked blocks of 31 slots) channel allocates as messages
/// arrive and frees as they are taken; `send` refuses once `capacity` messages wait. The
/// bound is checked before the push, so senders racing at the limit may pass it by at
/// most one message each.
pub struct ShardHandle {
    tx: crossbeam_channel::Sender<ShardMsg>,
    capacity: usize,
    pub(super) notify: Notify,
}

impl ShardHandle {
    pub fn new(capacity: usize) -> (Self, crossbeam_channel::Receiver<ShardMsg>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (
            ShardHandle {
                tx,
                capacity: capacity.max(1),
                notify: Notify::new(),
            },
            rx,
        )
    }

    /// Never blocks: a full inbox (or a stopped shard) is the caller's decision (503,
    /// drop, close), and the message comes back.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        if self.tx.len() >= self.capacity {
            return Err(msg);
        }
        match self.tx.send(msg) {
            Ok(()) => {
                self.notify.notify_one();
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    /// Send to the inbox of the shard that owns `device` (by [`shard_of`]). A full inbox
    /// (or a stopped shard) hands the message back; counting it is the caller's, whose
    /// metric and answer (503, busy, close) differ.
    pub(crate) fn send_to_owner(
        shards: &[ShardHandle],
        device: &Uuid,
        msg: ShardMsg,
    ) -> Result<(), ShardMsg> {
        shards[shard_of(device, shards.len())].send(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(until: u64) -> ShardMsg {
        ShardMsg::Drain(std::time::Instant::now() + std::time::Duration::from_secs(until))
    }

    #[test]
    fn refuses_past_capacity_and_hands_the_message_back() {
        let (h, rx) = ShardHandle::new(3);
        for i in 0..3 {
            assert!(h.send(drain(i)).is_ok(), "message {i}");
        }
        match h.send(drain(9)) {
            Err(ShardMsg::Drain(_)) => {}
            _ => panic!("a fourth message was taken into an inbox of three"),
        }
        assert_eq!(rx.len(), 3);
        // One taken: room for one more, and only one.
        rx.try_recv().unwrap();
        assert!(h.send(drain(3)).is_ok());
        assert!(h.send(drain(4)).is_err());
        // Order kept.
        let mut left = Vec::new();
        while let Ok(ShardMsg::Drain(t)) = rx.try_recv() {
            left.push(t);
        }
        assert_eq!(left.len(), 3);
        assert!(left.windows(2).all(|w| w[0] < w[1]));
        // A stopped shard (receiver gone) refuses too.
        drop(rx);
        assert!(h.send(drain(0)).is_err());
    }

    #[test]
    fn send_to_owner_lands_on_shard_of_and_hands_back_when_full() {
        let evict = |device| ShardMsg::Evict {
            device,
            since_ms: 0,
        };
        let (handles, rxs): (Vec<_>, Vec<_>) = (0..4).map(|_| ShardHandle::new(64)).unzip();
        let devices: Vec<Uuid> = (0..64u128)
            .map(|i| Uuid::from_u128(i * 0x9E37_79B9))
            .collect();
        for d in &devices {
            assert!(ShardHandle::send_to_owner(&handles, d, evict(*d)).is_ok());
        }
        for (i, rx) in rxs.iter().enumerate() {
            let got: Vec<Uuid> = rx
                .try_iter()
                .map(|m| match m {
                    ShardMsg::Evict { device, .. } => device,
                    _ => unreachable!(),
                })
                .collect();
            let want: Vec<Uuid> = devices
                .iter()
                .copied()
                .filter(|d| shard_of(d, handles.len()) == i)
                .collect();
            assert!(!want.is_empty(), "no device of the sample is on shard {i}");
            assert_eq!(got, want, "shard {i}");
        }
        // A full owner's inbox hands the message back; no other shard takes it.
        let (handles, rxs): (Vec<_>, Vec<_>) = (0..4).map(|_| ShardHandle::new(1)).unzip();
        let d = devices[0];
        assert!(ShardHandle::send_to_owner(&handles, &d, evict(d)).is_ok());
        match ShardHandle::send_to_owner(&handles, &d, evict(d)) {
            Err(ShardMsg::Evict { device, .. }) => assert_eq!(device, d),
            _ => panic!("a full inbox took the message"),
        }
        assert_eq!(rxs.iter().map(|rx| rx.len()).sum::<usize>(), 1);
    }
}
