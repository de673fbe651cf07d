//! Su's protocol on a real model: SmolLM2-135M-Instruct (trained at 8k), read at longer
//! contexts through ropex, one row per scheme.
//!
//! The same final `--scored` tokens (default 512) of each of `--windows` windows of a
//! long text are scored with contexts `--lengths` (default 2k, 4k, 8k, 16k; `--long` adds
//! 32k), so columns differ only in how much context precedes the scored tokens. Loss in
//! nats/token; markdown table with the best per column in bold, and wall time per cell.
//!
//! ```text
//! tools/fetch_smollm2.sh
//! apt-get install debian-handbook
//! cargo run --release -p ropex-lm --example real_model -- \
//!     --text /usr/share/doc/debian-handbook/html/en-US --lengths 8192,16384 --schemes rope,rerope
//! ```
//!
//! `--text` is a UTF-8 file, or a directory whose `*.html` files are read in name order
//! with tags stripped (the Debian Administrator's Handbook as packaged by Debian).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use ropex::position::leak_for_target;
use ropex::{PositionMap, Scaling, Yarn};
use ropex_lm::Plan;
use ropex_lm::llama::{GgufTokenizer, Llama, nll_tokens};

#[derive(Parser, Debug)]
#[command(about = "Loss of SmolLM2 at long contexts under every ropex scheme (Su's protocol)")]
struct Args {
    /// The GGUF file (default: $ROPEX_SMOLLM2_GGUF or target/models/smollm2/...).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// A UTF-8 text file, or a directory of .html files (tags stripped).
    #[arg(long)]
    text: PathBuf,
    /// Context lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
    lengths: Vec<usize>,
    /// Add 32k to the lengths.
    #[arg(long)]
    long: bool,
    /// Schemes: rope, ntk, yarn, rerope (w = --window), leaky (w = --window).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rope,ntk,yarn,rerope,leaky"
    )]
    schemes: Vec<String>,
    /// ReRoPE / Leaky ReRoPE window.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Windows of the text (evenly spaced end points shared by every length).
    #[arg(long, default_value_t = 1)]
    windows: usize,
    /// One window ending at this token offset instead of `--windows` spaced ones (the
    /// issue's probe used 200000 on the handbook).
    #[arg(long)]
    end: Option<usize>,
    /// Tokens scored at the end of every window.
    #[arg(long, default_value_t = 512)]
    scored: usize,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn read_text(path: &Path) -> Res<String> {
    if !path.is_dir() {
        return Ok(std::fs::read_to_string(path)?);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .collect();
    files.sort();
    let mut out = String::new();
    for f in files {
        let html = std::fs::read_to_string(&f)?;
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' if in_tag => in_tag = false,
                _ if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.push('\n');
    }
    for (entity, c) in [
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", "\""),
        ("&nbsp;", " "),
    ] {
        out = out.replace(entity, c);
    }
    Ok(out.replace("&amp;", "&"))
}

/// The plan of `scheme` at context `len` for a model trained at `train_len`.
fn plan(model: &Llama, scheme: &str, window: usize, len: usize, train_len: usize) -> Res<Plan> {
    let s = (len as f64 / train_len as f64).max(1.0);
    let rope = model.rope().config.clone();
    let (scaling, map) = match scheme {
        "rope" => (Scaling::None, PositionMap::Rope),
        "ntk" if s > 1.0 => (Scaling::ntk_aware(s), PositionMap::Rope),
        "yarn" if s > 1.0 => (Scaling::Yarn(Yarn::new(s, train_len)), PositionMap::Rope),
        "ntk" | "yarn" => (Scaling::None, PositionMap::Rope),
        "rerope" => (Scaling::None, PositionMap::rerope(window)?),
        "leaky" => {
            let k = leak_for_target(window, train_len, len)?;
            let map = if k == 1.0 {
                PositionMap::Rope
            } else {
                PositionMap::leaky_rerope(window, k)?
            };
            (Scaling::None, map)
        }
        other => return Err(format!("unknown scheme '{other}'").into()),
    };
    let freqs = rope.with_scaling(scaling)?.frequencies_for_len(len);
    Ok(Plan::Single(ropex::Attention::new(
        freqs,
        model.rope().layout,
        map,
    )))
}

fn main() -> Res<()> {
    let args = Args::parse();
    let gguf = args.gguf.clone().unwrap_or_else(|| {
        std::env::var_os("ROPEX_SMOLLM2_GGUF").map_or_else(
            || {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
                ))
            },
            PathBuf::from,
        )
    });
    let t0 = Instant::now();
    let model = Llama::load(&gguf)?;
    let tok = GgufTokenizer::from_gguf(ropex::gguf::GgufFile::open(&gguf)?.header())?;
    let ids = tok.encode(&read_text(&args.text)?)?;
    let train_len = model.config().context_len.unwrap_or(8192);
    let mut lengths = args.lengths.clone();
    if args.long {
        lengths.push(32768);
    }
    lengths.sort_unstable();
    lengths.dedup();
    let max_len = *lengths.last().ok_or("no lengths")?;
    let ends = match args.end {
        Some(e) if e >= max_len && e < ids.len() => vec![e],
        Some(e) => {
            return Err(format!(
                "--end {e} must be at least the longest context {max_len} and below the \
                 text's {} tokens",
                ids.len()
            )
            .into());
        }
        None => ropex_lm::protocol::endpoints(ids.len(), max_len, args.windows)?,
    };
    eprintln!(
        "loaded in {:.1} s; text: {} tokens; window ends {ends:?}; train length {train_len}",
        t0.elapsed().as_secs_f64(),
        ids.len()
    );
    let mut table: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    for scheme in &args.schemes {
        let mut row = Vec::new();
        for &len in &lengths {
            let plan = plan(&model, scheme, args.window, len, train_len)?;
            let (mut sum, mut n) = (0f64, 0usize);
            let t = Instant::now();
            for &e in &ends {
                let (inp, tgt) = (&ids[e - len..e], &ids[e - len + 1..=e]);
                let from = len - args.scored.min(len);
                let logits = model.forward(inp, &plan, from)?;
                let nll = nll_tokens(logits.view(), &tgt[from..]).ok_or("token id")?;
                sum += nll.iter().sum::<f64>();
                n += nll.len();
            }
            let loss = sum / n as f64;
            eprintln!(
                "{scheme:>7} @ {len:>5}: {loss:.4} nats/token ({:.1} s for {} window(s))",
                t.elapsed().as_secs_f64(),
                ends.len()
            );
            row.push(Some(loss));
        }
        table.push((scheme.clone(), row));
    }
    let mut out = String::from("| scheme |");
    for &len in &lengths {
        out += &format!(" {}k |", len / 1024);
    }
    out += "\n|---|";
    out += &"---|".repeat(lengths.len());
    for (scheme, row) in &table {
        out += &format!("\n| {scheme} |");
        for (c, v) in row.iter().enumerate() {
            let best = table
                .iter()
                .filter_map(|r| r.1[c])
                .fold(f64::INFINITY, f64::min);
            out += &match v {
                Some(v) if *v == best => format!(" **{v:.3}** |"),
                Some(v) => format!(" {v:.3} |"),
                None => " - |".into(),
            };
        }
    }
    println!("{out}");
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
