//! The shard thread: its runtime and its one loop. The loop owns the shard's state and
//! waits on everything that can move it: the poller's readiness of authenticated
//! connections, the inbox, the tick, the listener and connections handed back by
//! handshake tasks. Each pass handles what woke it, then settles the connections it
//! changed and hands urgent events to the bus. Backpressure from the bus is a state of
//! the loop, not a wait inside it: while throttled it reads no device but still serves
//! the inbox, the tick and the listener.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::sync::mpsc;

use super::owner::Shard;
use super::poller::{self, Poller};
use super::timer::TICK;
use super::{coarse_secs, Adopt, Door, ShardCtx, ShardMsg, READ_BUF};
use crate::listener::{Accepted, ACCEPT_BACKOFF};
use crate::protocol::json::Scratch;
use crate::Shared;

/// The shard thread's body: build the runtime, accept, serve; on Drain, close
/// connections gradually and return when none is left. With `api` (a process of one
/// shard) the HTTP API runs here too, and stops once the connections are gone.
pub(crate) fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    rx: crossbeam_channel::Receiver<ShardMsg>,
    listener: std::net::TcpListener,
    api: Option<crate::ApiPart>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(shard = id, error = %e, "cannot build shard runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let api_threads = local.block_on(&rt, serve(id, shared, rx, listener, api));
    if let Some(t) = api_threads {
        t.join();
    }
}

/// The shard's loop on its runtime, until the drain is over; then the API's threads
/// (if it ran here) to wait for.
async fn serve(
    id: usize,
    shared: Arc<Shared>,
    rx: crossbeam_channel::Receiver<ShardMsg>,
    listener: std::net::TcpListener,
    api: Option<crate::ApiPart>,
) -> Option<crate::ApiThreads> {
    let api = api.map(|a| tokio::task::spawn_local(a.serve(shared.clone())));
    let poller = match Poller::new() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(shard = id, error = %e, "cannot create the connection poller");
            return None;
        }
    };
    // SAFETY: the std listener owns its descriptor, which stays open and the same for
    // as long as the AsyncFd holds the listener.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE)
    };
    let listener = match registered {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = id, error = %e, "cannot register listener");
            return None;
        }
    };
    let (door, adopted) = Door::new(id, shared.clone());
    let door = Rc::new(door);
    let ctx = new_ctx(id, &shared, door.clone());
    Loop {
        shard: Shard::new(ctx, poller),
        door,
        inbox: rx,
        adopted,
        listener: Some(listener),
        accept_paused_until: None,
        inbox_more: false,
        accept_more: false,
        poller_ok: true,
        throttled: None,
        hard_stop: None,
    }
    .run()
    .await;
    // The API on this thread: devices are gone, end SSE streams and let it finish
    // what it holds (the process's stop does the same for an API thread).
    let api = api?;
    shared.shutdown.send_replace(true);
    api.await.ok()
}

fn new_ctx(id: usize, shared: &Arc<Shared>, door: Rc<Door>) -> ShardCtx {
    ShardCtx {
        id,
        shared: shared.clone(),
        door,
        pending: Default::default(),
        read_buf: vec![0u8; READ_BUF],
        plain_buf: Vec::new(),
        scratch: Scratch::default(),
        started: coarse_secs(),
        clock: 0,
        dirty: Vec::new(),
        batch: Default::default(),
        expiries: shared.config.close_on_token_expiry.then(Default::default),
        account_rates: (shared.config.account_max_rate > 0).then(Default::default),
    }
}

/// Inbox messages served per pass before the loop yields (API calls, hand-overs).
const INBOX_PER_PASS: usize = 1024;
/// While throttled, how often the loop looks whether the bus has drained.
const RELIEF_CHECK: Duration = Duration::from_millis(1);
/// After the drain's deadline, how long the loop waits for the last connections and
/// handshakes before it stops anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// The shard's one loop and what it waits on.
struct Loop {
    /// The shard's connections and their environment, owned here alone.
    shard: Shard,
    door: Rc<Door>,
    inbox: crossbeam_channel::Receiver<ShardMsg>,
    /// Authenticated connections from this shard's handshake tasks.
    adopted: mpsc::UnboundedReceiver<Adopt>,
    /// None once the shard drains: no new connections here (other processes on the
    /// port keep accepting).
    listener: Option<AsyncFd<std::net::TcpListener>>,
    /// Accepting failed (out of descriptors or similar): not before this.
    accept_paused_until: Option<Instant>,
    /// The last pass left inbox messages for the next.
    inbox_more: bool,
    /// The last pass left connections in the listener's queue.
    accept_more: bool,
    /// False after the poller failed (logged; the shard still serves its inbox).
    poller_ok: bool,
    /// The bus pushed back: devices are not read until it has drained; the next look
    /// at the bus is due then.
    throttled: Option<Instant>,
    /// Draining: stop at this instant even if connections are left.
    hard_stop: Option<Instant>,
}

/// What woke the loop.
enum Wake<'a> {
    Ready(io::Result<()>),
    Relief,
    Inbox,
    Adopted(Option<Adopt>),
    Tick,
    Listener(io::Result<AsyncFdReadyGuard<'a, std::net::TcpListener>>),
}

