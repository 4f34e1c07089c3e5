//! Accept, HTTP upgrade and authentication. Owns a connection only until it is
//! authenticated, then hands it to the shard that owns the device. A connection
//! here is quarantined: before a valid token nothing it sends is parsed as JSON.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{AuthError, Identity};
use crate::metrics::GaugeHold;
use crate::protocol::hivekit;
use crate::protocol::ws::{self, CloseCode, WsError, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use crate::shard::{shard_of, Adopt, Protocol, ShardCtx, ShardMsg};
use crate::Shared;
use upgrade::{parse_upgrade, switching_protocols};

pub mod proxy;
mod upgrade;

/// Largest HTTP upgrade request accepted (431 beyond).
const MAX_REQUEST: usize = 8 * 1024;
/// How long to linger after sending a close frame during the handshake.
const LINGER: Duration = Duration::from_millis(500);
/// Failed `Bearer` frames a Hivekit connection may send before it is closed with 4401
/// (each answered `aut`/`err`; the socket stays open for the next, within --auth-timeout).
pub const MAX_AUTH_ATTEMPTS: u32 = 5;

/// A device socket counted in `router_open_connections` (which --max-connections caps):
/// taken when the listener admits it, carried through the handshake and the hand-over,
/// kept by the adopted connection; given back when whoever holds it last drops it.
pub struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    pub fn new(shared: &Arc<Shared>) -> Self {
        shared.metrics.open_connections.fetch_add(1, Relaxed);
        OpenConnection(shared.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.open_connections.fetch_sub(1, Relaxed);
    }
}

/// Create the shard listeners: all bound to the same address with SO_REUSEPORT, so
/// the kernel spreads connections across shards (and across router processes).
/// `defer_accept` > 0: TCP_DEFER_ACCEPT for that many seconds (see `--defer-accept`).
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
    defer_accept: u32,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt per
        // connection less (`accepted_sockets_have_nodelay` checks the kernel does).
        s.set_nodelay(true)?;
        s.bind(&bound.into())?;
        if defer_accept > 0 {
            let secs = defer_accept as libc::c_int;
            // SAFETY: setsockopt on a socket we own, with a c_int option value.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    &secs as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        s.listen(4096)?;
        let l: std::net::TcpListener = s.into();
        // Port 0 resolves once: the other shards join the port the first one got.
        bound = l.local_addr()?;
        out.push(l);
    }
    Ok((bound, out))
}

/// Connections accepted per listener wake-up before the shard's other tasks get a turn.
const ACCEPTS_PER_WAKE: usize = 64;

