//! `loadgen compare BASE.json NEW.json [--tolerance 10%] [--gate PREFIX,...]`: every
//! figure of two reports side by side (flattened dotted paths, `fields::flatten`), with
//! the absolute and relative change, and a verdict where the figure has a direction
//! (`fields::Better`).
//!
//! A comparison cannot pass falsely: a file that is not a loadgen report and a `--gate`
//! that names no figure are errors (exit 2); a figure measured in the base and not in
//! the new run (a latency whose samples went to none, a storm or phase that vanished,
//! events no longer counted) is a regression; a comparison in which no gated figure
//! could be judged fails. And it does not trip on noise (`not_judged`, `floor`): a
//! change must exceed both the relative tolerance and an absolute floor per unit; a
//! percentile is judged only with enough samples in both runs (10 / (1 - q): p50 20,
//! p90 100, p99 1000, p99.9 10000), a maximum (one sample) never; the ramp's figures
//! only when both ramps lasted `MIN_RAMP_SECONDS`. Each figure not judged says why.
//! Exit 1 when a gated figure got worse, 2 when a report cannot be read or a gate is
//! unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::fields::{self, Better, Unit};
use crate::thresholds::num;

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// The baseline report (written by --json).
    pub base: PathBuf,
    /// The report to judge against it.
    pub new: PathBuf,
    /// How much worse a figure may get before it counts, in percent ("10%" or "10"):
    /// relative to the base figure (and beyond an absolute floor per unit: 0.5 ms for
    /// latencies, 0.25 s for seconds, 1 for counts and rates).
    #[arg(long, default_value = "10%", value_parser = parse_tolerance)]
    pub tolerance: f64,
    /// Only figures whose path starts with one of these gate (repeat or comma-separate),
    /// e.g. --gate latency_ms.ack,requests,errors: the rest are still shown and marked.
    /// A prefix that names no figure a report can have is an error (exit 2).
    /// Default: every figure with a direction.
    #[arg(long, value_delimiter = ',', value_name = "PREFIX")]
    pub gate: Vec<String>,
    /// Also write the verdicts as JUnit XML here (one testcase per gated figure, a
    /// failure for each regression, skipped for figures not judged).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Also write the verdicts as Markdown here (a summary line, the regressions and
    /// every gated figure), e.g. for a pull request comment or a job summary.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
}

impl CompareArgs {
    fn gates(&self, path: &str) -> bool {
        self.gate.is_empty() || self.gate.iter().any(|g| path.starts_with(g.as_str()))
    }
}

/// "10%" or "10" as 0.10.
pub fn parse_tolerance(s: &str) -> Result<f64, String> {
    let pct: f64 = s
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: want a percentage like 10%"))?;
    if !(0.0..=10_000.0).contains(&pct) {
        return Err(format!("{s:?}: want 0% to 10000%"));
    }
    Ok(pct / 100.0)
}

/// How one figure changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Within the tolerance or the floor (or the same).
    Same,
    Better,
    /// Worse beyond the tolerance and the floor, on a gated figure (or measured in the
    /// base and not in the new run): the comparison fails.
    Worse,
    /// Worse on a figure that does not gate (memory, or outside --gate).
    WorseUngated,
    /// A figure with a direction that could not be judged (too few samples, a maximum,
    /// a short ramp, the base 0 or not measured): `Row::why` says why.
    NotJudged,
    /// No direction, or measured in neither run.
    Info,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub path: String,
    pub base: Option<f64>,
    pub new: Option<f64>,
    pub mark: Mark,
    /// Why the figure was not judged, or was judged as it was when that is not plain
    /// from the numbers (under the floor, samples to none).
    pub why: String,
}

/// A ramp shorter than this is one moment of the machine: every device connected
/// within a few scheduler slices, so its latencies and its speed swing with whatever
/// else ran then (two identical 1,000-device ramps of 0.2 s had connect p50 0.9 and
/// 25 ms on a shared machine). Its figures are not judged.
pub const MIN_RAMP_SECONDS: f64 = 5.0;

/// A report's figures by path, with the percentiles of a histogram without samples as
/// None (older reports wrote 0 beside `count` 0).
fn figures(report: &serde_json::Value) -> BTreeMap<String, Option<f64>> {
    let mut flat = fields::flatten(report);
    let empty: Vec<String> = flat
        .iter()
        .filter(|(k, v)| k.ends_with(".count") && **v == Some(0.0))
        .filter_map(|(k, _)| k.strip_suffix(".count").map(str::to_string))
        .filter(|h| h.split('.').any(|s| s.ends_with("_ms")))
        .collect();
    for h in empty {
        for stat in ["p50", "p90", "p99", "p999", "max"] {
            if let Some(v) = flat.get_mut(&format!("{h}.{stat}")) {
                *v = None;
            }
        }
    }
    flat
}

/// Every figure of both reports, in path order.
pub fn rows(base: &serde_json::Value, new: &serde_json::Value, tolerance: f64) -> Vec<Row> {
    let (b, n) = (figures(base), figures(new));
    let paths: BTreeSet<&String> = b.keys().chain(n.keys()).collect();
    paths
        .into_iter()
        .map(|path| {
            let (base, new) = (value(&b, path), value(&n, path));
            let (mark, why) = judge_figure(path, &b, &n, tolerance);
            Row {
                path: path.clone(),
                base,
                new,
                mark,
                why,
            }
        })
        .collect()
}

