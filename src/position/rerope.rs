//! ReRoPE and Leaky ReRoPE (Su, "Transformer upgrade road" posts 12 and 13), and
//! position interpolation written as a map.
//!
//! With `r = i - j` and window `w`:
//! - ReRoPE(w): `P = r` if `|r| < w`, else `w`. Pieces: near `f(i) = i, g(j) = j`; far
//!   `f(i) = w, g(j) = 0` (keys unrotated, every query rotated by `w`).
//! - Leaky ReRoPE(w, k): `P = r` if `|r| < w`, else `w + (r - w)/k`. Far piece
//!   `f(i) = i/k + w(1 - 1/k)`, `g(j) = j/k`. `k > 1` compresses far positions
//!   (inference), `k < 1` is post 13's inverse Leaky ReRoPE (training); ReRoPE is the
//!   `k -> inf` limit.
//! - Interpolated(s): `P = r / s`, one piece `f(i) = i/s, g(j) = j/s`.
//!
//! For keys after the query (non-causal), the same band `|r| < w` and the same far
//! piece apply, as in Su's two-pass code.

use super::pieces::{Affine, Piece};
use super::region::{Pieces, Region};
use crate::error::{Result, RopeError};

/// Smallest accepted leak: far positions grow at most a million times faster than `r`.
pub const MIN_LEAK: f64 = 1e-6;
/// Largest accepted leak (ReRoPE is the `k -> inf` limit; use ReRoPE itself).
pub const MAX_LEAK: f64 = 1e12;

pub(super) fn check_window(window: usize) -> Result<()> {
    if window == 0 {
        Err(RopeError::invalid(
            "window (w)",
            0,
            "must be >= 1 (Su recommends L_train/4 .. L_train/2)",
        ))
    } else {
        Ok(())
    }
}

pub(super) fn check_leak(leak: f64) -> Result<()> {
    if leak.is_finite() && (MIN_LEAK..=MAX_LEAK).contains(&leak) {
        return Ok(());
    }
    Err(RopeError::invalid(
        "leak (k)",
        leak,
        format!(
            "must be in [{MIN_LEAK:e}, {MAX_LEAK:e}] (k > 1 compresses far positions, k < 1 is inverse Leaky ReRoPE, k -> inf is ReRoPE)"
        ),
    ))
}

/// ReRoPE's pieces: identity inside the band, `(w, 0)` outside.
pub(super) fn rerope_pieces(window: usize) -> Pieces {
    let far = Piece::affine(Affine::constant(window as f64), Affine::constant(0.0));
    Pieces::new(vec![Piece::ROPE, far], Region::Band { window })
}

/// Leaky ReRoPE's pieces: identity inside the band, `(i/k + w(1 - 1/k), j/k)` outside.
pub(super) fn leaky_pieces(window: usize, leak: f64) -> Pieces {
    let far = Piece::affine(
        Affine {
            scale: 1.0 / leak,
            offset: window as f64 * (1.0 - 1.0 / leak),
        },
        Affine {
            scale: 1.0 / leak,
            offset: 0.0,
        },
    );
    Pieces::new(vec![Piece::ROPE, far], Region::Band { window })
}

/// Interpolation's single piece `(i/s, j/s)`.
pub(super) fn interpolated_pieces(factor: f64) -> Pieces {
    let a = Affine {
        scale: 1.0 / factor,
        offset: 0.0,
    };
    Pieces::new(vec![Piece::affine(a, a)], Region::Single)
}

/// ReRoPE's closed form.
pub(super) fn rerope_position(window: usize, i: usize, j: usize) -> f64 {
    if i.abs_diff(j) < window {
        i as f64 - j as f64
    } else {
        window as f64
    }
}

/// Leaky ReRoPE's closed form.
pub(super) fn leaky_position(window: usize, leak: f64, i: usize, j: usize) -> f64 {
    let r = i as f64 - j as f64;
    if i.abs_diff(j) < window {
        r
    } else {
        window as f64 + (r - window as f64) / leak
    }
}
