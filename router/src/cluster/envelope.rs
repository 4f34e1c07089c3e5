//! Messages between router nodes, in our own binary format (rkyv): what travels on
//! `hive.nodes` (requests, events and replies for one node, directory changes) and on
//! `hive.presence` (which nodes are alive). JSON stays at the edges; inside the cluster a message is
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
pub(crate) const MAX_DEADLINE_MS: u64 = 300_000;

/// One message for one node's queue (`hive.node.<id>`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum NodeMsg {
    /// Something for one device, sent by `origin` to the device's directory home, which
    /// forwards it (`hops` 1) to the node holding the device, or answers itself. The
    /// node that serves it answers with `Reply` to `origin`.
    Request {
        request: u128,
        device: u128,
        origin: String,
        /// 0 from the origin; 1 once forwarded by the home (never forwarded again).
        hops: u8,
        deadline_unix_ms: u64,
        what: What,
    },
    /// The outcome of a `Request`, sent back to the node whose API took it.
    Reply {
        request: u128,
        /// The node that answers (a reply from a node the device has since left is
        /// not the final word).
        from: String,
        outcome: RequestOutcome,
    },
    /// Directory traffic between a device's owner and its home, in the order it
    /// happened (see `cluster::directory`).
    Directory {
        from: String,
        /// The sender's incarnation and broker session, as in its heartbeats (a claim
        /// may arrive before the first heartbeat).
        incarnation: u64,
        session: u64,
        changes: Vec<DirChange>,
    },
    /// "I have just counted you in (again): register with me the devices I am home
    /// for." Sent to a node on first sight, so a node that was wrongly thought gone and
    /// forgotten fills the directory again.
    Resync { from: String },
}

/// What a [`NodeMsg::Request`] asks for.
///
/// (Also on `hive.nodes`: [`NodeMsg::Resync`].)
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum What {
    /// A backend request: deliver to the device and wait for its ack or response.
    Command {
        command: String,
        /// The request's payload as JSON text (may be empty: no payload).
        payload: Vec<u8>,
        wait_response: bool,
    },
    /// A backend event (a JSON object) for the device.
    Event { body: Vec<u8> },
    /// Where is the device? Answered by its home from the directory (`RequestOutcome::At`).
    Locate,
}

/// One change of the directory, carried by [`NodeMsg::Directory`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirChange {
    pub device: u128,
    /// Unix ms when the connection concerned was made (a claim's age; the newest wins).
    pub since: u64,
    pub kind: DirKind,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// Owner to home: the device is connected here since `since`.
    Claim,
    /// Owner to home: that connection ended (the device closed it, or it broke).
    Release,
    /// Owner to home: the router closed it (draining, stopping): it is expected back
    /// elsewhere soon, so requests wait for it rather than answer 404.
    ReleaseBack,
    /// Home to owner: a newer connection of the device is elsewhere; close yours if it
    /// is not newer than `since` (4409).
    Evict,
}

/// How a [`NodeMsg::Request`] ended, carried back by [`NodeMsg::Reply`]. The variants'
/// order is part of the archived layout (the type's name is not): reordering them
/// changes the wire format.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum RequestOutcome {
    Acked,
    Responded {
        ok: bool,
        result: Option<Vec<u8>>,
    },
    /// Not connected there (and, from its home, not known anywhere).
    Offline,
    /// Its node went away or closed it to drain: expected back, ask again.
    Moving,
    Full,
    /// An event reached a device that cannot take it yet (Phoenix, not joined).
    NotJoined,
    /// Answer to `What::Locate`: connected at this node.
    At {
        node: String,
    },
    /// The request's deadline passed on the receiving node.
    Expired,
}

