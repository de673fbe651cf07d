//! `eval_real_model`: SmolLM2-135M-Instruct (trained at 8k) read at longer contexts
//! through ropex, one row per scheme: Su's protocol (loss) and passkey retrieval.
//!
//! **Loss** (default mode). The same final `--scored` tokens (default 512) of each of
//! `--windows` windows of a long text are scored with every context of `--contexts`, so
//! columns differ only in how much context precedes the scored tokens. Loss in
//! nats/token. Writes to `--out-dir`: `loss.md` (markdown table, best per column bold,
//! plus the cost per scheme: wall time of one forward pass and score-tile products of
//! ropex's tiled kernel), `loss.json`, `loss_vs_context.svg` and `per_position_<L>.svg`
//! (loss by position at the longest context for RoPE and the best windowed map).
//! Schemes that coincide at a context (every frequency scheme at `L <= 8k`, a ReRoPE
//! window `>= L`, ...) share one forward pass.
//!
//! **Passkey** (`--passkey`). The Landmark / YaRN / llama.cpp passkey prompt
//! ([`ropex_lm::passkey`]) fitted to each of `--passkey-contexts`, the key at each of
//! `--depths`, `--keys` keys; prefill through ropex's tiled kernel into one ropex
//! `KvCache` per block, then greedy decoding of `--new-tokens` tokens through the
//! caches. Writes `passkey.md` and `passkey.json` (and `passkey_trials.json` after
//! every trial).
//!
//! **Speed** (`--speed`). Prefill of the first `--speed-context` tokens (default 16384)
//! through the tiled kernel into the caches, then `--new-tokens` greedy decode steps;
//! tokens/s of each, fastest of `--speed-reps`, for each of `--schemes`. Writes
//! `speed.md` and `speed.json`. `--kv-dtype bf16` (or `f16`) stores the caches' keys and
//! values in half the bytes (`--speed` and `--passkey`).
//!
//! `--dump-text FILE` writes the text of the first window's tokens (decoded), so that
//! llama.cpp's `llama-perplexity -f FILE -c L` reads the same tokens: its first chunk
//! scores positions `L/2 + 1 .. L - 1`, which is `--contexts L-1 --scored L/2-1` here.
//!
//! ```text
//! tools/fetch_smollm2.sh && apt-get install debian-handbook
//! cargo run --release -p ropex-lm --example eval_real_model -- --quick
//! cargo run --release -p ropex-lm --example eval_real_model            # 2k-16k, 7 schemes
//! cargo run --release -p ropex-lm --example eval_real_model -- --full  # + 32k, all schemes
//! cargo run --release -p ropex-lm --example eval_real_model -- --passkey
//! cargo run --release -p ropex-lm --example eval_real_model -- --speed --schemes rope,leaky-w2048
//! ```
//!
//! `--text` is a UTF-8 file, or a directory whose `*.html` files are read in name order
//! with tags stripped (default: the Debian Administrator's Handbook as packaged by Debian).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use ropex::Element;
use ropex_lm::llama::{GgufTokenizer, Llama, LlamaCache};
use ropex_lm::plot::{self, Line, PALETTE};
use ropex_lm::progress::Progress;
use ropex_lm::protocol::{Window, endpoints};
use ropex_lm::report::{Best, markdown_table};
use ropex_lm::scheme::{Freq, Map, Spec};
use ropex_lm::{Plan, passkey};

/// Every scheme of `--full` (and of `--schemes all`).
const ALL_SCHEMES: &str = "rope,pi,ntk,dynamic,yarn,rerope-w2048,rerope-w2048-logn,\
                           rerope-w4096,rerope-w4096-logn,leaky-w2048,self-extend,dca";

/// Storage type of the decode caches (`--kv-dtype`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum KvDtype {
    F32,
    Bf16,
    F16,
}

