//! The coordinator: starts the worker processes, follows the ramp, runs the phases
//! (the backend's requests, storms, event-interval changes: `phases`) and the event
//! watcher (`events`), samples router RSS and the per-second timeline, serves --metrics,
//! stops everything, waits for events still in flight and has the report assembled
//! (`assemble`: with --amqp, the per-device event counts against the workers' record of
//! what they sent). It holds no device sockets itself.

mod assemble;
mod events;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{self, Backend, Sinks};
use crate::cli::Args;
use crate::metrics;
use crate::phases;
use crate::pool::{self, Workers};
use crate::progress::Live;
use crate::scenario::{self, Segment};
use crate::timeline::{Timeline, Totals};
use crate::worker::WorkerResult;
use assemble::{Measured, RouterFigures, Sent};
use events::Events;

/// How often the coordinator looks at the workers' counts during the ramp (they report
/// every 100 ms): the ramp's measured duration is this precise.
const RAMP_POLL: Duration = Duration::from_millis(50);

/// Devices per node the backend aims its requests at (a random one each time).
const TARGETS_PER_NODE: usize = 5000;

/// SCHED_FIFO priority 1 for this thread: the coordinator is one thread (see `run`).
fn realtime() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// SCHED_FIFO priority 1 for every thread of this process named `comm` (lapin's I/O
/// thread of the event consumer: the other half of the stopwatch for event latency; on a
/// saturated machine it waited for a CPU long enough to hold events at the broker for
/// tens of seconds). Returns how many were switched.
pub(crate) fn realtime_threads(comm: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut n = 0;
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if name.trim_end() == comm {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: sched_setscheduler on a thread id of this process, valid param.
            if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) } == 0 {
                n += 1;
            }
        }
    }
    n
}

/// Sum of a metric over the nodes' /metrics (lines `name value` and `name{...} value`);
/// 0 when no node has it.
async fn metric_sum(http: &reqwest::Client, apis: &[String], name: &str) -> u64 {
    metric_total(http, apis, name).await.unwrap_or(0)
}

