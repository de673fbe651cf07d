//! `ropex`: inspect RoPE frequency schemes and position maps from the command line.
//!
//! ```text
//! cargo run --release -p ropex-cli -- freqs --config config.json --json
//! cargo run --release -p ropex-cli -- explain --config config.json --target-len 131072
//! cargo run --release -p ropex-cli -- freqs --gguf model.gguf --json
//! cargo run --release -p ropex-cli -- positions --map leaky:4:2 --n 8
//! cargo run --release -p ropex-cli -- positions --map streaming:4:8 --n 16 --chunked 8
//! cargo run --release -p ropex-cli -- attend --q q.npy --k k.npy --v v.npy \
//!     --map rerope:512 --config config.json --out o.npy
//! ```
//!
//! Errors print one line (`error: ...`) on stderr and exit non-zero (2 for usage
//! errors, 1 for everything else); `--help` prints the usage.

mod args;
mod commands;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use args::{Cli, Command};

/// What went wrong: a usage error (exit 2) or anything else (exit 1).
pub enum Failure {
    Usage(String),
    Run(String),
}

impl From<ropex::RopeError> for Failure {
    fn from(e: ropex::RopeError) -> Self {
        Failure::Run(e.to_string())
    }
}

/// Runs the CLI on `args` (without the program name), writing results to `out` and
/// warnings to `err`.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let cli =
        match Cli::try_parse_from(std::iter::once("ropex".to_string()).chain(args.iter().cloned()))
        {
            Ok(cli) => cli,
            Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
                return write_out(out, &e.render().to_string());
            }
            Err(e) => return Err(Failure::Usage(args::one_line(&e))),
        };
    match cli.command {
        Command::Freqs(a) => commands::freqs(&a, out, err),
        Command::Explain(a) => commands::explain(&a, out, err),
        Command::Positions(a) => commands::positions(&a, out),
        Command::Attend(a) => commands::attend(&a, out, err),
    }
}

/// Writes to stdout-like sinks; a closed pipe is not worth a panic.
pub fn write_out(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::Run(format!("cannot write output: {e}")))
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!(
            "error: internal error (please report): {}",
            msg.replace('\n', " ")
        );
    }));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut err = std::io::stderr();
    match run(&args, &mut out, &mut err) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("error: {}", m.replace('\n', " "));
            ExitCode::from(2)
        }
        Err(Failure::Run(m)) => {
            eprintln!("error: {}", m.replace('\n', " "));
            ExitCode::from(1)
        }
    }
}
