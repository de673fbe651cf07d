//! The tiled kernel: flash-style online softmax over `(query block x key block)` tiles,
//! each tile classified from the position map's region rule, the mask and the causal
//! diagonal (the idea of lmdeploy's ReRoPE kernel and Su's post 16, generalised to any
//! map).
//!
//! Each distinct key function's keys are rotated once per call and packed per kv head
//! for the tile GEMM
//! ([`Kernels::qk_tile_packed`](super::kernels::Kernels::qk_tile_packed), when `block_k`
//! is a multiple of the 32-key panel; otherwise each tile packs its own keys); each
//! piece's queries are rotated once, block by block, inside the task that owns the
//! block. Then, per query head and query block, the key blocks are visited in order and
//! every tile is classified from the positions of its rows and columns (`i0..=i1` =
//! min/max query position in the tile, `j0..=j1` = min/max key position, so arbitrary
//! positions and offsets work; `r = i - j` ranges over `[i0 - j1, i1 - j0]`, clipped to
//! `r >= 0` when causal):
//!
//! | step | rule | effect |
//! |---|---|---|
//! | causal | `i1 - j0 < 0` | skipped |
//! | mask | sliding window: `min |r| >= window`; chunked: no shared chunk | skipped, [`TileStats::outside_mask`] |
//! | region | the pieces some entry may use ([`crate::position::Region::cover`]) | none: skipped (StreamingLLM's middle); one: one product; several: one product each and a per-entry select |
//! | per-entry mask | diagonal (`j1 > i0`), a mask edge, or hidden entries possible | entries set to `-inf` |
//!
//! For a band map (ReRoPE, Leaky, Self-Extend) a tile is near iff `i1 - j0 < w`, far iff
//! `max(i0 - j1, 0) >= w`, straddling otherwise (without `causal` the band is two-sided:
//! near iff `-w < i0 - j1` and `i1 - j0 < w`); for DCA the pieces are the chunk
//! distances `[floor(i0/c) - floor(j1/c), floor(i1/c) - floor(j0/c)]` covers; for
//! StreamingLLM, window and sink pieces and the hidden middle follow from `r` and `j0`.
//!
//! Online softmax, per query row, over the visible scores `s_j` of each tile:
//!
//! ```text
//! m' = max(m, max_j s_j),   l' = l e^(m - m') + sum_j e^(s_j - m'),
//! acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j,   o = acc / l  after the last tile
//! ```
//!
//! starting from `m = -inf`, `l = 0`, `acc = 0`. A row with no visible key in a tile is
//! left untouched (no `-inf - -inf`); a row with no visible key at all outputs zeros.
//! Masked entries are skipped, never multiplied by 0, so a NaN in `v_j` stays out of rows
//! that cannot see `j`.
//!
//! ## Compute
//! Per tile: `Q K^T` with the SIMD tile GEMM (one per piece the tile needs, so
//! `near + far + 2 straddling + extra_pieces` products, counted in
//! [`TileStats::qk_products`]); the piece select and the visibility mask only in the
//! tiles that need them (straddling tiles; diagonal, mask-edge and sink-edge tiles).
//! A straddling tile is classified again per sub-block of 8 query rows by one 32-key
//! panel (the same conservative region cover): a sub-block that needs one piece gets that
//! piece's product written straight into the result, only a mixed sub-block (the band
//! edge runs through it) computes each of its pieces and selects entry by entry, so the
//! second product covers roughly the band edge's strip instead of the whole tile (each
//! piece of a straddling tile still counts once in [`TileStats::qk_products`]; every
//! entry's score is bit-identical to the whole-tile product). The visibility of a
//! per-entry tile depends on positions and the mask, not on the head, so it is worked
//! out once per block row and applied to every head's scores; so is a straddling tile's
//! plan (its sub-blocks' pieces and, in mixed ones, the runs of entries that take another
//! piece's score, which each head then copies as slices). Worked out per head before, on
//! one AMD Zen 4 core (EPYC family 25 model 17, n = 1024, w = 512, three alternating
//! rounds of `bench_report --ns 1024`): ReRoPE / RoPE 1.17 -> 1.04 at d = 128 with 32 / 8
//! heads, 1.12 -> 1.06 with 8 / 8, 1.07 -> 1.04-1.06 at d = 64; Leaky 1.17 -> 1.07 at
//! d = 128 32 / 8. The online-softmax update
//! of a tile is one call ([`softmax::fold_rows`](super::kernels)): row maxima and sums
//! reduced `LANES` rows at a time by one shuffle tree, `e^(s - m)` by the exponential
//! for non-positive arguments (no overflow or NaN blends), no call per row; `P V` with
//! the tile GEMM ([`TileStats::pv_products`], one per computed tile). In diagonal tiles each row
//! sees a prefix of the columns, so `P V` runs on groups of 8 rows over their common
//! prefix plus each row's short remainder, and masked values are never read.
//!
//! ## Tile size
//! Measured single-threaded (H = 8, d = 128, causal, AVX-512; interleaved runs of
//! `cargo run --release --features bench-internals --example bench_report -- --ns 4096 --tune 64x64,128x128,..`),
//! n = 4096, rope_tiled / rerope_tiled (w = 512) in GFLOP/s: 32 x 32: 99 / 95;
//! 64 x 64: 122-128 / 118-120; 128 x 64: 136 / 127; 64 x 128: 132 / 125;
//! 128 x 128: 138-145 / 133-134; 256 x 128: 149 / 135; 128 x 256: 144 / 132. Larger
//! tiles amortise the per-row softmax calls and the per-call GEMM overhead; ReRoPE's
//! extra work grows with them (the band edge costs a second product over a `B`-wide
//! strip: `1 + B / n`-ish), so its ratio to RoPE rises from ~1.02-1.04 (64 x 64) to
//! ~1.04-1.08 (128 x 128) and ~1.1 (256 x 128). The default stays 64 x 64 (the tests
//! pin it); `TileConfig::square(128)` is about 10% faster in absolute time for both
//! maps on this machine.
//!
//! Values: a standard-layout `[n_k, H_kv, d_v]` input has its value rows `H_kv d_v` f32
//! apart (4 KiB at 8 kv heads of 128), so the `block_k` rows a P V register block
//! streams all fall in one L1 set. The kernel therefore copies the values once per call
//! into `[H_kv][n_k][d_v]` when `H_kv > 1`. Zen 5 (EPYC family 26), 1 thread, planner's
//! 128 x 64 tiles, n = 4096, interleaved `bench_report` runs, rope_tiled before / after:
//! d = 128 8/8 133.8, 131.4 / 150.0, 156.7 GFLOP/s (+15%); d = 64 32/8 130.1, 127.4 /
//! 142.4, 143.5 (+11%); d = 64 9/3 (rows 768 B apart, no set conflict) unchanged
//! (152.0, 147.4 / 142.7, 148.6). Sub-block classification of straddling tiles (same
//! machine, two interleaved runs, before / after): rerope / rope at n = 4096, d = 128
//! 1.070, 1.082 / 1.053, 1.060; leaky / rope 1.065, 1.082 / 1.056, 1.059; at n = 1024
//! rerope 1.325, 1.336 / 1.291, 1.252 and leaky 1.544, 1.512 / 1.487, 1.433 (there the
//! per-call query and key rotation of the far piece and the remaining per-entry select
//! dominate the extra cost).
//!
//! ## bf16 products
//! With bf16 inputs, packed keys and a CPU whose AVX512_BF16 pays ([`Bf16Products`]),
//! both tile products take bf16 operands: each key function's rotated keys are rounded
//! to bf16 pair rows before packing (a panel then holds `ceil(d / 2)` pairs per key),
//! each block's rotated, scaled query rows likewise, the values once per call as pair
//! rows of two keys (`[H_kv][ceil(n_k / 2)][d_v]`), and each tile's probabilities after
//! the online-softmax update. Key blocks start at even keys (multiples of 32), so a
//! tile's pairs never straddle two tiles. In a diagonal tile the group's common prefix
//! is paired up to an even length only; its odd last key and every row's own remainder
//! stay f32 products, so a hidden key is never paired with a visible one. Measured on an
//! AMD EPYC family 25 model 17 (Zen 4) core, n = 4096, causal, 1 thread: 0.57-0.62x the
//! f32 time at d = 128 (8 heads) and d = 64 (9 / 3 heads); `vdpbf16ps` products then
//! take about 68% of the time (90% of the instruction's register-loop peak), the
//! online-softmax update 13%. Tile sizes from 64 x 64 to 256 x 128 were within about 8%
//! of each other for both shapes (`bench_report --bf16 --tiles ..`), so the planner's
//! tile is kept.
//!
//! ## Parallelism and memory
//! Work is split into one task per query block (all query heads), run in parallel with
//! rayon (feature `rayon`, on by default) or serially. Parallel tasks are handed out
//! largest first (cost: tile products of the block row), one at a time, so that no
//! thread idles behind one expensive block at the end; every task visits its tiles in the
//! same fixed order and writes its own output rows, so the output is bit-identical for
//! any thread count. Memory beyond the inputs and the output: each key function's packed
//! keys (`O(n_k H_kv d)`) and trigonometry tables (`O(n d)`), and per task its rotated
//! query rows (`pieces x H_q x block_q x d`) and one `block_q x min(block_k, n_k)` score
//! tile per piece; with `H_kv > 1` kv heads in standard layout, one contiguous copy of
//! the values (`O(n_k H_kv d_v)`, see "Tile size"), and with bf16 products their pair
//! rows (`O(n_k H_kv d_v)`);
//! never an `n_q x n_k` buffer (tests/alloc.rs checks this with a counting allocator).

