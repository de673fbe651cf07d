//! Decoding against a KV cache: [`KvCache`], which stores each piece of a position map's
//! keys once, and [`KvCacheRerotating`], Su's re-rotating decode, kept as the baseline.
//!
//! ## What the cache computes
//! For a query `q_i` at position `i` and the cached keys `k_0 .. k_{n-1}` (positions
//! `0 .. n-1`, `i <= n - 1`), the output is the causal attention row of
//! [`crate::attention`]:
//! `o_i = sum_{j <= i} softmax_j(scale * s_i * (R(P(i,j)) q_i) . k_j) v_j`,
//! exactly what [`Attention::reference`] computes for row `i` of a prefill over the
//! whole cached sequence.
//!
//! ## Per-piece key caches
//! A map is at most two plain-RoPE pieces `P = f(i) - g(j)` chosen by the band
//! `i - j < w` ([`crate::Pieces`]). Because `(R(f) q) . (R(g) k) = q . R(g - f) k`, each
//! piece only needs its keys rotated once by `g(j)`, and each query rotated once by
//! `f(i)`:
//! - **main keys**, every key, rotated by the key map of the far piece (or of the only
//!   piece): `R(j) k_j` for RoPE, raw `k_j` for ReRoPE (`g = 0`), `R(j/k) k_j` for Leaky
//!   ReRoPE (fractional angles in f64, the result cast to f32), `R(j/s) k_j` for the
//!   interpolated map;
//! - **band ring** (two-piece maps only): `R(j) k_j` for the last `w` keys, in a ring
//!   buffer indexed by `j mod w`. Only these keys can be inside the band of a query at
//!   the newest position; a query at an older position (chunked prefill) gets its older
//!   band keys rebuilt from the main keys, `R(j - g(j)) (R(g(j)) k_j)` (or the raw keys),
//!   `O(d)` trigonometry per rebuilt key, and only keys inside some query's band: at most
//!   `c - 1` for a chunk of `c`, none for a decode step;
//! - **raw keys** `k_j`, only when the frequency scheme is length-dependent (see below)
//!   and the main keys are not already raw (i.e. not ReRoPE);
//! - the values `v_j`, once.
//!
//! Memory, in bytes, for `n` cached tokens (f32, `H_kv` kv heads, head dim `d`, value dim
//! `d_v`, window `w`):
//!
//! ```text
//! KvCache            4 H_kv ( n (d + d_v)  +  min(n, w) d  +  [n d if raw keys are kept] )
//! KvCacheRerotating  4 H_kv   n (d + d_v)
//! ```
//!
//! i.e. a plain RoPE cache plus `w x d` per kv head, plus one more key copy per kv head
//! for a length-dependent scheme with a map other than ReRoPE. Each buffer is contiguous
//! per kv head (`[tokens, d]` row-major), so a decode step reads every key and value
//! once, as a plain RoPE step does. [`KvCache::memory_bytes`] returns this figure (the
//! allocator's slack is not counted).
//!
//! ## Length-dependent schemes
//! Dynamic NTK and LongRoPE ([`crate::Scaling::is_length_dependent`]) choose their
//! frequencies from the sequence length. Keys cached under older frequencies are stale
//! (transformers issue 25104; LongRoPE's short-to-long switch), so these caches never
//! serve them: whenever the frequencies in force change, every cached rotated key is
//! re-rotated from the raw keys.
//!
//! **Which length selects the frequencies.** As in transformers, a forward pass uses the
//! frequencies for its sequence length, the largest position it touches plus one. For
//! the cache that is its length `n` after the append (every query attends at a
//! position `< n`). The frequencies in force are
//! `config.frequencies_for_len(L)` with `L` from the [`RefreshPolicy`]:
//! - [`RefreshPolicy::EveryChange`]: `L = n`. Each attention equals a fresh prefill of
//!   the `n` cached tokens. Dynamic NTK changes its base at every append past `L0`, so
//!   every such append re-rotates the whole cache (`O(n d)` trigonometry per step).
//! - [`RefreshPolicy::PowerOfTwo`]: `L = n` while `n <= L0` (both schemes are constant
//!   there), else `L = n.next_power_of_two()`. Frequencies change at most when `n`
//!   first exceeds `L0` and when it passes a power of two: `O(log n)` re-rotations. `L`
//!   rounds up, so dynamic NTK's scaling always covers every cached position.
//!
//! LongRoPE switches from short to long factors exactly once, when `n` first exceeds
//! `L0`, under either policy. Schemes that do not depend on the length never re-rotate
//! and keep no raw keys.
//!
//! ## NaN
//! NaN or infinity in a cached key or value propagates to the output rows of every query
//! that sees that key (all of them after it); NaN in a query makes that query's rows NaN.
//! Nothing else is affected, and finite logits of any size never produce NaN (the
//! softmax subtracts the row maximum).

