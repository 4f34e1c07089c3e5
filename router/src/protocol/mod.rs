//! Wire formats: pure functions from bytes to internal messages and back.
//! Nothing here does I/O or touches a socket.

pub mod effect;
pub mod hive;
pub mod hivekit;
pub mod json;
pub mod msgpack;
pub mod phoenix;
pub mod simd;
pub mod ws;
