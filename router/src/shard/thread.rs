//! The shard thread: its runtime, its poller, its accept loop, its timer and its inbox.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::admission::Admission;
use super::poller::{self, Poller};
use super::timer::TICK;
use super::{coarse_secs, ShardCtx, ShardMsg, READ_BUF};
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

/// The shard's tasks on its runtime, until the drain is over; then the API's threads
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
    let ctx = new_ctx(id, &shared, poller);
    let driver = tokio::task::spawn_local(drive_connections(ctx.clone()));
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
    let accept = tokio::task::spawn_local(crate::listener::accept_loop(ctx.clone(), listener));
    let ticker = tokio::task::spawn_local(tick(ctx.clone()));
    serve_inbox(&ctx, &rx).await;
    // Draining: no new connections here (other processes on the port keep accepting);
    // the tick closes ours gradually; messages are still served.
    accept.abort();
    drain(&ctx, &rx).await;
    ticker.abort();
    driver.abort();
    // Device-alive events still waiting for a tick.
    ctx.wake_bus();
    // The API on this thread: devices are gone, end SSE streams and let it finish
    // what it holds (the process's stop does the same for an API thread).
    let api = api?;
    shared.shutdown.send_replace(true);
    api.await.ok()
}

fn new_ctx(id: usize, shared: &Arc<Shared>, poller: Poller) -> Rc<ShardCtx> {
    Rc::new(ShardCtx {
        id,
        shared: shared.clone(),
        routes: RefCell::new(HashMap::new()),
        pending: RefCell::new(Default::default()),
        read_buf: RefCell::new(vec![0u8; READ_BUF]),
        plain_buf: RefCell::new(Vec::new()),
        scratch: RefCell::new(Scratch::default()),
        next_conn_id: Cell::new(0),
        ticks: Cell::new(0),
        started: coarse_secs(),
        clock: Cell::new(0),
        drain: Cell::new(None),
        admission: RefCell::new(Admission::new(
            shared.config.ip_connect_rate,
            shared.config.max_connections,
        )),
        poller,
        slab: RefCell::new(Default::default()),
        dirty_notify: Notify::new(),
        batch: RefCell::new(Default::default()),
    })
}

/// The driver: the authenticated connections' readiness (one epoll), then the dirty
/// slots and the bus batch, pausing while the bus pushes back.
async fn drive_connections(ctx: Rc<ShardCtx>) {
    let mut evs = Vec::with_capacity(poller::BATCH);
    loop {
        tokio::select! {
            r = ctx.poller.wait(&mut evs) => {
                if let Err(e) = r {
                    tracing::error!(shard = ctx.id, error = %e, "connection poller failed");
                    return;
                }
                ctx.refresh_clock();
                for &(key, ev) in &evs {
                    ctx.on_event(key as u32, ev);
                }
            }
            _ = ctx.dirty_notify.notified() => {}
        }
        ctx.settle_dirty();
        ctx.wake_bus_if_urgent();
        if ctx.throttled() {
            ctx.wait_relieved().await;
        }
        if evs.len() == poller::BATCH {
            tokio::task::yield_now().await;
        }
        evs.clear();
    }
}

/// Pings, timeouts, the gradual drain: every [`TICK`].
async fn tick(ctx: Rc<ShardCtx>) {
    let mut iv = tokio::time::interval(TICK);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        ctx.tick();
    }
}

/// The inbox (API calls, hand-overs, the drain), until a message says stop.
async fn serve_inbox(ctx: &Rc<ShardCtx>, rx: &crossbeam_channel::Receiver<ShardMsg>) {
    let handle = &ctx.shared.shards[ctx.id];
    'inbox: loop {
        // Drain in bounded batches so the driver, the handshakes and the ticker get
        // their turn.
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(msg) => {
                    if !ctx.handle(msg) {
                        return;
                    }
                }
                Err(_) => {
                    handle.notify.notified().await;
                    continue 'inbox;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Until the connections and handshakes are gone (or 5 s past the drain's end), still
/// serving the inbox.
async fn drain(ctx: &Rc<ShardCtx>, rx: &crossbeam_channel::Receiver<ShardMsg>) {
    ctx.tick();
    let hard_stop = ctx.drain.get().map_or_else(Instant::now, |d| d.until) + Duration::from_secs(5);
    while Instant::now() < hard_stop
        && (!ctx.routes.borrow().is_empty() || ctx.metrics().handshakes.load(Relaxed) > 0)
    {
        while let Ok(msg) = rx.try_recv() {
            let _ = ctx.handle(msg);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