use ndarray::{Array3, ArrayView3, s};

use super::Attention;
use super::kernels::{Kernels, MatMut, MatRef};
use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::{Piece, PositionFn, PositionMap, Region};
use crate::rotary::{Layout, log_n_scale, rotate_lane_with};
use crate::scaling::{RopeConfig, Scaling};

/// When a cache recomputes the frequencies of a length-dependent scheme, and so
/// re-rotates its cached keys (see the [module docs](self)).
///
/// With `n` the cache length after an append and `L0` the scheme's
/// `original_max_position_embeddings`, the frequencies in force are
/// `config.frequencies_for_len(L)` with `L = self.frequency_len(scaling, n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefreshPolicy {
    /// `L = n`: the frequencies for the current length at every append, transformers'
    /// semantics for the sequence being attended. Dynamic NTK re-rotates at every
    /// append past `L0`.
    #[default]
    EveryChange,
    /// `L = n` while `n <= L0`, else `L = n.next_power_of_two()`: at most
    /// `1 + ceil(log2(n / L0))` re-rotations over a whole generation.
    PowerOfTwo,
}

impl RefreshPolicy {
    /// The sequence length whose frequencies are in force once the cache holds `len`
    /// tokens (see the type docs). Schemes that ignore the length ignore this too.
    ///
    /// ```
    /// use ropex::{Scaling, attention::decode::RefreshPolicy};
    /// let dynamic = Scaling::dynamic(2.0, 100);
    /// assert_eq!(RefreshPolicy::EveryChange.frequency_len(&dynamic, 130), 130);
    /// assert_eq!(RefreshPolicy::PowerOfTwo.frequency_len(&dynamic, 90), 90);
    /// assert_eq!(RefreshPolicy::PowerOfTwo.frequency_len(&dynamic, 130), 256);
    /// ```
    pub fn frequency_len(self, scaling: &Scaling, len: usize) -> usize {
        match self {
            RefreshPolicy::EveryChange => len,
            RefreshPolicy::PowerOfTwo => match length_threshold(scaling) {
                Some(l0) if len > l0 => len.checked_next_power_of_two().unwrap_or(len),
                _ => len,
            },
        }
    }
}

/// `L0` of a length-dependent scheme: the length up to which its frequencies are fixed.
fn length_threshold(scaling: &Scaling) -> Option<usize> {
    match scaling {
        Scaling::Dynamic {
            original_max_position_embeddings,
            ..
        } => Some(*original_max_position_embeddings),
        Scaling::LongRope(l) => Some(l.original_max_position_embeddings),
        _ => None,
    }
}

