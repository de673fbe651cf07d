//! Shared preparation for the fast kernels: each piece's rotated, pre-scaled queries and
//! rotated keys, computed once per call, in a head-major layout (`[heads][tokens][d]`,
//! every head a contiguous row-major `[tokens, d]` matrix) that GEMM micro-kernels can
//! consume directly.
//!
//! For piece `(f, g)` (see [`crate::position::Piece`]):
//! - `Q_h[i] = c_i R(f(q_pos[i])) q[i, h]`, with `c_i = scale * s_i` (logit scale times
//!   the log-n factor) folded in, so a score is just `Q_h[i] . K_g[j]`;
//! - `K_g[j] = R(g(k_pos[j])) k[j, g]`.
//!
//! `R(p)` rotates pair `t` by `p * inv_freq_t`, with the angle and its cos/sin computed
//! in f64 and cast to f32 (fractional positions, e.g. Leaky ReRoPE's `j / k`, are
//! exact up to that cast). The attention factor `m` is *not* multiplied into cos/sin
//! here: it is part of the default scale `m^2 / sqrt(d)`, as in the reference kernel.
//!
//! ## Element types
//! Inputs of any [`Element`] type are widened to f32 here, row by row, as they are
//! loaded ([`RowSource`]): rotated q and k go to f32 buffers anyway, so a bf16 or f16
//! input costs no extra pass. f32 inputs in standard layout are read in place, and so
//! are the values (borrowed by [`HeadMajor`]); values of another type or layout are
//! widened into an owned head-major f32 copy.

use std::borrow::Cow;

use ndarray::ArrayView3;

use super::kernels::{Bf16Kernels, Kernels, MatRef, PackedKeys};
use super::{Attention, Dims};
use crate::error::{Result, reuse_vec};
use crate::position::{Pieces, PositionFn};
use crate::rotary::trig::cos_sin_into;
use crate::rotary::{Layout, cast, rotate_lane_with};
use crate::tensor::{Element, View3};

/// Rows `(t, h)` of a `[rows, heads, width]` input of any element type, read as f32.
pub(crate) trait RowSource: Sync {
    /// `(rows, heads, width)`.
    fn shape(&self) -> (usize, usize, usize);

    /// Row `(t, h)`: a slice of the input itself when it is f32 with a contiguous last
    /// axis, else widened into `buf`.
    fn row<'s>(&'s self, t: usize, h: usize, buf: &'s mut Vec<f32>) -> &'s [f32];
}

/// An input view and, when it is in standard layout, its slice.
pub(crate) struct Rows<'a, T> {
    x: ArrayView3<'a, T>,
    flat: Option<&'a [T]>,
}

impl<'a, T: Element> Rows<'a, T> {
    pub(crate) fn new(x: ArrayView3<'a, T>) -> Self {
        Rows {
            flat: x.to_slice(),
            x,
        }
    }
}

impl<T: Element> RowSource for Rows<'_, T> {
    fn shape(&self) -> (usize, usize, usize) {
        self.x.dim()
    }

    #[inline]
    fn row<'s>(&'s self, t: usize, h: usize, buf: &'s mut Vec<f32>) -> &'s [f32] {
        let (_, heads, width) = self.x.dim();
        let src = match self.flat {
            Some(f) => &f[(t * heads + h) * width..(t * heads + h + 1) * width],
            None => {
                let lane = self.x.slice(ndarray::s![t, h, ..]);
                match lane.to_slice() {
                    Some(src) => src,
                    None => {
                        // A strided last axis: element by element.
                        buf.clear();
                        buf.extend(lane.iter().map(|x| x.to_f32()));
                        return buf;
                    }
                }
            }
        };
        match T::as_f32(src) {
            Some(direct) => direct,
            None => {
                buf.resize(width, 0.0);
                T::load_slice(src, buf);
                buf
            }
        }
    }
}

