//! `loadgen compare BASE.json NEW.json [--tolerance 10%]`: every figure of two reports
//! side by side (flattened dotted paths, `fields::flatten`), with the absolute and
//! relative change, and a verdict where the figure has a direction (`fields::Better`):
//! latencies and time-to-whole gate on a relative increase beyond the tolerance; errors,
//! timeouts, lost events and reconnects on any increase from 0, else beyond the
//! tolerance; throughput and completeness on a drop beyond the tolerance; memory is
//! marked but never gates. Exit 1 when a gated figure got worse, 2 when a report cannot
//! be read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::fields::{self, Better};
use crate::thresholds::num;

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// The baseline report (written by --json).
    pub base: PathBuf,
    /// The report to judge against it.
    pub new: PathBuf,
    /// How much worse a figure may get before it counts, in percent ("10%" or "10"):
    /// relative to the base figure.
    #[arg(long, default_value = "10%", value_parser = parse_tolerance)]
    pub tolerance: f64,
    /// Only figures whose path starts with one of these gate (repeat or comma-separate),
    /// e.g. --gate latency_ms.ack,requests,errors: the rest are still shown and marked.
    /// Default: every figure with a direction.
    #[arg(long, value_delimiter = ',', value_name = "PREFIX")]
    pub gate: Vec<String>,
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
    /// Within the tolerance (or the same).
    Same,
    Better,
    /// Worse beyond the tolerance, on a gated figure: the comparison fails.
    Worse,
    /// Worse beyond the tolerance on a figure that does not gate (memory).
    WorseUngated,
    /// No direction, or a side not measured.
    Info,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub path: String,
    pub base: Option<f64>,
    pub new: Option<f64>,
    pub mark: Mark,
}

