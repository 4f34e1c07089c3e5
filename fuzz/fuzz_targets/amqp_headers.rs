//! JSON -> AMQP header mapping (`amqp-value-json`): any bytes, never a panic; a mapped
//! table's computed wire length is what lapin's encoder really writes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use router::bus::headers;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = headers::from_json(data) {
        assert_eq!(h.wire_len, headers::table_wire_len(&h.table));
    }
});
