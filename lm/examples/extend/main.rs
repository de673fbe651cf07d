//! `cargo run --release --example extend`: a tiny byte-level RoPE language model trained
//! at 128 bytes (`tools/train_tiny_lm.py`, checkpoints under `assets/`), read at up to 16x
//! its training length through ropex's frequency schemes, position maps and tiled
//! attention.
//!
//! Su's protocol: at every context length the same final bytes are scored (the last
//! `train_len` bytes of each window), over fixed, evenly spaced window end points shared
//! by every length and scheme. Prints a markdown table (loss in nats/byte, best per column
//! in bold) and writes two SVG plots; `--help` lists the flags.

mod eval;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use eval::{Checkpoint, Results, Scheme, Setup};
use ropex_lm::TinyLm;
use ropex_lm::plot::{self, Line};
use ropex_lm::progress::Progress;
use ropex_lm::protocol::endpoints;

/// Windows per length, `--quick` included: the acceptance check then scores exactly the
/// windows of the published table (see [`check_16x`] for why fewer would be noisy).
const DEFAULT_WINDOWS: usize = 10;

const SCHEMES_HELP: &str = "\
SCHEMES (each base scheme also with \"-logn\": log-n query scaling, L_train = 128):
  rope, pi, ntk, ntk-mixed, dynamic, yarn, rerope-w32, rerope-w64, leaky-w64,
  self-extend-w32, dca-c96-l16, dca-c96-l16-scaled, streaming-s4-w124, inv-leaky
  (ReRoPE windows L/4 and L/2 and the Leaky window L/2 of the model's training length L;
  Self-Extend W = L/4 with the smallest group G keeping positions below L; DCA chunk
  3L/4, local L/8, \"-scaled\": its logit scale; StreamingLLM 4 sinks and window L - 4;
  inv-leaky reads --inv-leaky-model with plain RoPE)";

/// `rel` under the repository root, where the checkpoints and texts live (this crate is
/// its `lm/` member).
fn manifest(rel: &str) -> PathBuf {
    let lm = Path::new(env!("CARGO_MANIFEST_DIR"));
    lm.parent().unwrap_or(lm).join(rel)
}

/// Held-out loss of a tiny byte-level RoPE model read at 1x..16x its training length
/// under every context-extension scheme ropex implements (Su's protocol: the same final
/// bytes scored at every length).
#[derive(Debug, Parser)]
#[command(
    name = "extend",
    override_usage = "cargo run --release --example extend -- [FLAGS]",
    after_help = SCHEMES_HELP
)]
struct Args {
    /// UTF-8 text to evaluate [default: assets/heldout_shakespeare.txt]
    #[arg(long, value_name = "FILE", default_value_os_t = manifest("assets/heldout_shakespeare.txt"), hide_default_value = true)]
    text: PathBuf,
    /// checkpoint with config.json + model.safetensors [default: assets/tiny_lm_rope]
    #[arg(long, value_name = "DIR", default_value_os_t = manifest("assets/tiny_lm_rope"), hide_default_value = true)]
    model: PathBuf,
    /// checkpoint trained with inverse Leaky ReRoPE, read with plain RoPE
    /// [default: assets/tiny_lm_inv_leaky]
    #[arg(long, value_name = "DIR", default_value_os_t = manifest("assets/tiny_lm_inv_leaky"), hide_default_value = true)]
    inv_leaky_model: PathBuf,
    /// schemes to run, comma-separated (default: all; --quick: a subset)
    #[arg(long, value_name = "a,b,c", value_parser = parse_schemes)]
    schemes: Option<SchemeList>,
    /// windows per length [default: 10]
    #[arg(long, value_name = "N", value_parser = parse_windows)]
    windows: Option<usize>,
    /// 7 of the schemes, on the same windows (what CI runs with --check)
    #[arg(long)]
    quick: bool,
    /// also 32x and 64x (about 15x the default run time; combine with --schemes or
    /// --windows)
    #[arg(long)]
    long: bool,
    /// print the results as JSON instead of the table
    #[arg(long)]
    json: bool,
    /// exit non-zero unless the 16x acceptance check holds (RoPE >= 1.5x its 1x loss,
    /// best ReRoPE/Leaky within +5% of its 1x loss)
    #[arg(long)]
    check: bool,
    /// where the SVG plots go [default: target/extend]
    #[arg(long, value_name = "DIR", default_value_os_t = manifest("target/extend"), hide_default_value = true)]
    out_dir: PathBuf,
}

