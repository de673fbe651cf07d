//! [`KvCacheRerotating`]: Su's re-rotating decode, the baseline.

use ndarray::{Array3, ArrayView3};

use super::shared::{CacheShape, Core, Trig, load_row, per_head, put_row};
use super::step::{KeySource, Rows, softmax_times_values};
use super::{DecodeCache, RefreshPolicy, append_then_attend};
use crate::RopeConfig;
use crate::attention::Attention;
use crate::attention::kernels::Kernels;
use crate::attention::rotated::dot;
use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::PositionMap;
use crate::rotary::Layout;

/// Su's decode (`bojone/rerope`), the baseline: caches raw keys and, at every step,
/// rotates every visible cached key by `-P(i, j)` and dots it with the unrotated query:
/// `score_ij = scale * s_i * q_i . R(-P(i, j)) k_j` (`= (R(P) q_i) . k_j`).
///
/// `O(n d)` trigonometry and rotation per query, against [`super::KvCache`]'s `O(d)`. Same
/// inputs, outputs, errors, frequencies ([`RefreshPolicy`]: nothing needs re-rotating,
/// the frequencies in force are simply used at the next step) and memory
/// `4 H_kv n (d + d_v)`.
///
/// ```
/// use ndarray::Array3;
/// use ropex::{Layout, PositionMap, RopeConfig};
/// use ropex::attention::decode::{DecodeCache, KvCache, KvCacheRerotating};
/// let cfg = RopeConfig::new(8, 10_000.0)?;
/// let map = PositionMap::rerope(3)?;
/// let mut su = KvCacheRerotating::new(cfg.clone(), Layout::Half, map, ropex::CacheShape::square(1, 8))?;
/// let mut ours = KvCache::new(cfg, Layout::Half, map, ropex::CacheShape::square(1, 8))?;
/// let x = Array3::<f32>::from_shape_fn((9, 1, 8), |(t, _, i)| ((t * 3 + i) % 7) as f32 / 7.0);
/// let a = su.prefill_chunk(x.view(), x.view(), x.view())?;
/// let b = ours.prefill_chunk(x.view(), x.view(), x.view())?;
/// assert!((&a - &b).iter().all(|e| e.abs() < 1e-5));
/// # Ok::<(), ropex::RopeError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheRerotating {
    core: Core,
    /// Per kv head, `[len, head_dim]`: raw `k_j`.
    keys: Vec<Vec<f32>>,
    /// Per kv head, `[len, value_dim]`.
    values: Vec<Vec<f32>>,
}

/// The values of kv head `g` (the keys are rotated per query, not read as runs).
struct Values<'a> {
    values: &'a [f32],
    dv: usize,
}