/// `heads` row-major `[rows, width]` matrices over one buffer: row `t` of head `h`
/// starts at `h * head_stride + t * row_stride`. Owned head-major copies have
/// `head_stride = rows * width`, `row_stride = width`; a borrowed standard-layout
/// `[rows, heads, width]` input has `head_stride = width`, `row_stride = heads * width`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeadMajor<'a> {
    data: Cow<'a, [f32]>,
    rows: usize,
    width: usize,
    head_stride: usize,
    row_stride: usize,
}

impl<'a> HeadMajor<'a> {
    /// `x` (`[rows, heads, width]`): borrowed in place when f32 in standard layout,
    /// else widened to f32 in head-major order into `spare`'s memory (taken; grown
    /// fallibly, an allocation error is typed).
    fn from_view<T: Element>(x: &ArrayView3<'a, T>, spare: &mut Vec<f32>) -> Result<Self> {
        let (rows, heads, width) = x.dim();
        if let Some(src) = x.to_slice().and_then(T::as_f32) {
            return Ok(HeadMajor {
                data: Cow::Borrowed(src),
                rows,
                width,
                head_stride: width,
                row_stride: heads * width,
            });
        }
        let mut data = reuse_vec(spare, "values widened to f32", rows * heads, width)?;
        let src = Rows::new(*x);
        let mut buf = Vec::new();
        for h in 0..heads {
            for t in 0..rows {
                data.extend_from_slice(src.row(t, h, &mut buf));
            }
        }
        Ok(HeadMajor::owned(data, rows, width))
    }

    fn owned(data: Vec<f32>, rows: usize, width: usize) -> Self {
        HeadMajor {
            data: Cow::Owned(data),
            rows,
            width,
            head_stride: rows * width,
            row_stride: width,
        }
    }

    /// Rows `rows` of head `h` as a matrix (row stride [`HeadMajor::stride`]).
    #[inline]
    pub(crate) fn mat(&self, h: usize, rows: std::ops::Range<usize>) -> MatRef<'_> {
        let start = h * self.head_stride + rows.start * self.row_stride;
        let len = match rows.len() {
            0 => 0,
            r => (r - 1) * self.row_stride + self.width,
        };
        MatRef::new(
            &self.data[start..start + len],
            rows.len(),
            self.width,
            self.row_stride,
        )
        .expect("rows inside the buffer")
    }

    /// Rows `rows` of head `h`, as one contiguous row-major `[rows.len(), width]` slice
    /// (owned head-major buffers only).
    #[inline]
    pub(crate) fn rows(&self, h: usize, rows: std::ops::Range<usize>) -> &[f32] {
        debug_assert_eq!(self.row_stride, self.width);
        let base = h * self.head_stride;
        &self.data[base + rows.start * self.width..base + rows.end * self.width]
    }

    /// Row `t` of head `h`.
    #[inline]
    pub(crate) fn row(&self, h: usize, t: usize) -> &[f32] {
        let start = h * self.head_stride + t * self.row_stride;
        &self.data[start..start + self.width]
    }
}

/// Everything the two-pass kernel needs, computed once per call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prepared<'a> {
    /// Validated sizes.
    pub dims: Dims,
    /// The map's pieces and region rule.
    pub pieces: Pieces,
    /// Per piece, its rotated, pre-scaled queries `[H_q][n_q][d]`.
    pub q: Vec<HeadMajor<'static>>,
    /// Per distinct key function, the rotated keys `[H_kv][n_k][d]`.
    pub k: Vec<HeadMajor<'static>>,
    /// Per piece, the index of its keys in `k`.
    pub key_of: Vec<usize>,
    /// Values, `[H_kv][n_k][d_v]` (the input itself when in standard layout).
    pub v: HeadMajor<'a>,
}

/// Tokens between exact `sin_cos` evaluations in a [`Trig`] table of consecutive
/// positions.
const TRIG_ANCHOR: usize = 32;

