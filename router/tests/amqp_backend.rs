//! Backend delivery (`--amqp --backend-url`) against the real broker (127.0.0.1:5672,
//! or $HIVE_AMQP_URL) and a tiny HTTP backend in the test that records what it
//! accepts. Each test consumes through its own durable queue
//! (`hive.backend.test-<uuid>`, deleted when the test ends, even on failure) and, where
//! counting matters, binds it only to its own event type, so concurrent tests and
//! other users of the broker do not disturb each other.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use common::amqp::*;
use common::*;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use uuid::Uuid;

/// A test backend: answers every POST with the current `status`, and records the
/// batches it answered 2xx (raw body) and the headers of the last request.
#[derive(Default)]
struct BackendState {
    status: AtomicU16,
    requests: AtomicU64,
    accepted: Mutex<Vec<String>>,
    last_headers: Mutex<Option<HeaderMap>>,
}

struct TestBackend {
    url: String,
    state: Arc<BackendState>,
    task: tokio::task::JoinHandle<()>,
}

impl TestBackend {
    async fn start(status: u16) -> TestBackend {
        let state = Arc::new(BackendState::default());
        state.status.store(status, Relaxed);
        async fn ingest(
            State(st): State<Arc<BackendState>>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            st.requests.fetch_add(1, Relaxed);
            *st.last_headers.lock().unwrap() = Some(headers);
            let status = StatusCode::from_u16(st.status.load(Relaxed)).unwrap();
            if status.is_success() {
                st.accepted
                    .lock()
                    .unwrap()
                    .push(String::from_utf8(body.to_vec()).expect("UTF-8 body"));
            }
            status
        }
        let app = axum::Router::new()
            .route("/events", axum::routing::post(ingest))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestBackend { url, state, task }
    }

    fn set_status(&self, s: u16) {
        self.state.status.store(s, Relaxed);
    }

    /// Every accepted batch, each element kept as its exact raw JSON text.
    fn batches(&self) -> Vec<Vec<String>> {
        self.state
            .accepted
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let arr: Vec<&RawValue> = serde_json::from_str(b)
                    .unwrap_or_else(|e| panic!("not a JSON array ({e}): {b}"));
                arr.iter().map(|r| r.get().to_string()).collect()
            })
            .collect()
    }

    /// Accepted events of `device`, parsed.
    fn events_of(&self, device: Uuid) -> Vec<Value> {
        self.batches()
            .into_iter()
            .flatten()
            .map(|raw| serde_json::from_str::<Value>(&raw).unwrap())
            .filter(|v| v["device"] == device.to_string())
            .collect()
    }

    /// Wait until the backend accepted every `n` in `0..want` of `device`'s events.
    async fn wait_seq(&self, device: Uuid, want: u64, within: Duration) -> BTreeSet<u64> {
        let t0 = Instant::now();
        loop {
            let seen: BTreeSet<u64> = self
                .events_of(device)
                .iter()
                .filter_map(|v| v["n"].as_u64())
                .collect();
            if seen.len() as u64 >= want {
                return seen;
            }
            assert!(
                t0.elapsed() < within,
                "only {} of {want} events reached the backend within {within:?}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deletes the test's durable queue when dropped, also when the test fails. Declare it
/// before the router, so the router (which would declare the queue again) stops first.
struct QueueGuard(String);

impl QueueGuard {
    fn new() -> QueueGuard {
        QueueGuard(format!("hive.backend.test-{}", Uuid::new_v4().simple()))
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Drop cannot await, and may run inside the test's runtime: use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let conn =
                        Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
                    let ch = conn.create_channel().await?;
                    ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await?;
                    conn.close(200, "bye".into()).await
                })
                .await;
            });
        })
        .join();
    }
}

