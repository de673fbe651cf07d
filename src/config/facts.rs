//! What the model tells the rope code: hidden size, heads, `head_dim` (and how each
//! config class fills it in), lengths and the declared layer types; and the two ways
//! transformers' rope functions read `head_dim`.

use std::collections::BTreeSet;

use serde_json::Value;

use super::json::{Obj, need_count, show, truthy};
use super::parser::{Layer, Parser};
use super::profile::{Convert, HeadDimRule, LayerRule, Profile};
use crate::error::{Result, RopeError};
use crate::limits::MAX_HEAD_DIM;

/// `head_dim` as the rope code sees the config attribute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum HeadDim {
    /// No attribute.
    Absent,
    /// The attribute is `None`.
    Null,
    /// A value.
    Value(usize),
    /// Filled in by the class as `hidden_size // num_attention_heads`.
    Fill,
}

/// The facts about the model a rope dict is interpreted against.
pub(super) struct Facts {
    pub(super) hidden: Option<usize>,
    pub(super) heads: Option<usize>,
    pub(super) head_dim: HeadDim,
    pub(super) global_head_dim: Option<usize>,
    pub(super) max_pos: Option<usize>,
    /// Top-level `original_max_position_embeddings` (Phi-3: its typed field), applied at
    /// model init.
    pub(super) top_original: Option<Value>,
    pub(super) labels: BTreeSet<String>,
}

impl Facts {
    pub(super) fn hidden_over_heads(&self) -> Result<usize> {
        let hidden = self.hidden.ok_or_else(|| RopeError::MissingKey {
            key: "hidden_size".into(),
            context: "config.json (needed for head_dim = hidden_size // num_attention_heads)"
                .into(),
        })?;
        let heads = self.heads.ok_or_else(|| RopeError::MissingKey {
            key: "num_attention_heads".into(),
            context: "config.json (needed for head_dim = hidden_size // num_attention_heads)"
                .into(),
        })?;
        if heads == 0 {
            return Err(RopeError::invalid(
                "num_attention_heads",
                0,
                "must be >= 1 (head_dim = hidden_size // num_attention_heads)",
            ));
        }
        Ok(hidden / heads)
    }
}

/// Which of transformers' two `head_dim` reads a rope type uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum HeadDimUse {
    /// `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`.
    OrFallback,
    /// `getattr(config, "head_dim", hidden_size // num_attention_heads)`.
    Getattr,
}

impl Parser<'_> {
    /// `head_dim` as the rope code of a type reads it.
    pub(super) fn head_dim(&self, layer: &Layer, use_: HeadDimUse) -> Result<usize> {
        let gemma4_full = self.profile.convert == Convert::Gemma4
            && layer.name.as_deref() == Some("full_attention");
        let h = match (self.facts.head_dim, use_) {
            _ if gemma4_full => self.facts.global_head_dim.unwrap_or(512),
            (HeadDim::Value(v), HeadDimUse::OrFallback) if v > 0 => v,
            (HeadDim::Value(v), HeadDimUse::Getattr) => v,
            (HeadDim::Null, HeadDimUse::Getattr) => {
                return Err(RopeError::invalid(
                    "head_dim",
                    "null",
                    format!(
                        "must be an integer: transformers' {} rope reads getattr(config, \
                         'head_dim', ...) without a fallback and fails on null",
                        layer
                            .dict
                            .get("rope_type")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                    ),
                ));
            }
            _ => self.facts.hidden_over_heads()?,
        };
        if h > MAX_HEAD_DIM {
            return Err(RopeError::invalid(
                "head_dim",
                h,
                format!("must be <= {MAX_HEAD_DIM}"),
            ));
        }
        Ok(h)
    }
}

/// An integer field of the top level (class default when absent).
fn read_int(
    top: &Obj,
    profile: &Profile,
    key: &str,
    default: Option<usize>,
) -> Result<Option<usize>> {
    match top.get(key) {
        None => Ok(default),
        Some(Value::Null) if profile.strict_types => Err(RopeError::invalid(
            key,
            "null",
            "must be a non-negative integer",
        )),
        Some(Value::Null) => Ok(None),
        Some(v) => need_count(key, v, !profile.strict_types, "a non-negative integer").map(Some),
    }
}

