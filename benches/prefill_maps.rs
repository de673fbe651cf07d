//! Causal prefill under each position map at the `extend` example's shape: 2048 tokens,
//! 4 heads of 32 (one attention layer of the tiny byte-level model read at 16x).
//!
//! `cargo bench --bench prefill_maps` times ropex's tiled kernel under plain RoPE, ReRoPE
//! (w = 64) and Leaky ReRoPE (w = 64, k = 31.5, the 16x leak), Self-Extend, Dual Chunk
//! Attention and StreamingLLM at their recommended parameters for L = 128 (G = 22 and
//! W = 32 for 2048 tokens, chunk 96 / local 16, S = 4 / W = 124), plain RoPE under a
//! sliding window of 128 and chunked attention of 128, and Su's two-pass method under
//! ReRoPE, in interleaved rounds, and prints the fastest and the median round of
//! each: on a shared machine the fastest round is the one least disturbed by other load,
//! and interleaving exposes every variant to the same load. It also prints the tiled
//! kernel's score-tile counts, which do not depend on the machine. The README's
//! compute-cost paragraph cites this output.

use ropex::attention::{Attention, TileConfig};
use ropex::{Layout, PositionMap, RopeConfig};
use std::hint::black_box;
use std::time::Instant;

const TOKENS: usize = 2048;
const HEADS: usize = 4;
const HEAD_DIM: usize = 32;
const ROUNDS: usize = 15;

#[path = "../tests/common/mod.rs"]
mod common;
use common::rand3;

fn main() {
    let shape = (TOKENS, HEADS, HEAD_DIM);
    let (q, k, v) = (rand3(shape, 1), rand3(shape, 2), rand3(shape, 3));
    let pos: Vec<usize> = (0..TOKENS).collect();
    let freqs = RopeConfig::new(HEAD_DIM, 10_000.0)
        .expect("valid config")
        .frequencies();
    let rerope = PositionMap::rerope(64).expect("valid window");
    let leaky = PositionMap::leaky_rerope(64, 31.5).expect("valid leak");
    let att = |map| Attention::new(freqs.clone(), Layout::Half, map);
    let self_extend = ropex::position::self_extend_for(128, TOKENS).expect("valid map");
    let dca = ropex::position::dca_for(128).expect("valid map");
    let streaming = PositionMap::streaming(4, 124).expect("valid map");
    let rope = att(PositionMap::Rope);
    let cases: Vec<(String, Attention, bool)> = vec![
        ("tiled, RoPE".into(), rope.clone(), true),
        ("tiled, ReRoPE w=64".into(), att(rerope), true),
        ("tiled, Leaky w=64 k=31.5".into(), att(leaky), true),
        (format!("tiled, {self_extend}"), att(self_extend), true),
        (format!("tiled, {dca}"), att(dca), true),
        (format!("tiled, {streaming}"), att(streaming), true),
        (
            "tiled, RoPE, sliding window 128".into(),
            rope.clone().with_sliding_window(128).expect("valid window"),
            true,
        ),
        (
            "tiled, RoPE, chunked 128".into(),
            rope.with_chunked(128).expect("valid chunk"),
            true,
        ),
        ("two-pass, ReRoPE w=64".into(), att(rerope), false),
    ];
    let mut times = vec![Vec::with_capacity(ROUNDS); cases.len()];
    for _ in 0..ROUNDS {
        for ((_, a, tiled), t) in cases.iter().zip(&mut times) {
            let start = Instant::now();
            let out = if *tiled {
                a.tiled(q.view(), k.view(), v.view(), &pos, &pos)
            } else {
                a.two_pass(q.view(), k.view(), v.view(), &pos, &pos)
            };
            black_box(out.expect("valid input"));
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "causal prefill, {TOKENS} tokens x {HEADS} heads x {HEAD_DIM}, f32, {ROUNDS} interleaved rounds"
    );
    println!(
        "| kernel, map | fastest ms | median ms | fastest vs tiled RoPE | QK^T tiles vs RoPE |"
    );
    println!("|---|---:|---:|---:|---:|");
    let tiles = |a: &Attention| {
        a.tiled_with(
            q.view(),
            k.view(),
            v.view(),
            &pos,
            &pos,
            &TileConfig::DEFAULT,
        )
        .expect("valid input")
        .1
        .dot_products() as f64
    };
    let base_tiles = tiles(&cases[0].1);
    let mut base = None;
    for ((name, a, tiled), t) in cases.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let (fast, median) = (t[0], t[t.len() / 2]);
        let base = *base.get_or_insert(fast);
        let tile_ratio = if *tiled {
            format!("{:.3}", tiles(a) / base_tiles)
        } else {
            "(2 full score matrices)".into()
        };
        println!(
            "| {name} | {fast:.1} | {median:.1} | {:.2} | {tile_ratio} |",
            fast / base
        );
    }
}
