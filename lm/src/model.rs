//! The forward pass of the tiny byte-level RoPE language model of
//! `tools/train_tiny_lm.py`, with ropex doing the position work.
//!
//! Architecture (the training script's docstring is the authoritative text):
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
//! (any [`ropex::Scaling`]), layout, position map and log-n, one per [`Plan`] segment.
//! Every attention call goes through [`attend_with`], the one place that runs a ropex
//! [`Kernel`] (the tiled kernel unless [`TinyLm::forward_with`] asks for another).

use std::fmt;

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, Axis, s};
use ropex::Layout;
use ropex::attention::{Attention, Kernel};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::plan::Plan;

/// One transformer block's weights.
pub(crate) struct Layer {
    pub(crate) attn_norm: Array1<f32>,
    pub(crate) wq: Array2<f32>,
    pub(crate) wk: Array2<f32>,
    pub(crate) wv: Array2<f32>,
    pub(crate) wo: Array2<f32>,
    pub(crate) mlp_norm: Array1<f32>,
    pub(crate) w1: Array2<f32>,
    pub(crate) w3: Array2<f32>,
    pub(crate) w2: Array2<f32>,
}

/// A loaded checkpoint: configuration and f32 weights.
pub struct TinyLm {
    pub(crate) config: ModelConfig,
    pub(crate) layout: Layout,
    pub(crate) tok_emb: Array2<f32>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Array1<f32>,
    pub(crate) lm_head: Array2<f32>,
}

impl fmt::Debug for TinyLm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TinyLm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TinyLm {
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
        self.forward_with(tokens, plan, from, Kernel::default())
    }

    /// [`TinyLm::forward`] with every attention call computed by `kernel` (the f64
    /// reference, Su's two-pass method or the tiled kernel with given tiles).
    pub fn forward_with(
        &self,
        tokens: &[u8],
        plan: &Plan,
        from: usize,
        kernel: Kernel,
    ) -> Result<Array2<f32>> {
        let t = tokens.len();
        if t == 0 || from >= t {
            return Err(ModelError::Input(format!(
                "forward pass over {t} tokens asked for logits from position {from}"
            )));
        }
        plan.segments(t)?;
        let cfg = &self.config;
        let (h, dh) = (cfg.n_heads, cfg.head_dim);
        let eps = cfg.norm_eps as f32;

        let mut x = Array2::<f32>::zeros((t, cfg.d_model));
        for (mut row, &b) in x.rows_mut().into_iter().zip(tokens) {
            row.assign(&self.tok_emb.row(b as usize));
        }
        let n_layers = self.layers.len();
        for (l, layer) in self.layers.iter().enumerate() {
            // The last layer only computes the rows whose logits are wanted.
            let q_from = if l + 1 == n_layers { from } else { 0 };
            let a = rms_norm(x.view(), &layer.attn_norm, eps)?;
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
            let heads = plan.attend(kernel, q.view(), k.view(), v.view(), q_from)?;
            let heads = heads
                .into_shape_with_order((t - q_from, h * dh))
                .map_err(|e| ModelError::Input(e.to_string()))?;
            let attn_out = heads.dot(&layer.wo.t());
            if q_from > 0 {
                x = x.slice(s![q_from.., ..]).to_owned();
            }
            x += &attn_out;

            let m = rms_norm(x.view(), &layer.mlp_norm, eps)?;
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
        let xn = rms_norm(x.view(), &self.norm, eps)?;
        Ok(xn.dot(&self.lm_head.t()))
    }
}

/// `x / sqrt(mean(x^2) + eps) * g`, row by row (the output allocated fallibly).
pub(crate) fn rms_norm(
    x: ArrayView2<f32>,
    g: &Array1<f32>,
    eps: f32,
) -> std::result::Result<Array2<f32>, crate::error::AllocError> {
    let mut out = crate::error::zeros2("rms_norm output", x.dim())?;
    out.assign(&x);
    let d = x.ncols() as f32;
    for mut row in out.axis_iter_mut(Axis(0)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d;
        let inv = 1.0 / (ms + eps).sqrt();
        row.zip_mut_with(g, |v, &w| *v = *v * inv * w);
    }
    Ok(out)
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

/// The attention every layer calls by default: `q` `[n_q, H, d]` at `q_pos`, `k`/`v`
/// `[n_k, H, d]` at `k_pos`, unrotated; returns `[n_q, H, d]`. This is
/// [`attend_with`] with [`Kernel::default`], ropex's tiled kernel (tiles classified per
/// piece of the position map, an online softmax).
pub fn attend(
    att: &Attention,
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    q_pos: &[usize],
    k_pos: &[usize],
) -> Result<Array3<f32>> {
    attend_with(Kernel::default(), att, q, k, v, q_pos, k_pos)
}

/// [`attend`] computed by `kernel` ([`Attention::run`]).
pub fn attend_with(
    kernel: Kernel,
    att: &Attention,
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    q_pos: &[usize],
    k_pos: &[usize],
) -> Result<Array3<f32>> {
    Ok(att.run(kernel, q, k, v, q_pos, k_pos)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ropex::PositionMap;
    use ropex::position::{dca_for, self_extend_for};

    /// The forward pass under each kernel, for the maps of the `extend` example that
    /// hide keys or use more than two pieces (Self-Extend, DCA with its logit scale,
    /// StreamingLLM, each with log-n), read at 300 bytes, past the model's 128: the
    /// tiled and two-pass logits agree with the f64 reference kernel's.
    #[test]
    fn forward_agrees_across_kernels_for_every_new_map() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let model = TinyLm::load(&root.join("assets/tiny_lm_rope")).unwrap();
        let text = std::fs::read(root.join("assets/heldout_shakespeare.txt")).unwrap();
        let tokens = &text[1000..1300];
        let train_len = model.config().train_len;
        let freqs = model.config().rope().unwrap().frequencies();
        let maps = [
            self_extend_for(train_len, tokens.len()).unwrap(),
            dca_for(train_len).unwrap(),
            PositionMap::streaming(4, train_len - 4).unwrap(),
        ];
        for map in maps {
            let mut att = Attention::new(freqs.clone(), model.layout(), map)
                .with_log_n(train_len)
                .unwrap();
            if matches!(map, PositionMap::DualChunk { .. }) {
                att = att.with_dca_logit_scale(train_len).unwrap();
            }
            let plan = Plan::Single(att);
            let want = model
                .forward_with(tokens, &plan, 250, Kernel::Reference)
                .unwrap();
            for kernel in [Kernel::default(), Kernel::TwoPass] {
                let got = model.forward_with(tokens, &plan, 250, kernel).unwrap();
                assert_eq!(got.dim(), want.dim());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{map} {kernel}: max |diff| {worst:e}");
            }
        }
    }
}
