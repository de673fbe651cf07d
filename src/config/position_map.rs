//! The relative-position map of a config: ropex's `ropex_position_map` key (object or
//! string form) and vLLM's `dual_chunk_attention_config` block (Qwen2.5-1M), read as a
//! Dual Chunk Attention map. See the module docs of `config` for the keys and the
//! precedence between the two.

use serde_json::Value;

use super::json::Obj;
use super::json::{get_some, need_count, need_number, show};
use super::parser::{Diag, Parser};
use crate::error::{Result, RopeError};
use crate::position::PositionMap;

/// ropex's position-map key.
pub(super) const MAP_KEY: &str = "ropex_position_map";

/// vLLM's Dual Chunk Attention block (top level of config.json).
const DCA_KEY: &str = "dual_chunk_attention_config";

/// Keys of vLLM's block that configure its sparse-attention prefill, not positions:
/// accepted and ignored.
const DCA_IGNORED: [&str; 4] = [
    "sparse_attention_config",
    "sparse_attention_enabled",
    "sparse_attention_threshold",
    "sparse_attention_last_q",
];

/// The `type`s of the object form, with their required and optional keys (besides
/// `type`). `dual_chunk` needs one of its optional keys (`local_window` or vLLM's
/// `local_size`).
const KINDS: [(&str, &[&str], &[&str]); 7] = [
    ("rope", &[], &[]),
    ("rerope", &["window"], &[]),
    ("leaky_rerope", &["window", "leak"], &[]),
    ("interpolated", &["factor"], &[]),
    ("self_extend", &["group_size", "window"], &["scale_base"]),
    (
        "dual_chunk",
        &["chunk_size"],
        &["local_window", "local_size"],
    ),
    ("streaming", &["sinks", "window"], &[]),
];

/// The word each map constructor's error field contains for a config key (its name
/// there), to blame the key a constructor rejected.
const CONSTRUCTOR_NAMES: [(&str, &str); 9] = [
    ("group_size", "group"),
    ("sinks", "sinks"),
    ("window", "window"),
    ("leak", "leak"),
    ("factor", "factor"),
    ("scale_base", "scale_base"),
    ("chunk_size", "chunk_size"),
    ("local_window", "local_window"),
    ("local_size", "local_window"),
];

/// The map of one rope dict, and the pretraining length vLLM's block names.
pub(super) struct ConfigMap {
    pub(super) map: Option<PositionMap>,
    /// `dual_chunk_attention_config.original_max_position_embeddings` (0 and null:
    /// unset, as in vLLM).
    pub(super) dca_original: Option<usize>,
}

impl Parser<'_> {
    /// The map for rope dict `d` (prefix `p`): its own `ropex_position_map`, else the top
    /// level's, else vLLM's `dual_chunk_attention_config`.
    pub(super) fn position_map(&self, d: &Obj, p: &str, diag: &mut Diag) -> Result<ConfigMap> {
        if !self.opts.extensions {
            if get_some(self.top, DCA_KEY).is_some() {
                diag.note(format!(
                    "{DCA_KEY} is ignored with ropex extensions off (transformers ignores it; \
                     vLLM runs Dual Chunk Attention from it)"
                ));
            }
            return Ok(ConfigMap {
                map: None,
                dca_original: None,
            });
        }
        let dca = match get_some(self.top, DCA_KEY) {
            Some(v) => Some(dual_chunk_block(v, diag)?),
            None => None,
        };
        let explicit = match (get_some(d, MAP_KEY), get_some(self.top, MAP_KEY)) {
            (Some(v), _) => Some(parse_position_map(&format!("{p}.{MAP_KEY}"), v, diag)?),
            (None, Some(v)) => Some(parse_position_map(MAP_KEY, v, diag)?),
            (None, None) => None,
        };
        let dca_original = dca.and_then(|(_, o)| o);
        let map = match (explicit, dca) {
            (Some(m), Some((dca, _))) => {
                diag.note(format!(
                    "{MAP_KEY} ({m}) takes precedence over {DCA_KEY} ({dca})"
                ));
                Some(m)
            }
            (Some(m), None) => Some(m),
            (None, dca) => dca.map(|(m, _)| m),
        };
        Ok(ConfigMap { map, dca_original })
    }
}

/// Rewrites a map constructor's parameter error to name `field` (and, when `keys` has
/// the parameter it is about, that key).
fn blame(e: RopeError, field: &str, keys: &[&str]) -> RopeError {
    match e {
        RopeError::InvalidParameter {
            field: inner,
            value,
            allowed,
        } => {
            let key = CONSTRUCTOR_NAMES
                .iter()
                .find(|(k, word)| keys.contains(k) && inner.contains(word))
                .map(|(k, _)| *k);
            RopeError::InvalidParameter {
                field: match key {
                    Some(k) => format!("{field}.{k}"),
                    None => format!("{field} ({inner})"),
                },
                value,
                allowed,
            }
        }
        other => other,
    }
}

