//! JSON at the edge: validate a device's object and find the byte spans of its
//! top-level members in one pass, so metadata can be injected by copying spans, never
//! by re-serialising the whole object. Pure functions; no I/O.
//!
//! The validator is strict RFC 8259 (what `serde_json` accepts, checked against it by
//! property tests) plus two refusals of its own: a `\u` escape that is a lone UTF-16
//! surrogate (no consumer could decode it into a string), and nesting deeper than
//! [`MAX_DEPTH`] containers (the AMQP header mapping's limit too; `serde_json::Value`
//! stops one level earlier, its `IgnoredAny` not at all).
//! It replaced simd-json's tape plus a second scan: for events of a few hundred bytes,
//! setting up SIMD stages and a tape cost more than one scalar pass (the flood profile
//! had JSON at ~44% of a shard).
//! The run of plain bytes inside a string is skipped by `simd::skip_run` (sixteen bytes at
//! a time on x86_64).

use std::borrow::Cow;
use std::ops::Range;

use super::simd;

/// Deepest nesting of objects and arrays accepted (the top-level object is 1).
pub const MAX_DEPTH: usize = 128;

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

/// Reusable per-shard state: the member list of the last object parsed, the element
/// spans of the last array.
#[derive(Default)]
pub struct Scratch {
    pub members: Vec<Member>,
    pub elements: Vec<Range<usize>>,
}

impl Scratch {
    /// Validate `text` as one JSON object and fill `self.members` with its top-level members.
    pub fn parse_object(&mut self, text: &[u8]) -> Result<(), JsonError> {
        self.members.clear();
        let mut p = Parser { b: text, i: 0 };
        p.ws();
        if p.peek() != Some(b'{') {
            // Valid JSON that is not an object is told apart from junk.
            p.value(0)?;
            p.ws();
            return Err(if p.i == text.len() {
                JsonError::NotObject
            } else {
                JsonError::Invalid
            });
        }
        p.i += 1;
        p.ws();
        if p.peek() == Some(b'}') {
            p.i += 1;
        } else {
            loop {
                if p.peek() != Some(b'"') {
                    return Err(JsonError::Invalid);
                }
                let key_start = p.i;
                let key_escaped = p.string()?;
                let key_end = p.i;
                p.ws();
                p.expect(b':')?;
                p.ws();
                let value_start = p.i;
                p.value(1)?;
                self.members.push(Member {
                    key: key_start..key_end,
                    key_escaped,
                    value: value_start..p.i,
                });
                p.ws();
                match p.bump() {
                    Some(b',') => p.ws(),
                    Some(b'}') => break,
                    _ => return Err(JsonError::Invalid),
                }
            }
        }
        p.ws();
        if p.i != text.len() {
            return Err(JsonError::Invalid);
        }
        Ok(())
    }

    /// Validate `text` as one JSON array and fill `self.elements` with the byte spans of
    /// its elements. Anything else, valid JSON or not, is `Invalid`.
    pub fn parse_array(&mut self, text: &[u8]) -> Result<(), JsonError> {
        self.elements.clear();
        let mut p = Parser { b: text, i: 0 };
        p.ws();
        p.expect(b'[')?;
        p.ws();
        if p.peek() == Some(b']') {
            p.i += 1;
        } else {
            loop {
                let start = p.i;
                p.value(1)?;
                self.elements.push(start..p.i);
                p.ws();
                match p.bump() {
                    Some(b',') => p.ws(),
                    Some(b']') => break,
                    _ => return Err(JsonError::Invalid),
                }
            }
        }
        p.ws();
        if p.i != text.len() {
            return Err(JsonError::Invalid);
        }
        Ok(())
    }

    /// The last member whose (unescaped) key is `name`.
    pub fn find(&self, text: &[u8], name: &str) -> Option<&Member> {
        self.members.iter().rev().find(|m| key_is(text, m, name))
    }
}

