//! Read a model's Hugging Face `config.json` into ropex types (feature `serde`).
//!
//! ```
//! use ropex::config::ModelRope;
//! let json = r#"{
//!     "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
//!     "max_position_embeddings": 131072, "rope_theta": 500000.0,
//!     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
//!                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
//! }"#;
//! let rope = ModelRope::from_json_str(json, None)?;
//! assert_eq!(rope.rope_type, "llama3");
//! assert_eq!(rope.config.rotary_dim(), 128);
//! assert_eq!(rope.original_max_position_embeddings, Some(8192));
//! let freqs = rope.frequencies();
//! assert_eq!(freqs.inv_freq().len(), 64);
//! # Ok::<(), ropex::RopeError>(())
//! ```
//!
//! ## What is read, and how
//!
//! ropex follows what transformers 5.x does when it builds the config object
//! (`convert_rope_params_to_dict`, `standardize_rope_params`, `validate_rope` and the config
//! class of the `model_type`) and then the rope init function
//! (`modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]`, or the model's default RoPE):
//!
//! - The rope dict is `rope_scaling` when that is a non-empty object (it then replaces
//!   `rope_parameters` entirely), else `rope_parameters`, else `{}`.
//! - `rope_type` is read from `rope_type`, then the legacy `type`, default `"default"`.
//! - `rope_theta` and `partial_rotary_factor` inside the dict win; the top-level keys are
//!   only defaults (`rope_theta` defaults to the class's `default_theta`, 10000 for most).
//! - The dict is per layer type (`{"full_attention": {...}, "sliding_attention": {...}}`)
//!   only when its keys are layer types the config declares (`layer_types`, or the
//!   class's default layer types): for Llama such a dict is flat, with unrecognized keys.
//! - `head_dim` is the key, or `hidden_size // num_attention_heads`. A JSON `null`
//!   `head_dim` falls back to that quotient for `default`, `linear`, `llama3` and
//!   `proportional` (transformers writes `getattr(config, "head_dim", None) or ...`),
//!   but `dynamic`, `yarn` and `longrope` read `getattr(config, "head_dim", ...)` and fail on
//!   a null for config classes that do not fill it in (Qwen2, Phi, Phi-3, StableLM);
//!   ropex raises there too.
//! - The rotary dim is `int(head_dim * partial_rotary_factor)`; an odd value keeps its odd
//!   exponent denominator (see [`RopeConfig::with_partial_rotary_factor`]). Llama, Qwen2,
//!   Gemma, DeepSeek-V3 and gpt-oss ignore `partial_rotary_factor` for the `default` type.
//! - `original_max_position_embeddings` (llama3, yarn, longrope): a top-level key
//!   overrides the one inside the dict (Phi-3 convention; transformers re-standardizes at
//!   model init), then the dict's value, then `max_position_embeddings`. `dynamic` uses
//!   `max_position_embeddings` as its original length and ignores the dict's key.
//! - `yarn` and `longrope` derive a missing or null `factor` as
//!   `max_position_embeddings / original_max_position_embeddings`.
//! - `yarn` reads `truncate` from the top level of `rope_parameters`, so in the per-layer
//!   form a layer's `truncate` is ignored (a transformers bug, reproduced and noted).
//!
//! Errors are raised where transformers raises (missing required keys, an odd full
//! rotary head dim, Phi-3's checks, unknown rope types, values its init function cannot
//! compute with); what it only warns about is collected in [`ModelRope::warnings`], or
//! rejected with [`ParseOptions::strict`]. ropex's own remarks about surprising but
//! silent transformers behaviour go to [`ModelRope::notes`] and never fail.
//!
//! ropex deliberately rejects a few inputs transformers computes garbage from: booleans
//! where numbers are expected (Python treats `true` as 1), `rope_theta <= 1`, factors
//! `<= 0`, attention factors `<= 0`, `partial_rotary_factor` outside `(0, 1]`,
//! non-integral lengths, odd head dims, `head_dim > 65536`, LongRoPE lists of any length
//! but the pair count or 1 (a single value is broadcast, as torch does).
//!
//! ## Keys
//!
//! Top level of `config.json`:
//!
//! | key | meaning |
//! |---|---|
//! | `model_type` | selects the transformers config class behaviour (Llama, Qwen2, Phi, Phi-3, StableLM, Gemma 3/4 text, DeepSeek-V3, gpt-oss; others get generic rules) |
//! | `rope_parameters` | v5 rope dict, flat or per layer type |
//! | `rope_scaling` | legacy rope dict; replaces `rope_parameters` when non-empty |
//! | `rope_theta` | default base (`default_theta` of the class when absent) |
//! | `rope_local_base_freq` | Gemma 3: base of `sliding_attention` layers |
//! | `head_dim`, `hidden_size`, `num_attention_heads` | head dim (or `hidden_size // num_attention_heads`) |
//! | `qk_rope_head_dim` | DeepSeek-V3: the rotary head dim |
//! | `global_head_dim` | Gemma 4: head dim of `full_attention` layers (default 512) |
//! | `partial_rotary_factor` | default for the dict's `partial_rotary_factor` |
//! | `max_position_embeddings` | context length; dynamic's original length |
//! | `original_max_position_embeddings` | overrides the dict's value (llama3, yarn, longrope) |
//! | `layer_types` | declares the layer types of the per-layer form |
//! | `ropex_position_map` | ropex: a relative-position map (see below), for every layer |
//!
//! Inside the rope dict (`R` = required, `o` = optional; every type also takes
//! `rope_type`/`type`, `rope_theta`, `partial_rotary_factor`):
//!
//! | `rope_type` | keys | ropex [`Scaling`] |
//! |---|---|---|
//! | `default` | | [`Scaling::None`] |
//! | `linear` | `factor` R | [`Scaling::Linear`] |
//! | `dynamic` | `factor` R | [`Scaling::Dynamic`] with `L0 = max_position_embeddings` |
//! | `yarn` | `factor` R (null: derived), `original_max_position_embeddings` R (defaulted), `attention_factor`, `beta_fast` (32), `beta_slow` (1), `mscale`, `mscale_all_dim`, `truncate` (true) o | [`Scaling::Yarn`] |
//! | `longrope` | `short_factor`, `long_factor`, `original_max_position_embeddings` R, `factor`, `attention_factor` o | [`Scaling::LongRope`] |
//! | `llama3` | `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings` R | [`Scaling::Llama3`] |
//! | `proportional` | `partial_rotary_factor` (share of rotating pairs), `factor` (used, though transformers calls it unrecognized) | [`Scaling::Proportional`] over the full head |
//! | `ntk_aware` (ropex) | `factor` R | [`Scaling::NtkAware`] |
//! | `ntk_old` (ropex) | `factor` R | [`Scaling::NtkOld`] |
//! | `ntk_fixed` (ropex) | `factor` R | [`Scaling::NtkFixed`] |
//! | `ntk_mixed` (ropex) | `factor` R, `mixed_b` o (0.625) | [`Scaling::NtkMixed`] |
//!
//! `ropex_position_map` (ropex; top level, or inside a rope dict where it wins for that
//! layer type) is parsed into [`PositionMap`]:
//!
//! | value | map |
//! |---|---|
//! | `{"type": "rope"}` | [`PositionMap::Rope`] |
//! | `{"type": "rerope", "window": 512}` | [`PositionMap::ReRope`] |
//! | `{"type": "leaky_rerope", "window": 512, "leak": 16}` | [`PositionMap::LeakyReRope`] (`leak < 1`: inverse Leaky ReRoPE) |
//! | `{"type": "interpolated", "factor": 4}` | [`PositionMap::Interpolated`] |
//!
//! The ropex rope types and keys are accepted when [`ParseOptions::extensions`] is on (the
//! default). With it off, ropex reads configs exactly as transformers would: the `ntk_*`
//! types are unknown rope types (transformers fails at model init) and
//! `ropex_position_map` inside a rope dict is an unrecognized key.