/// `sin`/`cos` of `pos(p) * inv_freq_t` in f64 for every position `p` of a list, `pairs`
/// values per position. A constant function is evaluated once; a token whose position
/// repeats the previous one copies it; runs of positions one step apart (`scale` for an
/// affine function of consecutive tokens, `1` for the others) use angle addition, with
/// one exact evaluation every [`TRIG_ANCHOR`] tokens.
struct Trig {
    sin: Vec<f64>,
    cos: Vec<f64>,
    pairs: usize,
    constant: bool,
}

impl Trig {
    fn new(inv: &[f64], pos: PositionFn, positions: &[usize]) -> Self {
        Self::new_in(inv, pos, positions, Default::default())
    }

    /// [`Trig::new`] in the buffers `(sin, cos)` of an earlier table (reused, not
    /// reallocated, when large enough).
    fn new_in(
        inv: &[f64],
        pos: PositionFn,
        positions: &[usize],
        (mut sin, mut cos): (Vec<f64>, Vec<f64>),
    ) -> Self {
        let constant = pos.is_constant();
        let pairs = inv.len();
        let len = if constant {
            pairs
        } else {
            positions.len() * pairs
        };
        for b in [&mut sin, &mut cos] {
            b.clear();
            b.resize(len, 0.0);
        }
        if constant {
            cos_sin_into(inv, pos.at(0.0), 1.0, &mut cos, &mut sin);
            return Trig {
                sin,
                cos,
                pairs,
                constant,
            };
        }
        let unit = pos.affine().map_or(1.0, |a| a.scale);
        // Angle steps of positions one step apart: `x' * w = x * w + unit * w`.
        let step: Vec<(f64, f64)> = inv.iter().map(|&w| (unit * w).sin_cos()).collect();
        let mut prev_x = f64::NAN;
        for (t, &p) in positions.iter().enumerate() {
            let r = t * pairs..(t + 1) * pairs;
            let x = pos.at(p as f64);
            let stepped = match pos.affine() {
                Some(_) => p == positions[t.max(1) - 1].wrapping_add(1),
                None => x - prev_x == 1.0,
            };
            let prev = t.wrapping_sub(1).wrapping_mul(pairs);
            if t > 0 && pos.affine().is_none() && x == prev_x {
                sin.copy_within(prev..prev + pairs, r.start);
                cos.copy_within(prev..prev + pairs, r.start);
            } else if t % TRIG_ANCHOR != 0 && stepped {
                // Angle addition from the previous token (re-anchored every
                // TRIG_ANCHOR tokens: the f64 error stays ~1e-15, far below f32).
                for (i, &(sd, cd)) in step.iter().enumerate() {
                    let (s0, c0) = (sin[prev + i], cos[prev + i]);
                    sin[r.start + i] = s0 * cd + c0 * sd;
                    cos[r.start + i] = c0 * cd - s0 * sd;
                }
            } else {
                cos_sin_into(inv, x, 1.0, &mut cos[r.clone()], &mut sin[r]);
            }
            prev_x = x;
        }
        Trig {
            sin,
            cos,
            pairs,
            constant,
        }
    }

    /// `(sin, cos)` of token `t`.
    fn token(&self, t: usize) -> (&[f64], &[f64]) {
        let t = if self.constant { 0 } else { t };
        let r = t * self.pairs..(t + 1) * self.pairs;
        (&self.sin[r.clone()], &self.cos[r])
    }

    /// Entries of each of `sin` and `cos` in the table of `pos` over `positions`.
    fn len_for(pos: PositionFn, positions: &[usize], pairs: usize) -> usize {
        if pos.is_constant() {
            pairs
        } else {
            positions.len() * pairs
        }
    }

    /// The table's buffers, for [`Trig::new_in`].
    fn into_buffers(self) -> (Vec<f64>, Vec<f64>) {
        (self.sin, self.cos)
    }

