//! Revocation with the embedded bus: disconnect a device (4403), block it for a while
//! (refused 4401 `revoked`), revoke a token by its `jti`, withdraw entries, and keep them
//! across a restart of the router (`--data-dir`).

mod common;

use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

fn token_with_jti(device: Uuid, account: Uuid, jti: &str) -> String {
    let claims = json!({"sub": device.to_string(), "acc": account.to_string(),
        "exp": router::auth::unix_now() + 600, "jti": jti});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn outcome(r: &TestRouter, token: &str) -> Result<Ws, u16> {
    r.try_token(token).await
}

async fn post(r: &TestRouter, path: &str, body: Value) -> (u16, Value) {
    let res = r
        .http
        .post(format!("{}{path}", r.api))
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_block_revoke_and_keep_them_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("hive-data-{}", Uuid::new_v4()));
    let start = || {
        let dir = dir.clone();
        TestRouter::start_with(move |c| c.data_dir = Some(dir))
    };
    let r = start();
    let (d, a) = (Uuid::new_v4(), Uuid::new_v4());

    // A plain disconnect: closed with 4403, may come back at once.
    let mut ws = r.device(d, a).await;
    let (s, v) = post(&r, &format!("/v1/devices/{d}/disconnect"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["blocked_until"], Value::Null);
    assert_eq!(close_code(&mut ws).await, 4403);
    let _back = r.device(d, a).await;

    // Blocked for a minute: closed, and refused while the block lasts.
    let (s, v) = post(
        &r,
        &format!("/v1/devices/{d}/disconnect"),
        json!({"block_for_s": 60}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["blocked_until"].as_u64().unwrap() > router::auth::unix_now());
    assert_eq!(outcome(&r, &r.token(d, a)).await.err(), Some(4401));
    // A revoked token id: that token refused, another of the same device accepted.
    let (other, a2) = (Uuid::new_v4(), Uuid::new_v4());
    let (s, v) = post(&r, "/v1/denylist", json!({"jti": "stolen-1", "for_s": 600})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        outcome(&r, &token_with_jti(other, a2, "stolen-1"))
            .await
            .err(),
        Some(4401)
    );
    assert!(outcome(&r, &token_with_jti(other, a2, "fresh-2"))
        .await
        .is_ok());
    assert!(
        r.metric("router_auth_failures_total{reason=\"revoked\"}")
            .await
            >= 2.0
    );
    assert_eq!(r.metric("router_denylist_entries").await, 2.0);
    let list: Value = r
        .http
        .get(format!("{}/v1/denylist", r.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["count"], 2, "{list}");
    // Bad input: a clear 400 each.
    for body in [
        json!({"jti": "x", "for_s": 0}),
        json!({"device": "nope", "for_s": 5}),
        json!({"for_s": 5}),
    ] {
        let (s, v) = post(&r, "/v1/denylist", body).await;
        assert_eq!(s, 400, "{v}");
    }
    let (s, _) = post(
        &r,
        &format!("/v1/devices/{d}/disconnect"),
        json!({"block_for_s": 99_999_999}),
    )
    .await;
    assert_eq!(s, 400);

    // The router restarts on the same --data-dir: both entries still hold.
    drop(r);
    let r = start();
    assert_eq!(outcome(&r, &r.token(d, a)).await.err(), Some(4401));
    assert_eq!(
        outcome(&r, &token_with_jti(other, a2, "stolen-1"))
            .await
            .err(),
        Some(4401)
    );
    // Withdrawn: the device and the token are accepted again.
    let del = |p: String| r.http.delete(format!("{}{p}", r.api)).send();
    assert_eq!(
        del(format!("/v1/denylist/device/{d}"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        del("/v1/denylist/jti/stolen-1".into())
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(outcome(&r, &r.token(d, a)).await.is_ok());
    assert!(outcome(&r, &token_with_jti(other, a2, "stolen-1"))
        .await
        .is_ok());
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
}
