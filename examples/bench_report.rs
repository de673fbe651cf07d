//! One-table performance report of the attention kernels.
//!
//! ```text
//! RAYON_NUM_THREADS=1 taskset -c 0 cargo run --release --features bench-internals --example bench_report
//! cargo run --release --features bench-internals --example bench_report -- --ns 1024,2048 --quick
//! cargo run --release --features bench-internals --example bench_report -- --head-dim 64 --heads 9:3 --threads 2
//! ```
//!
//! Runs causal prefill (f32) for every position map (RoPE, ReRoPE / Leaky w = 512,
//! Self-Extend G = 8 W = 1024, DCA chunk 3072 local 512, StreamingLLM S = 4 W = 1024, and
//! RoPE under a sliding window or chunked mask of 1024) at the first shape, RoPE, ReRoPE
//! and Leaky at the other shapes, and decode against caches of L = 4096 and 32768
//! tokens at the first shape. The default shapes are those of real models:
//!
//! | head dim | query / kv heads | model |
//! |---:|---:|---|
//! | 128 | 8 / 8 | (ropex's historical case) |
//! | 64 | 9 / 3 | SmolLM2-135M |
//! | 64 | 32 / 8 | Llama 3.2 1B |
//! | 128 | 32 / 8 | Llama 3.1 8B |
//!
//! `--head-dim d` and/or `--heads q:kv` replace the table by that one shape (the other
//! defaulting to 128 and 8:8). Everything runs inside a local rayon pool of `--threads`
//! workers (default 1). The pool fixes the number of workers, but the OS may still move
//! them between cores: pin them (`taskset -c 0`, or `-c 0,1` for two). Each case is run
//! a few times after a warm-up, interleaved with the others, and the median is reported:
//! with one thread in on-CPU time of the worker (`CLOCK_THREAD_CPUTIME_ID`, so that other
//! jobs on a shared machine do not inflate it), with several (or `--wall`) in wall-clock
//! time. Beside each time: the ratio to the plain case of the same run and shape
//! (`rope_tiled` for prefill, `rope` for decode), the share of the FMA-loop peak of the
//! instruction set in use (prefill; measured in this process on one thread, times the
//! thread count) and of the streaming read bandwidth (decode: a plain sum over a buffer
//! of the cache's K/V bytes, timed in the same rounds as the decode steps, since a
//! shared host's memory bandwidth moves from second to second). With `--threads t > 1`
//! every shape also runs `rope_tiled` in a 1-thread pool in the same rounds, for the
//! scaling ratio. Ends with the issue's targets, each marked met or not.
//!
//! The tiled rows use the tile sizes the planner picks (`Kernel::default()`, see
//! `ropex::attention::Kernel`) unless `--tiles BQxBK` fixes them.
//!
//! Flags: `--ns a,b,c` prefill lengths (default 1024,2048,4096), `--ls a,b` decode
//! lengths (default 4096,32768), `--reps k` timed runs per prefill case (default 5, 3 for
//! the slow two-pass cases; decode cases run `max(4 k, 20)` times), `--quick` (n = 1024
//! and 2048, L = 4096, 3 runs, two-pass only at the smallest n), `--no-two-pass`,
//! `--head-dim d`, `--heads q:kv`, `--threads t`, `--tiles BQxBK`,
//! `--tune 64x64,128x128,..` (only a tile-size table: rope_tiled and rerope_tiled at the
//! largest n per size and shape), `--bf16` (also RoPE, ReRoPE and Leaky on bf16 inputs
//! and outputs, with bf16 tile products where `Bf16Products::Auto` uses them; their share
//! is of the `vdpbf16ps` loop's peak then), `--wall`, `--busiest` (with `--threads t > 1`: time
//! each call by the on-CPU time of the pool's busiest worker, and the 1-thread case by
//! its own, so the scaling ratio shows load balance even when other jobs hold the
//! cores), `--markdown` (only a header line naming the
//! CPU (`/proc/cpuinfo` model name and family), the instruction set in use, the FMA-loop
//! peak and the read bandwidth, then the table in exactly the form of the README's
//! "Attention kernels" tables).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ndarray::{Array3, s};
use rayon::ThreadPool;
use ropex::attention::decode::{DecodeCache, KvCache, KvCacheRerotating};
use ropex::attention::kernels::{Kernels, thread_cpu_time, time_on_cpu};
use ropex::attention::{Attention, Bf16Products, Kernel, Mask, TileConfig, TiledScratch};
use ropex::{CacheShape, Element, Layout, PositionMap, RopeConfig};

#[path = "../tests/common/mod.rs"]
mod common;
use common::rand3;

const WINDOW: usize = 512;
const LEAK: f64 = 16.0;
/// Sliding-window and chunked-attention span of the masked prefill cases.
const MASK_SPAN: usize = 1024;

/// One attention shape: head dim and query / kv heads.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shape {
    head_dim: usize,
    heads_q: usize,
    heads_kv: usize,
}

impl Shape {
    const fn new(head_dim: usize, heads_q: usize, heads_kv: usize) -> Self {
        Shape {
            head_dim,
            heads_q,
            heads_kv,
        }
    }

    /// `d=128 8/8`.
    fn label(&self) -> String {
        format!("d={} {}/{}", self.head_dim, self.heads_q, self.heads_kv)
    }

