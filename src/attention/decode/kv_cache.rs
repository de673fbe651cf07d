//! [`KvCache`]: each piece's keys stored once.

use ndarray::{Array3, ArrayView3, s};

use super::shared::{CacheShape, Core, Trig, load_row, per_head, put_row, store_group};
use super::step::{DecodeScratch, KeySource, Rows, Runs, Step};
use super::{DecodeCache, RefreshPolicy, append_then_attend};
use crate::RopeConfig;
use crate::attention::kernels::widen;
use crate::attention::{Attention, Bf16Products};
use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::{Piece, PositionFn, PositionMap, Region};
use crate::rotary::Layout;
use crate::tensor::{Element, View3, View3Mut};

/// A KV cache that stores each piece of a [`PositionMap`]'s keys once: decoding under
/// ReRoPE or Leaky ReRoPE costs what a plain RoPE step costs, plus `w` cached keys per kv
/// head (see the [module docs](super) for what is stored and its memory).
///
/// A step attends one query (or a chunk) at positions `<= len() - 1`:
/// `o_i = sum_{j <= i} softmax_j(scale * s_i * (R(f(i)) q_i) . (R(g(j)) k_j)) v_j`, with
/// the piece `(f, g)` chosen per key by the band `i - j < w`: each query is rotated once
/// per piece, each key read once from the piece's cache, softmax in f32 with the row
/// maximum subtracted. `scale` defaults to `m^2 / sqrt(head_dim)` (`m` the attention
/// factor of the frequencies in force) and `s_i` is the log-n factor (1 without log-n),
/// as in [`Attention`]. GQA: query head `h` reads kv head `h / (H_q / H_kv)`.
///
/// Length-dependent schemes (dynamic NTK, LongRoPE) re-rotate the cache from raw keys
/// when their frequencies change ([`RefreshPolicy`]), so the cache never serves stale
/// keys.
///
/// **Storage type.** `S` ([`Element`]: f32, bf16, f16) is what keys and values are
/// stored in: inputs of any element type are widened to f32, rotated (angles in f64),
/// and rounded once to `S`; a step widens them back on load, so scores, softmax and
/// `P V` run in f32 and a bf16/f16 step reads half the bytes of an f32 one. Build a
/// typed cache with [`KvCache::new_typed`] (`KvCache::new` is the f32 cache).
/// [`KvCache::attend_into`] writes into a caller's buffer with a reusable
/// [`DecodeScratch`]: a decode step then allocates nothing.
///
/// ```
/// use ndarray::{Array3, s};
/// use ropex::{Layout, PositionMap, RopeConfig};
/// use ropex::attention::decode::KvCache;
///
/// let (heads_q, heads_kv, d) = (4, 2, 8);
/// let cfg = RopeConfig::new(d, 10_000.0)?;
/// let map = PositionMap::leaky_rerope(4, 16.0)?;
/// let mut cache = KvCache::new(cfg.clone(), Layout::Half, map, ropex::CacheShape::square(heads_kv, d))?;
///
/// // Chunked prefill of a 10-token prompt, then one decode step at position 10.
/// let q = Array3::<f32>::from_shape_fn((11, heads_q, d), |(t, h, x)| ((t + h + x) % 5) as f32 * 0.1);
/// let k = Array3::<f32>::from_shape_fn((11, heads_kv, d), |(t, h, x)| ((t * h + x) % 3) as f32 * 0.2);
/// let v = k.mapv(|x| 1.0 - x);
/// let prompt = cache.prefill_chunk(q.slice(s![..10, .., ..]), k.slice(s![..10, .., ..]), v.slice(s![..10, .., ..]))?;
/// cache.append(k.slice(s![10.., .., ..]), v.slice(s![10.., .., ..]))?;
/// let step = cache.attend(q.slice(s![10.., .., ..]), &[10])?;
/// assert_eq!((prompt.dim(), step.dim(), cache.len()), ((10, 4, 8), (1, 4, 8), 11));
///
/// // Each row equals the corresponding row of the f64 reference prefill.
/// let pos: Vec<usize> = (0..11).collect();
/// let full = cache.attention().reference(q.view(), k.view(), v.view(), &pos, &pos)?;
/// let err = (&full.slice(s![10.., .., ..]) - &step).iter().fold(0f32, |m, e| m.max(e.abs()));
/// assert!(err < 1e-5);
/// // A plain cache plus w x d per kv head: 4 bytes * 2 heads * (11 * (8 + 8) + 4 * 8).
/// assert_eq!(cache.memory_bytes(), 4 * 2 * (11 * 16 + 4 * 8));
/// # Ok::<(), ropex::RopeError>(())
/// ```