/// The operations shared by [`KvCache`] and [`KvCacheRerotating`], so that tests and
/// benches can drive either.
pub trait DecodeCache {
    /// Appends keys `[c, H_kv, d]` and values `[c, H_kv, d_v]` at positions
    /// `len() .. len() + c`.
    fn append(&mut self, k: ArrayView3<f32>, v: ArrayView3<f32>) -> Result<()>;
    /// Attends queries `[n_q, H_q, d]` at positions `q_pos` (each `< len()`) to the
    /// cached keys at positions `<= q_pos`; returns `[n_q, H_q, d_v]`.
    fn attend(&self, q: ArrayView3<f32>, q_pos: &[usize]) -> Result<Array3<f32>>;
    /// Chunked prefill: appends a chunk of `c` tokens, then attends its `c` queries at
    /// their own positions. On error the cache is unchanged.
    fn prefill_chunk(
        &mut self,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<Array3<f32>>;
    /// Number of cached tokens `n`.
    fn len(&self) -> usize;
    /// True when nothing is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of cached data (see the memory formula in the [module docs](self)).
    fn memory_bytes(&self) -> usize;
}

/// cos/sin of `p * inv_freq_j` for one position, computed in f64 and cast to f32. No
/// attention factor: the cache puts `m^2` into the logit scale, as
/// [`Attention::scale_for`] does.
#[derive(Debug)]
struct Trig {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Trig {
    fn new(pairs: usize) -> Self {
        Trig {
            cos: vec![0.0; pairs],
            sin: vec![0.0; pairs],
        }
    }

    fn set(&mut self, inv_freq: &[f64], position: f64) {
        for ((c, s), w) in self.cos.iter_mut().zip(self.sin.iter_mut()).zip(inv_freq) {
            let (sv, cv) = (position * w).sin_cos();
            *c = cv as f32;
            *s = sv as f32;
        }
    }

    fn rotate(&self, lane: &mut [f32], layout: Layout) {
        rotate_lane_with(lane, &self.cos, &self.sin, layout);
    }
}

use super::rotated::dot;

/// Appends row `(t, g)` of `x` (`[c, H, d]`) to `buf`: one slice copy when the row is
/// contiguous (amortised `Vec` growth, no per-element push).
fn extend_row(buf: &mut Vec<f32>, x: &ArrayView3<f32>, t: usize, g: usize) {
    let row = x.slice(s![t, g, ..]);
    match row.as_slice() {
        Some(r) => buf.extend_from_slice(r),
        None => buf.extend(row.iter()),
    }
}

/// Appends head `g` of every token of `x` (`[c, H, d]`) to `buf`.
fn extend_head(buf: &mut Vec<f32>, x: &ArrayView3<f32>, g: usize) {
    let (c, _, d) = x.dim();
    buf.reserve(c * d);
    for t in 0..c {
        extend_row(buf, x, t, g);
    }
}

/// Softmax of each `n`-long row of `scores` (one row per query head of a group) with
/// the row maximum subtracted, in f32, then `sum_j p_j v_j` into `out` (`[rows, d_v]`),
/// with the vectorised exp and one streaming pass over the values
/// ([`Kernels::pv_gemv`]). A NaN score makes its whole row NaN.
fn softmax_times_values(
    kern: Kernels,
    scores: &mut [f32],
    n: usize,
    values: &[f32],
    dv: usize,
    out: &mut [f32],
) {
    let rows = scores.len() / n.max(1);
    let mut denoms = [0f32; 16];
    let mut heap;
    let denoms: &mut [f32] = if rows <= denoms.len() {
        &mut denoms[..rows]
    } else {
        heap = vec![0f32; rows];
        &mut heap
    };
    for (row, denom) in scores.chunks_exact_mut(n.max(1)).zip(denoms.iter_mut()) {
        let max = kern.row_max(row);
        // exp(NaN) stays NaN, so a NaN score makes the sum, and so the row, NaN.
        *denom = kern.exp_sub_sum(row, max);
    }
    out.fill(0.0);
    if dv == 0 || n == 0 {
        return;
    }
    kern.pv_gemv(
        mat(scores, rows, n, n),
        mat(&values[..n * dv], n, dv, dv),
        mat_mut(out, rows, dv, dv),
    )
    .expect("decode shapes are consistent");
    for (acc, &denom) in out.chunks_exact_mut(dv).zip(denoms.iter()) {
        kern.scale(acc, 1.0 / denom);
    }
}

fn mat(data: &[f32], rows: usize, cols: usize, stride: usize) -> MatRef<'_> {
    MatRef::new(data, rows, cols, stride).expect("decode shapes are consistent")
}

fn mat_mut(data: &mut [f32], rows: usize, cols: usize, stride: usize) -> MatMut<'_> {
    MatMut::new(data, rows, cols, stride).expect("decode shapes are consistent")
}

