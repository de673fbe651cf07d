//! The NTK family: base changes that leave the fast pairs alone and squeeze the slow ones.
//!
//! - NTK-aware (bloc97, 2023): `base -> base * s^(d/(d-2))`, so the last pair
//!   (`j = d/2 - 1`) is interpolated by exactly `s` and pair 0 is untouched.
//! - NTK-old, the first base change of Su's "Transformer upgrade road" post 10:
//!   `base -> base * s`.
//! - NTK-fixed (Su, post 11; vLLM `ntk`): `theta_j * s^(-2(j+1)/d)`.
//! - NTK-mixed (Su, post 11): `theta_j * exp(-a (j+1)^b)` with `a = ln s / (d/2)^b`;
//!   `b = 1` is NTK-fixed and `b = 0` is position interpolation, the last pair is always
//!   `theta / s`.
//!
//! These are ropex's own rope types (transformers has none of them), always checked
//! strictly: a factor `>= 1`, `b` in `[0, 1]`.

use super::plain::theta;
use super::{Checks, Dims, RopeType, Scheme};
use crate::error::{Result, RopeError, check_factor};

/// NTK-aware exponent `d/(d-2)`; for `d = 2` the only pair has exponent 0, so any value
/// works and 1 avoids a division by zero. Dynamic NTK uses it too.
pub(super) fn exponent(d: usize) -> f64 {
    if d > 2 {
        d as f64 / (d as f64 - 2.0)
    } else {
        1.0
    }
}

/// One member of the family with its extension factor `s`.
pub(super) enum Ntk {
    /// [`crate::Scaling::NtkAware`].
    Aware(f64),
    /// [`crate::Scaling::NtkOld`].
    Old(f64),
    /// [`crate::Scaling::NtkFixed`].
    Fixed(f64),
    /// [`crate::Scaling::NtkMixed`]: `(s, b)`.
    Mixed(f64, f64),
}

impl Ntk {
    fn factor(&self) -> f64 {
        match *self {
            Ntk::Aware(s) | Ntk::Old(s) | Ntk::Fixed(s) | Ntk::Mixed(s, _) => s,
        }
    }
}

impl Scheme for Ntk {
    fn rope_type(&self) -> RopeType {
        match self {
            Ntk::Aware(_) => RopeType::NtkAware,
            Ntk::Old(_) => RopeType::NtkOld,
            Ntk::Fixed(_) => RopeType::NtkFixed,
            Ntk::Mixed(..) => RopeType::NtkMixed,
        }
    }

    fn validate(&self, _pairs: usize, _exponent_dim: usize, _checks: Checks) -> Result<()> {
        let name = self.rope_type().name();
        check_factor(&format!("{name}.factor"), self.factor())?;
        if let Ntk::Mixed(_, b) = *self
            && !(b.is_finite() && (0.0..=1.0).contains(&b))
        {
            return Err(RopeError::invalid(
                "ntk_mixed.b",
                b,
                "must be in [0, 1] (1 = NTK-fixed, 0 = position interpolation)",
            ));
        }
        Ok(())
    }

    fn inv_freq(&self, dims: &Dims, _seq_len: Option<usize>) -> Vec<f64> {
        let (base, pairs, d) = (dims.base, dims.pairs, dims.exponent_dim);
        match *self {
            Ntk::Aware(s) => theta(base * s.powf(exponent(d)), pairs, d),
            Ntk::Old(s) => theta(base * s, pairs, d),
            Ntk::Fixed(s) => mixed(&dims.theta(), s, 1.0),
            Ntk::Mixed(s, b) => mixed(&dims.theta(), s, b),
        }
    }
}

/// NTK-mixed (Su, post 11): `theta_j * exp(-a (j+1)^b)`, `a = ln s / (d/2)^b`.
fn mixed(theta: &[f64], s: f64, b: f64) -> Vec<f64> {
    let half = theta.len() as f64;
    let a = s.ln() / half.powf(b);
    theta
        .iter()
        .enumerate()
        .map(|(j, &t)| t * (-a * ((j + 1) as f64).powf(b)).exp())
        .collect()
}
