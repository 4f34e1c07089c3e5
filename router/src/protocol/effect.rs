//! What a decoded device frame asks the shard to do. Protocol adapters that need
//! per-connection state (Phoenix, Hivekit) return a list of effects instead of doing
//! I/O; the connection applies them in order.

use uuid::Uuid;

#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// A text frame to the device.
    Send(Vec<u8>),
    /// A device event with metadata injected; routing key `hive-device.<ty>`.
    Publish { ty: String, body: Vec<u8> },
    /// The device acked request `R`.
    Ack(Uuid),
    /// A stock device's follow-up acks its oldest pending request with this command
    /// (NervesHub: `rebooting` acks `reboot`, `fwup_progress` acks `update`).
    AckCommand(&'static str),
    /// The device answered request `R`.
    Response {
        request: Uuid,
        ok: bool,
        result: Option<Vec<u8>>,
    },
    /// The device can now receive requests (Phoenix: joined its topic).
    Ready,
    /// A malformed frame, counted under this code and toward the bad-frame limit.
    Error(&'static str),
    /// A well-formed action the router refuses (forbidden, not served): counted under
    /// this code, answered, and not held against the connection.
    Refused(&'static str),
    /// Close with this code and reason.
    Close(crate::protocol::ws::CloseCode, &'static str),
}