use ndarray::{Array3, ArrayViewMut3, Axis};

use super::kernels::{Bf16Kernels, Kernels, MatMut, MatRef, PackedKeys, RowsMut};
use super::rotated::{KeyForm, PrepBuffers, TiledPrep, axpy};
use super::{Attention, MaskCover, check_output};
use crate::error::{Result, RopeError};
use crate::position::{Pieces, TileBounds};
use crate::tensor::{Element, View3, View3Mut};

/// Tile sizes for [`Attention::tiled_with`]: `block_q` query rows by `block_k` key
/// columns, both `>= 1`. The default is 64 x 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileConfig {
    /// Query rows per tile.
    pub block_q: usize,
    /// Key columns per tile.
    pub block_k: usize,
}

impl Default for TileConfig {
    fn default() -> Self {
        TileConfig::DEFAULT
    }
}

impl TileConfig {
    /// 64 x 64 tiles.
    pub const DEFAULT: TileConfig = TileConfig {
        block_q: 64,
        block_k: 64,
    };

    /// `block_q x block_k` tiles; both must be `>= 1`.
    pub fn new(block_q: usize, block_k: usize) -> Result<Self> {
        let t = TileConfig { block_q, block_k };
        t.validate()?;
        Ok(t)
    }

    /// Square `b x b` tiles, `b >= 1`.
    pub fn square(b: usize) -> Result<Self> {
        Self::new(b, b)
    }

    /// Checks that both sizes are `>= 1` (for configs built from the public fields).
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [("block_q", self.block_q), ("block_k", self.block_k)] {
            if value == 0 {
                return Err(RopeError::invalid(
                    format!("tile {field}"),
                    value,
                    "must be >= 1",
                ));
            }
        }
        Ok(())
    }
}

/// Whether the tiled kernel computes its two tile products, `Q K^T` and `P V`, with bf16
/// operands when its inputs are bf16 ([`Attention::with_bf16_products`]).
///
/// In bf16 products the rotated, scaled queries and the rotated keys are rounded to bf16
/// once more after rotation, and so are the probabilities before `P V`; products are
/// exact and sums stay f32 (AVX512_BF16's `vdpbf16ps`). The softmax, its running max and
/// sums, and the output accumulators stay f32, and angles f64. The extra error is bounded
/// in the [`crate::attention`] module docs ("bf16 products"). Only bf16 inputs take this
/// path (they carry bf16 precision already), only the tiled kernel with packed keys
/// (`block_k` a multiple of 32, as the planner's tiles are), and only on CPUs with
/// AVX512_BF16 and AVX-512BW.
///
/// The KV caches take the same setting (`with_bf16_products`): a bf16 cache's decode
/// step then scores its stored keys with `vdpbf16ps`, the rotated query rounded to bf16
/// (see [`crate::attention::decode`], "Storage types and buffers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Bf16Products {
    /// Where they are faster: on a CPU whose `vdpbf16ps` ran at least 1.3x the f32 FMA
    /// flop rate when measured once per process
    /// (`kernels::Kernels::bf16_products_pay`): AMD Zen 4 (1.9x), not the Intel Xeon
    /// family 6 model 167 measured (0.5x). The default.
    #[default]
    Auto,
    /// Never: bf16 inputs are widened to f32, and the output is exactly the f32 result
    /// on the widened inputs, rounded once.
    Off,
    /// Whenever the CPU has the instructions, fast or not (tests and comparisons).
    On,
}

impl Bf16Products {
    /// Whether a tiled call on bf16 inputs with this setting computes bf16 products on
    /// this CPU (with packed keys, as the planner's tiles have): `Auto` measures the
    /// instruction on first use.
    ///
    /// ```
    /// use ropex::attention::Bf16Products;
    /// assert!(!Bf16Products::Off.applies());
    /// // `On` applies exactly where the CPU has AVX512_BF16; `Auto` only where it is also faster.
    /// assert!(!Bf16Products::Auto.applies() || Bf16Products::On.applies());
    /// ```
    pub fn applies(self) -> bool {
        self.kernels(Kernels::active()).is_some()
    }

    /// The bf16 kernels under this setting with the SIMD kernels `kern`.
    pub(crate) fn kernels(self, kern: Kernels) -> Option<Bf16Kernels> {
        match self {
            Bf16Products::Off => None,
            Bf16Products::On => kern.bf16(),
            Bf16Products::Auto => kern.bf16().filter(|_| Kernels::bf16_products_pay()),
        }
    }
}

/// Tile counts of one [`Attention::tiled_with`] call, summed over query heads (each
/// `(head, query block, key block)` tile counted once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TileStats {
    /// Tiles computed with the first piece only (inside the band; DCA's intra-chunk,
    /// StreamingLLM's window; every tile of a one-piece map).
    pub near: usize,
    /// Tiles computed with one other piece only.
    pub far: usize,
    /// Tiles that needed two or more pieces and a per-entry select.
    pub straddling: usize,
    /// Tiles not computed: wholly above the causal diagonal, or wholly hidden by the mask
    /// or the map (the latter also counted in [`TileStats::outside_mask`]).
    pub skipped: usize,
    /// Skipped tiles that the causal diagonal alone would have computed: wholly outside
    /// the sliding window or the attention chunk, or wholly in StreamingLLM's hidden
    /// middle.
    pub outside_mask: usize,
    /// Computed tiles that also needed a per-entry visibility mask (causal diagonal,
    /// mask edge, StreamingLLM's edge).
    pub masked: usize,
    /// Third and later pieces of straddling tiles (DCA tiles that span three chunk
    /// distances); 0 for two-piece maps.
    pub extra_pieces: usize,
    /// Tile score products `Q K^T` actually run, one per piece a computed tile uses
    /// (a straddling tile runs each piece's product only on the sub-blocks that need it,
    /// but it counts once): must equal [`TileStats::dot_products`].
    pub qk_products: usize,
    /// Tile value products `P V` actually run (one per computed tile; a diagonal tile's
    /// product may be split into row groups but counts once): must equal
    /// [`TileStats::computed`].
    pub pv_products: usize,
}

