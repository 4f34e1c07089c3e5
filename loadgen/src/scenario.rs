//! `--scenario FILE.toml`: a run described in a file. Top-level keys are the long flags
//! (`devices = 300`, `url = ["ws://a", "ws://b"]`, `assert = ["ack.p99<5ms"]`);
//! `[[phase]]` tables describe the run in order:
//!
//! - `ramp` (at most one, first): `connect-rate` and `duration` (the ramp's time limit)
//!   stand for --connect-rate and --ramp-timeout.
//! - `steady`: `duration`; `request-rate` (else the run's --request-rate);
//!   `event-interval` (the devices' event interval from the phase's start on; else
//!   unchanged).
//! - `storm`: `duration`; `fraction` (default 1): at the phase's start that share of the
//!   connected devices drops at once and reconnects without backoff; requests go on at
//!   the rate of the phase before. The phase lasts `duration`, longer if the fleet is
//!   not whole again by then (at most 120 s after the storm).
//! - `hold`: `duration`: no requests; the fleet stays connected (events go on).
//!
//! Without phases after the ramp the run is --duration of steady (with --storm-at) and
//! --hold of hold, as without a scenario.
//!
//! Precedence: a flag on the command line, then its environment variable, then the
//! file, then the default. How: before the command line is parsed, each key is set as
//! its flag's environment variable (`LOADGEN_DEVICES`) unless the environment has it;
//! clap then does the rest and names the flag of a bad value. A --request-rate or
//! --event-interval from the command line (or the environment) also overrides the
//! phases' own. --duration, --hold and --storm-at, from anywhere, cannot be combined
//! with phases after the ramp. An unknown key stops the run naming the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};

use crate::cli::Args;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Steady,
    Storm,
    Hold,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Steady => "steady",
            Kind::Storm => "storm",
            Kind::Hold => "hold",
        }
    }
}

/// A `[[phase]]` after the ramp, as the file gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub kind: Kind,
    pub seconds: f64,
    /// steady: its own rate (None: the run's --request-rate).
    pub request_rate: Option<f64>,
    /// steady: the event interval from its start on (None: unchanged).
    pub event_interval: Option<f64>,
    /// storm: the share of the devices dropped.
    pub fraction: f64,
}

/// A scenario file, applied.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    pub path: PathBuf,
    /// The environment variables the file set (the others were set already).
    pub from_file: Vec<String>,
    pub phases: Vec<Phase>,
}

/// The `--scenario` path on a command line (`--scenario F` or `--scenario=F`), else
/// `LOADGEN_SCENARIO`.
pub fn path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--scenario" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--scenario=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("LOADGEN_SCENARIO").map(PathBuf::from)
}

/// Read `path` and set, for each key, its flag's environment variable unless the
/// environment has it. Call before parsing the command line, before any thread starts.
pub fn apply(path: &Path) -> Result<Scenario, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--scenario {}: {e}", path.display()))?;
    let (vars, phases) = parse(&text).map_err(|e| format!("--scenario {}: {e}", path.display()))?;
    let mut from_file = Vec::new();
    for (k, v) in vars {
        if std::env::var_os(&k).is_none() {
            std::env::set_var(&k, v);
            from_file.push(k);
        }
    }
    Ok(Scenario {
        path: path.to_path_buf(),
        from_file,
        phases,
    })
}

/// Environment variables as (name, value).
pub type Vars = Vec<(String, String)>;