/// A figure of one report; an error kind that report does not list happened 0 times.
fn value(flat: &BTreeMap<String, Option<f64>>, path: &str) -> Option<f64> {
    match flat.get(path) {
        Some(v) => *v,
        None if path.starts_with("errors.") => Some(0.0),
        None => None,
    }
}

/// The verdict on one figure of the two reports, and why when it needs saying.
fn judge_figure(
    path: &str,
    b: &BTreeMap<String, Option<f64>>,
    n: &BTreeMap<String, Option<f64>>,
    tol: f64,
) -> (Mark, String) {
    let better = fields::better(path);
    if better == Better::Neither {
        return (Mark::Info, String::new());
    }
    match (value(b, path), value(n, path)) {
        (None, None) => (Mark::Info, String::new()),
        (Some(_), None) => {
            let mark = if better == Better::LowerUngated {
                Mark::WorseUngated
            } else {
                Mark::Worse
            };
            (mark, "measured in the base, nothing to measure now".into())
        }
        (None, Some(_)) => (Mark::NotJudged, "not measured in the base".into()),
        (Some(x), Some(y)) => match not_judged(path, b, n) {
            Some(why) => (Mark::NotJudged, why),
            None => judge_values(better, x, y, tol, floor(path)),
        },
    }
}

/// The least number of samples a percentile is judged from: 10 / (1 - q), so that
/// some ten samples lie beyond it. None for the maximum: one sample, never judged.
pub fn min_samples(stat: &str) -> Option<u64> {
    match stat {
        "p50" => Some(20),
        "p90" => Some(100),
        "p99" => Some(1_000),
        "p999" => Some(10_000),
        _ => None,
    }
}

/// Why a figure with a value on both sides is not judged (None: it is).
fn not_judged(
    path: &str,
    b: &BTreeMap<String, Option<f64>>,
    n: &BTreeMap<String, Option<f64>>,
) -> Option<String> {
    let ramp_figure = path.starts_with("latency_ms.connect.")
        || path.starts_with("latency_ms.auth.")
        || path == "devices.connect_seconds"
        || path == "devices.connects_per_sec";
    if ramp_figure {
        let ramp =
            |f: &BTreeMap<String, Option<f64>>| f.get("devices.connect_seconds").copied().flatten();
        let shortest = ramp(b).unwrap_or(0.0).min(ramp(n).unwrap_or(0.0));
        if shortest < MIN_RAMP_SECONDS {
            return Some(format!(
                "ramp of {shortest:.2} s: shorter than {MIN_RAMP_SECONDS} s, one moment of the machine"
            ));
        }
    }
    if fields::unit(path) == Unit::Millis {
        let (hist, stat) = path.rsplit_once('.')?;
        let Some(need) = min_samples(stat) else {
            return Some(format!(
                "{stat}: a single sample, not judged (use --assert)"
            ));
        };
        let have = effective_samples(hist, b).min(effective_samples(hist, n));
        if have < need {
            return Some(format!(
                "{stat} of {have} independent samples: needs >= {need}"
            ));
        }
    }
    None
}

/// Samples within a fifth of a second share the machine's state of that moment (a burst
/// of other work delays them all): a histogram counts as at most five independent
/// samples per second of the time it was recorded over. (Measured: three identical
/// back-to-back 1,000-device runs of 10 s at 100 requests/s on a shared 2-core machine
/// had ack p50 1.24, 1.52 and 1.60 ms but p90 1.76, 3.03 and 7.25 ms: their 1,000 acks
/// judge a median, not a p90.)
pub const SAMPLES_PER_SECOND: f64 = 5.0;

/// The samples of histogram `hist` (a path like `latency_ms.ack`) that count as
/// independent: its count, at most `SAMPLES_PER_SECOND` per second it spans (the ramp
/// for connect and auth, the request phases for ack and late, a phase for its own).
fn effective_samples(hist: &str, f: &BTreeMap<String, Option<f64>>) -> u64 {
    let get = |p: &str| f.get(p).copied().flatten();
    let count = get(&format!("{hist}.count")).unwrap_or(0.0);
    let phase_seconds = |want_requests: bool| {
        let mut sum = None;
        for i in 0.. {
            let Some(secs) = get(&format!("phases.{i}.seconds")) else {
                break;
            };
            let rate = get(&format!("phases.{i}.target_rate")).unwrap_or(0.0);
            if !want_requests || rate > 0.0 {
                *sum.get_or_insert(0.0) += secs;
            }
        }
        sum
    };
    let span = match hist {
        "latency_ms.connect" | "latency_ms.auth" => get("devices.connect_seconds"),
        "latency_ms.ack" | "latency_ms.late" => phase_seconds(true),
        "latency_ms.event" => phase_seconds(false),
        h => h
            .strip_suffix(".ack_ms")
            .and_then(|ph| get(&format!("{ph}.seconds"))),
    };
    let cap = span.map_or(f64::INFINITY, |s| (s * SAMPLES_PER_SECOND).floor());
    count.min(cap).max(0.0) as u64
}

