//! Criterion benches of the hot paths, each next to a naive baseline so the number
//! that matters is a ratio anyone can rerun: `cargo bench -p hive-benches --bench hot_paths`.

use std::collections::HashMap;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use router::auth::{mint, Verifier};
use router::bus::headers;
use router::cluster::envelope::{self, NodeMsg, Received, What};
use router::protocol::effect::Effect;
use router::protocol::hive::{self, Meta};
use router::protocol::json::Scratch;
use router::protocol::phoenix::{PhxState, Vsn};
use router::protocol::{hivekit, ws};
use router::shard::{shard_of, ShardHandle, ShardMsg};
use serde_json::{Map, Value};
use uuid::Uuid;

fn meta() -> Meta {
    Meta {
        device: Uuid::from_u128(0xdead),
        account: Uuid::from_u128(0xbeef),
    }
}

/// A typical `instances` event: a device's apps and their health (~600 bytes).
fn instances_event() -> Vec<u8> {
    let apps: Vec<Value> = (0..6)
        .map(|i| serde_json::json!({"name": format!("app-{i}"), "version": "1.4.2", "healthy": i % 3 != 0, "restarts": i, "cpu": 0.25 * i as f64}))
        .collect();
    serde_json::json!({"type": "instances", "device": "spoofed", "apps": apps, "ts": 1_732_500_000_000u64}).to_string().into_bytes()
}

/// The naive way: parse the whole object, overwrite three fields, serialise it again.
fn naive_inject(text: &[u8], m: &Meta) -> Option<(String, Vec<u8>)> {
    let mut v: Map<String, Value> = serde_json::from_slice(text).ok()?;
    let ty = v.get("type")?.as_str()?.to_string();
    v.insert("device".into(), m.device.to_string().into());
    v.insert("account".into(), m.account.to_string().into());
    v.insert("service".into(), "hive-device".into());
    Some((ty, serde_json::to_vec(&v).ok()?))
}

fn bench_decode(c: &mut Criterion) {
    let ev = instances_event();
    let m = meta();
    let mut g = c.benchmark_group("hive_decode_inject");
    g.throughput(Throughput::Bytes(ev.len() as u64));
    let mut scratch = Scratch::default();
    g.bench_function("router (one-pass validate + span copy)", |b| {
        b.iter(|| hive::decode(black_box(&ev), &m, &mut scratch).unwrap())
    });
    g.bench_function("baseline (serde_json parse + reserialise)", |b| {
        b.iter(|| naive_inject(black_box(&ev), &m).unwrap())
    });
    g.finish();
}

/// Validation alone: the router's one-pass validator (which also records the member
/// spans) against simd-json's tape (what the router used before; it needs a mutable
/// copy and then a second scan for the spans) and serde_json's validation.
fn bench_validate(c: &mut Criterion) {
    let small = br#"{"type":"instances","apps":[{"name":"db","healthy":true,"restarts":0},{"name":"web","healthy":true,"restarts":2}]}"#.to_vec();
    for (name, ev) in [("110B", small), ("600B", instances_event())] {
        let mut g = c.benchmark_group(format!("json_validate_{name}"));
        g.throughput(Throughput::Bytes(ev.len() as u64));
        let mut scratch = Scratch::default();
        g.bench_function("router (one pass, spans included)", |b| {
            b.iter(|| scratch.parse_object(black_box(&ev)).unwrap())
        });
        let mut copy = Vec::new();
        let mut buffers = simd_json::Buffers::new(4096);
        g.bench_function("simd-json (copy + tape, no spans)", |b| {
            b.iter(|| {
                copy.clear();
                copy.extend_from_slice(black_box(&ev));
                simd_json::to_tape_with_buffers(&mut copy, &mut buffers)
                    .map(|t| t.0.len())
                    .unwrap()
            })
        });
        g.bench_function("serde_json (IgnoredAny)", |b| {
            b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&ev)).unwrap())
        });
        g.finish();
    }
}

