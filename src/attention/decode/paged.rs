//! [`PagedKvCache`]: many sequences' keys and values in fixed-size blocks of one shared
//! [`BlockPool`], with block tables, copy-on-write forks, truncation and a batched decode.
//!
//! ## Blocks
//! The pool owns `capacity` blocks of `B` tokens (default [`PagedKvCache::DEFAULT_BLOCK`]
//! = 16, vLLM's), allocated once when the cache is built. A block holds, for each kv head
//! `g`, `P` key planes of `[B, d]` and one value plane `[B, d_v]`, row-major, all in the
//! storage type `S`. The pool stores each (head, plane) of all its blocks together,
//! block after block, so blocks with consecutive indices are contiguous per head and
//! plane and a step reads them as one run (a sequence appended in one go gets
//! consecutive blocks; a fork or a copy-on-write splits its runs only where blocks
//! differ):
//!
//! ```text
//! pool = [ head 0: keys plane 0 [capacity, B, d] | .. | keys plane P-1 | values [capacity, B, d_v] ]
//!        [ head 1: .. ] .. [ head H_kv - 1: .. ]
//! block i = rows i B .. (i + 1) B of every plane
//! ```
//!
//! Plane 0 holds the main keys `R(g_main(j)) k_j` (as [`super::KvCache`]'s main cache:
//! raw keys for ReRoPE, `R(j/k) k_j` for Leaky ReRoPE, `R(floor(j/G)) k_j` for
//! Self-Extend, `R(j mod c) k_j` for DCA, `R(j) k_j` for RoPE). A two-piece band map
//! (ReRoPE, Leaky ReRoPE, Self-Extend) adds plane 1, the near keys `R(j) k_j` of *every*
//! token: the per-piece keys live in the same blocks, so a map needs no second
//! allocator, and a fork, truncation or query at an older position never has to rebuild
//! a band key (the contiguous cache keeps only a ring of the last `w`).
//!
//! Token `j` of a sequence lives in block `table[j / B]`, slot `j mod B` (the slot
//! mapping); a sequence of `n` tokens holds `ceil(n / B)` blocks.
//!
//! ## Memory
//! ```text
//! block bytes = S::BYTES * H_kv * B * (P d + d_v)      P = 2 for band maps, else 1
//! pool bytes  = capacity * block bytes                 (BlockPool::memory_bytes)
//! used bytes  = live blocks * block bytes              (BlockPool::used_bytes)
//! ```
//! Forked sequences share their common full blocks, so the used bytes of `m` forks of an
//! `n`-token prompt are about `ceil(n / B) + m` blocks, not `m ceil(n / B)`.
//!
//! ## Copy-on-write
//! Every block has a reference count (one per sequence table that holds it).
//! [`PagedKvCache::fork`] copies the table and increments the counts: no data moves.
//! Writing a token into a block whose count is above one (the partial last block of a
//! forked sequence) first copies that block into a fresh one for the writer. Full blocks
//! are never written again, so they stay shared. [`PagedKvCache::truncate`] (speculative
//! decoding's rollback) drops the blocks past the new length and keeps stale slots of
//! the new last block, which the next append overwrites (after a copy if shared).
//! [`PagedKvCache::free_sequence`] releases every block of a sequence; a block returns
//! to the pool when its count reaches zero, and its generation changes, so a stale
//! [`BlockId`] is refused with [`RopeError::BadBlock`].
//!
//! ## What it computes
//! A query of sequence `s` at position `i` gets exactly [`super::KvCache`]'s row: same
//! pieces, rotations, scale, mask and the same decode step (one scoring / softmax /
//! `P V` path, fed one block per run), so it equals the contiguous cache up to the f32
//! summation order of `P V`. Not supported (typed errors at construction):
//! StreamingLLM (its cache evicts, which a shared prefix cannot), and length-dependent
//! schemes (dynamic NTK, LongRoPE: re-rotating shared blocks when one sequence grows
//! would change its forks' keys).
//!
//! ```
//! use ndarray::{Array3, s};
//! use ropex::{CacheShape, Layout, PositionMap, RopeConfig};
//! use ropex::attention::decode::{BatchScratch, PagedKvCache};
//!
//! let (hq, hkv, d) = (4, 2, 8);
//! let cfg = RopeConfig::new(d, 10_000.0)?;
//! let map = PositionMap::rerope(6)?;
//! // 8 blocks of 4 tokens.
//! let mut cache = PagedKvCache::new(cfg, Layout::Half, map, CacheShape::square(hkv, d), 4, 8)?;
//! let x = Array3::<f32>::from_shape_fn((12, hkv, d), |(t, h, i)| ((t * 7 + h + i) % 5) as f32 * 0.2);
//!
//! // A 10-token prompt, forked into two sequences that share its blocks.
//! let a = cache.add_sequence()?;
//! cache.append(a, x.slice(s![..10, .., ..]), x.slice(s![..10, .., ..]))?;
//! let b = cache.fork(a)?;
//! assert_eq!(cache.pool().used_blocks(), 3);
//!
//! // Each decodes its own next token: the shared partial block is copied on write.
//! cache.append(a, x.slice(s![10..11, .., ..]), x.slice(s![10..11, .., ..]))?;
//! cache.append(b, x.slice(s![11..12, .., ..]), x.slice(s![11..12, .., ..]))?;
//! assert_eq!(cache.pool().used_blocks(), 4);
//!
//! // One batched step for both (one query each, at its newest position).
//! let q = Array3::<f32>::from_elem((2, hq, d), 0.3);
//! let mut out = Array3::<f32>::zeros((2, hq, d));
//! cache.attend_batch(&[a, b], q.view(), &mut out, &mut BatchScratch::new())?;
//! let only_a = cache.attend(a, q.slice(s![..1, .., ..]), &[10])?;
//! assert!((&out.slice(s![..1, .., ..]) - &only_a).iter().all(|e| e.abs() < 1e-6));
//! # Ok::<(), ropex::RopeError>(())
//! ```

