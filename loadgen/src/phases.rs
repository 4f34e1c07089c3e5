//! The run after the ramp, one segment (`scenario::Segment`) after the other: each sets
//! the devices' event interval when it has one, sends requests at its rate for its
//! duration (none in hold), and starts its storm; what each measured becomes a phase of
//! the report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use crate::backend::{self, Backend, RequestStats, Schedule, Sinks};
use crate::hist;
use crate::pool::{self, Workers};
use crate::progress::Live;
use crate::report;
use crate::scenario::{Kind, Segment};

/// What the phases need from the coordinator.
pub struct Ctx {
    pub backend: Arc<Backend>,
    pub targets: Arc<Vec<(usize, Uuid)>>,
    pub sinks: Sinks,
    pub timeout_ms: u64,
    pub log: bool,
    /// The timeline's time zero (the start of the ramp).
    pub ramp_start: Instant,
    pub events_received: Arc<Mutex<u64>>,
}

/// What the phases measured together.
pub struct AfterRamp {
    /// Every request of every phase.
    pub outcome: RequestStats,
    pub phases: Vec<report::Phase>,
    /// The first storm.
    pub storm: Option<report::Storm>,
    /// Seconds of the phases that send requests (steady, storm), their time-weighted
    /// target rate, and the events received in them.
    pub request_seconds: f64,
    pub target_rate: f64,
    pub events_in_request_phases: u64,
    /// When the first phase started (wall clock) and how long all lasted.
    pub wall_start: SystemTime,
    pub seconds: f64,
}

pub async fn run(ctx: &Ctx, workers: &mut Workers, segments: &[Segment], live: &Live) -> AfterRamp {
    let epoch = Instant::now();
    let wall_start = SystemTime::now();
    let ticker = ticker(
        workers.progress.clone(),
        ctx.sinks.live.clone(),
        live.clone(),
        epoch,
    );
    let mut all = AfterRamp {
        outcome: RequestStats::empty(),
        phases: Vec::new(),
        storm: None,
        request_seconds: 0.0,
        target_rate: 0.0,
        events_in_request_phases: 0,
        wall_start,
        seconds: 0.0,
    };
    let mut weighted_rate = 0.0;
    for seg in segments {
        let (phase, outcome, events) = one(ctx, workers, seg, epoch).await;
        if seg.kind != Kind::Hold {
            all.request_seconds += phase.seconds;
            weighted_rate += seg.request_rate * phase.seconds;
            all.events_in_request_phases += events;
        }
        if all.storm.is_none() {
            all.storm = phase.storm.clone();
        }
        all.outcome.absorb(outcome);
        all.phases.push(phase);
    }
    ticker.abort();
    all.target_rate = match all.request_seconds {
        s if s > 0.0 => weighted_rate / s,
        _ => segments.first().map_or(0.0, |s| s.request_rate),
    };
    all.seconds = epoch.elapsed().as_secs_f64();
    all
}

/// One segment; its phase report, its requests, and the events received during it.
async fn one(
    ctx: &Ctx,
    workers: &mut Workers,
    seg: &Segment,
    epoch: Instant,
) -> (report::Phase, RequestStats, u64) {
    ctx.sinks.live.set_phase(seg.kind.name(), seg.request_rate);
    if let Some(iv) = seg.event_interval {
        workers.tell(&format!("events {iv}")).await;
    }
    let received = || {
        *ctx.events_received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    };
    let events_before = received();
    let start = Instant::now();
    let offset = start.duration_since(epoch).as_secs_f64();
    let schedule = Schedule {
        rate: seg.request_rate,
        duration: Duration::from_secs_f64(seg.seconds),
        timeout_ms: ctx.timeout_ms,
        log: ctx.log,
        epoch,
    };
    let requests = backend::run(
        ctx.backend.clone(),
        ctx.targets.clone(),
        schedule,
        ctx.sinks.clone(),
    );
    let storm = async {
        match seg.storm {
            Some((at, fraction)) => Some(workers.storm(at, fraction, offset + at).await),
            None => None,
        }
    };
    let (outcome, storm) = tokio::join!(requests, storm);
    tokio::time::sleep_until((start + schedule.duration).into()).await;
    let seconds = start.elapsed().as_secs_f64();
    let phase = report::Phase {
        name: seg.kind.name().to_string(),
        start_seconds: start.duration_since(ctx.ramp_start).as_secs_f64(),
        seconds,
        target_rate: seg.request_rate,
        rate: outcome.counts.acked as f64 / seconds.max(1e-3),
        event_interval: seg.event_interval,
        requests: outcome.counts.clone(),
        ack_ms: hist::summary(&outcome.acks),
        storm,
    };
    (phase, outcome, received() - events_before)
}

/// The live progress line during the phases: the phase, seconds since the ramp ended,
/// errors and reconnects.
fn ticker(
    progress: Arc<Mutex<Vec<pool::Progress>>>,
    metrics: Arc<crate::metrics::Live>,
    live: Live,
    epoch: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let p = pool::total(&progress);
            live.update(
                metrics.phase(),
                p.connected,
                format!(
                    "{:.1}s, {} errors, {} reconnects",
                    epoch.elapsed().as_secs_f64(),
                    p.errors,
                    p.reconnects
                ),
            );
        }
    })
}
