//! The `router` command: parse the command line, call the library.

use clap::Parser;
use router::config::{Cli, Command, DEV_SECRET};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROUTER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Token(t) => {
            let secret = t.secret.unwrap_or_else(|| DEV_SECRET.to_string());
            println!(
                "{}",
                router::auth::mint(&secret, t.device, t.account, t.ttl)
            );
            Ok(())
        }
        Command::Serve(config) => {
            let handle = router::start(*config)?;
            // One machine-readable line: scripts and tests wait for it.
            println!(
                "router ready ws={} api={} node={}",
                handle.ws_addr, handle.api_addr, handle.shared.node_id
            );
            tracing::info!(ws = %handle.ws_addr, api = %handle.api_addr, shards = handle.shared.shards.len(), "router listening");
            wait_for_signal()?;
            tracing::info!(
                seconds = handle.shared.config.drain_seconds,
                "draining: closing devices with 1001"
            );
            handle.drain();
            tracing::info!("drained");
            Ok(())
        }
    }
}

fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    Ok(())
}
