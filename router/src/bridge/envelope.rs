//! Messages between router nodes, in our own binary format (rkyv): what travels on
//! `hive.nodes` (requests, events and replies for one node) and on `hive.presence`
//! (who holds which device). JSON stays at the edges; inside the cluster a message is
//! validated once on receipt (`rkyv::access`, which checks every byte: a corrupt or
//! hostile envelope is an error, never a panic or an out-of-bounds read) and read in
//! place.
//!
//! Device and request UUIDs travel as `u128`. Deadlines travel as Unix milliseconds
//! (nodes on different hosts are assumed to be NTP-synchronised; a skew shortens or
//! lengthens a request's life by the skew, never makes it live forever: the receiving
//! node caps a deadline at [`MAX_DEADLINE_MS`] from its own clock).

use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

/// A deadline further in the future than this (by the receiver's clock) is capped.
pub const MAX_DEADLINE_MS: u64 = 300_000;

/// One message for one node's queue (`hive.node.<id>`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum NodeMsg {
    /// Deliver a request to a device held by the receiving node; answer with `Reply`
    /// to `origin`.
    Request {
        request: u128,
        device: u128,
        origin: String,
        command: String,
        /// The request's payload as JSON text (may be empty: no payload).
        payload: Vec<u8>,
        wait_response: bool,
        deadline_unix_ms: u64,
    },
    /// The outcome of a `Request`, sent back to the node whose API took it.
    Reply {
        request: u128,
        /// The node that answers (a reply from a node the request has since left is
        /// not the final word).
        from: String,
        outcome: Outcome,
    },
    /// Deliver an event (a JSON object) to a device held by the receiving node.
    Event { device: u128, body: Vec<u8> },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Outcome {
    Acked,
    Responded {
        ok: bool,
        result: Option<Vec<u8>>,
    },
    Offline,
    Full,
    /// The request's deadline passed on the receiving node.
    Expired,
}

/// One message on the presence fanout (`hive.presence`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PresenceMsg {
    pub node: String,
    /// Random per process start: a node that restarts under the same id is a new
    /// incarnation, and what the old one held is forgotten.
    pub incarnation: u64,
    pub body: PresenceBody,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum PresenceBody {
    /// "I am alive and hold this many devices" (every second).
    Heartbeat { devices: u64 },
    /// Devices gained (true) or lost (false), in the order it happened.
    Delta { changes: Vec<(u128, bool)> },
    /// A node (re)joined: everyone (or only `target`) answers with a snapshot.
    SnapshotRequest { target: Option<String> },
    /// Every device the sender holds, in parts; part 0 replaces what was known.
    Snapshot {
        part: u32,
        last: bool,
        devices: Vec<u128>,
    },
    /// A graceful stop: forget this node's devices now.
    Leaving,
}

pub fn encode_node(m: &NodeMsg) -> Vec<u8> {
    // Serialising plain owned data into a growable buffer cannot fail.
    rkyv::to_bytes::<RkyvError>(m)
        .map(|v| v.into_vec())
        .unwrap_or_default()
}

pub fn encode_presence(m: &PresenceMsg) -> Vec<u8> {
    rkyv::to_bytes::<RkyvError>(m)
        .map(|v| v.into_vec())
        .unwrap_or_default()
}

/// Bytes from the broker, copied once into an aligned buffer so they can be
/// validated and read in place.
pub struct Received(AlignedVec<16>);

impl Received {
    pub fn new(bytes: &[u8]) -> Self {
        let mut v = AlignedVec::<16>::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Received(v)
    }

    pub fn node(&self) -> Result<&ArchivedNodeMsg, RkyvError> {
        rkyv::access::<ArchivedNodeMsg, RkyvError>(&self.0)
    }

    pub fn presence(&self) -> Result<&ArchivedPresenceMsg, RkyvError> {
        rkyv::access::<ArchivedPresenceMsg, RkyvError>(&self.0)
    }
}

/// The owned form (for tests and the rare path that keeps a message).
pub fn decode_node(bytes: &[u8]) -> Result<NodeMsg, RkyvError> {
    let r = Received::new(bytes);
    let a = r.node()?;
    rkyv::deserialize::<NodeMsg, RkyvError>(a)
}

pub fn decode_presence(bytes: &[u8]) -> Result<PresenceMsg, RkyvError> {
    let r = Received::new(bytes);
    let a = r.presence()?;
    rkyv::deserialize::<PresenceMsg, RkyvError>(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_messages_round_trip() {
        let msgs = [
            NodeMsg::Request {
                request: u128::MAX,
                device: 42,
                origin: "node-a".into(),
                command: "reboot".into(),
                payload: br#"{"delay":5}"#.to_vec(),
                wait_response: true,
                deadline_unix_ms: 1_700_000_000_000,
            },
            NodeMsg::Reply {
                request: 7,
                from: "node-b".into(),
                outcome: Outcome::Responded {
                    ok: false,
                    result: Some(b"[1,2]".to_vec()),
                },
            },
            NodeMsg::Reply {
                request: 8,
                from: "b".into(),
                outcome: Outcome::Offline,
            },
            NodeMsg::Event {
                device: 1,
                body: b"{}".to_vec(),
            },
        ];
        for m in msgs {
            assert_eq!(decode_node(&encode_node(&m)).unwrap(), m);
        }
    }

    #[test]
    fn presence_messages_round_trip() {
        let m = PresenceMsg {
            node: "n1".into(),
            incarnation: 99,
            body: PresenceBody::Delta {
                changes: vec![(1, true), (2, false), (u128::MAX, true)],
            },
        };
        assert_eq!(decode_presence(&encode_presence(&m)).unwrap(), m);
        let s = PresenceMsg {
            node: "n1".into(),
            incarnation: 1,
            body: PresenceBody::Snapshot {
                part: 3,
                last: true,
                devices: (0..1000).collect(),
            },
        };
        assert_eq!(decode_presence(&encode_presence(&s)).unwrap(), s);
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let good = encode_node(&NodeMsg::Event {
            device: 5,
            body: b"{\"a\":1}".to_vec(),
        });
        for cut in 0..good.len() {
            let _ = decode_node(&good[..cut]);
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xA5;
            let _ = decode_node(&bad);
            let _ = decode_presence(&bad);
        }
        assert!(decode_node(b"").is_err());
        assert!(decode_presence(&[0xff; 64]).is_err());
    }
}
