//! A worker process: simulates its slice of the fleet (devices i with i % K == index),
//! prints progress lines (`P connected ever_connected errors reconnects events_sent
//! storm_gen storm_expected storm_drops`) and, when its stdin says stop (or closes: the
//! coordinator died), a final `R <json>` line, the `WorkerResult`.
//!
//! Commands on stdin, one a line: `stop`; `storm [FRACTION]` (that share of the
//! connected devices drops at once and reconnects without backoff; 1 when not given);
//! `events SECONDS` (the devices' event interval from now on; 0: no events).

use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::cli::{device_id, device_proto, Args};
use crate::device::{self, Control, DeviceSpec, Fleet, Signal, Stats, Target};
use crate::hist;

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerResult {
    pub connect_hist: String,
    pub auth_hist: String,
    pub ever_connected: usize,
    pub reconnects: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub events_sent: u64,
    pub requests_received: u64,
    /// Unix µs of the first connect attempt, and of the moment all of this worker's
    /// devices were connected (0: never): the ramp's precise ends.
    #[serde(default)]
    pub first_attempt_us: u64,
    #[serde(default)]
    pub full_us: u64,
    /// Which worker this is: its devices are `worker_index + j * worker_count`, j = 0, 1, ...
    #[serde(default)]
    pub worker_index: usize,
    /// The last event seq of each of this worker's devices, in that order (0: sent none).
    #[serde(default)]
    pub last_seqs: Vec<u64>,
    /// (device index, first seq, last seq) of every connection that broke after sending
    /// events: all that the coordinator needs, beside `last_seqs`, to tell events lost
    /// with a broken connection from others (`seqs::SeqCounter::losses`).
    #[serde(default)]
    pub broken: Vec<(u64, u64, u64)>,
    /// This worker's resident memory: before its first device, when all its devices
    /// were first connected (0: never), and its peak (VmHWM) at the end.
    #[serde(default)]
    pub rss_start_bytes: u64,
    #[serde(default)]
    pub rss_full_bytes: u64,
    #[serde(default)]
    pub rss_peak_bytes: u64,
}

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`); 0 where there is none.
pub fn own_memory(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Handshakes in flight per worker at most: pacing alone could pile up thousands of
/// half-open attempts against a stalled router.
/// The automatic in-flight handshake cap per worker: this share of a second of its rate...
const CONNECTING_WINDOW_SECONDS: f64 = 0.1;
/// ...and at least this many.
const MIN_CONNECTING: usize = 16;

/// Handshakes one worker of `k` keeps in flight at most (see `--max-connecting`).
pub fn max_connecting(total: usize, connect_rate: f64, k: usize) -> usize {
    let k = k.max(1);
    if total > 0 {
        return total.div_ceil(k).max(1);
    }
    ((connect_rate / k as f64 * CONNECTING_WINDOW_SECONDS).ceil() as usize).max(MIN_CONNECTING)
}

/// How often a worker reports its counts: fine enough to time a short ramp.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// A worker stops by itself this long after ramp timeout + duration + hold.
const SELF_STOP_MARGIN: Duration = Duration::from_secs(60);

/// The progress line: `P connected ever_connected errors reconnects events_sent
/// storm_gen storm_expected storm_drops`.
fn progress_line(s: &Stats) -> String {
    let errors: u64 = s.errors.values().sum();
    format!(
        "P {} {} {} {} {} {} {} {}",
        s.connected,
        s.ever_connected,
        errors,
        s.reconnects,
        s.events_sent,
        s.storm_gen,
        s.storm_expected,
        s.storm_drops
    )
}

/// A command from the coordinator (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Command {
    Stop,
    Storm(f64),
    Events(Option<Duration>),
}

fn command(line: &str) -> Option<Command> {
    let mut words = line.split_whitespace();
    let verb = words.next()?;
    let number = words.next().and_then(|w| w.parse::<f64>().ok());
    match verb {
        "stop" => Some(Command::Stop),
        "storm" => Some(Command::Storm(number.unwrap_or(1.0).clamp(0.0, 1.0))),
        "events" => {
            let secs = number?;
            Some(Command::Events(
                (secs > 0.0).then(|| Duration::from_secs_f64(secs)),
            ))
        }
        _ => None,
    }
}

/// Follow the coordinator's commands until `stop` or the end of stdin.
async fn obey(fleet: Rc<Fleet>) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        match command(&l) {
            Some(Command::Stop) => return,
            Some(Command::Storm(fraction)) => {
                // The expected count first, in the same step as the signal: no device
                // can connect or drop in between.
                let generation = fleet.signal.get().storm + 1;
                fleet.stats.borrow_mut().storm(generation, fraction);
                fleet.signal.update(|c| {
                    c.storm = generation;
                    c.fraction = fraction;
                });
            }
            Some(Command::Events(iv)) => fleet.signal.update(|c| c.event_interval = iv),
            None => {}
        }
    }
}

