//! The one decode step every cache runs: a GQA group of queries, rotated once per piece,
//! scored against runs of stored keys, softmax in f32, then `P V` over runs of stored
//! values. Caches differ only in where a run of keys or values lives ([`KeySource`]):
//! one chunk per kv head for [`super::KvCache`], one chunk per block for
//! [`super::PagedKvCache`].
//!
//! Keys and values are read in place in their storage type `S` and widened to f32 in
//! registers by the decode GEMVs as they load them (bf16: zero-extend and shift by 16;
//! f16: `vcvtph2ps`; both exact): a bf16/f16 step streams half the bytes of an f32 one,
//! with no round trip through a scratch tile, and every product, sum and the softmax run
//! in f32.
//!
//! bf16 products: a bf16 cache whose [`crate::attention::Bf16Products`] setting applies
//! (by default, where `vdpbf16ps` is fast) scores its stored keys with `vdpbf16ps`: the
//! rotated, scaled queries are rounded to bf16 once per step and each stored key row is
//! already a row of bf16 pairs, so `Q K^T` reads the keys as they lie, with no widening
//! and half the instructions. Products are exact and sums f32; the one extra rounding is
//! the queries' (`|dq| <= u |q|`, `u = 2^-8`), the same size as the keys' own rounding
//! into the cache, so a logit's error bound doubles from `scale u |q| |k|` to
//! `scale (2u + u^2) |q| |k|`. llama.cpp's CPU flash attention likewise converts the
//! query to the cache's type for its dot products. `P V` keeps f32 products on widened
//! values (it is bound by reading V, not by arithmetic), and rebuilt f32 keys (the band
//! keys of a ReRoPE cache older than its ring) keep f32 products.
//!
//! Measured on one AMD Zen 4 core (EPYC family 25 model 17; L = 32768, 32 query and 8 kv
//! heads, d = 128, one thread): the bf16 `Q K^T` of a step took 3.6 ms of arithmetic with
//! widening against 1.95 ms with `vdpbf16ps` (keys resident in L2), so from memory it
//! now reads at the rate of a plain sum of the same bytes.

use ndarray::ArrayView2;

use super::shared::{Core, Trig};
use crate::attention::kernels::{Bf16Kernels, Kernels, MatMut, MatRef};
use crate::position::{Piece, Region};
use crate::tensor::Element;

pub(super) fn mat(data: &[f32], rows: usize, cols: usize, stride: usize) -> MatRef<'_> {
    MatRef::new(data, rows, cols, stride).expect("decode shapes are consistent")
}

pub(super) fn mat_mut(data: &mut [f32], rows: usize, cols: usize, stride: usize) -> MatMut<'_> {
    MatMut::new(data, rows, cols, stride).expect("decode shapes are consistent")
}

/// The buffers of a decode step, reused across calls: after the first step at a given
/// cache length (or longer), a step allocates nothing. Hold one per thread; it carries no
/// state between calls besides its capacity.
///
/// ```
/// use ropex::attention::decode::DecodeScratch;
/// let mut scratch = DecodeScratch::new();
/// # let _ = &mut scratch;
/// ```
#[derive(Debug, Default, Clone)]
pub struct DecodeScratch {
    /// Rotated queries, one `[group, d]` block per piece.
    q: Vec<f32>,
    /// With bf16 products: the same blocks as bf16 pair rows (`d / 2` slots a row, stride
    /// `d`).
    q_pairs: Vec<f32>,
    /// Scores `[group, seen]`.
    scores: Vec<f32>,
    /// Softmax denominators, one per query row.
    denoms: Vec<f32>,
    /// The output of a group `[group, d_v]` (f32, before the store rounds it).
    pub(super) acc: Vec<f32>,
    pub(super) trig: Option<Trig>,
}

impl DecodeScratch {
    /// An empty scratch (grows on first use).
    pub fn new() -> Self {
        Self::default()
    }
}

/// The trigonometry buffer in `slot`, sized for `pairs` frequencies.
pub(super) fn trig_in(slot: &mut Option<Trig>, pairs: usize) -> &mut Trig {
    let t = slot.get_or_insert_with(|| Trig::new(pairs));
    t.resize(pairs);
    t
}