impl TileStats {
    /// Tiles that were computed: `near + far + straddling`.
    pub fn computed(&self) -> usize {
        self.near + self.far + self.straddling
    }

    /// All tiles, computed or skipped.
    pub fn total(&self) -> usize {
        self.computed() + self.skipped
    }

    /// Tile score products `Q K^T` evaluated:
    /// `near + far + 2 straddling + extra_pieces`.
    pub fn dot_products(&self) -> usize {
        self.near + self.far + 2 * self.straddling + self.extra_pieces
    }

    /// Fraction of computed tiles that needed more than one piece (0 when nothing was
    /// computed).
    pub fn straddling_fraction(&self) -> f64 {
        match self.computed() {
            0 => 0.0,
            c => self.straddling as f64 / c as f64,
        }
    }

    fn record(&mut self, work: &TileWork) {
        match work.pieces.count_ones() {
            0 => {
                self.skipped += 1;
                self.outside_mask += usize::from(!work.causal_skip);
            }
            1 if work.pieces == 1 => self.near += 1,
            1 => self.far += 1,
            n => {
                self.straddling += 1;
                self.extra_pieces += n as usize - 2;
            }
        }
    }

    fn add(mut self, other: TileStats) -> TileStats {
        self.near += other.near;
        self.far += other.far;
        self.straddling += other.straddling;
        self.skipped += other.skipped;
        self.outside_mask += other.outside_mask;
        self.masked += other.masked;
        self.extra_pieces += other.extra_pieces;
        self.qk_products += other.qk_products;
        self.pv_products += other.pv_products;
        self
    }
}

/// What one tile needs: the pieces it computes (bit set; 0 = skipped) and whether some
/// entry must be masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TileWork {
    pieces: u8,
    per_entry: bool,
    /// Skipped for being wholly above the causal diagonal.
    causal_skip: bool,
}

impl Attention {
    /// Classifies the tile `b` from the causal diagonal, the mask and the map's region
    /// rule (all conservative: a piece or a per-entry mask may be applied where no entry
    /// needs it, never the reverse).
    fn tile_work(&self, pieces: &Pieces, b: &TileBounds) -> TileWork {
        let causal = self.causal();
        let skip = |causal_skip| TileWork {
            pieces: 0,
            per_entry: false,
            causal_skip,
        };
        if b.r_range(causal).is_none() {
            return skip(true);
        }
        let mask = self.mask().cover(b, causal);
        if mask == MaskCover::Empty {
            return skip(false);
        }
        let cover = pieces.region().cover(b, causal);
        if cover.pieces == 0 {
            return skip(false);
        }
        TileWork {
            pieces: cover.pieces,
            per_entry: b.needs_causal_mask(causal) || mask == MaskCover::Partial || cover.may_hide,
            causal_skip: false,
        }
    }
}

/// Computed tiles per head of causal attention with a sliding window `w`, for square
/// `b x b` tiles with `b` dividing `n` and `w` (positions `0..n`): block row `I` computes
/// key blocks `I - min(I, w/b) ..= I` (block `I - w/b` holds both visible and hidden
/// entries, the next one down only `r >= w + 1`), so the count is
/// `sum_{I < T} (min(I, w/b) + 1)` with `T = n/b`. `None` unless `b` divides both.
pub fn expected_sliding_window_computed_tiles(n: usize, window: usize, b: usize) -> Option<usize> {
    if b == 0 || window == 0 || !n.is_multiple_of(b) || !window.is_multiple_of(b) {
        return None;
    }
    let a = window / b;
    Some((0..n / b).map(|i| i.min(a) + 1).sum())
}

/// Computed tiles per head of causal chunked attention with chunk `c`, for square
/// `b x b` tiles with `b` dividing `c` and `c` dividing `n`: each chunk is a causal
/// `m x m` block triangle, `m = c/b`, so `(n/c) m (m + 1) / 2`. `None` otherwise.
pub fn expected_chunked_computed_tiles(n: usize, chunk: usize, b: usize) -> Option<usize> {
    if b == 0 || chunk == 0 || !chunk.is_multiple_of(b) || !n.is_multiple_of(chunk) {
        return None;
    }
    let m = chunk / b;
    Some(n / chunk * m * (m + 1) / 2)
}

/// Number of straddling tiles per head for causal attention over contiguous positions:
/// queries at `q_offset .. q_offset + n_q`, keys at `0 .. n_k` (chunked prefill has
/// `q_offset = n_k - n_q`), window `w`, tiles `block_q x block_k` laid from index 0.
///
/// Derivation: query block `I` spans positions `i0 = q_offset + I Bq` to
/// `i1 = q_offset + min((I+1) Bq, n_q) - 1`, key block `J` spans `j0 = J Bk` to
/// `j1 = min((J+1) Bk, n_k) - 1`. It straddles iff `max(i0 - j1, 0) < w <= i1 - j0`;
/// as `w >= 1` this is `j0 <= i1 - w` and `j1 >= i0 - w + 1`. Both bounds are monotone
/// in `J`, so the straddling blocks of row `I` are the interval
/// `J_lo <= J <= J_hi` with `J_hi = min(T_k - 1, floor((i1 - w) / Bk))` (none if
/// `i1 < w`) and `J_lo = max(0, ceil((i0 - w + 2) / Bk) - 1)`, except that the last,
/// possibly short, key block qualifies iff `n_k - 1 >= i0 - w + 1`. The count is the sum
/// of the interval lengths over block rows.
///
/// For square tiles `B` dividing `n = n_q = n_k` with `q_offset = 0`, this reduces to
/// [`straddling_tiles_square`]. Returns 0 for `w = 0` (not a valid window).
pub fn expected_straddling_tiles(
    n_q: usize,
    n_k: usize,
    q_offset: usize,
    window: usize,
    tiles: &TileConfig,
) -> usize {
    if window == 0 || n_q == 0 || n_k == 0 || tiles.validate().is_err() {
        return 0;
    }
    let (bq, bk) = (tiles.block_q as i128, tiles.block_k as i128);
    let (n_q, n_k, off, w) = (n_q as i128, n_k as i128, q_offset as i128, window as i128);
    let t_q = (n_q + bq - 1) / bq;
    let t_k = (n_k + bk - 1) / bk;
    let mut count = 0i128;
    for block in 0..t_q {
        let i0 = off + block * bq;
        let i1 = off + ((block + 1) * bq).min(n_q) - 1;
        if i1 < w {
            continue;
        }
        let hi = ((i1 - w) / bk).min(t_k - 1);
        let t = i0 - w + 1; // need j1 >= t
        let mut lo = if t <= 0 {
            0
        } else {
            (t + 1 + bk - 1) / bk - 1 // smallest J with (J + 1) Bk - 1 >= t
        };
        if lo >= t_k - 1 {
            if n_k > t {
                lo = t_k - 1;
            } else {
                continue;
            }
        }
        if hi >= lo {
            count += hi - lo + 1;
        }
    }
    count as usize
}