use std::sync::atomic::{AtomicU32, Ordering};

use ndarray::{Array3, ArrayView3, s};

use super::append_then_attend;
use super::shared::{CacheShape, Core, Trig, load_row, store_group};
use super::step::{DecodeScratch, KeySource, Rows, Runs, Step};
use crate::RopeConfig;
use crate::attention::{Attention, Bf16Products};
use crate::error::{Result, RopeError, try_vec};
use crate::position::{Piece, PositionMap, Region};
use crate::rotary::Layout;
use crate::tensor::{Element, View3, View3Mut};

/// A block of a [`BlockPool`]: its pool, index and generation (bumped every time the
/// block is freed, so an id kept past a free is detected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId {
    pool: u32,
    index: u32,
    generation: u32,
}

impl BlockId {
    /// The block's index in its pool (`0..capacity`).
    pub fn index(&self) -> usize {
        self.index as usize
    }
}

/// A sequence of a [`PagedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId(usize);

static NEXT_POOL: AtomicU32 = AtomicU32::new(0);

/// Fixed-size blocks of keys and values with reference counts (see the
/// [module docs](self) for a block's layout and the memory formula).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPool<S: Element = f32> {
    id: u32,
    block_tokens: usize,
    head_dim: usize,
    value_dim: usize,
    heads_kv: usize,
    planes: usize,
    /// `capacity * block_elems` elements.
    data: Vec<S>,
    refs: Vec<u32>,
    generation: Vec<u32>,
    /// Free block indices (a stack).
    free: Vec<u32>,
}

impl<S: Element> BlockPool<S> {
    fn new(shape: CacheShape, planes: usize, block_tokens: usize, capacity: usize) -> Result<Self> {
        if block_tokens == 0 {
            return Err(RopeError::invalid("block_tokens", 0, "must be >= 1"));
        }
        if capacity > u32::MAX as usize {
            return Err(RopeError::invalid(
                "capacity_blocks",
                capacity,
                format!("must be <= {}", u32::MAX),
            ));
        }
        let head = (planes * shape.head_dim + shape.value_dim)
            .checked_mul(block_tokens)
            .and_then(|x| x.checked_mul(shape.heads_kv));
        let block_elems = head.ok_or_else(|| RopeError::Allocation {
            what: format!("KV block of {block_tokens} tokens"),
            bytes: u128::MAX,
        })?;
        let mut data = try_vec::<S>(
            "KV block pool (blocks x block elements)",
            capacity,
            block_elems,
        )?;
        data.resize(capacity * block_elems, S::default());
        let mut refs = try_vec("KV block refcounts", capacity, 1)?;
        refs.resize(capacity, 0);
        let mut generation = try_vec("KV block generations", capacity, 1)?;
        generation.resize(capacity, 0);
        let mut free = try_vec("KV free list", capacity, 1)?;
        free.extend((0..capacity as u32).rev());
        Ok(BlockPool {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            block_tokens,
            head_dim: shape.head_dim,
            value_dim: shape.value_dim,
            heads_kv: shape.heads_kv,
            planes,
            data,
            refs,
            generation,
            free,
        })
    }

