//! RFC 6455 framing, server side, as pure functions over byte slices: no I/O, no
//! buffers of its own. The shard owns the bytes; this module only reads headers,
//! unmasks in place and writes headers. Keeping it here (rather than in tungstenite)
//! is what lets an idle connection hold no buffer at all.

use base64::Engine;
use sha1::{Digest, Sha1};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Control frames carry at most 125 bytes (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate; first frame only).
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// A WebSocket close code: every code the router sends or counts by name, and
/// `Other` for a code a device sent (echoed in the answer to its close frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: normal closure (the answer to a device's close without a code).
    Normal,
    /// 1001: going away (ping timeout, drain).
    GoingAway,
    /// 1002: a protocol error in the device's frames.
    ProtocolError,
    /// 1007: data that is not what its frame says (text that is not UTF-8, a
    /// compressed message that is not deflate).
    InvalidData,
    /// 1008: a policy the device broke (rate limit, outbound limit).
    PolicyViolation,
    /// 1009: a message over --max-frame.
    TooBig,
    /// 1011: an internal error.
    InternalError,
    /// 1013: try again later (the owning shard is overloaded).
    TryAgainLater,
    /// 4400: frames the device's protocol does not allow.
    BadFrames,
    /// 4401: authentication failed.
    Unauthorized,
    /// 4403: disconnected by the operator (`/disconnect`, a deny-list entry).
    Disconnected,
    /// 4429: the device's account is at its limit of connected devices.
    AccountLimit,
    /// 4408: not authenticated within --auth-timeout.
    AuthTimeout,
    /// 4409: replaced by a newer connection of the same device.
    Replaced,
    /// Any other code (a device's own, echoed).
    Other(u16),
}

impl CloseCode {
    /// The codes counted under their own label in `router_closes_total`, in order.
    pub const NAMED: [CloseCode; 14] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidData,
        CloseCode::PolicyViolation,
        CloseCode::TooBig,
        CloseCode::InternalError,
        CloseCode::TryAgainLater,
        CloseCode::BadFrames,
        CloseCode::Unauthorized,
        CloseCode::AuthTimeout,
        CloseCode::Replaced,
        CloseCode::Disconnected,
        CloseCode::AccountLimit,
    ];

    pub const fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidData => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::BadFrames => 4400,
            CloseCode::Unauthorized => 4401,
            CloseCode::AuthTimeout => 4408,
            CloseCode::Replaced => 4409,
            CloseCode::Disconnected => 4403,
            CloseCode::AccountLimit => 4429,
            CloseCode::Other(code) => code,
        }
    }

    /// The named code for `code`, or `Other(code)`.
    pub const fn from_u16(code: u16) -> CloseCode {
        match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1007 => CloseCode::InvalidData,
            1008 => CloseCode::PolicyViolation,
            1009 => CloseCode::TooBig,
            1011 => CloseCode::InternalError,
            1013 => CloseCode::TryAgainLater,
            4400 => CloseCode::BadFrames,
            4401 => CloseCode::Unauthorized,
            4408 => CloseCode::AuthTimeout,
            4409 => CloseCode::Replaced,
            4403 => CloseCode::Disconnected,
            4429 => CloseCode::AccountLimit,
            code => CloseCode::Other(code),
        }
    }

    /// Index in [`CloseCode::NAMED`]; None for a code counted as "other" (including an
    /// `Other` that holds a named code's number).
    pub const fn named_index(self) -> Option<usize> {
        Some(match CloseCode::from_u16(self.as_u16()) {
            CloseCode::Normal => 0,
            CloseCode::GoingAway => 1,
            CloseCode::ProtocolError => 2,
            CloseCode::InvalidData => 3,
            CloseCode::PolicyViolation => 4,
            CloseCode::TooBig => 5,
            CloseCode::InternalError => 6,
            CloseCode::TryAgainLater => 7,
            CloseCode::BadFrames => 8,
            CloseCode::Unauthorized => 9,
            CloseCode::AuthTimeout => 10,
            CloseCode::Replaced => 11,
            CloseCode::Disconnected => 12,
            CloseCode::AccountLimit => 13,
            CloseCode::Other(_) => return None,
        })
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_u16().fmt(f)
    }
}

