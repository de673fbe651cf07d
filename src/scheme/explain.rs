//! The beta-base diagnostics: what a scheme did to each pair, and why.
//!
//! Su's "Transformer upgrade road" post 10 reads RoPE as a base-`beta` number system,
//! `beta = base^(2/d)`: pair `j` turns at `inv_freq_j = beta^(-j)` radians per token, so
//! position `p` has "digit" `p / beta^j` in pair `j` ([`digits`]). A pair whose digit
//! never completed a turn during training (`turns_j = L_train inv_freq_j / 2 pi < 1`,
//! [`Frequencies::turns`]) only ever saw a fraction of its circle: reading further than
//! `L_train` shows it angles it never saw, so it must be interpolated. Pairs with many
//! turns saw every angle and can extrapolate. [`Frequencies::explain`] reports this per
//! pair.

use std::f64::consts::PI;

use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;

impl Frequencies {
    /// The beta-base view of this scheme against `plain` (the same model without
    /// scaling, see [`crate::RopeConfig::plain_frequencies`]): per pair, its wavelength, the turns
    /// it completed within `train_len`, how much the scheme stretched it, and whether it is
    /// extrapolated, interpolated or blended. With `target_len`, also the angle range the
    /// pair covers at the target relative to what it saw in training.
    pub fn explain(
        &self,
        plain: &Frequencies,
        train_len: usize,
        target_len: Option<usize>,
    ) -> Result<Vec<PairReport>> {
        if plain.num_pairs() != self.num_pairs() {
            return Err(RopeError::shape(
                "plain frequencies",
                format!("{} pairs", self.num_pairs()),
                format!("{} pairs", plain.num_pairs()),
            ));
        }
        if train_len == 0 {
            return Err(RopeError::invalid("train_len", 0, "must be >= 1"));
        }
        let stretches: Vec<f64> = self
            .inv_freq()
            .iter()
            .zip(plain.inv_freq())
            .map(|(&f, &p)| if f == 0.0 && p == 0.0 { 1.0 } else { p / f })
            .collect();
        let max_stretch = stretches
            .iter()
            .copied()
            .filter(|s| s.is_finite())
            .fold(1.0, f64::max);
        Ok((0..self.num_pairs())
            .map(|j| {
                let stretch = stretches[j];
                let regime = Regime::classify(stretch, max_stretch);
                let turns_in_training = train_len as f64 * plain.inv_freq()[j] / (2.0 * PI);
                let seen_fraction = target_len.map(|t| {
                    if plain.inv_freq()[j] == 0.0 {
                        1.0
                    } else {
                        (t as f64 * self.inv_freq()[j]) / (train_len as f64 * plain.inv_freq()[j])
                    }
                });
                PairReport {
                    pair: j,
                    inv_freq: self.inv_freq()[j],
                    plain_inv_freq: plain.inv_freq()[j],
                    wavelength: 2.0 * PI / plain.inv_freq()[j],
                    turns_in_training,
                    stretch,
                    regime,
                    target_angle_ratio: seen_fraction,
                }
            })
            .collect())
    }
}

/// What a scheme does to one pair, relative to plain RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Frequency unchanged (stretch 1): positions past training are extrapolated.
    Extrapolated,
    /// Stretched by the scheme's full factor: positions are interpolated.
    Interpolated,
    /// Stretched by something in between.
    Blended,
}

impl Regime {
    /// Relative tolerance within which a stretch counts as 1 or as the full factor.
    pub const TOLERANCE: f64 = 1e-3;

    fn classify(stretch: f64, max_stretch: f64) -> Regime {
        if (stretch - 1.0).abs() <= Self::TOLERANCE {
            Regime::Extrapolated
        } else if max_stretch > 1.0 + Self::TOLERANCE
            && (stretch / max_stretch - 1.0).abs() <= Self::TOLERANCE
        {
            Regime::Interpolated
        } else {
            Regime::Blended
        }
    }

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Regime::Extrapolated => "extrapolated",
            Regime::Interpolated => "interpolated",
            Regime::Blended => "blended",
        }
    }
}

/// One row of [`Frequencies::explain`].
#[derive(Debug, Clone, PartialEq)]
pub struct PairReport {
    /// Pair index `j`.
    pub pair: usize,
    /// `inv_freq_j` under the scheme.
    pub inv_freq: f64,
    /// `theta_j` of plain RoPE.
    pub plain_inv_freq: f64,
    /// Plain wavelength `2 pi / theta_j` in tokens.
    pub wavelength: f64,
    /// Turns the plain pair completed within the training length,
    /// `L_train theta_j / 2 pi`; below 1 the pair never saw its whole circle.
    pub turns_in_training: f64,
    /// `theta_j / inv_freq_j`: 1 = untouched, `s` = fully interpolated.
    pub stretch: f64,
    /// Classification of `stretch` relative to the scheme's largest stretch.
    pub regime: Regime,
    /// With a target length: the largest angle the pair reaches at the target under the
    /// scheme divided by the largest it reached in training (`L_t inv_j / (L_train
    /// theta_j)`). Above 1 for a pair with `turns_in_training < 1` means angles never
    /// seen in training.
    pub target_angle_ratio: Option<f64>,
}

/// `beta = base^(2/d)`: the radix of RoPE's number system (post 10).
pub fn beta(base: f64, rotary_dim: usize) -> f64 {
    base.powf(2.0 / rotary_dim as f64)
}

/// The base-beta "digits" of `position`: `position / beta^j` for each pair `j`, whose
/// fractional turns `digit / 2 pi` are what cos/sin see. `rotary_dim` is at most
/// [`crate::MAX_HEAD_DIM`].
pub fn digits(position: f64, base: f64, rotary_dim: usize) -> Result<Vec<f64>> {
    if rotary_dim > crate::MAX_HEAD_DIM {
        return Err(RopeError::invalid(
            "rotary_dim",
            rotary_dim,
            format!("must be <= {} (ropex::MAX_HEAD_DIM)", crate::MAX_HEAD_DIM),
        ));
    }
    let b = beta(base, rotary_dim);
    Ok((0..rotary_dim / 2)
        .map(|j| position / b.powi(j as i32))
        .collect())
}
