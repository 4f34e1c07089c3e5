//! The coordinator: starts the worker processes, follows the ramp, runs the backend
//! and the event watcher, samples router RSS and the per-second timeline, stops
//! everything, waits for events still in flight and merges the report (with --amqp,
//! the per-device event counts against the workers' record of what they sent). It holds
//! no device sockets itself.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::backend::{self, Backend};
use crate::cli::Args;
use crate::hist;
use crate::progress::Live;
use crate::report::{self, Report};
use crate::seqs::SeqCounter;
use crate::thresholds;
use crate::timeline::{Timeline, Totals};
use crate::worker::WorkerResult;

#[derive(Default, Clone, Copy)]
struct Progress {
    connected: u64,
    ever: u64,
    errors: u64,
    reconnects: u64,
    events_sent: u64,
}

struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    progress: Arc<Mutex<Vec<Progress>>>,
    results: Arc<Mutex<Vec<WorkerResult>>>,
}

impl Workers {
    fn total(&self) -> Progress {
        total(&self.progress)
    }
}

/// The fleet's counts: the sum of the workers' latest progress lines.
fn total(progress: &Mutex<Vec<Progress>>) -> Progress {
    let p = progress.lock().unwrap_or_else(|e| e.into_inner());
    p.iter().fold(Progress::default(), |a, b| Progress {
        connected: a.connected + b.connected,
        ever: a.ever + b.ever,
        errors: a.errors + b.errors,
        reconnects: a.reconnects + b.reconnects,
        events_sent: a.events_sent + b.events_sent,
    })
}

/// Events in flight at the end count once no new one arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

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
pub fn realtime_threads(comm: &str) -> usize {
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

fn spawn_workers(k: usize, account: uuid::Uuid) -> anyhow::Result<Workers> {
    let exe = std::env::current_exe()?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let progress = Arc::new(Mutex::new(vec![Progress::default(); k]));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for i in 0..k {
        let mut child = Command::new(&exe)
            .args(&argv)
            .args([
                "--worker-index",
                &i.to_string(),
                "--worker-count",
                &k.to_string(),
            ])
            // Every worker mints its tokens for the same account (a random one unless
            // --account was given): hand it down through the environment, which a
            // repeated flag on the command line could not do.
            .env("LOADGEN_ACCOUNT", account.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("worker stdout"))?;
        stdins.push(
            child
                .stdin
                .take()
                .ok_or_else(|| anyhow::anyhow!("worker stdin"))?,
        );
        let (p, r) = (progress.clone(), results.clone());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(rest) = l.strip_prefix("P ") {
                    let n: Vec<u64> = rest
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    if n.len() == 5 {
                        p.lock().unwrap_or_else(|e| e.into_inner())[i] = Progress {
                            connected: n[0],
                            ever: n[1],
                            errors: n[2],
                            reconnects: n[3],
                            events_sent: n[4],
                        };
                    }
                } else if let Some(json) = l.strip_prefix("R ") {
                    if let Ok(res) = serde_json::from_str::<WorkerResult>(json) {
                        r.lock().unwrap_or_else(|e| e.into_inner()).push(res);
                    }
                }
            }
        });
        children.push(child);
    }
    Ok(Workers {
        children,
        stdins,
        progress,
        results,
    })
}

