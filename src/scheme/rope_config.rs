//! [`RopeConfig`]: head dim, rotary dim, base and frequency scheme of one model (or one
//! layer type), validated together.

use super::{Checks, Dims, Scaling};
use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;

/// The validated rotary-embedding description of one model (or one layer type).
///
/// ```
/// use ropex::{RopeConfig, Scaling, Yarn};
/// let cfg = RopeConfig::new(128, 10_000.0)?
///     .with_scaling(Scaling::Yarn(Yarn::new(4.0, 4096)))?;
/// let f = cfg.frequencies();
/// assert_eq!(f.inv_freq().len(), 64);
/// assert!((f.attention_factor() - 1.1386294).abs() < 1e-7);
/// # Ok::<(), ropex::RopeError>(())
/// ```
///
/// With the `serde` feature it (de)serialises as its fields (`head_dim`, `rotary_dim`,
/// `exponent_dim`, `base`, `scaling`, `checks`); deserialising validates them as the
/// builders do.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "RopeConfigData")
)]
pub struct RopeConfig {
    head_dim: usize,
    rotary_dim: usize,
    exponent_dim: usize,
    base: f64,
    scaling: Scaling,
    checks: Checks,
}

/// The unvalidated form [`RopeConfig`] deserialises through.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
struct RopeConfigData {
    head_dim: usize,
    rotary_dim: usize,
    exponent_dim: usize,
    base: f64,
    scaling: Scaling,
    #[serde(default)]
    checks: Checks,
}

#[cfg(feature = "serde")]
impl TryFrom<RopeConfigData> for RopeConfig {
    type Error = RopeError;

    fn try_from(d: RopeConfigData) -> Result<Self> {
        let mut cfg = RopeConfig::new(d.head_dim, d.base)?.with_rotary_dim(d.rotary_dim)?;
        if d.exponent_dim != d.rotary_dim {
            // transformers' odd partial rotary: `rotary_dim = exponent_dim + 1`.
            if d.exponent_dim.is_multiple_of(2) || d.exponent_dim + 1 != d.rotary_dim {
                return Err(RopeError::invalid(
                    "exponent_dim",
                    d.exponent_dim,
                    format!(
                        "must equal rotary_dim ({}) or, for an odd partial rotary dim, \
                         rotary_dim - 1",
                        d.rotary_dim
                    ),
                ));
            }
            cfg.exponent_dim = d.exponent_dim;
        }
        cfg.with_scaling_checked(d.scaling, d.checks)
    }
}

impl RopeConfig {
    /// Plain RoPE over the whole head: `head_dim` must be even, non-zero and at most
    /// [`MAX_HEAD_DIM`], `base > 1`.
    pub fn new(head_dim: usize, base: f64) -> Result<Self> {
        check_rotary_dim("head_dim", head_dim)?;
        if !(base.is_finite() && base > 1.0) {
            return Err(RopeError::invalid(
                "rope_theta (base)",
                base,
                "must be a finite number > 1",
            ));
        }
        Ok(RopeConfig {
            head_dim,
            rotary_dim: head_dim,
            exponent_dim: head_dim,
            base,
            scaling: Scaling::None,
            checks: Checks::Strict,
        })
    }

    /// Sets the frequency scheme, validating it against the rotary dimension
    /// ([`Checks::Strict`]).
    pub fn with_scaling(self, scaling: Scaling) -> Result<Self> {
        self.with_scaling_checked(scaling, Checks::Strict)
    }

    /// Sets the frequency scheme with [`Checks::Transformers`]: also accepts what
    /// transformers computes with only a warning (factor in `(0, 1)`, YaRN
    /// `beta_fast < beta_slow`, llama3 `high_freq_factor <= low_freq_factor`).
    pub fn with_scaling_lenient(self, scaling: Scaling) -> Result<Self> {
        self.with_scaling_checked(scaling, Checks::Transformers)
    }

    fn with_scaling_checked(mut self, scaling: Scaling, checks: Checks) -> Result<Self> {
        scaling.validate_dims(self.rotary_dim / 2, self.exponent_dim, checks)?;
        self.scaling = scaling;
        self.checks = checks;
        Ok(self)
    }

    /// Rotates only the first `rotary_dim` dims of each head (partial rotary); the rest
    /// pass through. Frequencies use `rotary_dim` as `d`.
    pub fn with_rotary_dim(mut self, rotary_dim: usize) -> Result<Self> {
        check_rotary_dim("rotary_dim", rotary_dim)?;
        if rotary_dim > self.head_dim {
            return Err(RopeError::invalid(
                "rotary_dim",
                rotary_dim,
                format!("must be <= head_dim ({})", self.head_dim),
            ));
        }
        self.scaling.validate_with(rotary_dim, self.checks)?;
        self.rotary_dim = rotary_dim;
        self.exponent_dim = rotary_dim;
        Ok(self)
    }