    /// Whether every angle is 0 (the identity rotation, e.g. ReRoPE's far keys).
    fn is_identity(&self) -> bool {
        self.sin.iter().all(|&s| s == 0.0) && self.cos.iter().all(|&c| c == 1.0)
    }
}

/// Rotates token rows: `out = factor[t] * R(trig[t]) x[t, h]`.
struct Rotator<'t> {
    trig: &'t Trig,
    factor: &'t [f64],
    layout: Layout,
    identity: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl<'t> Rotator<'t> {
    fn new(trig: &'t Trig, factor: &'t [f64], layout: Layout) -> Self {
        Rotator {
            trig,
            factor,
            layout,
            identity: trig.is_identity(),
            cos: vec![0.0; trig.pairs],
            sin: vec![0.0; trig.pairs],
        }
    }

    /// Prepares the f32 cos/sin of token `t` (times its factor).
    fn token(&mut self, t: usize) {
        if self.identity {
            return;
        }
        let c = self.factor[t];
        let (s64, c64) = self.trig.token(t);
        for (((co, si), &cv), &sv) in self
            .cos
            .iter_mut()
            .zip(self.sin.iter_mut())
            .zip(c64)
            .zip(s64)
        {
            *co = cast(cv * c);
            *si = cast(sv * c);
        }
    }

    /// Writes the rotated row `src` of token `t` (after [`Rotator::token`]) into `dst`.
    fn row(&self, t: usize, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
        let c = self.factor[t];
        let c32: f32 = cast(c);
        if self.identity {
            if c != 1.0 {
                dst.iter_mut().for_each(|x| *x *= c32);
            }
            return;
        }
        rotate_lane_with(dst, &self.cos, &self.sin, self.layout);
        if c != 1.0 {
            // Pass-through dims (partial rotary) still carry the scale.
            for x in &mut dst[2 * self.trig.pairs..] {
                *x *= c32;
            }
        }
    }
}

/// What both preparations start from.
struct Setup {
    /// Validated sizes.
    dims: Dims,
    /// The map's pieces and region rule.
    pieces: Pieces,
    /// The distinct key functions of the pieces, and each piece's index among them.
    key_fns: Vec<PositionFn>,
    key_of: Vec<usize>,
    /// Per-query logit factor: scale (with the DCA length factor) times the log-n and map
    /// query factors.
    q_factor: Vec<f64>,
}

impl Attention {
    /// Validates the inputs and lays out the map's pieces, their distinct key functions
    /// (each rotated once: DCA's three pieces and StreamingLLM's two share their keys)
    /// and the per-query factors.
    fn setup<T>(
        &self,
        q: &View3<T>,
        k: &View3<T>,
        v: &View3<T>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Setup> {
        let dims = self.validate(q, k, v, q_pos, k_pos)?;
        let pieces = self.map().pieces();
        let scale = self.scale_for(dims.head_dim) * self.length_factor(dims.n_k);
        let q_factor = q_pos
            .iter()
            .map(|&p| scale * self.query_factor(p))
            .collect();
        let mut key_fns: Vec<PositionFn> = Vec::new();
        let key_of = pieces
            .list()
            .iter()
            .map(|piece| match key_fns.iter().position(|f| *f == piece.key) {
                Some(at) => at,
                None => {
                    key_fns.push(piece.key);
                    key_fns.len() - 1
                }
            })
            .collect();
        Ok(Setup {
            dims,
            pieces,
            key_fns,
            key_of,
            q_factor,
        })
    }

    /// Validates the inputs and rotates every piece's Q and every distinct key function's
    /// K once, head-major; values are borrowed when in standard layout.
    pub(crate) fn prepare<'a, T: Element>(
        &self,
        q: View3<T>,
        k: View3<T>,
        v: View3<'a, T>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Prepared<'a>> {
        let Setup {
            dims,
            pieces,
            key_fns,
            key_of,
            q_factor,
        } = self.setup(&q, &k, &v, q_pos, k_pos)?;
        let ones = vec![1.0; k_pos.len()];
        let inv = self.frequencies().inv_freq();
        let (q, k) = (Rows::new(q.as_ndarray()), Rows::new(k.as_ndarray()));
        let keys = key_fns
            .iter()
            .map(|&f| self.rotate_all(&k, &Trig::new(inv, f, k_pos), &ones))
            .collect();
        let queries = pieces
            .list()
            .iter()
            .map(|piece| self.rotate_all(&q, &Trig::new(inv, piece.query, q_pos), &q_factor))
            .collect();
        Ok(Prepared {
            dims,
            pieces,
            q: queries,
            k: keys,
            key_of,
            v: HeadMajor::from_view(&v.as_ndarray(), &mut Vec::new())?,
        })
    }

    /// `factor[t] * R(trig[t]) x[t, h]` for every token and head, head-major.
    fn rotate_all(&self, x: &dyn RowSource, trig: &Trig, factor: &[f64]) -> HeadMajor<'static> {
        let (rows, heads, width) = x.shape();
        let mut out = vec![0f32; rows * heads * width];
        let mut rot = Rotator::new(trig, factor, self.layout());
        let mut buf = Vec::new();
        for t in 0..rows {
            rot.token(t);
            for h in 0..heads {
                let at = (h * rows + t) * width;
                rot.row(t, x.row(t, h, &mut buf), &mut out[at..at + width]);
            }
        }
        HeadMajor::owned(out, rows, width)
    }

