//! The tile planner: which [`TileConfig`] the tiled kernel uses when the caller leaves
//! the choice to ropex ([`Kernel::Tiled`](super::Kernel::Tiled) with
//! [`TileConfig::DEFAULT`] in [`Attention::run`](super::Attention::run), which is what
//! [`Kernel::default`](super::Kernel) is), as RustFFT's planner picks an algorithm.
//!
//! The choice is a pure function of a [`Problem`]: query and key counts, head dim,
//! query and kv heads, the kind of position map, the instruction set of the SIMD
//! kernels and the number of worker threads. Nothing is timed at run time, so the
//! choice is deterministic and tests pin it.
//!
//! # Rules and the measurements behind them
//! All figures: causal prefill, f32, one thread unless said, interleaved medians of
//! `bench_report --tune` (`examples/bench_report.rs`), GFLOP/s of useful causal work,
//! rope_tiled / rerope_tiled (ReRoPE w = 512).
//!
//! 1. **Instruction set.** The portable and AVX2 paths keep 64 x 64: no measurement
//!    says otherwise, and 64 is a multiple of the 32-key panel of the packed-key GEMM
//!    (so keys are packed once per call). On an AMD EPYC family 25 model 1 (Zen 3,
//!    AVX2, FMA-loop peak 108 GFLOP/s), `bench_report --tune` at n = 4096 (one run,
//!    rope / rerope GFLOP/s, run-to-run noise about 15% on that host): d = 128 8/8
//!    64 x 64 and 128 x 64 within noise of each other (35-36); d = 64 9/3 32 x 32 27.9 /
//!    33.4, 64 x 64 35.6 / 38.2, 128 x 64 43.6 / 40.5, 64 x 128 36.6 / 33.0; d = 128
//!    32/8 32 x 64 37.0, 64 x 64 37.2, 128 x 64 39.2 / 44.2. No tile wins clearly.
//! 2. **AVX-512: 128 x 64.** A taller tile amortises the per-row softmax calls and the
//!    per-call GEMM overhead over more rows; a wider one costs band maps a second
//!    product over a wider strip at the band edge, and did not help the plain map on
//!    the Intel core.
//!    - AMD EPYC family 26 (Zen 5), d = 128, H = 8, n = 4096 (the tiled kernel's
//!      module docs): 64 x 64 122-128 / 118-120; 128 x 64 136 / 127; 64 x 128 132 /
//!      125; 128 x 128 138-145 / 133-134; 256 x 128 149 / 135.
//!    - Intel Xeon family 6 model 207 (Emerald Rapids, FMA-loop peak 188-198), on a
//!      machine shared with other jobs (absolute figures move by 30% between runs, so
//!      only ratios within one run count). d = 128, H = 8, n = 4096, first run: 64 x 64
//!      61.7 / 51.9; 128 x 64 60.6 / 59.1; 64 x 128 53.6 / 50.3; 128 x 128 62.1 / 53.8;
//!      256 x 128 63.9 / 56.2; 128 x 256 52.6 / 48.5; 256 x 64 58.6 / 59.8. Second run,
//!      three candidates twice each: 64 x 64 50.3, 50.4 / 52.0, 50.9; 128 x 64 61.5,
//!      58.4 / 55.8, 58.5; 128 x 128 55.4, 55.9 / 51.5, 52.3.
//!    - Same Xeon, d = 64, 9 / 3 heads, n = 4096, first run: 64 x 64 80.2 / 75.3;
//!      128 x 64 81.9 / 71.2; 64 x 128 68.1 / 73.4; 128 x 128 81.8 / 77.7; 256 x 128
//!      80.9 / 70.8; 128 x 256 67.4 / 69.2. Second run (busier machine): 64 x 64 48.4,
//!      49.9 / 48.5, 51.2; 128 x 64 56.0, 54.8 / 51.3, 49.1; 128 x 128 56.1, 52.8 /
//!      53.7, 50.0. At n = 1024 (d = 64, 9 / 3) the tiles are within noise of each
//!      other (60-67 / 53-60), 32 x 32 slower (55 / 55).
//!
//!    On the Xeon 128 x 64 beats 64 x 64 by 10-20% at d = 128 and 12% at d = 64 and
//!    ties 128 x 128 at d = 64; keys wider than 64 lose at d = 128 (the query block and
//!    key panel then overflow the 48 KiB L1). On Zen 5 it is 2-6% behind 128 x 128. It
//!    is the one tile that is never far from the best on either machine.
//! 3. **Threads.** Tasks are query blocks (all heads of a block in one task, handed out
//!    largest first). With `t` threads the planner keeps at least `4 t` query blocks,
//!    halving `block_q` (not below 32) until there are, so that the last tasks of a
//!    causal triangle are small and no thread idles long at the end.
//! 4. **Small problems.** `block_q` never exceeds `n_q` rounded up to a multiple of 16,
//!    and `block_k` never exceeds `n_k` rounded up to the 32-key panel (the tiles of a
//!    short call are the whole call).
//!
//! The figures above predate two kernel changes (the tiled kernel's module docs,
//! "Tile size"): the values are copied contiguous once per call when `H_kv > 1`, and
//! straddling tiles run the second product only on the sub-blocks at the band edge.
//! With both, on the Zen 5 core, 128 x 64 tiles at n = 4096 reach 168-169 GFLOP/s at
//! d = 128 8/8 (58-59% of a 290 GFLOP/s peak), rerope / rope 1.05-1.06; the tile choice
//! was not re-tuned.
//!
//! The head counts and the map kind are inputs so that a rule can use them; today
//! they do not change the choice (GQA shapes measured like their query-head count; band
//! maps were measured above and share the plain map's tile).

