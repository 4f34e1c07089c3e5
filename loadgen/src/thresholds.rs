//! `--assert EXPR`: thresholds on the report, checked at the end of the run.
//!
//! Grammar: `FIGURE OP NUMBER[UNIT]`, spaces allowed around the parts.
//! - FIGURE: a dotted path into the JSON report (`latency_ms.ack.p99`,
//!   `requests.timeout`, `errors.handshake_timeout`, `phases.1.ack_ms.p99`), an alias
//!   (`fields::ALIASES`, `ack.p99` for `latency_ms.ack.p99`, ...), or one of the sums
//!   `errors` (the devices' connection errors: every kind of the report's `errors` map
//!   but the `request_*` ones) and `errors.total` (every kind).
//! - OP: `<` `<=` `>` `>=` `==` `!=`.
//! - UNIT: `ms` `us` `s` on latencies (ms) and seconds, normalised to the figure's unit;
//!   `k` `M` (and `KiB` `MiB` `GiB` on bytes) as multipliers on counts, rates and
//!   bytes; `%` on figures that are part of a whole (`fields::percent_base`): the figure
//!   is then compared as a percentage of that whole. No unit: the figure's own unit.
//!
//! A malformed expression or an unknown figure is refused when the command line is
//! parsed (exit 2). A figure with nothing to measure fails its assertion, saying so:
//! null (`events.lost` without --amqp, `storm.*` without a storm, a latency percentile
//! without samples), or part of a whole that is 0 (`timeouts==0` with no request sent).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::fields::{self, Unit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// Operators, two-character ones first so that `<=` is not read as `<`.
const OPS: [(&str, Op); 6] = [
    ("<=", Op::Le),
    (">=", Op::Ge),
    ("==", Op::Eq),
    ("!=", Op::Ne),
    ("<", Op::Lt),
    (">", Op::Gt),
];

impl Op {
    fn holds(self, measured: f64, limit: f64) -> bool {
        let equal = (measured - limit).abs() <= 1e-9 * limit.abs().max(1.0);
        match self {
            Op::Lt => measured < limit,
            Op::Le => measured <= limit || equal,
            Op::Gt => measured > limit,
            Op::Ge => measured >= limit || equal,
            Op::Eq => equal,
            Op::Ne => !equal,
        }
    }
}

/// What an assertion measures.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A figure of the report (an alias already resolved).
    Path(String),
    /// `errors`: the kinds in the report's `errors` map but the `request_*` ones.
    ConnectionErrors,
    /// `errors.total`: every kind in the `errors` map.
    AllErrors,
}

impl Target {
    fn parse(name: &str) -> Result<Target, String> {
        match name {
            "errors" => return Ok(Target::ConnectionErrors),
            "errors.total" => return Ok(Target::AllErrors),
            _ => {}
        }
        let path = fields::resolve_alias(name).unwrap_or_else(|| name.to_string());
        if fields::is_known(&path) {
            Ok(Target::Path(path))
        } else {
            Err(format!(
                "unknown figure {name:?}: give a dotted path of the JSON report or an alias \
                 (docs/loadgen.md lists them)"
            ))
        }
    }

    fn unit(&self) -> Unit {
        match self {
            Target::Path(p) => fields::unit(p),
            _ => Unit::Number,
        }
    }

    fn percent_base(&self) -> Option<String> {
        match self {
            Target::Path(p) => fields::percent_base(p),
            Target::ConnectionErrors => Some("devices.target".into()),
            Target::AllErrors => None,
        }
    }

    fn name(&self) -> &str {
        match self {
            Target::Path(p) => p,
            Target::ConnectionErrors => "errors (connection errors)",
            Target::AllErrors => "errors.total",
        }
    }
}

/// One `--assert` expression, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Assertion {
    /// As given.
    pub text: String,
    pub target: Target,
    pub op: Op,
    /// The limit in the figure's unit, or in percent when `percent`.
    pub limit: f64,
    pub percent: bool,
}

impl Assertion {
    pub fn parse(text: &str) -> Result<Assertion, String> {
        let (lhs, op, rhs) = split_op(text)?;
        let target = Target::parse(lhs.trim())?;
        let (number, unit) = split_number(rhs.trim())?;
        let percent = unit == "%";
        if percent && target.percent_base().is_none() {
            return Err(format!(
                "% has no whole to be part of for {}",
                target.name()
            ));
        }
        let scale = if percent {
            1.0
        } else {
            scale(unit, target.unit()).ok_or_else(|| {
                format!(
                    "unit {unit:?} does not fit {} ({})",
                    target.name(),
                    unit_help(target.unit())
                )
            })?
        };
        Ok(Assertion {
            text: text.to_string(),
            target,
            op,
            limit: number * scale,
            percent,
        })
    }

