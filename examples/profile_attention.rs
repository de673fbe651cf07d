//! Runs one attention case in a loop, for profilers (`perf record`, `valgrind --tool=callgrind`).
//!
//! ```text
//! cargo run --release --example profile_attention -- tiled rerope 4096 3 [BQxBK]
//! cargo run --release --example profile_attention -- decode rope 32768 10
//! valgrind --tool=callgrind target/release/examples/profile_attention tiled rope 1024 1
//! ```
//!
//! Arguments: kernel (`tiled`, `two_pass`, `decode`), map (`rope`, `rerope`, `leaky`;
//! window 512, leak 16), n (prefill length or cache length), repetitions, and for `tiled`
//! an optional tile size (`-` for the planner's) and element type (`f32`; `bf16`:
//! bf16 inputs and output, with bf16 tile products where the CPU makes them pay;
//! `bf16-f32`: bf16 inputs and output with f32 tile products).
//! H = 8, d = 128, one rayon thread.

use half::bf16;
use ndarray::Array3;
use ropex::CacheShape;
use ropex::attention::decode::KvCache;
use ropex::attention::{Attention, Bf16Products, Kernel, TileConfig, TiledScratch};
use ropex::{Element, Layout, PositionMap, RopeConfig};

#[path = "../tests/common/mod.rs"]
mod common;
use common::rand3;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.to_string());
    let kernel = arg(0, "tiled");
    let n: usize = arg(2, "2048").parse().expect("n");
    let reps: usize = arg(3, "3").parse().expect("repetitions");
    let tiles = match args.get(4).filter(|t| *t != "-") {
        Some(t) => {
            let (a, b) = t.split_once('x').expect("BQxBK");
            TileConfig::new(a.parse().expect("BQ"), b.parse().expect("BK")).expect("tiles")
        }
        None => TileConfig::DEFAULT,
    };
    let w = 512.min(n.saturating_sub(1)).max(1);
    let map = match arg(1, "rope").as_str() {
        "rope" => PositionMap::Rope,
        "rerope" => PositionMap::rerope(w).expect("window"),
        "leaky" => PositionMap::leaky_rerope(w, 16.0).expect("window"),
        other => panic!("unknown map {other}"),
    };
    let (h, d) = (8, 128);
    let cfg = RopeConfig::new(d, 10_000.0).expect("config");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    pool.install(|| match kernel.as_str() {
        "decode" => {
            let k = rand3((n, h, d), 4);
            let v = rand3((n, h, d), 5);
            let q = rand3((1, h, d), 6);
            let mut cache =
                KvCache::new(cfg, Layout::Half, map, CacheShape::square(h, d)).expect("cache");
            cache.append(k.view(), v.view()).expect("append");
            for _ in 0..reps {
                std::hint::black_box(cache.attend(q.view(), &[n - 1]).expect("attend"));
            }
        }
        _ => {
            let att = Attention::new(cfg.frequencies(), Layout::Half, map);
            let kernel = match kernel.as_str() {
                "two_pass" => Kernel::TwoPass,
                _ => Kernel::Tiled(tiles),
            };
            let qkv = [1, 2, 3].map(|seed| rand3((n, h, d), seed));
            match arg(5, "f32").as_str() {
                "f32" => prefill(&att, kernel, qkv, reps),
                "bf16" => prefill(&att, kernel, qkv.map(|x| x.mapv(bf16::from_f32)), reps),
                "bf16-f32" => {
                    let att = att.clone().with_bf16_products(Bf16Products::Off);
                    prefill(&att, kernel, qkv.map(|x| x.mapv(bf16::from_f32)), reps)
                }
                other => panic!("unknown element type {other}"),
            }
        }
    });
}

/// `reps` prefills of `[q, k, v]` as an engine calls them: one output buffer and one
/// scratch for every call.
fn prefill<T: Element>(att: &Attention, kernel: Kernel, [q, k, v]: [Array3<T>; 3], reps: usize) {
    let n = q.dim().0;
    let pos: Vec<usize> = (0..n).collect();
    let mut out = Array3::from_elem(q.dim(), T::default());
    let mut scratch = TiledScratch::new();
    for _ in 0..reps {
        let r = att.run_into_reusing(
            kernel,
            q.view(),
            k.view(),
            v.view(),
            &pos,
            &pos,
            &mut out,
            &mut scratch,
        );
        r.expect("attention");
        std::hint::black_box(&out);
    }
}
