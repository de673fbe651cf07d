//! Element types and batches of the prefill kernels (issue 10's targets), each pair in
//! one group and process so the ratio is stable:
//!
//! - **dtype_prefill** (causal RoPE, n = 4096, H = 8, d = 128, the planner's tiles, on
//!   the calling thread alone via `Attention::with_parallel(false)`): `f32` inputs and
//!   output, `bf16` with f32 products (`Bf16Products::Off`: bf16 is widened to f32 as
//!   rows are loaded, so the extra cost is one conversion per loaded row; target: <= the
//!   f32 time) and `bf16` with bf16 products (`Bf16Products::On`, `vdpbf16ps`, on CPUs
//!   with AVX512_BF16; stretch target: <= 0.7x the f32 time).
//! - **varlen_threads** (ReRoPE w = 512, H_q = 8, H_kv = 8, d = 128, f32): one
//!   `Attention::varlen` call over a batch of 8 sequences of lengths 256, 512, ..,
//!   2048, on a caller's rayon pool of 1 and of 2 threads (`pool.install`). Target:
//!   2-thread throughput >= 1.7x the 1-thread one. Throughput is useful causal FLOP/s
//!   (`4 H d n (n + 1) / 2` summed over the sequences).
//!
//! `cargo bench --bench dtypes`. Timings on a shared machine are noisy: criterion runs
//! the cases one after another, so `ROPEX_PREFILL_RATIOS=<rounds>` instead times the
//! three prefills interleaved and prints the medians of the per-round ratios to f32.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use half::bf16;
use ndarray::Array3;
use ropex::attention::{Attention, Bf16Products, Kernel, VarLen};
use ropex::{Element, Layout, PositionMap, RopeConfig};

#[path = "../tests/common/mod.rs"]
mod common;
use common::rand3;

const HEADS: usize = 8;
const HEAD_DIM: usize = 128;

fn attention(map: PositionMap) -> Attention {
    let freqs = RopeConfig::new(HEAD_DIM, 10_000.0)
        .expect("valid rope config")
        .frequencies();
    Attention::new(freqs, Layout::Half, map)
}

fn flops(n: usize) -> u64 {
    (4 * HEADS * HEAD_DIM * n * (n + 1) / 2) as u64
}

/// The prefill case of both dtypes: one-thread attention, f32 inputs and their bf16
/// rounding, positions `0..n`.
struct PrefillCase {
    att: Attention,
    f32: [Array3<f32>; 3],
    bf16: [Array3<bf16>; 3],
    pos: Vec<usize>,
}

impl PrefillCase {
    fn new(n: usize) -> Self {
        let f32 = [1, 2, 3].map(|seed| rand3((n, HEADS, HEAD_DIM), seed));
        let bf16 = [0, 1, 2].map(|i| f32[i].mapv(bf16::from_f32));
        PrefillCase {
            att: attention(PositionMap::Rope).with_parallel(false),
            f32,
            bf16,
            pos: (0..n).collect(),
        }
    }

    /// One prefill of the inputs `[q, k, v]` (either dtype) with bf16 products `mode`.
    fn run<T: Element>(&self, [q, k, v]: &[Array3<T>; 3], mode: Bf16Products) {
        let att = self.att.clone().with_bf16_products(mode);
        let out = att.tiled(q.view(), k.view(), v.view(), &self.pos, &self.pos);
        black_box(out.unwrap());
    }
}

fn dtype_prefill(c: &mut Criterion) {
    let n = 4096;
    let case = PrefillCase::new(n);
    let mut g = c.benchmark_group("dtype_prefill_n4096_1thread");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(flops(n)));
    g.bench_function("f32", |b| b.iter(|| case.run(&case.f32, Bf16Products::Off)));
    g.bench_function("bf16_f32_products", |b| {
        b.iter(|| case.run(&case.bf16, Bf16Products::Off))
    });
    if Bf16Products::On.applies() {
        g.bench_function("bf16_bf16_products", |b| {
            b.iter(|| case.run(&case.bf16, Bf16Products::On))
        });
    }
    g.finish();
}

fn varlen_threads(c: &mut Criterion) {
    let lens: Vec<usize> = (1..=8).map(|i| 256 * i).collect();
    let mut cu = vec![0];
    let mut pos = Vec::new();
    for &n in &lens {
        cu.push(cu.last().unwrap() + n);
        pos.extend(0..n);
    }
    let total = pos.len();
    let (q, k, v) = (
        rand3((total, HEADS, HEAD_DIM), 4),
        rand3((total, HEADS, HEAD_DIM), 5),
        rand3((total, HEADS, HEAD_DIM), 6),
    );
    let batch = VarLen::new(&cu, &cu, &pos, &pos).expect("valid offsets");
    let att = attention(PositionMap::rerope(512).expect("valid window"));
    let mut g = c.benchmark_group("varlen_8_seqs_256_to_2048");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(lens.iter().map(|&n| flops(n)).sum()));
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        g.bench_function(format!("{threads}_threads"), |b| {
            b.iter(|| {
                pool.install(|| {
                    black_box(
                        att.varlen(Kernel::default(), q.view(), k.view(), v.view(), &batch)
                            .unwrap(),
                    )
                })
            })
        });
    }
    g.finish();
}

/// The bf16 / f32 prefill ratios timed interleaved (`f32, bf16, bf16 products, f32,
/// ..`, one call each), medians of the per-round ratios: criterion's
/// one-case-after-another timings let a shared machine's drift into the ratio.
fn prefill_ratio(rounds: usize) {
    let n = 4096;
    let case = PrefillCase::new(n);
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let dot = Bf16Products::On.applies();
    let (mut t32, mut t16, mut tdot, mut r, mut rdot) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let a = time(&|| case.run(&case.f32, Bf16Products::Off));
        let b = time(&|| case.run(&case.bf16, Bf16Products::Off));
        t32.push(a);
        t16.push(b);
        r.push(b / a);
        if dot {
            let c = time(&|| case.run(&case.bf16, Bf16Products::On));
            tdot.push(c);
            rdot.push(c / a);
        }
    }
    println!(
        "interleaved prefill, n = {n}, H = {HEADS}, d = {HEAD_DIM}, 1 thread, {rounds} rounds: \
         bf16 (f32 products) / f32 median ratio {:.3} (target <= 1.0); medians {:.1} ms / {:.1} ms",
        median(r),
        median(t16) * 1e3,
        median(t32) * 1e3
    );
    if dot {
        println!(
            "bf16 (bf16 products) / f32 median ratio {:.3} (stretch target <= 0.7); median {:.1} ms",
            median(rdot),
            median(tdot) * 1e3
        );
    } else {
        println!("bf16 products: not measured (this CPU has no AVX512_BF16)");
    }
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn main() {
    if let Some(rounds) = std::env::var("ROPEX_PREFILL_RATIOS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        prefill_ratio(rounds.max(1));
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    dtype_prefill(&mut c);
    varlen_threads(&mut c);
    c.final_summary();
}