/// Why the router fails a connection at the WebSocket layer; each maps to the close
/// code the peer receives ([`WsError::close_code`]) and says why in the close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("reserved bits set")]
    Reserved,
    #[error("unknown opcode")]
    Opcode,
    #[error("client frames must be masked")]
    Unmasked,
    #[error("bad control frame")]
    Control,
    #[error("message too big")]
    TooBig,
    #[error("message in too many fragments")]
    TooManyFragments,
    #[error("text frame is not valid UTF-8")]
    Utf8,
    #[error("continuation frame without a message")]
    OrphanContinuation,
    #[error("new message inside a fragmented one")]
    NestedMessage,
    #[error("compressed message is not valid deflate data")]
    Deflate,
    #[error("a close payload of one byte")]
    CloseTooShort,
    #[error("a close code a peer may not send")]
    CloseCodeForbidden,
    #[error("a close reason that is not UTF-8")]
    CloseReasonUtf8,
}

impl WsError {
    pub fn close_code(self) -> CloseCode {
        match self {
            WsError::TooBig | WsError::TooManyFragments => CloseCode::TooBig,
            WsError::Utf8 | WsError::Deflate | WsError::CloseReasonUtf8 => CloseCode::InvalidData,
            WsError::Reserved
            | WsError::Opcode
            | WsError::Unmasked
            | WsError::Control
            | WsError::OrphanContinuation
            | WsError::NestedMessage
            | WsError::CloseTooShort
            | WsError::CloseCodeForbidden => CloseCode::ProtocolError,
        }
    }
}

/// Read one frame header from `buf`. `Ok(None)`: not enough bytes yet.
/// `max_payload` bounds data frames; larger ones fail before any payload is buffered.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<FrameHeader>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    // RSV1 is permessage-deflate's "compressed" bit: reported, and refused by the
    // connection unless it negotiated the extension. RSV2 and RSV3 mean nothing here.
    let rsv1 = b0 & 0x70 != 0;
    if rsv1 && (b0 & 0x30 != 0 || b0 & 0x08 != 0) {
        // RSV2/RSV3, or RSV1 on a control frame.
        return Err(WsError::Reserved);
    }
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::Opcode);
    }
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let len7 = u64::from(b1 & 0x7F);
    let (len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n, 2),
    };
    if opcode & 0x8 != 0 && (!fin || len > MAX_CONTROL) {
        return Err(WsError::Control);
    }
    if len > max_payload as u64 {
        return Err(WsError::TooBig);
    }
    if buf.len() < pos + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[pos..pos + 4]);
    pos += 4;
    Ok(Some(FrameHeader {
        fin,
        rsv1,
        opcode,
        mask,
        header_len: pos,
        payload_len: len as usize,
    }))
}

