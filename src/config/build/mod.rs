//! One builder per rope type: each reads its keys from the standardized rope dict,
//! warns where transformers warns, and hands a [`Scaling`] to [`Build::finish`], the
//! epilogue they share (head dim, base, partial rotary, validation, error renaming).

mod llama3;
mod longrope;
mod simple;
mod yarn;

use serde_json::Value;

use super::facts::HeadDimUse;
use super::json::{Obj, get_some, kind, need_count, need_number, number, show};
use super::parser::{Diag, Layer, Parser};
use crate::error::{Result, RopeError};
use crate::scheme::{Checks, RopeConfig, RopeType, Scaling};

/// What a builder returns: the config, and the `original_max_position_embeddings` the
/// scheme computes with (llama3, yarn, longrope).
pub(super) type Built = (RopeConfig, Option<usize>);

/// The keys `_check_received_keys` expects for a rope type: `(required, optional)`.
pub(super) fn received_keys(
    rope_type: RopeType,
) -> (&'static [&'static str], &'static [&'static str]) {
    match rope_type {
        RopeType::Default => (&["rope_type"], &["rope_theta"]),
        RopeType::Linear
        | RopeType::Dynamic
        | RopeType::NtkAware
        | RopeType::NtkOld
        | RopeType::NtkFixed => (&["rope_type", "factor"], &["rope_theta"]),
        RopeType::NtkMixed => (&["rope_type", "factor"], &["rope_theta", "mixed_b"]),
        RopeType::Yarn => (
            &["rope_type", "factor", "original_max_position_embeddings"],
            &[
                "rope_theta",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            ],
        ),
        RopeType::LongRope => (
            &[
                "rope_type",
                "short_factor",
                "long_factor",
                "original_max_position_embeddings",
            ],
            &["rope_theta", "attention_factor", "factor"],
        ),
        RopeType::Llama3 => (
            &[
                "rope_type",
                "factor",
                "original_max_position_embeddings",
                "low_freq_factor",
                "high_freq_factor",
                "rope_theta",
            ],
            &[],
        ),
        RopeType::Proportional => (&["rope_type", "rope_theta"], &[]),
    }
}

/// One rope dict being built: the parser's facts, the dict, its key prefix and the
/// diagnostics it adds to.
pub(super) struct Build<'p, 'a> {
    pub(super) parser: &'p Parser<'a>,
    pub(super) layer: &'p Layer,
    /// The rope dict.
    pub(super) d: &'p Obj,
    /// Its key prefix (`rope_parameters`, `rope_scaling.full_attention`, ...).
    pub(super) p: &'p str,
    pub(super) diag: &'p mut Diag,
}

impl<'p, 'a> Build<'p, 'a> {
    pub(super) fn new(parser: &'p Parser<'a>, layer: &'p Layer, diag: &'p mut Diag) -> Self {
        Build {
            parser,
            layer,
            d: &layer.dict,
            p: &layer.prefix,
            diag,
        }
    }

    /// Builds the rope type's config.
    pub(super) fn run(mut self, rope_type: RopeType, outer: &Obj) -> Result<Built> {
        match rope_type {
            RopeType::Default => self.default(),
            RopeType::Linear => self.linear(),
            RopeType::Dynamic => self.dynamic(),
            RopeType::Yarn => self.yarn(outer),
            RopeType::LongRope => self.longrope(),
            RopeType::Llama3 => self.llama3(),
            RopeType::Proportional => self.proportional(),
            RopeType::NtkAware | RopeType::NtkOld | RopeType::NtkFixed | RopeType::NtkMixed => {
                self.ntk(rope_type)
            }
        }
    }

    /// The shared epilogue: head dim, base and (when `partial`) partial rotary as the
    /// rope type reads them, then `scaling` on top.
    pub(super) fn finish(
        &self,
        scaling: Scaling,
        use_: HeadDimUse,
        partial: bool,
    ) -> Result<RopeConfig> {
        let cfg = self.parser.dims(self.layer, use_, partial)?;
        self.finish_on(cfg, scaling)
    }

    /// Sets `scaling` on `cfg`, validated as transformers computes (ropex's own types
    /// strictly), with validation errors renamed to the config key (`yarn.factor` ->
    /// `rope_scaling.factor`).
    pub(super) fn finish_on(&self, cfg: RopeConfig, scaling: Scaling) -> Result<RopeConfig> {
        let scheme = format!("{}.", scaling.rope_type());
        let checks = if scaling.kind().is_ropex() {
            Checks::Strict
        } else {
            Checks::Transformers
        };
        let cfg = match checks {
            Checks::Strict => cfg.with_scaling(scaling),
            Checks::Transformers => cfg.with_scaling_lenient(scaling),
        };
        cfg.map_err(|e| prefix_error(e, self.p, &scheme))
    }

