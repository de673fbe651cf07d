//! Helpers shared by the integration tests (each test file is its own crate and takes
//! what it uses with `mod common;`).
#![allow(dead_code)]

use ndarray::Array3;

/// A seeded array, uniform in `[-1, 1)`: a 64-bit LCG (Knuth's MMIX constants) whose
/// state starts from `seed` mixed by the golden-ratio constant, so different seeds give
/// unrelated streams. Deterministic, so every run checks the same inputs.
pub fn rand3(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array3::from_shape_fn(shape, |_| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
    })
}

/// Largest absolute difference of two same-shaped arrays; a NaN on either side counts
/// as infinitely wrong.
pub fn max_err(a: &Array3<f32>, b: &Array3<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m: f32, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
        )
}
