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

/// A framing error, each mapped to the close code the peer receives.
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
    #[error("text frame is not valid UTF-8")]
    Utf8,
    #[error("continuation without a message, or a new message inside a fragmented one")]
    Fragment,
}

impl WsError {
    pub fn close_code(self) -> u16 {
        match self {
            WsError::TooBig => 1009,
            WsError::Utf8 => 1007,
            _ => 1002,
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
    if b0 & 0x70 != 0 {
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

/// Append a whole server frame to `out`.
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut h = [0u8; 10];
    let n = write_header(opcode, payload.len(), &mut h);
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

/// A close frame's payload: the code, then a reason cut to fit 125 bytes.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len().min(123));
    p.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    p
}

/// What a device's close frame says (RFC 6455 §5.5.1, §7.4): `Ok(None)` no status
/// code, `Ok(Some(code))` a code a peer may send, or the close code and reason to fail
/// the connection with: a 1-byte payload or a code no endpoint may send (below 1000,
/// 1004-1006, 1015, 1016-2999, 5000 and up) is a protocol error (1002); a reason that
/// is not UTF-8 is 1007.
pub fn check_close(payload: &[u8]) -> Result<Option<u16>, (u16, &'static str)> {
    match payload.len() {
        0 => return Ok(None),
        1 => return Err((1002, "a close payload of one byte")),
        _ => {}
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !allowed {
        return Err((1002, "a close code a peer may not send"));
    }
    if simdutf8::basic::from_utf8(&payload[2..]).is_err() {
        return Err((1007, "a close reason that is not UTF-8"));
    }
    Ok(Some(code))
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
        rsv[0] |= 0x40;
        assert_eq!(parse_header(&rsv, 100), Err(WsError::Reserved));
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
        assert_eq!(WsError::TooBig.close_code(), 1009);
        // A 2^63 length header is refused without reading further.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&huge, 100), Err(WsError::TooBig));
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
        assert_eq!(
            check_close(&[3]),
            Err((1002, "a close payload of one byte"))
        );
        for ok in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4409, 4999] {
            assert_eq!(check_close(&ok.to_be_bytes()), Ok(Some(ok)), "{ok}");
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(
                check_close(&bad.to_be_bytes()).unwrap_err().0,
                1002,
                "{bad}"
            );
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye \xff");
        assert_eq!(check_close(&p).unwrap_err().0, 1007);
        p.truncate(6);
        assert_eq!(check_close(&p), Ok(Some(1000)));
    }

    #[test]
    fn close_payload_is_bounded() {
        let p = close_payload(4401, &"é".repeat(200));
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(&p[..2], &4401u16.to_be_bytes());
    }
}
