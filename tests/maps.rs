//! Self-Extend, Dual Chunk Attention, StreamingLLM and the sliding-window / chunked masks
//! on every kernel: two-pass, tiled (many tile sizes, including the packed-key path) and
//! the `Kernel` dispatch against the f64 reference; exact limits where a map is plain
//! RoPE; tile counts against closed forms and an entry-level count; typed errors at any
//! size.

use ndarray::{Array3, s};
use ropex::CacheShape;
use ropex::attention::{
    Attention, Kernel, Mask, TileConfig, TileStats, expected_chunked_computed_tiles,
    expected_sliding_window_computed_tiles, expected_straddling_tiles,
};
use ropex::{Frequencies, Layout, PositionMap, RopeConfig, RopeError, Scaling, Yarn};

mod common;
use common::{max_err, rand3};

const KERNELS: [Kernel; 7] = [
    Kernel::TwoPass,
    Kernel::Tiled(TileConfig::DEFAULT),
    Kernel::Tiled(TileConfig {
        block_q: 16,
        block_k: 16,
    }),
    Kernel::Tiled(TileConfig {
        block_q: 7,
        block_k: 5,
    }),
    Kernel::Tiled(TileConfig {
        block_q: 1,
        block_k: 1,
    }),
    Kernel::Tiled(TileConfig {
        block_q: 3,
        block_k: 200,
    }),
    // Packed keys (block_k a multiple of the 32-key panel).
    Kernel::Tiled(TileConfig {
        block_q: 8,
        block_k: 32,
    }),
];

fn yarn(rotary_dim: usize) -> Frequencies {
    RopeConfig::new(rotary_dim, 10_000.0)
        .unwrap()
        .with_scaling(Scaling::Yarn(Yarn::new(4.0, 64)))
        .unwrap()
        .frequencies()
}

fn plain(rotary_dim: usize) -> Frequencies {
    RopeConfig::new(rotary_dim, 10_000.0).unwrap().frequencies()
}

/// The new maps, with windows and chunks that are not multiples of the tile sizes.
fn new_maps() -> Vec<PositionMap> {
    vec![
        PositionMap::self_extend(4, 10).unwrap(),
        PositionMap::self_extend(3, 17).unwrap(),
        PositionMap::self_extend_scaled(2, 9, 8.0).unwrap(),
        PositionMap::dca(24, 7).unwrap(),
        PositionMap::dca(13, 0).unwrap(),
        PositionMap::dca(40, 21).unwrap(),
        PositionMap::streaming(4, 11).unwrap(),
        PositionMap::streaming(0, 20).unwrap(),
        PositionMap::streaming(9, 1).unwrap(),
    ]
}

fn masks() -> Vec<Mask> {
    vec![
        Mask::NONE,
        Mask::NONE.with_sliding_window(13).unwrap(),
        Mask::NONE.with_sliding_window(1).unwrap(),
        Mask::NONE.with_chunked(19).unwrap(),
        Mask::NONE
            .with_sliding_window(9)
            .unwrap()
            .with_chunked(32)
            .unwrap(),
    ]
}

/// One chunked-prefill problem: queries are the last `n_q` of `n_k` keys.
struct Problem {
    q: Array3<f32>,
    k: Array3<f32>,
    v: Array3<f32>,
    q_pos: Vec<usize>,
    k_pos: Vec<usize>,
}

impl Problem {
    fn new(n_q: usize, n_k: usize, heads: (usize, usize), dims: (usize, usize), seed: u64) -> Self {
        Problem {
            q: rand3((n_q, heads.0, dims.0), seed),
            k: rand3((n_k, heads.1, dims.0), seed + 1),
            v: rand3((n_k, heads.1, dims.1), seed + 2),
            q_pos: (n_k - n_q..n_k).collect(),
            k_pos: (0..n_k).collect(),
        }
    }

