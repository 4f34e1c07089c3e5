//! JSON at the edge: validate a device's object with simd-json, then find the byte
//! spans of its top-level members so metadata can be injected by copying spans,
//! never by re-serialising the whole object. Pure functions; no I/O.

use std::borrow::Cow;
use std::ops::Range;

/// One top-level `"key": value` member, as byte ranges into the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The key including its quotes.
    pub key: Range<usize>,
    /// True when the key holds a backslash escape and must be unescaped to compare.
    pub key_escaped: bool,
    /// The raw value.
    pub value: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("not valid JSON")]
    Invalid,
    #[error("not a JSON object")]
    NotObject,
}

/// Reusable buffers, one per shard: validating needs a mutable, padded copy.
#[derive(Default)]
pub struct Scratch {
    copy: Vec<u8>,
    buffers: Option<simd_json::Buffers>,
    pub members: Vec<Member>,
}

impl Scratch {
    /// Validate `text` as one JSON object and fill `self.members` with its top-level members.
    pub fn parse_object(&mut self, text: &[u8]) -> Result<(), JsonError> {
        self.members.clear();
        self.copy.clear();
        self.copy.extend_from_slice(text);
        let buffers = self
            .buffers
            .get_or_insert_with(|| simd_json::Buffers::new(4096));
        simd_json::to_tape_with_buffers(&mut self.copy, buffers).map_err(|_| JsonError::Invalid)?;
        // Valid JSON from here on, so the scanner can be simple.
        let mut i = skip_ws(text, 0);
        if text.get(i) != Some(&b'{') {
            return Err(JsonError::NotObject);
        }
        i = skip_ws(text, i + 1);
        if text.get(i) == Some(&b'}') {
            return Ok(());
        }
        loop {
            let key_start = i;
            let (key_end, key_escaped) = skip_string(text, i);
            i = skip_ws(text, key_end);
            // ':'
            i = skip_ws(text, i + 1);
            let value_start = i;
            let value_end = skip_value(text, i);
            self.members.push(Member {
                key: key_start..key_end,
                key_escaped,
                value: value_start..value_end,
            });
            i = skip_ws(text, value_end);
            match text.get(i) {
                Some(b',') => i = skip_ws(text, i + 1),
                _ => return Ok(()),
            }
        }
    }

    /// The last member whose (unescaped) key is `name`.
    pub fn find(&self, text: &[u8], name: &str) -> Option<&Member> {
        self.members.iter().rev().find(|m| key_is(text, m, name))
    }
}

/// Does this member's key equal `name` once unescaped? (`"d\u0065vice"` is `device`.)
pub fn key_is(text: &[u8], m: &Member, name: &str) -> bool {
    let raw = &text[m.key.start + 1..m.key.end - 1];
    if !m.key_escaped {
        return raw == name.as_bytes();
    }
    serde_json::from_slice::<String>(&text[m.key.clone()]).is_ok_and(|k| k == name)
}

/// A string value, unescaped only when needed; None if the value is not a string.
pub fn as_str<'a>(text: &'a [u8], value: &Range<usize>) -> Option<Cow<'a, str>> {
    let raw = &text[value.clone()];
    if raw.first() != Some(&b'"') || raw.len() < 2 {
        return None;
    }
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
    }
    serde_json::from_slice::<String>(raw).ok().map(Cow::Owned)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(c) = b.get(i) {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            break;
        }
        i += 1;
    }
    i
}

/// `i` at an opening quote; returns the index after the closing quote and whether
/// the string holds an escape.
fn skip_string(b: &[u8], mut i: usize) -> (usize, bool) {
    let mut escaped = false;
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                escaped = true;
                i += 2;
            }
            b'"' => return (i + 1, escaped),
            _ => i += 1,
        }
    }
    (b.len(), escaped)
}

fn skip_value(b: &[u8], mut i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => skip_string(b, i).0,
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i).0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            b.len()
        }
        _ => {
            while let Some(c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            i
        }
    }
}

/// Append `s` as a JSON string literal.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping writes into a Vec without failing.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(text: &str) -> Result<Vec<(String, String)>, JsonError> {
        let mut s = Scratch::default();
        s.parse_object(text.as_bytes())?;
        let b = text.as_bytes();
        Ok(s.members
            .iter()
            .map(|m| {
                (
                    String::from_utf8(b[m.key.clone()].to_vec()).unwrap(),
                    String::from_utf8(b[m.value.clone()].to_vec()).unwrap(),
                )
            })
            .collect())
    }

    #[test]
    fn scans_top_level_members() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[]),
            (" { } ", &[]),
            (r#"{"a":1}"#, &[(r#""a""#, "1")]),
            (
                r#"{ "a" : "x,}" , "b":{"c":[1,{"d":"]"}]}, "e":-1.5e3,"f":null ,"g":true}"#,
                &[
                    (r#""a""#, r#""x,}""#),
                    (r#""b""#, r#"{"c":[1,{"d":"]"}]}"#),
                    (r#""e""#, "-1.5e3"),
                    (r#""f""#, "null"),
                    (r#""g""#, "true"),
                ],
            ),
            (r#"{"q\"k":"v\\"}"#, &[(r#""q\"k""#, r#""v\\""#)]),
        ];
        for (input, want) in cases {
            let got = members(input).unwrap();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn refuses_non_objects_and_bad_json() {
        for bad in [
            "",
            "{",
            "{\"a\":}",
            "[1]",
            "\"s\"",
            "1",
            "{\"a\":1,}",
            "nul",
            "{'a':1}",
        ] {
            assert!(members(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(members("[1,2]"), Err(JsonError::NotObject));
        assert_eq!(members("{\"a\"1}"), Err(JsonError::Invalid));
    }

    #[test]
    fn escaped_keys_compare_unescaped() {
        let text = br#"{"d\u0065vice":"x","type":"t\u00e9"}"#;
        let mut s = Scratch::default();
        s.parse_object(text).unwrap();
        assert!(s.find(text, "device").is_some());
        let ty = s.find(text, "type").unwrap();
        assert_eq!(as_str(text, &ty.value).unwrap(), "té");
    }
}
