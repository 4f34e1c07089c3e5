//! The Phoenix adapter's unit and property tests (the decoder against the serde tuple it
//! replaced).

use super::*;
use serde_json::json;

fn meta() -> Meta {
    Meta {
        device: Uuid::from_u128(1),
        account: Uuid::from_u128(2),
    }
}

fn run(st: &mut PhxState, frame: Value) -> Vec<Effect> {
    let mut out = Vec::new();
    st.on_text(
        &meta(),
        frame.to_string().as_bytes(),
        &mut Scratch::default(),
        &mut out,
    );
    out
}

fn sent(e: &Effect) -> Value {
    match e {
        Effect::Send(b) => serde_json::from_slice(b).unwrap(),
        other => panic!("not a send: {other:?}"),
    }
}

#[test]
fn v2_heartbeat_join_push_and_leave() {
    let mut st = PhxState::new(Vsn::V2);
    let out = run(&mut st, json!([null, "1", "phoenix", "heartbeat", {}]));
    assert_eq!(
        sent(&out[0]),
        json!([null, "1", "phoenix", "phx_reply", {"status":"ok","response":{}}])
    );

    let out = run(
        &mut st,
        json!(["3", "3", "device", "phx_join", {"nerves_fw_uuid":"u","device_api_version":"2.0.0"}]),
    );
    assert_eq!(
        sent(&out[0]),
        json!(["3", "3", "device", "phx_reply", {"status":"ok","response":{}}])
    );
    let Effect::Publish { ty, body } = &out[1] else {
        panic!()
    };
    assert_eq!(ty, "device-join");
    let b: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(b["payload"]["nerves_fw_uuid"], "u");
    assert_eq!(b["device"], meta().device.to_string());
    assert_eq!(out[2], Effect::Ready);
    assert!(st.joined());

    let out = run(
        &mut st,
        json!(["3", "4", "device", "fwup_progress", {"value": 10}]),
    );
    assert_eq!(out[0], Effect::AckCommand("update"));
    assert!(matches!(&out[1], Effect::Publish { ty, .. } if ty == "fwup_progress"));
    // A NervesHub device (its join had device_api_version): pushes are not answered.
    assert_eq!(out.len(), 2);

    let r = Uuid::from_u128(9);
    let out = run(&mut st, json!(["3", "5", "device", "ack", {"request": r}]));
    assert_eq!(out[0], Effect::Ack(r));

    // Stale join ref: ignored.
    let out = run(&mut st, json!(["1", "6", "device", "status_update", {}]));
    assert_eq!(out, vec![Effect::Error("stale-join-ref")]);

    // Rejoin closes the old channel.
    let out = run(&mut st, json!(["7", "7", "device", "phx_join", {}]));
    assert_eq!(sent(&out[0]), json!(["3", "3", "device", "phx_close", {}]));

    let req = st.encode_request(r, "reboot", br#"{"delay":1}"#).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&req).unwrap(),
        json!(["7", null, "device", "reboot", {"request": r, "delay": 1}])
    );

    let out = run(&mut st, json!(["7", "8", "device", "phx_leave", {}]));
    assert_eq!(sent(&out[0])[4]["status"], "ok");
    assert!(!st.joined());
    assert!(st.encode_request(r, "reboot", b"{}").is_none());
}

#[test]
fn other_topics_are_refused() {
    let mut st = PhxState::new(Vsn::V2);
    let other = Uuid::from_u128(77);
    for topic in [
        format!("device:{other}"),
        "firmware".into(),
        "device:not-a-uuid".into(),
    ] {
        let out = run(&mut st, json!(["1", "1", topic, "phx_join", {}]));
        assert_eq!(out[0], Effect::Error("unmatched-topic"));
        assert_eq!(
            sent(&out[1])[4],
            json!({"status":"error","response":{"reason":"unmatched topic"}})
        );
    }
    // Own id topic works; pushes on a topic never joined are refused.
    let out = run(
        &mut st,
        json!(
            ["2", "2", format!("device:{}", meta().device), "phx_join", {
            }]
        ),
    );
    assert_eq!(sent(&out[0])[4]["status"], "ok");
    let out = run(&mut st, json!(["2", "3", "console", "up", {"data":"x"}]));
    assert_eq!(out[0], Effect::Error("unmatched-topic"));
}