#[derive(Debug, Clone, PartialEq)]
pub struct KvCache<S: Element = f32> {
    core: Core,
    /// The map's pieces (`pieces()` order: near then far for a band map).
    pieces: Vec<Piece>,
    region: Region,
    /// The piece every key is cached for: the far piece, or the (shared) only piece.
    main_piece: Piece,
    /// Window of a two-piece (band) map; its near piece is `pieces[0]`.
    band: Option<usize>,
    /// The main piece's key map is `g(j) = 0`: main keys are the raw keys.
    main_is_raw: bool,
    /// Per kv head, `[len, head_dim]`: `R(g_main(j)) k_j`.
    main: Vec<Vec<S>>,
    /// Per kv head, `[min(len, w), head_dim]`: `R(g_near(j)) k_j` in slot `j mod w`.
    ring: Vec<Vec<S>>,
    /// Per kv head, `[len, head_dim]`: raw `k_j`, kept only for re-rotation.
    raw: Option<Vec<Vec<S>>>,
    /// Per kv head, `[len, value_dim]`.
    values: Vec<Vec<S>>,
    /// StreamingLLM: the cache keeps only the sinks and the window (see [`Evicting`]).
    evict: Option<Evicting>,
}

/// The storage of an evicting (StreamingLLM) cache: slot `s < S + W` holds position `s`
/// until the cache is full, then the window slots `S..S + W` are a ring: position `j >= S`
/// lives in slot `S + (j - S) mod W`. Keys, raw keys and values share the slots.
#[derive(Debug, Clone, PartialEq)]
struct Evicting {
    sinks: usize,
    window: usize,
    /// The position held by each slot.
    slot_pos: Vec<usize>,
}

impl Evicting {
    fn capacity(&self) -> usize {
        self.sinks + self.window
    }

    /// The slot of position `j`, recorded as holding it.
    fn assign(&mut self, j: usize) -> usize {
        let slot = if j < self.capacity() {
            j
        } else {
            self.sinks + (j - self.sinks) % self.window
        };
        if slot == self.slot_pos.len() {
            self.slot_pos.push(j);
        } else {
            self.slot_pos[slot] = j;
        }
        slot
    }
}

/// Band keys rebuilt for one attend call: disjoint position spans `(start, end, offset)`,
/// the keys of span positions stored back to back from token `offset`, per kv head.
#[derive(Debug, Default)]
struct Rebuilt {
    spans: Vec<(usize, usize, usize)>,
    keys: Vec<Vec<f32>>,
}

impl Rebuilt {
    /// Token index of position `j` in `keys` (0 when `j` was not rebuilt; only called
    /// for positions inside a span, where the ring does not reach).
    fn offset_of(&self, j: usize) -> usize {
        let k = self.spans.partition_point(|s| s.1 <= j);
        match self.spans.get(k) {
            Some(&(start, _, offset)) if start <= j => offset + (j - start),
            _ => 0,
        }
    }
}

/// The keys and values of kv head `g` of a [`KvCache`], as the decode step reads them:
/// one chunk per piece (two for the wrapping ring, one for keys rebuilt for older
/// queries).
struct Head<'a, S: Element> {
    cache: &'a KvCache<S>,
    g: usize,
    rebuilt: &'a Rebuilt,
}

