//! `ropex_position_map`: a relative-position map in config.json (ropex's extension key).

use serde_json::Value;

use super::json::Obj;
use super::json::{get_some, need_count, need_number, show};
use super::parser::{Diag, Parser};
use crate::error::{Result, RopeError};
use crate::position::PositionMap;

/// ropex's position-map key.
pub(super) const MAP_KEY: &str = "ropex_position_map";

impl Parser<'_> {
    pub(super) fn position_map(
        &self,
        d: &Obj,
        p: &str,
        diag: &mut Diag,
    ) -> Result<Option<PositionMap>> {
        if !self.opts.extensions {
            return Ok(None);
        }
        let (field, v) = match (get_some(d, MAP_KEY), get_some(self.top, MAP_KEY)) {
            (Some(v), _) => (format!("{p}.{MAP_KEY}"), v),
            (None, Some(v)) => (MAP_KEY.to_string(), v),
            (None, None) => return Ok(None),
        };
        parse_position_map(&field, v, diag).map(Some)
    }
}

/// Parses a `ropex_position_map` object.
fn parse_position_map(field: &str, v: &Value, diag: &mut Diag) -> Result<PositionMap> {
    let o = v.as_object().ok_or_else(|| {
        RopeError::invalid(
            field,
            show(v),
            "must be an object such as {\"type\": \"rerope\", \"window\": 512}",
        )
    })?;
    let ty = match o.get("type") {
        Some(Value::String(s)) => s.as_str(),
        other => {
            return Err(RopeError::invalid(
                format!("{field}.type"),
                other.map_or("missing".into(), show),
                "must be one of: rope, rerope, leaky_rerope, interpolated",
            ));
        }
    };
    let window = || -> Result<usize> {
        let w = o.get("window").ok_or_else(|| RopeError::MissingKey {
            key: "window".into(),
            context: format!("{field} of type '{ty}'"),
        })?;
        need_count(&format!("{field}.window"), w, true, "a positive integer")
    };
    let allowed: &[&str] = match ty {
        "rope" => &["type"],
        "rerope" => &["type", "window"],
        "leaky_rerope" => &["type", "window", "leak"],
        "interpolated" => &["type", "factor"],
        _ => &[],
    };
    let map = match ty {
        "rope" => Ok(PositionMap::Rope),
        "rerope" => PositionMap::rerope(window()?),
        "leaky_rerope" => {
            let leak = o.get("leak").ok_or_else(|| RopeError::MissingKey {
                key: "leak".into(),
                context: format!("{field} of type 'leaky_rerope'"),
            })?;
            let leak = need_number(&format!("{field}.leak"), leak, "a number > 0")?;
            PositionMap::leaky_rerope(window()?, leak)
        }
        "interpolated" => {
            let factor = o.get("factor").ok_or_else(|| RopeError::MissingKey {
                key: "factor".into(),
                context: format!("{field} of type 'interpolated'"),
            })?;
            PositionMap::interpolated(need_number(
                &format!("{field}.factor"),
                factor,
                "a number > 0",
            )?)
        }
        other => {
            return Err(RopeError::invalid(
                format!("{field}.type"),
                other,
                "must be one of: rope, rerope, leaky_rerope, interpolated",
            ));
        }
    }
    .map_err(|e| match e {
        RopeError::InvalidParameter { value, allowed, .. } => RopeError::InvalidParameter {
            field: format!("{field} ({ty})"),
            value,
            allowed,
        },
        other => other,
    })?;
    for (k, val) in o {
        if !allowed.contains(&k.as_str()) {
            diag.warn(
                &format!("{field}.{k}"),
                show(val),
                &format!(
                    "unrecognized key for a '{ty}' map (expected {})",
                    allowed.join(", ")
                ),
            )?;
        }
    }
    Ok(map)
}