fn bench_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_frame_unmask");
    for len in [64usize, 1024, 16 * 1024] {
        let payload = vec![b'x'; len];
        let mut frame = Vec::new();
        ws::encode_frame(ws::OP_TEXT, &payload, &mut frame);
        frame[1] |= 0x80; // masked client frame
        let hl = frame.len() - len;
        frame.splice(hl..hl, [1u8, 2, 3, 4]);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(
            BenchmarkId::new("router (word-wise)", len),
            &frame,
            |b, f| {
                let mut buf = f.clone();
                b.iter(|| {
                    let h = ws::parse_header(black_box(&buf), 1 << 20).unwrap().unwrap();
                    ws::unmask(&mut buf[h.header_len..], h.mask);
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("baseline (byte-wise)", len),
            &frame,
            |b, f| {
                let mut buf = f.clone();
                b.iter(|| {
                    let h = ws::parse_header(black_box(&buf), 1 << 20).unwrap().unwrap();
                    for (i, x) in buf[h.header_len..].iter_mut().enumerate() {
                        *x ^= h.mask[i & 3];
                    }
                })
            },
        );
    }
    g.finish();
}

fn bench_routing(c: &mut Criterion) {
    let devices: Vec<Uuid> = (0..100_000u128)
        .map(|i| Uuid::from_u128(i.wrapping_mul(0x9E3779B97F4A7C15)))
        .collect();
    let table: HashMap<Uuid, u32> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, i as u32))
        .collect();
    let mut g = c.benchmark_group("route_lookup");
    g.bench_function("router (shard_of + shard-local map)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % devices.len();
            let d = &devices[i];
            (shard_of(d, 2), table.get(d))
        })
    });
    let locked = std::sync::Mutex::new(table.clone());
    g.bench_function("baseline (global Mutex<HashMap>)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % devices.len();
            locked.lock().unwrap().get(&devices[i]).copied()
        })
    });
    g.finish();
}

/// The naive Hivekit update: the frame as a `serde_json::Value` tree, the event and the
/// reply built as trees and serialised (what the adapter did before it used the spans).
fn naive_hivekit(text: &[u8], m: &Meta) -> Option<(Vec<u8>, Vec<u8>)> {
    let frame: Vec<Map<String, Value>> = serde_json::from_slice(text).ok()?;
    let a = frame.first()?;
    let own = m.device.to_string();
    if a.get("id")?.as_str()? != own {
        return None;
    }
    let mut ev = Map::new();
    ev.insert("type".into(), "location".into());
    ev.insert("action".into(), a.get("act")?.clone());
    ev.insert("id".into(), own.clone().into());
    let loc: Map<String, Value> = a
        .get("loc")?
        .as_object()?
        .iter()
        .map(|(k, v)| {
            (
                if k == "lon" { "longitude" } else { "latitude" }.to_string(),
                v.clone(),
            )
        })
        .collect();
    ev.insert("location".into(), Value::Object(loc));
    ev.insert("device".into(), own.into());
    ev.insert("account".into(), m.account.to_string().into());
    ev.insert("service".into(), "hive-device".into());
    let reply = serde_json::json!([{"cid": a.get("cid")?, "res": "suc"}]);
    Some((
        serde_json::to_vec(&ev).ok()?,
        serde_json::to_vec(&reply).ok()?,
    ))
}

fn bench_tokens(c: &mut Criterion) {
    let v = Verifier::new("bench-secret");
    let t = mint("bench-secret", Uuid::from_u128(1), Uuid::from_u128(2), 3600);
    c.bench_function("token_verify_hs256", |b| {
        b.iter(|| v.verify(black_box(&t)).unwrap())
    });
}

