//! The handshake of a connection that was not authenticated at accept: TLS, the PROXY
//! header, the HTTP upgrade and the credentials (a token in the request, a Bearer frame,
//! a NervesHub certificate or signature), within --auth-timeout. One task per such
//! connection, on its shard's thread; it sees the shard only through its [`Door`].

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::upgrade::{self, parse_upgrade, switching_protocols};
use super::{hand_over, proxy, refuse, OpenConnection, LINGER, MAX_AUTH_ATTEMPTS, MAX_REQUEST};
use crate::auth::{AuthError, Identity};
use crate::metrics::GaugeHold;
use crate::protocol::hivekit;
use crate::protocol::ws::{self, CloseCode, WsError, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use crate::shard::{Adopt, Door, Protocol};

/// Where a connection is in its short life before authentication.
struct Handshake {
    buf: Vec<u8>,
    upgraded: bool,
    protocol: Option<Protocol>,
    /// The 101 response, when it waits to go out with what follows it.
    preface: Vec<u8>,
}

/// How a handshake ended.
enum HandshakeEnd {
    Authenticated {
        ident: Identity,
        protocol: Protocol,
        /// permessage-deflate negotiated.
        deflate: ws::Deflate,
        leftover: Vec<u8>,
        /// Not yet sent: goes out with the greeting, from the owning shard.
        preface: Vec<u8>,
    },
    /// Close with this code (after the upgrade) and count it.
    Refused(CloseCode, AuthError),
    /// The peer went away or spoke no WebSocket; already answered if possible.
    Gone,
}

/// `--proxy-protocol`: the header first (within the auth timeout); the address it names
/// is the device's from then on, and the per-IP connect rate counts it.
pub(super) async fn handle_proxied(
    door: Rc<Door>,
    mut stream: TcpStream,
    balancer: SocketAddr,
    open: OpenConnection,
) {
    let cfg = &door.shared.config;
    let within = Duration::from_secs(cfg.auth_timeout);
    let peer = match proxy::read_header(&mut stream, cfg.proxy_protocol, within).await {
        Ok(source) => source.unwrap_or(balancer),
        Err(why) => {
            door.metrics().proxy_refused.fetch_add(1, Relaxed);
            tracing::debug!(%balancer, why, "connection without a valid PROXY header closed");
            return;
        }
    };
    if let Err(why) = door.admit_ip(peer.ip()) {
        // Not counted while the refusal lingers (as a connection refused at accept).
        drop(open);
        refuse(stream, why.status(), why.message()).await;
        return;
    }
    handle_new(door, stream, peer, Vec::new(), open).await;
}

pub(super) async fn handle_new(
    door: Rc<Door>,
    stream: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    open: OpenConnection,
) {
    let m = door.metrics();
    let handshaking = GaugeHold::new(&m.handshakes);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(door.shared.config.auth_timeout);
    let done = match door.shared.tls.clone() {
        None => {
            let mut s = stream;
            upgrade_and_auth(&door, &mut s, None, deadline, first)
                .await
                .map(|auth| (s, None, auth))
        }
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(mut tls)) => {
                // mTLS: a certificate rustls verified against --client-ca names the device.
                let field = &door.shared.config.mtls_account_field;
                let cert_ident = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::tls::identity_from_cert(c, field));
                match upgrade_and_auth(&door, &mut tls, cert_ident, deadline, Vec::new()).await {
                    Some(auth) => {
                        let (tcp, conn) = tls.into_inner();
                        Some((tcp, Some(Box::new(conn)), auth))
                    }
                    None => None,
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                m.tls_failures.fetch_add(1, Relaxed);
                m.handshake_failures.fetch_add(1, Relaxed);
                None
            }
            Err(_) => {
                m.auth_failure(AuthError::Timeout);
                m.handshake_failures.fetch_add(1, Relaxed);
                None
            }
        },
    };
    drop(handshaking);
    let Some((stream, tls, (ident, protocol, deflate, leftover, preface))) = done else {
        return;
    };
    // Out of tokio's reactor either way: the owning shard watches it with its poller.
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not take an authenticated socket out of the runtime");
            return;
        }
    };
    let mine = hand_over(
        &door,
        Adopt {
            stream,
            tls,
            ident,
            peer,
            protocol,
            deflate,
            leftover,
            preface,
            open,
        },
    );
    if let Some(a) = mine {
        door.hand_back(a);
    }
}

