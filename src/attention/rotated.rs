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

use ndarray::ArrayView3;

use super::{Attention, Dims};
use crate::error::Result;
use crate::position::{Affine, Piece};
use crate::rotary::{Layout, cast, rotate_lane_with};

/// `heads` contiguous row-major `[rows, width]` matrices, one after another.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeadMajor {
    data: Vec<f32>,
    heads: usize,
    rows: usize,
    width: usize,
}

impl HeadMajor {
    /// Copies `x` (`[rows, heads, width]`, any strides) into head-major order.
    fn from_view(x: &ArrayView3<f32>) -> Self {
        let (rows, heads, width) = x.dim();
        let mut data = Vec::with_capacity(rows * heads * width);
        if let Some(src) = x.as_slice() {
            // Standard layout: row `t` of head `h` is one contiguous run.
            for h in 0..heads {
                for t in 0..rows {
                    let at = (t * heads + h) * width;
                    data.extend_from_slice(&src[at..at + width]);
                }
            }
        } else {
            for h in 0..heads {
                for t in 0..rows {
                    data.extend(x.slice(ndarray::s![t, h, ..]).iter().copied());
                }
            }
        }
        HeadMajor {
            data,
            heads,
            rows,
            width,
        }
    }

    /// Rows `rows` of head `h`, as one contiguous row-major `[rows.len(), width]` slice.
    #[inline]
    pub(crate) fn rows(&self, h: usize, rows: std::ops::Range<usize>) -> &[f32] {
        let base = h * self.rows * self.width;
        &self.data[base + rows.start * self.width..base + rows.end * self.width]
    }

    /// Row `t` of head `h`.
    #[inline]
    pub(crate) fn row(&self, h: usize, t: usize) -> &[f32] {
        self.rows(h, t..t + 1)
    }

    fn row_mut(&mut self, h: usize, t: usize) -> &mut [f32] {
        let start = (h * self.rows + t) * self.width;
        &mut self.data[start..start + self.width]
    }
}

/// One piece's rotated queries (scale folded in) and rotated keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RotatedPiece {
    /// `[H_q][n_q][d]`.
    pub q: HeadMajor,
    /// `[H_kv][n_k][d]`.
    pub k: HeadMajor,
}

/// Everything a fast kernel needs, computed once per call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prepared {
    /// Validated sizes.
    pub dims: Dims,
    /// The near piece, then the far piece for two-piece maps.
    pub pieces: Vec<RotatedPiece>,
    /// The band width `w` of two-piece maps: entry `(i, j)` uses the near piece iff
    /// `|q_pos[i] - k_pos[j]| < w`.
    pub window: Option<usize>,
    /// Values, `[H_kv][n_k][d_v]`.
    pub v: HeadMajor,
}

impl Prepared {
    /// Index of the piece serving query position `qp` and key position `kp`.
    #[inline]
    pub(crate) fn piece_index(&self, qp: usize, kp: usize) -> usize {
        match self.window {
            Some(w) if qp.abs_diff(kp) >= w => 1,
            _ => 0,
        }
    }
}

/// `sin`/`cos` of `pos(p) * inv_freq_t` in f64 for every position `p` of a list, `pairs`
/// values per position; a constant map is evaluated once.
struct Trig {
    sin: Vec<f64>,
    cos: Vec<f64>,
    pairs: usize,
    constant: bool,
}

impl Trig {
    fn new(inv: &[f64], pos: Affine, positions: &[usize]) -> Self {
        let constant = pos.is_constant();
        let at: Vec<f64> = if constant {
            vec![pos.at(0.0)]
        } else {
            positions.iter().map(|&p| pos.at(p as f64)).collect()
        };
        let mut sin = Vec::with_capacity(at.len() * inv.len());
        let mut cos = Vec::with_capacity(at.len() * inv.len());
        for &x in &at {
            for &w in inv {
                let (s, c) = (x * w).sin_cos();
                sin.push(s);
                cos.push(c);
            }
        }
        Trig {
            sin,
            cos,
            pairs: inv.len(),
            constant,
        }
    }

    /// `(sin, cos)` of token `t`.
    fn token(&self, t: usize) -> (&[f64], &[f64]) {
        let t = if self.constant { 0 } else { t };
        let r = t * self.pairs..(t + 1) * self.pairs;
        (&self.sin[r.clone()], &self.cos[r])
    }

    /// Whether every angle is 0 (the identity rotation, e.g. ReRoPE's far keys).
    fn is_identity(&self) -> bool {
        self.sin.iter().all(|&s| s == 0.0) && self.cos.iter().all(|&c| c == 1.0)
    }
}

impl Attention {
    /// Validates the inputs and rotates every piece's Q and K once.
    pub(crate) fn prepare(
        &self,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Prepared> {
        let dims = self.validate(&q, &k, &v, q_pos, k_pos)?;
        let pieces = self.map().pieces();
        let scale = self.scale_for(dims.head_dim);
        let q_factor: Vec<f64> = q_pos
            .iter()
            .map(|&p| scale * self.query_factor(p))
            .collect();
        let ones = vec![1.0; k_pos.len()];
        let q_raw = HeadMajor::from_view(&q);
        let k_raw = HeadMajor::from_view(&k);
        let mut list = vec![pieces.near];
        if let Some((_, far)) = pieces.far {
            list.push(far);
        }
        let inv = self.frequencies().inv_freq();
        let same_positions = q_pos == k_pos;
        let rotated = list
            .iter()
            .map(|piece: &Piece| {
                let q_trig = Trig::new(inv, piece.query, q_pos);
                // Prefill: queries and keys share positions, so a piece with the same
                // query and key map shares its table.
                let k_own;
                let k_trig = if same_positions && piece.key == piece.query {
                    &q_trig
                } else {
                    k_own = Trig::new(inv, piece.key, k_pos);
                    &k_own
                };
                RotatedPiece {
                    q: self.rotate(&q_raw, &q_trig, &q_factor),
                    k: self.rotate(&k_raw, k_trig, &ones),
                }
            })
            .collect();
        Ok(Prepared {
            dims,
            pieces: rotated,
            window: pieces.far.map(|(w, _)| w),
            v: HeadMajor::from_view(&v),
        })
    }

    /// `factor[t] * R(trig[t]) x[t, h]` for every token and head.
    fn rotate(&self, raw: &HeadMajor, trig: &Trig, factor: &[f64]) -> HeadMajor {
        let mut out = raw.clone();
        let heads = raw.heads;
        let pairs = trig.pairs;
        let layout: Layout = self.layout();
        let identity = trig.is_identity();
        let mut cos = vec![0f32; pairs];
        let mut sin = vec![0f32; pairs];
        for (t, &c) in factor.iter().enumerate() {
            let c32: f32 = cast(c);
            if identity {
                if c != 1.0 {
                    for h in 0..heads {
                        out.row_mut(h, t).iter_mut().for_each(|x| *x *= c32);
                    }
                }
                continue;
            }
            let (s64, c64) = trig.token(t);
            for (((co, si), &cv), &sv) in cos.iter_mut().zip(sin.iter_mut()).zip(c64).zip(s64) {
                *co = cast(cv * c);
                *si = cast(sv * c);
            }
            for h in 0..heads {
                let lane = out.row_mut(h, t);
                rotate_lane_with(lane, &cos, &sin, layout);
                if c != 1.0 {
                    // Pass-through dims (partial rotary) still carry the scale.
                    for x in &mut lane[2 * pairs..] {
                        *x *= c32;
                    }
                }
            }
        }
        out
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
