//! Element types and batches of the prefill kernels (issue 10's targets), each pair in
//! one group and process so the ratio is stable:
//!
//! - **dtype_prefill** (causal RoPE, n = 4096, H = 8, d = 128, tiled 64 x 64, on the
//!   calling thread alone via `Attention::with_parallel(false)`): `f32` and `bf16`
//!   inputs and output. Target: bf16 time <= the f32 time (bf16 is widened to f32 as
//!   rows are loaded, so the extra cost is one conversion per loaded row).
//! - **varlen_threads** (ReRoPE w = 512, H_q = 8, H_kv = 8, d = 128, f32): one
//!   `Attention::varlen` call over a batch of 8 sequences of lengths 256, 512, ..,
//!   2048, on a caller's rayon pool of 1 and of 2 threads (`pool.install`). Target:
//!   2-thread throughput >= 1.7x the 1-thread one. Throughput is useful causal FLOP/s
//!   (`4 H d n (n + 1) / 2` summed over the sequences).
//!
//! `cargo bench --bench dtypes`. Timings on a shared machine are noisy: repeat, and
//! compare medians of interleaved runs.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use half::bf16;
use ropex::attention::{Attention, Kernel, VarLen};
use ropex::{Layout, PositionMap, RopeConfig};

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

fn dtype_prefill(c: &mut Criterion) {
    let n = 4096;
    let att = attention(PositionMap::Rope).with_parallel(false);
    let (q, k, v) = (
        rand3((n, HEADS, HEAD_DIM), 1),
        rand3((n, HEADS, HEAD_DIM), 2),
        rand3((n, HEADS, HEAD_DIM), 3),
    );
    let (qb, kb, vb) = (
        q.mapv(bf16::from_f32),
        k.mapv(bf16::from_f32),
        v.mapv(bf16::from_f32),
    );
    let pos: Vec<usize> = (0..n).collect();
    let mut g = c.benchmark_group("dtype_prefill_n4096_1thread");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(flops(n)));
    g.bench_function("f32", |b| {
        b.iter(|| black_box(att.tiled(q.view(), k.view(), v.view(), &pos, &pos).unwrap()))
    });
    g.bench_function("bf16", |b| {
        b.iter(|| {
            black_box(
                att.tiled(qb.view(), kb.view(), vb.view(), &pos, &pos)
                    .unwrap(),
            )
        })
    });
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

criterion_group!(benches, dtype_prefill, varlen_threads);
criterion_main!(benches);