/// Unmask a payload in place. Works a word at a time; the mask is applied from offset 0.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let m32 = u32::from_ne_bytes(mask);
    let m64 = u64::from(m32) | (u64::from(m32) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Write an unmasked server frame header for a payload of `len` bytes; returns its length.
pub fn write_header(opcode: u8, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// permessage-deflate (RFC 7692) without context takeover either way: each message is
/// compressed on its own, so a connection keeps no compressor state between messages
/// (an idle connection costs nothing more). Messages shorter than this go out as they
/// are (RSV1 clear): compressing them saves nothing.
pub const DEFLATE_MIN: usize = 64;

/// The `Sec-WebSocket-Extensions` answer the router gives when it accepts an offer.
pub const DEFLATE_RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// What permessage-deflate a connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// None: a frame with RSV1 fails the connection.
    Off,
    /// Both ways: the device's compressed messages are inflated, the router's own of
    /// [`DEFLATE_MIN`] bytes and more go out compressed.
    On,
    /// The device limited the router's window below 32 KiB (`server_max_window_bits`
    /// under 15): its compressed messages are inflated, the router's go out as they are
    /// (RFC 7692 §6: any message may), since it compresses with a 32 KiB window.
    Inbound,
}

impl Deflate {
    /// For an accepted offer allowing the router a window of 2^`bits` bytes.
    pub fn for_window(bits: u8) -> Deflate {
        if bits >= 15 {
            Deflate::On
        } else {
            Deflate::Inbound
        }
    }
    /// Compressed messages from the device are accepted.
    pub fn receives(self) -> bool {
        self != Deflate::Off
    }
    /// The router compresses what it sends.
    pub fn compresses(self) -> bool {
        self == Deflate::On
    }
}

/// The first offer of permessage-deflate in this `Sec-WebSocket-Extensions` value that
/// the router can accept: Some(the window bits it allows the router: its
/// `server_max_window_bits`, 8 to 15, or 15 without one).
pub fn deflate_offer(header: &str) -> Option<u8> {
    header.split(',').find_map(|offer| {
        let mut params = offer.split(';').map(str::trim);
        if params.next() != Some("permessage-deflate") {
            return None;
        }
        let mut server_bits = 15;
        for p in params {
            let (name, value) = p.split_once('=').unwrap_or((p, ""));
            let value = value.trim_matches('"');
            let bits = || value.parse::<u8>().ok().filter(|b| (8..=15).contains(b));
            match name.trim() {
                "server_no_context_takeover" | "client_no_context_takeover" if value.is_empty() => {
                }
                "client_max_window_bits" if value.is_empty() || bits().is_some() => {}
                "server_max_window_bits" => server_bits = bits()?,
                _ => return None,
            }
        }
        Some(server_bits)
    })
}

/// Does this `Sec-WebSocket-Extensions` value offer permessage-deflate in a form the
/// router can accept?
pub fn deflate_offered(header: &str) -> bool {
    deflate_offer(header).is_some()
}

/// The `Sec-WebSocket-Extensions` answer to an accepted offer allowing the router
/// 2^`server_bits` bytes of window: [`DEFLATE_RESPONSE`], and the offer's
/// `server_max_window_bits` when below 15 (RFC 7692 §7.1.2.1: it must be answered).
pub fn deflate_response(server_bits: u8) -> std::borrow::Cow<'static, str> {
    if server_bits >= 15 {
        DEFLATE_RESPONSE.into()
    } else {
        format!("{DEFLATE_RESPONSE}; server_max_window_bits={server_bits}").into()
    }
}

/// A message compressed for a frame with RSV1 (the trailing `00 00 ff ff` removed).
/// One compressor per thread, reset for each message (a new one per message spent
/// three quarters of its time zeroing its tables).
pub fn deflate(payload: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression};
    thread_local! {
        static COMPRESS: std::cell::RefCell<Compress> =
            std::cell::RefCell::new(Compress::new(Compression::fast(), false));
    }
    COMPRESS.with_borrow_mut(|c| {
        c.reset();
        // Room for deflate's worst case (stored blocks: 5 bytes per 16 KiB and the
        // flush), so that one call finishes the message.
        deflate_with(c, payload, payload.len() + payload.len() / 1024 + 64)
    })
}

