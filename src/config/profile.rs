//! What the transformers config class of a `model_type` does to the RoPE fields: class
//! defaults, how `head_dim` is filled in, legacy conversions and per-layer types.
//!
//! Only the RoPE-relevant behaviour of the classes below is modelled (transformers 5.x);
//! any other `model_type`, or none, gets [`Profile::GENERIC`].

use super::json::Obj;
use crate::scheme::RopeType;

/// How the config class provides `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum HeadDimRule {
    /// A typed `head_dim: int | None` field; `fill_none` when `__post_init__` replaces a
    /// missing/null value by `hidden_size // num_attention_heads` (Llama, gpt-oss).
    Field {
        default: Option<usize>,
        fill_none: bool,
        nullable: bool,
    },
    /// No field: `head_dim` is an attribute only when config.json has the key, and a
    /// JSON `null` stays `None` (Qwen2, Phi, Phi-3, StableLM).
    NoField,
    /// `head_dim` comes from another key (DeepSeek-V3: `qk_rope_head_dim`, default 64) unless
    /// config.json has a `head_dim` key, which is set after `__post_init__` and wins.
    FromKey(&'static str, usize),
}

/// The default `layer_types` the class builds when config.json has none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LayerRule {
    /// No default (Llama and most classes without a `layer_types` field).
    None,
    /// Qwen2: all `full_attention`, `sliding_attention` from `max_window_layers` on when
    /// `use_sliding_window`.
    Qwen2,
    /// Gemma 3/4: every 6th layer `full_attention`, the rest `sliding_attention`.
    EverySixth,
    /// gpt-oss: alternating `sliding_attention`, `full_attention`.
    Alternating,
}

/// Model-specific conversion of legacy keys into `rope_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Convert {
    /// `PreTrainedConfig.convert_rope_params_to_dict`.
    Standard,
    /// Phi-3: `rope_theta`/`partial_rotary_factor` (default 1.0) set into the dict, legacy
    /// `type` "su"/"yarn" renamed to "longrope", only "default"/"longrope" allowed, factor
    /// lists checked against `hidden_size // num_attention_heads * partial / 2`.
    Phi3,
    /// Gemma 3: nested by default; legacy `rope_scaling` is merged into `full_attention`,
    /// `rope_theta` (default 1e6) goes to `full_attention` and `rope_local_base_freq`
    /// (default 1e4) to `sliding_attention`.
    Gemma3,
    /// Gemma 4: nested by default (sliding: default 1e4; full: proportional 0.25, 1e6);
    /// `full_attention` layers use `global_head_dim` (default 512).
    Gemma4,
}

/// RoPE-relevant facts about one transformers config class.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Profile {
    /// `model_type`, or "" for the generic profile.
    pub model_type: &'static str,
    /// `default_theta` of the class.
    pub default_theta: f64,
    /// `max_position_embeddings` class default.
    pub max_pos: Option<usize>,
    /// `hidden_size` class default.
    pub hidden: Option<usize>,
    /// `num_attention_heads` class default.
    pub heads: Option<usize>,
    /// `num_hidden_layers` class default.
    pub layers: Option<usize>,
    /// How `head_dim` is provided.
    pub head_dim: HeadDimRule,
    /// `partial_rotary_factor` the class injects when config.json has none (Phi 0.5,
    /// StableLM 0.25).
    pub partial_default: Option<f64>,
    /// Whether the model's default (unscaled) RoPE honours `partial_rotary_factor`: Llama,
    /// Qwen2, Gemma, DeepSeek and gpt-oss rotate the full `head_dim` whatever it says.
    pub default_uses_partial: bool,
    /// A typed top-level `original_max_position_embeddings` field with this default
    /// (Phi-3): it overrides the value inside the rope dict already at config time.
    pub original_field: Option<usize>,
    /// Default `layer_types`.
    pub layer_rule: LayerRule,
    /// `validate_architecture` rejects `hidden_size % num_attention_heads != 0`.
    pub divisible_heads: bool,
    /// Integer fields are strictly typed (a float `4096.0` is rejected).
    pub strict_types: bool,
    /// Legacy conversion.
    pub convert: Convert,
    /// gpt-oss fills a missing `rope_parameters` with its YaRN block.
    pub gpt_oss_default_rope: bool,
}

impl Profile {
    /// Any `model_type` ropex has no profile for: `head_dim` null or missing falls back to
    /// `hidden_size // num_attention_heads`, `partial_rotary_factor` is honoured by every
    /// rope type, `layer_types` come only from config.json.
    pub const GENERIC: Profile = Profile {
        model_type: "",
        default_theta: 10_000.0,
        max_pos: None,
        hidden: None,
        heads: None,
        layers: None,
        head_dim: HeadDimRule::Field {
            default: None,
            fill_none: true,
            nullable: true,
        },
        partial_default: None,
        default_uses_partial: true,
        original_field: None,
        layer_rule: LayerRule::None,
        divisible_heads: false,
        strict_types: false,
        convert: Convert::Standard,
        gpt_oss_default_rope: false,
    };

