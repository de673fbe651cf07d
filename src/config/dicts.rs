//! `convert_rope_params_to_dict` and `standardize_rope_params`: from config.json's
//! `rope_scaling` / `rope_parameters` (and each class's legacy conversion) to the list of
//! standardized rope dicts, one per layer type.

use serde_json::Value;

use super::json::{Obj, kind, setdefault, show, truthy};
use super::parser::{Layer, Parser};
use super::profile::{Convert, gemma3_default, gemma4_default, gpt_oss_default};
use crate::error::{Result, RopeError};
use crate::scheme::RopeType;

impl Parser<'_> {
    /// `convert_rope_params_to_dict` + `standardize_rope_params`: the rope dicts to
    /// interpret, and the outer `rope_parameters` map (for yarn's `truncate`).
    pub(super) fn rope_dicts(&mut self) -> Result<(Vec<Layer>, Obj)> {
        let top = self.top;
        let rs = top.get("rope_scaling").filter(|v| !v.is_null());
        let rp_val = top.get("rope_parameters").filter(|v| !v.is_null());
        let object = |field: &str, v: &Value| -> Result<Obj> {
            v.as_object().cloned().ok_or_else(|| {
                RopeError::invalid(
                    field,
                    show(v),
                    format!("must be an object (got {})", kind(v)),
                )
            })
        };
        let mut src = "rope_parameters";
        let rp: Obj = match self.profile.convert {
            Convert::Standard | Convert::Phi3 | Convert::Gemma4 => {
                if let Some(rs) = rs.filter(|v| truthy(v)) {
                    src = "rope_scaling";
                    if rp_val.is_some_and(truthy) {
                        self.diag.note(
                            "both rope_scaling and rope_parameters are set: rope_scaling replaces \
                             rope_parameters entirely (transformers)"
                                .into(),
                        );
                    }
                    object("rope_scaling", rs)?
                } else if let Some(v) = rp_val {
                    object("rope_parameters", v)?
                } else if self.profile.gpt_oss_default_rope {
                    gpt_oss_default()
                } else if self.profile.convert == Convert::Gemma4 {
                    gemma4_default()
                } else {
                    Obj::new()
                }
            }
            Convert::Gemma3 => {
                let mut rp = match rp_val {
                    Some(v) => object("rope_parameters", v)?,
                    None => gemma3_default(),
                };
                if let Some(rs) = rs {
                    let rs = object("rope_scaling", rs)?;
                    match rp.get_mut("full_attention") {
                        Some(Value::Object(full)) => {
                            for (k, v) in rs {
                                full.insert(k, v);
                            }
                        }
                        _ => {
                            return Err(RopeError::invalid(
                                "rope_parameters.full_attention",
                                rp.get("full_attention").map_or("missing".into(), show),
                                "must be an object for Gemma 3's legacy rope_scaling to be merged into it",
                            ));
                        }
                    }
                }
                for (layer, theta_key, default) in [
                    ("full_attention", "rope_theta", 1_000_000.0),
                    ("sliding_attention", "rope_local_base_freq", 10_000.0),
                ] {
                    if rp.get(layer).is_none_or(Value::is_null) {
                        rp.insert(
                            layer.into(),
                            serde_json::json!({"rope_type": RopeType::Default.name()}),
                        );
                    }
                    let theta = top.get(theta_key).cloned().unwrap_or(Value::from(default));
                    match rp.get_mut(layer) {
                        Some(Value::Object(d)) => setdefault(d, "rope_theta", theta),
                        Some(v) => {
                            return Err(RopeError::invalid(
                                format!("rope_parameters.{layer}"),
                                show(v),
                                "must be an object",
                            ));
                        }
                        None => unreachable!("inserted above"),
                    }
                }
                rp
            }
        };

        // Defaults moved into the dict(s).
        let theta = match self.profile.convert {
            Convert::Gemma3 => None, // already placed per layer
            Convert::Gemma4 => top.get("rope_theta").cloned().or(Some(Value::Null)),
            _ => Some(
                top.get("rope_theta")
                    .cloned()
                    .unwrap_or(Value::from(self.profile.default_theta)),
            ),
        };
        let partial = match self.profile.convert {
            Convert::Phi3 => Some(
                top.get("partial_rotary_factor")
                    .cloned()
                    .unwrap_or(Value::from(1.0)),
            ),
            _ => top
                .get("partial_rotary_factor")
                .cloned()
                .or(self.profile.partial_default.map(Value::from))
                .filter(|v| !v.is_null()),
        };
        let nested: Vec<String> = rp
            .keys()
            .filter(|k| self.facts.labels.contains(*k))
            .cloned()
            .collect();

        let mut layers = Vec::new();
        if nested.is_empty() {
            let mut d = rp.clone();
            let original_defaulted =
                self.standardize(&mut d, theta.as_ref(), partial.as_ref(), false);
            if self.profile.convert == Convert::Phi3
                && matches!(d.get("rope_type"), Some(Value::String(t)) if t == "su" || t == RopeType::Yarn.name())
            {
                d.insert("rope_type".into(), Value::from(RopeType::LongRope.name()));
            }
            layers.push(Layer {
                name: None,
                prefix: src.to_string(),
                dict: d,
                original_defaulted,
            });
        } else {
            for name in &nested {
                let prefix = format!("{src}.{name}");
                match &rp[name] {
                    Value::Null => self.diag.note(format!(
                        "{prefix} is null: layer type '{name}' has no RoPE (skipped)"
                    )),
                    Value::Object(d) => {
                        let mut d = d.clone();
                        let original_defaulted =
                            self.standardize(&mut d, theta.as_ref(), partial.as_ref(), true);
                        layers.push(Layer {
                            name: Some(name.clone()),
                            prefix,
                            dict: d,
                            original_defaulted,
                        });
                    }
                    v => {
                        return Err(RopeError::invalid(
                            prefix,
                            show(v),
                            format!("must be an object or null (got {})", kind(v)),
                        ));
                    }
                }
            }
        }
        Ok((layers, rp))
    }

    /// `standardize_rope_params` on one dict, as seen at config time. True when it filled
    /// in `original_max_position_embeddings` from `max_position_embeddings` (the config
    /// did not name it).
    fn standardize(
        &self,
        d: &mut Obj,
        theta: Option<&Value>,
        partial: Option<&Value>,
        nested: bool,
    ) -> bool {
        if let Some(t) = theta {
            setdefault(d, "rope_theta", t.clone());
        }
        if let Some(p) = partial {
            setdefault(d, "partial_rotary_factor", p.clone());
        }
        let legacy = d
            .get("type")
            .cloned()
            .unwrap_or(Value::from(RopeType::Default.name()));
        setdefault(d, "rope_type", legacy);
        let scaled = d
            .get("rope_type")
            .and_then(Value::as_str)
            .and_then(RopeType::from_name)
            .is_some_and(|t| matches!(t, RopeType::Llama3 | RopeType::Yarn | RopeType::LongRope));
        if !scaled {
            return false;
        }
        let max_pos = self.facts.max_pos.map_or(Value::Null, Value::from);
        match (&self.profile.original_field, nested) {
            (Some(_), false) => {
                let v = self.facts.top_original.clone().unwrap_or(Value::Null);
                d.insert("original_max_position_embeddings".into(), v);
                false
            }
            _ => {
                let absent = !d.contains_key("original_max_position_embeddings");
                setdefault(d, "original_max_position_embeddings", max_pos);
                absent
            }
        }
    }
}
