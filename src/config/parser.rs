//! The reader's driver: [`Parser`] resolves the model's facts, walks the standardized
//! rope dicts (see `dicts`), checks each dict's keys as `_check_received_keys` does and
//! hands it to the builder of its rope type (see `build`).

use serde_json::Value;

use super::build::{Build, number_list, received_keys};
use super::facts::{Facts, HeadDim, HeadDimUse, read_facts};
use super::json::{Obj, get_some, kind, need_count, need_number, show};
use super::position_map::MAP_KEY;
use super::profile::{Convert, Profile};
use super::{ModelRope, ParseOptions};
use crate::error::{Result, RopeError};
use crate::scheme::{RopeConfig, RopeType};

/// Layer type names transformers knows (for a note on misplaced per-layer dicts).
pub(super) const LAYER_TYPES: [&str; 4] = [
    "full_attention",
    "sliding_attention",
    "chunked_attention",
    "linear_attention",
];

/// Warnings and notes collected while reading.
#[derive(Debug, Clone)]
pub(super) struct Diag {
    pub(super) strict: bool,
    pub(super) warnings: Vec<String>,
    pub(super) notes: Vec<String>,
}

impl Diag {
    /// Something transformers warns about: a warning, or an error in strict mode.
    pub(super) fn warn(
        &mut self,
        field: &str,
        value: impl std::fmt::Display,
        msg: &str,
    ) -> Result<()> {
        if self.strict {
            return Err(RopeError::invalid(
                field,
                value,
                format!("{msg} (transformers only warns; rejected in strict mode)"),
            ));
        }
        self.warnings.push(format!("{field} = {value}: {msg}"));
        Ok(())
    }

    pub(super) fn note(&mut self, msg: String) {
        self.notes.push(msg);
    }
}

/// One rope dict to interpret.
pub(super) struct Layer {
    pub(super) name: Option<String>,
    pub(super) prefix: String,
    pub(super) dict: Obj,
    /// `standardize` filled in `original_max_position_embeddings` (from
    /// `max_position_embeddings`): the config does not name it.
    pub(super) original_defaulted: bool,
}

/// Reads one config.json: the top-level object, the options, the class profile and the
/// facts about the model every rope dict is interpreted against.
pub(super) struct Parser<'a> {
    pub(super) top: &'a Obj,
    pub(super) opts: &'a ParseOptions,
    pub(super) model_type: Option<String>,
    pub(super) profile: Profile,
    pub(super) facts: Facts,
    pub(super) diag: Diag,
}