    /// The assertion checked against a report (its JSON form).
    pub fn check(&self, report: &Value) -> Verdict {
        let flat = fields::flatten(report);
        let measured = self.measure(&flat);
        let (passed, value, shown) = match measured {
            Ok((v, shown)) => (self.op.holds(v, self.limit), Some(v), shown),
            Err(why) => (false, None, why),
        };
        Verdict {
            expr: self.text.clone(),
            passed,
            figure: self.target.name().to_string(),
            value,
            shown,
        }
    }

    /// The measured value (a percentage when `percent`) and how to show it.
    fn measure(&self, flat: &BTreeMap<String, Option<f64>>) -> Result<(f64, String), String> {
        let v = figure(&self.target, flat)?;
        if !self.percent {
            return Ok((v, show(v, self.target.unit())));
        }
        let base_path = self.target.percent_base().unwrap_or_default();
        let base = figure(&Target::Path(base_path.clone()), flat)?;
        if base <= 0.0 {
            return Err(format!("nothing to measure: {base_path} is 0"));
        }
        let pct = v / base * 100.0;
        Ok((
            pct,
            format!("{}% ({} of {base_path} {})", num(pct), num(v), num(base)),
        ))
    }
}

/// clap's value parser for `--assert`.
pub fn parse_arg(text: &str) -> Result<Assertion, String> {
    Assertion::parse(text)
}

/// A figure's value in `flat`; why not when there was nothing to measure: a null
/// figure, a figure this report does not have, a latency of a histogram without a
/// sample (`count` 0: an older report's 0 is no measurement either), or a figure that
/// is part of a whole which is 0 (`timeouts==0` when no request was sent).
fn figure(target: &Target, flat: &BTreeMap<String, Option<f64>>) -> Result<f64, String> {
    let errors = |keep: fn(&str) -> bool| {
        flat.iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("errors.")?, v.unwrap_or(0.0))))
            .filter(|(kind, _)| keep(kind))
            .fold(0.0, |sum, (_, v)| sum + v)
    };
    let Target::Path(p) = target else {
        return Ok(match target {
            Target::ConnectionErrors => errors(|k| !k.starts_with("request_")),
            _ => errors(|_| true),
        });
    };
    let v = match flat.get(p) {
        Some(Some(v)) => *v,
        Some(None) => return Err("null: nothing to measure in this run".into()),
        // The errors map holds only the kinds that happened.
        None if p.starts_with("errors.") => 0.0,
        None => return Err("not in this report: nothing to measure in this run".into()),
    };
    match nothing_to_measure(p, flat) {
        Some(why) => Err(why),
        None => Ok(v),
    }
}

/// Why `path` has nothing to measure although it may read as a number: a latency of a
/// histogram without samples, or a part of a whole that is 0 (or null).
pub fn nothing_to_measure(path: &str, flat: &BTreeMap<String, Option<f64>>) -> Option<String> {
    if fields::unit(path) == Unit::Millis {
        let (hist, _) = path.rsplit_once('.')?;
        if let Some(Some(n)) = flat.get(&format!("{hist}.count")) {
            if *n == 0.0 {
                return Some(format!("no samples ({hist}.count 0): nothing to measure"));
            }
        }
        return None;
    }
    let base = fields::percent_base(path)?;
    match flat.get(&base) {
        Some(Some(v)) if *v > 0.0 => None,
        Some(Some(_)) => Some(format!("nothing to measure: {base} is 0")),
        _ => Some(format!("nothing to measure: {base} is null or absent")),
    }
}

/// The verdict on one assertion (also in the JSON report's `assertions`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    pub expr: String,
    pub passed: bool,
    /// The report path (or sum) it measured.
    pub figure: String,
    /// The value compared; null when the figure was not measured.
    pub value: Option<f64>,
    /// The value for people, with its unit (or why there is none).
    pub shown: String,
}

impl Verdict {
    pub fn line(&self) -> String {
        let word = if self.passed { "PASS" } else { "FAIL" };
        format!("{word}  {:<28} {}: {}", self.expr, self.figure, self.shown)
    }
}

/// The verdicts as printed at the end of a run.
pub fn summary(verdicts: &[Verdict]) -> String {
    let failed = verdicts.iter().filter(|v| !v.passed).count();
    let mut o = format!(
        "asserts  {} passed, {failed} failed\n",
        verdicts.len() - failed
    );
    for v in verdicts {
        o.push_str(&format!("  {}\n", v.line()));
    }
    o
}