impl KvDtype {
    fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::F16 => "f16",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Loss and passkey retrieval of SmolLM2 at long contexts under ropex schemes")]
struct Args {
    /// The GGUF file (default: $ROPEX_SMOLLM2_GGUF or target/models/smollm2/...).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// A UTF-8 text file, or a directory of .html files (tags stripped).
    #[arg(long, default_value = "/usr/share/doc/debian-handbook/html/en-US")]
    text: PathBuf,
    /// Context lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192,16384")]
    contexts: Vec<usize>,
    /// Scheme keys (see `ropex_lm::scheme`), comma-separated, or `all`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rope,ntk,yarn,rerope-w2048,leaky-w2048,self-extend,dca"
    )]
    schemes: Vec<String>,
    /// Windows of the text (evenly spaced end points shared by every context).
    #[arg(long, default_value_t = 1)]
    windows: usize,
    /// One window ending at this token offset instead of `--windows` spaced ones.
    #[arg(long)]
    end: Option<usize>,
    /// Tokens scored at the end of every window.
    #[arg(long, default_value_t = 512)]
    scored: usize,
    /// Under 5 minutes on 2 cores: contexts 2k, 4k; RoPE, NTK, YaRN, ReRoPE, Leaky.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The long grid: every scheme, contexts 2k..32k, 3 windows (hours on 2 cores).
    #[arg(long)]
    full: bool,
    /// Passkey retrieval instead of the loss table.
    #[arg(long)]
    passkey: bool,
    /// Passkey prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "4096,8192")]
    passkey_contexts: Vec<usize>,
    /// Passkey depths (fraction of the filler before the key).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    depths: Vec<f64>,
    /// Keys per depth.
    #[arg(long, default_value_t = 1)]
    keys: usize,
    /// Tokens decoded greedily after the question.
    #[arg(long, default_value_t = 6)]
    new_tokens: usize,
    /// Speed instead of loss: prefill tokens/s of the first `--speed-context` tokens
    /// of the text (through the tiled kernel into the KV caches), then decode tokens/s
    /// of `--new-tokens` greedy steps after it; every scheme of `--schemes`.
    #[arg(long)]
    speed: bool,
    /// Prompt length of `--speed`.
    #[arg(long, default_value_t = 16384)]
    speed_context: usize,
    /// Timed repetitions of `--speed` (the fastest is reported).
    #[arg(long, default_value_t = 2)]
    speed_reps: usize,
    /// Storage type of the decode caches' keys and values (`--speed` and `--passkey`):
    /// `f32`, `bf16` or `f16` (half the cache memory and decode traffic).
    #[arg(long, value_enum, default_value_t = KvDtype::F32)]
    kv_dtype: KvDtype,
    /// Also write the text of the first window's tokens (the input and its last
    /// target, decoded) to this file, e.g. for llama.cpp's `llama-perplexity`, which
    /// then reads the same tokens.
    #[arg(long)]
    dump_text: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "lm/results/real_model")]
    out_dir: PathBuf,
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

/// `(key, spec)` for each key; `all` expands to [`ALL_SCHEMES`].
fn parse_schemes(keys: &[String]) -> Res<Vec<(String, Spec)>> {
    let mut out = Vec::new();
    for key in keys {
        if key == "all" {
            out.extend(parse_schemes(
                &ALL_SCHEMES.split(',').map(String::from).collect::<Vec<_>>(),
            )?);
        } else {
            out.push((key.clone(), Spec::parse(key)?));
        }
    }
    Ok(out)
}

/// A windowed position map (the family the per-position plot compares with RoPE).
fn windowed(spec: &Spec) -> bool {
    !matches!(spec.map, Map::Rope)
}

fn ctx_label(len: usize) -> String {
    if len.is_multiple_of(1024) {
        format!("{}k", len / 1024)
    } else {
        len.to_string()
    }
}

struct Ctx {
    model: Llama,
    tok: GgufTokenizer,
    train_len: usize,
}

impl Ctx {
    fn plan(&self, spec: &Spec, len: usize) -> Res<Plan> {
        let r = self.model.rope();
        Ok(spec.plan(&r.config, r.layout, self.train_len, len)?)
    }
}