    /// The rotated keys of each head, packed: one head at a time through a scratch.
    /// Each head of `x` rotated into `rotated` (reused, `[rows, width]`), with `pairs`
    /// rounded in place to bf16 pair rows (`ceil(width / 2)` slots), and packed into its
    /// entry of `packed` (reused; one per head on return).
    fn rotate_packed(
        &self,
        x: &dyn RowSource,
        trig: &Trig,
        factor: &[f64],
        (kern, pairs): (Kernels, Option<Bf16Kernels>),
        rotated: &mut Vec<f32>,
        mut packed: Vec<PackedKeys>,
    ) -> Vec<PackedKeys> {
        let (rows, heads, width) = x.shape();
        let mut rot = Rotator::new(trig, factor, self.layout());
        let mut buf = Vec::new();
        // A chunk of tokens at a time, every head of a token in turn: the input is read
        // in its own order (one head's rows are `heads * width` apart, a page each at 8
        // heads of 128), each token's cos/sin is prepared once, and the scratch holds
        // `heads x chunk` rows, never more than the input. Chunks start at multiples of
        // ROTATE_CHUNK (a multiple of the panel), or there is one chunk at 0.
        let chunk = ROTATE_CHUNK.min(rows);
        rotated.clear();
        rotated.resize(heads * chunk * width, 0.0);
        let cols = if pairs.is_some() {
            width.div_ceil(2)
        } else {
            width
        };
        packed.resize_with(heads, PackedKeys::new);
        for out in &mut packed {
            out.reset(rows, cols);
        }
        for t0 in (0..rows).step_by(chunk.max(1)) {
            let t1 = (t0 + chunk).min(rows);
            for t in t0..t1 {
                rot.token(t);
                for h in 0..heads {
                    let at = (h * chunk + t - t0) * width;
                    let row = &mut rotated[at..at + width];
                    rot.row(t, x.row(t, h, &mut buf), row);
                    if let Some(bf) = pairs {
                        bf.round_pairs_unchecked(row, width);
                    }
                }
            }
            for (h, out) in packed.iter_mut().enumerate() {
                let at = h * chunk * width;
                let m = MatRef::new(&rotated[at..], t1 - t0, cols, width);
                kern.pack_keys_at(m.expect("scratch holds the chunk"), out, t0);
            }
        }
        packed
    }
}

/// Tokens per chunk of [`Attention::rotate_packed`] (a multiple of the key panel): the
/// chunk's rows of every head stay in L2 between rotating and packing (512 KiB at 8
/// kv heads of 128 f32).
const ROTATE_CHUNK: usize = 128;

