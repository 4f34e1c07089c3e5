//! HDR histograms in microseconds: record, merge across workers, serialise for the
//! trip from a worker process to the coordinator, summarise as percentiles.

use std::time::{Duration, SystemTime};

use base64::Engine;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::Serialize;

/// 1 µs to 1 hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, 3_600_000_000));
}

pub fn to_b64(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    let _ = V2Serializer::new().serialize(h, &mut buf);
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn from_b64(s: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    Deserializer::new().deserialize(&mut &bytes[..]).ok()
}

pub fn merge(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    let _ = into.add(other);
}

/// Write histograms as one interval of an HdrHistogram interval log (the format of
/// Java's `HistogramLogWriter`: compressed V2, base64, one line per histogram), readable by
/// `HistogramLogProcessor` and hdrhistogram's `IntervalLogIterator`. The first histogram
/// is written untagged (what log tools process by default), the others with their tag.
pub fn write_interval_log<W: std::io::Write>(
    out: &mut W,
    start: SystemTime,
    duration: Duration,
    hists: &[(&str, &Histogram<u64>)],
) -> anyhow::Result<()> {
    let mut ser = V2DeflateSerializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .add_comment("loadgen latency histograms, values in microseconds")
        .with_start_time(start)
        .with_base_time(start)
        .with_max_value_divisor(1000.0)
        .begin_log_with(out, &mut ser)?;
    for (i, (tag, h)) in hists.iter().enumerate() {
        let tag = if i == 0 { None } else { Tag::new(tag) };
        log.write_histogram(h, Duration::ZERO, duration, tag)
            .map_err(|e| anyhow::anyhow!("writing interval log: {e:?}"))?;
    }
    Ok(())
}

/// Percentiles in milliseconds (stable JSON field names). A histogram with no sample
/// has no percentiles: they are None (null in JSON, `-` in tables), never 0, so that
/// nothing measured cannot pass for fast.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

pub fn summary(h: &Histogram<u64>) -> Summary {
    let ms = |us: u64| (!h.is_empty()).then(|| us as f64 / 1000.0);
    Summary {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (new_hist(), new_hist(), new_hist());
        for v in 1..=5000u64 {
            record(if v % 3 == 0 { &mut a } else { &mut b }, v * 7);
            record(&mut all, v * 7);
        }
        // Through the worker -> coordinator serialisation, as in a real run.
        let a2 = from_b64(&to_b64(&a)).unwrap();
        let b2 = from_b64(&to_b64(&b)).unwrap();
        let mut merged = new_hist();
        merge(&mut merged, &a2);
        merge(&mut merged, &b2);
        assert_eq!(summary(&merged), summary(&all));
        assert_eq!(merged.len(), 5000);
    }

    #[test]
    fn interval_log_round_trips() {
        use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
        let (mut ack, mut conn) = (new_hist(), new_hist());
        for v in 1..=1000u64 {
            record(&mut ack, v * 13);
            record(&mut conn, v);
        }
        let mut buf = Vec::new();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        write_interval_log(
            &mut buf,
            t0,
            Duration::from_secs(5),
            &[("ack", &ack), ("connect", &conn)],
        )
        .unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with("#loadgen latency"), "{text}");
        let mut intervals = Vec::new();
        for e in IntervalLogIterator::new(&buf) {
            if let LogEntry::Interval(h) = e.unwrap() {
                intervals.push((h.tag().map(|t| t.as_str().to_string()), h));
            }
        }
        assert_eq!(intervals.len(), 2);
        assert_eq!(intervals[0].0, None);
        assert_eq!(intervals[1].0.as_deref(), Some("connect"));
        assert_eq!(intervals[0].1.duration(), Duration::from_secs(5));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(intervals[0].1.encoded_histogram())
            .unwrap();
        let back: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
        assert_eq!(back, ack);
    }

    #[test]
    fn percentiles_are_ordered() {
        let mut h = new_hist();
        for v in [5u64, 50, 500, 5000, 50_000, 7, 9, 11] {
            record(&mut h, v);
        }
        let s = summary(&h);
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max);
        assert!((s.max.unwrap() - 50.0).abs() < 0.1);
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles_not_zeros() {
        let s = summary(&new_hist());
        assert_eq!(s.count, 0);
        assert_eq!([s.p50, s.p90, s.p99, s.p999, s.max], [None; 5]);
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["p99"].is_null() && v["max"].is_null(), "{v}");
    }
}