fn deflate_with(c: &mut flate2::Compress, payload: &[u8], capacity: usize) -> Vec<u8> {
    use flate2::FlushCompress;
    let mut out = Vec::with_capacity(capacity);
    // A sync flush ends with the empty stored block `00 00 ff ff`, which the
    // receiver puts back. Only that says the message is all out: when the output
    // fills, miniz_oxide keeps what did not fit, and the next call may give out only
    // that, with room to spare and every byte of input taken, but the rest of the
    // message still to come.
    loop {
        let before = c.total_in() as usize;
        let _ = c.compress_vec(&payload[before..], &mut out, FlushCompress::Sync);
        if c.total_in() as usize == payload.len()
            && out.len() < out.capacity()
            && out.ends_with(&[0, 0, 0xff, 0xff])
        {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out
}

/// A compressed message's payload, at most `max` bytes once inflated. Err: not
/// deflate data (1007), or larger than `max` (1009).
pub fn inflate(payload: &[u8], max: usize) -> Result<Vec<u8>, WsError> {
    use flate2::Decompress;
    thread_local! {
        static DECOMPRESS: std::cell::RefCell<Decompress> =
            std::cell::RefCell::new(Decompress::new(false));
    }
    DECOMPRESS.with_borrow_mut(|d| {
        d.reset(false);
        inflate_with(d, payload, max)
    })
}

fn inflate_with(
    d: &mut flate2::Decompress,
    payload: &[u8],
    max: usize,
) -> Result<Vec<u8>, WsError> {
    use flate2::{FlushDecompress, Status};
    let mut input = Vec::with_capacity(payload.len() + 4);
    input.extend_from_slice(payload);
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity((payload.len() * 4).clamp(64, max.max(64)));
    loop {
        let (consumed, produced) = (d.total_in() as usize, out.len());
        let status = d
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .map_err(|_| WsError::Deflate)?;
        if out.len() > max {
            return Err(WsError::TooBig);
        }
        let done = d.total_in() as usize == input.len();
        // All input taken and room left over: everything it holds is out.
        if (done && out.len() < out.capacity()) || status == Status::StreamEnd {
            return Ok(out);
        }
        if out.len() == produced && d.total_in() as usize == consumed && out.len() < out.capacity()
        {
            // Neither input taken nor output given with room to spare: cut short, or
            // not deflate data.
            return Err(WsError::Deflate);
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity().min(max + 1 - out.len()).max(64));
        }
    }
}

/// Append a whole server frame to `out`.
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut h = [0u8; 10];
    let n = write_header(opcode, payload.len(), &mut h);
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

/// A close frame's payload: the code, then a reason cut to fit 125 bytes.
pub fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len().min(123));
    p.extend_from_slice(&code.as_u16().to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    p
}

