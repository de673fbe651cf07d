//! # ropex: RoPE context extension
//!
//! A model trained with rotary position embeddings (RoPE) at 4k tokens can read 32k
//! without retraining if the rotation frequencies, or the relative positions they see,
//! are changed the right way. ropex computes those frequencies under every common
//! scheme in f64, within 1e-6 relative of Hugging Face transformers' (f32) values on every
//! committed golden config, and rotates queries and keys.
//!
//! ## The beta-base view
//! Su Jianlin's "Transformer upgrade road" (post 10) reads RoPE as a number system:
//! with `beta = base^(2/d)`, pair `j` of a `d`-dim head turns at `beta^(-j)` radians per
//! token, so a position is written as `d/2` "digits" `p / beta^j`. Fast digits complete
//! many turns during training and extrapolate fine; slow digits that never completed
//! a turn see unseen angles past the training length and must be interpolated. Position
//! interpolation squeezes every digit, NTK-aware scaling changes the base so only the
//! slow digits are squeezed, YaRN and llama3 ramp between the two by wavelength.
//! [`Frequencies::explain`] shows this per pair.
//!
//! ## Data flow
//! `config.json / GGUF -> Scaling -> Frequencies -> cos/sin -> PositionMap + Mask ->
//! kernel -> output`; see [`RopeConfig`], [`Frequencies`], [`RotaryTable`]. Relative-
//! position maps ([`PositionMap`]: RoPE, ReRoPE, Leaky / inverse Leaky ReRoPE,
//! Self-Extend, Dual Chunk Attention, StreamingLLM, position interpolation) and masks
//! (sliding window, chunked) are consumed by the attention kernels in [`attention`]
//! through one description, [`Attention`], and one entry point, [`Attention::run`] with a
//! [`attention::Kernel`]: the f64 reference (the oracle), Su's two-pass method, the
//! band-tiled kernel, and decoding against a [`KvCache`]. The kernels take *unrotated*
//! q and k and rotate each piece themselves. Sizes are bounded by [`limits`].
//!
//! ```
//! use ndarray::Array3;
//! use ropex::{Layout, RopeConfig, RotaryTable, Scaling, Yarn};
//!
//! // A Llama-style head (d = 128) extended 4x from 4096 with YaRN.
//! let cfg = RopeConfig::new(128, 10_000.0)?.with_scaling(Scaling::Yarn(Yarn::new(4.0, 4096)))?;
//! let freqs = cfg.frequencies();
//! let table = RotaryTable::<f32>::new(&freqs, 16_384, Layout::Half)?;
//!
//! let mut q = Array3::<f32>::zeros((2, 32, 128)); // [tokens, heads, head_dim]
//! table.rotate(q.view_mut(), &[16_382, 16_383])?;
//! # Ok::<(), ropex::RopeError>(())
//! ```
//!
//! The tensors are [`ndarray`] 0.17 arrays; the crate is re-exported as `ropex::ndarray`,
//! so an engine uses the same version ropex was built with.
//!
//! ## Features
//! - `serde` (default): read Hugging Face `config.json` ([`config`]), run the CLI, and
//!   `Serialize`/`Deserialize` for [`Scaling`] (tagged by `rope_type`), its parameter
//!   structs, [`Checks`], [`RopeConfig`] and [`Frequencies`] (deserialising validates).
//! - `rayon` (default): parallel attention kernels.
//! - `half` (default): bf16/f16 storage for rotation, the kernels and the caches
//!   ([`tensor::Element`]), through the `half` crate.
//! - `gguf`: read llama.cpp GGUF files ([`gguf`]): metadata, tensors, dequantisation, and
//!   the rope configuration and pair layout their keys describe.
#![deny(missing_docs)]

pub mod attention;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "serde")]
pub mod config;
pub mod error;
mod frequencies;
#[cfg(feature = "gguf")]
pub mod gguf;
pub mod limits;
pub mod position;
pub mod rotary;
mod scheme;
pub mod tensor;

pub use ndarray;

pub use attention::{
    Attention, BlockPool, CacheShape, DecodeScratch, KvCache, KvCacheRerotating, PagedKvCache,
    RefreshPolicy, TileConfig, TileStats, VarLen,
};
pub use error::{Result, RopeError};
pub use frequencies::Frequencies;
pub use limits::{MAX_HEAD_DIM, MAX_HEADS, MAX_POSITION};
pub use position::{Affine, Piece, Pieces, PositionMap};
pub use rotary::{Layout, RotaryTable, apply_log_n, log_n_scale};
pub use scheme::{
    Checks, Llama3, LongRope, MIN_DIVISOR, PairReport, Regime, RopeConfig, Scaling, Yarn, beta,
    digits,
};
pub use tensor::{Element, View3, View3Mut};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