/// Closed form for square `b x b` tiles with `b` dividing `n` (causal, `n_q = n_k = n`,
/// positions `0..n`): with `T = n / b` and `w = a b + c`, `0 <= c < b`,
///
/// - `w >= n` or `b = 1`: 0 (all tiles near, or single entries never straddle);
/// - `c` in `{0, 1}`: `T - a` (one straddling tile per block row `I >= a`, i.e.
///   `T - w/B` when `B` divides `w`);
/// - `c >= 2`: `2 (T - a) - 1` (block row `a` has one, every later row two).
///
/// Returns `None` when `b = 0`, `w = 0` or `b` does not divide `n`.
pub fn straddling_tiles_square(n: usize, window: usize, b: usize) -> Option<usize> {
    if b == 0 || window == 0 || !n.is_multiple_of(b) {
        return None;
    }
    if window >= n || b == 1 {
        return Some(0);
    }
    let (t, a, c) = (n / b, window / b, window % b);
    Some(if c <= 1 { t - a } else { 2 * (t - a) - 1 })
}

/// Rows `start..end` of a block and the min/max position among them.
#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    end: usize,
    min: usize,
    max: usize,
}

fn blocks(pos: &[usize], size: usize) -> Vec<Block> {
    pos.chunks(size)
        .enumerate()
        .map(|(b, chunk)| Block {
            start: b * size,
            end: b * size + chunk.len(),
            min: chunk.iter().copied().min().unwrap_or(0),
            max: chunk.iter().copied().max().unwrap_or(0),
        })
        .collect()
}

/// One tiled call: the prepared pieces and the block partition.
struct Plan<'a> {
    att: &'a Attention,
    prep: TiledPrep<'a>,
    q_pos: &'a [usize],
    k_pos: &'a [usize],
    q_blocks: Vec<Block>,
    k_blocks: Vec<Block>,
    /// Key columns of the widest key block (`min(block_k, n_k)`).
    block_k: usize,
    kern: Kernels,
    /// The values, `[H_kv][n_k][d_v]` contiguous, when `prep.v` borrows a standard-layout
    /// input whose rows are `H_kv d_v` apart (see [`Plan::values`]).
    v_rows: Option<Vec<f32>>,
    /// With bf16 products ([`Bf16Products`]): the bf16 kernels, and the values as pair
    /// rows `[H_kv][ceil(n_k / 2)][d_v]` (see [`Plan::value_pairs`]).
    dot: Option<(Bf16Kernels, Vec<f32>)>,
}

/// Per-task scratch: one score tile per piece, and the visibility of the entries of
/// each per-entry tile of the block row.
struct Scratch {
    scores: Vec<Vec<f32>>,
    masks: Vec<TileMask>,
    /// The sub-block plans of straddling tiles, by tile index (empty for the others).
    straddles: Vec<Straddle>,
}

/// How a straddling tile's scores are put together, worked out once per block row and
/// used by every head (it depends on positions only): its sub-blocks of `SUB_ROWS` rows
/// by one 32-key panel, each with the pieces whose product it needs, and for a mixed
/// one the runs of entries that take another piece's score than the tile's first.
#[derive(Default)]
struct Straddle {
    subs: Vec<SubBlock>,
    runs: Vec<Run>,
}

/// A sub-block of a straddling tile: rows and columns of the tile, the pieces it needs
/// (a bit set), and its runs in [`Straddle::runs`] (mixed only).
struct SubBlock {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    pieces: u8,
    runs: std::ops::Range<usize>,
}

/// Entries `at..at + len` of a tile's scores (row-major, one row) take piece `piece`'s.
struct Run {
    at: usize,
    len: usize,
    piece: usize,
}

/// The visibility of a per-entry tile's entries, worked out once per block row and
/// applied to every head's scores (it depends on positions and the mask, not on the
/// head).
#[derive(Default)]
struct TileMask {
    kind: Mask,
    /// Whether entry `(a, c)` is visible, at `a * bk + c`.
    seen: Vec<bool>,
    /// Visible entries per row.
    visible: Vec<usize>,
}

impl TileMask {
    /// Sets the hidden entries of one head's scores `s` (`[rows, bk]`) to `-inf`.
    fn hide(&self, s: &mut [f32], bk: usize) {
        if bk == 0 {
            return;
        }
        for ((row, &vis), seen) in s
            .chunks_mut(bk)
            .zip(&self.visible)
            .zip(self.seen.chunks(bk))
        {
            match self.kind {
                Mask::None => {}
                Mask::Prefix => row[vis..].fill(f32::NEG_INFINITY),
                Mask::Entries => {
                    for (x, &seen) in row.iter_mut().zip(seen) {
                        if !seen {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }
}

/// Which entries of a computed tile a row may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mask {
    /// Every entry is visible.
    #[default]
    None,
    /// Row `a` sees exactly its first `visible[a]` columns (the causal diagonal with
    /// sorted key positions).
    Prefix,
    /// Row `a` sees the columns `c` with `seen[a * bk + c]` (any positions and masks).
    Entries,
}

/// A task's reusable buffers (one per rayon worker split, reused across query blocks):
/// rotated query rows of the block, online-softmax state, score tiles.
struct Work {
    q_rot: Vec<f32>,
    state: RowState,
    scratch: Scratch,
    tiles: Vec<TileWork>,
}

impl Work {
    fn new() -> Self {
        Work {
            q_rot: Vec::new(),
            state: RowState::new(0, 0),
            scratch: Scratch {
                scores: Vec::new(),
                masks: Vec::new(),
                straddles: Vec::new(),
            },
            tiles: Vec::new(),
        }
    }
}

/// Query rows per sub-block of a straddling tile's score product (one AVX-512 register
/// block of the Q K^T kernel).
const SUB_ROWS: usize = 8;

/// Rows per group in the P V product of a diagonal tile: one register block.
const PV_GROUP: usize = 8;

fn mat(data: &[f32], rows: usize, cols: usize, stride: usize) -> MatRef<'_> {
    MatRef::new(data, rows, cols, stride).expect("tile shapes are consistent")
}

fn mat_mut(data: &mut [f32], rows: usize, cols: usize, stride: usize) -> MatMut<'_> {
    MatMut::new(data, rows, cols, stride).expect("tile shapes are consistent")
}

impl Plan<'_> {
    /// Value rows `rows` of kv head `g`, contiguous (stride `d_v`) when a copy was made.
    fn values(&self, g: usize, rows: std::ops::Range<usize>) -> MatRef<'_> {
        match &self.v_rows {
            Some(v) => {
                let (n_k, dv) = (self.prep.dims.n_k, self.prep.dims.value_dim);
                let at = (g * n_k + rows.start) * dv;
                mat(&v[at..at + rows.len() * dv], rows.len(), dv, dv)
            }
            None => self.prep.v.mat(g, rows),
        }
    }

    /// With bf16 products, the pair rows of the values of key block `kb` of kv head `g`
    /// (`[ceil(len / 2), d_v]`; key blocks start at even keys), and the bf16 kernels.
    fn value_pairs(&self, g: usize, kb: Block) -> Option<(Bf16Kernels, MatRef<'_>)> {
        let (bf, pairs) = self.dot.as_ref()?;
        let (n2, dv) = (self.prep.dims.n_k.div_ceil(2), self.prep.dims.value_dim);
        let rows = (kb.end - kb.start).div_ceil(2);
        let at = (g * n2 + kb.start / 2) * dv;
        Some((*bf, mat(&pairs[at..at + rows * dv], rows, dv, dv)))
    }

    fn bounds(qb: &Block, kb: &Block) -> TileBounds {
        TileBounds {
            q_min: qb.min,
            q_max: qb.max,
            k_min: kb.min,
            k_max: kb.max,
        }
    }

