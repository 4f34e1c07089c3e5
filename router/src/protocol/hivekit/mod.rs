//! The Hivekit protocol (`/v1/ws`), as the public Hivekit client speaks it: after a text
//! frame `Bearer <token>`, every frame is a JSON array of actions with three-letter keys.
//! A reply carries the `cid` of the action it answers; what the router sends on its own
//! (pubsub deliveries) carries none, because the client treats every `cid` as the answer
//! to one of its own calls.
//!
//! A device lives in one realm (`Session::realm`: `--hivekit-realm`, else its account
//! UUID). Through the client's public calls it can read that realm (`realm.get`,
//! `realm.list`), create, update and set its own object (each published as a device
//! event), subscribe to its realm's pubsub events, and publish into it. The backend's
//! events and requests reach the device as pubsub messages of its realm; it acks and
//! answers a request by publishing [`ACK_EVENT`] or [`RESPONSE_EVENT`]. Everything a
//! Hivekit server keeps (objects, areas, tasks, history, object subscriptions) is the
//! backend's: those actions are answered `erc` 501, never left without an answer.
//!
//! Pure: frames in, effects out, plus the connection's pubsub subscriptions. Frames are
//! read with the one-pass validator of [`super::json`] (member spans, no tree): values
//! the router passes on are copied as the device wrote them.
//!
//! The parts: `codec` (actions read, replies and deliveries written), `actions` (what
//! each action does), `spell` (keys spelled out in published events), `session` (the
//! device, its realm and its subscriptions).

mod actions;
mod codec;
mod session;
mod spell;

pub use actions::on_text;
pub use codec::{auth_err, auth_ok, encode_event, encode_request};
pub use session::{Session, Subscriptions};

/// Error codes counted in `router_hivekit_errors_total{code}`.
pub const ERROR_CODES: [&str; 8] = [
    "bad-frame",
    "bad-action",
    "forbidden",
    "bad-request-id",
    "too-many-actions",
    "unsupported",
    "too-many-subscriptions",
    "bad-subscription",
];

/// Actions one frame may carry. Each is answered, so without a bound one small frame of
/// thousands of malformed actions was answered by a frame thirty times its size.
pub const MAX_ACTIONS: usize = 256;
/// Pubsub subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 32;
/// Longest event name or id pattern of a subscription, in bytes.
pub const MAX_NAME: usize = 128;

/// The pubsub event a backend request arrives as: `{"id":R,"command":C,"payload":P}`.
pub const REQUEST_EVENT: &str = "hive.request";
/// Published by the device to ack request `R`: data `{"id":R}` (or the string `R`).
pub const ACK_EVENT: &str = "hive.ack";
/// Published by the device to answer request `R`: data `{"id":R,"result":X}`, or
/// `{"id":R,"error":X}` for a failure.
pub const RESPONSE_EVENT: &str = "hive.response";

/// The error of a frame that is not a JSON array (always the first effect then).
pub const BAD_FRAME: &str = "bad-frame";

#[cfg(test)]
mod tests;
