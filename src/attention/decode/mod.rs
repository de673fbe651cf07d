//! Decoding against a KV cache: [`KvCache`], which stores each piece of a position map's
//! keys once, [`PagedKvCache`], the same in fixed-size blocks of a shared [`BlockPool`]
//! for many sequences (fork, truncate, batched decode; see [its module](paged)), and
//! [`KvCacheRerotating`], Su's re-rotating decode, kept as the baseline.
//!
//! ## What the cache computes
//! For a query `q_i` at position `i` and the cached keys `k_0 .. k_{n-1}` (positions
//! `0 .. n-1`, `i <= n - 1`), the output is the causal attention row of
//! [`crate::attention`]:
//! `o_i = sum_{j <= i} softmax_j(scale * s_i * (R(P(i,j)) q_i) . k_j) v_j`,
//! exactly what [`Attention::reference`](crate::attention::Attention::reference) computes for row `i` of a prefill over the
//! whole cached sequence.
//!
//! ## Per-piece key caches
//! A map is a few plain-RoPE pieces `P = f(i) - g(j)` and a region rule
//! ([`crate::Pieces`]). Because `(R(f) q) . (R(g) k) = q . R(g - f) k`, each piece only
//! needs its keys rotated once by `g(j)`, and each query rotated once by `f(i)`. Band
//! maps (ReRoPE, Leaky, Self-Extend) have two key functions; every other map has one
//! shared by all its pieces (DCA's `j mod c` for its three pieces, StreamingLLM's `j` for
//! window and sinks), so their keys are stored once and a step scores each run of keys
//! (DCA: inter-chunk, previous chunk, own chunk; StreamingLLM: sinks, window) against
//! that run's rotated query:
//! - **main keys**, every key, rotated by the key map of the far piece (or of the shared
//!   key function): `R(j) k_j` for RoPE and StreamingLLM, raw `k_j` for ReRoPE
//!   (`g = 0`), `R(j/k) k_j` for Leaky ReRoPE (fractional angles in f64, the result cast
//!   to f32), `R(j/s) k_j` for the interpolated map, `R(floor(j/G)) k_j` for
//!   Self-Extend, `R(j mod c) k_j` for DCA;
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
//! Memory, in bytes, for `n` cached tokens (`b` bytes per stored element: 4 for f32, 2
//! for bf16/f16; `H_kv` kv heads, head dim `d`, value dim `d_v`, window `w`):
//!
//! ```text
//! KvCache<S>         b H_kv ( n (d + d_v)  +  min(n, w) d  +  [n d if raw keys are kept] )
//! KvCacheRerotating  4 H_kv   n (d + d_v)
//! ```
//!
//! i.e. a plain RoPE cache plus `w x d` per kv head, plus one more key copy per kv head
//! for a length-dependent scheme with a map other than ReRoPE. A StreamingLLM cache
//! evicts: `n` is replaced by `min(n, S + W)` (the sinks stay in slots `0..S`, the window
//! is a ring over slots `S..S + W`), so its memory is bounded whatever the length; a
//! query can then only attend at the newest position, and a chunked prefill runs token by
//! token. Each buffer is contiguous
//! per kv head (`[tokens, d]` row-major), so a decode step reads every key and value
//! once, as a plain RoPE step does. [`KvCache::memory_bytes`] returns this figure (the
//! allocator's slack is not counted).
//!
//! ## Masks
//! Both caches take a sliding-window or chunked mask (`with_mask`, see
//! [`crate::attention::Mask`]): a causal query's visible keys are then a suffix
//! `lo..=i` (`lo = i + 1 - window`, or the start of `i`'s chunk), and a step scores only
//! those. Every key is still stored (a sliding-window cache does not evict).
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
//!
//! ## Storage types and buffers
//! Keys and values are stored as `S` ([`crate::Element`]: f32, bf16, f16), rounded once
//! after rotation in f32, and widened back on load inside the decode loops; scores,
//! softmax and `P V` run in f32. `attend_into` writes into a caller's
//! [`crate::View3Mut`] with a reusable [`DecodeScratch`] (a warm step allocates nothing).
//!
//! **bf16 products.** A bf16 cache may score its stored keys with `vdpbf16ps`
//! (AVX512_BF16) instead of widening them ([`KvCache::with_bf16_products`],
//! [`crate::attention::Bf16Products`]; by default where the instruction outruns f32 FMAs,
//! as on AMD Zen 4): each rotated, scaled query is rounded to bf16 once a step, and a
//! stored key row, being bf16 already, is a row of bf16 pairs as it lies. Products are
//! exact and sums f32. A logit `scale (R q) . k` then carries two roundings, the key's
//! into the cache and the query's, `|ds| <= scale ((1 + u)^2 - 1) |q|_2 |k|_2 =
//! scale (2u + u^2) |q|_2 |k|_2` (`u = 2^-8`, rotations keep norms) instead of
//! `scale u |q|_2 |k|_2`, and the softmax bound of [`crate::attention`] follows with that
//! `delta`; tests/paged.rs checks it for every map. llama.cpp's CPU flash attention
//! rounds the query to the cache's type the same way for its dot products. `P V` keeps
//! f32 products on widened values, since reading V, not arithmetic, bounds it. On one
//! AMD Zen 4 core (L = 32768, 32 / 8 heads, d = 128) a bf16 step took 8.7-9.5 ms with
//! them against 11.5-13 ms widening (the key GEMV was bound by its arithmetic: 3.6 ms
//! with the keys in L2, 1.95 ms with `vdpbf16ps`).
//!
//! ## Layout
//! [`RefreshPolicy`] (policy.rs), the state the caches share (shared.rs), the one decode
//! step every cache runs over runs of keys and values (step.rs), [`KvCache`]
//! (kv_cache.rs), [`PagedKvCache`] and [`BlockPool`] (paged.rs) and
//! [`KvCacheRerotating`] (rerotating.rs).

mod kv_cache;
mod paged;
mod policy;
mod rerotating;
mod shared;
mod step;

use ndarray::{Array3, ArrayView3};

pub use kv_cache::KvCache;
pub use paged::{BatchScratch, BlockId, BlockPool, PagedKvCache, SeqId};
pub use policy::RefreshPolicy;
pub use rerotating::KvCacheRerotating;
pub use shared::CacheShape;
pub use step::DecodeScratch;

/// A chunked prefill as both contiguous caches run it: `append` (validated, atomic),
/// then `attend` the chunk's `c` queries at positions `start .. start + c`.
fn append_then_attend<C>(
    cache: &mut C,
    start: usize,
    c: usize,
    append: impl FnOnce(&mut C) -> Result<()>,
    attend: impl FnOnce(&C, &[usize]) -> Result<Array3<f32>>,
) -> Result<Array3<f32>> {
    append(cache)?;
    let pos: Vec<usize> = (start..start + c).collect();
    attend(cache, &pos)
}

use crate::error::Result;

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
