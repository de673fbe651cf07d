//! Rotation and attention for [candle](https://github.com/huggingface/candle) tensors
//! (feature `candle`, CPU only), for models that keep q, k and v as candle's
//! `(B, H, T, D)`: batch, heads, tokens, head dim.
//!
//! ## Rotation: [`rope`], [`rope_with_table`]
//! Every head vector `x[b, h, t, :]` at position `p` is rotated pair by pair, with the
//! angles computed in f64 from the [`Frequencies`] `w_j` (see [`crate::rotary`]):
//!
//! ```text
//! x'_a = m (x_a cos(p w_j) - x_b sin(p w_j))
//! x'_b = m (x_b cos(p w_j) + x_a sin(p w_j))
//! ```
//!
//! with `m` the scheme's attention factor and `(a, b) = (j, j + d/2)` for
//! [`Layout::Half`] (candle-nn's `rotary_emb::rope`, Hugging Face's `rotate_half`) or
//! `(2j, 2j + 1)` for [`Layout::Interleaved`] (candle-nn's `rope_i`). Dims past the
//! rotary dim pass through. candle-nn takes precomputed `cos`/`sin` tensors; here they
//! come from the frequencies, so YaRN, llama3 or LongRoPE frequencies rotate the same way.
//!
//! ## Attention: [`attention`], [`attention_with`]
//! Any [`Attention`] (every position map, mask, scale, log-n) on *unrotated*
//! `q: (B, H_q, T_q, D)`, `k: (B, H_kv, T_k, D)`, `v: (B, H_kv, T_k, D_v)`, giving
//! `(B, H_q, T_q, D_v)`:
//! `o_i = sum_j softmax_j(scale * (R(P(i, j)) q_i) . k_j) v_j`, with `P` the position map
//! (plain RoPE: `P(i, j) = i - j`) and `scale = m^2 / sqrt(D)` unless set. Query head `h`
//! reads kv head `h / (H_q / H_kv)` (grouped-query attention without `repeat_kv`). Each
//! batch item is one call of the kernel ([`Attention::run`], by default
//! [`Kernel::Tiled`]).
//!
//! ## Positions
//! `positions` (`q_pos`, `k_pos`) hold one position per token, shared by every batch
//! item (`T` entries), or one per item and token, row-major `(B, T)` (`B * T` entries),
//! for a batch whose sequences start at different offsets.
//!
//! ## Memory and element types
//! f32 inputs are read in place from candle's CPU storage, with whatever strides the
//! tensor has (a `transpose(1, 2)` of `(B, T, H, D)` needs no `contiguous()`), through a
//! candle `CustomOp3`: candle holds the storage locks, so q, k and v may share one
//! storage (narrowed from a fused qkv projection). bf16 and f16 inputs are widened to
//! f32 on the way in (exact) and the output is rounded once on the way out, so a
//! bf16/f16 result is within one rounding, `|o| * 2^-8` (bf16) or `|o| * 2^-11` (f16)
//! ([`crate::Element::UNIT_ROUNDOFF`]), of the f32 result on the same rounded inputs.
//!
//! ## Errors
//! Every failure is a [`CandleError`]: wrong dtype or device, a tensor that is not rank
//! 4, batch or position counts that disagree (as [`RopeError`]s), and candle's own errors.
//! It converts into `candle_core::Error`, so `?` works inside candle code.
//!
//! ```
//! use ropex::candle::candle_core::{DType, Device, Tensor};
//! use ropex::{Attention, Layout, PositionMap, RopeConfig};
//!
//! let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
//! let q = Tensor::ones((1, 2, 3, 8), DType::F32, &Device::Cpu)?; // (B, H, T, D)
//! let rotated = ropex::candle::rope(&q, &freqs, Layout::Half, &[0, 1, 2])?;
//! let first: Vec<f32> = rotated.get(0)?.get(0)?.get(0)?.to_vec1()?;
//! assert_eq!(first, vec![1.0; 8]); // position 0 is the identity
//!
//! // ReRoPE with window 2 on unrotated q, k, v; GQA: 2 query heads, 1 kv head.
//! let kv = Tensor::ones((1, 1, 3, 8), DType::BF16, &Device::Cpu)?;
//! let attn = Attention::new(freqs, Layout::Half, PositionMap::rerope(2)?);
//! let pos = [0, 1, 2];
//! let out = ropex::candle::attention(&attn, &q.to_dtype(DType::BF16)?, &kv, &kv, &pos, &pos)?;
//! assert_eq!(out.dims(), &[1, 2, 3, 8]);
//! assert_eq!(out.dtype(), DType::BF16);
//! # Ok::<(), ropex::candle::CandleError>(())
//! ```

