//! What both caches share: the description and the values ([`Core`]), per-position
//! trigonometry, row copies, and the softmax-times-values step.

use ndarray::{ArrayView3, s};

use super::RefreshPolicy;
use crate::RopeConfig;
use crate::attention::kernels::{Bf16Kernels, Kernels, is_bf16};
use crate::attention::{Attention, Bf16Products, Mask};
use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::PositionMap;
use crate::rotary::{Layout, log_n_scale, rotate_lane_with};
use crate::tensor::Element;

/// cos/sin of `p * inv_freq_j` for one position, computed in f64 and cast to f32. No
/// attention factor: the cache puts `m^2` into the logit scale, as
/// [`Attention::scale_for`] does.
#[derive(Debug, Clone)]
pub(super) struct Trig {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

impl Trig {
    pub(super) fn new(pairs: usize) -> Self {
        Trig {
            cos: vec![0.0; pairs],
            sin: vec![0.0; pairs],
        }
    }

    pub(super) fn set(&mut self, inv_freq: &[f64], position: f64) {
        crate::rotary::trig::cos_sin_into(inv_freq, position, 1.0, &mut self.cos, &mut self.sin);
    }

    pub(super) fn resize(&mut self, pairs: usize) {
        self.cos.resize(pairs, 0.0);
        self.sin.resize(pairs, 0.0);
    }

    pub(super) fn rotate(&self, lane: &mut [f32], layout: Layout) {
        rotate_lane_with(lane, &self.cos, &self.sin, layout);
    }
}

/// Widens row `(t, g)` of `x` (`[c, H, w]`) into `lane` (`w` long).
pub(super) fn load_row<T: Element>(x: &ArrayView3<T>, t: usize, g: usize, lane: &mut [f32]) {
    let row = x.slice(s![t, g, ..]);
    match row.as_slice() {
        Some(r) => T::load_slice(r, lane),
        None => {
            for (dst, src) in lane.iter_mut().zip(row.iter()) {
                *dst = src.to_f32();
            }
        }
    }
}

/// Stores `lane` rounded to `S` into slot `slot` of `buf` (rows `lane.len()` wide),
/// growing `buf` by one row when `slot` is its next row.
pub(super) fn put_row<S: Element>(buf: &mut Vec<S>, slot: usize, lane: &[f32]) {
    let w = lane.len();
    if buf.len() == slot * w {
        let at = buf.len();
        buf.resize(at + w, S::default());
    }
    S::store_slice(lane, &mut buf[slot * w..(slot + 1) * w]);
}

use crate::limits::{MAX_HEAD_DIM, MAX_HEADS};

/// The shape of a decode cache's per-token keys and values, by name so that the three
/// sizes cannot be swapped: `heads_kv` key/value heads (`1..=`[`MAX_HEADS`]), keys of
/// `head_dim` dims (`>=` the rotary dim; dims past it pass through) and values of
/// `value_dim` dims (both `<=` [`MAX_HEAD_DIM`]).
///
/// ```
/// use ropex::CacheShape;
/// let shape = CacheShape { heads_kv: 8, head_dim: 128, value_dim: 128 };
/// assert_eq!(shape, CacheShape::square(8, 128));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheShape {
    /// Key/value heads (query heads are a multiple of it under GQA).
    pub heads_kv: usize,
    /// Key head dim.
    pub head_dim: usize,
    /// Value head dim.
    pub value_dim: usize,
}

impl CacheShape {
    /// `heads_kv` heads whose keys and values both have `head_dim` dims.
    pub fn square(heads_kv: usize, head_dim: usize) -> Self {
        CacheShape {
            heads_kv,
            head_dim,
            value_dim: head_dim,
        }
    }
}

/// One empty buffer per kv head, allocated fallibly.
pub(super) fn per_head<S>(heads: usize) -> Result<Vec<Vec<S>>> {
    let mut v = Vec::new();
    v.try_reserve_exact(heads).map_err(|_| {
        RopeError::invalid("heads_kv", heads, "could not allocate one buffer per head")
    })?;
    v.resize_with(heads, Vec::new);
    Ok(v)
}

/// State shared by both caches: the description, the frequencies in force, the values.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Core {
    pub(super) config: RopeConfig,
    pub(super) layout: Layout,
    pub(super) map: PositionMap,
    pub(super) heads_kv: usize,
    pub(super) head_dim: usize,
    pub(super) value_dim: usize,
    pub(super) scale: Option<f64>,
    pub(super) log_n_train_len: Option<usize>,
    pub(super) dca_train_len: Option<usize>,
    pub(super) mask: Mask,
    /// Whether a bf16 cache scores with bf16 products (the queries rounded to bf16).
    pub(super) bf16_products: Bf16Products,
    pub(super) policy: RefreshPolicy,
    /// The frequencies every cached rotated key is currently rotated with.
    pub(super) freqs: Frequencies,
    /// The length `L` that selected `freqs`.
    pub(super) freq_len: usize,
    pub(super) refreshes: usize,
    pub(super) len: usize,
}

