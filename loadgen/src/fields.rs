//! The report's figures by dotted path (`latency_ms.ack.p99`, `errors.request_timeout`,
//! `phases.1.ack_ms.p99`): flattening the JSON report, the unit of each figure, what a
//! `%` of it is a percentage of, which way is better (for `compare`), and the short
//! aliases `--assert` accepts. docs/loadgen.md lists them all.

use std::collections::BTreeMap;

use serde_json::Value;

/// Parts of the report that are not figures: the run's parameters, the per-second timeline (charted by
/// --html), its clock, and the assertions' own verdicts.
const NOT_FIGURES: [&str; 4] = [
    "timeline",
    "timeline_start_unix_ms",
    "assertions",
    "parameters",
];

/// Every number of a report by dotted path; booleans as 1 and 0, null as None. Strings
/// (protocol, phase names) are left out; so are `NOT_FIGURES`.
pub fn flatten(report: &Value) -> BTreeMap<String, Option<f64>> {
    let mut out = BTreeMap::new();
    if let Value::Object(m) = report {
        for (k, v) in m {
            if !NOT_FIGURES.contains(&k.as_str()) {
                walk(k, v, &mut out);
            }
        }
    }
    out
}

fn walk(path: &str, v: &Value, out: &mut BTreeMap<String, Option<f64>>) {
    match v {
        Value::Number(n) => {
            out.insert(path.to_string(), n.as_f64());
        }
        Value::Bool(b) => {
            out.insert(path.to_string(), Some(f64::from(u8::from(*b))));
        }
        Value::Null => {
            out.insert(path.to_string(), None);
        }
        Value::Object(m) => {
            for (k, v) in m {
                walk(&format!("{path}.{k}"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(&format!("{path}.{i}"), v, out);
            }
        }
        Value::String(_) => {}
    }
}

/// What a figure measures, for the units an assertion may use with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Latency in milliseconds (`latency_ms.*`, `phases.N.ack_ms.*`, except `count`).
    Millis,
    /// Seconds (`*seconds*`).
    Seconds,
    /// Bytes (`router.*bytes`).
    Bytes,
    /// Anything else: counts, rates, flags.
    Number,
}

pub fn unit(path: &str) -> Unit {
    let mut segs = path.split('.');
    let last = segs.next_back().unwrap_or("");
    if last.contains("seconds") {
        Unit::Seconds
    } else if last.ends_with("bytes") {
        Unit::Bytes
    } else if last != "count" && segs.any(|s| s.ends_with("_ms")) {
        Unit::Millis
    } else {
        Unit::Number
    }
}

/// Request outcomes, whose `%` is of the requests sent.
const REQUEST_OUTCOMES: [&str; 6] = [
    "acked",
    "timeout",
    "offline",
    "errors",
    "http_error",
    "transport_error",
];

/// Event counts, whose `%` is of the events sent.
const EVENT_COUNTS: [&str; 6] = [
    "received",
    "received_unique",
    "duplicated",
    "reordered",
    "lost",
    "lost_in_broken_connections",
];

/// What `%` of a figure is a percentage of (a path), when that means something:
/// connected devices of the target, request outcomes of the requests sent (the phase's
/// own for `phases.N.requests.*`), event counts of the events sent, the acked rate of
/// the target rate, request errors of the requests sent and device errors of the target.
pub fn percent_base(path: &str) -> Option<String> {
    let (head, last) = path.rsplit_once('.').unwrap_or(("", path));
    let base = match (head, last) {
        ("devices", "connected") => "devices.target".to_string(),
        ("requests", "rate") => "requests.target_rate".to_string(),
        ("events", l) if EVENT_COUNTS.contains(&l) => "events.sent".to_string(),
        ("errors", l) if l.starts_with("request_") => "requests.sent".to_string(),
        ("errors", _) => "devices.target".to_string(),
        (h, l) if h.ends_with("requests") && REQUEST_OUTCOMES.contains(&l) => format!("{h}.sent"),
        (h, "rate") if h.starts_with("phases.") => format!("{h}.target_rate"),
        _ => return None,
    };
    Some(base)
}

/// Which way a figure is better, and whether `compare` gates on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Latency and time-to-whole: higher is worse; gated on a relative increase beyond
    /// the tolerance (not gated when the base is 0: nothing was measured then).
    Lower,
    /// Errors, timeouts, lost events, reconnects: any increase from 0 is worse, else an
    /// increase beyond the tolerance.
    Fewer,
    /// Throughput and completeness: gated on a drop beyond the tolerance.
    Higher,
    /// Memory: lower is better, reported, not gated (the routers' RSS varies with the
    /// allocator's timing more than a tolerance can tell).
    LowerUngated,
    /// Descriptive (targets, counts of samples, the run's own settings): no direction.
    Neither,
}

