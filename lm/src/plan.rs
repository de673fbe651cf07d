//! Evaluation plans: which [`Attention`] serves which queries of a prefill.
//!
//! A scheme whose frequencies do not depend on the sequence length serves every query
//! with one [`Attention`] ([`Plan::Single`]). A length-dependent scheme (dynamic NTK,
//! LongRoPE) read the way a KV cache would read it changes its frequencies as the
//! sequence grows: query `p` sees the frequencies in force once `p + 1` tokens are
//! cached, and the keys it attends to are rotated with those same frequencies.
//! [`Plan::refreshed`] builds that plan from a [`RefreshPolicy`], in consecutive
//! [`Segment`]s; a forward pass runs one attention call per segment.

use std::ops::Range;

use ndarray::{Array3, ArrayView3, s};
use ropex::attention::{Attention, Kernel};
use ropex::{Frequencies, RefreshPolicy, RopeConfig, TileConfig};

use crate::error::{ModelError, Result, zeros3};
use crate::model::attend_with;

/// A contiguous range of query positions and the attention that serves it. A forward
/// pass attends queries `queries` to every key before `queries.end` under `attention`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Query positions (0-based token indices) served by this segment.
    pub queries: Range<usize>,
    /// Frequencies, layout, map and log-n for these queries (and their keys).
    pub attention: Attention,
}

/// How attention is computed over a sequence: one [`Attention`] for every query, or
/// consecutive [`Segment`]s (length-dependent schemes such as dynamic NTK, whose
/// frequencies change as the sequence grows; each segment's keys are rotated afresh).
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The same attention for every query.
    Single(Attention),
    /// Segments covering `0..T` in order.
    Segments(Vec<Segment>),
}

impl Plan {
    /// The plan a KV cache under `policy` follows over a causal prefill of `len` tokens
    /// of `rope`: query `p` attends with `rope.frequencies_for_len(L)` for
    /// `L = policy.frequency_len(rope.scaling(), p + 1)`, turned into an [`Attention`] by
    /// `attention` (which adds layout, map, log-n).
    ///
    /// Consecutive queries whose attention is equal share one segment (below a scheme's
    /// length threshold every length gives the same frequencies), and a plan of one
    /// segment is [`Plan::Single`], so plans of schemes that coincide compare equal.
    pub fn refreshed(
        rope: &RopeConfig,
        policy: RefreshPolicy,
        len: usize,
        attention: impl Fn(Frequencies) -> Result<Attention>,
    ) -> Result<Plan> {
        if len == 0 {
            return Err(ModelError::Input(
                "a plan needs at least one query position".into(),
            ));
        }
        let mut segments: Vec<Segment> = Vec::new();
        let mut current_len = None;
        for p in 0..len {
            let flen = policy.frequency_len(rope.scaling(), p + 1);
            if current_len != Some(flen) {
                current_len = Some(flen);
                let att = attention(rope.frequencies_for_len(flen))?;
                if segments.last().is_none_or(|s| s.attention != att) {
                    segments.push(Segment {
                        queries: p..p,
                        attention: att,
                    });
                }
            }
            if let Some(last) = segments.last_mut() {
                last.queries.end = p + 1;
            }
        }
        Ok(if segments.len() == 1 {
            Plan::Single(segments.remove(0).attention)
        } else {
            Plan::Segments(segments)
        })
    }

    /// The segments of a sequence of `len` tokens, checked to cover `0..len` in order.
    pub fn segments(&self, len: usize) -> Result<Vec<(Range<usize>, &Attention)>> {
        match self {
            Plan::Single(a) => Ok(vec![(0..len, a)]),
            Plan::Segments(segs) => {
                let mut next = 0;
                let mut out = Vec::with_capacity(segs.len());
                for seg in segs {
                    if seg.queries.start != next || seg.queries.end < seg.queries.start {
                        return Err(ModelError::Input(format!(
                            "plan segments must tile 0..{len} in order; got {:?} after {next}",
                            seg.queries
                        )));
                    }
                    next = seg.queries.end;
                    out.push((seg.queries.clone(), &seg.attention));
                }
                if next != len {
                    return Err(ModelError::Input(format!(
                        "plan segments cover 0..{next}, the sequence has {len} tokens"
                    )));
                }
                Ok(out)
            }
        }
    }