impl<S: Element> KeySource<S> for Head<'_, S> {
    fn keys(&self, piece: usize, lo: usize, hi: usize, f: &mut dyn FnMut(Rows<'_, S>, usize)) {
        let c = self.cache;
        let d = c.core.head_dim;
        let Some(w) = c.band.filter(|_| piece == 0) else {
            f(Rows::Stored(&c.main[self.g][lo * d..hi * d]), lo);
            return;
        };
        // Band keys that left the ring (older queries of a chunk), then the ring: at
        // most two contiguous runs of slots.
        let split = c.ring_start().clamp(lo, hi);
        if split > lo {
            let at = self.rebuilt.offset_of(lo);
            let keys = &self.rebuilt.keys[self.g];
            f(Rows::Wide(&keys[at * d..(at + split - lo) * d]), lo);
        }
        let ring = &c.ring[self.g];
        let mut j = split;
        while j < hi {
            let slot = j % w;
            let end = hi.min(j + (w - slot));
            f(Rows::Stored(&ring[slot * d..(slot + end - j) * d]), j);
            j = end;
        }
    }

    fn values(&self, lo: usize, hi: usize, f: &mut dyn FnMut(&[S], usize)) {
        let dv = self.cache.core.value_dim;
        f(&self.cache.values[self.g][lo * dv..hi * dv], lo);
    }
}

impl KvCache<f32> {
    /// An empty f32 cache for keys and values of `shape` ([`CacheShape`]: key/value
    /// heads, key dim `>=` the rotary dim with dims past it passing through, value dim).
    ///
    /// Frequencies come from `config` (`config.frequencies_for_len(L)`, see
    /// [`RefreshPolicy`]); `layout` pairs the dims; `map` is validated (window 0 or a
    /// bad leak is an error). Causal, default scale, no log-n, [`RefreshPolicy::EveryChange`].
    pub fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        shape: CacheShape,
    ) -> Result<Self> {
        Self::new_typed(config, layout, map, shape)
    }
}

impl<S: Element> KvCache<S> {
    /// An empty cache storing keys and values as `S` (e.g.
    /// `KvCache::<half::bf16>::new_typed(..)`); arguments as in [`KvCache::new`].
    pub fn new_typed(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        shape: CacheShape,
    ) -> Result<Self> {
        let core = Core::new(config, layout, map, shape)?;
        let heads_kv = shape.heads_kv;
        let pieces = map.pieces();
        let list = pieces.list().to_vec();
        let region = pieces.region();
        let (main_piece, band) = match region {
            Region::Band { window } => (list[1], Some(window)),
            _ => (list[0], None),
        };
        let main_is_raw =
            main_piece.key == PositionFn::Affine(crate::position::Affine::constant(0.0));
        let keep_raw = core.config.scaling().is_length_dependent() && !main_is_raw;
        let evict = match map {
            PositionMap::Streaming { sinks, window } => Some(Evicting {
                sinks,
                window,
                slot_pos: Vec::new(),
            }),
            _ => None,
        };
        Ok(KvCache {
            pieces: list,
            region,
            main_piece,
            band,
            main_is_raw,
            main: per_head(heads_kv)?,
            ring: per_head(heads_kv)?,
            raw: if keep_raw {
                Some(per_head(heads_kv)?)
            } else {
                None
            },
            values: per_head(heads_kv)?,
            evict,
            core,
        })
    }