impl Core {
    pub(super) fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        shape: CacheShape,
    ) -> Result<Self> {
        let CacheShape {
            heads_kv,
            head_dim,
            value_dim,
        } = shape;
        map.validate()?;
        if !(1..=MAX_HEADS).contains(&heads_kv) {
            return Err(RopeError::invalid(
                "heads_kv",
                heads_kv,
                format!("must be in 1..={MAX_HEADS}"),
            ));
        }
        for (field, dim) in [("head_dim", head_dim), ("value_dim", value_dim)] {
            if dim > MAX_HEAD_DIM {
                return Err(RopeError::invalid(
                    field,
                    dim,
                    format!("must be <= {MAX_HEAD_DIM}"),
                ));
            }
        }
        if head_dim < config.rotary_dim() {
            return Err(RopeError::shape(
                "head_dim",
                format!(">= rotary_dim ({})", config.rotary_dim()),
                head_dim,
            ));
        }
        let policy = RefreshPolicy::default();
        let freq_len = policy.frequency_len(config.scaling(), 0);
        let freqs = config.frequencies_for_len(freq_len);
        Ok(Core {
            config,
            layout,
            map,
            heads_kv,
            head_dim,
            value_dim,
            scale: None,
            log_n_train_len: None,
            dca_train_len: None,
            mask: Mask::NONE,
            bf16_products: Bf16Products::Auto,
            policy,
            freqs,
            freq_len,
            refreshes: 0,
            len: 0,
        })
    }

    // The options are validated by their one definition in `Attention`.

    pub(super) fn set_scale(&mut self, scale: f64) -> Result<()> {
        self.attention().with_scale(scale)?;
        self.scale = Some(scale);
        Ok(())
    }

    pub(super) fn set_dca_logit_scale(&mut self, train_len: usize) -> Result<()> {
        self.attention().with_dca_logit_scale(train_len)?;
        self.dca_train_len = Some(train_len);
        Ok(())
    }

    /// Sets the mask (validated by [`Attention::with_mask`]); an evicting cache keeps no
    /// keys a mask could hide beyond its own window, so it refuses one.
    pub(super) fn set_mask(&mut self, mask: Mask, evicting: bool) -> Result<()> {
        if evicting && mask != Mask::NONE {
            return Err(RopeError::invalid(
                "mask",
                format!("{mask:?}"),
                "a StreamingLLM cache takes no extra mask (its window already bounds it)",
            ));
        }
        self.attention().with_mask(mask)?;
        self.mask = mask;
        Ok(())
    }

    /// The first key position the mask lets a query at position `i` see (the visible
    /// keys of a causal query under a sliding window or chunked mask are a suffix
    /// `lo..=i`).
    pub(super) fn first_visible(&self, i: usize) -> usize {
        let window = self
            .mask
            .sliding_window()
            .map_or(0, |w| (i + 1).saturating_sub(w));
        let chunk = self.mask.chunk().map_or(0, |c| i / c * c);
        window.max(chunk)
    }

    pub(super) fn set_log_n(&mut self, train_len: usize) -> Result<()> {
        self.attention().with_log_n(train_len)?;
        self.log_n_train_len = Some(train_len);
        Ok(())
    }

    /// The frequencies that must be in force at cache length `len`, if they differ from
    /// the current ones; updates the selecting length either way.
    pub(super) fn frequencies_at(&mut self, len: usize) -> Option<Frequencies> {
        let scaling = self.config.scaling();
        if !scaling.is_length_dependent() {
            return None;
        }
        let l = self.policy.frequency_len(scaling, len);
        if l == self.freq_len {
            return None;
        }
        self.freq_len = l;
        let f = self.config.frequencies_for_len(l);
        (f != self.freqs).then_some(f)
    }

    /// The description of the attention the cache computes right now.
    pub(super) fn attention(&self) -> Attention {
        Attention {
            freqs: self.freqs.clone(),
            layout: self.layout,
            map: self.map,
            causal: true,
            scale: self.scale,
            log_n_train_len: self.log_n_train_len,
            dca_train_len: self.dca_train_len,
            mask: self.mask,
            parallel: true,
            bf16_products: self.bf16_products,
        }
    }

    /// The bf16 kernels a decode step of a cache storing `S` scores with: `S` is bf16, the
    /// head dim even (a stored row is then whole pairs) and `bf16_products` applies.
    pub(super) fn decode_bf16<S: Element>(&self, kern: Kernels) -> Option<Bf16Kernels> {
        if !is_bf16::<S>() || !self.head_dim.is_multiple_of(2) {
            return None;
        }
        self.bf16_products.kernels(kern)
    }

    /// `scale * s_i` for a query at `position` of a sequence of `len` cached tokens.
    pub(super) fn query_factor(&self, position: usize, len: usize) -> f32 {
        let scale = crate::attention::logit_scale(&self.freqs, self.scale, self.head_dim)
            * self
                .dca_train_len
                .map_or(1.0, |l| crate::attention::dca_logit_factor(len, l));
        let s = self
            .log_n_train_len
            .map_or(1.0, |l| log_n_scale(position, l))
            * self.map.query_scale(position);
        (scale * s) as f32
    }

    /// Checks a chunk of keys and values; returns its length.
    pub(super) fn check_kv<T, U>(&self, k: &ArrayView3<T>, v: &ArrayView3<U>) -> Result<usize> {
        self.check_kv_at(self.len, k, v)
    }

    /// [`Core::check_kv`] for a sequence of `len` cached tokens.
    pub(super) fn check_kv_at<T, U>(
        &self,
        len: usize,
        k: &ArrayView3<T>,
        v: &ArrayView3<U>,
    ) -> Result<usize> {
        let (c, hk, d) = k.dim();
        if (hk, d) != (self.heads_kv, self.head_dim) {
            return Err(RopeError::shape(
                "k [c, H_kv, head_dim]",
                format!("[_, {}, {}]", self.heads_kv, self.head_dim),
                format!("[{c}, {hk}, {d}]"),
            ));
        }
        let (cv, hv, dv) = v.dim();
        if (cv, hv, dv) != (c, self.heads_kv, self.value_dim) {
            return Err(RopeError::shape(
                "v [c, H_kv, value_dim]",
                format!("[{c}, {}, {}]", self.heads_kv, self.value_dim),
                format!("[{cv}, {hv}, {dv}]"),
            ));
        }
        if len
            .checked_add(c)
            .is_none_or(|n| n > crate::limits::MAX_POSITION)
        {
            return Err(RopeError::invalid(
                "cache length",
                format!("{len} + {c}"),
                format!(
                    "must stay <= {} (ropex::limits::MAX_POSITION)",
                    crate::limits::MAX_POSITION
                ),
            ));
        }
        Ok(c)
    }

    /// Checks the shape of queries against `n_q` positions; returns the GQA group size.
    pub(super) fn check_q_shape<T>(&self, q: &ArrayView3<T>, n_pos: usize) -> Result<usize> {
        let (n_q, hq, d) = q.dim();
        if d != self.head_dim {
            return Err(RopeError::shape("q head_dim", self.head_dim, d));
        }
        if hq == 0 || hq % self.heads_kv != 0 {
            return Err(RopeError::shape(
                "query heads H_q",
                format!(
                    "a non-zero multiple of the key/value heads H_kv = {}",
                    self.heads_kv
                ),
                hq,
            ));
        }
        if n_pos != n_q {
            return Err(RopeError::shape(
                "q_pos",
                format!("one per query ({n_q})"),
                n_pos,
            ));
        }
        Ok(hq / self.heads_kv)
    }

    /// Checks a prefill chunk: keys, values and one query per token; returns its length.
    pub(super) fn check_chunk<T, U, W>(
        &self,
        len: usize,
        q: &ArrayView3<T>,
        k: &ArrayView3<U>,
        v: &ArrayView3<W>,
    ) -> Result<usize> {
        let c = self.check_kv_at(len, k, v)?;
        if q.dim().0 != c {
            return Err(RopeError::shape(
                "q [c, H_q, head_dim] of a prefill chunk",
                format!("one query per appended token ({c})"),
                q.dim().0,
            ));
        }
        self.check_q_shape(q, c)?;
        Ok(c)
    }

    /// Checks queries and their positions (each `< len`); returns the GQA group size.
    pub(super) fn check_queries<T>(&self, q: &ArrayView3<T>, q_pos: &[usize]) -> Result<usize> {
        self.check_queries_at(self.len, q, q_pos)
    }

    /// [`Core::check_queries`] for a sequence of `len` cached tokens.
    pub(super) fn check_queries_at<T>(
        &self,
        len: usize,
        q: &ArrayView3<T>,
        q_pos: &[usize],
    ) -> Result<usize> {
        let group = self.check_q_shape(q, q_pos.len())?;
        if let Some((a, &p)) = q_pos.iter().enumerate().find(|(_, p)| **p >= len) {
            return Err(RopeError::invalid(
                format!("q_pos[{a}]"),
                p,
                format!(
                    "must be < the cache length {len} (a query attends to cached keys at positions <= its own; append its key first)"
                ),
            ));
        }
        Ok(group)
    }

    /// Checks an output view `[n_q, H_q, value_dim]` for `n_q` queries of `heads_q` heads.
    pub(super) fn check_out(&self, dims: [usize; 3], n_q: usize, heads_q: usize) -> Result<()> {
        let want = [n_q, heads_q, self.value_dim];
        if dims != want {
            return Err(RopeError::shape(
                "output [n_q, H_q, value_dim]",
                format!("{want:?}"),
                format!("{dims:?}"),
            ));
        }
        Ok(())
    }
}

/// Stores `acc` (`[group, d_v]`) rounded to `O` into heads `h0..` of token `a` of `out`.
pub(super) fn store_group<O: Element>(
    out: &mut ndarray::ArrayViewMut3<O>,
    a: usize,
    h0: usize,
    acc: &[f32],
) {
    let dv = out.dim().2;
    for (r, row) in acc.chunks_exact(dv.max(1)).enumerate() {
        for (dst, &x) in out.slice_mut(s![a, h0 + r, ..]).iter_mut().zip(row) {
            *dst = O::from_f32(x);
        }
    }
}
