//! What other threads send a shard (its inbox messages) and what it answers.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::Protocol;
use crate::auth::Identity;
use crate::listener::OpenConnection;

/// What other threads may ask of a shard.
pub enum ShardMsg {
    /// An authenticated socket accepted by another shard; this shard owns its device.
    Adopt(Box<Adopt>),
    /// Deliver a backend event (a JSON object) to a device; replies whether it was connected.
    Event {
        device: Uuid,
        body: Vec<u8>,
        reply: oneshot::Sender<Delivery>,
    },
    Request(Box<RequestMsg>),
    Lookup {
        device: Uuid,
        reply: oneshot::Sender<Option<DeviceInfo>>,
    },
    /// Up to `limit` devices connected to this shard.
    List {
        limit: usize,
        reply: oneshot::Sender<Vec<Uuid>>,
    },
    /// Another node holds a newer connection of this device (the cluster directory
    /// decided): close ours with 4409 if it was made at or before `since_ms`.
    Evict {
        device: Uuid,
        since_ms: u64,
    },
    /// Messages the account's devices offered this shard in the last whole second
    /// (measured with --account-max-rate; None without).
    AccountRate {
        account: Uuid,
        reply: oneshot::Sender<Option<u32>>,
    },
    /// The operator disconnected this device (or blocked it): close it with 4403.
    Disconnect {
        device: Uuid,
    },
    /// Stop accepting and close every connection with 1001, spread until this instant;
    /// the shard stops when its last connection is gone.
    Drain(Instant),
}

pub struct Adopt {
    pub(crate) stream: std::net::TcpStream,
    /// The TLS session, for wss connections (rustls state moves with the socket).
    pub(crate) tls: Option<Box<rustls::ServerConnection>>,
    pub(crate) ident: Identity,
    pub(crate) peer: SocketAddr,
    pub(crate) protocol: Protocol,
    /// permessage-deflate negotiated on the upgrade.
    pub(crate) deflate: crate::protocol::ws::Deflate,
    pub(crate) leftover: Vec<u8>,
    /// Bytes the listener left for the owner to send first (the HTTP 101 when the
    /// upgrade request carried the credentials), so the 101 and the greeting leave
    /// in one write after the device is routable. Empty: already sent.
    pub(crate) preface: Vec<u8>,
    /// Its place in `router_open_connections`, taken at accept; the connection keeps it.
    pub(crate) open: OpenConnection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    Offline,
    /// The device's outbound queue is full (slow reader).
    Full,
    /// Connected but cannot receive yet (a Phoenix device that has not joined).
    NotJoined,
}

pub struct RequestMsg {
    pub(crate) device: Uuid,
    pub(crate) request: Uuid,
    pub(crate) command: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) wait_response: bool,
    pub(crate) deadline: Instant,
    pub(crate) reply: oneshot::Sender<RequestReply>,
}

#[derive(Debug)]
pub(crate) enum RequestReply {
    Offline,
    Full,
    /// The device has this many requests waiting already (--max-pending).
    TooManyPending(u32),
    Acked,
    Responded {
        ok: bool,
        result: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub(crate) device: Uuid,
    pub(crate) account: Uuid,
    pub(crate) connected: bool,
    pub(crate) since_unix_ms: u64,
    pub(crate) address: String,
    pub(crate) protocol: &'static str,
    pub(crate) shard: usize,
}
