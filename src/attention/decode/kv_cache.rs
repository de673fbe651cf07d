//! [`KvCache`]: each piece's keys stored once.

use ndarray::{Array3, ArrayView3, s};

use super::shared::{
    CacheShape, Core, Trig, extend_row, mat, mat_mut, per_head, softmax_times_values,
};
use super::{DecodeCache, RefreshPolicy};
use crate::RopeConfig;
use crate::attention::Attention;
use crate::attention::kernels::Kernels;
use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::{Piece, PositionFn, PositionMap, Region};
use crate::rotary::Layout;

/// Band keys rebuilt for one [`KvCache::attend`] call: disjoint position spans
/// `(start, end, offset)`, the keys of span positions stored back to back from token
/// `offset`, per kv head.
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
pub struct KvCache {
    core: Core,
    /// The piece every key is cached for: the far piece, or the only piece.
    main_piece: Piece,
    /// Window and near piece of a two-piece map.
    band: Option<(usize, Piece)>,
    /// The main piece's key map is `g(j) = 0`: main keys are the raw keys.
    main_is_raw: bool,
    /// Per kv head, `[len, head_dim]`: `R(g_main(j)) k_j`.
    main: Vec<Vec<f32>>,
    /// Per kv head, `[min(len, w), head_dim]`: `R(g_near(j)) k_j` in slot `j mod w`.
    ring: Vec<Vec<f32>>,
    /// Per kv head, `[len, head_dim]`: raw `k_j`, kept only for re-rotation.
    raw: Option<Vec<Vec<f32>>>,
    /// Maps whose pieces all share the main key function (DCA, StreamingLLM): every
    /// piece, and the rule that picks one per key.
    shared: Option<(Vec<Piece>, Region)>,
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

    fn slot(&self, j: usize) -> usize {
        if j < self.capacity() {
            j
        } else {
            self.sinks + (j - self.sinks) % self.window
        }
    }
}

impl KvCache {
    /// An empty cache for keys and values of `shape` ([`CacheShape`]: key/value heads, key
    /// dim `>=` the rotary dim with dims past it passing through, value dim).
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
        let core = Core::new(config, layout, map, shape)?;
        let heads_kv = shape.heads_kv;
        let pieces = map.pieces();
        let list = pieces.list();
        let (main_piece, band, shared) = match pieces.region() {
            Region::Band { window } => (list[1], Some((window, list[0])), None),
            Region::Single => (list[0], None, None),
            region => (list[0], None, Some((list.to_vec(), region))),
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
            shared,
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

    /// Bytes of cached data:
    /// `4 H_kv (n (d + d_v) + min(n, w) d + [n d if raw keys are kept])`.
    pub fn memory_bytes(&self) -> usize {
        let floats: usize = self
            .main
            .iter()
            .chain(&self.ring)
            .chain(&self.core.values)
            .chain(self.raw.iter().flatten())
            .map(Vec::len)
            .sum();
        floats * std::mem::size_of::<f32>()
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
            Some((w, _)) => self.core.len - self.core.len.min(w),
            None => self.core.len,
        }
    }

    /// The `(slot, position)` of every stored key (slot = position unless the cache
    /// evicts).
    fn stored(&self) -> Vec<(usize, usize)> {
        match &self.evict {
            Some(ev) => ev.slot_pos.iter().copied().enumerate().collect(),
            None => (0..self.core.len).map(|j| (j, j)).collect(),
        }
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
        if let Some(raw) = &self.raw {
            for (slot, j) in self.stored() {
                trig.set(&inv, self.main_piece.key.at(j as f64));
                for (main, raw) in self.main.iter_mut().zip(raw) {
                    let lane = &mut main[slot * d..(slot + 1) * d];
                    lane.copy_from_slice(&raw[slot * d..(slot + 1) * d]);
                    trig.rotate(lane, layout);
                }
            }
        }
        if let Some((w, near)) = self.band {
            let raw = self.raw.as_ref().unwrap_or(&self.main);
            for j in self.ring_start()..self.core.len {
                trig.set(&inv, near.key.at(j as f64));
                let slot = j % w;
                for (ring, raw) in self.ring.iter_mut().zip(raw) {
                    let lane = &mut ring[slot * d..(slot + 1) * d];
                    lane.copy_from_slice(&raw[j * d..(j + 1) * d]);
                    trig.rotate(lane, layout);
                }
            }
        }
    }