#[test]
fn v1_objects() {
    let mut st = PhxState::new(Vsn::V1);
    let out = run(
        &mut st,
        json!({"topic":"device","event":"phx_join","payload":{},"ref":"1"}),
    );
    let r = sent(&out[0]);
    assert_eq!(
        (
            r["event"].as_str(),
            r["ref"].as_str(),
            r["payload"]["status"].as_str()
        ),
        (Some("phx_reply"), Some("1"), Some("ok"))
    );
    let out = run(
        &mut st,
        json!({"topic":"console","event":"phx_join","payload":{},"ref":2}),
    );
    assert_eq!(sent(&out[0])["ref"], "2");
    let out = run(
        &mut st,
        json!({"topic":"console","event":"up","payload":{"data":"ls\n"},"ref":null}),
    );
    assert!(matches!(&out[0], Effect::Publish { ty, .. } if ty == "up"));
    assert_eq!(out.len(), 1, "no ref, no reply");
}

#[test]
fn escaped_strings_and_odd_refs() {
    // Escaped topic, event and refs are unescaped; a ref that is neither a string nor
    // a number is no ref; a float ref keeps serde_json's spelling of the number.
    let mut st = PhxState::new(Vsn::V2);
    let frame = br#"["1\u0031","a\"b","dev\u0069ce","phx_j\u006fin",{}]"#;
    let mut out = Vec::new();
    st.on_text(&meta(), frame, &mut Scratch::default(), &mut out);
    assert_eq!(
        sent(&out[0]),
        json!(["11", "a\"b", "device", "phx_reply", {"status":"ok","response":{}}])
    );
    assert!(st.joined());
    let mut out = Vec::new();
    st.on_text(
        &meta(),
        br#"[true,1.5e1,"device","up",{}]"#,
        &mut Scratch::default(),
        &mut out,
    );
    assert!(matches!(&out[0], Effect::Publish { ty, .. } if ty == "up"));
    assert_eq!(
        sent(&out[1]),
        json!([null, "15.0", "device", "phx_reply", {"status":"ok","response":{}}])
    );
}

/// The V2 decoder before it read spans: serde into a tuple, refs as `Value`s.
#[allow(clippy::type_complexity)]
fn decode_v2_serde(
    text: &[u8],
) -> Option<(Option<String>, Option<String>, String, String, Vec<u8>)> {
    type V2<'a> = (Option<Value>, Option<Value>, String, String, &'a RawValue);
    let (j, r, topic, event, payload): V2 = serde_json::from_slice(text).ok()?;
    let as_ref = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Some((
        as_ref(j),
        as_ref(r),
        topic,
        event,
        payload.get().as_bytes().to_vec(),
    ))
}

/// One element of a generated V2 frame: valid JSON of every kind, escapes, numbers
/// serde_json cannot hold, near misses.
fn element() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        prop::sample::select(vec![
            "null",
            "true",
            "false",
            "\"3\"",
            "\"device\"",
            "\"phx_join\"",
            "\"d\\u0065vice\"",
            "\"a\\\"b\"",
            "\"\\ud83d\\ude00\"",
            "\"é\"",
            "12",
            "-0",
            "-1.5e3",
            "1E2",
            "0.25",
            "1e400",
            "{}",
            "[]",
            "{\"a\":[1,{\"b\":null}]}",
            " \"x\" ",
            "\n{}\t",
            "tru",
            "01",
            "1.",
            "\"open",
            "{\"a\"}",
            "[1,]",
            "nul",
        ])
        .prop_map(str::to_string),
        any::<String>().prop_map(|s| Value::String(s).to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
    #[test]
    fn v2_spans_decode_as_serde_did(
        elems in proptest::collection::vec(element(), 0..7),
        pad in proptest::sample::select(vec!["", " ", "\n "]),
    ) {
        let text = format!("{pad}[{}]{pad}", elems.join(","));
        let new = decode(Vsn::V2, text.as_bytes(), &mut Scratch::default()).map(|m| {
            (
                m.join_ref.map(Cow::into_owned),
                m.reff.map(Cow::into_owned),
                m.topic.into_owned(),
                m.event.into_owned(),
                m.payload.to_vec(),
            )
        });
        proptest::prop_assert_eq!(new, decode_v2_serde(text.as_bytes()), "{}", text);
    }
}

