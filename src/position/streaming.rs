//! StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
//! Sinks"): keep the first `S` tokens (the sinks; the paper uses 4) and the last `W`;
//! every other key is invisible.
//!
//! Positions are assigned by place in the cache, not in the text. With the cache laid
//! out as sinks then window and `r = i - j`:
//! - window piece, `0 <= r < W`: plain RoPE, `f(i) = i`, `g(j) = j`;
//! - sink piece, `j < S` outside the window: the query sits at cache position
//!   `S + W - 1` once the cache is full, so `f(i) = min(i, S + W - 1)`, `g(j) = j`;
//! - every other key is hidden.
//!
//! While `i <= S + W - 1` (the cache is not full) every key is visible at its plain
//! position, so `S + W >= n` is plain RoPE. Both pieces rotate keys by `j`: a decoding
//! cache stores each key once and evicts the hidden middle, so its memory stays bounded
//! by `S + W` keys. The map is defined for causal attention (`j <= i`).

use super::pieces::{Piece, PositionFn};
use super::region::{Pieces, Region};
use crate::error::{Result, RopeError};

pub(super) fn check(sinks: usize, window: usize) -> Result<()> {
    if window == 0 {
        return Err(RopeError::invalid(
            "StreamingLLM window (W)",
            0,
            "must be >= 1 (the window holds the current token; S + W >= 1)",
        ));
    }
    if sinks.checked_add(window).is_none() {
        return Err(RopeError::invalid(
            "StreamingLLM sinks + window",
            format!("{sinks} + {window}"),
            "must fit usize",
        ));
    }
    Ok(())
}

/// The sink piece's query position cap `S + W - 1`.
fn full(sinks: usize, window: usize) -> usize {
    sinks.saturating_add(window).saturating_sub(1)
}

pub(super) fn pieces(sinks: usize, window: usize) -> Pieces {
    let sink = Piece {
        query: PositionFn::Capped {
            cap: full(sinks, window),
        },
        key: PositionFn::IDENTITY,
    };
    Pieces::new(
        vec![Piece::ROPE, sink],
        Region::SinksWindow { sinks, window },
    )
}

/// The closed form (NaN for hidden entries and `j > i`).
pub(super) fn position(sinks: usize, window: usize, i: usize, j: usize) -> f64 {
    if j > i {
        f64::NAN
    } else if i - j < window {
        (i - j) as f64
    } else if j < sinks {
        (i.min(full(sinks, window)) - j) as f64
    } else {
        f64::NAN
    }
}

/// The largest visible position over `len` tokens: `min(len, S + W) - 1`.
pub(super) fn max_position(sinks: usize, window: usize, len: usize) -> f64 {
    ((len - 1).min(full(sinks, window))) as f64
}