fn bench_adapters(c: &mut Criterion) {
    let m = meta();
    let mut g = c.benchmark_group("adapters");
    let phx = br#"["3","4","device","fwup_progress",{"value":42}]"#;
    let mut st = PhxState::new(Vsn::V2);
    let mut out: Vec<Effect> = Vec::new();
    let mut phx_scratch = Scratch::default();
    st.on_text(
        &m,
        br#"["3","3","device","phx_join",{}]"#,
        &mut phx_scratch,
        &mut out,
    );
    g.bench_function("phoenix_v2_push", |b| {
        b.iter(|| {
            out.clear();
            st.on_text(&m, black_box(phx), &mut phx_scratch, &mut out);
        })
    });
    // A backend event to the joined device: pushed under its `type`.
    let ev = instances_event();
    g.bench_function("phoenix_event", |b| {
        b.iter(|| st.encode_event(black_box(&ev)).unwrap())
    });
    g.bench_function("phoenix_event baseline (serde_json Value)", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(black_box(&ev)).unwrap();
            let name = v.get("type").and_then(Value::as_str).unwrap_or("event");
            serde_json::to_vec(&serde_json::json!(["3", null, "device", name, &v])).unwrap()
        })
    });
    let hk = format!(
        r#"[{{"typ":"obj","act":"upd","id":"{}","cid":1,"loc":{{"lon":24.9,"lat":60.2}}}}]"#,
        m.device
    );
    let mut scratch = Scratch::default();
    g.bench_function("hivekit_obj_update", |b| {
        b.iter(|| {
            out.clear();
            hivekit::on_text(
                &hivekit::Session {
                    meta: &m,
                    realm: "r",
                },
                &mut hivekit::Subscriptions::default(),
                black_box(hk.as_bytes()),
                &mut scratch,
                &mut out,
            );
        })
    });
    assert!(naive_hivekit(hk.as_bytes(), &m).is_some());
    g.bench_function("hivekit_obj_update baseline (serde_json Value)", |b| {
        b.iter(|| naive_hivekit(black_box(hk.as_bytes()), &m))
    });
    g.finish();
}