mod json;
mod profile;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::PositionMap;
use crate::scaling::{Llama3, LongRope, RopeConfig, Scaling, Yarn};
use json::{
    Obj, get_some, is_int_literal, kind, need_count, need_number, number, setdefault, show, truthy,
};
use profile::{Convert, HeadDimRule, LayerRule, Profile};

/// How a config is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    /// Turn what transformers only warns about (unrecognized keys, factors below 1,
    /// `beta_fast < beta_slow`, a `factor` that disagrees with the lengths, ...) into
    /// errors. Off: those are collected in [`ModelRope::warnings`].
    pub strict: bool,
    /// Accept ropex's own rope types (`ntk_aware`, `ntk_old`, `ntk_fixed`, `ntk_mixed`) and
    /// keys (`mixed_b`, `ropex_position_map`). On by default; off reads configs exactly as
    /// transformers does.
    pub extensions: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            strict: false,
            extensions: true,
        }
    }
}

impl ParseOptions {
    /// Strict mode, with ropex's extensions.
    pub fn strict() -> Self {
        ParseOptions {
            strict: true,
            ..Self::default()
        }
    }

    /// Read exactly as transformers does: no ropex rope types or keys.
    pub fn transformers_only(strict: bool) -> Self {
        ParseOptions {
            strict,
            extensions: false,
        }
    }
}

