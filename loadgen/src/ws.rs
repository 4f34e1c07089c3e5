//! The simulated devices' WebSocket client (RFC 6455, client side, no extensions), also
//! what `loadgen autobahn-client` runs against the Autobahn TestSuite.
//!
//! Written for a load generator that holds 15,000 devices per process: a connected device
//! owns its socket and nothing else. Reads go into one scratch buffer per worker thread;
//! only a frame cut in two by the network is kept per device, until its rest arrives. The
//! upgrade request and its answer are one write and (usually) one read; the router's first
//! frame often comes in the same read and is kept for `recv`.
//!
//! tokio-tungstenite, used before, holds a fixed 4 KiB read chunk plus its read and write
//! buffers per connection (~10 KiB per device measured) and its kernel and user work per
//! connect was twice the router's; see the README's connects/s figures.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Largest frame a device accepts (the router's requests and events are a few hundred
/// bytes; its own limit for device frames is far below this).
pub const MAX_FRAME: usize = 16 << 20;

/// Scratch read size per worker thread.
const SCRATCH: usize = 64 << 10;

/// Largest upgrade answer read before giving up.
const MAX_RESPONSE_HEAD: usize = 8 << 10;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
    static MASK_STATE: Cell<u64> = Cell::new(rand::thread_rng().next_u64() | 1);
}

/// A frame from the server, as the device loop needs it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// A binary message (no device protocol of loadgen's uses them: devices ignore it).
    Binary(Vec<u8>),
    /// The close code (1005: none given); the frame was checked (RFC 6455 §7.4).
    Close(u16),
}

/// Why a connection ended or could not start; the strings are loadgen's error kinds.
#[derive(Debug, PartialEq, Eq)]
pub enum WsError {
    /// The upgrade was answered with this HTTP status instead of 101.
    Http(u16),
    /// The upgrade answer was not a valid 101 for our key.
    Upgrade,
    /// The server broke the framing rules (masked frame, reserved bits or opcode, a
    /// control frame fragmented or over 125 bytes, bad fragmentation, a malformed close
    /// frame): the client fails the connection with 1002.
    Protocol,
    /// A text message (or close reason) that is not UTF-8: 1007.
    Invalid,
    /// A message over [`MAX_FRAME`]: 1009.
    TooBig,
    /// Reset or closed without a close frame.
    Lost,
}

impl WsError {
    pub fn kind(&self) -> String {
        match self {
            WsError::Http(s) => format!("http_{s}"),
            WsError::Upgrade => "upgrade_error".into(),
            WsError::Protocol | WsError::Invalid | WsError::TooBig => "protocol_error".into(),
            WsError::Lost => "connection_lost".into(),
        }
    }

    /// The close code a client fails the connection with for this error (None: there is
    /// no connection left to close).
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol => Some(1002),
            WsError::Invalid => Some(1007),
            WsError::TooBig => Some(1009),
            WsError::Http(_) | WsError::Upgrade | WsError::Lost => None,
        }
    }
}

pub struct Ws {
    tcp: TcpStream,
    frames: Frames,
}

/// What has been read but not yet handed out, and what is owed back.
#[derive(Default)]
struct Frames {
    /// Bytes of a frame not yet complete (empty, and unallocated, almost always).
    partial: Vec<u8>,
    /// A fragmented message being put together (true: text).
    fragments: Option<(bool, Vec<u8>)>,
    /// Frames parsed but not yet handed out.
    ready: std::collections::VecDeque<Incoming>,
    /// Control answers (pongs) owed to the server, written by the next `flush_control`.
    control: Vec<u8>,
    /// The server broke the rules here: reported once the messages before it are out.
    failed: Option<WsError>,
    /// The server's close frame came: nothing after it is read or answered.
    closed: bool,
}

