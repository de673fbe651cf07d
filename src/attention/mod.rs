//! Attention kernels that consume a [`PositionMap`]: the score between query `i` and key
//! `j` is that of plain RoPE at relative position `P(i, j)`.
//!
//! All kernels share one description, [`Attention`] (frequencies, layout, map, causal
//! flag, scale, optional log-n), and the same inputs:
//! - unrotated `q` shaped `[n_q, H_q, d]`, `k` shaped `[n_k, H_kv, d]` and `v` shaped
//!   `[n_k, H_kv, d_v]`, with `H_q` a multiple of `H_kv` (grouped-query attention: query
//!   head `h` reads kv head `h / (H_q / H_kv)`);
//! - the position of every query and every key (`q_pos`, `k_pos`). With `causal`, key
//!   `j` is visible to query `i` iff `k_pos[j] <= q_pos[i]`.
//!
//! A [`Mask`] (sliding window, chunked attention) removes entries on top of causality
//! and the map ([`Attention::with_sliding_window`], [`Attention::with_chunked`]).
//!
//! The output is `[n_q, H_q, d_v]`:
//! `o_i = sum_j softmax_j(scale * s_i * (R(P(i,j)) q_i) . k_j) v_j` with `s_i` the log-n
//! factor (1 without log-n) and `scale` defaulting to `m^2 / sqrt(d)`, `m` the
//! frequencies' attention factor.
//!
//! A query with no visible key (every key after it under `causal`, or every key hidden
//! by the mask or the map) gets a zero output row. NaN or infinity in an input row
//! propagates only to the outputs that attend to it; finite logits of any size (1e4
//! included) never produce NaN.
//!
//! The kernels:
//! - [`Attention::reference`] ([`mod@reference`]): slow, obviously correct, f64; the oracle
//!   every other kernel is tested against;
//! - [`Attention::two_pass`] ([`two_pass`]): Su's method, one full score matrix per
//!   piece and a band select; the naive baseline;
//! - [`Attention::tiled`] / [`Attention::tiled_with`] ([`tiled`]): band-classified tiles
//!   with online softmax, parallel and memory-light; the default;
//! - [`Attention::run`] with a [`Kernel`] picks one of the three;
//! - [`decode`]: decoding against a KV cache that stores each piece's keys once
//!   ([`KvCache`]), with Su's re-rotating decode ([`KvCacheRerotating`]) as the baseline.
//!
//! ## Element types, views, buffers, batches and threads
//! The prefill kernels are generic over the [`Element`] type of q, k, v and the output
//! (f32, bf16, f16): inputs are widened to f32 as they are loaded, scores, softmax and
//! accumulation run in f32 (the reference kernel: f64), angles in f64, and the output
//! is rounded once when stored. Inputs are [`View3`]s (any strides, so both
//! `[tokens, heads, dim]` and `[heads, tokens, dim]` memory is read in place; an
//! ndarray view converts with `.into()`).
//!
//! Every kernel has an `_into` form writing into a caller's [`View3Mut`]
//! ([`Attention::run_into`], [`Attention::tiled_into`], ...); the allocating form calls
//! it. [`Attention::run_into_reusing`] also keeps the tiled kernel's large buffers in a
//! caller's [`TiledScratch`] across calls (every layer, every prompt chunk), so repeated
//! prefills do not allocate, and fault in, the same memory again. [`Attention::varlen`] runs a batch of variable-length sequences packed along the
//! token axis ([`VarLen`], flash-attention's `cu_seqlens`) in one call.
//!
//! Parallel kernels use the rayon pool they are called from: the global pool, or a
//! caller's pool through `pool.install(|| ...)`. [`Attention::with_parallel`]`(false)`
//! runs them on the calling thread alone. The output is bit-identical either way.
//!
//! ### Error bounds per element type
//! Rounding an input to a type of unit roundoff `u` ([`Element::UNIT_ROUNDOFF`]:
//! f32 `2^-24`, bf16 `2^-8`, f16 `2^-11`) perturbs each element by at most `u` of its
//! size. A score `s_ij = c_i (R q_i) . k_j` (rotations preserve norms) then moves by at
//! most `eps_i = c_i (2u + u^2) |q_i| max_j |k_j|` (Cauchy-Schwarz). Softmax weights
//! `p_j ∝ e^(s_j)` change by a factor in `[e^(-2 eps_i), e^(2 eps_i)]`, so the output row
//! `o_i = sum_j p_j v_j` moves by at most `(e^(2 eps_i) - 1) max_j |v_j|`; the values'
//! own rounding adds `u max_j |v_j|` and the output store `u |o_i|`. tests/half_precision.rs
//! checks every prefill kernel in each type against the f64 reference on the unrounded
//! f32 inputs within this bound (plus the f32 kernels' own `1e-5`).
//!
//! ### bf16 products
//! On CPUs with AVX512_BF16 the tiled kernel may compute `Q K^T` and `P V` of bf16
//! inputs with bf16 operands and f32 sums ([`Bf16Products`],
//! [`Attention::with_bf16_products`]; by default where that is faster, i.e. where the
//! instruction outruns f32 FMAs, as on AMD Zen 4). The rotated, scaled query and the
//! rotated key are then rounded once more (each product is off by at most
//! `(1 + u)^4 - 1 <= 4u + 7u^2` of `|q_i| |k_j|` instead of `2u + u^2`), and so is each
//! probability before `P V` (another `u max_j |v_j|`): the bound becomes
//! `(e^(2 eps'_i) - 1) vmax + 2u vmax + u |o_i|` with `eps'_i = c_i (4u + 7u^2) |q_i|
//! max_j |k_j|`, `u = 2^-8`. tests/half_precision.rs checks it for every map.
//!
//! The crate-private `kernels` module holds the low-level SIMD primitives (tile GEMMs,
//! decode GEMVs, vectorised exp) the fast kernels are built from; the environment
//! variable `ROPEX_KERNELS` (`portable`, `avx2`, `avx512`) caps the instruction set they
//! use, and the non-default feature `bench-internals` exposes them to the benches.

