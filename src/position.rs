//! [`PositionMap`]: the relative position `P(i, j)` that attention between query `i` and
//! key `j` sees, and its decomposition into plain RoPE pieces.
//!
//! | map | `P(i, j)`, `r = i - j` |
//! |---|---|
//! | [`PositionMap::Rope`] | `r` |
//! | [`PositionMap::ReRope`] (Su, post 12) | `r` if `|r| < w`, else `w` |
//! | [`PositionMap::LeakyReRope`] (post 12) | `r` if `|r| < w`, else `w + (r - w)/k` |
//! | inverse Leaky (post 13) | the Leaky formula with `k < 1` |
//! | [`PositionMap::Interpolated`] | `r / s` (position interpolation as a map) |
//!
//! Every map is at most two pieces, chosen per `(i, j)` by the band `|r| < w`, and every
//! piece is plain RoPE with affine query and key positions, `P = f(i) - g(j)`
//! ([`Piece`]):
//! - near (inside the band): `f(i) = i`, `g(j) = j`;
//! - far, ReRoPE: `f(i) = w`, `g(j) = 0` (keys unrotated, every query rotated by `w`);
//! - far, Leaky: `f(i) = i/k + w(1 - 1/k)`, `g(j) = j/k`.
//!
//! So attention under any map is "a few RoPE attentions selected per entry by a band mask
//! before softmax". For keys after the query (non-causal), the same band `|r| < w` and the
//! same far piece apply, as in Su's two-pass code.

use ndarray::Array2;

use crate::error::{Result, RopeError};

/// A relative-position map. Build one with [`PositionMap::rerope`] and friends, which
/// validate their parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PositionMap {
    /// Plain RoPE: `P = i - j`.
    Rope,
    /// ReRoPE(w): positions beyond the window are clamped to `w`.
    ReRope {
        /// Window `w >= 1`.
        window: usize,
    },
    /// Leaky ReRoPE(w, k): beyond the window, positions grow at rate `1/k`.
    /// `k > 1` compresses (inference-time extension), `k = 1` is RoPE, `k < 1` is the
    /// inverse Leaky ReRoPE of post 13 (used in training).
    LeakyReRope {
        /// Window `w >= 1`.
        window: usize,
        /// Leak `k > 0`.
        leak: f64,
    },
    /// Position interpolation as a map: `P = (i - j) / s`.
    Interpolated {
        /// Factor `s > 0`.
        factor: f64,
    },
}

/// `x -> scale * x + offset`: a piece's query or key position as a function of the token
/// index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    /// Multiplier of the token index.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

impl Affine {
    /// The identity `x -> x`.
    pub const IDENTITY: Affine = Affine {
        scale: 1.0,
        offset: 0.0,
    };

    /// Evaluates the map at `x`.
    pub fn at(self, x: f64) -> f64 {
        self.scale * x + self.offset
    }

    /// True when every token maps to the same position (e.g. ReRoPE's far keys at 0).
    pub fn is_constant(self) -> bool {
        self.scale == 0.0
    }
}

/// One plain-RoPE piece of a map: `P(i, j) = query.at(i) - key.at(j)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Piece {
    /// `f(i)`: the position the query is rotated by.
    pub query: Affine,
    /// `g(j)`: the position the key is rotated by.
    pub key: Affine,
}

impl Piece {
    /// Plain RoPE: `f(i) = i`, `g(j) = j`.
    pub const ROPE: Piece = Piece {
        query: Affine::IDENTITY,
        key: Affine::IDENTITY,
    };

    /// `P(i, j)` under this piece.
    pub fn at(self, i: f64, j: f64) -> f64 {
        self.query.at(i) - self.key.at(j)
    }
}

/// A map's decomposition: `near` inside the band `|i - j| < window`, `far` outside.
/// Single-piece maps have no band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pieces {
    /// The piece used inside the band (or everywhere, for single-piece maps).
    pub near: Piece,
    /// The window and the piece used where `|i - j| >= window`.
    pub far: Option<(usize, Piece)>,
}

impl Pieces {
    /// The piece that serves entry `(i, j)`.
    pub fn piece_for(&self, i: usize, j: usize) -> Piece {
        match self.far {
            Some((w, far)) if i.abs_diff(j) >= w => far,
            _ => self.near,
        }
    }
}

impl PositionMap {
    /// ReRoPE with window `w >= 1`.
    pub fn rerope(window: usize) -> Result<Self> {
        check_window(window)?;
        Ok(PositionMap::ReRope { window })
    }

