//! Accept, HTTP upgrade and authentication. Owns a connection only until it is
//! authenticated, then hands it to the shard that owns the device. A connection
//! here is quarantined: before a valid token nothing it sends is parsed as JSON.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFdReadyGuard;
use tokio::net::TcpStream;

use crate::protocol::ws::{self, CloseCode};
use crate::shard::{shard_of, Adopt, Door, ShardMsg};
use crate::Shared;
use handshake::{close_frame, http_error};
use upgrade::{parse_upgrade, switching_protocols};

pub(crate) mod budget;
mod handshake;
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
pub(crate) struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
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

/// After a failed accept (out of descriptors or similar), the listener rests this long.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How a batch of accepts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// The queue is empty: wait for the listener's next readiness.
    Drained,
    /// [`ACCEPTS_PER_WAKE`] taken and more may wait: come back after a yield.
    More,
    /// Accepting failed: rest [`ACCEPT_BACKOFF`].
    Failed,
}

/// Accept what the listener holds, up to [`ACCEPTS_PER_WAKE`]: refuse, adopt (`adopt`,
/// for a device of this shard authenticated at once) or start a handshake task.
pub(crate) fn accept_batch(
    door: &Rc<Door>,
    mut ready: AsyncFdReadyGuard<'_, std::net::TcpListener>,
    mut adopt: impl FnMut(Adopt),
) -> Accepted {
    for _ in 0..ACCEPTS_PER_WAKE {
        match accept_nonblocking(ready.get_inner()) {
            Ok((stream, peer)) => {
                if let Some(a) = on_accept(door, stream, peer) {
                    adopt(a);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                return Accepted::Drained;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(shard = door.id, error = %e, "accept failed");
                return Accepted::Failed;
            }
        }
    }
    Accepted::More
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

/// A new socket: refused, or authenticated at once (Some: a device of this shard, for
/// the caller to adopt), or handed to a handshake task.
fn on_accept(door: &Rc<Door>, stream: std::net::TcpStream, peer: SocketAddr) -> Option<Adopt> {
    door.metrics().accepted.fetch_add(1, Relaxed);
    let proxied = door.shared.config.proxy_protocol != proxy::Mode::Off;
    // Behind a balancer the per-IP rate waits for the header's address (below).
    let admitted = if proxied {
        door.admit_connection()
    } else {
        door.admit(peer.ip())
    };
    if let Err(why) = admitted {
        // Refused fast, before reading anything: never queued, never hung.
        if let Ok(s) = TcpStream::from_std(stream) {
            tokio::task::spawn_local(refuse(s, why.status(), why.message()));
        }
        return None;
    }
    let open = OpenConnection::new(&door.shared);
    if proxied {
        match TcpStream::from_std(stream) {
            Ok(s) => {
                tokio::task::spawn_local(handshake::handle_proxied(door.clone(), s, peer, open));
            }
            Err(e) => tracing::warn!(error = %e, "cannot register an accepted socket"),
        }
        return None;
    }
    let (stream, first, open) = if door.shared.tls.is_none() {
        match fast_path(door, stream, peer, open) {
            Fast::Done(a) => return a,
            Fast::Continue(stream, bytes, open) => (stream, bytes, open),
            Fast::Gone => {
                door.metrics().handshake_failures.fetch_add(1, Relaxed);
                return None;
            }
        }
    } else {
        (stream, Vec::new(), open)
    };
    let s = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register an accepted socket");
            return None;
        }
    };
    match door.unauthenticated(peer.ip()) {
        Ok(place) => {
            tokio::task::spawn_local(handshake::handle_new(
                door.clone(),
                s,
                peer,
                first,
                (open, place),
            ));
        }
        Err(why) => {
            // Not counted while the refusal lingers (as a connection refused at accept).
            drop(open);
            tokio::task::spawn_local(refuse(s, why.status(), why.message()));
        }
    }
    None
}

enum Fast {
    /// Authenticated: a device of this shard to adopt (Some), or handed to its own
    /// shard or refused as busy (None).
    Done(Option<Adopt>),
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
    door: &Door,
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
    let Ok(Some(up)) = parse_upgrade(bytes, door.shared.config.websocket_conformance_echo) else {
        return Fast::Continue(stream, bytes.to_vec(), open);
    };
    let Some(token) = up.token.as_deref() else {
        return Fast::Continue(stream, bytes.to_vec(), open);
    };
    let Ok(ident) = door.shared.verifier.verify(token) else {
        // The general path answers the refusal (101, close 4401, linger).
        return Fast::Continue(stream, bytes.to_vec(), open);
    };
    if door.shared.tenants.full(&ident.account) {
        // Refused (4429) and counted by the general path.
        return Fast::Continue(stream, bytes.to_vec(), open);
    }
    let offer = up.deflate.filter(|_| door.shared.config.permessage_deflate);
    let mine = hand_over(
        door,
        Adopt {
            stream,
            tls: None,
            ident,
            peer,
            protocol: up.protocol,
            leftover: bytes[up.consumed..].to_vec(),
            deflate: offer.map_or(ws::Deflate::Off, ws::Deflate::for_window),
            preface: switching_protocols(&up.key, offer).into_bytes(),
            open,
        },
    );
    Fast::Done(mine)
}

/// An authenticated connection to the shard that owns its device: Some if that is this
/// one (for the caller to adopt or hand back), else sent to the owner's inbox.
fn hand_over(door: &Door, adopt: Adopt) -> Option<Adopt> {
    let m = door.metrics();
    let target = shard_of(&adopt.ident.device, door.shared.shards.len());
    if target == door.id {
        return Some(adopt);
    }
    if let Err(ShardMsg::Adopt(a)) =
        door.shared.shards[target].send(ShardMsg::Adopt(Box::new(adopt)))
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
    None
}

pub(super) async fn refuse(mut stream: TcpStream, status: &'static str, why: &'static str) {
    let _ = tokio::time::timeout(LINGER, http_error(&mut stream, status, why)).await;
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