pub mod decode;
#[cfg(feature = "bench-internals")]
pub mod kernels;
#[cfg(not(feature = "bench-internals"))]
#[allow(dead_code)]
pub(crate) mod kernels;
mod mask;
mod planner;
pub mod reference;
mod rotated;
pub mod tiled;
pub mod two_pass;
mod varlen;

pub use mask::{Mask, MaskCover};
pub use tiled::{
    Bf16Products, TileConfig, TileStats, TiledScratch, expected_chunked_computed_tiles,
    expected_sliding_window_computed_tiles, expected_straddling_tiles, straddling_tiles_square,
};

pub use crate::position::TileBounds;
pub use varlen::VarLen;

pub use decode::{
    BatchScratch, BlockId, BlockPool, CacheShape, DecodeCache, DecodeScratch, KvCache,
    KvCacheRerotating, PagedKvCache, RefreshPolicy, SeqId,
};

use ndarray::Array3;

use crate::error::{Result, RopeError};
use crate::frequencies::Frequencies;
use crate::position::{PositionMap, check_positions};
use crate::rotary::Layout;
use crate::tensor::{Element, View3, View3Mut};

/// What an attention call computes: frequencies, layout, position map and options.
///
/// ```
/// use ndarray::Array3;
/// use ropex::{attention::Attention, Layout, PositionMap, RopeConfig};
/// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
/// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(2)?);
/// let q = Array3::<f32>::ones((4, 2, 8));
/// let kv = Array3::<f32>::ones((4, 1, 8));
/// let pos = [0, 1, 2, 3];
/// let out = att.reference(q.view(), kv.view(), kv.view(), &pos, &pos)?;
/// assert_eq!(out.dim(), (4, 2, 8));
/// # Ok::<(), ropex::RopeError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    freqs: Frequencies,
    layout: Layout,
    map: PositionMap,
    causal: bool,
    scale: Option<f64>,
    log_n_train_len: Option<usize>,
    dca_train_len: Option<usize>,
    mask: Mask,
    parallel: bool,
    bf16_products: Bf16Products,
}