    fn run(&self, att: &Attention, kernel: Kernel) -> Result<Array3<f32>, RopeError> {
        att.run(
            kernel,
            self.q.view(),
            self.k.view(),
            self.v.view(),
            &self.q_pos,
            &self.k_pos,
        )
        .map(|(o, _)| o)
    }
}

fn check_all_kernels(att: &Attention, p: &Problem, label: &str) {
    let want = p.run(att, Kernel::Reference).unwrap();
    for kernel in KERNELS {
        let got = p.run(att, kernel).unwrap();
        let e = max_err(&got, &want);
        assert!(e < 1e-5, "{kernel:?} {label}: {e}");
    }
}

#[test]
fn every_new_map_and_mask_matches_the_reference_on_every_kernel() {
    let mut seed = 1;
    for map in new_maps() {
        for mask in masks() {
            // Full prefill and chunked prefill (query offset), GQA.
            for (n_q, n_k) in [(70, 70), (23, 61)] {
                let att = Attention::new(plain(16), Layout::Half, map)
                    .with_mask(mask)
                    .unwrap();
                let p = Problem::new(n_q, n_k, (4, 2), (16, 16), seed);
                seed += 3;
                check_all_kernels(&att, &p, &format!("{map} {mask:?} n_q {n_q} n_k {n_k}"));
            }
        }
    }
}

/// YaRN frequencies (attention factor in the scale), log-n, the interleaved layout,
/// partial rotary (head dim past the rotary dim) and a value dim unlike the key dim.
#[test]
fn yarn_log_n_interleaved_and_partial_rotary() {
    let mut seed = 100;
    for map in new_maps() {
        for mask in [Mask::NONE, Mask::NONE.with_sliding_window(21).unwrap()] {
            let att = Attention::new(yarn(8), Layout::Interleaved, map)
                .with_log_n(16)
                .unwrap()
                .with_mask(mask)
                .unwrap();
            let p = Problem::new(37, 50, (3, 1), (12, 5), seed);
            seed += 3;
            check_all_kernels(&att, &p, &format!("yarn {map} {mask:?}"));
        }
    }
}

/// Masks combine with the old maps too, and with bidirectional attention.
#[test]
fn masks_on_the_band_maps_and_bidirectional() {
    let mut seed = 200;
    for map in [
        PositionMap::Rope,
        PositionMap::rerope(9).unwrap(),
        PositionMap::leaky_rerope(6, 4.0).unwrap(),
        PositionMap::interpolated(2.0).unwrap(),
    ] {
        for mask in masks() {
            for causal in [true, false] {
                let att = Attention::new(plain(8), Layout::Half, map)
                    .with_causal(causal)
                    .with_mask(mask)
                    .unwrap();
                let p = Problem::new(33, 45, (2, 2), (8, 8), seed);
                seed += 3;
                check_all_kernels(&att, &p, &format!("{map} {mask:?} causal {causal}"));
            }
        }
    }
}

