//! [`PositionMap`]: the relative position `P(i, j)` that attention between query `i` and
//! key `j` sees, and its decomposition into plain RoPE pieces.
//!
//! | map | `P(i, j)`, `r = i - j` | source |
//! |---|---|---|
//! | [`PositionMap::Rope`] | `r` | Su et al., RoFormer |
//! | [`PositionMap::ReRope`] | `r` if `|r| < w`, else `w` | Su, post 12 |
//! | [`PositionMap::LeakyReRope`] | `r` if `|r| < w`, else `w + (r - w)/k` (`k < 1`: inverse Leaky, post 13) | Su, posts 12-13 |
//! | [`PositionMap::Interpolated`] | `r / s` | position interpolation |
//! | [`PositionMap::SelfExtend`] | `r` if `r < W`, else `floor(i/G) - floor(j/G) + W - floor(W/G)` | Jin et al. 2024 (LongLM) |
//! | [`PositionMap::DualChunk`] | by chunk distance, see [`dca`] | An et al. 2024 (ChunkLlama) |
//! | [`PositionMap::Streaming`] | `r` if `r < W`; sinks `j < S`: `min(i, S+W-1) - j`; else hidden | Xiao et al. 2023 |
//!
//! Every map is a few plain-RoPE pieces `P = f(i) - g(j)` ([`Piece`], with position
//! functions [`PositionFn`] that need not be affine) and a region rule ([`Region`]) that
//! picks one per `(i, j)` entry, or hides it. So attention under any map is "a few
//! plain RoPE attentions chosen per entry before one softmax", and every kernel in
//! [`crate::attention`] runs every map from this one description.
//!
//! ReRoPE, Leaky ReRoPE, interpolation and RoPE are defined for keys after the query
//! too (bidirectional attention); Self-Extend, Dual Chunk Attention and StreamingLLM are
//! causal-only (their closed form is NaN for `j > i`, and the kernels reject them without
//! `causal`). StreamingLLM hides the keys between its sinks and its window; their
//! closed form is NaN as well ([`PositionMap::sees`] says which entries are visible).
//!
//! Positions are limited to [`MAX_POSITION`] (`2^32`, see [`crate::limits`]); larger
//! ones get a typed error.
//!
//! Maps are written on the command line and in configs as `rope`, `rerope:W`,
//! `leaky:W:K`, `interp:S`, `self-extend:G:W` (or `self-extend:G:W:SCALE_BASE`),
//! `dca:CHUNK_SIZE:LOCAL_WINDOW` and `streaming:SINKS:WINDOW` ([`std::str::FromStr`] and
//! [`std::fmt::Display`] round-trip).
//!
//! ```
//! use ropex::PositionMap;
//! let map: PositionMap = "self-extend:4:8".parse()?;
//! assert_eq!(map.position(20, 0), (20 / 4 + 8 - 8 / 4) as f64);
//! assert_eq!(map.to_string(), "self-extend:4:8");
//! # Ok::<(), ropex::RopeError>(())
//! ```

pub mod dca;
mod pieces;
mod recommend;
mod region;
pub mod rerope;
pub mod self_extend;
pub mod streaming;
mod syntax;

use ndarray::Array2;

pub use pieces::{Affine, Piece, PositionFn};
pub use recommend::{dca_for, inverse_leak, leak_for_target, recommended_window, self_extend_for};
pub use region::{Cover, Pieces, Region, TileBounds};
pub use rerope::{MAX_LEAK, MIN_LEAK};
pub use syntax::MAP_SYNTAX;

use crate::error::{Result, RopeError};

pub use crate::limits::MAX_POSITION;

/// Checks that every position is at most [`MAX_POSITION`].
pub(crate) fn check_positions(what: &str, positions: &[usize]) -> Result<()> {
    match positions
        .iter()
        .enumerate()
        .find(|(_, p)| **p > MAX_POSITION)
    {
        Some((a, &p)) => Err(RopeError::invalid(
            format!("{what}[{a}]"),
            p,
            format!("must be <= {MAX_POSITION} (ropex::limits::MAX_POSITION)"),
        )),
        None => Ok(()),
    }
}

/// A relative-position map. Build one with [`PositionMap::rerope`] and friends (or
/// parse one), which validate their parameters.
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
    /// Self-Extend(G, W) ([`self_extend`]): plain inside the neighbour window, grouped
    /// positions outside.
    SelfExtend {
        /// Group size `G >= 1` (LongLM's `group_size_1`).
        group: usize,
        /// Neighbour window `W >= 1` (LongLM's `group_size_2`).
        window: usize,
        /// Optional query scaling base (`> 1`): `q_i *= max(1, ln(i+1)/ln(base))`.
        scale_base: Option<f64>,
    },
    /// Dual Chunk Attention ([`dca`]): intra-, successive- and inter-chunk positions.
    DualChunk {
        /// Chunk size (`>= 1`).
        chunk_size: usize,
        /// Local window (`< chunk_size`); the block length is `chunk_size - local_window`.
        local_window: usize,
    },
    /// StreamingLLM ([`streaming`]): `sinks` first tokens and the last `window` tokens
    /// are visible, at their places in the cache.
    Streaming {
        /// Number of attention sinks `S` (the paper uses 4).
        sinks: usize,
        /// Window `W >= 1`.
        window: usize,
    },
}