use std::cell::Cell;

pub use candle_core;
use candle_core::{CpuStorage, CustomOp3, DType, DeviceLocation, Shape, Tensor};
use ndarray::ArrayView3;
use thiserror::Error;

use crate::attention::{Attention, Kernel};
use crate::error::{RopeError, try_vec};
use crate::frequencies::Frequencies;
use crate::rotary::{Layout, RotaryTable};
use crate::tensor::{View3, View3Mut};

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, CandleError>;

/// An error from ropex's candle functions.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CandleError {
    /// A shape, position or parameter problem ropex reports (see [`RopeError`]).
    #[error(transparent)]
    Rope(#[from] RopeError),

    /// An error candle returned.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),

    /// A tensor's element type is not one ropex computes with.
    #[error("tensor {what} has dtype {got:?}; allowed: {allowed}")]
    DType {
        /// Which tensor (`x`, `q`, `k`, `v`).
        what: &'static str,
        /// Its dtype.
        got: DType,
        /// What would have been accepted.
        allowed: String,
    },

    /// A tensor is not on the CPU.
    #[error(
        "tensor {what} is on {got:?}; ropex's candle functions run on the CPU only (move it with `to_device(&Device::Cpu)`)"
    )]
    Device {
        /// Which tensor.
        what: &'static str,
        /// Where it is.
        got: DeviceLocation,
    },
}

