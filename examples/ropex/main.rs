//! `ropex`: inspect RoPE frequency schemes and position maps from the command line.
//!
//! ```text
//! cargo run --release --example ropex -- freqs --config config.json --json
//! cargo run --release --example ropex -- explain --config config.json --target-len 131072
//! cargo run --release --example ropex -- positions --map leaky:4:2 --n 8
//! cargo run --release --example ropex -- attend --q q.npy --k k.npy --v v.npy \
//!     --map rerope:512 --config config.json --out o.npy
//! ```
//!
//! Errors print one line (`error: ...`) on stderr and exit non-zero (2 for usage
//! errors, 1 for everything else); `--help` prints the usage.

mod args;
mod commands;

use std::io::Write;
use std::process::ExitCode;

use args::Usage;

const USAGE: &str = "\
ropex: RoPE context extension from the command line

USAGE:
    ropex <COMMAND> [OPTIONS]
    ropex <COMMAND> --help

COMMANDS:
    freqs       inv_freq and attention factor of a model config (as transformers computes them)
    explain     the beta-base view: per-pair wavelength, turns in training, stretch, regime
    positions   the relative-position matrix P(i, j) of a position map
    attend      attention over q/k/v .npy files under a position map
    help        this text
";

/// Per-command help.
pub fn command_help(cmd: &str) -> Option<&'static str> {
    Some(match cmd {
        "freqs" => {
            "\
ropex freqs --config FILE [--seq-len N] [--layer-type T] [--json] [--strict] [--no-extensions]

Prints inv_freq per rotary pair and the attention factor for a Hugging Face config.json.
    --config FILE      the model's config.json
    --seq-len N        sequence length (dynamic NTK and LongRoPE depend on it; default: none,
                       as at model initialisation)
    --layer-type T     layer type of a per-layer-type config (e.g. full_attention)
    --json             print exactly {\"inv_freq\": [...], \"attention_factor\": x}
    --strict           fail on what transformers only warns about
    --no-extensions    read the config as transformers would (no ropex rope types or keys)
"
        }
        "explain" => {
            "\
ropex explain --config FILE [--train-len L] [--target-len L] [--seq-len N] [--layer-type T]

Prints the beta-base table: for each rotary pair its wavelength, the turns it completed in
training, how much the scheme stretched it, whether it is extrapolated, blended or
interpolated, and (with a target length) the largest angle it reaches at the target relative
to training; then a summary line.
    --config FILE      the model's config.json
    --train-len L      training length (default: the config's original_max_position_embeddings,
                       else max_position_embeddings)
    --target-len L     target length (default: max_position_embeddings if longer than L)
    --seq-len N        length the frequencies are computed for (default: the target length)
    --layer-type T     layer type of a per-layer-type config
    --strict, --no-extensions   as for freqs
"
        }
        "positions" => {
            "\
ropex positions --map MAP [--n 16] [--offset 0] [--keys K] [--non-causal]

Prints P(i, j) for queries at positions offset..offset+n and keys at 0..K
(K = offset + n by default). Entries above the causal diagonal print as '.' unless
--non-causal.
    --map MAP   rope | rerope:W | leaky:W:K (leak K; K < 1 is inverse Leaky ReRoPE) | interp:S
"
        }
        "attend" => {
            "\
ropex attend --q Q.npy --k K.npy --v V.npy --out O.npy [--map MAP] [--config FILE | --base B]
             [--layer-type T] [--seq-len N] [--layout half|interleaved]
             [--kernel reference|two-pass|tiled] [--non-causal] [--log-n L] [--scale S]

Reads unrotated q [n_q, H_q, d], k [n_k, H_kv, d] and v [n_k, H_kv, d_v] ('<f4' or '<f8'
.npy, C order), attends with keys at positions 0..n_k and queries at n_k-n_q..n_k, and writes
the output [n_q, H_q, d_v] as '<f4'.
    --map MAP        rope | rerope:W | leaky:W:K | interp:S (default: the config's
                     ropex_position_map, else rope)
    --config FILE    frequencies from a config.json (computed for n_k tokens, or --seq-len)
    --base B         plain RoPE with base B over the whole head (instead of --config)
    --layout L       half (HF / NeoX rotate_half, default) or interleaved (GPT-J / Meta)
    --kernel K       reference (default), two-pass or tiled
    --non-causal     bidirectional attention
    --log-n L        log-n query scaling with training length L
    --scale S        logit scale (default attention_factor^2 / sqrt(d))
"
        }
        _ => return None,
    })
}

/// What went wrong: a usage error (exit 2) or anything else (exit 1).
pub enum Failure {
    Usage(String),
    Run(String),
}

impl From<Usage> for Failure {
    fn from(u: Usage) -> Self {
        Failure::Usage(u.0)
    }
}

impl From<ropex::RopeError> for Failure {
    fn from(e: ropex::RopeError) -> Self {
        Failure::Run(e.to_string())
    }
}

/// Runs the CLI on `args` (without the program name), writing results to `out` and
/// warnings to `err`.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Failure> {
    let Some(cmd) = args.first() else {
        return Err(Failure::Usage(
            "no command given (freqs, explain, positions, attend; see ropex --help)".into(),
        ));
    };
    let rest = &args[1..];
    if matches!(cmd.as_str(), "help" | "--help" | "-h") {
        match rest.first().and_then(|c| command_help(c)) {
            Some(h) => write_out(out, h)?,
            None => write_out(out, USAGE)?,
        }
        return Ok(());
    }
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        let help = command_help(cmd).ok_or_else(|| unknown(cmd))?;
        return write_out(out, help);
    }
    match cmd.as_str() {
        "freqs" => commands::freqs(rest, out, err),
        "explain" => commands::explain(rest, out, err),
        "positions" => commands::positions(rest, out),
        "attend" => commands::attend(rest, out, err),
        _ => Err(unknown(cmd)),
    }
}

fn unknown(cmd: &str) -> Failure {
    Failure::Usage(format!(
        "unknown command '{cmd}' (expected freqs, explain, positions or attend; see ropex --help)"
    ))
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
