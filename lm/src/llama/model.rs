//! [`Llama`]: a Llama-family forward pass on the CPU in f32, with ropex doing all the
//! position work.
//!
//! ```text
//! x = token_embd[tokens]                                        # [T, hidden]
//! for each block:
//!     a = rmsnorm(x; attn_norm)
//!     x = x + attn_output(attention(attn_q a, attn_k a, attn_v a))   # GQA
//!     m = rmsnorm(x; ffn_norm)
//!     x = x + ffn_down(silu(ffn_gate m) * ffn_up m)                   # SwiGLU
//! logits = output(rmsnorm(x; output_norm))       # output = token_embd when tied
//! rmsnorm(x; g) = x / sqrt(mean(x^2) + eps) * g
//! ```
//!
//! Weights are dequantised to f32 when the file is loaded (135M parameters are 540 MB in
//! f32). Q and K keep llama.cpp's row order: its converter permutes each head's rows so
//! that rotation pairs are adjacent dims `(2i, 2i+1)`, so this model rotates with
//! [`ropex::Layout::Interleaved`] (what [`ropex::gguf::GgufRope`] reports for `llama`).
//! A Hugging Face checkpoint pairs `(i, i + d/2)` instead; both give the same attention
//! outputs, since values and the output projection are not permuted.
//!
//! Prefill runs every block's attention through ropex's tiled kernel (via the same
//! [`crate::attend`] as the tiny model, one [`Plan`] segment at a time); decoding keeps
//! one ropex [`KvCache`] per block ([`LlamaCache`]).

use std::fmt;
use std::path::Path;

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis, s};
use ropex::gguf::{GgufFile, GgufRope};
use ropex::{Attention, CacheShape, KvCache, PositionMap};

use super::config::LlamaConfig;
use super::error::{LlamaError, Result};
use super::linear::linear;
use crate::model::{attend, rms_norm};
use crate::plan::Plan;

/// One transformer block's f32 weights, `[out, in]`.
struct Block {
    attn_norm: Array1<f32>,
    wq: Array2<f32>,
    wk: Array2<f32>,
    wv: Array2<f32>,
    wo: Array2<f32>,
    ffn_norm: Array1<f32>,
    gate: Array2<f32>,
    up: Array2<f32>,
    down: Array2<f32>,
}

/// A Llama-family model loaded from a GGUF file.
pub struct Llama {
    config: LlamaConfig,
    rope: GgufRope,
    tok_emb: Array2<f32>,
    blocks: Vec<Block>,
    norm: Array1<f32>,
    /// `output.weight`, or `None` when tied to `token_embd`.
    lm_head: Option<Array2<f32>>,
}

impl fmt::Debug for Llama {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("rope", &self.rope)
            .field("tied_embeddings", &self.lm_head.is_none())
            .finish_non_exhaustive()
    }
}