/// G = 1 or W >= n, chunk_size - local_window >= n and S + W >= n are plain RoPE: every
/// kernel's output equals plain RoPE's reference (the maps' own references are checked
/// in the unit tests).
#[test]
fn exact_limits_equal_rope_on_every_kernel() {
    let n = 45;
    let p = Problem::new(n, n, (2, 1), (8, 8), 300);
    let rope = Attention::new(plain(8), Layout::Half, PositionMap::Rope);
    let want = p.run(&rope, Kernel::Reference).unwrap();
    for map in [
        PositionMap::self_extend(1, 3).unwrap(),
        PositionMap::self_extend(4, n).unwrap(),
        PositionMap::dca(n + 4, 4).unwrap(),
        PositionMap::dca(n, 0).unwrap(),
        PositionMap::streaming(4, n - 4).unwrap(),
        PositionMap::streaming(0, n).unwrap(),
    ] {
        let att = Attention::new(plain(8), Layout::Half, map);
        for kernel in [Kernel::Reference].into_iter().chain(KERNELS) {
            let e = max_err(&p.run(&att, kernel).unwrap(), &want);
            assert!(e < 1e-5, "{map} {kernel:?}: {e}");
        }
    }
    // A sliding window covering the sequence and one chunk covering it are no mask.
    for mask in [
        Mask::NONE.with_sliding_window(n).unwrap(),
        Mask::NONE.with_chunked(n).unwrap(),
    ] {
        let att = rope.clone().with_mask(mask).unwrap();
        for kernel in KERNELS {
            assert!(max_err(&p.run(&att, kernel).unwrap(), &want) < 1e-5);
        }
    }
    // StreamingLLM with no sinks is RoPE under a sliding window of the same length.
    let slide = rope.clone().with_sliding_window(7).unwrap();
    let stream = Attention::new(
        plain(8),
        Layout::Half,
        PositionMap::streaming(0, 7).unwrap(),
    );
    let want = p.run(&slide, Kernel::Reference).unwrap();
    for kernel in KERNELS {
        assert!(max_err(&p.run(&stream, kernel).unwrap(), &want) < 1e-5);
    }
}

fn stats(att: &Attention, n_q: usize, n_k: usize, tiles: TileConfig) -> TileStats {
    let q = Array3::<f32>::zeros((n_q, 2, 2));
    let kv = Array3::<f32>::zeros((n_k, 1, 2));
    let q_pos: Vec<usize> = (n_k - n_q..n_k).collect();
    let k_pos: Vec<usize> = (0..n_k).collect();
    att.tiled_with(q.view(), kv.view(), kv.view(), &q_pos, &k_pos, &tiles)
        .unwrap()
        .1
}

/// Entry-level counts of a tiling: (tiles with some visible entry, tiles whose visible
/// entries use more than one piece, tiles with none visible that the causal diagonal
/// alone would compute).
fn brute_force(att: &Attention, n_q: usize, n_k: usize, t: TileConfig) -> (usize, usize, usize) {
    let pieces = att.map().pieces();
    let off = n_k - n_q;
    let (mut computed, mut multi, mut outside) = (0, 0, 0);
    for i0 in (0..n_q).step_by(t.block_q) {
        for j0 in (0..n_k).step_by(t.block_k) {
            let mut used = 0u8;
            let mut causal_any = false;
            for a in i0..(i0 + t.block_q).min(n_q) {
                for j in j0..(j0 + t.block_k).min(n_k) {
                    let i = off + a;
                    causal_any |= j <= i;
                    if att.visible(i, j) {
                        used |= 1 << pieces.index(i, j).unwrap();
                    }
                }
            }
            computed += usize::from(used != 0);
            multi += usize::from(used.count_ones() > 1);
            outside += usize::from(used == 0 && causal_any);
        }
    }
    (computed, multi, outside)
}

