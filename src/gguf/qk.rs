//! The Q/K row permutation llama.cpp's converter applies to Llama-family checkpoints.
//!
//! Hugging Face Llama rotates dims `(i, i + d/2)` of each head (`rotate_half`); ggml's
//! "normal" rope rotates `(2i, 2i + 1)`. So that the GGUF file can be rotated the ggml
//! way, the converter reorders the output rows of `q_proj` (with the query head count)
//! and `k_proj` (with the KV head count): within each head of `d` rows, row
//! `half * d/2 + i` of the Hugging Face weight becomes row `2i + half`.
//!
//! A model that reads a GGUF either rotates its Q/K with [`crate::Layout::Interleaved`],
//! or un-permutes the rows with [`unpermute_qk_rows`] and rotates with
//! [`crate::Layout::Half`]; both give the same attention. Mixing them up is the trap:
//! half-split rotation of permuted rows pairs the wrong dims and the model's loss
//! roughly doubles.

use crate::error::{Result, RopeError};

/// Undoes the converter's permutation: `rows` is a row-major matrix of `n_head * d`
/// rows of `row_len` values each (a GGUF `attn_q` / `attn_k` weight, whose ggml dims are
/// `[row_len, n_head * d]`), returned in Hugging Face row order.
pub fn unpermute_qk_rows<T: Copy>(rows: &[T], n_head: usize, row_len: usize) -> Result<Vec<T>> {
    reorder(rows, n_head, row_len, false)
}

/// The converter's permutation itself (Hugging Face row order to GGUF row order): the
/// inverse of [`unpermute_qk_rows`].
pub fn permute_qk_rows<T: Copy>(rows: &[T], n_head: usize, row_len: usize) -> Result<Vec<T>> {
    reorder(rows, n_head, row_len, true)
}

fn reorder<T: Copy>(rows: &[T], n_head: usize, row_len: usize, to_gguf: bool) -> Result<Vec<T>> {
    let n_rows = rows.len().checked_div(row_len).unwrap_or(0);
    if n_head == 0
        || row_len == 0
        || !rows.len().is_multiple_of(row_len)
        || !n_rows.is_multiple_of(2 * n_head)
    {
        return Err(RopeError::shape(
            "Q/K weight rows",
            format!("n_head ({n_head}) heads of an even number of rows of {row_len} values"),
            format!("{} values", rows.len()),
        ));
    }
    let d = n_rows / n_head;
    let mut out = Vec::new();
    out.try_reserve_exact(rows.len())
        .map_err(|_| RopeError::invalid("Q/K weight", rows.len(), "too large to copy"))?;
    for r in 0..n_rows {
        let (h, j) = (r / d, r % d);
        // Row j of a head in the output order reads row src of the same head.
        let src = if to_gguf {
            // GGUF row j = 2i + half holds HF row half * d/2 + i.
            (j % 2) * (d / 2) + j / 2
        } else {
            // HF row j = half * d/2 + i holds GGUF row 2i + half.
            2 * (j % (d / 2)) + j / (d / 2)
        };
        let start = (h * d + src) * row_len;
        out.extend_from_slice(&rows[start..start + row_len]);
    }
    Ok(out)
}
