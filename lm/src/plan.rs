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

use ndarray::{Array3, s};
use ropex::attention::Attention;
use ropex::{Frequencies, RefreshPolicy, RopeConfig, TileConfig};

use crate::error::{ModelError, Result};

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
}