/// Is `text` one valid JSON value (any kind), by the rules above?
pub fn validate(text: &[u8]) -> bool {
    let mut p = Parser { b: text, i: 0 };
    p.ws();
    if p.value(0).is_err() {
        return false;
    }
    p.ws();
    p.i == text.len()
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn bump(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    /// Skip whitespace. Compact JSON has none, so the usual case is one compare.
    #[inline(always)]
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if c > b' ' || !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.i += 1;
        }
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(JsonError::Invalid)
        }
    }

    /// One value at the cursor; `depth` is how many containers enclose it.
    fn value(&mut self, depth: usize) -> Result<(), JsonError> {
        self.value_inline(depth)
    }

    /// [`Parser::value`] for the container loops: strings, numbers and literals (most
    /// values) are taken in place; only a nested container costs a call.
    #[inline(always)]
    fn value_inline(&mut self, depth: usize) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(JsonError::Invalid),
        }
    }

    #[inline(never)]
    fn object(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::Invalid);
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(JsonError::Invalid);
            }
            self.string()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            self.value_inline(depth)?;
            self.ws();
            match self.bump() {
                Some(b',') => self.ws(),
                Some(b'}') => return Ok(()),
                _ => return Err(JsonError::Invalid),
            }
        }
    }

    #[inline(never)]
    fn array(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::Invalid);
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.value_inline(depth)?;
            self.ws();
            match self.bump() {
                Some(b',') => self.ws(),
                Some(b']') => return Ok(()),
                _ => return Err(JsonError::Invalid),
            }
        }
    }

    /// `true`, `false` or `null` (`word`), compared as a whole.
    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(JsonError::Invalid)
        }
    }

    #[inline(always)]
    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    #[inline(always)]
    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.i += 1;
                self.digits();
            }
            _ => return Err(JsonError::Invalid),
        }
        match self.peek() {
            Some(b'.' | b'e' | b'E') => self.fraction_exponent(),
            _ => Ok(()),
        }
    }

    /// The rest of a number after its integer part: rarer, kept out of line.
    #[inline(never)]
    fn fraction_exponent(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(JsonError::Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(JsonError::Invalid);
            }
        }
        Ok(())
    }

    /// A string at the cursor (on its opening quote); leaves the cursor after the
    /// closing one. Ok(true): it holds escapes.
    #[inline(always)]
    fn string(&mut self) -> Result<bool, JsonError> {
        // Most strings (keys, short values) are plain ASCII and end within sixteen bytes:
        // one vector compare finds their closing quote.
        if let Some(quote) = simd::short_plain_string(self.b, self.i + 1) {
            self.i = quote + 1;
            return Ok(false);
        }
        self.string_general()
    }

    /// Any string: escapes, non-ASCII, long runs, the end of the text.
    #[inline(never)]
    fn string_general(&mut self) -> Result<bool, JsonError> {
        let b = self.b;
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        let mut non_ascii = false;
        loop {
            i = simd::skip_run(b, i, non_ascii);
            match b.get(i) {
                None => return Err(JsonError::Invalid),
                Some(b'"') => {
                    if non_ascii && std::str::from_utf8(&b[start..i]).is_err() {
                        return Err(JsonError::Invalid);
                    }
                    self.i = i + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    i = escape(b, i)?;
                }
                Some(&c) if c < 0x20 => return Err(JsonError::Invalid),
                Some(_) => {
                    non_ascii = true;
                    i += 1;
                }
            }
        }
    }
}

/// An escape at `i` (on the backslash); returns the index after it.
fn escape(b: &[u8], i: usize) -> Result<usize, JsonError> {
    match b.get(i + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
        Some(b'u') => {
            let unit = hex4(b, i + 2)?;
            match unit {
                // A high surrogate must be followed by a low one.
                0xD800..=0xDBFF => {
                    if b.get(i + 6) == Some(&b'\\')
                        && b.get(i + 7) == Some(&b'u')
                        && matches!(hex4(b, i + 8)?, 0xDC00..=0xDFFF)
                    {
                        Ok(i + 12)
                    } else {
                        Err(JsonError::Invalid)
                    }
                }
                0xDC00..=0xDFFF => Err(JsonError::Invalid),
                _ => Ok(i + 6),
            }
        }
        _ => Err(JsonError::Invalid),
    }
}

