//! Accounts (tenants): devices connected per account, in the cluster and here, and the
//! per-account limits (see `crate::tenants`).
//!
//! - `GET /v1/accounts/{account}`: `{account, connected, connected_here, limits}`
//! - `GET /v1/accounts?top=N`: the N accounts with the most devices connected (as this
//!   node knows the cluster: its own counts and its peers' largest accounts)

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, ApiState};

fn limits(st: &ApiState) -> serde_json::Value {
    let t = &st.shared.tenants;
    let opt = |v: u32| (v > 0).then_some(v);
    json!({"max_devices": opt(t.max_devices), "max_messages_per_s": opt(t.max_rate)})
}

pub(super) async fn one(
    State(st): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let account = Uuid::parse_str(&raw).map_err(|e| {
        ApiError::bad_request(
            &st.shared,
            "bad-account-id",
            format!("account id {raw:?} is not a UUID: {e}"),
        )
    })?;
    let (connected, here) = st.shared.tenants.connected(&account);
    // Messages/s of the account's devices on this node (the last whole second, summed
    // over the shards): measured where --account-max-rate keeps a bucket per account.
    let mut rate: Option<u64> = None;
    for s in &st.shared.shards {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if s.send(crate::shard::ShardMsg::AccountRate { account, reply: tx })
            .is_ok()
        {
            if let Ok(Some(n)) = rx.await {
                rate = Some(rate.unwrap_or(0) + u64::from(n));
            }
        }
    }
    Ok((
        StatusCode::OK,
        Json(json!({
            "account": account,
            "connected": connected,
            "connected_here": here,
            "messages_per_s_here": rate,
            "node": st.shared.node_id,
            "limits": limits(&st),
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct Top {
    top: Option<usize>,
}

pub(super) async fn top(State(st): State<ApiState>, Query(q): Query<Top>) -> Response {
    let n = q.top.unwrap_or(20).min(1000);
    let accounts: Vec<_> = st
        .shared
        .tenants
        .top(n)
        .into_iter()
        .map(|(a, c)| json!({"account": a, "connected": c}))
        .collect();
    (
        StatusCode::OK,
        Json(json!({"node": st.shared.node_id, "accounts": accounts, "limits": limits(&st)})),
    )
        .into_response()
}
