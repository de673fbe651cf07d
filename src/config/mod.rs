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
//!   `max_position_embeddings` as its original length and ignores the dict's key. A llama3
//!   dict without the key (and no top-level one) therefore places its bands at
//!   `L0 = max_position_embeddings`, as transformers computes it; ropex warns that the key
//!   is missing (transformers warns that `original_max_position_embeddings >=
//!   max_position_embeddings`, about a value it filled in itself), so strict mode rejects
//!   such a config.
//! - `yarn` requires the `factor` key (a missing one is a [`RopeError::MissingKey`], as
//!   transformers' validation raises) but derives a null one as
//!   `max_position_embeddings / original_max_position_embeddings`; `longrope` derives a
//!   missing or null `factor` the same way, with a warning.
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
//! | `dual_chunk_attention_config` | vLLM / Qwen2.5-1M: a Dual Chunk Attention map (see below) |
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
//! | `llama3` | `factor`, `low_freq_factor`, `high_freq_factor` R, `original_max_position_embeddings` R (missing: `max_position_embeddings`, with a warning) | [`Scaling::Llama3`] |
//! | `proportional` | `partial_rotary_factor` (share of rotating pairs), `factor` (used, though transformers calls it unrecognized) | [`Scaling::Proportional`] over the full head |
//! | `ntk_aware` (ropex) | `factor` R | [`Scaling::NtkAware`] |
//! | `ntk_old` (ropex) | `factor` R | [`Scaling::NtkOld`] |
//! | `ntk_fixed` (ropex) | `factor` R | [`Scaling::NtkFixed`] |
//! | `ntk_mixed` (ropex) | `factor` R, `mixed_b` o (0.625) | [`Scaling::NtkMixed`] |
//!
//! `ropex_position_map` (ropex; top level, or inside a rope dict where it wins for that
//! layer type) is parsed into [`PositionMap`]. It is an object with a `type` and the
//! map's parameters, named as in the methods' own code, or a string in the text form of
//! [`PositionMap`]'s `FromStr` (the CLI's `--map` syntax):
//!
//! | object | string | map |
//! |---|---|---|
//! | `{"type": "rope"}` | `"rope"` | [`PositionMap::Rope`] |
//! | `{"type": "rerope", "window": 512}` | `"rerope:512"` | [`PositionMap::rerope`] |
//! | `{"type": "leaky_rerope", "window": 512, "leak": 16}` | `"leaky:512:16"` | [`PositionMap::leaky_rerope`] (`leak < 1`: inverse Leaky ReRoPE) |
//! | `{"type": "interpolated", "factor": 4}` | `"interp:4"` | [`PositionMap::interpolated`] |
//! | `{"type": "self_extend", "group_size": 8, "window": 1024}` (+ `"scale_base": 4096` o) | `"self-extend:8:1024"` (`:4096`) | [`PositionMap::self_extend`] ([`PositionMap::self_extend_scaled`]); `group_size` is LongLM's `group_size_1` = G, `window` its neighbour window `group_size_2` = W |
//! | `{"type": "dual_chunk", "chunk_size": 3072, "local_window": 512}` (or vLLM's `"local_size"`) | `"dca:3072:512"` | [`PositionMap::dca`] |
//! | `{"type": "streaming", "sinks": 4, "window": 1024}` | `"streaming:4:1024"` | [`PositionMap::streaming`] |
//!
//! Every key but `scale_base` is required (a missing one is a [`RopeError::MissingKey`];
//! `dual_chunk` takes exactly one of `local_window` and `local_size`). Counts are
//! non-negative integers (an integral float such as `512.0` is accepted), booleans are
//! never numbers, and a value the map's constructor rejects (`group_size = 0`,
//! `local_window >= chunk_size`, `window = 0`, ...) is a [`RopeError::InvalidParameter`]
//! naming the key (`ropex_position_map.group_size`) and what is allowed; for the string
//! form the error names the part of the string. A key the map's type does not take is
//! treated like an unrecognized rope-dict key: a warning, an error in strict mode.
//!
//! vLLM's `dual_chunk_attention_config` (top level; Qwen2.5-7B/14B-Instruct-1M ship
//! `{"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings":
//! 262144}`) is read as Dual Chunk Attention for every layer type:
//!
//! | key | use |
//! |---|---|
//! | `chunk_size` R | [`PositionMap::dca`]'s `chunk_size` |
//! | `local_size` R | [`PositionMap::dca`]'s `local_window` (the block length is `chunk_size - local_size`) |
//! | `original_max_position_embeddings` o | [`ModelRope::original_max_position_embeddings`] when the config names no other (0 or null: unset, as in vLLM); vLLM scales logits by `max(0.1 ln(n/L) + 1, 1)` with it, which ropex does not build in |
//! | `sparse_attention_config`, `sparse_attention_enabled`, `sparse_attention_threshold`, `sparse_attention_last_q` | vLLM's sparse prefill, not positions: ignored (listed in [`ModelRope::notes`]) |
//!
//! `chunk_size` and `local_size` are required (vLLM's dual-chunk rotary embedding takes
//! both; its attention backend's defaults 8192 / 1024 are not used); any other key is
//! warned about (strict: an error). The block is read with [`ParseOptions::extensions`]
//! on; off, it is ignored, as transformers ignores it, with a note. When a config has
//! both the block and a `ropex_position_map` (at the top level or in the rope dict of a
//! layer type), `ropex_position_map` takes precedence, because it is the explicit,
//! ropex-specific choice (say, to compare Self-Extend against DCA on a Qwen2.5-1M
//! config): the block is still validated (a broken block fails the config), its
//! `original_max_position_embeddings` is still used, and a note says which map won.
//!
//! Mask keys (`sliding_window`, `use_sliding_window`, `attention_chunk_size`) are not
//! read into [`ModelRope`]: it describes one rope dict, which may cover layers with
//! different masks (gpt-oss, Qwen2 with `max_window_layers`), so the mask of a layer
//! does not fit it; pass masks to the kernels with [`crate::attention::Mask`].
//!
//! The ropex rope types and keys are accepted when [`ParseOptions::extensions`] is on (the
//! default). With it off, ropex reads configs exactly as transformers would: the `ntk_*`
//! types are unknown rope types (transformers fails at model init) and
//! `ropex_position_map` inside a rope dict is an unrecognized key (at the top level it
//! and `dual_chunk_attention_config` are ignored).
//!
//! ## Layout
//! One concern per file: `json` (reading values the way Python reads a dict), `profile`
//! (what each transformers config class does: defaults, `head_dim` rules, legacy
//! conversions, layer types), `facts` (the model's dims and lengths, and the two
//! `head_dim` reads), `dicts` (`rope_scaling` / `rope_parameters` to standardized rope
//! dicts), `parser` (key checks and dispatch), `build/` (one builder per rope type, sharing
//! one epilogue), `position_map` (`ropex_position_map` and `dual_chunk_attention_config`). Rope-type names come from the
//! scheme module's single list.