/// A scenario's text: the environment variables its keys stand for (the ramp phase's
/// too), and its phases after the ramp.
pub fn parse(text: &str) -> Result<(Vars, Vec<Phase>), String> {
    let mut table: toml::Table = text.parse().map_err(|e| format!("{e}"))?;
    let tables = match table.remove("phase") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items,
        Some(_) => return Err("`phase` is a list of tables: write [[phase]]".into()),
    };
    let mut phases = Vec::new();
    for (i, t) in tables.into_iter().enumerate() {
        let toml::Value::Table(t) = t else {
            return Err(format!("phase {}: not a table", i + 1));
        };
        match phase(&t).map_err(|e| format!("phase {} ({}): {e}", i + 1, name_of(&t)))? {
            Parsed::Ramp(keys) if i == 0 => ramp_into(&mut table, keys)?,
            Parsed::Ramp(_) => {
                return Err(format!("phase {}: the ramp must be the first phase", i + 1))
            }
            Parsed::After(p) => phases.push(p),
        }
    }
    let mut vars = Vec::with_capacity(table.len());
    for (key, value) in table {
        vars.push((env_of(&key)?, text_of(&key, value)?));
    }
    Ok((vars, phases))
}

enum Parsed {
    /// The ramp's keys as top-level keys (`connect-rate`, `ramp-timeout`).
    Ramp(Vec<(String, toml::Value)>),
    After(Phase),
}

fn name_of(t: &toml::Table) -> String {
    t.get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("no name")
        .to_string()
}

/// The keys each phase takes beside `name`.
fn keys_of(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "ramp" => &["duration", "connect-rate"],
        "steady" => &["duration", "request-rate", "event-interval"],
        "storm" => &["duration", "fraction"],
        "hold" => &["duration"],
        _ => return None,
    })
}

fn phase(t: &toml::Table) -> Result<Parsed, String> {
    let name = t
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or("needs name = \"ramp\", \"steady\", \"storm\" or \"hold\"")?;
    let keys = keys_of(name)
        .ok_or_else(|| format!("unknown phase name {name:?}: ramp, steady, storm or hold"))?;
    for key in t.keys().filter(|k| *k != "name") {
        if !keys.contains(&key.as_str()) {
            return Err(format!(
                "unknown key {key:?}: a {name} phase takes {}",
                keys.join(", ")
            ));
        }
    }
    let num = |key: &str| number(t, key);
    if name == "ramp" {
        let mut out = Vec::new();
        if let Some(v) = t.get("connect-rate") {
            out.push(("connect-rate".to_string(), v.clone()));
        }
        if let Some(v) = t.get("duration") {
            out.push(("ramp-timeout".to_string(), v.clone()));
        }
        return Ok(Parsed::Ramp(out));
    }
    let kind = match name {
        "steady" => Kind::Steady,
        "storm" => Kind::Storm,
        _ => Kind::Hold,
    };
    let fraction = num("fraction")?.unwrap_or(1.0);
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!("fraction {fraction}: want more than 0, at most 1"));
    }
    Ok(Parsed::After(Phase {
        kind,
        seconds: num("duration")?.ok_or("needs a duration (seconds)")?,
        request_rate: num("request-rate")?,
        event_interval: num("event-interval")?,
        fraction,
    }))
}

/// A phase's number, >= 0 (an integer or a float in the file).
fn number(t: &toml::Table, key: &str) -> Result<Option<f64>, String> {
    let v = match t.get(key) {
        None => return Ok(None),
        Some(toml::Value::Integer(i)) => *i as f64,
        Some(toml::Value::Float(f)) => *f,
        Some(other) => return Err(format!("{key} = {other}: want a number")),
    };
    if v.is_nan() || v < 0.0 {
        return Err(format!("{key} = {v}: want a number >= 0"));
    }
    Ok(Some(v))
}

fn ramp_into(table: &mut toml::Table, keys: Vec<(String, toml::Value)>) -> Result<(), String> {
    for (key, v) in keys {
        if table.contains_key(&key) {
            return Err(format!(
                "{key} is set twice: as a top-level key and by the ramp phase"
            ));
        }
        table.insert(key, v);
    }
    Ok(())
}

