//! The harness: router nodes (in-process or the real binary as a process) and waits
//! on what they see.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::amqp::*;
use crate::common::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// A `router serve --amqp` process (the real binary), seen through the test helpers.
pub(crate) struct Node {
    _proc: Proc,
    r: TestRouter,
}

impl std::ops::Deref for Node {
    type Target = TestRouter;
    fn deref(&self) -> &TestRouter {
        &self.r
    }
}

pub(crate) fn process_node(vh: &Vhost, id: &str) -> Node {
    let p = Proc::start(vh, id, free_port(), free_port());
    let r = p.as_router();
    Node { _proc: p, r }
}

pub(crate) fn node(vh: &Vhost, id: &str) -> TestRouter {
    let url = vh.url();
    let id = id.to_string();
    TestRouter::start_with(move |c| {
        c.amqp = Some(url);
        c.node_id = Some(id);
    })
}

pub(crate) async fn wait_ready(r: &TestRouter) {
    let t0 = Instant::now();
    while get(r, "/readyz").await.0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(15), "router not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until node `r` sees `device` on node `on` (None: anywhere but unknown).
pub(crate) async fn wait_owner(r: &TestRouter, device: Uuid, on: Option<&str>) {
    let t0 = Instant::now();
    loop {
        let (s, v) = get(r, &format!("/v1/devices/{device}")).await;
        let node = v["node"].as_str();
        match on {
            Some(n) if s == 200 && node == Some(n) => return,
            None if s == 404 => return,
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "device {device} never shown on {on:?}: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A device that acks every request it gets; returns the requests it saw.
pub(crate) fn acking(mut ws: Ws, n: usize) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < n {
            let m = next_json(&mut ws).await;
            if m["type"] == "device-request" {
                send_json(&mut ws, json!({"type":"ack","request":m["request"]})).await;
                if m["command"] == "Respond" {
                    send_json(&mut ws, json!({"type":"response","request":m["request"],"status":"ok","result":{"on":"remote"}})).await;
                }
                seen.push(m);
            } else {
                seen.push(m); // an event from the backend
            }
        }
        seen
    })
}

pub(crate) fn router_bin() -> &'static str {
    env!("CARGO_BIN_EXE_router")
}

/// A `router serve` process on loopback ports picked free just before.
pub(crate) struct Proc {
    pub(crate) child: Child,
    ws: String,
    api: String,
}

impl Proc {
    pub(crate) fn start(vh: &Vhost, id: &str, ws_port: u16, api_port: u16) -> Proc {
        Self::start_with(vh, id, ws_port, api_port, &[])
    }

    pub(crate) fn start_with(
        vh: &Vhost,
        id: &str,
        ws_port: u16,
        api_port: u16,
        extra: &[&str],
    ) -> Proc {
        let child = Command::new(router_bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{ws_port}"),
                "--api",
                &format!("127.0.0.1:{api_port}"),
                "--shards",
                "1",
                "--amqp",
                &vh.url(),
                "--node-id",
                id,
                "--auth-secret",
                SECRET,
            ])
            .args(extra)
            .stdout(Stdio::null())
            // HIVE_TEST_NODE_LOG=1: the nodes' logs on the test's stderr.
            .stderr(if std::env::var_os("HIVE_TEST_NODE_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("router binary starts");
        Proc {
            child,
            ws: format!("ws://127.0.0.1:{ws_port}"),
            api: format!("http://127.0.0.1:{api_port}"),
        }
    }

    pub(crate) fn as_router(&self) -> TestRouter {
        TestRouter {
            handle: None,
            ws: self.ws.clone(),
            api: self.api.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) async fn wait_metric(r: &TestRouter, name: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let v = r.metric(name).await;
        if v == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{name} stayed {v}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
