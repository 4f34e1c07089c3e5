//! Counters and gauges, rendered as Prometheus text. Each shard writes only its own
//! cache-line-padded block (relaxed atomics, no contention); `/metrics` sums or labels.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::auth::AuthError;
use crate::protocol::hive::HiveError;
use crate::protocol::ws::CloseCode;

#[derive(Default)]
#[repr(align(128))]
pub(crate) struct ShardMetrics {
    pub(crate) connections: AtomicI64,
    pub(crate) handshakes: AtomicI64,
    pub(crate) accepted: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) handoffs: AtomicU64,
    pub(crate) takeovers: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) events_published: AtomicU64,
    pub(crate) events_dropped_bus_full: AtomicU64,
    pub(crate) bus_backpressure: AtomicU64,
    pub(crate) events_dropped_slow_device: AtomicU64,
    pub(crate) alive_events: AtomicU64,
    pub(crate) acks_unmatched: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    /// Devices closed (1008) because what they asked for (replies, errors, pongs)
    /// would have queued past --max-outbound.
    pub(crate) outbound_overflow: AtomicU64,
    pub(crate) refused_ip_rate: AtomicU64,
    /// Connections closed for a missing or invalid PROXY protocol header.
    pub(crate) proxy_refused: AtomicU64,
    pub(crate) refused_max_connections: AtomicU64,
    pub(crate) refused_draining: AtomicU64,
    /// Refused for --max-unauthenticated / --max-unauthenticated-per-ip.
    pub(crate) refused_unauthenticated: AtomicU64,
    pub(crate) refused_unauthenticated_ip: AtomicU64,
    auth_failures: [AtomicU64; AuthError::ALL.len()],
    pub(crate) protocol_errors: [AtomicU64; 5],
    phoenix_errors: [AtomicU64; crate::protocol::phoenix::ERROR_CODES.len()],
    hivekit_errors: [AtomicU64; crate::protocol::hivekit::ERROR_CODES.len()],
    /// Close frames sent, by code, in the order of [`CloseCode::NAMED`].
    pub(crate) closes: [AtomicU64; CloseCode::NAMED.len()],
    /// Close frames sent with any other code (answers to a device's own).
    closes_other: AtomicU64,
    /// Close handshakes a device started (its close frame, answered).
    pub(crate) peer_closes: AtomicU64,
}

impl ShardMetrics {
    /// Count a close frame sent: every code, a named one under its own label, any
    /// other under "other".
    pub(crate) fn close(&self, code: CloseCode) {
        match code.named_index() {
            Some(i) => self.closes[i].fetch_add(1, Relaxed),
            None => self.closes_other.fetch_add(1, Relaxed),
        };
    }
    /// Count a Phoenix or Hivekit frame error under its code.
    pub(crate) fn adapter_error(&self, protocol: crate::shard::Protocol, code: &str) {
        use crate::protocol::{hivekit, phoenix};
        let (codes, counters): (&[&str], &[AtomicU64]) = match protocol {
            crate::shard::Protocol::Phoenix(_) => (&phoenix::ERROR_CODES, &self.phoenix_errors),
            crate::shard::Protocol::Hivekit => (&hivekit::ERROR_CODES, &self.hivekit_errors),
            crate::shard::Protocol::Hive | crate::shard::Protocol::ConformanceEcho => return,
        };
        if let Some(i) = codes.iter().position(|c| *c == code) {
            counters[i].fetch_add(1, Relaxed);
        }
    }
    pub(crate) fn auth_failure(&self, e: AuthError) {
        self.auth_failures[e.index()].fetch_add(1, Relaxed);
    }
}

/// One unit of a gauge while it is held: counted up when made, down when dropped.
pub(crate) struct GaugeHold<'a>(&'a AtomicI64);

impl<'a> GaugeHold<'a> {
    pub(crate) fn new(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Relaxed);
        GaugeHold(gauge)
    }
}

impl Drop for GaugeHold<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Ack latency buckets, seconds (upper bounds).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

