//! Loading a checkpoint: `config.json` and `model.safetensors` (F32, F16 or BF16 tensors,
//! widened to f32 through the `half` crate), checked tensor by tensor against the
//! architecture.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use ndarray::{Array1, Array2};
use safetensors::{Dtype, SafeTensors};

use crate::config::{ModelConfig, TensorSpec};
use crate::error::{ModelError, Result};
use crate::model::{Layer, TinyLm};

fn read_tensor(st: &SafeTensors<'_>, spec: &TensorSpec) -> Result<Vec<f32>> {
    let view = st.tensor(&spec.name).map_err(|_| {
        ModelError::Mismatch(format!(
            "tensor {} (shape {:?}) is listed in config.json but missing from model.safetensors",
            spec.name, spec.shape
        ))
    })?;
    if view.shape() != spec.shape.as_slice() {
        return Err(ModelError::Mismatch(format!(
            "tensor {} has shape {:?} in model.safetensors, config.json says {:?}",
            spec.name,
            view.shape(),
            spec.shape
        )));
    }
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::Mismatch(format!(
                "tensor {} has dtype {other:?}; supported: F32, F16, BF16",
                spec.name
            )));
        }
    };
    let n: usize = spec.shape.iter().product();
    if values.len() != n {
        return Err(ModelError::Mismatch(format!(
            "tensor {} holds {} values, its shape {:?} needs {n}",
            spec.name,
            values.len(),
            spec.shape
        )));
    }
    Ok(values)
}

impl TinyLm {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    ///
    /// Every tensor the architecture needs must be listed in `config.json` with the
    /// shape the architecture implies, and every listed tensor must be in
    /// `model.safetensors` with that shape (F32, F16 or BF16); anything else is a
    /// [`ModelError::Mismatch`] naming the tensor.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Input(format!(
                "model directory {} does not exist (expected config.json and model.safetensors in it)",
                dir.display()
            )));
        }
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let st_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&st_path).map_err(|source| ModelError::Io {
            path: st_path.clone(),
            source,
        })?;
        Self::from_bytes(config, &bytes).map_err(|e| match e {
            ModelError::Mismatch(m) => ModelError::Mismatch(format!("{}: {m}", dir.display())),
            other => other,
        })
    }

    /// Builds the model from a parsed configuration and the bytes of a safetensors file.
    pub fn from_bytes(config: ModelConfig, safetensors: &[u8]) -> Result<Self> {
        let layout = config.layout().map_err(ModelError::Input)?;
        config.rope()?;
        let st = SafeTensors::deserialize(safetensors)
            .map_err(|e| ModelError::Mismatch(format!("model.safetensors is not readable: {e}")))?;

        // The architecture's tensors must be listed with the implied shapes ...
        for want in config.expected_tensors() {
            match config.tensors.iter().find(|t| t.name == want.name) {
                None => {
                    return Err(ModelError::Mismatch(format!(
                        "config.json does not list tensor {} (shape {:?}), which the architecture needs",
                        want.name, want.shape
                    )));
                }
                Some(t) if t.shape != want.shape => {
                    return Err(ModelError::Mismatch(format!(
                        "config.json lists tensor {} with shape {:?}; d_model {}, n_heads {}, head_dim {}, mlp_hidden {} imply {:?}",
                        t.name,
                        t.shape,
                        config.d_model,
                        config.n_heads,
                        config.head_dim,
                        config.mlp_hidden,
                        want.shape
                    )));
                }
                Some(_) => {}
            }
        }
        // ... and every listed tensor must be in the file with its listed shape.
        let mut weights = HashMap::new();
        for spec in &config.tensors {
            weights.insert(
                spec.name.clone(),
                (spec.shape.clone(), read_tensor(&st, spec)?),
            );
        }
        for name in st.names() {
            if !config.tensors.iter().any(|t| t.name == name) {
                return Err(ModelError::Mismatch(format!(
                    "model.safetensors has tensor {name}, which config.json does not list"
                )));
            }
        }

        let mut take2 = |name: &str| -> Result<Array2<f32>> {
            let (shape, data) = weights
                .remove(name)
                .ok_or_else(|| ModelError::Mismatch(format!("tensor {name} is missing")))?;
            Array2::from_shape_vec((shape[0], shape[1]), data)
                .map_err(|e| ModelError::Mismatch(format!("tensor {name}: {e}")))
        };
        let tok_emb = take2("tok_emb.weight")?;
        let lm_head = if config.tied_embeddings {
            tok_emb.clone()
        } else {
            take2("lm_head.weight")?
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let p = format!("layers.{l}");
            let wq = take2(&format!("{p}.attn.wq.weight"))?;
            let wk = take2(&format!("{p}.attn.wk.weight"))?;
            let wv = take2(&format!("{p}.attn.wv.weight"))?;
            let wo = take2(&format!("{p}.attn.wo.weight"))?;
            let w1 = take2(&format!("{p}.mlp.w1.weight"))?;
            let w3 = take2(&format!("{p}.mlp.w3.weight"))?;
            let w2 = take2(&format!("{p}.mlp.w2.weight"))?;
            layers.push(Layer {
                attn_norm: Array1::zeros(0),
                wq,
                wk,
                wv,
                wo,
                mlp_norm: Array1::zeros(0),
                w1,
                w3,
                w2,
            });
        }
        let mut take1 = |name: &str| -> Result<Array1<f32>> {
            let (_, data) = weights
                .remove(name)
                .ok_or_else(|| ModelError::Mismatch(format!("tensor {name} is missing")))?;
            Ok(Array1::from_vec(data))
        };
        for (l, layer) in layers.iter_mut().enumerate() {
            layer.attn_norm = take1(&format!("layers.{l}.attn_norm.weight"))?;
            layer.mlp_norm = take1(&format!("layers.{l}.mlp_norm.weight"))?;
        }
        let norm = take1("norm.weight")?;
        Ok(TinyLm {
            config,
            layout,
            tok_emb,
            layers,
            norm,
            lm_head,
        })
    }
}