/// The keys given to `--schemes`.
#[derive(Debug, Clone)]
struct SchemeList(Vec<String>);

/// `--schemes`: a comma-separated, non-empty list.
fn parse_schemes(s: &str) -> Result<SchemeList, String> {
    let list: Vec<String> = s
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        return Err("--schemes needs at least one scheme".into());
    }
    Ok(SchemeList(list))
}

/// `--windows`: a positive number.
fn parse_windows(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("--windows must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("--windows needs a positive number, got {s:?}")),
    }
}

/// Reads a UTF-8 text, with CRLF line ends turned into LF (the training corpus has LF).
fn read_text(path: &Path) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read text {}: {e}", path.display()))?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(format!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.valid_up_to()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if !(b == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    Ok(out)
}

fn select_schemes(args: &Args, train_len: usize) -> Result<Vec<Scheme>, String> {
    let all = eval::catalogue(train_len);
    let wanted: Vec<String> = match (&args.schemes, args.quick) {
        (Some(SchemeList(list)), _) => list.clone(),
        (None, true) => all
            .iter()
            .filter(|s| s.quick)
            .map(|s| s.key.clone())
            .collect(),
        (None, false) => return Ok(all),
    };
    let mut out: Vec<Scheme> = Vec::new();
    for name in &wanted {
        let scheme = all.iter().find(|s| &s.key == name).ok_or_else(|| {
            let keys: Vec<&str> = all.iter().map(|s| s.key.as_str()).collect();
            format!("unknown scheme {name:?}; known: {}", keys.join(", "))
        })?;
        if !out.contains(scheme) {
            out.push(scheme.clone());
        }
    }
    // Table order, whatever the order on the command line.
    out.sort_by_key(|s| all.iter().position(|a| a == s));
    Ok(out)
}

fn family(all: &[Scheme], s: &Scheme) -> usize {
    all.iter().position(|a| a == s).map_or(0, |i| i / 2) % plot::PALETTE.len()
}

fn markdown(schemes: &[Scheme], lengths: &[usize], train_len: usize, res: &Results) -> String {
    let mut out = String::from("| scheme |");
    for &l in lengths {
        out += &format!(" {l} ({}x) |", l / train_len);
    }
    let last = lengths.len() - 1;
    out += &format!(" QK^T tiles at {}x (RoPE = 1) |", lengths[last] / train_len);
    out += "\n|---|";
    out += &"---:|".repeat(lengths.len() + 1);
    out += "\n";
    let best: Vec<f64> = (0..lengths.len())
        .map(|c| res.loss.iter().map(|r| r[c]).fold(f64::INFINITY, f64::min))
        .collect();
    let rope_tiles = res.rope_tiles[last].max(1) as f64;
    for ((s, row), tiles) in schemes.iter().zip(&res.loss).zip(&res.tiles) {
        out += &format!("| {} |", s.label);
        for (c, &v) in row.iter().enumerate() {
            // Bold every value that rounds to the column's best.
            if format!("{v:.3}") == format!("{:.3}", best[c]) {
                out += &format!(" **{v:.3}** |");
            } else {
                out += &format!(" {v:.3} |");
            }
        }
        out += &format!(" {:.3} |\n", tiles[last] as f64 / rope_tiles);
    }
    out
}

