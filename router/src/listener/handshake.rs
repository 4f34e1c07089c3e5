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

use super::budget::{Place, OVER_BUDGET_GRACE};
use super::upgrade::{self, parse_upgrade, switching_protocols};
use super::{hand_over, proxy, refuse, OpenConnection, LINGER, MAX_AUTH_ATTEMPTS, MAX_REQUEST};
use crate::auth::{AuthError, Identity};
use crate::metrics::GaugeHold;
use crate::nerves_auth::Reuse;
use crate::protocol::hivekit;
use crate::protocol::ws::{self, CloseCode, WsError, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use crate::shard::admission::Refusal;
use crate::shard::{Adopt, Door, Protocol};

/// Where a connection is in its short life before authentication.
struct Handshake {
    buf: Vec<u8>,
    upgraded: bool,
    protocol: Option<Protocol>,
    /// The 101 response, when it waits to go out with what follows it.
    preface: Vec<u8>,
    /// Over the budget of unauthenticated connections: refused unless the upgrade
    /// request carries the credentials.
    over: bool,
    /// Refused with an HTTP answer already (lingering when the deadline came).
    answered: bool,
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
    let place = door
        .admit_ip(peer.ip())
        .and_then(|()| door.unauthenticated(peer.ip()));
    match place {
        Ok(place) => handle_new(door, stream, peer, Vec::new(), (open, place)).await,
        Err(why) => {
            // Not counted while the refusal lingers (as a connection refused at accept).
            drop(open);
            refuse(stream, why.status(), why.message()).await;
        }
    }
}

pub(super) async fn handle_new(
    door: Rc<Door>,
    stream: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    (open, place): (OpenConnection, Place),
) {
    let m = door.metrics();
    let handshaking = GaugeHold::new(&m.handshakes);
    let now = tokio::time::Instant::now();
    let mut deadline = now + Duration::from_secs(door.shared.config.auth_timeout);
    let over = place.over();
    if over {
        // Over the process's budget: credentials on the upgrade request, or go.
        deadline = deadline.min(now + OVER_BUDGET_GRACE);
    }
    let done = match door.shared.tls.clone() {
        None => {
            let mut s = stream;
            upgrade_and_auth(&door, &mut s, None, deadline, first, over)
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
                match upgrade_and_auth(&door, &mut tls, cert_ident, deadline, Vec::new(), over)
                    .await
                {
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
            Err(_) if over => {
                door.refused(Refusal::Unauthenticated);
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
    drop(place);
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
    over: bool,
) -> Option<(Identity, Protocol, ws::Deflate, Vec<u8>, Vec<u8>)> {
    let m = door.metrics();
    let mut hs = Handshake {
        buf: first,
        upgraded: false,
        protocol: None,
        preface: Vec::new(),
        over,
        answered: false,
    };
    let outcome = match tokio::time::timeout_at(deadline, handshake(door, s, &mut hs, cert_ident))
        .await
    {
        Ok(o) => o,
        Err(_) if hs.answered => HandshakeEnd::Gone,
        Err(_) if hs.upgraded => HandshakeEnd::Refused(CloseCode::AuthTimeout, AuthError::Timeout),
        Err(_) if over => {
            let why = Refusal::Unauthenticated;
            door.refused(why);
            http_error(s, why.status(), why.message()).await;
            HandshakeEnd::Gone
        }
        Err(_) => {
            m.auth_failure(AuthError::Timeout);
            m.handshake_failures.fetch_add(1, Relaxed);
            HandshakeEnd::Gone
        }
    };
    // The account's device limit (--account-max-devices), whatever way it authenticated.
    let outcome = match outcome {
        HandshakeEnd::Authenticated { ident, preface, .. }
            if !door.shared.tenants.admits(&ident.account) =>
        {
            // The 101 (when it was to go with the verdict) goes before the close.
            hs.preface = preface;
            HandshakeEnd::Refused(CloseCode::AccountLimit, AuthError::AccountLimit)
        }
        o => o,
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
    // `date`: a NervesHub device whose signature was refused for its time (no real-time
    // clock yet) signs again with the server's time it reads here, as against NervesHub.
    let resp = format!(
        "HTTP/1.1 {status}\r\ndate: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
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
    let Some(up) = read_upgrade(door, stream, &mut hs.buf, &mut hs.answered).await else {
        return HandshakeEnd::Gone;
    };
    let cert_ident = match cert_ident {
        Some(ident) => Some(ident),
        None => match nerves_identity(door, stream, &up, &mut hs.answered).await {
            Ok(ident) => ident,
            Err(()) => return HandshakeEnd::Gone,
        },
    };
    let decided = cert_ident.is_some() || up.token.is_some();
    if !decided {
        if let Some(end) = refuse_undecided(door, stream, hs, up.protocol).await {
            return end;
        }
    }
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
        (Some(ident), _) => {
            let now = crate::auth::unix_now();
            if door.shared.revocation.denies(&ident.device, None, now) {
                return HandshakeEnd::Refused(CloseCode::Unauthorized, AuthError::Revoked);
            }
            ident
        }
        (None, Some(token)) => match door.shared.verifier.verify_fresh(&token).await {
            Ok(ident) => ident,
            Err(e) => return HandshakeEnd::Refused(CloseCode::Unauthorized, e),
        },
        // The conformance echo on its URL: a test suite sends no `Bearer` frame.
        (None, None) if up.protocol == Protocol::ConformanceEcho => {
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

/// An upgrade request without credentials, refused before the upgrade (Some, answered):
/// a Phoenix socket (it authenticates with connect params only: 401), or a connection
/// over the budget of unauthenticated connections (503).
async fn refuse_undecided<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    hs: &mut Handshake,
    protocol: Protocol,
) -> Option<HandshakeEnd> {
    let m = door.metrics();
    if matches!(protocol, Protocol::Phoenix(_)) || hs.over {
        hs.answered = true;
    }
    if matches!(protocol, Protocol::Phoenix(_)) {
        m.auth_failure(AuthError::Missing);
        m.handshake_failures.fetch_add(1, Relaxed);
        let message = "Phoenix sockets authenticate on the upgrade request: a token \
                       (?token=T), a client certificate or NervesHub shared-secret headers";
        http_error(stream, "401 Unauthorized", message).await;
        return Some(HandshakeEnd::Gone);
    }
    if hs.over {
        let why = Refusal::Unauthenticated;
        door.refused(why);
        http_error(stream, why.status(), why.message()).await;
        return Some(HandshakeEnd::Gone);
    }
    None
}

/// Read until the HTTP upgrade request is whole (at most [`MAX_REQUEST`]); None once
/// the connection is answered (431, 400...) or gone. Counted as a handshake failure.
async fn read_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    stream: &mut S,
    buf: &mut Vec<u8>,
    answered: &mut bool,
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
                *answered = true;
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
                *answered = true;
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
    answered: &mut bool,
) -> Result<Option<Identity>, ()> {
    let (Some(h), Protocol::Phoenix(_)) = (&up.nerves, up.protocol) else {
        return Ok(None);
    };
    let verdict = match &door.shared.nerves {
        Some(n) if !h.signature.is_empty() => n.verify(h, crate::unix_ms()),
        _ => Err(AuthError::Missing),
    };
    let why = match verdict {
        Ok((ident, Reuse::First)) => return Ok(Some(ident)),
        // The signature was used before: a device reconnecting within the second it
        // signed. Accepted once the connection it opened is gone; a copy of it cannot
        // join beside the device.
        Ok((ident, Reuse::Again)) if !connected_here(door, ident.device).await => {
            return Ok(Some(ident))
        }
        Ok(_) => AuthError::Replayed,
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
    *answered = true;
    http_error(stream, "401 Unauthorized", &msg).await;
    Err(())
}

/// Is `device` connected to this process now? (Asked of its shard; a shard that cannot
/// take the question counts as yes: the signature is then refused as a replay.)
async fn connected_here(door: &Door, device: uuid::Uuid) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ask = crate::shard::ShardMsg::Lookup { device, reply: tx };
    if crate::shard::ShardHandle::send_to_owner(&door.shared.shards, &device, ask).is_err() {
        return true;
    }
    rx.await.map_or(true, |info| info.is_some())
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
    let mut pings = 0u32;
    loop {
        let (h, mut frame) = match next_frame(door, stream, &mut hs.buf).await {
            Ok(f) => f,
            Err(end) => return end,
        };
        let payload = &mut frame[h.header_len..];
        ws::unmask(payload, h.mask);
        let whole = match h.opcode {
            OP_PING => {
                pings += 1;
                if pings > door.shared.config.max_unauthenticated_pings {
                    // Answered a few times; a device that keeps pinging without
                    // authenticating is a flood (counted as rate limited).
                    m.rate_limited.fetch_add(1, Relaxed);
                    let code = CloseCode::PolicyViolation;
                    m.close(code);
                    let close = close_frame(code, "too many pings before authentication");
                    let _ = write_all(stream, &close).await;
                    linger(stream).await;
                    return HandshakeEnd::Gone;
                }
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
        let verdict = match token {
            Some(t) => Some(door.shared.verifier.verify_fresh(t).await),
            None => None,
        };
        let why = match verdict {
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