    /// Partial rotary as transformers computes it: `dim = floor(head_dim * f)` with `f` in
    /// `(0, 1]`, and frequencies `base^(-2j/dim)` for `j = 0 .. ceil(dim/2)`.
    ///
    /// For an even `dim` this is [`RopeConfig::with_rotary_dim`]`(dim)`. For an odd `dim`
    /// transformers still builds `ceil(dim/2)` pairs (`arange(0, dim, 2)`), whose exponents
    /// keep the odd denominator: ropex then rotates `rotary_dim = dim + 1` dims with
    /// [`RopeConfig::exponent_dim`] `= dim` (YaRN, whose ramp transformers builds for
    /// `floor(dim/2)` pairs, fails there with a shape error and is rejected here).
    pub fn with_partial_rotary_factor(self, factor: f64) -> Result<Self> {
        if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
            return Err(RopeError::invalid(
                "partial_rotary_factor",
                factor,
                "must be in (0, 1]",
            ));
        }
        let dim = (self.head_dim as f64 * factor) as usize;
        if dim == 0 || dim.is_multiple_of(2) {
            return self.with_rotary_dim(dim);
        }
        let rotary_dim = dim + 1;
        if rotary_dim > self.head_dim {
            return Err(RopeError::invalid(
                "partial_rotary_factor",
                factor,
                format!(
                    "gives an odd rotary dim {dim} that cannot be rounded up within head_dim {}",
                    self.head_dim
                ),
            ));
        }
        let mut cfg = self.with_rotary_dim(rotary_dim)?;
        cfg.scaling.validate_dims(rotary_dim / 2, dim, cfg.checks)?;
        cfg.exponent_dim = dim;
        Ok(cfg)
    }

    /// The head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The rotary dimension (`<= head_dim`): `2 * ` the number of pairs.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// The `d` of the exponents `theta_j = base^(-2j/d)`: equal to
    /// [`RopeConfig::rotary_dim`] except for transformers' odd partial-rotary dims (see
    /// [`RopeConfig::with_partial_rotary_factor`]), where it is `rotary_dim - 1`.
    pub fn exponent_dim(&self) -> usize {
        self.exponent_dim
    }

    /// The validation level the scheme was checked with.
    pub fn checks(&self) -> Checks {
        self.checks
    }

    /// The base (`rope_theta`).
    pub fn base(&self) -> f64 {
        self.base
    }

    /// The frequency scheme.
    pub fn scaling(&self) -> &Scaling {
        &self.scaling
    }

    /// Frequencies as transformers computes them at model initialisation (no sequence
    /// length: dynamic NTK is plain, LongRoPE uses its short factors).
    pub fn frequencies(&self) -> Frequencies {
        self.scaling.frequencies(&self.dims(), None)
    }

    /// Frequencies for a sequence of `seq_len` tokens. Only dynamic NTK and LongRoPE
    /// depend on it; every other scheme ignores it.
    pub fn frequencies_for_len(&self, seq_len: usize) -> Frequencies {
        self.scaling.frequencies(&self.dims(), Some(seq_len))
    }

    fn dims(&self) -> Dims {
        Dims {
            base: self.base,
            pairs: self.rotary_dim / 2,
            exponent_dim: self.exponent_dim,
        }
    }

    /// Frequencies of plain RoPE with the same base and dims: the reference the
    /// beta-base diagnostics compare a scheme against.
    pub fn plain_frequencies(&self) -> Frequencies {
        let plain = RopeConfig {
            scaling: Scaling::None,
            ..self.clone()
        };
        plain.frequencies()
    }
}

use crate::limits::MAX_HEAD_DIM;

