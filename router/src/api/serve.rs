//! The API's accept loop: hyper's HTTP/1 connections with a deadline on request headers,
//! at most `--api-max-connections` of them at once (the next is answered 503 and
//! closed), so a flood of API sockets neither runs the process out of descriptors nor
//! holds them for ever.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Shared;

/// A request's headers must have arrived whole within this, counted from the moment
/// the connection waits for them (its first request, or the next on a kept-alive one):
/// a client that trickles them, or an idle connection, is closed then.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Kernel send buffer of an API socket: what a client that does not read (an SSE
/// subscriber) can hold in the kernel, beside the one event hyper holds for it.
const SEND_BUFFER: usize = 256 * 1024;

/// The answer to a connection over `--api-max-connections`, written without a task.
const OVER_CAP: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 85\r\nconnection: close\r\n\r\n{\"error\":\"busy\",\"message\":\"too many API connections (--api-max-connections); retry\"}\n";

/// Serve `app` on `listener` until `shared.shutdown` flips, then let the connections
/// finish what they serve (the caller bounds how long).
pub(crate) async fn serve(listener: TcpListener, app: Router, shared: Arc<Shared>) {
    let max = shared.config.api_max_connections;
    let slots = Arc::new(Semaphore::new(max as usize));
    let mut stop = shared.shutdown.subscribe();
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of descriptors or similar: rest, the connections queue meanwhile.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(crate::listener::ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.api.refused_connections.fetch_add(1, Relaxed);
            // Into the socket's empty send buffer at once; then closed.
            let _ = sock.try_write(OVER_CAP.as_bytes());
            continue;
        };
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(SEND_BUFFER);
        let svc = TowerToHyperService::new(app.clone());
        let sh = shared.clone();
        let mut stop = shared.shutdown.subscribe();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), svc);
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                if e.is_timeout() {
                    sh.metrics.api.header_timeouts.fetch_add(1, Relaxed);
                }
                tracing::trace!(error = %e, "API connection ended");
            }
        });
    }
    // Every connection gave its slot back: all finished.
    let _ = slots.acquire_many(max).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_is_one_whole_http_response() {
        let (head, body) = super::OVER_CAP.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "busy");
    }
}
