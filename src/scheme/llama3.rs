//! Llama 3.1's wavelength-banded interpolation (Meta, "The Llama 3 Herd of Models", 2024;
//! transformers `llama3`).
//!
//! With wavelength `lam_j = 2 pi / theta_j`: `lam > L0/low` uses `theta_j / s` (a pair
//! slower than the training window is interpolated), `lam < L0/high` keeps `theta_j`,
//! and in between, with `t = (L0/lam - low)/(high - low)`,
//! `inv_j = (1 - t) theta_j / s + t theta_j`. The two tests are applied in that order, as
//! transformers does, which only matters when `high <= low`.

use std::f64::consts::PI;

use super::{Checks, Dims, RopeType, Scheme, check_len};
use crate::error::{Result, RopeError, check_positive};

/// Llama 3.1 frequency bands (Meta's values: factor 8, low 1, high 4, L0 8192).
///
/// With wavelength `lam_j = 2 pi / theta_j`: `lam < L0/high` keeps `theta_j`;
/// `lam > L0/low` uses `theta_j / s`; in between, with
/// `t = (L0/lam - low)/(high - low)`, `inv_j = (1 - t) theta_j / s + t theta_j`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Llama3 {
    /// Extension factor `s >= 1`.
    pub factor: f64,
    /// `low_freq_factor` (Meta: 1).
    pub low_freq_factor: f64,
    /// `high_freq_factor` (Meta: 4).
    pub high_freq_factor: f64,
    /// `L0` (Meta: 8192).
    pub original_max_position_embeddings: usize,
}

impl Llama3 {
    /// Meta's Llama 3.1 values: factor 8, low 1, high 4, L0 8192.
    pub fn meta() -> Self {
        Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }
}

impl Scheme for Llama3 {
    fn rope_type(&self) -> RopeType {
        RopeType::Llama3
    }

    fn validate(&self, _pairs: usize, _exponent_dim: usize, checks: Checks) -> Result<()> {
        checks.factor("llama3.factor", self.factor)?;
        check_positive("llama3.low_freq_factor", self.low_freq_factor)?;
        check_positive("llama3.high_freq_factor", self.high_freq_factor)?;
        if checks == Checks::Strict && self.high_freq_factor <= self.low_freq_factor {
            return Err(RopeError::invalid(
                "llama3.high_freq_factor",
                self.high_freq_factor,
                format!("must be > low_freq_factor ({})", self.low_freq_factor),
            ));
        }
        check_len(
            "llama3.original_max_position_embeddings",
            self.original_max_position_embeddings,
        )
    }

    fn inv_freq(&self, dims: &Dims, _seq_len: Option<usize>) -> Vec<f64> {
        let l0 = self.original_max_position_embeddings as f64;
        let low_wavelen = l0 / self.low_freq_factor;
        let high_wavelen = l0 / self.high_freq_factor;
        let span = self.high_freq_factor - self.low_freq_factor;
        dims.theta()
            .iter()
            .map(|&t| {
                let lam = 2.0 * PI / t;
                if lam > low_wavelen {
                    t / self.factor
                } else if lam < high_wavelen {
                    t
                } else if span == 0.0 {
                    // Only reachable with high == low and lam exactly on the edge,
                    // where transformers divides by zero; keep the plain frequency.
                    t
                } else {
                    let s = (l0 / lam - self.low_freq_factor) / span;
                    (1.0 - s) * t / self.factor + s * t
                }
            })
            .collect()
    }

    fn scaled_len(&self) -> Option<(f64, usize)> {
        Some((self.factor, self.original_max_position_embeddings))
    }
}