#[test]
fn tile_counts_match_closed_forms() {
    let heads = 2;
    let b = 8;
    let tiles = TileConfig::square(b).unwrap();
    let n = 128;
    let rope = Attention::new(plain(2), Layout::Half, PositionMap::Rope);
    let causal_tiles = (n / b) * (n / b + 1) / 2;
    // Sliding window: B | w, B | n.
    for w in [8, 16, 40, 64, 128] {
        let att = rope.clone().with_sliding_window(w).unwrap();
        let st = stats(&att, n, n, tiles);
        let want = expected_sliding_window_computed_tiles(n, w, b).unwrap();
        assert_eq!(st.computed(), heads * want, "window {w}");
        assert_eq!(st.outside_mask, heads * (causal_tiles - want), "window {w}");
        assert_eq!(st.total(), heads * (n / b) * (n / b));
        assert_eq!(st.qk_products, st.dot_products());
        assert_eq!(st.pv_products, st.computed());
    }
    // Chunked: B | C, C | n.
    for c in [8, 16, 32, 64, 128] {
        let att = rope.clone().with_chunked(c).unwrap();
        let st = stats(&att, n, n, tiles);
        let want = expected_chunked_computed_tiles(n, c, b).unwrap();
        assert_eq!(st.computed(), heads * want, "chunk {c}");
        assert_eq!(st.outside_mask, heads * (causal_tiles - want), "chunk {c}");
        // Only the diagonal tiles need an entry mask (chunk edges fall on tile edges).
        assert_eq!(st.masked, heads * (n / b), "chunk {c}");
    }
    // Self-Extend has the band of ReRoPE with w = W: the same straddling count.
    for w in [3, 8, 17, 64] {
        let att = Attention::new(
            plain(2),
            Layout::Half,
            PositionMap::self_extend(4, w).unwrap(),
        );
        let st = stats(&att, n, n, tiles);
        assert_eq!(
            st.straddling,
            heads * expected_straddling_tiles(n, n, 0, w, &tiles)
        );
    }
    // DCA with B | c: every tile lies in one chunk pair, so nothing straddles; with
    // m = c/B blocks per chunk and n/c chunks, intra tiles are (n/c) m(m+1)/2,
    // successive (n/c - 1) m^2, the rest inter.
    for (chunk, local) in [(24, 8), (40, 8), (64, 32)] {
        let c = chunk - local;
        let att = Attention::new(
            plain(2),
            Layout::Half,
            PositionMap::dca(chunk, local).unwrap(),
        );
        let st = stats(&att, n, n, tiles);
        let (m, chunks) = (c / b, n / c);
        assert_eq!(st.straddling, 0);
        assert_eq!(
            st.near,
            heads * chunks * m * (m + 1) / 2,
            "dca {chunk} {local}"
        );
        assert_eq!(st.far, heads * (causal_tiles - chunks * m * (m + 1) / 2));
        let successive = (chunks - 1) * m * m;
        assert!(st.far >= heads * successive);
    }
    // StreamingLLM with S <= B and B | W: block row I computes key block 0 (the sinks)
    // and blocks I - W/B ..= I; the middle is skipped.
    for (sinks, w) in [(4, 16), (8, 32), (1, 8)] {
        let att = Attention::new(
            plain(2),
            Layout::Half,
            PositionMap::streaming(sinks, w).unwrap(),
        );
        let st = stats(&att, n, n, tiles);
        let a = w / b;
        let want: usize = (0..n / b).map(|i| if i <= a { i + 1 } else { a + 2 }).sum();
        assert_eq!(st.computed(), heads * want, "streaming {sinks} {w}");
        assert_eq!(st.outside_mask, heads * (causal_tiles - want));
    }
}

/// For any tile size, offsets and parameters, the tile counts equal the entry-level
/// brute force wherever the classification is exact, and never fall below it.
#[test]
fn tile_counts_against_entry_level_counts() {
    let heads = 2;
    for (n_q, n_k) in [(64, 64), (37, 90)] {
        for (bq, bk) in [(8, 8), (7, 5), (16, 32), (1, 1)] {
            let tiles = TileConfig::new(bq, bk).unwrap();
            let mut atts: Vec<Attention> = new_maps()
                .into_iter()
                .map(|m| Attention::new(plain(2), Layout::Half, m))
                .collect();
            for mask in masks() {
                atts.push(
                    Attention::new(plain(2), Layout::Half, PositionMap::Rope)
                        .with_mask(mask)
                        .unwrap(),
                );
            }
            for att in atts {
                let st = stats(&att, n_q, n_k, tiles);
                let (computed, multi, outside) = brute_force(&att, n_q, n_k, tiles);
                let label = format!("{} {:?} {n_q}/{n_k} {bq}x{bk}", att.map(), att.mask());
                assert!(st.computed() >= heads * computed, "{label}");
                assert!(st.straddling >= heads * multi, "{label}");
                assert!(st.outside_mask <= heads * outside, "{label}");
                assert_eq!(st.qk_products, st.dot_products(), "{label}");
                assert_eq!(st.pv_products, st.computed(), "{label}");
                // A single mask is classified exactly (two masks are each checked
                // alone); 1x1 tiles make every map exact.
                let one_mask =
                    att.mask().chunk().is_none() || att.mask().sliding_window().is_none();
                if (att.map() == &PositionMap::Rope && one_mask) || (bq, bk) == (1, 1) {
                    assert_eq!(st.computed(), heads * computed, "{label}");
                    assert_eq!(st.outside_mask, heads * outside, "{label}");
                }
                if (bq, bk) == (1, 1) {
                    assert_eq!(st.straddling, 0, "{label}");
                }
            }
        }
    }
}