/// Which way `path` is better (see `Better`; docs/loadgen.md has the table).
pub fn better(path: &str) -> Better {
    let (head, last) = path.rsplit_once('.').unwrap_or(("", path));
    let in_phase = head.starts_with("phases.");
    let request_failure = matches!(
        last,
        "timeout" | "offline" | "errors" | "http_error" | "transport_error"
    );
    if head == "errors" || (head.ends_with("requests") && request_failure) {
        return Better::Fewer;
    }
    if head.contains("_ms") {
        return match last {
            "count" => Better::Neither,
            // loadgen's own sender delay, not the router's.
            _ if head.ends_with("late") => Better::Neither,
            _ => Better::Lower,
        };
    }
    match (head, last) {
        ("events", "lost" | "lost_in_broken_connections" | "duplicated") => Better::Fewer,
        ("devices", "reconnects") => Better::Fewer,
        ("devices", "connect_seconds") | (_, "seconds_to_reconnect") => Better::Lower,
        ("devices", "connected" | "connects_per_sec") => Better::Higher,
        ("requests", "rate" | "acked") | ("events", "per_sec") => Better::Higher,
        (_, "complete") => Better::Higher,
        (_, "rate") if in_phase => Better::Higher,
        (
            "router" | "loadgen",
            "rss_bytes"
            | "rss_full_bytes"
            | "rss_peak_bytes"
            | "rss_per_device_bytes"
            | "rss_per_device_delta_bytes",
        ) => Better::LowerUngated,
        _ => Better::Neither,
    }
}

/// Histograms a `NAME.STAT` alias reaches under `latency_ms`.
const LATENCIES: [&str; 5] = ["ack", "connect", "auth", "event", "late"];
const STATS: [&str; 6] = ["count", "p50", "p90", "p99", "p999", "max"];

/// Single-word aliases and the report path each stands for.
pub const ALIASES: [(&str, &str); 15] = [
    ("connected", "devices.connected"),
    ("target", "devices.target"),
    ("connect_seconds", "devices.connect_seconds"),
    ("connects_per_sec", "devices.connects_per_sec"),
    ("reconnects", "devices.reconnects"),
    ("acked", "requests.acked"),
    ("timeouts", "requests.timeout"),
    ("offline", "requests.offline"),
    ("request_errors", "requests.errors"),
    ("request_rate", "requests.rate"),
    ("lost", "events.lost"),
    ("rss", "router.rss_bytes"),
    ("rss_per_device", "router.rss_per_device_bytes"),
    ("rss_per_device_delta", "router.rss_per_device_delta_bytes"),
    ("loadgen_rss_per_device", "loadgen.rss_per_device_bytes"),
];

/// The report path an alias stands for (`ack.p99` is `latency_ms.ack.p99`); None when
/// `name` is no alias. (`errors` and `errors.total` are sums, see `assert::Target`.)
pub fn resolve_alias(name: &str) -> Option<String> {
    if let Some((_, path)) = ALIASES.iter().find(|(a, _)| *a == name) {
        return Some(path.to_string());
    }
    if name == "storm.seconds" {
        return Some("storm.seconds_to_reconnect".into());
    }
    let (hist, stat) = name.split_once('.')?;
    (LATENCIES.contains(&hist) && STATS.contains(&stat)).then(|| format!("latency_ms.{name}"))
}

/// Whether `path` names a figure a report can have: one of the sample report's paths
/// (`Report::sample`, where every optional part is present), any `errors.KIND` (the
/// map holds only kinds that happened), any phase index.
pub fn is_known(path: &str) -> bool {
    if path.strip_prefix("errors.").is_some_and(|k| !k.is_empty()) {
        return true;
    }
    let shape = phase_zero(path);
    let sample = serde_json::to_value(crate::report::Report::sample()).unwrap_or(Value::Null);
    flatten(&sample).contains_key(&shape)
}

