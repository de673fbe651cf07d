//! A small candle model with ropex's attention swapped in (feature `candle`).
//!
//! Two pre-norm-free attention blocks with random weights (hidden 128, 4 query heads,
//! 2 kv heads, head dim 32), each `x + W_o attn(rope(W_q x), rope(W_k x), W_v x)`, are run
//! twice on the same input: once with candle-nn's `rope` and a softmax attention
//! written with candle ops (repeat_kv, matmul, causal mask, `softmax_last_dim`), once
//! with `ropex::candle::attention` on the unrotated q, k, v. The outputs must agree to
//! f32 rounding. Then the same blocks run with ReRoPE at 4x their "training" length:
//! every relative position the model sees stays inside the window, and ropex's tiled
//! kernel agrees with its f64 reference kernel through the candle path. Last, the model
//! runs in bf16 (weights, activations, q, k, v): ropex reads the bf16 tensors in place
//! and rounds its output once (on CPUs where bf16 tile products pay, e.g. AMD Zen 4, it
//! also rounds the rotated q and k and the softmax weights to bf16 for `vdpbf16ps`: see
//! `ropex::attention::Bf16Products`), while candle's ops round every intermediate; both
//! are compared with the f32 model.
//!
//! ```text
//! cargo run --release --features candle --example candle_model
//! ```

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::Linear;
use ropex::attention::Kernel;
use ropex::{Attention, Frequencies, Layout, PositionMap, RopeConfig};

const HIDDEN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const TRAIN_LEN: usize = 128;
const WINDOW: usize = 64;

/// Deterministic uniform values in `[-scale, scale)` (a 64-bit LCG).
fn uniform(shape: (usize, usize), scale: f32, seed: u64) -> Result<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Which attention a block runs.
#[derive(Clone, Copy)]
enum Path<'a> {
    /// candle-nn's rope and softmax attention in candle ops.
    Candle,
    /// `ropex::candle::attention_with` on unrotated q, k, v.
    Ropex(&'a Attention, Kernel),
}

struct Block {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
}

impl Block {
    fn new(seed: u64) -> Result<Self> {
        let s = 1.0 / (HIDDEN as f32).sqrt();
        let lin = |out: usize, i: u64| {
            Ok::<_, candle_core::Error>(Linear::new(
                uniform((out, HIDDEN), s, seed * 10 + i)?,
                None,
            ))
        };
        Ok(Block {
            wq: lin(HEADS * HEAD_DIM, 1)?,
            wk: lin(KV_HEADS * HEAD_DIM, 2)?,
            wv: lin(KV_HEADS * HEAD_DIM, 3)?,
            wo: Linear::new(uniform((HIDDEN, HEADS * HEAD_DIM), s, seed * 10 + 4)?, None),
        })
    }

    /// The block with its weights in `dtype`.
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let cast = |l: &Linear| {
            Ok::<_, candle_core::Error>(Linear::new(l.weight().to_dtype(dtype)?, None))
        };
        Ok(Block {
            wq: cast(&self.wq)?,
            wk: cast(&self.wk)?,
            wv: cast(&self.wv)?,
            wo: cast(&self.wo)?,
        })
    }

    /// `x + W_o attn(x)` for `x: (B, T, HIDDEN)`.
    fn forward(&self, x: &Tensor, freqs: &Frequencies, path: Path) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // (B, T, H, D) -> (B, H, T, D): candle's attention layout (a strided view)
        let heads = |y: Tensor, h: usize| y.reshape((b, t, h, HEAD_DIM))?.transpose(1, 2);
        let q = heads(self.wq.forward(x)?, HEADS)?;
        let k = heads(self.wk.forward(x)?, KV_HEADS)?;
        let v = heads(self.wv.forward(x)?, KV_HEADS)?;
        let pos: Vec<usize> = (0..t).collect();
        let o = match path {
            Path::Candle => candle_attention(&q, &k, &v, freqs)?,
            // ropex reads the strided views in place and rotates each piece itself
            Path::Ropex(attn, kernel) => {
                ropex::candle::attention_with(attn, kernel, &q, &k, &v, &pos, &pos)?
            }
        };
        let o = o.transpose(1, 2)?.reshape((b, t, HEADS * HEAD_DIM))?;
        x + self.wo.forward(&o)?
    }
}

/// candle-nn's rope on q and k, then causal softmax attention with repeat_kv, every op
/// in q's dtype.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, freqs: &Frequencies) -> Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    let (cos, sin) = cos_sin(freqs, t)?;
    let (cos, sin) = (cos.to_dtype(q.dtype())?, sin.to_dtype(q.dtype())?);
    let q = candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?;
    let k = candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?;
    let repeat = |x: &Tensor| {
        x.unsqueeze(2)?
            .broadcast_as((b, KV_HEADS, HEADS / KV_HEADS, t, HEAD_DIM))?
            .reshape((b, HEADS, t, HEAD_DIM))
    };
    let (k, v) = (repeat(&k)?, repeat(v)?);
    let scores = (q.matmul(&k.t()?)? / (HEAD_DIM as f64).sqrt())?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?.to_dtype(q.dtype())?;
    let scores = scores.broadcast_add(&mask)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
}

