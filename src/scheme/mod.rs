//! Frequency schemes: [`Scaling`], the selector over every RoPE frequency scheme ropex
//! knows, one file per scheme, and [`RopeConfig`], the validated description of one
//! model's rotary embedding.
//!
//! In the "beta-base" view (Su, Transformer-upgrade post 10) a position `p` is written
//! as `d/2` digits `p / beta^j` with `beta = base^(2/d)`. Every scheme here is a way of
//! changing those digits so that, at a longer context, the slow (high-`j`) digits only
//! see values they saw in training:
//!
//! | scheme | inv_freq_j | attention factor |
//! |---|---|---|
//! | [`Scaling::None`] | `theta_j = base^(-2j/d)` | 1 |
//! | [`Scaling::Linear`] (PI) | `theta_j / s` | 1 |
//! | [`Scaling::NtkAware`] | `(base * s^(d/(d-2)))^(-2j/d)` | 1 |
//! | [`Scaling::NtkOld`] | `(base * s)^(-2j/d)` | 1 |
//! | [`Scaling::NtkFixed`] | `theta_j * s^(-2(j+1)/d)` | 1 |
//! | [`Scaling::NtkMixed`] | `theta_j * exp(-a (j+1)^b)`, `a = ln s / (d/2)^b` | 1 |
//! | [`Scaling::Dynamic`] | NTK-aware at `base' = base (s L/L0 - (s-1))^(d/(d-2))`, `L = max(len, L0)` | 1 |
//! | [`Scaling::Yarn`] | ramp between `theta_j / s` and `theta_j` (see [`Yarn`]) | `0.1 ln s + 1` |
//! | [`Scaling::Llama3`] | wavelength bands (see [`Llama3`]) | 1 |
//! | [`Scaling::LongRope`] | `theta_j / ext_j` (see [`LongRope`]) | `sqrt(1 + ln s / ln L0)` |
//! | [`Scaling::Proportional`] | `base^(-2j/D) / s` for the first pairs, 0 after | 1 |
//!
//! ## Layout
//! Each scheme is one file (`plain`, `linear`, `ntk`, `dynamic`, `yarn`, `llama3`,
//! `longrope`, `proportional`) implementing one crate-private trait, `Scheme`: its
//! validation, its `inv_freq`, its attention factor, its rope-type name and its length
//! threshold. [`Scaling`] picks the implementation in exactly one `match`; the list of
//! rope-type names is `RopeType`, the one place a name is spelled. Data flows one way:
//! [`RopeConfig`] -> [`Scaling`] -> scheme file -> [`Frequencies`]; no scheme file knows
//! [`RopeConfig`]. The beta-base diagnostics ([`Frequencies::explain`]) are in `explain`.

mod dynamic;
mod explain;
mod linear;
mod llama3;
mod longrope;
mod ntk;
mod plain;
mod proportional;
mod rope_config;
mod yarn;

pub use explain::{PairReport, Regime, beta, digits};
pub use llama3::Llama3;
pub use longrope::LongRope;
pub use rope_config::RopeConfig;
pub use yarn::Yarn;

use crate::error::{Result, RopeError, check_factor};
use crate::frequencies::Frequencies;

/// How strictly a [`Scaling`] is validated.
///
/// [`Checks::Strict`] (what [`RopeConfig::with_scaling`] uses) rejects every value that makes
/// no sense for context extension. [`Checks::Transformers`] (what
/// [`RopeConfig::with_scaling_lenient`] and the config reader's non-strict mode use) also
/// accepts what Hugging Face transformers computes with only a warning: factors in
/// `(0, 1)`, YaRN's `beta_fast < beta_slow`, llama3's `high_freq_factor <= low_freq_factor`.
/// Both levels reject anything that would make a frequency or the attention factor
/// non-finite, negative or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Checks {
    /// Only sensible context-extension parameters.
    #[default]
    Strict,
    /// Whatever transformers accepts, as long as the outputs stay finite.
    Transformers,
}

impl Checks {
    fn factor(self, field: &str, value: f64) -> Result<f64> {
        match self {
            Checks::Strict => check_factor(field, value),
            Checks::Transformers => check_divisor(field, value),
        }
    }
}