    /// Flops of causal prefill of `n` tokens: `4 H_q d n (n + 1) / 2` (two products).
    fn prefill_flops(&self, n: usize) -> f64 {
        (4 * self.heads_q * self.head_dim) as f64 * (n * (n + 1) / 2) as f64
    }

    fn config(&self) -> RopeConfig {
        RopeConfig::new(self.head_dim, 10_000.0).expect("valid rope config")
    }
}

/// The default table: ropex's historical case, SmolLM2-135M, Llama 3.2 1B, Llama 3.1 8B.
const SHAPES: [Shape; 4] = [
    Shape::new(128, 8, 8),
    Shape::new(64, 9, 3),
    Shape::new(64, 32, 8),
    Shape::new(128, 32, 8),
];

/// Use wall-clock time instead of on-CPU time (`--wall`).
static WALL: AtomicBool = AtomicBool::new(false);

/// Print only the README's header line and table (`--markdown`).
static MARKDOWN: AtomicBool = AtomicBool::new(false);

/// Time of one call of `f`: with one thread, on-CPU time of this thread when available
/// (all work runs on it: the rayon pool has one thread and `install` runs on it); with
/// several, the on-CPU time of the busiest worker of the pool (`--busiest`); else
/// wall-clock. A case that timed itself ([`SELF_TIMED`]) reports its own time.
fn time_once(f: &mut dyn FnMut()) -> Duration {
    let t = if BUSIEST.load(Ordering::Relaxed) {
        let cpu = || rayon::broadcast(|_| thread_cpu_time().unwrap_or_default());
        let before = cpu();
        f();
        let after = cpu();
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b))
            .max()
            .unwrap_or_default()
    } else if WALL.load(Ordering::Relaxed) {
        let t = Instant::now();
        f();
        t.elapsed()
    } else {
        time_on_cpu(f)
    };
    SELF_TIMED
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or(t)
}

/// Time a case measured itself (the 1-thread case inside a run of `t > 1` threads: its
/// work runs on another pool's thread).
static SELF_TIMED: std::sync::Mutex<Option<Duration>> = std::sync::Mutex::new(None);

/// With several threads: time a case by the on-CPU time of the pool's busiest worker
/// (`--busiest`): what the call would take on cores of its own, load imbalance
/// included, whatever else the machine runs.
static BUSIEST: AtomicBool = AtomicBool::new(false);

/// A case to time: runs wanted and the call.
type Run<'a> = (usize, Box<dyn FnMut() + 'a>);

