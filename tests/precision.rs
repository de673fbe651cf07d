//! Angle precision at very long positions: ropex computes `p * inv_freq` and cos/sin in
//! f64 and casts at the end, so an f32 table is exact to f32 rounding even at position
//! 2^20; the usual f32 product is not.

use ropex::{Layout, RopeConfig, RotaryTable};

const POSITION: usize = 1 << 20; // 1,048,576
const BASE: f64 = 500_000.0;
const D: usize = 128;

/// inv_freq_j = exp(-(2j/d) ln base): a different evaluation from ropex's `powf`.
fn reference_inv_freq(j: usize) -> f64 {
    (-(2.0 * j as f64 / D as f64) * BASE.ln()).exp()
}

/// What an f64 angle cast to f32 at the end can reach: half an f32 ulp on `[0.5, 1]`
/// (`2^-25 ~ 2.98e-8`, the rounding of the cast) plus `1e-9` for the f64 angle itself
/// (`2^20` rad carries ~1e-10 of f64 rounding, and the two `inv_freq` evaluations differ
/// in the last bits). Measured: 2.95e-8. Evaluating cos/sin in f32 after an f64 range
/// reduction gives ~1e-7 and fails this; the README quotes this bound.
const TABLE_BOUND: f64 = 2.980_232_238_769_531_3e-8 + 1e-9;

#[test]
fn f32_table_matches_f64_reference_at_one_million() {
    let freqs = RopeConfig::new(D, BASE).unwrap().frequencies();
    let table =
        RotaryTable::<f32>::from_positions(&freqs, &[POSITION as f64], Layout::Half).unwrap();
    let (cos, sin) = (table.cos_row(0).unwrap(), table.sin_row(0).unwrap());
    let mut worst: f64 = 0.0;
    for j in 0..D / 2 {
        let angle = POSITION as f64 * reference_inv_freq(j);
        worst = worst
            .max((cos[j] as f64 - angle.cos()).abs())
            .max((sin[j] as f64 - angle.sin()).abs());
    }
    eprintln!("ropex f32 table at p = 2^20: worst |cos/sin error| = {worst:.3e}");
    assert!(
        worst < TABLE_BOUND,
        "worst abs error {worst}, bound {TABLE_BOUND:e}"
    );
}

#[test]
fn the_usual_f32_product_loses_phase() {
    // What many implementations do: positions and inv_freq in f32, product in f32.
    let mut worst: f64 = 0.0;
    for j in 0..D / 2 {
        let inv32 = reference_inv_freq(j) as f32;
        let angle32 = (POSITION as f32) * inv32;
        let exact = POSITION as f64 * reference_inv_freq(j);
        worst = worst.max(((angle32 as f64).cos() - exact.cos()).abs());
    }
    // The f32 inv_freq alone is off by up to 2^-24 relative: at p = 2^20 and inv = 1 that
    // is ~0.06 rad of phase. The README quotes this figure.
    eprintln!("f32 product p * inv_freq at p = 2^20: worst |cos error| = {worst:.3e}");
    assert!(
        worst > 1e-3,
        "expected a visible f32 phase error, got {worst}"
    );
}