/// The smallest factor a frequency may be divided by: `theta_j / factor` stays below
/// `1e6` rad/token, so every angle `p * inv_freq` of a representable position is finite.
pub const MIN_DIVISOR: f64 = 1e-6;

/// A finite divisor of frequencies, at least [`MIN_DIVISOR`].
fn check_divisor(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() && value >= MIN_DIVISOR {
        Ok(value)
    } else {
        Err(RopeError::invalid(
            field,
            value,
            "must be a finite number >= 1e-6 (it divides the frequencies)",
        ))
    }
}

/// A length that must be at least 1.
fn check_len(field: &str, len: usize) -> Result<()> {
    if len == 0 {
        Err(RopeError::invalid(field, 0, "must be >= 1"))
    } else {
        Ok(())
    }
}

/// Every rope-type name ropex knows: the one place each is spelled. The config reader
/// matches on these, [`Scaling::rope_type`] returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeType {
    Default,
    Linear,
    Dynamic,
    Yarn,
    LongRope,
    Llama3,
    Proportional,
    NtkAware,
    NtkOld,
    NtkFixed,
    NtkMixed,
}

// The name list and `scaled_len` serve the config reader (feature `serde`).
#[cfg_attr(not(feature = "serde"), allow(dead_code))]
impl RopeType {
    /// Every type, transformers' first (in the order of its docs), then ropex's own.
    pub(crate) const ALL: [RopeType; 11] = [
        RopeType::Default,
        RopeType::Linear,
        RopeType::Dynamic,
        RopeType::Yarn,
        RopeType::LongRope,
        RopeType::Llama3,
        RopeType::Proportional,
        RopeType::NtkAware,
        RopeType::NtkOld,
        RopeType::NtkFixed,
        RopeType::NtkMixed,
    ];

    /// The `rope_type` string.
    pub(crate) fn name(self) -> &'static str {
        match self {
            RopeType::Default => "default",
            RopeType::Linear => "linear",
            RopeType::Dynamic => "dynamic",
            RopeType::Yarn => "yarn",
            RopeType::LongRope => "longrope",
            RopeType::Llama3 => "llama3",
            RopeType::Proportional => "proportional",
            RopeType::NtkAware => "ntk_aware",
            RopeType::NtkOld => "ntk_old",
            RopeType::NtkFixed => "ntk_fixed",
            RopeType::NtkMixed => "ntk_mixed",
        }
    }

    /// The type named `name`, if any.
    pub(crate) fn from_name(name: &str) -> Option<RopeType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// True for ropex's own types, which transformers does not know.
    pub(crate) fn is_ropex(self) -> bool {
        matches!(
            self,
            RopeType::NtkAware | RopeType::NtkOld | RopeType::NtkFixed | RopeType::NtkMixed
        )
    }
}

/// The geometry a scheme computes its frequencies for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    /// `rope_theta`.
    pub(crate) base: f64,
    /// Rotary pairs, `rotary_dim / 2`.
    pub(crate) pairs: usize,
    /// The `d` of the exponents `2j/d`.
    pub(crate) exponent_dim: usize,
}

impl Dims {
    /// Plain frequencies `theta_j = base^(-2j/d)`.
    pub(crate) fn theta(&self) -> Vec<f64> {
        plain::theta(self.base, self.pairs, self.exponent_dim)
    }
}

/// What one frequency scheme provides; one implementation per file.
pub(crate) trait Scheme {
    /// The scheme's `rope_type`.
    fn rope_type(&self) -> RopeType;
    /// Checks every parameter for `pairs` rotary pairs with exponent dim `exponent_dim`.
    fn validate(&self, pairs: usize, exponent_dim: usize, checks: Checks) -> Result<()>;
    /// `inv_freq_j` for every pair, at sequence length `seq_len` (`None`: model init).
    fn inv_freq(&self, dims: &Dims, seq_len: Option<usize>) -> Vec<f64>;
    /// The factor multiplied into cos and sin.
    fn attention_factor(&self) -> f64 {
        1.0
    }
    /// `L0` for a length-dependent scheme: its frequencies are fixed up to this length.
    fn length_threshold(&self) -> Option<usize> {
        None
    }
    /// `(s, L0)` for a scheme that names both an extension factor and the pretraining
    /// length it extends (YaRN, llama3, LongRoPE).
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    fn scaled_len(&self) -> Option<(f64, usize)> {
        None
    }
}