/// Sum of a metric over the nodes' /metrics; None when no node answered with it.
async fn metric_total(http: &reqwest::Client, apis: &[String], name: &str) -> Option<u64> {
    let mut found = false;
    let mut total = 0.0;
    for api in apis {
        let resp = http
            .get(format!("{api}/metrics"))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(r) = resp {
            if let Ok(text) = r.text().await {
                for l in text.lines() {
                    let key = l.split(['{', ' ']).next().unwrap_or("");
                    if key == name {
                        found = true;
                        total += l
                            .rsplit(' ')
                            .next()
                            .and_then(|v| v.parse::<f64>().ok())
                            .unwrap_or(0.0);
                    }
                }
            }
        }
    }
    found.then_some(total as u64)
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How a run ended (setup errors are the Err of `run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Every --assert held.
    Passed,
    /// An --assert failed.
    Failed,
    /// The ramp connected no device, or fewer than --abort-below: nothing was run.
    Aborted,
}

/// Why a ramp that connected `connected` devices in `seconds` is no base for a run:
/// none connected, or fewer than --abort-below percent.
fn short_ramp(args: &Args, connected: usize, seconds: f64) -> Option<String> {
    let pct = connected as f64 / args.devices.max(1) as f64 * 100.0;
    if connected == 0 {
        Some(format!(
            "the ramp connected none of {} devices in {seconds:.1} s: nothing to measure, run aborted",
            args.devices
        ))
    } else if pct < args.abort_below {
        Some(format!(
            "the ramp connected {connected} of {} devices ({pct:.1}%) in {seconds:.1} s, below --abort-below {}%: run aborted",
            args.devices, args.abort_below
        ))
    } else {
        None
    }
}

/// Run the load.
pub fn run(args: Args) -> anyhow::Result<Finish> {
    // One thread: the coordinator's work (requests at the backend rate, the workers'
    // progress lines) is small, and on a current-thread runtime a request's answer needs
    // no hand-over between runtime threads: at 2,000 requests/s the coordinator took
    // 11-12% of a core instead of 19-20% with two worker threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

/// No RSS sampled yet (or the last scrape found none).
const NO_RSS: u64 = u64::MAX;

/// Scrape the routers' RSS every `every` seconds (0: never) into the returned cell.
fn sample_router_rss(
    http: reqwest::Client,
    apis: Vec<String>,
    every: f64,
) -> (Arc<AtomicU64>, Option<tokio::task::JoinHandle<()>>) {
    let cell = Arc::new(AtomicU64::new(NO_RSS));
    if every <= 0.0 {
        return (cell, None);
    }
    let out = cell.clone();
    let task = tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs_f64(every));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let rss = metric_total(&http, &apis, "router_process_resident_memory_bytes").await;
            out.store(rss.unwrap_or(NO_RSS), Ordering::Relaxed);
        }
    });
    (cell, Some(task))
}

/// The fleet's totals as the timeline samples them.
fn totals_fn(
    progress: Arc<Mutex<Vec<pool::Progress>>>,
    received: Arc<Mutex<u64>>,
    rss: Arc<AtomicU64>,
) -> impl Fn() -> Totals + Clone {
    move || {
        let p = pool::total(&progress);
        let rss = rss.load(Ordering::Relaxed);
        Totals {
            connected: p.connected,
            ever: p.ever,
            device_errors: p.errors,
            events_sent: p.events_sent,
            events_received: *received.lock().unwrap_or_else(|e| e.into_inner()),
            router_rss: (rss != NO_RSS).then_some(rss),
        }
    }
}

/// Sample the timeline at the end of every second from `start` on.
fn sample_timeline(
    timeline: Arc<Timeline>,
    start: Instant,
    totals: impl Fn() -> Totals + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let second = Duration::from_secs(1);
        let mut iv = tokio::time::interval_at((start + second).into(), second);
        loop {
            iv.tick().await;
            timeline.sample(totals());
        }
    })
}

/// --metrics: serve the page from the live counters and the fleet's progress.
async fn serve_metrics(
    args: &Args,
    live: Arc<metrics::Live>,
    progress: Arc<Mutex<Vec<pool::Progress>>>,
    received: Arc<Mutex<u64>>,
) -> anyhow::Result<()> {
    let Some(addr) = args.metrics else {
        return Ok(());
    };
    let target = args.devices as u64;
    let page = Arc::new(move || {
        let p = pool::total(&progress);
        let fleet = metrics::Fleet {
            target,
            connected: p.connected,
            connects: p.ever,
            errors: p.errors,
            reconnects: p.reconnects,
            events_sent: p.events_sent,
            events_received: *received.lock().unwrap_or_else(|e| e.into_inner()),
        };
        metrics::render(&live, &fleet)
    });
    let bound = metrics::serve(addr, page)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics {addr}: {e}"))?;
    // Even with --quiet: with port 0 this is the only way to learn the port.
    eprintln!("loadgen metrics on http://{bound}/metrics");
    Ok(())
}

/// What an error kind of a device that could not get in most likely means.
pub fn hint(kind: &str) -> &'static str {
    match kind {
        "closed_4401" | "http_401" | "http_403" | "auth_refused" => {
            "the router refused the device token: wrong --secret (the router's --auth-secret)?"
        }
        "connect_refused" => "nothing listens there: is the router running, is --url right?",
        "handshake_timeout" => "no WebSocket handshake within --handshake-timeout-ms",
        "connect_error" | "no_source_port" => {
            "the connection could not be made (--url, --source-ips?)"
        }
        k if k.starts_with("http_") => {
            "the router answered the upgrade with an HTTP error: is the path in --url right?"
        }
        _ => "see docs/loadgen.md for the error kinds",
    }
}

/// Connect one device to every --url, as the fleet would, before starting anything: a
/// router that is not there or that refuses the fleet's tokens is told in a second.
async fn probe_routers(args: &Args, account: uuid::Uuid) -> anyhow::Result<()> {
    let handshake = Duration::from_millis(args.handshake_timeout_ms).min(Duration::from_secs(5));
    for (i, url) in args.urls.iter().enumerate() {
        let dest = crate::worker::resolve(url)
            .await
            .map_err(|e| anyhow::anyhow!("--url {url}: {e}"))?;
        let target = std::rc::Rc::new(crate::device::Target {
            base: url.clone(),
            dest,
        });
        // A device of the fleet's account and protocol, outside its id range.
        let id = crate::cli::device_id(0xffff_ffff_ffff - i);
        let proto = crate::cli::device_proto(args.protocol, i);
        let r = crate::device::probe(&args.secret, account, proto, id, target, handshake).await;
        if let Err(kind) = r {
            let code = kind.strip_prefix("closed_").unwrap_or(&kind);
            anyhow::bail!(
                "a probe device could not get in at {url}: {code}: {} (no device started)",
                hint(&kind)
            );
        }
    }
    Ok(())
}

/// Seconds a ramp may go on with every attempt failing before it is given up.
const HOPELESS_RAMP_SECONDS: f64 = 3.0;

/// Follow the ramp until the fleet is whole or --ramp-timeout, or until it is hopeless
/// (no device in after `HOPELESS_RAMP_SECONDS` of failures only); its length in
/// seconds as the coordinator saw it.
async fn ramp(args: &Args, workers: &Workers, live: &Live, start: Instant) -> f64 {
    let deadline = start + Duration::from_secs_f64(args.ramp_timeout);
    // Connect rate shown over the last second or so (samples arrive every 100 ms).
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    loop {
        tokio::time::sleep(RAMP_POLL).await;
        let p = workers.total();
        let now = Instant::now();
        let since = now.duration_since(last.0).as_secs_f64();
        if since >= 1.0 {
            rate = p.ever.saturating_sub(last.1) as f64 / since;
            last = (now, p.ever);
        }
        live.update(
            "ramp",
            p.connected,
            format!(
                "{rate:.0} connects/s, {} errors, {} reconnects",
                p.errors, p.reconnects
            ),
        );
        let hopeless =
            p.ever == 0 && p.errors > 0 && start.elapsed().as_secs_f64() >= HOPELESS_RAMP_SECONDS;
        if p.connected as usize >= args.devices || now >= deadline || hopeless {
            return start.elapsed().as_secs_f64();
        }
    }
}

/// Tell the workers to stop and collect their results (30 s at most).
async fn stop_workers(workers: &mut Workers, k: usize) -> Vec<WorkerResult> {
    workers.tell("stop").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let reported = |w: &Workers| w.results.lock().unwrap_or_else(|e| e.into_inner()).len();
    while reported(workers) < k && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in workers.children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    std::mem::take(&mut *workers.results.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The backend's clients and the (node, device) pairs its requests aim at: devices each
/// node holds (through the next node with --request-via cross).
async fn backend_and_targets(
    args: &Args,
    http: &reqwest::Client,
    apis: &[String],
) -> anyhow::Result<(Arc<Backend>, Vec<(usize, uuid::Uuid)>)> {
    let nodes = apis
        .iter()
        .map(|a| crate::http::Node::new(a).map(|n| n.with_token(args.api_token.as_deref())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--api {e}"))?;
    let backend = Arc::new(Backend {
        http: http.clone(),
        apis: apis.to_vec(),
        nodes,
    });
    let mut targets = backend::targets(&backend, TARGETS_PER_NODE, args.devices).await;
    if args.request_via == crate::cli::RequestVia::Cross {
        let n = backend.apis.len().max(1);
        for t in &mut targets {
            t.0 = (t.0 + 1) % n;
        }
    }
    Ok((backend, targets))
}

/// How long the workers are to expect the run to last: the ramp's limit, the settling
/// after it, the phases and up to 120 s for each storm to be whole again.
fn planned_seconds(args: &Args, segments: &[Segment]) -> f64 {
    let phases: f64 = segments
        .iter()
        .map(|s| s.seconds + if s.storm.is_some() { 120.0 } else { 0.0 })
        .sum();
    args.ramp_timeout.max(0.0) + 2.0 + phases
}

async fn run_async(args: Args) -> anyhow::Result<Finish> {
    let http = api_client(&args)?;
    let apis: Vec<String> = args
        .apis
        .iter()
        .map(|a| a.trim_end_matches('/').to_string())
        .collect();
    let k = args.worker_count();
    let account = args.account.unwrap_or_else(uuid::Uuid::new_v4);
    let segments = scenario::segments(&args);
    // Live progress: connected/target, connect rate, errors; hidden with --quiet.
    let live = Live::new(args.devices as u64, args.quiet);
    let counters = Arc::new(metrics::Live::default());

    probe_routers(&args, account).await?;
    let rss_baseline = metric_sum(&http, &apis, "router_process_resident_memory_bytes").await;
    let mut ev = events::start(&args, &http, &apis, account).await?;

    // Ramp.
    let mut workers = pool::spawn(k, account, planned_seconds(&args, &segments))?;
    serve_metrics(
        &args,
        counters.clone(),
        workers.progress.clone(),
        ev.received.clone(),
    )
    .await?;
    counters.set_phase("ramp", 0.0);
    // After the spawn: the workers must not inherit the policy.
    if args.realtime {
        go_realtime(args.quiet);
    }
    let ramp_start = Instant::now();
    let timeline_start_unix_ms = now_us() / 1000;
    // The timeline: the fleet's totals at the end of every second from here on.
    let timeline = Arc::new(Timeline::new(ramp_start));
    let (rss, rss_task) = sample_router_rss(http.clone(), apis.clone(), args.router_rss_interval);
    let totals = totals_fn(workers.progress.clone(), ev.received.clone(), rss);
    let sampler = sample_timeline(timeline.clone(), ramp_start, totals.clone());
    let coarse_ramp = ramp(&args, &workers, &live, ramp_start).await;
    let connected_after_ramp = workers.total().connected as usize;
    if let Some(why) = short_ramp(&args, connected_after_ramp, coarse_ramp) {
        let results = stop_workers(&mut workers, k).await;
        let merged = assemble::merge_results(&results, k);
        live.finish();
        eprintln!("loadgen: {why}");
        for (kind, n) in merged.errors_by_count() {
            eprintln!("  {kind}: {n} ({})", hint(&kind));
        }
        return Ok(Finish::Aborted);
    }
    let router = idle_fleet_cost(&http, &apis, rss_baseline).await;

    // The phases.
    let sinks = Sinks {
        timeline: timeline.clone(),
        live: counters.clone(),
    };
    let ctx = phases_ctx(&args, &http, &apis, sinks, ramp_start, &ev).await?;
    let after = phases::run(&ctx, &mut workers, &segments, &live).await;

    let (results, mut sent, drain_seconds) =
        stop_and_drain(&args, &mut workers, &mut ev, &live, &counters).await;
    sampler.abort();
    if let Some(t) = rss_task {
        t.abort();
    }
    timeline.sample(totals());
    live.finish();
    let merged = assemble::merge_results(&results, k);
    if ev.counted {
        assemble::count_unreported(&mut sent, &ev, k, args.devices);
    }
    let measured = Measured {
        k,
        connected_after_ramp,
        connect_seconds: assemble::ramp_seconds(&results, k, coarse_ramp),
        router,
        sent,
        drain_seconds,
        timeline_start_unix_ms,
    };
    let report = assemble::build_report(&args, &ev, &merged, &after, measured, &timeline);
    let passed = assemble::finish(&args, report, &ev, &merged, after)?;
    Ok(if passed {
        Finish::Passed
    } else {
        Finish::Failed
    })
}

/// Let allocator and kernel settle, then read the router's cost of the idle fleet.
async fn idle_fleet_cost(
    http: &reqwest::Client,
    apis: &[String],
    rss_baseline: u64,
) -> RouterFigures {
    tokio::time::sleep(Duration::from_secs(2)).await;
    RouterFigures {
        rss_baseline,
        rss_after: metric_sum(http, apis, "router_process_resident_memory_bytes").await,
        connections: metric_sum(http, apis, "router_connections").await,
    }
}

/// The HTTP client for the routers' APIs (with --api-token, its bearer token on every
/// request).
fn api_client(args: &Args) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = &args.api_token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| anyhow::anyhow!("--api-token: not a valid header value"))?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .default_headers(headers)
        .build()?)
}

/// --realtime: SCHED_FIFO for the coordinator, or a word on why not.
fn go_realtime(quiet: bool) {
    match realtime() {
        Ok(()) if !quiet => eprintln!("coordinator runs SCHED_FIFO 1 (--realtime)"),
        Ok(()) => {}
        Err(e) => eprintln!("--realtime: cannot switch to SCHED_FIFO ({e}); going on without"),
    }
}

/// What the phases work with: the backend and its targets, and where they report.
async fn phases_ctx(
    args: &Args,
    http: &reqwest::Client,
    apis: &[String],
    sinks: Sinks,
    ramp_start: Instant,
    ev: &Events,
) -> anyhow::Result<phases::Ctx> {
    let (backend, targets) = backend_and_targets(args, http, apis).await?;
    Ok(phases::Ctx {
        backend,
        targets: Arc::new(targets),
        sinks,
        timeout_ms: args.request_timeout_ms,
        log: args.request_log.is_some(),
        ramp_start,
        events_received: ev.received.clone(),
    })
}

/// Stop the workers, collect their results, wait for the events in flight: the
/// results, what the devices sent, and the seconds the wait took.
async fn stop_and_drain(
    args: &Args,
    workers: &mut Workers,
    ev: &mut Events,
    live: &Live,
    counters: &metrics::Live,
) -> (Vec<WorkerResult>, Sent, f64) {
    let k = args.worker_count();
    counters.set_phase("drain", 0.0);
    let results = stop_workers(workers, k).await;
    let sent = assemble::sent_by_devices(&results, k, ev.counted, args.devices);
    let drain_seconds = if ev.counted && sent.events > 0 {
        live.update("drain", 0, "waiting for events in flight".to_string());
        events::drain(ev, args.event_drain_timeout).await
    } else {
        0.0
    };
    if let Some(c) = ev.consumer.take() {
        c.finish().await;
    }
    (results, sent, drain_seconds)
}