#[derive(Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn record_us(&self, us: u64) {
        let secs = us as f64 / 1e6;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub(crate) struct ApiMetrics {
    pub(crate) requests_sent: AtomicU64,
    pub(crate) requests_acked: AtomicU64,
    pub(crate) requests_responded: AtomicU64,
    pub(crate) requests_timed_out: AtomicU64,
    pub(crate) requests_offline: AtomicU64,
    pub(crate) requests_rejected: AtomicU64,
    pub(crate) events_to_devices: AtomicU64,
    pub(crate) events_to_devices_offline: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) shard_queue_full: AtomicU64,
    pub(crate) bus_events: AtomicU64,
    pub(crate) sse_subscribers: AtomicI64,
    pub(crate) sse_lagged: AtomicU64,
    /// Requests refused (429) for --max-pending.
    pub(crate) requests_pending_refused: AtomicU64,
    /// API connections or calls refused, by reason (router_api_refused_total).
    pub(crate) refused_connections: AtomicU64,
    pub(crate) header_timeouts: AtomicU64,
    pub(crate) refused_origin: AtomicU64,
    pub(crate) refused_host: AtomicU64,
    pub(crate) refused_media_type: AtomicU64,
    pub(crate) refused_sse: AtomicU64,
    pub(crate) ack_latency: Histogram,
    pub(crate) response_latency: Histogram,
}

/// The RabbitMQ bridge (`--amqp`): written only by the bridge thread.
#[derive(Default)]
pub struct BridgeMetrics {
    /// basic.publish calls sent, retries included.
    pub(crate) published: AtomicU64,
    pub confirmed: AtomicU64,
    pub(crate) nacked: AtomicU64,
    /// Events sent again after a nack or a lost connection.
    pub(crate) retried: AtomicU64,
    /// Events waiting for the broker (not yet published).
    pub(crate) buffered: AtomicI64,
    /// Events published and not yet confirmed.
    pub(crate) unconfirmed: AtomicI64,
    pub dropped_buffer_full: AtomicU64,
    pub dropped_shutdown: AtomicU64,
    pub(crate) dropped_bad_routing_key: AtomicU64,
    pub(crate) header_keys_skipped: AtomicU64,
    /// Top-level event fields the broker would read as instructions (CC, BCC, x-*).
    pub(crate) header_keys_reserved: AtomicU64,
    /// Events published without headers (body not a JSON object, or headers too large).
    pub(crate) headers_omitted: AtomicU64,
    pub(crate) connected: AtomicI64,
    pub(crate) connects: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
}

impl BridgeMetrics {
    fn render(&self, o: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 9] = [
            ("router_amqp_published_total", "basic.publish calls to hive.events, retries included.", &self.published),
            ("router_amqp_confirmed_total", "Events the broker confirmed (publisher confirms, ack).", &self.confirmed),
            ("router_amqp_nacked_total", "Events the broker nacked (then retried).", &self.nacked),
            ("router_amqp_retried_total", "Events published again after a nack or a lost connection.", &self.retried),
            ("router_amqp_header_keys_skipped_total", "Event fields left out of the AMQP headers: key longer than 255 bytes.", &self.header_keys_skipped),
            ("router_amqp_header_keys_reserved_total", "Top-level event fields left out of the AMQP headers because the broker reads them as instructions (CC, BCC, x-*); the body keeps them.", &self.header_keys_reserved),
            ("router_amqp_headers_omitted_total", "Events published without headers (not a JSON object, or headers larger than a frame).", &self.headers_omitted),
            ("router_amqp_reconnects_total", "Connections to RabbitMQ re-established after one was lost.", &self.reconnects),
            ("router_amqp_connect_failures_total", "Failed attempts to connect to RabbitMQ and declare the topology.", &self.connect_failures),
        ];
        for (name, help, v) in counters {
            counter(o, name, help, v.load(Relaxed));
        }
        counter_by(
            o,
            "router_amqp_dropped_total",
            "Device events the bridge dropped, by reason (buffer_full: oldest dropped while the broker was away).",
            "reason",
            [
                ("buffer_full", &self.dropped_buffer_full),
                ("shutdown", &self.dropped_shutdown),
                ("bad_routing_key", &self.dropped_bad_routing_key),
            ]
            .map(|(reason, v)| (reason, v.load(Relaxed))),
        );
        for (name, help, v) in [
            (
                "router_amqp_buffered_events",
                "Device events waiting for the broker (bounded by --amqp-buffer).",
                &self.buffered,
            ),
            (
                "router_amqp_unconfirmed_events",
                "Events published and not yet confirmed (bounded by --amqp-confirm-window).",
                &self.unconfirmed,
            ),
            (
                "router_amqp_connected",
                "1 while the bridge holds a connection to RabbitMQ with its topology declared.",
                &self.connected,
            ),
        ] {
            gauge(o, name, help, v.load(Relaxed));
        }
    }
}