/// One line to the coordinator; false once it is gone (a closed pipe is not a panic).
fn say(line: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

/// Run this worker (see the module's doc) until stopped; its result goes to stdout.
pub fn run(args: Args) -> anyhow::Result<()> {
    let index = args.worker_index.unwrap_or(0);
    let k = args.worker_count.max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let mine: Vec<usize> = (index..args.devices).step_by(k).collect();
        let fleet = new_fleet(&args, mine.len());
        spawn_commands(fleet.clone(), self_stop_after(&args), stop_tx);
        let rss_start = own_memory("VmRSS");
        let rss_full = spawn_progress(fleet.clone());
        let (targets, sources) = destinations(&args).await?;
        let pace = Pace {
            sched: crate::sched::OpenLoop::new(
                std::time::Instant::now(),
                (args.connect_rate / k as f64).max(1.0),
            ),
            in_flight: max_connecting(args.max_connecting, args.connect_rate, k),
        };
        for (j, &i) in mine.iter().enumerate() {
            if *stop.borrow() {
                break;
            }
            if !pace.wait_turn(&fleet, j, &mut stop).await {
                break;
            }
            let spec = device_spec(&args, j, i, &targets, &sources);
            tokio::task::spawn_local(device::run(fleet.clone(), spec));
        }
        let _ = stop.wait_for(|s| *s).await;
        wait_closed(&fleet).await;
        let s = fleet.stats.borrow();
        let result = worker_result(&s, index, &mine, rss_start, rss_full.get());
        // The final counts first, so the coordinator's timeline ends on them.
        say(&progress_line(&s));
        say(&format!("R {}", serde_json::to_string(&result)?));
        Ok::<_, anyhow::Error>(())
    })
}

/// The fleet of `devices` devices, with the run's settings and initial control.
fn new_fleet(args: &Args, devices: usize) -> Rc<Fleet> {
    let control = Control {
        stop: false,
        storm: 0,
        fraction: 1.0,
        event_interval: (args.event_interval > 0.0)
            .then(|| Duration::from_secs_f64(args.event_interval)),
    };
    Rc::new(Fleet {
        stats: std::cell::RefCell::new(Stats::new(devices)),
        signal: Signal::new(devices, control),
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        no_ack: args.no_ack,
        secret: args.secret.clone(),
        account: args.account(),
        // Checked by the coordinator before any worker starts.
        tokens: args.tokens().ok().flatten(),
    })
}

/// How long the worker runs at most: the whole run plus a margin.
fn self_stop_after(args: &Args) -> Duration {
    let run_seconds = args
        .worker_run_seconds
        .unwrap_or(args.ramp_timeout.max(0.0) + args.duration.max(0.0) + args.hold.max(0.0));
    Duration::from_secs_f64(run_seconds.max(0.0)) + SELF_STOP_MARGIN
}

/// Follow the coordinator's commands in a task; then stop the fleet and the worker.
fn spawn_commands(fleet: Rc<Fleet>, deadline: Duration, stop_tx: tokio::sync::watch::Sender<bool>) {
    // Stop on "stop", on EOF on stdin (the coordinator died: its end of the pipe
    // closed), or by ourselves once the whole run plus a margin is over, so no
    // worker outlives its run whatever happens to the coordinator.
    tokio::task::spawn_local(async move {
        let _ = tokio::time::timeout(deadline, obey(fleet.clone())).await;
        fleet.signal.update(|c| c.stop = true);
        let _ = stop_tx.send(true);
    });
}

/// Report progress lines in a task until the coordinator is gone. Returns where it
/// notes the resident memory once every device is first connected (0 until then).
fn spawn_progress(fleet: Rc<Fleet>) -> Rc<std::cell::Cell<u64>> {
    let rss_full = Rc::new(std::cell::Cell::new(0u64));
    let full = rss_full.clone();
    tokio::task::spawn_local(async move {
        let mut iv = tokio::time::interval(PROGRESS_EVERY);
        loop {
            iv.tick().await;
            let line = progress_line(&fleet.stats.borrow());
            // The fleet's own cost, taken once, the first time every device is in.
            if full.get() == 0 && fleet.stats.borrow().full_us > 0 {
                full.set(own_memory("VmRSS"));
            }
            if !say(&line) {
                break;
            }
        }
    });
    rss_full
}

/// The routers to connect to, resolved, and the source addresses to connect from.
async fn destinations(args: &Args) -> anyhow::Result<(Vec<Rc<Target>>, Vec<std::net::IpAddr>)> {
    let mut dests = Vec::new();
    for u in &args.urls {
        dests.push(resolve(u).await?);
    }
    let sources = match &args.source_ips {
        Some(spec) => crate::net::parse_ip_range(spec)?,
        None => crate::net::default_sources(&dests),
    };
    let targets: Vec<Rc<Target>> = args
        .urls
        .iter()
        .zip(&dests)
        .map(|(u, &dest)| {
            Rc::new(Target {
                base: u.clone(),
                dest,
            })
        })
        .collect();
    Ok((targets, sources))
}