/// One RoPE frequency scheme with its parameters.
///
/// Build one directly or through the helper constructors ([`Scaling::linear`],
/// [`Scaling::ntk_mixed`], [`Yarn::new`], ...); [`RopeConfig::with_scaling`] validates
/// it against the rotary dimension.
///
/// With the `serde` feature it (de)serialises tagged by its rope-type name,
/// e.g. `{"rope_type": "linear", "factor": 4.0}`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "rope_type", rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum Scaling {
    /// Plain RoPE: `theta_j = base^(-2j/d)` (transformers `default`).
    #[cfg_attr(feature = "serde", serde(rename = "default"))]
    None,
    /// Position interpolation (Chen et al. 2023; transformers `linear`):
    /// every frequency divided by `factor`.
    Linear {
        /// Extension factor `s >= 1`.
        factor: f64,
    },
    /// NTK-aware scaling (bloc97): base becomes `base * s^(d/(d-2))`, so the last pair is
    /// interpolated by exactly `s` and the first is untouched.
    NtkAware {
        /// Extension factor `s >= 1`.
        factor: f64,
    },
    /// The original NTK base change of Su's post 10: `base -> base * s`.
    NtkOld {
        /// Extension factor `s >= 1`.
        factor: f64,
    },
    /// NTK-fixed (Su, post 11; vLLM `ntk`): `theta_j * s^(-2(j+1)/d)`.
    NtkFixed {
        /// Extension factor `s >= 1`.
        factor: f64,
    },
    /// NTK-mixed, the mixed-base scheme of Su's post 11:
    /// `theta_j * exp(-a (j+1)^b)` with `a = ln s / (d/2)^b`.
    /// `b = 1` is NTK-fixed, `b = 0` is position interpolation; the last pair is always
    /// `theta/s`. Su tunes `b = 0.625`; his `ntk_patch.py` ships `s = 12, b = 0.75`.
    NtkMixed {
        /// Extension factor `s >= 1`.
        factor: f64,
        /// Mixing exponent `b` in `[0, 1]`.
        b: f64,
    },
    /// Dynamic NTK (transformers `dynamic`): NTK-aware with a base that grows with the
    /// current sequence length `L`:
    /// `base' = base * (s * L / L0 - (s - 1))^(d/(d-2))`, with `L` clamped to `>= L0`.
    Dynamic {
        /// Extension factor `s >= 1`.
        factor: f64,
        /// `L0`: the length at and below which frequencies are plain.
        original_max_position_embeddings: usize,
    },
    /// YaRN (Peng et al. 2023; transformers `yarn`).
    Yarn(Yarn),
    /// Llama 3.1's wavelength-banded interpolation (transformers `llama3`).
    Llama3(Llama3),
    /// LongRoPE / Phi-3 (transformers `longrope`): per-pair rescale factors.
    #[cfg_attr(feature = "serde", serde(rename = "longrope"))]
    LongRope(LongRope),
    /// Proportional RoPE (transformers `proportional`, Gemma-4 style): the first
    /// `floor(partial_rotary_factor * D / 2)` pairs get `base^(-2j/D) / s` with `D` the
    /// full head dim, the remaining pairs get frequency 0 (identity rotation). Unlike
    /// partial rotary, the non-rotated pairs are spread across both halves of the head.
    Proportional {
        /// Divisor of every frequency, `>= 1` (transformers' default 1).
        factor: f64,
        /// Fraction of the head's pairs that rotate, in `[0, 1]`.
        partial_rotary_factor: f64,
    },
}

impl Scaling {
    /// Position interpolation by `factor`.
    pub fn linear(factor: f64) -> Self {
        Scaling::Linear { factor }
    }

    /// NTK-aware scaling by `factor`.
    pub fn ntk_aware(factor: f64) -> Self {
        Scaling::NtkAware { factor }
    }

    /// NTK-mixed with extension `factor` and exponent `b`.
    pub fn ntk_mixed(factor: f64, b: f64) -> Self {
        Scaling::NtkMixed { factor, b }
    }

    /// Dynamic NTK by `factor` above `original_max_position_embeddings`.
    pub fn dynamic(factor: f64, original_max_position_embeddings: usize) -> Self {
        Scaling::Dynamic {
            factor,
            original_max_position_embeddings,
        }
    }

