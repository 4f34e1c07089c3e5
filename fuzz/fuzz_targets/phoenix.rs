//! Phoenix V1/V2 decoder and channel state machine over a sequence of frames.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::protocol::hive::Meta;
use router::protocol::json::Scratch;
use router::protocol::phoenix::{PhxState, Vsn};

fuzz_target!(|data: &[u8]| {
    let meta = Meta { device: uuid::Uuid::from_u128(1), account: uuid::Uuid::from_u128(2) };
    for vsn in [Vsn::V1, Vsn::V2] {
        let mut st = PhxState::new(vsn);
        let mut out = Vec::new();
        let mut scratch = Scratch::default();
        // Frames separated by newlines exercise join/leave/push sequences.
        for frame in data.split(|b| *b == b'\n') {
            st.on_text(&meta, frame, &mut scratch, &mut out);
        }
        let _ = st.encode_request(uuid::Uuid::from_u128(3), "reboot", data);
        let _ = st.encode_event(data);
    }
});