impl PositionMap {
    /// ReRoPE with window `w >= 1`.
    pub fn rerope(window: usize) -> Result<Self> {
        rerope::check_window(window)?;
        Ok(PositionMap::ReRope { window })
    }

    /// Leaky ReRoPE with window `w >= 1` and leak `k > 0` (`k < 1`: inverse Leaky).
    pub fn leaky_rerope(window: usize, leak: f64) -> Result<Self> {
        rerope::check_window(window)?;
        rerope::check_leak(leak)?;
        Ok(PositionMap::LeakyReRope { window, leak })
    }

    /// Position interpolation by `factor > 0` as a map.
    pub fn interpolated(factor: f64) -> Result<Self> {
        crate::error::check_positive("interpolation factor", factor)?;
        Ok(PositionMap::Interpolated { factor })
    }

    /// Self-Extend with group size `G >= 1` and neighbour window `W >= 1`, no query
    /// scaling.
    pub fn self_extend(group: usize, window: usize) -> Result<Self> {
        self_extend::check(group, window, None)?;
        Ok(PositionMap::SelfExtend {
            group,
            window,
            scale_base: None,
        })
    }

    /// Self-Extend with query scaling `q_i *= max(1, ln(i+1)/ln(scale_base))`,
    /// `scale_base > 1`.
    pub fn self_extend_scaled(group: usize, window: usize, scale_base: f64) -> Result<Self> {
        self_extend::check(group, window, Some(scale_base))?;
        Ok(PositionMap::SelfExtend {
            group,
            window,
            scale_base: Some(scale_base),
        })
    }

    /// Dual Chunk Attention with `chunk_size >= 1` and `local_window < chunk_size`.
    pub fn dca(chunk_size: usize, local_window: usize) -> Result<Self> {
        dca::check(chunk_size, local_window)?;
        Ok(PositionMap::DualChunk {
            chunk_size,
            local_window,
        })
    }

    /// StreamingLLM with `sinks` attention sinks and a window `>= 1`.
    pub fn streaming(sinks: usize, window: usize) -> Result<Self> {
        streaming::check(sinks, window)?;
        Ok(PositionMap::Streaming { sinks, window })
    }

    /// Re-validates a map built from its public variants.
    pub fn validate(&self) -> Result<()> {
        match *self {
            PositionMap::Rope => Ok(()),
            PositionMap::ReRope { window } => rerope::check_window(window),
            PositionMap::LeakyReRope { window, leak } => {
                rerope::check_window(window).and_then(|_| rerope::check_leak(leak))
            }
            PositionMap::Interpolated { factor } => Self::interpolated(factor).map(|_| ()),
            PositionMap::SelfExtend {
                group,
                window,
                scale_base,
            } => self_extend::check(group, window, scale_base),
            PositionMap::DualChunk {
                chunk_size,
                local_window,
            } => dca::check(chunk_size, local_window),
            PositionMap::Streaming { sinks, window } => streaming::check(sinks, window),
        }
    }

    /// The band width of band maps (ReRoPE, Leaky ReRoPE, Self-Extend).
    pub fn window(&self) -> Option<usize> {
        match self.pieces().region() {
            Region::Band { window } => Some(window),
            _ => None,
        }
    }

    /// Whether the map is defined only for causal attention (keys at or before the query).
    pub fn is_causal_only(&self) -> bool {
        matches!(
            self,
            PositionMap::SelfExtend { .. }
                | PositionMap::DualChunk { .. }
                | PositionMap::Streaming { .. }
        )
    }

    /// The map's plain-RoPE pieces and region rule (see the module docs).
    pub fn pieces(&self) -> Pieces {
        match *self {
            PositionMap::Rope => Pieces::new(vec![Piece::ROPE], Region::Single),
            PositionMap::Interpolated { factor } => rerope::interpolated_pieces(factor),
            PositionMap::ReRope { window } => rerope::rerope_pieces(window),
            PositionMap::LeakyReRope { window, leak } => rerope::leaky_pieces(window, leak),
            PositionMap::SelfExtend { group, window, .. } => self_extend::pieces(group, window),
            PositionMap::DualChunk {
                chunk_size,
                local_window,
            } => dca::pieces(chunk_size, local_window),
            PositionMap::Streaming { sinks, window } => streaming::pieces(sinks, window),
        }
    }