/// How the tiled kernel stores each key function's rotated keys.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyForm {
    /// Head-major `[H_kv][n_k][d]` rows.
    HeadMajor,
    /// Packed per kv head for [`Kernels::qk_tile_packed`], rotated one head at a time
    /// into a reused scratch (no full rotated copy); with `pairs`, each rotated row is
    /// first rounded to a bf16 pair row ([`Bf16Kernels::round_pairs`]), so the packed
    /// keys serve [`Bf16Kernels::qk_tile_packed`] (their head dim counts pairs).
    Packed {
        kern: Kernels,
        pairs: Option<Bf16Kernels>,
    },
}

/// What the tiled kernel prepares once per call: each needed key function's keys
/// rotated (and packed) per kv head, the trigonometry of each piece's queries, and the
/// validated inputs. Queries are rotated inside each task, one query block at a time
/// (each query row is used by exactly one task, so this is the same work as rotating
/// them all up front, without an `n x H x d` buffer per piece).
pub(crate) struct TiledPrep<'a> {
    /// Validated sizes.
    pub dims: Dims,
    /// The map's pieces and region rule.
    pub pieces: Pieces,
    /// Per piece, its query trigonometry (`None` when the piece is not needed) and the
    /// index of its keys in `keys`.
    q_trig: Vec<Option<Trig>>,
    pub key_of: Vec<usize>,
    /// Per distinct key function, its rotated keys (empty when no needed piece uses it).
    pub keys: Vec<TiledKeys>,
    /// Values, `[H_kv][n_k][d_v]` (the input itself when in standard layout).
    pub v: HeadMajor<'a>,
    /// The unrotated queries, widened row by row as they are rotated.
    q: Box<dyn RowSource + 'a>,
    q_factor: Vec<f64>,
    layout: Layout,
}

/// The large buffers of a tiled call, kept between calls by
/// [`crate::attention::TiledScratch`] so that repeated calls of one size reuse their
/// memory (and its pages) instead of allocating and faulting it in again.
#[derive(Debug, Default)]
pub(crate) struct PrepBuffers {
    /// Packed rotated keys, per key function and kv head.
    keys: Vec<Vec<PackedKeys>>,
    /// One head's rotated keys before packing, `[n_k, d]`.
    rotated: Vec<f32>,
    /// Values widened to f32 or made contiguous, `[H_kv][n_k][d_v]`.
    pub values: Vec<f32>,
    /// Values as bf16 pair rows, `[H_kv][ceil(n_k / 2)][d_v]` (bf16 products).
    pub value_pairs: Vec<f32>,
    /// Trigonometry tables `(sin, cos)`.
    trig: Vec<(Vec<f64>, Vec<f64>)>,
}

impl PrepBuffers {
    /// Bytes of memory held.
    pub fn capacity_bytes(&self) -> usize {
        let keys: usize = self
            .keys
            .iter()
            .flatten()
            .map(PackedKeys::capacity_bytes)
            .sum();
        let trig: usize = self
            .trig
            .iter()
            .map(|(s, c)| s.capacity() + c.capacity())
            .sum();
        let f32s = self.rotated.capacity() + self.values.capacity() + self.value_pairs.capacity();
        keys + 4 * f32s + 8 * trig
    }

    /// The spare trigonometry buffers best fitting `len` entries: the smallest that
    /// holds them, else the largest (grown by [`Trig::new_in`]).
    fn take_trig(&mut self, len: usize) -> (Vec<f64>, Vec<f64>) {
        let cap = |b: &(Vec<f64>, Vec<f64>)| b.0.capacity().min(b.1.capacity());
        let fits = (0..self.trig.len())
            .filter(|&i| cap(&self.trig[i]) >= len)
            .min_by_key(|&i| cap(&self.trig[i]));
        let best = fits.or_else(|| (0..self.trig.len()).max_by_key(|&i| cap(&self.trig[i])));
        best.map(|i| self.trig.swap_remove(i)).unwrap_or_default()
    }
}

