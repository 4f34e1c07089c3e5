//! Direct TCP links between router nodes: the latency path (requests, events for
//! devices and their replies) without the broker in the way.
//!
//! On one broker, device events and the cluster's envelopes share the broker's CPU:
//! RabbitMQ's per-connection flow control keeps a slow event stream from blocking the
//! cluster connection, but not from slowing every queue process of a saturated broker.
//! At 200,000 devices on one machine the broker was the bottleneck and requests across
//! nodes timed out behind device events. So each node also listens on a TCP port
//! (`--cluster-link`) and says where in its heartbeats; a peer that has heard it opens
//! one connection to it and writes envelopes there, length-prefixed, in order.
//!
//! The broker stays what the cluster is built on: membership and liveness come from it
//! (a link going down says nothing about its node), directory changes travel through
//! it (they must not be lost, and a node's queue tells when they were), and every
//! envelope goes through it whenever the link to its node is not up. A link is an
//! optimisation that may lose what was in flight when it broke: the origin of a request
//! asks again, as it does for any lost envelope.
//!
//! **Authentication.** Each node draws a random 128-bit token per process start and
//! publishes it in its (sealed) heartbeats on `hive.presence`. A connecting node opens
//! with a hello sealed under the cluster key over the listener's token and its own id
//! (see [`super::seal`]): knowing the token is not enough, so a broker user who reads the
//! heartbeats cannot open a link. A listener closes a connection whose hello does not
//! verify (`router_cluster_link_refused_total`). Every envelope on a link is sealed as on
//! the broker, and checked by the cluster thread. The link is plain TCP (not encrypted):
//! run the nodes on a private network, as the broker's AMQP port.
//!
//! Wire format:
//! - connector: `HIVL`, version `2`, the connector's node id (u16 length, little endian,
//!   then UTF-8), then the token's seal: the time (u64 little endian, Unix ms) and
//!   HMAC-SHA256 under the cluster key (domain `LinkHello`, `to` = the connector's id,
//!   message = the listener's token, 16 bytes little endian);
//! - listener: one byte `1` if it accepts the hello (it writes nothing else; it closes
//!   a connection it refuses);
//! - connector: frames, each a u32 length (little endian) then one rkyv `NodeMsg`
//!   (validated on receipt like one from the broker).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::seal::{ClusterKey, Domain, SEAL_LEN};
use crate::retry::Backoff;

const MAGIC: &[u8; 4] = b"HIVL";
const VERSION: u8 = 2;
/// The listener's answer to a good hello.
const ACCEPTED: u8 = 1;
/// Largest frame accepted: a request's payload is bounded by the API's body limit
/// (1 MiB) well below this.
pub(crate) const MAX_FRAME: usize = 8 << 20;
/// Envelopes waiting for one link's socket; beyond it they go through the broker.
const LINK_QUEUE: usize = 4096;
/// Frames read from all links that wait for the cluster thread.
const INBOX: usize = 8192;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A hello must arrive this soon after a connection is accepted.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct LinkMetrics {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    /// Envelopes for a node whose link was not up (or full): sent through the broker.
    pub(crate) via_broker: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) up: AtomicU64,
}

/// Where a peer's link listens, as its heartbeats say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    pub(crate) addr: String,
    pub(crate) token: u128,
}

struct Peer {
    at: PeerAddr,
    tx: mpsc::Sender<Vec<u8>>,
    up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One received envelope: who sent it (as its hello said) and its bytes.
pub(crate) type Inbound = (String, Vec<u8>);

/// This node's links: its listener's address and token, and one outgoing link per
/// peer that advertised one. Used from the cluster thread only.
pub(crate) struct Links {
    me: String,
    /// Where peers reach us; empty when links are off.
    pub(crate) advertised: String,
    pub(crate) token: u128,
    peers: Mutex<HashMap<String, Peer>>,
    pub(crate) metrics: Arc<LinkMetrics>,
    key: ClusterKey,
}

impl Links {
    /// Links off: every envelope goes through the broker.
    pub(crate) fn off(me: &str, key: ClusterKey) -> Self {
        Links {
            me: me.to_string(),
            advertised: String::new(),
            token: 0,
            peers: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
            key,
        }
    }

