//! `yarn`: transformers' config-time warnings, then the init-time values.

use serde_json::Value;

use super::{Build, Built};
use crate::config::facts::HeadDimUse;
use crate::config::json::{Obj, get_some, need_number, number, show, truthy};
use crate::error::{Result, RopeError};
use crate::scheme::{Scaling, Yarn};

impl Build<'_, '_> {
    pub(super) fn yarn(&mut self, outer: &Obj) -> Result<Built> {
        let (d, p) = (self.d, self.p);
        let f = |k: &str| format!("{p}.{k}");
        // Config-time warnings.
        self.warn_factor()?;
        if let Some(v) = get_some(d, "attention_factor")
            && (!matches!(v, Value::Number(n) if n.is_f64()) || number(v).is_some_and(|x| x < 0.0))
        {
            self.diag.warn(
                &f("attention_factor"),
                show(v),
                "must be a float greater than 0",
            )?;
        }
        for key in ["beta_fast", "beta_slow"] {
            if let Some(v) = get_some(d, key)
                && number(v).is_none()
            {
                self.diag.warn(&f(key), show(v), "must be a float or int")?;
            }
        }
        let beta = |key: &str, default: f64| -> Result<f64> {
            match get_some(d, key) {
                Some(v) if truthy(v) => need_number(&f(key), v, "a number > 0"),
                _ => Ok(default),
            }
        };
        let (beta_fast, beta_slow) = (beta("beta_fast", 32.0)?, beta("beta_slow", 1.0)?);
        if beta_fast < beta_slow {
            self.diag.warn(
                &f("beta_fast"),
                beta_fast,
                &format!("must be greater than beta_slow ({beta_slow})"),
            )?;
        }
        for key in ["beta_fast", "beta_slow"] {
            if d.get(key).is_some_and(|v| number(v) == Some(0.0)) {
                self.diag.note(format!(
                    "{p}.{key} = 0 means the default (transformers reads `{key} or default`)"
                ));
            }
        }
        let original_cfg = self.original_at_config()?.ok_or_else(|| {
            RopeError::invalid(
                f("original_max_position_embeddings"),
                "null",
                "must be a positive integer",
            )
        })?;
        if original_cfg == 0.0 {
            return Err(RopeError::invalid(
                f("original_max_position_embeddings"),
                0,
                "must be a positive integer",
            ));
        }
        if let Some(max_pos) = self.parser.facts.max_pos {
            let implicit = max_pos as f64 / original_cfg;
            let factor = get_some(d, "factor").and_then(number);
            if Some(implicit) != factor && implicit != 1.0 {
                self.diag.warn(
                    &f("factor"),
                    d.get("factor").map_or("null".into(), show),
                    &format!(
                        "does not match max_position_embeddings / \
                         original_max_position_embeddings = {implicit}; the explicit factor is \
                         used"
                    ),
                )?;
            }
        }

        // Init-time values.
        let original = self.original_at_init()?;
        let factor = self.factor_or_ratio(original)?;
        let opt_num = |key: &str| -> Result<Option<f64>> {
            get_some(d, key)
                .map(|v| need_number(&f(key), v, "a number"))
                .transpose()
        };
        let attention_factor = opt_num("attention_factor")?;
        let mscale = opt_num("mscale")?;
        let mscale_all_dim = opt_num("mscale_all_dim")?;
        if attention_factor.is_none()
            && mscale.is_some_and(|m| m != 0.0)
            && mscale_all_dim.is_none_or(|m| m == 0.0)
        {
            self.diag.note(format!(
                "{p}.mscale is ignored without a non-zero mscale_all_dim: the attention factor \
                 is 0.1 ln(factor) + 1 (transformers: `if mscale and mscale_all_dim`)"
            ));
        }
        // transformers reads `truncate` from the top level of rope_parameters.
        let truncate_src = if self.layer.name.is_some() {
            if let Some(v) = d.get("truncate") {
                self.diag.note(format!(
                    "{p}.truncate = {} is ignored: transformers reads truncate from the top \
                     level of rope_parameters, even for per-layer-type configs",
                    show(v)
                ));
            }
            outer.get("truncate")
        } else {
            d.get("truncate")
        };
        let truncate = match truncate_src {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.diag.warn(
                    &f("truncate"),
                    show(v),
                    "should be a boolean; transformers uses its Python truthiness",
                )?;
                truthy(v)
            }
        };
        let yarn = Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        };
        let cfg = self.finish(Scaling::Yarn(yarn), HeadDimUse::Getattr, true)?;
        Ok((cfg, Some(original)))
    }
}