    /// Leaky ReRoPE with window `w >= 1` and leak `k > 0` (`k < 1`: inverse Leaky).
    pub fn leaky_rerope(window: usize, leak: f64) -> Result<Self> {
        check_window(window)?;
        if !(leak.is_finite() && (MIN_LEAK..=MAX_LEAK).contains(&leak)) {
            return Err(RopeError::invalid(
                "leak (k)",
                leak,
                format!(
                    "must be in [{MIN_LEAK:e}, {MAX_LEAK:e}] (k > 1 compresses far positions, k < 1 is inverse Leaky ReRoPE, k -> inf is ReRoPE)"
                ),
            ));
        }
        Ok(PositionMap::LeakyReRope { window, leak })
    }

    /// Position interpolation by `factor > 0` as a map.
    pub fn interpolated(factor: f64) -> Result<Self> {
        crate::error::check_positive("interpolation factor", factor)?;
        Ok(PositionMap::Interpolated { factor })
    }

    /// Re-validates a map built from its public variants.
    pub fn validate(&self) -> Result<()> {
        match *self {
            PositionMap::Rope => Ok(()),
            PositionMap::ReRope { window } => Self::rerope(window).map(|_| ()),
            PositionMap::LeakyReRope { window, leak } => {
                Self::leaky_rerope(window, leak).map(|_| ())
            }
            PositionMap::Interpolated { factor } => Self::interpolated(factor).map(|_| ()),
        }
    }

    /// The band width, for two-piece maps.
    pub fn window(&self) -> Option<usize> {
        match *self {
            PositionMap::ReRope { window } | PositionMap::LeakyReRope { window, .. } => {
                Some(window)
            }
            _ => None,
        }
    }

    /// The map's plain-RoPE pieces (see the module docs).
    pub fn pieces(&self) -> Pieces {
        match *self {
            PositionMap::Rope => Pieces {
                near: Piece::ROPE,
                far: None,
            },
            PositionMap::Interpolated { factor } => {
                let a = Affine {
                    scale: 1.0 / factor,
                    offset: 0.0,
                };
                Pieces {
                    near: Piece { query: a, key: a },
                    far: None,
                }
            }
            PositionMap::ReRope { window } => Pieces {
                near: Piece::ROPE,
                far: Some((
                    window,
                    Piece {
                        query: Affine {
                            scale: 0.0,
                            offset: window as f64,
                        },
                        key: Affine {
                            scale: 0.0,
                            offset: 0.0,
                        },
                    },
                )),
            },
            PositionMap::LeakyReRope { window, leak } => Pieces {
                near: Piece::ROPE,
                far: Some((
                    window,
                    Piece {
                        query: Affine {
                            scale: 1.0 / leak,
                            offset: window as f64 * (1.0 - 1.0 / leak),
                        },
                        key: Affine {
                            scale: 1.0 / leak,
                            offset: 0.0,
                        },
                    },
                )),
            },
        }
    }

    /// `P(i, j)` for query position `i` and key position `j`, from the closed form.
    pub fn position(&self, i: usize, j: usize) -> f64 {
        let r = i as f64 - j as f64;
        match *self {
            PositionMap::Rope => r,
            PositionMap::Interpolated { factor } => r / factor,
            PositionMap::ReRope { window } => {
                if i.abs_diff(j) < window {
                    r
                } else {
                    window as f64
                }
            }
            PositionMap::LeakyReRope { window, leak } => {
                if i.abs_diff(j) < window {
                    r
                } else {
                    window as f64 + (r - window as f64) / leak
                }
            }
        }
    }

    /// The explicit `n_q x n_k` matrix of `P(i, j)` for queries at positions
    /// `q_offset .. q_offset + n_q` and keys at `0 .. n_k` (chunked prefill: the queries
    /// are the last `n_q` tokens of an `n_k`-token sequence when `q_offset = n_k - n_q`).
    /// Entries above the causal diagonal are filled too; the kernels mask them.
    pub fn position_matrix(&self, n_q: usize, n_k: usize, q_offset: usize) -> Array2<f64> {
        Array2::from_shape_fn((n_q, n_k), |(a, j)| self.position(q_offset + a, j))
    }

