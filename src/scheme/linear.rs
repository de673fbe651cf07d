//! Position interpolation (Chen et al. 2023, "Extending Context Window of Large Language
//! Models via Positional Interpolation"; transformers `linear`): every frequency divided
//! by the extension factor, `inv_j = theta_j / s`, so position `p` is read as `p / s`.

use super::{Checks, Dims, RopeType, Scheme};
use crate::error::Result;

/// [`crate::Scaling::Linear`].
pub(super) struct Linear {
    pub(super) factor: f64,
}

impl Scheme for Linear {
    fn rope_type(&self) -> RopeType {
        RopeType::Linear
    }

    fn validate(&self, _pairs: usize, _exponent_dim: usize, checks: Checks) -> Result<()> {
        checks.factor("linear.factor", self.factor).map(|_| ())
    }

    fn inv_freq(&self, dims: &Dims, _seq_len: Option<usize>) -> Vec<f64> {
        dims.theta().iter().map(|t| t / self.factor).collect()
    }
}