/// The naive JSON -> AMQP headers mapping: a `serde_json::Value` tree, converted.
fn naive_headers(body: &[u8]) -> Option<FieldTable> {
    fn conv(v: &Value) -> AMQPValue {
        match v {
            Value::Null => AMQPValue::Void,
            Value::Bool(b) => AMQPValue::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => AMQPValue::LongLongInt(i),
                None => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Value::Array(a) => {
                AMQPValue::FieldArray(FieldArray::from(a.iter().map(conv).collect::<Vec<_>>()))
            }
            Value::Object(o) => AMQPValue::FieldTable(table(o)),
        }
    }
    fn table(o: &Map<String, Value>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in o {
            t.insert(k.as_str().into(), conv(v));
        }
        t
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(table(v.as_object()?))
}

fn bench_headers(c: &mut Criterion) {
    let ev = instances_event();
    let mut g = c.benchmark_group("amqp_headers_600B");
    g.throughput(Throughput::Bytes(ev.len() as u64));
    // Both produce the same table for this event (integers, doubles, strings, nesting).
    assert_eq!(
        headers::from_json(&ev).unwrap().table,
        naive_headers(&ev).unwrap()
    );
    g.bench_function("router (validate, walk the text)", |b| {
        b.iter(|| headers::from_json(black_box(&ev)).unwrap())
    });
    g.bench_function("baseline (serde_json Value, converted)", |b| {
        b.iter(|| naive_headers(black_box(&ev)).unwrap())
    });
    g.finish();
}

/// The naive cross-node envelope: JSON, UUIDs as text, the payload as a `Value`.
#[derive(serde::Serialize, serde::Deserialize)]
struct JsonRequest {
    request: String,
    device: String,
    origin: String,
    command: String,
    payload: Value,
    wait_response: bool,
    deadline_unix_ms: u64,
}

fn bench_envelopes(c: &mut Criterion) {
    let payload = br#"{"version":"2.1.0","url":"https://fw.example.com/images/2.1.0.fw","sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}"#;
    let (request, device) = (Uuid::from_u128(7), Uuid::from_u128(0xdead));
    let msg = NodeMsg::Request {
        request: request.as_u128(),
        device: device.as_u128(),
        origin: "node-a-4242".into(),
        hops: 0,
        deadline_unix_ms: 1_764_500_000_000,
        what: What::Command {
            command: "update".into(),
            payload: payload.to_vec(),
            wait_response: true,
        },
    };
    let mut g = c.benchmark_group("node_envelope");
    // What a node does per request across nodes: encode on one side; copy to an aligned
    // buffer, validate every byte and take the owned message on the other.
    g.bench_function("router (rkyv: encode, validate, deserialize)", |b| {
        b.iter(|| {
            let bytes = envelope::encode_node(black_box(&msg));
            let r = Received::new(&bytes);
            let a = r.node().unwrap();
            match rkyv::deserialize::<NodeMsg, rkyv::rancor::Error>(a).unwrap() {
                NodeMsg::Request {
                    what:
                        What::Command {
                            command, payload, ..
                        },
                    ..
                } => command.len() + payload.len(),
                _ => unreachable!(),
            }
        })
    });
    let json = JsonRequest {
        request: request.to_string(),
        device: device.to_string(),
        origin: "node-a-4242".into(),
        command: "update".into(),
        payload: serde_json::from_slice(payload).unwrap(),
        wait_response: true,
        deadline_unix_ms: 1_764_500_000_000,
    };
    g.bench_function(
        "baseline (serde_json: encode, parse, payload re-serialised)",
        |b| {
            b.iter(|| {
                let bytes = serde_json::to_vec(black_box(&json)).unwrap();
                let back: JsonRequest = serde_json::from_slice(&bytes).unwrap();
                let device = Uuid::parse_str(&back.device).unwrap();
                // The payload goes on to the device as text.
                serde_json::to_vec(&back.payload).unwrap().len()
                    + back.command.len()
                    + device.as_bytes().len()
            })
        },
    );
    g.finish();
}

/// Handing a backend event to the device's owner: the shard's bounded crossbeam inbox
/// (hash to the shard, `try_send`, wake) against a map of per-device tokio channels
/// behind one lock (a task per connection, the common design). Both drained as they go.
fn bench_fanout(c: &mut Criterion) {
    const DEVICES: usize = 10_000;
    const SHARDS: usize = 2;
    let devices: Vec<Uuid> = (0..DEVICES as u128)
        .map(|i| Uuid::from_u128(i.wrapping_mul(0x9E3779B97F4A7C15)))
        .collect();
    let body = br#"{"type":"config","interval":30}"#.to_vec();
    let mut g = c.benchmark_group("shard_fanout");
    let (handles, inboxes): (Vec<ShardHandle>, Vec<_>) =
        (0..SHARDS).map(|_| ShardHandle::new(65_536)).unzip();
    g.bench_function("router (shard_of + crossbeam inbox)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % DEVICES;
            let device = devices[i];
            let (reply, _answer) = tokio::sync::oneshot::channel();
            let s = shard_of(&device, SHARDS);
            let msg = ShardMsg::Event {
                device,
                body: body.clone(),
                reply,
            };
            assert!(handles[s].send(msg).is_ok());
            inboxes[s].try_recv().is_ok()
        })
    });
    type Per = (Uuid, Vec<u8>, tokio::sync::oneshot::Sender<()>);
    let mut senders = HashMap::new();
    let mut receivers = Vec::new();
    for d in &devices {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Per>();
        senders.insert(*d, tx);
        receivers.push(rx);
    }
    let senders = std::sync::Mutex::new(senders);
    g.bench_function("baseline (global Mutex<HashMap<device, mpsc>>)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % DEVICES;
            let device = devices[i];
            let (reply, _answer) = tokio::sync::oneshot::channel();
            let sent = senders
                .lock()
                .unwrap()
                .get(&device)
                .map(|tx| tx.send((device, body.clone(), reply)).is_ok());
            assert_eq!(sent, Some(true));
            receivers[i].try_recv().is_ok()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_validate,
    bench_frames,
    bench_routing,
    bench_tokens,
    bench_adapters,
    bench_headers,
    bench_envelopes,
    bench_fanout
);
criterion_main!(benches);
