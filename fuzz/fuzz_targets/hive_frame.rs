//! WebSocket frame parsing, unmasking and Hive decode + metadata injection.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::protocol::hive::{self, Inbound, Meta};
use router::protocol::json::Scratch;
use router::protocol::ws;

fuzz_target!(|data: &[u8]| {
    let meta = Meta { device: uuid::Uuid::from_u128(1), account: uuid::Uuid::from_u128(2) };
    let mut scratch = Scratch::default();
    // As a frame stream.
    let mut buf = data.to_vec();
    let mut pos = 0;
    while let Ok(Some(h)) = ws::parse_header(&buf[pos..], 1 << 16) {
        if buf.len() - pos < h.total_len() {
            break;
        }
        let payload = &mut buf[pos + h.header_len..pos + h.total_len()];
        ws::unmask(payload, h.mask);
        let _ = hive::decode(payload, &meta, &mut scratch);
        pos += h.total_len();
    }
    // As a text message: an event's body must be valid JSON with our identity.
    if let Ok(Inbound::Event { body, .. }) = hive::decode(data, &meta, &mut scratch) {
        assert!(simd_ok(&body), "injected body is not valid JSON");
    }
});

fn simd_ok(body: &[u8]) -> bool {
    let mut s = Scratch::default();
    s.parse_object(body).is_ok()
}