/// One key function's rotated keys in a [`TiledPrep`].
pub(crate) struct TiledKeys {
    /// Head-major rotated keys ([`KeyForm::HeadMajor`]).
    pub k: Option<HeadMajor<'static>>,
    /// Packed rotated keys per kv head ([`KeyForm::Packed`]).
    pub packed: Vec<PackedKeys>,
}

impl TiledPrep<'_> {
    /// Returns the call's buffers to `bufs` for the next call.
    pub(crate) fn recycle(self, bufs: &mut PrepBuffers) {
        bufs.keys
            .resize_with(self.keys.len().max(bufs.keys.len()), Vec::new);
        for (slot, keys) in bufs.keys.iter_mut().zip(self.keys) {
            if !keys.packed.is_empty() {
                *slot = keys.packed;
            }
        }
        bufs.trig
            .extend(self.q_trig.into_iter().flatten().map(Trig::into_buffers));
        if let Cow::Owned(v) = self.v.data
            && v.capacity() > bufs.values.capacity()
        {
            bufs.values = v;
        }
    }

    /// Rotated, scaled query rows `rows` of every head for piece `p`, written to `out`
    /// as `[H_q][rows.len()][d]`.
    pub(crate) fn rotate_queries(&self, p: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let Some(trig) = self.q_trig[p].as_ref() else {
            return;
        };
        let (_, heads, d) = self.q.shape();
        let bq = rows.len();
        let mut rot = Rotator::new(trig, &self.q_factor, self.layout);
        let mut buf = Vec::new();
        for (a, t) in rows.enumerate() {
            rot.token(t);
            for h in 0..heads {
                let at = (h * bq + a) * d;
                rot.row(t, self.q.row(t, h, &mut buf), &mut out[at..at + d]);
            }
        }
    }
}

impl Attention {
    /// Validates the inputs, packs (or rotates) the keys of every key function some
    /// needed piece uses (`needed[piece]`) once and prepares the needed pieces' query
    /// trigonometry for [`TiledPrep::rotate_queries`], in the memory of `bufs`
    /// ([`TiledPrep::recycle`] gives it back).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare_tiled<'a, T: Element>(
        &self,
        q: View3<'a, T>,
        k: View3<T>,
        v: View3<'a, T>,
        q_pos: &[usize],
        k_pos: &[usize],
        keys: KeyForm,
        needed: &[bool],
        bufs: &mut PrepBuffers,
    ) -> Result<TiledPrep<'a>> {
        let Setup {
            dims,
            pieces,
            key_fns,
            key_of,
            q_factor,
        } = self.setup(&q, &k, &v, q_pos, k_pos)?;
        let ones = vec![1.0; k_pos.len()];
        let inv = self.frequencies().inv_freq();
        let k = Rows::new(k.as_ndarray());
        let is_needed = |p: usize| needed.get(p).copied().unwrap_or(false);
        bufs.keys
            .resize_with(key_fns.len().max(bufs.keys.len()), Vec::new);
        let stores = key_fns
            .iter()
            .enumerate()
            .map(|(f, &key)| {
                if !(0..key_of.len()).any(|p| key_of[p] == f && is_needed(p)) {
                    // No tile uses this key function (e.g. a window covering every pair).
                    return TiledKeys {
                        k: None,
                        packed: Vec::new(),
                    };
                }
                let spare = bufs.take_trig(Trig::len_for(key, k_pos, inv.len()));
                let trig = Trig::new_in(inv, key, k_pos, spare);
                let stored = match keys {
                    KeyForm::HeadMajor => TiledKeys {
                        k: Some(self.rotate_all(&k, &trig, &ones)),
                        packed: Vec::new(),
                    },
                    KeyForm::Packed { kern, pairs } => TiledKeys {
                        k: None,
                        packed: self.rotate_packed(
                            &k,
                            &trig,
                            &ones,
                            (kern, pairs),
                            &mut bufs.rotated,
                            std::mem::take(&mut bufs.keys[f]),
                        ),
                    },
                };
                bufs.trig.push(trig.into_buffers());
                stored
            })
            .collect();
        let q_trig = pieces
            .list()
            .iter()
            .enumerate()
            .map(|(p, piece)| {
                is_needed(p).then(|| {
                    let spare = bufs.take_trig(Trig::len_for(piece.query, q_pos, inv.len()));
                    Trig::new_in(inv, piece.query, q_pos, spare)
                })
            })
            .collect();
        Ok(TiledPrep {
            dims,
            pieces,
            q_trig,
            key_of,
            keys: stores,
            v: HeadMajor::from_view(&v.as_ndarray(), &mut bufs.values)?,
            q: Box::new(Rows::new(q.as_ndarray())),
            q_factor,
            layout: self.layout(),
        })
    }
}