#[test]
fn generated_v2_frames_reach_both_outcomes() {
    // The property above must see accepted frames, not only refusals.
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..2000 {
        let elems: Vec<String> = proptest::collection::vec(element(), 5..6)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let text = format!("[{}]", elems.join(","));
        match decode(Vsn::V2, text.as_bytes(), &mut Scratch::default()) {
            Some(_) => ok += 1,
            None => bad += 1,
        }
    }
    assert!(ok > 50 && bad > 50, "accepted {ok}, refused {bad}");
}

#[test]
fn a_lone_surrogate_is_refused_anywhere_in_a_v2_frame() {
    // serde_json let one through inside the payload; no backend could decode it,
    // and Hive events refuse it the same way.
    let frame = br#"["1","2","device","up",{"x":"\ud800"}]"#;
    assert!(decode_v2_serde(frame).is_some());
    assert!(decode(Vsn::V2, frame, &mut Scratch::default()).is_none());
}

#[test]
fn malformed_frames_never_panic() {
    for vsn in [Vsn::V1, Vsn::V2] {
        let mut st = PhxState::new(vsn);
        for bad in [
            "",
            "[",
            "{}",
            "[1,2,3]",
            "[null,null,5,\"x\",{}]",
            "{\"topic\":1}",
            "nul",
            "[null,null,\"device\",\"phx_join\"]",
        ] {
            let mut out = Vec::new();
            st.on_text(&meta(), bad.as_bytes(), &mut Scratch::default(), &mut out);
            assert_eq!(out, vec![Effect::Error("bad-frame")], "{bad}");
        }
    }
}

#[test]
fn request_payload_injection() {
    let r = Uuid::from_u128(3);
    for (p, want) in [
        (&b"{}"[..], json!({"request": r})),
        (b"", json!({"request": r})),
        (b"null", json!({"request": r})),
        (b" {\"a\":{\"b\":1}} ", json!({"request": r, "a": {"b": 1}})),
        (b"[1]", json!({"request": r, "value": [1]})),
    ] {
        assert_eq!(
            serde_json::from_slice::<Value>(&with_request(r, p)).unwrap(),
            want
        );
    }
}

/// How `encode_event` named an event before it used the validator's spans.
fn event_name_serde(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "event".to_string())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
    /// Generated bodies (objects with zero or more `type` members of every kind, under
    /// escaped and plain keys, and bare values) are named as the serde tree named them.
    #[test]
    fn event_names_as_serde_gave_them(
        members in proptest::collection::vec(
            (proptest::sample::select(vec!["\"type\"", "\"t\\u0079pe\"", "\"typ\"", "\"x\""]), element()),
            0..4,
        ),
        bare in element(),
        object in proptest::bool::ANY,
    ) {
        let text = if object {
            let m: Vec<String> = members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", m.join(","))
        } else {
            bare
        };
        // A number beyond f64 (`1e400`) made serde's tree fail and the name `event`;
        // the validator takes it (see the test below).
        proptest::prop_assume!(!text.contains("1e400"));
        proptest::prop_assert_eq!(event_name(text.as_bytes()), event_name_serde(text.as_bytes()), "{}", text);
    }
}

