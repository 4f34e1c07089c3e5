//! `router serve --config FILE`: a TOML file whose keys are the long flags of
//! `router serve` (`max-outbound = 262144`, `amqp = "amqp://..."`). Precedence: a flag
//! on the command line, then its environment variable, then the file, then the default.
//!
//! How: before the command line is parsed, every key of the file is set as its flag's
//! environment variable (`ROUTER_MAX_OUTBOUND`) unless that variable is set already; clap
//! then applies its usual order (flag over environment over default), and a bad value is
//! reported by clap naming the flag. An unknown key stops the start naming the key.
//! `router config example` prints every key with its help and default; `router config
//! check --config FILE` validates a file without starting anything.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Command};

use crate::config::ServeConfig;

/// The `serve` arguments as clap knows them (help, env, defaults).
fn serve_command() -> Command {
    ServeConfig::augment_args(Command::new("serve"))
}

/// The `--config` path given on a command line (`--config F` or `--config=F`), else
/// `ROUTER_CONFIG`.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("ROUTER_CONFIG").map(PathBuf::from)
}

/// The environment variables a config file's text stands for, in file order.
pub fn file_to_env(text: &str) -> Result<Vec<(String, String)>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("{e}"))?;
    let cmd = serve_command();
    let mut out = Vec::with_capacity(table.len());
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|a| a.get_long() != Some("config"))
            .ok_or_else(|| {
                format!(
                    "unknown key {key:?}: keys are the long flags of `router serve` \
                     (`router config example` lists them)"
                )
            })?;
        let env = arg
            .get_env()
            .ok_or_else(|| format!("key {key:?} cannot be set from a file"))?
            .to_string_lossy()
            .into_owned();
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    _ => Err(format!("key {key:?}: a list holds strings or numbers")),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            _ => return Err(format!("key {key:?}: a string, number, boolean or list")),
        };
        out.push((env, text));
    }
    Ok(out)
}

/// Read `path` and set, for each key, its flag's environment variable unless the
/// environment has it already. Call before parsing the command line, before any thread
/// starts.
pub fn apply(path: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let vars = file_to_env(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut set = 0;
    for (k, v) in vars {
        if std::env::var_os(&k).is_none() {
            std::env::set_var(&k, v);
            set += 1;
        }
    }
    Ok(set)
}

/// Parse `serve` arguments as the command line would (after [`apply`]).
pub fn parse_serve(args: &[&str]) -> Result<ServeConfig, String> {
    use clap::FromArgMatches;
    let m = serve_command()
        .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    ServeConfig::from_arg_matches(&m).map_err(|e| e.to_string())
}

/// A TOML value for a default as clap prints it.
fn toml_value(s: &str) -> String {
    if s.parse::<i64>().is_ok() || s == "true" || s == "false" {
        s.to_string()
    } else {
        toml::Value::String(s.to_string()).to_string()
    }
}

/// Every key of `router serve` with its help text, environment variable and default:
/// keys with a default are set to it, the others are commented out.
pub fn example() -> String {
    let mut out = String::from(
        "# router serve --config router.toml\n\
         # Keys are the long flags of `router serve`. A flag on the command line wins over its\n\
         # environment variable, which wins over this file, which wins over the default.\n",
    );
    for arg in serve_command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "config" || long == "help" {
            continue;
        }
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in wrap(&help, 86) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        match arg.get_env() {
            Some(env) => out.push_str(&format!("# env: {}\n", env.to_string_lossy())),
            None => {
                // A flag without an environment variable (--websocket-conformance-echo) is
                // for the command line only: shown, commented out, not a key.
                out.push_str(&format!("# {long} = (command line only)\n"));
                continue;
            }
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let is_flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        match (defaults.as_slice(), is_flag) {
            (_, true) => out.push_str(&format!("{long} = false\n")),
            ([], _) => out.push_str(&format!("# {long} = \n")),
            ([one], _) => out.push_str(&format!("{long} = {}\n", toml_value(one))),
            (many, _) => {
                let items: Vec<String> = many.iter().map(|d| toml_value(d)).collect();
                out.push_str(&format!("{long} = [{}]\n", items.join(", ")));
            }
        }
    }
    out
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_flags_environment_variables() {
        let vars = file_to_env(
            "max-outbound = 1024\namqp = \"amqp://x\"\ntransparent-hugepages = true\n\
             backend-bindings = [\"a.#\", \"b.*\"]\n",
        )
        .unwrap();
        assert_eq!(
            vars,
            vec![
                ("ROUTER_AMQP".into(), "amqp://x".into()),
                ("ROUTER_BACKEND_BINDINGS".into(), "a.#,b.*".into()),
                ("ROUTER_MAX_OUTBOUND".into(), "1024".into()),
                ("ROUTER_TRANSPARENT_HUGEPAGES".into(), "true".into()),
            ]
        );
        let e = file_to_env("max-outbund = 1\n").unwrap_err();
        assert!(e.contains("\"max-outbund\""), "{e}");
        assert!(file_to_env("max-outbound = { a = 1 }\n").is_err());
        assert!(file_to_env("not toml at all =\n").is_err());
    }

    #[test]
    fn the_example_names_every_flag_and_parses() {
        let text = example();
        let vars = file_to_env(&text).unwrap();
        for arg in serve_command().get_arguments() {
            if let Some(long) = arg.get_long().filter(|l| *l != "config" && *l != "help") {
                assert!(text.contains(&format!("{long} =")), "{long} missing");
            }
        }
        assert!(vars
            .iter()
            .any(|(k, v)| k == "ROUTER_MAX_OUTBOUND" && v == "262144"));
    }
}
