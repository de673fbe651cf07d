//! [`Frequencies`]: `inv_freq` per rotary pair (f64) plus the attention factor, and the
//! beta-base diagnostics that show *why* a scheme extends context.
//!
//! Su's post 10 reads RoPE as a base-`beta` number system, `beta = base^(2/d)`: pair `j`
//! turns at `inv_freq_j = beta^(-j)` radians per token, so position `p` has "digit"
//! `p / beta^j` in pair `j` ([`digits`]). A pair whose digit never completed a turn
//! during training (`turns_j = L_train inv_freq_j / 2 pi < 1`, [`Frequencies::turns`])
//! only ever saw a fraction of its circle: reading further than `L_train` shows it
//! angles it never saw, so it must be interpolated. Pairs with many turns saw every
//! angle and can extrapolate. [`Frequencies::explain`] reports this per pair.

use std::f64::consts::PI;

use crate::error::{Result, RopeError};
use crate::scaling::{RopeConfig, Scaling};

/// Inverse frequencies (radians per position) for each rotary pair, and the attention
/// factor that multiplies cos and sin (so attention logits scale by its square).
#[derive(Debug, Clone, PartialEq)]
pub struct Frequencies {
    inv_freq: Vec<f64>,
    attention_factor: f64,
}

impl Frequencies {
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

