//! The simulated backend: requests through the router's HTTP API at a fixed open-loop
//! rate, each timed from its due time to the ack's HTTP answer (µs, HDR). Requests go to
//! the node that holds the device, learned from each node's `GET /v1/devices`.
//!
//! HTTP client for the requests: `http::Node`, keep-alive connections per node; the pool
//! opens as many connections as there are requests in flight, so a slow router never
//! makes requests queue behind each other in the client (that would hide latency).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use uuid::Uuid;

use crate::hist;
use crate::http::HttpError;
use crate::sched::{latency, OpenLoop};
use crate::timeline::{Req, Timeline};

/// Outcome counts of the backend's requests (stable JSON field names).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct RequestCounts {
    pub sent: u64,
    pub acked: u64,
    /// 504: the device did not ack within timeout_ms.
    pub timeout: u64,
    /// 404: the device is not connected.
    pub offline: u64,
    /// Any other HTTP status.
    pub http_error: u64,
    /// No HTTP answer at all (refused, reset, or no answer within timeout_ms + 5 s).
    pub transport_error: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    timeout: AtomicU64,
    offline: AtomicU64,
    http_error: AtomicU64,
    transport_error: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RequestCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            sent: g(&self.sent),
            acked: g(&self.acked),
            timeout: g(&self.timeout),
            offline: g(&self.offline),
            http_error: g(&self.http_error),
            transport_error: g(&self.transport_error),
        }
    }
}

pub struct Backend {
    pub http: reqwest::Client,
    pub apis: Vec<String>,
    /// The request path's own client, one per API node (see `http`).
    pub nodes: Vec<crate::http::Node>,
}

/// (api index, device) pairs to aim at: devices each node says it holds. A router without
/// `GET /v1/devices` (or that answers nothing) gets the fleet's deterministic device ids,
/// round-robin over the APIs: every node of a shared bus can reach every device.
pub async fn targets(b: &Backend, per_node: usize, devices: usize) -> Vec<(usize, Uuid)> {
    let mut out = Vec::new();
    for (i, api) in b.apis.iter().enumerate() {
        let url = format!("{api}/v1/devices?limit={per_node}");
        let resp = b
            .http
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let Ok(r) = resp else { continue };
        if !r.status().is_success() {
            continue;
        }
        if let Ok(v) = r.json::<serde_json::Value>().await {
            for d in v["devices"].as_array().into_iter().flatten() {
                // Either a plain UUID string or an object with a "device" field.
                let s = d.as_str().or_else(|| d["device"].as_str());
                if let Some(u) = s.and_then(|s| Uuid::parse_str(s).ok()) {
                    out.push((i, u));
                }
            }
        }
    }
    if out.is_empty() {
        let n = devices.min(per_node.saturating_mul(b.apis.len()).max(1));
        out = (0..n)
            .map(|i| (i % b.apis.len().max(1), crate::cli::device_id(i)))
            .collect();
    }
    out
}

/// One request as `--request-log` writes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Due time, from the start of the steady phase.
    pub due_us: u64,
    pub node: usize,
    pub latency_us: u64,
    /// How late the request left (the sender's own delay, part of `latency_us`).
    pub late_us: u64,
    pub outcome: &'static str,
}

/// The request log as CSV, in due-time order.
pub fn write_log(mut samples: Vec<Sample>, out: &mut impl std::io::Write) -> std::io::Result<()> {
    samples.sort_by_key(|s| s.due_us);
    writeln!(out, "due_ms,node,latency_us,late_us,outcome")?;
    for s in samples {
        writeln!(
            out,
            "{}.{:03},{},{},{},{}",
            s.due_us / 1000,
            s.due_us % 1000,
            s.node,
            s.latency_us,
            s.late_us,
            s.outcome
        )?;
    }
    Ok(())
}

/// The latency a request counts at in the ack histogram: an acked one at its own, any
/// other (504 timeout, 404 offline, an HTTP or transport error) at least at the
/// request's timeout, so that a failure never makes the ack latency look better (a fast
/// 404 would otherwise pull the percentiles down, and a run with nothing acked would
/// have no latency at all).
pub fn counted_us(outcome: Req, latency_us: u64, timeout_ms: u64) -> u64 {
    match outcome {
        Req::Acked => latency_us,
        _ => latency_us.max(timeout_ms.saturating_mul(1000)),
    }
}

/// What the requests of one phase, or of several, measured.
pub struct RequestStats {
    /// Ack latency of every request from its due time: acked ones at their latency, the
    /// others at least at the timeout (`counted_us`).
    pub acks: Histogram<u64>,
    /// How late every request left the sender (due time to the send): the sender's own
    /// scheduling delay, measured in the same run as the acks it is part of.
    pub late: Histogram<u64>,
    pub counts: RequestCounts,
    /// Every request, with `--request-log`.
    pub samples: Vec<Sample>,
}

impl RequestStats {
    pub fn empty() -> RequestStats {
        RequestStats {
            acks: hist::new_hist(),
            late: hist::new_hist(),
            counts: RequestCounts::default(),
            samples: Vec::new(),
        }
    }