    /// Tokens per block `B`.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks in the pool.
    pub fn capacity(&self) -> usize {
        self.refs.len()
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.capacity() - self.free_blocks()
    }

    /// Key planes per kv head in a block: 2 for band maps, else 1.
    pub fn key_planes(&self) -> usize {
        self.planes
    }

    fn block_elems(&self) -> usize {
        self.heads_kv * self.block_tokens * (self.planes * self.head_dim + self.value_dim)
    }

    /// Bytes of one block: `S::BYTES H_kv B (P d + d_v)`.
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * S::BYTES
    }

    /// Bytes of the whole pool (allocated up front): `capacity * block_bytes`.
    pub fn memory_bytes(&self) -> usize {
        self.data.len() * S::BYTES
    }

    /// Bytes of the blocks in use: `used_blocks * block_bytes`.
    pub fn used_bytes(&self) -> usize {
        self.used_blocks() * self.block_bytes()
    }

    /// The reference count of a live block.
    pub fn refcount(&self, block: BlockId) -> Result<usize> {
        self.check(block).map(|i| self.refs[i] as usize)
    }

    /// Checks that `block` is a live block of this pool; returns its index.
    fn check(&self, block: BlockId) -> Result<usize> {
        let bad = |reason: String| RopeError::BadBlock {
            block: format!("{block:?}"),
            reason,
        };
        if block.pool != self.id {
            return Err(bad(format!(
                "it belongs to another pool (#{}), not this one (#{})",
                block.pool, self.id
            )));
        }
        let i = block.index as usize;
        if i >= self.capacity() {
            return Err(bad(format!(
                "index past the pool's {} blocks",
                self.capacity()
            )));
        }
        if self.refs[i] == 0 || self.generation[i] != block.generation {
            return Err(bad(
                "it was freed (a table may only name blocks its sequence still holds)".into(),
            ));
        }
        Ok(i)
    }

    fn exhausted(&self, needed: usize) -> Result<()> {
        if needed > self.free.len() {
            return Err(RopeError::PoolExhausted {
                needed,
                free: self.free.len(),
                capacity: self.capacity(),
            });
        }
        Ok(())
    }

    /// Takes a free block (refcount 1); callers check [`BlockPool::exhausted`] first.
    fn alloc(&mut self) -> Result<BlockId> {
        self.exhausted(1)?;
        let index = self.free.pop().expect("checked above");
        self.refs[index as usize] = 1;
        Ok(BlockId {
            pool: self.id,
            index,
            generation: self.generation[index as usize],
        })
    }

    /// Drops one reference; the block returns to the pool at zero.
    fn release(&mut self, block: BlockId) {
        let i = block.index as usize;
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            self.generation[i] = self.generation[i].wrapping_add(1);
            self.free.push(block.index);
        }
    }

    /// Where plane `plane` (`planes` = the values) of kv head `g` starts in `data`, and
    /// its row width: the plane holds `[capacity, B, width]`, block by block.
    fn plane(&self, g: usize, plane: usize) -> (usize, usize) {
        let rows = self.capacity() * self.block_tokens;
        let start = g * rows * (self.planes * self.head_dim + self.value_dim)
            + plane * rows * self.head_dim;
        let width = if plane == self.planes {
            self.value_dim
        } else {
            self.head_dim
        };
        (start, width)
    }

    /// The row of slot `slot` of block `i` in plane `plane` of head `g`.
    fn row_mut(&mut self, i: usize, g: usize, plane: usize, slot: usize) -> &mut [S] {
        let (start, width) = self.plane(g, plane);
        let at = start + (i * self.block_tokens + slot) * width;
        &mut self.data[at..at + width]
    }

    /// Copies block `from` into block `to`, every plane of every head.
    fn copy_block(&mut self, from: usize, to: usize) {
        for g in 0..self.heads_kv {
            for plane in 0..=self.planes {
                let (start, width) = self.plane(g, plane);
                let n = self.block_tokens * width;
                self.data
                    .copy_within(start + from * n..start + (from + 1) * n, start + to * n);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Sequence {
    blocks: Vec<BlockId>,
    len: usize,
}

/// Scratch for [`PagedKvCache::attend_batch`]: one [`DecodeScratch`] per
/// (sequence, kv head) task and the f32 outputs, reused across calls.
#[derive(Debug, Default, Clone)]
pub struct BatchScratch {
    tasks: Vec<DecodeScratch>,
    out: Vec<f32>,
}

impl BatchScratch {
    /// An empty scratch (grows on first use).
    pub fn new() -> Self {
        Self::default()
    }
}

/// Many sequences' KV caches in the blocks of one [`BlockPool`] (see the
/// [module docs](self)): append, fork (copy-on-write), truncate, free, attend one
/// sequence or a batch of sequences in one call.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedKvCache<S: Element = f32> {
    core: Core,
    pieces: Vec<Piece>,
    region: Region,
    /// Window of a band map (its near piece is `pieces[0]`, stored in plane 1).
    band: Option<usize>,
    /// The key function of plane 0.
    main_piece: Piece,
    pool: BlockPool<S>,
    seqs: Vec<Option<Sequence>>,
}

/// The blocks of one kv head of one sequence, as the decode step reads them.
struct Head<'a, S: Element> {
    pool: &'a BlockPool<S>,
    /// Validated block indices.
    table: &'a [BlockId],
    g: usize,
    band: bool,
}

impl<S: Element> Head<'_, S> {
    /// Calls `f(rows, first)` for plane `plane` (or the values) over slots `lo..hi`: one
    /// run per stretch of blocks with consecutive indices (a sequence appended in one
    /// go is one run), else one per block.
    fn runs(&self, plane: usize, lo: usize, hi: usize, f: &mut dyn FnMut(&[S], usize)) {
        let p = self.pool;
        let b = p.block_tokens;
        let (start, width) = p.plane(self.g, plane);
        let mut j = lo;
        while j < hi {
            let blk = j / b;
            let first = self.table[blk].index as usize;
            let mut end_blk = blk + 1;
            while end_blk * b < hi && self.table[end_blk].index as usize == first + (end_blk - blk)
            {
                end_blk += 1;
            }
            let end = hi.min(end_blk * b);
            let row = first * b + j % b;
            f(
                &p.data[start + row * width..start + (row + end - j) * width],
                j,
            );
            j = end;
        }
    }
}