    /// Rotation angle of pair `j` at position `p`: `p * inv_freq_j`, in f64.
    pub fn angle(&self, position: f64, pair: usize) -> f64 {
        position * self.inv_freq[pair]
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

    /// The beta-base view of this scheme against `plain` (the same model without
    /// scaling, see [`RopeConfig::plain_frequencies`]): per pair, its wavelength, the turns
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
            .inv_freq
            .iter()
            .zip(&plain.inv_freq)
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
                let turns_in_training = train_len as f64 * plain.inv_freq[j] / (2.0 * PI);
                let seen_fraction = target_len.map(|t| {
                    if plain.inv_freq[j] == 0.0 {
                        1.0
                    } else {
                        (t as f64 * self.inv_freq[j]) / (train_len as f64 * plain.inv_freq[j])
                    }
                });
                PairReport {
                    pair: j,
                    inv_freq: self.inv_freq[j],
                    plain_inv_freq: plain.inv_freq[j],
                    wavelength: 2.0 * PI / plain.inv_freq[j],
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
/// fractional turns `digit / 2 pi` are what cos/sin see.
pub fn digits(position: f64, base: f64, rotary_dim: usize) -> Vec<f64> {
    let b = beta(base, rotary_dim);
    (0..rotary_dim / 2)
        .map(|j| position / b.powi(j as i32))
        .collect()
}

/// `theta_j = base^(-2j/d)` in f64 for `j = 0..pairs`, for a base that may be rescaled.
/// `d` is the exponent dim (the rotary dim, or transformers' odd partial dim).
fn plain_inv_freq(base: f64, pairs: usize, d: usize) -> Vec<f64> {
    (0..pairs)
        .map(|j| base.powf(-(2.0 * j as f64) / d as f64))
        .collect()
}

/// NTK-aware exponent `d/(d-2)`; for `d = 2` the only pair has exponent 0, so any value
/// works and 1 avoids a division by zero.
fn ntk_exponent(d: usize) -> f64 {
    if d > 2 {
        d as f64 / (d as f64 - 2.0)
    } else {
        1.0
    }
}

/// Computes a configuration's frequencies (see the table in [`crate::scaling`]).
pub(crate) fn compute(cfg: &RopeConfig, seq_len: Option<usize>) -> Frequencies {
    let d = cfg.exponent_dim();
    let half = cfg.rotary_dim() / 2;
    let base = cfg.base();
    let theta = plain_inv_freq(base, half, d);
    let (inv_freq, attention_factor) = match cfg.scaling() {
        Scaling::None => (theta, 1.0),
        Scaling::Linear { factor } => (theta.iter().map(|t| t / factor).collect(), 1.0),
        Scaling::NtkAware { factor } => (
            plain_inv_freq(base * factor.powf(ntk_exponent(d)), half, d),
            1.0,
        ),
        Scaling::NtkOld { factor } => (plain_inv_freq(base * factor, half, d), 1.0),
        Scaling::NtkFixed { factor } => (ntk_mixed(&theta, *factor, 1.0), 1.0),
        Scaling::NtkMixed { factor, b } => (ntk_mixed(&theta, *factor, *b), 1.0),
        Scaling::Dynamic {
            factor,
            original_max_position_embeddings: l0,
        } => {
            let l0 = *l0 as f64;
            let len = seq_len.map_or(l0, |n| (n as f64).max(l0));
            // `s L / L0 - (s - 1)` written as `1 + s (L / L0 - 1)`: the same number, without
            // the cancellation that turns a huge `s` into a zero base at `L = L0`.
            let bracket = 1.0 + factor * (len / l0 - 1.0);
            let scaled = base * bracket.powf(ntk_exponent(d));
            (plain_inv_freq(scaled, half, d), 1.0)
        }
        Scaling::Yarn(y) => {
            let (low, mut high) = y.correction_range(d, base);
            if low == high {
                high += 0.001;
            }
            let inv = theta
                .iter()
                .enumerate()
                .map(|(j, &t)| {
                    let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    ramp * (t / y.factor) + (1.0 - ramp) * t
                })
                .collect();
            (inv, y.resolved_attention_factor())
        }
        Scaling::Llama3(l) => {
            // transformers' precedence: `lam > L0/low` first, then `lam < L0/high`, the
            // blend in between (the two tests only overlap when high <= low).
            let l0 = l.original_max_position_embeddings as f64;
            let low_wavelen = l0 / l.low_freq_factor;
            let high_wavelen = l0 / l.high_freq_factor;
            let span = l.high_freq_factor - l.low_freq_factor;
            let inv = theta
                .iter()
                .map(|&t| {
                    let lam = 2.0 * PI / t;
                    if lam > low_wavelen {
                        t / l.factor
                    } else if lam < high_wavelen {
                        t
                    } else if span == 0.0 {
                        // Only reachable with high == low and lam exactly on the edge,
                        // where transformers divides by zero; keep the plain frequency.
                        t
                    } else {
                        let s = (l0 / lam - l.low_freq_factor) / span;
                        (1.0 - s) * t / l.factor + s * t
                    }
                })
                .collect();
            (inv, 1.0)
        }
        Scaling::LongRope(l) => {
            let ext = match seq_len {
                Some(n) if n > l.original_max_position_embeddings => &l.long_factor,
                _ => &l.short_factor,
            };
            let inv = theta.iter().zip(ext).map(|(t, e)| t / e).collect();
            (inv, l.resolved_attention_factor())
        }
        Scaling::Proportional {
            factor,
            partial_rotary_factor,
        } => {
            let rotating = ((partial_rotary_factor * d as f64) / 2.0).floor() as usize;
            let inv = theta
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    if j < rotating.min(half) {
                        t / factor
                    } else {
                        0.0
                    }
                })
                .collect();
            (inv, 1.0)
        }
    };
    Frequencies {
        inv_freq,
        attention_factor,
    }
}

/// NTK-mixed (Su, post 11): `theta_j * exp(-a (j+1)^b)`, `a = ln s / (d/2)^b`.
fn ntk_mixed(theta: &[f64], s: f64, b: f64) -> Vec<f64> {
    let half = theta.len() as f64;
    let a = s.ln() / half.powf(b);
    theta
        .iter()
        .enumerate()
        .map(|(j, &t)| t * (-a * ((j + 1) as f64).powf(b)).exp())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::{Llama3, Yarn};

    fn cfg(s: Scaling) -> RopeConfig {
        RopeConfig::new(128, 10_000.0)
            .unwrap()
            .with_scaling(s)
            .unwrap()
    }

    fn rel(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn ntk_mixed_matches_published_values() {
        let f = cfg(Scaling::ntk_mixed(12.0, 0.75)).frequencies();
        let a = 12f64.ln() / 64f64.powf(0.75);
        assert!((a - 0.1098184).abs() < 1e-7);
        assert!((f.inv_freq()[0] - 0.8959968).abs() < 1e-7);
        let theta63 = 10_000f64.powf(-126.0 / 128.0);
        assert!(rel(f.inv_freq()[63], theta63 / 12.0) < 1e-12);
        let f = cfg(Scaling::ntk_mixed(8.0, 0.625)).frequencies();
        assert!((f.inv_freq()[0] - 0.8567960).abs() < 1e-7);
    }

    #[test]
    fn ntk_mixed_limits_are_fixed_and_pi() {
        let fixed = cfg(Scaling::NtkFixed { factor: 8.0 }).frequencies();
        let b1 = cfg(Scaling::ntk_mixed(8.0, 1.0)).frequencies();
        let pi = cfg(Scaling::linear(8.0)).frequencies();
        let b0 = cfg(Scaling::ntk_mixed(8.0, 0.0)).frequencies();
        for j in 0..64 {
            assert!(rel(fixed.inv_freq()[j], b1.inv_freq()[j]) < 1e-12);
            assert!(rel(pi.inv_freq()[j], b0.inv_freq()[j]) < 1e-12);
            let closed = 10_000f64.powf(-(2.0 * j as f64) / 128.0)
                * 8f64.powf(-2.0 * (j as f64 + 1.0) / 128.0);
            assert!(rel(fixed.inv_freq()[j], closed) < 1e-12);
        }
    }

    #[test]
    fn ntk_aware_base_matches_published_value() {
        let f = cfg(Scaling::ntk_aware(4.0)).frequencies();
        // inv_freq[1] = base'^(-2/128)
        let base_prime = f.inv_freq()[1].powf(-64.0);
        assert!((base_prime - 40889.94).abs() < 0.01, "{base_prime}");
        // The last pair is interpolated by exactly s.
        let plain = cfg(Scaling::None).frequencies();
        assert!(rel(plain.inv_freq()[63] / f.inv_freq()[63], 4.0) < 1e-12);
        assert_eq!(f.inv_freq()[0], 1.0);
    }

    #[test]
    fn ntk_old_is_base_times_s() {
        let f = cfg(Scaling::NtkOld { factor: 8.0 }).frequencies();
        let g = RopeConfig::new(128, 80_000.0).unwrap().frequencies();
        assert_eq!(f, g);
    }

    #[test]
    fn dynamic_matches_published_base_and_clamps() {
        let c = cfg(Scaling::dynamic(2.0, 4096));
        let f = c.frequencies_for_len(8192);
        let base_prime = f.inv_freq()[1].powf(-64.0);
        assert!((base_prime - 30527.74).abs() < 0.01, "{base_prime}");
        let plain = cfg(Scaling::None).frequencies();
        assert_eq!(c.frequencies_for_len(100), plain);
        assert_eq!(c.frequencies_for_len(4096), plain);
        assert_eq!(c.frequencies(), plain);
        assert!(
            c.frequencies_for_len(100)
                .inv_freq()
                .iter()
                .all(|f| f.is_finite())
        );
    }

    #[test]
    fn yarn_matches_published_values() {
        let y = Yarn::new(4.0, 4096);
        assert_eq!(y.correction_range(128, 10_000.0), (20.0, 46.0));
        let (lo, hi) = y
            .clone()
            .with_truncate(false)
            .correction_range(128, 10_000.0);
        assert!((lo - 20.9445).abs() < 1e-4 && (hi - 45.0269).abs() < 1e-4);
        let f = cfg(Scaling::Yarn(y.clone())).frequencies();
        assert!(rel(f.inv_freq()[30], 0.0094885179) < 1e-8);
        assert!(rel(f.inv_freq()[20], 0.0562341325) < 1e-8);
        assert!((f.attention_factor() - 1.1386294).abs() < 1e-7);
        let g = cfg(Scaling::Yarn(y.clone().with_truncate(false))).frequencies();
        assert!(rel(g.inv_freq()[30], 0.0095744612) < 1e-8);
        let h = cfg(Scaling::Yarn(y.with_attention_factor(1.0))).frequencies();
        assert_eq!(h.attention_factor(), 1.0);
    }

    #[test]
    fn yarn_mscale_ratio() {
        let y = Yarn::new(40.0, 4096).with_mscale(1.0, 1.0);
        assert_eq!(y.resolved_attention_factor(), 1.0);
        let y = Yarn::new(40.0, 4096).with_mscale(0.707, 1.0);
        let m = |x: f64| 0.1 * x * 40f64.ln() + 1.0;
        assert!(rel(y.resolved_attention_factor(), m(0.707) / m(1.0)) < 1e-15);
    }

    #[test]
    fn llama3_band_matches_meta() {
        let c = RopeConfig::new(128, 500_000.0)
            .unwrap()
            .with_scaling(Scaling::Llama3(Llama3::meta()))
            .unwrap();
        let f = c.frequencies();
        let plain = c.plain_frequencies();
        let ratio: Vec<f64> = (0..64)
            .map(|j| plain.inv_freq()[j] / f.inv_freq()[j])
            .collect();
        assert!((ratio[29] - 1.20748).abs() < 1e-5, "{}", ratio[29]);
        assert!((ratio[34] - 5.25733).abs() < 1e-5, "{}", ratio[34]);
        assert!(ratio[28] == 1.0);
        for r in &ratio[35..] {
            assert!((r - 8.0).abs() < 1e-12);
        }
        let report = f.explain(&plain, 8192, None).unwrap();
        let blended: Vec<usize> = report
            .iter()
            .filter(|r| r.regime == Regime::Blended)
            .map(|r| r.pair)
            .collect();
        assert_eq!(blended, (29..=34).collect::<Vec<_>>());
        assert!(
            report[..29]
                .iter()
                .all(|r| r.regime == Regime::Extrapolated)
        );
        assert!(
            report[35..]
                .iter()
                .all(|r| r.regime == Regime::Interpolated)
        );
    }

    #[test]
    fn turns_and_digits_agree() {
        let f = cfg(Scaling::None).frequencies();
        let turns = f.turns(4096.0);
        let d = digits(4096.0, 10_000.0, 128);
        for j in 0..64 {
            assert!(rel(turns[j] * 2.0 * PI, d[j]) < 1e-12);
        }
        assert!(rel(beta(10_000.0, 128), 10_000f64.powf(1.0 / 64.0)) < 1e-15);
    }

    #[test]
    fn from_inv_freq_rejects_bad_values() {
        assert!(Frequencies::from_inv_freq(vec![], 1.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![f64::NAN], 1.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![-1.0], 1.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![1.0], 0.0).is_err());
        assert!(Frequencies::from_inv_freq(vec![1.0, 0.0], 1.0).is_ok());
    }
}
