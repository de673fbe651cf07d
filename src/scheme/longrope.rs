//! LongRoPE (Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million
//! Tokens") as Phi-3 uses it (transformers `longrope`): searched per-pair factors
//! `ext_j`, `inv_j = theta_j / ext_j`, with `long_factor` for a sequence longer than `L0`
//! and `short_factor` otherwise, so `L0` is this scheme's length threshold. Attention
//! factor `sqrt(1 + ln s / ln L0)` (1 when `s <= 1`) unless given.

use super::{Checks, Dims, RopeType, Scheme, check_divisor, check_len};
use crate::error::{Result, RopeError, check_positive};

/// LongRoPE (Ding et al. 2024) as used by Phi-3: per-pair factors `ext_j`,
/// `inv_j = theta_j / ext_j`, with `long_factor` when the sequence is longer than `L0`
/// and `short_factor` otherwise. Default attention factor
/// `sqrt(1 + ln s / ln L0)` (1 when `s <= 1`), `s = factor`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LongRope {
    /// Factors used up to `L0` tokens, one per rotary pair.
    pub short_factor: Vec<f64>,
    /// Factors used past `L0` tokens, one per rotary pair.
    pub long_factor: Vec<f64>,
    /// `L0`, the pretraining context length.
    pub original_max_position_embeddings: usize,
    /// The extension factor for the attention factor; transformers derives it as
    /// `max_position_embeddings / original_max_position_embeddings` when absent.
    pub factor: f64,
    /// Explicit attention factor; wins when given.
    pub attention_factor: Option<f64>,
}

impl LongRope {
    /// The attention factor this configuration implies.
    pub fn resolved_attention_factor(&self) -> f64 {
        match self.attention_factor {
            Some(a) => a,
            None if self.factor <= 1.0 => 1.0,
            None => (1.0 + self.factor.ln() / (self.original_max_position_embeddings as f64).ln())
                .sqrt(),
        }
    }
}

impl Scheme for LongRope {
    fn rope_type(&self) -> RopeType {
        RopeType::LongRope
    }

    fn validate(&self, pairs: usize, _exponent_dim: usize, _checks: Checks) -> Result<()> {
        for (name, list) in [
            ("longrope.short_factor", &self.short_factor),
            ("longrope.long_factor", &self.long_factor),
        ] {
            if list.len() != pairs {
                return Err(RopeError::invalid(
                    name,
                    format!("a list of {} values", list.len()),
                    format!("must have one value per rotary pair: rotary_dim / 2 = {pairs}"),
                ));
            }
            for (i, &v) in list.iter().enumerate() {
                check_divisor(&format!("{name}[{i}]"), v)?;
            }
        }
        check_len(
            "longrope.original_max_position_embeddings",
            self.original_max_position_embeddings,
        )?;
        check_positive("longrope.factor", self.factor)?;
        if let Some(a) = self.attention_factor {
            check_positive("longrope.attention_factor", a)?;
        }
        Ok(())
    }

    fn inv_freq(&self, dims: &Dims, seq_len: Option<usize>) -> Vec<f64> {
        let ext = match seq_len {
            Some(n) if n > self.original_max_position_embeddings => &self.long_factor,
            _ => &self.short_factor,
        };
        dims.theta().iter().zip(ext).map(|(t, e)| t / e).collect()
    }

    fn attention_factor(&self) -> f64 {
        self.resolved_attention_factor()
    }

    fn length_threshold(&self) -> Option<usize> {
        Some(self.original_max_position_embeddings)
    }

    fn scaled_len(&self) -> Option<(f64, usize)> {
        Some((self.factor, self.original_max_position_embeddings))
    }
}
