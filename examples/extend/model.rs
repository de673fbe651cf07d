//! The tiny byte-level RoPE language model of `tools/train_tiny_lm.py`, run in Rust with
//! ropex doing the position work.
//!
//! Architecture (see the training script's docstring for the authoritative text):
//!
//! ```text
//! x = tok_emb[bytes]                                   # [T, d_model]
//! for each layer:
//!     x = x + wo(attn(rmsnorm(x; attn_norm)))           # q, k, v = wq a, wk a, wv a
//!     m = rmsnorm(x; mlp_norm)
//!     x = x + w2(silu(w1 m) * (w3 m))                   # SwiGLU
//! logits = lm_head(rmsnorm(x; norm))
//! rmsnorm(x; g) = x / sqrt(mean(x^2) + eps) * g
//! ```
//!
//! Linear weights are `[out, in]` (`y = x W^T`), heads are contiguous slices of the
//! projections, and attention is whatever a ropex [`Attention`] describes: frequencies
//! (any [`ropex::Scaling`]), layout, position map and log-n. Every attention call goes
//! through [`attend`], the one place that picks the ropex kernel.
//!
//! This file is also compiled into `tests/tiny_lm_parity.rs`, so it depends only on ropex,
//! ndarray, safetensors and serde.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, Axis, s};
use ropex::attention::Attention;
use ropex::{Layout, RopeConfig};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