/// Backend delivery (`--backend-url`): written only by the backend delivery thread.
#[derive(Default)]
pub(crate) struct BackendMetrics {
    /// Events in batches the backend answered with a 2xx (then acked to RabbitMQ).
    pub(crate) delivered: AtomicU64,
    pub(crate) batches_ok: AtomicU64,
    pub(crate) batches_failed: AtomicU64,
    pub(crate) failures_status: AtomicU64,
    pub(crate) failures_error: AtomicU64,
    pub(crate) failures_timeout: AtomicU64,
    pub(crate) failures_tls: AtomicU64,
    /// Messages ready in the backend queue (passive queue.declare, every second).
    pub(crate) backlog: AtomicI64,
    /// Deliveries received from RabbitMQ and not yet acked.
    pub(crate) unacked: AtomicI64,
    pub(crate) connected: AtomicI64,
    pub(crate) post_latency: Histogram,
}

impl BackendMetrics {
    fn render(&self, o: &mut String) {
        counter(
            o,
            "router_backend_events_delivered_total",
            "Device events the backend accepted (2xx), then acked to RabbitMQ.",
            self.delivered.load(Relaxed),
        );
        counter_by(
            o,
            "router_backend_batches_total",
            "POSTs of a batch to the backend, by result (failed ones are retried).",
            "result",
            [("ok", &self.batches_ok), ("failed", &self.batches_failed)]
                .map(|(result, v)| (result, v.load(Relaxed))),
        );
        counter_by(
            o,
            "router_backend_post_failures_total",
            "Failed POSTs to the backend, by reason (status: non-2xx answer).",
            "reason",
            [
                ("status", &self.failures_status),
                ("error", &self.failures_error),
                ("timeout", &self.failures_timeout),
                ("tls", &self.failures_tls),
            ]
            .map(|(reason, v)| (reason, v.load(Relaxed))),
        );
        for (name, help, v) in [
            (
                "router_backend_backlog",
                "Messages ready in the backend queue (passive queue.declare every second).",
                &self.backlog,
            ),
            (
                "router_backend_unacked",
                "Deliveries this router holds from the backend queue, not yet acked.",
                &self.unacked,
            ),
            (
                "router_backend_connected",
                "1 while backend delivery holds its own connection to RabbitMQ and consumes.",
                &self.connected,
            ),
        ] {
            gauge(o, name, help, v.load(Relaxed));
        }
        self.post_latency.render(
            "router_backend_post_latency_seconds",
            "Duration of each POST to the backend, any outcome.",
            o,
        );
    }
}

pub struct Metrics {
    pub(crate) shards: Vec<ShardMetrics>,
    pub(crate) api: ApiMetrics,
    pub bridge: BridgeMetrics,
    pub(crate) backend: BackendMetrics,
    /// Device sockets open in this process (handshaking or authenticated).
    pub(crate) open_connections: AtomicI64,
}

