//! Command line: one struct, every flag also from a `LOADGEN_*` environment variable.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RequestVia {
    Owner,
    Cross,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    /// Hive native JSON on /ws.
    Hive,
    /// Phoenix channels V2 on /socket/websocket (NervesHub-like devices).
    Phoenix,
    /// Hivekit compact actions on /v1/ws.
    Hivekit,
    /// A third of each.
    Mixed,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Simulate device fleets and a backend against Hive Router; measure connect, auth, ack and event latency"
)]
pub struct Args {
    /// Without a subcommand loadgen runs the load (the flags below).
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// Devices to simulate.
    #[arg(long, env = "LOADGEN_DEVICES", default_value_t = 1000)]
    pub devices: usize,
    /// Router WebSocket base URL(s), e.g. ws://127.0.0.1:8080 (the protocol's path is appended
    /// when the URL has none). Repeat or comma-separate; devices spread round-robin.
    #[arg(
        long = "url",
        env = "LOADGEN_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080"
    )]
    pub urls: Vec<String>,
    /// Router HTTP API URL(s). Requests go to the node that holds the device.
    #[arg(
        long = "api",
        env = "LOADGEN_API",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8081"
    )]
    pub apis: Vec<String>,
    /// Bearer token for the routers' HTTP API (their --api-token): sent with every request,
    /// device list, event stream and /metrics scrape.
    #[arg(long, env = "LOADGEN_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Which node's API a request goes through: `owner`, the node holding the device
    /// (the fast path), or `cross`, the next node in --api (measures the path across
    /// nodes through RabbitMQ; needs routers with --amqp and at least two --api URLs).
    #[arg(long, env = "LOADGEN_REQUEST_VIA", value_enum, default_value = "owner")]
    pub request_via: RequestVia,
    /// Device protocol.
    #[arg(long, env = "LOADGEN_PROTOCOL", value_enum, default_value = "hive")]
    pub protocol: Proto,
    /// HS256 secret to mint device tokens with (as `router token`).
    #[arg(
        long,
        env = "LOADGEN_SECRET",
        default_value = "hive-dev-secret",
        hide_env_values = true
    )]
    pub secret: String,
    /// Tokens from an identity service instead of minting HS256 ones: line i (from 0) is
    /// device i's token, whose `sub` must be `00000000-0000-4000-8000-<i in 12 hex
    /// digits>` (the device ids loadgen simulates). For routers that verify RS/ES/EdDSA
    /// tokens (`--auth-public-key`, `--auth-jwks`).
    #[arg(long, env = "LOADGEN_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Account UUID of the simulated devices (default: a random one per run).
    #[arg(long, env = "LOADGEN_ACCOUNT")]
    pub account: Option<Uuid>,
    /// Devices connecting per second during the ramp (over all workers).
    #[arg(long, env = "LOADGEN_CONNECT_RATE", default_value_t = 5000.0)]
    pub connect_rate: f64,
    /// Give up waiting for the whole fleet after this many seconds of ramp.
    #[arg(long, env = "LOADGEN_RAMP_TIMEOUT", default_value_t = 120.0)]
    pub ramp_timeout: f64,
    /// Abort the run (exit 4, no report) when the ramp connected less than this percentage
    /// of --devices; 0 = only when it connected none (a run without devices has nothing
    /// to measure and always aborts).
    #[arg(long, env = "LOADGEN_ABORT_BELOW", value_name = "PCT", default_value_t = 0.0,
          value_parser = parse_percent)]
    pub abort_below: f64,
    /// Seconds of steady phase (requests and events flowing). Not with a --scenario that
    /// has phases after the ramp (each phase has its own duration).
    #[arg(long, env = "LOADGEN_DURATION", default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds between each device's periodic events (instances, device-version,
    /// device-state in turn); 0 = no periodic events.
    #[arg(long, env = "LOADGEN_EVENT_INTERVAL", default_value_t = 0.0)]
    pub event_interval: f64,
    /// Backend requests per second (open loop) during the steady phase; 0 = none.
    #[arg(long, env = "LOADGEN_REQUEST_RATE", default_value_t = 100.0)]
    pub request_rate: f64,
    /// timeout_ms of each request.
    #[arg(long, env = "LOADGEN_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
    /// Devices never ack (to show that the measurement can fail: timeouts in the report).
    #[arg(long, env = "LOADGEN_NO_ACK")]
    pub no_ack: bool,
    /// Seconds to keep the fleet connected and idle after the steady phase (RSS checks).
    /// Not with --scenario phases (a hold phase does this).
    #[arg(long, env = "LOADGEN_HOLD", default_value_t = 0.0)]
    pub hold: f64,
    /// Seconds into the steady phase at which every device drops its connection at once
    /// and reconnects without backoff (a reconnect storm); the report says how long the
    /// fleet took to be whole again. 0 = no storm. Not with --scenario phases (a storm
    /// phase does this, for a fraction of the fleet if need be).
    #[arg(long, env = "LOADGEN_STORM_AT", default_value_t = 0.0)]
    pub storm_at: f64,
    /// RabbitMQ URL: time device events through a `hive.events` consumer (routers run with
    /// --amqp) instead of the routers' /v1/events streams, and count them per device: each
    /// device numbers its events (`seq`), and the report's `events` gets received_unique,
    /// duplicated, reordered, lost and lost_in_broken_connections with `counted: true`.
    /// Without --amqp (or without --event-interval) those five are null and `counted` is
    /// false. The consumer reconnects by itself (jittered backoff) when the broker goes away.
    #[arg(long, env = "LOADGEN_AMQP")]
    pub amqp: Option<String>,
    /// With --amqp: consume through a named durable queue `loadgen.events.<random>` with
    /// manual acks, so that events published while loadgen's consumer is disconnected (a
    /// broker stop_app/start_app) wait in it and are counted after the reconnect. loadgen
    /// deletes the queue at the end of the run (RabbitMQ does, 10 minutes after its last
    /// consumer left, if loadgen could not). Default: an exclusive auto-delete queue
    /// without acks, which vanishes with the connection.
    #[arg(long, env = "LOADGEN_AMQP_DURABLE_EVENTS", requires = "amqp")]
    pub amqp_durable_events: bool,
    /// With --amqp: at the end of the run, once the devices have stopped, wait up to this
    /// many seconds for events still in flight: until no event arrived for 2 s.
    #[arg(long, env = "LOADGEN_EVENT_DRAIN_TIMEOUT", default_value_t = 20.0)]
    pub event_drain_timeout: f64,
    /// Write the report as JSON here (stable field names).
    #[arg(long, env = "LOADGEN_JSON")]
    pub json: Option<PathBuf>,
    /// A threshold checked at the end of the run, e.g. 'ack.p99<5ms', 'errors==0',
    /// 'events.lost==0', 'timeouts<0.1%' (repeat, or comma-separate). Each is printed PASS or
    /// FAIL with the measured value; exit status 3 when any fails. FIGURE OP NUMBER[UNIT]:
    /// FIGURE a dotted path of the JSON report or an alias (ack.p50/p90/p99/p999/max,
    /// errors, errors.total, timeouts, connected, events.lost, ...: docs/loadgen.md), OP one
    /// of < <= > >= == !=, UNIT ms/us/s, k/M, KiB/MiB/GiB or %.
    #[arg(
        long = "assert",
        env = "LOADGEN_ASSERT",
        value_name = "EXPR",
        value_delimiter = ',',
        value_parser = crate::thresholds::parse_arg
    )]
    pub asserts: Vec<crate::thresholds::Assertion>,
    /// Write a self-contained HTML report here (one file, no network): ack latency by
    /// percentile, ack latency, connections, errors, requests and router RSS over time,
    /// the phases and the run's parameters.
    #[arg(long, env = "LOADGEN_HTML", value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics while the run lasts (connected
    /// devices, requests by outcome, events, ack latency histogram; all named loadgen_*).
    #[arg(long, env = "LOADGEN_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Seconds between samples of the routers' RSS for the timeline (the sum of
    /// router_process_resident_memory_bytes over the --api nodes' /metrics); 0 = not
    /// sampled.
    #[arg(long, env = "LOADGEN_ROUTER_RSS_INTERVAL", default_value_t = 1.0)]
    pub router_rss_interval: f64,
    /// A TOML file holding flags (keys = the long flag names) and [[phase]] tables run in
    /// order (ramp, steady, storm, hold: docs/loadgen.md). A flag on the command line wins
    /// over its environment variable, which wins over the file.
    #[arg(long, env = "LOADGEN_SCENARIO", value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Print the run's configuration (every flag with where its value came from, and the
    /// phases) and exit without connecting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the ack-latency histogram (HdrHistogram V2, base64) here.
    #[arg(long, env = "LOADGEN_HDR_LOG")]
    pub hdr_log: Option<PathBuf>,
    /// Write one CSV line per backend request here (`due_ms,node,latency_us,late_us,outcome`:
    /// due time from the start of the first phase after the ramp, index of the --api node,
    /// latency as in the report, how late the request left (the sender's own delay), outcome
    /// acked/timeout/offline/http_error/transport_error), to find when and where a latency
    /// tail happened.
    #[arg(long, env = "LOADGEN_REQUEST_LOG")]
    pub request_log: Option<PathBuf>,
    /// Run the coordinator (the backend's request clock and its stopwatch) SCHED_FIFO
    /// (priority 1) once its workers are started, so its own waits for a CPU on a shared
    /// machine do not count as the router's ack latency; with --amqp, the event consumer's
    /// I/O thread too (the event stopwatch). Workers (the simulated devices) keep normal
    /// priority. Needs root or CAP_SYS_NICE; without, a warning and the run goes on.
    #[arg(long, env = "LOADGEN_REALTIME")]
    pub realtime: bool,
    /// Keep transparent huge pages. By default loadgen turns them off for itself and its
    /// workers (prctl PR_SET_THP_DISABLE, inherited by the worker processes): with the
    /// kernel's THP mode `always` a 15,000-device worker held 45 MiB instead of 36.
    #[arg(long, env = "LOADGEN_TRANSPARENT_HUGEPAGES")]
    pub transparent_hugepages: bool,
    /// Worker processes (0 = as many as --per-worker needs).
    #[arg(long, env = "LOADGEN_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Most devices one worker process holds (one process may open 20,000 files here).
    #[arg(long, env = "LOADGEN_PER_WORKER", default_value_t = 15_000)]
    pub per_worker: usize,
    /// Local source addresses, e.g. 127.0.0.2-127.0.0.250 (loopback gives ~28k ports per
    /// source/destination pair; more devices need more sources).
    #[arg(long, env = "LOADGEN_SOURCE_IPS")]
    pub source_ips: Option<String>,
    /// TCP + WebSocket handshake timeout per attempt.
    #[arg(long, env = "LOADGEN_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Handshakes in flight at most during the ramp, over all workers (0: a tenth of a
    /// second's worth of `--connect-rate`, at least 16 per worker). When the routers fall
    /// behind, the ramp waits for them instead of piling connections into their accept
    /// queues, where the wait would count as neither connect time nor error.
    #[arg(long, env = "LOADGEN_MAX_CONNECTING", default_value_t = 0)]
    pub max_connecting: usize,
    /// No live progress line.
    #[arg(long, env = "LOADGEN_QUIET")]
    pub quiet: bool,
    /// Internal: this process is worker i (of --worker-count), started by the coordinator.
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
    #[arg(long, hide = true, default_value_t = 1)]
    pub worker_count: usize,
    /// The scenario's phases after the ramp (`scenario::settle`).
    #[arg(skip)]
    pub phases: Vec<crate::scenario::Phase>,
    /// The run's parameters as (flag, value) for the reports (`parameters`).
    #[arg(skip)]
    pub parameters: Vec<(String, String)>,
    /// Internal: seconds the coordinator plans to run (ramp timeout and phases); a worker
    /// stops by itself a minute after.
    #[arg(long, hide = true)]
    pub worker_run_seconds: Option<f64>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Sub {
    /// Compare two --json reports figure by figure; exit 1 when a latency, error,
    /// timeout or lost-event figure got worse, or a throughput figure dropped, beyond the
    /// tolerance.
    Compare(crate::compare::CompareArgs),
    /// Run loadgen's WebSocket client (the one every simulated device uses) as the echo
    /// client of the Autobahn TestSuite's fuzzingserver: every case in turn, then the
    /// report (scripts/autobahn.sh; docs/protocols.md).
    AutobahnClient(crate::autobahn::AutobahnArgs),
}