    /// Runs `f` on this scheme's implementation: the one `match` over the variants.
    fn with_scheme<R>(&self, f: impl FnOnce(&dyn Scheme) -> R) -> R {
        match *self {
            Scaling::None => f(&plain::Plain),
            Scaling::Linear { factor } => f(&linear::Linear { factor }),
            Scaling::NtkAware { factor } => f(&ntk::Ntk::Aware(factor)),
            Scaling::NtkOld { factor } => f(&ntk::Ntk::Old(factor)),
            Scaling::NtkFixed { factor } => f(&ntk::Ntk::Fixed(factor)),
            Scaling::NtkMixed { factor, b } => f(&ntk::Ntk::Mixed(factor, b)),
            Scaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => f(&dynamic::Dynamic {
                factor,
                original_max_position_embeddings,
            }),
            Scaling::Yarn(ref y) => f(y),
            Scaling::Llama3(ref l) => f(l),
            Scaling::LongRope(ref l) => f(l),
            Scaling::Proportional {
                factor,
                partial_rotary_factor,
            } => f(&proportional::Proportional {
                factor,
                partial_rotary_factor,
            }),
        }
    }

    /// The name transformers uses for this scheme's `rope_type`, or ropex's own name for
    /// the schemes transformers lacks (`ntk_old`, `ntk_fixed`, `ntk_mixed`, `ntk_aware`).
    pub fn rope_type(&self) -> &'static str {
        self.kind().name()
    }

    pub(crate) fn kind(&self) -> RopeType {
        self.with_scheme(|s| s.rope_type())
    }

    /// True when the frequencies depend on the current sequence length (dynamic NTK,
    /// LongRoPE): a KV cache must re-rotate its keys when they change.
    pub fn is_length_dependent(&self) -> bool {
        self.length_threshold().is_some()
    }

    /// For a length-dependent scheme, the length `L0` up to which its frequencies are
    /// fixed: dynamic NTK is plain up to `L0`, LongRoPE uses its short factors up to
    /// `L0` and its long factors past it. `None` for every other scheme.
    ///
    /// ```
    /// use ropex::{Scaling, Yarn};
    /// assert_eq!(Scaling::dynamic(2.0, 4096).length_threshold(), Some(4096));
    /// assert_eq!(Scaling::Yarn(Yarn::new(4.0, 4096)).length_threshold(), None);
    /// ```
    pub fn length_threshold(&self) -> Option<usize> {
        self.with_scheme(|s| s.length_threshold())
    }

    /// `(s, L0)` when the scheme names an extension factor and the pretraining length it
    /// extends (YaRN, llama3, LongRoPE).
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    pub(crate) fn scaled_len(&self) -> Option<(f64, usize)> {
        self.with_scheme(|s| s.scaled_len())
    }

    /// Checks every parameter for a rotary dimension of `rotary_dim`
    /// (with [`Checks::Strict`]).
    pub fn validate(&self, rotary_dim: usize) -> Result<()> {
        self.validate_with(rotary_dim, Checks::Strict)
    }

    /// Checks every parameter for a rotary dimension of `rotary_dim` at the given level.
    /// ropex's own schemes (NTK-aware, -old, -fixed, -mixed) are always checked strictly.
    pub fn validate_with(&self, rotary_dim: usize, checks: Checks) -> Result<()> {
        let pairs = rotary_dim / 2;
        self.validate_dims(pairs, 2 * pairs, checks)
    }

    /// [`Scaling::validate_with`] for an exponent dim that may be odd (transformers'
    /// odd partial rotary).
    pub(crate) fn validate_dims(
        &self,
        pairs: usize,
        exponent_dim: usize,
        checks: Checks,
    ) -> Result<()> {
        self.with_scheme(|s| s.validate(pairs, exponent_dim, checks))
    }

    /// The frequencies of this (validated) scheme for `dims` at `seq_len`.
    pub(crate) fn frequencies(&self, dims: &Dims, seq_len: Option<usize>) -> Frequencies {
        self.with_scheme(|s| Frequencies::new(s.inv_freq(dims, seq_len), s.attention_factor()))
    }
}

#[cfg(test)]
mod tests;
