//! The report: a table for people, JSON with stable field names for CI.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::RequestCounts;
use crate::hist::Summary;

#[derive(Debug, Serialize)]
pub struct Report {
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
}

#[derive(Debug, Serialize)]
pub struct Storm {
    pub at_seconds: f64,
    /// Devices connected when the storm hit (all dropped at once).
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
    pub sent: u64,
    pub received: u64,
    pub per_sec: f64,
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

impl Report {
    pub fn table(&self) -> String {
        let mut o = String::new();
        let row = |o: &mut String, name: &str, s: &Summary| {
            o.push_str(&format!(
                "{name:<8} {:>10} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}\n",
                s.count, s.p50, s.p90, s.p99, s.p999, s.max
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
        o.push_str(&format!(
            "events   {} sent, {} received ({:.0}/s)\n",
            self.events.sent, self.events.received, self.events.per_sec
        ));
        o.push_str(&format!(
            "router   RSS {:.1} MiB (baseline {:.1} MiB) for {} connections: {:.0} bytes/device, {:.0} bytes/device over baseline\n",
            self.router.rss_bytes as f64 / 1048576.0, self.router.rss_baseline_bytes as f64 / 1048576.0, self.router.connections, self.router.rss_per_device_bytes, self.router.rss_per_device_delta_bytes
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::{new_hist, summary};

    #[test]
    fn json_field_names_are_stable() {
        let s = summary(&new_hist());
        let r = Report {
            protocol: "hive".into(),
            workers: 1,
            devices: Devices {
                target: 1,
                connected: 1,
                connect_seconds: 1.0,
                connects_per_sec: 1.0,
                reconnects: 0,
            },
            latency_ms: Latencies {
                connect: s.clone(),
                auth: s.clone(),
                ack: s.clone(),
                event: s.clone(),
                late: s,
            },
            requests: Requests {
                counts: RequestCounts::default(),
                errors: 0,
                rate: 0.0,
                target_rate: 0.0,
            },
            events: Events {
                sent: 0,
                received: 0,
                per_sec: 0.0,
            },
            errors: BTreeMap::new(),
            storm: None,
            router: Router {
                rss_bytes: 0,
                rss_baseline_bytes: 0,
                connections: 0,
                rss_per_device_bytes: 0.0,
                rss_per_device_delta_bytes: 0.0,
            },
        };
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
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
        assert!(r.table().contains("p99.9"));
    }
}