#[test]
fn kernel_names_and_dispatch() {
    for (text, kernel) in [
        ("reference", Kernel::Reference),
        ("two-pass", Kernel::TwoPass),
        ("tiled", Kernel::Tiled(TileConfig::DEFAULT)),
    ] {
        assert_eq!(text.parse::<Kernel>().unwrap(), kernel);
        assert_eq!(kernel.to_string(), text);
    }
    assert_eq!(Kernel::default(), Kernel::Tiled(TileConfig::DEFAULT));
    assert!(matches!(
        "fast".parse::<Kernel>(),
        Err(RopeError::InvalidParameter { .. })
    ));
    let att = Attention::new(plain(8), Layout::Half, PositionMap::dca(12, 3).unwrap());
    let p = Problem::new(20, 20, (2, 1), (8, 8), 7);
    let (_, none) = att
        .run(
            Kernel::Reference,
            p.q.view(),
            p.k.view(),
            p.v.view(),
            &p.q_pos,
            &p.k_pos,
        )
        .unwrap();
    assert!(none.is_none());
    let (out, stats) = att
        .run(
            Kernel::default(),
            p.q.view(),
            p.k.view(),
            p.v.view(),
            &p.q_pos,
            &p.k_pos,
        )
        .unwrap();
    let tiled = att
        .tiled(p.q.view(), p.k.view(), p.v.view(), &p.q_pos, &p.k_pos)
        .unwrap();
    assert_eq!(out, tiled);
    assert_eq!(stats.unwrap().computed(), 2);
}

#[test]
fn bad_input_is_a_typed_error_at_any_size() {
    let invalid = |r: Result<Array3<f32>, RopeError>| {
        assert!(
            matches!(r, Err(RopeError::InvalidParameter { .. })),
            "{:?}",
            r.map(|a| a.dim())
        )
    };
    let p = Problem::new(5, 5, (2, 1), (8, 8), 9);
    // Causal-only maps refuse bidirectional attention.
    for map in new_maps() {
        let att = Attention::new(plain(8), Layout::Half, map).with_causal(false);
        for kernel in [Kernel::Reference].into_iter().chain(KERNELS) {
            invalid(p.run(&att, kernel));
        }
    }
    // Bad masks.
    assert!(Mask::NONE.with_sliding_window(0).is_err());
    assert!(Mask::NONE.with_chunked(0).is_err());
    let rope = Attention::new(plain(8), Layout::Half, PositionMap::Rope);
    assert!(rope.clone().with_sliding_window(0).is_err());
    assert!(rope.clone().with_chunked(0).is_err());
    // Bad maps from the public variants.
    for map in [
        PositionMap::SelfExtend {
            group: 0,
            window: 4,
            scale_base: None,
        },
        PositionMap::DualChunk {
            chunk_size: 4,
            local_window: 9,
        },
        PositionMap::Streaming {
            sinks: 0,
            window: 0,
        },
    ] {
        let att = Attention::new(plain(8), Layout::Half, map);
        for kernel in [Kernel::Reference].into_iter().chain(KERNELS) {
            invalid(p.run(&att, kernel));
        }
    }
    // Positions past ropex::MAX_POSITION.
    let far = [0, 1, 2, 3, ropex::MAX_POSITION + 1];
    for kernel in [Kernel::Reference].into_iter().chain(KERNELS) {
        invalid(
            rope.run(kernel, p.q.view(), p.k.view(), p.v.view(), &far, &p.k_pos)
                .map(|(o, _)| o),
        );
        invalid(
            rope.run(
                kernel,
                p.q.view(),
                p.k.view(),
                p.v.view(),
                &p.q_pos,
                &[usize::MAX; 5],
            )
            .map(|(o, _)| o),
        );
    }
    // Huge tiles are sized by the problem: they run and agree with the reference.
    let want = p.run(&rope, Kernel::Reference).unwrap();
    for tiles in [
        TileConfig::square(usize::MAX / 2).unwrap(),
        TileConfig::new(64, 1 << 40).unwrap(),
        TileConfig::new(1 << 60, 64).unwrap(),
        TileConfig::new(usize::MAX, usize::MAX).unwrap(),
    ] {
        let got = p.run(&rope, Kernel::Tiled(tiles)).unwrap();
        assert!(max_err(&got, &want) < 1e-5, "{tiles:?}");
    }
}