/// How devices are started: on an open-loop schedule, with a cap on handshakes.
struct Pace {
    sched: crate::sched::OpenLoop,
    /// Handshakes in flight at most.
    in_flight: usize,
}

impl Pace {
    /// Wait until the `j`th device is due and a handshake may start; false if the
    /// stop came first.
    async fn wait_turn(
        &self,
        fleet: &Fleet,
        j: usize,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let due = tokio::time::Instant::from_std(self.sched.due(j as u64));
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.changed() => return false,
        }
        while fleet.stats.borrow().connecting >= self.in_flight {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// Device `i` of the fleet, the `j`th of this worker: its router and source address
/// taken round-robin.
fn device_spec(
    args: &Args,
    j: usize,
    i: usize,
    targets: &[Rc<Target>],
    sources: &[std::net::IpAddr],
) -> DeviceSpec {
    DeviceSpec {
        id: device_id(i),
        slot: j as u32,
        proto: device_proto(args.protocol, i),
        target: targets[i % targets.len()].clone(),
        source: (!sources.is_empty()).then(|| sources[i % sources.len()]),
    }
}

/// Devices close on the stop signal; give them a moment.
async fn wait_closed(fleet: &Fleet) {
    for _ in 0..40 {
        if fleet.stats.borrow().connected == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This worker's result from its final counts; `mine` maps its device slots to
/// fleet indexes.
fn worker_result(
    s: &Stats,
    index: usize,
    mine: &[usize],
    rss_start: u64,
    rss_full: u64,
) -> WorkerResult {
    WorkerResult {
        connect_hist: hist::to_b64(&s.connect),
        auth_hist: hist::to_b64(&s.auth),
        ever_connected: s.ever_connected,
        reconnects: s.reconnects,
        errors: s.errors.clone(),
        events_sent: s.events_sent,
        requests_received: s.requests_received,
        first_attempt_us: s.first_attempt_us,
        full_us: s.full_us,
        worker_index: index,
        last_seqs: s.seqs.clone(),
        broken: s
            .broken
            .iter()
            .map(|&(slot, first, last)| (mine[slot as usize] as u64, first, last))
            .collect(),
        rss_start_bytes: rss_start,
        rss_full_bytes: rss_full,
        rss_peak_bytes: own_memory("VmHWM"),
    }
}

pub(crate) async fn resolve(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse()?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("no host in {url}"))?
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let found = tokio::net::lookup_host(format!("{host}:{port}"))
        .await?
        .next();
    found.ok_or_else(|| anyhow::anyhow!("cannot resolve {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_cap_follows_the_rate_unless_given() {
        // A tenth of a second of each worker's share of the rate...
        assert_eq!(max_connecting(0, 20_000.0, 1), 2_000);
        assert_eq!(max_connecting(0, 20_000.0, 10), 200);
        // ...never below the floor...
        assert_eq!(max_connecting(0, 20_000.0, 67), 30);
        assert_eq!(max_connecting(0, 100.0, 4), MIN_CONNECTING);
        // ...and a given total is shared out, rounding up.
        assert_eq!(max_connecting(100, 20_000.0, 3), 34);
        assert_eq!(max_connecting(1, 20_000.0, 8), 1);
    }

    #[test]
    fn own_memory_reads_proc() {
        let rss = own_memory("VmRSS");
        assert!(rss > 1 << 20 && rss < 1 << 40, "VmRSS {rss}");
        assert!(own_memory("VmHWM") >= rss);
        assert_eq!(own_memory("NoSuchField"), 0);
    }

    #[test]
    fn commands() {
        assert_eq!(command("stop"), Some(Command::Stop));
        assert_eq!(command("storm"), Some(Command::Storm(1.0)));
        assert_eq!(command(" storm 0.25 "), Some(Command::Storm(0.25)));
        assert_eq!(command("storm 7"), Some(Command::Storm(1.0)));
        assert_eq!(
            command("events 1.5"),
            Some(Command::Events(Some(Duration::from_millis(1500))))
        );
        assert_eq!(command("events 0"), Some(Command::Events(None)));
        assert_eq!(command("events"), None);
        assert_eq!(command("dance"), None);
    }

    #[test]
    fn progress_lines_carry_the_storm_counts() {
        let mut s = Stats::new(4);
        s.connected = 2;
        s.up[0] = true;
        s.up[3] = true;
        s.storm(1, 1.0);
        s.storm_drops = 1;
        assert_eq!(progress_line(&s), "P 2 0 0 0 0 1 2 1");
    }
}
