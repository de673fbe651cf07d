//! Su's two-pass kernel (`rerope_patch.py`, posts 12-13), the naive baseline: full score
//! matrices per piece, a band select, a causal mask, softmax, times V.
//!
//! Generalised to any map: one full pass per piece `p = (f_p, g_p)`, then the region
//! rule picks a pass per entry. Per query head `h` (kv head `g = h / (H_q / H_kv)`):
//!
//! ```text
//! S_p[i, j] = c_i (R(f_p(i)) q_i) . (R(g_p(j)) k_j)    one full matrix per piece
//! S[i, j]   = S_p[i, j] with p = region(q_pos[i], k_pos[j])   (ReRoPE: near iff |r| < w)
//! O_i       = sum_{j visible} softmax_j(S[i, .]) v_j
//! ```
//!
//! with `c_i = scale * s_i` (logit scale, log-n factor and the map's query factor);
//! visible means causal, not hidden by the map (StreamingLLM) and allowed by the mask.
//! Angles are computed in f64
//! and cast to f32; scores, softmax (row max subtracted) and the weighted sum run in f32.
//! Cost: one `n_q x n_k` score matrix per piece per head, about twice plain attention
//! for two-piece maps and three times for Dual Chunk Attention.
//!
//! Su's defects are fixed here: the band mask is computed from the positions of the
//! `(i, j)` entry itself and applied to every head (his `[batch, q, k]` mask broadcast
//! against `[batch, heads, q, k]` scores lines batch up with heads, so it is right only
//! for batch 1); and no cos/sin table is indexed, so ReRoPE's far query position `w`
//! needs no table of length `max(n, w + 1)`.

use ndarray::Array3;

use super::rotated::{Prepared, axpy, scores_into};
use super::{Attention, check_output};
use crate::error::Result;
use crate::tensor::{Element, View3, View3Mut};

impl Attention {
    /// Two-pass attention (Su's method; see the [module docs](self) for the formula and
    /// [`crate::attention`] for inputs and semantics). Allocates `n_q x n_k` scores per
    /// piece per head: use [`Attention::tiled`] for long sequences.
    ///
    /// ```
    /// use ndarray::Array3;
    /// use ropex::{attention::Attention, Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(2)?);
    /// let q = Array3::<f32>::from_elem((5, 2, 8), 0.1);
    /// let kv = Array3::<f32>::from_elem((5, 1, 8), 0.2);
    /// let pos = [0, 1, 2, 3, 4];
    /// let fast = att.two_pass(q.view(), kv.view(), kv.view(), &pos, &pos)?;
    /// let slow = att.reference(q.view(), kv.view(), kv.view(), &pos, &pos)?;
    /// assert!((&fast - &slow).iter().all(|e| e.abs() < 1e-5));
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn two_pass<'a, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Array3<T>> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let mut out = self.output_for(&q, &k, &v, q_pos, k_pos)?;
        self.two_pass_into(q, k, v, q_pos, k_pos, &mut out)?;
        Ok(out)
    }

    /// [`Attention::two_pass`] writing into `out` (`[n_q, H_q, d_v]`, any strides).
    pub fn two_pass_into<'a, 'o, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        out: impl Into<View3Mut<'o, T>>,
    ) -> Result<()> {
        let prep = self.prepare(q.into(), k.into(), v.into(), q_pos, k_pos)?;
        let dims = prep.dims;
        let mut out = out.into();
        check_output(&dims, &out)?;
        let run = |h: usize| self.two_pass_head(&prep, h, q_pos, k_pos);
        let heads = self.par_run((0..dims.heads_q).collect(), run);
        let dv = dims.value_dim;
        let mut out = out.as_ndarray();
        for (h, head) in heads.iter().enumerate() {
            for i in 0..dims.n_q {
                for (o, &x) in out
                    .slice_mut(ndarray::s![i, h, ..])
                    .iter_mut()
                    .zip(&head[i * dv..(i + 1) * dv])
                {
                    *o = T::from_f32(x);
                }
            }
        }
        Ok(())
    }

    /// One query head: returns its `[n_q, d_v]` output.
    fn two_pass_head(
        &self,
        prep: &Prepared,
        h: usize,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Vec<f32> {
        let dims = prep.dims;
        let (n_q, n_k, d, dv) = (dims.n_q, dims.n_k, dims.head_dim, dims.value_dim);
        let g = h / dims.group();
        // One full score matrix per piece.
        let scores: Vec<Vec<f32>> = prep
            .q
            .iter()
            .zip(&prep.key_of)
            .map(|(q, &key)| {
                let mut s = vec![0f32; n_q * n_k];
                scores_into(q.rows(h, 0..n_q), prep.k[key].rows(g, 0..n_k), d, &mut s);
                s
            })
            .collect();
        let mut out = vec![0f32; n_q * dv];
        let mut row = vec![0f32; n_k];
        let mut visible = vec![false; n_k];
        for (i, &qp) in q_pos.iter().enumerate() {
            // Region select, entry by entry from the entry's own positions.
            for (j, &kp) in k_pos.iter().enumerate() {
                let piece = self.entry(&prep.pieces, qp, kp);
                visible[j] = piece.is_some();
                if let Some(p) = piece {
                    row[j] = scores[p][i * n_k + j];
                }
            }
            let visible = |j: usize| visible[j]; // this row's visibility
            // Softmax over the visible keys, row max subtracted (NaN-ignoring max: a NaN
            // score still poisons the row through exp and the sum, as it should).
            let max = (0..n_k)
                .filter(|&j| visible(j))
                .fold(None, |m: Option<f32>, j| {
                    Some(m.map_or(row[j], |m| m.max(row[j])))
                });
            let Some(max) = max else {
                continue; // no visible key: zero row
            };
            let max = if max == f32::NEG_INFINITY { 0.0 } else { max };
            let mut denom = 0f32;
            let o = &mut out[i * dv..(i + 1) * dv];
            for j in (0..n_k).filter(|&j| visible(j)) {
                let p = (row[j] - max).exp();
                denom += p;
                // Masked keys are never multiplied: a NaN in v_j stays out of rows that
                // cannot see j.
                axpy(o, p, prep.v.row(g, j));
            }
            for x in o.iter_mut() {
                *x /= denom;
            }
        }
        out
    }
}