impl<S: Element> KeySource<S> for Head<'_, S> {
    fn keys(&self, piece: usize, lo: usize, hi: usize, f: &mut dyn FnMut(Rows<'_, S>, usize)) {
        let plane = usize::from(self.band && piece == 0);
        self.runs(plane, lo, hi, &mut |rows, first| {
            f(Rows::Stored(rows), first)
        });
    }

    fn values(&self, lo: usize, hi: usize, f: &mut dyn FnMut(&[S], usize)) {
        self.runs(self.pool.planes, lo, hi, f);
    }
}

impl PagedKvCache<f32> {
    /// An f32 paged cache; see [`PagedKvCache::new_typed`].
    pub fn new(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        shape: CacheShape,
        block_tokens: usize,
        capacity_blocks: usize,
    ) -> Result<Self> {
        Self::new_typed(config, layout, map, shape, block_tokens, capacity_blocks)
    }
}

impl<S: Element> PagedKvCache<S> {
    /// vLLM's block size, 16 tokens.
    pub const DEFAULT_BLOCK: usize = 16;

    /// An empty paged cache storing keys and values as `S`, with a pool of
    /// `capacity_blocks` blocks of `block_tokens >= 1` tokens, allocated now (fallibly:
    /// [`RopeError::Allocation`]). Arguments otherwise as [`super::KvCache::new`].
    /// Errors: a StreamingLLM map or a length-dependent scheme (see the
    /// [module docs](self)), and [`super::KvCache::new`]'s.
    pub fn new_typed(
        config: RopeConfig,
        layout: Layout,
        map: PositionMap,
        shape: CacheShape,
        block_tokens: usize,
        capacity_blocks: usize,
    ) -> Result<Self> {
        if matches!(map, PositionMap::Streaming { .. }) {
            return Err(RopeError::invalid(
                "map",
                format!("{map:?}"),
                "the paged cache takes every map but StreamingLLM (whose cache evicts; use KvCache)",
            ));
        }
        if config.scaling().is_length_dependent() {
            return Err(RopeError::invalid(
                "rope scaling",
                format!("{:?}", config.scaling()),
                "the paged cache takes length-independent schemes only (dynamic NTK and LongRoPE re-rotate keys that forks share; use KvCache)",
            ));
        }
        let core = Core::new(config, layout, map, shape)?;
        let pieces = map.pieces();
        let list = pieces.list().to_vec();
        let region = pieces.region();
        let (main_piece, band) = match region {
            Region::Band { window } => (list[1], Some(window)),
            _ => (list[0], None),
        };
        let planes = if band.is_some() { 2 } else { 1 };
        Ok(PagedKvCache {
            pool: BlockPool::new(shape, planes, block_tokens, capacity_blocks)?,
            core,
            pieces: list,
            region,
            band,
            main_piece,
            seqs: Vec::new(),
        })
    }

