//! The backend-facing HTTP API ("Device Service"), SSE event stream and metrics.
//! Runs on a thread of its own (or, with one shard, on the shard's thread); reaches
//! devices only by messages to the owning shard.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cluster::route::{self, EventRouted, Routed};
use crate::metrics::ApiMetrics;
use crate::shard::{Delivery, RequestMsg, RequestReply, ShardHandle, ShardMsg};
use crate::Shared;

mod accounts;
pub(crate) mod guard;
mod revocation;
pub(crate) mod serve;

pub use serve::HEADER_TIMEOUT;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: Arc<crate::bus::sse::SseHub>,
    /// Origins and hosts the API answers (see [`guard`]).
    pub(crate) allowed: Arc<guard::Allowed>,
}

pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{device}", get(device_info))
        .route("/v1/devices/{device}/events", post(send_event))
        .route("/v1/devices/{device}/requests", post(send_request))
        .route(
            "/v1/devices/{device}/disconnect",
            post(revocation::disconnect),
        )
        .route("/v1/accounts", get(accounts::top))
        .route("/v1/accounts/{account}", get(accounts::one))
        .route("/v1/denylist", get(revocation::list).post(revocation::add))
        .route(
            "/v1/denylist/{kind}/{id}",
            axum::routing::delete(revocation::remove),
        )
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint")
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::json_bodies,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(state.clone(), json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::browsers,
        ))
        .with_state(state)
}

/// Largest request body the API reads.
pub const MAX_BODY: usize = 2 << 20;
/// A request body must have arrived whole within this (a client that starts a body and
/// never finishes it does not hold its connection and task for ever).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Read the request's body whole, within [`BODY_TIMEOUT`] and [`MAX_BODY`], before
/// any handler runs: 408 or 413, as JSON, otherwise.
async fn read_body(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, bytes.into())).await,
        Ok(Err(_)) => {
            st.shared.metrics.api.bad_requests.fetch_add(1, Relaxed);
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("request bodies are limited to {MAX_BODY} bytes"),
            )
            .into_response()
        }
        Err(_) => {
            st.shared.metrics.api.bad_requests.fetch_add(1, Relaxed);
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
            .into_response()
        }
    }
}

/// Every error the API answers is JSON `{error, message}`, also those the HTTP layer
/// makes itself (a query string that does not parse, a method a path does not take, a
/// body too large): their plain text becomes the message.
async fn json_errors(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    st.shared.metrics.api.bad_requests.fetch_add(1, Relaxed);
    let text = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::BAD_REQUEST => "bad-request",
        s if s.is_server_error() => "internal",
        _ => "bad-request",
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

/// With --api-token, every endpoint but the health probes needs `Authorization: Bearer T`.
/// The token is compared in constant time and never logged.
async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(want) = &st.shared.config.api_token {
        let open = matches!(req.uri().path(), "/healthz" | "/readyz");
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer_token);
        if !open && !given.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
            st.shared.metrics.api.unauthorized.fetch_add(1, Relaxed);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API token (Authorization: Bearer <token>)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A refused API call: its status and the JSON body `{error, message}` the client
/// gets. Handlers return it with `?`; axum turns it into the response.
struct ApiError {
    status: StatusCode,
    /// Stable, machine-readable: the body's `error`.
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 400, counted in `router_api_bad_requests_total`.
    fn bad_request(shared: &Shared, code: &'static str, message: impl Into<String>) -> Self {
        shared.metrics.api.bad_requests.fetch_add(1, Relaxed);
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 503 the caller may retry (`busy`).
    fn busy(message: &str) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
    }

    fn offline(device: &Uuid) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "offline",
            format!("device {device} is not connected"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

fn refuse_if_draining(shared: &Shared) -> Result<(), ApiError> {
    if shared.draining.load(Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this router is draining; use another node",
        ));
    }
    Ok(())
}

fn parse_device(shared: &Shared, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|e| {
        let message = format!("device id {raw:?} is not a UUID: {e}");
        ApiError::bad_request(shared, "bad-device-id", message)
    })
}