/// The absolute change a figure must exceed besides the tolerance, in its own unit:
/// 0.5 ms for latencies, 0.25 s for seconds, 1 for counts and rates (an error count
/// from 0 is judged on any increase all the same), none for memory (not gated).
pub fn floor(path: &str) -> f64 {
    match (fields::unit(path), fields::better(path)) {
        (Unit::Millis, _) => 0.5,
        (Unit::Seconds, _) => 0.25,
        (Unit::Bytes, _) | (_, Better::LowerUngated) => 0.0,
        _ => 1.0,
    }
}

/// The verdict on two values of a figure with a direction, its tolerance and floor.
pub fn judge_values(better: Better, base: f64, new: f64, tol: f64, floor: f64) -> (Mark, String) {
    let margin = (base.abs() * tol).max(floor);
    let (up, down) = (new - base > margin, base - new > margin);
    let beyond_tol_only = (new - base).abs() > base.abs() * tol && !(up || down);
    let under_floor = |m: Mark| {
        if beyond_tol_only {
            (m, format!("change under the floor of {}", num(floor)))
        } else {
            (m, String::new())
        }
    };
    match better {
        Better::Neither => (Mark::Info, String::new()),
        Better::Lower | Better::LowerUngated if base <= 0.0 => {
            (Mark::NotJudged, "base 0: nothing to compare with".into())
        }
        Better::Lower if up => (Mark::Worse, String::new()),
        Better::LowerUngated if up => (Mark::WorseUngated, String::new()),
        Better::Lower | Better::LowerUngated if down => (Mark::Better, String::new()),
        // Any new error, timeout or lost event is worse; from a non-zero base beyond
        // the tolerance and the floor.
        Better::Fewer if new > base && (base == 0.0 || up) => (Mark::Worse, String::new()),
        Better::Fewer if new < base => (Mark::Better, String::new()),
        Better::Higher if down => (Mark::Worse, String::new()),
        Better::Higher if up => (Mark::Better, String::new()),
        _ => under_floor(Mark::Same),
    }
}

fn direction(path: &str) -> &'static str {
    match fields::better(path) {
        Better::Lower => "lower is better",
        Better::Fewer => "fewer is better",
        Better::Higher => "higher is better",
        Better::LowerUngated => "lower is better, not gated",
        Better::Neither => "",
    }
}

fn mark_text(m: Mark) -> &'static str {
    match m {
        Mark::Same => "ok",
        Mark::Better => "better",
        Mark::Worse => "WORSE",
        Mark::WorseUngated => "worse",
        Mark::NotJudged => "not judged",
        Mark::Info => "",
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), num)
}

/// The change of a row: absolute and relative ("-" when a side has no value).
fn change(r: &Row) -> (String, String) {
    let (delta, rel) = match (r.base, r.new) {
        (Some(b), Some(n)) if n == b => (Some(0.0), "0.0%".into()),
        (Some(b), Some(n)) if b != 0.0 => (Some(n - b), format!("{:+.1}%", (n - b) / b * 100.0)),
        (Some(b), Some(n)) => (Some(n - b), "new".into()),
        _ => (None, "-".into()),
    };
    let delta = delta.map_or("-".into(), |d| {
        let s = num(d);
        if d > 0.0 {
            format!("+{s}")
        } else {
            s
        }
    });
    (delta, rel)
}

fn verdict(r: &Row) -> String {
    let mut v = match (mark_text(r.mark), direction(&r.path)) {
        ("", _) => String::new(),
        (m, d) => format!("{m} ({d})"),
    };
    if !r.why.is_empty() {
        v.push_str(&format!(": {}", r.why));
    }
    v
}

/// The table: figure, base, new, change, change %, verdict and direction (and why).
pub fn table(rows: &[Row]) -> String {
    let mut o = format!(
        "{:<46} {:>14} {:>14} {:>14} {:>9}  verdict\n",
        "figure", "base", "new", "change", "change%"
    );
    for r in rows {
        let (delta, rel) = change(r);
        o.push_str(&format!(
            "{:<46} {:>14} {:>14} {:>14} {:>9}  {}\n",
            r.path,
            cell(r.base),
            cell(r.new),
            delta,
            rel,
            verdict(r)
        ));
    }
    o
}

fn read(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a JSON report: {e}", path.display()))?;
    let is_report = ["devices", "latency_ms", "requests"]
        .iter()
        .all(|k| v.get(k).is_some_and(serde_json::Value::is_object));
    if !is_report {
        return Err(format!(
            "{}: not a loadgen report (no devices, latency_ms and requests)",
            path.display()
        ));
    }
    Ok(v)
}

/// A --gate prefix that names no figure a report can have (a typo): every gate must
/// match a figure with a direction of `Report::sample`, or be under `errors`.
fn unknown_gates(gates: &[String]) -> Vec<String> {
    let sample = serde_json::to_value(crate::report::Report::sample()).unwrap_or_default();
    let known: Vec<String> = fields::flatten(&sample)
        .into_keys()
        .filter(|p| !matches!(fields::better(p), Better::Neither | Better::LowerUngated))
        .collect();
    gates
        .iter()
        .filter(|g| {
            let g = g.as_str();
            let under_errors = g == "errors" || g.starts_with("errors.") && g.len() > 7;
            let in_phase = phase_zero(g);
            g.is_empty()
                || !(under_errors
                    || known
                        .iter()
                        .any(|p| p.starts_with(g) || p.starts_with(&in_phase)))
        })
        .cloned()
        .collect()
}