fn hex4(b: &[u8], i: usize) -> Result<u16, JsonError> {
    let digits = b.get(i..i + 4).ok_or(JsonError::Invalid)?;
    let mut v = 0u16;
    for &d in digits {
        let x = (d as char).to_digit(16).ok_or(JsonError::Invalid)?;
        v = v << 4 | x as u16;
    }
    Ok(v)
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

/// Append `s` as a JSON string literal.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    // Most strings written (topics, event names, codes) need no escape: copied between
    // quotes. serde_json escapes exactly `"`, `\` and controls, so the two agree.
    if s.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
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

    /// Arrays split into their elements' spans (any kind, nested containers whole);
    /// anything that is not one whole array is refused, valid JSON or not.
    #[test]
    fn splits_arrays_into_elements() {
        let elements = |text: &str| -> Result<Vec<String>, JsonError> {
            let mut s = Scratch::default();
            s.parse_array(text.as_bytes())?;
            Ok(s.elements
                .iter()
                .map(|r| text[r.clone()].to_string())
                .collect())
        };
        assert_eq!(elements("[]").unwrap(), Vec::<String>::new());
        assert_eq!(elements(" [ ] ").unwrap(), Vec::<String>::new());
        assert_eq!(
            elements(r#"[ {"a":[1,"],"]} , 5,"x\"y" ,[[]],null ]"#).unwrap(),
            [r#"{"a":[1,"],"]}"#, "5", r#""x\"y""#, "[[]]", "null"]
        );
        for bad in [
            "", "{}", "1", "\"[]\"", "[", "[1,]", "[,1]", "[1 2]", "[1]x", "[{]",
        ] {
            assert_eq!(elements(bad), Err(JsonError::Invalid), "{bad:?}");
        }
        // The depth limit counts the array as the first container.
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(elements(&deep).is_ok());
        let deeper = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(elements(&deeper).is_err());
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

    #[test]
    fn strict_grammar() {
        let ok = [
            "0",
            "-0",
            "1.5",
            "-1.5e3",
            "1E+2",
            "1e-2",
            "123456789012345678901234567890",
            "1e400",
            "true",
            "false",
            "null",
            "\"\"",
            "\"\\u00e9\\n\\/\"",
            "[]",
            "{}",
            " [ 1 , {\"a\" : [ ] } ] ",
            "\"\\ud83d\\ude00\"",
            "\"é€😀\"",
        ];
        for t in ok {
            assert!(validate(t.as_bytes()), "{t:?} refused");
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok(),
                "{t:?}"
            );
        }
        let bad = [
            "",
            " ",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "1e+",
            "+1",
            "0x1",
            "tru",
            "nulll",
            "True",
            "[1,]",
            "[,1]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{a:1}",
            "[1 2]",
            "\"a",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\u12g4\"",
            "\"tab\there\"",
            "1 2",
            "[]]",
            "{}}",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\\ud800x\"",
        ];
        for t in bad {
            assert!(!validate(t.as_bytes()), "{t:?} accepted");
        }
        // Raw invalid UTF-8 inside a string, and a raw control character.
        assert!(!validate(b"\"\xff\""));
        assert!(!validate(b"\"\xc3\""));
        assert!(!validate(b"\"a\x01\""));
        assert!(validate("\"\u{7f}\"".as_bytes()));
    }

    #[test]
    fn nesting_stops_where_the_amqp_header_mapping_stops() {
        // Containers, the top-level object included: 128 pass, 129 do not, in both.
        for inner in [1, 126, 127, 128, 20_000] {
            let t = format!("{{\"a\":{}{}}}", "[".repeat(inner), "]".repeat(inner));
            let ours = Scratch::default().parse_object(t.as_bytes()).is_ok();
            assert_eq!(ours, inner < MAX_DEPTH, "{inner} arrays in an object");
            let headers = crate::bus::headers::from_json(t.as_bytes()).is_ok();
            assert_eq!(ours, headers, "{inner} arrays in an object");
            assert_eq!(validate(t.as_bytes()), ours);
        }
    }

    #[test]
    fn strings_of_every_length_end_where_they_should() {
        // Runs longer and shorter than one SIMD chunk, ending at the buffer's end or not,
        // with non-ASCII before a later stop.
        for len in 0..40 {
            let plain = format!("\"{}\"", "a".repeat(len));
            assert!(validate(plain.as_bytes()), "{plain:?}");
            let unterminated = format!("\"{}", "a".repeat(len));
            assert!(!validate(unterminated.as_bytes()), "{unterminated:?}");
            let wide = format!("\"é{}\\n{}\"", "a".repeat(len), "ü".repeat(len % 7));
            assert!(validate(wide.as_bytes()), "{wide:?}");
            let mut bad = format!("\"é{}\"", "a".repeat(len)).into_bytes();
            bad.insert(2 + len / 2, 0xff);
            assert!(!validate(&bad), "{bad:?}");
            let control = format!("\"é{}\u{1f}\"", "a".repeat(len));
            assert!(!validate(control.as_bytes()), "{control:?}");
        }
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        // Every char below 0x80 alone and inside text, and some beyond.
        let mut cases: Vec<String> = (0u8..0x80)
            .flat_map(|c| {
                let c = c as char;
                [c.to_string(), format!("ab{c}cd")]
            })
            .collect();
        cases.extend(["", "device:1", "é ü 字 😀", "\u{7f}\u{80}\u{2028}"].map(String::from));
        for s in cases {
            let mut out = b"x".to_vec();
            push_str(&mut out, &s);
            assert_eq!(
                &out[1..],
                serde_json::to_string(&s).unwrap().as_bytes(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn long_strings_take_the_word_at_a_time_path() {
        // Every stop byte at every offset of a long string.
        let stops: [&str; 4] = ["\\\"", "\\n", "é", "\\u0041"];
        for stop in stops {
            for at in 0..20 {
                let t = format!("\"{}{}{}\"", "x".repeat(at), stop, "y".repeat(19 - at));
                assert!(validate(t.as_bytes()), "{t:?}");
                assert_eq!(members(&format!("{{{t}:{t}}}")).unwrap().len(), 1);
            }
            for at in 0..20 {
                let t = format!("\"{}\u{1}{}\"", "x".repeat(at), "y".repeat(19 - at));
                assert!(!validate(t.as_bytes()), "{t:?}");
            }
        }
    }
}
