//! Linear layers `y = x W^T` (`W` is `[out, in]`, GGUF/PyTorch row order) on
//! `matrixmultiply`'s sgemm (through [`ndarray::linalg::general_mat_mul`]), split over
//! rayon's threads.
//!
//! Why this GEMM: `matrixmultiply` is already in the build (ndarray's own f32 `dot`),
//! pure Rust, with AVX/FMA kernels chosen at run time, and it accepts strided views, so
//! each thread can write its block of the output in place. The split: row blocks of `x`
//! for a prefill (many tokens), column blocks of `W` for a decode step (one token), so
//! both cores work in both cases. Accumulation is f32 inside the sgemm kernel.

use ndarray::{Array2, ArrayView2, Axis, linalg::general_mat_mul};
use rayon::prelude::*;

use crate::error::{AllocError, zeros2};

/// `x W^T`: `x` `[n, in]`, `w` `[out, in]`, returns `[n, out]` (allocated fallibly).
pub(crate) fn linear(x: ArrayView2<f32>, w: &Array2<f32>) -> Result<Array2<f32>, AllocError> {
    let (n, out_dim) = (x.nrows(), w.nrows());
    let mut out = zeros2("linear layer output", (n, out_dim))?;
    let threads = rayon::current_num_threads().max(1);
    if n >= 8 * threads {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both splits equal the naive triple loop (f64 accumulation).
    #[test]
    fn linear_matches_naive_product() {
        let w = Array2::from_shape_fn((37, 19), |(o, i)| ((o * 7 + i * 3) % 11) as f32 * 0.1 - 0.5);
        for n in [1, 3, 100] {
            let x = Array2::from_shape_fn((n, 19), |(t, i)| ((t * 5 + i) % 13) as f32 * 0.05 - 0.3);
            let y = linear(x.view(), &w).unwrap();
            for t in 0..n {
                for o in 0..37 {
                    let r: f64 = (0..19).map(|i| x[[t, i]] as f64 * w[[o, i]] as f64).sum();
                    assert!((y[[t, o]] as f64 - r).abs() < 1e-5, "n={n} t={t} o={o}");
                }
            }
        }
    }
}
