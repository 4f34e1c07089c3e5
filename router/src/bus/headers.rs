//! Device event JSON -> AMQP message headers, following the `amqp-value-json` mapping:
//! every top-level field of the event object becomes one header so consumers can route
//! or filter on them without parsing the body.
//!
//! | JSON | AMQP field value |
//! |---|---|
//! | `null` | void (`V`) |
//! | `true` / `false` | boolean (`t`) |
//! | string | long string (`S`) |
//! | integer in the i64 range | long-long-int (`l`) |
//! | integer outside the i64 range | long string (`S`) holding the exact decimal text (see below) |
//! | any other number (fraction or exponent) | double (`d`); beyond f64's range, long string of its text |
//! | object | field table (`F`), nested |
//! | array | field array (`A`) |
//!
//! **Integers beyond i64.** AMQP 0-9-1 as RabbitMQ speaks it has no unsigned 64-bit or
//! arbitrary-precision integer field type, and a double would silently round
//! (`18446744073709551615` becomes `18446744073709551616`). So an integer literal that
//! does not fit an i64 (a u64 above `i64::MAX`, or any longer integer) is sent as a
//! long string holding exactly the decimal digits the device sent. A consumer that needs
//! the number parses that string; nothing is rounded, ever. The body keeps the literal as
//! the device sent it, too.
//!
//! **Keys.** Field-table keys are AMQP short strings (at most 255 bytes). A longer key
//! (at any nesting depth) cannot be represented: it is skipped and counted in
//! [`Headers::skipped_keys`], which the bridge adds to
//! `router_amqp_header_keys_skipped_total`. The field stays in the body.
//!
//! **Names the broker reads.** A top-level field whose name RabbitMQ or a common plugin
//! interprets as an instruction never becomes a header: `CC` and `BCC` (sender-selected
//! distribution: extra routing keys, so a device could reach queues bound to any key) and
//! every name starting with `x-` (`x-death` and `x-first-death-*` of dead-lettering,
//! `x-delivery-count` of quorum queues, `x-delay` of the delayed-message exchange,
//! `x-deduplication-header` of the deduplication plugin, `x-received-from` of federation
//! and shovels, `x-stream-filter-value` of stream filtering, `x-opt-*` of AMQP 1.0, and
//! whatever the broker adds next under its reserved prefix), compared without regard to
//! ASCII case. They are left out and counted in [`Headers::reserved_keys`]
//! (`router_amqp_header_keys_reserved_total`); the body keeps them.
//!
//! This module owns only the mapping. It is pure (no I/O, no shared state) and must never
//! panic on any input: bad JSON is an error, not a crash. It does not use
//! `serde_json`'s `arbitrary_precision` feature (that would change number handling for
//! the whole router); instead it walks the already validated text itself, so an integer's
//! exact digits are at hand without going through `f64`.

use std::borrow::Cow;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// Longest key a field table can hold (an AMQP short string).
pub const MAX_KEY_LEN: usize = 255;
/// Deepest nesting of objects and arrays mapped (serde_json's own default limit);
/// deeper input is refused rather than walked recursively.
pub const MAX_DEPTH: usize = 128;

/// The headers of one event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Headers {
    pub table: FieldTable,
    /// Keys longer than [`MAX_KEY_LEN`] bytes that were left out (at any depth).
    pub skipped_keys: u64,
    /// Top-level keys the broker would interpret ([`is_reserved`]), left out.
    pub reserved_keys: u64,
    /// Bytes the table takes on the wire (inside a content header frame).
    pub wire_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadersError {
    #[error("event body is not valid JSON")]
    Invalid,
    #[error("event body is not a JSON object")]
    NotObject,
    #[error("event body nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Map the top-level fields of the JSON object `body` to AMQP headers.
pub fn from_json(body: &[u8]) -> Result<Headers, HeadersError> {
    // One validating pass first, so the walker below can trust the structure. (Skipping
    // a value this way is not depth-limited: the walker bounds its own recursion.)
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|_| HeadersError::Invalid)?;
    let mut w = Walker {
        b: body,
        i: 0,
        skipped: 0,
        reserved: 0,
        depth: 0,
    };
    w.ws();
    if w.peek() != Some(b'{') {
        return Err(HeadersError::NotObject);
    }
    let table = w.object()?;
    let wire_len = table_wire_len(&table);
    Ok(Headers {
        table,
        skipped_keys: w.skipped,
        reserved_keys: w.reserved,
        wire_len,
    })
}

/// A top-level name RabbitMQ or a plugin reads from a message's headers (module doc):
/// `CC`, `BCC`, or `x-` followed by anything, in any ASCII case.
pub fn is_reserved(key: &str) -> bool {
    let k = key.as_bytes();
    key.eq_ignore_ascii_case("cc")
        || key.eq_ignore_ascii_case("bcc")
        || (k.len() >= 2 && k[..2].eq_ignore_ascii_case(b"x-"))
}

