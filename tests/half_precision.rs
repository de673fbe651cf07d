//! f16 / bf16 rotation (feature `half`): angles still come from f64, so the only error
//! is the storage format's rounding.
#![cfg(feature = "half")]

use half::{bf16, f16};
use ropex::{Layout, RopeConfig, RotaryTable};

fn check<T: num_traits::Float>(tol: f64) {
    let freqs = RopeConfig::new(64, 10_000.0).unwrap().frequencies();
    let t32 = RotaryTable::<f32>::new(&freqs, 70_000, Layout::Half).unwrap();
    let th = RotaryTable::<T>::new(&freqs, 70_000, Layout::Half).unwrap();
    let x: Vec<f32> = (0..64).map(|i| (i as f32 / 64.0) - 0.5).collect();
    for p in [0usize, 1, 4097, 65_535, 69_999] {
        let mut a = x.clone();
        let mut b: Vec<T> = x.iter().map(|&v| T::from(v).unwrap()).collect();
        t32.rotate_slice(&mut a, [1, 1, 64], &[p]).unwrap();
        th.rotate_slice(&mut b, [1, 1, 64], &[p]).unwrap();
        for (u, v) in a.iter().zip(&b) {
            let v = v.to_f64().unwrap();
            assert!((*u as f64 - v).abs() < tol, "p = {p}: {u} vs {v}");
        }
    }
}

#[test]
fn f16_rotation_tracks_f32() {
    check::<f16>(2e-3);
}

#[test]
fn bf16_rotation_tracks_f32() {
    check::<bf16>(1.6e-2);
}