fn loss_mode(ctx: &Ctx, args: &Args, schemes: &[(String, Spec)], contexts: &[usize]) -> Res<()> {
    let t_all = Instant::now();
    let ids = ctx.tok.encode(&read_text(&args.text)?)?;
    let max_len = *contexts.last().ok_or("no contexts")?;
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
        None => endpoints(ids.len(), max_len, args.windows)?,
    };
    eprintln!(
        "text: {} tokens; window ends {ends:?}; train length {}",
        ids.len(),
        ctx.train_len
    );
    if let Some(path) = &args.dump_text {
        let e = ends[0];
        std::fs::write(path, ctx.tok.decode(&ids[e - max_len..e + 1])?)?;
        eprintln!(
            "wrote the text of tokens {}..{} to {}",
            e - max_len,
            e + 1,
            path.display()
        );
    }
    // Distinct plans per context, and which one serves each scheme.
    let mut runs: Vec<Vec<(Plan, Vec<usize>)>> = Vec::new();
    for &len in contexts {
        let mut here: Vec<(Plan, Vec<usize>)> = Vec::new();
        for (si, (_, spec)) in schemes.iter().enumerate() {
            let plan = ctx.plan(spec, len)?;
            match here.iter_mut().find(|(p, _)| *p == plan) {
                Some((_, users)) => users.push(si),
                None => here.push((plan, vec![si])),
            }
        }
        runs.push(here);
    }
    // Work units: a forward pass of L tokens costs ~ L (1 + L / 6000) (linear layers vs
    // causal attention, measured on this model).
    let cost = |len: usize| len as f64 * (1.0 + len as f64 / 6000.0);
    let total: f64 = contexts
        .iter()
        .zip(&runs)
        .map(|(&l, r)| cost(l) * (r.len() * ends.len()) as f64)
        .sum();
    let mut progress = Progress::new();
    progress.start(total);
    let n_s = schemes.len();
    let mut loss = vec![vec![None; contexts.len()]; n_s];
    let mut secs = vec![vec![None; contexts.len()]; n_s];
    let mut tiles = vec![vec![None; contexts.len()]; n_s];
    let mut curves: Vec<Option<Vec<f64>>> = vec![None; n_s];
    let head_dim = ctx.model.config().head_dim;
    for (ci, (&len, here)) in contexts.iter().zip(&runs).enumerate() {
        for (plan, users) in here {
            let name: Vec<&str> = users.iter().map(|&s| schemes[s].0.as_str()).collect();
            let name = name.join("=");
            let longest = len == max_len;
            let (mut sum, mut n, mut fastest) = (0f64, 0usize, f64::INFINITY);
            let mut curve = vec![0f64; if longest { len } else { 0 }];
            for &e in &ends {
                let w = Window::new(e, len, args.scored.min(len))?;
                // At the longest context every row is scored, for the per-position plot.
                let from = if longest { 0 } else { w.from };
                let t = Instant::now();
                let nll = ctx.model.nll(
                    &ids[w.input.clone()],
                    &ids[w.targets.start + from..w.targets.end],
                    plan,
                    from,
                )?;
                fastest = fastest.min(t.elapsed().as_secs_f64());
                sum += nll[w.from - from..].iter().sum::<f64>();
                n += nll.len() - (w.from - from);
                for (c, v) in curve.iter_mut().zip(&nll) {
                    *c += v / ends.len() as f64;
                }
                progress.advance(cost(len), &format!("{} {name}", ctx_label(len)));
            }
            let l = sum / n as f64;
            let products = plan.tile_products(head_dim, len)?;
            eprintln!(
                "{name} @ {len}: {l:.4} nats/token, {fastest:.1} s per forward pass, \
                 {products} score tiles per head and layer"
            );
            for &s in users {
                loss[s][ci] = Some(l);
                secs[s][ci] = Some(fastest);
                tiles[s][ci] = Some(products);
                if longest {
                    curves[s] = Some(curve.clone());
                }
            }
        }
    }
    progress.finish();

    let cols: Vec<String> = contexts
        .iter()
        .map(|&l| {
            if l == ctx.train_len {
                format!("{} (train)", ctx_label(l))
            } else {
                ctx_label(l)
            }
        })
        .collect();
    let label = |s: &Spec| s.label(ctx.train_len);
    let rows: Vec<(String, Vec<Option<f64>>)> = schemes
        .iter()
        .zip(&loss)
        .map(|((_, s), r)| (label(s), r.clone()))
        .collect();
    let mut md = format!(
        "Loss (nats/token) on the final {} tokens of {} window(s), ends {ends:?}:\n\n",
        args.scored,
        ends.len()
    );
    md += &markdown_table("scheme", &cols, &rows, 3, Best::Lowest);
    md += &format!(
        "\nCost per forward pass at {}: wall time (s, fastest window) and score-tile \
         products per head and layer (64 x 64 tiles, relative to RoPE):\n\n",
        ctx_label(max_len)
    );
    md += "| scheme | seconds | tiles | vs RoPE |\n|---|---|---|---|\n";
    let rope_tiles = Plan::Single(ctx.model.attention(ropex::PositionMap::Rope))
        .tile_products(head_dim, max_len)?;
    let last = contexts.len() - 1;
    for (si, (_, s)) in schemes.iter().enumerate() {
        let (t, p) = (
            secs[si][last].unwrap_or(f64::NAN),
            tiles[si][last].unwrap_or(0),
        );
        md += &format!(
            "| {} | {t:.0} | {p} | {:.2}x |\n",
            label(s),
            p as f64 / rope_tiles as f64
        );
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(args.out_dir.join("loss.md"), &md)?;
    let json = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "text": args.text.display().to_string(),
        "text_tokens": ids.len(),
        "train_len": ctx.train_len,
        "contexts": contexts,
        "window_ends": ends,
        "scored_tokens": args.scored,
        "threads": rayon::current_num_threads(),
        "schemes": schemes.iter().enumerate().map(|(si, (key, s))| serde_json::json!({
            "key": key,
            "label": label(s),
            "loss": loss[si],
            "seconds_per_forward": secs[si],
            "tile_products_per_head_layer": tiles[si],
        })).collect::<Vec<_>>(),
        "rope_tile_products_at_longest": rope_tiles,
        "seconds_total": t_all.elapsed().as_secs_f64(),
    });
    std::fs::write(
        args.out_dir.join("loss.json"),
        serde_json::to_string_pretty(&json)?,
    )?;

    let color = |i: usize| PALETTE[i % PALETTE.len()];
    let lines: Vec<Line> = schemes
        .iter()
        .enumerate()
        .map(|(si, (_, s))| Line {
            label: label(s),
            points: contexts
                .iter()
                .zip(&loss[si])
                .filter_map(|(&l, v)| v.map(|v| (l as f64, v)))
                .collect(),
            color: color(si),
            dashed: s.log_n,
        })
        .collect();
    plot::loss_vs_length(
        &args.out_dir.join("loss_vs_context.svg"),
        &format!(
            "SmolLM2-135M: loss on the last {} tokens vs context ({} window(s))",
            args.scored,
            ends.len()
        ),
        "token",
        contexts,
        ctx.train_len,
        &lines,
    )?;
    // Per position at the longest context: RoPE and the best windowed map there.
    let plain = Spec {
        freq: Freq::Plain,
        map: Map::Rope,
        log_n: false,
    };
    // A windowed map that is plain RoPE at this context (a window >= L) shares RoPE's
    // forward pass; it is not a second curve.
    let plain_plan = ctx.plan(&plain, max_len)?;
    let best_map = (0..n_s)
        .filter(|&s| windowed(&schemes[s].1))
        .filter(|&s| {
            ctx.plan(&schemes[s].1, max_len)
                .is_ok_and(|p| p != plain_plan)
        })
        .filter_map(|s| loss[s][last].map(|l| (s, l)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(s, _)| s);
    let rope = schemes.iter().position(|(_, s)| *s == plain);
    let bucket = 256;
    let curve_lines: Vec<Line> = [rope, best_map]
        .into_iter()
        .flatten()
        .filter_map(|s| {
            curves[s].as_ref().map(|c| Line {
                label: label(&schemes[s].1),
                points: c
                    .chunks(bucket)
                    .enumerate()
                    .map(|(i, b)| {
                        (
                            (i * bucket + b.len() / 2) as f64,
                            b.iter().sum::<f64>() / b.len() as f64,
                        )
                    })
                    .collect(),
                color: color(s),
                dashed: false,
            })
        })
        .collect();
    if !curve_lines.is_empty() {
        plot::per_position(
            &args
                .out_dir
                .join(format!("per_position_{}.svg", ctx_label(max_len))),
            &format!(
                "SmolLM2-135M: loss by position at {} ({bucket}-token buckets)",
                ctx_label(max_len)
            ),
            "token",
            max_len,
            ctx.train_len,
            &curve_lines,
        )?;
    }
    eprintln!(
        "wrote {} in {:.0} s",
        args.out_dir.display(),
        t_all.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A decode cache that follows `spec` for a sequence growing to `target` tokens.
fn cache_for<S: Element>(ctx: &Ctx, spec: &Spec, target: usize) -> Res<LlamaCache<S>> {
    let d = spec.decode(&ctx.model.rope().config, ctx.train_len, target)?;
    Ok(ctx.model.cache_with(d.config, d.map, |mut c| {
        if let Some(t) = d.log_n {
            c = c.with_log_n(t)?;
        }
        if let Some(t) = d.dca_logit_scale {
            c = c.with_dca_logit_scale(t)?;
        }
        if let Some(p) = d.refresh {
            c = c.with_refresh_policy(p);
        }
        Ok(c)
    })?)
}

/// `n_new` tokens decoded greedily after a prefill of `prompt` into caches storing `S`.
fn greedy_answer<S: Element>(
    ctx: &Ctx,
    (spec, plan, prompt): (&Spec, &Plan, &[u32]),
    n_new: usize,
) -> Res<Vec<u32>> {
    let mut cache = cache_for::<S>(ctx, spec, prompt.len() + n_new)?;
    let logits = ctx.model.prefill(&mut cache, prompt, plan)?;
    Ok(ctx.model.decode_greedy(&mut cache, logits, n_new, None)?)
}

/// The fastest of `--speed-reps` prefills of `prompt` into caches storing `S` and of the
/// greedy decode steps after it: (prefill seconds, decode seconds per token).
fn time_prefill_decode<S: Element>(
    ctx: &Ctx,
    args: &Args,
    (spec, plan, prompt): (&Spec, &Plan, &[u32]),
) -> Res<(f64, f64)> {
    let (mut pre, mut dec) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..args.speed_reps {
        let mut cache = cache_for::<S>(ctx, spec, prompt.len() + args.new_tokens)?;
        let t = Instant::now();
        let logits = ctx.model.prefill(&mut cache, prompt, plan)?;
        pre = pre.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let new = ctx
            .model
            .decode_greedy(&mut cache, logits, args.new_tokens, None)?;
        // decode_greedy feeds all new tokens but the last through the cache.
        let steps = new.len().saturating_sub(1).max(1);
        dec = dec.min(t.elapsed().as_secs_f64() / steps as f64);
    }
    Ok((pre, dec))
}

/// Prefill and decode throughput: `--speed-context` prompt tokens through
/// [`Llama::prefill`] (tiled kernel, caches filled), then `--new-tokens` greedy steps
/// through the caches, fastest of `--speed-reps`.
fn speed_mode(ctx: &Ctx, args: &Args, schemes: &[(String, Spec)]) -> Res<()> {
    let ids = ctx.tok.encode(&read_text(&args.text)?)?;
    let n = args.speed_context;
    if n == 0 || n > ids.len() || args.new_tokens == 0 || args.speed_reps == 0 {
        return Err(format!(
            "--speed needs 1 <= --speed-context <= {} (the text's tokens), --new-tokens >= 1 \
             and --speed-reps >= 1",
            ids.len()
        )
        .into());
    }
    let threads = rayon::current_num_threads();
    let mut md = format!(
        "Speed of the Rust model, {threads} rayon thread(s), {} KV cache: prefill of {n} tokens \
         (tokens/s) and {} greedy decode steps after it (tokens/s), fastest of {}:\n\n\
         | scheme | prefill s | prefill tok/s | decode s | decode tok/s |\n|---|---:|---:|---:|---:|\n",
        args.kv_dtype.name(),
        args.new_tokens,
        args.speed_reps
    );
    let mut rows = Vec::new();
    for (key, spec) in schemes {
        let target = n + args.new_tokens;
        let plan_len = if spec.freq == Freq::Dynamic {
            n
        } else {
            target
        };
        let plan = ctx.plan(spec, plan_len)?;
        let run = (spec, &plan, &ids[..n]);
        let (pre, dec) = match args.kv_dtype {
            KvDtype::F32 => time_prefill_decode::<f32>(ctx, args, run)?,
            KvDtype::Bf16 => time_prefill_decode::<half::bf16>(ctx, args, run)?,
            KvDtype::F16 => time_prefill_decode::<half::f16>(ctx, args, run)?,
        };
        eprintln!(
            "{key}: prefill {n} tokens {pre:.2} s ({:.0} tok/s), decode {:.1} ms/token ({:.1} tok/s)",
            n as f64 / pre,
            dec * 1e3,
            1.0 / dec
        );
        md += &format!(
            "| {} | {pre:.2} | {:.0} | {:.4} | {:.1} |\n",
            spec.label(ctx.train_len),
            n as f64 / pre,
            dec,
            1.0 / dec
        );
        rows.push(serde_json::json!({
            "key": key, "prefill_seconds": pre, "prefill_tokens_per_second": n as f64 / pre,
            "decode_seconds_per_token": dec, "decode_tokens_per_second": 1.0 / dec,
        }));
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(args.out_dir.join("speed.md"), &md)?;
    let json = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "prompt_tokens": n, "new_tokens": args.new_tokens, "threads": threads,
        "kv_dtype": args.kv_dtype.name(),
        "reps": args.speed_reps, "schemes": rows,
    });
    std::fs::write(
        args.out_dir.join("speed.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

fn passkey_mode(ctx: &Ctx, args: &Args, schemes: &[(String, Spec)]) -> Res<()> {
    let t_all = Instant::now();
    let keys = passkey::keys(args.keys, 2023);
    let count = |s: &str| {
        ctx.tok
            .encode(s)
            .map(|v| v.len())
            .map_err(|e| ropex_lm::ModelError::Input(e.to_string()))
    };
    let trials = args.passkey_contexts.len() * args.depths.len() * keys.len() * schemes.len();
    let mut progress = Progress::new();
    progress.start(trials as f64);
    let mut acc = vec![vec![None; args.passkey_contexts.len()]; schemes.len()];
    let mut records = Vec::new();
    for (ci, &len) in args.passkey_contexts.iter().enumerate() {
        let budget = len.saturating_sub(args.new_tokens);
        for (si, (key_name, spec)) in schemes.iter().enumerate() {
            let mut hits = 0;
            for &depth in &args.depths {
                for &key in &keys {
                    let (prompt, n) = passkey::fit(budget, depth, key, count)?;
                    let ids = ctx.tok.encode(&prompt.text)?;
                    let target = n + args.new_tokens;
                    // A static scheme is planned for the whole sequence, as its cache is;
                    // dynamic NTK's segments are those of the prompt (the cache refreshes).
                    let plan_len = if spec.freq == Freq::Dynamic {
                        n
                    } else {
                        target
                    };
                    let plan = ctx.plan(spec, plan_len)?;
                    let t = Instant::now();
                    let run = (spec, &plan, &ids[..]);
                    let new = match args.kv_dtype {
                        KvDtype::F32 => greedy_answer::<f32>(ctx, run, args.new_tokens)?,
                        KvDtype::Bf16 => greedy_answer::<half::bf16>(ctx, run, args.new_tokens)?,
                        KvDtype::F16 => greedy_answer::<half::f16>(ctx, run, args.new_tokens)?,
                    };
                    let answer = ctx.tok.decode(&new)?;
                    let got = passkey::parse_answer(&answer);
                    hits += usize::from(got == Some(key));
                    eprintln!(
                        "{key_name} @ {n} tokens, depth {depth}: key {key}, answer {answer:?} \
                         ({:.0} s)",
                        t.elapsed().as_secs_f64()
                    );
                    records.push(serde_json::json!({
                        "scheme": key_name, "context": len, "prompt_tokens": n, "depth": depth,
                        "key": key, "answer": answer, "correct": got == Some(key),
                        "seconds": t.elapsed().as_secs_f64(),
                    }));
                    // Every trial so far, so that an interrupted run keeps its results.
                    std::fs::create_dir_all(&args.out_dir)?;
                    std::fs::write(
                        args.out_dir.join("passkey_trials.json"),
                        serde_json::to_string_pretty(&records)?,
                    )?;
                    progress.advance(1.0, &format!("{} {key_name}", ctx_label(len)));
                }
            }
            acc[si][ci] = Some(100.0 * hits as f64 / (args.depths.len() * keys.len()) as f64);
        }
    }
    progress.finish();
    let cols: Vec<String> = args
        .passkey_contexts
        .iter()
        .map(|&l| ctx_label(l))
        .collect();
    let rows: Vec<(String, Vec<Option<f64>>)> = schemes
        .iter()
        .zip(&acc)
        .map(|((_, s), r)| (s.label(ctx.train_len), r.clone()))
        .collect();
    let md = format!(
        "Passkey accuracy (%) over depths {:?} x {} key(s), {} greedy tokens:\n\n{}",
        args.depths,
        keys.len(),
        args.new_tokens,
        markdown_table("scheme", &cols, &rows, 0, Best::Highest)
    );
    println!("{md}");
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(args.out_dir.join("passkey.md"), &md)?;
    let json = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "contexts": args.passkey_contexts,
        "depths": args.depths,
        "keys": keys,
        "new_tokens": args.new_tokens,
        "accuracy_percent": schemes.iter().zip(&acc).map(|((k, _), a)| serde_json::json!({"key": k, "accuracy": a})).collect::<Vec<_>>(),
        "trials": records,
        "seconds_total": t_all.elapsed().as_secs_f64(),
    });
    std::fs::write(
        args.out_dir.join("passkey.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

fn main() -> Res<()> {
    let mut args = Args::parse();
    if args.quick {
        args.contexts = vec![2048, 4096];
        args.schemes = "rope,ntk,yarn,rerope-w2048,leaky-w2048"
            .split(',')
            .map(String::from)
            .collect();
        args.windows = 1;
        args.passkey_contexts = vec![2048];
        args.depths = vec![0.5];
        args.keys = 1;
    }
    if args.full {
        args.contexts = vec![2048, 4096, 8192, 16384, 32768];
        args.schemes = vec!["all".into()];
        args.windows = 3;
        args.passkey_contexts = vec![4096, 8192, 16384, 32768];
        args.depths = vec![0.1, 0.3, 0.5, 0.7, 0.9];
        args.keys = 3;
    }
    let schemes = parse_schemes(&args.schemes)?;
    let mut contexts = args.contexts.clone();
    contexts.sort_unstable();
    contexts.dedup();
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
    let model = Llama::load(&gguf)?;
    let tok = GgufTokenizer::from_gguf(ropex::gguf::GgufFile::open(&gguf)?.header())?;
    let train_len = model.config().context_len.unwrap_or(8192);
    let ctx = Ctx {
        model,
        tok,
        train_len,
    };
    if args.speed {
        speed_mode(&ctx, &args, &schemes)
    } else if args.passkey {
        passkey_mode(&ctx, &args, &schemes)
    } else {
        loss_mode(&ctx, &args, &schemes, &contexts)
    }
}
