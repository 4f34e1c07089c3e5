//! `router serve` turns transparent huge pages off for itself unless
//! `--transparent-hugepages` is given (read back from /proc/PID/status, `THP_enabled`).

mod common;

use common::spawn_router;

/// The `THP_enabled` line of a `router serve` started with `extra`, once it is ready.
fn thp_enabled(extra: &[&str]) -> String {
    let mut args = vec!["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"];
    args.extend([
        "--shards",
        "1",
        "--auth-secret",
        "thp-test-0123456789abcdef0123456789abcdef",
    ]);
    args.extend(extra);
    let (mut child, _) = spawn_router(&args);
    let status = thp_line(&format!("/proc/{}/status", child.id()));
    child.kill().unwrap();
    child.wait().unwrap();
    status
}

fn thp_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("this kernel reports THP_enabled (Linux 5.0 and later)")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

#[test]
fn huge_pages_off_unless_asked_for() {
    assert_eq!(thp_enabled(&[]), "0");
    // With the flag the router keeps what it inherited (this test's own setting).
    assert_eq!(
        thp_enabled(&["--transparent-hugepages"]),
        thp_line("/proc/self/status")
    );
}
