//! The machine's f32 FMA peak: independent FMA chains, nothing else.

use super::simd::Simd;

/// Runs `iters` rounds of `C` independent dependent-FMA chains (`x = x * a + b`) and
/// returns a value that depends on all of them (so the work cannot be elided).
/// Work: `iters * C * LANES * 2` flops.
#[inline(always)]
pub(crate) fn fma_loop<S: Simd, const C: usize>(s: S, iters: u64) -> f32 {
    // |a| < 1 and a small b keep every chain finite and normal for any `iters`.
    let a = s.splat(0.999_9);
    let b = s.splat(1.0e-3);
    let mut acc = [s.zero(); C];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = s.splat(1.0 + i as f32);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = s.fma(*x, a, b);
        }
    }
    let mut sum = s.zero();
    for x in acc {
        sum = s.add(sum, x);
    }
    s.hsum(sum)
}