/// One message on the membership fanout (`hive.presence`): per node, never per device.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct PresenceMsg {
    pub(crate) node: String,
    /// Random per process start: a node that restarts under the same id is a new
    /// incarnation, and what the old one held is forgotten.
    pub(crate) incarnation: u64,
    /// Counts the node's broker sessions: a new one means its queue was declared
    /// anew (whatever was sent to it in between is gone), so its peers register again
    /// the devices it is home for.
    pub(crate) session: u64,
    /// Where this node's direct link listens (`IP:PORT`; empty: links off) and the
    /// token a peer must open it with (see `cluster::link`).
    pub(crate) link: String,
    pub(crate) link_token: u128,
    pub(crate) body: PresenceBody,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) enum PresenceBody {
    /// "I am here and hold this many devices" (every [`super::HEARTBEAT`]).
    /// `accounts`: this node's largest accounts and their devices connected here
    /// (only with --account-max-devices; see `tenants`).
    Heartbeat {
        devices: u64,
        accounts: Vec<(u128, u32)>,
    },
    /// A node's session started: everyone answers with a heartbeat at once.
    Join,
    /// A graceful stop: stop routing to this node now.
    Leaving,
}

pub fn encode_node(m: &NodeMsg) -> Vec<u8> {
    // Serialising plain owned data into a growable buffer cannot fail.
    rkyv::to_bytes::<RkyvError>(m)
        .map(|v| v.into_vec())
        .unwrap_or_default()
}

pub(crate) fn encode_presence(m: &PresenceMsg) -> Vec<u8> {
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

    pub(crate) fn presence(&self) -> Result<&ArchivedPresenceMsg, RkyvError> {
        rkyv::access::<ArchivedPresenceMsg, RkyvError>(&self.0)
    }
}

/// The owned form (for tests and the rare path that keeps a message).
pub fn decode_node(bytes: &[u8]) -> Result<NodeMsg, RkyvError> {
    let r = Received::new(bytes);
    let a = r.node()?;
    rkyv::deserialize::<NodeMsg, RkyvError>(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owned form of a presence message (the session reads them in place).
    fn decode_presence(bytes: &[u8]) -> Result<PresenceMsg, RkyvError> {
        let r = Received::new(bytes);
        let a = r.presence()?;
        rkyv::deserialize::<PresenceMsg, RkyvError>(a)
    }

    #[test]
    fn node_messages_round_trip() {
        let msgs = [
            NodeMsg::Request {
                request: u128::MAX,
                device: 42,
                origin: "node-a".into(),
                hops: 1,
                deadline_unix_ms: 1_700_000_000_000,
                what: What::Command {
                    command: "reboot".into(),
                    payload: br#"{"delay":5}"#.to_vec(),
                    wait_response: true,
                },
            },
            NodeMsg::Request {
                request: 3,
                device: 4,
                origin: "n".into(),
                hops: 0,
                deadline_unix_ms: 5,
                what: What::Event {
                    body: b"{}".to_vec(),
                },
            },
            NodeMsg::Reply {
                request: 7,
                from: "node-b".into(),
                outcome: RequestOutcome::Responded {
                    ok: false,
                    result: Some(b"[1,2]".to_vec()),
                },
            },
            NodeMsg::Reply {
                request: 8,
                from: "b".into(),
                outcome: RequestOutcome::At { node: "c".into() },
            },
            NodeMsg::Directory {
                from: "a".into(),
                incarnation: 7,
                session: 2,
                changes: vec![
                    DirChange {
                        device: 1,
                        since: 2,
                        kind: DirKind::Claim,
                    },
                    DirChange {
                        device: u128::MAX,
                        since: u64::MAX,
                        kind: DirKind::Evict,
                    },
                ],
            },
            NodeMsg::Resync { from: "a".into() },
        ];
        for m in msgs {
            assert_eq!(decode_node(&encode_node(&m)).unwrap(), m);
        }
    }

    #[test]
    fn presence_messages_round_trip() {
        for body in [
            PresenceBody::Heartbeat {
                devices: 12_000,
                accounts: vec![(7, 3), (u128::MAX, u32::MAX)],
            },
            PresenceBody::Join,
            PresenceBody::Leaving,
        ] {
            let m = PresenceMsg {
                node: "n1".into(),
                incarnation: 99,
                session: 3,
                link: "127.0.0.1:4000".into(),
                link_token: u128::MAX - 5,
                body,
            };
            assert_eq!(decode_presence(&encode_presence(&m)).unwrap(), m);
        }
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let good = encode_node(&NodeMsg::Request {
            request: 1,
            device: 5,
            origin: "o".into(),
            hops: 0,
            deadline_unix_ms: 9,
            what: What::Event {
                body: b"{\"a\":1}".to_vec(),
            },
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