/// Every figure of both reports, in path order.
pub fn rows(base: &serde_json::Value, new: &serde_json::Value, tolerance: f64) -> Vec<Row> {
    let (b, n) = (fields::flatten(base), fields::flatten(new));
    let paths: BTreeSet<&String> = b.keys().chain(n.keys()).collect();
    paths
        .into_iter()
        .map(|path| {
            let (base, new) = (value(&b, path), value(&n, path));
            let mark = match (base, new) {
                (Some(x), Some(y)) => judge(fields::better(path), x, y, tolerance),
                _ => Mark::Info,
            };
            Row {
                path: path.clone(),
                base,
                new,
                mark,
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

pub fn judge(better: Better, base: f64, new: f64, tol: f64) -> Mark {
    let up = new > base * (1.0 + tol);
    let down = new < base * (1.0 - tol);
    match better {
        Better::Neither => Mark::Info,
        // A latency of 0 is a histogram with nothing in it: nothing to compare with.
        Better::Lower if base <= 0.0 => Mark::Info,
        Better::Lower if up => Mark::Worse,
        Better::Fewer if new > base && (base == 0.0 || up) => Mark::Worse,
        Better::Fewer if new < base => Mark::Better,
        Better::Higher if down => Mark::Worse,
        Better::Higher if up => Mark::Better,
        Better::LowerUngated if up => Mark::WorseUngated,
        Better::Lower | Better::LowerUngated if down => Mark::Better,
        _ => Mark::Same,
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
        Mark::Info => "",
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), num)
}

/// The table: figure, base, new, change, change %, verdict and direction.
pub fn table(rows: &[Row]) -> String {
    let mut o = format!(
        "{:<46} {:>14} {:>14} {:>14} {:>9}  verdict\n",
        "figure", "base", "new", "change", "change%"
    );
    for r in rows {
        let (delta, rel) = match (r.base, r.new) {
            (Some(b), Some(n)) if n == b => (Some(0.0), "0.0%".into()),
            (Some(b), Some(n)) if b != 0.0 => {
                (Some(n - b), format!("{:+.1}%", (n - b) / b * 100.0))
            }
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
        let verdict = match (mark_text(r.mark), direction(&r.path)) {
            ("", _) => String::new(),
            (m, d) => format!("{m} ({d})"),
        };
        o.push_str(&format!(
            "{:<46} {:>14} {:>14} {:>14} {:>9}  {verdict}\n",
            r.path,
            cell(r.base),
            cell(r.new),
            delta,
            rel
        ));
    }
    o
}

fn read(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a JSON report: {e}", path.display()))
}

/// Print the comparison; the exit status (0 none worse, 1 some worse, 2 unreadable).
pub fn run(args: &CompareArgs) -> i32 {
    let (base, new) = match (read(&args.base), read(&args.new)) {
        (Ok(b), Ok(n)) => (b, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("loadgen compare: {e}");
            return 2;
        }
    };
    let mut rows = rows(&base, &new, args.tolerance);
    for r in rows.iter_mut() {
        if r.mark == Mark::Worse && !args.gates(&r.path) {
            r.mark = Mark::WorseUngated;
        }
    }
    print!("{}", table(&rows));
    let worse: Vec<&str> = rows
        .iter()
        .filter(|r| r.mark == Mark::Worse)
        .map(|r| r.path.as_str())
        .collect();
    let tol = num(args.tolerance * 100.0);
    if worse.is_empty() {
        println!("compare: no gated figure worse beyond {tol}%");
        0
    } else {
        println!(
            "compare: {} figure(s) worse beyond {tol}%: {}",
            worse.len(),
            worse.join(", ")
        );
        1
    }
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

    fn mark(rows: &[Row], path: &str) -> Mark {
        rows.iter().find(|r| r.path == path).unwrap().mark
    }

    #[test]
    fn gates_on_the_figures_that_got_worse() {
        let base = report(2.0, 0, 100.0, 1000, json!({}));
        let new = report(2.5, 1, 85.0, 2000, json!({"connect_refused": 1}));
        let rows = rows(&base, &new, 0.10);
        assert_eq!(mark(&rows, "latency_ms.ack.p99"), Mark::Worse);
        assert_eq!(mark(&rows, "latency_ms.ack.p50"), Mark::Same);
        // From 0, any increase.
        assert_eq!(mark(&rows, "requests.timeout"), Mark::Worse);
        // A kind only the new report lists is 0 in the base.
        let refused = rows
            .iter()
            .find(|r| r.path == "errors.connect_refused")
            .unwrap();
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
        assert!(line.contains("+0.500") && line.contains("+25.0%"), "{line}");
    }

    #[test]
    fn within_the_tolerance_or_better_passes() {
        let base = report(2.0, 2, 100.0, 1000, json!({"request_timeout": 2}));
        let new = report(2.1, 1, 130.0, 1050, json!({}));
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

    #[test]
    fn exit_status_follows_the_verdicts() {
        let dir = std::env::temp_dir().join(format!("loadgen-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, v: serde_json::Value| {
            let p = dir.join(name);
            std::fs::write(&p, v.to_string()).unwrap();
            p
        };
        let base = write("base.json", report(2.0, 0, 100.0, 1000, json!({})));
        let worse = write("worse.json", report(4.0, 0, 100.0, 1000, json!({})));
        let args = |new: &Path| CompareArgs {
            base: base.clone(),
            new: new.to_path_buf(),
            tolerance: 0.10,
            gate: Vec::new(),
        };
        assert_eq!(run(&args(&base)), 0);
        assert_eq!(run(&args(&worse)), 1);
        // Gating on other figures only: the latency is shown worse, and does not fail.
        let gated = CompareArgs {
            gate: vec!["errors".into(), "requests".into()],
            ..args(&worse)
        };
        assert_eq!(run(&gated), 0);
        assert_eq!(
            run(&CompareArgs {
                gate: vec!["latency_ms.ack".into()],
                ..gated
            }),
            1
        );
        assert_eq!(run(&args(&dir.join("missing.json"))), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
