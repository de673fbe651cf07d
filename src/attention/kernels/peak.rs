//! The machine's peak: independent multiply-accumulate chains, nothing else.

use super::gemm::{Fma, Mac};
use super::simd::Simd;

/// Runs `iters` rounds of `C` independent dependent chains `x = mac(a, b, x)` of the
/// multiply-accumulate step `mac` (starting from `x = 1, 2, ..`) and returns a value that
/// depends on all of them (so the work cannot be elided).
#[inline(always)]
pub(crate) fn mac_loop<S: Simd, M: Mac<S>, const C: usize>(
    s: S,
    mac: M,
    (a, b): (S::V, S::V),
    iters: u64,
) -> f32 {
    let mut acc = [s.zero(); C];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = s.splat(1.0 + i as f32);
    }
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = mac.mac(s, a, b, *x);
        }
    }
    let mut sum = s.zero();
    for x in acc {
        sum = s.add(sum, x);
    }
    s.hsum(sum)
}

/// [`mac_loop`] of f32 fused multiply-adds: `iters * C * LANES * 2` flops.
#[inline(always)]
pub(crate) fn fma_loop<S: Simd, const C: usize>(s: S, iters: u64) -> f32 {
    // A product of 1e-3 keeps every chain finite and normal for any `iters` timed.
    mac_loop::<S, Fma, C>(s, Fma, (s.splat(0.999_9), s.splat(1.0e-3)), iters)
}
