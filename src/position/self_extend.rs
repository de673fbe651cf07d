//! Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window
//! Without Tuning"), with the semantics of the authors' code (`group_size_1` = G,
//! `group_size_2` = W; defaults G = 8, W = 1024).
//!
//! With `r = i - j`, group size `G` and neighbour window `W`:
//! - neighbour piece, `r < W` (strict): `f(i) = i`, `g(j) = j`, so `P = r`;
//! - grouped piece, `r >= W`: `f(i) = floor(i/G) + W - floor(W/G)`, `g(j) = floor(j/G)`.
//!
//! The integer shift `W - floor(W/G)` is that of the authors' current code (older paths
//! use the float `W - W/G`; the two agree when `G` divides `W`). It makes the grouped
//! position continue the neighbour positions at the band edge. `G = 1` or `W >= n` is
//! plain RoPE.
//!
//! Optional query scaling with `scale_base > 1`: `q_i *= max(1, ln(i + 1) / ln(scale_base))`
//! (applied to every piece's query, so it multiplies the logits of row `i`).
//!
//! llama.cpp's `--grp-attn-n/--grp-attn-w` is a different, batch-dependent scheme (it
//! divides the stored positions of whole W-aligned cache blocks, and the neighbour set is
//! the current aligned block rather than the last `W` keys); it is not this map.
//!
//! The map is defined for causal attention (`j <= i`).

use super::pieces::{Piece, PositionFn};
use super::region::{Pieces, Region};
use crate::error::{Result, RopeError};

pub(super) fn check(group: usize, window: usize, scale_base: Option<f64>) -> Result<()> {
    if group == 0 {
        return Err(RopeError::invalid(
            "Self-Extend group size (G)",
            0,
            "must be >= 1 (G = 1 is plain RoPE; LongLM uses 8)",
        ));
    }
    if window == 0 {
        return Err(RopeError::invalid(
            "Self-Extend neighbour window (W)",
            0,
            "must be >= 1 (LongLM uses 1024)",
        ));
    }
    if let Some(b) = scale_base
        && !(b.is_finite() && b > 1.0)
    {
        return Err(RopeError::invalid(
            "Self-Extend scale_base",
            b,
            "must be a finite number > 1 (queries are scaled by ln(i + 1) / ln(scale_base))",
        ));
    }
    Ok(())
}

/// The grouped query shift `W - floor(W/G)`.
fn shift(group: usize, window: usize) -> usize {
    window - window / group.max(1)
}

/// (Parameters are assumed validated; invalid ones give a meaningless map, never a
/// panic.)
pub(super) fn pieces(group: usize, window: usize) -> Pieces {
    let group = group.max(1);
    let grouped = Piece {
        query: PositionFn::Grouped {
            group,
            shift: shift(group, window),
        },
        key: PositionFn::Grouped { group, shift: 0 },
    };
    Pieces::new(vec![Piece::ROPE, grouped], Region::Band { window })
}

/// The closed form (NaN for `j > i`).
pub(super) fn position(group: usize, window: usize, i: usize, j: usize) -> f64 {
    if j > i {
        f64::NAN
    } else if i - j < window {
        (i - j) as f64
    } else {
        let g = group.max(1);
        (i / g).saturating_add(shift(g, window)) as f64 - (j / g) as f64
    }
}

/// The query factor `max(1, ln(i + 1) / ln(scale_base))`.
pub(super) fn query_scale(scale_base: f64, i: usize) -> f64 {
    ((i as f64 + 1.0).ln() / scale_base.ln()).max(1.0)
}