/// Largest number of key/value heads a cache accepts.
pub const MAX_HEADS: usize = 1 << 16;
/// Largest key or value head dim a cache accepts.
pub const MAX_HEAD_DIM: usize = 1 << 20;

/// One empty buffer per kv head, allocated fallibly.
fn per_head(heads: usize) -> Result<Vec<Vec<f32>>> {
    let mut v = Vec::new();
    v.try_reserve_exact(heads).map_err(|_| {
        RopeError::invalid("heads_kv", heads, "could not allocate one buffer per head")
    })?;
    v.resize_with(heads, Vec::new);
    Ok(v)
}

/// State shared by both caches: the description, the frequencies in force, the values.
#[derive(Debug, Clone, PartialEq)]
struct Core {
    config: RopeConfig,
    layout: Layout,
    map: PositionMap,
    heads_kv: usize,
    head_dim: usize,
    value_dim: usize,
    scale: Option<f64>,
    log_n_train_len: Option<usize>,
    policy: RefreshPolicy,
    /// The frequencies every cached rotated key is currently rotated with.
    freqs: Frequencies,
    /// The length `L` that selected `freqs`.
    freq_len: usize,
    refreshes: usize,
    len: usize,
    /// Per kv head, `[len, value_dim]`.
    values: Vec<Vec<f32>>,
}