/// Upgrade and authenticate within the deadline; on refusal answer (close code or HTTP
/// status) and linger. Some: who the device is, its protocol, bytes already read.
async fn upgrade_and_auth<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    s: &mut S,
    cert_ident: Option<Identity>,
    deadline: tokio::time::Instant,
    first: Vec<u8>,
) -> Option<(Identity, Protocol, ws::Deflate, Vec<u8>, Vec<u8>)> {
    let m = door.metrics();
    let mut hs = Handshake {
        buf: first,
        upgraded: false,
        protocol: None,
        preface: Vec::new(),
    };
    let outcome = match tokio::time::timeout_at(deadline, handshake(door, s, &mut hs, cert_ident))
        .await
    {
        Ok(o) => o,
        Err(_) if hs.upgraded => HandshakeEnd::Refused(CloseCode::AuthTimeout, AuthError::Timeout),
        Err(_) => {
            m.auth_failure(AuthError::Timeout);
            m.handshake_failures.fetch_add(1, Relaxed);
            HandshakeEnd::Gone
        }
    };
    match outcome {
        HandshakeEnd::Authenticated {
            ident,
            protocol,
            deflate,
            leftover,
            preface,
        } => Some((ident, protocol, deflate, leftover, preface)),
        HandshakeEnd::Refused(code, why) => {
            m.auth_failure(why);
            m.close(code);
            // The 101 first if it has not gone out yet.
            let mut frames = std::mem::take(&mut hs.preface);
            if hs.protocol == Some(Protocol::Hivekit) {
                // Hivekit says why in its own terms before the close.
                ws::encode_frame(OP_TEXT, &hivekit::auth_err(&why.to_string()), &mut frames);
            }
            frames.extend_from_slice(&close_frame(code, &why.to_string()));
            let _ = write_all(s, &frames).await;
            linger(s).await;
            None
        }
        HandshakeEnd::Gone => None,
    }
}

pub(super) fn close_frame(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(130);
    ws::encode_frame(OP_CLOSE, &ws::close_payload(code, reason), &mut f);
    f
}

async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, data: &[u8]) -> io::Result<()> {
    s.write_all(data).await?;
    s.flush().await
}

/// Read more bytes into `buf`; Ok(false) on EOF.
async fn read_more<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 2048];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// Half-close (TLS: close_notify first) and wait briefly for the peer's FIN, so what
/// was sent is not destroyed by a reset.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        while let Ok(true) = read_more(s, &mut sink).await {
            sink.clear();
        }
    })
    .await;
}

pub(super) async fn http_error<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    message: &str,
) {
    let body = format!(
        "{{\"error\":\"handshake\",\"message\":{}}}",
        serde_json::Value::from(message)
    );
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = write_all(s, resp.as_bytes()).await;
    linger(s).await;
}

/// The handshake proper: the HTTP upgrade, then the device's identity from its
/// client certificate, NervesHub headers, a token on the upgrade request, or else its
/// first text frame.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    hs: &mut Handshake,
    cert_ident: Option<Identity>,
) -> HandshakeEnd {
    // 1. The HTTP upgrade request.
    let Some(up) = read_upgrade(door, stream, &mut hs.buf).await else {
        return HandshakeEnd::Gone;
    };
    let cert_ident = match cert_ident {
        Some(ident) => Some(ident),
        None => match nerves_identity(door, stream, &up).await {
            Ok(ident) => ident,
            Err(()) => return HandshakeEnd::Gone,
        },
    };
    let decided = cert_ident.is_some() || up.token.is_some();
    // permessage-deflate only where authentication is decided by the upgrade request:
    // a first-frame `Bearer` is read by the listener, which does not inflate.
    let offer = up
        .deflate
        .filter(|_| door.shared.config.permessage_deflate && decided);
    let resp = switching_protocols(&up.key, offer);
    let deflate = offer.map_or(ws::Deflate::Off, ws::Deflate::for_window);
    if decided {
        // Decided without another byte from the device: the 101 goes out with the
        // verdict (the greeting from the owning shard, or the close frame).
        hs.preface = resp.into_bytes();
    } else if write_all(stream, resp.as_bytes()).await.is_err() {
        return HandshakeEnd::Gone;
    }
    hs.upgraded = true;
    hs.protocol = Some(up.protocol);
    hs.buf.drain(..up.consumed);

    // 2. A verified client certificate, a token on the upgrade request, or else the
    //    first text frame `Bearer T`.
    let ident = match (cert_ident, up.token) {
        (Some(ident), _) => ident,
        (None, Some(token)) => match door.shared.verifier.verify(&token) {
            Ok(ident) => ident,
            Err(e) => return HandshakeEnd::Refused(CloseCode::Unauthorized, e),
        },
        // Phoenix sockets authenticate with connect params only; the conformance echo
        // on its URL (a test suite sends no `Bearer` frame).
        (None, None)
            if matches!(
                up.protocol,
                Protocol::Phoenix(_) | Protocol::ConformanceEcho
            ) =>
        {
            return HandshakeEnd::Refused(CloseCode::Unauthorized, AuthError::Missing)
        }
        (None, None) => return bearer_frame(door, stream, hs, up.protocol).await,
    };
    HandshakeEnd::Authenticated {
        ident,
        protocol: up.protocol,
        deflate,
        leftover: std::mem::take(&mut hs.buf),
        preface: std::mem::take(&mut hs.preface),
    }
}

