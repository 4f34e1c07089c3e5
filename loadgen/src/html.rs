//! `--html FILE`: the run as one self-contained page (inline CSS and SVG, no script,
//! nothing fetched): the headline figures, the assertions, ack latency by percentile
//! (from the run's HDR histogram), the timeline's charts (ack latency, devices, requests
//! and events, errors, router RSS, with the phases marked), the phases and the run's
//! parameters.

use std::fmt::Write;

use hdrhistogram::Histogram;

use crate::report::Report;
use crate::svg::{self, esc, Chart, Series, COLORS};
use crate::thresholds::num;

/// A latency curve: its name and (percentile, ms) points.
pub type Curve<'a> = (&'a str, Vec<(f64, f64)>);

pub struct Input<'a> {
    pub report: &'a Report,
    /// Latency by percentile.
    pub curves: &'a [Curve<'a>],
    /// The run's parameters (`cli::parameters`).
    pub parameters: &'a [(String, String)],
}

/// Where a percentile sits on the curve's x axis: its "nines", -log10(1 - p/100)
/// (50 -> 0.3, 90 -> 1, 99 -> 2, 99.9 -> 3, ...).
fn nines(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-9).log10()
}

/// Points of a histogram's percentile curve from p50 to p99.999, evenly spread over the
/// nines (ms).
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    const STEPS: usize = 94;
    let (lo, hi) = (nines(50.0), 5.0);
    (0..=STEPS)
        .map(|i| {
            let x = lo + (hi - lo) * i as f64 / STEPS as f64;
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            (p, h.value_at_quantile(p / 100.0) as f64 / 1000.0)
        })
        .collect()
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1160px;color:#222}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:6px 0}\
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}\
figure{margin:10px 0}figcaption{font-weight:600;font-size:14px}\
svg{width:100%;height:auto;background:#fff}\
.grid{stroke:#eee}.axis{stroke:#888}.tick{stroke:#888}.marker{stroke:#999;stroke-dasharray:4 3}\
.line{fill:none;stroke-width:1.8}\
.ytick{font-size:11px;text-anchor:end;fill:#555}.xtick{font-size:11px;text-anchor:middle;fill:#555}\
.xlabel,.ylabel{font-size:12px;text-anchor:middle;fill:#333}\
.legend{font-size:12px;fill:#333}.mlabel{font-size:11px;fill:#666}\
.empty{font-size:14px;text-anchor:middle;fill:#999}.note{color:#666;font-size:13px}";

pub fn render(input: &Input) -> String {
    let r = input.report;
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>loadgen report</title><style>{STYLE}</style></head><body>\n\
         <h1>loadgen: {} devices ({} protocol), {} connected</h1>\n",
        r.devices.target,
        esc(&r.protocol),
        r.devices.connected
    );
    headline(&mut o, r);
    assertions(&mut o, r);
    o.push_str("<h2>Latency</h2>\n");
    o.push_str(&svg::line_chart(&percentile_chart(input.curves)));
    for chart in timeline_charts(r) {
        o.push_str(&chart);
    }
    phases(&mut o, r);
    errors(&mut o, r);
    parameters(&mut o, input.parameters);
    o.push_str("</body></html>\n");
    o
}

/// A table; no header row when `head` is empty.
fn table(o: &mut String, head: &[&str], rows: &[Vec<String>]) {
    o.push_str("<table>");
    if !head.is_empty() {
        o.push_str("<tr>");
        for h in head {
            let _ = write!(o, "<th>{}</th>", esc(h));
        }
        o.push_str("</tr>\n");
    }
    for row in rows {
        o.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            // Cells are escaped by their makers (some hold markup).
            let class = if i > 0 && cell.parse::<f64>().is_ok() {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(o, "<td{class}>{cell}</td>");
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
}

fn headline(o: &mut String, r: &Report) {
    let d = &r.devices;
    let q = &r.requests;
    let e = &r.events;
    let lost = match (e.counted, e.lost) {
        (true, Some(n)) => num(n as f64),
        _ => "not counted (needs --amqp)".into(),
    };
    let rows = vec![
        vec![
            "devices connected".into(),
            format!("{} of {}", d.connected, d.target),
        ],
        vec![
            "ramp".into(),
            format!(
                "{} s, {} connects/s",
                num(d.connect_seconds),
                num(d.connects_per_sec.round())
            ),
        ],
        vec![
            "requests".into(),
            format!(
                "{} sent, {} acked, {} timeout, {} offline, {} errors; {} acked/s of {}/s",
                q.counts.sent,
                q.counts.acked,
                q.counts.timeout,
                q.counts.offline,
                q.errors,
                num(q.rate.round()),
                num(q.target_rate.round())
            ),
        ],
        vec![
            "events".into(),
            format!("{} sent, {} received, lost: {lost}", e.sent, e.received),
        ],
        vec![
            "router RSS".into(),
            format!(
            "{:.1} MiB after the ramp ({:.1} MiB before), {} bytes per device over the baseline",
            r.router.rss_bytes as f64 / 1048576.0, r.router.rss_baseline_bytes as f64 / 1048576.0,
            num(r.router.rss_per_device_delta_bytes.round())
        ),
        ],
        vec![
            "loadgen RSS".into(),
            format!(
                "{:.1} MiB with every device in ({:.1} MiB at the start, peak {:.1} MiB), {} bytes per device over the start",
                r.loadgen.rss_full_bytes as f64 / 1048576.0,
                r.loadgen.rss_start_bytes as f64 / 1048576.0,
                r.loadgen.rss_peak_bytes as f64 / 1048576.0,
                num(r.loadgen.rss_per_device_delta_bytes.round())
            ),
        ],
    ];
    o.push_str("<h2>Summary</h2>\n");
    table(o, &[], &rows);
    let lat = &r.latency_ms;
    let rows: Vec<Vec<String>> = [
        ("ack", &lat.ack),
        ("connect", &lat.connect),
        ("auth", &lat.auth),
        ("event", &lat.event),
        ("late", &lat.late),
    ]
    .iter()
    .map(|(name, s)| {
        let mut row = vec![name.to_string(), s.count.to_string()];
        row.extend([s.p50, s.p90, s.p99, s.p999, s.max].iter().map(|v| ms(*v)));
        row
    })
    .collect();
    table(
        o,
        &["ms", "count", "p50", "p90", "p99", "p99.9", "max"],
        &rows,
    );
}

fn assertions(o: &mut String, r: &Report) {
    if r.assertions.is_empty() {
        return;
    }
    o.push_str("<h2>Assertions</h2>\n");
    let rows: Vec<Vec<String>> = r
        .assertions
        .iter()
        .map(|v| {
            let verdict = if v.passed {
                "<span class=\"pass\">PASS</span>"
            } else {
                "<span class=\"fail\">FAIL</span>"
            };
            vec![verdict.into(), esc(&v.expr), esc(&v.figure), esc(&v.shown)]
        })
        .collect();
    table(o, &["", "assertion", "figure", "measured"], &rows);
}

fn percentile_chart(curves: &[Curve]) -> Chart {
    let series = curves
        .iter()
        .zip(COLORS)
        .map(|((name, pts), color)| Series {
            name: format!("{name} latency"),
            color,
            points: pts.iter().map(|&(p, ms)| (nines(p), Some(ms))).collect(),
        })
        .collect();
    let x_ticks = ["50", "90", "99", "99.9", "99.99", "99.999"]
        .iter()
        .map(|p| (nines(p.parse().unwrap_or(50.0)), format!("p{p}")))
        .collect();
    Chart {
        title: "Latency by percentile (the run's HDR histograms)".into(),
        x_label: "percentile".into(),
        y_label: "ms".into(),
        series,
        x_ticks,
        markers: Vec::new(),
        x_range: None,
    }
}

/// A series over the timeline's seconds.
fn over_time(
    r: &Report,
    name: &str,
    color: &'static str,
    f: impl Fn(&crate::timeline::Second) -> Option<f64>,
) -> Series {
    Series {
        name: name.into(),
        color,
        points: r.timeline.iter().map(|s| (s.t as f64, f(s))).collect(),
    }
}

fn time_chart(r: &Report, title: &str, y_label: &str, series: Vec<Series>) -> String {
    let mut markers = vec![(0.0, "ramp".to_string())];
    markers.extend(r.phases.iter().map(|p| (p.start_seconds, p.name.clone())));
    let last = r.timeline.last().map_or(1.0, |s| s.t as f64);
    svg::line_chart(&Chart {
        title: title.into(),
        x_label: "seconds since the start of the ramp".into(),
        y_label: y_label.into(),
        series,
        x_ticks: Vec::new(),
        markers,
        x_range: Some((0.0, last.max(1.0))),
    })
}

fn timeline_charts(r: &Report) -> Vec<String> {
    let n = |v: u64| Some(v as f64);
    let latency = vec![
        over_time(r, "p50", COLORS[0], |s| s.ack_p50_ms),
        over_time(r, "p99", COLORS[1], |s| s.ack_p99_ms),
        over_time(r, "max", COLORS[3], |s| s.ack_max_ms),
    ];
    let devices = vec![
        over_time(r, "connected", COLORS[0], |s| n(s.connected)),
        over_time(r, "connects in the second", COLORS[2], |s| n(s.connects)),
    ];
    let throughput = vec![
        over_time(r, "acked", COLORS[0], |s| n(s.acked)),
        over_time(r, "events sent", COLORS[2], |s| n(s.events_sent)),
        over_time(r, "events received", COLORS[4], |s| n(s.events_received)),
    ];
    let errors = vec![
        over_time(r, "device errors", COLORS[1], |s| n(s.device_errors)),
        over_time(r, "timeouts", COLORS[3], |s| n(s.timeout)),
        over_time(r, "offline", COLORS[4], |s| n(s.offline)),
        over_time(r, "request errors", COLORS[5], |s| n(s.errors)),
    ];
    vec![
        time_chart(
            r,
            "Ack latency per second (requests by the second they were due)",
            "ms",
            latency,
        ),
        time_chart(r, "Devices", "devices", devices),
        time_chart(
            r,
            "Requests and events per second",
            "per second",
            throughput,
        ),
        time_chart(r, "Errors per second", "per second", errors),
        rss_chart(r),
    ]
}

/// The routers' RSS over time, or why there is none.
fn rss_chart(r: &Report) -> String {
    if r.timeline.iter().all(|s| s.router_rss_bytes.is_none()) {
        return "<figure class=\"chart\"><figcaption>Router RSS</figcaption>\
                <p class=\"note\">not sampled (--router-rss-interval 0, or no \
                router_process_resident_memory_bytes on the nodes' /metrics)</p></figure>\n"
            .into();
    }
    let mib = |s: &crate::timeline::Second| s.router_rss_bytes.map(|b| b as f64 / 1048576.0);
    let series = vec![over_time(r, "RSS", COLORS[0], mib)];
    time_chart(r, "Router RSS (sum over the --api nodes)", "MiB", series)
}

/// A latency cell: "-" when nothing was measured.
/// A latency; `-` when there was no sample (nothing measured is not 0).
fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn phases(o: &mut String, r: &Report) {
    if r.phases.is_empty() {
        return;
    }
    o.push_str("<h2>Phases</h2>\n");
    let rows: Vec<Vec<String>> = r
        .phases
        .iter()
        .map(|p| {
            let storm = p.storm.as_ref().map_or(String::new(), |s| {
                format!(
                    "{} devices dropped, {} in {} s",
                    s.devices,
                    if s.complete {
                        "all back"
                    } else {
                        "NOT all back"
                    },
                    num(s.seconds_to_reconnect)
                )
            });
            vec![
                esc(&p.name),
                format!("{:.1}", p.start_seconds),
                format!("{:.1}", p.seconds),
                num(p.target_rate),
                num(p.rate.round()),
                p.requests.sent.to_string(),
                p.requests.timeout.to_string(),
                ms(p.ack_ms.p50),
                ms(p.ack_ms.p99),
                ms(p.ack_ms.max),
                storm,
            ]
        })
        .collect();
    table(
        o,
        &[
            "phase",
            "start s",
            "seconds",
            "target/s",
            "acked/s",
            "sent",
            "timeouts",
            "ack p50 ms",
            "ack p99 ms",
            "ack max ms",
            "storm",
        ],
        &rows,
    );
}

fn errors(o: &mut String, r: &Report) {
    o.push_str("<h2>Errors</h2>\n");
    if r.errors.is_empty() {
        o.push_str("<p>none</p>\n");
        return;
    }
    let rows: Vec<Vec<String>> = r
        .errors
        .iter()
        .map(|(k, v)| vec![esc(k), v.to_string()])
        .collect();
    table(o, &["kind", "count"], &rows);
}

fn parameters(o: &mut String, params: &[(String, String)]) {
    o.push_str("<h2>Parameters</h2>\n");
    let rows: Vec<Vec<String>> = params.iter().map(|(k, v)| vec![esc(k), esc(v)]).collect();
    o.push_str("<div id=\"parameters\">\n");
    table(o, &["flag", "value (source)"], &rows);
    o.push_str("</div>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Report, Storm};
    use crate::timeline::Second;

    /// A run of 12 s: a ramp, a steady phase with acks every second, a storm at 8 s.
    fn synthetic() -> (Report, Vec<Curve<'static>>) {
        let mut r = Report::sample();
        r.devices.target = 300;
        r.devices.connected = 300;
        r.timeline = (0..12u64)
            .map(|t| Second {
                t,
                connected: (t * 100).min(300),
                connects: if t < 3 { 100 } else { 0 },
                acked: if t >= 3 { 50 } else { 0 },
                ack_p50_ms: (t >= 3).then_some(1.0 + t as f64 / 10.0),
                ack_p99_ms: (t >= 3).then_some(4.0 + t as f64),
                ack_max_ms: (t >= 3).then_some(9.0 + t as f64),
                device_errors: u64::from(t == 8) * 3,
                router_rss_bytes: Some((20 + t) << 20),
                ..Default::default()
            })
            .collect();
        r.phases[0].start_seconds = 3.0;
        r.phases[0].name = "steady".into();
        r.phases[0].storm = Some(Storm {
            at_seconds: 5.0,
            devices: 150,
            seconds_to_reconnect: 0.4,
            complete: true,
        });
        r.errors.insert("connect_refused".into(), 3);
        r.assertions = vec![crate::thresholds::Assertion::parse("ack.p99<5ms")
            .unwrap()
            .check(&serde_json::to_value(&r).unwrap())];
        let mut h = crate::hist::new_hist();
        for us in 1..=10_000u64 {
            crate::hist::record(&mut h, us * 3);
        }
        (r, vec![("ack", percentile_curve(&h))])
    }

    #[test]
    fn the_page_is_self_contained_with_charts_and_parameters() {
        let (r, curves) = synthetic();
        let params = vec![
            ("--devices".to_string(), "300 (command line)".to_string()),
            (
                "--api".to_string(),
                "http://127.0.0.1:8081 (default)".to_string(),
            ),
        ];
        let page = render(&Input {
            report: &r,
            curves: &curves,
            parameters: &params,
        });
        assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
        // Nothing from elsewhere: no URL, no script or stylesheet to fetch.
        for banned in ["http://", "https://", "<script", "<link", "src="] {
            assert!(!page.contains(banned), "{banned}");
        }
        // Six charts: percentiles, ack latency, devices, requests, errors, RSS.
        assert_eq!(page.matches("<svg").count(), 6, "{page}");
        let polylines = page.matches("<polyline").count();
        assert!(polylines >= 10, "{polylines}");
        // The percentile curve's axis and points (p99 of 1..30 ms is about 29.7 ms).
        assert!(page.contains(">p99.999<") && page.contains(">p50<"));
        assert!(page.contains("ack latency: "), "dots with tooltips");
        assert!(
            page.contains("<td>loadgen RSS</td>"),
            "loadgen's own memory in the summary"
        );
        // The parameters table, the URL kept readable but not a link.
        let params_at = page.find("<div id=\"parameters\">").unwrap();
        let table = &page[params_at..];
        assert!(
            table.contains("<td>--devices</td><td>300 (command line)</td>"),
            "{table}"
        );
        assert!(table.contains("http&#58;//127.0.0.1&#58;8081"), "{table}");
        // The assertion, the phase with its storm, the errors.
        assert!(page.contains("class=\"fail\">FAIL") || page.contains("class=\"pass\">PASS"));
        assert!(page.contains("150 devices dropped, all back"));
        assert!(page.contains("<td>connect_refused</td>"));
        // The phase marker on the time charts.
        assert!(page.contains(">steady</text>"));
    }

    #[test]
    fn rss_not_sampled_is_said() {
        let (mut r, curves) = synthetic();
        r.timeline
            .iter_mut()
            .for_each(|s| s.router_rss_bytes = None);
        let page = render(&Input {
            report: &r,
            curves: &curves,
            parameters: &[],
        });
        assert!(page.contains("not sampled"));
        assert_eq!(page.matches("<svg").count(), 5);
    }

    #[test]
    fn the_curve_climbs_from_p50_to_p99_999() {
        let mut h = crate::hist::new_hist();
        for us in 1..=100_000u64 {
            crate::hist::record(&mut h, us);
        }
        let c = percentile_curve(&h);
        assert!((c[0].0 - 50.0).abs() < 1e-9 && (c.last().unwrap().0 - 99.999).abs() < 1e-6);
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
        // p50 of 1..100,000 µs is about 50 ms.
        assert!((c[0].1 - 50.0).abs() < 0.1, "{:?}", c[0]);
    }
}