/// The per-query visibility the kernels use is the map's and the mask's: a query of
/// StreamingLLM far from the start sees exactly S + W keys.
#[test]
fn streaming_hides_the_middle() {
    let att = Attention::new(
        plain(8),
        Layout::Half,
        PositionMap::streaming(4, 6).unwrap(),
    );
    let seen = (0..=40).filter(|&j| att.visible(40, j)).count();
    assert_eq!(seen, 10);
    // Changing a hidden key or value does not change the output of that query.
    let mut p = Problem::new(1, 41, (2, 1), (8, 8), 11);
    let before = p.run(&att, Kernel::default()).unwrap();
    p.k.slice_mut(s![10, .., ..]).fill(50.0);
    p.v.slice_mut(s![10, .., ..]).fill(f32::NAN);
    for kernel in [Kernel::Reference].into_iter().chain(KERNELS) {
        let after = p.run(&att, kernel).unwrap();
        assert!(max_err(&after, &before) < 1e-5, "{kernel:?}");
    }
}

/// The independent reference of tools/position_maps_reference.py (Self-Extend as two
/// score matrices and a mask merge, DCA as three regions, StreamingLLM as a simulated
/// sink + window cache with positions by place in the cache) agrees with every kernel
/// and with the decoding cache, token by token and in chunks, within 1e-5.
#[test]
fn independent_reference_fixtures_match_every_kernel_and_the_cache() {
    use ropex::KvCache;
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/position_maps_ref");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 6);
    for dir in cases {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let map: PositionMap = meta["map"].as_str().unwrap().parse().unwrap();
        let read =
            |f: &str| -> ndarray::Array3<f32> { ndarray_npy::read_npy(dir.join(f)).unwrap() };
        let (q, k, v, want) = (read("q.npy"), read("k.npy"), read("v.npy"), read("out.npy"));
        let (n, _, d) = q.dim();
        let cfg = RopeConfig::new(d, 10_000.0).unwrap();
        let dca_scale = meta["dca_logit_train_len"].as_u64().map(|l| l as usize);
        let mut att = Attention::new(cfg.frequencies(), Layout::Half, map);
        if let Some(l) = dca_scale {
            att = att.with_dca_logit_scale(l).unwrap();
            // The scale is really on: without it the output differs.
            let plain = Attention::new(cfg.frequencies(), Layout::Half, map)
                .reference(
                    q.view(),
                    k.view(),
                    v.view(),
                    &(0..n).collect::<Vec<_>>(),
                    &(0..n).collect::<Vec<_>>(),
                )
                .unwrap();
            assert!(max_err(&plain, &want) > 1e-3);
        }
        let pos: Vec<usize> = (0..n).collect();
        for kernel in [Kernel::Reference].into_iter().chain(KERNELS) {
            let (got, _) = att
                .run(kernel, q.view(), k.view(), v.view(), &pos, &pos)
                .unwrap();
            let e = max_err(&got, &want);
            assert!(e < 1e-5, "{map} {kernel:?}: {e}");
        }
        // With the DCA logit scale, n is the length so far: only a one-chunk prefill sees
        // the fixture's n.
        let chunks: &[usize] = if dca_scale.is_some() {
            &[n]
        } else {
            &[1, 9, n]
        };
        for &chunk in chunks {
            let mut cache = KvCache::new(
                cfg.clone(),
                Layout::Half,
                map,
                CacheShape::square(k.dim().1, d),
            )
            .unwrap();
            if let Some(l) = dca_scale {
                cache = cache.with_dca_logit_scale(l).unwrap();
            }
            let mut t = 0;
            while t < n {
                let e = (t + chunk).min(n);
                let r = s![t..e, .., ..];
                let got = cache
                    .prefill_chunk(q.slice(r), k.slice(r), v.slice(r))
                    .unwrap();
                let err = max_err(&got, &want.slice(r).to_owned());
                assert!(err < 1e-5, "{map} cache chunks of {chunk} at {t}: {err}");
                t = e;
            }
        }
    }
}

