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
//! q, k, v and `x` are read in place from candle's CPU storage in their own dtype (f32,
//! bf16 or f16), with whatever strides the tensor has (a `transpose(1, 2)` of
//! `(B, T, H, D)` or a `narrow` needs no `contiguous()`), through candle `CustomOp`s:
//! candle holds the storage locks, so q, k and v may share one storage (narrowed from a
//! fused qkv projection). The kernels widen each tile to f32 as they load it (exact),
//! compute in f32 (angles in f64) and round once when they store into the output, which
//! is allocated once (fallibly) in the inputs' dtype, contiguous `(B, H, T, D)`: no f32
//! copy of a bf16/f16 tensor is made (the kernels' own f32 scratch, such as the rotated
//! keys of each position-map piece, is the same for every dtype; tests/candle_alloc.rs
//! checks a bf16 call allocates less than the f32 one). A bf16/f16 result is within one
//! rounding, `|o| * 2^-8` (bf16) or `|o| * 2^-11` (f16)
//! ([`crate::Element::UNIT_ROUNDOFF`]), of the f32 result on the same (widened) inputs.
//! The rotation works the same way, one head vector at a time through an f32 buffer of
//! `D` elements.
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
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, DeviceLocation, Shape, Tensor};
use thiserror::Error;

use crate::attention::{Attention, Kernel};
use crate::error::{RopeError, try_vec};
use crate::frequencies::Frequencies;
use crate::rotary::{Layout, RotaryTable};
use crate::tensor::{Element, View3, View3Mut};

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
/// past the table is [`RopeError::PositionOutOfTable`]. `x` is read in place with its
/// strides (a candle `CustomOp1`); each head vector is widened to f32, rotated with the
/// table's f32 cos/sin and rounded once into the output, which has `x`'s dtype and a
/// contiguous `(B, H, T, D)` layout.
pub fn rope_with_table(x: &Tensor, table: &RotaryTable<f32>, rows: &[usize]) -> Result<Tensor> {
    check_input(x, "x", None)?;
    let [b, _, t, d] = dims4(x, "x (B, H, T, D)")?;
    check_positions("rows", rows.len(), b, t)?;
    if let Some(&max) = rows.iter().max() {
        table.cos_row(max)?; // PositionOutOfTable past the table
    }
    if d < table.rotary_dim() {
        return Err(RopeError::shape(
            "head_dim of the rotated tensor",
            format!(">= rotary_dim ({})", table.rotary_dim()),
            d,
        )
        .into());
    }
    let op = RopeOp {
        table,
        rows,
        error: Cell::new(None),
    };
    x.apply_op1_no_bwd(&op)
        .map_err(|e| op.error.take().unwrap_or(CandleError::Candle(e)))
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
    q.apply_op3_no_bwd(k, v, &op)
        .map_err(|e| op.error.take().unwrap_or(CandleError::Candle(e)))
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

/// Runs `f` on the typed storage of one op, turning its error into candle's while
/// keeping the typed one in `slot` for the caller.
fn keep_error<R>(
    slot: &Cell<Option<CandleError>>,
    f: impl FnOnce() -> Result<R>,
) -> candle_core::Result<R> {
    f().map_err(|e| {
        let wrapped = candle_core::Error::Msg(e.to_string());
        slot.set(Some(e));
        wrapped
    })
}

/// The dtype error of a storage the ops cannot read.
fn storage_dtype(what: &'static str, s: &CpuStorage) -> CandleError {
    CandleError::DType {
        what,
        got: s.dtype(),
        allowed: "F32, BF16 or F16".into(),
    }
}

/// Matches CPU storages of one shared dtype the ops read (F32, BF16 or F16): `$body`
/// runs with each `$x` bound to the typed slice of its storage `$s` and gives a
/// `Result<(Vec<T>, Shape)>`, whose `Vec` goes back into a storage of that dtype; any
/// other combination of dtypes gives `$other`.
macro_rules! per_dtype {
    (($($s:expr => $x:ident),+) => $body:expr, _ => $other:expr $(,)?) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($x),)+) => $body.map(|(o, shape)| (CpuStorage::F32(o), shape)),
            ($(CpuStorage::BF16($x),)+) => $body.map(|(o, shape)| (CpuStorage::BF16(o), shape)),
            ($(CpuStorage::F16($x),)+) => $body.map(|(o, shape)| (CpuStorage::F16(o), shape)),
            _ => $other,
        }
    };
}

/// The rotation of one [`rope_with_table`] call as a candle `CustomOp1` (rows and head
/// dim already checked against the table).
struct RopeOp<'a> {
    table: &'a RotaryTable<f32>,
    rows: &'a [usize],
    error: Cell<Option<CandleError>>,
}

impl CustomOp1 for RopeOp<'_> {
    fn name(&self) -> &'static str {
        "ropex-rope"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        keep_error(&self.error, || {
            per_dtype!(
                (s => x) => self.rotate(x, l).map(|o| (o, Shape::from(l.dims()))),
                _ => Err(storage_dtype("x", s)),
            )
        })
    }
}

