//! The worker processes as the coordinator sees them: started with the coordinator's
//! own command line, followed through their progress lines, told what to do on their
//! stdin (`worker`'s commands), and collected at the end (their `R` lines).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::report;
use crate::worker::WorkerResult;

/// One worker's latest progress line (the fleet's, summed by `total`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub connected: u64,
    pub ever: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub events_sent: u64,
    /// The last storm the worker was told of (`total`: the lowest over the workers).
    pub storm_gen: u64,
    /// Devices its storms were to drop, and did drop, so far.
    pub storm_expected: u64,
    pub storm_drops: u64,
}

impl Progress {
    /// A `P ...` line's numbers.
    fn parse(rest: &str) -> Option<Progress> {
        let n: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let [connected, ever, errors, reconnects, events_sent, storm_gen, storm_expected, storm_drops] =
            n[..]
        else {
            return None;
        };
        Some(Progress {
            connected,
            ever,
            errors,
            reconnects,
            events_sent,
            storm_gen,
            storm_expected,
            storm_drops,
        })
    }
}

/// The fleet's counts: the sum of the workers' latest progress lines (the lowest storm
/// number: a storm is known to all once every worker has it).
pub fn total(progress: &Mutex<Vec<Progress>>) -> Progress {
    let p = progress.lock().unwrap_or_else(|e| e.into_inner());
    let mut t = p.iter().fold(Progress::default(), |a, b| Progress {
        connected: a.connected + b.connected,
        ever: a.ever + b.ever,
        errors: a.errors + b.errors,
        reconnects: a.reconnects + b.reconnects,
        events_sent: a.events_sent + b.events_sent,
        storm_gen: 0,
        storm_expected: a.storm_expected + b.storm_expected,
        storm_drops: a.storm_drops + b.storm_drops,
    });
    t.storm_gen = p.iter().map(|w| w.storm_gen).min().unwrap_or(0);
    t
}

pub struct Workers {
    pub children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    pub progress: Arc<Mutex<Vec<Progress>>>,
    pub results: Arc<Mutex<Vec<WorkerResult>>>,
    /// Storms started so far.
    storms: u64,
}

impl Workers {
    pub fn total(&self) -> Progress {
        total(&self.progress)
    }

    /// One command line to every worker.
    pub async fn tell(&mut self, line: &str) {
        for s in self.stdins.iter_mut() {
            let _ = s.write_all(format!("{line}\n").as_bytes()).await;
            let _ = s.flush().await;
        }
    }

    /// A reconnect storm `at` seconds from now: `fraction` of the connected devices drop
    /// at once and come straight back; timed until every one of them is back (at most
    /// 120 s). `at_seconds` is what the report says of when.
    pub async fn storm(&mut self, at: f64, fraction: f64, at_seconds: f64) -> report::Storm {
        tokio::time::sleep(Duration::from_secs_f64(at)).await;
        let before = self.total();
        self.storms += 1;
        let generation = self.storms;
        self.tell(&format!("storm {fraction}")).await;
        let t = Instant::now();
        let deadline = t + Duration::from_secs(120);
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.total();
            let expected = now.storm_expected - before.storm_expected;
            // Every worker has counted the devices it drops, they all dropped, and the
            // fleet is as connected as before.
            let done = now.storm_gen >= generation
                && now.storm_drops - before.storm_drops >= expected
                && now.connected >= before.connected;
            if done || Instant::now() > deadline {
                return report::Storm {
                    at_seconds,
                    devices: expected,
                    seconds_to_reconnect: t.elapsed().as_secs_f64(),
                    complete: done,
                };
            }
        }
    }
}

/// Start `k` workers with this process's own arguments, the account (a random one
/// unless --account was given) and how long the run is planned to last.
pub fn spawn(k: usize, account: uuid::Uuid, run_seconds: f64) -> anyhow::Result<Workers> {
    let exe = std::env::current_exe()?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let progress = Arc::new(Mutex::new(vec![Progress::default(); k]));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for i in 0..k {
        let mut child = Command::new(&exe)
            .args(&argv)
            .args([
                "--worker-index",
                &i.to_string(),
                "--worker-count",
                &k.to_string(),
                "--worker-run-seconds",
                &run_seconds.to_string(),
            ])
            // Every worker mints its tokens for the same account: hand it down through
            // the environment, which a repeated flag on the command line could not do.
            .env("LOADGEN_ACCOUNT", account.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("worker stdout"))?;
        stdins.push(
            child
                .stdin
                .take()
                .ok_or_else(|| anyhow::anyhow!("worker stdin"))?,
        );
        tokio::spawn(follow(i, stdout, progress.clone(), results.clone()));
        children.push(child);
    }
    Ok(Workers {
        children,
        stdins,
        progress,
        results,
        storms: 0,
    })
}

/// Read worker `i`'s lines: progress into `progress[i]`, its result into `results`.
async fn follow(
    i: usize,
    stdout: tokio::process::ChildStdout,
    progress: Arc<Mutex<Vec<Progress>>>,
    results: Arc<Mutex<Vec<WorkerResult>>>,
) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if let Some(p) = l.strip_prefix("P ").and_then(Progress::parse) {
            progress.lock().unwrap_or_else(|e| e.into_inner())[i] = p;
        } else if let Some(json) = l.strip_prefix("R ") {
            if let Ok(res) = serde_json::from_str::<WorkerResult>(json) {
                results.lock().unwrap_or_else(|e| e.into_inner()).push(res);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_sum_and_storms_count_once_all_workers_have_them() {
        let a = Progress::parse("10 12 1 2 30 2 5 4").unwrap();
        assert_eq!(
            (a.connected, a.events_sent, a.storm_gen, a.storm_drops),
            (10, 30, 2, 4)
        );
        assert_eq!(Progress::parse("1 2 3"), None);
        assert_eq!(Progress::parse("1 2 3 4 5 6 7 x"), None);
        let b = Progress::parse("5 5 0 0 1 1 3 3").unwrap();
        let t = total(&Mutex::new(vec![a, b]));
        assert_eq!(
            (t.connected, t.ever, t.storm_expected, t.storm_drops),
            (15, 17, 8, 7)
        );
        assert_eq!(t.storm_gen, 1);
    }
}