/// `phases.N...` as `phases.0...` (the sample report's one phase).
fn phase_zero(g: &str) -> String {
    let mut segs: Vec<&str> = g.split('.').collect();
    if segs.len() > 1 && segs[0] == "phases" && segs[1].parse::<usize>().is_ok() {
        segs[1] = "0";
    }
    segs.join(".")
}

/// Flags that only say where the results go: differences in them are no difference
/// between the runs.
const OUTPUT_FLAGS: [&str; 9] = [
    "--json",
    "--html",
    "--hdr-log",
    "--request-log",
    "--quiet",
    "--metrics",
    "--assert",
    "--dry-run",
    "--router-rss-interval",
];

/// Warnings on what makes the two runs incomparable: different parameters, a report
/// without them, different loadgen builds.
pub fn warnings(base: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let params = |r: &serde_json::Value| -> Option<BTreeMap<String, String>> {
        let m = r.get("parameters")?.as_object()?;
        Some(
            m.iter()
                .filter(|(k, _)| !OUTPUT_FLAGS.contains(&k.as_str()))
                .map(|(k, v)| {
                    let v = v.get("value").unwrap_or(v);
                    (k.clone(), v.as_str().map_or(v.to_string(), str::to_string))
                })
                .collect(),
        )
    };
    match (params(base), params(new)) {
        (Some(b), Some(n)) => {
            let keys: BTreeSet<&String> = b.keys().chain(n.keys()).collect();
            for k in keys {
                let (x, y) = (b.get(k), n.get(k));
                if x != y {
                    let show = |v: Option<&String>| v.map_or("(unset)".into(), |s| s.clone());
                    out.push(format!(
                        "the runs used different parameters: {k} {} (base) vs {} (new)",
                        show(x),
                        show(y)
                    ));
                }
            }
        }
        (b, n) => {
            for (side, p) in [("base", b), ("new", n)] {
                if p.is_none() {
                    out.push(format!(
                        "the {side} report carries no parameters (an older loadgen): cannot tell whether the runs are comparable"
                    ));
                }
            }
        }
    }
    let build = |r: &serde_json::Value| {
        let s = |k: &str| {
            r.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_string()
        };
        (s("loadgen_version"), s("loadgen_commit"))
    };
    let (bb, nb) = (build(base), build(new));
    if bb != nb {
        out.push(format!(
            "different loadgen builds: {} ({}) vs {} ({}): the measurement itself may differ",
            bb.0, bb.1, nb.0, nb.1
        ));
    }
    out
}

/// The outcome of a comparison.
pub struct Outcome {
    pub rows: Vec<Row>,
    pub warnings: Vec<String>,
    /// Figures that gate (with a direction, under --gate).
    pub gated: Vec<usize>,
    pub worse: Vec<String>,
    /// Gated figures with a verdict (not NotJudged, not Info).
    pub judged: usize,
}

pub fn compare(args: &CompareArgs, base: &serde_json::Value, new: &serde_json::Value) -> Outcome {
    let mut rows = rows(base, new, args.tolerance);
    for r in rows.iter_mut() {
        if r.mark == Mark::Worse && !args.gates(&r.path) {
            r.mark = Mark::WorseUngated;
        }
    }
    let gated: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            !matches!(
                fields::better(&r.path),
                Better::Neither | Better::LowerUngated
            ) && args.gates(&r.path)
        })
        .map(|(i, _)| i)
        .collect();
    let worse = rows
        .iter()
        .filter(|r| r.mark == Mark::Worse)
        .map(|r| r.path.clone())
        .collect();
    let judged = gated
        .iter()
        .filter(|&&i| !matches!(rows[i].mark, Mark::NotJudged | Mark::Info))
        .count();
    Outcome {
        rows,
        warnings: warnings(base, new),
        gated,
        worse,
        judged,
    }
}

/// The one-line verdict and the exit status.
fn summary(o: &Outcome, tol: f64) -> (String, i32) {
    let tol = num(tol * 100.0);
    if !o.worse.is_empty() {
        (
            format!(
                "compare: {} figure(s) worse beyond {tol}%: {}",
                o.worse.len(),
                o.worse.join(", ")
            ),
            1,
        )
    } else if o.judged == 0 {
        (
            "compare: no gated figure could be judged: nothing to compare".to_string(),
            1,
        )
    } else {
        let skipped = o.gated.len() - o.judged;
        (
            format!(
                "compare: no gated figure worse beyond {tol}% ({} judged, {skipped} not judged)",
                o.judged
            ),
            0,
        )
    }
}

