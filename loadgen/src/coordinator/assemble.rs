//! The report assembled from what the run collected: the workers' results merged
//! (histograms, errors, reconnects, memory, what their devices sent), the ramp's length
//! by their clocks, the event side's counts and the router's figures; then handed with
//! the full histograms to `outputs`. Nothing here waits or starts anything.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;

use super::events::Events;
use crate::backend::RequestCounts;
use crate::cli::Args;
use crate::hist;
use crate::outputs::{self, Histograms, Span};
use crate::phases::AfterRamp;
use crate::report::{self, Report};
use crate::timeline::Timeline;
use crate::worker::WorkerResult;

/// What the router's /metrics said around the ramp.
pub(super) struct RouterFigures {
    pub(super) rss_baseline: u64,
    pub(super) rss_after: u64,
    pub(super) connections: u64,
}

/// The figures of the run beside the events, the workers' results and the phases.
pub(super) struct Measured {
    pub(super) k: usize,
    pub(super) connected_after_ramp: usize,
    pub(super) connect_seconds: f64,
    pub(super) router: RouterFigures,
    pub(super) sent: Sent,
    pub(super) drain_seconds: f64,
    pub(super) timeline_start_unix_ms: u64,
}

/// The report of the run (its --assert verdicts still to come).
pub(super) fn build_report(
    args: &Args,
    ev: &Events,
    merged: &Merged,
    after: &AfterRamp,
    m: Measured,
    timeline: &Timeline,
) -> Report {
    let counts = after.outcome.counts.clone();
    let mut errors = merged.errors.clone();
    request_errors(&mut errors, &counts);
    let request_seconds = after.request_seconds.max(1e-3);
    let events = event_figures(ev, &m, after, request_seconds);
    let event_hist = ev.hist.lock().unwrap_or_else(|e| e.into_inner());
    Report {
        loadgen_version: report::VERSION.into(),
        loadgen_commit: report::COMMIT.into(),
        parameters: report::params(&args.parameters),
        protocol: format!("{:?}", args.protocol).to_lowercase(),
        workers: m.k,
        devices: report::Devices {
            target: args.devices,
            connected: m.connected_after_ramp,
            connect_seconds: m.connect_seconds,
            connects_per_sec: m.connected_after_ramp as f64 / m.connect_seconds.max(1e-3),
            reconnects: merged.reconnects,
        },
        latency_ms: report::Latencies {
            connect: hist::summary(&merged.connect),
            auth: hist::summary(&merged.auth),
            ack: hist::summary(&after.outcome.acks),
            late: hist::summary(&after.outcome.late),
            event: hist::summary(&event_hist),
        },
        requests: report::Requests {
            errors: counts.http_error + counts.transport_error,
            rate: counts.acked as f64 / request_seconds,
            target_rate: after.target_rate,
            counts,
        },
        events,
        errors,
        storm: after.storm.clone(),
        router: router_figures(&m),
        loadgen: loadgen_memory(&merged.memory, args.devices),
        timeline_start_unix_ms: m.timeline_start_unix_ms,
        timeline: timeline.seconds(),
        phases: after.phases.clone(),
        assertions: Vec::new(),
    }
}

/// The events sent and received; with per-device counts (--amqp), what arrived twice,
/// out of order or never.
fn event_figures(
    ev: &Events,
    m: &Measured,
    after: &AfterRamp,
    request_seconds: f64,
) -> report::Events {
    let seqs = ev.seqs.lock().unwrap_or_else(|e| e.into_inner());
    let losses = ev
        .counted
        .then(|| seqs.losses(&m.sent.last_seqs, &m.sent.broken));
    let when = |v: u64| ev.counted.then_some(v);
    report::Events {
        sent: m.sent.events,
        received: ev.received(),
        per_sec: after.events_in_request_phases as f64 / request_seconds,
        counted: ev.counted,
        received_unique: when(seqs.unique),
        duplicated: when(seqs.duplicated),
        reordered: when(seqs.reordered),
        lost: losses.map(|l| l.lost),
        lost_in_broken_connections: losses.map(|l| l.in_broken_connections),
        redelivered: when(seqs.redelivered),
        broken_connections: m.sent.broken.len() as u64,
        consumer_reconnects: ev.consumer_reconnects.load(Ordering::Relaxed),
        drain_seconds: m.drain_seconds,
    }
}

/// The router's memory, whole and per device.
fn router_figures(m: &Measured) -> report::Router {
    // Per device = per device loadgen holds connected (the router's own count when
    // loadgen saw none, e.g. progress lines lost); no devices, no per-device figure.
    let per_device = |bytes: u64| match (m.connected_after_ramp, m.router.connections) {
        (0, 0) => 0.0,
        (0, n) => bytes as f64 / n as f64,
        (n, _) => bytes as f64 / n as f64,
    };
    report::Router {
        rss_bytes: m.router.rss_after,
        rss_baseline_bytes: m.router.rss_baseline,
        connections: m.router.connections,
        rss_per_device_bytes: per_device(m.router.rss_after),
        rss_per_device_delta_bytes: per_device(
            m.router.rss_after.saturating_sub(m.router.rss_baseline),
        ),
    }
}

/// The requests that failed, as kinds of the report's `errors`.
fn request_errors(errors: &mut BTreeMap<String, u64>, counts: &RequestCounts) {
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
}