/// `phases.N.rest` as `phases.0.rest` (the sample's one phase); other paths unchanged.
fn phase_zero(path: &str) -> String {
    let mut segs: Vec<&str> = path.split('.').collect();
    if segs.len() > 2 && segs[0] == "phases" && segs[1].parse::<usize>().is_ok() {
        segs[1] = "0";
    }
    segs.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_walks_objects_and_arrays_but_not_the_timeline() {
        let v = serde_json::json!({
            "a": {"b": 1, "c": null, "d": true, "s": "text"},
            "phases": [{"x": 2.5}],
            "timeline": [{"t": 0}],
            "timeline_start_unix_ms": 5,
        });
        let f = flatten(&v);
        let want: BTreeMap<String, Option<f64>> = [
            ("a.b".to_string(), Some(1.0)),
            ("a.c".to_string(), None),
            ("a.d".to_string(), Some(1.0)),
            ("phases.0.x".to_string(), Some(2.5)),
        ]
        .into_iter()
        .collect();
        assert_eq!(f, want);
    }

    #[test]
    fn units_follow_the_field_names() {
        assert_eq!(unit("latency_ms.ack.p99"), Unit::Millis);
        assert_eq!(unit("phases.2.ack_ms.max"), Unit::Millis);
        assert_eq!(unit("latency_ms.ack.count"), Unit::Number);
        assert_eq!(unit("devices.connect_seconds"), Unit::Seconds);
        assert_eq!(unit("storm.seconds_to_reconnect"), Unit::Seconds);
        assert_eq!(unit("router.rss_per_device_bytes"), Unit::Bytes);
        assert_eq!(unit("requests.rate"), Unit::Number);
    }

    #[test]
    fn directions() {
        assert_eq!(better("latency_ms.ack.p99"), Better::Lower);
        assert_eq!(better("latency_ms.late.p99"), Better::Neither);
        assert_eq!(better("latency_ms.ack.count"), Better::Neither);
        assert_eq!(better("errors.connect_refused"), Better::Fewer);
        assert_eq!(better("requests.timeout"), Better::Fewer);
        assert_eq!(better("phases.1.requests.offline"), Better::Fewer);
        assert_eq!(better("events.lost"), Better::Fewer);
        assert_eq!(better("requests.rate"), Better::Higher);
        assert_eq!(better("storm.complete"), Better::Higher);
        assert_eq!(better("phases.0.rate"), Better::Higher);
        assert_eq!(better("phases.0.ack_ms.p99"), Better::Lower);
        assert_eq!(better("router.rss_per_device_bytes"), Better::LowerUngated);
        assert_eq!(better("requests.sent"), Better::Neither);
        assert_eq!(better("requests.target_rate"), Better::Neither);
    }

    #[test]
    fn aliases_and_known_paths() {
        assert_eq!(
            resolve_alias("ack.p99").as_deref(),
            Some("latency_ms.ack.p99")
        );
        assert_eq!(
            resolve_alias("timeouts").as_deref(),
            Some("requests.timeout")
        );
        assert_eq!(resolve_alias("ack.p98"), None);
        assert_eq!(resolve_alias("events.lost"), None);
        for p in [
            "events.lost",
            "latency_ms.event.p999",
            "errors.handshake_timeout",
            "storm.seconds_to_reconnect",
            "phases.3.ack_ms.p99",
            "phases.0.storm.devices",
        ] {
            assert!(is_known(p), "{p}");
        }
        for p in [
            "events.lots",
            "errors.",
            "latency_ms.ack",
            "phases.x.rate",
            "timeline.0.t",
        ] {
            assert!(!is_known(p), "{p}");
        }
    }

    #[test]
    fn percent_bases() {
        let b = |p| percent_base(p);
        assert_eq!(b("devices.connected").as_deref(), Some("devices.target"));
        assert_eq!(b("requests.timeout").as_deref(), Some("requests.sent"));
        assert_eq!(
            b("phases.1.requests.acked").as_deref(),
            Some("phases.1.requests.sent")
        );
        assert_eq!(b("events.lost").as_deref(), Some("events.sent"));
        assert_eq!(
            b("errors.request_offline").as_deref(),
            Some("requests.sent")
        );
        assert_eq!(b("errors.closed_1008").as_deref(), Some("devices.target"));
        assert_eq!(b("requests.rate").as_deref(), Some("requests.target_rate"));
        assert_eq!(b("latency_ms.ack.p99"), None);
    }
}