/// The rotary embedding of a model (or of one layer type of it), read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRope {
    /// Head dim, rotary dim, base and frequency scheme.
    pub config: RopeConfig,
    /// The rope type as transformers resolves it (e.g. Phi-3's legacy `su`/`yarn` become
    /// `longrope`), or the ropex type name.
    pub rope_type: String,
    /// The layer type, for the per-layer-type form (`rope_parameters.full_attention`, ...).
    pub layer_type: Option<String>,
    /// `model_type`, when the config names one.
    pub model_type: Option<String>,
    /// `max_position_embeddings` (config value or class default).
    pub max_position_embeddings: Option<usize>,
    /// The pretraining length the config names: for llama3, yarn and longrope the
    /// `original_max_position_embeddings` the scheme uses (as transformers resolves it at
    /// model init), otherwise the top-level key if any.
    pub original_max_position_embeddings: Option<usize>,
    /// The ropex relative-position map (`ropex_position_map`), if the config has one.
    pub position_map: Option<PositionMap>,
    /// What transformers warns about for this config (empty in strict mode, where each
    /// would have been an error).
    pub warnings: Vec<String>,
    /// ropex's remarks on silent but surprising transformers behaviour that shaped the
    /// result (a `truncate` that is ignored, a top-level length that overrides the
    /// dict's, ...). Never errors.
    pub notes: Vec<String>,
}

impl ModelRope {
    /// Reads `json` with [`ParseOptions::default`] and picks `layer_type` (see
    /// [`ModelRope::from_json_str_with`]).
    pub fn from_json_str(json: &str, layer_type: Option<&str>) -> Result<ModelRope> {
        Self::from_json_str_with(json, layer_type, &ParseOptions::default())
    }

    /// Reads `json` and picks one entry: `layer_type = None` for a flat config (or a
    /// per-layer config with a single layer type), `Some(t)` for layer type `t` of the
    /// per-layer form. Every layer type is validated, as transformers does.
    pub fn from_json_str_with(
        json: &str,
        layer_type: Option<&str>,
        opts: &ParseOptions,
    ) -> Result<ModelRope> {
        select(from_json_str(json, opts)?, layer_type)
    }

    /// Reads the config file at `path` with [`ParseOptions::default`] and picks
    /// `layer_type`.
    pub fn from_path(path: impl AsRef<Path>, layer_type: Option<&str>) -> Result<ModelRope> {
        Self::from_path_with(path, layer_type, &ParseOptions::default())
    }

    /// Reads the config file at `path` and picks `layer_type`.
    pub fn from_path_with(
        path: impl AsRef<Path>,
        layer_type: Option<&str>,
        opts: &ParseOptions,
    ) -> Result<ModelRope> {
        select(from_path(path, opts)?, layer_type)
    }

    /// Frequencies at model initialisation (no sequence length).
    pub fn frequencies(&self) -> Frequencies {
        self.config.frequencies()
    }

    /// Frequencies for a sequence of `seq_len` tokens (dynamic NTK and LongRoPE depend on
    /// it).
    pub fn frequencies_for_len(&self, seq_len: usize) -> Frequencies {
        self.config.frequencies_for_len(seq_len)
    }

    /// The training length to explain a scheme against: the original length the config
    /// names, else `max_position_embeddings`.
    pub fn train_len(&self) -> Option<usize> {
        self.original_max_position_embeddings
            .or(self.max_position_embeddings)
    }
}

/// Reads a config.json string: one [`ModelRope`] for a flat rope dict, one per layer type
/// (sorted by name; `null` entries, i.e. layers without RoPE, are skipped) for the
/// per-layer form.
pub fn from_json_str(json: &str, opts: &ParseOptions) -> Result<Vec<ModelRope>> {
    let value: Value = serde_json::from_str(json)
        .map_err(|e| RopeError::Config(format!("config.json is not valid JSON: {e}")))?;
    from_value(&value, opts)
}

