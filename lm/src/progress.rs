//! Progress on stderr (feature `report`): an `indicatif` bar redrawn in place on a terminal, one line per
//! tenth of the work otherwise (logs, CI), where a bar would not be drawn.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{HumanDuration, ProgressBar, ProgressStyle};

/// Progress over a known amount of work (arbitrary units, rounded to whole ones).
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    tty: bool,
    last_tenth: u64,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A bar on stderr.
    pub fn new() -> Self {
        let bar = ProgressBar::new(1);
        let style =
            ProgressStyle::with_template("[{bar:30}] {percent:>3}% {elapsed} eta {eta} {wide_msg}")
                .map(|s| s.progress_chars("#-"))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress {
            bar,
            tty: std::io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    /// Starts the clock over `total` units.
    pub fn start(&mut self, total: f64) {
        self.bar.set_length(units(total).max(1));
        self.bar.reset();
        if self.tty {
            self.bar.enable_steady_tick(Duration::from_millis(100));
        }
        self.last_tenth = 0;
    }

    /// Records `amount` more units done, now working on `what`.
    pub fn advance(&mut self, amount: f64, what: &str) {
        self.bar.inc(units(amount));
        self.bar.set_message(what.to_string());
        if !self.tty {
            let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(1).max(1));
            let tenth = done.saturating_mul(10) / total;
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!(
                    "progress {:3}%  {} elapsed, eta {}  ({what})",
                    done.saturating_mul(100) / total,
                    HumanDuration(self.bar.elapsed()),
                    HumanDuration(self.bar.eta())
                );
            }
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        self.bar.finish();
    }
}

fn units(x: f64) -> u64 {
    x.max(0.0).round() as u64
}
