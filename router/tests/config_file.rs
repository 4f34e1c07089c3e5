//! `router serve --config FILE` and `router config example|check`, through the binary:
//! the example parses, an unknown key or a bad value stops the start naming the key,
//! and a flag wins over its environment variable, which wins over the file.

use std::process::{Command, Stdio};

fn router() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_router"));
    // Nothing from the test's own environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ROUTER_") {
            c.env_remove(k);
        }
    }
    c
}

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("hive-{}-{name}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&p, text).unwrap();
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_example_file_parses_and_bad_files_name_the_key() {
    let out = router().args(["config", "example"]).output().unwrap();
    assert!(out.status.success());
    let example = String::from_utf8(out.stdout).unwrap();
    assert!(example.contains("max-outbound = 262144"), "{example}");
    assert!(example.contains("# env: ROUTER_MAX_OUTBOUND"));
    // A test setting no file may turn on is not a key.
    assert!(example.contains("# websocket-conformance-echo = (command line only)"));
    assert!(!example.contains("\nwebsocket-conformance-echo"));
    let path = temp("example.toml", &example);
    let out = router()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let unknown = temp("unknown.toml", "max-outbound = 1024\nshards-per-core = 2\n");
    let out = router()
        .args(["config", "check", "--config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"shards-per-core\""), "{err}");

    let echo = temp("echo.toml", "websocket-conformance-echo = true\n");
    let out = router()
        .args(["config", "check", "--config"])
        .arg(&echo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be set from a file"), "{err}");
    let _ = std::fs::remove_file(echo);

    let bad = temp("bad.toml", "max-outbound = \"lots\"\n");
    for args in [
        vec!["config", "check", "--config"],
        vec!["serve", "--config"],
    ] {
        let out = router().args(&args).arg(&bad).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--max-outbound") && err.contains("lots"),
            "{err}"
        );
    }
    for p in [path, unknown, bad] {
        let _ = std::fs::remove_file(p);
    }
}

/// The API address from the file, then the environment over it, then the flag over both.
#[test]
fn a_flag_beats_the_environment_which_beats_the_file() {
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let cfg = temp(
        "precedence.toml",
        &format!(
            "api = \"127.0.0.1:{file_port}\"\nlisten = \"127.0.0.1:0\"\nshards = 1\nauth-secret = \"from-file-0123456789abcdef0123456789abcdef\"\n"
        ),
    );
    let ready_api = |env: Option<u16>, flag: Option<u16>| {
        let mut c = router();
        c.args(["serve", "--config"]).arg(&cfg);
        if let Some(p) = env {
            c.env("ROUTER_API", format!("127.0.0.1:{p}"));
        }
        if let Some(p) = flag {
            c.args(["--api", &format!("127.0.0.1:{p}")]);
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(line.starts_with("router ready"), "{line}");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("api="))
            .unwrap()
            .to_string()
    };
    assert_eq!(ready_api(None, None), format!("127.0.0.1:{file_port}"));
    assert_eq!(
        ready_api(Some(env_port), None),
        format!("127.0.0.1:{env_port}")
    );
    assert_eq!(
        ready_api(Some(env_port), Some(flag_port)),
        format!("127.0.0.1:{flag_port}")
    );
    let _ = std::fs::remove_file(cfg);
}