fn split_op(text: &str) -> Result<(&str, Op, &str), String> {
    let at = text.find(['<', '>', '=', '!']).ok_or_else(|| {
        "no operator: want FIGURE OP NUMBER, OP one of < <= > >= == !=".to_string()
    })?;
    let rest = &text[at..];
    let (sym, op) = OPS
        .iter()
        .find(|(sym, _)| rest.starts_with(sym))
        .ok_or_else(|| format!("bad operator at {rest:?}: one of < <= > >= == !="))?;
    let (lhs, rhs) = (&text[..at], &rest[sym.len()..]);
    if lhs.trim().is_empty() || rhs.trim().is_empty() {
        return Err("want FIGURE OP NUMBER".into());
    }
    Ok((lhs, *op, rhs))
}

/// `5ms` as (5.0, "ms"): a decimal number (sign, fraction, exponent) and what follows.
fn split_number(s: &str) -> Result<(f64, &str), String> {
    let b = s.as_bytes();
    let digits = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut end = digits(usize::from(matches!(b.first(), Some(b'-' | b'+'))));
    if b.get(end) == Some(&b'.') {
        end = digits(end + 1);
    }
    if matches!(b.get(end), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(end + 1), Some(b'-' | b'+')));
        let exp_end = digits(end + 1 + sign);
        if exp_end > end + 1 + sign {
            end = exp_end;
        }
    }
    let number: f64 = s[..end]
        .parse()
        .map_err(|_| format!("{s:?} is not a number with an optional unit"))?;
    Ok((number, s[end..].trim()))
}

/// The factor from `unit` to a figure's own unit; None when it does not fit.
fn scale(unit: &str, field: Unit) -> Option<f64> {
    let time = |per_second: f64| match unit {
        "s" => Some(per_second),
        "ms" => Some(per_second / 1e3),
        "us" | "µs" => Some(per_second / 1e6),
        _ => None,
    };
    match (unit, field) {
        ("", _) => Some(1.0),
        (_, Unit::Millis) => time(1e3),
        (_, Unit::Seconds) => time(1.0),
        ("k", Unit::Number | Unit::Bytes) => Some(1e3),
        ("M", Unit::Number | Unit::Bytes) => Some(1e6),
        ("KiB", Unit::Bytes) => Some(1024.0),
        ("MiB", Unit::Bytes) => Some(1024.0 * 1024.0),
        ("GiB", Unit::Bytes) => Some(1024.0 * 1024.0 * 1024.0),
        _ => None,
    }
}

fn unit_help(u: Unit) -> &'static str {
    match u {
        Unit::Millis => "a latency in ms: ms, us or s",
        Unit::Seconds => "seconds: s, ms or us",
        Unit::Bytes => "bytes: k, M, KiB, MiB or GiB",
        Unit::Number => "a number: k or M",
    }
}

fn show(v: f64, u: Unit) -> String {
    match u {
        Unit::Millis => format!("{} ms", num(v)),
        Unit::Seconds => format!("{} s", num(v)),
        Unit::Bytes => format!("{} B", num(v)),
        Unit::Number => num(v),
    }
}

