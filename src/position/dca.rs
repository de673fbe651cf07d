//! Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large
//! Language Models"; ChunkLlama; vLLM's `dual_chunk_attention_config`), parameters
//! `chunk_size` and `local_window`.
//!
//! The block length is `c = chunk_size - local_window` and token `t` lies in chunk
//! `floor(t / c)`. Every key is rotated by its in-chunk position `g(j) = j mod c`; the
//! query position depends on how far the key's chunk is:
//! - intra-chunk (same chunk): `f(i) = i mod c` (so `P = i - j`);
//! - successive chunk (`chunk(i) = chunk(j) + 1`): `f(i) = min(i mod c + c, chunk_size)`;
//! - inter-chunk (`chunk(i) >= chunk(j) + 2`): `f(i) = min(2c - 1, chunk_size)`.
//!
//! One softmax runs over all three regions (the official code merges per-region partial
//! softmaxes by log-sum-exp, which is the same thing). `c >= n` (one chunk) is plain
//! RoPE. The map is defined for causal attention (`j <= i`).
//!
//! The published length-dependent logit scale (ChunkLlama multiplies the cos/sin tables
//! of queries and keys by `0.05 ln(n/L) + 1` for `n > L`, so every logit by its square)
//! depends on the number of keys, not on positions, so it is an attention option rather
//! than part of the map: [`crate::attention::Attention::with_dca_logit_scale`] (and the
//! same on the caches). vLLM's variant `max(0.1 ln(n/L) + 1, 1)` is not built in.

use super::pieces::{Affine, Piece, PositionFn};
use super::region::{Pieces, Region};
use crate::error::{Result, RopeError};

pub(super) fn check(chunk_size: usize, local_window: usize) -> Result<()> {
    if chunk_size == 0 {
        return Err(RopeError::invalid(
            "DCA chunk_size",
            0,
            "must be >= 1 (ChunkLlama: 3/4 of the training length)",
        ));
    }
    if local_window >= chunk_size {
        return Err(RopeError::invalid(
            "DCA local_window",
            local_window,
            format!("must be < chunk_size = {chunk_size} (ChunkLlama: 1/8 of the training length)"),
        ));
    }
    Ok(())
}

pub(super) fn pieces(chunk_size: usize, local_window: usize) -> Pieces {
    let c = block(chunk_size, local_window);
    let key = PositionFn::modulo(c);
    let intra = Piece {
        query: PositionFn::modulo(c),
        key,
    };
    let successive = Piece {
        query: PositionFn::Chunked {
            period: c,
            add: c,
            cap: chunk_size,
        },
        key,
    };
    let inter = Piece {
        query: Affine::constant(inter_query(c, chunk_size) as f64).into(),
        key,
    };
    Pieces::new(
        vec![intra, successive, inter],
        Region::ChunkDistance { period: c },
    )
}

/// The block length `c = chunk_size - local_window` (at least 1, so that a map built
/// from invalid public fields never divides by zero).
fn block(chunk_size: usize, local_window: usize) -> usize {
    chunk_size.saturating_sub(local_window).max(1)
}

/// `min(2c - 1, chunk_size)`.
fn inter_query(c: usize, chunk_size: usize) -> usize {
    c.saturating_mul(2).saturating_sub(1).min(chunk_size)
}

/// The closed form (NaN for `j > i`).
pub(super) fn position(chunk_size: usize, local_window: usize, i: usize, j: usize) -> f64 {
    let c = block(chunk_size, local_window);
    if j > i {
        return f64::NAN;
    }
    let query = match i / c - j / c {
        0 => i % c,
        1 => (i % c).saturating_add(c).min(chunk_size),
        _ => inter_query(c, chunk_size),
    };
    query as f64 - (j % c) as f64
}

/// The largest position over causal pairs of `len` tokens:
/// `min(len - 1, chunk_size, 2c - 1)` (the successive and inter-chunk pieces reach
/// `min(2c - 1, chunk_size)` at `j mod c = 0`).
pub(super) fn max_position(chunk_size: usize, local_window: usize, len: usize) -> f64 {
    let c = block(chunk_size, local_window);
    (len - 1).min(inter_query(c, chunk_size)) as f64
}
