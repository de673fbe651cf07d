//! Softmax building blocks over one row, written once against [`Simd`]: `exp` in
//! place, the fused `x -> exp(x - max)` with its sum, the row max and a row scale.
//!
//! Ragged tails go through a small stack buffer padded with `-inf` (which `exp` maps to
//! 0 and `max` ignores), so every element, tail included, takes the vector path and
//! every instruction set gives the tail the same treatment as the body.

use super::simd::Simd;

/// Largest `LANES` of any instruction set (the tail buffer size).
const MAX_LANES: usize = 16;

/// Runs `$body` (an expression of the vector `$v`, giving a vector) over every
/// `LANES`-wide chunk of the slice `$x`, storing the results back; the tail is padded
/// with `$pad` and only its real lanes are written back. A macro, not a function taking
/// a closure: a closure would be compiled without the caller's target features.
macro_rules! map_chunks {
    ($s:expr, $x:expr, $pad:expr, |$v:ident| $body:expr) => {{
        let l = S::LANES;
        debug_assert!(l <= MAX_LANES);
        let mut chunks = $x.chunks_exact_mut(l);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly LANES f32.
            let $v = unsafe { $s.load(c.as_ptr()) };
            let y = $body;
            // SAFETY: as above.
            unsafe { $s.store(c.as_mut_ptr(), y) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [$pad; MAX_LANES];
            buf[..rest.len()].copy_from_slice(rest);
            // SAFETY: `buf` holds MAX_LANES >= LANES f32.
            let $v = unsafe { $s.load(buf.as_ptr()) };
            let y = $body;
            // SAFETY: as above.
            unsafe { $s.store(buf.as_mut_ptr(), y) };
            rest.copy_from_slice(&buf[..rest.len()]);
        }
    }};
}

/// `x[i] = exp(x[i])`.
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, x: &mut [f32]) {
    map_chunks!(s, x, f32::NEG_INFINITY, |v| s.exp(v));
}

/// `x[i] = exp(x[i] - max)`, returning the sum of the new `x`. A `max` of `-inf` (a row
/// with every entry masked) is treated as 0, so the row becomes `exp(x)` (zeros for
/// `-inf` entries) instead of NaN.
#[inline(always)]
pub(crate) fn exp_sub_sum<S: Simd>(s: S, x: &mut [f32], max: f32) -> f32 {
    s.hsum(exp_sub_lanes(s, x, max))
}

/// [`exp_sub_sum`] with the sum left in lanes (its lanes add up to the sum).
#[inline(always)]
fn exp_sub_lanes<S: Simd>(s: S, x: &mut [f32], max: f32) -> S::V {
    let m = s.splat(if max == f32::NEG_INFINITY { 0.0 } else { max });
    let mut sum = s.zero();
    // The tail pads with -inf: exp(-inf - max) = 0 adds nothing (max is never +inf
    // here unless the caller passes it, and then every lane is NaN or 0 anyway).
    map_chunks!(s, x, f32::NEG_INFINITY, |v| {
        let e = s.exp_nonpos(s.sub(v, m));
        sum = s.add(sum, e);
        e
    });
    sum
}

/// The largest element of `x`, ignoring NaN (`-inf` for an empty or all-NaN row).
#[inline(always)]
pub(crate) fn row_max<S: Simd>(s: S, x: &[f32]) -> f32 {
    s.hmax(row_max_lanes(s, x))
}

/// [`row_max`] with the max left in lanes (no NaN among them; their max is the row's).
#[inline(always)]
fn row_max_lanes<S: Simd>(s: S, x: &[f32]) -> S::V {
    let l = S::LANES;
    // Four independent accumulators hide the max latency on long rows.
    let mut acc = [s.splat(f32::NEG_INFINITY); 4];
    let mut chunks = x.chunks_exact(4 * l);
    for c in &mut chunks {
        for (u, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 4 * LANES f32.
            let v = unsafe { s.load(c.as_ptr().add(u * l)) };
            // `max(v, a)` returns `a` when `v` is NaN: NaN never enters `a`.
            *a = s.max(v, *a);
        }
    }
    let mut rest = chunks.remainder();
    while !rest.is_empty() {
        let n = rest.len().min(l);
        let mut buf = [f32::NEG_INFINITY; MAX_LANES];
        buf[..n].copy_from_slice(&rest[..n]);
        // SAFETY: `buf` holds MAX_LANES >= LANES f32.
        let v = unsafe { s.load(buf.as_ptr()) };
        acc[0] = s.max(v, acc[0]);
        rest = &rest[n..];
    }
    s.max(s.max(acc[0], acc[1]), s.max(acc[2], acc[3]))
}