/// Open a WebSocket over `tcp`: `host` for the Host header, `target` the path and query,
/// `auth` an Authorization header value when the protocol carries the token there.
pub async fn handshake(
    mut tcp: TcpStream,
    host: &str,
    target: &str,
    auth: Option<&str>,
) -> Result<Ws, WsError> {
    let mut key_bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut key_bytes);
    let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let mut req = String::with_capacity(256 + auth.map_or(0, str::len));
    req.push_str("GET ");
    req.push_str(target);
    req.push_str(" HTTP/1.1\r\nHost: ");
    req.push_str(host);
    req.push_str("\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ");
    req.push_str(&key);
    if let Some(a) = auth {
        req.push_str("\r\nAuthorization: ");
        req.push_str(a);
    }
    req.push_str("\r\n\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|_| WsError::Lost)?;
    let mut head = Vec::with_capacity(512);
    let rest = loop {
        read_scratch(&mut tcp, |data| head.extend_from_slice(data)).await?;
        if let Some(end) = check_response(&head, &key)? {
            break head.split_off(end);
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(WsError::Upgrade);
        }
    };
    let mut frames = Frames::default();
    if !rest.is_empty() {
        // (A broken frame here is reported by `recv`, after the messages before it.)
        frames.take_in(&rest);
    }
    Ok(Ws { tcp, frames })
}

/// Ok(Some(end of head)) for a complete valid 101, Ok(None) when more bytes are needed.
fn check_response(head: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut resp = httparse::Response::new(&mut headers);
    let end = match resp.parse(head) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(WsError::Upgrade),
    };
    match resp.code {
        Some(101) => {}
        Some(code) => return Err(WsError::Http(code)),
        None => return Err(WsError::Upgrade),
    }
    let expected = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accepted = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == expected.as_bytes()
    });
    if accepted {
        Ok(Some(end))
    } else {
        Err(WsError::Upgrade)
    }
}

impl Ws {
    /// The next frame for the device loop. Cancel-safe: a frame is only taken out of the
    /// socket in the same poll that hands it out (or queues it in `ready`).
    pub async fn recv(&mut self) -> Result<Incoming, WsError> {
        loop {
            match std::future::poll_fn(|cx| self.poll_recv(cx)).await? {
                Some(m) => return Ok(m),
                None => self.flush_control().await?,
            }
        }
    }

    /// The next message, or `None` when pongs are owed first (`flush_control`): what a
    /// device's own poll loop waits on beside its timers, without a future of its own.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Incoming>, WsError>> {
        loop {
            if let Some(m) = self.frames.ready.pop_front() {
                return Poll::Ready(Ok(Some(m)));
            }
            if !self.frames.control.is_empty() {
                return Poll::Ready(Ok(None));
            }
            if let Some(e) = self.frames.failed.take() {
                return Poll::Ready(Err(e));
            }
            let frames = &mut self.frames;
            match poll_read_scratch(&mut self.tcp, cx, |data| frames.take_in(data)) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
        }
    }

    /// Write owed pongs.
    pub async fn flush_control(&mut self) -> Result<(), WsError> {
        let out = std::mem::take(&mut self.frames.control);
        self.tcp.write_all(&out).await.map_err(|_| WsError::Lost)
    }

    /// Send text frames in one write (with any pong owed).
    pub async fn send_texts<S: AsRef<str>>(&mut self, texts: &[S]) -> Result<(), WsError> {
        let mut out = std::mem::take(&mut self.frames.control);
        for t in texts {
            encode_frame(&mut out, 0x1, t.as_ref().as_bytes());
        }
        self.tcp.write_all(&out).await.map_err(|_| WsError::Lost)
    }

    /// Send one text frame.
    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        self.send_texts(&[text]).await
    }

    /// Send one unfragmented message (text 0x1 or binary 0x2) in one write, with any pong
    /// owed.
    pub async fn send_message(&mut self, opcode: u8, payload: &[u8]) -> Result<(), WsError> {
        let mut out = std::mem::take(&mut self.frames.control);
        encode_frame(&mut out, opcode, payload);
        self.tcp.write_all(&out).await.map_err(|_| WsError::Lost)
    }

    /// The client's side of the closing handshake (RFC 6455 §7): a close frame with
    /// `code` (None: an empty one), then nothing more is sent, and what the server still
    /// sends is discarded until it closes the TCP connection (the server closes first,
    /// §7.1.1), or `wait` passed.
    pub async fn close_and_wait(&mut self, code: Option<u16>, wait: std::time::Duration) {
        let mut out = std::mem::take(&mut self.frames.control);
        let code = code.map(u16::to_be_bytes);
        encode_frame(&mut out, 0x8, code.as_ref().map_or(&[][..], |c| &c[..]));
        if self.tcp.write_all(&out).await.is_err() {
            return;
        }
        let tcp = &mut self.tcp;
        let _ = tokio::time::timeout(wait, async {
            while read_scratch(tcp, |_| ()).await.is_ok() {}
        })
        .await;
    }

    /// Send a close frame (1000) and stop: what a device does when told to stop.
    pub async fn close(&mut self) {
        let mut out = std::mem::take(&mut self.frames.control);
        encode_frame(&mut out, 0x8, &1000u16.to_be_bytes());
        let _ = self.tcp.write_all(&out).await;
        let _ = self.tcp.shutdown().await;
    }
}