/// "90%" or "90" as 90.0, 0 to 100.
fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: want a percentage like 90%"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?}: want 0% to 100%"));
    }
    Ok(v)
}

impl Args {
    /// Bad values, found before any process starts (a usage error, exit code 2).
    /// The tokens of --token-file, one per device (fewer lines than --devices is an error).
    pub fn tokens(&self) -> anyhow::Result<Option<std::sync::Arc<[String]>>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        anyhow::ensure!(
            tokens.len() >= self.devices,
            "--token-file {} has {} tokens for --devices {}",
            path.display(),
            tokens.len(),
            self.devices
        );
        Ok(Some(tokens.into()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            self.devices > 0,
            "--devices 0: a fleet of no device has nothing to measure"
        );
        ensure!(
            self.storm_at <= 0.0 || self.storm_at < self.duration,
            "--storm-at {} is not within --duration {}: the storm would never come",
            self.storm_at,
            self.duration
        );
        ensure!(
            self.request_via != RequestVia::Cross || self.apis.len() >= 2,
            "--request-via cross needs at least two --api nodes (it sends each request through another node than the device's)"
        );
        ensure!(
            !self.urls.is_empty() && !self.apis.is_empty(),
            "need at least one --url and one --api"
        );
        for u in &self.urls {
            let uri: tokio_tungstenite::tungstenite::http::Uri =
                u.parse().map_err(|e| anyhow::anyhow!("--url {u:?}: {e}"))?;
            ensure!(
                uri.scheme_str() == Some("ws") && uri.host().is_some(),
                "--url {u:?}: want ws://HOST:PORT[/path]"
            );
        }
        for a in &self.apis {
            let url = reqwest::Url::parse(a).map_err(|e| anyhow::anyhow!("--api {a:?}: {e}"))?;
            ensure!(
                url.scheme() == "http" && url.host().is_some(),
                "--api {a:?}: want http://HOST:PORT"
            );
        }
        if let Some(spec) = &self.source_ips {
            crate::net::parse_ip_range(spec)?;
        }
        ensure!(self.connect_rate > 0.0, "--connect-rate must be > 0");
        ensure!(
            self.request_rate >= 0.0 && self.duration >= 0.0 && self.hold >= 0.0,
            "--request-rate, --duration and --hold must be >= 0"
        );
        ensure!(
            self.event_interval >= 0.0 && self.ramp_timeout >= 0.0,
            "--event-interval and --ramp-timeout must be >= 0"
        );
        ensure!(self.per_worker > 0, "--per-worker must be > 0");
        ensure!(
            self.event_drain_timeout >= 0.0,
            "--event-drain-timeout must be >= 0"
        );
        ensure!(
            self.router_rss_interval >= 0.0,
            "--router-rss-interval must be >= 0"
        );
        // The event consumer keeps its per-device counts under 32-bit device indexes.
        ensure!(
            self.amqp.is_none() || self.devices <= u32::MAX as usize,
            "--devices too large for --amqp's event counting"
        );
        ensure!(
            self.devices as u64 <= 0xffff_ffff_ffff,
            "--devices too large for the device id space"
        );
        // A token file that cannot be read or is too short stops the run before the ramp.
        self.tokens()?;
        Ok(())
    }

