//! Fixed workloads over the hot paths, for `scripts/perf-check.sh`: run one under
//! `valgrind --tool=callgrind` and its instruction count is the same on every run of
//! the same binary, whatever else the machine is doing. `perf_workload <name>`.

use router::auth::{mint, Verifier};
use router::protocol::hive::{self, Meta};
use router::protocol::json::Scratch;
use router::protocol::phoenix::{PhxState, Vsn};
use router::protocol::{hivekit, ws};
use uuid::Uuid;

const N: usize = 20_000;

fn meta() -> Meta {
    Meta {
        device: Uuid::from_u128(0xdead),
        account: Uuid::from_u128(0xbeef),
    }
}

fn instances_event() -> Vec<u8> {
    let apps: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({"name": format!("app-{i}"), "version": "1.4.2", "healthy": i % 3 != 0, "restarts": i}))
        .collect();
    serde_json::json!({"type": "instances", "device": "spoofed", "apps": apps, "ts": 1_732_500_000_000u64}).to_string().into_bytes()
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    let m = meta();
    let mut sink = 0usize;
    match which.as_str() {
        "hive_decode" => {
            let ev = instances_event();
            let mut scratch = Scratch::default();
            for _ in 0..N {
                if let Ok(hive::Inbound::Event { body, .. }) = hive::decode(&ev, &m, &mut scratch) {
                    sink += body.len();
                }
            }
        }
        "ws_frames" => {
            let payload = vec![b'x'; 1024];
            let mut frame = Vec::new();
            ws::encode_frame(ws::OP_TEXT, &payload, &mut frame);
            frame[1] |= 0x80;
            let hl = frame.len() - payload.len();
            frame.splice(hl..hl, [1u8, 2, 3, 4]);
            for _ in 0..N {
                let h = ws::parse_header(&frame, 1 << 20)
                    .ok()
                    .flatten()
                    .expect("valid frame");
                ws::unmask(&mut frame[h.header_len..], h.mask);
                sink += h.payload_len;
            }
        }
        "phoenix" => {
            let mut st = PhxState::new(Vsn::V2);
            let mut out = Vec::new();
            let mut scratch = Scratch::default();
            st.on_text(
                &m,
                br#"["3","3","device","phx_join",{}]"#,
                &mut scratch,
                &mut out,
            );
            for _ in 0..N {
                out.clear();
                st.on_text(
                    &m,
                    br#"["3","4","device","fwup_progress",{"value":42}]"#,
                    &mut scratch,
                    &mut out,
                );
                sink += out.len();
            }
        }
        "hivekit" => {
            let f = format!(
                r#"[{{"typ":"obj","act":"upd","id":"{}","cid":1,"loc":{{"lon":24.9,"lat":60.2}}}}]"#,
                m.device
            );
            let mut out = Vec::new();
            let mut scratch = Scratch::default();
            for _ in 0..N {
                out.clear();
                hivekit::on_text(
                    &hivekit::Session {
                        meta: &m,
                        realm: "r",
                    },
                    &mut hivekit::Subscriptions::default(),
                    f.as_bytes(),
                    &mut scratch,
                    &mut out,
                );
                sink += out.len();
            }
        }
        "deflate" => {
            // permessage-deflate as the router runs it: a NervesHub-sized message
            // compressed on its own (no context takeover), and inflated back.
            let msg = br#"["2","7","extensions","health:report",{"value":{"timestamp":"2026-12-03T10:00:00Z","metadata":{"serial":"pump-0042","fw":"1.4.0"},"alarms":{},"metrics":{"cpu_temp":51.5,"load_1min":0.42,"mem_used_percent":37.1,"disk_used_percentage":12.0},"checks":{},"connectivity":{"wlan0":{"type":"wifi","signal":-61}}}}]"#;
            for _ in 0..N / 10 {
                let z = ws::deflate(msg);
                sink += ws::inflate(&z, 1 << 20).map_or(0, |v| v.len()) + z.len();
            }
        }
        "token" => {
            let v = Verifier::new("perf");
            let t = mint("perf", Uuid::from_u128(1), Uuid::from_u128(2), 3600);
            for _ in 0..N / 10 {
                sink += v.verify(&t).is_ok() as usize;
            }
        }
        other => {
            eprintln!(
                "unknown workload {other:?}: hive_decode, ws_frames, phoenix, hivekit, token"
            );
            std::process::exit(2);
        }
    }
    println!("{which} {sink}");
}