use super::kernels::{Isa, Kernels, PackedKeys};
use super::tiled::TileConfig;
use crate::position::PositionMap;

/// What kind of position map a call uses (the planner's view of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MapKind {
    /// Plain RoPE: one piece per tile.
    Plain,
    /// A band map (ReRoPE, Leaky ReRoPE, Self-Extend): two pieces meet at the band edge.
    Band,
    /// Any other map (DCA, StreamingLLM, interpolated).
    Other,
}

impl MapKind {
    /// The kind of `map`.
    pub(crate) fn of(map: &PositionMap) -> Self {
        match map {
            PositionMap::Rope => MapKind::Plain,
            PositionMap::ReRope { .. }
            | PositionMap::LeakyReRope { .. }
            | PositionMap::SelfExtend { .. } => MapKind::Band,
            _ => MapKind::Other,
        }
    }
}

/// Everything the planner looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Problem {
    /// Queries.
    pub n_q: usize,
    /// Keys.
    pub n_k: usize,
    /// Query/key head dim.
    pub head_dim: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// The map's kind.
    pub map: MapKind,
    /// The instruction set of the SIMD kernels.
    pub isa: Isa,
    /// Worker threads the call may use.
    pub threads: usize,
}

/// Smallest `block_q` the thread rule goes down to: a task of fewer rows costs more in
/// per-task setup (rotating its queries, classifying its tiles) than it balances, and a
/// call of at most this many rows stays one tile row, as with 64 x 64 tiles.
const MIN_BLOCK_Q: usize = 32;

/// `block_q` of a short call is its row count rounded up to this.
const ROW_ALIGN: usize = 16;

/// Query blocks wanted per thread.
const BLOCKS_PER_THREAD: usize = 4;

/// `x` rounded up to a multiple of `m` (`m >= 1`), saturating.
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m).saturating_mul(m)
}