/// Print the comparison; the exit status (0 none worse, 1 some worse or nothing to
/// compare, 2 a report unreadable, a gate unknown or an output not writable).
pub fn run(args: &CompareArgs) -> i32 {
    let unknown = unknown_gates(&args.gate);
    if !unknown.is_empty() {
        eprintln!(
            "loadgen compare: --gate {}: matches no figure a report can have (a typo? docs/loadgen.md lists them)",
            unknown.join(",")
        );
        return 2;
    }
    let (base, new) = match (read(&args.base), read(&args.new)) {
        (Ok(b), Ok(n)) => (b, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("loadgen compare: {e}");
            return 2;
        }
    };
    let o = compare(args, &base, &new);
    print!("{}", table(&o.rows));
    for w in &o.warnings {
        println!("warning: {w}");
    }
    let (line, status) = summary(&o, args.tolerance);
    println!("{line}");
    let files = [
        (&args.junit, junit(&o, &line, args)),
        (&args.markdown, markdown(&o, &line)),
    ];
    for (path, text) in files {
        if let Some(p) = path {
            if let Err(e) = std::fs::write(p, text) {
                eprintln!("loadgen compare: cannot write {}: {e}", p.display());
                return 2;
            }
        }
    }
    status
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML: one testcase per gated figure; a failure for each that got worse,
/// skipped for those not judged; a failure `compare` when nothing could be judged.
pub fn junit(o: &Outcome, line: &str, args: &CompareArgs) -> String {
    let mut cases = String::new();
    let mut failures = 0;
    let mut skipped = 0;
    for &i in &o.gated {
        let r = &o.rows[i];
        let (delta, rel) = change(r);
        let detail = format!(
            "base {} new {} change {delta} ({rel}){}",
            cell(r.base),
            cell(r.new),
            if r.why.is_empty() {
                String::new()
            } else {
                format!(": {}", r.why)
            }
        );
        cases.push_str(&format!(
            "    <testcase classname=\"loadgen.compare\" name=\"{}\">",
            xml(&r.path)
        ));
        match r.mark {
            Mark::Worse => {
                failures += 1;
                cases.push_str(&format!(
                    "<failure message=\"{} worse: {}\"/>",
                    xml(&r.path),
                    xml(&detail)
                ));
            }
            Mark::NotJudged | Mark::Info => {
                skipped += 1;
                cases.push_str(&format!("<skipped message=\"{}\"/>", xml(&detail)));
            }
            _ => cases.push_str(&format!("<system-out>{}</system-out>", xml(&detail))),
        }
        cases.push_str("</testcase>\n");
    }
    let mut tests = o.gated.len();
    if o.judged == 0 {
        tests += 1;
        failures += 1;
        cases.push_str(&format!(
            "    <testcase classname=\"loadgen.compare\" name=\"compare\"><failure message=\"{}\"/></testcase>\n",
            xml(line)
        ));
    }
    let props: String = o
        .warnings
        .iter()
        .map(|w| format!("      <property name=\"warning\" value=\"{}\"/>\n", xml(w)))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"loadgen compare {} {}\" tests=\"{tests}\" failures=\"{failures}\" skipped=\"{skipped}\" errors=\"0\">\n    <properties>\n{props}    </properties>\n{cases}  </testsuite>\n</testsuites>\n",
        xml(&args.base.display().to_string()),
        xml(&args.new.display().to_string()),
    )
}

