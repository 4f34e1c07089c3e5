//! Backend delivery, the HTTP side: the configuration check, batches of held deliveries
//! as one JSON array, one POST of a batch, and what a failed POST counts and logs.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use lapin::types::ShortString;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use super::{Delivery, Held, WARN_EVERY};
use crate::config::ServeConfig;
use crate::redact_url as redact;

/// Refuse at startup a configuration that can never deliver.
pub(crate) fn check_config(url: &str, config: &ServeConfig) -> anyhow::Result<()> {
    if config.amqp.is_none() {
        anyhow::bail!(
            "--backend-url needs --amqp: backend delivery consumes the device events from \
             RabbitMQ (exchange hive.events), so it cannot run with the embedded bus"
        );
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("--backend-url {}: {e}", redact(url)))?;
    match parsed.scheme() {
        "http" | "https" => {}
        s => anyhow::bail!("--backend-url: scheme {s}: http:// or https://"),
    }
    if let Some(path) = &config.backend_ca {
        backend_ca(path)?;
    }
    if config.backend_queue.is_empty() || ShortString::try_new(&*config.backend_queue).is_err() {
        anyhow::bail!("--backend-queue: must be 1 to 255 bytes");
    }
    if config.backend_bindings.is_empty()
        || config
            .backend_bindings
            .iter()
            .any(|k| ShortString::try_new(k.as_str()).is_err())
    {
        anyhow::bail!("--backend-bindings: one or more routing keys of at most 255 bytes");
    }
    if let Some(t) = &config.backend_token {
        if HeaderValue::from_str(&format!("Bearer {t}")).is_err() {
            anyhow::bail!("--backend-token: not a valid HTTP header value");
        }
    }
    Ok(())
}

/// The certificates of `--backend-ca` (PEM), refused at startup if there are none.
pub(crate) fn backend_ca(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("--backend-ca {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| anyhow::anyhow!("--backend-ca {}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("--backend-ca {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// The batch being POSTed (or waiting to be POSTed again).
pub(super) struct Batch {
    pub(super) last_tag: u64,
    pub(super) count: usize,
    pub(super) body: Bytes,
    /// Failed POSTs of this batch so far.
    pub(super) failures: u32,
}

/// How one POST ended.
pub(super) enum Post {
    Ok,
    Status(reqwest::StatusCode, String),
    Timeout,
    /// The TLS handshake failed (the backend's certificate is not trusted, expired, or
    /// for another name).
    Tls(String),
    Error(String),
}

pub(super) type PostFuture = Pin<Box<dyn Future<Output = Post>>>;

impl Delivery {
    /// One POST of a batch body (the client's timeout bounds all of it).
    pub(super) fn post(&self, body: Bytes) -> PostFuture {
        let mut req = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let shared = self.shared.clone();
        Box::pin(async move {
            let t0 = Instant::now();
            let out = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    // Read the answer to the end so the connection can be reused.
                    match resp.bytes().await {
                        Ok(_) if status.is_success() => Post::Ok,
                        Ok(text) => {
                            let text = String::from_utf8_lossy(&text[..text.len().min(200)]);
                            Post::Status(status, text.into_owned())
                        }
                        Err(e) if e.is_timeout() => Post::Timeout,
                        Err(e) => Post::Error(e.to_string()),
                    }
                }
                Err(e) if e.is_timeout() => Post::Timeout,
                Err(e) => {
                    let chain = error_chain(&e);
                    if is_tls_failure(&chain) {
                        Post::Tls(chain)
                    } else {
                        Post::Error(chain)
                    }
                }
            };
            let us = t0.elapsed().as_micros() as u64;
            shared.metrics.backend.post_latency.record_us(us);
            out
        })
    }

    /// Count a failed POST and warn about it, at most once per [`WARN_EVERY`].
    pub(super) fn failed(&mut self, post: Post, failures: u32) {
        let m = self.m();
        m.batches_failed.fetch_add(1, Relaxed);
        match &post {
            Post::Status(..) => m.failures_status.fetch_add(1, Relaxed),
            Post::Timeout => m.failures_timeout.fetch_add(1, Relaxed),
            Post::Tls(_) => m.failures_tls.fetch_add(1, Relaxed),
            Post::Error(_) | Post::Ok => m.failures_error.fetch_add(1, Relaxed),
        };
        if self.last_warn.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        self.last_warn = Some(Instant::now());
        let suppressed = std::mem::take(&mut self.suppressed);
        let backend = redact(&self.url);
        match post {
            Post::Status(status, body)
                if status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS =>
            {
                tracing::warn!(
                    %backend, status = status.as_u16(), %body, failures, suppressed,
                    "backend refuses a batch of events; retrying it (events are never dropped): \
                     the backend needs fixing"
                );
            }
            Post::Status(status, _) => tracing::warn!(
                %backend, status = status.as_u16(), failures, suppressed,
                "backend failed a batch of events; retrying with backoff"
            ),
            Post::Timeout => tracing::warn!(
                %backend, failures, suppressed,
                "backend POST timed out; retrying with backoff"
            ),
            Post::Tls(error) => tracing::warn!(
                %backend, %error, failures, suppressed,
                "backend TLS handshake failed (is its certificate signed by the system roots or \
                 --backend-ca, valid, and for this host name?); events are kept and retried"
            ),
            Post::Error(error) => tracing::warn!(
                %backend, %error, failures, suppressed,
                "backend POST failed; retrying with backoff"
            ),
            Post::Ok => {}
        }
    }
}

/// The oldest held deliveries, up to `max`, as one JSON array of their bodies.
pub(super) fn take_batch(pending: &mut VecDeque<Held>, max: usize) -> Batch {
    let n = pending.len().min(max);
    let len: usize = pending.iter().take(n).map(|h| h.body.len() + 1).sum();
    let mut body = Vec::with_capacity(len + 2);
    body.push(b'[');
    let mut last_tag = 0;
    for (i, h) in pending.drain(..n).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&h.body);
        last_tag = h.tag;
    }
    body.push(b']');
    Batch {
        last_tag,
        count: n,
        body: body.into(),
        failures: 0,
    }
}