pub(super) fn read_facts(top: &Obj, profile: &Profile) -> Result<Facts> {
    let hidden = read_int(top, profile, "hidden_size", profile.hidden)?;
    let heads = read_int(top, profile, "num_attention_heads", profile.heads)?;
    let max_pos = read_int(top, profile, "max_position_embeddings", profile.max_pos)?;
    if profile.divisible_heads
        && let (Some(h), Some(n)) = (hidden, heads)
        && (n == 0 || h % n != 0)
    {
        return Err(RopeError::invalid(
            "hidden_size",
            h,
            format!("must be a multiple of num_attention_heads ({n})"),
        ));
    }
    let head_dim = match profile.head_dim {
        HeadDimRule::Field {
            default,
            fill_none,
            nullable,
        } => match top.get("head_dim") {
            None => match default {
                Some(v) => HeadDim::Value(v),
                None if fill_none => HeadDim::Fill,
                None => HeadDim::Null,
            },
            Some(Value::Null) if !nullable => {
                return Err(RopeError::invalid(
                    "head_dim",
                    "null",
                    "must be a positive integer",
                ));
            }
            Some(Value::Null) if fill_none => HeadDim::Fill,
            Some(Value::Null) => HeadDim::Null,
            Some(v) => HeadDim::Value(need_count(
                "head_dim",
                v,
                !profile.strict_types,
                "a positive integer",
            )?),
        },
        HeadDimRule::NoField => match top.get("head_dim") {
            None => HeadDim::Absent,
            Some(Value::Null) => HeadDim::Null,
            Some(v) => HeadDim::Value(need_count("head_dim", v, true, "a positive integer")?),
        },
        // DeepSeek-V3 sets head_dim = qk_rope_head_dim in __post_init__, but a head_dim key
        // of config.json is set afterwards and wins (null included).
        HeadDimRule::FromKey(key, default) => match top.get("head_dim") {
            None => HeadDim::Value(read_int(top, profile, key, Some(default))?.unwrap_or(default)),
            Some(Value::Null) => HeadDim::Null,
            Some(v) => HeadDim::Value(need_count("head_dim", v, true, "a positive integer")?),
        },
    };
    let global_head_dim = read_int(top, profile, "global_head_dim", None)?;
    let top_original = match profile.original_field {
        Some(default) => {
            let v = read_int(
                top,
                profile,
                "original_max_position_embeddings",
                Some(default),
            )?;
            Some(v.map_or(Value::Null, Value::from))
        }
        None => top.get("original_max_position_embeddings").cloned(),
    };
    let labels = layer_labels(top, profile)?;
    let facts = Facts {
        hidden,
        heads,
        head_dim,
        global_head_dim,
        max_pos,
        top_original,
        labels,
    };
    if facts.head_dim == HeadDim::Fill {
        facts.hidden_over_heads()?;
    }
    Ok(facts)
}

/// The layer types a config declares (its `layer_types`, or the class default).
fn layer_labels(top: &Obj, profile: &Profile) -> Result<BTreeSet<String>> {
    if let Some(v) = top.get("layer_types").filter(|v| !v.is_null()) {
        let a = v.as_array().ok_or_else(|| {
            RopeError::invalid("layer_types", show(v), "must be a list of strings")
        })?;
        return a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    RopeError::invalid("layer_types", show(v), "must be a list of strings")
                })
            })
            .collect();
    }
    let n = read_int(top, profile, "num_hidden_layers", profile.layers)?.unwrap_or(0);
    let mut labels = BTreeSet::new();
    let mut add = |s: &str| {
        labels.insert(s.to_string());
    };
    // Which labels the class's default list contains (computed without building a list
    // of `num_hidden_layers` entries, which may be absurdly large).
    match profile.layer_rule {
        LayerRule::None => {}
        LayerRule::Qwen2 => {
            let sliding = top.get("use_sliding_window").is_some_and(truthy)
                && top.get("sliding_window").is_none_or(|v| !v.is_null());
            let max_window = read_int(top, profile, "max_window_layers", Some(28))?.unwrap_or(28);
            // layer i is sliding iff `sliding && i >= max_window`
            if n > 0 && (!sliding || max_window > 0) {
                add("full_attention");
            }
            if sliding && n > max_window {
                add("sliding_attention");
            }
        }
        LayerRule::EverySixth => {
            // layer i is full iff (i + 1) % 6 == 0
            if n >= 1 {
                add("sliding_attention");
            }
            if n >= 6 || (profile.convert == Convert::Gemma4 && n > 0) {
                // Gemma 4 also forces its last layer to full attention.
                add("full_attention");
            }
        }
        LayerRule::Alternating => {
            if n >= 1 {
                add("sliding_attention");
            }
            if n >= 2 {
                add("full_attention");
            }
        }
    }
    Ok(labels)
}