/// The planner's tiles for `p` (see the module docs for the rules).
pub(crate) fn plan(p: &Problem) -> TileConfig {
    // Rules 1 and 2: the instruction set's tile.
    let (mut block_q, mut block_k) = match p.isa {
        Isa::Avx512 => (128, 64),
        Isa::Avx2 | Isa::Portable => (64, 64),
    };
    // Rule 3: enough query blocks for every thread.
    let wanted = p.threads.max(1).saturating_mul(BLOCKS_PER_THREAD);
    while block_q > MIN_BLOCK_Q && p.n_q.div_ceil(block_q) < wanted {
        block_q /= 2;
    }
    // Rule 4: no tile larger than the call.
    block_q = block_q.min(round_up(p.n_q.max(1), ROW_ALIGN));
    block_k = block_k.min(round_up(p.n_k.max(1), PackedKeys::PANEL));
    TileConfig { block_q, block_k }
}

/// Worker threads of the calling context: rayon's current pool (1 without `rayon`).
fn threads() -> usize {
    #[cfg(feature = "rayon")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "rayon"))]
    {
        1
    }
}

/// `tiles`, or the planner's choice for this call when `tiles` is [`TileConfig::DEFAULT`]
/// (`q` is `[n_q, H_q, d]`, `k` is `[n_k, H_kv, d]`).
pub(crate) fn resolve(
    tiles: TileConfig,
    map: &PositionMap,
    q: (usize, usize, usize),
    k: (usize, usize, usize),
) -> TileConfig {
    if tiles != TileConfig::DEFAULT {
        return tiles;
    }
    plan(&Problem {
        n_q: q.0,
        n_k: k.0,
        head_dim: q.2,
        heads_q: q.1,
        heads_kv: k.1,
        map: MapKind::of(map),
        isa: Kernels::active().isa(),
        threads: threads(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::Attention;
    use crate::rotary::Layout;
    use crate::{PositionMap, RopeConfig};
    use ndarray::Array3;

    fn problem(n: usize, d: usize, heads: (usize, usize), isa: Isa, threads: usize) -> Problem {
        Problem {
            n_q: n,
            n_k: n,
            head_dim: d,
            heads_q: heads.0,
            heads_kv: heads.1,
            map: MapKind::Plain,
            isa,
            threads,
        }
    }

    fn tiles(block_q: usize, block_k: usize) -> TileConfig {
        TileConfig { block_q, block_k }
    }

    #[test]
    fn pinned_choices() {
        use Isa::*;
        let cases = [
            // The four benchmark shapes at n = 4096, one and two threads.
            (problem(4096, 128, (8, 8), Avx512, 1), tiles(128, 64)),
            (problem(4096, 64, (9, 3), Avx512, 1), tiles(128, 64)),
            (problem(4096, 64, (32, 8), Avx512, 2), tiles(128, 64)),
            (problem(4096, 128, (32, 8), Avx512, 2), tiles(128, 64)),
            (problem(4096, 128, (8, 8), Avx2, 1), tiles(64, 64)),
            (problem(4096, 128, (8, 8), Portable, 2), tiles(64, 64)),
            // Threads: at least 4 query blocks per thread.
            (problem(1024, 128, (8, 8), Avx512, 2), tiles(128, 64)),
            (problem(512, 128, (8, 8), Avx512, 1), tiles(128, 64)),
            (problem(512, 128, (8, 8), Avx512, 2), tiles(64, 64)),
            (problem(512, 128, (8, 8), Avx512, 8), tiles(32, 64)),
            (problem(256, 64, (8, 8), Avx2, 2), tiles(32, 64)),
            // Small calls: no tile larger than the call, no split below 32 rows.
            (problem(10, 64, (2, 1), Avx512, 1), tiles(16, 32)),
            (problem(20, 64, (2, 1), Avx512, 2), tiles(32, 32)),
            (problem(1, 8, (1, 1), Portable, 1), tiles(16, 32)),
            (problem(40, 64, (2, 1), Avx2, 1), tiles(32, 64)),
        ];
        for (p, want) in cases {
            assert_eq!(plan(&p), want, "{p:?}");
        }
        // Head counts and the map kind do not change today's choice.
        let mut p = problem(4096, 128, (8, 8), Avx512, 1);
        for map in [MapKind::Band, MapKind::Other] {
            p.map = map;
            assert_eq!(plan(&p), tiles(128, 64));
        }
    }

    #[test]
    fn choices_are_valid_and_deterministic() {
        for isa in Isa::ALL {
            for n in [0, 1, 15, 16, 33, 100, 1000, 5000, usize::MAX] {
                for threads in [0, 1, 2, 3, 64, usize::MAX] {
                    let p = problem(n, 64, (4, 2), isa, threads);
                    let t = plan(&p);
                    assert_eq!(t, plan(&p));
                    t.validate().unwrap();
                    assert!(t.block_q >= ROW_ALIGN && t.block_q <= 128, "{p:?} {t:?}");
                    // Keys packed once per call: block_k on the panel grid.
                    assert!(t.block_k.is_multiple_of(PackedKeys::PANEL), "{p:?} {t:?}");
                }
            }
        }
    }

    #[test]
    fn default_tiles_are_planned_and_explicit_tiles_kept() {
        let explicit = tiles(8, 8);
        let map = PositionMap::Rope;
        assert_eq!(resolve(explicit, &map, (64, 2, 8), (64, 1, 8)), explicit);
        let planned = resolve(TileConfig::DEFAULT, &map, (64, 2, 8), (64, 1, 8));
        let mut p = problem(64, 8, (2, 1), Kernels::active().isa(), threads());
        p.map = MapKind::Plain;
        assert_eq!(planned, plan(&p));
    }

    /// Deterministic inputs in [-1, 1] (no randomness needed: the test compares kernels).
    fn input(shape: (usize, usize, usize), seed: usize) -> Array3<f32> {
        Array3::from_shape_fn(shape, |(i, h, c)| {
            ((i * 31 + h * 17 + c * 7 + seed * 101) as f32 * 0.618).sin()
        })
    }

    /// Every tile the planner picks on a small grid (every instruction set, thread count,
    /// shape and map kind) gives the reference kernel's output within the tiled kernel's
    /// tolerance (1e-5, as in tests/maps.rs).
    #[test]
    fn every_choice_matches_the_reference() {
        let maps = [
            PositionMap::Rope,
            PositionMap::rerope(24).unwrap(),
            PositionMap::leaky_rerope(24, 4.0).unwrap(),
            PositionMap::dca(40, 12).unwrap(),
        ];
        for n in [1, 23, 150] {
            for (d, heads) in [(16, (2, 1)), (64, (3, 3)), (64, (4, 2))] {
                let q = input((n, heads.0, d), 1);
                let k = input((n, heads.1, d), 2);
                let v = input((n, heads.1, d), 3);
                let pos: Vec<usize> = (0..n).collect();
                let freqs = RopeConfig::new(d, 10_000.0).unwrap().frequencies();
                for map in &maps {
                    let att = Attention::new(freqs.clone(), Layout::Half, *map);
                    let want = att
                        .reference(q.view(), k.view(), v.view(), &pos, &pos)
                        .unwrap();
                    let mut seen = Vec::new();
                    for isa in Isa::ALL {
                        for threads in [1, 2, 8] {
                            let mut p = problem(n, d, heads, isa, threads);
                            p.map = MapKind::of(map);
                            let t = plan(&p);
                            if seen.contains(&t) {
                                continue;
                            }
                            seen.push(t);
                            let (got, _) = att
                                .tiled_with(q.view(), k.view(), v.view(), &pos, &pos, &t)
                                .unwrap();
                            let err = got
                                .iter()
                                .zip(&want)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0f32, f32::max);
                            assert!(err < 1e-5, "{map} n {n} d {d} {t:?}: {err}");
                        }
                    }
                }
            }
        }
    }
}
