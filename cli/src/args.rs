//! The command line, declared with clap's derive API, and the one-line rendering of its
//! errors.

use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ropex::attention::{Kernel, Mask};
use ropex::config::ParseOptions;
use ropex::position::MAP_SYNTAX;
use ropex::{PositionMap, RopeError};

const TEMPLATE: &str = "\
{about}

USAGE:
    {usage}

COMMANDS:
{subcommands}

OPTIONS:
{options}
";

/// ropex: RoPE context extension from the command line
#[derive(Debug, Parser)]
#[command(
    name = "ropex",
    help_template = TEMPLATE,
    subcommand_value_name = "COMMAND",
    disable_help_subcommand = false
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The four commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// inv_freq and attention factor of a model config (as transformers computes them)
    ///
    /// Prints inv_freq per rotary pair and the attention factor for a Hugging Face
    /// config.json (--config) or for the rope keys of a GGUF file (--gguf, which also
    /// names the rotary pair layout of the file's Q/K weights).
    Freqs(FreqsArgs),
    /// the beta-base view: per-pair wavelength, turns in training, stretch, regime
    ///
    /// Prints the beta-base table: for each rotary pair its wavelength, the turns it
    /// completed in training, how much the scheme stretched it, whether it is
    /// extrapolated, blended or interpolated, and (with a target length) the largest angle
    /// it reaches at the target relative to training; then a summary line.
    Explain(ExplainArgs),
    /// the relative-position matrix P(i, j) of a position map
    ///
    /// Prints P(i, j) for queries at positions offset..offset+n and keys at 0..K
    /// (K = offset + n by default). Entries above the causal diagonal print as '.' unless
    /// --non-causal; entries attention never sees print as '-': keys the map hides
    /// (StreamingLLM's evicted middle, keys after the query under Self-Extend and DCA,
    /// which are causal-only) and keys outside --sliding-window / --chunked.
    Positions(PositionsArgs),
    /// attention over q/k/v .npy files under a position map
    ///
    /// Reads unrotated q [n_q, H_q, d], k [n_k, H_kv, d] and v [n_k, H_kv, d_v] ('<f4' or
    /// '<f8' .npy), attends with keys at positions 0..n_k and queries at n_k-n_q..n_k with
    /// the tiled kernel (or --kernel), and writes the output [n_q, H_q, d_v] as '<f4'.
    /// Any map combines with the --sliding-window and --chunked masks.
    Attend(AttendArgs),
}

/// Where a model's rotary embedding is read from: exactly one of a config.json or a GGUF
/// file.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// the model's config.json
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// a GGUF file: its rope keys (and rope_freqs tensor) instead of a config.json
    #[arg(long, value_name = "FILE")]
    pub gguf: Option<PathBuf>,
}

/// The attention masks, shared by `positions` and `attend`; they combine with any map.
#[derive(Debug, Args)]
pub struct MaskOptions {
    /// sliding-window mask: key j visible from query i iff |i - j| < N (Mistral, Gemma
    /// local layers)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub sliding_window: Option<usize>,
    /// chunked attention: key j visible from query i iff floor(i/C) = floor(j/C)
    /// (Llama 4 local layers)
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    pub chunked: Option<usize>,
}

impl MaskOptions {
    /// The mask these options describe (typed errors for sizes of 0).
    pub fn mask(&self) -> Result<Mask, RopeError> {
        let mut m = Mask::NONE;
        if let Some(w) = self.sliding_window {
            m = m.with_sliding_window(w)?;
        }
        if let Some(c) = self.chunked {
            m = m.with_chunked(c)?;
        }
        Ok(m)
    }
}

/// How a config is read: options shared by every command that reads one.
#[derive(Debug, Args)]
pub struct ConfigOptions {
    /// layer type of a per-layer-type config (e.g. full_attention)
    #[arg(long, value_name = "T")]
    pub layer_type: Option<String>,
    /// fail on what transformers only warns about
    #[arg(long)]
    pub strict: bool,
    /// read the config as transformers would (no ropex rope types or keys)
    #[arg(long)]
    pub no_extensions: bool,
}

impl ConfigOptions {
    /// The reader's options.
    pub fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            strict: self.strict,
            extensions: !self.no_extensions,
        }
    }
}

/// `ropex freqs`.
#[derive(Debug, Args)]
pub struct FreqsArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// sequence length (dynamic NTK and LongRoPE depend on it; default: none, as at model
    /// initialisation)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seq_len: Option<usize>,
    /// print exactly {"inv_freq":[...],"attention_factor":x}, plus
    /// "layout":"half"|"interleaved" with --gguf
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ConfigOptions,
}

/// `ropex explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// training length (default: the config's original_max_position_embeddings, else
    /// max_position_embeddings; for GGUF the original context length, else the context
    /// length)
    #[arg(long, value_name = "L", allow_negative_numbers = true)]
    pub train_len: Option<usize>,
    /// target length (default: max_position_embeddings, or GGUF's context length, if
    /// longer than the training length)
    #[arg(long, value_name = "L", allow_negative_numbers = true)]
    pub target_len: Option<usize>,
    /// length the frequencies are computed for (default: the target length)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seq_len: Option<usize>,
    #[command(flatten)]
    pub read: ConfigOptions,
}