/// Send to the owning shard; a full inbox is a 503, not a wait.
fn to_shard(shared: &Shared, device: &Uuid, msg: ShardMsg) -> Result<(), ApiError> {
    ShardHandle::send_to_owner(&shared.shards, device, msg).map_err(|_| {
        shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
        ApiError::busy("the device's shard is overloaded; retry")
    })
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// `GET /v1/devices?limit=N`: up to N devices connected to this node (default 1000,
/// at most 100000), drawn evenly from its shards. For tools (loadgen targets the node
/// that holds a device) and operators.
async fn list_devices(State(st): State<ApiState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let shards = st.shared.shards.len();
    let per_shard = limit.div_ceil(shards.max(1));
    let mut waits = Vec::with_capacity(shards);
    for s in &st.shared.shards {
        let (tx, rx) = oneshot::channel();
        if s.send(ShardMsg::List {
            limit: per_shard,
            reply: tx,
        })
        .is_ok()
        {
            waits.push(rx);
        }
    }
    let mut devices = Vec::with_capacity(limit);
    for rx in waits {
        devices.extend(rx.await.unwrap_or_default());
    }
    devices.truncate(limit);
    (
        StatusCode::OK,
        Json(json!({ "node": st.shared.node_id, "count": devices.len(), "devices": devices })),
    )
        .into_response()
}

async fn device_info(
    State(st): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let device = parse_device(&st.shared, &raw)?;
    if let Some(c) = &st.shared.cluster {
        if !c.is_local(&device) {
            return match route::locate(&st.shared, device).await {
                Ok(Some(node)) => Ok((
                    StatusCode::OK,
                    Json(json!({ "device": device, "connected": true, "node": node })),
                )
                    .into_response()),
                Ok(None) => Err(ApiError::offline(&device)),
                Err(()) => Err(ApiError::busy(
                    "the cluster's broker connection is down; retry",
                )),
            };
        }
    }
    let (tx, rx) = oneshot::channel();
    to_shard(&st.shared, &device, ShardMsg::Lookup { device, reply: tx })?;
    match rx.await {
        Ok(Some(info)) => {
            let mut v = serde_json::to_value(&info).unwrap_or(Value::Null);
            v["node"] = Value::from(st.shared.node_id.clone());
            Ok((StatusCode::OK, Json(v)).into_response())
        }
        _ => Err(ApiError::offline(&device)),
    }
}

async fn send_event(
    State(st): State<ApiState>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    refuse_if_draining(&st.shared)?;
    let api = &st.shared.metrics.api;
    let device = parse_device(&st.shared, &raw)?;
    check_event_body(&st.shared, &body)?;
    // With --amqp the device may be on any node: the cluster finds it.
    let delivery = if st.shared.cluster.is_some() {
        match route::route_event(&st.shared, device, body.to_vec()).await {
            EventRouted::Sent(Some(node)) => {
                api.events_to_devices.fetch_add(1, Relaxed);
                let body = json!({ "device": device, "status": "sent", "node": node });
                return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
            }
            EventRouted::Sent(None) => Some(Delivery::Sent),
            EventRouted::Delivery(d) => Some(d),
            EventRouted::Busy => {
                return Err(ApiError::busy(
                    "the router is overloaded or its broker connection is down; retry",
                ))
            }
        }
    } else {
        let (tx, rx) = oneshot::channel();
        let msg = ShardMsg::Event {
            device,
            body: body.to_vec(),
            reply: tx,
        };
        to_shard(&st.shared, &device, msg)?;
        rx.await.ok()
    };
    event_answer(api, &device, delivery)
}

/// An event must be a JSON object.
fn check_event_body(shared: &Shared, body: &[u8]) -> Result<(), ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(_)) => Ok(()),
        Ok(_) => Err(ApiError::bad_request(
            shared,
            "bad-json",
            "the event must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            shared,
            "bad-json",
            format!("body is not valid JSON: {e}"),
        )),
    }
}

/// The answer to an event call, from what the device's connection did with it (None:
/// no answer from its shard).
fn event_answer(
    api: &ApiMetrics,
    device: &Uuid,
    delivery: Option<Delivery>,
) -> Result<Response, ApiError> {
    match delivery {
        Some(Delivery::Sent) => {
            api.events_to_devices.fetch_add(1, Relaxed);
            let body = json!({ "device": device, "status": "sent" });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Some(Delivery::NotJoined) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-joined",
            format!("device {device} is connected but has not joined its channel yet"),
        )),
        Some(Delivery::Full) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "slow-device",
            "the device's outbound queue is full; event dropped",
        )),
        Some(Delivery::Offline) | None => {
            api.events_to_devices_offline.fetch_add(1, Relaxed);
            Err(ApiError::offline(device))
        }
    }
}