/// A run of keys or values: stored rows (widened on load) or f32 rows (rebuilt keys).
#[derive(Debug, Clone, Copy)]
pub(super) enum Rows<'a, S> {
    Stored(&'a [S]),
    Wide(&'a [f32]),
}

/// Where a cache keeps the keys and values of one kv head.
pub(super) trait KeySource<S: Element> {
    /// Calls `f(rows, first)` for runs of keys of `piece` covering stored slots
    /// `lo..hi` in order (`first` the slot of the run's first row).
    fn keys(&self, piece: usize, lo: usize, hi: usize, f: &mut dyn FnMut(Rows<'_, S>, usize));
    /// Calls `f(rows, first)` for runs of values covering slots `lo..hi` in order.
    fn values(&self, lo: usize, hi: usize, f: &mut dyn FnMut(&[S], usize));
}

/// A run of visible slots `lo..hi` scored with piece `piece`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Run {
    pub(super) lo: usize,
    pub(super) hi: usize,
    pub(super) piece: usize,
}

/// At most three runs (DCA's inter-, previous- and own-chunk keys), in slot order.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Runs {
    runs: [Run; 3],
    n: usize,
}

impl Runs {
    fn push(&mut self, lo: usize, hi: usize, piece: usize) {
        self.runs[self.n] = Run { lo, hi, piece };
        self.n += 1;
    }

    pub(super) fn as_slice(&self) -> &[Run] {
        &self.runs[..self.n]
    }

    /// The first and one-past-last slot the runs cover.
    fn span(&self) -> (usize, usize) {
        let s = self.as_slice();
        (s.first().map_or(0, |r| r.lo), s.last().map_or(0, |r| r.hi))
    }

    /// The runs a query at position `i` sees, keys before `base` hidden (the mask), for
    /// a map whose pieces are `region`'s (`pieces()` order: near then far for a band).
    /// `full`: an evicting StreamingLLM cache has wrapped (its slots are no longer
    /// positions; it then holds exactly the sinks and the window).
    pub(super) fn new(region: Region, i: usize, base: usize, full: bool) -> Runs {
        let mut runs = Runs::default();
        let n = i + 1;
        let mut add = |lo: usize, hi: usize, piece: usize| {
            let (lo, hi) = (lo.max(base), hi.max(base));
            runs.push(lo, hi, piece);
        };
        match region {
            Region::Single => add(0, n, 0),
            Region::Band { window } => {
                let band_lo = n.saturating_sub(window);
                add(0, band_lo, 1);
                add(band_lo, n, 0);
            }
            Region::ChunkDistance { period } => {
                let chunk = i / period;
                let (succ, intra) = (chunk.saturating_sub(1) * period, chunk * period);
                if chunk >= 2 {
                    add(0, succ, 2);
                }
                if chunk >= 1 {
                    add(succ, intra, 1);
                }
                add(intra, n, 0);
            }
            Region::SinksWindow { sinks, window } => {
                let seen = if full { sinks + window } else { n };
                let sink_end = sinks.min(n.saturating_sub(window)).min(seen);
                add(0, sink_end, 1);
                add(sink_end, seen, 0);
            }
        }
        runs
    }
}

/// Scores `keys` (`[rows, d]`) against the queries `qs` (`[group, d]`) into columns
/// `col..col + rows` of `scores` (`[group, seen]`); stored rows are widened to f32 in
/// registers as the GEMV loads them.
/// With `pairs` (bf16 products: the kernels and the queries' pair rows), stored bf16
/// rows are scored with `vdpbf16ps` instead.
#[allow(clippy::too_many_arguments)]
fn score_rows<S: Element>(
    kern: Kernels,
    qs: &[f32],
    pairs: Option<(Bf16Kernels, &[f32])>,
    d: usize,
    keys: Rows<'_, S>,
    scores: &mut [f32],
    col: usize,
    seen: usize,
) {
    let group = qs.len() / d;
    let q = mat(qs, group, d, d);
    let rows = match keys {
        Rows::Wide(k) => k.len() / d,
        Rows::Stored(k) => k.len() / d,
    };
    let out = mat_mut(&mut scores[col..], group, rows, seen);
    match (keys, pairs) {
        (Rows::Wide(k), _) => kern.qk_gemv(q, mat(k, rows, d, d), out, 1.0),
        (Rows::Stored(k), Some((b, qp))) => b.qk_gemv_pairs(mat(qp, group, d / 2, d), k, out, 1.0),
        (Rows::Stored(k), None) => kern.qk_gemv_stored(q, k, out, 1.0),
    }
    .expect("decode shapes are consistent");
}

/// `acc += P[:, col..col + rows] V` for stored values `V` (`[rows, dv]`), widened in
/// registers.
#[allow(clippy::too_many_arguments)]
fn accumulate_values<S: Element>(
    kern: Kernels,
    scores: &[f32],
    group: usize,
    seen: usize,
    values: &[S],
    col: usize,
    dv: usize,
    acc: &mut [f32],
) {
    let rows = values.len() / dv;
    kern.pv_gemv_stored(
        mat(&scores[col..], group, rows, seen),
        values,
        mat_mut(acc, group, dv, dv),
    )
    .expect("decode shapes are consistent");
}

/// Softmax of each `seen`-long row of `scores` (row maximum subtracted, f32), then
/// `acc = sum_j p_j v_j / sum_j p_j` over the values of slots `lo..lo + seen` of `src`.
/// A NaN score makes its whole row NaN.
#[allow(clippy::too_many_arguments)]
pub(super) fn softmax_times_values<S: Element>(
    kern: Kernels,
    scores: &mut [f32],
    seen: usize,
    src: &dyn KeySource<S>,
    lo: usize,
    dv: usize,
    acc: &mut [f32],
    denoms: &mut Vec<f32>,
) {
    let group = acc.len() / dv.max(1);
    denoms.clear();
    for row in scores.chunks_exact_mut(seen.max(1)).take(group) {
        let max = kern.row_max(row);
        // exp(NaN) stays NaN, so a NaN score makes the sum, and so the row, NaN.
        denoms.push(kern.exp_sub_sum(row, max));
    }
    acc.fill(0.0);
    if dv == 0 || seen == 0 {
        return;
    }
    src.values(lo, lo + seen, &mut |v, first| {
        accumulate_values(kern, scores, group, seen, v, first - lo, dv, acc);
    });
    for (row, &denom) in acc.chunks_exact_mut(dv).zip(denoms.iter()) {
        kern.scale(row, 1.0 / denom);
    }
}

/// Resizes `buf` to at least `n` (never shrinks: a warm scratch does not allocate).
fn grow(buf: &mut Vec<f32>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
}

/// What one group step needs besides its queries and keys.
pub(super) struct Step<'a> {
    core: &'a Core,
    kern: Kernels,
    /// bf16 products for stored keys ([`super::shared::Core::decode_bf16`]).
    bf16: Option<Bf16Kernels>,
    pieces: &'a [Piece],
    /// The cache length (DCA's logit scale depends on it).
    len: usize,
}