/// candle-nn's `(T, D/2)` cos/sin inputs, angles in f64.
fn cos_sin(freqs: &Frequencies, t: usize) -> Result<(Tensor, Tensor)> {
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for p in 0..t {
        for &w in freqs.inv_freq() {
            c.push((p as f64 * w).cos() as f32);
            s.push((p as f64 * w).sin() as f32);
        }
    }
    let shape = (t, freqs.num_pairs());
    Ok((
        Tensor::from_vec(c, shape, &Device::Cpu)?,
        Tensor::from_vec(s, shape, &Device::Cpu)?,
    ))
}

fn run(blocks: &[Block], x: &Tensor, freqs: &Frequencies, path: Path) -> Result<Tensor> {
    blocks
        .iter()
        .try_fold(x.clone(), |h, blk| blk.forward(&h, freqs, path))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let freqs = RopeConfig::new(HEAD_DIM, 10_000.0)?.frequencies();
    let blocks = [Block::new(1)?, Block::new(2)?];
    let embed = |t: usize, seed: u64| uniform((t, HIDDEN), 1.0, seed)?.reshape((1, t, HIDDEN));

    // 1. The same model, candle's attention vs ropex's, at the training length.
    let x = embed(TRAIN_LEN, 7)?;
    let rope = Attention::new(freqs.clone(), Layout::Half, PositionMap::Rope);
    let by_candle = run(&blocks, &x, &freqs, Path::Candle)?;
    let by_ropex = run(&blocks, &x, &freqs, Path::Ropex(&rope, Kernel::default()))?;
    let e = max_diff(&by_candle, &by_ropex)?;
    let scale = by_candle
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?;
    println!(
        "T = {TRAIN_LEN}, 2 blocks, RoPE: max |candle - ropex| = {e:.2e} (outputs up to {scale:.2})"
    );
    assert!(e < 1e-4, "candle and ropex attention disagree: {e}");

    // 2. ReRoPE at 4x the training length: relative positions clamp at the window.
    let long = 4 * TRAIN_LEN;
    let rerope = Attention::new(freqs.clone(), Layout::Half, PositionMap::rerope(WINDOW)?);
    println!(
        "T = {long}: RoPE sees relative positions up to {}, ReRoPE({WINDOW}) up to {} (training length {TRAIN_LEN})",
        PositionMap::Rope.max_position(long),
        rerope.map().max_position(long),
    );
    let x = embed(long, 8)?;
    let tiled = run(&blocks, &x, &freqs, Path::Ropex(&rerope, Kernel::default()))?;
    let reference = run(&blocks, &x, &freqs, Path::Ropex(&rerope, Kernel::Reference))?;
    let e = max_diff(&tiled, &reference)?;
    println!("T = {long}, ReRoPE({WINDOW}): max |tiled - f64 reference| = {e:.2e}");
    assert!(e < 1e-4, "tiled and reference ReRoPE disagree: {e}");
    // the first WINDOW tokens see only positions inside the window: ReRoPE = RoPE there
    let plain = run(&blocks, &x, &freqs, Path::Ropex(&rope, Kernel::default()))?;
    let head = |y: &Tensor| y.narrow(1, 0, WINDOW);
    let e_head = max_diff(&head(&tiled)?, &head(&plain)?)?;
    let e_tail = max_diff(
        &tiled.narrow(1, WINDOW, long - WINDOW)?,
        &plain.narrow(1, WINDOW, long - WINDOW)?,
    )?;
    println!("ReRoPE vs RoPE: first {WINDOW} tokens {e_head:.2e}, the rest {e_tail:.2e}");
    assert!(e_head < 1e-5 && e_tail > 1e-3);

    // 3. The model in bf16, with candle's attention and with ropex's (bf16 read natively).
    let half: Vec<Block> = blocks
        .iter()
        .map(|b| b.to_dtype(DType::BF16))
        .collect::<Result<_>>()?;
    let x = embed(TRAIN_LEN, 7)?.to_dtype(DType::BF16)?;
    let candle_bf16 = run(&half, &x, &freqs, Path::Candle)?;
    let ropex_bf16 = run(&half, &x, &freqs, Path::Ropex(&rope, Kernel::default()))?;
    assert_eq!(ropex_bf16.dtype(), DType::BF16);
    let (e_ropex, e_candle) = (
        max_diff(&ropex_bf16, &by_candle)?,
        max_diff(&candle_bf16, &by_candle)?,
    );
    println!(
        "T = {TRAIN_LEN}, bf16 model: max |ropex bf16 - candle f32| = {e_ropex:.2e}, max |candle bf16 - candle f32| = {e_candle:.2e}, max |ropex bf16 - candle bf16| = {:.2e}",
        max_diff(&ropex_bf16, &candle_bf16)?
    );
    // both are bf16 models (weights and activations rounded to 8 bits): within a few
    // bf16 roundings of the f32 outputs
    assert!(e_ropex < 0.05 * scale && e_candle < 0.05 * scale);

    Ok(())
}
