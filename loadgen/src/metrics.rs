//! `--metrics ADDR`: loadgen's own counters in the Prometheus text format on
//! http://ADDR/metrics while the run lasts, all named `loadgen_*` (docs/loadgen.md lists
//! them; grafana/dashboards/hive-router.json has a loadgen row over them).
//!
//! The backend counts its requests here as they end (`Live`); the fleet's side (the
//! workers' latest progress lines, the event watcher's count) is read at each scrape.
//! Lost events are known only at the end of the run (the report's `events.lost`).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::timeline::Req;

/// Ack latency buckets, seconds (upper bounds): the router's own, so that the two
/// histograms line up on a dashboard.
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// What the backend and the coordinator count while the run goes on.
pub struct Live {
    sent: AtomicU64,
    /// By `Req`: acked, timeout, offline, error.
    outcomes: [AtomicU64; 4],
    buckets: [AtomicU64; BUCKETS.len()],
    ack_sum_us: AtomicU64,
    /// The phase running now and its request rate (f64 bits).
    phase: Mutex<&'static str>,
    target_rate: AtomicU64,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            sent: AtomicU64::new(0),
            outcomes: Default::default(),
            buckets: Default::default(),
            ack_sum_us: AtomicU64::new(0),
            phase: Mutex::new("start"),
            target_rate: AtomicU64::new(0),
        }
    }
}

impl Live {
    pub fn request_sent(&self) {
        self.sent.fetch_add(1, Relaxed);
    }

    pub fn request_done(&self, outcome: Req, latency_us: u64) {
        self.outcomes[outcome as usize].fetch_add(1, Relaxed);
        if outcome != Req::Acked {
            return;
        }
        let secs = latency_us as f64 / 1e6;
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.ack_sum_us.fetch_add(latency_us, Relaxed);
    }

    pub fn set_phase(&self, name: &'static str, request_rate: f64) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = name;
        self.target_rate.store(request_rate.to_bits(), Relaxed);
    }

    pub fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fleet's counts at the moment of a scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fleet {
    pub target: u64,
    pub connected: u64,
    /// Connections made (first connects and reconnects).
    pub connects: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub events_sent: u64,
    pub events_received: u64,
}

