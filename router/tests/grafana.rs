//! Every metric the Grafana dashboard queries exists in the router's /metrics output.

mod common;

use std::collections::BTreeSet;

use common::TestRouter;

#[tokio::test]
async fn dashboard_queries_only_existing_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../grafana/dashboards/hive-router.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        // Row panels (section headers) have no targets.
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let bytes = expr.as_bytes();
            let mut i = 0;
            while let Some(off) = expr[i..].find("router_") {
                let start = i + off;
                let end = start
                    + bytes[start..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                        .count();
                queried.insert(expr[start..end].to_string());
                i = end;
            }
        }
    }
    assert!(queried.len() >= 20, "{queried:?}");
    let r = TestRouter::start();
    let text = r.metrics().await;
    let exposed: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = queried.iter().filter(|m| !exposed.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics /metrics lacks: {missing:?}"
    );
}