/// `out[a * n_b + b] = A[a] . B[b]` for row-major `A` (`n_a x d`) and `B` (`n_b x d`):
/// the tile product `A B^T`. Summation runs over `d` in a fixed order, so results do not
/// depend on threads or tiling of the other axes. This is the hook a GEMM micro-kernel
/// replaces.
#[inline]
pub(crate) fn scores_into(a: &[f32], b: &[f32], d: usize, out: &mut [f32]) {
    if d == 0 {
        out.fill(0.0);
        return;
    }
    let n_b = b.len() / d;
    for (ra, orow) in a.chunks_exact(d).zip(out.chunks_mut(n_b.max(1))) {
        for (rb, o) in b.chunks_exact(d).zip(orow.iter_mut()) {
            *o = dot(ra, rb);
        }
    }
}

/// Dot product with 8 independent partial sums (vectorisable, fixed order).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for (s, (x, y)) in acc.iter_mut().zip(x.iter().zip(y)) {
            *s += x * y;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `acc += p * x`.
#[inline]
pub(crate) fn axpy(acc: &mut [f32], p: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += p * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Affine;

    /// Angle addition over runs of consecutive positions (and copies of repeated ones,
    /// for grouped and chunked positions) stays within 1e-9 of exact `sin_cos` (far below the f32 the tables are cast to; at angles ~1e5 rad the f64
    /// rounding of the argument alone is ~1e-11).
    #[test]
    fn trig_recurrence_matches_exact() {
        let inv: Vec<f64> = (0..64)
            .map(|i| 10_000f64.powf(-(i as f64) / 64.0))
            .collect();
        let mut positions: Vec<usize> = (0..5000).collect();
        positions.extend([7, 8, 9, 100_000, 100_001, 3]);
        for pos in [
            Affine::IDENTITY,
            Affine {
                scale: 1.0 / 16.0,
                offset: 512.0 - 512.0 / 16.0,
            },
            Affine {
                scale: 0.25,
                offset: 0.0,
            },
        ]
        .map(PositionFn::from)
        .into_iter()
        .chain([
            PositionFn::Grouped {
                group: 8,
                shift: 896,
            },
            PositionFn::modulo(384),
            PositionFn::Chunked {
                period: 384,
                add: 384,
                cap: 512,
            },
            PositionFn::Capped { cap: 1003 },
        ]) {
            let t = Trig::new(&inv, pos, &positions);
            for (k, &p) in positions.iter().enumerate() {
                let (s, c) = t.token(k);
                for (i, &w) in inv.iter().enumerate() {
                    let (se, ce) = (pos.at(p as f64) * w).sin_cos();
                    assert!((s[i] - se).abs() < 1e-9, "{pos:?} p={p} pair {i}");
                    assert!((c[i] - ce).abs() < 1e-9, "{pos:?} p={p} pair {i}");
                }
            }
        }
    }
}