#[test]
fn event_names() {
    for (body, name) in [
        (&br#"{"type":"config","interval":30}"#[..], "config"),
        (br#"{"type":"a","type":"b"}"#, "b"),
        (br#"{"t\u0079pe":"c\u0041"}"#, "cA"),
        (br#"{"type":3}"#, "event"),
        (br#"{"kind":"config"}"#, "event"),
        (br#"["type","config"]"#, "event"),
        (br#"{"type":"config""#, "event"),
        // Deliberately not as before: serde_json's tree refused a number beyond f64.
        (br#"{"type":"config","n":1e400}"#, "config"),
    ] {
        assert_eq!(event_name(body), name, "{}", String::from_utf8_lossy(body));
    }
    let mut st = PhxState::new(Vsn::V2);
    run(&mut st, json!(["1", "1", "device", "phx_join", {}]));
    let frame: Value = serde_json::from_slice(
        &st.encode_event(br#"{"type":"config","interval":30}"#)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        frame,
        json!(["1", null, "device", "config", {"type": "config", "interval": 30}])
    );
}

#[test]
fn a_plain_phoenix_client_gets_its_pushes_answered() {
    let mut st = PhxState::new(Vsn::V2);
    run(&mut st, json!(["1", "1", "device", "phx_join", {}]));
    let out = run(&mut st, json!(["1", "2", "device", "status_update", {}]));
    assert_eq!(sent(out.last().unwrap())[4]["status"], "ok");
}

#[test]
fn extensions_channel() {
    let allowed: std::sync::Arc<[String]> = vec!["health".to_string(), "geo".to_string()].into();
    let mut st = PhxState::with_extensions(Vsn::V2, allowed);
    // API 2.2.0 and later: asked for extensions after the join.
    let out = run(
        &mut st,
        json!(["1", "1", "device", "phx_join", {"device_api_version": "2.3.0"}]),
    );
    assert_eq!(
        sent(&out[2]),
        json!(["1", null, "device", "extensions:get", {}])
    );
    // Offered three; two allowed, one of them with a version that does not parse.
    let out = run(
        &mut st,
        json!(["2", "2", "extensions", "phx_join", {"health": "0.0.1", "geo": "x", "local_shell": "0.0.1"}]),
    );
    assert_eq!(
        sent(&out[0]),
        json!(["2", "2", "extensions", "phx_reply", {"status":"ok","response":["health"]}])
    );
    // An accepted extension's event: published, not answered.
    let out = run(
        &mut st,
        json!(["2", "3", "extensions", "health:report", {"value": {"metrics": {"cpu": 3}}}]),
    );
    assert_eq!(out.len(), 1);
    let Effect::Publish { ty, body } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(ty, "health:report");
    assert_eq!(
        serde_json::from_slice::<Value>(body).unwrap()["topic"],
        "extensions"
    );
    // Any other: answered detach.
    for ev in ["geo:location:update", "nocolon", "health:"] {
        let out = run(&mut st, json!(["2", "4", "extensions", ev, {}]));
        assert_eq!(out[0], Effect::Refused("unknown-extension"), "{ev}");
        assert_eq!(
            sent(&out[1]),
            json!(["2", "4", "extensions", "phx_reply", {"status":"error","response":"detach"}])
        );
    }
    // Backend events go out on the extension's channel, or the console, or the device.
    assert_eq!(
        serde_json::from_slice::<Value>(&st.encode_event(br#"{"type":"health:check"}"#).unwrap())
            .unwrap()[2],
        "extensions"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(
            &st.encode_event(br#"{"type":"geo:location:request"}"#)
                .unwrap()
        )
        .unwrap()[2],
        "device"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(
            &st.encode_event(br#"{"type":"dn","data":"ls\n"}"#).unwrap()
        )
        .unwrap()[2],
        "device"
    );
    run(
        &mut st,
        json!(["5", "5", "console", "phx_join", {"console_version": "2.0.0"}]),
    );
    let dn: Value =
        serde_json::from_slice(&st.encode_event(br#"{"type":"dn","data":"ls\n"}"#).unwrap())
            .unwrap();
    assert_eq!(
        (dn[0].clone(), dn[2].clone(), dn[3].clone()),
        (json!("5"), json!("console"), json!("dn"))
    );
    let r = Uuid::from_u128(3);
    let req: Value = serde_json::from_slice(
        &st.encode_request(r, "window_size", br#"{"height":40,"width":80}"#)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(req[2], "console");
    // No extensions configured: not asked.
    let mut plain = PhxState::new(Vsn::V2);
    let out = run(
        &mut plain,
        json!(["1", "1", "device", "phx_join", {"device_api_version": "2.3.0"}]),
    );
    assert!(out.iter().all(
        |e| !matches!(e, Effect::Send(b) if String::from_utf8_lossy(b).contains("extensions:get"))
    ));
}
