//! [`RopeError`]: every way user input to ropex can be wrong.
//!
//! Each variant names the offending field or tensor, the value that was passed and
//! what would have been accepted, so the message alone tells a user how to fix it.

use thiserror::Error;

/// Result alias used throughout ropex.
pub type Result<T> = std::result::Result<T, RopeError>;

/// An error from a ropex constructor, config reader or kernel.
///
/// The public API never panics on user input; it returns one of these instead.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum RopeError {
    /// A numeric or structural parameter is outside its allowed range.
    #[error("invalid {field} = {value}: {allowed}")]
    InvalidParameter {
        /// The parameter name, as the user wrote it (e.g. `rope_scaling.factor`).
        field: String,
        /// The value that was passed, formatted.
        value: String,
        /// What would have been accepted.
        allowed: String,
    },

    /// A tensor or list does not have the shape or length the operation needs.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which tensor or list.
        what: String,
        /// The shape or length that was needed.
        expected: String,
        /// The shape or length that was passed.
        got: String,
    },

    /// A position (or table row) was asked for that the rotary table does not hold.
    #[error(
        "position index {index} is outside the rotary table, which holds {len} positions; build the table for at least {needed} positions"
    )]
    PositionOutOfTable {
        /// The row that was asked for.
        index: usize,
        /// How many rows the table has.
        len: usize,
        /// The smallest table length that would serve the request.
        needed: usize,
    },

    /// A `rope_type` (or legacy `type`) that neither transformers nor ropex knows.
    #[error("unknown rope type '{name}'; known types: {known}")]
    UnknownRopeType {
        /// The name found in the config.
        name: String,
        /// The names ropex accepts.
        known: String,
    },

    /// A required key is missing from a model config.
    #[error("missing key '{key}' in {context}")]
    MissingKey {
        /// The key.
        key: String,
        /// Where it was expected (e.g. `rope_scaling for rope_type 'yarn'`).
        context: String,
    },

    /// A model config could not be read or parsed.
    #[error("config error: {0}")]
    Config(String),

    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },

    /// A buffer sized by the input could not be allocated: the allocator refused it, or
    /// its size does not even fit in the address space.
    #[error("cannot allocate {what}: {bytes} bytes requested")]
    Allocation {
        /// Which buffer, with the sizes it was asked for (e.g. `rotary table cos (1000000000
        /// rows x 64 pairs)`).
        what: String,
        /// Bytes requested (may exceed `usize::MAX` when the size itself overflowed).
        bytes: u128,
    },

    /// A GGUF file is not well formed: bad magic, truncated, a count or size that does
    /// not fit the file, an unknown value or tensor type.
    #[error("GGUF format error at byte {offset}: {message}")]
    GgufFormat {
        /// Byte offset in the file where the problem was found.
        offset: u64,
        /// What is wrong and what was expected.
        message: String,
    },

    /// A well-formed GGUF file uses something ropex does not implement (a file version,
    /// a rope convention, a tensor type to dequantise).
    #[error("unsupported GGUF {what}: {allowed}")]
    GgufUnsupported {
        /// What the file has.
        what: String,
        /// What ropex supports instead.
        allowed: String,
    },

    /// A paged KV cache's block pool has too few free blocks for an append or a
    /// copy-on-write.
    #[error(
        "KV block pool exhausted: {needed} free blocks needed, {free} of {capacity} free; free or truncate sequences, or build a larger pool"
    )]
    PoolExhausted {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks free now.
        free: usize,
        /// Blocks in the pool.
        capacity: usize,
    },

    /// A block table names a block that is not a live block of this pool.
    #[error("bad KV block {block}: {reason}")]
    BadBlock {
        /// The block, formatted.
        block: String,
        /// Why it cannot be used (freed, another pool's, out of range) and what is allowed.
        reason: String,
    },

    /// A sequence id that is not a live sequence of this paged cache.
    #[error("unknown sequence {id}: {reason}")]
    UnknownSequence {
        /// The id.
        id: usize,
        /// Why (never created, or freed).
        reason: String,
    },
}

impl RopeError {
    /// Shorthand for [`RopeError::InvalidParameter`].
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        RopeError::InvalidParameter {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }

    /// Shorthand for [`RopeError::ShapeMismatch`].
    pub fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        RopeError::ShapeMismatch {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

/// Checks that `value` is finite.
pub(crate) fn check_finite(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(RopeError::invalid(field, value, "must be a finite number"))
    }
}

/// Checks that `value` is finite and strictly positive.
pub(crate) fn check_positive(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(RopeError::invalid(
            field,
            value,
            "must be a finite number > 0",
        ))
    }
}

/// Checks that a scaling factor is finite and at least 1.
pub(crate) fn check_factor(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() && value >= 1.0 {
        Ok(value)
    } else {
        Err(RopeError::invalid(
            field,
            value,
            "must be a finite number >= 1 (a context-extension factor)",
        ))
    }
}

/// An empty `Vec` with room for `rows * cols` elements of `T`, or
/// [`RopeError::Allocation`] naming `what` and the bytes when the product overflows or the
/// allocator refuses (`try_reserve_exact`: no abort, whatever the size).
pub(crate) fn try_vec<T>(what: &str, rows: usize, cols: usize) -> Result<Vec<T>> {
    let bytes = (rows as u128)
        .saturating_mul(cols as u128)
        .saturating_mul(std::mem::size_of::<T>() as u128);
    let fail = || RopeError::Allocation {
        what: format!("{what} ({rows} x {cols})"),
        bytes,
    };
    let n = rows.checked_mul(cols).ok_or_else(fail)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| fail())?;
    Ok(v)
}

/// [`try_vec`] in the memory of `spare` (taken, cleared and grown fallibly): an empty
/// vector with capacity for `rows * cols` values, allocating only when `spare` is
/// smaller.
pub(crate) fn reuse_vec<T>(
    spare: &mut Vec<T>,
    what: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<T>> {
    let mut v = std::mem::take(spare);
    v.clear();
    let n = rows.checked_mul(cols);
    if n.is_some_and(|n| n <= v.capacity()) {
        return Ok(v);
    }
    drop(v);
    try_vec(what, rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_vec_names_sizes_that_overflow_or_cannot_be_reserved() {
        let v = try_vec::<f32>("small", 3, 4).unwrap();
        assert!(v.is_empty() && v.capacity() >= 12);
        // The element count overflows usize: the bytes are still stated exactly.
        match try_vec::<f64>("huge", usize::MAX, 3) {
            Err(RopeError::Allocation { what, bytes }) => {
                assert_eq!(bytes, usize::MAX as u128 * 3 * 8);
                assert!(what.contains("huge") && what.contains(&usize::MAX.to_string()));
            }
            other => panic!("{other:?}"),
        }
        // Fits usize, but not any address space (more than 2^60 bytes).
        assert!(matches!(
            try_vec::<u64>("big", 1 << 30, 1 << 30),
            Err(RopeError::Allocation { bytes, .. }) if bytes == 1u128 << 63
        ));
    }
}
