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
    Ok((
        StatusCode::OK,
        Json(json!({
            "account": account,
            "connected": connected,
            "connected_here": here,
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
