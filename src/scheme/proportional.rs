//! Proportional RoPE (transformers `proportional`, Gemma 4): the first
//! `floor(partial_rotary_factor * D / 2)` pairs get `base^(-2j/D) / s` with `D` the full
//! head dim, the remaining pairs frequency 0 (an identity rotation). Unlike partial
//! rotary, the non-rotating pairs are spread across both halves of a [`crate::Layout::Half`]
//! head.

use super::{Checks, Dims, RopeType, Scheme};
use crate::error::{Result, RopeError};

/// [`crate::Scaling::Proportional`].
pub(super) struct Proportional {
    pub(super) factor: f64,
    pub(super) partial_rotary_factor: f64,
}

impl Scheme for Proportional {
    fn rope_type(&self) -> RopeType {
        RopeType::Proportional
    }

    fn validate(&self, _pairs: usize, _exponent_dim: usize, checks: Checks) -> Result<()> {
        checks.factor("proportional.factor", self.factor)?;
        let f = self.partial_rotary_factor;
        if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
            return Err(RopeError::invalid(
                "proportional.partial_rotary_factor",
                f,
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }

    fn inv_freq(&self, dims: &Dims, _seq_len: Option<usize>) -> Vec<f64> {
        let d = dims.exponent_dim;
        let rotating = ((self.partial_rotary_factor * d as f64) / 2.0).floor() as usize;
        dims.theta()
            .iter()
            .enumerate()
            .map(|(j, t)| {
                if j < rotating.min(dims.pairs) {
                    t / self.factor
                } else {
                    0.0
                }
            })
            .collect()
    }
}