/// Reads the config file at `path` (see [`from_json_str`]).
pub fn from_path(path: impl AsRef<Path>, opts: &ParseOptions) -> Result<Vec<ModelRope>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| RopeError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    from_json_str(&text, opts).map_err(|e| match e {
        RopeError::Config(m) => RopeError::Config(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Reads an already parsed config.json (see [`from_json_str`]).
pub fn from_value(value: &Value, opts: &ParseOptions) -> Result<Vec<ModelRope>> {
    Parser::new(value, opts)?.run()
}

/// The `model_type`s whose transformers config class ropex models exactly; any other
/// gets generic rules (see the module docs).
pub fn known_model_types() -> &'static [&'static str] {
    &Profile::KNOWN
}

/// Picks `layer_type` out of [`from_json_str`]'s entries.
pub fn select(entries: Vec<ModelRope>, layer_type: Option<&str>) -> Result<ModelRope> {
    let names: Vec<String> = entries
        .iter()
        .filter_map(|e| e.layer_type.clone())
        .collect();
    match layer_type {
        None if entries.len() == 1 => Ok(entries.into_iter().next().expect("one entry")),
        None => Err(RopeError::invalid(
            "layer_type",
            "none",
            format!(
                "this config has per-layer-type rope parameters; choose one of: {}",
                names.join(", ")
            ),
        )),
        Some(t) => {
            if names.is_empty() {
                return Err(RopeError::invalid(
                    "layer_type",
                    t,
                    "this config has a single (flat) rope dict; pass no layer type",
                ));
            }
            entries
                .into_iter()
                .find(|e| e.layer_type.as_deref() == Some(t))
                .ok_or_else(|| {
                    RopeError::invalid(
                        "layer_type",
                        t,
                        format!("must be one of: {}", names.join(", ")),
                    )
                })
        }
    }
}

/// The rope types transformers computes.
const HF_TYPES: [&str; 7] = [
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "proportional",
];
/// ropex's own rope types.
const ROPEX_TYPES: [&str; 4] = ["ntk_aware", "ntk_old", "ntk_fixed", "ntk_mixed"];
/// Layer type names transformers knows (for a note on misplaced per-layer dicts).
const LAYER_TYPES: [&str; 4] = [
    "full_attention",
    "sliding_attention",
    "chunked_attention",
    "linear_attention",
];
/// ropex's position-map key.
const MAP_KEY: &str = "ropex_position_map";
/// The largest head dim ropex accepts from a config.
const MAX_HEAD_DIM: usize = 1 << 16;

/// Warnings and notes collected while reading.
#[derive(Debug, Clone)]
struct Diag {
    strict: bool,
    warnings: Vec<String>,
    notes: Vec<String>,
}

impl Diag {
    /// Something transformers warns about: a warning, or an error in strict mode.
    fn warn(&mut self, field: &str, value: impl std::fmt::Display, msg: &str) -> Result<()> {
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

    fn note(&mut self, msg: String) {
        self.notes.push(msg);
    }
}

/// `head_dim` as the rope code sees the config attribute.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeadDim {
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
struct Facts {
    hidden: Option<usize>,
    heads: Option<usize>,
    head_dim: HeadDim,
    global_head_dim: Option<usize>,
    max_pos: Option<usize>,
    /// Top-level `original_max_position_embeddings` (Phi-3: its typed field), applied at
    /// model init.
    top_original: Option<Value>,
    labels: BTreeSet<String>,
}

impl Facts {
    fn hidden_over_heads(&self) -> Result<usize> {
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

/// One rope dict to interpret.
struct Layer {
    name: Option<String>,
    prefix: String,
    dict: Obj,
}

struct Parser<'a> {
    top: &'a Obj,
    opts: &'a ParseOptions,
    model_type: Option<String>,
    profile: Profile,
    facts: Facts,
    diag: Diag,
}

impl<'a> Parser<'a> {
    fn new(root: &'a Value, opts: &'a ParseOptions) -> Result<Self> {
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

    fn run(mut self) -> Result<Vec<ModelRope>> {
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

    /// `convert_rope_params_to_dict` + `standardize_rope_params`: the rope dicts to
    /// interpret, and the outer `rope_parameters` map (for yarn's `truncate`).
    fn rope_dicts(&mut self) -> Result<(Vec<Layer>, Obj)> {
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
                        rp.insert(layer.into(), serde_json::json!({"rope_type": "default"}));
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
            self.standardize(&mut d, theta.as_ref(), partial.as_ref(), false);
            if self.profile.convert == Convert::Phi3
                && matches!(d.get("rope_type"), Some(Value::String(t)) if t == "su" || t == "yarn")
            {
                d.insert("rope_type".into(), Value::from("longrope"));
            }
            layers.push(Layer {
                name: None,
                prefix: src.to_string(),
                dict: d,
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
                        self.standardize(&mut d, theta.as_ref(), partial.as_ref(), true);
                        layers.push(Layer {
                            name: Some(name.clone()),
                            prefix,
                            dict: d,
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

    /// `standardize_rope_params` on one dict, as seen at config time.
    fn standardize(
        &self,
        d: &mut Obj,
        theta: Option<&Value>,
        partial: Option<&Value>,
        nested: bool,
    ) {
        if let Some(t) = theta {
            setdefault(d, "rope_theta", t.clone());
        }
        if let Some(p) = partial {
            setdefault(d, "partial_rotary_factor", p.clone());
        }
        let legacy = d.get("type").cloned().unwrap_or(Value::from("default"));
        setdefault(d, "rope_type", legacy);
        let scaled = matches!(d.get("rope_type"), Some(Value::String(t))
            if t == "llama3" || t == "yarn" || t == "longrope");
        if scaled {
            let max_pos = self.facts.max_pos.map_or(Value::Null, Value::from);
            match (&self.profile.original_field, nested) {
                (Some(_), false) => {
                    let v = self.facts.top_original.clone().unwrap_or(Value::Null);
                    d.insert("original_max_position_embeddings".into(), v);
                }
                _ => setdefault(d, "original_max_position_embeddings", max_pos),
            }
        }
    }

    /// Validates and interprets one rope dict.
    fn layer(&self, layer: &Layer, outer: &Obj, diag: &mut Diag) -> Result<ModelRope> {
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
        let is_ropex = ROPEX_TYPES.contains(&rope_type.as_str());
        let accepted = HF_TYPES.contains(&rope_type.as_str()) || (is_ropex && self.opts.extensions);
        if !accepted {
            return Err(RopeError::UnknownRopeType {
                name: rope_type,
                known: self.known_types(),
            });
        }

        // Keys (`_check_received_keys`).
        let (required, optional): (&[&str], &[&str]) = match rope_type.as_str() {
            "default" => (&["rope_type"], &["rope_theta"]),
            "linear" | "dynamic" | "ntk_aware" | "ntk_old" | "ntk_fixed" => {
                (&["rope_type", "factor"], &["rope_theta"])
            }
            "ntk_mixed" => (&["rope_type", "factor"], &["rope_theta", "mixed_b"]),
            "yarn" => (
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
            "longrope" => (
                &[
                    "rope_type",
                    "short_factor",
                    "long_factor",
                    "original_max_position_embeddings",
                ],
                &["rope_theta", "attention_factor", "factor"],
            ),
            "llama3" => (
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
            "proportional" => (&["rope_type", "rope_theta"], &[]),
            _ => unreachable!("checked above"),
        };
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

        let (config, original) = match rope_type.as_str() {
            "default" => self.build_default(layer, diag)?,
            "linear" => {
                self.warn_factor(d, p, diag)?;
                let factor = self.factor(d, p)?;
                let cfg = self.dims(layer, HeadDimUse::OrFallback, true)?;
                (cfg.with_scaling_lenient(Scaling::Linear { factor })?, None)
            }
            "dynamic" => self.build_dynamic(layer, diag)?,
            "yarn" => self.build_yarn(layer, outer, diag)?,
            "longrope" => self.build_longrope(layer, diag)?,
            "llama3" => self.build_llama3(layer, diag)?,
            "proportional" => self.build_proportional(layer, diag)?,
            _ => self.build_ropex(layer, &rope_type)?,
        };

        let position_map = self.position_map(d, p, diag)?;
        let original = match original {
            Some(o) => Some(o),
            None => match &self.facts.top_original {
                Some(v) if !v.is_null() => Some(need_count(
                    "original_max_position_embeddings",
                    v,
                    true,
                    "a non-negative integer",
                )?),
                _ => None,
            },
        };
        Ok(ModelRope {
            config,
            rope_type,
            layer_type: layer.name.clone(),
            model_type: self.model_type.clone(),
            max_position_embeddings: self.facts.max_pos,
            original_max_position_embeddings: original,
            position_map,
            warnings: std::mem::take(&mut diag.warnings),
            notes: std::mem::take(&mut diag.notes),
        })
    }

    fn known_types(&self) -> String {
        let mut known: Vec<&str> = HF_TYPES.to_vec();
        if self.opts.extensions {
            known.extend(ROPEX_TYPES.iter().map(|t| {
                // Keep the list readable: mark ropex's own.
                match *t {
                    "ntk_aware" => "ntk_aware (ropex)",
                    "ntk_old" => "ntk_old (ropex)",
                    "ntk_fixed" => "ntk_fixed (ropex)",
                    _ => "ntk_mixed (ropex)",
                }
            }));
        }
        known.join(", ")
    }

    fn phi3_checks(&self, d: &Obj, p: &str, rope_type: &str) -> Result<()> {
        if rope_type != "default" && rope_type != "longrope" {
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

    /// `head_dim` as the rope code of a type reads it.
    fn head_dim(&self, layer: &Layer, use_: HeadDimUse) -> Result<usize> {
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

    /// Head dim, base and (when `partial`) partial rotary, as a plain [`RopeConfig`].
    fn dims(&self, layer: &Layer, use_: HeadDimUse, partial: bool) -> Result<RopeConfig> {
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

    fn base(&self, d: &Obj, p: &str) -> Result<f64> {
        let field = format!("{p}.rope_theta");
        let v = d.get("rope_theta").unwrap_or(&Value::Null);
        let base = need_number(&field, v, "a number > 1")?;
        if base <= 1.0 {
            return Err(RopeError::invalid(field, show(v), "must be a number > 1"));
        }
        Ok(base)
    }

    /// `factor` as linear/dynamic/ropex types read it: required and numeric.
    fn factor(&self, d: &Obj, p: &str) -> Result<f64> {
        let field = format!("{p}.factor");
        need_number(&field, d.get("factor").unwrap_or(&Value::Null), "a number")
    }

    /// The `factor` warning linear, dynamic, yarn and llama3 share.
    fn warn_factor(&self, d: &Obj, p: &str, diag: &mut Diag) -> Result<()> {
        let v = d.get("factor").unwrap_or(&Value::Null);
        if number(v).is_none_or(|x| x < 1.0) {
            diag.warn(
                &format!("{p}.factor"),
                show(v),
                "must be a float or int >= 1",
            )?;
        }
        Ok(())
    }

    fn build_default(&self, layer: &Layer, diag: &mut Diag) -> Result<(RopeConfig, Option<usize>)> {
        let uses_partial = self.profile.default_uses_partial;
        if !uses_partial
            && let Some(v) = layer.dict.get("partial_rotary_factor")
            && number(v) != Some(1.0)
        {
            diag.note(format!(
                "{}.partial_rotary_factor = {} is ignored: transformers' default RoPE for \
                 model_type '{}' rotates the full head_dim",
                layer.prefix,
                show(v),
                self.profile.model_type
            ));
        }
        let cfg = self.dims(layer, HeadDimUse::OrFallback, uses_partial)?;
        Ok((cfg, None))
    }

    fn build_dynamic(&self, layer: &Layer, diag: &mut Diag) -> Result<(RopeConfig, Option<usize>)> {
        let d = &layer.dict;
        let p = &layer.prefix;
        self.warn_factor(d, p, diag)?;
        if d.contains_key("original_max_position_embeddings") {
            diag.note(format!(
                "{p}.original_max_position_embeddings is ignored by dynamic NTK: transformers \
                 uses max_position_embeddings as its original length"
            ));
        }
        let factor = self.factor(d, p)?;
        let l0 = self.facts.max_pos.ok_or_else(|| RopeError::MissingKey {
            key: "max_position_embeddings".into(),
            context: "config.json (dynamic NTK uses it as the original length)".into(),
        })?;
        let cfg = self.dims(layer, HeadDimUse::Getattr, true)?;
        if cfg.exponent_dim() == 2 {
            return Err(RopeError::invalid(
                "rotary dim",
                2,
                "dynamic NTK needs a rotary dim > 2 (transformers divides by dim - 2)",
            ));
        }
        let cfg = cfg.with_scaling_lenient(Scaling::Dynamic {
            factor,
            original_max_position_embeddings: l0,
        })?;
        Ok((cfg, None))
    }

    /// The `original_max_position_embeddings` a scaled type computes with (model init:
    /// a top-level value overrides the dict's for a flat config).
    fn original_at_init(&self, layer: &Layer, diag: &mut Diag) -> Result<usize> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let inner = d.get("original_max_position_embeddings");
        let (field, v) = match (&self.facts.top_original, &layer.name) {
            (Some(top), None) if self.profile.original_field.is_none() => {
                if let Some(inner) = inner.filter(|i| *i != top) {
                    diag.note(format!(
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
    fn factor_or_ratio(&self, d: &Obj, p: &str, original: usize, diag: &mut Diag) -> Result<f64> {
        match get_some(d, "factor") {
            Some(v) => need_number(&format!("{p}.factor"), v, "a number"),
            None => {
                let max_pos = self.facts.max_pos.ok_or_else(|| RopeError::MissingKey {
                    key: "max_position_embeddings".into(),
                    context: format!(
                        "config.json (needed to derive {p}.factor = max_position_embeddings / \
                         original_max_position_embeddings)"
                    ),
                })?;
                let s = max_pos as f64 / original as f64;
                diag.note(format!(
                    "{p}.factor derived as max_position_embeddings / \
                     original_max_position_embeddings = {max_pos} / {original} = {s}"
                ));
                Ok(s)
            }
        }
    }

    /// The config-time `original_max_position_embeddings`, for transformers' warnings.
    fn original_at_config(&self, d: &Obj, p: &str) -> Result<Option<f64>> {
        match d.get("original_max_position_embeddings") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(need_number(
                &format!("{p}.original_max_position_embeddings"),
                v,
                "a positive integer",
            )?)),
        }
    }

    fn build_yarn(
        &self,
        layer: &Layer,
        outer: &Obj,
        diag: &mut Diag,
    ) -> Result<(RopeConfig, Option<usize>)> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let f = |k: &str| format!("{p}.{k}");
        // Config-time warnings.
        self.warn_factor(d, p, diag)?;
        if let Some(v) = get_some(d, "attention_factor")
            && (!matches!(v, Value::Number(n) if n.is_f64()) || number(v).is_some_and(|x| x < 0.0))
        {
            diag.warn(
                &f("attention_factor"),
                show(v),
                "must be a float greater than 0",
            )?;
        }
        for key in ["beta_fast", "beta_slow"] {
            if let Some(v) = get_some(d, key)
                && number(v).is_none()
            {
                diag.warn(&f(key), show(v), "must be a float or int")?;
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
            diag.warn(
                &f("beta_fast"),
                beta_fast,
                &format!("must be greater than beta_slow ({beta_slow})"),
            )?;
        }
        for key in ["beta_fast", "beta_slow"] {
            if d.get(key).is_some_and(|v| number(v) == Some(0.0)) {
                diag.note(format!(
                    "{p}.{key} = 0 means the default (transformers reads `{key} or default`)"
                ));
            }
        }
        let original_cfg = self.original_at_config(d, p)?.ok_or_else(|| {
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
        if let Some(max_pos) = self.facts.max_pos {
            let implicit = max_pos as f64 / original_cfg;
            let factor = get_some(d, "factor").and_then(number);
            if Some(implicit) != factor && implicit != 1.0 {
                diag.warn(
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
        let original = self.original_at_init(layer, diag)?;
        let factor = self.factor_or_ratio(d, p, original, diag)?;
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
            diag.note(format!(
                "{p}.mscale is ignored without a non-zero mscale_all_dim: the attention factor \
                 is 0.1 ln(factor) + 1 (transformers: `if mscale and mscale_all_dim`)"
            ));
        }
        // transformers reads `truncate` from the top level of rope_parameters.
        let truncate_src = if layer.name.is_some() {
            if let Some(v) = d.get("truncate") {
                diag.note(format!(
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
                diag.warn(
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
        let cfg = self
            .dims(layer, HeadDimUse::Getattr, true)?
            .with_scaling_lenient(Scaling::Yarn(yarn))
            .map_err(|e| prefix_error(e, p, "yarn."))?;
        Ok((cfg, Some(original)))
    }

    fn build_longrope(
        &self,
        layer: &Layer,
        diag: &mut Diag,
    ) -> Result<(RopeConfig, Option<usize>)> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let f = |k: &str| format!("{p}.{k}");
        let head_dim = self.head_dim(layer, HeadDimUse::Getattr)?;
        let prf = match d.get("partial_rotary_factor") {
            None => 1.0,
            Some(v) => need_number(&f("partial_rotary_factor"), v, "a number in (0, 1]")?,
        };
        let dim = (head_dim as f64 * prf) as usize;
        let mut lists = Vec::new();
        for key in ["short_factor", "long_factor"] {
            let list = number_list(&f(key), d.get(key).unwrap_or(&Value::Null))?;
            if list.len() != dim / 2 {
                diag.warn(
                    &f(key),
                    format!("a list of {} values", list.len()),
                    &format!("must have length {}", dim / 2),
                )?;
            }
            lists.push(list);
        }
        let original_cfg = self.original_at_config(d, p)?;
        let factor_v = get_some(d, "factor");
        match (factor_v, original_cfg) {
            (None, Some(_)) => diag.warn(
                &f("factor"),
                d.get("factor").map_or("missing".into(), show),
                "not set: it is derived from max_position_embeddings / original_max_position_embeddings \
                 (set factor instead)",
            )?,
            (None, None) => diag.warn(
                &f("factor"),
                d.get("factor").map_or("missing".into(), show),
                "missing required key",
            )?,
            (Some(v), _) if number(v).is_none_or(|x| x < 1.0) => {
                diag.warn(&f("factor"), show(v), "must be a float or int >= 1")?
            }
            _ => {}
        }
        if let Some(v) = get_some(d, "attention_factor")
            && number(v).is_none_or(|x| x < 0.0)
        {
            diag.warn(
                &f("attention_factor"),
                show(v),
                "must be a float or int greater than 0",
            )?;
        }

        let original = self.original_at_init(layer, diag)?;
        let factor = self.factor_or_ratio(d, p, original, diag)?;
        let attention_factor = get_some(d, "attention_factor")
            .map(|v| need_number(&f("attention_factor"), v, "a number > 0"))
            .transpose()?;
        let mut cfg = self.dims(layer, HeadDimUse::Getattr, true)?;
        let pairs = cfg.rotary_dim() / 2;
        let long = lists.pop().expect("two lists");
        let short = lists.pop().expect("two lists");
        let mut fit = |key: &str, list: Vec<f64>| -> Result<Vec<f64>> {
            if list.len() == pairs {
                Ok(list)
            } else if list.len() == 1 {
                diag.note(format!(
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
        cfg = cfg
            .with_scaling_lenient(Scaling::LongRope(LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                factor,
                attention_factor,
            }))
            .map_err(|e| prefix_error(e, p, "longrope."))?;
        Ok((cfg, Some(original)))
    }

    fn build_llama3(&self, layer: &Layer, diag: &mut Diag) -> Result<(RopeConfig, Option<usize>)> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let f = |k: &str| format!("{p}.{k}");
        self.warn_factor(d, p, diag)?;
        for key in ["low_freq_factor", "high_freq_factor"] {
            let v = d.get(key).unwrap_or(&Value::Null);
            if number(v).is_none() {
                diag.warn(&f(key), show(v), "must be a float or int")?;
            }
        }
        let num =
            |key: &str| need_number(&f(key), d.get(key).unwrap_or(&Value::Null), "a number > 0");
        let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
        if high <= low {
            diag.warn(
                &f("high_freq_factor"),
                high,
                &format!("must be greater than low_freq_factor ({low})"),
            )?;
        }
        let ov = d
            .get("original_max_position_embeddings")
            .unwrap_or(&Value::Null);
        if !is_int_literal(ov) {
            diag.warn(
                &f("original_max_position_embeddings"),
                show(ov),
                "must be an integer",
            )?;
        }
        if let (Some(o), Some(max_pos)) = (self.original_at_config(d, p)?, self.facts.max_pos)
            && o >= max_pos as f64
        {
            diag.warn(
                &f("original_max_position_embeddings"),
                show(ov),
                &format!("must be less than max_position_embeddings ({max_pos})"),
            )?;
        }
        let original = self.original_at_init(layer, diag)?;
        let factor = self.factor(d, p)?;
        let cfg = self
            .dims(layer, HeadDimUse::OrFallback, true)?
            .with_scaling_lenient(Scaling::Llama3(Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            }))
            .map_err(|e| prefix_error(e, p, "llama3."))?;
        Ok((cfg, Some(original)))
    }

    fn build_proportional(
        &self,
        layer: &Layer,
        diag: &mut Diag,
    ) -> Result<(RopeConfig, Option<usize>)> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let f = |k: &str| format!("{p}.{k}");
        let prf = match d.get("partial_rotary_factor") {
            None | Some(Value::Null) => {
                diag.warn(
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
                diag.note(format!(
                    "{p}.factor = {} divides every proportional frequency, although \
                     transformers' validation calls the key unrecognized",
                    show(v)
                ));
                need_number(&f("factor"), v, "a number > 0")?
            }
        };
        let cfg = self
            .dims(layer, HeadDimUse::OrFallback, false)?
            .with_scaling_lenient(Scaling::Proportional {
                factor,
                partial_rotary_factor: prf,
            })
            .map_err(|e| prefix_error(e, p, "proportional."))?;
        Ok((cfg, None))
    }

    fn build_ropex(&self, layer: &Layer, rope_type: &str) -> Result<(RopeConfig, Option<usize>)> {
        let d = &layer.dict;
        let p = &layer.prefix;
        let factor = self.factor(d, p)?;
        let scaling = match rope_type {
            "ntk_aware" => Scaling::NtkAware { factor },
            "ntk_old" => Scaling::NtkOld { factor },
            "ntk_fixed" => Scaling::NtkFixed { factor },
            _ => {
                let b = match get_some(d, "mixed_b") {
                    None => 0.625,
                    Some(v) => need_number(&format!("{p}.mixed_b"), v, "a number in [0, 1]")?,
                };
                Scaling::NtkMixed { factor, b }
            }
        };
        let cfg = self
            .dims(layer, HeadDimUse::OrFallback, true)?
            .with_scaling(scaling)
            .map_err(|e| prefix_error(e, p, &format!("{rope_type}.")))?;
        Ok((cfg, None))
    }

    fn position_map(&self, d: &Obj, p: &str, diag: &mut Diag) -> Result<Option<PositionMap>> {
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

/// Which of transformers' two `head_dim` reads a rope type uses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeadDimUse {
    /// `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`.
    OrFallback,
    /// `getattr(config, "head_dim", hidden_size // num_attention_heads)`.
    Getattr,
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
fn number_list(field: &str, v: &Value) -> Result<Vec<f64>> {
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

fn read_facts(top: &Obj, profile: &Profile) -> Result<Facts> {
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

fn gpt_oss_default() -> Obj {
    serde_json::json!({
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": false,
        "original_max_position_embeddings": 4096
    })
    .as_object()
    .cloned()
    .expect("object literal")
}

fn gemma3_default() -> Obj {
    serde_json::json!({
        "sliding_attention": {"rope_type": "default"},
        "full_attention": {"rope_type": "default"}
    })
    .as_object()
    .cloned()
    .expect("object literal")
}

fn gemma4_default() -> Obj {
    serde_json::json!({
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1000000.0}
    })
    .as_object()
    .cloned()
    .expect("object literal")
}

#[cfg(test)]
mod tests;