impl From<CandleError> for candle_core::Error {
    fn from(e: CandleError) -> Self {
        match e {
            CandleError::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Rotates `x: (B, H, T, D)` by `positions` (`T` shared, or `B * T` per item; see the
/// [module docs](self)) with `freqs` paired as `layout`. f32, bf16 or f16; the result
/// has `x`'s dtype and shape. Builds the cos/sin of these positions on every call: a
/// model that rotates many tensors at the same positions builds one [`RotaryTable`] and
/// calls [`rope_with_table`].
pub fn rope(
    x: &Tensor,
    freqs: &Frequencies,
    layout: Layout,
    positions: &[usize],
) -> Result<Tensor> {
    let [b, _, t, _] = dims4(x, "x (B, H, T, D)")?;
    check_positions("positions", positions.len(), b, t)?;
    let angles_at: Vec<f64> = positions.iter().map(|&p| p as f64).collect();
    let table = RotaryTable::<f32>::from_positions(freqs, &angles_at, layout)?;
    let rows: Vec<usize> = (0..positions.len()).collect();
    rope_with_table(x, &table, &rows)
}

/// Rotates `x: (B, H, T, D)` by the rows `rows` of `table` (`T` rows shared, or `B * T`
/// per item), as [`RotaryTable::rotate`] does for `[tokens, heads, dim]` arrays. A row
/// past the table is [`RopeError::PositionOutOfTable`].
pub fn rope_with_table(x: &Tensor, table: &RotaryTable<f32>, rows: &[usize]) -> Result<Tensor> {
    let dtype = check_input(x, "x", None)?;
    let [b, h, t, d] = dims4(x, "x (B, H, T, D)")?;
    check_positions("rows", rows.len(), b, t)?;
    let mut data = widen(x)?.flatten_all()?.to_vec1::<f32>()?;
    let item = h * t * d; // the elements exist, so the product fits
    if item > 0 {
        for (bi, lanes) in data.chunks_exact_mut(item).enumerate() {
            let view = View3Mut::heads_tokens_dim(lanes, h, t, d)?.into_ndarray();
            table.rotate(view, item_positions(rows, bi, t))?;
        }
    }
    narrow(Tensor::from_vec(data, (b, h, t, d), x.device())?, dtype)
}

/// [`attention_with`] the default kernel ([`Kernel::Tiled`] with 64 x 64 tiles).
pub fn attention(
    attn: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &[usize],
    k_pos: &[usize],
) -> Result<Tensor> {
    attention_with(attn, Kernel::default(), q, k, v, q_pos, k_pos)
}

/// Runs `attn` with `kernel` on unrotated `q: (B, H_q, T_q, D)`, `k: (B, H_kv, T_k, D)`
/// and `v: (B, H_kv, T_k, D_v)` at positions `q_pos` and `k_pos` (see the
/// [module docs](self)); returns `(B, H_q, T_q, D_v)` in the inputs' dtype (f32, bf16 or
/// f16, the same for all three). Under causal attention key `j` is visible to query `i`
/// iff `k_pos[j] <= q_pos[i]`, so a prefill passes `0..T` twice and a decode step the new
/// token's position and `0..=T`.
pub fn attention_with(
    attn: &Attention,
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &[usize],
    k_pos: &[usize],
) -> Result<Tensor> {
    let dtype = check_input(q, "q", None)?;
    check_input(k, "k", Some(dtype))?;
    check_input(v, "v", Some(dtype))?;
    let [b, _, tq, _] = dims4(q, "q (B, H_q, T_q, D)")?;
    let [bk, _, tk, _] = dims4(k, "k (B, H_kv, T_k, D)")?;
    let [bv, ..] = dims4(v, "v (B, H_kv, T_k, D_v)")?;
    if (bk, bv) != (b, b) {
        return Err(RopeError::shape(
            "batch size B of k and v",
            format!("{b} (that of q)"),
            format!("k {bk}, v {bv}"),
        )
        .into());
    }
    check_positions("q_pos", q_pos.len(), b, tq)?;
    check_positions("k_pos", k_pos.len(), b, tk)?;
    let op = AttentionOp {
        attn,
        kernel,
        q_pos,
        k_pos,
        error: Cell::new(None),
    };
    let out = widen(q)?
        .apply_op3_no_bwd(&widen(k)?, &widen(v)?, &op)
        .map_err(|e| {
            op.error
                .take()
                .map_or(CandleError::Candle(e), CandleError::Rope)
        })?;
    narrow(out, dtype)
}

// The element-type path, in one place. Today's kernels read f32, so bf16/f16 tensors are
// widened here (exact) and results rounded back once in `narrow`; with kernels generic
// over `crate::Element`, these two become the identity and the op reads the native dtype.

/// `x` as f32 (the same tensor when it already is).
fn widen(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)
}

/// An f32 result rounded to `dtype` (to nearest even).
fn narrow(x: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(x.to_dtype(dtype)?)
}

/// Checks that `x` is on the CPU with a float dtype ropex takes, equal to `same` when
/// given; returns the dtype.
fn check_input(x: &Tensor, what: &'static str, same: Option<DType>) -> Result<DType> {
    let location = x.device().location();
    if !matches!(location, DeviceLocation::Cpu) {
        return Err(CandleError::Device {
            what,
            got: location,
        });
    }
    let dtype = x.dtype();
    match same {
        Some(want) if dtype != want => Err(CandleError::DType {
            what,
            got: dtype,
            allowed: format!("{want:?}, the dtype of q (q, k and v share one dtype)"),
        }),
        _ if matches!(dtype, DType::F32 | DType::BF16 | DType::F16) => Ok(dtype),
        _ => Err(CandleError::DType {
            what,
            got: dtype,
            allowed: "F32, BF16 or F16".into(),
        }),
    }
}

/// The dims of a rank-4 tensor, or a shape error naming `what`.
fn dims4(x: &Tensor, what: &'static str) -> std::result::Result<[usize; 4], RopeError> {
    <[usize; 4]>::try_from(x.dims())
        .map_err(|_| RopeError::shape(what, "a rank-4 tensor", format!("{:?}", x.dims())))
}

/// Checks that a position list holds `tokens` entries (shared by the batch) or
/// `batch * tokens` (one run per item).
fn check_positions(
    what: &'static str,
    len: usize,
    batch: usize,
    tokens: usize,
) -> std::result::Result<(), RopeError> {
    if len == tokens || Some(len) == batch.checked_mul(tokens) {
        Ok(())
    } else {
        Err(RopeError::shape(
            what,
            format!(
                "{tokens} (one per token) or B * T = {batch} * {tokens} (one per item and token)"
            ),
            len,
        ))
    }
}

/// The positions of batch item `b` from a list [`check_positions`] accepted.
fn item_positions(pos: &[usize], b: usize, tokens: usize) -> &[usize] {
    if pos.len() == tokens {
        pos
    } else {
        pos.get(b * tokens..(b + 1) * tokens).unwrap_or(&[])
    }
}

/// The attention of one [`attention_with`] call as a candle `CustomOp3`: candle passes
/// the three CPU storages with their layouts, read in place. A ropex error is kept in
/// `error` so the caller gets it typed.
struct AttentionOp<'a> {
    attn: &'a Attention,
    kernel: Kernel,
    q_pos: &'a [usize],
    k_pos: &'a [usize],
    error: Cell<Option<RopeError>>,
}

impl CustomOp3 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "ropex-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &candle_core::Layout,
        s2: &CpuStorage,
        l2: &candle_core::Layout,
        s3: &CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run([(s1, l1), (s2, l2), (s3, l3)]).map_err(|e| {
            let wrapped = candle_core::Error::wrap(e.clone());
            self.error.set(Some(e));
            wrapped
        })
    }
}

