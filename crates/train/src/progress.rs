//! Progress display: a bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports training progress on stderr (bar) or stdout (lines).
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    first_step: u64,
    total: u64,
}

impl Progress {
    /// A display for steps `first_step..total`.
    pub fn new(first_step: u64, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} eta {eta}",
            )
            .expect("valid template");
            bar.set_style(style);
            bar.set_position(first_step);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self { bar, started: Instant::now(), first_step, total }
    }

    /// Estimated time left after `step` steps, from the pace of this process.
    pub fn eta(&self, step: u64) -> Duration {
        let done = step.saturating_sub(self.first_step).max(1) as f64;
        let left = self.total.saturating_sub(step) as f64;
        Duration::from_secs_f64(self.started.elapsed().as_secs_f64() / done * left)
    }

    /// Updates the bar after `step` steps; without a terminal, prints `line` when given.
    pub fn step(&self, step: u64, summary: &str, line: Option<&str>) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(summary.to_string());
            }
            None => {
                if let Some(line) = line {
                    println!("{line}");
                }
            }
        }
    }

    /// Prints a line that stays (evaluations, checkpoints).
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `1h02m03s`, `4m05s` or `6s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, sec) => format!("{h}h{min:02}m{sec:02}s"),
    }
}