/// The acceptance check at 16x: plain RoPE's loss at least 1.5x its 1x loss, and the best
/// ReRoPE / Leaky variant within 5% of its own 1x loss (or below it).
///
/// How noisy the ratio is, measured on the held-out plays with 2, 3, 4, 5, 6, 8, 10, 12,
/// 16 and 20 windows (each count places its windows differently): the best variant's
/// 16x / 1x ranges from -1.1% to +2.2% (+1.1% at 10), RoPE's from 2.59x to 2.94x, while a
/// single scheme moves by up to 4 points (ReRoPE w = 32: +3.9% to +7.9%). With 10 windows
/// the check reproduces the published table and sits 3.9 points inside its bound, 2.8
/// points beyond the worst placement seen.
fn check_16x(
    schemes: &[Scheme],
    lengths: &[usize],
    train_len: usize,
    res: &Results,
) -> Vec<String> {
    let (Some(c16), Some(c1)) = (
        lengths.iter().position(|&l| l == 16 * train_len),
        lengths.iter().position(|&l| l == train_len),
    ) else {
        return vec![];
    };
    let ratio = |i: usize| res.loss[i][c16] / res.loss[i][c1];
    let mut out = Vec::new();
    if let Some(i) = schemes.iter().position(|s| s.key == "rope") {
        let r = ratio(i);
        out.push(format!(
            "check 16x: RoPE loss is {r:.2}x its 1x loss (want >= 1.5): {}",
            if r >= 1.5 { "ok" } else { "NOT MET" }
        ));
    }
    let best = schemes
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.checkpoint == Checkpoint::Main
                && matches!(s.map, eval::Map::ReRope(_) | eval::Map::Leaky(_))
        })
        .map(|(i, s)| (ratio(i), s))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((r, s)) = best {
        out.push(format!(
            "check 16x: best ReRoPE/Leaky variant {} is {:+.1}% from its 1x loss (want <= +5%): {}",
            s.label,
            (r - 1.0) * 100.0,
            if r <= 1.05 { "ok" } else { "NOT MET" }
        ));
    }
    out
}

