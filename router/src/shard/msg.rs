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
    /// Stop accepting and close every connection with 1001, spread until this instant;
    /// the shard stops when its last connection is gone.
    Drain(Instant),
}

pub struct Adopt {
    pub stream: std::net::TcpStream,
    /// The TLS session, for wss connections (rustls state moves with the socket).
    pub tls: Option<Box<rustls::ServerConnection>>,
    pub ident: Identity,
    pub peer: SocketAddr,
    pub protocol: Protocol,
    /// permessage-deflate negotiated on the upgrade.
    pub deflate: bool,
    pub leftover: Vec<u8>,
    /// Bytes the listener left for the owner to send first (the HTTP 101 when the
    /// upgrade request carried the credentials), so the 101 and the greeting leave
    /// in one write after the device is routable. Empty: already sent.
    pub preface: Vec<u8>,
    /// Its place in `router_open_connections`, taken at accept; the connection keeps it.
    pub open: OpenConnection,
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
    pub device: Uuid,
    pub request: Uuid,
    pub command: String,
    pub payload: Vec<u8>,
    pub wait_response: bool,
    pub deadline: Instant,
    pub reply: oneshot::Sender<RequestReply>,
}

#[derive(Debug)]
pub enum RequestReply {
    Offline,
    Full,
    Acked,
    Responded { ok: bool, result: Option<Vec<u8>> },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub device: Uuid,
    pub account: Uuid,
    pub connected: bool,
    pub since_unix_ms: u64,
    pub address: String,
    pub protocol: &'static str,
    pub shard: usize,
}