    /// Every output file must be writable before the ramp: a run of minutes whose report
    /// cannot be written at the end is lost. Creates each file (empty) and removes the
    /// ones that did not exist; an error names the flag and the path.
    pub fn check_outputs(&self) -> anyhow::Result<()> {
        let outputs = [
            ("--json", &self.json),
            ("--html", &self.html),
            ("--hdr-log", &self.hdr_log),
            ("--request-log", &self.request_log),
        ];
        for (flag, path) in outputs {
            let Some(path) = path else { continue };
            let existed = path.exists();
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| {
                    anyhow::anyhow!("{flag} {}: cannot be written: {e}", path.display())
                })?;
            if !existed {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// The account to mint tokens for. The coordinator picks it (random unless given) and
    /// hands it to its workers as LOADGEN_ACCOUNT; the fixed fallback is never reached
    /// in a worker it started.
    pub fn account(&self) -> Uuid {
        self.account
            .unwrap_or(Uuid::from_u128(0x4ccc_0000_0000_4000_8000_0000_0000_0001))
    }

    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            self.devices.div_ceil(self.per_worker.max(1)).max(1)
        }
    }
}

/// Every flag of a parsed command line that has a value, as ("--flag", "value (source)"):
/// source one of command line, environment, scenario (an environment variable the
/// --scenario file set, listed in `from_file`) or default. The secret (unless the default)
/// and the API token are not shown.
pub fn parameters(m: &clap::ArgMatches, from_file: &[String]) -> Vec<(String, String)> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let cmd = Args::command();
    let mut out = Vec::new();
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        let Some(raw) = m.get_raw(id) else { continue };
        let value: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        let source = match m.value_source(id) {
            Some(ValueSource::CommandLine) => "command line",
            Some(ValueSource::EnvVariable) if env.is_some_and(|e| from_file.contains(&e)) => {
                "scenario"
            }
            Some(ValueSource::EnvVariable) => "environment",
            _ => "default",
        };
        let shown = if (long == "secret" && source != "default") || long == "api-token" {
            "(hidden)".to_string()
        } else {
            value.join(",")
        };
        out.push((format!("--{long}"), format!("{shown} ({source})")));
    }
    out
}

