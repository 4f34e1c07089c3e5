//! The reference for the event-path throughput target: a bare tokio-tungstenite server
//! (multi-threaded runtime, default config) that echoes every text message. Driven by
//! the same client as the router (`examples/flood.rs`) in `scripts/event-throughput.sh`.
//! `echo_reference 127.0.0.1:9910`

use futures_util::{SinkExt, StreamExt};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9910".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echo ready {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let (mut tx, mut rx) = ws.split();
            while let Some(Ok(m)) = rx.next().await {
                if m.is_text() {
                    // feed + flush when the reader has nothing more ready: batches writes
                    // the way the router's writev path does.
                    if tx.feed(m).await.is_err() {
                        return;
                    }
                    if futures_util::FutureExt::now_or_never(rx.next()).is_none()
                        && tx.flush().await.is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
}
