//! Phoenix `vsn=3.0.0` (NervesHub's MessagePack serializer): every frame a binary
//! WebSocket frame holding one MessagePack array `[join_ref, ref, topic, event, payload]`,
//! the envelope of V2 JSON. The router converts at the edge: a device's frame becomes
//! the V2 JSON text the Phoenix adapter reads (so routing, acks and limits are V2's), and
//! what the adapter writes becomes MessagePack again. NervesHub devices send a few small
//! messages a minute, so a conversion (a few microseconds) is not on a hot path.
//!
//! Types, as NervesHub's serializer (Msgpax) writes them: strings are `str` (their bytes
//! are not always UTF-8: console output; such bytes become U+FFFD in JSON), `bin` becomes
//! a base64 string, integers and floats as they are, timestamps (extension type -1: the
//! health report's `timestamp`) an RFC 3339 string as Phoenix's JSON serializer writes a
//! DateTime. Another extension type makes the frame malformed. Outbound, JSON numbers
//! keep their kind (integer or float), strings are `str`, objects maps.

use base64::Engine;
use rmpv::Value as Mp;
use serde_json::Value as Json;

/// Deepest nesting accepted in a MessagePack frame (as the JSON validator's limit).
const MAX_DEPTH: usize = super::json::MAX_DEPTH;

/// Why a MessagePack frame was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("not one MessagePack value")]
    Invalid,
    #[error("nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("map key is not a string")]
    Key,
    #[error("MessagePack extension type {0} is not supported")]
    Ext(i8),
}

/// A device's MessagePack frame as JSON text (V2's frame, when it holds V2's envelope).
pub fn to_json(frame: &[u8]) -> Result<Vec<u8>, MsgpackError> {
    let mut rd = frame;
    let v =
        rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH + 1).map_err(|e| match e {
            rmpv::decode::Error::DepthLimitExceeded => MsgpackError::TooDeep,
            _ => MsgpackError::Invalid,
        })?;
    if !rd.is_empty() {
        return Err(MsgpackError::Invalid);
    }
    let j = json_of(v)?;
    // Serialising a Value into a Vec does not fail.
    Ok(serde_json::to_vec(&j).unwrap_or_default())
}