impl RopeOp<'_> {
    /// The rotated `(B, H, T, D)` tensor, row-major, in the input's element type.
    fn rotate<T: Element>(&self, x: &[T], l: &candle_core::Layout) -> Result<Vec<T>> {
        let [b, h, t, d] = layout_dims(l, "x")?;
        let [_, sh, st, sd] = layout_strides(l, "x")?;
        let lanes = b
            .checked_mul(h)
            .and_then(|x| x.checked_mul(t))
            .ok_or_else(|| RopeError::shape("x (B, H, T, D)", "a size that fits", b))?;
        let mut out = try_vec::<T>("candle rope output (B * H * T x D)", lanes, d)?;
        out.resize(lanes * d, T::default());
        if out.is_empty() {
            return Ok(out);
        }
        let mut buf = try_vec::<f32>("rope lane (1 x D)", 1, d)?;
        buf.resize(d, 0.0);
        let mut lanes_out = out.chunks_exact_mut(d);
        for bi in 0..b {
            // checks every index of this item against the storage, once
            let item = item_view(x, l, bi, "x")?;
            let base = item_base(l, bi);
            let rows = item_positions(self.rows, bi, t);
            for hi in 0..h {
                for (ti, &row) in rows.iter().enumerate() {
                    if sd == 1 {
                        // inside the checked view: `get` never fails
                        let start = base + hi * sh + ti * st;
                        let src = x.get(start..start + d).unwrap_or(&[]);
                        T::load_slice(src, &mut buf);
                    } else {
                        for (i, w) in buf.iter_mut().enumerate() {
                            *w = item.get(ti, hi, i).unwrap_or_default().to_f32();
                        }
                    }
                    self.table.rotate_lane(&mut buf, row);
                    if let Some(lane) = lanes_out.next() {
                        T::store_slice(&buf, lane);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The attention of one [`attention_with`] call as a candle `CustomOp3`: candle passes
/// the three CPU storages with their layouts, read in place in their own dtype. A ropex
/// error is kept in `error` so the caller gets it typed.
struct AttentionOp<'a> {
    attn: &'a Attention,
    kernel: Kernel,
    q_pos: &'a [usize],
    k_pos: &'a [usize],
    error: Cell<Option<CandleError>>,
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
        keep_error(&self.error, || {
            per_dtype!(
                (s1 => q, s2 => k, s3 => v) => self.run([q, k, v], [l1, l2, l3]),
                _ => {
                    // the public functions check this first; kept for direct op use
                    let want = s1.dtype();
                    let (what, got) = if s2.dtype() != want {
                        ("k", s2.dtype())
                    } else {
                        ("v", s3.dtype())
                    };
                    if !matches!(want, DType::F32 | DType::BF16 | DType::F16) {
                        return Err(storage_dtype("q", s1));
                    }
                    Err(CandleError::DType {
                        what,
                        got,
                        allowed: format!("{want:?}, the dtype of q (q, k and v share one dtype)"),
                    })
                },
            )
        })
    }
}

impl AttentionOp<'_> {
    /// The `(B, H_q, T_q, D_v)` output, row-major, in the inputs' element type: each
    /// batch item is one [`Attention::run_into`] on in-place views of q, k, v, writing
    /// its slice of the output.
    fn run<T: Element>(
        &self,
        [q, k, v]: [&[T]; 3],
        [ql, kl, vl]: [&candle_core::Layout; 3],
    ) -> Result<(Vec<T>, Shape)> {
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
        let mut out = try_vec::<T>(
            "candle attention output (B * H_q x T_q * D_v)",
            rows,
            tq * dv,
        )?;
        out.resize(b * item, T::default());
        if item > 0 {
            for (bi, o_item) in out.chunks_exact_mut(item).enumerate() {
                self.attn.run_into(
                    self.kernel,
                    item_view(q, ql, bi, "q")?,
                    item_view(k, kl, bi, "k")?,
                    item_view(v, vl, bi, "v")?,
                    item_positions(self.q_pos, bi, tq),
                    item_positions(self.k_pos, bi, tk),
                    View3Mut::heads_tokens_dim(o_item, hq, tq, dv)?,
                )?;
            }
        }
        Ok((out, Shape::from((b, hq, tq, dv))))
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

fn layout_strides(
    l: &candle_core::Layout,
    what: &str,
) -> std::result::Result<[usize; 4], RopeError> {
    <[usize; 4]>::try_from(l.stride()).map_err(|_| {
        RopeError::shape(
            format!("{what} strides"),
            "rank 4",
            format!("{:?}", l.stride()),
        )
    })
}

/// The storage offset of batch item `b` (saturating: an offset past the storage is an
/// error of [`item_view`]).
fn item_base(l: &candle_core::Layout, b: usize) -> usize {
    let sb = l.stride().first().copied().unwrap_or(0);
    b.checked_mul(sb)
        .and_then(|x| x.checked_add(l.start_offset()))
        .unwrap_or(usize::MAX)
}

/// Batch item `b` of a `(B, H, T, D)` storage with candle layout `l`, as the kernels'
/// `[T, H, D]` view, in place (strides from the layout; checked against the storage).
fn item_view<'a, T>(
    data: &'a [T],
    l: &candle_core::Layout,
    b: usize,
    what: &str,
) -> std::result::Result<View3<'a, T>, RopeError> {
    let [_, h, t, d] = layout_dims(l, what)?;
    let [_, sh, st, sd] = layout_strides(l, what)?;
    let rest = data.get(item_base(l, b)..).unwrap_or(&[]);
    View3::new(rest, [t, h, d], [st, sh, sd])
}