    /// Overrides the logit scale (see [`super::KvCache::with_scale`]).
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        self.core.set_scale(scale)?;
        Ok(self)
    }

    /// Adds a sliding-window and/or chunked mask (see [`super::KvCache::with_mask`]).
    pub fn with_mask(mut self, mask: crate::attention::Mask) -> Result<Self> {
        self.core.set_mask(mask, false)?;
        Ok(self)
    }

    /// DCA's logit scale; `n` is the attended sequence's length.
    pub fn with_dca_logit_scale(mut self, train_len: usize) -> Result<Self> {
        self.core.set_dca_logit_scale(train_len)?;
        Ok(self)
    }

    /// Log-n query scaling (see [`super::KvCache::with_log_n`]).
    pub fn with_log_n(mut self, train_len: usize) -> Result<Self> {
        self.core.set_log_n(train_len)?;
        Ok(self)
    }

    /// bf16 products for a bf16 pool (see [`super::KvCache::with_bf16_products`]).
    pub fn with_bf16_products(mut self, mode: Bf16Products) -> Self {
        self.core.bf16_products = mode;
        self
    }

    /// The bf16 products setting ([`PagedKvCache::with_bf16_products`]).
    pub fn bf16_products(&self) -> Bf16Products {
        self.core.bf16_products
    }

    /// The pool: capacity, free and used blocks, memory.
    pub fn pool(&self) -> &BlockPool<S> {
        &self.pool
    }

    /// The [`Attention`] every sequence computes: its [`Attention::reference`] over a
    /// sequence's tokens is the oracle.
    pub fn attention(&self) -> Attention {
        self.core.attention()
    }

    /// A new empty sequence (it holds no block until its first append).
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        self.seqs
            .try_reserve(1)
            .map_err(|_| RopeError::Allocation {
                what: "paged cache sequence table".into(),
                bytes: std::mem::size_of::<Sequence>() as u128,
            })?;
        self.seqs.push(Some(Sequence {
            blocks: Vec::new(),
            len: 0,
        }));
        Ok(SeqId(self.seqs.len() - 1))
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        match self.seqs.get(id.0) {
            Some(Some(s)) => Ok(s),
            Some(None) => Err(RopeError::UnknownSequence {
                id: id.0,
                reason: "it was freed".into(),
            }),
            None => Err(RopeError::UnknownSequence {
                id: id.0,
                reason: format!("this cache has made {} sequences", self.seqs.len()),
            }),
        }
    }

    /// Tokens cached for sequence `id`.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        self.seq(id).map(|s| s.len)
    }

    /// The block table of sequence `id`: token `j` lives in `table[j / B]`, slot `j mod B`.
    pub fn block_table(&self, id: SeqId) -> Result<&[BlockId]> {
        self.seq(id).map(|s| s.blocks.as_slice())
    }

    /// A new sequence sharing every block of `id` (copy-on-write; no data is copied).
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        let seq = self.seq(id)?.clone();
        for b in &seq.blocks {
            self.pool.refs[b.index as usize] += 1;
        }
        let new = self.add_sequence()?;
        self.seqs[new.0] = Some(seq);
        Ok(new)
    }

    /// Rolls sequence `id` back to its first `len` tokens (`len <= self.len(id)`),
    /// releasing the blocks past them.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        let have = self.seq(id)?.len;
        if len > have {
            return Err(RopeError::invalid(
                "truncate length",
                len,
                format!("must be <= the sequence's length {have}"),
            ));
        }
        let keep = len.div_ceil(self.pool.block_tokens);
        let seq = self.seqs[id.0].as_mut().expect("checked above");
        for b in seq.blocks.drain(keep..) {
            self.pool.release(b);
        }
        seq.len = len;
        Ok(())
    }

    /// Frees sequence `id` and releases its blocks; the id is then refused.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        self.seq(id)?;
        let seq = self.seqs[id.0].take().expect("checked above");
        for b in seq.blocks {
            self.pool.release(b);
        }
        Ok(())
    }

    /// Appends keys `[c, H_kv, head_dim]` and values `[c, H_kv, value_dim]` (any
    /// [`Element`] type) to sequence `id` at positions `len .. len + c`, each key rotated
    /// per plane in f32 and rounded once to `S`. Takes `ceil((len + c) / B) - blocks`
    /// new blocks, plus one if the partial last block is shared (copy-on-write). Errors
    /// (cache unchanged): shapes, a bad id, [`RopeError::PoolExhausted`].
    pub fn append<'a, T: Element>(
        &mut self,
        id: SeqId,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
    ) -> Result<()> {
        let (k, v) = (k.into().as_ndarray(), v.into().as_ndarray());
        let seq = self.seq(id)?;
        let start = seq.len;
        let c = self.core.check_kv_at(start, &k, &v)?;
        if c == 0 {
            return Ok(());
        }
        let b = self.pool.block_tokens;
        let new_blocks = (start + c).div_ceil(b) - seq.blocks.len();
        let shared_tail = start % b != 0
            && seq
                .blocks
                .last()
                .is_some_and(|t| self.pool.refs[t.index as usize] > 1);
        self.pool.exhausted(new_blocks + usize::from(shared_tail))?;
        if shared_tail {
            let old = *self.seqs[id.0]
                .as_ref()
                .expect("checked")
                .blocks
                .last()
                .expect("tail");
            let new = self.pool.alloc()?;
            self.pool.copy_block(old.index as usize, new.index as usize);
            self.pool.release(old);
            let seq = self.seqs[id.0].as_mut().expect("checked");
            *seq.blocks.last_mut().expect("tail") = new;
        }
        for _ in 0..new_blocks {
            let blk = self.pool.alloc()?;
            let seq = self.seqs[id.0].as_mut().expect("checked");
            seq.blocks
                .try_reserve(1)
                .map_err(|_| RopeError::Allocation {
                    what: "block table".into(),
                    bytes: std::mem::size_of::<BlockId>() as u128,
                })?;
            seq.blocks.push(blk);
        }
        self.write(id, start, &k, &v);
        self.seqs[id.0].as_mut().expect("checked").len = start + c;
        Ok(())
    }

    /// Writes rows of `k`, `v` at positions `start..` of sequence `id` (blocks present
    /// and exclusively held).
    fn write<T: Element>(&mut self, id: SeqId, start: usize, k: &ArrayView3<T>, v: &ArrayView3<T>) {
        let (d, dv) = (self.core.head_dim, self.core.value_dim);
        let inv = self.core.freqs.inv_freq();
        let layout = self.core.layout;
        let (mut main_trig, mut near_trig) = (Trig::new(inv.len()), Trig::new(inv.len()));
        let (mut key, mut near, mut value) = (vec![0f32; d], vec![0f32; d], vec![0f32; dv]);
        let b = self.pool.block_tokens;
        let planes = self.pool.planes;
        for t in 0..k.dim().0 {
            let j = start + t;
            let seq = self.seqs[id.0].as_ref().expect("checked");
            let (blk, slot) = (seq.blocks[j / b].index as usize, j % b);
            main_trig.set(inv, self.main_piece.key.at(j as f64));
            if self.band.is_some() {
                near_trig.set(inv, self.pieces[0].key.at(j as f64));
            }
            for g in 0..self.core.heads_kv {
                load_row(k, t, g, &mut key);
                if self.band.is_some() {
                    near.copy_from_slice(&key);
                    near_trig.rotate(&mut near, layout);
                    S::store_slice(&near, self.pool.row_mut(blk, g, 1, slot));
                }
                main_trig.rotate(&mut key, layout);
                S::store_slice(&key, self.pool.row_mut(blk, g, 0, slot));
                load_row(v, t, g, &mut value);
                S::store_slice(&value, self.pool.row_mut(blk, g, planes, slot));
            }
        }
    }

    /// Checks an engine-held block table for `len` tokens against this pool.
    fn check_table(&self, table: &[BlockId], len: usize) -> Result<()> {
        let need = len.div_ceil(self.pool.block_tokens);
        if table.len() < need {
            return Err(RopeError::shape(
                "block table",
                format!(
                    "at least ceil({len} / {}) = {need} blocks for {len} tokens",
                    self.pool.block_tokens
                ),
                table.len(),
            ));
        }
        for b in &table[..need] {
            self.pool.check(*b)?;
        }
        Ok(())
    }

    /// Attends queries `[n_q, H_q, head_dim]` of sequence `id` at positions `q_pos` (each
    /// `<` its length); returns `[n_q, H_q, value_dim]` in f32.
    pub fn attend<'a, T: Element>(
        &self,
        id: SeqId,
        q: impl Into<View3<'a, T>>,
        q_pos: &[usize],
    ) -> Result<Array3<f32>> {
        let q = q.into();
        let [n_q, heads_q, _] = q.dims();
        let mut out = Array3::<f32>::zeros((n_q, heads_q, self.core.value_dim));
        self.attend_into(id, q, q_pos, &mut out, &mut DecodeScratch::new())?;
        Ok(out)
    }

    /// [`PagedKvCache::attend`] into `out` with reusable scratch: a warm step allocates
    /// nothing.
    pub fn attend_into<'a, 'b, T: Element, O: Element>(
        &self,
        id: SeqId,
        q: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        out: impl Into<View3Mut<'b, O>>,
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let seq = self.seq(id)?;
        self.attend_table(&seq.blocks, seq.len, q, q_pos, out, scratch)
    }

    /// [`PagedKvCache::attend_into`] for a block table the engine holds itself (e.g. a
    /// copy of [`PagedKvCache::block_table`]) over its first `len` tokens. Errors:
    /// [`RopeError::BadBlock`] for a freed block or another pool's, a table too short
    /// for `len`, and [`PagedKvCache::attend`]'s.
    pub fn attend_table<'a, 'b, T: Element, O: Element>(
        &self,
        table: &[BlockId],
        len: usize,
        q: impl Into<View3<'a, T>>,
        q_pos: &[usize],
        out: impl Into<View3Mut<'b, O>>,
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let q = q.into().as_ndarray();
        let mut out = out.into().into_ndarray();
        self.check_table(table, len)?;
        let group = self.core.check_queries_at(len, &q, q_pos)?;
        let (n_q, heads_q, _) = q.dim();
        self.core
            .check_out([out.dim().0, out.dim().1, out.dim().2], n_q, heads_q)?;
        let step = self.step(len);
        for (a, &i) in q_pos.iter().enumerate() {
            let runs = Runs::new(self.region, i, self.core.first_visible(i), false);
            for g in 0..self.core.heads_kv {
                let head = self.head(table, g);
                step.group(
                    q.slice(s![a, g * group..(g + 1) * group, ..]),
                    i,
                    &runs,
                    &head,
                    scratch,
                );
                store_group(&mut out, a, g * group, &scratch.acc);
            }
        }
        Ok(())
    }

    fn step(&self, len: usize) -> Step<'_> {
        Step::new::<S>(&self.core, &self.pieces, len)
    }

    fn head<'a>(&'a self, table: &'a [BlockId], g: usize) -> Head<'a, S> {
        Head {
            pool: &self.pool,
            table,
            g,
            band: self.band.is_some(),
        }
    }

    /// One decode step for many sequences in one call: query `a` of `q`
    /// (`[n_seq, H_q, head_dim]`) attends sequence `seqs[a]` at its newest position; the
    /// rows go to `out` (`[n_seq, H_q, value_dim]`). Parallel over (sequence, kv head)
    /// with rayon (on the current pool: run it inside `ThreadPool::install` to choose
    /// the threads); each row equals [`PagedKvCache::attend`]'s bit for bit.
    pub fn attend_batch<'a, 'b, T: Element, O: Element>(
        &self,
        seqs: &[SeqId],
        q: impl Into<View3<'a, T>>,
        out: impl Into<View3Mut<'b, O>>,
        scratch: &mut BatchScratch,
    ) -> Result<()> {
        let q = q.into().as_ndarray();
        let mut out = out.into().into_ndarray();
        let (n_q, heads_q, _) = q.dim();
        if n_q != seqs.len() {
            return Err(RopeError::shape(
                "q [n_seq, H_q, head_dim] of a batched decode",
                format!("one query per sequence ({})", seqs.len()),
                n_q,
            ));
        }
        let group = self.core.check_q_shape(&q, n_q)?;
        self.core
            .check_out([out.dim().0, out.dim().1, out.dim().2], n_q, heads_q)?;
        for (a, &id) in seqs.iter().enumerate() {
            if self.seq(id)?.len == 0 {
                return Err(RopeError::invalid(
                    format!("seqs[{a}]"),
                    id.0,
                    "must hold at least one token (append the new token's key first)",
                ));
            }
        }
        let hkv = self.core.heads_kv;
        let dv = self.core.value_dim;
        let tasks = n_q * hkv;
        if scratch.tasks.len() < tasks {
            scratch.tasks.resize_with(tasks, DecodeScratch::new);
        }
        if scratch.out.len() < tasks * group * dv {
            scratch.out.resize(tasks * group * dv, 0.0);
        }
        let work = |task: usize, sc: &mut DecodeScratch, rows: &mut [f32]| {
            let (a, g) = (task / hkv, task % hkv);
            let seq = self.seqs[seqs[a].0].as_ref().expect("checked above");
            let i = seq.len - 1;
            let runs = Runs::new(self.region, i, self.core.first_visible(i), false);
            let head = self.head(&seq.blocks, g);
            let qg = q.slice(s![a, g * group..(g + 1) * group, ..]);
            self.step(seq.len).group(qg, i, &runs, &head, sc);
            rows.copy_from_slice(&sc.acc);
        };
        let scratches = &mut scratch.tasks[..tasks];
        let rows = &mut scratch.out[..tasks * group * dv];
        let chunk = (group * dv).max(1);
        #[cfg(feature = "rayon")]
        {
            use rayon::prelude::*;
            scratches
                .par_iter_mut()
                .zip(rows.par_chunks_mut(chunk))
                .enumerate()
                .for_each(|(t, (sc, r))| work(t, sc, r));
        }
        #[cfg(not(feature = "rayon"))]
        for (t, (sc, r)) in scratches.iter_mut().zip(rows.chunks_mut(chunk)).enumerate() {
            work(t, sc, r);
        }
        for task in 0..tasks {
            let (a, g) = (task / hkv, task % hkv);
            let at = task * group * dv;
            store_group(&mut out, a, g * group, &scratch.out[at..at + group * dv]);
        }
        Ok(())
    }

    /// Chunked prefill of sequence `id`: appends the chunk, then attends its queries at
    /// their own positions. On error the cache is unchanged.
    pub fn prefill_chunk<'a, T: Element>(
        &mut self,
        id: SeqId,
        q: impl Into<View3<'a, T>>,
        k: impl Into<View3<'a, T>>,
        v: impl Into<View3<'a, T>>,
    ) -> Result<Array3<f32>> {
        let (q, k, v): (ArrayView3<T>, ArrayView3<T>, ArrayView3<T>) = (
            q.into().as_ndarray(),
            k.into().as_ndarray(),
            v.into().as_ndarray(),
        );
        let start = self.len(id)?;
        let c = self.core.check_chunk(start, &q, &k, &v)?;
        append_then_attend(
            self,
            start,
            c,
            |me| me.append(id, k, v),
            |me, pos| me.attend(id, q, pos),
        )
    }
}