/// Markdown: the verdict, the warnings, the regressions and every gated figure.
pub fn markdown(o: &Outcome, line: &str) -> String {
    let md = |s: &str| s.replace('|', "\\|");
    let mut out = format!("## loadgen compare\n\n**{}**\n\n", md(line));
    for w in &o.warnings {
        out.push_str(&format!("> warning: {}\n", md(w)));
    }
    if !o.warnings.is_empty() {
        out.push('\n');
    }
    out.push_str(
        "| figure | base | new | change | change% | verdict |\n|---|---:|---:|---:|---:|---|\n",
    );
    // The regressions first, then the rest of the gated figures.
    let mut order: Vec<usize> = o.gated.clone();
    order.sort_by_key(|&i| o.rows[i].mark != Mark::Worse);
    for i in order {
        let r = &o.rows[i];
        let (delta, rel) = change(r);
        out.push_str(&format!(
            "| `{}` | {} | {} | {delta} | {rel} | {} |\n",
            r.path,
            cell(r.base),
            cell(r.new),
            md(&verdict(r))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(
        p99: f64,
        timeouts: u64,
        rate: f64,
        rss: u64,
        errors: serde_json::Value,
    ) -> serde_json::Value {
        json!({
            "protocol": "hive",
            "devices": {"target": 300, "connected": 300, "connects_per_sec": 900.0},
            "latency_ms": {"ack": {"count": 1000, "p50": 1.0, "p99": p99},
                           "event": {"count": 0, "p99": 0.0}},
            "requests": {"sent": 1000, "timeout": timeouts, "rate": rate},
            "events": {"lost": null},
            "router": {"rss_bytes": rss},
            "errors": errors,
            "timeline": [{"t": 0, "acked": 5}],
        })
    }

    fn row<'a>(rows: &'a [Row], path: &str) -> &'a Row {
        rows.iter().find(|r| r.path == path).unwrap()
    }

    fn mark(rows: &[Row], path: &str) -> Mark {
        row(rows, path).mark
    }

    #[test]
    fn gates_on_the_figures_that_got_worse() {
        let base = report(2.0, 0, 100.0, 1000, json!({}));
        let new = report(2.6, 1, 85.0, 2000, json!({"connect_refused": 1}));
        let rows = rows(&base, &new, 0.10);
        assert_eq!(mark(&rows, "latency_ms.ack.p99"), Mark::Worse);
        assert_eq!(mark(&rows, "latency_ms.ack.p50"), Mark::Same);
        // From 0, any increase.
        assert_eq!(mark(&rows, "requests.timeout"), Mark::Worse);
        // A kind only the new report lists is 0 in the base.
        let refused = row(&rows, "errors.connect_refused");
        assert_eq!((refused.base, refused.mark), (Some(0.0), Mark::Worse));
        assert_eq!(mark(&rows, "requests.rate"), Mark::Worse);
        assert_eq!(mark(&rows, "router.rss_bytes"), Mark::WorseUngated);
        // Nothing measured in either: no verdict; null on both sides: no verdict.
        assert_eq!(mark(&rows, "latency_ms.event.p99"), Mark::Info);
        assert_eq!(mark(&rows, "events.lost"), Mark::Info);
        assert_eq!(mark(&rows, "requests.sent"), Mark::Info);
        assert!(!rows.iter().any(|r| r.path.starts_with("timeline")));
        let t = table(&rows);
        assert!(t.contains("WORSE (lower is better)"), "{t}");
        let line = t
            .lines()
            .find(|l| l.starts_with("latency_ms.ack.p99"))
            .unwrap();
        assert!(line.contains("+0.600") && line.contains("+30.0%"), "{line}");
    }

    #[test]
    fn within_the_tolerance_or_better_passes() {
        let base = report(20.0, 2, 100.0, 1000, json!({"request_timeout": 2}));
        let new = report(21.0, 1, 130.0, 1050, json!({}));
        let rows = rows(&base, &new, 0.10);
        assert!(rows.iter().all(|r| r.mark != Mark::Worse), "{rows:?}");
        assert_eq!(mark(&rows, "latency_ms.ack.p99"), Mark::Same);
        assert_eq!(mark(&rows, "requests.timeout"), Mark::Better);
        assert_eq!(mark(&rows, "requests.rate"), Mark::Better);
        assert_eq!(mark(&rows, "errors.request_timeout"), Mark::Better);
        // The same with a tighter tolerance fails on the latency.
        let tight = super::rows(&base, &new, 0.01);
        assert_eq!(mark(&tight, "latency_ms.ack.p99"), Mark::Worse);
    }

    #[test]
    fn tolerance_is_a_percentage() {
        assert_eq!(parse_tolerance("10%"), Ok(0.10));
        assert_eq!(parse_tolerance("25"), Ok(0.25));
        assert_eq!(parse_tolerance(" 0 % "), Ok(0.0));
        assert!(parse_tolerance("ten").is_err());
        assert!(parse_tolerance("-5%").is_err());
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("loadgen-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn write(&self, name: &str, v: serde_json::Value) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, v.to_string()).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn args(base: &Path, new: &Path) -> CompareArgs {
        CompareArgs {
            base: base.to_path_buf(),
            new: new.to_path_buf(),
            tolerance: 0.10,
            gate: Vec::new(),
            junit: None,
            markdown: None,
        }
    }

    #[test]
    fn exit_status_follows_the_verdicts() {
        let dir = Dir::new("compare");
        let base = dir.write("base.json", report(2.0, 0, 100.0, 1000, json!({})));
        let worse = dir.write("worse.json", report(4.0, 0, 100.0, 1000, json!({})));
        assert_eq!(run(&args(&base, &base)), 0);
        assert_eq!(run(&args(&base, &worse)), 1);
        // Gating on other figures only: the latency is shown worse, and does not fail.
        let gated = CompareArgs {
            gate: vec!["errors".into(), "requests".into()],
            ..args(&base, &worse)
        };
        assert_eq!(run(&gated), 0);
        assert_eq!(
            run(&CompareArgs {
                gate: vec!["latency_ms.ack".into()],
                ..gated
            }),
            1
        );
        assert_eq!(run(&args(&base, &dir.0.join("missing.json"))), 2);
    }

    /// Issue #33: `compare base.json empty.json` (a file holding `{}`) said "no gated
    /// figure worse", exit 0.
    #[test]
    fn a_file_that_is_no_report_is_an_error() {
        let dir = Dir::new("compare-noreport");
        let base = dir.write("base.json", report(2.0, 0, 100.0, 1000, json!({})));
        for (name, v) in [
            ("empty.json", json!({})),
            ("list.json", json!([1, 2])),
            ("other.json", json!({"devices": 3, "x": {}})),
        ] {
            let p = dir.write(name, v);
            assert_eq!(run(&args(&base, &p)), 2, "{name}");
            assert_eq!(run(&args(&p, &base)), 2, "{name}");
        }
    }

    /// Issue #33: `--gate latncy_ms.ack,reqests` matched nothing and exited 0.
    #[test]
    fn a_gate_that_matches_no_figure_is_an_error() {
        let dir = Dir::new("compare-gate");
        let base = dir.write("base.json", report(2.0, 0, 100.0, 1000, json!({})));
        let worse = dir.write("worse.json", report(4.0, 0, 100.0, 1000, json!({})));
        let typo = CompareArgs {
            gate: vec!["latncy_ms.ack".into(), "reqests".into()],
            ..args(&base, &worse)
        };
        assert_eq!(run(&typo), 2);
        assert_eq!(
            unknown_gates(&typo.gate),
            ["latncy_ms.ack".to_string(), "reqests".to_string()]
        );
        // Real prefixes, also ones no report of this pair happens to hold.
        let real: Vec<String> = [
            "errors",
            "errors.closed_4401",
            "requests",
            "latency_ms.ack.p99",
            "phases.3.ack_ms",
            "events.lost",
            "storm",
        ]
        .map(String::from)
        .to_vec();
        assert!(
            unknown_gates(&real).is_empty(),
            "{:?}",
            unknown_gates(&real)
        );
        // A figure without a direction gates nothing.
        assert_eq!(unknown_gates(&["requests.sent".into()]).len(), 1);
    }

    /// Issue #33: against a run where nothing was acked every ack latency showed
    /// "-100.0% better". Samples to none is a regression.
    #[test]
    fn samples_to_none_is_a_regression() {
        let base = report(2.0, 0, 100.0, 1000, json!({}));
        let mut none = report(2.0, 0, 0.0, 1000, json!({}));
        // Today's reports: null; older ones: 0 beside a count of 0.
        none["latency_ms"]["ack"] = json!({"count": 0, "p50": null, "p99": null});
        let rows = rows(&base, &none, 0.10);
        let r = row(&rows, "latency_ms.ack.p50");
        assert_eq!((r.mark, r.new), (Mark::Worse, None), "{r:?}");
        assert!(r.why.contains("nothing to measure now"), "{r:?}");
        none["latency_ms"]["ack"] = json!({"count": 0, "p50": 0.0, "p99": 0.0});
        let rows = super::rows(&base, &none, 0.10);
        assert_eq!(mark(&rows, "latency_ms.ack.p50"), Mark::Worse);
        let t = table(&rows);
        let line = t
            .lines()
            .find(|l| l.starts_with("latency_ms.ack.p50"))
            .unwrap();
        assert!(
            !line.contains("-100.0%") && line.contains("WORSE"),
            "{line}"
        );
        // A storm measured in the base and absent now.
        let mut storm = report(2.0, 0, 100.0, 1000, json!({}));
        storm["storm"] = json!({"seconds_to_reconnect": 1.5, "complete": true});
        let rows = super::rows(&storm, &base, 0.10);
        assert_eq!(mark(&rows, "storm.seconds_to_reconnect"), Mark::Worse);
    }

    #[test]
    fn nothing_judged_is_no_pass() {
        let dir = Dir::new("compare-nothing");
        let base = dir.write("base.json", report(2.0, 0, 100.0, 1000, json!({})));
        // A maximum is never judged (one sample): a gate on it alone judges nothing.
        let only_max = CompareArgs {
            gate: vec!["latency_ms.ack.max".into()],
            ..args(&base, &base)
        };
        let mut with_max = report(2.0, 0, 100.0, 1000, json!({}));
        with_max["latency_ms"]["ack"]["max"] = json!(9.0);
        let with_max = dir.write("max.json", with_max);
        assert_eq!(
            run(&CompareArgs {
                base: with_max.clone(),
                new: with_max,
                ..only_max
            }),
            1
        );
    }

    /// Issue #33: two identical 1,000-device runs failed the default compare on noise
    /// (connect p90 +113.9%).
    #[test]
    fn noise_is_not_judged() {
        let run = |connect_p90: f64, ramp: f64, ack_count: u64, p99: f64, max: f64| {
            json!({
                "devices": {"target": 1000, "connected": 1000, "connect_seconds": ramp,
                            "connects_per_sec": 1000.0 / ramp},
                "latency_ms": {
                    "connect": {"count": 1000, "p50": 1.0, "p90": connect_p90},
                    "ack": {"count": ack_count, "p50": 1.0, "p90": 1.2, "p99": p99,
                            "p999": p99 * 2.0, "max": max}},
                "requests": {"sent": ack_count, "rate": 100.0},
            })
        };
        let a = run(4.0, 0.2, 1000, 3.0, 9.0);
        let b = run(8.6, 0.23, 1000, 3.0, 60.0);
        let rows = rows(&a, &b, 0.10);
        let r = row(&rows, "latency_ms.connect.p90");
        assert_eq!(r.mark, Mark::NotJudged, "{r:?}");
        assert!(r.why.contains("ramp of 0.20 s"), "{r:?}");
        assert_eq!(mark(&rows, "devices.connects_per_sec"), Mark::NotJudged);
        let max = row(&rows, "latency_ms.ack.max");
        assert!(
            max.mark == Mark::NotJudged && max.why.contains("single sample"),
            "{max:?}"
        );
        let p999 = row(&rows, "latency_ms.ack.p999");
        assert!(
            p999.mark == Mark::NotJudged && p999.why.contains("needs >= 10000"),
            "{p999:?}"
        );
        assert!(
            rows.iter().all(|r| r.mark != Mark::Worse),
            "{}",
            table(&rows)
        );
        // Samples of one moment are one sample: 1,000 acks in 10 s are 50.
        let mut ten_seconds = run(4.0, 0.2, 1000, 3.0, 9.0);
        ten_seconds["phases"] = json!([{"seconds": 10.0, "target_rate": 100.0}]);
        let rows = super::rows(&ten_seconds, &ten_seconds, 0.10);
        let p99 = row(&rows, "latency_ms.ack.p99");
        assert!(
            p99.why.contains("of 50 independent samples: needs >= 1000"),
            "{p99:?}"
        );
        assert_eq!(mark(&rows, "latency_ms.ack.p90"), Mark::NotJudged);
        assert_eq!(mark(&rows, "latency_ms.ack.p50"), Mark::Same);
        // Long ramps are judged; a p99 of too few samples is not; a change under the
        // floor is no regression.
        let c = run(4.0, 24.0, 500, 3.0, 9.0);
        let d = run(9.0, 24.0, 500, 9.0, 9.0);
        let rows = super::rows(&c, &d, 0.10);
        assert_eq!(mark(&rows, "latency_ms.connect.p90"), Mark::Worse);
        let p99 = row(&rows, "latency_ms.ack.p99");
        assert!(
            p99.mark == Mark::NotJudged && p99.why.contains("of 500 independent samples"),
            "{p99:?}"
        );
        let e = run(4.0, 24.0, 1000, 1.0, 9.0);
        let f = run(4.3, 24.0, 1000, 1.4, 9.0);
        let rows = super::rows(&e, &f, 0.10);
        let under = row(&rows, "latency_ms.ack.p99");
        assert_eq!(under.mark, Mark::Same, "{under:?}");
        assert!(under.why.contains("under the floor"), "{under:?}");
        assert_eq!(mark(&rows, "latency_ms.connect.p90"), Mark::Same);
        // Rates and counts have floors too: one request per second less is noise.
        assert_eq!(
            judge_values(Better::Higher, 5.0, 4.2, 0.10, floor("requests.rate")).0,
            Mark::Same
        );
        assert_eq!(
            judge_values(Better::Fewer, 0.0, 1.0, 0.10, floor("requests.timeout")).0,
            Mark::Worse
        );
    }

    #[test]
    fn warns_on_different_parameters_and_writes_junit_and_markdown() {
        let dir = Dir::new("compare-ci");
        let mut a = report(2.0, 0, 100.0, 1000, json!({}));
        a["parameters"] = json!({"--devices": {"value": "300", "source": "command line"},
                                 "--json": {"value": "a.json", "source": "command line"}});
        a["loadgen_version"] = json!("0.1.0");
        a["loadgen_commit"] = json!("abc");
        let mut b = report(4.0, 0, 100.0, 1000, json!({}));
        b["parameters"] = json!({"--devices": {"value": "1000", "source": "command line"},
                                 "--json": {"value": "b.json", "source": "command line"}});
        b["loadgen_version"] = json!("0.1.0");
        b["loadgen_commit"] = json!("abc");
        let w = warnings(&a, &b);
        assert_eq!(
            w,
            ["the runs used different parameters: --devices 300 (base) vs 1000 (new)"],
            "{w:?}"
        );
        let old = report(2.0, 0, 100.0, 1000, json!({}));
        assert!(warnings(&old, &b)
            .iter()
            .any(|w| w.contains("carries no parameters")));
        let (pa, pb) = (dir.write("a.json", a), dir.write("b.json", b));
        let junit_path = dir.0.join("junit.xml");
        let md_path = dir.0.join("compare.md");
        let ci = CompareArgs {
            junit: Some(junit_path.clone()),
            markdown: Some(md_path.clone()),
            ..args(&pa, &pb)
        };
        assert_eq!(run(&ci), 1);
        let x = std::fs::read_to_string(&junit_path).unwrap();
        assert!(x.starts_with("<?xml"), "{x}");
        assert!(x.contains("failures=\"1\""), "{x}");
        assert!(
            x.contains("name=\"latency_ms.ack.p99\"><failure message=\"latency_ms.ack.p99 worse"),
            "{x}"
        );
        assert!(x.contains("name=\"requests.rate\"><system-out>"), "{x}");
        assert!(x.contains("--devices 300 (base) vs 1000 (new)"), "{x}");
        assert_eq!(
            x.matches("<testcase").count(),
            x.matches("</testcase>").count()
        );
        let m = std::fs::read_to_string(&md_path).unwrap();
        assert!(m.contains("**compare: 1 figure(s) worse beyond 10%"), "{m}");
        assert!(
            m.contains("| `latency_ms.ack.p99` | 2 | 4 | +2 | +100.0% | WORSE"),
            "{m}"
        );
        assert!(
            m.contains("> warning: the runs used different parameters"),
            "{m}"
        );
        // An output that cannot be written is named, exit 2.
        let bad = CompareArgs {
            junit: Some(dir.0.join("missing/dir/j.xml")),
            ..args(&pa, &pa)
        };
        assert_eq!(run(&bad), 2);
    }
}
