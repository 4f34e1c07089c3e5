//! Nodes coming and going: killed with -9, starting late, leaving, stalled, their
//! broker connection closed.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::amqp::*;
use crate::common::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::nodes::*;

/// kill -9 a node holding devices with requests in flight; the devices reconnect to
/// the surviving node: every request the API accepted ends acked, or with a clear
/// 404/504, none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_requests_in_flight_loses_none() {
    let vh = Vhost::new("hive-test");
    let pa = Proc::start(&vh, "survivor", free_port(), free_port());
    let mut pb = Proc::start(&vh, "victim", free_port(), free_port());
    let (a, b) = (pa.as_router(), pb.as_router());
    wait_ready(&a).await;
    wait_ready(&b).await;

    // Four devices on the victim; each gets a request through the survivor and
    // reads it without acking.
    let mut devs = Vec::new();
    for _ in 0..4 {
        let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
        let ws = b.device(d, acc).await;
        devs.push((d, acc, ws));
    }
    for (d, _, _) in &devs {
        wait_owner(&a, *d, Some("victim")).await;
    }
    let mut calls = Vec::new();
    for (d, _, ws) in devs.iter_mut() {
        let http = a.http.clone();
        let url = format!("{}/v1/devices/{d}/requests", a.api);
        calls.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = http
                .post(url)
                .json(&json!({"command":"update","timeout_ms":12000}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap(),
                t0.elapsed(),
            )
        }));
        let m = next_json(ws).await;
        assert_eq!(m["command"], "update");
    }
    // kill -9: no goodbye, no Leaving, its queue vanishes with its connection.
    pb.child.kill().unwrap();
    pb.child.wait().unwrap();
    // Three devices reconnect to the survivor and ack what they get; the fourth
    // never comes back.
    let mut acks = Vec::new();
    for (d, acc, _) in devs.iter().take(3) {
        let ws = a.device(*d, *acc).await;
        acks.push(acking(ws, 1));
    }
    let mut results = Vec::new();
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("no API call hangs")
            .unwrap();
        results.push(r);
    }
    for (i, (s, body, _)) in results.iter().take(3).enumerate() {
        assert_eq!(*s, 200, "device {i}: {body}");
        assert_eq!(body["status"], "acked");
    }
    let (s, body, took) = &results[3];
    assert!(
        *s == 504 || *s == 404,
        "the lost device ends with a clear answer: {s} {body}"
    );
    assert!(*took < Duration::from_secs(14), "{took:?}");
    for a in acks {
        let seen = a.await.unwrap();
        assert_eq!(seen[0]["command"], "update");
    }
    // The dead node is forgotten.
    let t0 = Instant::now();
    while a.metric("router_cluster_nodes").await != 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.metric("router_cluster_nodes_expired_total").await >= 1.0);
    drop(pa);
}

/// A node that starts late finds the devices of the nodes already running (they
/// register at their new homes when it joins), the directory holds each device once,
/// and a node that stops gracefully is forgotten at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_finds_earlier_devices_and_a_leaving_node_is_forgotten() {
    let vh = Vhost::new("hive-test");
    let a = node(&vh, "early");
    wait_ready(&a).await;
    let mut wss = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
        wss.push(a.device(d, acc).await);
        ids.push(d);
    }
    let b = node(&vh, "late");
    wait_ready(&b).await;
    for d in &ids {
        wait_owner(&b, *d, Some("early")).await;
    }
    // One entry per device across the cluster, split between the two homes.
    let entries = a.metric("router_cluster_directory_entries").await
        + b.metric("router_cluster_directory_entries").await;
    assert_eq!(entries, 20.0);
    assert!(b.metric("router_cluster_directory_entries").await >= 1.0);
    drop(wss);
    drop(a); // graceful stop: Leaving
    let t0 = Instant::now();
    while b.metric("router_cluster_nodes").await != 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "leaving node never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Forgotten because it said it was leaving, not found dead by the liveness probe
    // (which a loaded machine could make about as fast).
    assert_eq!(b.metric("router_cluster_nodes_left_total").await, 1.0);
    assert_eq!(b.metric("router_cluster_nodes_expired_total").await, 0.0);
    eprintln!(
        "a leaving node forgotten {:?} after its stop returned",
        t0.elapsed()
    );
    wait_owner(&b, ids[0], None).await;
}