impl Metrics {
    pub(crate) fn new(shards: usize) -> Self {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            api: ApiMetrics::default(),
            bridge: BridgeMetrics::default(),
            backend: BackendMetrics::default(),
            open_connections: AtomicI64::new(0),
        }
    }

    fn sum(&self, f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
    }

    /// Prometheus text exposition of everything, one group of families after another
    /// (always in this order).
    pub(crate) fn render(&self, node: &str) -> String {
        let mut o = String::with_capacity(8192);
        let _ = writeln!(o, "# HELP router_info Static facts about this router process.\n# TYPE router_info gauge\nrouter_info{{node=\"{node}\",version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        self.render_shard_gauges(&mut o);
        self.render_device_traffic(&mut o);
        self.render_api(&mut o);
        self.render_drops_and_refusals(&mut o);
        self.render_errors(&mut o);
        self.render_closes(&mut o);
        self.render_latencies(&mut o);
        self.bridge.render(&mut o);
        self.backend.render(&mut o);
        render_process(&mut o);
        o
    }

    /// Connections and handshakes, one series per shard.
    fn render_shard_gauges(&self, o: &mut String) {
        gauge_per_shard(
            o,
            "router_connections",
            "Authenticated device connections owned by each shard.",
            &self.shards,
            |s| s.connections.load(Relaxed),
        );
        gauge_per_shard(
            o,
            "router_handshakes_in_progress",
            "Connections accepted but not yet authenticated, per shard.",
            &self.shards,
            |s| s.handshakes.load(Relaxed),
        );
    }

    /// What the devices did: connections, frames, bytes, events (summed over shards).
    fn render_device_traffic(&self, o: &mut String) {
        let counters: [(&str, &str, u64); 13] = [
            ("router_connections_accepted_total", "TCP connections accepted.", self.sum(|s| &s.accepted)),
            ("router_handshake_failures_total", "Connections that failed the HTTP upgrade (bad request, wrong path, I/O error).", self.sum(|s| &s.handshake_failures)),
            ("router_bus_backpressure_total", "Times a shard paused reading its devices because the event queue to the bus was nearly full (TCP pushes back instead of events being dropped).", self.sum(|s| &s.bus_backpressure)),
            ("router_handoffs_total", "Authenticated sockets handed to the shard that owns the device.", self.sum(|s| &s.handoffs)),
            ("router_takeovers_total", "Older connections closed because the same device connected again (4409).", self.sum(|s| &s.takeovers)),
            ("router_disconnects_total", "Authenticated connections that ended, for any reason.", self.sum(|s| &s.disconnects)),
            ("router_frames_in_total", "WebSocket frames received from devices.", self.sum(|s| &s.frames_in)),
            ("router_frames_out_total", "WebSocket frames sent to devices.", self.sum(|s| &s.frames_out)),
            ("router_bytes_in_total", "Bytes received from devices (WebSocket payload and headers).", self.sum(|s| &s.bytes_in)),
            ("router_bytes_out_total", "Bytes sent to devices.", self.sum(|s| &s.bytes_out)),
            ("router_events_published_total", "Device events handed to the bus (including device-alive).", self.sum(|s| &s.events_published)),
            ("router_device_alive_events_total", "device-alive events produced by pongs.", self.sum(|s| &s.alive_events)),
            ("router_acks_unmatched_total", "Acks or responses for no pending request of that device (late, duplicate or foreign).", self.sum(|s| &s.acks_unmatched)),
        ];
        for (name, help, v) in counters {
            counter(o, name, help, v);
        }
    }

    /// The HTTP API: requests and events to devices, refusals, SSE subscribers.
    fn render_api(&self, o: &mut String) {
        let api = &self.api;
        let counters: [(&str, &str, &AtomicU64); 13] = [
            (
                "router_requests_sent_total",
                "Requests from the API delivered to a device.",
                &api.requests_sent,
            ),
            (
                "router_requests_acked_total",
                "Requests acked by the device.",
                &api.requests_acked,
            ),
            (
                "router_requests_timed_out_total",
                "Requests with no ack (or response) within their timeout (HTTP 504).",
                &api.requests_timed_out,
            ),
            (
                "router_requests_responded_total",
                "Requests answered with a device response.",
                &api.requests_responded,
            ),
            (
                "router_requests_offline_total",
                "Requests for a device not connected (HTTP 404).",
                &api.requests_offline,
            ),
            (
                "router_requests_rejected_total",
                "Requests refused because the device's outbound queue was full (HTTP 503).",
                &api.requests_rejected,
            ),
            (
                "router_requests_pending_refused_total",
                "Requests refused (HTTP 429) because the device had --max-pending requests waiting already.",
                &api.requests_pending_refused,
            ),
            (
                "router_api_events_sent_total",
                "Events from the API delivered to a device.",
                &api.events_to_devices,
            ),
            (
                "router_api_events_offline_total",
                "Events from the API for a device not connected (HTTP 404).",
                &api.events_to_devices_offline,
            ),
            (
                "router_api_bad_requests_total",
                "API calls refused with 400 (bad UUID, bad JSON).",
                &api.bad_requests,
            ),
            (
                "router_shard_queue_full_total",
                "API calls refused because a shard inbox was full (HTTP 503).",
                &api.shard_queue_full,
            ),
            (
                "router_bus_events_total",
                "Device events the embedded bus delivered to its sink.",
                &api.bus_events,
            ),
            (
                "router_sse_lagged_total",
                "Events a slow /v1/events subscriber missed.",
                &api.sse_lagged,
            ),
        ];
        for (name, help, v) in counters {
            counter(o, name, help, v.load(Relaxed));
        }
        gauge(
            o,
            "router_sse_subscribers",
            "Open /v1/events streams.",
            api.sse_subscribers.load(Relaxed),
        );
        counter_by(
            o,
            "router_api_refused_total",
            "API connections and calls refused, by reason: over --api-max-connections (503), request headers not in within 10 s (closed), a foreign Origin or Host (403), a POST body not JSON (415), over --max-sse-subscribers (503).",
            "reason",
            [
                ("connections", &api.refused_connections),
                ("header_timeout", &api.header_timeouts),
                ("origin", &api.refused_origin),
                ("host", &api.refused_host),
                ("media_type", &api.refused_media_type),
                ("sse_subscribers", &api.refused_sse),
            ]
            .map(|(reason, v)| (reason, v.load(Relaxed))),
        );
    }

    /// Events dropped, and connections or messages refused (with the open-socket gauge
    /// --max-connections caps).
    fn render_drops_and_refusals(&self, o: &mut String) {
        counter_by(
            o,
            "router_events_dropped_total",
            "Device events dropped, by reason.",
            "reason",
            [
                ("bus_full", self.sum(|s| &s.events_dropped_bus_full)),
                ("slow_device", self.sum(|s| &s.events_dropped_slow_device)),
            ],
        );
        gauge(
            o,
            "router_open_connections",
            "Device sockets open in this process, handshaking or authenticated (capped by --max-connections).",
            self.open_connections.load(Relaxed),
        );
        let counters: [(&str, &str, u64); 5] = [
            ("router_tls_handshake_failures_total", "TLS handshakes that failed (bad client certificate, protocol error, not TLS).", self.sum(|s| &s.tls_failures)),
            ("router_rate_limited_total", "Device messages refused by the per-device rate limit (answered rate-limited).", self.sum(|s| &s.rate_limited)),
            ("router_proxy_protocol_refused_total", "Connections closed because the PROXY protocol header --proxy-protocol requires was missing, invalid or late.", self.sum(|s| &s.proxy_refused)),
            ("router_outbound_overflow_total", "Devices closed with 1008 because the replies, errors or pongs they asked for would have queued past --max-outbound (a device that does not read).", self.sum(|s| &s.outbound_overflow)),
            ("router_api_unauthorized_total", "API calls refused with 401 (missing or wrong --api-token).", self.api.unauthorized.load(Relaxed)),
        ];
        for (name, help, v) in counters {
            counter(o, name, help, v);
        }
        counter_by(
            o,
            "router_connections_refused_total",
            "Connections refused before the upgrade, by reason.",
            "reason",
            [
                ("ip_rate", self.sum(|s| &s.refused_ip_rate)),
                ("max_connections", self.sum(|s| &s.refused_max_connections)),
                ("draining", self.sum(|s| &s.refused_draining)),
                ("unauthenticated", self.sum(|s| &s.refused_unauthenticated)),
                (
                    "unauthenticated_ip",
                    self.sum(|s| &s.refused_unauthenticated_ip),
                ),
            ],
        );
    }

    /// Refused authentications and device frames answered with an error, by code.
    fn render_errors(&self, o: &mut String) {
        counter_by(
            o,
            "router_auth_failures_total",
            "Refused authentications, by reason.",
            "reason",
            AuthError::ALL.map(|e| (e.label(), self.sum(|s| &s.auth_failures[e.index()]))),
        );
        counter_by(
            o,
            "router_protocol_errors_total",
            "Device frames answered with an error message, by code.",
            "code",
            HiveError::ALL.map(|e| (e.code(), self.sum(|s| &s.protocol_errors[e.index()]))),
        );
        const HELP: &str = "Refused or malformed frames of this protocol, by code.";
        let phoenix = &crate::protocol::phoenix::ERROR_CODES;
        let hivekit = &crate::protocol::hivekit::ERROR_CODES;
        counter_by(
            o,
            "router_phoenix_errors_total",
            HELP,
            "code",
            (0..phoenix.len()).map(|i| (phoenix[i], self.sum(|s| &s.phoenix_errors[i]))),
        );
        counter_by(
            o,
            "router_hivekit_errors_total",
            HELP,
            "code",
            (0..hivekit.len()).map(|i| (hivekit[i], self.sum(|s| &s.hivekit_errors[i]))),
        );
    }

    /// Close frames sent (by code), and close handshakes devices started.
    fn render_closes(&self, o: &mut String) {
        counter_by(
            o,
            "router_closes_total",
            "WebSocket close frames sent by the router (its own, and its answers to a device's close), by close code.",
            "code",
            CloseCode::NAMED
                .iter()
                .enumerate()
                .map(|(i, code)| (code, self.sum(|s| &s.closes[i]))),
        );
        let other = self.sum(|s| &s.closes_other);
        let _ = writeln!(o, "router_closes_total{{code=\"other\"}} {other}");
        counter(
            o,
            "router_device_closes_total",
            "Close handshakes a device started (its close frame, answered by the router).",
            self.sum(|s| &s.peer_closes),
        );
    }

    /// Time from the API to a device's ack or response.
    fn render_latencies(&self, o: &mut String) {
        self.api.ack_latency.render(
            "router_ack_latency_seconds",
            "Time from a request entering the API to the device's ack.",
            o,
        );
        self.api.response_latency.render(
            "router_response_latency_seconds",
            "Time from a request entering the API to the device's response (?wait=response).",
            o,
        );
    }
}