    /// Causal attention of the queries at positions `q_from..T` under this plan, each
    /// segment computed by `kernel` ([`attend_with`]): `q` `[T - q_from, H_q, d]`, `k` / `v`
    /// `[T, H_kv, d]` (unrotated, positions `0..T`); returns `[T - q_from, H_q, d_v]`.
    /// A query of segment `a..b` attends to keys `0..b` under the segment's attention.
    ///
    /// This is the one attention loop of every forward pass in this crate (the tiny
    /// model's and the Llama model's). The output buffer is allocated fallibly.
    pub fn attend(
        &self,
        kernel: Kernel,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
        q_from: usize,
    ) -> Result<Array3<f32>> {
        let (t, (n_q, heads_q, _)) = (k.dim().0, q.dim());
        if q_from.checked_add(n_q) != Some(t) || v.dim().0 != t {
            return Err(ModelError::Input(format!(
                "attention over {t} keys ({} values) got {n_q} queries from position {q_from}; \
                 the queries must be positions {q_from}..{t}",
                v.dim().0
            )));
        }
        let segments = self.segments(t)?;
        let positions: Vec<usize> = (0..t).collect();
        let mut heads = zeros3("attention output", (n_q, heads_q, v.dim().2))?;
        for (range, att) in &segments {
            let start = range.start.max(q_from);
            if start >= range.end {
                continue;
            }
            let rows = s![start - q_from..range.end - q_from, .., ..];
            let out = attend_with(
                kernel,
                att,
                q.slice(rows),
                k.slice(s![..range.end, .., ..]),
                v.slice(s![..range.end, .., ..]),
                &positions[start..range.end],
                &positions[..range.end],
            )?;
            heads.slice_mut(rows).assign(&out);
        }
        Ok(heads)
    }