/// Medians of interleaved runs: one warm-up run of every case, then rounds in which
/// every case with `reps` left runs once, so slow drifts in machine load hit every
/// case alike and the ratios stay fair.
fn interleaved_medians(runs: &mut [Run<'_>]) -> Vec<Duration> {
    let mut times: Vec<Vec<Duration>> = runs.iter().map(|_| Vec::new()).collect();
    for (_, f) in runs.iter_mut() {
        f();
    }
    let rounds = runs.iter().map(|r| r.0).max().unwrap_or(0);
    for round in 0..rounds {
        for ((reps, f), t) in runs.iter_mut().zip(times.iter_mut()) {
            if round < *reps {
                t.push(time_once(f));
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_unstable();
            t.get(t.len() / 2).copied().unwrap_or_default()
        })
        .collect()
}

struct Options {
    ns: Vec<usize>,
    ls: Vec<usize>,
    reps: usize,
    quick: bool,
    two_pass: bool,
    shapes: Vec<Shape>,
    threads: usize,
    /// Fixed tile sizes (`--tiles`), else the planner's.
    tiles: Option<TileConfig>,
    tune: Vec<TileConfig>,
    /// Also the bf16 cases (`--bf16`).
    bf16: bool,
}

fn parse_list(flag: &str, value: Option<String>) -> Vec<usize> {
    let value = value.unwrap_or_else(|| panic!("{flag} needs a value, e.g. {flag} 1024,2048"));
    value
        .split(',')
        .map(|x| {
            x.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{flag}: not a number: {x:?}"))
        })
        .collect()
}

fn parse_tiles(value: Option<String>) -> Vec<TileConfig> {
    let value = value.expect("tile sizes, e.g. 64x64,128x64");
    value
        .split(',')
        .map(|t| {
            let (a, b) = t.trim().split_once('x').expect("tile size BQxBK");
            TileConfig::new(a.parse().expect("BQ"), b.parse().expect("BK")).expect("tile size")
        })
        .collect()
}

fn parse_heads(value: Option<String>) -> (usize, usize) {
    let value = value.expect("--heads q:kv, e.g. --heads 32:8");
    let (q, kv) = value.split_once(':').expect("--heads q:kv");
    let (q, kv): (usize, usize) = (
        q.parse().expect("query heads"),
        kv.parse().expect("kv heads"),
    );
    assert!(
        kv > 0 && q % kv == 0,
        "--heads {q}:{kv}: query heads must be a multiple of kv heads"
    );
    (q, kv)
}

fn options() -> Options {
    let mut o = Options {
        ns: vec![1024, 2048, 4096],
        ls: vec![4096, 32768],
        reps: 5,
        quick: false,
        two_pass: true,
        shapes: SHAPES.to_vec(),
        threads: 1,
        tiles: None,
        tune: Vec::new(),
        bf16: false,
    };
    let (mut ns, mut ls, mut reps) = (None, None, None);
    let (mut head_dim, mut heads) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ns" => ns = Some(parse_list("--ns", args.next())),
            "--ls" => ls = Some(parse_list("--ls", args.next())),
            "--reps" => reps = parse_list("--reps", args.next()).first().copied(),
            "--head-dim" => head_dim = parse_list("--head-dim", args.next()).first().copied(),
            "--heads" => heads = Some(parse_heads(args.next())),
            "--threads" => {
                o.threads = parse_list("--threads", args.next())
                    .first()
                    .copied()
                    .unwrap_or(1)
                    .max(1)
            }
            "--quick" => o.quick = true,
            "--wall" => WALL.store(true, Ordering::Relaxed),
            "--busiest" => BUSIEST.store(true, Ordering::Relaxed),
            "--markdown" => MARKDOWN.store(true, Ordering::Relaxed),
            "--no-two-pass" => o.two_pass = false,
            "--bf16" => o.bf16 = true,
            "--tiles" => o.tiles = parse_tiles(args.next()).first().copied(),
            "--tune" => o.tune = parse_tiles(args.next()),
            "-h" | "--help" => {
                println!(
                    "bench_report [--ns 1024,2048,4096] [--ls 4096,32768] [--reps 5] [--quick] \
                     [--no-two-pass] [--head-dim 128] [--heads 8:8] [--threads 1] [--tiles 64x64] \
                     [--tune 64x64,128x64,..] [--bf16] [--wall] [--busiest] [--markdown]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?} (try --help)"),
        }
    }
    if o.quick {
        o.ns = vec![1024, 2048];
        o.ls = vec![4096];
        o.reps = 3;
    }
    if head_dim.is_some() || heads.is_some() {
        let (q, kv) = heads.unwrap_or((8, 8));
        o.shapes = vec![Shape::new(head_dim.unwrap_or(128), q, kv)];
    }
    if o.threads > 1 {
        // On-CPU time of one thread misses the other workers.
        if !BUSIEST.load(Ordering::Relaxed) {
            WALL.store(true, Ordering::Relaxed);
        }
    } else {
        BUSIEST.store(false, Ordering::Relaxed);
    }
    o.ns = ns.unwrap_or(o.ns);
    o.ls = ls.unwrap_or(o.ls);
    o.reps = reps.unwrap_or(o.reps).max(1);
    o
}

/// One row of the table.
struct Row {
    case: String,
    shape: String,
    size: String,
    ms: f64,
    /// GFLOP/s (prefill) or GB/s (decode).
    rate: f64,
    unit: &'static str,
    ratio: Option<(f64, &'static str)>,
    of_machine: f64,
    machine: &'static str,
}

/// One timed prefill case.
struct PrefillResult {
    shape: Shape,
    n: usize,
    case: &'static str,
    ms: f64,
}

/// Results kept for the target checks.
#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    prefill: Vec<PrefillResult>,
    /// `(L, case) -> (ms, GB/s, GB/s of the plain read in the same rounds)`.
    decode: Vec<(usize, &'static str, f64, f64, f64)>,
}

/// Name of the 1-thread rope case run beside the others when `--threads t > 1`.
const ONE_THREAD: &str = "rope_tiled_1_thread";

/// One tiled call with the options' tiles (the planner's without `--tiles`).
/// One tiled prefill as an engine calls it: into its output buffer, in a scratch kept
/// across calls (`buf`, made on first use), with the planner's tiles unless `--tiles`.
fn tiled_call<T: Element>(
    o: &Options,
    att: &Attention,
    (q, k, v): (&Array3<T>, &Array3<T>, &Array3<T>),
    pos: &[usize],
    buf: &mut Option<(TiledScratch, Array3<T>)>,
) {
    let kernel = o.tiles.map_or_else(Kernel::default, Kernel::Tiled);
    let (scratch, out) = buf.get_or_insert_with(|| {
        let (n, h, _) = q.dim();
        (
            TiledScratch::new(),
            Array3::from_elem((n, h, v.dim().2), T::default()),
        )
    });
    att.run_into_reusing(
        kernel,
        q.view(),
        k.view(),
        v.view(),
        pos,
        pos,
        &mut *out,
        scratch,
    )
    .expect("tiled attention");
    std::hint::black_box(out);
}

/// Prefill cases of one shape; every map and mask with `full`, else RoPE, ReRoPE and
/// Leaky. `single` is the 1-thread pool for the scaling case (only with `--threads > 1`).
/// The bf16 cases of `--bf16`, twins of the first three f32 cases (RoPE, ReRoPE, Leaky).
const BF16_CASES: [&str; 3] = ["rope_tiled_bf16", "rerope_tiled_bf16", "leaky_tiled_bf16"];

fn prefill(
    o: &Options,
    shape: Shape,
    full: bool,
    (peak, bf16_peak): (f64, Option<f64>),
    single: Option<&ThreadPool>,
    res: &mut Results,
) {
    let freqs = shape.config().frequencies();
    let (d, hq, hkv) = (shape.head_dim, shape.heads_q, shape.heads_kv);
    let smallest = o.ns.iter().copied().min().unwrap_or(0);
    for &n in &o.ns {
        let q = rand3((n, hq, d), 1);
        let k = rand3((n, hkv, d), 2);
        let v = rand3((n, hkv, d), 3);
        let half = |x: &Array3<f32>| x.mapv(half::bf16::from_f32);
        let (qh, kh, vh) = (half(&q), half(&k), half(&v));
        let pos: Vec<usize> = (0..n).collect();
        let flops = shape.prefill_flops(n);
        let w = WINDOW.min(n.saturating_sub(1)).max(1);
        let none = Mask::NONE;
        let mut cases: Vec<(&'static str, PositionMap, Mask, bool)> = vec![
            ("rope_tiled", PositionMap::Rope, none, false),
            ("rerope_tiled", PositionMap::rerope(w).unwrap(), none, false),
            (
                "leaky_tiled",
                PositionMap::leaky_rerope(w, LEAK).unwrap(),
                none,
                false,
            ),
        ];
        if full {
            cases.extend([
                ("self_extend_tiled", self_extend_map(), none, false),
                ("dca_tiled", dca_map(), none, false),
                ("streaming_tiled", streaming_map(), none, false),
                (
                    "sliding_window_tiled",
                    PositionMap::Rope,
                    none.with_sliding_window(MASK_SPAN).unwrap(),
                    false,
                ),
                (
                    "chunked_tiled",
                    PositionMap::Rope,
                    none.with_chunked(MASK_SPAN).unwrap(),
                    false,
                ),
                (
                    "rerope_two_pass",
                    PositionMap::rerope(w).unwrap(),
                    none,
                    true,
                ),
                ("rope_two_pass", PositionMap::Rope, none, true),
            ]);
        }
        if single.is_some() {
            cases.push((ONE_THREAD, PositionMap::Rope, none, false));
        }
        let cases: Vec<_> = cases
            .into_iter()
            .filter(|c| !c.3 || (o.two_pass && !(o.quick && n > smallest)))
            .collect();
        let atts: Vec<Attention> = cases
            .iter()
            .map(|c| {
                Attention::new(freqs.clone(), Layout::Half, c.1)
                    .with_mask(c.2)
                    .expect("mask")
            })
            .collect();
        let mut runs: Vec<Run<'_>> = cases
            .iter()
            .zip(&atts)
            .map(|(&(name, _, _, two_pass), att)| {
                let reps = if two_pass { o.reps.min(3) } else { o.reps };
                let (qkv, pos) = ((&q, &k, &v), &pos);
                let mut buf = None;
                let f: Box<dyn FnMut() + '_> = match (two_pass, single) {
                    (true, _) => Box::new(move || {
                        let (q, k, v) = qkv;
                        let out = att.two_pass(q.view(), k.view(), v.view(), pos, pos);
                        std::hint::black_box(out.expect("attention"));
                    }),
                    (false, Some(pool)) if name == ONE_THREAD => Box::new(move || {
                        let t = pool.install(|| {
                            if BUSIEST.load(Ordering::Relaxed) {
                                time_on_cpu(&mut || tiled_call(o, att, qkv, pos, &mut buf))
                            } else {
                                let t = Instant::now();
                                tiled_call(o, att, qkv, pos, &mut buf);
                                t.elapsed()
                            }
                        });
                        if let Ok(mut s) = SELF_TIMED.lock() {
                            *s = Some(t);
                        }
                    }),
                    (false, _) => Box::new(move || tiled_call(o, att, qkv, pos, &mut buf)),
                };
                (reps, f)
            })
            .collect();
        let bf16_cases: &[&str] = if o.bf16 { &BF16_CASES } else { &[] };
        for (_, att) in bf16_cases.iter().zip(&atts) {
            let (qkv, pos) = ((&qh, &kh, &vh), &pos);
            let mut buf = None;
            runs.push((
                o.reps,
                Box::new(move || tiled_call(o, att, qkv, pos, &mut buf)),
            ));
        }
        let times = interleaved_medians(&mut runs);
        let mut base = None;
        let labelled = cases
            .iter()
            .map(|&(name, map, mask, _)| (name, map, mask))
            .chain(
                bf16_cases
                    .iter()
                    .zip(&cases)
                    .map(|(&name, &(_, map, mask, _))| (name, map, mask)),
            );
        for ((name, map, mask), t) in labelled.zip(times) {
            let ms = t.as_secs_f64() * 1e3;
            let gflops = flops / t.as_secs_f64() / 1e9;
            let base_ms = *base.get_or_insert(ms);
            let map_label = match (map, mask.sliding_window(), mask.chunk()) {
                (PositionMap::Rope, Some(s), _) => format!(", window {s}"),
                (PositionMap::Rope, _, Some(c)) => format!(", chunk {c}"),
                (PositionMap::Rope, ..) => String::new(),
                (PositionMap::ReRope { .. } | PositionMap::LeakyReRope { .. }, ..) => {
                    format!(", w={w}")
                }
                _ => format!(", {map}"),
            };
            // The 1-thread case is measured against the 1-thread peak, bf16 products
            // against the bf16 dot-product peak.
            let (of_peak, machine) = match bf16_peak {
                Some(p) if bf16_cases.contains(&name) => (gflops / p, "of bf16-dot peak"),
                _ if name == ONE_THREAD => (gflops * o.threads as f64 / peak, "of FMA peak"),
                _ => (gflops / peak, "of FMA peak"),
            };
            res.rows.push(Row {
                case: name.to_string(),
                shape: shape.label(),
                size: format!("n={n}{map_label}"),
                ms,
                rate: gflops,
                unit: "GFLOP/s",
                ratio: Some((ms / base_ms, "rope_tiled")),
                of_machine: of_peak,
                machine,
            });
            res.prefill.push(PrefillResult {
                shape,
                n,
                case: name,
                ms,
            });
        }
    }
}

/// Tile-size tuning: rope_tiled and rerope_tiled (w = 512) at the largest `n` for
/// each tile size and shape, one table.
fn tune(o: &Options, peak: f64) {
    let n = o.ns.iter().copied().max().unwrap_or(4096);
    let w = WINDOW.min(n.saturating_sub(1)).max(1);
    println!(
        "tile tuning at n={n}, w={w} ({} thread(s), median of {} runs; FMA peak {peak:.1} GFLOP/s)",
        o.threads, o.reps
    );
    println!();
    println!(
        "| shape | block_q x block_k | rope_tiled (ms) | GFLOP/s | rerope_tiled (ms) | GFLOP/s | rerope / rope |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for shape in &o.shapes {
        let (d, hq, hkv) = (shape.head_dim, shape.heads_q, shape.heads_kv);
        let freqs = shape.config().frequencies();
        let q = rand3((n, hq, d), 1);
        let k = rand3((n, hkv, d), 2);
        let v = rand3((n, hkv, d), 3);
        let pos: Vec<usize> = (0..n).collect();
        let flops = shape.prefill_flops(n);
        let atts = [
            Attention::new(freqs.clone(), Layout::Half, PositionMap::Rope),
            Attention::new(freqs.clone(), Layout::Half, PositionMap::rerope(w).unwrap()),
        ];
        let mut runs: Vec<Run<'_>> = Vec::new();
        for tiles in &o.tune {
            for att in &atts {
                let (q, k, v, pos) = (&q, &k, &v, &pos);
                runs.push((
                    o.reps,
                    Box::new(move || {
                        std::hint::black_box(
                            att.tiled_with(q.view(), k.view(), v.view(), pos, pos, tiles)
                                .expect("tiled"),
                        );
                    }),
                ));
            }
        }
        let times = interleaved_medians(&mut runs);
        for (tiles, t) in o.tune.iter().zip(times.chunks(2)) {
            let (rope, rerope) = (t[0].as_secs_f64(), t[1].as_secs_f64());
            println!(
                "| {} | {}x{} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
                shape.label(),
                tiles.block_q,
                tiles.block_k,
                rope * 1e3,
                flops / rope / 1e9,
                rerope * 1e3,
                flops / rerope / 1e9,
                rerope / rope
            );
        }
    }
}

fn filled<C: DecodeCache>(mut cache: C, k: &Array3<f32>, v: &Array3<f32>) -> C {
    let len = k.dim().0;
    let mut at = 0;
    while at < len {
        let end = (at + 4096).min(len);
        cache
            .append(k.slice(s![at..end, .., ..]), v.slice(s![at..end, .., ..]))
            .expect("append");
        at = end;
    }
    cache
}

fn decode(o: &Options, shape: Shape, res: &mut Results) {
    let (d, hq, hkv) = (shape.head_dim, shape.heads_q, shape.heads_kv);
    let cache_shape = CacheShape::square(hkv, d);
    for &len in &o.ls {
        let k = rand3((len, hkv, d), 4);
        let v = rand3((len, hkv, d), 5);
        let q = rand3((1, hq, d), 6);
        let step = [len - 1];
        let bytes = (4 * hkv * len * 2 * d) as f64;
        let w = WINDOW.min(len.saturating_sub(1)).max(1);
        // A plain read of as many bytes as a step's K/V, timed in the same rounds.
        let plain = vec![1.0f32; 2 * hkv * len * d];
        let mut base = None;
        let mut record = |name: &'static str, t: Duration, stream_gbs: f64, res: &mut Results| {
            let ms = t.as_secs_f64() * 1e3;
            let gbs = bytes / t.as_secs_f64() / 1e9;
            let base_ms = *base.get_or_insert(ms);
            res.rows.push(Row {
                case: name.to_string(),
                shape: shape.label(),
                size: match name {
                    "rope" => format!("L={len}"),
                    "self_extend_cache" => format!("L={len}, {}", self_extend_map()),
                    "dca_cache" => format!("L={len}, {}", dca_map()),
                    _ => format!("L={len}, w={w}"),
                },
                ms,
                rate: gbs,
                unit: "GB/s",
                ratio: Some((ms / base_ms, "rope")),
                of_machine: gbs / stream_gbs,
                machine: "of read bandwidth",
            });
            res.decode.push((len, name, ms, gbs, stream_gbs));
        };
        // Decode steps are short and memory-bound: more runs for a stable median.
        let reps = (4 * o.reps).max(20);
        let names = [
            "rope",
            "rerope_cache",
            "leaky_cache",
            "self_extend_cache",
            "dca_cache",
            "rerope_rerotating (Su)",
        ];
        let caches: Vec<KvCache> = [
            PositionMap::Rope,
            PositionMap::rerope(w).unwrap(),
            PositionMap::leaky_rerope(w, LEAK).unwrap(),
            self_extend_map(),
            dca_map(),
        ]
        .into_iter()
        .map(|map| {
            filled(
                KvCache::new(shape.config(), Layout::Half, map, cache_shape).unwrap(),
                &k,
                &v,
            )
        })
        .collect();
        let su = filled(
            KvCacheRerotating::new(
                shape.config(),
                Layout::Half,
                PositionMap::rerope(w).unwrap(),
                cache_shape,
            )
            .unwrap(),
            &k,
            &v,
        );
        let (q, step) = (&q, &step);
        let mut runs: Vec<Run<'_>> = caches
            .iter()
            .map(|cache| -> Run<'_> {
                (
                    reps,
                    Box::new(move || {
                        std::hint::black_box(cache.attend(q.view(), step).expect("attend"));
                    }),
                )
            })
            .collect();
        runs.push((
            o.reps.min(3),
            Box::new(|| {
                std::hint::black_box(su.attend(q.view(), step).expect("attend"));
            }),
        ));
        runs.push((
            reps,
            Box::new(|| {
                std::hint::black_box(sum(&plain));
            }),
        ));
        let mut times = interleaved_medians(&mut runs);
        let plain_time = times.pop().expect("the plain read's time");
        let stream_gbs = bytes / plain_time.as_secs_f64() / 1e9;
        for (name, t) in names.into_iter().zip(times) {
            record(name, t, stream_gbs, res);
        }
    }
}