#[derive(Deserialize)]
struct RequestBody {
    command: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RequestQuery {
    wait: Option<String>,
}

/// The longest timeout a caller may ask for.
const MAX_TIMEOUT_MS: u64 = 300_000;

/// A request call, checked: what to send the device and how long to wait for what.
struct RequestCall {
    command: String,
    /// The payload as JSON text (empty: none).
    payload: Vec<u8>,
    /// Wait for the device's response (`?wait=response`), not only its ack.
    wait_response: bool,
    timeout_ms: u64,
}

impl RequestCall {
    /// Refusals (400) in this order: `wait`, the body, the command, the timeout.
    fn parse(shared: &Shared, q: &RequestQuery, body: &[u8]) -> Result<Self, ApiError> {
        let wait_response = match q.wait.as_deref() {
            None | Some("ack") => false,
            Some("response") => true,
            Some(other) => {
                let message = format!("wait must be ack or response, not {other:?}");
                return Err(ApiError::bad_request(shared, "bad-wait", message));
            }
        };
        let req: RequestBody = serde_json::from_slice(body).map_err(|e| {
            let message = format!("body must be {{command, payload, timeout_ms?}}: {e}");
            ApiError::bad_request(shared, "bad-json", message)
        })?;
        if req.command.is_empty() {
            let message = "command must not be empty";
            return Err(ApiError::bad_request(shared, "bad-command", message));
        }
        let timeout_ms = req.timeout_ms.unwrap_or(shared.config.request_timeout_ms);
        if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            let message = format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS}, not {timeout_ms}");
            return Err(ApiError::bad_request(shared, "bad-timeout", message));
        }
        Ok(RequestCall {
            command: req.command,
            payload: req
                .payload
                .map(|p| p.get().as_bytes().to_vec())
                .unwrap_or_default(),
            wait_response,
            timeout_ms,
        })
    }
}

/// What the answer to a request call reports besides the device's reply.
struct Asked {
    device: Uuid,
    request: Uuid,
    started: Instant,
    wait_response: bool,
    timeout_ms: u64,
}

async fn send_request(
    State(st): State<ApiState>,
    Path(raw): Path<String>,
    Query(q): Query<RequestQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    refuse_if_draining(&st.shared)?;
    let started = Instant::now();
    let device = parse_device(&st.shared, &raw)?;
    let call = RequestCall::parse(&st.shared, &q, &body)?;
    let asked = Asked {
        device,
        request: Uuid::new_v4(),
        started,
        wait_response: call.wait_response,
        timeout_ms: call.timeout_ms,
    };
    let timeout = Duration::from_millis(call.timeout_ms);
    let (tx, rx) = oneshot::channel();
    let msg = RequestMsg {
        device,
        request: asked.request,
        command: call.command,
        payload: call.payload,
        wait_response: call.wait_response,
        deadline: started + timeout,
        reply: tx,
    };
    let reply = deliver_request(&st.shared, msg, rx, timeout).await?;
    request_answer(&st.shared.metrics.api, &asked, reply)
}

/// With --amqp the device may be on any node: the cluster routes the request (and
/// follows the device if it moves); otherwise straight to the owning shard. None: no
/// reply within the timeout (or the shard dropped the request as expired).
async fn deliver_request(
    shared: &Arc<Shared>,
    msg: RequestMsg,
    rx: oneshot::Receiver<RequestReply>,
    timeout: Duration,
) -> Result<Option<RequestReply>, ApiError> {
    if shared.cluster.is_some() {
        return match route::route_request(shared, msg).await {
            Routed::Reply(r) => Ok(Some(r)),
            Routed::TimedOut => Ok(None),
            Routed::Busy => {
                shared.metrics.api.shard_queue_full.fetch_add(1, Relaxed);
                Err(ApiError::busy(
                    "the router is overloaded or its broker connection is down; retry",
                ))
            }
        };
    }
    let device = msg.device;
    to_shard(shared, &device, ShardMsg::Request(Box::new(msg)))?;
    Ok(tokio::time::timeout(timeout, rx)
        .await
        .ok()
        .and_then(Result::ok))
}

