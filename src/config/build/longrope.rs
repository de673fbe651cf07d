//! `longrope` (Phi-3): the factor lists, broadcast of a single value, the derived factor.

use serde_json::Value;

use super::{Build, Built, number_list};
use crate::config::facts::HeadDimUse;
use crate::config::json::{get_some, need_number, number, show};
use crate::error::{Result, RopeError};
use crate::scheme::{LongRope, Scaling};

impl Build<'_, '_> {
    pub(super) fn longrope(&mut self) -> Result<Built> {
        let (d, p) = (self.d, self.p);
        let f = |k: &str| format!("{p}.{k}");
        let head_dim = self.parser.head_dim(self.layer, HeadDimUse::Getattr)?;
        let prf = match d.get("partial_rotary_factor") {
            None => 1.0,
            Some(v) => need_number(&f("partial_rotary_factor"), v, "a number in (0, 1]")?,
        };
        let dim = (head_dim as f64 * prf) as usize;
        let mut lists = Vec::new();
        for key in ["short_factor", "long_factor"] {
            let list = number_list(&f(key), d.get(key).unwrap_or(&Value::Null))?;
            if list.len() != dim / 2 {
                self.diag.warn(
                    &f(key),
                    format!("a list of {} values", list.len()),
                    &format!("must have length {}", dim / 2),
                )?;
            }
            lists.push(list);
        }
        let original_cfg = self.original_at_config()?;
        let factor_v = get_some(d, "factor");
        match (factor_v, original_cfg) {
            (None, Some(_)) => self.diag.warn(
                &f("factor"),
                d.get("factor").map_or("missing".into(), show),
                "not set: it is derived from max_position_embeddings / original_max_position_embeddings \
                 (set factor instead)",
            )?,
            (None, None) => self.diag.warn(
                &f("factor"),
                d.get("factor").map_or("missing".into(), show),
                "missing required key",
            )?,
            (Some(v), _) if number(v).is_none_or(|x| x < 1.0) => {
                self.diag.warn(&f("factor"), show(v), "must be a float or int >= 1")?
            }
            _ => {}
        }
        if let Some(v) = get_some(d, "attention_factor")
            && number(v).is_none_or(|x| x < 0.0)
        {
            self.diag.warn(
                &f("attention_factor"),
                show(v),
                "must be a float or int greater than 0",
            )?;
        }

        let original = self.original_at_init()?;
        let factor = self.factor_or_ratio(original)?;
        let attention_factor = get_some(d, "attention_factor")
            .map(|v| need_number(&f("attention_factor"), v, "a number > 0"))
            .transpose()?;
        let cfg = self.parser.dims(self.layer, HeadDimUse::Getattr, true)?;
        let pairs = cfg.rotary_dim() / 2;
        let long = lists.pop().expect("two lists");
        let short = lists.pop().expect("two lists");
        let mut fit = |key: &str, list: Vec<f64>| -> Result<Vec<f64>> {
            if list.len() == pairs {
                Ok(list)
            } else if list.len() == 1 {
                self.diag.note(format!(
                    "{p}.{key} has a single value: broadcast to all {pairs} pairs (as torch does)"
                ));
                Ok(vec![list[0]; pairs])
            } else {
                Err(RopeError::invalid(
                    format!("{p}.{key}"),
                    format!("a list of {} values", list.len()),
                    format!(
                        "must have one value per rotary pair ({pairs}); transformers fails with \
                         a shape mismatch"
                    ),
                ))
            }
        };
        let short_factor = fit("short_factor", short)?;
        let long_factor = fit("long_factor", long)?;
        let scaling = Scaling::LongRope(LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: original,
            factor,
            attention_factor,
        });
        let cfg = self.finish_on(cfg, scaling)?;
        Ok((cfg, Some(original)))
    }
}