/// `ropex positions`.
#[derive(Debug, Args)]
pub struct PositionsArgs {
    /// rope | rerope:W | leaky:W:K (leak K; K < 1 is inverse Leaky ReRoPE) | interp:S |
    /// self-extend:G:W[:SCALE_BASE] | dca:CHUNK_SIZE:LOCAL_WINDOW | streaming:SINKS:WINDOW
    #[arg(long, value_name = "MAP", value_parser = parse_map)]
    pub map: PositionMap,
    /// number of queries
    #[arg(long, default_value_t = 16, allow_negative_numbers = true)]
    pub n: usize,
    /// position of the first query
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub offset: usize,
    /// number of keys (default: offset + n)
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub keys: Option<usize>,
    /// print every entry, also above the causal diagonal
    #[arg(long)]
    pub non_causal: bool,
    #[command(flatten)]
    pub mask: MaskOptions,
}

/// The rotary pair layout of `attend`'s q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// HF / NeoX rotate_half
    Half,
    /// GPT-J / Meta
    Interleaved,
}

/// `ropex attend`.
#[derive(Debug, Args)]
pub struct AttendArgs {
    /// queries, unrotated, [n_q, H_q, d]
    #[arg(long, value_name = "Q.npy")]
    pub q: PathBuf,
    /// keys, unrotated, [n_k, H_kv, d]
    #[arg(long, value_name = "K.npy")]
    pub k: PathBuf,
    /// values [n_k, H_kv, d_v]
    #[arg(long, value_name = "V.npy")]
    pub v: PathBuf,
    /// where the output goes ('<f4' .npy)
    #[arg(long, value_name = "O.npy")]
    pub out: PathBuf,
    /// rope | rerope:W | leaky:W:K | interp:S | self-extend:G:W[:SCALE_BASE] |
    /// dca:CHUNK_SIZE:LOCAL_WINDOW | streaming:SINKS:WINDOW (default: the config's
    /// ropex_position_map, else rope)
    #[arg(long, value_name = "MAP", value_parser = parse_map)]
    pub map: Option<PositionMap>,
    /// frequencies from a config.json (computed for n_k tokens, or --seq-len)
    #[arg(long, value_name = "FILE", conflicts_with = "base")]
    pub config: Option<PathBuf>,
    /// plain RoPE with base B over the whole head (instead of --config)
    #[arg(long, value_name = "B")]
    pub base: Option<f64>,
    /// length the config's frequencies are computed for (default: n_k)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seq_len: Option<usize>,
    /// rotary pair layout
    #[arg(long, value_enum, default_value_t = LayoutArg::Half)]
    pub layout: LayoutArg,
    /// attention kernel: tiled (ropex's band-tiled kernel), two-pass (Su's method, one
    /// full pass per piece of the map) or reference (the f64 oracle)
    #[arg(long, value_name = "KERNEL", default_value = "tiled", value_parser = parse_kernel)]
    pub kernel: Kernel,
    /// bidirectional attention
    #[arg(long)]
    pub non_causal: bool,
    #[command(flatten)]
    pub mask: MaskOptions,
    /// log-n query scaling with training length L
    #[arg(long, value_name = "L", allow_negative_numbers = true)]
    pub log_n: Option<usize>,
    /// logit scale (default attention_factor^2 / sqrt(d))
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub scale: Option<f64>,
    #[command(flatten)]
    pub read: ConfigOptions,
}

/// A `--map` value, read by the library's parser ([`PositionMap`]'s `FromStr`); its
/// errors name the part that is wrong, and every error names the accepted forms.
pub fn parse_map(s: &str) -> Result<PositionMap, String> {
    s.parse().map_err(|e: RopeError| {
        let e = e.to_string();
        if e.contains(MAP_SYNTAX) {
            e
        } else {
            format!("{e} (maps: {MAP_SYNTAX})")
        }
    })
}

/// A `--kernel` value, read by the library's parser ([`Kernel`]'s `FromStr`).
pub fn parse_kernel(s: &str) -> Result<Kernel, String> {
    s.parse().map_err(|e: RopeError| e.to_string())
}

/// A clap error as one line (without the `error: ` prefix), in the CLI's own words where
/// clap's would need its usage block to make sense.
pub fn one_line(err: &clap::Error) -> String {
    let context = |kind: ContextKind| match err.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    match err.kind() {
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            return "no command given (freqs, explain, positions, attend; see ropex --help)".into();
        }
        ErrorKind::InvalidSubcommand => {
            let cmd = context(ContextKind::InvalidSubcommand).unwrap_or_default();
            return format!(
                "unknown command '{cmd}' (expected freqs, explain, positions or attend; see ropex --help)"
            );
        }
        ErrorKind::UnknownArgument => {
            if let Some(arg) = context(ContextKind::InvalidArg) {
                let arg = arg.split_once('=').map_or(arg.as_str(), |(a, _)| a);
                return format!("unknown option {arg} (see the command's --help)");
            }
        }
        ErrorKind::TooManyValues => {
            if let Some(arg) = context(ContextKind::InvalidArg) {
                return format!("{arg} takes no value");
            }
        }
        _ => {}
    }
    // clap's text minus its usage block and tips, joined into one line.
    let text = err.render().to_string();
    let body = text.split("\n\nUsage:").next().unwrap_or(&text);
    body.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_string()
}