/// Device i's UUID: deterministic, so workers and backend agree without talking.
pub fn device_id(i: usize) -> Uuid {
    Uuid::parse_str(&format!(
        "00000000-0000-4000-8000-{:012x}",
        i as u64 & 0xffff_ffff_ffff
    ))
    .expect("valid by construction")
}

/// The i of a `device_id(i)` in its text form; None for any other UUID.
pub fn device_index(id: &str) -> Option<usize> {
    let hex = id.strip_prefix("00000000-0000-4000-8000-")?;
    if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    usize::from_str_radix(hex, 16).ok()
}

/// Device i's protocol (mixed fleets rotate).
pub fn device_proto(p: Proto, i: usize) -> Proto {
    match p {
        Proto::Mixed => [Proto::Hive, Proto::Phoenix, Proto::Hivekit][i % 3],
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_distinct_and_stable() {
        assert_eq!(
            device_id(0).to_string(),
            "00000000-0000-4000-8000-000000000000"
        );
        assert_eq!(
            device_id(255).to_string(),
            "00000000-0000-4000-8000-0000000000ff"
        );
        let ids: std::collections::HashSet<Uuid> = (0..10_000).map(device_id).collect();
        assert_eq!(ids.len(), 10_000);
        for i in [0, 1, 255, 999_999, 0xffff_ffff_ffff] {
            assert_eq!(device_index(&device_id(i).to_string()), Some(i));
        }
        assert_eq!(device_index("00000000-0000-4000-8001-000000000001"), None);
        assert_eq!(device_index("00000000-0000-4000-8000-00000000000g"), None);
        assert_eq!(device_index(&Uuid::new_v4().to_string()), None);
        assert_eq!(device_proto(Proto::Mixed, 4), Proto::Phoenix);
    }

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn parameters_hide_the_secret_and_the_api_token() {
        use clap::CommandFactory;
        let show = |argv: &[&str]| {
            let m = Args::command().try_get_matches_from(argv).unwrap();
            parameters(&m, &[])
                .into_iter()
                .filter(|(k, _)| k == "--secret" || k == "--api-token")
                .collect::<Vec<_>>()
        };
        let p = show(&["loadgen", "--secret", "s3cret", "--api-token", "t0ken"]);
        assert_eq!(
            p,
            [
                (
                    "--api-token".to_string(),
                    "(hidden) (command line)".to_string()
                ),
                (
                    "--secret".to_string(),
                    "(hidden) (command line)".to_string()
                ),
            ]
        );
        assert_eq!(
            show(&["loadgen"]),
            [(
                "--secret".to_string(),
                "hive-dev-secret (default)".to_string()
            )]
        );
    }

    /// Issue #33: `--json /missing/dir/r.json` was found only after the run.
    #[test]
    fn outputs_that_cannot_be_written_are_found_first() {
        let dir = std::env::temp_dir().join(format!("loadgen-outputs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("r.json");
        let ok_s = ok.to_str().unwrap();
        assert!(parse(&["--json", ok_s]).check_outputs().is_ok());
        // Checked, not left behind.
        assert!(!ok.exists());
        std::fs::write(&ok, "keep").unwrap();
        assert!(parse(&["--json", ok_s]).check_outputs().is_ok());
        assert_eq!(std::fs::read_to_string(&ok).unwrap(), "keep");
        for flag in ["--json", "--html", "--hdr-log", "--request-log"] {
            let e = parse(&[flag, "/missing/dir/r.out"])
                .check_outputs()
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("{flag} /missing/dir/r.out: cannot be written")),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validation_catches_setup_errors() {
        assert!(parse(&[]).validate().is_ok());
        let ok = parse(&[
            "--url",
            "ws://127.0.0.1:1,ws://127.0.0.1:2/ws",
            "--api",
            "http://127.0.0.1:3",
            "--source-ips",
            "127.0.0.2-127.0.0.9",
        ]);
        assert!(ok.validate().is_ok());
        assert_eq!(ok.urls.len(), 2);
        for bad in [
            &["--url", "http://127.0.0.1:1"][..],
            &["--url", "not a url"],
            &["--api", "ws://127.0.0.1:3"],
            &["--source-ips", "127.0.0.9-127.0.0.2"],
            &["--connect-rate", "0"],
            &["--per-worker", "0"],
            &["--event-drain-timeout=-1"],
            // Issue #33: refused with a message rather than run for nothing.
            &["--devices", "0"],
            &["--duration", "3", "--storm-at", "5"],
            &["--duration", "3", "--storm-at", "3"],
            &["--request-via", "cross"],
        ] {
            assert!(parse(bad).validate().is_err(), "{bad:?}");
        }
        let e = parse(&["--duration", "3", "--storm-at", "5"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("--storm-at 5"), "{e}");
        let e = parse(&["--request-via", "cross"]).validate().unwrap_err();
        assert!(e.to_string().contains("two --api"), "{e}");
        assert!(parse(&["--duration", "3", "--storm-at", "2"])
            .validate()
            .is_ok());
        assert!(
            parse(&["--request-via", "cross", "--api", "http://a:1,http://b:2"])
                .validate()
                .is_ok()
        );
        assert_eq!(parse(&["--abort-below", "90%"]).abort_below, 90.0);
        assert_eq!(parse(&["--abort-below", "12.5"]).abort_below, 12.5);
        assert!(Args::try_parse_from(["loadgen", "--abort-below", "120%"]).is_err());
        assert_eq!(
            parse(&["--devices", "40000", "--per-worker", "15000"]).worker_count(),
            3
        );
        assert_eq!(parse(&["--devices", "10"]).worker_count(), 1);
        assert_eq!(parse(&["--workers", "4"]).worker_count(), 4);
        // A durable event queue only makes sense with a broker to hold it.
        assert!(Args::try_parse_from(["loadgen", "--amqp-durable-events"]).is_err());
        assert!(parse(&["--amqp", "amqp://h", "--amqp-durable-events"])
            .validate()
            .is_ok());
    }

    #[test]
    fn a_token_file_holds_a_token_per_device() {
        let path = std::env::temp_dir().join(format!("lg-tokens-{}", Uuid::new_v4()));
        std::fs::write(&path, "t0\nt1\n\nt2\n").unwrap();
        let p = path.to_str().unwrap();
        let ok = parse(&["--devices", "3", "--token-file", p]);
        assert_eq!(&*ok.tokens().unwrap().unwrap(), ["t0", "t1", "t2"]);
        assert!(ok.validate().is_ok());
        let short = parse(&["--devices", "4", "--token-file", p]);
        assert!(short
            .validate()
            .unwrap_err()
            .to_string()
            .contains("3 tokens"));
        assert!(parse(&["--token-file", "/nonexistent/x"])
            .validate()
            .is_err());
        let _ = std::fs::remove_file(path);
    }
}