    /// The profile of `model_type` (the generic one for unknown or missing types).
    pub fn for_model_type(model_type: Option<&str>) -> Profile {
        let g = Profile::GENERIC;
        let llama_like = Profile {
            strict_types: true,
            default_uses_partial: false,
            ..g.clone()
        };
        match model_type {
            Some("llama") => Profile {
                model_type: "llama",
                max_pos: Some(2048),
                hidden: Some(4096),
                heads: Some(32),
                layers: Some(32),
                divisible_heads: true,
                ..llama_like
            },
            Some("qwen2") => Profile {
                model_type: "qwen2",
                max_pos: Some(32768),
                hidden: Some(4096),
                heads: Some(32),
                layers: Some(32),
                head_dim: HeadDimRule::NoField,
                layer_rule: LayerRule::Qwen2,
                ..llama_like
            },
            Some("phi") => Profile {
                model_type: "phi",
                max_pos: Some(2048),
                hidden: Some(2048),
                heads: Some(32),
                layers: Some(24),
                head_dim: HeadDimRule::NoField,
                partial_default: Some(0.5),
                default_uses_partial: true,
                ..llama_like
            },
            Some("stablelm") => Profile {
                model_type: "stablelm",
                max_pos: Some(4096),
                hidden: Some(2560),
                heads: Some(32),
                layers: Some(32),
                head_dim: HeadDimRule::NoField,
                partial_default: Some(0.25),
                default_uses_partial: true,
                ..llama_like
            },
            Some("phi3") => Profile {
                model_type: "phi3",
                max_pos: Some(4096),
                hidden: Some(3072),
                heads: Some(32),
                layers: Some(32),
                head_dim: HeadDimRule::NoField,
                default_uses_partial: true,
                original_field: Some(4096),
                convert: Convert::Phi3,
                ..llama_like
            },
            Some("gemma3_text") => Profile {
                model_type: "gemma3_text",
                default_theta: 1_000_000.0,
                max_pos: Some(131_072),
                hidden: Some(2304),
                heads: Some(8),
                layers: Some(26),
                head_dim: HeadDimRule::Field {
                    default: Some(256),
                    fill_none: false,
                    nullable: false,
                },
                layer_rule: LayerRule::EverySixth,
                divisible_heads: true,
                convert: Convert::Gemma3,
                ..llama_like
            },
            Some("gemma4_text") => Profile {
                model_type: "gemma4_text",
                default_theta: 10_000.0,
                max_pos: Some(131_072),
                hidden: Some(2304),
                heads: Some(8),
                layers: Some(30),
                head_dim: HeadDimRule::Field {
                    default: Some(256),
                    fill_none: false,
                    nullable: false,
                },
                layer_rule: LayerRule::EverySixth,
                convert: Convert::Gemma4,
                ..llama_like
            },
            Some("deepseek_v3") => Profile {
                model_type: "deepseek_v3",
                max_pos: Some(4096),
                hidden: Some(7168),
                heads: Some(128),
                layers: Some(61),
                head_dim: HeadDimRule::FromKey("qk_rope_head_dim", 64),
                ..llama_like
            },
            Some("gpt_oss") => Profile {
                model_type: "gpt_oss",
                default_theta: 150_000.0,
                max_pos: Some(131_072),
                hidden: Some(2880),
                heads: Some(64),
                layers: Some(36),
                head_dim: HeadDimRule::Field {
                    default: Some(64),
                    fill_none: true,
                    nullable: true,
                },
                layer_rule: LayerRule::Alternating,
                gpt_oss_default_rope: true,
                ..llama_like
            },
            _ => g,
        }
    }

    /// The model types with a profile.
    pub const KNOWN: [&'static str; 9] = [
        "llama",
        "qwen2",
        "phi",
        "phi3",
        "stablelm",
        "gemma3_text",
        "gemma4_text",
        "deepseek_v3",
        "gpt_oss",
    ];

    /// True for the generic profile.
    pub fn is_generic(&self) -> bool {
        self.model_type.is_empty()
    }
}

/// gpt-oss: the YaRN block its config class fills in when config.json has no rope dict.
pub(super) fn gpt_oss_default() -> Obj {
    serde_json::json!({
        "rope_type": RopeType::Yarn.name(),
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

/// Gemma 3: the per-layer dicts its class starts from.
pub(super) fn gemma3_default() -> Obj {
    serde_json::json!({
        "sliding_attention": {"rope_type": RopeType::Default.name()},
        "full_attention": {"rope_type": RopeType::Default.name()}
    })
    .as_object()
    .cloned()
    .expect("object literal")
}

/// Gemma 4: the per-layer dicts its class starts from (sliding: default 1e4; full:
/// proportional 0.25 at 1e6).
pub(super) fn gemma4_default() -> Obj {
    serde_json::json!({
        "sliding_attention": {"rope_type": RopeType::Default.name(), "rope_theta": 10000.0},
        "full_attention": {"rope_type": RopeType::Proportional.name(), "partial_rotary_factor": 0.25,
                           "rope_theta": 1000000.0}
    })
    .as_object()
    .cloned()
    .expect("object literal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_type_has_its_own_profile() {
        for t in Profile::KNOWN {
            assert_eq!(Profile::for_model_type(Some(t)).model_type, t);
        }
        assert!(Profile::for_model_type(Some("mistral")).is_generic());
        assert!(Profile::for_model_type(None).is_generic());
    }
}