/// Reads one tensor as f32 `[rows, cols]`, checking its ggml dims `[cols, rows]`.
fn matrix<R: std::io::Read + std::io::Seek>(
    file: &mut GgufFile<R>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Array2<f32>> {
    let info = file
        .header()
        .tensor(name)
        .ok_or_else(|| LlamaError::MissingTensor(name.into()))?;
    let expected = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    if info.dims() != expected.as_slice() {
        return Err(LlamaError::TensorShape {
            name: name.into(),
            expected,
            found: info.dims().to_vec(),
        });
    }
    let data = file.tensor_f32(name)?;
    Array2::from_shape_vec((rows, cols), data).map_err(|e| LlamaError::Input(e.to_string()))
}

fn vector<R: std::io::Read + std::io::Seek>(
    file: &mut GgufFile<R>,
    name: &str,
    len: usize,
) -> Result<Array1<f32>> {
    Ok(matrix(file, name, 1, len)?.remove_axis(Axis(0)))
}

impl Llama {
    /// Loads a Llama-family GGUF file: hyperparameters ([`LlamaConfig::from_gguf`]),
    /// rope ([`GgufRope`]) and every tensor, dequantised to f32 and checked against the
    /// hyperparameters. Errors are typed: another architecture, missing keys or tensors,
    /// wrong dims, a rope head dim other than `hidden / n_heads`.
    pub fn load(path: &Path) -> Result<Llama> {
        let mut file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(file.header())?;
        let rope = file.rope()?;
        if rope.config.head_dim() != config.head_dim {
            return Err(LlamaError::Unsupported {
                what: format!(
                    "rope head dim {} with attention head dim {}",
                    rope.config.head_dim(),
                    config.head_dim
                ),
                allowed: "the rope head dim equal to hidden / head_count",
            });
        }
        let c = &config;
        let tok_emb = matrix(&mut file, "token_embd.weight", c.vocab, c.hidden)?;
        let mut blocks = Vec::new();
        for l in 0..c.n_layers {
            let name = |t: &str| format!("blk.{l}.{t}.weight");
            blocks.push(Block {
                attn_norm: vector(&mut file, &name("attn_norm"), c.hidden)?,
                wq: matrix(&mut file, &name("attn_q"), c.hidden, c.hidden)?,
                wk: matrix(&mut file, &name("attn_k"), c.kv_width(), c.hidden)?,
                wv: matrix(&mut file, &name("attn_v"), c.kv_width(), c.hidden)?,
                wo: matrix(&mut file, &name("attn_output"), c.hidden, c.hidden)?,
                ffn_norm: vector(&mut file, &name("ffn_norm"), c.hidden)?,
                gate: matrix(&mut file, &name("ffn_gate"), c.ffn, c.hidden)?,
                up: matrix(&mut file, &name("ffn_up"), c.ffn, c.hidden)?,
                down: matrix(&mut file, &name("ffn_down"), c.hidden, c.ffn)?,
            });
        }
        let norm = vector(&mut file, "output_norm.weight", c.hidden)?;
        let lm_head = match file.header().tensor("output.weight") {
            Some(_) => Some(matrix(&mut file, "output.weight", c.vocab, c.hidden)?),
            None => None,
        };
        Ok(Llama {
            config,
            rope,
            tok_emb,
            blocks,
            norm,
            lm_head,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The file's rotary embedding: frequencies, layout, context lengths.
    pub fn rope(&self) -> &GgufRope {
        &self.rope
    }

    /// An [`Attention`] with the file's own frequencies and layout under `map`.
    pub fn attention(&self, map: PositionMap) -> Attention {
        Attention::new(self.rope.config.frequencies(), self.rope.layout, map)
    }

    fn embed(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        let mut x = Array2::<f32>::zeros((tokens.len(), self.config.hidden));
        for (mut row, &t) in x.rows_mut().into_iter().zip(tokens) {
            let id = t as usize;
            if id >= self.config.vocab {
                return Err(LlamaError::Input(format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.config.vocab
                )));
            }
            row.assign(&self.tok_emb.row(id));
        }
        Ok(x)
    }

    fn logits(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let xn = rms_norm(x, &self.norm, self.config.norm_eps as f32);
        linear(xn.view(), self.lm_head.as_ref().unwrap_or(&self.tok_emb))
    }

    /// The SwiGLU half of a block, added to `x` in place.
    fn mlp(&self, b: &Block, x: &mut Array2<f32>) {
        let m = rms_norm(x.view(), &b.ffn_norm, self.config.norm_eps as f32);
        let mut g = linear(m.view(), &b.gate);
        let u = linear(m.view(), &b.up);
        ndarray::Zip::from(&mut g)
            .and(&u)
            .for_each(|g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
        *x += &linear(g.view(), &b.down);
    }

    /// `q` `[n, H_q, d]`, `k` / `v` `[n, H_kv, d]` of a block for the normed input `a`.
    fn qkv(&self, b: &Block, a: ArrayView2<f32>, q_from: usize) -> Result<[Array3<f32>; 3]> {
        let c = &self.config;
        let (n, dh) = (a.nrows(), c.head_dim);
        let shape = |m: Array2<f32>, rows: usize, heads: usize| {
            m.into_shape_with_order((rows, heads, dh))
                .map_err(|e| LlamaError::Input(e.to_string()))
        };
        let q = shape(
            linear(a.slice(s![q_from.., ..]), &b.wq),
            n - q_from,
            c.n_heads,
        )?;
        let k = shape(linear(a, &b.wk), n, c.n_kv_heads)?;
        let v = shape(linear(a, &b.wv), n, c.n_kv_heads)?;
        Ok([q, k, v])
    }

    fn heads_out(&self, b: &Block, heads: Array3<f32>) -> Result<Array2<f32>> {
        let rows = heads.dim().0;
        let flat = heads
            .into_shape_with_order((rows, self.config.hidden))
            .map_err(|e| LlamaError::Input(e.to_string()))?;
        Ok(linear(flat.view(), &b.wo))
    }

    /// Logits `[T - from, vocab]` for positions `from..T` of `tokens` (the next-token
    /// distribution after each), with attention as `plan` says: ropex's tiled prefill
    /// kernel per plan segment. The last block only computes the rows asked for.
    pub fn forward(&self, tokens: &[u32], plan: &Plan, from: usize) -> Result<Array2<f32>> {
        let t = tokens.len();
        if t == 0 || from >= t {
            return Err(LlamaError::Input(format!(
                "forward pass over {t} tokens asked for logits from position {from}"
            )));
        }
        let segments = plan.segments(t)?;
        let positions: Vec<usize> = (0..t).collect();
        let mut x = self.embed(tokens)?;
        let eps = self.config.norm_eps as f32;
        let n_blocks = self.blocks.len();
        for (l, b) in self.blocks.iter().enumerate() {
            let q_from = if l + 1 == n_blocks { from } else { 0 };
            let a = rms_norm(x.view(), &b.attn_norm, eps);
            let [q, k, v] = self.qkv(b, a.view(), q_from)?;
            let mut heads = Array3::<f32>::zeros(q.dim());
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
            let attn_out = self.heads_out(b, heads)?;
            if q_from > 0 {
                x = x.slice(s![q_from.., ..]).to_owned();
            }
            x += &attn_out;
            self.mlp(b, &mut x);
        }
        Ok(self.logits(x.view()))
    }

    /// An empty decode cache: one ropex [`KvCache`] per block with the file's rope
    /// config and layout under `map`.
    pub fn cache(&self, map: PositionMap) -> Result<LlamaCache> {
        let c = &self.config;
        let blocks = (0..c.n_layers)
            .map(|_| {
                KvCache::new(
                    self.rope.config.clone(),
                    self.rope.layout,
                    map,
                    CacheShape::square(c.n_kv_heads, c.head_dim),
                )
            })
            .collect::<ropex::Result<Vec<_>>>()?;
        Ok(LlamaCache { blocks })
    }

    /// Feeds `tokens` (a prompt chunk or one generated token) at positions
    /// `cache.len() ..`, appending their keys and values to `cache` (ropex's
    /// [`KvCache::prefill_chunk`] per block), and returns their logits
    /// `[tokens.len(), vocab]`.
    pub fn step(&self, cache: &mut LlamaCache, tokens: &[u32]) -> Result<Array2<f32>> {
        if tokens.is_empty() {
            return Err(LlamaError::Input(
                "a decode step needs at least one token".into(),
            ));
        }
        if cache.blocks.len() != self.blocks.len() {
            return Err(LlamaError::Input(format!(
                "cache of {} blocks for a model of {}",
                cache.blocks.len(),
                self.blocks.len()
            )));
        }
        let mut x = self.embed(tokens)?;
        let eps = self.config.norm_eps as f32;
        for (b, kv) in self.blocks.iter().zip(&mut cache.blocks) {
            let a = rms_norm(x.view(), &b.attn_norm, eps);
            let [q, k, v] = self.qkv(b, a.view(), 0)?;
            let heads = kv.prefill_chunk(q.view(), k.view(), v.view())?;
            x += &self.heads_out(b, heads)?;
            self.mlp(b, &mut x);
        }
        Ok(self.logits(x.view()))
    }

    /// Greedy decoding: feeds `prompt` in one chunk, then appends the argmax token
    /// `n_new` times (or until `stop` is produced), each step through the cache.
    /// Returns the new tokens; the cache then holds the prompt and all new tokens but
    /// the last (which has not been fed yet).
    pub fn generate_greedy(
        &self,
        cache: &mut LlamaCache,
        prompt: &[u32],
        n_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<u32>> {
        let mut logits = self.step(cache, prompt)?;
        let mut out = Vec::new();
        while out.len() < n_new {
            let last = logits.row(logits.nrows() - 1);
            let next = argmax(last.iter().copied()) as u32;
            out.push(next);
            if Some(next) == stop || out.len() == n_new {
                break;
            }
            logits = self.step(cache, &[next])?;
        }
        Ok(out)
    }
}

/// Per-block ropex KV caches of one decoding sequence ([`Llama::cache`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCache {
    blocks: Vec<KvCache>,
}

impl LlamaCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.blocks.first().map_or(0, KvCache::len)
    }

    /// Nothing cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by all blocks' caches.
    pub fn memory_bytes(&self) -> usize {
        self.blocks.iter().map(KvCache::memory_bytes).sum()
    }
}

/// Index of the largest value (the first one on ties).
fn argmax(values: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Negative log-likelihood (nats) of each `targets[i]` under row `i` of `logits`, in
/// f64 (log-sum-exp with the row maximum subtracted). `None` for an id out of range.
pub fn nll_tokens(logits: ArrayView2<f32>, targets: &[u32]) -> Option<Vec<f64>> {
    logits
        .rows()
        .into_iter()
        .zip(targets)
        .map(|(row, &y)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            row.get(y as usize).map(|&l| max + z.ln() - l as f64)
        })
        .collect()
}
