//! [`RotaryTable`]: cos/sin for the positions in use, and in-place rotation of queries
//! and keys shaped `[tokens, heads, head_dim]`, in either [`Layout`]. Also log-n query
//! scaling ([`log_n_scale`], [`apply_log_n`]).
//!
//! Pair `j` of a vector at position `p` is rotated by the angle `p * inv_freq_j`:
//!
//! ```text
//! x'_a = m (x_a cos(p w_j) - x_b sin(p w_j))
//! x'_b = m (x_b cos(p w_j) + x_a sin(p w_j))
//! ```
//!
//! with `m` the scheme's attention factor (as transformers multiplies it into cos and
//! sin) and `(a, b) = (j, j + d/2)` for [`Layout::Half`] or `(2j, 2j+1)` for
//! [`Layout::Interleaved`]. Dims past the rotary dim `d` pass through untouched.
//!
//! Angles are computed in f64 and only the final cos/sin are cast to `T` (`trig`, the one
//! cos/sin builder): at position 1,048,576 an f32 product `p * inv_freq` is off by up to
//! ~0.03 rad, the f64 path by less than 1e-7.
//!
//! ## Limits
//! Positions are at most [`crate::MAX_POSITION`] `= 2^32` in magnitude (see
//! [`crate::limits`]). A table is allocated with
//! `try_reserve`, so a table too large for memory is a [`RopeError::Allocation`] naming the
//! size, never an abort.

pub(crate) mod trig;

use ndarray::ArrayViewMut3;
use num_traits::Float;

use crate::error::{Result, RopeError, try_vec};
use crate::frequencies::Frequencies;
pub(crate) use trig::cast;
use trig::cos_sin_into;

/// [`crate::limits::MAX_POSITION`] as the f64 magnitude a table's positions may reach.
const MAX_POSITION: f64 = crate::limits::MAX_POSITION as f64;

/// How a head's dims are paired for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Pair `j` is dims `(j, j + d/2)`: Hugging Face `rotate_half`, GPT-NeoX, vLLM
    /// `is_neox_style = true`.
    #[default]
    Half,
    /// Pair `j` is dims `(2j, 2j + 1)`: GPT-J, Meta's original Llama code, GGUF/ggml
    /// "normal" mode, vLLM `is_neox_style = false`.
    Interleaved,
}

impl Layout {
    /// The two dims that form pair `j` of a rotary dim of `d`.
    pub fn pair_dims(self, j: usize, d: usize) -> (usize, usize) {
        match self {
            Layout::Half => (j, j + d / 2),
            Layout::Interleaved => (2 * j, 2 * j + 1),
        }
    }
}

/// cos/sin of `position * inv_freq_j` for a list of positions, computed in f64 and
/// stored as `T`, with the scheme's attention factor multiplied in.
///
/// ```
/// use ndarray::Array3;
/// use ropex::{Layout, RopeConfig, RotaryTable};
/// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
/// let table = RotaryTable::<f32>::new(&freqs, 16, Layout::Half)?;
/// let mut q = Array3::<f32>::ones((3, 2, 8)); // [tokens, heads, head_dim]
/// table.rotate(q.view_mut(), &[0, 5, 15])?;   // per-token positions
/// assert_eq!(q[[0, 0, 0]], 1.0);              // position 0 is the identity
/// assert!(table.rotate(q.view_mut(), &[0, 5, 16]).is_err()); // 16 is not in the table
/// # Ok::<(), ropex::RopeError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryTable<T = f32> {
    cos: Vec<T>,
    sin: Vec<T>,
    positions: Vec<f64>,
    pairs: usize,
    layout: Layout,
    attention_factor: f64,
}

impl<T: Float> RotaryTable<T> {
    /// A table for positions `0, 1, ..., len - 1`; row `p` is position `p`.
    ///
    /// `len` is at most `2^32 + 1` (positions up to [`MAX_POSITION`]); a table that does
    /// not fit in memory is a [`RopeError::Allocation`].
    pub fn new(freqs: &Frequencies, len: usize, layout: Layout) -> Result<Self> {
        if len > 1 && (len - 1) as f64 > MAX_POSITION {
            return Err(RopeError::invalid(
                "rotary table len",
                len,
                "must be <= 2^32 + 1 (positions up to ropex::MAX_POSITION = 2^32)",
            ));
        }
        Self::build(freqs, (0..len).map(|p| p as f64), layout)
    }