    /// Score-tile products `Q K^T` ropex's tiled kernel evaluates for one head over a
    /// causal prefill of `len` tokens of head dim `head_dim` under this plan (every piece
    /// of the position map a tile touches counted, tiles the map hides wholly skipped):
    /// the compute cost of the position map, independent of the machine. Read from the kernel's own
    /// [`ropex::TileStats`] on a zero input, with [`TileConfig::DEFAULT`]; they depend
    /// only on positions, map and tile size.
    pub fn tile_products(&self, head_dim: usize, len: usize) -> Result<usize> {
        let pos: Vec<usize> = (0..len).collect();
        let zeros = Array3::<f32>::zeros((len, 1, head_dim));
        let mut products = 0;
        for (q, att) in self.segments(len)? {
            let k = zeros.slice(s![..q.end, .., ..]);
            let (_, stats) = att.tiled_with(
                zeros.slice(s![q.clone(), .., ..]),
                k,
                k,
                &pos[q.clone()],
                &pos[..q.end],
                &TileConfig::DEFAULT,
            )?;
            products += stats.dot_products();
        }
        Ok(products)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ropex::{Layout, PositionMap, Scaling};

    /// Dynamic NTK (L0 = 16) under `PowerOfTwo` over 70 queries: segments end at 16, 32,
    /// 64 and 70, each with the frequencies of its power of two, built here by hand.
    #[test]
    fn refreshed_dynamic_plan_has_one_segment_per_power_of_two() {
        let rope = RopeConfig::new(8, 10_000.0)
            .unwrap()
            .with_scaling(Scaling::dynamic(1.0, 16))
            .unwrap();
        let att = |f: Frequencies| Ok(Attention::new(f, Layout::Half, PositionMap::Rope));
        let plan = Plan::refreshed(&rope, RefreshPolicy::PowerOfTwo, 70, att).unwrap();
        let want: Vec<Segment> = [(0..16, 16), (16..32, 32), (32..64, 64), (64..70, 128)]
            .into_iter()
            .map(|(queries, flen)| Segment {
                queries,
                attention: att(rope.frequencies_for_len(flen)).unwrap(),
            })
            .collect();
        assert_eq!(plan, Plan::Segments(want));
        assert_eq!(plan.segments(70).unwrap().len(), 4);
        assert!(plan.segments(71).is_err());

        // Up to L0 the frequencies do not change: one attention for every query.
        let short = Plan::refreshed(&rope, RefreshPolicy::PowerOfTwo, 16, att).unwrap();
        assert_eq!(
            short,
            Plan::Single(att(rope.frequencies_for_len(16)).unwrap())
        );
        assert!(Plan::refreshed(&rope, RefreshPolicy::PowerOfTwo, 0, att).is_err());
    }

    /// A causal prefill of 128 tokens in 64 x 64 tiles computes the 3 tiles on and below
    /// the diagonal under plain RoPE; with a ReRoPE window of 32 each of them holds
    /// distances on both sides of the band edge (the off-diagonal tile spans 1..=127), so
    /// both pieces are computed on all three: 6.
    #[test]
    fn tile_products_count_the_causal_tiles() {
        let f = RopeConfig::new(8, 10_000.0).unwrap().frequencies();
        let plan = Plan::Single(Attention::new(f, Layout::Half, PositionMap::Rope));
        assert_eq!(plan.tile_products(8, 128).unwrap(), 3);
        let rerope = Attention::new(
            RopeConfig::new(8, 10_000.0).unwrap().frequencies(),
            Layout::Half,
            PositionMap::rerope(32).unwrap(),
        );
        assert_eq!(Plan::Single(rerope).tile_products(8, 128).unwrap(), 6);
    }

    /// A two-segment plan's attention equals, row by row, each segment's own attention
    /// of its queries over the keys before the segment's end (the reference kernel run
    /// directly), also when the queries start inside the first segment; queries that
    /// are not positions `q_from..T` are an error.
    #[test]
    fn attend_runs_each_segment_over_its_prefix() {
        let rope = RopeConfig::new(8, 10_000.0).unwrap();
        let a = Attention::new(rope.frequencies(), Layout::Half, PositionMap::Rope);
        let b = Attention::new(
            rope.frequencies_for_len(64),
            Layout::Half,
            PositionMap::rerope(4).unwrap(),
        );
        let plan = Plan::Segments(vec![
            Segment {
                queries: 0..7,
                attention: a.clone(),
            },
            Segment {
                queries: 7..12,
                attention: b.clone(),
            },
        ]);
        let x = Array3::from_shape_fn((12, 2, 8), |(t, h, i)| {
            (((t * 31 + h * 17 + i * 7) % 23) as f32 - 11.0) / 9.0
        });
        let pos: Vec<usize> = (0..12).collect();
        for q_from in [0, 3] {
            let got = plan
                .attend(
                    Kernel::Reference,
                    x.slice(s![q_from.., .., ..]),
                    x.view(),
                    x.view(),
                    q_from,
                )
                .unwrap();
            for (att, r) in [(&a, q_from..7), (&b, 7..12)] {
                let want = att
                    .reference(
                        x.slice(s![r.clone(), .., ..]),
                        x.slice(s![..r.end, .., ..]),
                        x.slice(s![..r.end, .., ..]),
                        &pos[r.clone()],
                        &pos[..r.end],
                    )
                    .unwrap();
                let g = got.slice(s![r.start - q_from..r.end - q_from, .., ..]);
                for (u, w) in g.iter().zip(&want) {
                    assert!((u - w).abs() < 1e-6);
                }
            }
        }
        assert!(
            plan.attend(
                Kernel::Reference,
                x.view(),
                x.slice(s![..11, .., ..]),
                x.view(),
                0
            )
            .is_err()
        );
    }
}