/// Whether a connection error's chain says the TLS handshake failed.
fn is_tls_failure(chain: &str) -> bool {
    let c = chain.to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "unknownissuer",
        "notvalidforname",
    ]
    .iter()
    .any(|w| c.contains(w))
}

/// The error and its sources, one line (reqwest's Display alone hides the cause).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let mut c = ServeConfig::for_tests("s");
        let url = "http://127.0.0.1:9/events";
        let e = check_config(url, &c).unwrap_err().to_string();
        assert!(e.contains("--backend-url needs --amqp"), "{e}");
        c.amqp = Some("amqp://guest:guest@127.0.0.1:5672/%2f".into());
        assert!(check_config(url, &c).is_ok());
        assert!(check_config("https://h/", &c).is_ok());
        assert!(check_config("ftp://h/", &c).is_err());
        assert!(check_config("not a url", &c).is_err());
        c.backend_bindings.clear();
        assert!(check_config(url, &c).is_err());
        assert_eq!(
            redact("http://user:secret@host:80/x"),
            "http://user:***@host:80/x",
            "no password in logs"
        );
    }

    #[test]
    fn a_batch_is_a_json_array_of_the_bodies_in_order() {
        let now = tokio::time::Instant::now();
        let mut pending: VecDeque<Held> = [(1, r#"{"a":1}"#), (2, r#"{"b":[2]}"#), (3, "{}")]
            .into_iter()
            .map(|(tag, b)| Held {
                tag,
                body: b.as_bytes().to_vec(),
                at: now,
            })
            .collect();
        let b = take_batch(&mut pending, 2);
        assert_eq!(&b.body[..], br#"[{"a":1},{"b":[2]}]"#);
        assert_eq!((b.last_tag, b.count), (2, 2));
        let b = take_batch(&mut pending, 2);
        assert_eq!(&b.body[..], b"[{}]");
        assert_eq!((b.last_tag, b.count, pending.len()), (3, 1, 0));
    }
}
