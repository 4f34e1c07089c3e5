//! docs/metrics.md documents every metric family the router exports, and names no
//! metric the router does not export: one router on the embedded bus, one on the real
//! broker (127.0.0.1:5672 or $HIVE_AMQP_URL; the cluster's families exist only there).

mod common;

use std::collections::BTreeSet;

use common::amqp::amqp_url;
use common::TestRouter;

fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Metric names in the docs: every `router_...` word.
fn documented(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = doc.as_bytes();
    let mut i = 0;
    while let Some(off) = doc[i..].find("router_") {
        let start = i + off;
        let end = start
            + b[start..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                .count();
        out.insert(doc[start..end].to_string());
        i = end;
    }
    out
}

#[tokio::test]
async fn every_metric_is_documented_and_every_documented_metric_exists() {
    // The embedded bus, and a node on the broker (cluster families exist only there).
    let r = TestRouter::start();
    let mut exported = families(&r.metrics().await);
    let clustered = TestRouter::start_with(|c| c.amqp = Some(amqp_url()));
    exported.extend(families(&clustered.metrics().await));
    assert!(exported.len() > 30, "{exported:?}");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let named = documented(&doc);
    // A histogram's series carry _bucket/_sum/_count; the docs name the family.
    let base = |n: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n)
            .to_string()
    };
    let undocumented: Vec<_> = exported.iter().filter(|m| !named.contains(*m)).collect();
    assert!(
        undocumented.is_empty(),
        "exported, not in docs/metrics.md: {undocumented:?}"
    );
    let unknown: Vec<_> = named
        .iter()
        .filter(|m| !exported.contains(*m) && !exported.contains(&base(m)))
        .collect();
    assert!(
        unknown.is_empty(),
        "in docs/metrics.md, not exported: {unknown:?}"
    );
}
