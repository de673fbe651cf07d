//! The attention compute primitives (`ropex::attention::kernels`) on every instruction
//! set this CPU supports, in one run, next to the machine's FMA peak.
//!
//! ```sh
//! taskset -c 0 cargo bench --features bench-internals --bench kernels
//! ```
//!
//! `qk_tile_.../packed_per_call` packs the keys inside every call (`qk_tile`);
//! `prepacked` scores against keys packed once (`qk_tile_packed`), as a flash loop
//! that packs each head's keys once sees it.
//!
//! The run starts with a markdown summary table (best and median of interleaved
//! batches, next to the FMA-loop peak measured in the same rounds), robust on a shared
//! machine; `ROPEX_SUMMARY_ROUNDS` sets its rounds (default 60). Criterion's groups
//! follow.
//!
//! Throughput units: for `fma_peak`, `qk_tile` and `pv_tile`, criterion's "elem/s" are
//! f32 flop/s (2 per multiply-add), so `Gelem/s` reads as GFLOP/s. For `gemv` and
//! `stream`, bytes/s are the bytes of K or V read (n x d x 4). For `exp`, elem/s are
//! exponentials per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ropex::attention::kernels::{Kernels, MatMut, MatRef, PackedKeys};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// One summary case: a name, its unit, the work per call (flops, bytes or elements) and
/// the call.
type Case<'a> = (&'static str, &'static str, f64, Box<dyn FnMut() + 'a>);

