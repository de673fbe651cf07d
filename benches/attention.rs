//! Attention benches: plain and extended variants in the same group and process, so
//! their ratios are stable.
//!
//! - **prefill** (causal, H = 8, d = 128, one group per `n` in {1024, 2048, 4096}, plus
//!   8192 with `ROPEX_BENCH_8192=1`): `rope_tiled`, `rerope_tiled` and `leaky_tiled`
//!   (leak 16) at `w` in {n/8, 512, n}, `rerope_two_pass` (Su's method) and
//!   `rope_two_pass` (naive plain); the issue-9 maps beside them: `self_extend_tiled`
//!   (G = 8, W = 1024), `dca_tiled` (chunk 3072, local 512), `streaming_tiled` (S = 4,
//!   W = 1024), and the masks `sliding_window_tiled` (1024) and `chunked_tiled` (1024)
//!   over plain RoPE. Throughput is *useful* causal FLOP/s,
//!   `4 H d n (n + 1) / 2` per call (criterion prints it as `elem/s`).
//! - **decode** (H_q = H_kv = 8, d = 128, one group per cache length `L` in
//!   {4096, 32768}): one query step at position `L - 1` against a pre-filled cache:
//!   `rope` ([`KvCache`] with [`PositionMap::Rope`]), `rerope_cache` and `leaky_cache`
//!   ([`KvCache`], w = 512), `self_extend_cache`, `dca_cache` and `streaming_cache`
//!   (the prefill parameters; the StreamingLLM cache holds only S + W keys), and
//!   `rerope_rerotating` (Su's [`KvCacheRerotating`]).
//!   Throughput is bytes of K/V a plain step reads, `4 H_kv L (d + d_v)`, per second.
//!
//! Runs are kept short (10 samples, flat sampling, ~2 s per case). The naive two-pass
//! kernel is slow at n = 4096 (seconds per call): there it runs only at w = 512 unless
//! `ROPEX_BENCH_ALL=1`. For headline numbers on one thread use
//! `RAYON_NUM_THREADS=1 taskset -c 0 cargo bench --bench attention`, or the one-table
//! report `cargo run --release --example bench_report`.

use ropex::CacheShape;
use std::hint::black_box;
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use ndarray::Array3;
use ropex::attention::decode::{DecodeCache, KvCache, KvCacheRerotating};
use ropex::attention::{Attention, TileConfig};
use ropex::{Layout, PositionMap, RopeConfig};

const HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const LEAK: f64 = 16.0;
const DECODE_WINDOW: usize = 512;

#[path = "../tests/common/mod.rs"]
mod common;
use common::rand3;

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn config() -> RopeConfig {
    RopeConfig::new(HEAD_DIM, 10_000.0).expect("valid rope config")
}

/// Useful causal FLOPs of one prefill: `QK^T` and `PV` over the lower triangle.
fn prefill_flops(n: usize) -> u64 {
    (4 * HEADS * HEAD_DIM * n * (n + 1) / 2) as u64
}

