//! In-place rotation of q and k (4096 tokens x 32 heads x 128, f32) against a plain copy
//! of the same bytes, in one run: rotation throughput as a ratio to memory copy.
//!
//! `cargo bench --bench rotary`; the ratio is `copy time / rotate time` of the printed
//! medians (the goal is >= 0.5).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ropex::{Layout, RopeConfig, RotaryTable};
use std::hint::black_box;

const TOKENS: usize = 4096;
const HEADS: usize = 32;
const HEAD_DIM: usize = 128;

fn bench(c: &mut Criterion) {
    let n = TOKENS * HEADS * HEAD_DIM;
    let freqs = RopeConfig::new(HEAD_DIM, 500_000.0)
        .expect("valid config")
        .frequencies();
    let rows: Vec<usize> = (0..TOKENS).collect();
    let init: Vec<f32> = (0..n).map(|i| ((i % 1013) as f32) / 1013.0 - 0.5).collect();
    let mut q = init.clone();
    let mut k = init.clone();
    let (mut q2, mut k2) = (vec![0f32; n], vec![0f32; n]);

    let mut group = c.benchmark_group("rotary_4096x32x128_f32");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(
        (2 * n * std::mem::size_of::<f32>()) as u64,
    ));
    group.bench_function("copy_q_k", |b| {
        b.iter(|| {
            q2.copy_from_slice(black_box(&q));
            k2.copy_from_slice(black_box(&k));
            black_box((&q2, &k2));
        })
    });
    for layout in [Layout::Half, Layout::Interleaved] {
        let table = RotaryTable::<f32>::new(&freqs, TOKENS, layout).expect("table");
        group.bench_function(format!("rotate_q_k_{layout:?}").to_lowercase(), |b| {
            b.iter(|| {
                table
                    .rotate_slice(black_box(&mut q), [TOKENS, HEADS, HEAD_DIM], &rows)
                    .expect("shapes match");
                table
                    .rotate_slice(black_box(&mut k), [TOKENS, HEADS, HEAD_DIM], &rows)
                    .expect("shapes match");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