/// Sum of a metric over the nodes' /metrics (lines `name value` and `name{...} value`).
async fn metric_sum(http: &reqwest::Client, apis: &[String], name: &str) -> u64 {
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
    total as u64
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Follow every node's /v1/events and time each event stamped with `sent_us`.
fn watch_events(
    http: reqwest::Client,
    apis: Vec<String>,
    hist: Arc<Mutex<Histogram<u64>>>,
    received: Arc<Mutex<u64>>,
) {
    for api in apis {
        let (http, hist, received) = (http.clone(), hist.clone(), received.clone());
        tokio::spawn(async move {
            let Ok(resp) = http.get(format!("{api}/v1/events")).send().await else {
                return;
            };
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                let now = now_us();
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = buf.drain(..pos + 2).collect();
                    for line in block.split(|b| *b == b'\n') {
                        let Some(data) = line
                            .strip_prefix(b"data: ")
                            .or_else(|| line.strip_prefix(b"data:"))
                        else {
                            continue;
                        };
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                            continue;
                        };
                        let sent = v["sent_us"]
                            .as_u64()
                            .or(v["payload"]["sent_us"].as_u64())
                            .or(v["data"]["sent_us"].as_u64());
                        if let Some(sent) = sent {
                            hist::record(
                                &mut hist.lock().unwrap_or_else(|e| e.into_inner()),
                                now.saturating_sub(sent),
                            );
                            *received.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        }
                    }
                }
            }
        });
    }
}

