//! `loadgen`: simulated device fleets plus a simulated backend against Hive Router.
//! The command line picks the role: coordinator (default) or worker (internal).

mod amqp_events;
mod backend;
mod cli;
mod coordinator;
mod device;
mod hist;
mod net;
mod progress;
mod report;
mod sched;
mod token;
mod worker;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    args.validate()?;
    match args.worker_index {
        Some(_) => worker::run(args),
        None => coordinator::run(args),
    }
}