/// The environment variable of the flag a top-level key names.
fn env_of(key: &str) -> Result<String, String> {
    let cmd = Args::command();
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(key) && key != "scenario")
        .ok_or_else(|| {
            format!("unknown key {key:?}: keys are the long flags of loadgen (docs/loadgen.md)")
        })?;
    arg.get_env()
        .map(|e| e.to_string_lossy().into_owned())
        .ok_or_else(|| format!("key {key:?} cannot be set from a file"))
}

/// A key's value as its environment variable holds it (lists comma-joined).
fn text_of(key: &str, value: toml::Value) -> Result<String, String> {
    Ok(match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!("key {key:?}: a list holds strings or numbers")),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        _ => return Err(format!("key {key:?}: a string, number, boolean or list")),
    })
}

/// Whether a flag's value came from the command line or from an environment variable
/// the scenario did not set.
fn given_outside(m: &ArgMatches, id: &str, env: &str, sc: &Scenario) -> bool {
    match m.value_source(id) {
        Some(ValueSource::CommandLine) => true,
        Some(ValueSource::EnvVariable) => !sc.from_file.iter().any(|e| e == env),
        _ => false,
    }
}

/// After the command line is parsed: the scenario's phases into `args`, the command
/// line's rates over theirs, and no --duration/--hold/--storm-at beside phases.
pub fn settle(args: &mut Args, m: &ArgMatches, sc: &Scenario) -> Result<(), String> {
    let mut phases = sc.phases.clone();
    if !phases.is_empty() {
        for (id, flag) in [
            ("duration", "--duration"),
            ("hold", "--hold"),
            ("storm_at", "--storm-at"),
        ] {
            if m.value_source(id) != Some(ValueSource::DefaultValue) {
                return Err(format!(
                    "{flag} cannot be combined with the phases of {} (give each phase its duration, \
                     a storm phase for a storm)",
                    sc.path.display()
                ));
            }
        }
    }
    if given_outside(m, "request_rate", "LOADGEN_REQUEST_RATE", sc) {
        phases.iter_mut().for_each(|p| p.request_rate = None);
    }
    if given_outside(m, "event_interval", "LOADGEN_EVENT_INTERVAL", sc) {
        phases.iter_mut().for_each(|p| p.event_interval = None);
    }
    args.phases = phases;
    Ok(())
}

/// One stretch of the run after the ramp, as the coordinator runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub kind: Kind,
    pub seconds: f64,
    pub request_rate: f64,
    /// Sent to the devices at the start (None: unchanged).
    pub event_interval: Option<f64>,
    /// (seconds into the segment, fraction of the devices).
    pub storm: Option<(f64, f64)>,
}

/// The run after the ramp: the phases, or --duration of steady (with --storm-at) and
/// --hold of hold.
pub fn segments(args: &Args) -> Vec<Segment> {
    if args.phases.is_empty() {
        let mut out = vec![Segment {
            kind: Kind::Steady,
            seconds: args.duration,
            request_rate: args.request_rate,
            event_interval: None,
            storm: (args.storm_at > 0.0).then_some((args.storm_at, 1.0)),
        }];
        if args.hold > 0.0 {
            out.push(hold(args.hold));
        }
        return out;
    }
    let mut rate = args.request_rate;
    let mut out = Vec::new();
    for p in &args.phases {
        out.push(match p.kind {
            Kind::Hold => hold(p.seconds),
            Kind::Steady => {
                rate = p.request_rate.unwrap_or(args.request_rate);
                Segment {
                    kind: Kind::Steady,
                    seconds: p.seconds,
                    request_rate: rate,
                    event_interval: p.event_interval,
                    storm: None,
                }
            }
            Kind::Storm => Segment {
                kind: Kind::Storm,
                seconds: p.seconds,
                request_rate: rate,
                event_interval: None,
                storm: Some((0.0, p.fraction)),
            },
        });
    }
    out
}

fn hold(seconds: f64) -> Segment {
    Segment {
        kind: Kind::Hold,
        seconds,
        request_rate: 0.0,
        event_interval: None,
        storm: None,
    }
}

