//! Dynamic NTK (emozilla 2023; transformers `dynamic`): NTK-aware scaling with a base that
//! grows with the current sequence length `L`,
//! `base' = base * (s L / L0 - (s - 1))^(d/(d-2))`, with `L` clamped to `>= L0`. Up to
//! `L0` the frequencies are plain, which is this scheme's length threshold.

use super::plain::theta;
use super::{Checks, Dims, RopeType, Scheme, check_len, ntk};
use crate::error::Result;

/// [`crate::Scaling::Dynamic`].
pub(super) struct Dynamic {
    pub(super) factor: f64,
    pub(super) original_max_position_embeddings: usize,
}

impl Scheme for Dynamic {
    fn rope_type(&self) -> RopeType {
        RopeType::Dynamic
    }

    fn validate(&self, _pairs: usize, _exponent_dim: usize, checks: Checks) -> Result<()> {
        checks.factor("dynamic.factor", self.factor)?;
        check_len(
            "dynamic.original_max_position_embeddings",
            self.original_max_position_embeddings,
        )
    }

    fn inv_freq(&self, dims: &Dims, seq_len: Option<usize>) -> Vec<f64> {
        let d = dims.exponent_dim;
        let l0 = self.original_max_position_embeddings as f64;
        let len = seq_len.map_or(l0, |n| (n as f64).max(l0));
        // `s L / L0 - (s - 1)` written as `1 + s (L / L0 - 1)`: the same number, without
        // the cancellation that turns a huge `s` into a zero base at `L = L0`.
        let bracket = 1.0 + self.factor * (len / l0 - 1.0);
        let scaled = dims.base * bracket.powf(ntk::exponent(d));
        theta(scaled, dims.pairs, d)
    }

    fn length_threshold(&self) -> Option<usize> {
        Some(self.original_max_position_embeddings)
    }
}