    /// Query block `qb` for every query head: rotates its query rows once per piece it
    /// needs, then runs the tiles of each head, writing output rows `qb` (`out`, `[rows,
    /// H_q, d_v]`) and returning the tile counts. Key blocks are visited in order, so the
    /// result does not depend on how tasks are scheduled.
    fn run_block(&self, qb: Block, out: &mut [f32], work: &mut Work) -> TileStats {
        let dims = self.prep.dims;
        let (d, dv, heads) = (dims.head_dim, dims.value_dim, dims.heads_q);
        let bq = qb.end - qb.start;
        let mut stats = TileStats::default();
        let n_pieces = self.prep.pieces.list().len();
        let Work {
            q_rot,
            state,
            scratch,
            tiles,
        } = work;
        // Every tile of this block row, classified once (the same for every head).
        tiles.clear();
        tiles.extend(self.k_blocks.iter().map(|kb| {
            self.att
                .tile_work(&self.prep.pieces, &Self::bounds(&qb, kb))
        }));
        let needed = tiles.iter().fold(0u8, |acc, t| acc | t.pieces);
        q_rot.clear();
        q_rot.resize(n_pieces * heads * bq * d, 0.0);
        // Only the pieces this block row's tiles use (no far piece before the band
        // edge, none at all when the window covers every pair).
        for (p, buf) in q_rot.chunks_mut((heads * bq * d).max(1)).enumerate() {
            if needed & (1 << p) != 0 {
                self.prep.rotate_queries(p, qb.start..qb.end, buf);
                if let Some((bf, _)) = &self.dot {
                    // bf16 products: each query row as a pair row, in place.
                    for row in buf.chunks_exact_mut(d.max(1)) {
                        bf.round_pairs_unchecked(row, d);
                    }
                }
            }
        }
        let q_rot = &q_rot[..];
        scratch.scores.resize_with(n_pieces, Vec::new);
        for (p, buf) in scratch.scores.iter_mut().enumerate() {
            if needed & (1 << p) != 0 {
                buf.resize(bq * self.block_k, 0.0);
            }
        }
        let q_pos = &self.q_pos[qb.start..qb.end];
        // The masks of per-entry tiles, once for every head.
        scratch.masks.resize_with(tiles.len(), TileMask::default);
        for ((&kb, work), tm) in self
            .k_blocks
            .iter()
            .zip(tiles.iter())
            .zip(&mut scratch.masks)
        {
            if work.pieces != 0 && work.per_entry {
                self.tile_mask(q_pos, &self.k_pos[kb.start..kb.end], tm);
            }
        }
        // The sub-block plans of straddling tiles, once for every head.
        scratch
            .straddles
            .resize_with(tiles.len(), Straddle::default);
        for ((&kb, work), plan) in self
            .k_blocks
            .iter()
            .zip(tiles.iter())
            .zip(&mut scratch.straddles)
        {
            if work.pieces.count_ones() > 1 {
                self.straddle(work.pieces, qb, kb, plan);
            }
        }
        for h in 0..heads {
            let g = h / dims.group();
            state.reset(bq, dv);
            // This head's rotated query rows of each piece, `[bq, d]`.
            let q_head = |p: usize| {
                let at = (p * heads + h) * bq * d;
                &q_rot[at..at + bq * d]
            };
            for (t, (&kb, work)) in self.k_blocks.iter().zip(tiles.iter()).enumerate() {
                stats.record(work);
                if work.pieces == 0 {
                    continue;
                }
                let bk = kb.end - kb.start;
                let first =
                    self.tile_scores(work.pieces, &q_head, g, (qb, kb, t), scratch, &mut stats);
                let Scratch { scores, masks, .. } = &mut *scratch;
                let s = &mut scores[first][..bq * bk];
                let (mask, seen, visible) = if work.per_entry {
                    stats.masked += 1;
                    let tm = &masks[t];
                    tm.hide(s, bk);
                    (tm.kind, &tm.seen[..], &tm.visible[..])
                } else {
                    (Mask::None, &[][..], &[][..])
                };
                let v = self.values(g, kb.start..kb.end);
                let pairs = self.value_pairs(g, kb);
                state.update(self.kern, s, bk, (mask, visible, seen), v, pairs);
                stats.pv_products += 1;
            }
            state.finish_into(out, h, heads);
        }
        stats
    }

    /// The plan of straddling tile `(qb, kb)` with `pieces` (a bit set) into `plan`: its
    /// sub-blocks of `SUB_ROWS` rows by one 32-key panel, each classified by its own
    /// region cover (conservative like the tile's; a sub-block that needs nothing,
    /// wholly hidden and so masked later, takes the tile's pieces), and for a mixed one
    /// the piece of each entry by the region rule.
    fn straddle(&self, pieces: u8, qb: Block, kb: Block, plan: &mut Straddle) {
        plan.subs.clear();
        plan.runs.clear();
        let (bq, bk) = (qb.end - qb.start, kb.end - kb.start);
        let first = pieces.trailing_zeros() as usize;
        let causal = self.att.causal();
        let region = self.prep.pieces.region();
        let (q_pos, k_pos) = (&self.q_pos[qb.start..qb.end], &self.k_pos[kb.start..kb.end]);
        for a0 in (0..bq).step_by(SUB_ROWS) {
            let a1 = (a0 + SUB_ROWS).min(bq);
            let qs = &q_pos[a0..a1];
            for c0 in (0..bk).step_by(PackedKeys::PANEL) {
                let c1 = (c0 + PackedKeys::PANEL).min(bk);
                let ks = &k_pos[c0..c1];
                let bounds = TileBounds {
                    q_min: qs.iter().copied().min().unwrap_or(0),
                    q_max: qs.iter().copied().max().unwrap_or(0),
                    k_min: ks.iter().copied().min().unwrap_or(0),
                    k_max: ks.iter().copied().max().unwrap_or(0),
                };
                let mut sub = region.cover(&bounds, causal).pieces & pieces;
                if sub == 0 {
                    sub = pieces;
                }
                let start = plan.runs.len();
                if sub.count_ones() > 1 {
                    let sub_first = sub.trailing_zeros() as usize;
                    for (a, &qp) in (a0..a1).zip(qs) {
                        let mut open: Option<Run> = None;
                        for (c, &kp) in (c0..c1).zip(ks) {
                            let piece = match self.prep.pieces.index(qp, kp) {
                                Some(p) if p > first && sub & (1 << p) != 0 => Some(p),
                                // `first` itself when computed here; otherwise (first
                                // not in `sub`: hidden entries, masked later) `sub`'s
                                // first piece, so no stale score is left.
                                _ if sub_first > first => Some(sub_first),
                                _ => None,
                            };
                            let at = a * bk + c;
                            match (&mut open, piece) {
                                (Some(r), Some(p)) if r.piece == p => r.len += 1,
                                (_, p) => {
                                    plan.runs.extend(open.take());
                                    open = p.map(|piece| Run { at, len: 1, piece });
                                }
                            }
                        }
                        plan.runs.extend(open);
                    }
                }
                plan.subs.push(SubBlock {
                    rows: a0..a1,
                    cols: c0..c1,
                    pieces: sub,
                    runs: start..plan.runs.len(),
                });
            }
        }
    }