/// What --dry-run prints: the parameters and the run, phase by phase.
pub fn describe(args: &Args) -> String {
    let mut o = String::from("parameters\n");
    for (flag, value) in &args.parameters {
        o.push_str(&format!("  {flag} = {value}\n"));
    }
    o.push_str(&format!(
        "phases\n  ramp: {} devices at {} connects/s, at most {} s\n",
        args.devices, args.connect_rate, args.ramp_timeout
    ));
    for s in segments(args) {
        o.push_str(&format!("  {}\n", s.describe()));
    }
    o
}

impl Segment {
    pub fn describe(&self) -> String {
        let mut o = format!("{}: {} s", self.kind.name(), self.seconds);
        if self.kind != Kind::Hold {
            o.push_str(&format!(", {} requests/s", self.request_rate));
        }
        match self.event_interval {
            Some(i) if i > 0.0 => o.push_str(&format!(", an event every {i} s per device")),
            Some(_) => o.push_str(", no events from here on"),
            None => {}
        }
        if let Some((at, fraction)) = self.storm {
            o.push_str(&format!(
                ", {}% of the devices dropped at {at} s",
                fraction * 100.0
            ));
        }
        o
    }
}

/// Whether any part of the run has devices send events.
pub fn events_on(args: &Args) -> bool {
    args.event_interval > 0.0
        || segments(args)
            .iter()
            .any(|s| s.event_interval.is_some_and(|i| i > 0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{FromArgMatches, Parser};

    const EXAMPLE: &str = include_str!("../scenarios/example.toml");

    /// Parse a command line as main does after the scenario's variables were set, with
    /// those variables given here instead of the process environment (tests share it).
    fn args_with(vars: &[(String, String)], argv: &[&str], sc: &Scenario) -> Result<Args, String> {
        let mut cmd = Args::command();
        // Stand-in for the environment: the file's values as the flags' defaults (the
        // integration test `scenario_dry_run` goes through the real environment).
        for (k, v) in vars {
            let id = cmd
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == k.as_str()))
                .map(|a| a.get_id().to_string())
                .unwrap();
            // clap keeps defaults as 'static strings; a test may leak a few.
            let value: &'static str = Box::leak(v.clone().into_boxed_str());
            cmd = cmd.mut_arg(id, |a| a.default_value(value));
        }
        let m = cmd
            .try_get_matches_from(std::iter::once("loadgen").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        let mut args = Args::from_arg_matches(&m).map_err(|e| e.to_string())?;
        settle(&mut args, &m, sc)?;
        Ok(args)
    }

    #[test]
    fn the_example_parses_into_flags_and_phases() {
        let (vars, phases) = parse(EXAMPLE).unwrap();
        let var = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(var("LOADGEN_DEVICES"), Some("2000"));
        assert_eq!(var("LOADGEN_PROTOCOL"), Some("mixed"));
        assert_eq!(var("LOADGEN_URL"), Some("ws://127.0.0.1:8080"));
        assert_eq!(
            var("LOADGEN_ASSERT"),
            Some("ack.p99<50ms,errors==0,timeouts==0")
        );
        // The ramp phase stands for two flags.
        assert_eq!(var("LOADGEN_CONNECT_RATE"), Some("1000"));
        assert_eq!(var("LOADGEN_RAMP_TIMEOUT"), Some("30"));
        let kinds: Vec<Kind> = phases.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Steady,
                Kind::Steady,
                Kind::Storm,
                Kind::Steady,
                Kind::Hold
            ]
        );
        assert_eq!(phases[0].request_rate, Some(100.0));
        assert_eq!(phases[0].event_interval, Some(5.0));
        assert_eq!(phases[1].request_rate, Some(400.0));
        assert_eq!(phases[2].fraction, 0.5);
        assert_eq!(phases[4].seconds, 5.0);
    }

    #[test]
    fn the_example_becomes_the_run_configuration() {
        let (vars, phases) = parse(EXAMPLE).unwrap();
        let sc = Scenario {
            path: "example.toml".into(),
            from_file: vars.iter().map(|(k, _)| k.clone()).collect(),
            phases,
        };
        let args = args_with(&vars, &[], &sc).unwrap();
        assert_eq!(args.devices, 2000);
        assert_eq!(args.connect_rate, 1000.0);
        assert_eq!(args.ramp_timeout, 30.0);
        assert_eq!(args.asserts.len(), 3);
        assert!(args.validate().is_ok());
        let seg = segments(&args);
        let rates: Vec<f64> = seg.iter().map(|s| s.request_rate).collect();
        // The storm keeps the rate of the phase before it; hold sends none.
        assert_eq!(rates, [100.0, 400.0, 400.0, 100.0, 0.0]);
        assert_eq!(seg[2].storm, Some((0.0, 0.5)));
        assert_eq!(seg[0].event_interval, Some(5.0));
        assert!(events_on(&args));
        // The command line wins, over the file's keys and over the phases' rates.
        let cli = args_with(&vars, &["--devices", "10", "--request-rate", "50"], &sc).unwrap();
        assert_eq!(cli.devices, 10);
        assert!(segments(&cli)[..4].iter().all(|s| s.request_rate == 50.0));
        // --duration beside phases is refused.
        let e = args_with(&vars, &["--duration", "3"], &sc).unwrap_err();
        assert!(e.contains("--duration cannot be combined"), "{e}");
    }

    #[test]
    fn without_phases_the_run_is_steady_then_hold() {
        let args = Args::try_parse_from([
            "loadgen",
            "--duration",
            "4",
            "--hold",
            "2",
            "--storm-at",
            "1",
        ])
        .unwrap();
        let seg = segments(&args);
        assert_eq!(seg.len(), 2);
        assert_eq!(
            (seg[0].kind, seg[0].seconds, seg[0].storm),
            (Kind::Steady, 4.0, Some((1.0, 1.0)))
        );
        assert_eq!(
            (seg[1].kind, seg[1].seconds, seg[1].request_rate),
            (Kind::Hold, 2.0, 0.0)
        );
        assert!(!events_on(&args));
    }

    #[test]
    fn errors_name_the_key() {
        for (text, says) in [
            ("devicez = 3", "unknown key \"devicez\""),
            ("scenario = \"x.toml\"", "unknown key \"scenario\""),
            (
                "worker-index = 1",
                "key \"worker-index\" cannot be set from a file",
            ),
            (
                "[[phase]]\nname = \"steady\"\nduration = 1\nrate = 5",
                "unknown key \"rate\"",
            ),
            (
                "[[phase]]\nname = \"sprint\"\nduration = 1",
                "unknown phase name \"sprint\"",
            ),
            ("[[phase]]\nduration = 1", "needs name"),
            ("[[phase]]\nname = \"hold\"", "needs a duration"),
            (
                "[[phase]]\nname = \"storm\"\nduration = 1\nfraction = 2",
                "fraction 2",
            ),
            (
                "[[phase]]\nname = \"steady\"\nduration = \"1s\"",
                "want a number",
            ),
            (
                "[[phase]]\nname = \"hold\"\nduration = 1\n[[phase]]\nname = \"ramp\"",
                "must be the first",
            ),
            (
                "connect-rate = 5\n[[phase]]\nname = \"ramp\"\nconnect-rate = 6",
                "set twice",
            ),
            ("phase = 3", "[[phase]]"),
            ("devices = {a = 1}", "a string, number, boolean or list"),
            ("devices = ", "TOML parse error"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_scenario_path_comes_from_the_command_line() {
        let argv = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            path(&argv(&["loadgen", "--scenario", "a.toml"])),
            Some("a.toml".into())
        );
        assert_eq!(
            path(&argv(&["loadgen", "--scenario=b.toml"])),
            Some("b.toml".into())
        );
    }
}