impl AttentionOp<'_> {
    fn run(
        &self,
        [(qs, ql), (ks, kl), (vs, vl)]: [(&CpuStorage, &candle_core::Layout); 3],
    ) -> std::result::Result<(CpuStorage, Shape), RopeError> {
        let (q, k, v) = (f32_data(qs, "q")?, f32_data(ks, "k")?, f32_data(vs, "v")?);
        let [b, hq, tq, _] = layout_dims(ql, "q")?;
        let [_, _, tk, dv] = layout_dims(vl, "v")?;
        let fail = || {
            RopeError::shape(
                "output (B, H_q, T_q, D_v)",
                "a size that fits in usize",
                format!("[{b}, {hq}, {tq}, {dv}]"),
            )
        };
        let rows = b.checked_mul(hq).ok_or_else(fail)?;
        let item = hq
            .checked_mul(tq)
            .and_then(|x| x.checked_mul(dv))
            .ok_or_else(fail)?;
        let mut out = try_vec::<f32>(
            "candle attention output (B * H_q x T_q * D_v)",
            rows,
            tq * dv,
        )?;
        out.resize(b * item, 0.0);
        if item > 0 {
            for (bi, o_item) in out.chunks_exact_mut(item).enumerate() {
                let (o, _) = self.attn.run(
                    self.kernel,
                    item_view(q, ql, bi, "q")?,
                    item_view(k, kl, bi, "k")?,
                    item_view(v, vl, bi, "v")?,
                    item_positions(self.q_pos, bi, tq),
                    item_positions(self.k_pos, bi, tk),
                )?;
                View3Mut::heads_tokens_dim(o_item, hq, tq, dv)?
                    .into_ndarray()
                    .assign(&o);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, hq, tq, dv))))
    }
}

/// The f32 elements of a CPU storage (the op only sees widened tensors).
fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> std::result::Result<&'a [f32], RopeError> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => Err(RopeError::invalid(
            format!("{what} storage"),
            "not F32",
            "F32 (the inputs are widened before the op)",
        )),
    }
}

fn layout_dims(l: &candle_core::Layout, what: &str) -> std::result::Result<[usize; 4], RopeError> {
    <[usize; 4]>::try_from(l.dims()).map_err(|_| {
        RopeError::shape(
            format!("{what} layout"),
            "rank 4",
            format!("{:?}", l.dims()),
        )
    })
}

/// Batch item `b` of a `(B, H, T, D)` storage with candle layout `l`, as the kernels'
/// `[T, H, D]` view, in place (strides from the layout; checked against the storage).
fn item_view<'a>(
    data: &'a [f32],
    l: &candle_core::Layout,
    b: usize,
    what: &str,
) -> std::result::Result<ArrayView3<'a, f32>, RopeError> {
    let [_, h, t, d] = layout_dims(l, what)?;
    let [sb, sh, st, sd] = <[usize; 4]>::try_from(l.stride()).map_err(|_| {
        RopeError::shape(
            format!("{what} strides"),
            "rank 4",
            format!("{:?}", l.stride()),
        )
    })?;
    let start = b
        .checked_mul(sb)
        .and_then(|x| x.checked_add(l.start_offset()))
        .unwrap_or(usize::MAX);
    let rest = data.get(start..).unwrap_or(&[]);
    Ok(View3::new(rest, [t, h, d], [st, sh, sd])?.as_ndarray())
}
