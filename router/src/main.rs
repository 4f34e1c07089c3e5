//! The `router` command: parse the command line, call the library.

use std::sync::atomic::{AtomicI32, Ordering::Relaxed};

use clap::Parser;
use router::config::{Cli, Command, ConfigCommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROUTER_LOG")
                // lapin logs every message the broker returns and every channel the
                // broker closes; the cluster sends envelopes `mandatory` and probes
                // peers' queues (a channel closed 404/405) on purpose, and counts both
                // itself (router_cluster_envelopes_returned_total, ..._probes_*).
                .unwrap_or_else(|_| {
                    "info,lapin::returned_messages=error,lapin::channel=off".into()
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let thp_error = THP_ERROR.load(Relaxed);
    if thp_error != 0 {
        tracing::warn!(
            error = %std::io::Error::from_raw_os_error(thp_error),
            "could not set transparent huge pages off for this process; memory per device may read higher"
        );
    }
    // `--config FILE` first: its keys become the flags' environment variables (unless
    // set), so the command line and the environment still win (see config_file).
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(path) = router::config_file::config_path(&args) {
        if let Err(e) = router::config_file::apply(&path) {
            eprintln!("error: --config {e}");
            std::process::exit(2);
        }
    }
    warn_secret_flags(&args);
    match Cli::parse().command {
        Command::Config(ConfigCommand::Example) => {
            print!("{}", router::config_file::example());
            Ok(())
        }
        Command::Config(ConfigCommand::Check { config }) => {
            match router::config_file::parse_serve(&[]) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    std::process::exit(2);
                }
            }
        }
        Command::Token(t) => {
            let secret = match t.secret() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            println!(
                "{}",
                router::auth::mint(&secret, t.device, t.account, t.ttl)
            );
            Ok(())
        }
        Command::Serve(config) => {
            if config.transparent_hugepages {
                if let Err(e) = set_thp_disable(false) {
                    tracing::warn!(error = %e, "could not turn transparent huge pages back on");
                }
            }
            let handle = router::start(*config)?;
            // One machine-readable line: scripts and tests wait for it.
            println!(
                "router ready ws={} api={} node={}",
                handle.ws_addr, handle.api_addr, handle.shared.node_id
            );
            tracing::info!(ws = %handle.ws_addr, api = %handle.api_addr, shards = handle.shared.shards.len(), "router listening");
            wait_for_signal(&handle.shared)?;
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

/// Secrets given as flags are visible to every user of the machine (`ps`, /proc): say so.
fn warn_secret_flags(args: &[std::ffi::OsString]) {
    const SECRET_FLAGS: [(&str, &str); 4] = [
        ("--auth-secret", "--auth-secret-file or ROUTER_AUTH_SECRET"),
        ("--api-token", "ROUTER_API_TOKEN"),
        ("--backend-token", "ROUTER_BACKEND_TOKEN"),
        ("--cluster-key", "--cluster-key-file or ROUTER_CLUSTER_KEY"),
    ];
    for a in args {
        let a = a.to_string_lossy();
        for (flag, instead) in SECRET_FLAGS {
            if a == flag || a.starts_with(&format!("{flag}=")) {
                tracing::warn!(
                    "{flag} on the command line is visible to every user of this machine (ps); use {instead}"
                );
            }
        }
    }
}

/// Transparent huge pages are off for the router from its first instruction of Rust:
/// this runs from `.init_array`, before the runtime or anything else allocates, so no
/// early allocation lands in a huge page that would then stay (turned off in `main`, a
/// few MiB of the heap already had). `--transparent-hugepages` turns them back on.
#[used]
#[link_section = ".init_array"]
static THP_OFF_AT_START: extern "C" fn() = {
    extern "C" fn thp_off() {
        if let Err(e) = set_thp_disable(true) {
            // Logged by `main` once logging is up: only memory use depends on it.
            THP_ERROR.store(e.raw_os_error().unwrap_or(-1), Relaxed);
        }
    }
    thp_off
};

fn set_thp_disable(off: bool) -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integer arguments and touches
    // no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, libc::c_ulong::from(off), 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

static THP_ERROR: AtomicI32 = AtomicI32::new(0);

/// SIGHUP: read the `--nerves-keys` and `--auth-jwks` files again (connections already
/// authenticated stay; a file that does not parse keeps the keys in use).
fn reload(shared: &router::Shared) {
    let mut any = false;
    if let Some(n) = &shared.nerves {
        any = true;
        match n.reload() {
            Ok(keys) => tracing::info!(keys, "SIGHUP: --nerves-keys read again"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: --nerves-keys not reloaded; the keys in use stay")
            }
        }
    }
    match shared.verifier.reload_jwks_file() {
        Some(Ok(keys)) => tracing::info!(keys, "SIGHUP: --auth-jwks read again"),
        Some(Err(e)) => {
            tracing::error!(error = %e, "SIGHUP: --auth-jwks not reloaded; the keys in use stay")
        }
        None => {}
    }
    any |= shared.verifier.jwks_is_file();
    if !any {
        tracing::info!("SIGHUP: nothing to reload");
    }
}

/// Until SIGINT or SIGTERM; SIGHUP reloads key files (see `reload`).
fn wait_for_signal(shared: &router::Shared) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => reload(shared),
            }
        }
        Ok::<_, std::io::Error>(())
    })?;
    Ok(())
}
