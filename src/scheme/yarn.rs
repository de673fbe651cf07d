//! YaRN (Peng, Quesnelle, Fan, Shippole 2023, "YaRN: Efficient Context Window Extension of
//! Large Language Models"; transformers `yarn`).
//!
//! Everything YaRN computes lives here: the correction range, the ramp across it, the
//! attention factor, and the length threshold (none: YaRN's frequencies do not depend on
//! the sequence length, transformers computes them once at model init).
//!
//! With `corr(r) = d ln(L0 / (2 pi r)) / (2 ln base)` (the pair that completes `r` turns
//! over `L0` tokens), `low = corr(beta_fast)` and `high = corr(beta_slow)`, floored and
//! ceiled when `truncate`, clamped to `[0, d - 1]`, and `high += 0.001` if the two meet:
//! `ramp_j = clamp((j - low) / (high - low), 0, 1)` and
//! `inv_j = ramp_j theta_j / s + (1 - ramp_j) theta_j`. Pairs below `low` (many turns)
//! are left alone, pairs above `high` (less than `beta_slow` turns) are interpolated.

use super::{Checks, Dims, RopeType, Scheme, check_len};
use crate::error::{Result, RopeError, check_finite, check_positive};

/// YaRN parameters (Peng et al. 2023, "YaRN: Efficient Context Window Extension").
///
/// With `corr(r) = d ln(L0 / (2 pi r)) / (2 ln base)`, `low = corr(beta_fast)` and
/// `high = corr(beta_slow)` (floored/ceiled when `truncate`, clamped to `[0, d-1]`,
/// `high += 0.001` if equal), `ramp_j = clamp((j - low)/(high - low), 0, 1)` and
/// `inv_j = ramp_j theta_j / s + (1 - ramp_j) theta_j`.
///
/// The attention factor multiplies cos and sin (logits scale by its square):
/// an explicit `attention_factor` wins (1.0 included); otherwise, when `mscale` and
/// `mscale_all_dim` are both given and non-zero, `m(s, mscale) / m(s, mscale_all_dim)`;
/// otherwise `m(s, 1)`, with `m(s, x) = 0.1 x ln s + 1` (1 when `s <= 1`).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Yarn {
    /// Extension factor `s >= 1`.
    pub factor: f64,
    /// `L0`, the pretraining context length.
    pub original_max_position_embeddings: usize,
    /// Turns above which a pair is left alone (default 32).
    pub beta_fast: f64,
    /// Turns below which a pair is fully interpolated (default 1).
    pub beta_slow: f64,
    /// Explicit attention factor; wins over everything else.
    pub attention_factor: Option<f64>,
    /// DeepSeek's `mscale`.
    pub mscale: Option<f64>,
    /// DeepSeek's `mscale_all_dim`.
    pub mscale_all_dim: Option<f64>,
    /// Floor/ceil the correction range (default true; gpt-oss sets false).
    pub truncate: bool,
}

impl Yarn {
    /// YaRN with transformers' defaults: `beta_fast = 32`, `beta_slow = 1`,
    /// `truncate = true`, attention factor from `factor`.
    pub fn new(factor: f64, original_max_position_embeddings: usize) -> Self {
        Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        }
    }

    /// Sets `beta_fast` and `beta_slow`.
    pub fn with_betas(mut self, beta_fast: f64, beta_slow: f64) -> Self {
        self.beta_fast = beta_fast;
        self.beta_slow = beta_slow;
        self
    }

    /// Sets an explicit attention factor.
    pub fn with_attention_factor(mut self, attention_factor: f64) -> Self {
        self.attention_factor = Some(attention_factor);
        self
    }

    /// Sets DeepSeek's `mscale` and `mscale_all_dim`.
    pub fn with_mscale(mut self, mscale: f64, mscale_all_dim: f64) -> Self {
        self.mscale = Some(mscale);
        self.mscale_all_dim = Some(mscale_all_dim);
        self
    }

    /// Sets `truncate`.
    pub fn with_truncate(mut self, truncate: bool) -> Self {
        self.truncate = truncate;
        self
    }

    /// The attention factor this configuration implies.
    pub fn resolved_attention_factor(&self) -> f64 {
        fn m(s: f64, x: f64) -> f64 {
            if s <= 1.0 {
                1.0
            } else {
                0.1 * x * s.ln() + 1.0
            }
        }
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(ms), Some(ma)) if ms != 0.0 && ma != 0.0 => {
                m(self.factor, ms) / m(self.factor, ma)
            }
            _ => m(self.factor, 1.0),
        }
    }

    /// The correction range `(low, high)` in pair units for rotary dim `d` and `base`.
    pub fn correction_range(&self, d: usize, base: f64) -> (f64, f64) {
        let corr = |turns: f64| {
            d as f64
                * (self.original_max_position_embeddings as f64
                    / (turns * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (corr(self.beta_fast), corr(self.beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        (low.max(0.0), high.min(d as f64 - 1.0))
    }
}

impl Scheme for Yarn {
    fn rope_type(&self) -> RopeType {
        RopeType::Yarn
    }

    fn validate(&self, _pairs: usize, exponent_dim: usize, checks: Checks) -> Result<()> {
        checks.factor("yarn.factor", self.factor)?;
        check_len(
            "yarn.original_max_position_embeddings",
            self.original_max_position_embeddings,
        )?;
        check_positive("yarn.beta_fast", self.beta_fast)?;
        check_positive("yarn.beta_slow", self.beta_slow)?;
        if checks == Checks::Strict && self.beta_fast < self.beta_slow {
            return Err(RopeError::invalid(
                "yarn.beta_fast",
                self.beta_fast,
                format!("must be >= beta_slow ({})", self.beta_slow),
            ));
        }
        if let Some(a) = self.attention_factor {
            check_positive("yarn.attention_factor", a)?;
        }
        if let Some(m) = self.mscale {
            check_finite("yarn.mscale", m)?;
        }
        if let Some(m) = self.mscale_all_dim {
            check_finite("yarn.mscale_all_dim", m)?;
        }
        let a = self.resolved_attention_factor();
        if !(a.is_finite() && a > 0.0) {
            return Err(RopeError::invalid(
                "yarn attention factor (from mscale / mscale_all_dim)",
                a,
                "must come out finite and > 0",
            ));
        }
        // The ramp has `floor(d/2)` entries in transformers, so an odd exponent dim fails
        // there with a shape mismatch.
        if exponent_dim % 2 == 1 {
            return Err(RopeError::invalid(
                "partial_rotary_factor",
                format!("a rotary dim of {exponent_dim}"),
                "YaRN needs an even rotary dim (transformers fails with a shape mismatch on an odd one)",
            ));
        }
        Ok(())
    }

    fn inv_freq(&self, dims: &Dims, _seq_len: Option<usize>) -> Vec<f64> {
        let (low, mut high) = self.correction_range(dims.exponent_dim, dims.base);
        if low == high {
            high += 0.001;
        }
        dims.theta()
            .iter()
            .enumerate()
            .map(|(j, &t)| {
                let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                ramp * (t / self.factor) + (1.0 - ramp) * t
            })
            .collect()
    }

    fn attention_factor(&self) -> f64 {
        self.resolved_attention_factor()
    }

    fn scaled_len(&self) -> Option<(f64, usize)> {
        Some((self.factor, self.original_max_position_embeddings))
    }
}
