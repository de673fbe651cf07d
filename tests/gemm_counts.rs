//! GEMM-call counts per tile class, without wall-clock: every computed tile runs exactly
//! one `P V` product and one `Q K^T` product per piece it needs (near and far tiles
//! one, straddling tiles two), so ReRoPE's extra work is exactly the straddling tiles.

use ndarray::Array3;
use ropex::attention::{Attention, TileConfig, TileStats, expected_straddling_tiles};
use ropex::{Layout, PositionMap, RopeConfig};

fn stats(n_q: usize, n_k: usize, map: PositionMap, tiles: TileConfig, heads: usize) -> TileStats {
    let d = 8;
    let att = Attention::new(
        RopeConfig::new(d, 10_000.0).unwrap().frequencies(),
        Layout::Half,
        map,
    );
    let q = Array3::<f32>::from_elem((n_q, heads, d), 0.1);
    let kv = Array3::<f32>::from_elem((n_k, 1, d), 0.2);
    let q_pos: Vec<usize> = (n_k - n_q..n_k).collect();
    let k_pos: Vec<usize> = (0..n_k).collect();
    att.tiled_with(q.view(), kv.view(), kv.view(), &q_pos, &k_pos, &tiles)
        .unwrap()
        .1
}

#[test]
fn products_per_tile_class() {
    for (n_q, n_k) in [(300, 300), (97, 300), (1, 300), (256, 256)] {
        for w in [1, 7, 32, 64, 100, 1000] {
            for tiles in [
                TileConfig::DEFAULT,
                TileConfig::new(32, 32).unwrap(),
                TileConfig::new(16, 8).unwrap(),
                TileConfig::new(7, 5).unwrap(),
            ] {
                for map in [
                    PositionMap::rerope(w).unwrap(),
                    PositionMap::leaky_rerope(w, 16.0).unwrap(),
                ] {
                    let heads = 3;
                    let s = stats(n_q, n_k, map, tiles, heads);
                    let label = format!("n_q={n_q} n_k={n_k} w={w} {tiles:?} {map:?}: {s:?}");
                    assert_eq!(s.qk_products, s.near + s.far + 2 * s.straddling, "{label}");
                    assert_eq!(s.qk_products, s.dot_products(), "{label}");
                    assert_eq!(s.pv_products, s.computed(), "{label}");
                    assert_eq!(
                        s.straddling,
                        heads * expected_straddling_tiles(n_q, n_k, n_k - n_q, w, &tiles),
                        "{label}"
                    );
                }
                // Plain RoPE: one product of each kind per computed tile, all near.
                let r = stats(n_q, n_k, PositionMap::Rope, tiles, 2);
                assert_eq!((r.far, r.straddling), (0, 0));
                assert_eq!(r.qk_products, r.computed());
                assert_eq!(r.pv_products, r.computed());
            }
        }
    }
}

/// The headline shape (n = 4096, w = 512, 64 x 64 tiles): ReRoPE runs 56 more score
/// products per head than RoPE's 2080, i.e. 1 + 56 / 2080 = 1.027 times the `Q K^T`
/// work and the same `P V` work.
#[test]
fn headline_product_counts() {
    let n = 4096;
    let tiles = TileConfig::DEFAULT;
    let rope = stats(n, n, PositionMap::Rope, tiles, 1);
    let rerope = stats(n, n, PositionMap::rerope(512).unwrap(), tiles, 1);
    assert_eq!(rope.qk_products, 2080);
    assert_eq!(rope.pv_products, 2080);
    assert_eq!(rerope.qk_products, 2080 + 56);
    assert_eq!(rerope.pv_products, 2080);
    assert_eq!(rerope.masked, 64);
}

/// The target shape (n = 4096, 64 x 64 tiles, one head): tile products of the
/// new maps and masks against plain RoPE's 2080, from the closed forms.
/// - Self-Extend G = 8, W = 1024: one straddling tile per block row from I = 16 on:
///   2080 + 48 score products (1.023x), the same 2080 value products.
/// - DCA chunk 3072, local 512: c = 2560 = 40 blocks, so no tile straddles a chunk
///   boundary: 2080 of each.
/// - StreamingLLM S = 4, W = 1024: row I computes min(I, 16) + 1 window blocks and,
///   from I = 17 on, the sink block: 952 + 47 = 999 value products (0.480x); the tile
///   (16, 0) holds sink keys both inside and outside the window, so it straddles and
///   runs one score product more (1000).
/// - Sliding window 1024: sum_I min(I, 16) + 1 = 153 + 47 * 17 = 952 (0.458x).
/// - Chunked 1024: 4 chunks of 16 x 17 / 2 = 544 (0.262x).
#[test]
fn headline_counts_for_the_new_maps_and_masks() {
    let n = 4096;
    let tiles = TileConfig::DEFAULT;
    let se = stats(n, n, PositionMap::self_extend(8, 1024).unwrap(), tiles, 1);
    assert_eq!(
        (se.qk_products, se.pv_products, se.straddling),
        (2128, 2080, 48)
    );
    let dca = stats(n, n, PositionMap::dca(3072, 512).unwrap(), tiles, 1);
    assert_eq!(
        (dca.qk_products, dca.pv_products, dca.straddling),
        (2080, 2080, 0)
    );
    let window: usize = (0..64).map(|i: usize| i.min(16) + 1).sum();
    let sinks = (17..64).count();
    let st = stats(n, n, PositionMap::streaming(4, 1024).unwrap(), tiles, 1);
    assert_eq!(st.pv_products, window + sinks);
    assert_eq!((st.straddling, st.qk_products), (1, window + sinks + 1));
    assert_eq!(st.outside_mask, 2080 - window - sinks);
    let masked = |att: Attention| {
        let q = Array3::<f32>::from_elem((n, 1, 8), 0.1);
        let pos: Vec<usize> = (0..n).collect();
        att.tiled_with(q.view(), q.view(), q.view(), &pos, &pos, &tiles)
            .unwrap()
            .1
    };
    let rope = || {
        Attention::new(
            RopeConfig::new(8, 10_000.0).unwrap().frequencies(),
            Layout::Half,
            PositionMap::Rope,
        )
    };
    let sw = masked(rope().with_sliding_window(1024).unwrap());
    assert_eq!((sw.qk_products, sw.pv_products), (952, 952));
    assert_eq!(window, 952);
    let ch = masked(rope().with_chunked(1024).unwrap());
    assert_eq!((ch.qk_products, ch.pv_products), (544, 544));
}