/// Run the load; Ok(false) when an --assert failed.
pub fn run(args: Args) -> anyhow::Result<bool> {
    // One thread: the coordinator's work (requests at the backend rate, the workers'
    // progress lines) is small, and on a current-thread runtime a request's answer needs
    // no hand-over between runtime threads: at 2,000 requests/s the coordinator took
    // 11-12% of a core instead of 19-20% with two worker threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<bool> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
    let apis: Vec<String> = args
        .apis
        .iter()
        .map(|a| a.trim_end_matches('/').to_string())
        .collect();
    let k = args.worker_count();
    let account = args.account.unwrap_or_else(uuid::Uuid::new_v4);
    // Live progress: connected/target, connect rate, errors; hidden with --quiet.
    let live = Live::new(args.devices as u64, args.quiet);

    let rss_baseline = metric_sum(&http, &apis, "router_process_resident_memory_bytes").await;
    let event_hist = Arc::new(Mutex::new(hist::new_hist()));
    let events_received = Arc::new(Mutex::new(0u64));
    // Per-device seq counts: with --amqp only (see cli's --amqp). 8 bytes per device.
    let counted = args.amqp.is_some() && args.event_interval > 0.0;
    let seqs = Arc::new(Mutex::new(SeqCounter::new(if counted {
        args.devices
    } else {
        0
    })));
    let consumer_reconnects = Arc::new(AtomicU64::new(0));
    let consumer_connected = Arc::new(AtomicBool::new(false));
    let mut consumer = None;
    if args.event_interval > 0.0 {
        match &args.amqp {
            // AMQP mode: the events' real way out, a hive.events consumer.
            Some(url) => {
                let cfg = crate::amqp_events::Config {
                    realtime: args.realtime,
                    url: url.clone(),
                    durable: args.amqp_durable_events,
                    account: account.to_string(),
                };
                let sink = crate::amqp_events::Sink {
                    hist: event_hist.clone(),
                    received: events_received.clone(),
                    seqs: seqs.clone(),
                    reconnects: consumer_reconnects.clone(),
                    connected: consumer_connected.clone(),
                };
                consumer = Some(
                    crate::amqp_events::watch(cfg, sink)
                        .await
                        .map_err(|e| anyhow::anyhow!("--amqp {url}: {e}"))?,
                );
            }
            None => watch_events(
                http.clone(),
                apis.clone(),
                event_hist.clone(),
                events_received.clone(),
            ),
        }
    }

    // Ramp.
    let mut workers = spawn_workers(k, account)?;
    // After the spawn: the workers must not inherit the policy.
    if args.realtime {
        match realtime() {
            Ok(()) if !args.quiet => eprintln!("coordinator runs SCHED_FIFO 1 (--realtime)"),
            Ok(()) => {}
            Err(e) => eprintln!("--realtime: cannot switch to SCHED_FIFO ({e}); going on without"),
        }
    }
    let ramp_start = Instant::now();
    let timeline_start_unix_ms = now_us() / 1000;
    // The timeline: the fleet's totals at the end of every second from here on.
    let timeline = Arc::new(Timeline::new(ramp_start));
    let totals = {
        let (progress, received) = (workers.progress.clone(), events_received.clone());
        move || {
            let p = total(&progress);
            Totals {
                connected: p.connected,
                ever: p.ever,
                device_errors: p.errors,
                events_sent: p.events_sent,
                events_received: *received.lock().unwrap_or_else(|e| e.into_inner()),
                router_rss: None,
            }
        }
    };
    let sampler = {
        let (timeline, totals) = (timeline.clone(), totals.clone());
        tokio::spawn(async move {
            let second = Duration::from_secs(1);
            let mut iv = tokio::time::interval_at((ramp_start + second).into(), second);
            loop {
                iv.tick().await;
                timeline.sample(totals());
            }
        })
    };
    let ramp_deadline = ramp_start + Duration::from_secs_f64(args.ramp_timeout);
    // Connect rate shown over the last second or so (samples arrive every 100 ms).
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    let connect_seconds = loop {
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
        if p.connected as usize >= args.devices {
            break ramp_start.elapsed().as_secs_f64();
        }
        if now >= ramp_deadline {
            break ramp_start.elapsed().as_secs_f64();
        }
    };
    let connected_after_ramp = workers.total().connected as usize;
    // Let allocator and kernel settle, then read the router's cost of the idle fleet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = metric_sum(&http, &apis, "router_process_resident_memory_bytes").await;
    let router_conns = metric_sum(&http, &apis, "router_connections").await;

    // Steady phase.
    let nodes = apis
        .iter()
        .map(|a| crate::http::Node::new(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--api {e}"))?;
    let backend = Arc::new(Backend {
        http: http.clone(),
        apis: apis.clone(),
        nodes,
    });
    let mut targets = backend::targets(&backend, TARGETS_PER_NODE, args.devices).await;
    if args.request_via == crate::cli::RequestVia::Cross {
        let n = backend.apis.len().max(1);
        for t in &mut targets {
            t.0 = (t.0 + 1) % n;
        }
    }
    let steady = Duration::from_secs_f64(args.duration);
    let events_before = *events_received.lock().unwrap_or_else(|e| e.into_inner());
    let steady_start = Instant::now();
    let steady_wall_start = SystemTime::now();
    let hold_at = steady_start + steady;
    let ticker = {
        let w = workers.progress.clone();
        let live = live.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let p = total(&w);
                let (phase, since) = match Instant::now().checked_duration_since(hold_at) {
                    Some(d) => ("hold", d),
                    None => ("steady", steady_start.elapsed()),
                };
                live.update(
                    phase,
                    p.connected,
                    format!(
                        "{:.1}s, {} errors, {} reconnects",
                        since.as_secs_f64(),
                        p.errors,
                        p.reconnects
                    ),
                );
            }
        })
    };
    // A reconnect storm (--storm-at): every device drops at once and comes straight back;
    // timed until every one of them has reconnected.
    let storm = async {
        if args.storm_at <= 0.0 {
            return None;
        }
        tokio::time::sleep(Duration::from_secs_f64(args.storm_at)).await;
        let before = workers.total();
        for s in workers.stdins.iter_mut() {
            let _ = s.write_all(b"storm\n").await;
            let _ = s.flush().await;
        }
        let t = Instant::now();
        let deadline = t + Duration::from_secs(120);
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = workers.total();
            let done =
                now.ever >= before.ever + before.connected && now.connected >= before.connected;
            if done || Instant::now() > deadline {
                return Some(report::Storm {
                    at_seconds: args.storm_at,
                    devices: before.connected,
                    seconds_to_reconnect: t.elapsed().as_secs_f64(),
                    complete: done,
                });
            }
        }
    };
    let (outcome, storm) = tokio::join!(
        backend::run(
            backend,
            targets,
            args.request_rate,
            steady,
            args.request_timeout_ms,
            args.request_log.is_some(),
            timeline.clone()
        ),
        storm
    );
    let counts = outcome.counts;
    if steady_start.elapsed() < steady {
        tokio::time::sleep(steady - steady_start.elapsed()).await;
    }
    let steady_secs = steady_start.elapsed().as_secs_f64();
    let events_in_steady =
        *events_received.lock().unwrap_or_else(|e| e.into_inner()) - events_before;
    if args.hold > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    ticker.abort();

    // Stop the workers and collect their histograms.
    for s in workers.stdins.iter_mut() {
        let _ = s.write_all(b"stop\n").await;
        let _ = s.flush().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while workers
        .results
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len()
        < k
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in workers.children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    let results = std::mem::take(&mut *workers.results.lock().unwrap_or_else(|e| e.into_inner()));
    // The devices' record of what they sent: each one's last seq, and the seq ranges of
    // their connections that broke.
    let mut last_seqs = vec![0u64; if counted { args.devices } else { 0 }];
    let mut reported = vec![false; k];
    let mut broken: Vec<(usize, u64, u64)> = Vec::new();
    let mut events_sent = 0u64;
    for r in &results {
        if let Some(seen) = reported.get_mut(r.worker_index) {
            *seen = true;
        }
        events_sent += r.last_seqs.iter().sum::<u64>();
        if counted {
            for (j, &seq) in r.last_seqs.iter().enumerate() {
                if let Some(l) = last_seqs.get_mut(r.worker_index + j * k) {
                    *l = seq;
                }
            }
        }
        broken.extend(r.broken.iter().map(|&(d, a, b)| (d as usize, a, b)));
    }
    // Events still in flight (queued in the routers, the bridge, the broker): counted
    // once the consumer saw none arrive for DRAIN_QUIET, or at --event-drain-timeout.
    // Quiet while the consumer is reconnecting does not count.
    let drain_start = Instant::now();
    if counted && events_sent > 0 {
        live.update("drain", 0, "waiting for events in flight".to_string());
        let limit = Duration::from_secs_f64(args.event_drain_timeout);
        let received = || *events_received.lock().unwrap_or_else(|e| e.into_inner());
        let (mut last, mut since) = (received(), Instant::now());
        while drain_start.elapsed() < limit && since.elapsed() < DRAIN_QUIET {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = received();
            if now != last || !consumer_connected.load(Ordering::Relaxed) {
                (last, since) = (now, Instant::now());
            }
        }
    }
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    if let Some(c) = consumer {
        c.finish().await;
    }
    sampler.abort();
    timeline.sample(totals());
    live.finish();
    let (mut connect, mut auth) = (hist::new_hist(), hist::new_hist());
    let mut errors = BTreeMap::new();
    let mut reconnects = 0;
    for r in &results {
        if let Some(h) = hist::from_b64(&r.connect_hist) {
            hist::merge(&mut connect, &h);
        }
        if let Some(h) = hist::from_b64(&r.auth_hist) {
            hist::merge(&mut auth, &h);
        }
        for (kind, n) in &r.errors {
            *errors.entry(kind.clone()).or_insert(0) += n;
        }
        reconnects += r.reconnects;
    }
    if results.len() < k {
        errors.insert("worker_lost".into(), (k - results.len()) as u64);
    }
    let seqs = seqs.lock().unwrap_or_else(|e| e.into_inner());
    if counted {
        // A worker that never reported: its devices count as having sent what arrived.
        for w in (0..k).filter(|w| !reported[*w]) {
            for i in (w..args.devices).step_by(k) {
                last_seqs[i] = seqs.highest(i);
                events_sent += last_seqs[i];
            }
        }
    }
    let losses = counted.then(|| seqs.losses(&last_seqs, &broken));
    let when = |v: u64| counted.then_some(v);
    // The ramp from the workers' own clocks when every worker got all its devices in:
    // first connect attempt to last device authenticated, free of process start-up and
    // of the 100 ms progress ticks. Otherwise the coordinator's coarser measure stands.
    let first = results
        .iter()
        .map(|r| r.first_attempt_us)
        .min()
        .unwrap_or(0);
    let full = results.iter().map(|r| r.full_us).max().unwrap_or(0);
    let connect_seconds =
        if results.len() == k && first > 0 && full > first && results.iter().all(|r| r.full_us > 0)
        {
            (full - first) as f64 / 1e6
        } else {
            connect_seconds
        };
    if counts.timeout > 0 {
        errors.insert("request_timeout".into(), counts.timeout);
    }
    if counts.offline > 0 {
        errors.insert("request_offline".into(), counts.offline);
    }
    if counts.http_error + counts.transport_error > 0 {
        errors.insert(
            "request_error".into(),
            counts.http_error + counts.transport_error,
        );
    }
    let event_hist = event_hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Per device = per device loadgen holds connected (the router's own count when
    // loadgen saw none, e.g. progress lines lost); no devices, no per-device figure.
    let per_device = |bytes: u64| match (connected_after_ramp, router_conns) {
        (0, 0) => 0.0,
        (0, n) => bytes as f64 / n as f64,
        (n, _) => bytes as f64 / n as f64,
    };
    let mut report = Report {
        protocol: format!("{:?}", args.protocol).to_lowercase(),
        workers: k,
        devices: report::Devices {
            target: args.devices,
            connected: connected_after_ramp,
            connect_seconds,
            connects_per_sec: connected_after_ramp as f64 / connect_seconds.max(1e-3),
            reconnects,
        },
        latency_ms: report::Latencies {
            connect: hist::summary(&connect),
            auth: hist::summary(&auth),
            ack: hist::summary(&outcome.acks),
            late: hist::summary(&outcome.late),
            event: hist::summary(&event_hist),
        },
        requests: report::Requests {
            errors: counts.http_error + counts.transport_error,
            rate: counts.acked as f64 / steady_secs.max(1e-3),
            target_rate: args.request_rate,
            counts,
        },
        events: report::Events {
            sent: events_sent,
            received: *events_received.lock().unwrap_or_else(|e| e.into_inner()),
            per_sec: events_in_steady as f64 / steady_secs.max(1e-3),
            counted,
            received_unique: when(seqs.unique),
            duplicated: when(seqs.duplicated),
            reordered: when(seqs.reordered),
            lost: losses.map(|l| l.lost),
            lost_in_broken_connections: losses.map(|l| l.in_broken_connections),
            redelivered: when(seqs.redelivered),
            broken_connections: broken.len() as u64,
            consumer_reconnects: consumer_reconnects.load(Ordering::Relaxed),
            drain_seconds,
        },
        errors,
        storm,
        router: report::Router {
            rss_bytes: rss_after,
            rss_baseline_bytes: rss_baseline,
            connections: router_conns,
            rss_per_device_bytes: per_device(rss_after),
            rss_per_device_delta_bytes: per_device(rss_after.saturating_sub(rss_baseline)),
        },
        timeline_start_unix_ms,
        timeline: timeline.seconds(),
        phases: Vec::new(),
        assertions: Vec::new(),
    };
    let value = serde_json::to_value(&report)?;
    report.assertions = args.asserts.iter().map(|a| a.check(&value)).collect();
    print!("{}", report.table());
    if !report.assertions.is_empty() {
        print!("{}", thresholds::summary(&report.assertions));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &args.hdr_log {
        let mut out = Vec::new();
        hist::write_interval_log(
            &mut out,
            steady_wall_start,
            Duration::from_secs_f64(steady_secs),
            &[
                ("ack", &outcome.acks),
                ("late", &outcome.late),
                ("connect", &connect),
                ("auth", &auth),
                ("event", &event_hist),
            ],
        )?;
        std::fs::write(path, out)?;
    }
    if let Some(path) = &args.request_log {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        backend::write_log(outcome.samples, &mut out)?;
        std::io::Write::flush(&mut out)?;
    }
    Ok(report.assertions.iter().all(|v| v.passed))
}