    /// `max_position_embeddings`, or [`RopeError::MissingKey`] saying `why` it is needed.
    pub(super) fn max_pos(&self, why: String) -> Result<usize> {
        self.parser
            .facts
            .max_pos
            .ok_or_else(|| RopeError::MissingKey {
                key: "max_position_embeddings".into(),
                context: format!("config.json ({why})"),
            })
    }

    /// `factor` as linear/dynamic/ropex types read it: required and numeric.
    pub(super) fn factor(&self) -> Result<f64> {
        let (d, p) = (self.d, self.p);
        let field = format!("{p}.factor");
        need_number(&field, d.get("factor").unwrap_or(&Value::Null), "a number")
    }

    /// The `factor` warning linear, dynamic, yarn and llama3 share.
    pub(super) fn warn_factor(&mut self) -> Result<()> {
        let (d, p) = (self.d, self.p);
        let v = d.get("factor").unwrap_or(&Value::Null);
        if number(v).is_none_or(|x| x < 1.0) {
            self.diag.warn(
                &format!("{p}.factor"),
                show(v),
                "must be a float or int >= 1",
            )?;
        }
        Ok(())
    }

    /// The `original_max_position_embeddings` a scaled type computes with (model init:
    /// a top-level value overrides the dict's for a flat config).
    pub(super) fn original_at_init(&mut self) -> Result<usize> {
        let (d, p) = (self.d, self.p);
        let inner = d.get("original_max_position_embeddings");
        let (field, v) = match (&self.parser.facts.top_original, &self.layer.name) {
            (Some(top), None) if self.parser.profile.original_field.is_none() => {
                if let Some(inner) = inner.filter(|i| *i != top) {
                    self.diag.note(format!(
                        "top-level original_max_position_embeddings = {} overrides {p}.\
                         original_max_position_embeddings = {} (transformers re-standardizes \
                         the rope dict at model init)",
                        show(top),
                        show(inner)
                    ));
                }
                ("original_max_position_embeddings".to_string(), top.clone())
            }
            (Some(top), None) => {
                // Phi-3: already applied at config time.
                ("original_max_position_embeddings".to_string(), top.clone())
            }
            _ => (
                format!("{p}.original_max_position_embeddings"),
                inner.cloned().unwrap_or(Value::Null),
            ),
        };
        let n = need_count(&field, &v, true, "a positive integer")?;
        if n == 0 {
            return Err(RopeError::invalid(field, 0, "must be a positive integer"));
        }
        Ok(n)
    }

    /// `factor`, or `max_position_embeddings / original` when it is missing or null.
    pub(super) fn factor_or_ratio(&mut self, original: usize) -> Result<f64> {
        let (d, p) = (self.d, self.p);
        match get_some(d, "factor") {
            Some(v) => need_number(&format!("{p}.factor"), v, "a number"),
            None => {
                let max_pos = self.max_pos(format!(
                    "needed to derive {p}.factor = max_position_embeddings / \
                     original_max_position_embeddings"
                ))?;
                let s = max_pos as f64 / original as f64;
                self.diag.note(format!(
                    "{p}.factor derived as max_position_embeddings / \
                     original_max_position_embeddings = {max_pos} / {original} = {s}"
                ));
                Ok(s)
            }
        }
    }

    /// The config-time `original_max_position_embeddings`, for transformers' warnings.
    pub(super) fn original_at_config(&self) -> Result<Option<f64>> {
        let (d, p) = (self.d, self.p);
        match d.get("original_max_position_embeddings") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(need_number(
                &format!("{p}.original_max_position_embeddings"),
                v,
                "a positive integer",
            )?)),
        }
    }
}

/// Renames a scaling validation error's field (`yarn.factor`) to the config key
/// (`rope_scaling.factor`).
fn prefix_error(e: RopeError, prefix: &str, scheme: &str) -> RopeError {
    match e {
        RopeError::InvalidParameter {
            field,
            value,
            allowed,
        } => {
            let field = match field.strip_prefix(scheme) {
                Some(rest) => format!("{prefix}.{rest}"),
                None => field,
            };
            RopeError::InvalidParameter {
                field,
                value,
                allowed,
            }
        }
        other => other,
    }
}

/// A list of finite numbers.
pub(super) fn number_list(field: &str, v: &Value) -> Result<Vec<f64>> {
    let a = v.as_array().ok_or_else(|| {
        RopeError::invalid(
            field,
            show(v),
            format!("must be a list of numbers (got {})", kind(v)),
        )
    })?;
    a.iter()
        .enumerate()
        .map(|(i, x)| need_number(&format!("{field}[{i}]"), x, "a number > 0"))
        .collect()
}
