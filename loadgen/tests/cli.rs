//! The loadgen binary's command line as CI uses it, without a router: --scenario with
//! its precedence through the real environment (--dry-run), usage errors (exit 2) for a
//! bad --assert or scenario key, and `loadgen compare`'s exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn loadgen(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(args);
    // Nothing from the developer's own environment.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LOADGEN_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("loadgen runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/example.toml")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadgen-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn scenario_dry_run_follows_flag_over_environment_over_file() {
    let sc = example();
    let sc = sc.to_str().unwrap();
    let o = loadgen(&["--scenario", sc, "--dry-run"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("--devices = 2000 (scenario)"), "{out}");
    assert!(out.contains("--connect-rate = 1000 (scenario)"), "{out}");
    assert!(
        out.contains("ramp: 2000 devices at 1000 connects/s, at most 30 s"),
        "{out}"
    );
    assert!(out.contains("steady: 20 s, 400 requests/s"), "{out}");
    assert!(
        out.contains("storm: 10 s, 400 requests/s, 50% of the devices dropped"),
        "{out}"
    );
    assert!(out.contains("hold: 5 s"), "{out}");
    // The environment over the file, the command line over both (and over the phases'
    // own rates).
    let env = [("LOADGEN_DEVICES", "700"), ("LOADGEN_CONNECT_RATE", "90")];
    let out = text(&loadgen(&["--scenario", sc, "--dry-run"], &env));
    assert!(out.contains("--devices = 700 (environment)"), "{out}");
    assert!(out.contains("ramp: 700 devices at 90 connects/s"), "{out}");
    let o = loadgen(
        &[
            "--scenario",
            sc,
            "--dry-run",
            "--devices",
            "5",
            "--request-rate",
            "7",
        ],
        &env,
    );
    let out = text(&o);
    assert!(out.contains("--devices = 5 (command line)"), "{out}");
    assert!(out.contains("steady: 20 s, 7 requests/s"), "{out}");
    assert!(!out.contains("400 requests/s"), "{out}");
    // A file-set --duration beside phases is refused, as on the command line.
    let dir = temp_dir("dur");
    let with_duration = dir.join("d.toml");
    let body = std::fs::read_to_string(example()).unwrap();
    std::fs::write(&with_duration, format!("duration = 4\n{body}")).unwrap();
    let o = loadgen(
        &["--scenario", with_duration.to_str().unwrap(), "--dry-run"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--duration cannot be combined"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2_naming_the_problem() {
    let o = loadgen(&["--assert", "ack.p99<5ms", "--assert", "ack.p98<5ms"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("'ack.p98<5ms'"), "{}", text(&o));
    let o = loadgen(&["--assert", "errors=0"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("errors=0"), "{}", text(&o));
    let dir = temp_dir("key");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "devices = 3\nrequest-rat = 5\n").unwrap();
    let o = loadgen(&["--scenario", bad.to_str().unwrap(), "--dry-run"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("unknown key \"request-rat\""),
        "{}",
        text(&o)
    );
    let o = loadgen(&["--scenario", "/nonexistent/s.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compare_exits_1_on_a_regression() {
    let dir = temp_dir("cmp");
    let report = |p50: f64, timeouts: u64| {
        serde_json::json!({
            "devices": {"target": 500, "connected": 500},
            "latency_ms": {"ack": {"count": 500, "p50": p50, "p99": p50 * 2.0}},
            "requests": {"sent": 500, "timeout": timeouts, "rate": 100.0},
            "errors": {},
        })
    };
    let write = |name: &str, v: serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    };
    // +6%, +0.6 ms on a p50 of 500 samples: within 10%, beyond the 0.5 ms floor. (This
    // test compared a p99 of 2.0 and 2.1 ms: a change of 0.1 ms, under the noise floor,
    // and a p99 of 500 samples, too few to judge, since issue #33.)
    let base = write("base.json", report(10.0, 0));
    let same = write("same.json", report(10.6, 0));
    let worse = write("worse.json", report(10.6, 1));
    let o = loadgen(&["compare", &base, &same], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("latency_ms.ack.p99"), "{}", text(&o));
    assert!(text(&o).contains("needs >= 1000"), "{}", text(&o));
    let o = loadgen(&["compare", &base, &worse], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("worse beyond 10%: requests.timeout"),
        "{}",
        text(&o)
    );
    let o = loadgen(&["compare", &base, &same, "--tolerance", "1%"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = loadgen(&["compare", &base, "/nonexistent.json"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // Issue #33: `{}` is no report, a gate with a typo matches nothing: errors, not
    // passes.
    let empty = write("empty.json", serde_json::json!({}));
    let o = loadgen(&["compare", &base, &empty], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a loadgen report"), "{}", text(&o));
    let o = loadgen(
        &["compare", &base, &worse, "--gate", "latncy_ms.ack,reqests"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("latncy_ms.ack,reqests"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue #33: bad values are usage errors (exit 2) found at once, and a router that is
/// not there is told in seconds with a non-zero exit, not after --ramp-timeout with 0.
#[test]
fn fails_fast_before_and_at_the_ramp() {
    for (args, says) in [
        (&["--devices", "0"][..], "--devices 0"),
        (&["--connect-rate", "0"], "--connect-rate"),
        (&["--url", "http://x:1"], "--url"),
        (&["--duration", "3", "--storm-at", "4"], "--storm-at 4"),
        (&["--request-via", "cross"], "two --api"),
        (
            &["--json", "/missing/dir/r.json"],
            "--json /missing/dir/r.json",
        ),
        (
            &["--html", "/missing/dir/r.html"],
            "--html /missing/dir/r.html",
        ),
        (&["--hdr-log", "/missing/dir/h.log"], "--hdr-log"),
        (&["--request-log", "/missing/dir/r.csv"], "--request-log"),
    ] {
        let t = std::time::Instant::now();
        let mut all = vec![
            "--url",
            "ws://127.0.0.1:1",
            "--api",
            "http://127.0.0.1:1",
            "--quiet",
        ];
        all.extend_from_slice(args);
        let o = loadgen(&all, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
        assert!(t.elapsed().as_secs() < 5, "{args:?} took {:?}", t.elapsed());
    }
    // Nothing listens on port 1.
    let t = std::time::Instant::now();
    let o = loadgen(
        &[
            "--url",
            "ws://127.0.0.1:1",
            "--api",
            "http://127.0.0.1:1",
            "--quiet",
            "--devices",
            "10",
            "--duration",
            "1",
            "--ramp-timeout",
            "30",
        ],
        &[("RUST_BACKTRACE", "0")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("connect_refused"), "{}", text(&o));
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
}