/// Wait for bytes, read what has arrived into the worker's scratch buffer and hand it to
/// `f` in the same poll (so a cancelled wait loses nothing). Through `poll_read`: a read
/// shorter than the buffer drained the socket, and tokio then clears its readiness, so the
/// next wait needs no extra read that could only say WouldBlock (one syscall less per
/// ping, request or event a device receives).
async fn read_scratch<R>(tcp: &mut TcpStream, mut f: impl FnMut(&[u8]) -> R) -> Result<R, WsError> {
    std::future::poll_fn(|cx| poll_read_scratch(tcp, cx, &mut f)).await
}

fn poll_read_scratch<R>(
    tcp: &mut TcpStream,
    cx: &mut Context<'_>,
    f: impl FnOnce(&[u8]) -> R,
) -> Poll<Result<R, WsError>> {
    SCRATCH_BUF.with(|b| {
        let mut b = b.borrow_mut();
        let mut rb = ReadBuf::new(&mut b[..]);
        match Pin::new(&mut *tcp).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Err(WsError::Lost)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(f(rb.filled()))),
            Poll::Ready(Err(_)) => Poll::Ready(Err(WsError::Lost)),
        }
    })
}

impl Frames {
    /// [`Frames::ingest`], an error kept to be reported after the messages that came
    /// before it (a server's message is delivered, and answered, before the broken frame
    /// that follows it fails the connection). After a close frame or an error nothing
    /// more is read.
    fn take_in(&mut self, data: &[u8]) {
        if self.closed || self.failed.is_some() {
            return;
        }
        if let Err(e) = self.ingest(data) {
            self.partial = Vec::new();
            self.failed = Some(e);
        }
    }

