//! The one cos/sin builder: angles `p * inv_freq_j` in f64, an optional scale (the
//! attention factor) applied in f64, and only the results cast to the storage type.
//!
//! At position 1,048,576 an f32 product `p * inv_freq` is off by up to ~0.03 rad; the f64
//! angle is within ~1e-10 rad there, so the cast at the end (~6e-8 relative for f32) is
//! the only error that remains.

use num_traits::Float;

/// Casts an f64 to `T` (for f32/f64/f16/bf16 this never fails; NaN if it ever did).
#[inline]
pub(crate) fn cast<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

/// Writes `scale * cos(position * w_j)` and `scale * sin(position * w_j)` for every `w_j`
/// of `inv_freq` into `cos[j]` and `sin[j]` (the three slices have one entry per pair).
/// With `T = f64` the cast is the identity; pass `scale = 1` to keep the attention factor
/// out of the table.
#[inline]
pub(crate) fn cos_sin_into<T: Float>(
    inv_freq: &[f64],
    position: f64,
    scale: f64,
    cos: &mut [T],
    sin: &mut [T],
) {
    for ((c, s), &w) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let (sv, cv) = (position * w).sin_cos();
        *c = cast(cv * scale);
        *s = cast(sv * scale);
    }
}
