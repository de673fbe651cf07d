//! `llama3`: the band factors and the original length.

use serde_json::Value;

use super::{Build, Built};
use crate::config::facts::HeadDimUse;
use crate::config::json::{is_int_literal, need_number, number, show};
use crate::error::Result;
use crate::scheme::{Llama3, Scaling};

impl Build<'_, '_> {
    pub(super) fn llama3(&mut self) -> Result<Built> {
        let (d, p) = (self.d, self.p);
        let f = |k: &str| format!("{p}.{k}");
        self.warn_factor()?;
        for key in ["low_freq_factor", "high_freq_factor"] {
            let v = d.get(key).unwrap_or(&Value::Null);
            if number(v).is_none() {
                self.diag.warn(&f(key), show(v), "must be a float or int")?;
            }
        }
        let num =
            |key: &str| need_number(&f(key), d.get(key).unwrap_or(&Value::Null), "a number > 0");
        let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
        if high <= low {
            self.diag.warn(
                &f("high_freq_factor"),
                high,
                &format!("must be greater than low_freq_factor ({low})"),
            )?;
        }
        let ov = d
            .get("original_max_position_embeddings")
            .unwrap_or(&Value::Null);
        let top_level = self.parser.facts.top_original.as_ref();
        if self.layer.original_defaulted && top_level.is_none_or(Value::is_null) {
            // transformers fills the key in from max_position_embeddings and then warns
            // that it is not below max_position_embeddings; say what actually happened.
            self.diag.warn(
                &f("original_max_position_embeddings"),
                "missing",
                &format!(
                    "llama3 needs the pretraining length; transformers uses \
                     max_position_embeddings ({}) in its place",
                    show(ov)
                ),
            )?;
        } else if !is_int_literal(ov) {
            self.diag.warn(
                &f("original_max_position_embeddings"),
                show(ov),
                "must be an integer",
            )?;
        }
        if let (Some(o), Some(max_pos)) = (self.original_at_config()?, self.parser.facts.max_pos)
            && o >= max_pos as f64
            && !self.layer.original_defaulted
        {
            self.diag.warn(
                &f("original_max_position_embeddings"),
                show(ov),
                &format!("must be less than max_position_embeddings ({max_pos})"),
            )?;
        }
        let original = self.original_at_init()?;
        let factor = self.factor()?;
        let scaling = Scaling::Llama3(Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        });
        let cfg = self.finish(scaling, HeadDimUse::OrFallback, true)?;
        Ok((cfg, Some(original)))
    }
}