    /// The scores of tile `t = (qb, kb)` for query head `h`: one tile product per piece
    /// in `pieces` (a bit set); with several, entry `(i, j)` takes the score of the piece
    /// the region rule picks for `(q_pos[i], k_pos[j])`, by the tile's plan in
    /// `scratch.straddles[t]`. Returns the index of the buffer in `scratch.scores`
    /// holding the result (`[rows, cols]`).
    #[allow(clippy::too_many_arguments)]
    fn tile_scores<'q>(
        &self,
        pieces: u8,
        q_head: &impl Fn(usize) -> &'q [f32],
        g: usize,
        (qb, kb, t): (Block, Block, usize),
        scratch: &mut Scratch,
        stats: &mut TileStats,
    ) -> usize {
        let (bq, bk) = (qb.end - qb.start, kb.end - kb.start);
        let first = pieces.trailing_zeros() as usize;
        if pieces.count_ones() == 1 {
            self.piece_scores(
                first,
                q_head,
                g,
                (0..bq, 0..bk),
                kb,
                &mut scratch.scores[first],
            );
            stats.qk_products += 1;
            return first;
        }
        // A straddling tile: each piece's product counts once, but is run only on the
        // sub-blocks that need it; a sub-block with one piece writes it straight into
        // the result, only a mixed one computes several and selects entry by entry.
        stats.qk_products += pieces.count_ones() as usize;
        let Scratch {
            scores, straddles, ..
        } = scratch;
        let plan = &straddles[t];
        for sb in &plan.subs {
            let span = (sb.rows.clone(), sb.cols.clone());
            if sb.pieces.count_ones() == 1 {
                let p = sb.pieces.trailing_zeros() as usize;
                self.piece_scores(p, q_head, g, span, kb, &mut scores[first]);
                continue;
            }
            for p in (0..self.prep.key_of.len()).filter(|p| sb.pieces & (1 << p) != 0) {
                self.piece_scores(p, q_head, g, span.clone(), kb, &mut scores[p]);
            }
            let (head, rest) = scores.split_at_mut(first + 1);
            let s = &mut head[first];
            for r in &plan.runs[sb.runs.clone()] {
                let span = r.at..r.at + r.len;
                s[span.clone()].copy_from_slice(&rest[r.piece - first - 1][span]);
            }
        }
        first
    }

    /// Scores of piece `piece` for the rows `span.0` and columns `span.1` of tile
    /// `(rows, kb)`, query head `h`'s kv head `g`, written into `out` (`[rows, cols]` of the
    /// tile, row stride the tile's width).
    fn piece_scores<'q>(
        &self,
        piece: usize,
        q_head: &impl Fn(usize) -> &'q [f32],
        g: usize,
        (rows, cols): (std::ops::Range<usize>, std::ops::Range<usize>),
        kb: Block,
        out: &mut [f32],
    ) {
        let d = self.prep.dims.head_dim;
        let bk = kb.end - kb.start;
        let keys = &self.prep.keys[self.prep.key_of[piece]];
        // With bf16 products the query rows are pair rows of `ceil(d / 2)` slots.
        let width = if self.dot.is_some() { d.div_ceil(2) } else { d };
        let a = mat(
            &q_head(piece)[rows.start * d..rows.end * d],
            rows.len(),
            width,
            d,
        );
        let s = mat_mut(
            &mut out[rows.start * bk + cols.start..],
            rows.len(),
            cols.len(),
            bk,
        );
        let k0 = kb.start + cols.start;
        match (&keys.k, &self.dot) {
            // Keys packed once per call (key blocks and sub-blocks start at panel
            // multiples), as pair rows with bf16 products.
            (None, Some((bf, _))) => bf.qk_tile_packed(a, &keys.packed[g], k0, s, 1.0),
            (None, None) => self.kern.qk_tile_packed(a, &keys.packed[g], k0, s, 1.0),
            (Some(k), _) => self.kern.qk_tile(a, k.mat(g, k0..k0 + cols.len()), s, 1.0),
        }
        .expect("tile shapes are consistent");
    }

    /// The visibility of the entries of tile `(q_pos, k_pos)` under the causal
    /// diagonal, the mask and the map, into `tm`: each entry's flag, each row's count,
    /// and [`Mask::Prefix`] when every row sees a prefix of the columns, else
    /// [`Mask::Entries`]. [`TileMask::hide`] then applies it to each head's scores.
    fn tile_mask(&self, q_pos: &[usize], k_pos: &[usize], tm: &mut TileMask) {
        let bk = k_pos.len();
        tm.seen.clear();
        tm.seen.resize(q_pos.len() * bk, false);
        tm.visible.clear();
        tm.visible.resize(q_pos.len(), 0);
        let mut prefix = true;
        for ((&qp, vis), seen) in q_pos
            .iter()
            .zip(tm.visible.iter_mut())
            .zip(tm.seen.chunks_mut(bk.max(1)))
        {
            let mut count = 0;
            let mut end = 0;
            for (c, (&kp, seen)) in k_pos.iter().zip(seen).enumerate() {
                *seen = self.att.entry(&self.prep.pieces, qp, kp).is_some();
                if *seen {
                    count += 1;
                    end = c + 1;
                }
            }
            *vis = count;
            prefix &= end == count;
        }
        tm.kind = if prefix { Mask::Prefix } else { Mask::Entries };
    }
}

/// Online-softmax state of a block of query rows: running max `m`, running sum `l`,
/// unnormalised output `acc`, and whether the row has seen any visible key.
struct RowState {
    m: Vec<f32>,
    l: Vec<f32>,
    seen: Vec<bool>,
    acc: Vec<f32>,
    dv: usize,
}

impl RowState {
    fn new(rows: usize, dv: usize) -> Self {
        RowState {
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            seen: vec![false; rows],
            acc: vec![0.0; rows * dv],
            dv,
        }
    }

    /// Folds one tile of scores `s` (`[rows, bk]`, masked entries already `-inf`) and
    /// its values `v` (`[bk, dv]`) into the state: for row `a`, over its visible
    /// entries, `m' = max(m, max_c s)`, `l' = l e^(m - m') + sum_c e^(s_c - m')`,
    /// `acc' = acc e^(m - m') + sum_c e^(s_c - m') v_c`. Rows with no visible entry are
    /// left untouched, and masked entries are never multiplied (so a NaN in `v_c`
    /// stays out of rows that cannot see `c`): P V is one tile GEMM when every entry is
    /// visible, row prefixes on the diagonal, entry by entry otherwise. `s` is
    /// overwritten with the probabilities.
    ///
    /// With `pairs` (bf16 products: the kernels and the tile's value pair rows), the
    /// tile GEMMs round the probabilities to bf16 pair rows in place (`s` then holds
    /// them) and run on pairs of keys; a diagonal group's odd last common key and each
    /// row's remaining keys stay f32 products.
    fn update(
        &mut self,
        kern: Kernels,
        s: &mut [f32],
        bk: usize,
        (mask, visible, seen): (Mask, &[usize], &[bool]),
        v: MatRef<'_>,
        pairs: Option<(Bf16Kernels, MatRef<'_>)>,
    ) {
        let dv = self.dv;
        let rows = s.len() / bk.max(1);
        kern.fold_rows(
            s,
            bk,
            (mask != Mask::None).then_some(visible),
            RowsMut {
                m: &mut self.m,
                l: &mut self.l,
                seen: &mut self.seen,
                acc: &mut self.acc,
                dv,
            },
        );
        if dv == 0 || rows == 0 {
            return;
        }
        // `O += P V` for rows `prow` of `p` (row stride `bk`) and their first `cols` keys.
        let pv = |p: &mut [f32], prow: usize, cols: usize, v: MatRef<'_>, acc: &mut [f32]| {
            let o = mat_mut(acc, prow, dv, dv);
            match pairs {
                Some((bf, vp)) => {
                    let slots = cols.div_ceil(2);
                    for row in p.chunks_mut(bk).take(prow) {
                        bf.round_pairs_unchecked(row, cols);
                    }
                    bf.pv_tile(mat(p, prow, slots, bk), vp.sub_rows(0, slots), o)
                }
                None => kern.pv_tile(mat(p, prow, cols, bk), v.sub_rows(0, cols), o),
            }
            .expect("tile shapes are consistent");
        };
        match mask {
            Mask::None => pv(s, rows, bk, v, &mut self.acc),
            Mask::Prefix => {
                // Groups of rows: the columns all of them see in one product (an even
                // number of them with bf16 pairs, which must not pair a visible key
                // with a hidden one), then each row's remaining visible columns in f32.
                for a0 in (0..rows).step_by(PV_GROUP) {
                    let a1 = (a0 + PV_GROUP).min(rows);
                    let common = visible[a0..a1].iter().copied().min().unwrap_or(0);
                    let common = if pairs.is_some() { common & !1 } else { common };
                    if common > 0 {
                        pv(
                            &mut s[a0 * bk..],
                            a1 - a0,
                            common,
                            v,
                            &mut self.acc[a0 * dv..a1 * dv],
                        );
                    }
                    for a in a0..a1 {
                        if visible[a] > common {
                            // The pair rounding wrote slots `< common / 2` only: the
                            // probabilities from `common` on are still f32.
                            kern.pv_tile(
                                mat(&s[a * bk + common..], 1, visible[a] - common, bk),
                                v.sub_rows(common, visible[a] - common),
                                mat_mut(&mut self.acc[a * dv..(a + 1) * dv], 1, dv, dv),
                            )
                            .expect("tile shapes are consistent");
                        }
                    }
                }
            }
            Mask::Entries => {
                for (a, (prow, seen)) in s.chunks(bk).zip(seen.chunks(bk)).enumerate() {
                    let acc = &mut self.acc[a * dv..(a + 1) * dv];
                    for (c, (&p, &seen)) in prow.iter().zip(seen).enumerate() {
                        if seen {
                            axpy(acc, p, v.row(c));
                        }
                    }
                }
            }
        }
    }

