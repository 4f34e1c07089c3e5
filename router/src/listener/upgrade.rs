//! The HTTP upgrade request: parsing it (path -> protocol, token from the header or the
//! query, the key) and the 101 answer. Pure functions over bytes.

use crate::protocol::phoenix::Vsn;
use crate::protocol::ws;
use crate::shard::Protocol;
use base64::Engine;

/// A parsed upgrade request: what the handshake needs from it.
pub struct Upgrade {
    pub protocol: Protocol,
    pub key: String,
    pub token: Option<String>,
    /// NervesHub shared-secret headers (`x-nh-*`), when the request has any.
    pub nerves: Option<crate::nerves_auth::Headers>,
    /// The client offers permessage-deflate in a form the router accepts: the window
    /// bits it allows the router (see `ws::deflate_offer`).
    pub deflate: Option<u8>,
    pub consumed: usize,
}

/// Why an upgrade request is refused: (status line, message) for the HTTP answer.
type Refusal = (&'static str, String);

/// Parse an HTTP upgrade request. Err: (status line, message) for the HTTP answer.
/// `conformance_echo`: --websocket-conformance-echo (`/conformance/echo` exists).
pub fn parse_upgrade(
    buf: &[u8],
    conformance_echo: bool,
) -> Result<Option<Upgrade>, (&'static str, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                "431 Request Header Fields Too Large",
                format!(
                    "more than {} header fields in the upgrade request",
                    headers.len()
                ),
            ))
        }
        Err(e) => return Err(("400 Bad Request", format!("malformed HTTP request: {e}"))),
    };
    if req.method != Some("GET") {
        return Err((
            "405 Method Not Allowed",
            "WebSocket upgrades use GET".into(),
        ));
    }
    // RFC 6455 §4.1: the opening handshake is an HTTP/1.1 request.
    if req.version != Some(1) {
        return Err(("400 Bad Request", "WebSocket upgrades need HTTP/1.1".into()));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let protocol = endpoint_protocol(path, query, conformance_echo)?;
    let headers: &[httparse::Header] = req.headers;
    check_websocket_headers(headers)?;
    let key = websocket_key(headers)?;
    let token = token(headers, query)?;
    Ok(Some(Upgrade {
        protocol,
        key,
        token,
        nerves: nerves_headers(headers),
        deflate: headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .find_map(ws::deflate_offer),
        consumed,
    }))
}

/// The value of the first header called `name` (any case), if it is UTF-8.
fn header<'h>(headers: &'h [httparse::Header], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

/// The WebSocket conformance echo's path (only with --websocket-conformance-echo).
pub const CONFORMANCE_ECHO_PATH: &str = "/conformance/echo";

/// The protocol spoken at `path` (Phoenix's serializer from the query's `vsn`); 404 for
/// a path with no endpoint (`/conformance/echo` too, unless `conformance_echo`).
fn endpoint_protocol(path: &str, query: &str, conformance_echo: bool) -> Result<Protocol, Refusal> {
    let param = |name: &str| {
        query.split('&').find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| percent_decode(v))
        })
    };
    Ok(match path {
        "/ws" => Protocol::Hive,
        "/v1/ws" => Protocol::Hivekit,
        CONFORMANCE_ECHO_PATH if conformance_echo => Protocol::ConformanceEcho,
        // NervesHub serves its device socket at both paths (shared-secret devices use
        // the second).
        "/socket/websocket" | "/device-socket/websocket" => match param("vsn").as_deref() {
            None | Some("1.0.0") => Protocol::Phoenix(Vsn::V1),
            Some("2.0.0") => Protocol::Phoenix(Vsn::V2),
            Some("3.0.0") => Protocol::Phoenix(Vsn::V3),
            Some(v) => {
                return Err((
                    "400 Bad Request",
                    format!("unsupported Phoenix serializer vsn {v:?}; use 1.0.0, 2.0.0 or 3.0.0 (MessagePack)"),
                ))
            }
        },
        _ => {
            return Err((
                "404 Not Found",
                format!("no WebSocket endpoint at {path}; devices connect to /ws, /socket/websocket, /device-socket/websocket or /v1/ws"),
            ))
        }
    })
}

/// 426 unless the request asks for a WebSocket upgrade, version 13.
fn check_websocket_headers(headers: &[httparse::Header]) -> Result<(), Refusal> {
    let upgrade_ok =
        header(headers, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_ok = header(headers, "connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade_ok || !connection_ok {
        return Err((
            "426 Upgrade Required",
            "this endpoint only speaks WebSocket".into(),
        ));
    }
    if header(headers, "sec-websocket-version") != Some("13") {
        return Err((
            "426 Upgrade Required",
            "Sec-WebSocket-Version must be 13".into(),
        ));
    }
    Ok(())
}

/// The `Sec-WebSocket-Key`, trimmed; 400 when missing or not a base64 16-byte nonce.
fn websocket_key(headers: &[httparse::Header]) -> Result<String, Refusal> {
    let key = header(headers, "sec-websocket-key")
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(("400 Bad Request", "missing Sec-WebSocket-Key".to_string()))?;
    // RFC 6455 §4.2.1: a base64-encoded 16-byte nonce.
    let nonce = base64::engine::general_purpose::STANDARD.decode(key);
    if !nonce.is_ok_and(|n| n.len() == 16) {
        return Err((
            "400 Bad Request",
            "Sec-WebSocket-Key must be 16 bytes in base64".into(),
        ));
    }
    Ok(key.to_string())
}

/// The token: from `Authorization: Bearer` (401 for another scheme), else the query's
/// `token`.
fn token(headers: &[httparse::Header], query: &str) -> Result<Option<String>, Refusal> {
    let bearer = match header(headers, "authorization") {
        None => None,
        Some(v) => match crate::auth::bearer_token(v) {
            Some(t) => Some(t.to_string()),
            None => {
                return Err((
                    "401 Unauthorized",
                    "the Authorization header must be `Bearer <token>`".into(),
                ))
            }
        },
    };
    Ok(bearer.or_else(|| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(percent_decode)
    }))
}