/// A figure as people read it: whole numbers without a fraction, others to 3 decimals.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Assertion {
        Assertion::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_figures_operators_and_units() {
        let a = p("ack.p99<5ms");
        assert_eq!(a.target, Target::Path("latency_ms.ack.p99".into()));
        assert_eq!((a.op, a.limit, a.percent), (Op::Lt, 5.0, false));
        assert_eq!(p(" latency_ms.ack.max <= 1.5s ").limit, 1500.0);
        assert_eq!(p("ack.p50>=250us").limit, 0.25);
        assert_eq!(p("ack.p50 > 2").limit, 2.0);
        assert_eq!(p("connect_seconds<1500ms").limit, 1.5);
        assert_eq!(
            p("storm.seconds<=2").target,
            Target::Path("storm.seconds_to_reconnect".into())
        );
        assert_eq!(p("connected>=10k").limit, 10_000.0);
        assert_eq!(p("requests.rate>1.5e3").limit, 1500.0);
        assert_eq!(p("rss<2M").limit, 2e6);
        assert_eq!(p("rss_per_device<1KiB").limit, 1024.0);
        assert_eq!(p("errors==0").target, Target::ConnectionErrors);
        assert_eq!(p("errors.total!=0").op, Op::Ne);
        assert_eq!(
            p("errors.closed_1008==0").target,
            Target::Path("errors.closed_1008".into())
        );
        assert_eq!(p("events.lost==0").op, Op::Eq);
        assert_eq!(p("phases.2.ack_ms.p99<-1").limit, -1.0);
        let pct = p("timeouts<0.1%");
        assert_eq!((pct.limit, pct.percent), (0.1, true));
    }

    #[test]
    fn refuses_malformed_expressions_naming_the_problem() {
        for (bad, says) in [
            ("ack.p99", "no operator"),
            ("ack.p99=5", "bad operator"),
            ("ack.p99<", "want FIGURE"),
            ("<5", "want FIGURE"),
            ("ack.p98<5", "unknown figure \"ack.p98\""),
            ("events.lots==0", "unknown figure"),
            ("ack.p99<fast", "not a number"),
            ("ack.p99<5k", "unit \"k\" does not fit"),
            ("ack.p99<5%", "% has no whole"),
            ("connected>5ms", "does not fit"),
            ("timeouts<5 ms s", "does not fit"),
        ] {
            let e = Assertion::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn report() -> Value {
        let mut r = crate::report::Report::sample();
        r.latency_ms.ack.p99 = Some(4.2);
        r.latency_ms.ack.count = 1000;
        r.devices.target = 300;
        r.devices.connected = 297;
        r.requests.counts.sent = 2000;
        r.requests.counts.timeout = 3;
        r.errors.insert("connect_refused".into(), 2);
        r.errors.insert("request_timeout".into(), 3);
        r.storm = None;
        r.events = crate::report::Events::not_counted();
        serde_json::to_value(r).unwrap()
    }

    #[test]
    fn evaluates_against_a_report() {
        let r = report();
        let check = |s: &str| p(s).check(&r);
        assert!(check("ack.p99<5ms").passed);
        assert!(!check("ack.p99<4200us").passed);
        assert!(check("ack.p99<=4200us").passed);
        assert!(check("ack.p99==4.2").passed);
        assert_eq!(check("ack.p99<5ms").value, Some(4.2));
        assert!(check("ack.p99<5ms").shown.contains("4.200 ms"));
        // Connection errors leave requests out; the total has them.
        assert_eq!(check("errors==2").value, Some(2.0));
        assert_eq!(check("errors.total==5").value, Some(5.0));
        // A kind that never happened is 0, not missing.
        assert!(check("errors.handshake_timeout==0").passed);
        assert!(check("timeouts<0.2%").passed);
        assert!(!check("timeouts<0.1%").passed);
        assert!(check("connected>=99%").passed && !check("connected>=99.5%").passed);
        // Not measured: a failure that says so.
        let lost = check("events.lost==0");
        assert!(
            !lost.passed && lost.value.is_none() && lost.shown.contains("null"),
            "{lost:?}"
        );
        assert!(lost.shown.contains("nothing to measure"), "{lost:?}");
        let storm = check("storm.seconds<5");
        assert!(
            !storm.passed && storm.shown.contains("not in this report"),
            "{storm:?}"
        );
        assert!(!check("phases.7.rate>0").passed);
        assert!(check("lost!=1").line().starts_with("FAIL"));
    }

    /// Issue #33: `--no-ack` with `ack.p99<5ms` passed with "0 ms". A figure with no
    /// samples has nothing to measure: its assertion fails and says so (for a report
    /// of today, null; for an older one, 0 beside a count of 0).
    #[test]
    fn nothing_to_measure_fails() {
        let old_style = serde_json::json!({
            "devices": {"target": 100, "connected": 100},
            "latency_ms": {"ack": {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0},
                           "event": {"count": 0, "p99": null}},
            "requests": {"sent": 0, "acked": 0, "timeout": 0, "rate": 0.0, "target_rate": 0.0},
            "events": {"sent": 0, "lost": 0},
            "errors": {},
        });
        for expr in [
            "ack.p99<5ms",
            "ack.max<1s",
            "event.p99<5ms",
            "timeouts==0",
            "timeouts<1%",
            "acked>=99%",
            "errors.request_timeout==0",
            "request_rate>=90%",
            "events.lost==0",
        ] {
            let v = p(expr).check(&old_style);
            assert!(!v.passed, "{expr} passed on nothing: {v:?}");
            assert!(v.shown.contains("nothing to measure"), "{expr}: {v:?}");
            assert_eq!(v.value, None, "{expr}");
        }
        // A count of 0 is itself measured.
        assert!(p("ack.count==0").check(&old_style).passed);
    }

    #[test]
    fn summary_counts_failures() {
        let r = report();
        let v: Vec<Verdict> = ["ack.p99<5ms", "errors==0"]
            .iter()
            .map(|s| p(s).check(&r))
            .collect();
        let s = summary(&v);
        assert!(s.starts_with("asserts  1 passed, 1 failed"), "{s}");
        assert!(
            s.contains("PASS  ack.p99<5ms") && s.contains("FAIL  errors==0"),
            "{s}"
        );
    }
}