    /// The initial state (`m = -inf`, `l = 0`, `acc = 0`, nothing seen) for `rows` rows
    /// of width `dv`, reusing the buffers.
    fn reset(&mut self, rows: usize, dv: usize) {
        self.dv = dv;
        for (v, x) in [(&mut self.m, f32::NEG_INFINITY), (&mut self.l, 0.0)] {
            v.clear();
            v.resize(rows, x);
        }
        self.seen.clear();
        self.seen.resize(rows, false);
        self.acc.clear();
        self.acc.resize(rows * dv, 0.0);
    }

    /// `acc / l` per row into head `h` of the output rows `out` (`[rows, heads, d_v]`);
    /// rows that never saw a key get zeros.
    fn finish_into(&self, out: &mut [f32], h: usize, heads: usize) {
        let dv = self.dv;
        if dv == 0 {
            return;
        }
        for (a, (acc, (&seen, &l))) in self
            .acc
            .chunks_exact(dv)
            .zip(self.seen.iter().zip(&self.l))
            .enumerate()
        {
            let o = &mut out[(a * heads + h) * dv..(a * heads + h + 1) * dv];
            if seen {
                for (o, &x) in o.iter_mut().zip(acc) {
                    *o = x / l;
                }
            } else {
                o.fill(0.0);
            }
        }
    }
}

impl Attention {
    /// Tiled attention with the default 64 x 64 tiles (see [`Attention::tiled_with`]).
    ///
    /// ```
    /// use ndarray::Array3;
    /// use ropex::{attention::Attention, Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::leaky_rerope(3, 16.0)?);
    /// let q = Array3::<f32>::from_elem((9, 2, 8), 0.1);
    /// let kv = Array3::<f32>::from_elem((9, 1, 8), 0.2);
    /// let pos: Vec<usize> = (0..9).collect();
    /// let fast = att.tiled(q.view(), kv.view(), kv.view(), &pos, &pos)?;
    /// let slow = att.reference(q.view(), kv.view(), kv.view(), &pos, &pos)?;
    /// assert!((&fast - &slow).iter().all(|e| e.abs() < 1e-5));
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn tiled<'a, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Array3<T>> {
        self.tiled_with(q, k, v, q_pos, k_pos, &TileConfig::DEFAULT)
            .map(|(out, _)| out)
    }

    /// Tiled attention with explicit tile sizes; also returns the tile counts. Inputs and
    /// semantics as in [`crate::attention`]; the algorithm is in the [module
    /// docs](self). The output is bit-identical for any number of rayon threads.
    ///
    /// ```
    /// use ndarray::Array3;
    /// use ropex::attention::{Attention, TileConfig, expected_straddling_tiles};
    /// use ropex::{Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(4, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(20)?);
    /// let (n, tiles) = (64, TileConfig::square(8)?);
    /// let q = Array3::<f32>::zeros((n, 1, 4));
    /// let pos: Vec<usize> = (0..n).collect();
    /// let (_, stats) = att.tiled_with(q.view(), q.view(), q.view(), &pos, &pos, &tiles)?;
    /// assert_eq!(stats.straddling, expected_straddling_tiles(n, n, 0, 20, &tiles));
    /// assert_eq!(stats.skipped, 8 * 7 / 2);
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn tiled_with<'a, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        tiles: &TileConfig,
    ) -> Result<(Array3<T>, TileStats)> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        tiles.validate()?;
        let mut out = self.output_for(&q, &k, &v, q_pos, k_pos)?;
        let stats = self.tiled_into(q, k, v, q_pos, k_pos, tiles, &mut out)?;
        Ok((out, stats))
    }

    /// [`Attention::tiled_with`] writing into `out` (`[n_q, H_q, d_v]`, any strides).
    /// Each task writes its query block's rows: in place when `out` is f32 in standard
    /// layout, else through a per-task f32 buffer rounded once into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn tiled_into<'a, 'o, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        tiles: &TileConfig,
        out: impl Into<View3Mut<'o, T>>,
    ) -> Result<TileStats> {
        let mut scratch = TiledScratch::new();
        self.tiled_into_in(q, k, v, q_pos, k_pos, tiles, out, &mut scratch)
    }

    /// [`Attention::tiled_into`] in the memory of `scratch` (see
    /// [`Attention::run_into_reusing`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tiled_into_in<'a, 'o, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        tiles: &TileConfig,
        out: impl Into<View3Mut<'o, T>>,
        scratch: &mut TiledScratch,
    ) -> Result<TileStats> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let mut out = out.into();
        tiles.validate()?;
        check_output(&self.validate(&q, &k, &v, q_pos, k_pos)?, &out)?;
        let kern = Kernels::active();
        // Keys are packed once per call when key blocks start at panel multiples; bf16
        // inputs may then take bf16 products.
        let packed = tiles.block_k.is_multiple_of(PackedKeys::PANEL);
        let dot = if packed && T::NAME == "bf16" {
            self.bf16_products().kernels(kern)
        } else {
            None
        };
        let keys = if packed {
            KeyForm::Packed { kern, pairs: dot }
        } else {
            KeyForm::HeadMajor
        };
        let q_blocks = blocks(q_pos, tiles.block_q);
        let k_blocks = blocks(k_pos, tiles.block_k);
        let pieces = self.map().pieces();
        let mut used = 0u8;
        // Products per query block (all heads alike): the cost that orders the tasks.
        let mut cost = vec![0u32; q_blocks.len()];
        for (qb, c) in q_blocks.iter().zip(cost.iter_mut()) {
            for kb in &k_blocks {
                let p = self.tile_work(&pieces, &Plan::bounds(qb, kb)).pieces;
                used |= p;
                *c += p.count_ones() + u32::from(p != 0);
            }
        }
        let needed: Vec<bool> = (0..pieces.list().len())
            .map(|p| used & (1 << p) != 0)
            .collect();
        let bufs = &mut scratch.prep;
        let prep = self.prepare_tiled(q, k, v, q_pos, k_pos, keys, &needed, bufs)?;
        let v_rows = match contiguous_values(&prep, &mut bufs.values) {
            Ok(v) => v,
            Err(e) => {
                prep.recycle(bufs);
                return Err(e);
            }
        };
        let dot = match dot.map(|bf| value_pair_rows(bf, &prep, &mut bufs.value_pairs)) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                prep.recycle(bufs);
                return Err(e);
            }
        };
        let plan = Plan {
            att: self,
            prep,
            q_pos,
            k_pos,
            q_blocks,
            k_blocks,
            // Scratch is sized by the problem, not by the requested tile.
            block_k: tiles.block_k.min(k_pos.len()),
            kern,
            v_rows,
            dot,
        };
        // One task per query block (all heads), writing its own output rows.
        let mut out = out.as_ndarray();
        let blocks_out = plan
            .q_blocks
            .iter()
            .zip(out.axis_chunks_iter_mut(Axis(0), tiles.block_q));
        let task = |(work, wide): &mut (Work, Vec<f32>), (qb, rows): (&Block, ArrayViewMut3<T>)| {
            store_rows(rows, wide, |buf| plan.run_block(*qb, buf, work))
        };
        let init = || (Work::new(), Vec::new());
        #[cfg(feature = "rayon")]
        if self.parallel() {
            use rayon::prelude::*;
            // Largest first (a causal triangle's last rows first), so the threads end on
            // the cheapest blocks instead of idling behind one expensive tail block.
            let mut tasks: Vec<_> = blocks_out.zip(cost).collect();
            tasks.sort_by_key(|t| std::cmp::Reverse(t.1));
            let stats = tasks
                .into_iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
                .into_par_iter()
                .with_max_len(1)
                .map_init(init, task)
                .reduce(TileStats::default, TileStats::add);
            plan.recycle(&mut scratch.prep);
            return Ok(stats);
        }
        // One thread: the order does not matter, and one task's buffers serve them all.
        let _ = cost;
        let mut work = scratch.work.take().unwrap_or_else(init);
        let stats = blocks_out
            .map(|b| task(&mut work, b))
            .fold(TileStats::default(), TileStats::add);
        scratch.work = Some(work);
        plan.recycle(&mut scratch.prep);
        Ok(stats)
    }
}