/// Why a checkpoint could not be loaded or a forward pass could not run.
#[derive(Debug)]
pub enum ModelError {
    /// A file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or misses a field.
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The weights do not match the configuration (missing tensor, wrong shape or dtype).
    Mismatch(String),
    /// The input is not something the model can run on.
    Input(String),
    /// ropex rejected a parameter.
    Rope(ropex::RopeError),
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Io { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            ModelError::Config { path, message } => write!(f, "{}: {message}", path.display()),
            ModelError::Mismatch(m) => write!(f, "checkpoint does not match its config: {m}"),
            ModelError::Input(m) => write!(f, "{m}"),
            ModelError::Rope(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ModelError {}

impl From<ropex::RopeError> for ModelError {
    fn from(e: ropex::RopeError) -> Self {
        ModelError::Rope(e)
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ModelError>;

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

struct Layer {
    attn_norm: Array1<f32>,
    wq: Array2<f32>,
    wk: Array2<f32>,
    wv: Array2<f32>,
    wo: Array2<f32>,
    mlp_norm: Array1<f32>,
    w1: Array2<f32>,
    w3: Array2<f32>,
    w2: Array2<f32>,
}

/// A loaded checkpoint: configuration and f32 weights.
pub struct TinyLm {
    config: ModelConfig,
    layout: Layout,
    tok_emb: Array2<f32>,
    layers: Vec<Layer>,
    norm: Array1<f32>,
    lm_head: Array2<f32>,
}

impl fmt::Debug for TinyLm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TinyLm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A contiguous range of query positions and the attention that serves it. A forward
/// pass attends queries `queries` to every key before `queries.end` under `attention`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Query positions (0-based token indices) served by this segment.
    pub queries: Range<usize>,
    /// Frequencies, layout, map and log-n for these queries (and their keys).
    pub attention: Attention,
}

/// How attention is computed over a sequence: one [`Attention`] for every query, or
/// consecutive [`Segment`]s (length-dependent schemes such as dynamic NTK, whose
/// frequencies change as the sequence grows; each segment's keys are rotated afresh).
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The same attention for every query.
    Single(Attention),
    /// Segments covering `0..T` in order.
    Segments(Vec<Segment>),
}

impl Plan {
    fn segments(&self, len: usize) -> Result<Vec<(Range<usize>, &Attention)>> {
        match self {
            Plan::Single(a) => Ok(vec![(0..len, a)]),
            Plan::Segments(segs) => {
                let mut next = 0;
                let mut out = Vec::with_capacity(segs.len());
                for seg in segs {
                    if seg.queries.start != next || seg.queries.end < seg.queries.start {
                        return Err(ModelError::Input(format!(
                            "plan segments must tile 0..{len} in order; got {:?} after {next}",
                            seg.queries
                        )));
                    }
                    next = seg.queries.end;
                    out.push((seg.queries.clone(), &seg.attention));
                }
                if next != len {
                    return Err(ModelError::Input(format!(
                        "plan segments cover 0..{next}, the sequence has {len} tokens"
                    )));
                }
                Ok(out)
            }
        }
    }
}

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
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
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

/// IEEE half to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = frac * 2^-24.
            let v = frac as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
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
        let mut weights = std::collections::HashMap::new();
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

    /// The checkpoint's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The rotary layout the model was trained with.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Logits `[T - from, vocab]` for positions `from..T` of `tokens` (the next-byte
    /// distribution after each of those positions), with attention as `plan` says.
    ///
    /// Only the rows that are asked for are computed in the last layer, so scoring the
    /// final bytes of a long window costs less than a full forward pass.
    pub fn forward(&self, tokens: &[u8], plan: &Plan, from: usize) -> Result<Array2<f32>> {
        let t = tokens.len();
        if t == 0 || from >= t {
            return Err(ModelError::Input(format!(
                "forward pass over {t} tokens asked for logits from position {from}"
            )));
        }
        let segments = plan.segments(t)?;
        let cfg = &self.config;
        let (h, dh) = (cfg.n_heads, cfg.head_dim);
        let eps = cfg.norm_eps as f32;
        let positions: Vec<usize> = (0..t).collect();

        let mut x = Array2::<f32>::zeros((t, cfg.d_model));
        for (mut row, &b) in x.rows_mut().into_iter().zip(tokens) {
            row.assign(&self.tok_emb.row(b as usize));
        }
        let n_layers = self.layers.len();
        for (l, layer) in self.layers.iter().enumerate() {
            // The last layer only computes the rows whose logits are wanted.
            let q_from = if l + 1 == n_layers { from } else { 0 };
            let a = rms_norm(x.view(), &layer.attn_norm, eps);
            let q = a.slice(s![q_from.., ..]).dot(&layer.wq.t());
            let k = a.dot(&layer.wk.t());
            let v = a.dot(&layer.wv.t());
            let q = q
                .into_shape_with_order((t - q_from, h, dh))
                .map_err(|e| ModelError::Input(e.to_string()))?;
            let k = k
                .into_shape_with_order((t, h, dh))
                .map_err(|e| ModelError::Input(e.to_string()))?;
            let v = v
                .into_shape_with_order((t, h, dh))
                .map_err(|e| ModelError::Input(e.to_string()))?;
            let mut heads = Array3::<f32>::zeros((t - q_from, h, dh));
            for (range, att) in &segments {
                let start = range.start.max(q_from);
                if start >= range.end {
                    continue;
                }
                let out = attend(
                    att,
                    q.slice(s![start - q_from..range.end - q_from, .., ..]),
                    k.slice(s![..range.end, .., ..]),
                    v.slice(s![..range.end, .., ..]),
                    &positions[start..range.end],
                    &positions[..range.end],
                )?;
                heads
                    .slice_mut(s![start - q_from..range.end - q_from, .., ..])
                    .assign(&out);
            }
            let heads = heads
                .into_shape_with_order((t - q_from, h * dh))
                .map_err(|e| ModelError::Input(e.to_string()))?;
            let attn_out = heads.dot(&layer.wo.t());
            if q_from > 0 {
                x = x.slice(s![q_from.., ..]).to_owned();
            }
            x += &attn_out;

            let m = rms_norm(x.view(), &layer.mlp_norm, eps);
            let mut gate = m.dot(&layer.w1.t());
            let up = m.dot(&layer.w3.t());
            ndarray::Zip::from(&mut gate)
                .and(&up)
                .for_each(|g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
            x += &gate.dot(&layer.w2.t());
        }
        if n_layers == 0 && from > 0 {
            x = x.slice(s![from.., ..]).to_owned();
        }
        let xn = rms_norm(x.view(), &self.norm, eps);
        Ok(xn.dot(&self.lm_head.t()))
    }
}

/// `x / sqrt(mean(x^2) + eps) * g`, row by row.
fn rms_norm(x: ArrayView2<f32>, g: &Array1<f32>, eps: f32) -> Array2<f32> {
    let mut out = x.to_owned();
    let d = x.ncols() as f32;
    for mut row in out.axis_iter_mut(Axis(0)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d;
        let inv = 1.0 / (ms + eps).sqrt();
        row.zip_mut_with(g, |v, &w| *v = *v * inv * w);
    }
    out
}

/// Negative log-likelihood (nats) of `target` under each row of `logits`, in f64.
pub fn nll_rows(logits: ArrayView2<f32>, targets: &[u8]) -> Vec<f64> {
    logits
        .rows()
        .into_iter()
        .zip(targets)
        .map(|(row, &y)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            max + z.ln() - row[y as usize] as f64
        })
        .collect()
}

/// The attention kernel every layer calls: `q` `[n_q, H, d]` at `q_pos`, `k`/`v`
/// `[n_k, H, d]` at `k_pos`, unrotated; returns `[n_q, H, d]`. This is ropex's tiled
/// kernel ([`Attention::tiled`]): band-classified tiles with an online softmax.
pub fn attend(
    att: &Attention,
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    q_pos: &[usize],
    k_pos: &[usize],
) -> Result<Array3<f32>> {
    Ok(att.tiled(q, k, v, q_pos, k_pos)?)
}
