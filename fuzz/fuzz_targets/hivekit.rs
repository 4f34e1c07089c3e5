//! Hivekit action-batch decoder (its subscriptions kept across inputs' actions) and
//! outbound encoders.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::protocol::hive::Meta;
use router::protocol::hivekit::{self, Session, Subscriptions};
use router::protocol::json::Scratch;

fuzz_target!(|data: &[u8]| {
    let meta = Meta { device: uuid::Uuid::from_u128(1), account: uuid::Uuid::from_u128(2) };
    let s = Session { meta: &meta, realm: "r" };
    let mut subs = Subscriptions::default();
    let mut out = Vec::new();
    hivekit::on_text(&s, &mut subs, data, &mut Scratch::default(), &mut out);
    let _ = hivekit::encode_request(&s, &subs, uuid::Uuid::from_u128(3), "x", data);
    let _ = hivekit::encode_event(&s, &subs, data);
});