    /// Parse what arrived, keeping only an incomplete frame's bytes.
    fn ingest(&mut self, data: &[u8]) -> Result<(), WsError> {
        if self.partial.is_empty() {
            let used = self.parse_frames(data)?;
            if used < data.len() && !self.closed {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.parse_frames(&buf)?;
            if used < buf.len() && !self.closed {
                buf.drain(..used);
                self.partial = buf;
            }
            // else: buf dropped, the device holds no buffer again
        }
        Ok(())
    }

    /// Parse complete frames from `data`; returns the bytes used.
    fn parse_frames(&mut self, data: &[u8]) -> Result<usize, WsError> {
        let mut at = 0;
        while !self.closed {
            let Some((header, len)) = frame_header(&data[at..])? else {
                break;
            };
            if data.len() - at < header + len {
                break;
            }
            let b0 = data[at];
            let payload = &data[at + header..at + header + len];
            at += header + len;
            self.on_frame(b0 & 0x80 != 0, b0 & 0x0f, payload)?;
        }
        Ok(at)
    }

    fn on_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> Result<(), WsError> {
        if opcode & 0x8 != 0 && (!fin || payload.len() > 125) {
            // Control frames: whole, at most 125 bytes (RFC 6455 §5.5).
            return Err(WsError::Protocol);
        }
        match opcode {
            0x0..=0x2 => {
                let (text, msg) = match (opcode, self.fragments.take()) {
                    (0x0, Some((text, mut acc))) => {
                        let before = acc.len();
                        if before + payload.len() > MAX_FRAME {
                            return Err(WsError::TooBig);
                        }
                        acc.extend_from_slice(payload);
                        if text {
                            utf8_after(&acc, before)?;
                        }
                        (text, acc)
                    }
                    (0x0, None) | (_, Some(_)) => return Err(WsError::Protocol),
                    (0x1, None) if fin => {
                        let text = std::str::from_utf8(payload).map_err(|_| WsError::Invalid)?;
                        self.ready.push_back(Incoming::Text(text.to_owned()));
                        return Ok(());
                    }
                    (0x1, None) => {
                        utf8_after(payload, 0)?;
                        (true, payload.to_vec())
                    }
                    (_, None) => (false, payload.to_vec()),
                };
                if !fin {
                    self.fragments = Some((text, msg));
                } else if text {
                    let text = String::from_utf8(msg).map_err(|_| WsError::Invalid)?;
                    self.ready.push_back(Incoming::Text(text));
                } else {
                    self.ready.push_back(Incoming::Binary(msg));
                }
            }
            0x8 => {
                // The last frame read: what follows it (a ping, a message) is not
                // answered (RFC 6455 §5.5.1).
                self.closed = true;
                self.ready.push_back(Incoming::Close(check_close(payload)?));
            }
            0x9 => encode_frame(&mut self.control, 0xA, payload),
            0xA => {}
            _ => return Err(WsError::Protocol),
        }
        Ok(())
    }
}

/// A fragmented text message is checked as it comes: `msg[..from]` was found UTF-8 but
/// perhaps for a sequence cut at its end, so the check starts again at the last
/// character boundary before `from` (at most 3 bytes back). Err(Invalid) as soon as no
/// continuation can make the message valid (RFC 6455 §8.1), not once it is whole.
fn utf8_after(msg: &[u8], from: usize) -> Result<(), WsError> {
    let mut start = from.saturating_sub(3);
    while start < from && msg[start] & 0xC0 == 0x80 {
        start += 1;
    }
    match std::str::from_utf8(&msg[start..]) {
        Ok(_) => Ok(()),
        // Cut short inside a sequence: the next fragment may complete it.
        Err(e) if e.error_len().is_none() => Ok(()),
        Err(_) => Err(WsError::Invalid),
    }
}

/// The code of a server's close frame (1005: none), or why it is malformed: one byte, a
/// code no endpoint may send (below 1000, 1004-1006, 1015-2999, 5000 and up) is a protocol
/// error; a reason that is not UTF-8 is 1007 (RFC 6455 §5.5.1, §7.4).
fn check_close(payload: &[u8]) -> Result<u16, WsError> {
    match payload {
        [] => Ok(1005),
        [_] => Err(WsError::Protocol),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(WsError::Protocol);
            }
            std::str::from_utf8(reason).map_err(|_| WsError::Invalid)?;
            Ok(code)
        }
    }
}

/// A frame's header length and payload length once the header is complete.
fn frame_header(d: &[u8]) -> Result<Option<(usize, usize)>, WsError> {
    if d.len() < 2 {
        return Ok(None);
    }
    if d[0] & 0x70 != 0 || d[1] & 0x80 != 0 {
        // Reserved bits (no extension was negotiated) or a masked server frame.
        return Err(WsError::Protocol);
    }
    let (header, len) = match d[1] & 0x7f {
        126 if d.len() < 4 => return Ok(None),
        126 => (4, u16::from_be_bytes([d[2], d[3]]) as usize),
        127 if d.len() < 10 => return Ok(None),
        127 => {
            let n = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
            (10, usize::try_from(n).unwrap_or(usize::MAX))
        }
        n => (2, n as usize),
    };
    if len > MAX_FRAME {
        return Err(WsError::TooBig);
    }
    Ok(Some((header, len)))
}

/// Append one masked client frame (FIN set).
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = next_mask();
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A fresh masking key per frame (xorshift: the mask only has to be unpredictable to
/// intermediaries, RFC 6455 10.3, not cryptographically strong for a load generator).
fn next_mask() -> [u8; 4] {
    MASK_STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x as u32).to_le_bytes()
    })
}