impl Loop {
    async fn run(mut self) {
        let mut evs = Vec::with_capacity(poller::BATCH);
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shard.ctx.shared.clone();
        let notify = &shared.shards[self.shard.ctx.id].notify;
        loop {
            let busy = self.inbox_more || self.accept_more || evs.len() == poller::BATCH;
            if busy {
                // Let the handshake tasks (and the API, with one shard) have their turn.
                tokio::task::yield_now().await;
            }
            evs.clear();
            let accepting = self.listener.is_some()
                && self.accept_paused_until.is_none_or(|t| Instant::now() >= t);
            let wake = tokio::select! {
                r = self.shard.poller.wait(&mut evs), if self.poller_ok && self.throttled.is_none() => Wake::Ready(r),
                _ = relief_due(self.throttled) => Wake::Relief,
                _ = notify.notified(), if !self.inbox_more => Wake::Inbox,
                _ = std::future::ready(()), if self.inbox_more => Wake::Inbox,
                a = self.adopted.recv() => Wake::Adopted(a),
                _ = ticker.tick() => Wake::Tick,
                r = listener_ready(self.listener.as_ref()), if accepting => Wake::Listener(r),
            };
            match wake {
                Wake::Ready(Ok(())) => {
                    self.shard.ctx.refresh_clock();
                    for &(key, ev) in &evs {
                        self.shard.on_event(key as u32, ev);
                    }
                }
                Wake::Ready(Err(e)) => {
                    tracing::error!(shard = self.shard.ctx.id, error = %e, "connection poller failed");
                    self.poller_ok = false;
                }
                // (Looked at below, as after every pass while throttled.)
                Wake::Relief => {}
                Wake::Inbox => self.serve_inbox(),
                Wake::Adopted(a) => {
                    // (Never None: the door holds a sender for as long as the loop runs.)
                    for a in a
                        .into_iter()
                        .chain(std::iter::from_fn(|| self.adopted.try_recv().ok()))
                    {
                        self.shard.adopt(a);
                    }
                }
                Wake::Tick => self.shard.tick(),
                Wake::Listener(Ok(guard)) => {
                    let shard = &mut self.shard;
                    let end = crate::listener::accept_batch(&self.door, guard, |a| shard.adopt(a));
                    self.accept_more = end == Accepted::More;
                    self.accept_paused_until = (end == Accepted::Failed)
                        // Out of descriptors or similar: back off instead of spinning.
                        .then(|| Instant::now() + ACCEPT_BACKOFF);
                }
                Wake::Listener(Err(e)) => {
                    tracing::error!(shard = self.shard.ctx.id, error = %e, "listener lost");
                    self.listener = None;
                    self.accept_more = false;
                }
            }
            self.shard.settle_dirty();
            self.shard.ctx.wake_bus_if_urgent();
            self.backpressure();
            if self.drained() {
                break;
            }
        }
        // Device-alive events still waiting for a tick.
        self.shard.ctx.wake_bus();
    }

    /// End of a pass: throttled by the bus, or relieved. The bus gets this shard's
    /// events and a wake-up when reading stops; whether it has drained is looked at
    /// after every pass while throttled (and every [`RELIEF_CHECK`] when nothing else
    /// wakes the loop).
    fn backpressure(&mut self) {
        // Relieved, the held connections go on (and may fill the bus again at once).
        let relieved = self.throttled.is_some() && self.shard.relieve_if_drained();
        let was = if relieved { None } else { self.throttled };
        match (was, self.shard.ctx.throttled()) {
            (_, false) => self.throttled = None,
            (None, true) => {
                self.shard.ctx.press_bus();
                self.throttled = Some(Instant::now() + RELIEF_CHECK);
            }
            (Some(due), true) if Instant::now() >= due => {
                self.throttled = Some(Instant::now() + RELIEF_CHECK);
            }
            (Some(_), true) => {}
        }
    }

    /// Up to [`INBOX_PER_PASS`] messages; a drain message starts the shard's drain.
    fn serve_inbox(&mut self) {
        self.inbox_more = false;
        for _ in 0..INBOX_PER_PASS {
            let Ok(msg) = self.inbox.try_recv() else {
                return;
            };
            if !self.shard.handle(msg) && self.hard_stop.is_none() {
                self.start_drain();
            }
        }
        self.inbox_more = !self.inbox.is_empty();
    }

    /// No new connections; the tick closes ours gradually; messages are still served.
    fn start_drain(&mut self) {
        self.listener = None;
        self.accept_more = false;
        self.shard.tick();
        let until = self.shard.drain_until().unwrap_or_else(Instant::now);
        self.hard_stop = Some(until + DRAIN_GRACE);
    }

    /// Draining, and the connections and handshakes are gone (or the grace is over).
    fn drained(&self) -> bool {
        let Some(hard_stop) = self.hard_stop else {
            return false;
        };
        // (A handshake task counts until it has handed its connection back.)
        let idle = self.shard.routes.is_empty()
            && self.shard.ctx.metrics().handshakes.load(Relaxed) == 0
            && self.adopted.is_empty();
        idle || Instant::now() >= hard_stop
    }
}

/// While throttled: the next look at the bus (never, when not throttled). An async fn,
/// so no timer is made on a pass that does not poll it.
async fn relief_due(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The listener has a connection to accept (never, without a listener).
async fn listener_ready(
    l: Option<&AsyncFd<std::net::TcpListener>>,
) -> io::Result<AsyncFdReadyGuard<'_, std::net::TcpListener>> {
    match l {
        Some(l) => l.readable().await,
        None => std::future::pending().await,
    }
}