impl KeySource<f32> for Values<'_> {
    fn keys(&self, _: usize, _: usize, _: usize, _: &mut dyn FnMut(Rows<'_, f32>, usize)) {}

    fn values(&self, lo: usize, hi: usize, f: &mut dyn FnMut(&[f32], usize)) {
        f(&self.values[lo * self.dv..hi * self.dv], lo);
    }
}

impl KvCacheRerotating {
    /// An empty cache; arguments and defaults as in [`super::KvCache::new`].
    pub fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        shape: CacheShape,
    ) -> Result<Self> {
        let core = Core::new(config, layout, map, shape)?;
        let heads_kv = shape.heads_kv;
        Ok(KvCacheRerotating {
            core,
            keys: per_head(heads_kv)?,
            values: per_head(heads_kv)?,
        })
    }

    /// Overrides the logit scale (default `m^2 / sqrt(head_dim)`); finite and `> 0`.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        self.core.set_scale(scale)?;
        Ok(self)
    }

    /// Adds a sliding-window and/or chunked mask (see [`super::KvCache::with_mask`]).
    pub fn with_mask(mut self, mask: crate::attention::Mask) -> Result<Self> {
        self.core.set_mask(mask, false)?;
        Ok(self)
    }

    /// DCA's logit scale (see [`super::KvCache::with_dca_logit_scale`]).
    pub fn with_dca_logit_scale(mut self, train_len: usize) -> Result<Self> {
        self.core.set_dca_logit_scale(train_len)?;
        Ok(self)
    }

    /// Log-n query scaling with `train_len >= 2` (see [`super::KvCache::with_log_n`]).
    pub fn with_log_n(mut self, train_len: usize) -> Result<Self> {
        self.core.set_log_n(train_len)?;
        Ok(self)
    }

    /// Sets the refresh policy (which frequencies are in force; see [`RefreshPolicy`]).
    pub fn with_refresh_policy(mut self, policy: RefreshPolicy) -> Self {
        self.core.policy = policy;
        if let Some(f) = self.core.frequencies_at(self.core.len) {
            self.core.freqs = f;
        }
        self
    }

    /// Number of cached tokens `n`.
    pub fn len(&self) -> usize {
        self.core.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.core.len == 0
    }

    /// Bytes of cached data: `4 H_kv n (d + d_v)`.
    pub fn memory_bytes(&self) -> usize {
        let floats: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        floats * std::mem::size_of::<f32>()
    }

    /// The frequencies in force.
    pub fn frequencies(&self) -> &Frequencies {
        &self.core.freqs
    }

    /// The [`Attention`] this cache computes now (see [`super::KvCache::attention`]).
    pub fn attention(&self) -> Attention {
        self.core.attention()
    }

    /// Appends raw keys `[c, H_kv, head_dim]` and values `[c, H_kv, value_dim]`, then
    /// puts in force the frequencies for the new length.
    pub fn append(&mut self, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()> {
        let c = self.core.check_kv(&k, &v)?;
        if c == 0 {
            return Ok(());
        }
        let (d, dv) = (self.core.head_dim, self.core.value_dim);
        let mut lane = vec![0f32; d.max(dv)];
        for t in 0..c {
            let slot = self.core.len + t;
            for g in 0..self.core.heads_kv {
                load_row(&k, t, g, &mut lane[..d]);
                put_row(&mut self.keys[g], slot, &lane[..d]);
                load_row(&v, t, g, &mut lane[..dv]);
                put_row(&mut self.values[g], slot, &lane[..dv]);
            }
        }
        self.core.len += c;
        if let Some(f) = self.core.frequencies_at(self.core.len) {
            self.core.freqs = f;
        }
        Ok(())
    }

    /// Attends queries at positions `q_pos` (each `< len()`), rotating every visible
    /// cached key by `-P(i, j)` (see the type docs); errors as [`super::KvCache::attend`].
    pub fn attend(&self, q: ArrayView3<f32>, q_pos: &[usize]) -> Result<Array3<f32>> {
        let group = self.core.check_queries(&q, q_pos)?;
        let (n_q, heads_q, d) = q.dim();
        let dv = self.core.value_dim;
        let hkv = self.core.heads_kv;
        let mut out = Array3::<f32>::zeros((n_q, heads_q, dv));
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq();
        let mut trig = Trig::new(inv.len());
        let mut qs = vec![0f32; heads_q * d];
        let mut key = vec![0f32; d];
        let mut scores = Vec::new();
        let mut acc = vec![0f32; group * dv];
        let mut denoms = Vec::new();
        let kern = Kernels::active();
        let out_slice = out
            .as_slice_mut()
            .ok_or_else(|| RopeError::invalid("output", "non-contiguous", "internal"))?;
        for (a, &i) in q_pos.iter().enumerate() {
            let factor = self.core.query_factor(i, self.core.len);
            for (dst, &src) in qs.iter_mut().zip(q.slice(ndarray::s![a, .., ..]).iter()) {
                *dst = src * factor;
            }
            let n = i + 1;
            scores.clear();
            scores.resize(hkv * group * n, 0f32);
            for j in 0..n {
                if !self.core.map.sees(i, j) || !self.core.mask.allows(i, j) {
                    // A key the map (StreamingLLM) or the mask hides: no weight.
                    for g in 0..hkv * group {
                        scores[g * n + j] = f32::NEG_INFINITY;
                    }
                    continue;
                }
                trig.set(inv, -self.core.map.position(i, j));
                for (g, keys) in self.keys.iter().enumerate() {
                    key.copy_from_slice(&keys[j * d..(j + 1) * d]);
                    trig.rotate(&mut key, layout);
                    for (r, qh) in qs[g * group * d..(g + 1) * group * d]
                        .chunks_exact(d)
                        .enumerate()
                    {
                        scores[(g * group + r) * n + j] = dot(qh, &key);
                    }
                }
            }
            for g in 0..hkv {
                let rows = &mut scores[g * group * n..(g + 1) * group * n];
                let values = Values {
                    values: &self.values[g],
                    dv,
                };
                softmax_times_values(kern, rows, n, &values, 0, dv, &mut acc, &mut denoms);
                let at = (a * heads_q + g * group) * dv;
                out_slice[at..at + group * dv].copy_from_slice(&acc);
            }
        }
        Ok(out)
    }

    /// Chunked prefill: append, then attend the chunk's queries at their own positions.
    /// On error the cache is unchanged.
    pub fn prefill_chunk(
        &mut self,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>> {
        let c = self.core.check_chunk(self.core.len, &q, &k, &v)?;
        let start = self.core.len;
        append_then_attend(
            self,
            start,
            c,
            |me| me.append(k, v),
            |me, pos| me.attend(q, pos),
        )
    }
}

impl DecodeCache for KvCacheRerotating {
    fn append(&mut self, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()> {
        KvCacheRerotating::append(self, k, v)
    }
    fn attend(&self, q: ArrayView3<f32>, q_pos: &[usize]) -> Result<Array3<f32>> {
        KvCacheRerotating::attend(self, q, q_pos)
    }
    fn prefill_chunk(
        &mut self,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>> {
        KvCacheRerotating::prefill_chunk(self, q, k, v)
    }
    fn len(&self) -> usize {
        KvCacheRerotating::len(self)
    }
    fn memory_bytes(&self) -> usize {
        KvCacheRerotating::memory_bytes(self)
    }
}