impl<'a> Step<'a> {
    /// The step of a cache storing `S` with `core`, the map's `pieces`, at cache length
    /// `len`, on this process's kernels.
    pub(super) fn new<S: Element>(core: &'a Core, pieces: &'a [Piece], len: usize) -> Self {
        let kern = Kernels::active();
        Step {
            core,
            kern,
            bf16: core.decode_bf16::<S>(kern),
            pieces,
            len,
        }
    }
}

impl Step<'_> {
    /// Attends the queries `q` (`[group, d]`, one GQA group) at position `i` to the
    /// keys and values of `src` over `runs`; the result `[group, d_v]` is left in
    /// `scratch.acc`.
    pub(super) fn group<S: Element, T: Element>(
        &self,
        q: ArrayView2<'_, T>,
        i: usize,
        runs: &Runs,
        src: &dyn KeySource<S>,
        scratch: &mut DecodeScratch,
    ) {
        let core = self.core;
        let (group, d) = q.dim();
        let dv = core.value_dim;
        let factor = core.query_factor(i, self.len);
        let inv = core.freqs.inv_freq();
        let (lo, hi) = runs.span();
        let seen = hi - lo;
        grow(&mut scratch.q, self.pieces.len() * group * d);
        scratch.scores.clear();
        scratch.scores.resize(group * seen, 0.0);
        scratch.acc.clear();
        scratch.acc.resize(group * dv, 0.0);
        let trig = trig_in(&mut scratch.trig, inv.len());
        for r in runs.as_slice().iter().filter(|r| r.hi > r.lo) {
            let qp = &mut scratch.q[r.piece * group * d..(r.piece + 1) * group * d];
            for (dst, &src) in qp.iter_mut().zip(q.iter()) {
                *dst = src.to_f32() * factor;
            }
            trig.set(inv, self.pieces[r.piece].query.at(i as f64));
            for lane in qp.chunks_exact_mut(d.max(1)) {
                trig.rotate(lane, core.layout);
            }
        }
        if let Some(b) = self.bf16 {
            grow(&mut scratch.q_pairs, scratch.q.len());
            for r in runs.as_slice().iter().filter(|r| r.hi > r.lo) {
                let block = r.piece * group * d..(r.piece + 1) * group * d;
                let qp = &mut scratch.q_pairs[block.clone()];
                qp.copy_from_slice(&scratch.q[block]);
                for row in qp.chunks_exact_mut(d.max(1)) {
                    b.round_pairs_unchecked(row, d);
                }
            }
        }
        if d > 0 {
            for r in runs.as_slice().iter().filter(|r| r.hi > r.lo) {
                let block = r.piece * group * d..(r.piece + 1) * group * d;
                let qs = &scratch.q[block.clone()];
                let pairs = self.bf16.map(|b| (b, &scratch.q_pairs[block.clone()]));
                let scores = &mut scratch.scores;
                src.keys(r.piece, r.lo, r.hi, &mut |keys, first| {
                    score_rows(self.kern, qs, pairs, d, keys, scores, first - lo, seen);
                });
            }
        }
        softmax_times_values(
            self.kern,
            &mut scratch.scores,
            seen,
            src,
            lo,
            dv,
            &mut scratch.acc,
            &mut scratch.denoms,
        );
    }
}