fn json_of(v: Mp) -> Result<Json, MsgpackError> {
    Ok(match v {
        Mp::Nil => Json::Null,
        Mp::Boolean(b) => Json::Bool(b),
        Mp::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Json::from(u),
            (None, Some(s)) => Json::from(s),
            _ => return Err(MsgpackError::Invalid),
        },
        Mp::F32(f) => serde_json::Number::from_f64(f.into()).map_or(Json::Null, Json::Number),
        Mp::F64(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Mp::String(s) => Json::String(match s.as_str() {
            Some(t) => t.to_owned(),
            None => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        }),
        Mp::Binary(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Mp::Array(a) => Json::Array(a.into_iter().map(json_of).collect::<Result<_, _>>()?),
        Mp::Map(m) => {
            let mut o = serde_json::Map::with_capacity(m.len());
            for (k, v) in m {
                let k = match k {
                    Mp::String(s) => s.into_str().ok_or(MsgpackError::Key)?,
                    _ => return Err(MsgpackError::Key),
                };
                o.insert(k, json_of(v)?);
            }
            Json::Object(o)
        }
        Mp::Ext(-1, data) => Json::String(timestamp(&data).ok_or(MsgpackError::Ext(-1))?),
        Mp::Ext(t, _) => return Err(MsgpackError::Ext(t)),
    })
}

/// The MessagePack timestamp extension (4, 8 or 12 bytes) as RFC 3339 UTC.
fn timestamp(d: &[u8]) -> Option<String> {
    let (secs, nanos): (i64, u32) = match d.len() {
        4 => (u32::from_be_bytes(d.try_into().ok()?) as i64, 0),
        8 => {
            let v = u64::from_be_bytes(d.try_into().ok()?);
            ((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32)
        }
        12 => (
            i64::from_be_bytes(d[4..].try_into().ok()?),
            u32::from_be_bytes(d[..4].try_into().ok()?),
        ),
        _ => return None,
    };
    if nanos >= 1_000_000_000 {
        return None;
    }
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{:06}", nanos / 1000)
    };
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// Days since 1970-01-01 as a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A frame the Phoenix adapter wrote (V2 JSON text) as MessagePack. The adapter writes
/// valid JSON; anything else would be a router bug, sent as MessagePack nil.
pub fn from_json(json: &[u8]) -> Vec<u8> {
    let v: Json = serde_json::from_slice(json).unwrap_or(Json::Null);
    let mut out = Vec::with_capacity(json.len());
    // Writing into a Vec does not fail.
    let _ = rmpv::encode::write_value(&mut out, &mp_of(v));
    out
}

fn mp_of(v: Json) -> Mp {
    match v {
        Json::Null => Mp::Nil,
        Json::Bool(b) => Mp::Boolean(b),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Mp::from(u),
            (None, Some(i), _) => Mp::from(i),
            (_, _, Some(f)) => Mp::F64(f),
            _ => Mp::Nil,
        },
        Json::String(s) => Mp::from(s),
        Json::Array(a) => Mp::Array(a.into_iter().map(mp_of).collect()),
        Json::Object(o) => Mp::Map(
            o.into_iter()
                .map(|(k, v)| (Mp::from(k), mp_of(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pack(v: &Mp) -> Vec<u8> {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, v).unwrap();
        b
    }

    #[test]
    fn both_ways() {
        let frame = json!(["1", "2", "device", "status_update", {"status": "ok", "n": -3, "x": 1.5, "l": [true, null]}]);
        let mp = from_json(frame.to_string().as_bytes());
        // A heartbeat as NervesHub's serializer writes one: fixarray 5, nil, "1", ...
        assert_eq!(mp[0], 0x95);
        let back: Json = serde_json::from_slice(&to_json(&mp).unwrap()).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn nerveshub_types() {
        let ts = Mp::Ext(-1, 1_760_000_000u32.to_be_bytes().to_vec());
        let v = Mp::Array(vec![
            Mp::Nil,
            Mp::from("3"),
            Mp::from("extensions"),
            Mp::from("health:report"),
            Mp::Map(vec![
                (Mp::from("timestamp"), ts),
                (Mp::from("raw"), Mp::Binary(vec![0, 255])),
            ]),
        ]);
        let j: Json = serde_json::from_slice(&to_json(&pack(&v)).unwrap()).unwrap();
        assert_eq!(j[4]["timestamp"], "2025-10-09T08:53:20Z");
        assert_eq!(j[4]["raw"], "AP8=");
        // A str whose bytes are not UTF-8 (console output).
        assert_eq!(
            to_json(&[0xa2, b'a', 0xff]).unwrap(),
            "\"a\u{fffd}\"".as_bytes()
        );
        // 8-byte form with nanoseconds.
        let v8 = (500_000_000u64 << 34) | 1;
        assert_eq!(
            timestamp(&v8.to_be_bytes()).unwrap(),
            "1970-01-01T00:00:01.500000Z"
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(to_json(&[0xa5, b'a']), Err(MsgpackError::Invalid));
        assert_eq!(to_json(&[0x91]), Err(MsgpackError::Invalid));
        // Trailing bytes after one value.
        assert_eq!(to_json(&[0xc0, 0xc0]), Err(MsgpackError::Invalid));
        assert_eq!(
            to_json(&pack(&Mp::Ext(5, vec![1]))),
            Err(MsgpackError::Ext(5))
        );
        assert_eq!(
            to_json(&pack(&Mp::Map(vec![(Mp::from(1), Mp::Nil)]))),
            Err(MsgpackError::Key)
        );
        let mut deep = Mp::Nil;
        for _ in 0..200 {
            deep = Mp::Array(vec![deep]);
        }
        assert!(to_json(&pack(&deep)).is_err());
    }
}