fn metric(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

/// A series without labels: name, type, help, value.
type Plain = (&'static str, &'static str, &'static str, f64);

fn plain(live: &Live, fleet: &Fleet) -> [Plain; 9] {
    let n = |v: u64| v as f64;
    let rate = f64::from_bits(live.target_rate.load(Relaxed));
    [
        (
            "loadgen_devices_target",
            "gauge",
            "Devices to simulate (--devices).",
            n(fleet.target),
        ),
        (
            "loadgen_devices_connected",
            "gauge",
            "Simulated devices connected and authenticated now.",
            n(fleet.connected),
        ),
        (
            "loadgen_connects_total",
            "counter",
            "Device connections made (first connects and reconnects).",
            n(fleet.connects),
        ),
        (
            "loadgen_device_errors_total",
            "counter",
            "Device connection errors (failed connects, refused auth, lost connections).",
            n(fleet.errors),
        ),
        (
            "loadgen_reconnects_total",
            "counter",
            "Device reconnect attempts after an error.",
            n(fleet.reconnects),
        ),
        (
            "loadgen_requests_sent_total",
            "counter",
            "Backend requests sent through the router's API.",
            n(live.sent.load(Relaxed)),
        ),
        (
            "loadgen_request_rate_target",
            "gauge",
            "Requests per second the current phase sends.",
            rate,
        ),
        (
            "loadgen_events_sent_total",
            "counter",
            "Events the simulated devices sent.",
            n(fleet.events_sent),
        ),
        (
            "loadgen_events_received_total",
            "counter",
            "Stamped events loadgen received back (router /v1/events, or hive.events with --amqp).",
            n(fleet.events_received),
        ),
    ]
}

/// The /metrics page.
pub fn render(live: &Live, fleet: &Fleet) -> String {
    let mut o = String::new();
    for (name, kind, help, v) in plain(live, fleet) {
        metric(&mut o, name, kind, help, &[("", v)]);
    }
    let labels = ["acked", "timeout", "offline", "error"].map(|o| format!("{{outcome=\"{o}\"}}"));
    let by_outcome: Vec<(&str, f64)> = labels
        .iter()
        .zip(&live.outcomes)
        .map(|(l, c)| (l.as_str(), c.load(Relaxed) as f64))
        .collect();
    let help = "Backend requests ended, by outcome (acked, timeout = 504, offline = 404, \
                error = any other answer or none).";
    metric(
        &mut o,
        "loadgen_requests_total",
        "counter",
        help,
        &by_outcome,
    );
    let phase = format!("{{phase=\"{}\"}}", live.phase());
    let help = "The phase running now (ramp, steady, storm, hold, drain), as a label.";
    metric(
        &mut o,
        "loadgen_phase",
        "gauge",
        help,
        &[(phase.as_str(), 1.0)],
    );
    ack_histogram(&mut o, live);
    o
}

fn ack_histogram(o: &mut String, live: &Live) {
    let name = "loadgen_ack_latency_seconds";
    let help = "Ack latency of the backend's requests, from their due time (open loop).";
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (b, c) in BUCKETS.iter().zip(&live.buckets) {
        cumulative += c.load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
    }
    let count = live.outcomes[Req::Acked as usize].load(Relaxed);
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(
        o,
        "{name}_sum {}",
        live.ack_sum_us.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(o, "{name}_count {count}");
}

/// Serve `page()` on http://ADDR/metrics from now until the runtime ends; the address
/// bound (ADDR's port may be 0).
pub async fn serve(
    addr: SocketAddr,
    page: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    use axum::http::header::CONTENT_TYPE;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handler = move || {
        let body = page();
        async move { ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Samples of a text page: `name{labels}` -> value; fails on a line that is neither
    /// a comment nor `series value`.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            out.insert(series.to_string(), value.parse().unwrap());
        }
        out
    }

    fn live() -> Arc<Live> {
        let live = Arc::new(Live::default());
        live.set_phase("steady", 250.0);
        for us in [80, 900, 1_500, 30_000, 20_000_000] {
            live.request_sent();
            live.request_done(Req::Acked, us);
        }
        live.request_sent();
        live.request_done(Req::Timeout, 5_000_000);
        live
    }

    #[test]
    fn the_page_has_every_series_and_a_cumulative_histogram() {
        let fleet = Fleet {
            target: 300,
            connected: 298,
            connects: 310,
            errors: 2,
            reconnects: 12,
            events_sent: 40,
            events_received: 39,
        };
        let m = parse(&render(&live(), &fleet));
        assert_eq!(m["loadgen_devices_connected"], 298.0);
        assert_eq!(m["loadgen_devices_target"], 300.0);
        assert_eq!(m["loadgen_connects_total"], 310.0);
        assert_eq!(m["loadgen_requests_sent_total"], 6.0);
        assert_eq!(m["loadgen_requests_total{outcome=\"acked\"}"], 5.0);
        assert_eq!(m["loadgen_requests_total{outcome=\"timeout\"}"], 1.0);
        assert_eq!(m["loadgen_requests_total{outcome=\"offline\"}"], 0.0);
        assert_eq!(m["loadgen_request_rate_target"], 250.0);
        assert_eq!(m["loadgen_events_received_total"], 39.0);
        assert_eq!(m["loadgen_phase{phase=\"steady\"}"], 1.0);
        let b = |le: &str| m[&format!("loadgen_ack_latency_seconds_bucket{{le=\"{le}\"}}")];
        assert_eq!(
            (b("0.0001"), b("0.001"), b("0.002"), b("0.05")),
            (1.0, 2.0, 3.0, 4.0)
        );
        // 20 s is beyond the last bucket: only in +Inf and the count.
        assert_eq!((b("10"), b("+Inf")), (4.0, 5.0));
        assert_eq!(m["loadgen_ack_latency_seconds_count"], 5.0);
        assert!((m["loadgen_ack_latency_seconds_sum"] - 20.03248).abs() < 1e-9);
    }

    #[test]
    fn the_dashboard_asks_for_series_the_page_has() {
        let dashboard = include_str!("../../grafana/dashboards/hive-router.json");
        let page = render(&live(), &Fleet::default());
        let served: std::collections::HashSet<&str> = page
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let mut asked = 0;
        for (at, _) in dashboard.match_indices("loadgen_") {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            assert!(served.contains(name.as_str()), "{name} is not served");
            asked += 1;
        }
        assert!(asked >= 15, "the loadgen row has {asked} series");
    }

    #[tokio::test]
    async fn served_over_http() {
        let live = live();
        let page: Arc<dyn Fn() -> String + Send + Sync> = {
            let live = live.clone();
            Arc::new(move || render(&live, &Fleet::default()))
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), page).await.unwrap();
        live.request_sent();
        let resp = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/plain"), "{kind}");
        let m = parse(&resp.text().await.unwrap());
        // Read at the scrape: the request sent after the server started counts.
        assert_eq!(m["loadgen_requests_sent_total"], 7.0);
        let missing = reqwest::get(format!("http://{addr}/other")).await.unwrap();
        assert_eq!(missing.status(), 404);
    }
}
