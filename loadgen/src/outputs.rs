//! The end of a run: the --assert verdicts, the table (and verdicts) on stdout, and the
//! files asked for: --json, --html, --hdr-log, --request-log.

use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;

use crate::backend::{self, Sample};
use crate::cli::Args;
use crate::report::Report;
use crate::{hist, html, thresholds};

/// The run's full histograms (the report holds their summaries).
pub struct Histograms<'a> {
    pub ack: &'a Histogram<u64>,
    pub late: &'a Histogram<u64>,
    pub connect: &'a Histogram<u64>,
    pub auth: &'a Histogram<u64>,
    pub event: &'a Histogram<u64>,
}

/// The phases' time span, for the interval log.
pub struct Span {
    pub wall_start: SystemTime,
    pub seconds: f64,
}

/// Check the assertions, print, write the files; Ok(false) when an assertion failed.
pub fn finish(
    args: &Args,
    report: &mut Report,
    h: &Histograms,
    span: &Span,
    samples: Vec<Sample>,
) -> anyhow::Result<bool> {
    let value = serde_json::to_value(&*report)?;
    report.assertions = args.asserts.iter().map(|a| a.check(&value)).collect();
    print!("{}", report.table());
    if !report.assertions.is_empty() {
        print!("{}", thresholds::summary(&report.assertions));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&*report)?)?;
    }
    if let Some(path) = &args.html {
        let curves = [("ack", h.ack), ("event", h.event)]
            .into_iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| (name, html::percentile_curve(h)))
            .collect::<Vec<_>>();
        let page = html::render(&html::Input {
            report,
            curves: &curves,
            parameters: &args.parameters,
        });
        std::fs::write(path, page)?;
    }
    if let Some(path) = &args.hdr_log {
        let mut out = Vec::new();
        hist::write_interval_log(
            &mut out,
            span.wall_start,
            Duration::from_secs_f64(span.seconds),
            &[
                ("ack", h.ack),
                ("late", h.late),
                ("connect", h.connect),
                ("auth", h.auth),
                ("event", h.event),
            ],
        )?;
        std::fs::write(path, out)?;
    }
    if let Some(path) = &args.request_log {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        backend::write_log(samples, &mut out)?;
        std::io::Write::flush(&mut out)?;
    }
    Ok(report.assertions.iter().all(|v| v.passed))
}