    /// A table whose row `r` holds `positions[r]`, which may be fractional (Leaky
    /// ReRoPE's `j / k`) or negative. Every position must be finite and at most
    /// [`MAX_POSITION`] in magnitude.
    pub fn from_positions(freqs: &Frequencies, positions: &[f64], layout: Layout) -> Result<Self> {
        if let Some((r, &p)) = positions.iter().enumerate().find(|(_, p)| !p.is_finite()) {
            return Err(RopeError::invalid(
                format!("positions[{r}]"),
                p,
                "must be a finite number",
            ));
        }
        if let Some((r, &p)) = positions
            .iter()
            .enumerate()
            .find(|(_, p)| p.abs() > MAX_POSITION)
        {
            return Err(RopeError::invalid(
                format!("positions[{r}]"),
                p,
                "must be at most 2^32 in magnitude (ropex::MAX_POSITION)",
            ));
        }
        Self::build(freqs, positions.iter().copied(), layout)
    }

    /// Allocates every buffer first (fallibly), then fills them row by row.
    fn build(
        freqs: &Frequencies,
        positions: impl ExactSizeIterator<Item = f64>,
        layout: Layout,
    ) -> Result<Self> {
        let rows = positions.len();
        let pairs = freqs.num_pairs();
        let m = freqs.attention_factor();
        let mut cos = try_vec::<T>("rotary table cos (rows x pairs)", rows, pairs)?;
        let mut sin = try_vec::<T>("rotary table sin (rows x pairs)", rows, pairs)?;
        let mut held = try_vec::<f64>("rotary table positions (rows x 1)", rows, 1)?;
        // Within the reserved capacity: no reallocation.
        cos.resize(rows * pairs, T::zero());
        sin.resize(rows * pairs, T::zero());
        for (r, p) in positions.enumerate() {
            let row = r * pairs..(r + 1) * pairs;
            cos_sin_into(freqs.inv_freq(), p, m, &mut cos[row.clone()], &mut sin[row]);
            held.push(p);
        }
        Ok(RotaryTable {
            cos,
            sin,
            positions: held,
            pairs,
            layout,
            attention_factor: m,
        })
    }

    /// Number of rows (positions) in the table.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// True when the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The position each row holds.
    pub fn positions(&self) -> &[f64] {
        &self.positions
    }

    /// Number of rotary pairs, `rotary_dim / 2`.
    pub fn num_pairs(&self) -> usize {
        self.pairs
    }

    /// The rotary dimension `d`.
    pub fn rotary_dim(&self) -> usize {
        2 * self.pairs
    }