/// A robust headline table before criterion's statistics: every case runs in short
/// batches, round-robin with the FMA loop, many rounds; the best batch of each is the
/// speed on an uncontended core and the median shows the contention. On a shared
/// machine criterion's means drift with the other jobs, while ratios within one round
/// (and best-of figures) do not.
fn summary(_: &mut Criterion) {
    let k = Kernels::active();
    let (m, n, d) = (64, 64, 128);
    let a = data(m * d, 1);
    let bm = data(n * d, 2);
    let a2 = data(2 * m * d, 1);
    let p = data(2 * m * n, 3);
    let v = data(n * d, 4);
    let (mut s, mut s1, mut s2) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; 2 * m * n]);
    let (mut o, mut o2) = (vec![0f32; m * d], vec![0f32; 2 * m * d]);
    let mut packed = PackedKeys::new();
    k.pack_keys(MatRef::contiguous(&bm, n, d).unwrap(), &mut packed);
    let mut ex: Vec<f32> = data(4096, 5).iter().map(|x| x * 40.0 - 20.0).collect();
    let row_src = data(64, 9);
    let mut rows = vec![0f32; 4096];
    let (nk, dk) = (32_768, 128);
    let kv = data(nk * dk, 6);
    let mut kv_packed = PackedKeys::new();
    k.pack_keys(MatRef::contiguous(&kv, nk, dk).unwrap(), &mut kv_packed);
    let q8 = data(8 * dk, 7);
    let p8 = data(8 * nk, 8);
    let (mut sk1, mut sk8, mut sk8p) = (vec![0f32; nk], vec![0f32; 8 * nk], vec![0f32; 8 * nk]);
    let (mut ok1, mut ok8) = (vec![0f32; dk], vec![0f32; 8 * dk]);
    let fma_iters = 4_000;
    let tile = (2 * m * n * d) as f64;
    let kv_bytes = (nk * dk * 4) as f64;
    // bf16 tile products (AVX512_BF16), against the vdpbf16ps loop's peak: operands
    // rounded to pair rows once, outside the timed calls.
    let bf = k.bf16();
    let mut bf_q = a.clone();
    let mut bf_k = bm.clone();
    let mut bf_p = p[..m * n].to_vec();
    let mut bf_v = vec![0f32; n.div_ceil(2) * d];
    let mut bf_packed = PackedKeys::new();
    let (mut bf_s, mut bf_o) = (vec![0f32; m * n], vec![0f32; m * d]);
    if let Some(bf) = bf {
        for row in bf_q.chunks_exact_mut(d).chain(bf_k.chunks_exact_mut(d)) {
            bf.round_pairs(row, d).unwrap();
        }
        for row in bf_p.chunks_exact_mut(n) {
            bf.round_pairs(row, n).unwrap();
        }
        for (r, out) in bf_v.chunks_exact_mut(d).enumerate() {
            let row = |t: usize| &v[t * d..(t + 1) * d];
            bf.pair_rows(row(2 * r), Some(row(2 * r + 1)), out).unwrap();
        }
        k.pack_keys(MatRef::new(&bf_k, n, d / 2, d).unwrap(), &mut bf_packed);
    }
    let mut cases: Vec<Case> = vec![
        (
            "fma_loop (peak)",
            "GFLOP/s",
            k.fma_loop_flops(fma_iters) as f64,
            Box::new(|| {
                black_box(k.fma_loop(black_box(fma_iters)));
            }),
        ),
        (
            "qk_tile 64x64x128",
            "GFLOP/s",
            tile,
            Box::new(|| {
                k.qk_tile(
                    MatRef::contiguous(black_box(&a), m, d).unwrap(),
                    MatRef::contiguous(black_box(&bm), n, d).unwrap(),
                    MatMut::contiguous(&mut s, m, n).unwrap(),
                    0.088,
                )
                .unwrap();
            }),
        ),
        (
            "qk_tile_packed 64x64x128",
            "GFLOP/s",
            tile,
            Box::new(|| {
                k.qk_tile_packed(
                    MatRef::contiguous(black_box(&a), m, d).unwrap(),
                    &packed,
                    0,
                    MatMut::contiguous(&mut s1, m, n).unwrap(),
                    0.088,
                )
                .unwrap();
            }),
        ),
        (
            "qk_tile 128x64x128",
            "GFLOP/s",
            2.0 * tile,
            Box::new(|| {
                k.qk_tile(
                    MatRef::contiguous(black_box(&a2), 2 * m, d).unwrap(),
                    MatRef::contiguous(black_box(&bm), n, d).unwrap(),
                    MatMut::contiguous(&mut s2, 2 * m, n).unwrap(),
                    0.088,
                )
                .unwrap();
            }),
        ),
        (
            "pv_tile 64x64x128",
            "GFLOP/s",
            tile,
            Box::new(|| {
                k.pv_tile(
                    MatRef::contiguous(black_box(&p[..m * n]), m, n).unwrap(),
                    MatRef::contiguous(black_box(&v), n, d).unwrap(),
                    MatMut::contiguous(&mut o, m, d).unwrap(),
                )
                .unwrap();
            }),
        ),
        (
            "pv_tile 128x64x128",
            "GFLOP/s",
            2.0 * tile,
            Box::new(|| {
                k.pv_tile(
                    MatRef::contiguous(black_box(&p), 2 * m, n).unwrap(),
                    MatRef::contiguous(black_box(&v), n, d).unwrap(),
                    MatMut::contiguous(&mut o2, 2 * m, d).unwrap(),
                )
                .unwrap();
            }),
        ),
        (
            "exp (4096 in place)",
            "Gexp/s",
            4096.0,
            Box::new(|| k.exp(black_box(&mut ex))),
        ),
        (
            "row_max + exp_sub_sum (64 rows of 64)",
            "Gexp/s",
            4096.0,
            Box::new(|| {
                for row in rows.chunks_exact_mut(64) {
                    row.copy_from_slice(&row_src);
                    let mx = k.row_max(row);
                    black_box(k.exp_sub_sum(row, mx));
                }
            }),
        ),
        (
            "stream: row_max over K (16 MiB)",
            "GB/s",
            kv_bytes,
            Box::new(|| {
                black_box(k.row_max(black_box(&kv)));
            }),
        ),
        (
            "qk_gemv 1 query, n 32768, d 128",
            "GB/s",
            kv_bytes,
            Box::new(|| {
                k.qk_gemv(
                    MatRef::contiguous(&q8[..dk], 1, dk).unwrap(),
                    MatRef::contiguous(black_box(&kv), nk, dk).unwrap(),
                    MatMut::contiguous(&mut sk1, 1, nk).unwrap(),
                    0.088,
                )
                .unwrap();
            }),
        ),
        (
            "pv_gemv 1 query, n 32768, dv 128",
            "GB/s",
            kv_bytes,
            Box::new(|| {
                k.pv_gemv(
                    MatRef::contiguous(&p8[..nk], 1, nk).unwrap(),
                    MatRef::contiguous(black_box(&kv), nk, dk).unwrap(),
                    MatMut::contiguous(&mut ok1, 1, dk).unwrap(),
                )
                .unwrap();
            }),
        ),
        (
            "qk_gemv 8 queries (GQA)",
            "GB/s",
            kv_bytes,
            Box::new(|| {
                k.qk_gemv(
                    MatRef::contiguous(&q8, 8, dk).unwrap(),
                    MatRef::contiguous(black_box(&kv), nk, dk).unwrap(),
                    MatMut::contiguous(&mut sk8, 8, nk).unwrap(),
                    0.088,
                )
                .unwrap();
            }),
        ),
        (
            "qk_tile_packed 8 queries (packed cache)",
            "GB/s",
            kv_bytes,
            Box::new(|| {
                k.qk_tile_packed(
                    MatRef::contiguous(&q8, 8, dk).unwrap(),
                    &kv_packed,
                    0,
                    MatMut::contiguous(&mut sk8p, 8, nk).unwrap(),
                    0.088,
                )
                .unwrap();
            }),
        ),
        (
            "pv_gemv 8 queries (GQA)",
            "GB/s",
            kv_bytes,
            Box::new(|| {
                k.pv_gemv(
                    MatRef::contiguous(&p8, 8, nk).unwrap(),
                    MatRef::contiguous(black_box(&kv), nk, dk).unwrap(),
                    MatMut::contiguous(&mut ok8, 8, dk).unwrap(),
                )
                .unwrap();
            }),
        ),
    ];
    if let Some(bf) = bf {
        let (bf_q, bf_p, bf_v, bf_packed) = (&bf_q, &bf_p, &bf_v, &bf_packed);
        cases.extend([
            (
                "bf16 vdpbf16ps loop (bf16 peak)",
                "GFLOP/s",
                bf.dot_loop_flops(fma_iters) as f64,
                Box::new(move || {
                    black_box(bf.dot_loop(black_box(fma_iters)));
                }) as Box<dyn FnMut()>,
            ),
            (
                "bf16 qk_tile_packed 64x64x128",
                "GFLOP/s",
                tile,
                Box::new(move || {
                    bf.qk_tile_packed(
                        MatRef::new(black_box(bf_q), m, d / 2, d).unwrap(),
                        bf_packed,
                        0,
                        MatMut::contiguous(&mut bf_s, m, n).unwrap(),
                        0.088,
                    )
                    .unwrap();
                }),
            ),
            (
                "bf16 pv_tile 64x64x128",
                "GFLOP/s",
                tile,
                Box::new(move || {
                    bf.pv_tile(
                        MatRef::new(black_box(bf_p), m, n / 2, n).unwrap(),
                        MatRef::contiguous(black_box(bf_v), n / 2, d).unwrap(),
                        MatMut::contiguous(&mut bf_o, m, d).unwrap(),
                    )
                    .unwrap();
                }),
            ),
        ]);
    }
    // Calls per batch: about 200 us of work each (big GEMVs: one call), timed after an
    // untimed call so the batch starts with warm caches (the 16 MiB cases flush them).
    let batch: Vec<usize> = cases
        .iter_mut()
        .map(|(_, _, _, f)| {
            f();
            let t = Instant::now();
            for _ in 0..3 {
                f();
            }
            let dt = (t.elapsed().as_secs_f64() / 3.0).max(1e-9);
            ((200e-6 / dt) as usize).clamp(1, 100_000)
        })
        .collect();
    let rounds = std::env::var("ROPEX_SUMMARY_ROUNDS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(60usize);
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for ((_, _, _, f), (t, &b)) in cases.iter_mut().zip(times.iter_mut().zip(&batch)) {
            f();
            let start = Instant::now();
            for _ in 0..b {
                f();
            }
            t.push(start.elapsed().as_secs_f64() / b as f64);
        }
    }
    let rate = |work: f64, t: f64| work / t / 1e9;
    let best_of = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        (t[0], t[t.len() / 2])
    };
    let (peak_best, peak_median) = best_of(&mut times[0]);
    let (peak_best, peak_median) = (rate(cases[0].2, peak_best), rate(cases[0].2, peak_median));
    println!(
        "\n## kernels summary ({} , 1 thread, best and median of {rounds} interleaved \
         batches)\n",
        k.isa().name()
    );
    println!("| case | best | median | unit | best / FMA peak (bf16: / bf16 peak) |");
    println!("|---|---:|---:|---|---:|");
    let mut bf16_peak = None;
    for ((name, unit, work, _), t) in cases.iter().zip(times.iter_mut()) {
        let (b, med) = best_of(t);
        let (b, med) = (rate(*work, b), rate(*work, med));
        let of = if name.starts_with("bf16") {
            *bf16_peak.get_or_insert(b)
        } else {
            peak_best
        };
        let pct = if *unit == "GFLOP/s" {
            format!("{:.0}%", 100.0 * b / of)
        } else {
            String::new()
        };
        println!("| {name} | {b:.1} | {med:.1} | {unit} | {pct} |");
    }
    println!(
        "\nFMA peak: {peak_best:.1} GFLOP/s best, {peak_median:.1} median (contention \
         shows as best >> median).\n"
    );
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
            // Decode against a cache that keeps its keys packed (GQA groups).
            let mut packed = PackedKeys::new();
            k.pack_keys(MatRef::contiguous(&kv, n, d).unwrap(), &mut packed);
            g.bench_function(
                BenchmarkId::new(format!("qk_packed_g{queries}"), k.isa().name()),
                |b| {
                    b.iter(|| {
                        k.qk_tile_packed(
                            MatRef::contiguous(black_box(&q), queries, d).unwrap(),
                            black_box(&packed),
                            0,
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

criterion_group!(benches, summary, fma_peak, tiles, softmax, gemv);
criterion_main!(benches);
