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
//! [`Plan::attend`] as the tiny model, one [`Plan`] segment at a time); decoding keeps
//! one ropex [`KvCache`] per block ([`LlamaCache`]): [`Llama::prefill`] fills it from a
//! tiled prefill, [`Llama::step`] appends. Buffers sized by the sequence are allocated
//! fallibly ([`LlamaError::Alloc`]), and [`Llama::nll`] scores long windows without
//! materialising every row of logits at once.

use std::fmt;
use std::path::Path;

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis, s};
use ropex::attention::Kernel;
use ropex::gguf::{GgufFile, GgufRope};
use ropex::{Attention, CacheShape, Element, KvCache, PositionMap};

use super::config::LlamaConfig;
use super::error::{LlamaError, Result};
use super::linear::linear;
use crate::error::zeros2;
use crate::model::rms_norm;
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
        let mut x = zeros2("token embeddings", (tokens.len(), self.config.hidden))?;
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

    fn logits(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let xn = rms_norm(x, &self.norm, self.config.norm_eps as f32)?;
        Ok(linear(
            xn.view(),
            self.lm_head.as_ref().unwrap_or(&self.tok_emb),
        )?)
    }

    /// The SwiGLU half of a block, added to `x` in place.
    fn mlp(&self, b: &Block, x: &mut Array2<f32>) -> Result<()> {
        let m = rms_norm(x.view(), &b.ffn_norm, self.config.norm_eps as f32)?;
        let mut g = linear(m.view(), &b.gate)?;
        let u = linear(m.view(), &b.up)?;
        ndarray::Zip::from(&mut g)
            .and(&u)
            .for_each(|g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
        *x += &linear(g.view(), &b.down)?;
        Ok(())
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
            linear(a.slice(s![q_from.., ..]), &b.wq)?,
            n - q_from,
            c.n_heads,
        )?;
        let k = shape(linear(a, &b.wk)?, n, c.n_kv_heads)?;
        let v = shape(linear(a, &b.wv)?, n, c.n_kv_heads)?;
        Ok([q, k, v])
    }

    fn heads_out(&self, b: &Block, heads: Array3<f32>) -> Result<Array2<f32>> {
        let rows = heads.dim().0;
        let flat = heads
            .into_shape_with_order((rows, self.config.hidden))
            .map_err(|e| LlamaError::Input(e.to_string()))?;
        Ok(linear(flat.view(), &b.wo)?)
    }

    /// Logits `[T - from, vocab]` for positions `from..T` of `tokens` (the next-token
    /// distribution after each), with attention as `plan` says: ropex's tiled prefill
    /// kernel per plan segment. The last block only computes the rows asked for.
    pub fn forward(&self, tokens: &[u32], plan: &Plan, from: usize) -> Result<Array2<f32>> {
        self.forward_with(tokens, plan, from, Kernel::default())
    }

    /// [`Llama::forward`] with every attention call computed by `kernel`.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        plan: &Plan,
        from: usize,
        kernel: Kernel,
    ) -> Result<Array2<f32>> {
        let x = self.hidden(tokens, plan, from, kernel, None::<&mut LlamaCache>)?;
        self.logits(x.view())
    }

    /// Negative log-likelihoods (nats, f64) of `targets` (`targets[i]` follows
    /// `tokens[from + i]`, `targets.len() == tokens.len() - from`) under `plan`: the same
    /// forward pass as [`Llama::forward`], with the output head applied to 512 rows at a
    /// time so that scoring every position of a 32k window needs 100 MB of logits, not
    /// 6 GB.
    pub fn nll(
        &self,
        tokens: &[u32],
        targets: &[u32],
        plan: &Plan,
        from: usize,
    ) -> Result<Vec<f64>> {
        if targets.len() != tokens.len().saturating_sub(from) {
            return Err(LlamaError::Input(format!(
                "{} targets for the {} positions {from}..{}",
                targets.len(),
                tokens.len().saturating_sub(from),
                tokens.len()
            )));
        }
        let x = self.hidden(
            tokens,
            plan,
            from,
            Kernel::default(),
            None::<&mut LlamaCache>,
        )?;
        let mut out = Vec::with_capacity(targets.len());
        for (rows, tgt) in x.axis_chunks_iter(Axis(0), 512).zip(targets.chunks(512)) {
            let logits = self.logits(rows)?;
            let nll = nll_tokens(logits.view(), tgt).ok_or_else(|| {
                LlamaError::Input(format!(
                    "a target id is outside the vocabulary of {}",
                    self.config.vocab
                ))
            })?;
            out.extend(nll);
        }
        Ok(out)
    }

    /// Feeds a whole prompt into an empty `cache` through ropex's tiled prefill kernel
    /// (attention as `plan` says, which must describe the same frequencies, map and
    /// log-n as the cache), appending every block's unrotated keys and values to the
    /// cache, and returns the logits of the last prompt token `[1, vocab]`. Decoding then
    /// continues with [`Llama::step`], which attends through the cache.
    pub fn prefill<S: Element>(
        &self,
        cache: &mut LlamaCache<S>,
        tokens: &[u32],
        plan: &Plan,
    ) -> Result<Array2<f32>> {
        if !cache.is_empty() || cache.blocks.len() != self.blocks.len() {
            return Err(LlamaError::Input(format!(
                "prefill needs an empty cache of {} blocks; got {} blocks holding {} tokens",
                self.blocks.len(),
                cache.blocks.len(),
                cache.len()
            )));
        }
        let from = tokens.len().saturating_sub(1);
        let x = self.hidden(tokens, plan, from, Kernel::default(), Some(cache))?;
        self.logits(x.view())
    }

    /// The final hidden states `[T - from, hidden]` (before the output norm); with a
    /// cache, every block's keys and values are appended to it.
    fn hidden<S: Element>(
        &self,
        tokens: &[u32],
        plan: &Plan,
        from: usize,
        kernel: Kernel,
        mut cache: Option<&mut LlamaCache<S>>,
    ) -> Result<Array2<f32>> {
        let t = tokens.len();
        if t == 0 || from >= t {
            return Err(LlamaError::Input(format!(
                "forward pass over {t} tokens asked for logits from position {from}"
            )));
        }
        plan.segments(t)?;
        let mut x = self.embed(tokens)?;
        let eps = self.config.norm_eps as f32;
        let n_blocks = self.blocks.len();
        for (l, b) in self.blocks.iter().enumerate() {
            let q_from = if l + 1 == n_blocks { from } else { 0 };
            let a = rms_norm(x.view(), &b.attn_norm, eps)?;
            let [q, k, v] = self.qkv(b, a.view(), q_from)?;
            if let Some(c) = cache.as_deref_mut() {
                c.blocks[l].append(k.view(), v.view())?;
            }
            let heads = plan.attend(kernel, q.view(), k.view(), v.view(), q_from)?;
            let attn_out = self.heads_out(b, heads)?;
            if q_from > 0 {
                x = x.slice(s![q_from.., ..]).to_owned();
            }
            x += &attn_out;
            self.mlp(b, &mut x)?;
        }
        Ok(x)
    }

    /// An empty decode cache: one ropex [`KvCache`] per block with the file's rope
    /// config and layout under `map`.
    pub fn cache(&self, map: PositionMap) -> Result<LlamaCache> {
        self.cache_with(self.rope.config.clone(), map, Ok)
    }

    /// An empty decode cache with frequencies from `config` (e.g. the file's rope with a
    /// [`ropex::Scaling`]) under `map`, storing keys and values as `S` (f32, or bf16 /
    /// f16 for half the memory and decode traffic), each block's [`KvCache`] passed
    /// through `finish` (e.g. `|c| c.with_log_n(8192)`).
    pub fn cache_with<S: Element>(
        &self,
        config: ropex::RopeConfig,
        map: PositionMap,
        finish: impl Fn(KvCache<S>) -> ropex::Result<KvCache<S>>,
    ) -> Result<LlamaCache<S>> {
        let c = &self.config;
        let blocks = (0..c.n_layers)
            .map(|_| {
                finish(KvCache::new_typed(
                    config.clone(),
                    self.rope.layout,
                    map,
                    CacheShape::square(c.n_kv_heads, c.head_dim),
                )?)
            })
            .collect::<ropex::Result<Vec<_>>>()?;
        Ok(LlamaCache { blocks })
    }

    /// Feeds `tokens` (a prompt chunk or one generated token) at positions
    /// `cache.len() ..`, appending their keys and values to `cache` (ropex's
    /// [`KvCache::prefill_chunk`] per block), and returns their logits
    /// `[tokens.len(), vocab]`.
    pub fn step<S: Element>(
        &self,
        cache: &mut LlamaCache<S>,
        tokens: &[u32],
    ) -> Result<Array2<f32>> {
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
            let a = rms_norm(x.view(), &b.attn_norm, eps)?;
            let [q, k, v] = self.qkv(b, a.view(), 0)?;
            let heads = kv.prefill_chunk(q.view(), k.view(), v.view())?;
            x += &self.heads_out(b, heads)?;
            self.mlp(b, &mut x)?;
        }
        self.logits(x.view())
    }

    /// Greedy decoding: feeds `prompt` in one chunk, then appends the argmax token
    /// `n_new` times (or until `stop` is produced), each step through the cache.
    /// Returns the new tokens; the cache then holds the prompt and all new tokens but
    /// the last (which has not been fed yet).
    pub fn generate_greedy<S: Element>(
        &self,
        cache: &mut LlamaCache<S>,
        prompt: &[u32],
        n_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<u32>> {
        let logits = self.step(cache, prompt)?;
        self.decode_greedy(cache, logits, n_new, stop)
    }

    /// Greedy decoding after a prompt already in `cache` whose last row of `logits` is
    /// the next-token distribution (from [`Llama::prefill`] or [`Llama::step`]): appends
    /// the argmax `n_new` times (or until `stop`) through the cache; returns the new
    /// tokens.
    pub fn decode_greedy<S: Element>(
        &self,
        cache: &mut LlamaCache<S>,
        mut logits: Array2<f32>,
        n_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<u32>> {
        if logits.nrows() == 0 {
            return Err(LlamaError::Input(
                "greedy decoding needs logits of at least one row".into(),
            ));
        }
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

/// Per-block ropex KV caches of one decoding sequence ([`Llama::cache`],
/// [`Llama::cache_with`]), keys and values stored as `S`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCache<S: Element = f32> {
    blocks: Vec<KvCache<S>>,
}

impl<S: Element> LlamaCache<S> {
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