impl<'a> Parser<'a> {
    pub(super) fn new(root: &'a Value, opts: &'a ParseOptions) -> Result<Self> {
        let top = root.as_object().ok_or_else(|| {
            RopeError::Config(format!(
                "a model config must be a JSON object, got {}",
                kind(root)
            ))
        })?;
        let model_type = match top.get("model_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(RopeError::invalid(
                    "model_type",
                    show(v),
                    "must be a string",
                ));
            }
        };
        let profile = Profile::for_model_type(model_type.as_deref());
        let facts = read_facts(top, &profile)?;
        let mut diag = Diag {
            strict: opts.strict,
            warnings: Vec::new(),
            notes: Vec::new(),
        };
        if profile.is_generic() {
            diag.note(match &model_type {
                Some(t) => format!(
                    "model_type '{t}' has no ropex profile: generic transformers rules applied \
                     (profiles: {})",
                    Profile::KNOWN.join(", ")
                ),
                None => "no model_type: generic transformers rules applied".to_string(),
            });
        }
        Ok(Parser {
            top,
            opts,
            model_type,
            profile,
            facts,
            diag,
        })
    }

    pub(super) fn run(mut self) -> Result<Vec<ModelRope>> {
        let (layers, outer) = self.rope_dicts()?;
        let mut out = Vec::new();
        for layer in layers {
            let mut diag = self.diag.clone();
            let entry = self.layer(&layer, &outer, &mut diag)?;
            out.push(entry);
        }
        if out.is_empty() {
            return Err(RopeError::Config(
                "no layer type of this config uses RoPE (every per-layer rope dict is null)".into(),
            ));
        }
        Ok(out)
    }

    /// Validates and interprets one rope dict.
    pub(super) fn layer(&self, layer: &Layer, outer: &Obj, diag: &mut Diag) -> Result<ModelRope> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let f = |k: &str| format!("{p}.{k}");
        let rope_type = match d.get("rope_type") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(RopeError::UnknownRopeType {
                    name: show(v),
                    known: self.known_types(),
                });
            }
            None => unreachable!("standardize sets rope_type"),
        };
        let kind = match RopeType::from_name(&rope_type) {
            Some(t) if !t.is_ropex() || self.opts.extensions => t,
            _ => {
                return Err(RopeError::UnknownRopeType {
                    name: rope_type,
                    known: self.known_types(),
                });
            }
        };

        // Keys (`_check_received_keys`).
        let (required, optional) = received_keys(kind);
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| !d.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(RopeError::MissingKey {
                key: missing.join(", "),
                context: format!("{p} for rope_type '{rope_type}'"),
            });
        }
        for (k, v) in d {
            if v.is_object() && LAYER_TYPES.contains(&k.as_str()) {
                diag.note(format!(
                    "{p}.{k} looks like a per-layer-type rope dict, but the config declares no \
                     '{k}' layers (layer_types), so transformers reads {p} as one flat dict"
                ));
            }
            let known = k == "type"
                || k == "partial_rotary_factor"
                || required.contains(&k.as_str())
                || optional.contains(&k.as_str())
                || (self.opts.extensions && k == MAP_KEY);
            if !known {
                diag.warn(
                    &f(k),
                    show(v),
                    &format!(
                        "unrecognized key for rope_type '{rope_type}' (transformers expects {})",
                        required
                            .iter()
                            .chain(optional)
                            .chain(&["partial_rotary_factor"])
                            .copied()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )?;
            }
        }

        // Phi-3's own validation.
        if self.profile.convert == Convert::Phi3 {
            self.phi3_checks(d, p, &rope_type)?;
        }

        // `validate_rope`'s odd-head check (skipped for heterogeneous Gemma 4).
        let attr_head_dim = match self.facts.head_dim {
            HeadDim::Value(h) => Some(h),
            HeadDim::Fill => Some(self.facts.hidden_over_heads()?),
            HeadDim::Absent | HeadDim::Null => None,
        };
        if self.profile.convert != Convert::Gemma4
            && let Some(h) = attr_head_dim
            && h > 4
            && h % 2 == 1
        {
            let prf = match d.get("partial_rotary_factor") {
                None => 1.0,
                Some(v) => need_number(&f("partial_rotary_factor"), v, "a number")?,
            };
            if (h as f64 * prf) as usize == h {
                return Err(RopeError::invalid(
                    "head_dim",
                    h,
                    format!(
                        "RoPE needs an even rotary dimension, but partial_rotary_factor = {prf} \
                         rotates all {h} dims (transformers rejects this config)"
                    ),
                ));
            }
        }

        let (config, original) = Build::new(self, layer, diag).run(kind, outer)?;

        let map = self.position_map(d, p, diag)?;
        let original = match original {
            Some(o) => Some(o),
            None => match &self.facts.top_original {
                Some(v) if !v.is_null() => Some(need_count(
                    "original_max_position_embeddings",
                    v,
                    true,
                    "a non-negative integer",
                )?),
                _ => map.dca_original,
            },
        };
        Ok(ModelRope {
            config,
            rope_type,
            layer_type: layer.name.clone(),
            model_type: self.model_type.clone(),
            max_position_embeddings: self.facts.max_pos,
            original_max_position_embeddings: original,
            position_map: map.map,
            warnings: std::mem::take(&mut diag.warnings),
            notes: std::mem::take(&mut diag.notes),
        })
    }

    fn known_types(&self) -> String {
        RopeType::ALL
            .into_iter()
            .filter(|t| !t.is_ropex() || self.opts.extensions)
            .map(|t| {
                // Keep the list readable: mark ropex's own.
                if t.is_ropex() {
                    format!("{} (ropex)", t.name())
                } else {
                    t.name().to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn phi3_checks(&self, d: &Obj, p: &str, rope_type: &str) -> Result<()> {
        if !matches!(
            RopeType::from_name(rope_type),
            Some(RopeType::Default | RopeType::LongRope)
        ) {
            return Err(RopeError::invalid(
                format!("{p}.rope_type"),
                rope_type,
                "Phi-3 configs accept only 'default' or 'longrope' (legacy 'su'/'yarn' mean longrope)",
            ));
        }
        let prf = match d.get("partial_rotary_factor") {
            Some(v) => need_number(
                &format!("{p}.partial_rotary_factor"),
                v,
                "a number in (0, 1]",
            )?,
            None => 1.0,
        };
        let ndims = (self.facts.hidden_over_heads()? as f64 * prf) as usize;
        for key in ["short_factor", "long_factor"] {
            if let Some(v) = get_some(d, key) {
                let list = number_list(&format!("{p}.{key}"), v)?;
                if list.len() != ndims / 2 {
                    return Err(RopeError::invalid(
                        format!("{p}.{key}"),
                        format!("a list of {} values", list.len()),
                        format!(
                            "must have {} values (hidden_size // num_attention_heads * \
                             partial_rotary_factor / 2; Phi-3 rejects other lengths)",
                            ndims / 2
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Head dim, base and (when `partial`) partial rotary, as a plain [`RopeConfig`].
    pub(super) fn dims(
        &self,
        layer: &Layer,
        use_: HeadDimUse,
        partial: bool,
    ) -> Result<RopeConfig> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let head_dim = self.head_dim(layer, use_)?;
        let base = self.base(d, p)?;
        let cfg = RopeConfig::new(head_dim, base)?;
        if !partial {
            return Ok(cfg);
        }
        match d.get("partial_rotary_factor") {
            None => Ok(cfg),
            Some(v) => {
                let field = format!("{p}.partial_rotary_factor");
                let prf = need_number(&field, v, "a number in (0, 1]")?;
                cfg.with_partial_rotary_factor(prf).map_err(|e| match e {
                    RopeError::InvalidParameter { value, allowed, .. } => {
                        RopeError::InvalidParameter {
                            field,
                            value,
                            allowed,
                        }
                    }
                    other => other,
                })
            }
        }
    }

    pub(super) fn base(&self, d: &Obj, p: &str) -> Result<f64> {
        let field = format!("{p}.rope_theta");
        let v = d.get("rope_theta").unwrap_or(&Value::Null);
        let base = need_number(&field, v, "a number > 1")?;
        if base <= 1.0 {
            return Err(RopeError::invalid(field, show(v), "must be a number > 1"));
        }
        Ok(base)
    }
}