impl Plan<'_> {
    /// Returns the call's buffers to `bufs`.
    fn recycle(self, bufs: &mut PrepBuffers) {
        let Plan {
            prep, v_rows, dot, ..
        } = self;
        prep.recycle(bufs);
        if let Some(v) = v_rows
            && v.capacity() > bufs.values.capacity()
        {
            bufs.values = v;
        }
        if let Some((_, v)) = dot {
            bufs.value_pairs = v;
        }
    }
}

/// Reusable memory of the tiled kernel ([`Attention::run_into_reusing`]): the packed
/// rotated keys, the contiguous (or widened) values, the trigonometry tables and one
/// task's tile buffers of the last call. Keeping one across calls of one size spares
/// each call its large allocations, and the page faults of memory the allocator gave
/// back to the system in between (which cost ReRoPE and Leaky ReRoPE at n = 1024 up to
/// 15% over RoPE, measured in the README's Zen 3 section). It carries no state besides
/// capacity; hold one per thread that calls the kernel.
#[derive(Default)]
pub struct TiledScratch {
    prep: PrepBuffers,
    work: Option<(Work, Vec<f32>)>,
}

impl TiledScratch {
    /// An empty scratch (grows on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held by the reusable prefill buffers (packed keys, values, trigonometry).
    pub fn capacity_bytes(&self) -> usize {
        self.prep.capacity_bytes()
    }
}

impl std::fmt::Debug for TiledScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TiledScratch")
            .field("capacity_bytes", &self.capacity_bytes())
            .finish_non_exhaustive()
    }
}

/// A contiguous `[H_kv][n_k][d_v]` copy of the values when `prep.v` borrows the input
/// with rows `H_kv d_v` apart (`None` when they are already `d_v` apart).
///
/// The P V tile product streams `block_k` value rows per register block; borrowed in
/// place, consecutive rows of one head are `H_kv d_v` f32 apart (4 KiB for 8 kv heads of
/// 128), so every row of a tile falls in the same L1 set and the tile does not stay in
/// L1. One copy per call, `O(n_k H_kv d_v)` like the packed keys, fixes that (measured
/// in the module docs, "Tile size").
///
/// The copy is written into `spare`'s memory (taken, grown fallibly).
fn contiguous_values(prep: &TiledPrep<'_>, spare: &mut Vec<f32>) -> Result<Option<Vec<f32>>> {
    let dims = prep.dims;
    let (n_k, dv, heads) = (dims.n_k, dims.value_dim, dims.heads_kv);
    if heads <= 1 || n_k == 0 || dv == 0 || prep.v.mat(0, 0..n_k).stride() == dv {
        return Ok(None);
    }
    let rows = heads
        .checked_mul(n_k)
        .ok_or_else(|| RopeError::invalid("values", n_k, "kv heads x keys overflows usize"))?;
    let mut out = crate::error::reuse_vec(spare, "values made contiguous", rows, dv)?;
    out.resize(rows * dv, 0.0);
    // Token by token, every head in turn: the input is read in its own order (one
    // head's rows are `H_kv d_v` apart, a page each at 8 heads of 128).
    for t in 0..n_k {
        for g in 0..heads {
            let at = (g * n_k + t) * dv;
            out[at..at + dv].copy_from_slice(prep.v.row(g, t));
        }
    }
    Ok(Some(out))
}

/// The values as bf16 pair rows for bf16 products: `[H_kv][ceil(n_k / 2)][d_v]`, pair row
/// `r` of head `g` interleaving value rows `2r` and `2r + 1` (a zero second row for an
/// odd last key), written into `spare`'s memory (taken, grown fallibly); returned with
/// the kernels.
fn value_pair_rows(
    bf: Bf16Kernels,
    prep: &TiledPrep<'_>,
    spare: &mut Vec<f32>,
) -> Result<(Bf16Kernels, Vec<f32>)> {
    let dims = prep.dims;
    let (n_k, dv, heads) = (dims.n_k, dims.value_dim, dims.heads_kv);
    let n2 = n_k.div_ceil(2);
    let rows = heads
        .checked_mul(n2)
        .ok_or_else(|| RopeError::invalid("values", n_k, "kv heads x keys overflows usize"))?;
    let mut out = crate::error::reuse_vec(spare, "values as bf16 pairs", rows, dv)?;
    out.resize(rows * dv, 0.0);
    if dv > 0 {
        for (r, dst) in out.chunks_exact_mut(dv).enumerate() {
            let (g, t) = (r / n2, 2 * (r % n2));
            let second = (t + 1 < n_k).then(|| prep.v.row(g, t + 1));
            bf.pair_rows(prep.v.row(g, t), second, dst)
                .expect("value rows hold d_v values");
        }
    }
    Ok((bf, out))
}

/// Runs `fill` on the f32 rows `[rows, H_q, d_v]` of `out`: `out`'s own memory when it
/// is f32 in standard layout, else `wide` (resized), then rounded once into `out`.
fn store_rows<T: Element, R>(
    mut out: ArrayViewMut3<T>,
    wide: &mut Vec<f32>,
    fill: impl FnOnce(&mut [f32]) -> R,
) -> R {
    if let Some(direct) = out.as_slice_mut().and_then(T::as_f32_mut) {
        return fill(direct);
    }
    wide.clear();
    wide.resize(out.len(), 0.0);
    let r = fill(wide);
    match out.as_slice_mut() {
        Some(dst) => T::store_slice(wide, dst),
        None => {
            for (o, &x) in out.iter_mut().zip(wide.iter()) {
                *o = T::from_f32(x);
            }
        }
    }
    r
}