    /// Overrides the logit scale (default `m^2 / sqrt(head_dim)`); finite and `> 0`.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        self.core.set_scale(scale)?;
        Ok(self)
    }

    /// Adds a sliding-window and/or chunked mask (see [`crate::attention::Mask`]); the
    /// cache still stores every key (an evicting StreamingLLM cache refuses a mask).
    pub fn with_mask(mut self, mask: crate::attention::Mask) -> Result<Self> {
        self.core.set_mask(mask, self.evict.is_some())?;
        Ok(self)
    }

    /// Dual Chunk Attention's logit scale with training length `train_len >= 1` (see
    /// [`Attention::with_dca_logit_scale`]); `n` is the cache length at each attend.
    pub fn with_dca_logit_scale(mut self, train_len: usize) -> Result<Self> {
        self.core.set_dca_logit_scale(train_len)?;
        Ok(self)
    }

    /// Log-n query scaling `max(1, ln(i + 1) / ln train_len)` (Su, posts 10-12) with
    /// `train_len >= 2`.
    pub fn with_log_n(mut self, train_len: usize) -> Result<Self> {
        self.core.set_log_n(train_len)?;
        Ok(self)
    }

    /// Whether a bf16 cache scores its keys with bf16 products (`vdpbf16ps`, the rotated
    /// queries rounded to bf16 once a step; see [`Bf16Products`] and the
    /// [`crate::attention::decode`] docs). The default, `Auto`, does where the CPU runs
    /// them fast; `Off` keeps f32 products on the widened keys. No effect on an f32 or
    /// f16 cache, or an odd head dim.
    ///
    /// ```
    /// # #[cfg(feature = "half")] {
    /// use ropex::attention::decode::KvCache;
    /// use ropex::attention::Bf16Products;
    /// use ropex::{CacheShape, Layout, PositionMap, RopeConfig};
    /// let cfg = RopeConfig::new(64, 10_000.0)?;
    /// let shape = CacheShape::square(2, 64);
    /// let cache = KvCache::<half::bf16>::new_typed(cfg, Layout::Half, PositionMap::Rope, shape)?
    ///     .with_bf16_products(Bf16Products::Off);
    /// assert_eq!(cache.bf16_products(), Bf16Products::Off);
    /// # }
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn with_bf16_products(mut self, mode: Bf16Products) -> Self {
        self.core.bf16_products = mode;
        self
    }

    /// The bf16 products setting ([`KvCache::with_bf16_products`]).
    pub fn bf16_products(&self) -> Bf16Products {
        self.core.bf16_products
    }

    /// Sets the refresh policy for length-dependent schemes; if the frequencies for the
    /// current length change under it, the cache is re-rotated now.
    pub fn with_refresh_policy(mut self, policy: RefreshPolicy) -> Self {
        self.core.policy = policy;
        self.update_frequencies(self.core.len);
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

    /// Bytes of cached data, `S::BYTES` per stored element:
    /// `S::BYTES H_kv (n (d + d_v) + min(n, w) d + [n d if raw keys are kept])`.
    pub fn memory_bytes(&self) -> usize {
        let elems: usize = self
            .main
            .iter()
            .chain(&self.ring)
            .chain(&self.values)
            .chain(self.raw.iter().flatten())
            .map(Vec::len)
            .sum();
        elems * S::BYTES
    }

    /// Whether raw keys are kept: the scheme is length-dependent and the map's main
    /// piece is not ReRoPE's raw far piece.
    pub fn keeps_raw_keys(&self) -> bool {
        self.raw.is_some()
    }

    /// The frequencies the cached keys are rotated with (those in force).
    pub fn frequencies(&self) -> &Frequencies {
        &self.core.freqs
    }

    /// The length `L` that selected the frequencies in force.
    pub fn frequency_len(&self) -> usize {
        self.core.freq_len
    }

    /// How many times a non-empty cache was re-rotated because the frequencies changed.
    pub fn refreshes(&self) -> usize {
        self.core.refreshes
    }

    /// The refresh policy.
    pub fn refresh_policy(&self) -> RefreshPolicy {
        self.core.policy
    }

    /// The rotary configuration.
    pub fn config(&self) -> &RopeConfig {
        &self.core.config
    }

    /// The position map.
    pub fn map(&self) -> &PositionMap {
        &self.core.map
    }

    /// The [`Attention`] this cache computes now (frequencies in force, layout, map,
    /// scale, log-n, causal): its [`Attention::reference`] over the whole cached
    /// sequence is the oracle for [`KvCache::attend`].
    pub fn attention(&self) -> Attention {
        self.core.attention()
    }

    /// The first position the ring holds (`len` when there is no band).
    fn ring_start(&self) -> usize {
        match self.band {
            Some(w) => self.core.len - self.core.len.min(w),
            None => self.core.len,
        }
    }

    /// Stored slots (positions, unless the cache evicts).
    fn slots(&self) -> usize {
        self.evict
            .as_ref()
            .map_or(self.core.len, |ev| ev.slot_pos.len())
    }

    /// Recomputes the frequencies for cache length `len` and, if they changed,
    /// re-rotates every cached rotated key from the raw keys.
    fn update_frequencies(&mut self, len: usize) {
        let Some(freqs) = self.core.frequencies_at(len) else {
            return;
        };
        self.core.freqs = freqs;
        if self.core.len == 0 {
            return;
        }
        self.core.refreshes += 1;
        let d = self.core.head_dim;
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq().to_vec();
        let mut trig = Trig::new(inv.len());
        let mut lane = vec![0f32; d];
        if let Some(raw) = &self.raw {
            for slot in 0..self.slots() {
                let j = self.evict.as_ref().map_or(slot, |ev| ev.slot_pos[slot]);
                trig.set(&inv, self.main_piece.key.at(j as f64));
                for (main, raw) in self.main.iter_mut().zip(raw) {
                    widen(&raw[slot * d..(slot + 1) * d], &mut lane);
                    trig.rotate(&mut lane, layout);
                    put_row(main, slot, &lane);
                }
            }
        }
        if let Some(w) = self.band {
            let near = self.pieces[0];
            let raw = self.raw.as_ref().unwrap_or(&self.main);
            for j in self.ring_start()..self.core.len {
                trig.set(&inv, near.key.at(j as f64));
                for (ring, raw) in self.ring.iter_mut().zip(raw) {
                    widen(&raw[j * d..(j + 1) * d], &mut lane);
                    trig.rotate(&mut lane, layout);
                    put_row(ring, j % w, &lane);
                }
            }
        }
    }

    /// Appends keys `[c, H_kv, head_dim]` and values `[c, H_kv, value_dim]` (one token or
    /// a chunk, of any [`Element`] type) at positions `len() .. len() + c`.
    ///
    /// For a length-dependent scheme the frequencies for the new length are put in force
    /// first (re-rotating the cache if they change), then the new keys are widened to
    /// f32, rotated with them and rounded once to `S`: `R(g_main(j)) k_j` into the main
    /// cache, `R(j) k_j` into the ring for the last `w`. Shape errors leave the cache
    /// unchanged; NaN is stored and propagates (see the [module docs](super)).
    pub fn append<'a, T: Element>(
        &mut self,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
    ) -> Result<()> {
        let (k, v) = (k.into().as_ndarray(), v.into().as_ndarray());
        self.core.check_kv(&k, &v)?;
        let len = self.core.len + k.dim().0;
        self.append_rows(&k, &v, len);
        Ok(())
    }

    /// Appends checked rows under the frequencies for cache length `freq_len` (the length
    /// after the whole chunk, also when an evicting chunk is appended token by token).
    fn append_rows<T: Element>(&mut self, k: &ArrayView3<T>, v: &ArrayView3<T>, freq_len: usize) {
        let c = k.dim().0;
        if c == 0 {
            return;
        }
        self.update_frequencies(freq_len);
        let start = self.core.len;
        let new_len = start + c;
        let (d, dv) = (self.core.head_dim, self.core.value_dim);
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq();
        let (mut trig, mut near_trig) = (Trig::new(inv.len()), Trig::new(inv.len()));
        let (mut lane, mut near_lane) = (vec![0f32; d.max(dv)], vec![0f32; d]);
        if let Some(w) = self.band {
            for ring in &mut self.ring {
                ring.resize(new_len.min(w) * d, S::default());
            }
        }
        // Room for the chunk up front (amortised growth: a chunk never copies the cache
        // more than once, and a token-by-token decode only at capacity doublings).
        if self.evict.is_none() {
            for buf in self.main.iter_mut().chain(self.raw.iter_mut().flatten()) {
                buf.reserve(c * d);
            }
            for buf in &mut self.values {
                buf.reserve(c * dv);
            }
        }
        for t in 0..c {
            let j = start + t;
            let slot = self.evict.as_mut().map_or(j, |ev| ev.assign(j));
            if !self.main_is_raw {
                trig.set(inv, self.main_piece.key.at(j as f64));
            }
            // Only the last `w` keys of the chunk reach the ring.
            let band = self.band.filter(|w| j.saturating_add(*w) >= new_len);
            if band.is_some() {
                near_trig.set(inv, self.pieces[0].key.at(j as f64));
            }
            for g in 0..self.core.heads_kv {
                let key = &mut lane[..d];
                load_row(k, t, g, key);
                if let Some(raw) = &mut self.raw {
                    put_row(&mut raw[g], slot, key);
                }
                if let Some(w) = band {
                    near_lane.copy_from_slice(key);
                    near_trig.rotate(&mut near_lane, layout);
                    put_row(&mut self.ring[g], j % w, &near_lane);
                }
                if !self.main_is_raw {
                    trig.rotate(key, layout);
                }
                put_row(&mut self.main[g], slot, key);
                let value = &mut lane[..dv];
                load_row(v, t, g, value);
                put_row(&mut self.values[g], slot, value);
            }
        }
        self.core.len = new_len;
    }

    /// Near-piece keys of the band keys that queries at `q_pos` need and that have left
    /// the ring, rebuilt from the raw keys (`R(g_near(j)) k_j`) or from the main keys
    /// (`R(g_near(j) - g_main(j)) (R(g_main(j)) k_j)`), in f32: only positions inside
    /// some query's band, so at most `min(n_q (w - 1), n)` keys and none (and no
    /// allocation) for queries at the newest position.
    fn rebuild_band(&self, q_pos: &[usize]) -> Rebuilt {
        let mut rebuilt = Rebuilt::default();
        let Some(w) = self.band else {
            return rebuilt;
        };
        let near = self.pieces[0];
        let ring_start = self.ring_start();
        let mut ranges: Vec<(usize, usize)> = q_pos
            .iter()
            .map(|&i| ((i + 1).saturating_sub(w), (i + 1).min(ring_start)))
            .filter(|(lo, hi)| lo < hi)
            .collect();
        if ranges.is_empty() {
            return rebuilt;
        }
        ranges.sort_unstable();
        let mut total = 0;
        for (lo, hi) in ranges {
            match rebuilt.spans.last_mut() {
                Some(last) if lo <= last.1 => {
                    total += hi.saturating_sub(last.1);
                    last.1 = last.1.max(hi);
                }
                _ => {
                    rebuilt.spans.push((lo, hi, total));
                    total += hi - lo;
                }
            }
        }
        let d = self.core.head_dim;
        let inv = self.core.freqs.inv_freq();
        let mut trig = Trig::new(inv.len());
        rebuilt.keys = vec![vec![0f32; total * d]; self.core.heads_kv];
        let (source, from_main) = match (&self.raw, self.main_is_raw) {
            (Some(raw), _) => (raw, false),
            (None, true) => (&self.main, false),
            (None, false) => (&self.main, true),
        };
        for &(lo, hi, offset) in &rebuilt.spans {
            for j in lo..hi {
                let mut angle = near.key.at(j as f64);
                if from_main {
                    angle -= self.main_piece.key.at(j as f64);
                }
                trig.set(inv, angle);
                let at = offset + j - lo;
                for (buf, src) in rebuilt.keys.iter_mut().zip(source) {
                    let lane = &mut buf[at * d..(at + 1) * d];
                    widen(&src[j * d..(j + 1) * d], lane);
                    trig.rotate(lane, self.core.layout);
                }
            }
        }
        rebuilt
    }

    /// Attends queries `[n_q, H_q, head_dim]` (any [`Element`] type) at positions `q_pos`
    /// (each `< len()`) to the cached keys at positions `<= q_pos[a]`; returns
    /// `[n_q, H_q, value_dim]` in f32 (see [`KvCache::attend_into`]).
    pub fn attend<'a, T: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        q_pos: &[usize],
    ) -> Result<Array3<f32>> {
        let q = q.into();
        let [n_q, heads_q, _] = q.dims();
        let mut out = Array3::<f32>::zeros((n_q, heads_q, self.core.value_dim));
        self.attend_into(q, q_pos, &mut out, &mut DecodeScratch::new())?;
        Ok(out)
    }

    /// [`KvCache::attend`] into `out` (`[n_q, H_q, value_dim]`, any [`Element`] type,
    /// any strides; each result rounded once), with `scratch`'s buffers: once the
    /// scratch has served a step at this length, a step at the newest position
    /// allocates nothing.
    ///
    /// Each query is rotated once per piece (`R(f_near(i))`, `R(f_far(i))`), each key
    /// read once from its piece's cache; a decode step at the newest position touches no
    /// trigonometry but the query's. Errors: shape mismatches (also of `out`), `H_q` not
    /// a multiple of `H_kv`, a position `>= len()`, an older position on a wrapped
    /// StreamingLLM cache.
    pub fn attend_into<'a, 'b, T: Element, O: Element>(
        &self,
        q: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        out: impl Into<View3Mut<'b, O>>,
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let q = q.into().as_ndarray();
        let mut out = out.into().into_ndarray();
        let group = self.core.check_queries(&q, q_pos)?;
        let (n_q, heads_q, _) = q.dim();
        self.core
            .check_out([out.dim().0, out.dim().1, out.dim().2], n_q, heads_q)?;
        let len = self.core.len;
        let full = self.evict.as_ref().is_some_and(|ev| len > ev.capacity());
        if let Some(ev) = self.evict.as_ref().filter(|_| full)
            && let Some((a, &p)) = q_pos.iter().enumerate().find(|(_, p)| **p + 1 != len)
        {
            return Err(RopeError::invalid(
                format!("q_pos[{a}]"),
                p,
                format!(
                    "must be the newest position {} : this StreamingLLM cache keeps only its {} sinks and the last {} keys (use prefill_chunk for a chunk)",
                    len - 1,
                    ev.sinks,
                    ev.window
                ),
            ));
        }
        let rebuilt = self.rebuild_band(q_pos);
        let step = Step::new::<S>(&self.core, &self.pieces, len);
        for (a, &i) in q_pos.iter().enumerate() {
            // Keys before `first_visible` are hidden by the mask (never set on an
            // evicting cache, whose slots are not positions).
            let runs = Runs::new(self.region, i, self.core.first_visible(i), full);
            for g in 0..self.core.heads_kv {
                let heads = g * group..(g + 1) * group;
                let head = Head {
                    cache: self,
                    g,
                    rebuilt: &rebuilt,
                };
                step.group(q.slice(s![a, heads, ..]), i, &runs, &head, scratch);
                store_group(&mut out, a, g * group, &scratch.acc);
            }
        }
        Ok(())
    }

    /// Chunked prefill: appends the chunk's keys and values (as [`KvCache::append`]),
    /// then attends its queries `q` (`[c, H_q, head_dim]`, one per appended token) at
    /// their own positions `len_before .. len_before + c`. Validated before anything is
    /// appended: on error the cache is unchanged.
    pub fn prefill_chunk<'a, T: Element>(
        &mut self,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
    ) -> Result<Array3<f32>> {
        let (q, k, v) = (
            q.into().as_ndarray(),
            k.into().as_ndarray(),
            v.into().as_ndarray(),
        );
        let c = self.core.check_chunk(self.core.len, &q, &k, &v)?;
        let start = self.core.len;
        if self.evict.is_none() {
            return append_then_attend(
                self,
                start,
                c,
                |me| me.append(k, v),
                |me, pos| me.attend(q, pos),
            );
        }
        // Token by token: each query sees the window before the next token evicts from
        // it.
        let (_, heads_q, _) = q.dim();
        let mut out = Array3::<f32>::zeros((c, heads_q, self.core.value_dim));
        let mut scratch = DecodeScratch::new();
        for t in 0..c {
            let r = s![t..t + 1, .., ..];
            self.append_rows(&k.slice(r), &v.slice(r), start + c);
            self.attend_into(q.slice(r), &[start + t], out.slice_mut(r), &mut scratch)?;
        }
        Ok(out)
    }
}

impl<S: Element> DecodeCache for KvCache<S> {
    fn append(&mut self, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()> {
        KvCache::append(self, k, v)
    }
    fn attend(&self, q: ArrayView3<f32>, q_pos: &[usize]) -> Result<Array3<f32>> {
        KvCache::attend(self, q, q_pos)
    }
    fn prefill_chunk(
        &mut self,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>> {
        KvCache::prefill_chunk(self, q, k, v)
    }
    fn len(&self) -> usize {
        KvCache::len(self)
    }
    fn memory_bytes(&self) -> usize {
        KvCache::memory_bytes(self)
    }
}