fn check_rotary_dim(field: &str, d: usize) -> Result<()> {
    if d == 0 || d % 2 == 1 {
        Err(RopeError::invalid(
            field,
            d,
            "must be even and > 0 (RoPE rotates pairs of dims)",
        ))
    } else if d > MAX_HEAD_DIM {
        Err(RopeError::invalid(
            field,
            d,
            format!("must be <= {MAX_HEAD_DIM} (ropex::MAX_HEAD_DIM)"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::{Llama3, MIN_DIVISOR, Yarn};

    #[test]
    fn odd_partial_rotary_keeps_its_exponent_denominator() {
        // transformers: head_dim 100, partial 0.25 -> dim 25, arange(0, 25, 2) -> 13 pairs,
        // exponents 2j/25.
        let cfg = RopeConfig::new(100, 10_000.0)
            .unwrap()
            .with_partial_rotary_factor(0.25)
            .unwrap();
        assert_eq!((cfg.rotary_dim(), cfg.exponent_dim()), (26, 25));
        let f = cfg.frequencies();
        assert_eq!(f.num_pairs(), 13);
        for (j, &w) in f.inv_freq().iter().enumerate() {
            let want = 10_000f64.powf(-(2.0 * j as f64) / 25.0);
            assert!(((w - want) / want).abs() < 1e-15);
        }
        // Even dims are plain partial rotary.
        let even = RopeConfig::new(128, 10_000.0)
            .unwrap()
            .with_partial_rotary_factor(0.5)
            .unwrap();
        assert_eq!((even.rotary_dim(), even.exponent_dim()), (64, 64));
        // YaRN cannot use an odd dim (transformers fails with a shape mismatch).
        assert!(
            RopeConfig::new(100, 10_000.0)
                .unwrap()
                .with_partial_rotary_factor(0.25)
                .unwrap()
                .with_scaling(Scaling::Yarn(Yarn::new(4.0, 4096)))
                .is_err()
        );
        // head 2 x 0.5: one pair with exponent denominator 1.
        let one = RopeConfig::new(2, 10_000.0)
            .unwrap()
            .with_partial_rotary_factor(0.5)
            .unwrap();
        assert_eq!((one.rotary_dim(), one.exponent_dim()), (2, 1));
        assert!(
            RopeConfig::new(128, 10_000.0)
                .unwrap()
                .with_partial_rotary_factor(0.0)
                .is_err()
        );
    }

    #[test]
    fn head_dim_is_bounded_so_frequencies_never_overflow() {
        for d in [1usize << 63, usize::MAX - 1, MAX_HEAD_DIM + 2] {
            let e = RopeConfig::new(d, 10_000.0).unwrap_err();
            assert!(e.to_string().contains("65536"), "{e}");
        }
        let cfg = RopeConfig::new(MAX_HEAD_DIM, 10_000.0).unwrap();
        let f = cfg.frequencies();
        assert_eq!(f.num_pairs(), MAX_HEAD_DIM / 2);
        assert_eq!(f.inv_freq()[0], 1.0);
        assert!(
            RopeConfig::new(128, 10_000.0)
                .unwrap()
                .with_rotary_dim(1 << 62)
                .is_err()
        );
    }

    #[test]
    fn lenient_checks_accept_what_transformers_only_warns_about() {
        let base = || RopeConfig::new(128, 10_000.0).unwrap();
        assert!(base().with_scaling(Scaling::linear(0.5)).is_err());
        assert!(base().with_scaling_lenient(Scaling::linear(0.5)).is_ok());
        assert!(base().with_scaling_lenient(Scaling::linear(0.0)).is_err());
        assert!(base().with_scaling_lenient(Scaling::linear(-2.0)).is_err());
        let inverted = Yarn::new(4.0, 4096).with_betas(1.0, 32.0);
        assert!(
            base()
                .with_scaling(Scaling::Yarn(inverted.clone()))
                .is_err()
        );
        let cfg = base()
            .with_scaling_lenient(Scaling::Yarn(inverted))
            .unwrap();
        assert_eq!(cfg.checks(), Checks::Transformers);
        assert!(cfg.frequencies().inv_freq().iter().all(|f| f.is_finite()));
        // A divisor so small that angles would overflow is refused even leniently.
        assert!(
            base()
                .with_scaling_lenient(Scaling::linear(1e-300))
                .is_err()
        );
        assert!(
            base()
                .with_scaling_lenient(Scaling::linear(MIN_DIVISOR))
                .is_ok()
        );
        // Dynamic NTK with an absurd factor stays finite at L = L0 (no cancellation).
        let dynamic = base()
            .with_scaling_lenient(Scaling::dynamic(1.8e19, 4096))
            .unwrap();
        assert_eq!(dynamic.frequencies(), dynamic.plain_frequencies());
        // ropex's own schemes stay strict.
        assert!(
            base()
                .with_scaling_lenient(Scaling::ntk_mixed(0.5, 0.5))
                .is_err()
        );
        // A lenient scheme survives a later rotary-dim change.
        let cfg = base()
            .with_scaling_lenient(Scaling::linear(0.5))
            .unwrap()
            .with_rotary_dim(64)
            .unwrap();
        assert_eq!(cfg.rotary_dim(), 64);
    }

    #[test]
    fn llama3_inverted_bands_follow_transformers_precedence() {
        // low 4, high 1: transformers divides wavelengths > L0/4 by the factor first and the
        // blend band is empty; everything else keeps theta.
        let l = Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192,
        };
        let cfg = RopeConfig::new(128, 500_000.0)
            .unwrap()
            .with_scaling_lenient(Scaling::Llama3(l))
            .unwrap();
        let f = cfg.frequencies();
        let plain = cfg.plain_frequencies();
        for (j, (&w, &t)) in f.inv_freq().iter().zip(plain.inv_freq()).enumerate() {
            let lam = 2.0 * std::f64::consts::PI / t;
            let want = if lam > 8192.0 / 4.0 { t / 8.0 } else { t };
            assert_eq!(w, want, "pair {j}");
        }
    }
}
