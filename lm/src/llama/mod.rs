//! A Llama-family model (SmolLM2 and relatives) read from a GGUF file and run on the CPU
//! in f32, with every attention call going through ropex: ropex's frequencies from the
//! file's rope keys ([`ropex::gguf::GgufRope`]), any [`ropex::PositionMap`], the tiled
//! prefill kernel and the [`ropex::KvCache`] for decoding.
//!
//! - [`LlamaConfig`]: hyperparameters from the `llama.*` metadata ([`config`]);
//! - [`Llama::load`], [`Llama::forward`], [`Llama::step`]: weights, prefill, decode
//!   ([`model`]);
//! - [`GgufTokenizer`]: the file's byte-level BPE through the `tokenizers` crate
//!   ([`tokenizer`]);
//! - [`LlamaError`]: typed errors for files that are not a Llama model ([`error`]).
//!
//! ```no_run
//! use ropex::PositionMap;
//! use ropex_lm::Plan;
//! use ropex_lm::llama::{GgufTokenizer, Llama, nll_tokens};
//!
//! let path = std::path::Path::new("target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
//! let model = Llama::load(path)?;
//! let tok = GgufTokenizer::from_gguf(ropex::gguf::GgufFile::open(path)?.header())?;
//! let ids = tok.encode("The capital of France is Paris.")?;
//! let plan = Plan::Single(model.attention(PositionMap::rerope(2048)?));
//! let logits = model.forward(&ids[..ids.len() - 1], &plan, 0)?;
//! let nll = nll_tokens(logits.view(), &ids[1..]);
//! # Ok::<(), ropex_lm::llama::LlamaError>(())
//! ```

pub mod config;
pub mod error;
mod linear;
pub mod model;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use error::{LlamaError, Result};
pub use model::{Llama, LlamaCache, nll_tokens};
pub use tokenizer::GgufTokenizer;