    /// Start accepting on `listener` (bound at startup, so a bad address stops the
    /// start); frames read go to the returned receiver. Call inside a runtime.
    pub(crate) fn start(
        me: &str,
        listener: std::net::TcpListener,
        advertised: String,
        metrics: Arc<LinkMetrics>,
        key: ClusterKey,
    ) -> std::io::Result<(Self, mpsc::Receiver<Inbound>)> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let token = random_u128();
        let (tx, rx) = mpsc::channel(INBOX);
        tokio::spawn(accept_loop(
            listener,
            token,
            key.clone(),
            tx,
            metrics.clone(),
        ));
        tracing::info!(listen = %local, advertised = %advertised, "cluster link listener");
        Ok((
            Links {
                me: me.to_string(),
                advertised,
                token,
                peers: Mutex::new(HashMap::new()),
                metrics,
                key,
            },
            rx,
        ))
    }

    #[cfg(test)]
    fn listen(me: &str, key: &ClusterKey) -> (Self, mpsc::Receiver<Inbound>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap().to_string();
        Self::start(me, l, at, Arc::default(), key.clone()).unwrap()
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A peer's heartbeat named where its link listens: connect there (again, if it
    /// moved or restarted). An empty address: the peer has links off.
    pub(crate) fn heard(&self, node: &str, at: PeerAddr) {
        if self.advertised.is_empty() || node == self.me {
            return;
        }
        let mut peers = self.peers();
        if peers.get(node).is_some_and(|p| p.at == at) {
            return;
        }
        if at.addr.is_empty() {
            peers.remove(node);
            return;
        }
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let up = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(connect_loop(
            self.me.clone(),
            self.key.clone(),
            at.clone(),
            rx,
            up.clone(),
            self.metrics.clone(),
        ));
        peers.insert(node.to_string(), Peer { at, tx, up, task });
    }

    /// The node is no longer a member.
    pub(crate) fn forget(&self, node: &str) {
        self.peers().remove(node);
    }

    /// Send an envelope to `node` over its link. Err gives the bytes back: no link is up
    /// (or its queue is full), and the caller sends them through the broker.
    pub(crate) fn send(&self, node: &str, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        let peers = self.peers();
        let sent = match peers.get(node).filter(|p| p.up.load(Relaxed)) {
            Some(p) => p.tx.try_send(bytes).map_err(|e| e.into_inner()),
            None => Err(bytes),
        };
        drop(peers);
        let m = if sent.is_ok() {
            &self.metrics.sent
        } else {
            &self.metrics.via_broker
        };
        m.fetch_add(1, Relaxed);
        sent
    }
}

/// Where the link listener binds: `off` none; `auto` the local address this host uses
/// to reach the (first) broker of `amqp`, port 0; or an explicit `IP:PORT`.
pub(crate) fn bind_addr(spec: &str, amqp: &str) -> Result<Option<SocketAddr>, String> {
    match spec {
        "off" => Ok(None),
        "auto" => match local_ip_towards(amqp) {
            Some(ip) => Ok(Some(SocketAddr::new(ip, 0))),
            None => {
                tracing::warn!(
                    "--cluster-link auto: cannot tell which address reaches the broker; \
                     links off (set --cluster-link IP:PORT)"
                );
                Ok(None)
            }
        },
        other => other
            .parse()
            .map(Some)
            .map_err(|_| format!("--cluster-link: expected auto, off or IP:PORT, got {other:?}")),
    }
}

/// The host and port of an `amqp://` / `amqps://` URL.
fn broker_host(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = if scheme.eq_ignore_ascii_case("amqps") {
        5671
    } else {
        5672
    };
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .map_or(Some(default_port), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((hostport.to_string(), default_port)),
    }
}

/// The local IP the kernel would use to reach the broker (a connected UDP socket sends
/// nothing; it only picks the route).
fn local_ip_towards(amqp: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    // The first of several broker nodes.
    let first = amqp.split(',').map(str::trim).find(|u| !u.is_empty())?;
    let (host, port) = broker_host(first)?;
    let broker = (host.as_str(), port).to_socket_addrs().ok()?.next()?;
    let any: SocketAddr = if broker.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(broker).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// 122 random bits from the OS generator (a v4 UUID).
fn random_u128() -> u128 {
    uuid::Uuid::new_v4().as_u128()
}

/// The hello a connector sends to a listener whose token is `token`.
pub(crate) fn hello(key: &ClusterKey, token: u128, me: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(7 + me.len() + SEAL_LEN);
    h.extend_from_slice(MAGIC);
    h.push(VERSION);
    let me = hello_name(me);
    h.extend_from_slice(&(me.len() as u16).to_le_bytes());
    h.extend_from_slice(me.as_bytes());
    let seal = key.seal(Domain::LinkHello, me, token.to_le_bytes().to_vec());
    h.extend_from_slice(&seal[16..]);
    h
}

/// A node id as a hello carries it (at most u16::MAX bytes, cut at a char boundary).
fn hello_name(me: &str) -> &str {
    let mut end = me.len().min(u16::MAX as usize);
    while !me.is_char_boundary(end) {
        end -= 1;
    }
    &me[..end]
}

/// One outgoing link: connect, say hello, write frames in order; on any failure mark
/// it down (senders use the broker meanwhile), drop what was queued, and retry.
async fn connect_loop(
    me: String,
    key: ClusterKey,
    at: PeerAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    up: Arc<AtomicBool>,
    metrics: Arc<LinkMetrics>,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    loop {
        match run_link(&me, &key, &at, &mut rx, &up, &metrics).await {
            Ok(()) => return, // the sender side is gone: the peer was forgotten
            Err(e) => {
                if up.swap(false, Relaxed) {
                    metrics.up.fetch_sub(1, Relaxed);
                    tracing::info!(peer = %at.addr, error = %e, "cluster link down; using the broker");
                    backoff.reset();
                }
                metrics.failures.fetch_add(1, Relaxed);
            }
        }
        // Whatever was queued for a link that failed is stale; the broker carries
        // what comes next until the link is back.
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn run_link(
    me: &str,
    key: &ClusterKey,
    at: &PeerAddr,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    up: &AtomicBool,
    metrics: &LinkMetrics,
) -> std::io::Result<()> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&at.addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let (mut read, write) = stream.into_split();
    let mut write = BufWriter::with_capacity(64 * 1024, write);
    write.write_all(&hello(key, at.token, me)).await?;
    write.flush().await?;
    let mut probe = [0u8; 1];
    let accepted = tokio::time::timeout(HELLO_TIMEOUT, read.read(&mut probe)).await;
    if !matches!(accepted, Ok(Ok(1))) || probe[0] != ACCEPTED {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the peer refused the link (stale token, or another cluster key?)",
        ));
    }
    metrics.connects.fetch_add(1, Relaxed);
    if !up.swap(true, Relaxed) {
        metrics.up.fetch_add(1, Relaxed);
    }
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some(frame) = frame else { return Ok(()) };
                write.write_all(&(frame.len() as u32).to_le_bytes()).await?;
                write.write_all(&frame).await?;
                // Write whatever else is already waiting in one go.
                while let Ok(frame) = rx.try_recv() {
                    write.write_all(&(frame.len() as u32).to_le_bytes()).await?;
                    write.write_all(&frame).await?;
                }
                write.flush().await?;
            }
            // The listener writes nothing more: readable means it closed (or went away).
            r = read.read(&mut probe) => {
                return Err(match r {
                    Ok(_) => std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "closed by the peer"),
                    Err(e) => e,
                });
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    token: u128,
    key: ClusterKey,
    inbox: mpsc::Sender<Inbound>,
    metrics: Arc<LinkMetrics>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_link(
                    stream,
                    token,
                    key.clone(),
                    inbox.clone(),
                    metrics.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors, most likely: do not spin.
                tracing::warn!(error = %e, "cluster link accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why an incoming link was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HelloError {
    BadMagic,
    BadVersion(u8),
    WrongToken,
    BadName,
}

/// Read and check a hello; returns the connecting node's id.
async fn read_hello(
    stream: &mut TcpStream,
    token: u128,
    key: &ClusterKey,
) -> Result<String, HelloError> {
    let mut head = [0u8; 4 + 1 + 2];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|_| HelloError::BadMagic)?;
    if &head[..4] != MAGIC {
        return Err(HelloError::BadMagic);
    }
    if head[4] != VERSION {
        return Err(HelloError::BadVersion(head[4]));
    }
    let len = u16::from_le_bytes([head[5], head[6]]) as usize;
    let mut name = vec![0u8; len];
    stream
        .read_exact(&mut name)
        .await
        .map_err(|_| HelloError::BadName)?;
    let name = String::from_utf8(name).map_err(|_| HelloError::BadName)?;
    // The seal over our token: the token and then the seal's bytes as read.
    let mut sealed = token.to_le_bytes().to_vec();
    sealed.resize(16 + SEAL_LEN, 0);
    stream
        .read_exact(&mut sealed[16..])
        .await
        .map_err(|_| HelloError::WrongToken)?;
    key.open(Domain::LinkHello, &name, &sealed)
        .map_err(|_| HelloError::WrongToken)?;
    Ok(name)
}

async fn serve_link(
    mut stream: TcpStream,
    token: u128,
    key: ClusterKey,
    inbox: mpsc::Sender<Inbound>,
    metrics: Arc<LinkMetrics>,
) {
    let hello = read_hello(&mut stream, token, &key);
    let from = match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
        Ok(Ok(from)) => from,
        Ok(Err(e)) => {
            metrics.refused.fetch_add(1, Relaxed);
            tracing::warn!(peer = ?stream.peer_addr().ok(), reason = ?e, "cluster link refused");
            return;
        }
        Err(_) => {
            metrics.refused.fetch_add(1, Relaxed);
            return;
        }
    };
    if stream.write_all(&[ACCEPTED]).await.is_err() {
        return;
    }
    let mut read = tokio::io::BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut len = [0u8; 4];
        if read.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            metrics.refused.fetch_add(1, Relaxed);
            tracing::warn!(peer = %from, len, "cluster link frame too large: closing the link");
            return;
        }
        let mut frame = vec![0u8; len];
        if read.read_exact(&mut frame).await.is_err() {
            return;
        }
        metrics.received.fetch_add(1, Relaxed);
        // Waits while the cluster thread is behind: TCP then pushes back on the sender.
        if inbox.send((from.clone(), frame)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Links whose connection is up now.
    fn count_up(links: &Links) -> u64 {
        links
            .peers()
            .values()
            .filter(|p| p.up.load(Relaxed))
            .count() as u64
    }

    #[test]
    fn the_bind_address_follows_the_broker() {
        assert_eq!(
            broker_host("amqp://guest:pw@10.1.2.3:5673/%2f?heartbeat=5"),
            Some(("10.1.2.3".into(), 5673))
        );
        assert_eq!(broker_host("amqps://rabbit"), Some(("rabbit".into(), 5671)));
        assert_eq!(broker_host("amqp://[::1]/vh"), Some(("::1".into(), 5672)));
        assert_eq!(
            bind_addr("auto", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            Ok(Some("127.0.0.1:0".parse().unwrap()))
        );
        assert_eq!(bind_addr("off", "amqp://x"), Ok(None));
        assert_eq!(
            bind_addr("127.0.0.7:7000", "amqp://x"),
            Ok(Some("127.0.0.7:7000".parse().unwrap()))
        );
        assert!(bind_addr("somewhere", "amqp://x")
            .unwrap_err()
            .contains("--cluster-link"));
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_a_wrong_token_is_refused() {
        let key = ClusterKey::new(b"0123456789abcdef0123456789abcdef");
        let (links, mut inbox) = Links::listen("b", &key);
        let (a, _a_inbox) = Links::listen("a", &key);
        // Not heard yet: nothing goes over a link.
        assert!(a.send("b", b"x".to_vec()).is_err());
        a.heard(
            "b",
            PeerAddr {
                addr: links.advertised.clone(),
                token: links.token,
            },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while count_up(&a) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "link never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for i in 0..100u32 {
            assert!(a.send("b", i.to_le_bytes().to_vec()).is_ok());
        }
        for i in 0..100u32 {
            let (from, bytes) = inbox.recv().await.unwrap();
            assert_eq!(from, "a");
            assert_eq!(bytes, i.to_le_bytes());
        }
        assert_eq!(a.metrics.sent.load(Relaxed), 100);
        assert_eq!(a.metrics.via_broker.load(Relaxed), 1);

        // A connector that does not know b's token is refused and never counted up.
        let (c, _c_inbox) = Links::listen("c", &key);
        c.heard(
            "b",
            PeerAddr {
                addr: links.advertised.clone(),
                token: links.token ^ 1,
            },
        );
        while links.metrics.refused.load(Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Refused: the connector sees the close and never counts the link up.
        while c.metrics.failures.load(Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "close never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count_up(&c), 0);
        assert_eq!(c.metrics.connects.load(Relaxed), 0);
        assert!(c.send("b", b"z".to_vec()).is_err());
        assert!(inbox.try_recv().is_err());

        // A connector that knows the token (anyone who reads the heartbeats on the
        // broker could) but not the cluster key is refused too.
        let refused = links.metrics.refused.load(Relaxed);
        let (e, _e_inbox) =
            Links::listen("e", &ClusterKey::new(b"another cluster key, 32 bytes..."));
        e.heard(
            "b",
            PeerAddr {
                addr: links.advertised.clone(),
                token: links.token,
            },
        );
        while links.metrics.refused.load(Relaxed) == refused {
            assert!(tokio::time::Instant::now() < deadline, "never refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while e.metrics.failures.load(Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "close never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count_up(&e), 0);
        assert!(inbox.try_recv().is_err());

        // The peer is forgotten: its link closes and sends fall back to the broker.
        a.forget("b");
        assert!(a.send("b", b"y".to_vec()).is_err());
    }
}
