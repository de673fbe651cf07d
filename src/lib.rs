//! # ropex: RoPE context extension
//!
//! A model trained with rotary position embeddings (RoPE) at 4k tokens can read 32k
//! without retraining if the rotation frequencies, or the relative positions they see,
//! are changed the right way. ropex computes those frequencies under every common
//! scheme, bit-for-bit with Hugging Face transformers, and rotates queries and keys.
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
//! `config -> Scaling -> Frequencies -> RotaryTable -> rotated q/k`; see
//! [`RopeConfig`], [`Frequencies`], [`RotaryTable`]. Relative-position maps
//! ([`PositionMap`]: RoPE, ReRoPE, Leaky ReRoPE) are consumed by the attention kernels in
//! [`attention`]: [`Attention::reference`], [`Attention::two_pass`], [`Attention::tiled`]
//! and decoding against a [`KvCache`].
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
//! ## Features
//! - `serde` (default): read Hugging Face `config.json` and run the CLI.
//! - `rayon` (default): parallel attention kernels.
//! - `half`: f16/bf16 rotation.
#![deny(missing_docs)]

pub mod attention;
#[cfg(feature = "serde")]
pub mod config;
pub mod error;
pub mod frequencies;
#[cfg(feature = "gguf")]
pub mod gguf;
pub mod position;
pub mod rotary;
pub mod scaling;

pub use attention::{Attention, KvCache, KvCacheRerotating, RefreshPolicy, TileConfig, TileStats};
pub use error::{Result, RopeError};
pub use frequencies::{Frequencies, PairReport, Regime, beta, digits};
pub use position::{Affine, Piece, Pieces, PositionMap};
pub use rotary::{Layout, RotaryTable, apply_log_n, log_n_scale};
pub use scaling::{Checks, Llama3, LongRope, RopeConfig, Scaling, Yarn};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