/// The NervesHub shared-secret headers (`x-nh-*`), when the request has any.
fn nerves_headers(headers: &[httparse::Header]) -> Option<crate::nerves_auth::Headers> {
    let nh = |name: &str| header(headers, name).map(str::to_string);
    match (
        nh("x-nh-alg"),
        nh("x-nh-key"),
        nh("x-nh-time"),
        nh("x-nh-signature"),
    ) {
        (None, None, None, None) => None,
        (alg, key, time, signature) => Some(crate::nerves_auth::Headers {
            alg: alg.unwrap_or_default(),
            key: key.unwrap_or_default(),
            time: time.unwrap_or_default(),
            signature: signature.unwrap_or_default(),
        }),
    }
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The 101 answer to an upgrade request with this `Sec-WebSocket-Key`, accepting
/// permessage-deflate when `deflate` (the window bits the offer allows the router).
pub fn switching_protocols(key: &str, deflate: Option<u8>) -> String {
    let ext = match deflate {
        Some(bits) => format!(
            "sec-websocket-extensions: {}\r\n",
            ws::deflate_response(bits)
        ),
        None => String::new(),
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n{ext}\r\n",
        ws::accept_key(key.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(lines: &[&str]) -> Vec<u8> {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n\r\n");
        s.into_bytes()
    }

    #[test]
    fn upgrade_parsing() {
        let base = [
            "GET /ws?x=1&token=a%2Eb.c HTTP/1.1",
            "Host: x",
            "Upgrade: websocket",
            "Connection: keep-alive, Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ];
        let up = parse_upgrade(&req(&base), false).unwrap().unwrap();
        assert_eq!(up.token.as_deref(), Some("a.b.c"));
        assert_eq!(up.protocol, Protocol::Hive);
        let mut with_header = base.to_vec();
        with_header[0] = "GET /ws HTTP/1.1";
        with_header.push("Authorization: Bearer tok");
        assert_eq!(
            parse_upgrade(&req(&with_header), false)
                .unwrap()
                .unwrap()
                .token
                .as_deref(),
            Some("tok")
        );
        assert!(parse_upgrade(b"GET /ws HTTP/1.1\r\nHost: x\r\n", false)
            .unwrap()
            .is_none());
        let mut wrong_path = base.to_vec();
        wrong_path[0] = "GET /nope HTTP/1.1";
        assert_eq!(
            parse_upgrade(&req(&wrong_path), false).err().unwrap().0,
            "404 Not Found"
        );
        let no_upgrade = &base[..2];
        assert_eq!(
            parse_upgrade(&req(no_upgrade), false).err().unwrap().0,
            "426 Upgrade Required"
        );
        assert_eq!(
            parse_upgrade(b"\x00\x01junk\r\n\r\n", false)
                .err()
                .unwrap()
                .0,
            "400 Bad Request"
        );
        // RFC 6455 refusals: no key, a key that is not a base64 16-byte nonce, HTTP/1.0.
        for (i, line) in [
            (5, ""),
            (5, "Sec-WebSocket-Key: abc"),
            (0, "GET /ws HTTP/1.0"),
        ] {
            let mut r = base.to_vec();
            r[i] = line;
            let r: Vec<&str> = r.into_iter().filter(|l| !l.is_empty()).collect();
            assert_eq!(
                parse_upgrade(&req(&r), false).err().unwrap().0,
                "400 Bad Request",
                "{line:?}"
            );
        }
        // The Bearer scheme in any case, spaces or a tab; another scheme is refused.
        for auth in ["BEARER tok", "bearer\ttok", "Bearer   tok ", "bEaReR tok"] {
            let mut r = base.to_vec();
            r[0] = "GET /ws HTTP/1.1";
            let line = format!("Authorization: {auth}");
            r.push(&line);
            let up = parse_upgrade(&req(&r), false).unwrap().unwrap();
            assert_eq!(up.token.as_deref(), Some("tok"), "{auth:?}");
        }
        // The conformance echo exists only with its flag.
        let mut r = base.to_vec();
        r[0] = "GET /conformance/echo?token=t HTTP/1.1";
        assert_eq!(
            parse_upgrade(&req(&r), false).err().unwrap().0,
            "404 Not Found"
        );
        let up = parse_upgrade(&req(&r), true).unwrap().unwrap();
        assert_eq!(up.protocol, Protocol::ConformanceEcho);
        assert_eq!(up.token.as_deref(), Some("t"));
        let mut r = base.to_vec();
        r.push("Authorization: Basic dXNlcjpwdw==");
        assert_eq!(
            parse_upgrade(&req(&r), false).err().unwrap().0,
            "401 Unauthorized"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb"), "a.b");
        assert_eq!(percent_decode("abc%"), "abc%");
        assert_eq!(percent_decode("abc%4"), "abc%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%é%"), "%é%");
    }
}