mod build;
mod dicts;
mod facts;
mod json;
mod parser;
mod position_map;
mod profile;

use std::path::Path;

use serde_json::Value;

use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::PositionMap;
use crate::scheme::RopeConfig;
#[cfg(doc)]
use crate::scheme::Scaling;
use parser::Parser;
use profile::Profile;

/// How a config is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    /// Turn what transformers only warns about (unrecognized keys, factors below 1,
    /// `beta_fast < beta_slow`, a `factor` that disagrees with the lengths, ...) into
    /// errors. Off: those are collected in [`ModelRope::warnings`].
    pub strict: bool,
    /// Accept ropex's own rope types (`ntk_aware`, `ntk_old`, `ntk_fixed`, `ntk_mixed`) and
    /// keys (`mixed_b`, `ropex_position_map`), and read vLLM's
    /// `dual_chunk_attention_config` as a map. On by default; off reads configs exactly
    /// as transformers does.
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
    /// model init), otherwise the top-level key if any, otherwise the
    /// `original_max_position_embeddings` of vLLM's `dual_chunk_attention_config`.
    pub original_max_position_embeddings: Option<usize>,
    /// The relative-position map: `ropex_position_map`, else vLLM's
    /// `dual_chunk_attention_config` as Dual Chunk Attention, if the config has either.
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

    /// The context length the config is meant for: what to size rotary tables and KV
    /// caches by.
    ///
    /// The rule: `max(max_position_embeddings, floor(factor * L0))` for the schemes that
    /// name both an extension factor `s` and the pretraining length `L0` they extend
    /// (YaRN, llama3, LongRoPE), else `max_position_embeddings`. transformers sizes
    /// nothing by this value itself (it computes the frequencies for any length), so the
    /// rule follows the schemes' own meaning: YaRN and LongRoPE interpolate `L0` to
    /// `s L0` tokens; a config may keep a larger `max_position_embeddings` (Llama 3.1:
    /// 131072 with `8 x 8192`) or a smaller one (Qwen2.5 with Qwen's YaRN block keeps
    /// 32768 with `4 x 32768 = 131072`, transformers only warns that the factor does not
    /// match), and the larger of the two is the length the model is meant to read.
    /// Dynamic NTK has no target length (its base keeps growing with the sequence) and
    /// linear / NTK configs name no `L0`: for them it is `max_position_embeddings`.
    /// An `s L0` that is not a representable length (past `2^53`) is ignored; `None` when
    /// neither length is known.
    ///
    /// ```
    /// use ropex::config::ModelRope;
    /// let qwen = r#"{"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
    ///     "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    ///     "rope_scaling": {"type": "yarn", "factor": 4.0,
    ///                      "original_max_position_embeddings": 32768}}"#;
    /// let rope = ModelRope::from_json_str(qwen, None)?;
    /// assert_eq!(rope.max_position_embeddings, Some(32768));
    /// assert_eq!(rope.context_len(), Some(131_072));
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn context_len(&self) -> Option<usize> {
        let scaled = self.config.scaling().scaled_len().and_then(|(s, l0)| {
            let n = (s * l0 as f64).floor();
            // Below 2^53 every integer is exact in f64, and it fits usize on 64-bit.
            (n.is_finite() && (1.0..=9.007_199_254_740_992e15).contains(&n))
                .then(|| usize::try_from(n as u64).ok())
                .flatten()
        });
        match (self.max_position_embeddings, scaled) {
            (Some(m), Some(s)) => Some(m.max(s)),
            (m, s) => m.or(s),
        }
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

#[cfg(test)]
mod tests;
