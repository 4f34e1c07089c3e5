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
            // Echo every text message; feed what is already readable, then flush once:
            // batches writes the way the router's writev path does.
            while let Some(Ok(first)) = rx.next().await {
                let mut next = Some(first);
                while let Some(m) = next.take() {
                    if m.is_text() && tx.feed(m).await.is_err() {
                        return;
                    }
                    next = match futures_util::FutureExt::now_or_never(rx.next()) {
                        Some(Some(Ok(m))) => Some(m),
                        Some(_) => {
                            let _ = tx.flush().await;
                            return;
                        }
                        None => None,
                    };
                }
                if tx.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}