    /// Add another phase's requests to these.
    pub fn absorb(&mut self, other: RequestStats) {
        hist::merge(&mut self.acks, &other.acks);
        hist::merge(&mut self.late, &other.late);
        let (c, o) = (&mut self.counts, other.counts);
        c.sent += o.sent;
        c.acked += o.acked;
        c.timeout += o.timeout;
        c.offline += o.offline;
        c.http_error += o.http_error;
        c.transport_error += o.transport_error;
        self.samples.extend(other.samples);
    }
}

/// When and how one phase sends its requests.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Requests per second (open loop); 0: none.
    pub rate: f64,
    pub duration: Duration,
    pub timeout_ms: u64,
    /// Keep every request's `Sample` (--request-log).
    pub log: bool,
    /// Time zero of the samples' due times (the start of the first phase).
    pub epoch: Instant,
}

/// Where each request's outcome goes besides the `RequestStats`: the timeline (in the second
/// the request was due) and the live metrics.
#[derive(Clone)]
pub struct Sinks {
    pub timeline: Arc<Timeline>,
    pub live: Arc<crate::metrics::Live>,
}

/// Send requests at `s.rate` for `s.duration`; returns the ack and lateness histograms
/// and counts, and with `s.log` every request's sample.
pub async fn run(
    b: Arc<Backend>,
    targets: Arc<Vec<(usize, Uuid)>>,
    s: Schedule,
    sinks: Sinks,
) -> RequestStats {
    if targets.is_empty() || s.rate <= 0.0 || b.apis.is_empty() {
        return RequestStats::empty();
    }
    let (duration, timeout_ms, log) = (s.duration, s.timeout_ms, s.log);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let acks = Arc::new(Mutex::new(hist::new_hist()));
    let late = Arc::new(Mutex::new(hist::new_hist()));
    let counts = Arc::new(Counters::default());
    // The router answers 504 after timeout_ms; this only bounds a router that hangs.
    let client_timeout = Duration::from_millis(timeout_ms) + Duration::from_secs(5);
    let body = serde_json::json!({
        "command": "DeviceCommand",
        "payload": {"check": "disk"},
        "timeout_ms": timeout_ms,
    })
    .to_string();
    let start = Instant::now();
    let sched = OpenLoop::new(start, s.rate);
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    loop {
        let due = sched.due(i);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(sched.wake(i))).await;
        let (api, device) = targets[rand::thread_rng().gen_range(0..targets.len())];
        let path = format!("/v1/devices/{device}/requests");
        let (b2, acks2, counts2, body2) = (b.clone(), acks.clone(), counts.clone(), body.clone());
        let late2 = late.clone();
        let sinks2 = sinks.clone();
        let epoch = s.epoch;
        let samples2 = log.then(|| samples.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let late_us = sent.saturating_duration_since(due).as_micros() as u64;
            hist::record(
                &mut late2.lock().unwrap_or_else(|e| e.into_inner()),
                late_us,
            );
            counts2.sent.fetch_add(1, Ordering::Relaxed);
            sinks2.live.request_sent();
            let r = b2.nodes[api].post_json(&path, &body2, client_timeout).await;
            let done = Instant::now();
            let c = &counts2;
            let us = latency(due, sent, done).as_micros() as u64;
            let (counter, outcome, req) = match r {
                Ok(200) => (&c.acked, "acked", Req::Acked),
                Ok(504) => (&c.timeout, "timeout", Req::Timeout),
                Ok(404) => (&c.offline, "offline", Req::Offline),
                Ok(_) | Err(HttpError::Malformed) => (&c.http_error, "http_error", Req::Error),
                Err(HttpError::Transport) => (&c.transport_error, "transport_error", Req::Error),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            hist::record(
                &mut acks2.lock().unwrap_or_else(|e| e.into_inner()),
                counted_us(req, us, timeout_ms),
            );
            sinks2.timeline.request(due, req, us);
            sinks2.live.request_done(req, us);
            if let Some(s) = samples2 {
                let due_us = due.saturating_duration_since(epoch).as_micros() as u64;
                let sample = Sample {
                    due_us,
                    node: api,
                    latency_us: us,
                    late_us,
                    outcome,
                };
                s.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
            }
        });
        while tasks.try_join_next().is_some() {}
        i += 1;
    }
    while tasks.join_next().await.is_some() {}
    let take = |h: &Mutex<Histogram<u64>>| h.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    RequestStats {
        acks: take(&acks),
        late: take(&late),
        counts: counts.snapshot(),
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_at_least_at_the_timeout() {
        assert_eq!(counted_us(Req::Acked, 900, 500), 900);
        assert_eq!(counted_us(Req::Timeout, 500_300, 500), 500_300);
        // A fast 404 or a refused connection is no fast ack.
        assert_eq!(counted_us(Req::Offline, 200, 500), 500_000);
        assert_eq!(counted_us(Req::Error, 50, 5000), 5_000_000);
    }

    #[test]
    fn request_log_is_csv_in_due_order() {
        let s = |due_us, node, latency_us, late_us, outcome| Sample {
            due_us,
            node,
            latency_us,
            late_us,
            outcome,
        };
        let mut out = Vec::new();
        let samples = vec![
            s(2_500_017, 3, 912, 4, "acked"),
            s(1_000, 0, 5_000_000, 0, "timeout"),
        ];
        write_log(samples, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "due_ms,node,latency_us,late_us,outcome\n1.000,0,5000000,0,timeout\n2500.017,3,912,4,acked\n"
        );
    }
}