fn run(args: Args) -> Result<(), String> {
    let t_start = Instant::now();
    let text = read_text(&args.text)?;
    let main_model = TinyLm::load(&args.model).map_err(|e| e.to_string())?;
    let train_len = main_model.config().train_len;
    let schemes = select_schemes(&args, train_len)?;
    let inv_leaky = if schemes.iter().any(|s| s.checkpoint == Checkpoint::InvLeaky) {
        Some(TinyLm::load(&args.inv_leaky_model).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let multiples: &[usize] = if args.long {
        &[1, 2, 4, 8, 16, 32, 64]
    } else {
        &[1, 2, 4, 8, 16]
    };
    let lengths: Vec<usize> = multiples.iter().map(|m| m * train_len).collect();
    let windows = args.windows.unwrap_or(DEFAULT_WINDOWS);
    let max_len = *lengths.last().ok_or("no lengths")?;
    let ends = endpoints(text.len(), max_len, windows)
        .map_err(|e| format!("{}: {e}", args.text.display()))?;
    let per_position_len = Some(16 * train_len).filter(|l| lengths.contains(l));
    let setup = Setup {
        lengths: lengths.clone(),
        ends,
        scored: train_len,
        per_position_len,
    };
    let mut progress = Progress::new();
    let res = eval::evaluate(
        &main_model,
        inv_leaky.as_ref(),
        &schemes,
        &text,
        &setup,
        &mut progress,
    )
    .map_err(|e| e.to_string())?;
    let eval_secs: f64 = res.seconds.iter().sum();

    // Plots.
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.out_dir.display()))?;
    let all = eval::catalogue(train_len);
    let text_name = args.text.file_name().map_or_else(
        || args.text.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let lines: Vec<Line> = schemes
        .iter()
        .zip(&res.loss)
        .map(|(s, row)| Line {
            label: s.label.clone(),
            points: lengths
                .iter()
                .map(|&l| l as f64)
                .zip(row.iter().copied())
                .collect(),
            color: plot::PALETTE[family(&all, s)],
            dashed: s.log_n,
        })
        .collect();
    let length_svg = args.out_dir.join("loss_vs_length.svg");
    plot::loss_vs_length(
        &length_svg,
        &format!("Loss on the last {train_len} bytes vs context ({text_name}, {windows} windows)"),
        "byte",
        &lengths,
        train_len,
        &lines,
    )?;
    let mut written = vec![length_svg];
    if let Some(len) = per_position_len.filter(|_| !res.curves.is_empty()) {
        let bucket = (len / 64).max(1);
        let curve_lines: Vec<Line> = res
            .curves
            .iter()
            .map(|c| {
                let s = &schemes[c.scheme];
                let points = c
                    .loss
                    .chunks(bucket)
                    .enumerate()
                    .map(|(b, chunk)| {
                        (
                            (b * bucket) as f64 + chunk.len() as f64 / 2.0,
                            chunk.iter().sum::<f64>() / chunk.len() as f64,
                        )
                    })
                    .collect();
                Line {
                    label: s.label.clone(),
                    points,
                    color: plot::PALETTE[family(&all, s)],
                    dashed: s.log_n,
                }
            })
            .collect();
        let path = args
            .out_dir
            .join(format!("per_position_{}x.svg", len / train_len));
        plot::per_position(
            &path,
            &format!(
                "Loss by position at {}x (L = {len}), {windows} windows, {bucket}-byte buckets",
                len / train_len
            ),
            "byte",
            len,
            train_len,
            &curve_lines,
        )?;
        written.push(path);
    }

    if args.json {
        let json = serde_json::json!({
            "model": args.model.display().to_string(),
            "model_train_position_map": main_model.config().train_position_map,
            "inv_leaky_model": inv_leaky.as_ref().map(|_| args.inv_leaky_model.display().to_string()),
            "inv_leaky_train_position_map": inv_leaky.as_ref().map(|m| m.config().train_position_map.clone()),
            "text": args.text.display().to_string(),
            "text_bytes": text.len(),
            "train_len": train_len,
            "lengths": lengths,
            "windows": windows,
            "window_ends": setup.ends,
            "scored_bytes_per_window": train_len,
            "unit": "nats/byte",
            "kernel": "ropex tiled attention",
            "schemes": schemes.iter().zip(&res.loss).zip(&res.ms).zip(&res.tiles).map(|(((s, row), ms), tiles)| serde_json::json!({
                "key": s.key, "label": s.label, "loss": row, "ms_per_window_fastest": ms,
                "score_tile_products": tiles,
            })).collect::<Vec<_>>(),
            "per_position": per_position_len.map(|len| serde_json::json!({
                "length": len,
                "curves": res.curves.iter().map(|c| serde_json::json!({
                    "key": schemes[c.scheme].key, "loss": c.loss,
                })).collect::<Vec<_>>(),
            })),
            "checks": check_16x(&schemes, &lengths, train_len, &res),
            "rope_score_tile_products": res.rope_tiles,
            "seconds_per_length": res.seconds,
            "forward_configs_per_length": res.runs,
            "seconds_total": t_start.elapsed().as_secs_f64(),
            "plots": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "Held-out loss in nats/byte on the last {train_len} bytes of {windows} windows of \
             {text_name} ({} bytes); model {}, trained at {train_len}; ropex tiled attention. \
             Best per column in bold.\n",
            text.len(),
            args.model.display()
        );
        print!("{}", markdown(&schemes, &lengths, train_len, &res));
    }
    for p in &written {
        eprintln!("wrote {}", p.display());
    }
    let checks = check_16x(&schemes, &lengths, train_len, &res);
    for line in &checks {
        eprintln!("{line}");
    }
    eprintln!(
        "evaluated {} schemes x {} lengths x {windows} windows ({} forward configurations) in \
         {:.1}s; total {:.1}s",
        schemes.len(),
        lengths.len(),
        res.runs.iter().sum::<usize>(),
        eval_secs,
        t_start.elapsed().as_secs_f64()
    );
    if args.check {
        if checks.len() < 2 {
            return Err(
                "--check needs the 1x and 16x lengths and both RoPE and a ReRoPE/Leaky scheme"
                    .into(),
            );
        }
        if checks.iter().any(|l| l.ends_with("NOT MET")) {
            return Err("the 16x acceptance check is not met (see the check lines above)".into());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