impl Core {
    fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        heads_kv: usize,
        head_dim: usize,
        value_dim: usize,
    ) -> Result<Self> {
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
            policy,
            freqs,
            freq_len,
            refreshes: 0,
            len: 0,
            values: per_head(heads_kv)?,
        })
    }

    fn set_scale(&mut self, scale: f64) -> Result<()> {
        crate::error::check_positive("attention scale", scale)?;
        self.scale = Some(scale);
        Ok(())
    }

    fn set_log_n(&mut self, train_len: usize) -> Result<()> {
        if train_len < 2 {
            return Err(RopeError::invalid(
                "log-n train_len",
                train_len,
                "must be >= 2",
            ));
        }
        self.log_n_train_len = Some(train_len);
        Ok(())
    }

    /// The frequencies that must be in force at cache length `len`, if they differ from
    /// the current ones; updates the selecting length either way.
    fn frequencies_at(&mut self, len: usize) -> Option<Frequencies> {
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
    fn attention(&self) -> Attention {
        Attention {
            freqs: self.freqs.clone(),
            layout: self.layout,
            map: self.map,
            causal: true,
            scale: self.scale,
            log_n_train_len: self.log_n_train_len,
            mask: super::Mask::NONE,
        }
    }

    /// `scale * s_i` for a query at `position`.
    fn query_factor(&self, position: usize) -> f32 {
        let scale = super::logit_scale(&self.freqs, self.scale, self.head_dim);
        let s = self
            .log_n_train_len
            .map_or(1.0, |l| log_n_scale(position, l))
            * self.map.query_scale(position);
        (scale * s) as f32
    }

    /// Checks a chunk of keys and values; returns its length.
    fn check_kv(&self, k: &ArrayView3<f32>, v: &ArrayView3<f32>) -> Result<usize> {
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
        if self
            .len
            .checked_add(c)
            .is_none_or(|n| n > crate::position::MAX_POSITION)
        {
            return Err(RopeError::invalid(
                "cache length",
                format!("{} + {c}", self.len),
                format!(
                    "must stay <= {} (2^53 positions: angles are computed in f64)",
                    crate::position::MAX_POSITION
                ),
            ));
        }
        Ok(c)
    }

    /// Checks the shape of queries against `n_q` positions; returns the GQA group size.
    fn check_q_shape(&self, q: &ArrayView3<f32>, n_pos: usize) -> Result<usize> {
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
    fn check_chunk(
        &self,
        q: &ArrayView3<f32>,
        k: &ArrayView3<f32>,
        v: &ArrayView3<f32>,
    ) -> Result<usize> {
        let c = self.check_kv(k, v)?;
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
    fn check_queries(&self, q: &ArrayView3<f32>, q_pos: &[usize]) -> Result<usize> {
        let group = self.check_q_shape(q, q_pos.len())?;
        if let Some((a, &p)) = q_pos.iter().enumerate().find(|(_, p)| **p >= self.len) {
            return Err(RopeError::invalid(
                format!("q_pos[{a}]"),
                p,
                format!(
                    "must be < the cache length {} (a query attends to cached keys at positions <= its own; append its key first)",
                    self.len
                ),
            ));
        }
        Ok(group)
    }

    fn push_values(&mut self, v: &ArrayView3<f32>) {
        for (g, buf) in self.values.iter_mut().enumerate() {
            extend_head(buf, v, g);
        }
    }

    /// Copies query token `a` of `q` into `buf` (`[H_q, d]`), times `factor`.
    fn load_query(q: &ArrayView3<f32>, a: usize, factor: f32, buf: &mut [f32]) {
        for (dst, &src) in buf.iter_mut().zip(q.slice(s![a, .., ..]).iter()) {
            *dst = src * factor;
        }
    }
}

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
/// head (see the [module docs](self) for what is stored and its memory).
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
/// let mut cache = KvCache::new(cfg.clone(), Layout::Half, map, heads_kv, d, d)?;
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
    /// An empty cache for `heads_kv` key/value heads of dims `head_dim` (`>=` the rotary
    /// dim; dims past it pass through) and `value_dim`.
    ///
    /// Frequencies come from `config` (`config.frequencies_for_len(L)`, see
    /// [`RefreshPolicy`]); `layout` pairs the dims; `map` is validated (window 0 or a
    /// bad leak is an error). Causal, default scale, no log-n, [`RefreshPolicy::EveryChange`].
    pub fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        heads_kv: usize,
        head_dim: usize,
        value_dim: usize,
    ) -> Result<Self> {
        let core = Core::new(config, layout, map, heads_kv, head_dim, value_dim)?;
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
    /// (see the [module docs](self)).
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
            let runs = self.runs(region, i);
            let n = runs.last().map_or(0, |r| r.1);
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
            scores.resize(group * n, 0f32);
            for (g, (main, values)) in self.main.iter().zip(&self.core.values).enumerate() {
                let heads = g * group..(g + 1) * group;
                for &(lo, hi, p) in &runs {
                    if hi > lo && d > 0 {
                        kern.qk_gemv(
                            mat(&q_rot[p][heads.start * d..heads.end * d], group, d, d),
                            mat(&main[lo * d..hi * d], hi - lo, d, d),
                            mat_mut(&mut scores[lo..], group, hi - lo, n),
                            1.0,
                        )
                        .expect("decode shapes are consistent");
                    }
                }
                softmax_times_values(kern, &mut scores, n, values, dv, &mut acc);
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
            // Token offset of key `band_lo` among the rebuilt keys, if it left the ring.
            let rebuilt_at = rebuilt.offset_of(band_lo);
            scores.clear();
            scores.resize(group * n, 0f32);
            let per_head = self.main.iter().zip(&self.ring).zip(&self.core.values);
            for (g, ((main, ring), values)) in per_head.enumerate() {
                let heads = g * group..(g + 1) * group;
                // Scores of keys `lo..hi` (rows `at..` of `keys`) against `qs`.
                let mut gemv = |qs: &[f32], keys: &[f32], at: usize, lo: usize, hi: usize| {
                    if hi > lo && d > 0 {
                        kern.qk_gemv(
                            mat(&qs[heads.start * d..heads.end * d], group, d, d),
                            mat(&keys[at * d..(at + hi - lo) * d], hi - lo, d, d),
                            mat_mut(&mut scores[lo..], group, hi - lo, n),
                            1.0,
                        )
                        .expect("decode shapes are consistent");
                    }
                };
                // Main keys, one streaming pass.
                gemv(&q_main, main, 0, 0, band_lo);
                if let Some((w, _)) = self.band {
                    let rebuilt: &[f32] = rebuilt.keys.get(g).map_or(&[], Vec::as_slice);
                    // Band keys that left the ring (older queries of a chunk).
                    let split = ring_start.clamp(band_lo, n);
                    gemv(&q_near, rebuilt, rebuilt_at, band_lo, split);
                    // Band keys in the ring: at most two contiguous runs of slots.
                    let mut j = split;
                    while j < n {
                        let slot = j % w;
                        let end = n.min(j + (w - slot));
                        gemv(&q_near, ring, slot, j, end);
                        j = end;
                    }
                }
                softmax_times_values(kern, &mut scores, n, values, dv, &mut acc);
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

/// Su's decode (`bojone/rerope`), the baseline: caches raw keys and, at every step,
/// rotates every visible cached key by `-P(i, j)` and dots it with the unrotated query:
/// `score_ij = scale * s_i * q_i . R(-P(i, j)) k_j` (`= (R(P) q_i) . k_j`).
///
/// `O(n d)` trigonometry and rotation per query, against [`KvCache`]'s `O(d)`. Same
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
/// let mut su = KvCacheRerotating::new(cfg.clone(), Layout::Half, map, 1, 8, 8)?;
/// let mut ours = KvCache::new(cfg, Layout::Half, map, 1, 8, 8)?;
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
}

impl KvCacheRerotating {
    /// An empty cache; arguments and defaults as in [`KvCache::new`].
    pub fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        heads_kv: usize,
        head_dim: usize,
        value_dim: usize,
    ) -> Result<Self> {
        let core = Core::new(config, layout, map, heads_kv, head_dim, value_dim)?;
        Ok(KvCacheRerotating {
            core,
            keys: per_head(heads_kv)?,
        })
    }

    /// Overrides the logit scale (default `m^2 / sqrt(head_dim)`); finite and `> 0`.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        self.core.set_scale(scale)?;
        Ok(self)
    }

    /// Log-n query scaling with `train_len >= 2` (see [`KvCache::with_log_n`]).
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
        let floats: usize = self
            .keys
            .iter()
            .chain(&self.core.values)
            .map(Vec::len)
            .sum();
        floats * std::mem::size_of::<f32>()
    }

    /// The frequencies in force.
    pub fn frequencies(&self) -> &Frequencies {
        &self.core.freqs
    }

    /// The [`Attention`] this cache computes now (see [`KvCache::attention`]).
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
        for (g, keys) in self.keys.iter_mut().enumerate() {
            extend_head(keys, &k, g);
        }
        self.core.push_values(&v);
        self.core.len += c;
        if let Some(f) = self.core.frequencies_at(self.core.len) {
            self.core.freqs = f;
        }
        Ok(())
    }

    /// Attends queries at positions `q_pos` (each `< len()`), rotating every visible
    /// cached key by `-P(i, j)` (see the type docs); errors as [`KvCache::attend`].
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
        let kern = Kernels::active();
        let out_slice = out
            .as_slice_mut()
            .ok_or_else(|| RopeError::invalid("output", "non-contiguous", "internal"))?;
        for (a, &i) in q_pos.iter().enumerate() {
            Core::load_query(&q, a, self.core.query_factor(i), &mut qs);
            let n = i + 1;
            scores.clear();
            scores.resize(hkv * group * n, 0f32);
            for j in 0..n {
                if !self.core.map.sees(i, j) {
                    // A key the map hides (StreamingLLM): no weight.
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
                softmax_times_values(kern, rows, n, &self.core.values[g], dv, &mut acc);
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
        let c = self.core.check_chunk(&q, &k, &v)?;
        let start = self.core.len;
        self.append(k, v)?;
        let pos: Vec<usize> = (start..start + c).collect();
        self.attend(q, &pos)
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