/// The workers' memory with its per-device figures (over the target fleet).
fn loadgen_memory(sum: &report::LoadgenMemory, devices: usize) -> report::LoadgenMemory {
    let n = devices.max(1) as f64;
    let (held, delta) = if sum.rss_full_bytes > 0 {
        (
            sum.rss_full_bytes,
            sum.rss_full_bytes.saturating_sub(sum.rss_start_bytes),
        )
    } else {
        (
            sum.rss_peak_bytes,
            sum.rss_peak_bytes.saturating_sub(sum.rss_start_bytes),
        )
    };
    report::LoadgenMemory {
        rss_start_bytes: sum.rss_start_bytes,
        rss_full_bytes: sum.rss_full_bytes,
        rss_peak_bytes: sum.rss_peak_bytes,
        rss_per_device_bytes: held as f64 / n,
        rss_per_device_delta_bytes: delta as f64 / n,
    }
}

/// The workers' histograms, errors and reconnects, merged.
pub(super) struct Merged {
    connect: Histogram<u64>,
    auth: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
    memory: report::LoadgenMemory,
}

impl Merged {
    /// The devices' error kinds, most frequent first.
    pub(super) fn errors_by_count(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.errors.clone().into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

pub(super) fn merge_results(results: &[WorkerResult], k: usize) -> Merged {
    let mut m = Merged {
        connect: hist::new_hist(),
        auth: hist::new_hist(),
        errors: BTreeMap::new(),
        reconnects: 0,
        memory: report::LoadgenMemory::default(),
    };
    let all_full = results.len() == k && results.iter().all(|r| r.rss_full_bytes > 0);
    for r in results {
        m.memory.rss_start_bytes += r.rss_start_bytes;
        m.memory.rss_full_bytes += r.rss_full_bytes;
        m.memory.rss_peak_bytes += r.rss_peak_bytes;
        if let Some(h) = hist::from_b64(&r.connect_hist) {
            hist::merge(&mut m.connect, &h);
        }
        if let Some(h) = hist::from_b64(&r.auth_hist) {
            hist::merge(&mut m.auth, &h);
        }
        for (kind, n) in &r.errors {
            *m.errors.entry(kind.clone()).or_insert(0) += n;
        }
        m.reconnects += r.reconnects;
    }
    if !all_full {
        m.memory.rss_full_bytes = 0;
    }
    if results.len() < k {
        m.errors
            .insert("worker_lost".into(), (k - results.len()) as u64);
    }
    m
}

/// The devices' record of what they sent: each one's last seq (when counted), which
/// workers reported, the seq ranges of their connections that broke, the total.
pub(super) struct Sent {
    last_seqs: Vec<u64>,
    reported: Vec<bool>,
    broken: Vec<(usize, u64, u64)>,
    pub(super) events: u64,
}

pub(super) fn sent_by_devices(
    results: &[WorkerResult],
    k: usize,
    counted: bool,
    devices: usize,
) -> Sent {
    let mut s = Sent {
        last_seqs: vec![0u64; if counted { devices } else { 0 }],
        reported: vec![false; k],
        broken: Vec::new(),
        events: 0,
    };
    for r in results {
        if let Some(seen) = s.reported.get_mut(r.worker_index) {
            *seen = true;
        }
        s.events += r.last_seqs.iter().sum::<u64>();
        if counted {
            for (j, &seq) in r.last_seqs.iter().enumerate() {
                if let Some(l) = s.last_seqs.get_mut(r.worker_index + j * k) {
                    *l = seq;
                }
            }
        }
        s.broken
            .extend(r.broken.iter().map(|&(d, a, b)| (d as usize, a, b)));
    }
    s
}

/// A worker that never reported: its devices count as having sent what arrived.
pub(super) fn count_unreported(sent: &mut Sent, ev: &Events, k: usize, devices: usize) {
    let seqs = ev.seqs.lock().unwrap_or_else(|e| e.into_inner());
    for w in (0..k).filter(|w| !sent.reported[*w]) {
        for i in (w..devices).step_by(k) {
            sent.last_seqs[i] = seqs.highest(i);
            sent.events += sent.last_seqs[i];
        }
    }
}

/// The ramp from the workers' own clocks when every worker got all its devices in:
/// first connect attempt to last device authenticated, free of process start-up and of
/// the 100 ms progress ticks. Otherwise the coordinator's coarser measure stands.
pub(super) fn ramp_seconds(results: &[WorkerResult], k: usize, coarse: f64) -> f64 {
    let first = results
        .iter()
        .map(|r| r.first_attempt_us)
        .min()
        .unwrap_or(0);
    let full = results.iter().map(|r| r.full_us).max().unwrap_or(0);
    let all_full = results.iter().all(|r| r.full_us > 0);
    if results.len() == k && first > 0 && full > first && all_full {
        (full - first) as f64 / 1e6
    } else {
        coarse
    }
}

/// The report out, with the full histograms for the files that want them.
pub(super) fn finish(
    args: &Args,
    mut report: Report,
    ev: &Events,
    merged: &Merged,
    mut after: AfterRamp,
) -> anyhow::Result<bool> {
    let samples = std::mem::take(&mut after.outcome.samples);
    let event_hist = ev.hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let histograms = Histograms {
        ack: &after.outcome.acks,
        late: &after.outcome.late,
        connect: &merged.connect,
        auth: &merged.auth,
        event: &event_hist,
    };
    let span = Span {
        wall_start: after.wall_start,
        seconds: after.seconds,
    };
    outputs::finish(args, &mut report, &histograms, &span, samples)
}