/// The answer to a request call, from the device's reply (counted, with its latency).
fn request_answer(
    api: &ApiMetrics,
    asked: &Asked,
    reply: Option<RequestReply>,
) -> Result<Response, ApiError> {
    let Asked {
        device, request, ..
    } = asked;
    let latency = asked.started.elapsed();
    let latency_ms = latency.as_secs_f64() * 1e3;
    match reply {
        Some(RequestReply::Offline) => {
            api.requests_offline.fetch_add(1, Relaxed);
            Err(ApiError::offline(device))
        }
        Some(RequestReply::TooManyPending(max)) => {
            api.requests_pending_refused.fetch_add(1, Relaxed);
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-pending",
                format!(
                    "device {device} has {max} requests waiting for its answer already (--max-pending); retry later"
                ),
            ))
        }
        Some(RequestReply::Full) => {
            api.requests_rejected.fetch_add(1, Relaxed);
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "slow-device",
                "the device's outbound queue is full",
            ))
        }
        Some(RequestReply::Acked) => {
            api.requests_sent.fetch_add(1, Relaxed);
            api.requests_acked.fetch_add(1, Relaxed);
            api.ack_latency.record_us(latency.as_micros() as u64);
            let body = json!({ "request": request, "status": "acked", "latency_ms": latency_ms });
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        Some(RequestReply::Responded { ok, result }) => {
            api.requests_sent.fetch_add(1, Relaxed);
            api.requests_responded.fetch_add(1, Relaxed);
            api.response_latency.record_us(latency.as_micros() as u64);
            let result: Value = result
                .and_then(|r| serde_json::from_slice(&r).ok())
                .unwrap_or(Value::Null);
            let status = if ok { "ok" } else { "error" };
            let body = json!({ "request": request, "status": status, "latency_ms": latency_ms, "result": result });
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        // Timed out, or the shard dropped the request (expired): a 504 that names the
        // request.
        None => {
            api.requests_sent.fetch_add(1, Relaxed);
            api.requests_timed_out.fetch_add(1, Relaxed);
            let what = if asked.wait_response {
                "response"
            } else {
                "ack"
            };
            let message = format!(
                "no {what} from device {device} within {} ms",
                asked.timeout_ms
            );
            let body = json!({ "error": "timeout", "request": request, "message": message });
            Ok((StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response())
        }
    }
}

async fn events(State(st): State<ApiState>) -> Response {
    let shared = st.shared.clone();
    let max = i64::from(shared.config.max_sse_subscribers);
    let api = &shared.metrics.api;
    if api.sse_subscribers.fetch_add(1, Relaxed) >= max {
        api.sse_subscribers.fetch_sub(1, Relaxed);
        api.refused_sse.fetch_add(1, Relaxed);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-subscribers",
            format!("{max} /v1/events streams are open already (--max-sse-subscribers)"),
        )
        .into_response();
    }
    let guard = SubscriberGuard(shared.clone());
    let mut stop = shared.shutdown.subscribe();
    // Read from the ring only as fast as the client takes the events (the response
    // body is pulled when the socket has room): one that reads slowly or not at all
    // falls behind, misses events (counted) and holds nothing beyond the ring.
    let sub = st.sink.subscribe();
    let stream = futures_util::stream::unfold((sub, guard), |(mut sub, guard)| async move {
        let ev = match sub.recv().await {
            crate::bus::sse::Item::Event(body) => {
                SseEvent::default().data(String::from_utf8_lossy(&body))
            }
            // Counted (router_sse_lagged_total); the client sees a comment saying how
            // many it missed.
            crate::bus::sse::Item::Lagged(n) => {
                guard.0.metrics.api.sse_lagged.fetch_add(n, Relaxed);
                SseEvent::default().comment(format!("lagged {n}"))
            }
        };
        Some((Ok::<_, Infallible>(ev), (sub, guard)))
    });
    // The stream ends when the router stops, so a graceful shutdown is not held open.
    let stream = futures_util::StreamExt::take_until(stream, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct SubscriberGuard(Arc<Shared>);
impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.metrics.api.sse_subscribers.fetch_sub(1, Relaxed);
    }
}

async fn metrics(State(st): State<ApiState>) -> Response {
    let mut text = st.shared.metrics.render(&st.shared.node_id);
    if let Some(c) = &st.shared.cluster {
        c.render_metrics(&mut text);
    }
    st.shared.verifier.render_metrics(&mut text);
    crate::revocation::render_metrics(&st.shared.revocation, &mut text);
    crate::tenants::render_metrics(&st.shared.tenants, &mut text);
    {
        use std::fmt::Write;
        let name = "router_sse_buffered_bytes";
        let _ = writeln!(
            text,
            "# HELP {name} Bytes of device events held for /v1/events subscribers (bounded).\n# TYPE {name} gauge\n{name} {}",
            st.sink.buffered_bytes()
        );
        let name = "router_unauthenticated_connections";
        let _ = writeln!(
            text,
            "# HELP {name} Device connections not yet authenticated, within --max-unauthenticated.\n# TYPE {name} gauge\n{name} {}",
            st.shared.unauthenticated.held()
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn readyz(State(st): State<ApiState>) -> Response {
    if st.shared.ready.load(Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "starting or draining",
        )
        .into_response()
    }
}
