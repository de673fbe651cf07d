//! A progress bar on stderr: redrawn in place on a terminal, one line per tenth of the
//! work otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress over a known amount of work (arbitrary units).
#[derive(Debug)]
pub struct Progress {
    total: f64,
    done: f64,
    start: Instant,
    last_draw: Option<Instant>,
    last_tenth: usize,
    tty: bool,
    enabled: bool,
}

const WIDTH: usize = 30;

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Progress {
    /// A bar on stderr; `enabled = false` prints nothing.
    pub fn new(enabled: bool) -> Self {
        Progress {
            total: 0.0,
            done: 0.0,
            start: Instant::now(),
            last_draw: None,
            last_tenth: 0,
            tty: std::io::stderr().is_terminal(),
            enabled,
        }
    }

    /// Starts the clock over `total` units.
    pub fn start(&mut self, total: f64) {
        self.total = total.max(f64::MIN_POSITIVE);
        self.done = 0.0;
        self.start = Instant::now();
        self.last_tenth = 0;
    }

    /// Records `units` more done, now working on `what`.
    pub fn advance(&mut self, units: f64, what: &str) {
        self.done += units;
        if !self.enabled {
            return;
        }
        let frac = (self.done / self.total).clamp(0.0, 1.0);
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if frac > 0.0 {
            elapsed * (1.0 - frac) / frac
        } else {
            0.0
        };
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || frac >= 1.0 {
                let filled = (frac * WIDTH as f64).round() as usize;
                let mut what = what.to_string();
                what.truncate(40);
                eprint!(
                    "\r[{}{}] {:3.0}% {} eta {} {:<40}",
                    "#".repeat(filled),
                    "-".repeat(WIDTH - filled),
                    frac * 100.0,
                    fmt_secs(elapsed),
                    fmt_secs(eta),
                    what
                );
                let _ = std::io::stderr().flush();
                self.last_draw = Some(Instant::now());
            }
        } else {
            let tenth = (frac * 10.0).floor() as usize;
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!(
                    "progress {:3.0}%  {} elapsed, eta {}  ({what})",
                    frac * 100.0,
                    fmt_secs(elapsed),
                    fmt_secs(eta)
                );
            }
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.tty {
            eprintln!();
        }
    }
}