    /// The largest `P(i, j)` over causal pairs of a `len`-token sequence: what the model
    /// must have seen in training for this map to stay in range.
    pub fn max_position(&self, len: usize) -> f64 {
        if len == 0 {
            return 0.0;
        }
        // Every map is non-decreasing in r for r >= 0, so the maximum is at r = len - 1.
        self.position(len - 1, 0)
    }
}

/// Smallest accepted leak: far positions grow at most a million times faster than `r`.
pub const MIN_LEAK: f64 = 1e-6;
/// Largest accepted leak (ReRoPE is the `k -> inf` limit; use [`PositionMap::ReRope`]).
pub const MAX_LEAK: f64 = 1e12;

fn check_window(window: usize) -> Result<()> {
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

/// Su's recommended ReRoPE window range for a training length: `L_train/4 ..= L_train/2`
/// (post 12's ablation; `w = L_train` collapses).
pub fn recommended_window(train_len: usize) -> std::ops::RangeInclusive<usize> {
    (train_len / 4).max(1)..=(train_len / 2).max(1)
}

/// The smallest leak `k >= 1` that keeps Leaky ReRoPE's largest position,
/// `w + (L - 1 - w)/k`, inside the trained range `L_train - 1` for a target length `L`:
/// `k = (L - 1 - w) / (L_train - 1 - w)`, or 1 when the target fits already.
///
/// ```
/// let k = ropex::position::leak_for_target(64, 128, 2048).unwrap();
/// let map = ropex::PositionMap::leaky_rerope(64, k).unwrap();
/// assert!((map.max_position(2048) - 127.0).abs() < 1e-9);
/// ```
pub fn leak_for_target(window: usize, train_len: usize, target_len: usize) -> Result<f64> {
    check_window(window)?;
    if train_len < 2 || window + 1 >= train_len {
        return Err(RopeError::invalid(
            "window (w)",
            window,
            format!("must be < train_len - 1 = {}", train_len.saturating_sub(1)),
        ));
    }
    if target_len <= train_len {
        return Ok(1.0);
    }
    Ok((target_len - 1 - window) as f64 / (train_len - 1 - window) as f64)
}

/// The inverse-Leaky leak of post 13 for a target extension `s`: `k = 1 / (2 s)`.
pub fn inverse_leak(extension: f64) -> Result<f64> {
    crate::error::check_positive("extension factor s", extension)?;
    Ok(1.0 / (2.0 * extension))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: [PositionMap; 5] = [
        PositionMap::Rope,
        PositionMap::ReRope { window: 5 },
        PositionMap::LeakyReRope {
            window: 4,
            leak: 3.0,
        },
        PositionMap::LeakyReRope {
            window: 3,
            leak: 0.25,
        },
        PositionMap::Interpolated { factor: 2.0 },
    ];

    #[test]
    fn pieces_reproduce_the_closed_form() {
        for map in MAPS {
            let pieces = map.pieces();
            for i in 0..20 {
                for j in 0..20 {
                    let p = pieces.piece_for(i, j).at(i as f64, j as f64);
                    assert!(
                        (p - map.position(i, j)).abs() < 1e-12,
                        "{map:?} at ({i}, {j}): {p} vs {}",
                        map.position(i, j)
                    );
                }
            }
        }
    }

    #[test]
    fn published_leaky_values() {
        let m = PositionMap::leaky_rerope(512, 16.0).unwrap();
        assert_eq!(m.position(1000, 0), 542.5);
        assert_eq!(m.position(5000, 0), 792.5);
    }

    #[test]
    fn matrix_with_offset() {
        let m = PositionMap::rerope(2).unwrap();
        let p = m.position_matrix(2, 5, 3);
        assert_eq!(p.row(0).to_vec(), vec![2.0, 2.0, 1.0, 0.0, -1.0]);
        assert_eq!(p.row(1).to_vec(), vec![2.0, 2.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn helpers() {
        assert_eq!(recommended_window(512), 128..=256);
        assert_eq!(inverse_leak(16.0).unwrap(), 1.0 / 32.0);
        assert!(inverse_leak(0.0).is_err());
        assert_eq!(leak_for_target(32, 128, 100).unwrap(), 1.0);
        assert!(leak_for_target(127, 128, 1000).is_err());
        assert!(leak_for_target(0, 128, 1000).is_err());
        assert!(PositionMap::rerope(0).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(PositionMap::leaky_rerope(4, bad).is_err());
        }
        assert!(
            PositionMap::LeakyReRope {
                window: 0,
                leak: 2.0
            }
            .validate()
            .is_err()
        );
    }
}