/// What a device's close frame says (RFC 6455 §5.5.1, §7.4): `Ok(None)` no status
/// code, `Ok(Some(code))` a code a peer may send, or why the connection fails: a 1-byte
/// payload or a code no endpoint may send (below 1000, 1004-1006, 1015, 1016-2999, 5000
/// and up) is a protocol error (1002); a reason that is not UTF-8 is 1007.
pub fn check_close(payload: &[u8]) -> Result<Option<CloseCode>, WsError> {
    match payload.len() {
        0 => return Ok(None),
        1 => return Err(WsError::CloseTooShort),
        _ => {}
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !allowed {
        return Err(WsError::CloseCodeForbidden);
    }
    if simdutf8::basic::from_utf8(&payload[2..]).is_err() {
        return Err(WsError::CloseReasonUtf8);
    }
    Ok(Some(CloseCode::from_u16(code)))
}

/// How far the start of a text message (more of it to come) is known to be UTF-8:
/// `Ok(n)` when `bytes[..n]` is valid and what follows is the start of a sequence that
/// more bytes may still complete (at most 3 bytes); `Err(Utf8)` as soon as no
/// continuation can make it valid (RFC 6455 §8.1: fail the connection then, not when
/// the message is whole).
pub fn utf8_prefix(bytes: &[u8]) -> Result<usize, WsError> {
    match simdutf8::compat::from_utf8(bytes) {
        Ok(_) => Ok(bytes.len()),
        Err(e) if e.error_len().is_none() => Ok(e.valid_up_to()),
        Err(_) => Err(WsError::Utf8),
    }
}

/// The Sec-WebSocket-Accept value for a client key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 65535 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn parses_and_unmasks_all_length_forms() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let f = client_frame(true, OP_BINARY, &payload);
            // Every strict prefix is incomplete, never an error.
            for cut in [0, 1, 2, 3, 5, 9, 13] {
                if cut < f.len() && cut < f.len() - len {
                    assert_eq!(
                        parse_header(&f[..cut], 1 << 20),
                        Ok(None),
                        "len {len} cut {cut}"
                    );
                }
            }
            let h = parse_header(&f, 1 << 20).unwrap().unwrap();
            assert_eq!(h.payload_len, len);
            assert_eq!(h.total_len(), f.len());
            let mut p = f[h.header_len..].to_vec();
            unmask(&mut p, h.mask);
            assert_eq!(p, payload);
        }
    }

    #[test]
    fn rejects_what_rfc6455_forbids() {
        let ok = client_frame(true, OP_TEXT, b"hi");
        let mut rsv = ok.clone();
        rsv[0] |= 0x20;
        assert_eq!(parse_header(&rsv, 100), Err(WsError::Reserved));
        let mut rsv1 = ok.clone();
        rsv1[0] |= 0x40;
        assert!(parse_header(&rsv1, 100).unwrap().unwrap().rsv1);
        let mut op = ok.clone();
        op[0] = 0x83;
        assert_eq!(parse_header(&op, 100), Err(WsError::Opcode));
        let mut unmasked = ok.clone();
        unmasked[1] &= 0x7F;
        assert_eq!(parse_header(&unmasked, 100), Err(WsError::Unmasked));
        let frag_ping = client_frame(false, OP_PING, b"x");
        assert_eq!(parse_header(&frag_ping, 100), Err(WsError::Control));
        let big_ping = client_frame(true, OP_PING, &[0u8; 126]);
        assert_eq!(parse_header(&big_ping, 1000), Err(WsError::Control));
        let big = client_frame(true, OP_TEXT, &[b'a'; 101]);
        assert_eq!(parse_header(&big, 100), Err(WsError::TooBig));
        assert_eq!(WsError::TooBig.close_code(), CloseCode::TooBig);
        // A 2^63 length header is refused without reading further.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&huge, 100), Err(WsError::TooBig));
    }

    #[test]
    fn a_text_message_in_fragments_fails_at_the_first_invalid_fragment() {
        // Autobahn 6.4.1 and 6.4.2: valid, then a fragment no continuation can save.
        let part1 = "κόσμε".as_bytes();
        assert_eq!(utf8_prefix(part1), Ok(part1.len()));
        for part2 in [&b"\xf4\x90\x80\x80"[..], b"\xf4\x90"] {
            let so_far = [part1, part2].concat();
            assert_eq!(utf8_prefix(&so_far), Err(WsError::Utf8), "{part2:?}");
            assert_eq!(WsError::Utf8.close_code(), CloseCode::InvalidData);
        }
        // A sequence cut between fragments waits for its rest.
        assert_eq!(utf8_prefix(b"ab\xe2\x82"), Ok(2));
        assert_eq!(utf8_prefix(b"\xe2\x82\xac"), Ok(3));
        assert_eq!(utf8_prefix(b"ab\xe2\x28"), Err(WsError::Utf8));
        assert_eq!(utf8_prefix(b""), Ok(0));
    }

    proptest::proptest! {
        /// Any valid text cut anywhere, checked from where the last check stopped (as the
        /// connection does fragment by fragment), is never refused and ends fully checked;
        /// any text with a byte that is never UTF-8 is refused at the latest once it
        /// arrives.
        #[test]
        fn utf8_checked_fragment_by_fragment(
            text in ".{0,40}",
            cuts in proptest::collection::vec(0usize..200, 0..6),
            bad_at in 0usize..200,
        ) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut checked = 0;
            for end in &cuts {
                checked += utf8_prefix(&bytes[checked..*end]).unwrap();
                proptest::prop_assert!(*end - checked <= 3);
            }
            proptest::prop_assert_eq!(checked, bytes.len());
            let mut bad = bytes.to_vec();
            let at = bad_at % (bad.len() + 1);
            bad.insert(at, 0xff);
            let mut checked = 0;
            let mut refused = false;
            for end in cuts.iter().map(|c| if *c >= at { c + 1 } else { *c }).chain([bad.len()]) {
                match utf8_prefix(&bad[checked..end]) {
                    Ok(n) => checked += n,
                    Err(_) => {
                        refused = true;
                        proptest::prop_assert!(end > at);
                        break;
                    }
                }
            }
            proptest::prop_assert!(refused);
        }
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn close_frames_are_checked() {
        assert_eq!(check_close(b""), Ok(None));
        assert_eq!(check_close(&[3]), Err(WsError::CloseTooShort));
        assert_eq!(
            WsError::CloseTooShort.to_string(),
            "a close payload of one byte"
        );
        for ok in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4409, 4999] {
            let code = check_close(&ok.to_be_bytes()).unwrap().unwrap();
            assert_eq!(code.as_u16(), ok, "{ok}");
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let e = check_close(&bad.to_be_bytes()).unwrap_err();
            assert_eq!(e.close_code(), CloseCode::ProtocolError, "{bad}");
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye \xff");
        assert_eq!(
            check_close(&p).unwrap_err().close_code(),
            CloseCode::InvalidData
        );
        p.truncate(6);
        assert_eq!(check_close(&p), Ok(Some(CloseCode::Normal)));
    }

    #[test]
    fn close_codes_round_trip() {
        for (i, c) in CloseCode::NAMED.iter().enumerate() {
            assert_eq!(CloseCode::from_u16(c.as_u16()), *c);
            assert_eq!(c.named_index(), Some(i));
        }
        assert_eq!(CloseCode::from_u16(3000), CloseCode::Other(3000));
        assert_eq!(CloseCode::Other(3000).named_index(), None);
        // A named code's number in `Other` is still that code.
        assert_eq!(CloseCode::Other(1000).named_index(), Some(0));
        assert_eq!(CloseCode::Other(4409).as_u16(), 4409);
    }

    #[test]
    fn close_payload_is_bounded() {
        let p = close_payload(CloseCode::Unauthorized, &"é".repeat(200));
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(&p[..2], &4401u16.to_be_bytes());
    }

    #[test]
    fn deflate_round_trip_bounds_and_offers() {
        let msg =
            br#"["1",null,"device","status_update",{"status":"ok","status2":"ok","status3":"ok"}]"#
                .repeat(20);
        let z = deflate(&msg);
        assert!(z.len() < msg.len() / 4, "{} of {}", z.len(), msg.len());
        assert_eq!(inflate(&z, msg.len()).unwrap(), msg);
        // One byte over the limit once inflated; and a bomb far over it stops early.
        assert_eq!(inflate(&z, msg.len() - 1), Err(WsError::TooBig));
        let bomb = deflate(&vec![0u8; 10 << 20]);
        assert_eq!(inflate(&bomb, 64 * 1024), Err(WsError::TooBig));
        assert_eq!(
            inflate(b"\xff\xfe\xfd not deflate", 1024),
            Err(WsError::Deflate)
        );
        assert_eq!(inflate(&deflate(b""), 10).unwrap(), b"");
        // Offers: bare (Mint, NervesHub's client), Python websockets', browsers'.
        assert!(deflate_offered("permessage-deflate"));
        assert!(deflate_offered(
            "permessage-deflate; client_max_window_bits"
        ));
        assert!(deflate_offered("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=15; server_no_context_takeover"));
        // A window below 15 bits for the router: accepted, answered with it, and the
        // router's messages go out uncompressed (Autobahn 13.3, 13.5).
        assert_eq!(
            deflate_offer("permessage-deflate; server_max_window_bits=10"),
            Some(10)
        );
        assert_eq!(
            deflate_offer("permessage-deflate; client_max_window_bits, permessage-deflate"),
            Some(15)
        );
        assert_eq!(Deflate::for_window(10), Deflate::Inbound);
        assert!(Deflate::Inbound.receives() && !Deflate::Inbound.compresses());
        assert!(Deflate::On.receives() && Deflate::On.compresses());
        assert!(!Deflate::Off.receives());
        assert_eq!(
            deflate_response(9),
            format!("{DEFLATE_RESPONSE}; server_max_window_bits=9")
        );
        assert_eq!(deflate_response(15), DEFLATE_RESPONSE);
        for bad in [
            "server_max_window_bits=7",
            "server_max_window_bits=16",
            "server_max_window_bits",
        ] {
            assert!(
                !deflate_offered(&format!("permessage-deflate; {bad}")),
                "{bad}"
            );
        }
        assert!(!deflate_offered("permessage-deflate; unknown_param"));
        assert!(!deflate_offered("x-webkit-deflate-frame"));
    }

    /// An independent inflater (one call, room for everything) for what `deflate` wrote.
    fn inflate_independently(z: &[u8], len: usize) -> Vec<u8> {
        let mut d = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(len + 1024);
        let input = [z, &[0, 0, 0xff, 0xff]].concat();
        d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        assert_eq!(d.total_in() as usize, input.len());
        out
    }

    /// Data that compresses to between nine tenths and all of its size (an image, a
    /// PDF), as the Autobahn TestSuite's 12.x cases send: the compressor's output
    /// filled the first buffer and a second call gave only what it had kept, without
    /// finishing the flush, so the message went out cut short (a 65,536-byte message
    /// inflated to 61,552).
    #[test]
    fn poorly_compressible_messages_deflate_whole() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut noisy = Vec::with_capacity(1 << 18);
        // An image's rows: each byte near the one before (a random walk), and now and
        // then a few bytes as they were some way back (what LZ77 finds).
        let mut pixel = 128u8;
        while noisy.len() < 1 << 18 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(8) && noisy.len() > 1024 {
                let from = noisy.len() - 1 - (x >> 40) as usize % 1000;
                for i in 0..3 + (x >> 20) as usize % 12 {
                    noisy.push(noisy[from + i]);
                }
            } else {
                pixel = pixel.wrapping_add((x % 61) as u8).wrapping_sub(30);
                noisy.push(pixel);
            }
        }
        for len in [
            1000,
            4096,
            16_384,
            32_768,
            65_536,
            100_000,
            131_072,
            1 << 18,
        ] {
            for start in (0..(1 << 18) - len + 1).step_by(997).take(100) {
                let msg = &noisy[start..start + len];
                let z = deflate(msg);
                assert!(z.len() > len * 6 / 10, "{} of {len}", z.len());
                assert_eq!(inflate_independently(&z, len), msg, "len {len} at {start}");
                assert_eq!(inflate(&z, len).unwrap(), msg, "len {len} at {start}");
            }
        }
        // What the suite's 12.2.9 sent (its test image wrapped around: noise after a
        // run that compresses to nearly nothing): all of it taken in before the output
        // filled, in the middle of a block.
        for zeros in [4000, 5000, 6000, 7000] {
            let mut zeros_then_noise = vec![0u8; zeros];
            while zeros_then_noise.len() < 65_536 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                zeros_then_noise.push(x as u8);
            }
            let z = deflate(&zeros_then_noise);
            let back = inflate_independently(&z, 65_536);
            assert!(back == zeros_then_noise, "{zeros}: {} of 65536", back.len());
        }
        // Whatever room the output starts with: the flush is finished before the
        // message is taken as compressed.
        let text = br#"{"type":"event","event":"status","data":{"ok":true}}"#.repeat(500);
        for msg in [&noisy[..65_536], &noisy[..1000], &text[..]] {
            for room in [1, 64, 1000, msg.len() / 2 + 64, msg.len() + 1000] {
                let mut c = flate2::Compress::new(flate2::Compression::fast(), false);
                let z = deflate_with(&mut c, msg, room);
                let back = inflate_independently(&z, msg.len());
                assert!(
                    back == msg,
                    "{} of {} with room {room}",
                    back.len(),
                    msg.len()
                );
            }
        }
    }

    #[test]
    fn highly_compressible_messages_inflate_whole() {
        // Output many times the input (a 100 KB run): inflated in steps, not refused.
        let msg = [
            b"[\"1\",\"9\",\"device\",\"x\",{\"pad\":\"".as_slice(),
            &[b'y'; 100_000],
            b"\"}]",
        ]
        .concat();
        let z = deflate(&msg);
        assert!(z.len() < 1000);
        assert_eq!(inflate(&z, 1 << 20).unwrap(), msg);
        assert_eq!(inflate(&z, 64 * 1024), Err(WsError::TooBig));
    }
}