    /// `P(i, j)` for query position `i` and key position `j`, from the closed form.
    /// NaN where the map does not define the entry: keys after the query for causal-only
    /// maps, StreamingLLM's hidden keys.
    pub fn position(&self, i: usize, j: usize) -> f64 {
        match *self {
            PositionMap::Rope => i as f64 - j as f64,
            PositionMap::Interpolated { factor } => (i as f64 - j as f64) / factor,
            PositionMap::ReRope { window } => rerope::rerope_position(window, i, j),
            PositionMap::LeakyReRope { window, leak } => rerope::leaky_position(window, leak, i, j),
            PositionMap::SelfExtend { group, window, .. } => {
                self_extend::position(group, window, i, j)
            }
            PositionMap::DualChunk {
                chunk_size,
                local_window,
            } => dca::position(chunk_size, local_window, i, j),
            PositionMap::Streaming { sinks, window } => streaming::position(sinks, window, i, j),
        }
    }

    /// Whether attention sees the entry `(i, j)` under this map (causality aside for
    /// two-sided maps): false for StreamingLLM's hidden keys and for keys after the query
    /// under causal-only maps.
    pub fn sees(&self, i: usize, j: usize) -> bool {
        match *self {
            PositionMap::SelfExtend { .. } | PositionMap::DualChunk { .. } => j <= i,
            PositionMap::Streaming { sinks, window } => j <= i && (i - j < window || j < sinks),
            _ => true,
        }
    }

    /// The factor multiplying the query at position `i` (Self-Extend's `scale_base`
    /// scaling; 1 for every other map).
    pub fn query_scale(&self, i: usize) -> f64 {
        match *self {
            PositionMap::SelfExtend {
                scale_base: Some(b),
                ..
            } => self_extend::query_scale(b, i),
            _ => 1.0,
        }
    }

    /// The explicit `n_q x n_k` matrix of `P(i, j)` for queries at positions
    /// `q_offset .. q_offset + n_q` and keys at `0 .. n_k` (chunked prefill: the queries
    /// are the last `n_q` tokens of an `n_k`-token sequence when `q_offset = n_k - n_q`).
    /// Entries above the causal diagonal are filled too for two-sided maps (the kernels
    /// mask them); entries a map does not define are NaN.
    ///
    /// Errors: positions past [`MAX_POSITION`], or a matrix that cannot be allocated.
    pub fn position_matrix(&self, n_q: usize, n_k: usize, q_offset: usize) -> Result<Array2<f64>> {
        let last_q = q_offset.checked_add(n_q.saturating_sub(1));
        if last_q.is_none_or(|p| p > MAX_POSITION) || n_k.saturating_sub(1) > MAX_POSITION {
            return Err(RopeError::invalid(
                "position_matrix positions",
                format!("queries {q_offset} + {n_q}, keys {n_k}"),
                format!("must stay <= {MAX_POSITION} (ropex::limits::MAX_POSITION)"),
            ));
        }
        let cells = n_q
            .checked_mul(n_k)
            .filter(|c| {
                c.checked_mul(std::mem::size_of::<f64>())
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| {
                RopeError::invalid(
                    "position_matrix size",
                    format!("{n_q} x {n_k}"),
                    "must fit in memory (n_q * n_k * 8 bytes <= isize::MAX)",
                )
            })?;
        let mut data = Vec::new();
        data.try_reserve_exact(cells).map_err(|_| {
            RopeError::invalid(
                "position_matrix size",
                format!("{n_q} x {n_k}"),
                "could not allocate the matrix",
            )
        })?;
        for a in 0..n_q {
            data.extend((0..n_k).map(|j| self.position(q_offset + a, j)));
        }
        Array2::from_shape_vec((n_q, n_k), data)
            .map_err(|e| RopeError::invalid("position_matrix shape", e, "internal"))
    }

    /// The largest `P(i, j)` over the visible causal pairs of a `len`-token sequence:
    /// what the model must have seen in training for this map to stay in range.
    pub fn max_position(&self, len: usize) -> f64 {
        if len == 0 {
            return 0.0;
        }
        match *self {
            // Non-decreasing in r for r >= 0 at fixed i, and increasing in i at j = 0.
            PositionMap::Rope
            | PositionMap::ReRope { .. }
            | PositionMap::LeakyReRope { .. }
            | PositionMap::Interpolated { .. } => self.position(len - 1, 0),
            PositionMap::SelfExtend { window, .. } => {
                self.position(len - 1, 0).max((len.min(window) - 1) as f64)
            }
            PositionMap::DualChunk {
                chunk_size,
                local_window,
            } => dca::max_position(chunk_size, local_window, len),
            PositionMap::Streaming { sinks, window } => streaming::max_position(sinks, window, len),
        }
    }
}

#[cfg(test)]
mod tests;
