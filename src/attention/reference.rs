//! The explicit reference kernel: every `(i, j)` pair rotated by its own `P(i, j)`,
//! everything in f64. Slow (`O(n_q n_k d)` trigonometry) and obviously right: the
//! oracle for every other kernel. Inputs of any [`Element`] type are widened to f64
//! (exactly); the result is rounded to f32, then stored in the output's type.

use ndarray::Array3;

use super::{Attention, check_output};
use crate::error::Result;
use crate::tensor::{Element, View3, View3Mut};

impl Attention {
    /// Reference attention (see [`crate::attention`] for inputs and semantics).
    ///
    /// For each query `i`, head `h` and visible key `j`: rotate `q_i` by `P(i, j)` in f64
    /// and dot it with the unrotated `k_j` (the score of plain RoPE at relative position
    /// `P`), scale, softmax in f64 with the row maximum subtracted, and sum `v_j`.
    pub fn reference<'a, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Array3<T>> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let mut out = self.output_for(&q, &k, &v, q_pos, k_pos)?;
        self.reference_into(q, k, v, q_pos, k_pos, &mut out)?;
        Ok(out)
    }

    /// [`Attention::reference`] writing into `out` (`[n_q, H_q, d_v]`, any strides).
    pub fn reference_into<'a, 'o, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        out: impl Into<View3Mut<'o, T>>,
    ) -> Result<()> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let dims = self.validate(&q, &k, &v, q_pos, k_pos)?;
        let mut out = out.into();
        check_output(&dims, &out)?;
        let mut out = out.as_ndarray();
        out.fill(T::default());
        let (q, k, v) = (q.as_ndarray(), k.as_ndarray(), v.as_ndarray());
        let wide = |x: T| x.to_f32() as f64;
        let scale = self.scale_for(dims.head_dim) * self.length_factor(dims.n_k);
        let inv = self.frequencies().inv_freq();
        let d_rot = self.frequencies().rotary_dim();
        let mut rotated = vec![0f64; dims.head_dim];
        let mut scores = vec![0f64; dims.n_k];
        for (i, &qp) in q_pos.iter().enumerate() {
            let qf = self.query_factor(qp);
            let visible: Vec<usize> = (0..dims.n_k)
                .filter(|&j| self.visible(qp, k_pos[j]))
                .collect();
            if visible.is_empty() {
                continue; // no key to attend to: zero row
            }
            for h in 0..dims.heads_q {
                let kvh = h / dims.group();
                for &j in &visible {
                    let p = self.map().position(qp, k_pos[j]);
                    for (x, r) in rotated.iter_mut().enumerate() {
                        *r = wide(q[[i, h, x]]);
                    }
                    for (pair, w) in inv.iter().enumerate() {
                        let (a, b) = self.layout().pair_dims(pair, d_rot);
                        let (s, c) = (p * w).sin_cos();
                        let (xa, xb) = (rotated[a], rotated[b]);
                        rotated[a] = xa * c - xb * s;
                        rotated[b] = xb * c + xa * s;
                    }
                    let dot: f64 = (0..dims.head_dim)
                        .map(|x| rotated[x] * wide(k[[j, kvh, x]]))
                        .sum();
                    scores[j] = dot * scale * qf;
                }
                // NaN anywhere in the row makes the row NaN, as it should.
                let max = visible
                    .iter()
                    .map(|&j| scores[j])
                    .fold(f64::NEG_INFINITY, |m, s| {
                        if s.is_nan() || m.is_nan() {
                            f64::NAN
                        } else {
                            m.max(s)
                        }
                    });
                let mut denom = 0.0;
                for &j in &visible {
                    scores[j] = (scores[j] - max).exp();
                    denom += scores[j];
                }
                for x in 0..dims.value_dim {
                    let acc: f64 = visible
                        .iter()
                        .map(|&j| scores[j] * wide(v[[j, kvh, x]]))
                        .sum();
                    out[[i, h, x]] = T::from_f32((acc / denom) as f32);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Layout, PositionMap, RopeConfig, RotaryTable};
    use ndarray::Array3;

    fn rand3(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
        let mut s = seed;
        Array3::from_shape_fn(shape, |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
    }

    /// Under plain RoPE the oracle must equal "rotate q by i and k by j, then ordinary
    /// softmax attention": an independent computation through `RotaryTable`.
    #[test]
    fn rope_map_equals_rotate_then_attend() {
        let (n, hq, hkv, d) = (9, 4, 2, 8);
        let cfg = RopeConfig::new(d, 10_000.0).unwrap();
        let freqs = cfg.frequencies();
        for layout in [Layout::Half, Layout::Interleaved] {
            let q = rand3((n, hq, d), 1);
            let k = rand3((n, hkv, d), 2);
            let v = rand3((n, hkv, d), 3);
            let pos: Vec<usize> = (0..n).map(|p| p + 3).collect();
            let att = Attention::new(freqs.clone(), layout, PositionMap::Rope);
            let got = att
                .reference(q.view(), k.view(), v.view(), &pos, &pos)
                .unwrap();

            let table = RotaryTable::<f64>::new(&freqs, 20, layout).unwrap();
            let mut qr = q.mapv(|x| x as f64);
            let mut kr = k.mapv(|x| x as f64);
            table.rotate(qr.view_mut(), &pos).unwrap();
            table.rotate(kr.view_mut(), &pos).unwrap();
            for i in 0..n {
                for h in 0..hq {
                    let kvh = h / 2;
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d).map(|x| qr[[i, h, x]] * kr[[j, kvh, x]]).sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..d {
                        let o: f64 = (0..=i).map(|j| e[j] * v[[j, kvh, x]] as f64).sum::<f64>() / z;
                        assert!((o - got[[i, h, x]] as f64).abs() < 1e-6);
                    }
                }
            }
        }
    }

    #[test]
    fn huge_logits_stay_finite_and_nan_stays_local() {
        let freqs = RopeConfig::new(4, 10_000.0).unwrap().frequencies();
        let att = Attention::new(freqs, Layout::Half, PositionMap::Rope);
        let q = Array3::<f32>::from_elem((3, 1, 4), 100.0);
        let mut k = Array3::<f32>::from_elem((3, 1, 4), 100.0);
        let v = rand3((3, 1, 4), 4);
        let pos = [0, 1, 2];
        let out = att
            .reference(q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
        k[[2, 0, 1]] = f32::NAN;
        let out = att
            .reference(q.view(), k.view(), v.view(), &pos, &pos)
            .unwrap();
        assert!(
            out.slice(ndarray::s![..2, .., ..])
                .iter()
                .all(|x| x.is_finite())
        );
        assert!(out.slice(ndarray::s![2, .., ..]).iter().all(|x| x.is_nan()));
    }

    #[test]
    fn shape_errors() {
        let freqs = RopeConfig::new(4, 10_000.0).unwrap().frequencies();
        let att = Attention::new(freqs, Layout::Half, PositionMap::Rope);
        let q = Array3::<f32>::zeros((2, 3, 4));
        let k = Array3::<f32>::zeros((2, 2, 4));
        let pos = [0, 1];
        assert!(
            att.reference(q.view(), k.view(), k.view(), &pos, &pos)
                .is_err()
        );
        let k = Array3::<f32>::zeros((2, 1, 4));
        assert!(
            att.reference(q.view(), k.view(), k.view(), &pos, &[0])
                .is_err()
        );
        assert!(
            att.reference(q.view(), k.view(), k.view(), &[0], &pos)
                .is_err()
        );
        let k2 = Array3::<f32>::zeros((2, 1, 2));
        assert!(
            att.reference(q.view(), k2.view(), k2.view(), &pos, &pos)
                .is_err()
        );
        let bad = Attention::new(
            RopeConfig::new(4, 10_000.0).unwrap().frequencies(),
            Layout::Half,
            PositionMap::ReRope { window: 0 },
        );
        assert!(
            bad.reference(q.view(), k.view(), k.view(), &pos, &pos)
                .is_err()
        );
    }
}