/// Self-Extend as the method's authors run it: group 8, neighbour window 1024.
fn self_extend_map() -> PositionMap {
    PositionMap::self_extend(8, 1024).expect("self-extend")
}

/// Dual Chunk Attention at an 8k model's published setting scaled to these lengths:
/// chunk 3072, local window 512.
fn dca_map() -> PositionMap {
    PositionMap::dca(3072, 512).expect("dca")
}

/// StreamingLLM: 4 sinks, window 1024.
fn streaming_map() -> PositionMap {
    PositionMap::streaming(4, 1024).expect("streaming")
}

// ---------------------------------------------------------------------------------
// Machine measurements

/// f32 FMA-loop peak in GFLOP/s on this thread, from the SIMD kernels' FMA loop
/// ([`Kernels::fma_peak_gflops_with`], best of ~1 ms runs over 1 s), each run timed
/// like the cases.
fn fma_peak() -> f64 {
    Kernels::active().fma_peak_gflops_with(Duration::from_secs(1), time_once)
}

/// bf16 dot-product peak in GFLOP/s on this thread (`vdpbf16ps` chains, best of ~1 ms
/// runs over 1 s, timed like the cases), if the CPU has the instruction.
fn bf16_dot_peak() -> Option<f64> {
    let bf = Kernels::active().bf16()?;
    let iters = 100_000u64;
    let start = Instant::now();
    let mut best = 0f64;
    while start.elapsed() < Duration::from_secs(1) {
        let t = time_once(&mut || {
            std::hint::black_box(bf.dot_loop(std::hint::black_box(iters)));
        });
        best = best.max(bf.dot_loop_flops(iters) as f64 / t.as_secs_f64().max(1e-9) / 1e9);
    }
    Some(best)
}

