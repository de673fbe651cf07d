//! [`ModelError`]: why a checkpoint could not be loaded or a forward pass could not run.

use std::path::PathBuf;

/// Why a checkpoint could not be loaded or a forward pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or misses a field.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The weights do not match the configuration (missing tensor, wrong shape or dtype).
    #[error("checkpoint does not match its config: {0}")]
    Mismatch(String),
    /// The input is not something the model can run on.
    #[error("{0}")]
    Input(String),
    /// ropex rejected a parameter.
    #[error(transparent)]
    Rope(#[from] ropex::RopeError),
    /// A buffer sized by the input could not be allocated.
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// A buffer sized by the input (sequence length times a model width) could not be
/// allocated: the size overflows `usize` or the allocator refused it (`try_reserve_exact`,
/// so a long context fails with this error instead of aborting the process).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate {what}: {bytes} bytes requested")]
pub struct AllocError {
    /// Which buffer, with its shape.
    pub what: String,
    /// Bytes requested (may exceed `usize::MAX` when the size itself overflowed).
    pub bytes: u128,
}

/// A zero-filled `Vec<f32>` of `dims.iter().product()` elements, or [`AllocError`] naming
/// `what` and `dims`.
fn try_zeroed(what: &str, dims: &[usize]) -> std::result::Result<Vec<f32>, AllocError> {
    let bytes = dims
        .iter()
        .fold(std::mem::size_of::<f32>() as u128, |b, &d| {
            b.saturating_mul(d as u128)
        });
    let fail = || AllocError {
        what: format!("{what} {dims:?}"),
        bytes,
    };
    let n = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(fail)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| fail())?;
    v.resize(n, 0.0);
    Ok(v)
}

/// `Array2::zeros(shape)` that returns [`AllocError`] instead of aborting.
pub fn zeros2(
    what: &str,
    shape: (usize, usize),
) -> std::result::Result<ndarray::Array2<f32>, AllocError> {
    let v = try_zeroed(what, &[shape.0, shape.1])?;
    // The length is the product of the shape by construction.
    Ok(ndarray::Array2::from_shape_vec(shape, v).unwrap_or_default())
}

/// `Array3::zeros(shape)` that returns [`AllocError`] instead of aborting.
pub fn zeros3(
    what: &str,
    shape: (usize, usize, usize),
) -> std::result::Result<ndarray::Array3<f32>, AllocError> {
    let v = try_zeroed(what, &[shape.0, shape.1, shape.2])?;
    Ok(ndarray::Array3::from_shape_vec(shape, v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes whose size overflows or that no allocator grants are errors naming the
    /// buffer and the bytes; a small one is zero-filled with the asked shape.
    #[test]
    fn zeros_report_impossible_sizes() {
        let e = zeros2("logits", (usize::MAX, 2)).unwrap_err();
        assert!(e.what.starts_with("logits"), "{e}");
        assert_eq!(e.bytes, (usize::MAX as u128) * 8);
        assert!(zeros3("kv", (1 << 40, 1 << 20, 4)).is_err());
        let z = zeros3("ok", (2, 3, 4)).unwrap();
        assert_eq!(z.dim(), (2, 3, 4));
        assert!(z.iter().all(|&v| v == 0.0));
    }
}