/// Read until the HTTP upgrade request is whole (at most [`MAX_REQUEST`]); None once
/// the connection is answered (431, 400...) or gone. Counted as a handshake failure.
async fn read_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<upgrade::Upgrade> {
    let m = door.metrics();
    loop {
        match parse_upgrade(buf, door.shared.config.websocket_conformance_echo) {
            Ok(Some(up)) => return Some(up),
            Ok(None) if buf.len() >= MAX_REQUEST => {
                m.handshake_failures.fetch_add(1, Relaxed);
                let (status, message) = (
                    "431 Request Header Fields Too Large",
                    "upgrade request over 8 KiB",
                );
                http_error(stream, status, message).await;
                return None;
            }
            Ok(None) => match read_more(stream, buf).await {
                Ok(true) => {}
                _ => {
                    m.handshake_failures.fetch_add(1, Relaxed);
                    return None;
                }
            },
            Err((status, message)) => {
                m.handshake_failures.fetch_add(1, Relaxed);
                http_error(stream, status, &message).await;
                return None;
            }
        }
    }
}

/// NervesHub shared secret (`x-nh-*` headers on a Phoenix upgrade): decided before the
/// upgrade. Ok(None): not asked for; Err: refused with 401 as NervesHub does.
async fn nerves_identity<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    up: &upgrade::Upgrade,
) -> Result<Option<Identity>, ()> {
    let (Some(h), Protocol::Phoenix(_)) = (&up.nerves, up.protocol) else {
        return Ok(None);
    };
    let verdict = match &door.shared.nerves {
        Some(n) if !h.signature.is_empty() => n.verify(h, crate::unix_ms()),
        _ => Err(AuthError::Missing),
    };
    let why = match verdict {
        Ok(ident) => return Ok(Some(ident)),
        Err(why) => why,
    };
    let m = door.metrics();
    m.auth_failure(why);
    m.handshake_failures.fetch_add(1, Relaxed);
    let msg = match why {
        AuthError::Missing if door.shared.nerves.is_none() => {
            "shared-secret authentication is not enabled on this router".to_string()
        }
        _ => format!("shared-secret authentication failed: {why}"),
    };
    http_error(stream, "401 Unauthorized", &msg).await;
    Err(())
}