/// Parses a `ropex_position_map` value: an object with a `type`, or the text form of
/// [`PositionMap`]'s `FromStr`.
fn parse_position_map(field: &str, v: &Value, diag: &mut Diag) -> Result<PositionMap> {
    let types = || {
        KINDS
            .iter()
            .map(|(t, _, _)| *t)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let o = match v {
        Value::String(s) => return s.parse().map_err(|e| blame(e, field, &[])),
        Value::Object(o) => o,
        _ => {
            return Err(RopeError::invalid(
                field,
                show(v),
                format!(
                    "must be an object such as {{\"type\": \"rerope\", \"window\": 512}} or a \
                     string such as \"self-extend:8:1024\" ({})",
                    crate::position::MAP_SYNTAX
                ),
            ));
        }
    };
    let (ty, required, optional) = match o.get("type") {
        Some(Value::String(s)) => KINDS
            .iter()
            .find(|(t, _, _)| *t == s.as_str())
            .copied()
            .ok_or_else(|| {
                RopeError::invalid(
                    format!("{field}.type"),
                    show(&o["type"]),
                    format!("must be one of: {}", types()),
                )
            })?,
        other => {
            return Err(RopeError::invalid(
                format!("{field}.type"),
                other.map_or("missing".into(), show),
                format!("must be one of: {}", types()),
            ));
        }
    };
    let missing = |key: &str| RopeError::MissingKey {
        key: key.into(),
        context: format!("{field} of type '{ty}'"),
    };
    let need = |key: &str| o.get(key).ok_or_else(|| missing(key));
    let count = |key: &str, allowed: &str| -> Result<usize> {
        need_count(&format!("{field}.{key}"), need(key)?, true, allowed)
    };
    let num = |key: &str, allowed: &str| -> Result<f64> {
        need_number(&format!("{field}.{key}"), need(key)?, allowed)
    };
    let mut keys: Vec<&str> = required.iter().chain(optional).copied().collect();
    let map = match ty {
        "rope" => Ok(PositionMap::Rope),
        "rerope" => PositionMap::rerope(count("window", "a positive integer")?),
        "leaky_rerope" => PositionMap::leaky_rerope(
            count("window", "a positive integer")?,
            num("leak", "a number > 0")?,
        ),
        "interpolated" => PositionMap::interpolated(num("factor", "a number > 0")?),
        "self_extend" => {
            let group = count("group_size", "a positive integer (LongLM's G)")?;
            let window = count("window", "a positive integer (LongLM's neighbour window W)")?;
            match get_some(o, "scale_base") {
                None => PositionMap::self_extend(group, window),
                Some(b) => PositionMap::self_extend_scaled(
                    group,
                    window,
                    need_number(&format!("{field}.scale_base"), b, "a number > 1")?,
                ),
            }
        }
        "dual_chunk" => {
            let chunk = count("chunk_size", "a positive integer")?;
            let local_key = match (o.contains_key("local_window"), o.contains_key("local_size")) {
                (true, false) => "local_window",
                (false, true) => "local_size",
                (false, false) => return Err(missing("local_window (or vLLM's local_size)")),
                (true, true) => {
                    return Err(RopeError::invalid(
                        format!("{field}.local_size"),
                        show(&o["local_size"]),
                        "must not be given together with local_window (they are the same \
                         parameter; give one)",
                    ));
                }
            };
            let local = count(local_key, "a non-negative integer < chunk_size")?;
            keys = vec!["chunk_size", local_key];
            PositionMap::dca(chunk, local)
        }
        "streaming" => PositionMap::streaming(
            count("sinks", "a non-negative integer (StreamingLLM uses 4)")?,
            count("window", "a positive integer")?,
        ),
        other => Err(RopeError::invalid(
            format!("{field}.type"),
            other,
            format!("must be one of: {}", types()),
        )),
    };
    let map = map.map_err(|e| blame(e, field, &keys))?;
    for (k, val) in o {
        if k != "type" && !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            let expected: Vec<&str> = ["type"]
                .iter()
                .chain(required)
                .chain(optional)
                .copied()
                .collect();
            diag.warn(
                &format!("{field}.{k}"),
                show(val),
                &format!(
                    "unrecognized key for a '{ty}' map (expected {})",
                    expected.join(", ")
                ),
            )?;
        }
    }
    Ok(map)
}

/// Reads vLLM's `dual_chunk_attention_config` block: the DCA map
/// (`chunk_size`, `local_window = local_size`) and its `original_max_position_embeddings`.
fn dual_chunk_block(v: &Value, diag: &mut Diag) -> Result<(PositionMap, Option<usize>)> {
    let o = v.as_object().ok_or_else(|| {
        RopeError::invalid(
            DCA_KEY,
            show(v),
            "must be an object such as {\"chunk_size\": 262144, \"local_size\": 8192, \
             \"original_max_position_embeddings\": 262144}",
        )
    })?;
    let count = |key: &str, allowed: &str| -> Result<usize> {
        let v = o.get(key).ok_or_else(|| RopeError::MissingKey {
            key: key.into(),
            context: format!("{DCA_KEY} (vLLM's dual-chunk rotary embedding requires it)"),
        })?;
        need_count(&format!("{DCA_KEY}.{key}"), v, true, allowed)
    };
    let chunk = count("chunk_size", "a positive integer")?;
    let local = count("local_size", "a non-negative integer < chunk_size")?;
    let map = PositionMap::dca(chunk, local)
        .map_err(|e| blame(e, DCA_KEY, &["chunk_size", "local_size"]))?;
    let original = match get_some(o, "original_max_position_embeddings") {
        None => None,
        Some(v) => Some(need_count(
            &format!("{DCA_KEY}.original_max_position_embeddings"),
            v,
            true,
            "a non-negative integer",
        )?)
        .filter(|&l| l > 0),
    };
    let mut ignored = Vec::new();
    for (k, val) in o {
        match k.as_str() {
            "chunk_size" | "local_size" | "original_max_position_embeddings" => {}
            k if DCA_IGNORED.contains(&k) => ignored.push(k.to_string()),
            _ => diag.warn(
                &format!("{DCA_KEY}.{k}"),
                show(val),
                "unrecognized key (vLLM reads chunk_size, local_size, \
                 original_max_position_embeddings and the sparse_attention_* keys)",
            )?,
        }
    }
    if !ignored.is_empty() {
        diag.note(format!(
            "{DCA_KEY}: {} configure vLLM's sparse prefill, not positions (ignored)",
            ignored.join(", ")
        ));
    }
    Ok((map, original))
}
