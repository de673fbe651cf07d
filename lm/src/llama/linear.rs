//! Linear layers `y = x W^T` (`W` is `[out, in]`, GGUF/PyTorch row order) on
//! `matrixmultiply`'s sgemm (through [`ndarray::linalg::general_mat_mul`]), split over
//! rayon's threads.
//!
//! Why this GEMM: `matrixmultiply` is already in the build (ndarray's own f32 `dot`),
//! pure Rust, with AVX/FMA kernels chosen at run time, and it accepts strided views, so
//! each thread can write its block of the output in place. The split: row blocks of `x`
//! for a prefill (many tokens), column blocks of `W` for a decode step (one token), so
//! both cores work in both cases. Accumulation is f32 inside the sgemm kernel.
//!
//! A decode step (at most [`GEMV_ROWS`] tokens) skips the sgemm: `matrixmultiply`
//! packs both operands on every call, so a one-token product copied the whole weight
//! matrix before reading it again (540 MB of f32 weights per token for SmolLM2). There
//! each output is one dot product of a weight row with the token's row instead, the
//! weights read once, straight from memory ([`dot`]: 8 f32 partial sums). Measured on a
//! Zen 3 core (AMD EPYC family 25 model 1), one thread, SmolLM2-135M at 4096 tokens of
//! context: 8.2 decode tokens/s through the sgemm, 16.5 with this path.

use ndarray::{Array2, ArrayView2, Axis, linalg::general_mat_mul};
use rayon::prelude::*;

use crate::error::{AllocError, zeros2};

/// Tokens up to which [`linear`] takes the dot-product path (a decode step, or a few
/// speculative tokens) instead of the sgemm.
pub(crate) const GEMV_ROWS: usize = 4;

/// `x W^T`: `x` `[n, in]`, `w` `[out, in]`, returns `[n, out]` (allocated fallibly).
pub(crate) fn linear(x: ArrayView2<f32>, w: &Array2<f32>) -> Result<Array2<f32>, AllocError> {
    let (n, out_dim) = (x.nrows(), w.nrows());
    let mut out = zeros2("linear layer output", (n, out_dim))?;
    let threads = rayon::current_num_threads().max(1);
    if let (true, Some(wf)) = (n <= GEMV_ROWS, w.as_slice()) {
        let d = w.ncols();
        let rows: Vec<Vec<f32>> = x.rows().into_iter().map(|r| r.to_vec()).collect();
        let block = out_dim.div_ceil(threads).max(1);
        let jobs: Vec<_> = out
            .axis_chunks_iter_mut(Axis(1), block)
            .zip(wf.chunks(block * d.max(1)))
            .collect();
        jobs.into_par_iter().for_each(|(mut o, wb)| {
            for (j, wr) in wb.chunks_exact(d.max(1)).enumerate().take(o.ncols()) {
                for (t, xr) in rows.iter().enumerate() {
                    o[[t, j]] = dot(xr, wr);
                }
            }
        });
    } else if n >= 8 * threads {
        let block = n.div_ceil(threads);
        let jobs: Vec<_> = out
            .axis_chunks_iter_mut(Axis(0), block)
            .zip(x.axis_chunks_iter(Axis(0), block))
            .collect();
        jobs.into_par_iter()
            .for_each(|(mut o, xb)| general_mat_mul(1.0, &xb, &w.t(), 0.0, &mut o));
    } else {
        let block = out_dim.div_ceil(threads).max(1);
        let jobs: Vec<_> = out
            .axis_chunks_iter_mut(Axis(1), block)
            .zip(w.axis_chunks_iter(Axis(0), block))
            .collect();
        jobs.into_par_iter()
            .for_each(|(mut o, wb)| general_mat_mul(1.0, &x, &wb.t(), 0.0, &mut o));
    }
    Ok(out)
}

/// `a . b` over equal-length rows, in 8 f32 partial sums (a fixed order the compiler
/// vectorises) added pairwise at the end.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let quads = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (quads[0] + quads[2]) + (quads[1] + quads[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path (dot products for up to `GEMV_ROWS` tokens, then both sgemm splits)
    /// equals the naive triple loop (f64 accumulation), on head dims with and without a
    /// tail of the 8-wide dot.
    #[test]
    fn linear_matches_naive_product() {
        for width in [19, 32] {
            let w = Array2::from_shape_fn((37, width), |(o, i)| {
                ((o * 7 + i * 3) % 11) as f32 * 0.1 - 0.5
            });
            for n in [1, 3, GEMV_ROWS, GEMV_ROWS + 1, 100] {
                let x = Array2::from_shape_fn((n, width), |(t, i)| {
                    ((t * 5 + i) % 13) as f32 * 0.05 - 0.3
                });
                let y = linear(x.view(), &w).unwrap();
                for t in 0..n {
                    for o in 0..37 {
                        let r: f64 = (0..width)
                            .map(|i| x[[t, i]] as f64 * w[[o, i]] as f64)
                            .sum();
                        let err = (y[[t, o]] as f64 - r).abs();
                        assert!(err < 1e-5, "width={width} n={n} t={t} o={o}: {err}");
                    }
                }
            }
        }
    }
}
