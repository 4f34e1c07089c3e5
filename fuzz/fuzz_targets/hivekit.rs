//! Hivekit action-batch decoder and outbound encoders.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::protocol::hive::Meta;
use router::protocol::hivekit;
use router::protocol::json::Scratch;

fuzz_target!(|data: &[u8]| {
    let meta = Meta { device: uuid::Uuid::from_u128(1), account: uuid::Uuid::from_u128(2) };
    let mut out = Vec::new();
    hivekit::on_text(&meta, data, &mut Scratch::default(), &mut out);
    let _ = hivekit::encode_request(uuid::Uuid::from_u128(3), "x", data);
    let _ = hivekit::encode_event(data);
});
