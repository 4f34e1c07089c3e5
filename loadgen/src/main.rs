//! `loadgen`: simulated device fleets plus a simulated backend against Hive Router.
//! The command line picks the role: coordinator (default) or worker (internal).

mod amqp_events;
mod autobahn;
mod backend;
mod cli;
mod compare;
mod coordinator;
mod device;
mod fields;
mod hist;
mod html;
mod http;
mod metrics;
mod net;
mod outputs;
mod phases;
mod pool;
mod progress;
mod report;
mod scenario;
mod sched;
mod seqs;
mod signal;
mod svg;
mod thresholds;
mod timeline;
mod token;
mod worker;
mod ws;

/// The simulated fleet allocates per connect attempt (handshake state, tokens);
/// glibc's malloc was ~5% of a worker's CPU during a ramp.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{CommandFactory, FromArgMatches};

/// A usage error found before the run: exit 2, as clap does for the command line.
fn usage_error(e: &str) -> ! {
    eprintln!("loadgen: {e}");
    std::process::exit(2);
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Before the command line is parsed: the scenario's keys become environment
    // variables (see scenario), so that the command line and the environment still win.
    let sc = scenario::path(&argv)
        .map(|p| scenario::apply(&p))
        .transpose()
        .unwrap_or_else(|e| usage_error(&e))
        .unwrap_or_default();
    let matches = cli::Args::command().get_matches_from(&argv);
    let mut args = cli::Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(cli::Sub::Compare(c)) = &args.command {
        std::process::exit(compare::run(c));
    }
    if let Some(cli::Sub::AutobahnClient(a)) = &args.command {
        std::process::exit(autobahn::run(a));
    }
    if args.worker_index.is_none() {
        scenario::settle(&mut args, &matches, &sc).unwrap_or_else(|e| usage_error(&e));
        args.parameters = cli::parameters(&matches, &sc.from_file);
    }
    // A bad value or an output that cannot be written: a usage error (exit 2), found
    // before anything connects.
    args.validate()
        .unwrap_or_else(|e| usage_error(&format!("{e:#}")));
    if args.worker_index.is_none() && !args.dry_run {
        args.check_outputs()
            .unwrap_or_else(|e| usage_error(&format!("{e:#}")));
    }
    if args.dry_run {
        print!("{}", scenario::describe(&args));
        return Ok(());
    }
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
        // Setup errors (an Err: the router not there, a probe device refused, a
        // broker or --metrics address unusable) exit 1; a failed threshold 3; a ramp
        // that connected nothing, or less than --abort-below, 4.
        None => match coordinator::run(args)? {
            coordinator::Finish::Passed => Ok(()),
            coordinator::Finish::Failed => std::process::exit(3),
            coordinator::Finish::Aborted => std::process::exit(4),
        },
    }
}
