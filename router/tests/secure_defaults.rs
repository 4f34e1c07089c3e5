//! Secure by default: what the router refuses to start with, the tokens it refuses, and
//! sessions that end with their token.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

fn router() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_router"));
    // Nothing from the environment of whoever runs the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("ROUTER_") {
            c.env_remove(k);
        }
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// `router serve ARGS` that must refuse to start: its exit status and what it said.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = router();
    c.args(["serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    // A router that starts would run until killed: give it 5 s to refuse.
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(!status.success());
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "router started with {args:?} {env:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_empty_or_short_secret_stops_the_start() {
    let dir = std::env::temp_dir().join(format!("hive-secret-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let short = dir.join("short");
    std::fs::write(&short, "hunter2\n").unwrap();
    for (args, env) in [
        (vec!["--auth-secret", ""], vec![]),
        (
            vec!["--auth-secret", "0123456789abcdef0123456789abcde"],
            vec![],
        ), // 31 bytes
        (vec!["--auth-secret-file", empty.to_str().unwrap()], vec![]),
        (vec!["--auth-secret-file", short.to_str().unwrap()], vec![]),
        (vec![], vec![("ROUTER_AUTH_SECRET", "")]),
        (vec![], vec![("ROUTER_AUTH_SECRET", "short")]),
    ] {
        let err = refused(&args, &env);
        assert!(
            err.contains("at least 32") || err.contains("no token secret"),
            "{args:?} {env:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn without_a_secret_the_router_starts_only_when_told_dev() {
    let err = refused(&[], &[]);
    assert!(
        err.contains("--dev") && err.contains("--auth-secret-file"),
        "{err}"
    );
    // An --amqp node without a token secret has nothing to seal envelopes with either.
    let dir = std::env::temp_dir().join(format!("hive-nokeys-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, "").unwrap();
    let err = refused(
        &[
            "--nerves-keys",
            keys.to_str().unwrap(),
            "--amqp",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ],
        &[],
    );
    assert!(err.contains("--cluster-key-file"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    let err = refused(&["--dev", "--cluster-key", "short"], &[]);
    assert!(err.contains("--cluster-key is 5 bytes"), "{err}");
}

#[tokio::test]
async fn dev_mode_accepts_the_development_secret_and_says_so() {
    let mut c = router();
    c.args([
        "serve",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--shards",
        "1",
    ]);
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("router ready"), "{line}");
    let ws = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ws="))
        .unwrap()
        .to_string();
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    // `router token` without --secret refuses, with --dev mints for the dev secret.
    let no_secret = router()
        .args([
            "token",
            "--device",
            &d.to_string(),
            "--account",
            &a.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!no_secret.status.success());
    let out = router()
        .args([
            "token",
            "--dev",
            "--device",
            &d.to_string(),
            "--account",
            &a.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let (mut s, _) =
        tokio_tungstenite::connect_async(format!("ws://{ws}/ws?token={}", token.trim()))
            .await
            .unwrap();
    assert_eq!(next_json(&mut s).await["type"], "authenticated");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn router_token_refuses_a_lifetime_the_router_would_refuse() {
    let (d, a) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let out = router()
        .args([
            "token",
            "--device",
            &d,
            "--account",
            &a,
            "--ttl",
            "3153600000",
        ])
        .env("ROUTER_AUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--auth-max-token-lifetime"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = router()
        .args([
            "token",
            "--device",
            &d,
            "--account",
            &a,
            "--secret",
            "short",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

async fn connect_with(r: &TestRouter, token: &str) -> Ws {
    let mut req = format!("{}/ws", r.ws).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade")
        .0
}

#[tokio::test]
async fn a_token_living_too_long_is_refused_4401() {
    let r = TestRouter::start_with(|c| c.auth_max_token_lifetime = 3600);
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let too_long = router::auth::mint(SECRET, d, a, 7200);
    let mut ws = connect_with(&r, &too_long).await;
    assert_eq!(close_code(&mut ws).await, 4401);
    let forever = router::auth::mint_with_exp(SECRET, d, a, u64::MAX);
    let mut ws = connect_with(&r, &forever).await;
    assert_eq!(close_code(&mut ws).await, 4401);
    assert_eq!(
        r.metric("router_auth_failures_total{reason=\"lifetime\"}")
            .await,
        2.0
    );
    let mut ok = connect_with(&r, &router::auth::mint(SECRET, d, a, 3000)).await;
    assert_eq!(next_json(&mut ok).await["type"], "authenticated");
}

/// --close-on-token-expiry: a session ends with its token (4401), unless the device
/// presented a newer one on the open connection.
#[tokio::test]
async fn a_session_ends_with_its_token_unless_renewed() {
    let r = TestRouter::start_with(|c| c.close_on_token_expiry = true);
    let now = router::auth::unix_now();
    let (d1, d2, a) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut lapsing = connect_with(&r, &router::auth::mint_with_exp(SECRET, d1, a, now + 2)).await;
    assert_eq!(next_json(&mut lapsing).await["type"], "authenticated");
    let mut renewing = connect_with(&r, &router::auth::mint_with_exp(SECRET, d2, a, now + 2)).await;
    assert_eq!(next_json(&mut renewing).await["type"], "authenticated");
    // Another device's token is refused and changes nothing.
    let other = router::auth::mint(SECRET, Uuid::new_v4(), a, 600);
    renewing
        .send(Message::text(format!("Bearer {other}")))
        .await
        .unwrap();
    let v = next_json(&mut renewing).await;
    assert_eq!(v["code"], "unauthorized", "{v}");
    let newer = router::auth::mint(SECRET, d2, a, 600);
    renewing
        .send(Message::text(format!("Bearer {newer}")))
        .await
        .unwrap();
    assert_eq!(next_json(&mut renewing).await["type"], "authenticated");

    let t0 = std::time::Instant::now();
    assert_eq!(close_code(&mut lapsing).await, 4401);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The renewed session is still open two seconds after its first token expired.
    tokio::time::sleep(Duration::from_secs(2)).await;
    renewing.send(Message::Ping(vec![1].into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match renewing.next().await {
                Some(Ok(Message::Pong(_))) => return true,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(pong, "the renewed session was closed");
    assert!(
        r.metric("router_auth_failures_total{reason=\"expired\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn without_the_option_a_session_outlives_its_token() {
    let r = TestRouter::start();
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let now = router::auth::unix_now();
    let mut ws = connect_with(&r, &router::auth::mint_with_exp(SECRET, d, a, now + 1)).await;
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dev = tokio::spawn(async move {
        let req = next_json(&mut ws).await;
        ws.send(Message::text(
            serde_json::json!({"type":"ack","request":req["request"]}).to_string(),
        ))
        .await
        .unwrap();
    });
    let (s, body) = r
        .request(d, serde_json::json!({"command":"ping"}), "")
        .await;
    assert_eq!(s, 200, "{body}");
    dev.await.unwrap();
}

/// A secret on the command line is visible in `ps`: the router says so (and names the
/// way that is not), while the same secret from the environment draws no warning.
#[test]
fn a_secret_given_as_a_flag_is_warned_about() {
    let secret = "flag-secret-0123456789abcdef0123456789abcdef";
    let run = |flag: bool| {
        let mut c = router();
        c.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--shards",
            "1",
        ]);
        if flag {
            c.args(["--auth-secret", secret]);
        } else {
            c.env("ROUTER_AUTH_SECRET", secret);
        }
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("router ready"), "{line}");
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let warned = run(true);
    assert!(
        warned.contains("--auth-secret on the command line is visible")
            && warned.contains("ROUTER_AUTH_SECRET"),
        "{warned}"
    );
    assert!(!run(false).contains("visible to every user"));
}