/// The router process's memory and descriptors.
fn render_process(o: &mut String) {
    gauge(
        o,
        "router_process_resident_memory_bytes",
        "Resident set size of the router process.",
        process_rss_bytes(),
    );
    gauge(
        o,
        "router_process_open_fds",
        "Open file descriptors of the router process.",
        open_fds(),
    );
}

pub(crate) fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

pub(crate) fn gauge(o: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// One counter family with a series per value of `label`.
fn counter_by<L: std::fmt::Display>(
    o: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, v) in series {
        // Pieces rather than one format string: fewer formatting arguments per series.
        o.push_str(name);
        o.push('{');
        o.push_str(label);
        o.push_str("=\"");
        let _ = writeln!(o, "{value}\"}} {v}");
    }
}

fn gauge_per_shard(
    o: &mut String,
    name: &str,
    help: &str,
    shards: &[ShardMetrics],
    f: impl Fn(&ShardMetrics) -> i64,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {}", f(s));
    }
}

/// RSS from /proc/self/statm (pages), 0 if unreadable (e.g. at the open-file cap).
fn process_rss_bytes() -> u64 {
    let page = 4096u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}

/// Open descriptors, counted without opening /proc (which fails at the file cap):
/// fcntl probing is too slow, so read the directory and accept failure as 0.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_gauge_counts_until_dropped() {
        let g = AtomicI64::new(0);
        let a = GaugeHold::new(&g);
        let b = GaugeHold::new(&g);
        assert_eq!(g.load(Relaxed), 2);
        drop(a);
        assert_eq!(g.load(Relaxed), 1);
        drop(b);
        assert_eq!(g.load(Relaxed), 0);
    }

    #[test]
    fn every_close_code_is_counted() {
        let m = ShardMetrics::default();
        for c in CloseCode::NAMED {
            m.close(c);
        }
        m.close(CloseCode::Other(3000));
        m.close(CloseCode::Other(1000));
        assert!(m.closes.iter().all(|c| c.load(Relaxed) >= 1));
        assert_eq!(m.closes[0].load(Relaxed), 2);
        assert_eq!(m.closes_other.load(Relaxed), 1);
    }
}