/// `x[i] *= alpha`.
#[inline(always)]
pub(crate) fn scale<S: Simd>(s: S, x: &mut [f32], alpha: f32) {
    let a = s.splat(alpha);
    map_chunks!(s, x, 0.0, |v| s.mul(v, a));
}

/// The online-softmax state of a block of query rows, borrowed for
/// [`fold_rows`]: running max `m`, running sum `l`, whether each row has seen a visible
/// key, and the unnormalised outputs `acc` (`m.len()` rows of `dv`).
pub(crate) struct RowsMut<'a> {
    /// Running max per row.
    pub m: &'a mut [f32],
    /// Running sum of `e^(s - m)` per row.
    pub l: &'a mut [f32],
    /// Whether the row has seen a visible key.
    pub seen: &'a mut [bool],
    /// Unnormalised outputs, `dv` per row.
    pub acc: &'a mut [f32],
    /// Output width.
    pub dv: usize,
}

/// Folds the scores of one tile (`scores`: rows of `bk`, masked entries `-inf`) into
/// the state, in place of the probabilities: for each row `a` with a visible entry
/// (all rows when `visible` is `None`, else those with `visible[a] > 0`),
/// `m' = max(m, max_c s_c)`, `c = e^(m - m')`, `acc *= c` and `l *= c` unless
/// `c = 1`, then `s_c = e^(s_c - m')` and `l += sum_c s_c` (Milakov and Gimelshein's
/// online softmax, as in FlashAttention).
///
/// Rows go `LANES` at a time: their maxima and sums are reduced together by
/// [`Simd::transpose_max`] and [`Simd::transpose_sum`] (one shuffle tree per group
/// instead of one per row), and no call is made per row. The results are those of
/// [`row_max`], [`scale`] and [`exp_sub_sum`] row by row, up to the order in which a
/// row's sum is added.
#[inline(always)]
pub(crate) fn fold_rows<S: Simd>(
    s: S,
    scores: &mut [f32],
    bk: usize,
    visible: Option<&[usize]>,
    state: RowsMut<'_>,
) {
    let RowsMut {
        m,
        l,
        seen,
        acc,
        dv,
    } = state;
    if bk == 0 {
        return;
    }
    let lanes = S::LANES;
    let shows = |a: usize| visible.is_none_or(|v| v.get(a).is_some_and(|&n| n > 0));
    let n_rows = m.len().min(l.len()).min(seen.len()).min(scores.len() / bk);
    for (g, group) in scores[..n_rows * bk].chunks_mut(lanes * bk).enumerate() {
        let a0 = g * lanes;
        // Row maxima (rows that see nothing keep -inf and are skipped below).
        let mut lanes_of = [s.splat(f32::NEG_INFINITY); MAX_LANES];
        for (r, row) in group.chunks_exact(bk).enumerate() {
            if shows(a0 + r) {
                lanes_of[r] = row_max_lanes(s, row);
            }
        }
        let mut maxima = [0f32; MAX_LANES];
        // SAFETY: `maxima` holds MAX_LANES >= LANES f32.
        unsafe { s.store(maxima.as_mut_ptr(), s.transpose_max(&lanes_of[..lanes])) };
        let mut sums = [s.zero(); MAX_LANES];
        for (r, row) in group.chunks_exact_mut(bk).enumerate() {
            let a = a0 + r;
            if !shows(a) {
                continue;
            }
            seen[a] = true;
            // NaN-ignoring max over the visible entries (masked ones are -inf); a NaN
            // still poisons l and acc through exp.
            let m_new = m[a].max(maxima[r]);
            // All visible scores -inf (only from infinite inputs): use 0 as the base so
            // no -inf - -inf appears.
            let base = if m_new == f32::NEG_INFINITY {
                0.0
            } else {
                m_new
            };
            // e^0 = 1 exactly: most tiles after the first leave the max where it was.
            let corr = if m[a] == base {
                1.0
            } else {
                (m[a] - base).exp()
            };
            m[a] = m_new;
            if corr != 1.0 {
                if let Some(o) = acc.get_mut(a * dv..(a + 1) * dv) {
                    scale(s, o, corr);
                }
                l[a] *= corr;
            }
            sums[r] = exp_sub_lanes(s, row, base);
        }
        let mut row_sums = [0f32; MAX_LANES];
        // SAFETY: `row_sums` holds MAX_LANES >= LANES f32.
        unsafe { s.store(row_sums.as_mut_ptr(), s.transpose_sum(&sums[..lanes])) };
        let rows_here = group.len() / bk;
        for (r, &sum) in row_sums.iter().enumerate().take(rows_here) {
            if shows(a0 + r) {
                l[a0 + r] += sum;
            }
        }
    }
}
