//! Live progress on stderr: an indicatif bar on a terminal, a plain line a second when
//! stderr is a pipe or file (CI logs), nothing with --quiet. Never touches stdout.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A plain progress line at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Live {
    bar: ProgressBar,
    total: u64,
    /// When the last plain line was written; None = draw the bar (or nothing).
    plain: Option<Arc<Mutex<Instant>>>,
}

impl Live {
    pub fn new(total: u64, quiet: bool) -> Live {
        let tty = std::io::stderr().is_terminal();
        let bar = if quiet || !tty {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total)
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let plain = (!quiet && !tty).then(|| Arc::new(Mutex::new(Instant::now() - PLAIN_EVERY)));
        Live { bar, total, plain }
    }

    /// Phase ("ramp", "steady", "hold"), devices connected now, and the rest of the line.
    pub fn update(&self, phase: &str, connected: u64, msg: String) {
        match &self.plain {
            Some(last) => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= PLAIN_EVERY {
                    *last = Instant::now();
                    eprintln!("{phase:>6} {connected}/{} connected, {msg}", self.total);
                }
            }
            None => {
                self.bar.set_prefix(phase.to_string());
                self.bar.set_position(connected);
                self.bar.set_message(msg);
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