/// The CPU as `/proc/cpuinfo` names it: `model name (family F model M)`, or `unknown CPU`.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    match (field("model name"), field("cpu family")) {
        (Some(m), Some(f)) => match field("model") {
            Some(model) => format!("{m} (family {f} model {model})"),
            None => format!("{m} (family {f})"),
        },
        (Some(m), None) => m,
        _ => "unknown CPU".to_string(),
    }
}

/// Streaming read bandwidth in GB/s: sum of a 1 GiB buffer, best of 5 passes (timed
/// like the cases).
fn read_bandwidth() -> f64 {
    let buf = vec![1.0f32; 1 << 28];
    let mut best = 0f64;
    for _ in 0..5 {
        let secs = time_once(&mut || {
            std::hint::black_box(sum(&buf));
        })
        .as_secs_f64();
        best = best.max((buf.len() * 4) as f64 / secs / 1e9);
    }
    best
}

fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { sum_avx2(x) };
    }
    let mut acc = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    let chunks = x.chunks_exact(64);
    for c in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` has 64 elements, so `8 i .. 8 i + 8` is in bounds.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * i)) };
            *a = _mm256_add_ps(*a, v);
        }
    }
    let mut out = [0f32; 8];
    let mut total = _mm256_setzero_ps();
    for a in acc {
        total = _mm256_add_ps(total, a);
    }
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
    out.iter().sum()
}

// ---------------------------------------------------------------------------------
// Report

fn print_table(res: &Results) {
    if MARKDOWN.load(Ordering::Relaxed) {
        print_markdown(res);
        return;
    }
    println!("| case | shape | size | time (ms) | throughput | ratio | of machine |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for r in &res.rows {
        let ratio = r
            .ratio
            .map_or(String::new(), |(x, base)| format!("{x:.3} x {base}"));
        println!(
            "| {} | {} | {} | {:.2} | {:.1} {} | {} | {:.0}% {} |",
            r.case,
            r.shape,
            r.size,
            r.ms,
            r.rate,
            r.unit,
            ratio,
            100.0 * r.of_machine,
            r.machine
        );
    }
}

/// The README's form: prefill rows by name, decode rows as `decode <cache>`, the share
/// of the machine on the plain rows (`rope_tiled`, decode `rope`), ratios to three
/// decimals below 2 and two above.
fn print_markdown(res: &Results) {
    println!("| case | shape | size | time (ms) | throughput | ratio |");
    println!("|---|---|---|---:|---:|---:|");
    for r in &res.rows {
        let (case, size) = match r.unit {
            "GB/s" => {
                let name = match r.case.as_str() {
                    "rerope_rerotating (Su)" => "Su's re-rotating",
                    c => c,
                };
                (format!("decode {name}"), r.size.clone())
            }
            _ => (r.case.clone(), r.size.clone()),
        };
        let share = if matches!(
            r.case.as_str(),
            "rope_tiled" | "rope" | ONE_THREAD | "rope_tiled_bf16"
        ) {
            let of = match (r.unit, r.machine) {
                ("GB/s", _) => "of read bandwidth",
                (_, "of bf16-dot peak") => "of bf16-dot peak",
                _ => "of peak",
            };
            format!(" ({:.0}% {of})", 100.0 * r.of_machine)
        } else {
            String::new()
        };
        let ratio = r.ratio.map_or(String::new(), |(x, _)| {
            if x < 2.0 {
                format!("{x:.3}")
            } else {
                format!("{x:.2}")
            }
        });
        println!(
            "| {case} | {} | {size} | {:.2} | {:.1} {}{share} | {ratio} |",
            r.shape, r.ms, r.rate, r.unit
        );
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Targets of one shape: share of peak at the largest n, map ratios at every n, the
/// other maps and masks at the largest n, and the thread scaling.
fn print_shape_targets(o: &Options, res: &Results, shape: Shape, peak: f64) {
    let pf = |n: usize, case: &str| {
        res.prefill
            .iter()
            .find(|r| r.shape == shape && r.n == n && r.case == case)
            .map(|r| r.ms)
    };
    let label = shape.label();
    let Some(largest) = o.ns.iter().copied().max() else {
        return;
    };
    if let Some(rope) = pf(largest, "rope_tiled") {
        let g = shape.prefill_flops(largest) / rope / 1e6;
        let want = if shape.head_dim >= 128 { 0.70 } else { 0.60 };
        println!(
            "- {label} rope_tiled at n={largest}: {g:.1} GFLOP/s = {:.0}% of peak (target >= {:.0}%): {}",
            100.0 * g / peak,
            100.0 * want,
            mark(g / peak >= want)
        );
        if let Some(one) = pf(largest, ONE_THREAD) {
            let x = one / rope;
            println!(
                "- {label} {} threads / 1 thread at n={largest}: {x:.2}x (target >= 1.85): {}",
                o.threads,
                mark(x >= 1.85)
            );
        }
    }
    for &n in &o.ns {
        let Some(rope) = pf(n, "rope_tiled") else {
            continue;
        };
        for (case, target) in [("rerope_tiled", 1.05), ("leaky_tiled", 1.06)] {
            if let Some(r) = pf(n, case) {
                let x = r / rope;
                println!(
                    "- {label} {case} / rope_tiled at n={n}, w={WINDOW}: {x:.3} (target <= {target:.2}): {}",
                    mark(x <= target)
                );
            }
        }
    }
    if let Some(rope) = pf(largest, "rope_tiled") {
        // The other position maps and the masks (at most 1.08 for Self-Extend and DCA,
        // 1.03 for StreamingLLM; the masks skip the tiles they hide, so they cost less
        // than full causal attention).
        for (case, target) in [
            ("self_extend_tiled", 1.08),
            ("dca_tiled", 1.08),
            ("streaming_tiled", 1.03),
            ("sliding_window_tiled", 0.50),
            ("chunked_tiled", 0.30),
        ] {
            if let Some(r) = pf(largest, case) {
                let x = r / rope;
                println!(
                    "- {label} {case} / rope_tiled at n={largest}: {x:.3} (target <= {target:.2}): {}",
                    mark(x <= target)
                );
            }
        }
    }
    let both = res
        .prefill
        .iter()
        .filter(|r| r.shape == shape && r.case == "rerope_two_pass")
        .map(|r| r.n)
        .max();
    if let Some((m, tp, t)) =
        both.and_then(|m| Some((m, pf(m, "rerope_two_pass")?, pf(m, "rerope_tiled")?)))
    {
        let x = tp / t;
        println!(
            "- {label} rerope_two_pass / rerope_tiled at n={m}: {x:.2} (target >= 3): {}",
            mark(x >= 3.0)
        );
    }
}

fn print_decode_targets(res: &Results, shape: Shape, bandwidth: f64) {
    let dc = |l: usize, case: &str| {
        res.decode
            .iter()
            .find(|(m, c, ..)| *m == l && *c == case)
            .map(|r| (r.2, r.3, r.4))
    };
    let label = shape.label();
    if let Some(&l) = res.decode.iter().map(|(l, ..)| l).max()
        && let (Some(rope), Some(re)) = (dc(l, "rope"), dc(l, "rerope_cache"))
    {
        let x = re.0 / rope.0;
        println!(
            "- {label} decode L={l}: rerope_cache / rope = {x:.3} (target <= 1.05): {}",
            mark(x <= 1.05)
        );
        if let Some(leaky) = dc(l, "leaky_cache") {
            println!(
                "- {label} decode L={l}: leaky_cache / rope = {:.3} (reported)",
                leaky.0 / rope.0
            );
        }
        for case in ["self_extend_cache", "dca_cache"] {
            if let Some(c) = dc(l, case) {
                let x = c.0 / rope.0;
                println!(
                    "- {label} decode L={l}: {case} / rope = {x:.3} (target <= 1.05): {}",
                    mark(x <= 1.05)
                );
            }
        }
        if let Some(su) = dc(l, "rerope_rerotating (Su)") {
            println!(
                "- {label} decode L={l}: Su's re-rotating / rope = {:.2} (reported; expected 2-4)",
                su.0 / rope.0
            );
        }
        let frac = rope.1 / rope.2;
        println!(
            "- {label} decode L={l}: rope reads K/V at {:.1} GB/s = {:.0}% of {:.1} GB/s, a plain read of the same bytes in the same rounds (target >= 80%): {} ({:.0}% of the {:.1} GB/s best 1 GiB read before the run)",
            rope.1,
            100.0 * frac,
            rope.2,
            mark(frac >= 0.8),
            100.0 * rope.1 / bandwidth,
            bandwidth,
        );
    }
}

fn main() {
    let o = options();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(o.threads)
        .build()
        .expect("rayon pool");
    let single = (o.threads > 1).then(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("1-thread pool")
    });
    let kern = Kernels::active();
    // The peak of one thread, measured on a worker of a 1-thread pool, times the thread
    // count (each core is assumed to reach the 1-thread peak).
    let peak_1 = single.as_ref().unwrap_or(&pool).install(fma_peak);
    let peak = peak_1 * o.threads as f64;
    // With `--bf16` where bf16 products are used: the vdpbf16ps loop's peak, alike.
    let bf16_1 = (o.bf16 && Bf16Products::Auto.applies())
        .then(|| single.as_ref().unwrap_or(&pool).install(bf16_dot_peak))
        .flatten();
    let bf16_peak = bf16_1.map(|p| p * o.threads as f64);
    pool.install(|| {
        if !o.tune.is_empty() {
            tune(&o, peak);
            return;
        }
        let bandwidth = read_bandwidth();
        let mut res = Results::default();
        for (i, &shape) in o.shapes.iter().enumerate() {
            prefill(&o, shape, i == 0, (peak, bf16_peak), single.as_ref(), &mut res);
        }
        if let Some(&first) = o.shapes.first() {
            decode(&o, first, &mut res);
        }
        let clock = if BUSIEST.load(Ordering::Relaxed) {
            "on-CPU time of the busiest worker thread"
        } else if WALL.load(Ordering::Relaxed) || thread_cpu_time().is_none() {
            "wall-clock"
        } else {
            "on-CPU time of the worker thread (`--wall` for wall-clock)"
        };
        let tiles = o.tiles.map_or("planner's tiles".to_string(), |t| {
            format!("{}x{} tiles", t.block_q, t.block_k)
        });
        let threads = match o.threads {
            1 => "1 thread".to_string(),
            t => format!("{t} threads (peak = {t} x the 1-thread peak)"),
        };
        let bf16_note = match (o.bf16, bf16_1) {
            (false, _) => String::new(),
            (true, Some(p)) => {
                format!(", bf16 cases with bf16 products (vdpbf16ps peak {p:.1} GFLOP/s)")
            }
            (true, None) => ", bf16 cases with f32 products".to_string(),
        };
        if MARKDOWN.load(Ordering::Relaxed) {
            let clock = clock.split(" (").next().unwrap_or(clock);
            println!(
                "{}, {} ({} f32 lanes): FMA-loop peak {peak_1:.1} GFLOP/s per thread{bf16_note}, streaming read {bandwidth:.1} GB/s; {threads}, {tiles}, median of {} runs, {clock}:",
                cpu_model(),
                kern.isa().name(),
                kern.isa().lanes(),
                o.reps
            );
            println!();
            print_table(&res);
            return;
        }
        println!(
            "ropex bench_report: {threads} (pin the process too: `taskset`), {tiles}, median of {} runs after a warm-up, {clock}",
            o.reps
        );
        println!("CPU: {}; ISA in use: {} ({} f32 lanes)", cpu_model(), kern.isa().name(), kern.isa().lanes());
        println!(
            "machine: f32 FMA-loop peak {peak_1:.1} GFLOP/s per thread ({} ISA){bf16_note}; streaming read bandwidth {bandwidth:.1} GB/s",
            kern.isa().name()
        );
        println!();
        print_table(&res);
        println!();
        println!("Targets (f32, causal; ratios from this run):");
        for &shape in &o.shapes {
            print_shape_targets(&o, &res, shape, peak);
        }
        if let Some(&first) = o.shapes.first() {
            print_decode_targets(&res, first, bandwidth);
        }
    });
}