/// Bytes a field table takes when encoded (4-byte length prefix included).
pub fn table_wire_len(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_wire_len(v))
        .sum::<usize>()
}

/// Bytes one field value takes when encoded (type tag included).
fn value_wire_len(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_wire_len).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_wire_len(t),
    }
}

/// A cursor over JSON text that `serde_json` has already validated. Every access is
/// still bounds-checked: a mistake here yields `Invalid`, never a panic.
struct Walker<'a> {
    b: &'a [u8],
    i: usize,
    skipped: u64,
    reserved: u64,
    depth: usize,
}

impl<'a> Walker<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), HeadersError> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(HeadersError::Invalid)
        }
    }

    fn value(&mut self) -> Result<AMQPValue, HeadersError> {
        self.ws();
        Ok(match self.peek().ok_or(HeadersError::Invalid)? {
            b'{' => AMQPValue::FieldTable(self.object()?),
            b'[' => AMQPValue::FieldArray(self.array()?),
            b'"' => AMQPValue::LongString(LongString::from(self.string()?.into_owned())),
            b't' => self.literal("true", AMQPValue::Boolean(true))?,
            b'f' => self.literal("false", AMQPValue::Boolean(false))?,
            b'n' => self.literal("null", AMQPValue::Void)?,
            _ => self.number()?,
        })
    }

    fn literal(&mut self, word: &str, v: AMQPValue) -> Result<AMQPValue, HeadersError> {
        if self.b.get(self.i..self.i + word.len()) == Some(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(HeadersError::Invalid)
        }
    }

    fn enter(&mut self) -> Result<(), HeadersError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(HeadersError::TooDeep);
        }
        Ok(())
    }

    fn object(&mut self) -> Result<FieldTable, HeadersError> {
        self.enter()?;
        let t = self.object_members();
        self.depth -= 1;
        t
    }

    fn object_members(&mut self) -> Result<FieldTable, HeadersError> {
        self.expect(b'{')?;
        let mut t = FieldTable::default();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(t);
        }
        loop {
            self.ws();
            let key = self.string()?;
            self.expect(b':')?;
            let v = self.value()?;
            if self.depth == 1 && is_reserved(&key) {
                self.reserved += 1;
            } else {
                match ShortString::try_new(key.into_owned()) {
                    Ok(k) => {
                        // Duplicate keys: the last one wins, as serde_json decides too.
                        t.insert(k, v);
                    }
                    Err(_) => self.skipped += 1,
                }
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(t);
                }
                _ => return Err(HeadersError::Invalid),
            }
        }
    }

    fn array(&mut self) -> Result<FieldArray, HeadersError> {
        self.enter()?;
        let a = self.array_items();
        self.depth -= 1;
        a
    }

    fn array_items(&mut self) -> Result<FieldArray, HeadersError> {
        self.expect(b'[')?;
        let mut a = FieldArray::default();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(a);
        }
        loop {
            a.push(self.value()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(a);
                }
                _ => return Err(HeadersError::Invalid),
            }
        }
    }

    /// A string at the cursor: borrowed when it has no escape, else unescaped by serde_json.
    fn string(&mut self) -> Result<Cow<'a, str>, HeadersError> {
        if self.peek() != Some(b'"') {
            return Err(HeadersError::Invalid);
        }
        let start = self.i;
        let mut j = start + 1;
        let mut escaped = false;
        loop {
            match self.b.get(j) {
                Some(b'\\') => {
                    escaped = true;
                    j += 2;
                }
                Some(b'"') => break,
                Some(_) => j += 1,
                None => return Err(HeadersError::Invalid),
            }
        }
        self.i = j + 1;
        let raw = self.b.get(start..=j).ok_or(HeadersError::Invalid)?;
        if escaped {
            serde_json::from_slice::<String>(raw)
                .map(Cow::Owned)
                .map_err(|_| HeadersError::Invalid)
        } else {
            std::str::from_utf8(&raw[1..raw.len() - 1])
                .map(Cow::Borrowed)
                .map_err(|_| HeadersError::Invalid)
        }
    }

    /// A number literal: exact i64, else exact decimal text for a huge integer, else f64.
    fn number(&mut self) -> Result<AMQPValue, HeadersError> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.i += 1;
        }
        let text =
            std::str::from_utf8(&self.b[start..self.i]).map_err(|_| HeadersError::Invalid)?;
        if text.is_empty() {
            return Err(HeadersError::Invalid);
        }
        if text.contains(['.', 'e', 'E']) {
            let f = text.parse::<f64>().map_err(|_| HeadersError::Invalid)?;
            // Beyond f64's range (`1e400`): keep the text rather than send infinity.
            return Ok(if f.is_finite() {
                AMQPValue::Double(f)
            } else {
                AMQPValue::LongString(LongString::from(text))
            });
        }
        Ok(match text.parse::<i64>() {
            Ok(n) => AMQPValue::LongLongInt(n),
            // Valid JSON integer too large for i64: keep every digit (module doc).
            Err(_) => AMQPValue::LongString(LongString::from(text)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::generation::gen_field_table;

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn one(json_value: &str) -> AMQPValue {
        let h = from_json(format!(r#"{{"k":{json_value}}}"#).as_bytes()).expect("valid");
        h.table.inner().get("k").cloned().expect("key k")
    }

    /// The encoded size the real serializer produces.
    fn encoded(t: &FieldTable) -> usize {
        let f = gen_field_table::<Vec<u8>>(t);
        f(Vec::new().into()).expect("serializes").write.len()
    }

    #[test]
    fn names_the_broker_reads_never_become_headers() {
        let h = from_json(
            br#"{"type":"x","CC":["hive-backend.device-alive"],"bcc":["billing.invoice"],"X-Death":[],"x-delay":5,"xray":1,"inner":{"CC":"kept"},"ccc":2}"#,
        )
        .unwrap();
        let keys: Vec<&str> = h.table.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["ccc", "inner", "type", "xray"]);
        assert_eq!(h.reserved_keys, 4);
        // Only the top level is read by the broker: nested tables keep every name.
        let AMQPValue::FieldTable(inner) = &h.table.inner()["inner"] else {
            panic!("inner is a table")
        };
        assert!(inner.inner().contains_key("CC"));
        for k in ["CC", "cc", "Bcc", "BCC", "x-", "X-match", "x-death"] {
            assert!(is_reserved(k), "{k}");
        }
        for k in ["C", "c-c", "bccx", "x", "xdeath", "type"] {
            assert!(!is_reserved(k), "{k}");
        }
    }

    #[test]
    fn scalar_mapping_table() {
        let cases: Vec<(&str, AMQPValue)> = vec![
            ("null", AMQPValue::Void),
            ("true", AMQPValue::Boolean(true)),
            ("false", AMQPValue::Boolean(false)),
            (r#""hello""#, s("hello")),
            (r#""""#, s("")),
            (r#""caf\u00e9 \"q\" \n""#, s("café \"q\" \n")),
            (r#""ünïcödé""#, s("ünïcödé")),
            ("0", AMQPValue::LongLongInt(0)),
            ("-0", AMQPValue::LongLongInt(0)),
            ("42", AMQPValue::LongLongInt(42)),
            ("-17", AMQPValue::LongLongInt(-17)),
            ("9223372036854775807", AMQPValue::LongLongInt(i64::MAX)),
            ("-9223372036854775808", AMQPValue::LongLongInt(i64::MIN)),
            ("1.5", AMQPValue::Double(1.5)),
            ("-0.25", AMQPValue::Double(-0.25)),
            ("1.0", AMQPValue::Double(1.0)),
            ("1e3", AMQPValue::Double(1000.0)),
            ("2E-2", AMQPValue::Double(0.02)),
            ("1e+2", AMQPValue::Double(100.0)),
            ("2.625", AMQPValue::Double(2.625)),
        ];
        for (json, want) in cases {
            assert_eq!(one(json), want, "{json}");
        }
    }

    #[test]
    fn integers_beyond_i64_keep_their_exact_digits() {
        for big in [
            "9223372036854775808",  // i64::MAX + 1
            "18446744073709551615", // u64::MAX
            "18446744073709551616", // u64::MAX + 1
            "123456789012345678901234567890",
            "-9223372036854775809", // i64::MIN - 1
        ] {
            assert_eq!(one(big), s(big), "{big}");
        }
        // A float literal beyond f64's range keeps its text too, instead of infinity.
        assert_eq!(one("1e400"), s("1e400"));
        assert_eq!(one("-2.5E999"), s("-2.5E999"));
        // What a Value-based mapping would have done to u64::MAX through f64: rounding.
        assert_ne!(
            format!("{}", 18446744073709551615u64 as f64),
            "18446744073709551615"
        );
    }

    #[test]
    fn nested_objects_and_arrays() {
        let h = from_json(
            br#"{"type":"instances","apps":[{"name":"db","healthy":true,"cpu":0.5,"pid":7,"tags":["a",null]}],
                "meta":{"deep":{"deeper":{"n":-1}}},"empty":{},"none":[]}"#,
        )
        .unwrap();
        let mut app = FieldTable::default();
        app.insert("name".into(), s("db"));
        app.insert("healthy".into(), AMQPValue::Boolean(true));
        app.insert("cpu".into(), AMQPValue::Double(0.5));
        app.insert("pid".into(), AMQPValue::LongLongInt(7));
        app.insert(
            "tags".into(),
            AMQPValue::FieldArray(vec![s("a"), AMQPValue::Void].into()),
        );
        let mut deeper = FieldTable::default();
        deeper.insert("n".into(), AMQPValue::LongLongInt(-1));
        let mut deep = FieldTable::default();
        deep.insert("deeper".into(), AMQPValue::FieldTable(deeper));
        let mut meta = FieldTable::default();
        meta.insert("deep".into(), AMQPValue::FieldTable(deep));
        let mut want = FieldTable::default();
        want.insert("type".into(), s("instances"));
        want.insert(
            "apps".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(app)].into()),
        );
        want.insert("meta".into(), AMQPValue::FieldTable(meta));
        want.insert("empty".into(), AMQPValue::FieldTable(FieldTable::default()));
        want.insert("none".into(), AMQPValue::FieldArray(FieldArray::default()));
        assert_eq!(h.table, want);
        assert_eq!(h.skipped_keys, 0);
        assert_eq!(h.wire_len, encoded(&h.table));
    }

    #[test]
    fn long_keys_are_skipped_and_counted_at_any_depth() {
        let k255 = "k".repeat(255);
        let k256 = "x".repeat(256);
        // A multi-byte key: 128 two-byte characters = 256 bytes.
        let wide = "é".repeat(128);
        let body = format!(
            r#"{{"{k255}":1,"{k256}":2,"{wide}":3,"n":{{"{k256}":4,"ok":5}},"a":[{{"{k256}":6}}]}}"#
        );
        let h = from_json(body.as_bytes()).unwrap();
        assert_eq!(h.skipped_keys, 4);
        assert_eq!(
            h.table.inner().get(&*k255),
            Some(&AMQPValue::LongLongInt(1))
        );
        assert!(!h.table.contains_key(&k256));
        assert!(!h.table.contains_key(&wide));
        let AMQPValue::FieldTable(n) = &h.table.inner()["n"] else {
            panic!("n is a table")
        };
        assert_eq!(n.inner().len(), 1);
        assert_eq!(h.wire_len, encoded(&h.table));
    }

    #[test]
    fn escaped_keys_are_unescaped_and_duplicates_keep_the_last() {
        let h = from_json(br#"{"d\u0065vice":"x","a":1,"a":2," sp ace ":null}"#).unwrap();
        assert_eq!(h.table.inner().get("device"), Some(&s("x")));
        assert_eq!(h.table.inner().get("a"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(h.table.inner().get(" sp ace "), Some(&AMQPValue::Void));
    }

    #[test]
    fn whitespace_everywhere() {
        let h =
            from_json(b" \n{ \"a\" :\t[ 1 , { \"b\" : 2.5 } ] ,\r\n \"c\" : true } \n").unwrap();
        assert_eq!(h.table.inner().len(), 2);
        assert_eq!(h.wire_len, encoded(&h.table));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\":}",
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"\xff\xfe",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":01}",
            b"{\"a\":NaN}",
        ] {
            assert_eq!(from_json(bad), Err(HeadersError::Invalid), "{bad:?}");
        }
        for not_obj in [&b"[1,2]"[..], b"\"s\"", b"7", b"null"] {
            assert_eq!(from_json(not_obj), Err(HeadersError::NotObject));
        }
        // Nesting deeper than MAX_DEPTH is refused, not walked (no stack overflow).
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(from_json(deep.as_bytes()), Err(HeadersError::TooDeep));
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(127), "]".repeat(127));
        assert!(from_json(ok.as_bytes()).is_ok());
        let over = format!("{{\"a\":{}{}}}", "[".repeat(128), "]".repeat(128));
        assert_eq!(from_json(over.as_bytes()), Err(HeadersError::TooDeep));
    }

    #[test]
    fn wire_len_matches_the_serializer() {
        let h = from_json(
            br#"{"s":"abc","i":1,"f":1.5,"b":false,"n":null,"big":18446744073709551615,
                "a":[1,"x",[true,{"k":[]}]],"t":{"u":{"v":"w"}}}"#,
        )
        .unwrap();
        assert_eq!(h.wire_len, encoded(&h.table));
    }

    #[test]
    fn agrees_with_serde_json_value_on_ordinary_numbers() {
        // For numbers that fit i64 or are floats, the walker and serde_json agree.
        for text in [
            "0",
            "12",
            "-3",
            "0.1",
            "123.456e-7",
            "-1E10",
            "4503599627370497.5",
        ] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let want = match v.as_i64() {
                Some(n) => AMQPValue::LongLongInt(n),
                None => AMQPValue::Double(v.as_f64().unwrap()),
            };
            assert_eq!(one(text), want, "{text}");
        }
    }
}
