//! # ropex-lm: a tiny RoPE language model run through ropex
//!
//! The byte-level language model of `tools/train_tiny_lm.py` (RMSNorm, SwiGLU, rotary
//! attention), loaded from a `config.json` and a `model.safetensors` and run in f32 with
//! every attention call going through ropex's tiled kernel, with ropex's frequencies and
//! position maps. It is what the `extend` example evaluates and what the logit-parity
//! test compares against PyTorch.
//!
//! - [`ModelConfig`] / [`TensorSpec`]: the checkpoint's `config.json` ([`config`]);
//! - [`TinyLm::load`]: weights from safetensors, checked against the architecture
//!   ([`weights`]);
//! - [`TinyLm::forward`]: logits under a [`Plan`] ([`model`]);
//! - [`Plan`]: which [`ropex::Attention`] serves which queries, including the segmented
//!   plans of length-dependent schemes ([`plan`]);
//! - [`protocol::endpoints`], [`protocol::Window`]: the windows of Su's evaluation
//!   protocol; [`scheme::Spec`]: every context-extension scheme as a plan or decode
//!   cache; [`report`]: markdown tables; [`passkey`]: the passkey-retrieval prompt;
//!   `plot` and `progress` (feature `report`, default): SVG plots and a progress bar;
//! - [`llama`]: a real Llama-family model (SmolLM2) read from a GGUF file, run through
//!   the same kernels, with its own byte-level BPE tokenizer.
//!
//! This crate is part of the ropex workspace and is not published: it depends on ropex,
//! never the other way round.
//!
//! ```no_run
//! use ropex::{Attention, PositionMap};
//! use ropex_lm::{Plan, TinyLm, nll_rows};
//!
//! let model = TinyLm::load("assets/tiny_lm_rope".as_ref())?;
//! let att = Attention::new(
//!     model.config().rope()?.frequencies(),
//!     model.layout(),
//!     PositionMap::rerope(64)?,
//! );
//! let text = b"To be, or not to be, that is the question";
//! let logits = model.forward(&text[..text.len() - 1], &Plan::Single(att), 0)?;
//! let nll = nll_rows(logits.view(), &text[1..]);
//! # Ok::<(), ropex_lm::ModelError>(())
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod llama;
pub mod model;
pub mod passkey;
pub mod plan;
#[cfg(feature = "report")]
pub mod plot;
#[cfg(feature = "report")]
pub mod progress;
pub mod protocol;
pub mod report;
pub mod scheme;
pub mod weights;

pub use config::{ModelConfig, TensorSpec};
pub use error::{AllocError, ModelError, Result};
pub use model::{TinyLm, attend, nll_rows};
pub use plan::{Plan, Segment};
