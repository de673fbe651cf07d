//! [`Frequencies`]: `inv_freq` per rotary pair (f64) plus the attention factor, what a
//! scheme ([`crate::Scaling`]) hands to the rotation. The beta-base diagnostics that show
//! *why* a scheme extends context ([`Frequencies::explain`]) build on these values.

use std::f64::consts::PI;

use crate::error::{Result, RopeError};

/// Inverse frequencies (radians per position) for each rotary pair, and the attention
/// factor that multiplies cos and sin (so attention logits scale by its square).
///
/// With the `serde` feature it (de)serialises as `{"inv_freq": [...], "attention_factor": m}`;
/// deserialising validates as [`Frequencies::from_inv_freq`] does.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "FrequenciesData")
)]
pub struct Frequencies {
    inv_freq: Vec<f64>,
    attention_factor: f64,
}

/// The unvalidated form [`Frequencies`] deserialises through.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
struct FrequenciesData {
    inv_freq: Vec<f64>,
    attention_factor: f64,
}

#[cfg(feature = "serde")]
impl TryFrom<FrequenciesData> for Frequencies {
    type Error = RopeError;

    fn try_from(d: FrequenciesData) -> Result<Self> {
        Frequencies::from_inv_freq(d.inv_freq, d.attention_factor)
    }
}

impl Frequencies {
    /// Frequencies a validated scheme computed (finite and `>= 0` by construction).
    pub(crate) fn new(inv_freq: Vec<f64>, attention_factor: f64) -> Self {
        Frequencies {
            inv_freq,
            attention_factor,
        }
    }

    /// Frequencies from explicit values (e.g. read from a checkpoint).
    ///
    /// Every value must be finite and `>= 0` (0 is an identity pair), the list non-empty,
    /// and `attention_factor` finite and `> 0`.
    pub fn from_inv_freq(inv_freq: Vec<f64>, attention_factor: f64) -> Result<Self> {
        if inv_freq.is_empty() {
            return Err(RopeError::invalid(
                "inv_freq",
                "an empty list",
                "needs at least one rotary pair",
            ));
        }
        for (j, &f) in inv_freq.iter().enumerate() {
            if !(f.is_finite() && f >= 0.0) {
                return Err(RopeError::invalid(
                    format!("inv_freq[{j}]"),
                    f,
                    "must be finite and >= 0",
                ));
            }
        }
        crate::error::check_positive("attention_factor", attention_factor)?;
        Ok(Frequencies {
            inv_freq,
            attention_factor,
        })
    }

    /// `inv_freq_j`, one per rotary pair (`rotary_dim / 2` values).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// The factor applied to cos and sin (YaRN's mscale, LongRoPE's scaling); 1 for most
    /// schemes. Logits scale by its square.
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor
    }

    /// Number of rotary pairs, `rotary_dim / 2`.
    pub fn num_pairs(&self) -> usize {
        self.inv_freq.len()
    }

    /// The rotary dimension `d = 2 * num_pairs`.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Rotation angle of pair `j` at position `p`: `p * inv_freq_j`, in f64; an error for a
    /// pair past [`Frequencies::num_pairs`].
    pub fn angle(&self, position: f64, pair: usize) -> Result<f64> {
        match self.inv_freq.get(pair) {
            Some(w) => Ok(position * w),
            None => Err(RopeError::invalid(
                "pair",
                pair,
                format!("must be < num_pairs ({})", self.num_pairs()),
            )),
        }
    }

    /// Wavelength of each pair in tokens: `2 pi / inv_freq_j` (infinite for a zero pair).
    pub fn wavelengths(&self) -> Vec<f64> {
        self.inv_freq.iter().map(|&f| 2.0 * PI / f).collect()
    }

    /// Turns each pair completes over `len` positions: `len * inv_freq_j / (2 pi)`.
    pub fn turns(&self, len: f64) -> Vec<f64> {
        self.inv_freq
            .iter()
            .map(|&f| len * f / (2.0 * PI))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_inv_freq_rejects_bad_values() {
        assert!(Frequencies::from_inv_freq(vec![], 1.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![f64::NAN], 1.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![-1.0], 1.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![1.0], 0.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![1.0, 0.0], 1.0).is_ok());
    }

    #[test]
    fn angle_is_position_times_inv_freq_and_checks_the_pair() {
        let f = Frequencies::from_inv_freq(vec![1.0, 0.25], 1.0).unwrap();
        assert_eq!(f.angle(8.0, 1).unwrap(), 2.0);
        assert!(f.angle(8.0, 2).is_err());
        assert!(f.angle(8.0, usize::MAX).is_err());
    }
}