    /// The pairing layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The attention factor multiplied into cos and sin.
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor
    }

    /// `m cos(p_r w_j)` for every pair `j` of row `r`.
    pub fn cos_row(&self, row: usize) -> Result<&[T]> {
        self.check_row(row)?;
        Ok(&self.cos[row * self.pairs..(row + 1) * self.pairs])
    }

    /// `m sin(p_r w_j)` for every pair `j` of row `r`.
    pub fn sin_row(&self, row: usize) -> Result<&[T]> {
        self.check_row(row)?;
        Ok(&self.sin[row * self.pairs..(row + 1) * self.pairs])
    }

    fn check_row(&self, row: usize) -> Result<()> {
        if row < self.len() {
            Ok(())
        } else {
            Err(RopeError::PositionOutOfTable {
                index: row,
                len: self.len(),
                needed: row + 1,
            })
        }
    }

    fn check_rows(&self, rows: &[usize], tokens: usize) -> Result<()> {
        if rows.len() != tokens {
            return Err(RopeError::shape(
                "positions",
                format!("one per token ({tokens})"),
                rows.len(),
            ));
        }
        match rows.iter().max() {
            Some(&max) => self.check_row(max),
            None => Ok(()),
        }
    }

    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        if head_dim < self.rotary_dim() {
            Err(RopeError::shape(
                "head_dim of the rotated tensor",
                format!(">= rotary_dim ({})", self.rotary_dim()),
                head_dim,
            ))
        } else {
            Ok(())
        }
    }

    /// Rotates one head vector in place by table row `row` (unchecked row; the caller
    /// has validated it). Only the first `rotary_dim` entries are touched.
    #[inline]
    pub(crate) fn rotate_lane(&self, lane: &mut [T], row: usize) {
        let p = self.pairs;
        let cos = &self.cos[row * p..(row + 1) * p];
        let sin = &self.sin[row * p..(row + 1) * p];
        rotate_lane_with(lane, cos, sin, self.layout);
    }

    /// Rotates `x`, shaped `[tokens, heads, head_dim]`, in place: token `t` by table row
    /// `rows[t]`. Works for any memory layout of the view (contiguous lanes take the fast
    /// path).
    ///
    /// This is for engines that run their own attention. Do **not** pass rotated q/k to
    /// ropex's kernels ([`crate::Attention`], the KV caches, `ropex::candle` when
    /// enabled): they take unrotated q/k and rotate each position-map piece themselves, so
    /// a rotated input is rotated twice (a RoPE output then sees relative positions
    /// `2 (i - j)`).
    pub fn rotate(&self, mut x: ArrayViewMut3<T>, rows: &[usize]) -> Result<()> {
        let (tokens, heads, head_dim) = x.dim();
        self.check_rows(rows, tokens)?;
        self.check_head_dim(head_dim)?;
        if let Some(slice) = x.as_slice_mut() {
            self.rotate_contiguous(slice, heads, head_dim, rows);
            return Ok(());
        }
        if tokens == 0 || heads == 0 {
            return Ok(());
        }
        // A lane of a non-empty view is in memory already, so this copy is bounded by it.
        let mut buf = vec![T::zero(); head_dim];
        for (t, &row) in rows.iter().enumerate() {
            for h in 0..heads {
                let mut lane = x.slice_mut(ndarray::s![t, h, ..]);
                match lane.as_slice_mut() {
                    Some(l) => self.rotate_lane(l, row),
                    None => {
                        for (b, v) in buf.iter_mut().zip(lane.iter()) {
                            *b = *v;
                        }
                        self.rotate_lane(&mut buf, row);
                        for (v, b) in lane.iter_mut().zip(&buf) {
                            *v = *b;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Rotates a row-major `[tokens, heads, head_dim]` buffer in place: token `t` by
    /// table row `rows[t]`. `shape` must match `x.len()`.
    pub fn rotate_slice(&self, x: &mut [T], shape: [usize; 3], rows: &[usize]) -> Result<()> {
        let [tokens, heads, head_dim] = shape;
        let expected = tokens
            .checked_mul(heads)
            .and_then(|v| v.checked_mul(head_dim))
            .ok_or_else(|| RopeError::invalid("shape", format!("{shape:?}"), "overflows usize"))?;
        if x.len() != expected {
            return Err(RopeError::shape(
                "slice for [tokens, heads, head_dim]",
                format!("{expected} elements for {shape:?}"),
                x.len(),
            ));
        }
        self.check_rows(rows, tokens)?;
        self.check_head_dim(head_dim)?;
        self.rotate_contiguous(x, heads, head_dim, rows);
        Ok(())
    }

    fn rotate_contiguous(&self, x: &mut [T], heads: usize, head_dim: usize, rows: &[usize]) {
        if head_dim == 0 || heads == 0 {
            return;
        }
        for (token, &row) in x.chunks_exact_mut(heads * head_dim).zip(rows) {
            let p = self.pairs;
            let cos = &self.cos[row * p..(row + 1) * p];
            let sin = &self.sin[row * p..(row + 1) * p];
            for lane in token.chunks_exact_mut(head_dim) {
                rotate_lane_with(lane, cos, sin, self.layout);
            }
        }
    }
}

/// Rotates the first `2 * cos.len()` entries of `lane` by the given cos/sin.
#[inline]
pub(crate) fn rotate_lane_with<T: Float>(lane: &mut [T], cos: &[T], sin: &[T], layout: Layout) {
    let p = cos.len();
    match layout {
        Layout::Half => {
            let (a, rest) = lane.split_at_mut(p);
            let b = &mut rest[..p];
            for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (x, y) = (*a, *b);
                *a = x * c - y * s;
                *b = y * c + x * s;
            }
        }
        Layout::Interleaved => {
            for ((pair, &c), &s) in lane[..2 * p].chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x, y) = (pair[0], pair[1]);
                pair[0] = x * c - y * s;
                pair[1] = y * c + x * s;
            }
        }
    }
}

/// Log-n query scaling (Su, posts 10-12): `max(1, ln(p + 1) / ln L_train)` for the query at
/// 0-based position `p`. Keeps attention entropy at long context near its training value.
///
/// ```
/// assert_eq!(ropex::log_n_scale(100, 512), 1.0);
/// assert!((ropex::log_n_scale(4095, 512) - 4096f64.ln() / 512f64.ln()).abs() < 1e-15);
/// ```
pub fn log_n_scale(position: usize, train_len: usize) -> f64 {
    if train_len < 2 {
        return 1.0;
    }
    ((position as f64 + 1.0).ln() / (train_len as f64).ln()).max(1.0)
}

/// Multiplies each query token of `q` (`[tokens, heads, head_dim]`) by
/// [`log_n_scale`]`(positions[t], train_len)`. It is a per-query scalar, so it commutes
/// with the rotation. `train_len` must be at least 2.
pub fn apply_log_n<T: Float>(
    mut q: ArrayViewMut3<T>,
    positions: &[usize],
    train_len: usize,
) -> Result<()> {
    if train_len < 2 {
        return Err(RopeError::invalid(
            "log-n train_len",
            train_len,
            "must be >= 2 (ln of the training length is the divisor)",
        ));
    }
    if positions.len() != q.dim().0 {
        return Err(RopeError::shape(
            "positions",
            format!("one per query token ({})", q.dim().0),
            positions.len(),
        ));
    }
    for (mut token, &p) in q.outer_iter_mut().zip(positions) {
        let s: T = cast(log_n_scale(p, train_len));
        token.mapv_inplace(|v| v * s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RopeConfig;
    use ndarray::{Array3, ShapeBuilder};

    /// Slow, obviously-correct rotation in f64 from the angle formula.
    fn reference(x: &[f64], p: f64, inv: &[f64], m: f64, layout: Layout) -> Vec<f64> {
        let d = 2 * inv.len();
        let mut out = x.to_vec();
        for (j, w) in inv.iter().enumerate() {
            let (a, b) = layout.pair_dims(j, d);
            let (s, c) = (p * w).sin_cos();
            out[a] = m * (x[a] * c - x[b] * s);
            out[b] = m * (x[b] * c + x[a] * s);
        }
        out
    }

    fn data(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f64 / 500.0) - 1.0)
            .collect()
    }

    #[test]
    fn matches_reference_both_layouts_partial_rotary() {
        let cfg = RopeConfig::new(16, 10_000.0)
            .unwrap()
            .with_rotary_dim(8)
            .unwrap();
        let freqs = cfg.frequencies();
        for layout in [Layout::Half, Layout::Interleaved] {
            let table = RotaryTable::<f64>::new(&freqs, 50, layout).unwrap();
            let rows = [3usize, 0, 49];
            let x = data(3 * 2 * 16);
            let mut y = x.clone();
            table.rotate_slice(&mut y, [3, 2, 16], &rows).unwrap();
            for (t, &row) in rows.iter().enumerate() {
                for h in 0..2 {
                    let off = (t * 2 + h) * 16;
                    let r = reference(&x[off..off + 16], row as f64, freqs.inv_freq(), 1.0, layout);
                    for i in 0..16 {
                        assert!((y[off + i] - r[i]).abs() < 1e-12);
                    }
                    // dims past the rotary dim pass through
                    assert_eq!(&y[off + 8..off + 16], &x[off + 8..off + 16]);
                }
            }
        }
    }

    #[test]
    fn view_api_equals_slice_api_for_strided_views() {
        let freqs = RopeConfig::new(8, 10_000.0).unwrap().frequencies();
        let table = RotaryTable::<f32>::new(&freqs, 10, Layout::Interleaved).unwrap();
        let x: Vec<f32> = data(4 * 3 * 8).iter().map(|&v| v as f32).collect();
        let mut a = x.clone();
        table
            .rotate_slice(&mut a, [4, 3, 8], &[1, 2, 3, 9])
            .unwrap();
        // Fortran-order array holding the same logical values: non-contiguous lanes.
        let mut f = Array3::<f32>::zeros((4, 3, 8).f());
        f.assign(&Array3::from_shape_vec((4, 3, 8), x).unwrap());
        table.rotate(f.view_mut(), &[1, 2, 3, 9]).unwrap();
        let c = Array3::from_shape_vec((4, 3, 8), a).unwrap();
        assert_eq!(f, c);
    }

    #[test]
    fn attention_factor_scales_the_rotation() {
        let cfg = RopeConfig::new(8, 10_000.0)
            .unwrap()
            .with_scaling(crate::Scaling::Yarn(crate::Yarn::new(4.0, 16)))
            .unwrap();
        let freqs = cfg.frequencies();
        let table = RotaryTable::<f64>::new(&freqs, 4, Layout::Half).unwrap();
        let mut x = vec![1.0; 8];
        table.rotate_slice(&mut x, [1, 1, 8], &[0]).unwrap();
        assert!(
            x.iter()
                .all(|&v| (v - freqs.attention_factor()).abs() < 1e-15)
        );
    }

    #[test]
    fn relative_position_property() {
        // (R(i) q) . (R(j) k) depends only on i - j.
        let freqs = RopeConfig::new(16, 10_000.0).unwrap().frequencies();
        let table = RotaryTable::<f64>::new(&freqs, 200, Layout::Half).unwrap();
        let q0 = data(16);
        let k0: Vec<f64> = data(32)[16..].to_vec();
        let dot = |i: usize, j: usize| {
            let (mut q, mut k) = (q0.clone(), k0.clone());
            table.rotate_slice(&mut q, [1, 1, 16], &[i]).unwrap();
            table.rotate_slice(&mut k, [1, 1, 16], &[j]).unwrap();
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>()
        };
        assert!((dot(10, 3) - dot(107, 100)).abs() < 1e-12);
        assert!((dot(10, 3) - dot(17, 10)).abs() < 1e-12);
    }

    #[test]
    fn errors_not_panics() {
        let freqs = RopeConfig::new(8, 10_000.0).unwrap().frequencies();
        let table = RotaryTable::<f32>::new(&freqs, 4, Layout::Half).unwrap();
        let mut x = vec![0f32; 2 * 8];
        assert!(matches!(
            table.rotate_slice(&mut x, [2, 1, 8], &[0, 4]),
            Err(RopeError::PositionOutOfTable {
                index: 4,
                len: 4,
                needed: 5
            })
        ));
        assert!(table.rotate_slice(&mut x, [2, 1, 8], &[0]).is_err());
        assert!(table.rotate_slice(&mut x, [2, 2, 8], &[0, 1]).is_err());
        let mut small = vec![0f32; 2 * 6];
        assert!(table.rotate_slice(&mut small, [2, 1, 6], &[0, 1]).is_err());
        assert!(
            table
                .rotate_slice(&mut x, [usize::MAX, 2, 8], &[0, 1])
                .is_err()
        );
        assert!(
            RotaryTable::<f32>::from_positions(&freqs, &[0.0, f64::NAN], Layout::Half).is_err()
        );
        let mut q = Array3::<f32>::ones((2, 1, 8));
        assert!(apply_log_n(q.view_mut(), &[0, 1], 1).is_err());
        assert!(apply_log_n(q.view_mut(), &[0], 8).is_err());
    }

    #[test]
    fn huge_tables_are_typed_errors_not_panics_or_aborts() {
        let freqs = RopeConfig::new(8, 10_000.0).unwrap().frequencies();
        // Past the position limit: refused before anything is allocated.
        for len in [usize::MAX / 2, usize::MAX, (1usize << 32) + 2] {
            let e = RotaryTable::<f32>::new(&freqs, len, Layout::Half).unwrap_err();
            assert!(
                matches!(&e, RopeError::InvalidParameter { value, .. } if *value == len.to_string()),
                "{e}"
            );
        }
        for p in [MAX_POSITION * 2.0, -MAX_POSITION * 2.0, 1e300] {
            assert!(RotaryTable::<f32>::from_positions(&freqs, &[0.0, p], Layout::Half).is_err());
        }
        // The limit itself is a valid position.
        let t = RotaryTable::<f64>::from_positions(
            &freqs,
            &[MAX_POSITION, -MAX_POSITION],
            Layout::Half,
        )
        .unwrap();
        assert_eq!(t.positions(), &[MAX_POSITION, -MAX_POSITION]);
        // Within the limit but larger than any address space (2^47 bytes on x86-64): a
        // typed allocation error naming the size, under any overcommit setting.
        let wide = RopeConfig::new(crate::MAX_HEAD_DIM, 10_000.0)
            .unwrap()
            .frequencies();
        for (len, bytes) in [
            (1_000_000_000usize, 1_000_000_000u128 * 32_768 * 8),
            ((1 << 32) + 1, ((1u128 << 32) + 1) * 32_768 * 8),
        ] {
            match RotaryTable::<f64>::new(&wide, len, Layout::Half) {
                Err(RopeError::Allocation { what, bytes: b }) => {
                    assert_eq!(b, bytes);
                    assert!(what.contains(&len.to_string()), "{what}");
                }
                other => panic!("len {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn log_n_scales_only_past_training() {
        let mut q = Array3::<f64>::ones((3, 1, 2));
        apply_log_n(q.view_mut(), &[0, 15, 255], 16).unwrap();
        assert_eq!(q[[0, 0, 0]], 1.0);
        assert_eq!(q[[1, 0, 1]], 1.0);
        assert!((q[[2, 0, 0]] - 2.0).abs() < 1e-15);
    }
}
