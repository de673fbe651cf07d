//! [`LlamaConfig`]: the hyperparameters a Llama-family GGUF file states in its metadata.

use ropex::gguf::Gguf;

use super::error::{LlamaError, Result};

/// Hyperparameters of a Llama-family model, read from the `llama.*` GGUF keys
/// llama.cpp's converter writes.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama.block_count`.
    pub n_layers: usize,
    /// `llama.embedding_length` (the residual width).
    pub hidden: usize,
    /// `llama.feed_forward_length` (SwiGLU inner width).
    pub ffn: usize,
    /// `llama.attention.head_count`.
    pub n_heads: usize,
    /// `llama.attention.head_count_kv` (defaults to `n_heads`: no GQA).
    pub n_kv_heads: usize,
    /// `hidden / n_heads`.
    pub head_dim: usize,
    /// Rows of `token_embd.weight`.
    pub vocab: usize,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub norm_eps: f64,
    /// `llama.context_length`, the training context.
    pub context_len: Option<usize>,
}

impl LlamaConfig {
    /// Reads and checks the hyperparameters; `general.architecture` must be `llama`.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let arch = g.architecture()?;
        if arch != "llama" {
            return Err(LlamaError::Unsupported {
                what: format!("general.architecture = '{arch}'"),
                allowed: "llama",
            });
        }
        let uint = |key: &str| -> Result<usize> {
            g.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| LlamaError::MissingKey {
                    key: key.into(),
                    expected: "an unsigned integer",
                })
        };
        let n_layers = uint("llama.block_count")?;
        let hidden = uint("llama.embedding_length")?;
        let ffn = uint("llama.feed_forward_length")?;
        let n_heads = uint("llama.attention.head_count")?;
        let n_kv_heads = match g.get("llama.attention.head_count_kv") {
            Some(_) => uint("llama.attention.head_count_kv")?,
            None => n_heads,
        };
        let norm_eps = g
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| LlamaError::MissingKey {
                key: "llama.attention.layer_norm_rms_epsilon".into(),
                expected: "a float",
            })?;
        let context_len = g
            .get("llama.context_length")
            .and_then(|v| v.as_u64())
            .and_then(|v| usize::try_from(v).ok());
        let vocab = g
            .tensor("token_embd.weight")
            .ok_or_else(|| LlamaError::MissingTensor("token_embd.weight".into()))?
            .dims()
            .get(1)
            .and_then(|&v| usize::try_from(v).ok())
            .unwrap_or(0);
        if n_layers == 0 || hidden == 0 || ffn == 0 || vocab == 0 {
            return Err(LlamaError::Unsupported {
                what: format!("{n_layers} blocks, width {hidden}, ffn {ffn}, vocabulary {vocab}"),
                allowed: "non-zero block count, widths and vocabulary",
            });
        }
        if n_heads == 0
            || n_kv_heads == 0
            || !hidden.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(LlamaError::Unsupported {
                what: format!("{n_heads} query heads, {n_kv_heads} kv heads, width {hidden}"),
                allowed: "query heads dividing the width and a multiple of the kv heads",
            });
        }
        if !(norm_eps.is_finite() && norm_eps > 0.0) {
            return Err(LlamaError::Unsupported {
                what: format!("RMSNorm epsilon {norm_eps}"),
                allowed: "a finite epsilon > 0",
            });
        }
        Ok(LlamaConfig {
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            vocab,
            norm_eps,
            context_len,
        })
    }

    /// Width of the key / value projections: `n_kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