pub(crate) async fn accept_loop(ctx: Rc<ShardCtx>, listener: AsyncFd<std::net::TcpListener>) {
    loop {
        let mut guard = match listener.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(shard = ctx.id, error = %e, "listener lost");
                return;
            }
        };
        let mut drained = false;
        for _ in 0..ACCEPTS_PER_WAKE {
            match accept_nonblocking(guard.get_inner()) {
                Ok((stream, peer)) => on_accept(&ctx, stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!(shard = ctx.id, error = %e, "accept failed");
                    drop(guard);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    drained = true;
                    break;
                }
            }
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// accept4 with SOCK_NONBLOCK: the socket comes out ready for the poller, one
/// syscall instead of two.
fn accept_nonblocking(l: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: sockaddr_storage is plain integers and byte arrays, for which all zero
    // bytes is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4 on our listening socket, writing at most `len` bytes into `addr`.
    let fd = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            &mut addr as *mut _ as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = match sockaddr_to_std(&addr) {
        Some(a) => a,
        None => stream.peer_addr()?,
    };
    Ok((stream, peer))
}

fn sockaddr_to_std(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn on_accept(ctx: &Rc<ShardCtx>, stream: std::net::TcpStream, peer: SocketAddr) {
    ctx.metrics().accepted.fetch_add(1, Relaxed);
    let proxied = ctx.shared.config.proxy_protocol != proxy::Mode::Off;
    // Behind a balancer the per-IP rate waits for the header's address (below).
    let admitted = if proxied {
        ctx.admit_connection()
    } else {
        ctx.admit(peer.ip())
    };
    if let Err(why) = admitted {
        // Refused fast, before reading anything: never queued, never hung.
        if let Ok(s) = TcpStream::from_std(stream) {
            tokio::task::spawn_local(refuse(s, why.status(), why.message()));
        }
        return;
    }
    let open = OpenConnection::new(&ctx.shared);
    if proxied {
        match TcpStream::from_std(stream) {
            Ok(s) => {
                tokio::task::spawn_local(handle_proxied(ctx.clone(), s, peer, open));
            }
            Err(e) => tracing::warn!(error = %e, "cannot register an accepted socket"),
        }
        return;
    }
    let (stream, first, open) = if ctx.shared.tls.is_none() {
        match fast_path(ctx, stream, peer, open) {
            Fast::Done => return,
            Fast::Continue(stream, bytes, open) => (stream, bytes, open),
            Fast::Gone => {
                ctx.metrics().handshake_failures.fetch_add(1, Relaxed);
                return;
            }
        }
    } else {
        (stream, Vec::new(), open)
    };
    match TcpStream::from_std(stream) {
        Ok(s) => {
            tokio::task::spawn_local(handle_new(ctx.clone(), s, peer, first, open));
        }
        Err(e) => tracing::warn!(error = %e, "cannot register an accepted socket"),
    }
}

enum Fast {
    /// Authenticated and handed over (or refused as busy): nothing left to do here.
    Done,
    /// Not decided by what was there: the handshake goes on, from these bytes.
    Continue(std::net::TcpStream, Vec<u8>, OpenConnection),
    /// The peer closed or reset before saying anything.
    Gone,
}

/// With TCP_DEFER_ACCEPT the upgrade request is usually in the socket already at
/// accept. If it is complete and carries a valid token, the device is adopted right
/// here: no task, no timer, no tokio registration for its short handshake. Anything
/// else (partial request, token in the first frame, a refusal to answer) goes the
/// general way with the bytes read so far.
fn fast_path(
    ctx: &Rc<ShardCtx>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    open: OpenConnection,
) -> Fast {
    let mut buf = [0u8; 4096];
    let n = match io::Read::read(&mut &stream, &mut buf) {
        Ok(0) => return Fast::Gone,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Fast::Continue(stream, Vec::new(), open)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            return Fast::Continue(stream, Vec::new(), open)
        }
        Err(_) => return Fast::Gone,
    };
    let bytes = &buf[..n];
    let Ok(Some(up)) = parse_upgrade(bytes) else {
        return Fast::Continue(stream, bytes.to_vec(), open);
    };
    let Some(token) = up.token.as_deref() else {
        return Fast::Continue(stream, bytes.to_vec(), open);
    };
    let Ok(ident) = ctx.shared.verifier.verify(token) else {
        // The general path answers the refusal (101, close 4401, linger).
        return Fast::Continue(stream, bytes.to_vec(), open);
    };
    hand_over(
        ctx,
        Adopt {
            stream,
            tls: None,
            ident,
            peer,
            protocol: up.protocol,
            leftover: bytes[up.consumed..].to_vec(),
            deflate: up.deflate && ctx.shared.config.permessage_deflate,
            preface: switching_protocols(
                &up.key,
                up.deflate && ctx.shared.config.permessage_deflate,
            )
            .into_bytes(),
            open,
        },
    );
    Fast::Done
}

/// An authenticated connection to the shard that owns its device (this one or another).
fn hand_over(ctx: &Rc<ShardCtx>, adopt: Adopt) {
    let m = ctx.metrics();
    let target = shard_of(&adopt.ident.device, ctx.shared.shards.len());
    if target == ctx.id {
        ctx.adopt(adopt);
        return;
    }
    if let Err(ShardMsg::Adopt(a)) =
        ctx.shared.shards[target].send(ShardMsg::Adopt(Box::new(adopt)))
    {
        // Owner's inbox is full: refuse fast rather than queue forever.
        let code = CloseCode::TryAgainLater;
        m.close(code);
        if a.tls.is_none() {
            let mut frames = a.preface;
            frames.extend_from_slice(&close_frame(code, "router busy, retry later"));
            let _ = io::Write::write(&mut &a.stream, &frames);
        }
    } else {
        m.handoffs.fetch_add(1, Relaxed);
    }
}

async fn refuse(mut stream: TcpStream, status: &'static str, why: &'static str) {
    let _ = tokio::time::timeout(LINGER, http_error(&mut stream, status, why)).await;
}

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
        deflate: bool,
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
async fn handle_proxied(
    ctx: Rc<ShardCtx>,
    mut stream: TcpStream,
    balancer: SocketAddr,
    open: OpenConnection,
) {
    let cfg = &ctx.shared.config;
    let within = Duration::from_secs(cfg.auth_timeout);
    let peer = match proxy::read_header(&mut stream, cfg.proxy_protocol, within).await {
        Ok(source) => source.unwrap_or(balancer),
        Err(why) => {
            ctx.metrics().proxy_refused.fetch_add(1, Relaxed);
            tracing::debug!(%balancer, why, "connection without a valid PROXY header closed");
            return;
        }
    };
    if let Err(why) = ctx.admit_ip(peer.ip()) {
        // Not counted while the refusal lingers (as a connection refused at accept).
        drop(open);
        refuse(stream, why.status(), why.message()).await;
        return;
    }
    handle_new(ctx, stream, peer, Vec::new(), open).await;
}

async fn handle_new(
    ctx: Rc<ShardCtx>,
    stream: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    open: OpenConnection,
) {
    let m = ctx.metrics();
    let handshaking = GaugeHold::new(&m.handshakes);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(ctx.shared.config.auth_timeout);
    let done = match ctx.shared.tls.clone() {
        None => {
            let mut s = stream;
            upgrade_and_auth(&ctx, &mut s, None, deadline, first)
                .await
                .map(|auth| (s, None, auth))
        }
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(mut tls)) => {
                // mTLS: a certificate rustls verified against --client-ca names the device.
                let field = &ctx.shared.config.mtls_account_field;
                let cert_ident = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::tls::identity_from_cert(c, field));
                match upgrade_and_auth(&ctx, &mut tls, cert_ident, deadline, Vec::new()).await {
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
    hand_over(
        &ctx,
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
}

/// Upgrade and authenticate within the deadline; on refusal answer (close code or HTTP
/// status) and linger. Some: who the device is, its protocol, bytes already read.
async fn upgrade_and_auth<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &ShardCtx,
    s: &mut S,
    cert_ident: Option<Identity>,
    deadline: tokio::time::Instant,
    first: Vec<u8>,
) -> Option<(Identity, Protocol, bool, Vec<u8>, Vec<u8>)> {
    let m = ctx.metrics();
    let mut hs = Handshake {
        buf: first,
        upgraded: false,
        protocol: None,
        preface: Vec::new(),
    };
    let outcome = match tokio::time::timeout_at(deadline, handshake(ctx, s, &mut hs, cert_ident))
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

fn close_frame(code: CloseCode, reason: &str) -> Vec<u8> {
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

async fn http_error<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, status: &str, message: &str) {
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
    ctx: &ShardCtx,
    stream: &mut S,
    hs: &mut Handshake,
    cert_ident: Option<Identity>,
) -> HandshakeEnd {
    // 1. The HTTP upgrade request.
    let Some(up) = read_upgrade(ctx, stream, &mut hs.buf).await else {
        return HandshakeEnd::Gone;
    };
    let cert_ident = match cert_ident {
        Some(ident) => Some(ident),
        None => match nerves_identity(ctx, stream, &up).await {
            Ok(ident) => ident,
            Err(()) => return HandshakeEnd::Gone,
        },
    };
    let decided = cert_ident.is_some() || up.token.is_some();
    // permessage-deflate only where authentication is decided by the upgrade request:
    // a first-frame `Bearer` is read by the listener, which does not inflate.
    let deflate = up.deflate && ctx.shared.config.permessage_deflate && decided;
    let resp = switching_protocols(&up.key, deflate);
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
        (None, Some(token)) => match ctx.shared.verifier.verify(&token) {
            Ok(ident) => ident,
            Err(e) => return HandshakeEnd::Refused(CloseCode::Unauthorized, e),
        },
        // Phoenix sockets authenticate with connect params only.
        (None, None) if matches!(up.protocol, Protocol::Phoenix(_)) => {
            return HandshakeEnd::Refused(CloseCode::Unauthorized, AuthError::Missing)
        }
        (None, None) => return bearer_frame(ctx, stream, hs, up.protocol).await,
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
    ctx: &ShardCtx,
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<upgrade::Upgrade> {
    let m = ctx.metrics();
    loop {
        match parse_upgrade(buf) {
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
    ctx: &ShardCtx,
    stream: &mut S,
    up: &upgrade::Upgrade,
) -> Result<Option<Identity>, ()> {
    let (Some(h), Protocol::Phoenix(_)) = (&up.nerves, up.protocol) else {
        return Ok(None);
    };
    let verdict = match &ctx.shared.nerves {
        Some(n) if !h.signature.is_empty() => n.verify(h, crate::unix_ms()),
        _ => Err(AuthError::Missing),
    };
    let why = match verdict {
        Ok(ident) => return Ok(Some(ident)),
        Err(why) => why,
    };
    let m = ctx.metrics();
    m.auth_failure(why);
    m.handshake_failures.fetch_add(1, Relaxed);
    let msg = match why {
        AuthError::Missing if ctx.shared.nerves.is_none() => {
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
    ctx: &ShardCtx,
    stream: &mut S,
    hs: &mut Handshake,
    protocol: Protocol,
) -> HandshakeEnd {
    let m = ctx.metrics();
    let mut message: Option<Vec<u8>> = None;
    let mut failures = 0u32;
    loop {
        let (h, mut frame) = match next_frame(ctx, stream, &mut hs.buf).await {
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
                match reassemble(&mut message, &h, payload, ctx.shared.config.max_frame) {
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
        let why = match token.map(|t| ctx.shared.verifier.verify(t)) {
            Some(Ok(ident)) => {
                return HandshakeEnd::Authenticated {
                    ident,
                    protocol,
                    deflate: false,
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
    ctx: &ShardCtx,
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(ws::FrameHeader, Vec<u8>), HandshakeEnd> {
    let m = ctx.metrics();
    loop {
        let h = match ws::parse_header(buf, ctx.shared.config.max_frame) {
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

#[cfg(test)]
mod tests {
    /// The router no longer sets TCP_NODELAY per connection: it relies on accepted
    /// sockets inheriting it from the listener. If a kernel did not, every small frame
    /// would wait for Nagle (40 ms ack latency): this fails first.
    #[test]
    fn accepted_sockets_have_nodelay() {
        let (addr, listeners) =
            super::bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 0).unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let l = &listeners[0];
        let accepted = loop {
            match super::accept_nonblocking(l) {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert!(!client.nodelay().unwrap());
    }
}
