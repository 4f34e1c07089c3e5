//! The report: a table for people, JSON with stable field names for CI.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::RequestCounts;
use crate::hist::Summary;
use crate::timeline::Second;

/// loadgen's version (Cargo) and the git commit it was built from ("unknown" outside
/// a git checkout), as every report carries them.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("LOADGEN_GIT_COMMIT");

/// One parameter of the run as the report carries it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Param {
    pub value: String,
    /// command line, environment, scenario or default.
    pub source: String,
}

/// The run's parameters by flag (`--devices`) from `cli::parameters`' ("--flag",
/// "value (source)") pairs.
pub fn params(pairs: &[(String, String)]) -> BTreeMap<String, Param> {
    pairs
        .iter()
        .map(|(flag, shown)| {
            let (value, source) = shown
                .strip_suffix(')')
                .and_then(|s| s.rsplit_once(" ("))
                .unwrap_or((shown.as_str(), ""));
            let p = Param {
                value: value.to_string(),
                source: source.to_string(),
            };
            (flag.clone(), p)
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// loadgen's version and the git commit it was built from.
    pub loadgen_version: String,
    pub loadgen_commit: String,
    /// Every flag of the run with its value and where it came from (the secret and
    /// the API token hidden), so that `compare` can tell runs apart.
    pub parameters: BTreeMap<String, Param>,
    pub protocol: String,
    pub workers: usize,
    pub devices: Devices,
    pub latency_ms: Latencies,
    pub requests: Requests,
    pub events: Events,
    pub errors: BTreeMap<String, u64>,
    /// With --storm-at: the reconnect storm; null otherwise.
    pub storm: Option<Storm>,
    pub router: Router,
    /// loadgen's own memory: its workers, which hold the simulated devices.
    pub loadgen: LoadgenMemory,
    /// Unix ms of second 0 of `timeline` (the start of the ramp).
    pub timeline_start_unix_ms: u64,
    /// The run second by second (`timeline::Second`).
    pub timeline: Vec<Second>,
    /// The run after the ramp, phase by phase (`--scenario` phases; without one, a
    /// `steady` phase and, with --hold, a `hold` phase).
    pub phases: Vec<Phase>,
    /// The --assert expressions, as checked at the end of the run.
    pub assertions: Vec<crate::thresholds::Verdict>,
}

/// One phase of the run after the ramp (stable JSON field names).
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// ramp, steady, storm or hold.
    pub name: String,
    /// Start, seconds since the start of the ramp (the timeline's clock).
    pub start_seconds: f64,
    pub seconds: f64,
    /// The phase's request rate (0 for hold).
    pub target_rate: f64,
    /// Acked requests per second over the phase.
    pub rate: f64,
    /// The devices' event interval set at the start of the phase; null: unchanged.
    pub event_interval: Option<f64>,
    pub requests: RequestCounts,
    /// Ack latency of the requests due in this phase.
    pub ack_ms: Summary,
    /// A storm phase's reconnect storm; null otherwise.
    pub storm: Option<Storm>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    pub at_seconds: f64,
    /// Devices the storm dropped at once (every connected one, or a storm phase's
    /// fraction of them).
    pub devices: u64,
    /// Until every one of them had reconnected (or the 120 s limit).
    pub seconds_to_reconnect: f64,
    pub complete: bool,
}

#[derive(Debug, Serialize)]
pub struct Devices {
    pub target: usize,
    pub connected: usize,
    pub connect_seconds: f64,
    pub connects_per_sec: f64,
    pub reconnects: u64,
}

#[derive(Debug, Serialize)]
pub struct Latencies {
    pub connect: Summary,
    pub auth: Summary,
    pub ack: Summary,
    pub event: Summary,
    /// How late each request left loadgen's sender (part of its `ack`): the sender's own
    /// scheduling delay, the machine's noise measured in the same run.
    pub late: Summary,
}

#[derive(Debug, Serialize)]
pub struct Requests {
    #[serde(flatten)]
    pub counts: RequestCounts,
    /// http_error + transport_error: requests that got neither an ack, a 504 nor a 404.
    pub errors: u64,
    /// Acked requests per second over the steady phase.
    pub rate: f64,
    pub target_rate: f64,
}

#[derive(Debug, Serialize)]
pub struct Events {
    /// Events the devices sent: the sum of their last seqs. A device whose worker never
    /// reported (errors.worker_lost) counts as the highest seq received from it when
    /// events are counted, as 0 otherwise.
    pub sent: u64,
    /// Stamped events that arrived, duplicates included.
    pub received: u64,
    pub per_sec: f64,
    /// True when loadgen consumed hive.events itself (--amqp with --event-interval) and
    /// counted each device's seqs; the five counts below are null otherwise.
    pub counted: bool,
    /// Distinct (device, seq) received.
    pub received_unique: Option<u64>,
    /// Deliveries of a seq already received (RabbitMQ's redeliveries to loadgen's own
    /// consumer after a reconnect are not counted: see `redelivered`).
    pub duplicated: Option<u64>,
    /// First arrivals of a seq below the highest already received from its device.
    pub reordered: Option<u64>,
    /// Seqs sent and never received, not counting `lost_in_broken_connections`.
    pub lost: Option<u64>,
    /// Seqs never received that were the trailing seqs of a device connection that broke
    /// (reset, end of stream without a close frame, an error, a storm drop): no seq sent
    /// later on the same connection was received. Events the router may never have
    /// confirmed when the connection, or its node, died.
    pub lost_in_broken_connections: Option<u64>,
    /// Deliveries RabbitMQ redelivered to loadgen's consumer (unacked when its connection
    /// went) of seqs it had counted already.
    pub redelivered: Option<u64>,
    /// Device connections that broke after sending events.
    pub broken_connections: u64,
    /// Times loadgen's hive.events consumer reconnected.
    pub consumer_reconnects: u64,
    /// Seconds spent at the end waiting for events in flight (--event-drain-timeout).
    pub drain_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Router {
    /// Sum over the --api nodes, after the ramp with the fleet idle.
    pub rss_bytes: u64,
    pub rss_baseline_bytes: u64,
    pub connections: u64,
    pub rss_per_device_bytes: f64,
    /// (RSS after ramp - RSS before) / connected devices: the cost of one idle device.
    pub rss_per_device_delta_bytes: f64,
}

/// The workers' resident memory, summed (the coordinator holds no device and is left out).
#[derive(Debug, Serialize, Default)]
pub struct LoadgenMemory {
    /// Before the first device.
    pub rss_start_bytes: u64,
    /// When every device was first connected (each worker at its own moment; 0 when some
    /// worker never had all its devices in).
    pub rss_full_bytes: u64,
    /// The workers' peaks (VmHWM), at the end of the run.
    pub rss_peak_bytes: u64,
    /// rss_full_bytes / target devices (the peak where the fleet never was all in).
    pub rss_per_device_bytes: f64,
    /// (rss_full_bytes - rss_start_bytes) / target devices: what one simulated device
    /// costs, without the workers' fixed memory.
    pub rss_per_device_delta_bytes: f64,
}

impl Report {
    pub fn table(&self) -> String {
        let mut o = String::new();
        // No sample, no percentile: `-`, never 0.
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        let row = |o: &mut String, name: &str, s: &Summary| {
            o.push_str(&format!(
                "{name:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
                s.count,
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.p999),
                ms(s.max)
            ));
        };
        o.push_str(&format!(
            "devices  {}/{} connected ({} protocol, {} workers) in {:.2} s = {:.0} connects/s, {} reconnects\n",
            self.devices.connected, self.devices.target, self.protocol, self.workers, self.devices.connect_seconds, self.devices.connects_per_sec, self.devices.reconnects
        ));
        o.push_str(&format!(
            "{:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "ms", "count", "p50", "p90", "p99", "p99.9", "max"
        ));
        row(&mut o, "connect", &self.latency_ms.connect);
        row(&mut o, "auth", &self.latency_ms.auth);
        row(&mut o, "ack", &self.latency_ms.ack);
        row(&mut o, "event", &self.latency_ms.event);
        row(&mut o, "late", &self.latency_ms.late);
        let c = &self.requests.counts;
        o.push_str(&format!(
            "requests {} sent, {} acked ({:.0}/s of {:.0}/s), {} timeout, {} offline, {} http errors, {} transport errors\n",
            c.sent, c.acked, self.requests.rate, self.requests.target_rate, c.timeout, c.offline, c.http_error, c.transport_error
        ));
        let e = &self.events;
        o.push_str(&format!(
            "events   {} sent, {} received ({:.0}/s)",
            e.sent, e.received, e.per_sec
        ));
        let n = |v: Option<u64>| v.unwrap_or(0);
        if e.counted {
            o.push_str(&format!(
                ": {} unique, {} duplicated, {} reordered, {} lost, {} lost in {} broken connections; {} consumer reconnects, drained {:.1} s\n",
                n(e.received_unique), n(e.duplicated), n(e.reordered), n(e.lost),
                n(e.lost_in_broken_connections), e.broken_connections, e.consumer_reconnects, e.drain_seconds
            ));
        } else {
            o.push_str(", not counted per device (needs --amqp)\n");
        }
        o.push_str(&format!(
            "router   RSS {:.1} MiB (baseline {:.1} MiB) for {} connections: {:.0} bytes/device, {:.0} bytes/device over baseline\n",
            self.router.rss_bytes as f64 / 1048576.0, self.router.rss_baseline_bytes as f64 / 1048576.0, self.router.connections, self.router.rss_per_device_bytes, self.router.rss_per_device_delta_bytes
        ));
        let l = &self.loadgen;
        o.push_str(&format!(
            "loadgen  RSS {:.1} MiB (start {:.1} MiB, peak {:.1} MiB) in {} workers: {:.0} bytes/device, {:.0} bytes/device over start\n",
            l.rss_full_bytes as f64 / 1048576.0, l.rss_start_bytes as f64 / 1048576.0, l.rss_peak_bytes as f64 / 1048576.0, self.workers, l.rss_per_device_bytes, l.rss_per_device_delta_bytes
        ));
        if let Some(st) = &self.storm {
            o.push_str(&format!(
                "storm    {} devices dropped at {:.1}s, {} in {:.2} s ({:.0} reconnects/s)\n",
                st.devices,
                st.at_seconds,
                if st.complete {
                    "all back"
                } else {
                    "NOT all back"
                },
                st.seconds_to_reconnect,
                st.devices as f64 / st.seconds_to_reconnect.max(1e-3)
            ));
        }
        if self.errors.is_empty() {
            o.push_str("errors   none\n");
        } else {
            o.push_str(&format!("errors   {:?}\n", self.errors));
        }
        o
    }
}

impl Events {
    /// Events as a run without per-device counting reports them, all zero.
    pub fn not_counted() -> Events {
        Events {
            sent: 0,
            received: 0,
            per_sec: 0.0,
            counted: false,
            received_unique: None,
            duplicated: None,
            reordered: None,
            lost: None,
            lost_in_broken_connections: None,
            redelivered: None,
            broken_connections: 0,
            consumer_reconnects: 0,
            drain_seconds: 0.0,
        }
    }
}

impl Report {
    /// A report with every field present (a storm, events counted, one phase, one
    /// second of timeline), all figures zero: the shape `--assert` paths are checked
    /// against before a run, and a base for tests.
    pub fn sample() -> Report {
        let s = crate::hist::summary(&crate::hist::new_hist());
        let storm = Storm {
            at_seconds: 0.0,
            devices: 0,
            seconds_to_reconnect: 0.0,
            complete: true,
        };
        let some = Some(0);
        Report {
            loadgen_version: VERSION.into(),
            loadgen_commit: COMMIT.into(),
            parameters: BTreeMap::new(),
            protocol: "hive".into(),
            workers: 1,
            devices: Devices {
                target: 0,
                connected: 0,
                connect_seconds: 0.0,
                connects_per_sec: 0.0,
                reconnects: 0,
            },
            latency_ms: Latencies {
                connect: s.clone(),
                auth: s.clone(),
                ack: s.clone(),
                event: s.clone(),
                late: s.clone(),
            },
            requests: Requests {
                counts: RequestCounts::default(),
                errors: 0,
                rate: 0.0,
                target_rate: 0.0,
            },
            events: Events {
                counted: true,
                received_unique: some,
                duplicated: some,
                reordered: some,
                lost: some,
                lost_in_broken_connections: some,
                redelivered: some,
                ..Events::not_counted()
            },
            errors: BTreeMap::new(),
            storm: Some(storm.clone()),
            router: Router {
                rss_bytes: 0,
                rss_baseline_bytes: 0,
                connections: 0,
                rss_per_device_bytes: 0.0,
                rss_per_device_delta_bytes: 0.0,
            },
            loadgen: LoadgenMemory::default(),
            timeline_start_unix_ms: 0,
            timeline: vec![Second::default()],
            phases: vec![Phase {
                name: "steady".into(),
                start_seconds: 0.0,
                seconds: 0.0,
                target_rate: 0.0,
                rate: 0.0,
                event_interval: Some(0.0),
                requests: RequestCounts::default(),
                ack_ms: s,
                storm: Some(storm),
            }],
            assertions: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_names_are_stable() {
        let mut r = Report::sample();
        r.storm = None;
        r.events = Events::not_counted();
        let v = serde_json::to_value(&r).unwrap();
        for path in [
            "/devices/target",
            "/devices/connected",
            "/devices/connect_seconds",
            "/devices/connects_per_sec",
            "/latency_ms/ack/p50",
            "/latency_ms/ack/p90",
            "/latency_ms/ack/p99",
            "/latency_ms/ack/p999",
            "/latency_ms/ack/max",
            "/latency_ms/connect/count",
            "/latency_ms/event/p99",
            "/latency_ms/late/p99",
            "/requests/sent",
            "/requests/acked",
            "/requests/timeout",
            "/requests/offline",
            "/requests/errors",
            "/requests/http_error",
            "/requests/transport_error",
            "/devices/reconnects",
            "/latency_ms/auth/p999",
            "/events/received",
            "/router/rss_bytes",
            "/router/rss_baseline_bytes",
            "/router/rss_per_device_bytes",
            "/requests/rate",
            "/events/sent",
            "/errors",
            "/router/rss_per_device_delta_bytes",
            "/loadgen/rss_start_bytes",
            "/loadgen/rss_full_bytes",
            "/loadgen/rss_peak_bytes",
            "/loadgen/rss_per_device_bytes",
            "/loadgen/rss_per_device_delta_bytes",
            "/events/counted",
            "/events/received_unique",
            "/events/duplicated",
            "/events/reordered",
            "/events/lost",
            "/events/lost_in_broken_connections",
            "/timeline_start_unix_ms",
            "/timeline/0/t",
            "/timeline/0/connected",
            "/timeline/0/acked",
            "/timeline/0/timeout",
            "/timeline/0/offline",
            "/timeline/0/errors",
            "/timeline/0/events_sent",
            "/timeline/0/events_received",
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
        // What built it and how it ran.
        assert_eq!(v["loadgen_version"], env!("CARGO_PKG_VERSION"));
        let commit = v["loadgen_commit"].as_str().unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{commit}"
        );
        assert!(v["parameters"].is_object());
        let p = params(&[
            ("--devices".into(), "100 (command line)".into()),
            ("--url".into(), "ws://a (1) (environment)".into()),
        ]);
        assert_eq!(p["--devices"].value, "100");
        assert_eq!(p["--url"].value, "ws://a (1)");
        assert_eq!(p["--url"].source, "environment");
        // Not counted: null, not 0.
        assert!(v["events"]["lost"].is_null() && v["events"]["counted"] == false);
        assert!(r.table().contains("not counted"));
        assert!(r.table().contains("p99.9"));
    }
}