/// Messages ready in `queue` (passive declare), from the test's own connection.
async fn queue_ready(queue: &str) -> u32 {
    let conn = connect(&amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the backend queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

fn backend_router(
    queue: &str,
    backend: &TestBackend,
    bindings: &[String],
    more: impl FnOnce(&mut router::config::ServeConfig),
) -> TestRouter {
    let (queue, url, bindings) = (queue.to_string(), backend.url.clone(), bindings.to_vec());
    TestRouter::start_with(move |c| {
        c.amqp = Some(amqp_url());
        c.backend_url = Some(url);
        c.backend_queue = queue;
        c.backend_bindings = bindings;
        fast_device(c);
        more(c);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_backend_as_json_arrays_exactly_as_published() {
    let queue = QueueGuard::new();
    let backend = TestBackend::start(200).await;
    let mut tap = Tap::new().await;
    let bindings: Vec<String> = ["instances", "device-state", "seq"]
        .iter()
        .map(|t| format!("hive-device.{t}"))
        .collect();
    let r = backend_router(&queue.0, &backend, &bindings, |c| {
        c.backend_token = Some("backend-secret".into());
    });
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    wait_metric(
        &r,
        "router_backend_connected",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;

    // A u64 beyond f64 precision and a nested object must arrive digit for digit.
    ws_send_text(
        &mut ws,
        r#"{"type":"instances","apps":[{"name":"db","cpu":0.25,"tags":["a",null]}],"big":18446744073709551615,"device":"spoofed"}"#,
    )
    .await;
    send_json(
        &mut ws,
        json!({"type":"device-state","state":"online","battery":0.87}),
    )
    .await;
    // Not bound to this test's queue: must not reach the backend.
    send_json(&mut ws, json!({"type":"unbound","x":1})).await;
    // Many, quickly: batches must hold several events, and no more than --backend-batch.
    send_seq(&mut ws, "seq", 0..500, 32).await;

    backend.wait_seq(d, 500, Duration::from_secs(20)).await;
    let events = backend.events_of(d);
    assert_eq!(events.len(), 502, "each event once, nothing unbound");
    for v in &events {
        assert_eq!(v["device"], d.to_string());
        assert_eq!(v["account"], a.to_string());
        assert_eq!(v["service"], "hive-device");
        assert_ne!(v["type"], "unbound");
    }
    let state = events.iter().find(|v| v["type"] == "device-state").unwrap();
    assert_eq!(state["state"], "online");
    assert_eq!(state["battery"], 0.87);

    // Byte for byte what the bridge published to hive.events.
    let published: BTreeSet<String> = tap
        .bodies_for(d, 503, Duration::from_secs(10))
        .await
        .into_iter()
        .filter(|b| !b.contains(r#""type":"unbound""#))
        .collect();
    let batches = backend.batches();
    let received: BTreeSet<String> = batches
        .iter()
        .flatten()
        .filter(|raw| raw.contains(&d.to_string()))
        .cloned()
        .collect();
    assert_eq!(received, published);
    let inst = received.iter().find(|b| b.contains("instances")).unwrap();
    assert!(inst.contains("18446744073709551615"), "{inst}");

    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    let largest = *sizes.iter().max().unwrap();
    assert!(largest > 1, "events were batched: {sizes:?}");
    assert!(largest <= 100, "--backend-batch caps a batch: {sizes:?}");

    // The request itself.
    let h = backend.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["authorization"], "Bearer backend-secret");
    let m = r.metrics().await;
    assert!(!m.contains("backend-secret"), "the token never shows");
    assert!(metric_value(&m, "router_backend_events_delivered_total") >= 502.0);
    assert!(metric_value(&m, "router_backend_batches_total{result=\"ok\"}") >= 2.0);
    assert_eq!(
        metric_value(&m, "router_backend_batches_total{result=\"failed\"}"),
        0.0
    );
    assert!(metric_value(&m, "router_backend_post_latency_seconds_count") >= 2.0);
    assert!(m.contains("# TYPE router_backend_post_latency_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_gets_every_event_once_it_recovers() {
    let queue = QueueGuard::new();
    let backend = TestBackend::start(500).await;
    let ty = format!("seq-{}", Uuid::new_v4().simple());
    let r = backend_router(&queue.0, &backend, &[format!("hive-device.{ty}")], |_| {});
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    wait_metric(
        &r,
        "router_backend_connected",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;

    let t0 = Instant::now();
    send_seq(&mut ws, &ty, 0..1000, 32).await;
    wait_metric(
        &r,
        "router_backend_post_failures_total{reason=\"status\"}",
        Duration::from_secs(10),
        |v| v >= 3.0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(t0.elapsed())).await;
    assert!(backend.events_of(d).is_empty(), "nothing accepted yet");
    assert_eq!(r.metric("router_backend_events_delivered_total").await, 0.0);
    backend.set_status(200);

    let seen = backend.wait_seq(d, 1000, Duration::from_secs(30)).await;
    assert_eq!(seen, (0..1000).collect::<BTreeSet<u64>>());
    assert!(
        r.metric("router_backend_post_failures_total{reason=\"status\"}")
            .await
            > 0.0
    );
    assert!(
        r.metric("router_backend_batches_total{result=\"failed\"}")
            .await
            > 0.0
    );
    // Everything acked: nothing held, nothing left in the queue.
    wait_metric(&r, "router_backend_unacked", Duration::from_secs(5), |v| {
        v == 0.0
    })
    .await;
    wait_metric(&r, "router_backend_backlog", Duration::from_secs(5), |v| {
        v == 0.0
    })
    .await;
    assert_eq!(queue_ready(&queue.0).await, 0);
    assert!(r.metric("router_backend_events_delivered_total").await >= 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acked_before_a_2xx_and_a_new_router_gets_it_all() {
    let queue = QueueGuard::new();
    let failing = TestBackend::start(503).await;
    let ty = format!("seq-{}", Uuid::new_v4().simple());
    let bindings = [format!("hive-device.{ty}")];
    const N: u64 = 300;
    const PREFETCH: u16 = 100;
    let mut r1 = backend_router(&queue.0, &failing, &bindings, |c| {
        c.backend_prefetch = PREFETCH;
        c.backend_batch = 40;
    });
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r1.device(d, a).await;
    wait_metric(
        &r1,
        "router_backend_connected",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;
    send_seq(&mut ws, &ty, 0..N, 32).await;

    // The router holds a prefetch worth, unacked; the rest waits in the queue.
    wait_metric(
        &r1,
        "router_backend_unacked",
        Duration::from_secs(10),
        |v| v == f64::from(PREFETCH),
    )
    .await;
    wait_metric(
        &r1,
        "router_backend_backlog",
        Duration::from_secs(10),
        |v| v == (N - u64::from(PREFETCH)) as f64,
    )
    .await;
    wait_metric(
        &r1,
        "router_backend_post_failures_total{reason=\"status\"}",
        Duration::from_secs(10),
        |v| v >= 3.0,
    )
    .await;
    let ready = u64::from(queue_ready(&queue.0).await);
    let unacked = r1.metric("router_backend_unacked").await as u64;
    assert_eq!(ready + unacked, N, "ready {ready} + unacked {unacked}");
    assert_eq!(
        r1.metric("router_backend_events_delivered_total").await,
        0.0
    );
    assert!(failing.state.requests.load(Relaxed) >= 3);

    // Stop that router while the backend still fails; a new one with a working
    // backend on the same queue gets every event (the held ones redelivered).
    let h = r1.handle.take().unwrap();
    tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || h.shutdown()),
    )
    .await
    .expect("the router stops in time")
    .unwrap();
    drop(ws);
    let working = TestBackend::start(200).await;
    let r2 = backend_router(&queue.0, &working, &bindings, |_| {});
    let seen = working.wait_seq(d, N, Duration::from_secs(20)).await;
    assert_eq!(seen, (0..N).collect::<BTreeSet<u64>>());
    assert!(failing.events_of(d).is_empty());
    wait_metric(&r2, "router_backend_unacked", Duration::from_secs(5), |v| {
        v == 0.0
    })
    .await;
    wait_metric(&r2, "router_backend_backlog", Duration::from_secs(5), |v| {
        v == 0.0
    })
    .await;
    assert_eq!(queue_ready(&queue.0).await, 0);
    drop(r1);
}

/// The broker closes the delivery's connection (node restart, operator): the router
/// reconnects, declares again, and the events it held unacked come back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_amqp_connection_is_reopened_and_held_events_redelivered() {
    if !have_rabbitmqctl() {
        eprintln!("rabbitmqctl not available: skipping");
        return;
    }
    let queue = QueueGuard::new();
    let backend = TestBackend::start(500).await;
    let ty = format!("seq-{}", Uuid::new_v4().simple());
    let node = format!("backend-close-{}", Uuid::new_v4().simple());
    let node_id = node.clone();
    let r = backend_router(&queue.0, &backend, &[format!("hive-device.{ty}")], |c| {
        c.node_id = Some(node_id);
    });
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = r.device(d, a).await;
    wait_metric(
        &r,
        "router_backend_connected",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await;
    send_seq(&mut ws, &ty, 0..200, 32).await;
    wait_metric(&r, "router_backend_unacked", Duration::from_secs(10), |v| {
        v == 200.0
    })
    .await;

    // Close the delivery's own connection (not the bridge's), found by its name.
    let name = format!("hive-router {node} backend-delivery");
    let closed = broker_close_connection(name, "backend delivery").await;
    assert!(closed);
    // (The gap until the reconnect is too short to observe reliably; the redelivery
    // below can only happen over a new connection.)
    send_seq(&mut ws, &ty, 200..300, 32).await;
    backend.set_status(200);
    let seen = backend.wait_seq(d, 300, Duration::from_secs(30)).await;
    assert_eq!(seen, (0..300).collect::<BTreeSet<u64>>());
    assert_eq!(r.metric("router_backend_connected").await, 1.0);
    wait_metric(&r, "router_backend_unacked", Duration::from_secs(5), |v| {
        v == 0.0
    })
    .await;
    assert_eq!(queue_ready(&queue.0).await, 0);
}

/// openssl, in `dir`: a CA, and a server certificate for 127.0.0.1 it signs. Returns
/// (ca.pem, server.pem, server.key).
fn openssl_ca_and_server(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let p = |f: &str| {
        dir.join(format!("{name}-{f}"))
            .to_string_lossy()
            .into_owned()
    };
    let (ca_key, ca, key, csr, cert, ext) = (
        p("ca.key"),
        p("ca.pem"),
        p("server.key"),
        p("server.csr"),
        p("server.pem"),
        p("ext.cnf"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    let run = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (ca, cert, key)
}

/// An HTTPS backend written with Python's standard library (http.server + ssl): answers
/// every POST 200 and prints the number of events in it. Returns the process and its URL.
fn python_https_backend(cert: &str, key: &str) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        print(len(json.loads(body)), flush=True)
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", {port}), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{cert}", "{key}")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"#
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // Keep reading its output so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut l = String::new();
        while std::io::BufRead::read_line(&mut out, &mut l).unwrap_or(0) > 0 {
            l.clear();
        }
    });
    (child, format!("https://127.0.0.1:{port}/events"))
}

/// `https://` backends: events reach a backend whose certificate `--backend-ca` signs;
/// with another CA the TLS handshake fails with a clear error and
/// `router_backend_post_failures_total{reason="tls"}`, and nothing is acked: the events
/// wait in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_is_trusted_only_through_its_ca() {
    let dir = std::env::temp_dir().join(format!("hive-backend-tls-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = openssl_ca_and_server(&dir, "right");
    let (wrong_ca, _, _) = openssl_ca_and_server(&dir, "wrong");
    let (mut py, url) = python_https_backend(&cert, &key);
    let bindings = vec!["hive-device.tls-seq".to_string()];

    for (ca_file, trusted) in [(wrong_ca, false), (ca, true)] {
        let queue = QueueGuard::new();
        let (q, u, b, caf) = (
            queue.0.clone(),
            url.clone(),
            bindings.clone(),
            ca_file.clone(),
        );
        let r = TestRouter::start_with(move |c| {
            c.amqp = Some(amqp_url());
            c.backend_url = Some(u);
            c.backend_queue = q;
            c.backend_bindings = b;
            c.backend_ca = Some(caf.into());
            fast_device(c);
        });
        let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
        let mut ws = r.device(d, a).await;
        wait_metric(
            &r,
            "router_backend_connected",
            Duration::from_secs(10),
            |v| v == 1.0,
        )
        .await;
        send_seq(&mut ws, "tls-seq", 0..20, 8).await;
        if trusted {
            wait_metric(
                &r,
                "router_backend_events_delivered_total",
                Duration::from_secs(15),
                |v| v >= 20.0,
            )
            .await;
            assert_eq!(
                r.metric("router_backend_post_failures_total{reason=\"tls\"}")
                    .await,
                0.0
            );
        } else {
            wait_metric(
                &r,
                "router_backend_post_failures_total{reason=\"tls\"}",
                Duration::from_secs(15),
                |v| v >= 1.0,
            )
            .await;
            assert_eq!(r.metric("router_backend_events_delivered_total").await, 0.0);
            drop(r);
            // Nothing acked: every event still waits in the queue.
            let t0 = Instant::now();
            while queue_ready(&queue.0).await < 20 {
                assert!(t0.elapsed() < Duration::from_secs(10), "events were acked");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = py.kill();
    let _ = py.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