/// Which kernel computes an [`Attention`] ([`Attention::run`]): the f64 reference, Su's
/// two-pass baseline, or the tiled kernel (the default) with its tile sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// [`Attention::reference`].
    Reference,
    /// [`Attention::two_pass`].
    TwoPass,
    /// [`Attention::tiled_with`] with these tiles; [`TileConfig::DEFAULT`] (what
    /// `Kernel::default()` holds) lets the planner choose them per call (shape, map,
    /// instruction set, threads; the rules and the measurements behind them are in `src/attention/planner.rs`).
    Tiled(TileConfig),
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel::Tiled(TileConfig::DEFAULT)
    }
}

impl std::str::FromStr for Kernel {
    type Err = RopeError;

    /// `reference`, `two-pass` or `tiled` (default 64 x 64 tiles).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" => Ok(Kernel::Reference),
            "two-pass" | "two_pass" => Ok(Kernel::TwoPass),
            "tiled" => Ok(Kernel::default()),
            _ => Err(RopeError::invalid(
                "kernel",
                s,
                "expected reference, two-pass or tiled",
            )),
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernel::Reference => "reference",
            Kernel::TwoPass => "two-pass",
            Kernel::Tiled(_) => "tiled",
        })
    }
}

/// The logit scale: `explicit`, or `m^2 / sqrt(head_dim)` with `m` the frequencies'
/// attention factor. The one place every kernel and cache takes it from.
pub(crate) fn logit_scale(freqs: &Frequencies, explicit: Option<f64>, head_dim: usize) -> f64 {
    explicit.unwrap_or_else(|| {
        let m = freqs.attention_factor();
        m * m / (head_dim as f64).sqrt()
    })
}

/// ChunkLlama's logit factor for `n` keys and training length `train_len`:
/// `(0.05 ln(n / train_len) + 1)^2` for `n > train_len`, else 1 (queries and keys each
/// carry one factor `0.05 ln(n/L) + 1`, multiplied into their cos/sin tables in the
/// authors' code).
pub fn dca_logit_factor(n: usize, train_len: usize) -> f64 {
    if n <= train_len || train_len == 0 {
        return 1.0;
    }
    let m = 0.05 * (n as f64 / train_len as f64).ln() + 1.0;
    m * m
}

/// The sizes of one validated attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Number of queries.
    pub n_q: usize,
    /// Number of keys (and values).
    pub n_k: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Query/key head dim.
    pub head_dim: usize,
    /// Value head dim.
    pub value_dim: usize,
}

impl Dims {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
}

impl Attention {
    /// Causal attention with the default scale and no log-n.
    pub fn new(freqs: Frequencies, layout: Layout, map: PositionMap) -> Self {
        Attention {
            freqs,
            layout,
            map,
            causal: true,
            scale: None,
            log_n_train_len: None,
            dca_train_len: None,
            mask: Mask::NONE,
            parallel: true,
            bf16_products: Bf16Products::Auto,
        }
    }

