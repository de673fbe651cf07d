//! The checkpoint's `config.json`: architecture sizes, RoPE settings and the tensor list.

use std::path::Path;

use ropex::{Layout, RopeConfig};
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// One entry of `config.json`'s tensor list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorSpec {
    /// Tensor name in `model.safetensors`.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// The fields of `config.json` the forward pass needs (other fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Residual width.
    pub d_model: usize,
    /// Attention heads (queries, keys and values alike).
    pub n_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// SwiGLU hidden width.
    pub mlp_hidden: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Whether `lm_head` shares `tok_emb`'s weights.
    #[serde(default)]
    pub tied_embeddings: bool,
    /// RoPE base (`theta`).
    pub rope_base: f64,
    /// `"half"` (rotate_half, NeoX) or `"interleaved"` (GPT-J).
    pub rope_layout: String,
    /// Rotary dims per head (defaults to `head_dim`).
    #[serde(default)]
    pub rope_dim: Option<usize>,
    /// The training context length.
    pub train_len: usize,
    /// The position map the checkpoint was trained with (informational).
    #[serde(default)]
    pub train_position_map: Option<serde_json::Value>,
    /// Every tensor of the checkpoint with its shape.
    pub tensors: Vec<TensorSpec>,
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.check().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("mlp_hidden", self.mlp_hidden),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.vocab_size != 256 {
            return Err(format!(
                "vocab_size is {}, but this is a byte-level model (256)",
                self.vocab_size
            ));
        }
        if self.train_len < 2 {
            return Err(format!("train_len must be >= 2, got {}", self.train_len));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("norm_eps must be > 0, got {}", self.norm_eps));
        }
        self.layout()?;
        Ok(())
    }

    /// The rotary pair layout.
    pub fn layout(&self) -> std::result::Result<Layout, String> {
        match self.rope_layout.as_str() {
            "half" | "neox" | "rotate_half" => Ok(Layout::Half),
            "interleaved" | "gptj" => Ok(Layout::Interleaved),
            other => Err(format!(
                "rope_layout {other:?} is not \"half\" or \"interleaved\""
            )),
        }
    }

    /// Plain RoPE for this model: head dim, rotary dim and base (add a scheme with
    /// [`RopeConfig::with_scaling`]).
    pub fn rope(&self) -> Result<RopeConfig> {
        let cfg = RopeConfig::new(self.head_dim, self.rope_base)?;
        Ok(match self.rope_dim {
            Some(d) if d != self.head_dim => cfg.with_rotary_dim(d)?,
            _ => cfg,
        })
    }

    /// The tensors this architecture needs, with their shapes.
    pub fn expected_tensors(&self) -> Vec<TensorSpec> {
        let (d, hd, f, v) = (
            self.d_model,
            self.n_heads * self.head_dim,
            self.mlp_hidden,
            self.vocab_size,
        );
        let t = |name: String, shape: &[usize]| TensorSpec {
            name,
            shape: shape.to_vec(),
        };
        let mut out = vec![t("tok_emb.weight".into(), &[v, d])];
        for l in 0..self.n_layers {
            let p = format!("layers.{l}");
            out.push(t(format!("{p}.attn_norm.weight"), &[d]));
            for w in ["wq", "wk", "wv"] {
                out.push(t(format!("{p}.attn.{w}.weight"), &[hd, d]));
            }
            out.push(t(format!("{p}.attn.wo.weight"), &[d, hd]));
            out.push(t(format!("{p}.mlp_norm.weight"), &[d]));
            out.push(t(format!("{p}.mlp.w1.weight"), &[f, d]));
            out.push(t(format!("{p}.mlp.w3.weight"), &[f, d]));
            out.push(t(format!("{p}.mlp.w2.weight"), &[d, f]));
        }
        out.push(t("norm.weight".into(), &[d]));
        if !self.tied_embeddings {
            out.push(t("lm_head.weight".into(), &[v, d]));
        }
        out
    }
}