/// Arbitrary positions (gaps, a shuffled query order, repeated positions): the tile
/// classification from block min/max stays conservative and every kernel agrees with
/// the reference.
#[test]
fn arbitrary_positions() {
    let mut state = 7u64;
    let mut next = |m: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize % m
    };
    let mut k_pos: Vec<usize> = (0..60).map(|_| next(150)).collect();
    k_pos.sort_unstable();
    let q_pos: Vec<usize> = (0..40).map(|_| next(160)).collect();
    for map in new_maps() {
        for mask in masks() {
            let att = Attention::new(plain(8), Layout::Half, map)
                .with_mask(mask)
                .unwrap();
            let p = Problem {
                q: rand3((q_pos.len(), 2, 8), 1),
                k: rand3((k_pos.len(), 1, 8), 2),
                v: rand3((k_pos.len(), 1, 8), 3),
                q_pos: q_pos.clone(),
                k_pos: k_pos.clone(),
            };
            check_all_kernels(&att, &p, &format!("{map} {mask:?} arbitrary positions"));
        }
    }
}

proptest::proptest! {
    /// Any parameters, valid or not, at any size: constructors return a map or a typed
    /// error, and a valid map's closed form agrees with its pieces wherever it is
    /// visible, is NaN where hidden, and never panics.
    #[test]
    fn random_maps_never_panic_and_pieces_match(
        a in 0usize..40,
        b in 0usize..40,
        big in proptest::prelude::any::<bool>(),
        i in 0usize..300,
        j in 0usize..300,
    ) {
        let (a, b) = if big { (usize::MAX - a, usize::MAX / 2 - b) } else { (a, b) };
        for map in [
            PositionMap::self_extend(a, b),
            PositionMap::self_extend(b, a),
            PositionMap::dca(a, b),
            PositionMap::dca(b, a),
            PositionMap::streaming(a, b),
            PositionMap::streaming(b, a),
        ]
        .into_iter()
        .flatten()
        {
            let p = map.position(i, j);
            let pieces = map.pieces();
            match pieces.index(i, j).filter(|_| map.sees(i, j)) {
                Some(k) => {
                    let via = pieces.list()[k].at(i as f64, j as f64);
                    proptest::prop_assert!(p.is_finite() && (via - p).abs() <= 1e-9 * p.abs().max(1.0), "{} {} {}", map, p, via);
                }
                None => proptest::prop_assert!(p.is_nan() && !map.sees(i, j), "{}", map),
            }
            let text = map.to_string();
            proptest::prop_assert_eq!(text.parse::<PositionMap>().unwrap(), map);
        }
    }
}