    /// Whether the tiled kernel computes the tile products of bf16 inputs with bf16
    /// operands (see [`Bf16Products`]; the default, `Auto`, does where the CPU runs them
    /// faster than f32). Other element types and kernels are unaffected.
    ///
    /// ```
    /// # #[cfg(feature = "half")] {
    /// use half::bf16;
    /// use ndarray::Array3;
    /// use ropex::attention::{Attention, Bf16Products};
    /// use ropex::{Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::Rope);
    /// let x = Array3::from_elem((40, 2, 8), bf16::from_f32(0.25));
    /// let pos: Vec<usize> = (0..40).collect();
    /// let f32_products = att.clone().with_bf16_products(Bf16Products::Off);
    /// let a = f32_products.tiled(x.view(), x.view(), x.view(), &pos, &pos)?;
    /// let b = att.with_bf16_products(Bf16Products::On).tiled(x.view(), x.view(), x.view(), &pos, &pos)?;
    /// // Every value is 0.25 here, exact in bf16 either way.
    /// assert_eq!(a, b);
    /// # }
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn with_bf16_products(mut self, mode: Bf16Products) -> Self {
        self.bf16_products = mode;
        self
    }

    /// The bf16-products setting ([`Attention::with_bf16_products`]).
    pub fn bf16_products(&self) -> Bf16Products {
        self.bf16_products
    }

    /// With `false`, every kernel call runs on the calling thread alone (no rayon task
    /// is spawned); with `true` (the default, feature `rayon`) kernels split their work
    /// over the rayon pool they are called from: the global one, or a caller's
    /// `ThreadPool` through `pool.install(|| att.tiled(..))`. Results are bit-identical
    /// for every choice and thread count.
    ///
    /// ```
    /// use ndarray::Array3;
    /// use ropex::{attention::Attention, Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(2)?);
    /// let q = Array3::<f32>::from_elem((70, 2, 8), 0.3);
    /// let pos: Vec<usize> = (0..70).collect();
    /// let many = att.tiled(q.view(), q.view(), q.view(), &pos, &pos)?;
    /// let one = att.clone().with_parallel(false).tiled(q.view(), q.view(), q.view(), &pos, &pos)?;
    /// assert_eq!(many, one);
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    pub fn with_parallel(mut self, parallel: bool) -> Self {
        self.parallel = parallel;
        self
    }

    /// Whether kernels may split their work over rayon threads
    /// ([`Attention::with_parallel`]; always `false` without the `rayon` feature).
    pub fn parallel(&self) -> bool {
        self.parallel && cfg!(feature = "rayon")
    }

    /// Adds a sliding-window mask: key `j` visible from query `i` iff
    /// `|i - j| < window` (see [`Mask`]).
    pub fn with_sliding_window(mut self, window: usize) -> Result<Self> {
        self.mask = self.mask.with_sliding_window(window)?;
        Ok(self)
    }

    /// Adds chunked attention: key `j` visible from query `i` iff
    /// `floor(i / chunk) = floor(j / chunk)` (see [`Mask`]).
    pub fn with_chunked(mut self, chunk: usize) -> Result<Self> {
        self.mask = self.mask.with_chunked(chunk)?;
        Ok(self)
    }

    /// Replaces the mask.
    pub fn with_mask(mut self, mask: Mask) -> Result<Self> {
        mask.validate()?;
        self.mask = mask;
        Ok(self)
    }

    /// The mask.
    pub fn mask(&self) -> Mask {
        self.mask
    }

