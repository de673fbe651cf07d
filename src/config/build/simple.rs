//! The rope types with at most a factor: `default`, `linear`, `dynamic`, `proportional`
//! and ropex's NTK family.

use serde_json::Value;

use super::{Build, Built};
use crate::config::facts::HeadDimUse;
use crate::config::json::{get_some, need_number, number, show};
use crate::error::{Result, RopeError};
use crate::scheme::{RopeType, Scaling};

impl Build<'_, '_> {
    pub(super) fn default(&mut self) -> Result<Built> {
        let uses_partial = self.parser.profile.default_uses_partial;
        if !uses_partial
            && let Some(v) = self.d.get("partial_rotary_factor")
            && number(v) != Some(1.0)
        {
            self.diag.note(format!(
                "{}.partial_rotary_factor = {} is ignored: transformers' default RoPE for \
                 model_type '{}' rotates the full head_dim",
                self.p,
                show(v),
                self.parser.profile.model_type
            ));
        }
        let cfg = self
            .parser
            .dims(self.layer, HeadDimUse::OrFallback, uses_partial)?;
        Ok((cfg, None))
    }

    pub(super) fn dynamic(&mut self) -> Result<Built> {
        let (d, p) = (self.d, self.p);
        self.warn_factor()?;
        if d.contains_key("original_max_position_embeddings") {
            self.diag.note(format!(
                "{p}.original_max_position_embeddings is ignored by dynamic NTK: transformers \
                 uses max_position_embeddings as its original length"
            ));
        }
        let factor = self.factor()?;
        let l0 = self.max_pos("dynamic NTK uses it as the original length".into())?;
        let cfg = self.parser.dims(self.layer, HeadDimUse::Getattr, true)?;
        if cfg.exponent_dim() == 2 {
            return Err(RopeError::invalid(
                "rotary dim",
                2,
                "dynamic NTK needs a rotary dim > 2 (transformers divides by dim - 2)",
            ));
        }
        let scaling = Scaling::Dynamic {
            factor,
            original_max_position_embeddings: l0,
        };
        let cfg = self.finish_on(cfg, scaling)?;
        Ok((cfg, None))
    }

    pub(super) fn linear(&mut self) -> Result<Built> {
        self.warn_factor()?;
        let factor = self.factor()?;
        let cfg = self.finish(Scaling::Linear { factor }, HeadDimUse::OrFallback, true)?;
        Ok((cfg, None))
    }

    pub(super) fn proportional(&mut self) -> Result<Built> {
        let (d, p) = (self.d, self.p);
        let f = |k: &str| format!("{p}.{k}");
        let prf = match d.get("partial_rotary_factor") {
            None | Some(Value::Null) => {
                self.diag.warn(
                    &f("partial_rotary_factor"),
                    "null",
                    "is missing: proportional RoPE defaults to 1.0, i.e. plain RoPE; give a \
                     value in [0, 1)",
                )?;
                if d.contains_key("partial_rotary_factor") {
                    return Err(RopeError::invalid(
                        f("partial_rotary_factor"),
                        "null",
                        "must be a number in [0, 1] (transformers fails on null)",
                    ));
                }
                1.0
            }
            Some(v) => need_number(&f("partial_rotary_factor"), v, "a number in [0, 1]")?,
        };
        let factor = match d.get("factor") {
            None => 1.0,
            Some(v) => {
                self.diag.note(format!(
                    "{p}.factor = {} divides every proportional frequency, although \
                     transformers' validation calls the key unrecognized",
                    show(v)
                ));
                need_number(&f("factor"), v, "a number > 0")?
            }
        };
        let scaling = Scaling::Proportional {
            factor,
            partial_rotary_factor: prf,
        };
        let cfg = self.finish(scaling, HeadDimUse::OrFallback, false)?;
        Ok((cfg, None))
    }

    pub(super) fn ntk(&mut self, rope_type: RopeType) -> Result<Built> {
        let (d, p) = (self.d, self.p);
        let factor = self.factor()?;
        let scaling = match rope_type {
            RopeType::NtkAware => Scaling::NtkAware { factor },
            RopeType::NtkOld => Scaling::NtkOld { factor },
            RopeType::NtkFixed => Scaling::NtkFixed { factor },
            _ => {
                let b = match get_some(d, "mixed_b") {
                    None => 0.625,
                    Some(v) => need_number(&format!("{p}.mixed_b"), v, "a number in [0, 1]")?,
                };
                Scaling::NtkMixed { factor, b }
            }
        };
        let cfg = self.finish(scaling, HeadDimUse::OrFallback, true)?;
        Ok((cfg, None))
    }
}