/// A node that stops answering for longer than the suspicion time (SIGSTOP: no
/// heartbeats, nothing consumed) but whose broker connection lives is not a dead node:
/// the broker says its queue exists, so it is kept, and its devices are reachable
/// again as soon as it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_is_not_declared_dead_while_its_queue_exists() {
    let vh = Vhost::new("hive-test");
    let pa = Proc::start(&vh, "watcher", free_port(), free_port());
    let pb = Proc::start(&vh, "sleeper", free_port(), free_port());
    let (a, b) = (pa.as_router(), pb.as_router());
    wait_ready(&a).await;
    wait_ready(&b).await;
    let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
    let ws = b.device(d, acc).await;
    wait_owner(&a, d, Some("sleeper")).await;
    let pid = pb.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    // Silent for 3 s makes a suspect; stay stopped well past that (but under twice the
    // cluster connection's 5 s AMQP heartbeat, after which the broker drops it).
    let t0 = Instant::now();
    while a.metric("router_cluster_liveness_probes_alive_total").await < 1.0 {
        if t0.elapsed() > Duration::from_secs(7) {
            signal("-CONT");
            panic!("the stalled node was never probed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal("-CONT");
    assert_eq!(a.metric("router_cluster_nodes_expired_total").await, 0.0);
    assert_eq!(a.metric("router_cluster_nodes").await, 2.0);
    let dev = acking(ws, 1);
    let (s, body) = a.request(d, json!({"command":"awake"}), "").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(dev.await.unwrap()[0]["command"], "awake");
}

/// The broker closes a node's cluster connection (`rabbitmqctl close_connection`): it
/// reconnects, registers its devices again, its devices stay reachable from the other
/// node, and no device is known at two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_connection_the_broker_closes_comes_back_with_its_devices() {
    if !have_rabbitmqctl() {
        eprintln!("skipped: no rabbitmqctl on this machine");
        return;
    }
    let vh = Vhost::new("hive-test");
    let pa = Proc::start(&vh, "steady", free_port(), free_port());
    let pb = Proc::start(&vh, "bounced", free_port(), free_port());
    let (a, b) = (pa.as_router(), pb.as_router());
    wait_ready(&a).await;
    wait_ready(&b).await;
    let mut devs = Vec::new();
    for _ in 0..10 {
        let (d, acc) = (Uuid::new_v4(), Uuid::new_v4());
        devs.push((d, b.device(d, acc).await));
    }
    for (d, _) in &devs {
        wait_owner(&a, *d, Some("bounced")).await;
    }
    assert!(broker_close_connection("hive-router bounced cluster".into(), "cluster").await);
    let t0 = Instant::now();
    while b.metric("router_cluster_sessions_total").await < 2.0 || get(&b, "/readyz").await.0 != 200
    {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "node did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.metric("router_cluster_reregistered_total").await >= 10.0);
    for (d, ws) in devs.drain(..) {
        let dev = acking(ws, 1);
        let (s, body) = a.request(d, json!({"command":"still-there"}), "").await;
        assert_eq!(s, 200, "{body}");
        dev.await.unwrap();
    }
    // The claims sent again settle within a directory round or two (the requests above
    // may be served by the owner before its own claims are applied): each device is
    // then known exactly once.
    let t0 = Instant::now();
    loop {
        let entries = a.metric("router_cluster_directory_entries").await
            + b.metric("router_cluster_directory_entries").await;
        if entries == 10.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "each device known once: {entries} entries for 10 devices"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.metric("router_cluster_nodes_expired_total").await, 0.0);
}

/// Two deployments on one broker and vhost, with the same secret but another
/// `--cluster-name`, do not merge: each sees only itself, and the same device connected
/// to both is not evicted by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_on_one_vhost_do_not_merge() {
    let vh = Vhost::new("hive-two");
    let blue_p = Proc::start_with(
        &vh,
        "blue-1",
        free_port(),
        free_port(),
        &["--cluster-name", "blue"],
    );
    let green_p = Proc::start_with(
        &vh,
        "green-1",
        free_port(),
        free_port(),
        &["--cluster-name", "green"],
    );
    let (blue, green) = (blue_p.as_router(), green_p.as_router());
    wait_ready(&blue).await;
    wait_ready(&green).await;
    // Each has heard the other's heartbeats, and ignored them.
    let t0 = Instant::now();
    while blue.metric("router_cluster_envelopes_forged_total").await < 3.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no heartbeat of the other seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(blue.metric("router_cluster_nodes").await, 1.0);
    assert_eq!(green.metric("router_cluster_nodes").await, 1.0);
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());
    let mut on_blue = blue.device(d, a).await;
    let _on_green = green.device(d, a).await;
    let evicted = tokio::time::timeout(Duration::from_secs(2), close_code(&mut on_blue)).await;
    assert!(
        evicted.is_err(),
        "evicted by the other deployment: {evicted:?}"
    );
    drop((blue_p, green_p));
}