    /// Runs `kernel` (see [`Kernel`]); the tile counts are returned by the tiled kernel
    /// only. Allocates the output and calls [`Attention::run_into`].
    pub fn run<'a, T: Element>(
        &self,
        kernel: Kernel,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<(Array3<T>, Option<TileStats>)> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let mut out = self.output_for(&q, &k, &v, q_pos, k_pos)?;
        let stats = self.run_into(kernel, q, k, v, q_pos, k_pos, &mut out)?;
        Ok((out, stats))
    }

    /// Runs `kernel` writing into `out` (`[n_q, H_q, d_v]`, any strides; a typed error
    /// when its dims differ). Every element of `out` is written.
    ///
    /// ```
    /// # #[cfg(feature = "half")] {
    /// use half::bf16;
    /// use ropex::attention::{Attention, Kernel};
    /// use ropex::tensor::{View3, View3Mut};
    /// use ropex::{Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(2)?);
    /// // candle-style (H, T, D) bf16 buffers: 2 heads, 5 tokens, d = 8
    /// let x: Vec<bf16> = (0..80).map(|i| bf16::from_f32((i % 7) as f32 * 0.1)).collect();
    /// let q = View3::heads_tokens_dim(&x, 2, 5, 8)?;
    /// let mut buf = vec![bf16::ZERO; 80];
    /// let out = View3Mut::heads_tokens_dim(&mut buf, 2, 5, 8)?;
    /// let pos = [0, 1, 2, 3, 4];
    /// att.run_into(Kernel::default(), q, q, q, &pos, &pos, out)?;
    /// assert!(buf.iter().any(|x| x.to_f32() != 0.0));
    /// # }
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn run_into<'a, 'o, T: Element>(
        &self,
        kernel: Kernel,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        out: impl Into<View3Mut<'o, T>>,
    ) -> Result<Option<TileStats>> {
        match kernel {
            Kernel::Reference => self
                .reference_into(q, k, v, q_pos, k_pos, out)
                .map(|_| None),
            Kernel::TwoPass => self.two_pass_into(q, k, v, q_pos, k_pos, out).map(|_| None),
            Kernel::Tiled(_) => {
                let mut scratch = TiledScratch::new();
                self.run_into_reusing(kernel, q, k, v, q_pos, k_pos, out, &mut scratch)
            }
        }
    }

    /// [`Attention::run_into`] in the memory of `scratch`: the tiled kernel reuses the
    /// packed keys, the value copy, the trigonometry tables and (on one thread) the
    /// per-task buffers of the previous call, so repeated prefills of one size (every
    /// layer of a model, every chunk of a long prompt) allocate nothing large after the
    /// first. The output equals [`Attention::run_into`]'s bit for bit; the reference
    /// and two-pass kernels ignore `scratch`.
    ///
    /// ```
    /// use ndarray::Array3;
    /// use ropex::attention::{Attention, Kernel, TiledScratch};
    /// use ropex::{Layout, PositionMap, RopeConfig};
    /// let freqs = RopeConfig::new(8, 10_000.0)?.frequencies();
    /// let att = Attention::new(freqs, Layout::Half, PositionMap::rerope(16)?);
    /// let n = 64;
    /// let x = Array3::from_shape_fn((n, 2, 8), |(t, h, i)| ((t + 3 * h + i) % 7) as f32 * 0.1);
    /// let pos: Vec<usize> = (0..n).collect();
    /// let (mut out, mut scratch) = (Array3::<f32>::zeros((n, 2, 8)), TiledScratch::new());
    /// for _layer in 0..2 {
    ///     let k = Kernel::default();
    ///     att.run_into_reusing(k, x.view(), x.view(), x.view(), &pos, &pos, &mut out, &mut scratch)?;
    /// }
    /// assert!(scratch.capacity_bytes() > 0);
    /// assert_eq!(out, att.tiled(x.view(), x.view(), x.view(), &pos, &pos)?);
    /// # Ok::<(), ropex::RopeError>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn run_into_reusing<'a, 'o, T: Element>(
        &self,
        kernel: Kernel,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        k_pos: &[usize],
        out: impl Into<View3Mut<'o, T>>,
        scratch: &mut TiledScratch,
    ) -> Result<Option<TileStats>> {
        match kernel {
            Kernel::Tiled(tiles) => {
                let (q, k) = (q.into(), k.into());
                let [nq, hq, d] = q.dims();
                let [nk, hkv, _] = k.dims();
                let tiles = planner::resolve(tiles, &self.map, (nq, hq, d), (nk, hkv, d));
                self.tiled_into_in(q, k, v, q_pos, k_pos, &tiles, out, scratch)
                    .map(Some)
            }
            _ => self.run_into(kernel, q, k, v, q_pos, k_pos, out),
        }
    }

    /// `f` of every item, over rayon's pool when [`Attention::parallel`], in order.
    pub(crate) fn par_run<I: Send, R: Send>(
        &self,
        items: Vec<I>,
        f: impl Fn(I) -> R + Sync + Send,
    ) -> Vec<R> {
        #[cfg(feature = "rayon")]
        if self.parallel() {
            use rayon::prelude::*;
            return items.into_par_iter().map(f).collect();
        }
        items.into_iter().map(f).collect()
    }

    /// A zeroed output `[n_q, H_q, d_v]` for validated inputs (fallible allocation).
    pub(crate) fn output_for<T: Element>(
        &self,
        q: &View3<T>,
        k: &View3<T>,
        v: &View3<T>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Array3<T>> {
        let dims = self.validate(q, k, v, q_pos, k_pos)?;
        zeros3(dims.n_q, dims.heads_q, dims.value_dim)
    }

    /// Causal (default) or bidirectional attention.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Overrides the logit scale (applied to `q . k` of the unscaled rotation); must be
    /// finite and `> 0`.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        crate::error::check_positive("attention scale", scale)?;
        self.scale = Some(scale);
        Ok(self)
    }

    /// Log-n query scaling with training length `train_len >= 2`
    /// (see [`crate::log_n_scale`]).
    pub fn with_log_n(mut self, train_len: usize) -> Result<Self> {
        if train_len < 2 {
            return Err(RopeError::invalid(
                "log-n train_len",
                train_len,
                "must be >= 2",
            ));
        }
        self.log_n_train_len = Some(train_len);
        Ok(self)
    }

    /// Dual Chunk Attention's length-dependent logit scale (ChunkLlama): for `n` keys
    /// beyond the training length `train_len >= 1`, queries and keys are both scaled by
    /// `0.05 ln(n / train_len) + 1`, so every logit by its square
    /// ([`dca_logit_factor`]). `n` is the number of keys of the call (the sequence length
    /// of a prefill, the cache length of a decode step).
    pub fn with_dca_logit_scale(mut self, train_len: usize) -> Result<Self> {
        if train_len == 0 {
            return Err(RopeError::invalid(
                "DCA logit scale train_len",
                0,
                "must be >= 1",
            ));
        }
        self.dca_train_len = Some(train_len);
        Ok(self)
    }

    /// The training length of the DCA logit scale, if set.
    pub fn dca_train_len(&self) -> Option<usize> {
        self.dca_train_len
    }

    /// The logit factor for a call with `n_keys` keys: [`dca_logit_factor`] when the DCA
    /// logit scale is set, else 1.
    pub fn length_factor(&self, n_keys: usize) -> f64 {
        self.dca_train_len
            .map_or(1.0, |l| dca_logit_factor(n_keys, l))
    }

    /// The frequencies.
    pub fn frequencies(&self) -> &Frequencies {
        &self.freqs
    }

    /// The pairing layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The position map.
    pub fn map(&self) -> &PositionMap {
        &self.map
    }

    /// Whether attention is causal.
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// The log-n training length, if log-n scaling is on.
    pub fn log_n_train_len(&self) -> Option<usize> {
        self.log_n_train_len
    }

    /// The logit scale for head dim `head_dim`: the explicit one, or
    /// `m^2 / sqrt(head_dim)`.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        logit_scale(&self.freqs, self.scale, head_dim)
    }

    /// The per-query factor at `position`: the log-n scale (1 without log-n) times the
    /// map's query factor (Self-Extend's `scale_base` scaling; 1 for other maps).
    pub fn query_factor(&self, position: usize) -> f64 {
        self.log_n_train_len
            .map_or(1.0, |l| crate::rotary::log_n_scale(position, l))
            * self.map.query_scale(position)
    }

    /// Whether key position `kp` is visible from query position `qp`: causality, the
    /// map (StreamingLLM's hidden keys) and the mask.
    pub fn visible(&self, qp: usize, kp: usize) -> bool {
        (!self.causal || kp <= qp) && self.map.sees(qp, kp) && self.mask.allows(qp, kp)
    }

    /// The piece of `pieces` (this attention's map's) scoring entry `(qp, kp)`, or
    /// `None` when the entry is not visible.
    #[inline]
    pub(crate) fn entry(
        &self,
        pieces: &crate::position::Pieces,
        qp: usize,
        kp: usize,
    ) -> Option<usize> {
        if (self.causal && kp > qp) || !self.mask.allows(qp, kp) {
            return None;
        }
        pieces.index(qp, kp)
    }

    /// Checks shapes, head counts and positions; returns the sizes.
    pub fn validate<T>(
        &self,
        q: &View3<T>,
        k: &View3<T>,
        v: &View3<T>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Result<Dims> {
        self.map.validate()?;
        self.mask.validate()?;
        if !self.causal && self.map.is_causal_only() {
            return Err(RopeError::invalid(
                "causal",
                false,
                format!("the map {} is defined for causal attention only", self.map),
            ));
        }
        check_positions("q_pos", q_pos)?;
        check_positions("k_pos", k_pos)?;
        let [n_q, heads_q, head_dim] = q.dims();
        let [n_k, heads_kv, kd] = k.dims();
        let [n_v, heads_v, value_dim] = v.dims();
        if kd != head_dim {
            return Err(RopeError::shape("k head_dim", head_dim, kd));
        }
        if (n_v, heads_v) != (n_k, heads_kv) {
            return Err(RopeError::shape(
                "v [n_k, H_kv, d_v]",
                format!("[{n_k}, {heads_kv}, _]"),
                format!("[{n_v}, {heads_v}, {value_dim}]"),
            ));
        }
        if heads_kv == 0 || heads_q == 0 || heads_q % heads_kv != 0 {
            return Err(RopeError::shape(
                "query heads H_q",
                format!("a non-zero multiple of the key/value heads H_kv = {heads_kv}"),
                heads_q,
            ));
        }
        if head_dim < self.freqs.rotary_dim() {
            return Err(RopeError::shape(
                "head_dim",
                format!(">= rotary_dim ({})", self.freqs.rotary_dim()),
                head_dim,
            ));
        }
        if q_pos.len() != n_q {
            return Err(RopeError::shape(
                "q_pos",
                format!("one per query ({n_q})"),
                q_pos.len(),
            ));
        }
        if k_pos.len() != n_k {
            return Err(RopeError::shape(
                "k_pos",
                format!("one per key ({n_k})"),
                k_pos.len(),
            ));
        }
        Ok(Dims {
            n_q,
            n_k,
            heads_q,
            heads_kv,
            head_dim,
            value_dim,
        })
    }
}

/// Checks that `out` has the dims `[n_q, H_q, d_v]` of the call `dims`.
pub(crate) fn check_output<T>(dims: &Dims, out: &View3Mut<T>) -> Result<()> {
    let want = [dims.n_q, dims.heads_q, dims.value_dim];
    if out.dims() != want {
        return Err(RopeError::shape(
            "output [n_q, H_q, d_v]",
            format!("{want:?}"),
            format!("{:?}", out.dims()),
        ));
    }
    Ok(())
}

/// A zeroed `[a, b, c]` array, with a typed error when it cannot be allocated.
pub(crate) fn zeros3<T: Element>(a: usize, b: usize, c: usize) -> Result<Array3<T>> {
    let n = a.checked_mul(b).ok_or_else(|| {
        RopeError::shape(
            "output",
            "an element count that fits in usize",
            format!("[{a}, {b}, {c}]"),
        )
    })?;
    let mut data = crate::error::try_vec::<T>("attention output", n, c)?;
    data.resize(n * c, T::default());
    Array3::from_shape_vec((a, b, c), data)
        .map_err(|e| RopeError::shape("output", format!("[{a}, {b}, {c}]"), e.to_string()))
}
