//! Revocation endpoints: disconnect a device wherever it is (optionally blocking it for
//! a while), and manage the deny-list of devices and token ids (see `crate::revocation`).
//!
//! - `POST /v1/devices/{device}/disconnect` `{"block_for_s": N}` (optional; 0..=2592000)
//! - `POST /v1/denylist` `{"device": UUID}` or `{"jti": ID}`, with `"for_s": N` (1..=2592000)
//! - `GET /v1/denylist`: the entries in force
//! - `DELETE /v1/denylist/device/{uuid}`, `DELETE /v1/denylist/jti/{id}`: withdraw one

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{parse_device, refuse_if_draining, ApiError, ApiState};
use crate::revocation::{self, Entry, Kind, MAX_BLOCK_SECS};

/// A body that may be empty (no options): `{}` then.
fn options<T: for<'de> Deserialize<'de> + Default>(
    st: &ApiState,
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            &st.shared,
            "bad-json",
            format!("the body does not parse: {e}"),
        )
    })
}

/// Add `e` for the whole deployment (confirmed by the broker, or stored) and apply it
/// here (a device it closes is closed now); 503 `not-stored` when it could not be kept.
async fn store(st: &ApiState, e: &Entry) -> Result<(), ApiError> {
    st.shared
        .revocation
        .add(e.clone())
        .await
        .map_err(|why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not-stored", why))?;
    revocation::arrived(&st.shared, e);
    Ok(())
}

fn entry_json(e: &Entry) -> serde_json::Value {
    json!({"kind": e.kind, "id": e.id, "until": e.until, "at": e.at})
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    #[serde(default)]
    block_for_s: u64,
}

/// Close the device's connection on whichever node holds it (4403), and with
/// `block_for_s` refuse it that long. Answered once every node will see it (the broker
/// confirmed the entry, or, embedded, it is stored).
pub(super) async fn disconnect(
    State(st): State<ApiState>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    refuse_if_draining(&st.shared)?;
    let device = parse_device(&st.shared, &raw)?;
    let o: Disconnect = options(&st, &body)?;
    if o.block_for_s > MAX_BLOCK_SECS {
        return Err(ApiError::bad_request(
            &st.shared,
            "bad-block",
            format!("block_for_s is at most {MAX_BLOCK_SECS}"),
        ));
    }
    let now = crate::auth::unix_now();
    let e = Entry {
        kind: Kind::Device,
        id: device.to_string(),
        until: now + o.block_for_s,
        at: now,
    };
    store(&st, &e).await?;
    let blocked = (o.block_for_s > 0).then_some(e.until);
    Ok((
        StatusCode::OK,
        Json(json!({"device": device, "status": "disconnecting", "blocked_until": blocked})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deny {
    device: Option<String>,
    jti: Option<String>,
    for_s: u64,
}

/// Add a device or a token id to the deny-list for `for_s` seconds.
pub(super) async fn add(State(st): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let d: Deny = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            &st.shared,
            "bad-json",
            format!("expected {{\"device\"|\"jti\", \"for_s\"}}: {e}"),
        )
    })?;
    if d.for_s == 0 || d.for_s > MAX_BLOCK_SECS {
        return Err(ApiError::bad_request(
            &st.shared,
            "bad-duration",
            format!("for_s is 1 to {MAX_BLOCK_SECS}"),
        ));
    }
    let (kind, id) = match (d.device, d.jti) {
        (Some(dev), None) => (Kind::Device, parse_device(&st.shared, &dev)?.to_string()),
        (None, Some(j)) if !j.is_empty() && j.len() <= 256 => (Kind::Jti, j),
        _ => {
            return Err(ApiError::bad_request(
                &st.shared,
                "bad-entry",
                "give one of device (a UUID) or jti (1 to 256 bytes)",
            ))
        }
    };
    let now = crate::auth::unix_now();
    let e = Entry {
        kind,
        id,
        until: now + d.for_s,
        at: now,
    };
    store(&st, &e).await?;
    Ok((StatusCode::CREATED, Json(entry_json(&e))).into_response())
}

pub(super) async fn list(State(st): State<ApiState>) -> Response {
    let entries: Vec<_> = st
        .shared
        .revocation
        .list(crate::auth::unix_now())
        .iter()
        .map(entry_json)
        .collect();
    (
        StatusCode::OK,
        Json(json!({"count": entries.len(), "entries": entries})),
    )
        .into_response()
}

/// Withdraw an entry (the device may connect again, the token is accepted again).
pub(super) async fn remove(
    State(st): State<ApiState>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kind = match kind.as_str() {
        "device" => Kind::Device,
        "jti" => Kind::Jti,
        _ => {
            return Err(ApiError::bad_request(
                &st.shared,
                "bad-kind",
                "the kind is device or jti",
            ))
        }
    };
    let id = if kind == Kind::Device {
        parse_device(&st.shared, &id)?.to_string()
    } else {
        id
    };
    let e = Entry {
        kind,
        id,
        until: 0,
        at: crate::auth::unix_now(),
    };
    store(&st, &e).await?;
    Ok((
        StatusCode::OK,
        Json(json!({"kind": e.kind, "id": e.id, "status": "withdrawn"})),
    )
        .into_response())
}
