//! `loadgen`: simulated device fleets plus a simulated backend against Hive Router.
//! The command line picks the role: coordinator (default) or worker (internal).

mod amqp_events;
mod backend;
mod cli;
mod compare;
mod coordinator;
mod device;
mod fields;
mod hist;
mod http;
mod net;
mod progress;
mod report;
mod sched;
mod seqs;
mod thresholds;
mod timeline;
mod token;
mod worker;
mod ws;

/// The simulated fleet allocates per connect attempt (handshake state, tokens);
/// glibc's malloc was ~5% of a worker's CPU during a ramp.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    if let Some(cli::Sub::Compare(c)) = &args.command {
        std::process::exit(compare::run(c));
    }
    args.validate()?;
    if !args.transparent_hugepages && args.worker_index.is_none() {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only. The setting
        // is inherited by the worker processes started next.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            eprintln!(
                "loadgen: could not turn transparent huge pages off: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    match args.worker_index {
        Some(_) => worker::run(args),
        None => {
            if !coordinator::run(args)? {
                // A threshold failed: distinct from setup errors (1) and usage errors (2).
                std::process::exit(3);
            }
            Ok(())
        }
    }
}
