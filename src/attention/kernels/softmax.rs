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
    let m = s.splat(if max == f32::NEG_INFINITY { 0.0 } else { max });
    let mut sum = s.zero();
    // The tail pads with -inf: exp(-inf - max) = 0 adds nothing (max is never +inf
    // here unless the caller passes it, and then every lane is NaN or 0 anyway).
    map_chunks!(s, x, f32::NEG_INFINITY, |v| {
        let e = s.exp(s.sub(v, m));
        sum = s.add(sum, e);
        e
    });
    s.hsum(sum)
}

/// The largest element of `x`, ignoring NaN (`-inf` for an empty or all-NaN row).
#[inline(always)]
pub(crate) fn row_max<S: Simd>(s: S, x: &[f32]) -> f32 {
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
    let a = s.max(s.max(acc[0], acc[1]), s.max(acc[2], acc[3]));
    s.hmax(a)
}

/// `x[i] *= alpha`.
#[inline(always)]
pub(crate) fn scale<S: Simd>(s: S, x: &mut [f32], alpha: f32) {
    let a = s.splat(alpha);
    map_chunks!(s, x, 0.0, |v| s.mul(v, a));
}