    /// Appends keys `[c, H_kv, head_dim]` and values `[c, H_kv, value_dim]` (one token or
    /// a chunk) at positions `len() .. len() + c`.
    ///
    /// For a length-dependent scheme the frequencies for the new length are put in force
    /// first (re-rotating the cache if they change), then the new keys are rotated with
    /// them: `R(g_main(j)) k_j` into the main cache, `R(j) k_j` into the ring for the
    /// last `w`. Shape errors leave the cache unchanged; NaN is stored and propagates
    /// (see the [module docs](super)).
    pub fn append(&mut self, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()> {
        let c = self.core.check_kv(&k, &v)?;
        if c == 0 {
            return Ok(());
        }
        if self.evict.is_some() {
            let len = self.core.len + c;
            self.append_evicting(&k, &v, len);
            return Ok(());
        }
        let start = self.core.len;
        let new_len = start + c;
        self.update_frequencies(new_len);
        let d = self.core.head_dim;
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq();
        let mut trig = Trig::new(inv.len());
        if let Some((w, _)) = self.band {
            for ring in &mut self.ring {
                ring.resize(new_len.min(w) * d, 0.0);
            }
        }
        // Room for the chunk up front (amortised growth: a chunk never copies the cache
        // more than once, and a token-by-token decode only at capacity doublings).
        for buf in self.main.iter_mut().chain(self.raw.iter_mut().flatten()) {
            buf.reserve(c * d);
        }
        for t in 0..c {
            let j = start + t;
            if !self.main_is_raw {
                trig.set(inv, self.main_piece.key.at(j as f64));
            }
            for (g, main) in self.main.iter_mut().enumerate() {
                let at = main.len();
                extend_row(main, &k, t, g);
                if !self.main_is_raw {
                    trig.rotate(&mut main[at..], layout);
                }
            }
            if let Some(raw) = &mut self.raw {
                for (g, raw) in raw.iter_mut().enumerate() {
                    extend_row(raw, &k, t, g);
                }
            }
            if let Some((w, near)) = self.band {
                if j.saturating_add(w) < new_len {
                    continue; // evicted within this chunk
                }
                trig.set(inv, near.key.at(j as f64));
                let slot = j % w;
                for (g, ring) in self.ring.iter_mut().enumerate() {
                    let lane = &mut ring[slot * d..(slot + 1) * d];
                    for (dst, &src) in lane.iter_mut().zip(k.slice(s![t, g, ..]).iter()) {
                        *dst = src;
                    }
                    trig.rotate(lane, layout);
                }
            }
        }
        self.core.push_values(&v);
        self.core.len = new_len;
        Ok(())
    }

    /// [`KvCache::append`] for an evicting (StreamingLLM) cache: every token goes to its
    /// slot, overwriting the window key it evicts; the frequencies are those for cache
    /// length `freq_len` (the length after the whole chunk, as for the other maps).
    fn append_evicting(&mut self, k: &ArrayView3<f32>, v: &ArrayView3<f32>, freq_len: usize) {
        let c = k.dim().0;
        let start = self.core.len;
        self.update_frequencies(freq_len);
        let d = self.core.head_dim;
        let dv = self.core.value_dim;
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq();
        let mut trig = Trig::new(inv.len());
        let Some(ev) = self.evict.as_mut() else {
            return;
        };
        // Writes row `t` of head `g` of `x` (`width` wide) into `slot` of `buf`.
        let put = |buf: &mut Vec<f32>,
                   slot: usize,
                   x: &ArrayView3<f32>,
                   t: usize,
                   g: usize,
                   width: usize| {
            if buf.len() == slot * width {
                extend_row(buf, x, t, g);
            } else {
                for (dst, &src) in buf[slot * width..(slot + 1) * width]
                    .iter_mut()
                    .zip(x.slice(s![t, g, ..]).iter())
                {
                    *dst = src;
                }
            }
        };
        for t in 0..c {
            let j = start + t;
            let slot = ev.slot(j);
            if slot == ev.slot_pos.len() {
                ev.slot_pos.push(j);
            } else {
                ev.slot_pos[slot] = j;
            }
            trig.set(inv, self.main_piece.key.at(j as f64));
            for (g, main) in self.main.iter_mut().enumerate() {
                put(main, slot, k, t, g, d);
                trig.rotate(&mut main[slot * d..(slot + 1) * d], layout);
            }
            for (g, raw) in self.raw.iter_mut().flatten().enumerate() {
                put(raw, slot, k, t, g, d);
            }
            for (g, values) in self.core.values.iter_mut().enumerate() {
                put(values, slot, v, t, g, dv);
            }
        }
        self.core.len = start + c;
    }

    /// The runs `(lo, hi, piece)` of stored slots a query at position `i` sees, for maps
    /// whose pieces share the main keys: DCA's inter-, successive- and intra-chunk keys
    /// (slots are positions), StreamingLLM's sinks and window.
    fn runs(&self, region: Region, i: usize) -> Vec<(usize, usize, usize)> {
        match region {
            Region::ChunkDistance { period } => {
                let chunk = i / period;
                let (succ, intra) = (chunk.saturating_sub(1) * period, chunk * period);
                let mut runs = Vec::with_capacity(3);
                if chunk >= 2 {
                    runs.push((0, succ, 2));
                }
                if chunk >= 1 {
                    runs.push((succ, intra, 1));
                }
                runs.push((intra, i + 1, 0));
                runs
            }
            Region::SinksWindow { sinks, window } => {
                let full = self
                    .evict
                    .as_ref()
                    .is_some_and(|ev| self.core.len > ev.capacity());
                let seen = if full { sinks + window } else { i + 1 };
                let sink_end = sinks.min((i + 1).saturating_sub(window)).min(seen);
                vec![(0, sink_end, 1), (sink_end, seen, 0)]
            }
            Region::Single | Region::Band { .. } => vec![(0, i + 1, 0)],
        }
    }

    /// [`KvCache::attend`] for maps whose pieces share the main keys: each query rotated
    /// once per piece it uses, each run of keys scored against its piece's query.
    fn attend_shared(
        &self,
        q: ArrayView3<f32>,
        q_pos: &[usize],
        pieces: &[Piece],
        region: Region,
    ) -> Result<Array3<f32>> {
        let group = self.core.check_queries(&q, q_pos)?;
        if let Some(ev) = &self.evict {
            let len = self.core.len;
            if len > ev.capacity()
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
        }
        let (n_q, heads_q, d) = q.dim();
        let dv = self.core.value_dim;
        let mut out = Array3::<f32>::zeros((n_q, heads_q, dv));
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq();
        let mut trig = Trig::new(inv.len());
        let kern = Kernels::active();
        let mut q_rot = vec![vec![0f32; heads_q * d]; pieces.len()];
        let mut scores = Vec::new();
        let mut acc = vec![0f32; group * dv];
        let out_slice = out
            .as_slice_mut()
            .ok_or_else(|| RopeError::invalid("output", "non-contiguous", "internal"))?;
        for (a, &i) in q_pos.iter().enumerate() {
            let factor = self.core.query_factor(i);
            // Keys before `base` are hidden by the mask (never set on an evicting cache,
            // whose slots are not positions); scores cover `base..n`.
            let base = self.core.first_visible(i);
            let runs: Vec<_> = self
                .runs(region, i)
                .into_iter()
                .map(|(lo, hi, p)| (lo.max(base), hi.max(base), p))
                .collect();
            let n = runs.last().map_or(base, |r| r.1);
            let seen = n - base;
            for &(lo, hi, p) in &runs {
                if hi > lo {
                    Core::load_query(&q, a, factor, &mut q_rot[p]);
                    trig.set(inv, pieces[p].query.at(i as f64));
                    for lane in q_rot[p].chunks_exact_mut(d.max(1)) {
                        trig.rotate(lane, layout);
                    }
                }
            }
            scores.clear();
            scores.resize(group * seen, 0f32);
            for (g, (main, values)) in self.main.iter().zip(&self.core.values).enumerate() {
                let heads = g * group..(g + 1) * group;
                for &(lo, hi, p) in &runs {
                    if hi > lo && d > 0 {
                        kern.qk_gemv(
                            mat(&q_rot[p][heads.start * d..heads.end * d], group, d, d),
                            mat(&main[lo * d..hi * d], hi - lo, d, d),
                            mat_mut(&mut scores[lo - base..], group, hi - lo, seen),
                            1.0,
                        )
                        .expect("decode shapes are consistent");
                    }
                }
                softmax_times_values(kern, &mut scores, seen, &values[base * dv..], dv, &mut acc);
                let at = (a * heads_q + heads.start) * dv;
                out_slice[at..at + group * dv].copy_from_slice(&acc);
            }
        }
        Ok(out)
    }

    /// Near-piece keys of the band keys that queries at `q_pos` need and that have left
    /// the ring, rebuilt from the raw keys (`R(g_near(j)) k_j`) or from the main keys
    /// (`R(g_near(j) - g_main(j)) (R(g_main(j)) k_j)`): only positions inside some
    /// query's band, so at most `min(n_q (w - 1), n)` keys and none for a query at the
    /// newest position.
    fn rebuild_band(&self, q_pos: &[usize]) -> Rebuilt {
        let mut rebuilt = Rebuilt {
            spans: Vec::new(),
            keys: Vec::new(),
        };
        let Some((w, near)) = self.band else {
            return rebuilt;
        };
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
        rebuilt.keys = vec![Vec::with_capacity(total * d); self.core.heads_kv];
        let (source, from_main) = match (&self.raw, self.main_is_raw) {
            (Some(raw), _) => (raw, false),
            (None, true) => (&self.main, false),
            (None, false) => (&self.main, true),
        };
        for &(lo, hi, _) in &rebuilt.spans {
            for j in lo..hi {
                let mut angle = near.key.at(j as f64);
                if from_main {
                    angle -= self.main_piece.key.at(j as f64);
                }
                trig.set(inv, angle);
                for (buf, src) in rebuilt.keys.iter_mut().zip(source) {
                    let at = buf.len();
                    buf.extend_from_slice(&src[j * d..(j + 1) * d]);
                    trig.rotate(&mut buf[at..], self.core.layout);
                }
            }
        }
        rebuilt
    }

    /// Attends queries `[n_q, H_q, head_dim]` at positions `q_pos` (each `< len()`) to
    /// the cached keys at positions `<= q_pos[a]`; returns `[n_q, H_q, value_dim]`.
    ///
    /// Each query is rotated once per piece (`R(f_near(i))`, `R(f_far(i))`), each key
    /// read once from its piece's cache; a decode step at the newest position touches no
    /// trigonometry but the query's. Errors: shape mismatches, `H_q` not a multiple of
    /// `H_kv`, a position `>= len()`.
    pub fn attend(&self, q: ArrayView3<f32>, q_pos: &[usize]) -> Result<Array3<f32>> {
        if let Some((pieces, region)) = &self.shared {
            return self.attend_shared(q, q_pos, pieces, *region);
        }
        let group = self.core.check_queries(&q, q_pos)?;
        let (n_q, heads_q, d) = q.dim();
        let dv = self.core.value_dim;
        let mut out = Array3::<f32>::zeros((n_q, heads_q, dv));
        let layout = self.core.layout;
        let inv = self.core.freqs.inv_freq();
        let mut trig = Trig::new(inv.len());
        let ring_start = self.ring_start();
        let rebuilt = self.rebuild_band(q_pos);
        let kern = Kernels::active();
        let mut q_main = vec![0f32; heads_q * d];
        let mut q_near = vec![0f32; if self.band.is_some() { heads_q * d } else { 0 }];
        let mut scores = Vec::new();
        let mut acc = vec![0f32; group * dv];
        let out_slice = out
            .as_slice_mut()
            .ok_or_else(|| RopeError::invalid("output", "non-contiguous", "internal"))?;
        for (a, &i) in q_pos.iter().enumerate() {
            let factor = self.core.query_factor(i);
            Core::load_query(&q, a, factor, &mut q_main);
            trig.set(inv, self.main_piece.query.at(i as f64));
            for lane in q_main.chunks_exact_mut(d) {
                trig.rotate(lane, layout);
            }
            let n = i + 1;
            // Keys before `base` are hidden by the mask; scores cover `base..n`.
            let base = self.core.first_visible(i);
            let seen = n - base;
            let band_lo = match self.band {
                Some((w, near)) => {
                    Core::load_query(&q, a, factor, &mut q_near);
                    trig.set(inv, near.query.at(i as f64));
                    for lane in q_near.chunks_exact_mut(d) {
                        trig.rotate(lane, layout);
                    }
                    n.saturating_sub(w)
                }
                None => n,
            };
            let band_start = band_lo.max(base);
            // Token offset of key `band_start` among the rebuilt keys, if it left the ring.
            let rebuilt_at = rebuilt.offset_of(band_start);
            scores.clear();
            scores.resize(group * seen, 0f32);
            let per_head = self.main.iter().zip(&self.ring).zip(&self.core.values);
            for (g, ((main, ring), values)) in per_head.enumerate() {
                let heads = g * group..(g + 1) * group;
                // Scores of keys `lo..hi` (rows `at..` of `keys`) against `qs`.
                let mut gemv = |qs: &[f32], keys: &[f32], at: usize, lo: usize, hi: usize| {
                    if hi > lo && d > 0 {
                        kern.qk_gemv(
                            mat(&qs[heads.start * d..heads.end * d], group, d, d),
                            mat(&keys[at * d..(at + hi - lo) * d], hi - lo, d, d),
                            mat_mut(&mut scores[lo - base..], group, hi - lo, seen),
                            1.0,
                        )
                        .expect("decode shapes are consistent");
                    }
                };
                // Main keys, one streaming pass.
                gemv(&q_main, main, base, base, band_lo.max(base));
                if let Some((w, _)) = self.band {
                    let rebuilt: &[f32] = rebuilt.keys.get(g).map_or(&[], Vec::as_slice);
                    // Band keys that left the ring (older queries of a chunk).
                    let split = ring_start.clamp(band_start, n);
                    gemv(&q_near, rebuilt, rebuilt_at, band_start, split);
                    // Band keys in the ring: at most two contiguous runs of slots.
                    let mut j = split;
                    while j < n {
                        let slot = j % w;
                        let end = n.min(j + (w - slot));
                        gemv(&q_near, ring, slot, j, end);
                        j = end;
                    }
                }
                softmax_times_values(kern, &mut scores, seen, &values[base * dv..], dv, &mut acc);
                let at = (a * heads_q + heads.start) * dv;
                out_slice[at..at + group * dv].copy_from_slice(&acc);
            }
        }
        Ok(out)
    }

    /// Chunked prefill: appends the chunk's keys and values (as [`KvCache::append`]),
    /// then attends its queries `q` (`[c, H_q, head_dim]`, one per appended token) at
    /// their own positions `len_before .. len_before + c`. Validated before anything is
    /// appended: on error the cache is unchanged.
    pub fn prefill_chunk(
        &mut self,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>> {
        let c = self.core.check_chunk(&q, &k, &v)?;
        let start = self.core.len;
        if self.evict.is_some() {
            // Token by token: each query sees the window before the next token evicts
            // from it.
            let (_, heads_q, _) = q.dim();
            let mut out = Array3::<f32>::zeros((c, heads_q, self.core.value_dim));
            for t in 0..c {
                let r = s![t..t + 1, .., ..];
                self.append_evicting(&k.slice(r), &v.slice(r), start + c);
                let row = self.attend(q.slice(r), &[start + t])?;
                out.slice_mut(r).assign(&row);
            }
            return Ok(out);
        }
        self.append(k, v)?;
        let pos: Vec<usize> = (start..start + c).collect();
        self.attend(q, &pos)
    }
}

impl DecodeCache for KvCache {
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