fn prefill(c: &mut Criterion) {
    let mut ns = vec![1024, 2048, 4096];
    if env_flag("ROPEX_BENCH_8192") {
        ns.push(8192);
    }
    let all = env_flag("ROPEX_BENCH_ALL");
    let freqs = config().frequencies();
    for n in ns {
        let q = rand3((n, HEADS, HEAD_DIM), 1);
        let k = rand3((n, HEADS, HEAD_DIM), 2);
        let v = rand3((n, HEADS, HEAD_DIM), 3);
        let pos: Vec<usize> = (0..n).collect();
        let mut windows = vec![n / 8, 512, n];
        windows.sort_unstable();
        windows.dedup();

        let mut group = c.benchmark_group(format!("prefill_causal_h{HEADS}_d{HEAD_DIM}_n{n}"));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Elements(prefill_flops(n)));

        let tiled = |map: PositionMap| {
            let att = Attention::new(freqs.clone(), Layout::Half, map);
            let (q, k, v, pos) = (&q, &k, &v, &pos);
            move || {
                att.tiled_with(q.view(), k.view(), v.view(), pos, pos, &TileConfig::DEFAULT)
                    .expect("tiled")
            }
        };
        let two_pass = |map: PositionMap| {
            let att = Attention::new(freqs.clone(), Layout::Half, map);
            let (q, k, v, pos) = (&q, &k, &v, &pos);
            move || {
                att.two_pass(q.view(), k.view(), v.view(), pos, pos)
                    .expect("two-pass")
            }
        };

        let f = tiled(PositionMap::Rope);
        group.bench_function("rope_tiled", |b| b.iter(|| black_box(f())));
        for (name, map) in new_maps() {
            let f = tiled(map);
            group.bench_function(format!("{name}_tiled"), |b| b.iter(|| black_box(f())));
        }
        for (name, att) in [
            (
                "sliding_window_tiled",
                Attention::new(freqs.clone(), Layout::Half, PositionMap::Rope)
                    .with_sliding_window(1024)
                    .expect("window"),
            ),
            (
                "chunked_tiled",
                Attention::new(freqs.clone(), Layout::Half, PositionMap::Rope)
                    .with_chunked(1024)
                    .expect("chunk"),
            ),
        ] {
            group.bench_function(name, |b| {
                b.iter(|| {
                    black_box(
                        att.tiled_with(
                            q.view(),
                            k.view(),
                            v.view(),
                            &pos,
                            &pos,
                            &TileConfig::DEFAULT,
                        )
                        .expect("tiled"),
                    )
                })
            });
        }
        for &w in &windows {
            let rerope = PositionMap::rerope(w).expect("window");
            let leaky = PositionMap::leaky_rerope(w, LEAK).expect("window");
            let f = tiled(rerope);
            group.bench_function(BenchmarkId::new("rerope_tiled", format!("w{w}")), |b| {
                b.iter(|| black_box(f()))
            });
            let f = tiled(leaky);
            group.bench_function(BenchmarkId::new("leaky_tiled", format!("w{w}")), |b| {
                b.iter(|| black_box(f()))
            });
        }
        for &w in &windows {
            if n >= 4096 && w != 512 && !all {
                continue;
            }
            let f = two_pass(PositionMap::rerope(w).expect("window"));
            group.bench_function(BenchmarkId::new("rerope_two_pass", format!("w{w}")), |b| {
                b.iter(|| black_box(f()))
            });
        }
        let f = two_pass(PositionMap::Rope);
        group.bench_function("rope_two_pass", |b| b.iter(|| black_box(f())));
        group.finish();
    }
}

/// The issue-9 maps at their headline parameters.
fn new_maps() -> [(&'static str, PositionMap); 3] {
    [
        (
            "self_extend",
            PositionMap::self_extend(8, 1024).expect("map"),
        ),
        ("dca", PositionMap::dca(3072, 512).expect("map")),
        ("streaming", PositionMap::streaming(4, 1024).expect("map")),
    ]
}

/// A cache of `len` tokens filled in chunks of 4096 (chunked appends).
fn filled<C: DecodeCache>(mut cache: C, k: &Array3<f32>, v: &Array3<f32>) -> C {
    let len = k.dim().0;
    let mut at = 0;
    while at < len {
        let end = (at + 4096).min(len);
        cache
            .append(
                k.slice(ndarray::s![at..end, .., ..]),
                v.slice(ndarray::s![at..end, .., ..]),
            )
            .expect("append");
        at = end;
    }
    cache
}

fn decode(c: &mut Criterion) {
    for len in [4096, 32768] {
        let k = rand3((len, HEADS, HEAD_DIM), 4);
        let v = rand3((len, HEADS, HEAD_DIM), 5);
        let q = rand3((1, HEADS, HEAD_DIM), 6);
        let step = [len - 1];
        let kv_bytes = (4 * HEADS * len * 2 * HEAD_DIM) as u64;

        let mut group = c.benchmark_group(format!("decode_h{HEADS}_d{HEAD_DIM}_L{len}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Bytes(kv_bytes));

        let new = |map: PositionMap| {
            KvCache::new(
                config(),
                Layout::Half,
                map,
                CacheShape::square(HEADS, HEAD_DIM),
            )
            .expect("cache")
        };
        let extra = new_maps();
        let cases = [
            ("rope", PositionMap::Rope),
            (
                "rerope_cache",
                PositionMap::rerope(DECODE_WINDOW).expect("window"),
            ),
            (
                "leaky_cache",
                PositionMap::leaky_rerope(DECODE_WINDOW, LEAK).expect("window"),
            ),
        ];
        let cases = cases
            .into_iter()
            .map(|(name, map)| (name.to_string(), map))
            .chain(extra.map(|(name, map)| (format!("{name}_cache"), map)));
        for (name, map) in cases {
            let cache = filled(new(map), &k, &v);
            group.bench_function(name, |b| {
                b.iter(|| black_box(cache.attend(q.view(), &step).expect("attend")))
            });
        }
        let su = KvCacheRerotating::new(
            config(),
            Layout::Half,
            PositionMap::rerope(DECODE_WINDOW).expect("window"),
            CacheShape::square(HEADS, HEAD_DIM),
        )
        .expect("cache");
        let su = filled(su, &k, &v);
        group.bench_function("rerope_rerotating", |b| {
            b.iter(|| black_box(su.attend(q.view(), &step).expect("attend")))
        });
        group.finish();
    }
}

criterion_group!(benches, prefill, decode);
criterion_main!(benches);