/// `ws://host:port/path?query` -> ("host:port", "/path?query").
pub fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("ws://")?;
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Some((&rest[..i], &rest[i..])),
        Some(_) => None,
        None => Some((rest, "/")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmask a client frame the way a server does: (opcode, payload, bytes used).
    fn server_decode(d: &[u8]) -> (u8, Vec<u8>, usize) {
        assert!(d[1] & 0x80 != 0, "client frames are masked");
        let (mut at, len) = match d[1] & 0x7f {
            126 => (4, u16::from_be_bytes([d[2], d[3]]) as usize),
            127 => (
                10,
                u64::from_be_bytes(d[2..10].try_into().unwrap()) as usize,
            ),
            n => (2, n as usize),
        };
        let mask = [d[at], d[at + 1], d[at + 2], d[at + 3]];
        at += 4;
        let p = d[at..at + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        (d[0] & 0x0f, p, at + len)
    }

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n <= 65535 => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn client_frames_are_masked_and_round_trip_at_every_length_form() {
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, 0x1, &payload);
            let (op, got, used) = server_decode(&out);
            assert_eq!(op, 1);
            assert_eq!(used, out.len());
            assert_eq!(got, payload, "length {len}");
        }
        // Two frames never share a mask (the key changes per frame).
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_frame(&mut a, 1, b"x");
        encode_frame(&mut b, 1, b"x");
        assert_ne!(a[2..6], b[2..6]);
    }

    #[test]
    fn urls_split_into_host_and_target() {
        assert_eq!(split_url("ws://h:1/ws"), Some(("h:1", "/ws")));
        assert_eq!(
            split_url("ws://127.0.0.1:9/socket/websocket?token=t&vsn=2.0.0"),
            Some(("127.0.0.1:9", "/socket/websocket?token=t&vsn=2.0.0"))
        );
        assert_eq!(split_url("ws://h:1"), Some(("h:1", "/")));
        assert_eq!(split_url("wss://h:1/ws"), None);
        assert_eq!(split_url("ws://h:1?x"), None);
    }

    #[test]
    fn upgrade_answers() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        let end = check_response(ok, key).unwrap().unwrap();
        assert_eq!(&ok[end..], b"\x81\x02hi");
        assert_eq!(check_response(&ok[..40], key), Ok(None));
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(check_response(wrong, key), Err(WsError::Upgrade));
        let refused = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(check_response(refused, key), Err(WsError::Http(401)));
        assert_eq!(
            check_response(b"garbage\r\n\r\n", key),
            Err(WsError::Upgrade)
        );
    }

    /// Frames arriving in every possible split are parsed the same, and a device holds
    /// no buffer once a frame is complete.
    #[test]
    fn frames_split_anywhere_parse_the_same() {
        let long = "y".repeat(300);
        let mut stream = server_frame(0x1, true, b"{\"type\":\"a\"}");
        stream.extend(server_frame(0x9, true, b"p1"));
        stream.extend(server_frame(0x1, false, b"frag"));
        stream.extend(server_frame(0x0, true, b"ment"));
        stream.extend(server_frame(0x1, true, long.as_bytes()));
        stream.extend(server_frame(0x8, true, &4001u16.to_be_bytes()));
        for cut in 0..stream.len() {
            // (A fresh client each time: nothing is read after the close frame.)
            let mut ws = Frames::default();
            ws.ingest(&stream[..cut]).unwrap();
            ws.ingest(&stream[cut..]).unwrap();
            assert!(ws.partial.is_empty() && ws.partial.capacity() == 0);
            let got: Vec<_> = ws.ready.drain(..).collect();
            assert_eq!(
                got,
                vec![
                    Incoming::Text("{\"type\":\"a\"}".into()),
                    Incoming::Text("fragment".into()),
                    Incoming::Text(long.clone()),
                    Incoming::Close(4001)
                ],
                "cut at {cut}"
            );
            let (op, pong, _) = server_decode(&ws.control);
            assert_eq!((op, pong.as_slice()), (0xA, &b"p1"[..]));
            ws.control.clear();
        }
        // Byte by byte, too.
        let mut ws = Frames::default();
        for b in &stream {
            ws.ingest(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(ws.ready.len(), 4);
        // Broken framing is an error, not a guess.
        let mut ws = Frames::default();
        assert_eq!(
            ws.ingest(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']),
            Err(WsError::Protocol)
        );
        assert_eq!(ws.ingest(&[0xC1, 0x00]), Err(WsError::Protocol));
        assert_eq!(
            ws.ingest(&[0x81, 0x7f, 0xff, 0, 0, 0, 0, 0, 0, 0]),
            Err(WsError::TooBig)
        );
        let bad_utf8 = server_frame(0x1, true, &[0xff, 0xfe]);
        assert_eq!(ws.ingest(&bad_utf8), Err(WsError::Invalid));
        assert_eq!(WsError::Invalid.close_code(), Some(1007));
    }

    /// What the Autobahn TestSuite found (3.2, 4.1.3, 5.15 and kin): a message that came
    /// in the same read as a broken frame after it is still delivered (and echoed) before
    /// the error fails the connection.
    #[test]
    fn a_message_before_a_broken_frame_is_delivered_first() {
        let mut stream = server_frame(0x1, true, b"first");
        stream.extend([0xA1, 0x00]); // RSV2 set
        stream.extend(server_frame(0x9, true, b"never"));
        let mut f = Frames::default();
        f.take_in(&stream);
        assert_eq!(f.ready.pop_front(), Some(Incoming::Text("first".into())));
        assert_eq!(f.failed.take(), Some(WsError::Protocol));
        assert!(
            f.control.is_empty(),
            "nothing after the broken frame is answered"
        );
        // A reserved opcode, and a continuation with nothing to continue, likewise.
        for bad in [vec![0x83, 0x00], server_frame(0x0, false, b"x")] {
            let mut f = Frames::default();
            f.take_in(&[server_frame(0x2, true, b"bin"), bad].concat());
            assert_eq!(f.ready.pop_front(), Some(Incoming::Binary(b"bin".to_vec())));
            assert_eq!(f.failed, Some(WsError::Protocol));
            // And nothing more is read.
            f.take_in(&server_frame(0x1, true, b"later"));
            assert!(f.ready.is_empty());
        }
    }

    /// Autobahn 7.1.3 and kin: after the server's close frame, a ping (or anything) in
    /// the same read is not answered, and nothing of it is kept.
    #[test]
    fn nothing_after_the_close_frame_is_answered() {
        let mut stream = server_frame(0x8, true, &1000u16.to_be_bytes());
        stream.extend(server_frame(0x9, true, b"late"));
        stream.extend(server_frame(0x1, true, b"late"));
        let mut f = Frames::default();
        f.take_in(&stream);
        assert_eq!(f.ready.pop_front(), Some(Incoming::Close(1000)));
        assert!(f.ready.is_empty() && f.control.is_empty() && f.partial.capacity() == 0);
    }

    /// Autobahn 2.5, 5.x, 7.3.x, 7.9.x: control frames are whole and at most 125 bytes; a
    /// close frame's code is one a peer may send and its reason UTF-8.
    #[test]
    fn control_and_close_frames_are_checked() {
        let checked = |frame: Vec<u8>| {
            let mut f = Frames::default();
            f.ingest(&frame).map(|()| f.ready.pop_front())
        };
        assert_eq!(
            checked(server_frame(0x9, true, &[0; 126])),
            Err(WsError::Protocol)
        );
        assert_eq!(
            checked(server_frame(0x8, true, &[0; 126])),
            Err(WsError::Protocol)
        );
        assert_eq!(
            checked(server_frame(0xA, false, b"p")),
            Err(WsError::Protocol)
        );
        assert_eq!(
            checked(server_frame(0x8, true, b"")),
            Ok(Some(Incoming::Close(1005)))
        );
        assert_eq!(
            checked(server_frame(0x8, true, &[3])),
            Err(WsError::Protocol)
        );
        for ok in [1000u16, 1003, 1007, 1011, 3000, 4999] {
            let frame = server_frame(0x8, true, &ok.to_be_bytes());
            assert_eq!(checked(frame), Ok(Some(Incoming::Close(ok))), "{ok}");
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let frame = server_frame(0x8, true, &bad.to_be_bytes());
            assert_eq!(checked(frame), Err(WsError::Protocol), "{bad}");
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye \xff");
        assert_eq!(checked(server_frame(0x8, true, &p)), Err(WsError::Invalid));
        assert_eq!(WsError::Protocol.close_code(), Some(1002));
    }

    /// Autobahn 6.4.1 and 6.4.2: a fragmented text message fails at the first fragment
    /// no continuation can make UTF-8; a character cut between fragments waits for its
    /// rest; binary messages are put together whole.
    #[test]
    fn fragmented_messages_are_checked_as_they_come() {
        let mut f = Frames::default();
        f.ingest(&server_frame(0x1, false, "κόσμε".as_bytes()))
            .unwrap();
        assert_eq!(
            f.ingest(&server_frame(0x0, false, b"\xf4\x90\x80\x80")),
            Err(WsError::Invalid)
        );
        let mut f = Frames::default();
        f.ingest(&server_frame(0x1, false, b"a\xe2\x82")).unwrap();
        f.ingest(&server_frame(0x0, false, b"\xac")).unwrap();
        f.ingest(&server_frame(0x0, true, b"b")).unwrap();
        assert_eq!(f.ready.pop_front(), Some(Incoming::Text("a€b".into())));
        let mut f = Frames::default();
        f.ingest(&server_frame(0x1, false, b"a\xe2")).unwrap();
        assert_eq!(
            f.ingest(&server_frame(0x0, true, b"\x28")),
            Err(WsError::Invalid)
        );
        let mut f = Frames::default();
        f.ingest(&server_frame(0x2, false, &[0xff, 0])).unwrap();
        f.ingest(&server_frame(0x9, true, b"p")).unwrap();
        f.ingest(&server_frame(0x0, true, &[0xfe])).unwrap();
        assert_eq!(
            f.ready.pop_front(),
            Some(Incoming::Binary(vec![0xff, 0, 0xfe]))
        );
        assert!(
            !f.control.is_empty(),
            "the ping inside the message is answered"
        );
    }

    /// Against an independent implementation (tungstenite's server): the upgrade, text
    /// both ways, a ping answered with its pong, a fragmented message, the close code.
    #[tokio::test]
    // The header callback's signature is tungstenite's (its error is an HTTP response).
    #[allow(clippy::result_large_err)]
    async fn talks_to_tungstenite() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::Message;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_hdr_async(
                tcp,
                |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    assert_eq!(req.uri().path(), "/ws");
                    assert_eq!(req.headers()["authorization"], "Bearer t0ken");
                    Ok(resp)
                },
            )
            .await
            .unwrap();
            ws.send(Message::text("hello")).await.unwrap();
            // The client's text back, then its pong for our ping.
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::text("hi router")
            );
            ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
            ws.send(Message::text("after ping")).await.unwrap();
            let first = FrameHeader {
                is_final: false,
                opcode: OpCode::Data(Data::Text),
                ..Default::default()
            };
            let piece = Frame::from_payload(first, b"in ".to_vec().into());
            ws.send(Message::Frame(piece)).await.unwrap();
            let rest = FrameHeader {
                opcode: OpCode::Data(Data::Continue),
                ..Default::default()
            };
            let piece = Frame::from_payload(rest, b"pieces".to_vec().into());
            ws.send(Message::Frame(piece)).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::Pong(b"p".to_vec().into())
            );
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("two"));
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("frames"));
            ws.close(Some(CloseFrame {
                code: CloseCode::Library(4409),
                reason: "taken over".into(),
            }))
            .await
            .unwrap();
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let host = addr.to_string();
        let mut ws = handshake(tcp, &host, "/ws", Some("Bearer t0ken"))
            .await
            .unwrap();
        assert_eq!(ws.recv().await, Ok(Incoming::Text("hello".into())));
        ws.send_text("hi router").await.unwrap();
        assert_eq!(ws.recv().await, Ok(Incoming::Text("after ping".into())));
        assert_eq!(ws.recv().await, Ok(Incoming::Text("in pieces".into())));
        ws.send_texts(&["two", "frames"]).await.unwrap();
        assert_eq!(ws.recv().await, Ok(Incoming::Close(4409)));
        server.await.unwrap();

        // A refused upgrade is reported with its status.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refuse = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
            tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let r = handshake(tcp, &addr.to_string(), "/ws", None).await;
        assert_eq!(r.err(), Some(WsError::Http(401)));
        refuse.await.unwrap();
    }
}
