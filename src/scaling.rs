//! [`Scaling`]: every RoPE frequency scheme ropex knows, and [`RopeConfig`], the
//! validated description of one model's rotary embedding.
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

use crate::error::{Result, RopeError, check_factor, check_finite, check_positive};

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

/// One RoPE frequency scheme with its parameters.
///
/// Build one directly or through the helper constructors ([`Scaling::linear`],
/// [`Scaling::ntk_mixed`], [`Yarn::new`], ...); [`RopeConfig::with_scaling`] validates
/// it against the rotary dimension.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Scaling {
    /// Plain RoPE: `theta_j = base^(-2j/d)` (transformers `default`).
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

    fn validate(&self, checks: Checks) -> Result<()> {
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
        Ok(())
    }
}

/// Llama 3.1 frequency bands (Meta's values: factor 8, low 1, high 4, L0 8192).
///
/// With wavelength `lam_j = 2 pi / theta_j`: `lam < L0/high` keeps `theta_j`;
/// `lam > L0/low` uses `theta_j / s`; in between, with
/// `t = (L0/lam - low)/(high - low)`, `inv_j = (1 - t) theta_j / s + t theta_j`.
#[derive(Debug, Clone, PartialEq)]
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

    fn validate(&self, checks: Checks) -> Result<()> {
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
}

/// LongRoPE (Ding et al. 2024) as used by Phi-3: per-pair factors `ext_j`,
/// `inv_j = theta_j / ext_j`, with `long_factor` when the sequence is longer than `L0`
/// and `short_factor` otherwise. Default attention factor
/// `sqrt(1 + ln s / ln L0)` (1 when `s <= 1`), `s = factor`.
#[derive(Debug, Clone, PartialEq)]
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

    fn validate(&self, pairs: usize) -> Result<()> {
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
}

fn check_len(field: &str, len: usize) -> Result<()> {
    if len == 0 {
        Err(RopeError::invalid(field, 0, "must be >= 1"))
    } else {
        Ok(())
    }
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

    /// The name transformers uses for this scheme's `rope_type`, or ropex's own name for
    /// the schemes transformers lacks (`ntk_old`, `ntk_fixed`, `ntk_mixed`, `ntk_aware`).
    pub fn rope_type(&self) -> &'static str {
        match self {
            Scaling::None => "default",
            Scaling::Linear { .. } => "linear",
            Scaling::NtkAware { .. } => "ntk_aware",
            Scaling::NtkOld { .. } => "ntk_old",
            Scaling::NtkFixed { .. } => "ntk_fixed",
            Scaling::NtkMixed { .. } => "ntk_mixed",
            Scaling::Dynamic { .. } => "dynamic",
            Scaling::Yarn(_) => "yarn",
            Scaling::Llama3(_) => "llama3",
            Scaling::LongRope(_) => "longrope",
            Scaling::Proportional { .. } => "proportional",
        }
    }

    /// True when the frequencies depend on the current sequence length (dynamic NTK,
    /// LongRoPE): a KV cache must re-rotate its keys when they change.
    pub fn is_length_dependent(&self) -> bool {
        matches!(self, Scaling::Dynamic { .. } | Scaling::LongRope(_))
    }

    /// Checks every parameter for a rotary dimension of `rotary_dim`
    /// (with [`Checks::Strict`]).
    pub fn validate(&self, rotary_dim: usize) -> Result<()> {
        self.validate_with(rotary_dim, Checks::Strict)
    }

    /// Checks every parameter for a rotary dimension of `rotary_dim` at the given level.
    /// ropex's own schemes (NTK-aware, -old, -fixed, -mixed) are always checked strictly.
    pub fn validate_with(&self, rotary_dim: usize, checks: Checks) -> Result<()> {
        match self {
            Scaling::None => Ok(()),
            Scaling::Linear { factor } => checks.factor("linear.factor", *factor).map(|_| ()),
            Scaling::NtkAware { factor }
            | Scaling::NtkOld { factor }
            | Scaling::NtkFixed { factor } => {
                check_factor(&format!("{}.factor", self.rope_type()), *factor).map(|_| ())
            }
            Scaling::NtkMixed { factor, b } => {
                check_factor("ntk_mixed.factor", *factor)?;
                if !(b.is_finite() && (0.0..=1.0).contains(b)) {
                    return Err(RopeError::invalid(
                        "ntk_mixed.b",
                        b,
                        "must be in [0, 1] (1 = NTK-fixed, 0 = position interpolation)",
                    ));
                }
                Ok(())
            }
            Scaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } => {
                checks.factor("dynamic.factor", *factor)?;
                check_len(
                    "dynamic.original_max_position_embeddings",
                    *original_max_position_embeddings,
                )
            }
            Scaling::Yarn(y) => y.validate(checks),
            Scaling::Llama3(l) => l.validate(checks),
            Scaling::LongRope(l) => l.validate(rotary_dim / 2),
            Scaling::Proportional {
                factor,
                partial_rotary_factor,
            } => {
                checks.factor("proportional.factor", *factor)?;
                if !(partial_rotary_factor.is_finite()
                    && (0.0..=1.0).contains(partial_rotary_factor))
                {
                    return Err(RopeError::invalid(
                        "proportional.partial_rotary_factor",
                        partial_rotary_factor,
                        "must be in [0, 1]",
                    ));
                }
                Ok(())
            }
        }
    }
}

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
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    head_dim: usize,
    rotary_dim: usize,
    exponent_dim: usize,
    base: f64,
    scaling: Scaling,
    checks: Checks,
}

impl RopeConfig {
    /// Plain RoPE over the whole head: `head_dim` must be even and non-zero, `base > 1`.
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
        scaling.validate_with(self.rotary_dim, checks)?;
        check_odd_exponent(&scaling, self.exponent_dim)?;
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
        check_odd_exponent(&cfg.scaling, dim)?;
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
    pub fn frequencies(&self) -> crate::Frequencies {
        crate::frequencies::compute(self, None)
    }

    /// Frequencies for a sequence of `seq_len` tokens. Only dynamic NTK and LongRoPE
    /// depend on it; every other scheme ignores it.
    pub fn frequencies_for_len(&self, seq_len: usize) -> crate::Frequencies {
        crate::frequencies::compute(self, Some(seq_len))
    }

    /// Frequencies of plain RoPE with the same base and dims: the reference the
    /// beta-base diagnostics compare a scheme against.
    pub fn plain_frequencies(&self) -> crate::Frequencies {
        let plain = RopeConfig {
            scaling: Scaling::None,
            ..self.clone()
        };
        plain.frequencies()
    }
}

/// YaRN's ramp has `floor(d/2)` entries in transformers, so an odd exponent dim fails there.
fn check_odd_exponent(scaling: &Scaling, exponent_dim: usize) -> Result<()> {
    if exponent_dim % 2 == 1 && matches!(scaling, Scaling::Yarn(_)) {
        return Err(RopeError::invalid(
            "partial_rotary_factor",
            format!("a rotary dim of {exponent_dim}"),
            "YaRN needs an even rotary dim (transformers fails with a shape mismatch on an odd one)",
        ));
    }
    Ok(())
}

fn check_rotary_dim(field: &str, d: usize) -> Result<()> {
    if d == 0 || d % 2 == 1 {
        Err(RopeError::invalid(
            field,
            d,
            "must be even and > 0 (RoPE rotates pairs of dims)",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