/// Authentication by the first text message, `Bearer T` (it may come in fragments,
/// reassembled within --max-frame). Pings are answered, a close ends it. Hivekit may
/// ask again on the same socket (a stale token is replaced, not retried in a reconnect
/// loop), up to [`MAX_AUTH_ATTEMPTS`] and within the auth timeout (then 4408), each
/// failure counted and answered `aut`/`err`.
async fn bearer_frame<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    hs: &mut Handshake,
    protocol: Protocol,
) -> HandshakeEnd {
    let m = door.metrics();
    let mut message: Option<Vec<u8>> = None;
    let mut failures = 0u32;
    loop {
        let (h, mut frame) = match next_frame(door, stream, &mut hs.buf).await {
            Ok(f) => f,
            Err(end) => return end,
        };
        let payload = &mut frame[h.header_len..];
        ws::unmask(payload, h.mask);
        let whole = match h.opcode {
            OP_PING => {
                let mut pong = Vec::new();
                ws::encode_frame(OP_PONG, payload, &mut pong);
                if write_all(stream, &pong).await.is_err() {
                    return HandshakeEnd::Gone;
                }
                continue;
            }
            OP_PONG => continue,
            OP_CLOSE => {
                // Answered (with 1000, whatever the device's code), and counted as a
                // shard counts an answer.
                m.peer_closes.fetch_add(1, Relaxed);
                m.close(CloseCode::Normal);
                let _ = write_all(stream, &close_frame(CloseCode::Normal, "")).await;
                linger(stream).await;
                return HandshakeEnd::Gone;
            }
            OP_TEXT | OP_CONT => {
                match reassemble(&mut message, &h, payload, door.shared.config.max_frame) {
                    Ok(Some(whole)) => whole,
                    Ok(None) => continue,
                    Err(why) => return HandshakeEnd::Refused(CloseCode::Unauthorized, why),
                }
            }
            _ => return HandshakeEnd::Refused(CloseCode::Unauthorized, AuthError::Missing),
        };
        // Quarantine: the only thing looked at is whether this is `Bearer T` (the
        // scheme in any case, as in the Authorization header).
        let token = std::str::from_utf8(&whole)
            .ok()
            .and_then(crate::auth::bearer_token);
        let why = match token.map(|t| door.shared.verifier.verify(t)) {
            Some(Ok(ident)) => {
                return HandshakeEnd::Authenticated {
                    ident,
                    protocol,
                    deflate: ws::Deflate::Off,
                    leftover: std::mem::take(&mut hs.buf),
                    preface: Vec::new(),
                }
            }
            Some(Err(e)) => e,
            None => AuthError::Missing,
        };
        failures += 1;
        if protocol != Protocol::Hivekit || failures >= MAX_AUTH_ATTEMPTS {
            return HandshakeEnd::Refused(CloseCode::Unauthorized, why);
        }
        m.auth_failure(why);
        let mut answer = Vec::new();
        ws::encode_frame(OP_TEXT, &hivekit::auth_err(&why.to_string()), &mut answer);
        if write_all(stream, &answer).await.is_err() {
            return HandshakeEnd::Gone;
        }
    }
}

/// The next whole frame before authentication, read as needed: its header and its
/// bytes (still masked). A WebSocket error is answered with its close code.
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(ws::FrameHeader, Vec<u8>), HandshakeEnd> {
    let m = door.metrics();
    loop {
        let h = match ws::parse_header(buf, door.shared.config.max_frame) {
            Ok(Some(h)) if buf.len() >= h.total_len() => h,
            Ok(_) => match read_more(stream, buf).await {
                Ok(true) => continue,
                _ => return Err(HandshakeEnd::Gone),
            },
            Err(e) => return Err(fail_ws(m, stream, e).await),
        };
        if h.rsv1 {
            // No extension is negotiated for a connection that authenticates by frame.
            return Err(fail_ws(m, stream, WsError::Reserved).await);
        }
        let frame = buf.drain(..h.total_len()).collect();
        return Ok((h, frame));
    }
}

/// A text message from its frames: Some once whole, None while more are to come. A
/// continuation with no message, a new message inside one (Missing) or one larger
/// than `max` (Invalid) is a refusal.
fn reassemble(
    message: &mut Option<Vec<u8>>,
    h: &ws::FrameHeader,
    payload: &[u8],
    max: usize,
) -> Result<Option<Vec<u8>>, AuthError> {
    match (h.opcode, message.as_mut()) {
        (OP_TEXT, None) if h.fin => Ok(Some(payload.to_vec())),
        (OP_TEXT, None) => {
            *message = Some(payload.to_vec());
            Ok(None)
        }
        (OP_CONT, Some(m)) => {
            if m.len() + payload.len() > max {
                m.clear();
                return Err(AuthError::Invalid);
            }
            m.extend_from_slice(payload);
            Ok(if h.fin { message.take() } else { None })
        }
        _ => Err(AuthError::Missing),
    }
}

/// A WebSocket-level error before authentication: its close frame (counted), then the
/// linger.
async fn fail_ws<S: AsyncRead + AsyncWrite + Unpin>(
    m: &crate::metrics::ShardMetrics,
    stream: &mut S,
    e: WsError,
) -> HandshakeEnd {
    m.close(e.close_code());
    let _ = write_all(stream, &close_frame(e.close_code(), &e.to_string())).await;
    linger(stream).await;
    HandshakeEnd::Gone
}
