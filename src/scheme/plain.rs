//! Plain RoPE (transformers `default`): `theta_j = base^(-2j/d)`.
//!
//! Every other scheme starts from these frequencies (or from this formula at a changed
//! base), so the one formula lives here.

use super::{Checks, Dims, RopeType, Scheme};
use crate::error::Result;

/// `theta_j = base^(-2j/d)` in f64 for `j = 0..pairs`, for a base that may be rescaled.
/// `d` is the exponent dim (the rotary dim, or transformers' odd partial dim).
pub(crate) fn theta(base: f64, pairs: usize, d: usize) -> Vec<f64> {
    (0..pairs)
        .map(|j| base.powf(-(2.0 * j as f64) / d as f64))
        .collect()
}

/// [`crate::Scaling::None`].
pub(super) struct Plain;

impl Scheme for Plain {
    fn rope_type(&self) -> RopeType {
        RopeType::Default
    }

    fn validate(&self, _pairs: usize, _exponent_dim: usize, _checks: Checks) -> Result<()> {
        Ok(())
    }

    fn inv_freq(&self, dims: &Dims, _seq_len: Option<usize>) -> Vec<f64> {
        dims.theta()
    }
}
