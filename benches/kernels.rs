//! The attention compute primitives (`ropex::attention::kernels`) on every instruction
//! set this CPU supports, in one run, next to the machine's FMA peak.
//!
//! ```sh
//! taskset -c 0 cargo bench --bench kernels
//! ```
//!
//! `qk_tile_.../packed_per_call` packs the keys inside every call (`qk_tile`);
//! `prepacked` scores against keys packed once (`qk_tile_packed`), as a flash loop
//! that packs each head's keys once sees it.
//!
//! Throughput units: for `fma_peak`, `qk_tile` and `pv_tile`, criterion's "elem/s" are
//! f32 flop/s (2 per multiply-add), so `Gelem/s` reads as GFLOP/s. For `gemv` and
//! `stream`, bytes/s are the bytes of K or V read (n x d x 4). For `exp`, elem/s are
//! exponentials per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ropex::attention::kernels::{Kernels, MatMut, MatRef, PackedKeys};
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn kernels() -> Vec<Kernels> {
    Kernels::all_supported()
}

fn fma_peak(c: &mut Criterion) {
    let best = Kernels::active();
    eprintln!(
        "fma peak ({}, 1 thread, best of ~0.5 s): {:.1} GFLOP/s",
        best.isa().name(),
        best.fma_peak_gflops(Duration::from_millis(500))
    );
    let mut g = c.benchmark_group("fma_peak");
    let iters = 20_000;
    for k in kernels() {
        g.throughput(Throughput::Elements(k.fma_loop_flops(iters)));
        g.bench_function(k.isa().name(), |b| {
            b.iter(|| black_box(k.fma_loop(black_box(iters))))
        });
    }
    g.finish();
}

fn tiles(c: &mut Criterion) {
    for (m, n, d) in [(64, 64, 128), (128, 64, 128)] {
        // qk: S[m x n] = A[m x d] B[n x d]^T.
        let a = data(m * d, 1);
        let bm = data(n * d, 2);
        let mut s = vec![0f32; m * n];
        let mut g = c.benchmark_group(format!("qk_tile_{m}x{n}x{d}"));
        g.throughput(Throughput::Elements((2 * m * n * d) as u64));
        for k in kernels() {
            g.bench_function(BenchmarkId::new("packed_per_call", k.isa().name()), |b| {
                b.iter(|| {
                    k.qk_tile(
                        MatRef::contiguous(black_box(&a), m, d).unwrap(),
                        MatRef::contiguous(black_box(&bm), n, d).unwrap(),
                        MatMut::contiguous(&mut s, m, n).unwrap(),
                        0.088,
                    )
                    .unwrap();
                })
            });
            // Keys packed once outside the loop (a flash loop packs each head once).
            let mut packed = PackedKeys::new();
            k.pack_keys(MatRef::contiguous(&bm, n, d).unwrap(), &mut packed);
            g.bench_function(BenchmarkId::new("prepacked", k.isa().name()), |b| {
                b.iter(|| {
                    k.qk_tile_packed(
                        MatRef::contiguous(black_box(&a), m, d).unwrap(),
                        black_box(&packed),
                        0,
                        MatMut::contiguous(&mut s, m, n).unwrap(),
                        0.088,
                    )
                    .unwrap();
                })
            });
        }
        g.finish();

        // pv: O[m x d] += P[m x n] V[n x d] (d plays dv).
        let p = data(m * n, 3);
        let v = data(n * d, 4);
        let mut o = vec![0f32; m * d];
        let mut g = c.benchmark_group(format!("pv_tile_{m}x{n}x{d}"));
        g.throughput(Throughput::Elements((2 * m * n * d) as u64));
        for k in kernels() {
            g.bench_function(k.isa().name(), |b| {
                b.iter(|| {
                    k.pv_tile(
                        MatRef::contiguous(black_box(&p), m, n).unwrap(),
                        MatRef::contiguous(black_box(&v), n, d).unwrap(),
                        MatMut::contiguous(&mut o, m, d).unwrap(),
                    )
                    .unwrap();
                })
            });
        }
        g.finish();
    }
}

fn softmax(c: &mut Criterion) {
    let len = 4096;
    let src: Vec<f32> = data(len, 5).iter().map(|x| x * 40.0 - 20.0).collect();
    let mut x = src.clone();
    let mut g = c.benchmark_group("exp_4096");
    g.throughput(Throughput::Elements(len as u64));
    for k in kernels() {
        g.bench_function(BenchmarkId::new("exp", k.isa().name()), |b| {
            // In place on evolving values: the kernel is branch-free, so its speed does
            // not depend on them.
            b.iter(|| k.exp(black_box(&mut x)))
        });
        // One 64 x 64 tile of scores, row by row: max, then exp(x - max) with its sum.
        g.bench_function(
            BenchmarkId::new("max_exp_sum_rows64", k.isa().name()),
            |b| {
                b.iter(|| {
                    let mut total = 0f32;
                    for row in x.chunks_exact_mut(64) {
                        row.copy_from_slice(&src[..64]);
                        let m = k.row_max(row);
                        total += k.exp_sub_sum(row, m);
                    }
                    black_box(total)
                })
            },
        );
    }
    g.finish();
}

fn gemv(c: &mut Criterion) {
    let (n, d) = (32_768, 128);
    let kv = data(n * d, 6);
    let bytes = (n * d * 4) as u64;
    let mut g = c.benchmark_group(format!("gemv_n{n}_d{d}"));
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(30);
    for k in kernels() {
        // A pure read stream over the same 16 MiB, as the bandwidth reference.
        g.bench_function(BenchmarkId::new("stream_row_max", k.isa().name()), |b| {
            b.iter(|| black_box(k.row_max(black_box(&kv))))
        });
        for queries in [1usize, 4, 8] {
            let q = data(queries * d, 7);
            let mut s = vec![0f32; queries * n];
            g.bench_function(
                BenchmarkId::new(format!("qk_gemv_g{queries}"), k.isa().name()),
                |b| {
                    b.iter(|| {
                        k.qk_gemv(
                            MatRef::contiguous(black_box(&q), queries, d).unwrap(),
                            MatRef::contiguous(black_box(&kv), n, d).unwrap(),
                            MatMut::contiguous(&mut s, queries, n).unwrap(),
                            0.088,
                        )
                        .unwrap()
                    })
                },
            );
            let p = data(queries * n, 8);
            let mut o = vec![0f32; queries * d];
            g.bench_function(
                BenchmarkId::new(format!("pv_gemv_g{queries}"), k.isa().name()),
                |b| {
                    b.iter(|| {
                        k.pv_gemv(
                            MatRef::contiguous(black_box(&p), queries, n).unwrap(),
                            MatRef::contiguous(black_box(&kv), n, d).unwrap(),
                            MatMut::contiguous(&mut o, queries, d).unwrap(),
                        )
                        .unwrap()
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, fma_peak, tiles, softmax, gemv);
criterion_main!(benches);
