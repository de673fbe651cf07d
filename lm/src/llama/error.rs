//! [`LlamaError`]: why a GGUF file is not a Llama model this crate can run, or a forward
//! pass could not run.

/// Why a GGUF file is not a Llama-family model this crate can run, or why a forward pass
/// or tokenization failed.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// The file could not be read or parsed as GGUF, or ropex rejected a rope parameter.
    #[error(transparent)]
    Rope(#[from] ropex::RopeError),
    /// A metadata key the architecture needs is absent or has the wrong type.
    #[error("GGUF metadata key '{key}' is missing or not {expected}")]
    MissingKey {
        /// The key, e.g. `llama.block_count`.
        key: String,
        /// The type it must have.
        expected: &'static str,
    },
    /// The file's architecture or hyperparameters are outside what this forward runs.
    #[error("unsupported model: {what} (allowed: {allowed})")]
    Unsupported {
        /// What the file says.
        what: String,
        /// What is supported.
        allowed: &'static str,
    },
    /// A tensor the architecture needs is absent.
    #[error("GGUF tensor '{0}' is missing")]
    MissingTensor(String),
    /// A tensor has other dims than the hyperparameters imply.
    #[error("GGUF tensor '{name}' has ggml dims {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor.
        name: String,
        /// `[ne0, ne1, ...]` implied by the metadata.
        expected: Vec<u64>,
        /// `[ne0, ne1, ...]` in the file.
        found: Vec<u64>,
    },
    /// The vocabulary or merges in the file do not form a byte-level BPE tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The input is not something the model can run on (empty, token id out of range).
    #[error("{0}")]
    Input(String),
    /// A buffer sized by the input (sequence length times a model width) could not be
    /// allocated.
    #[error(transparent)]
    Alloc(#[from] crate::error::AllocError),
    /// A forward-pass error from the shared model code (plans, kernels).
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
}

/// Result of the [`crate::llama`] module.
pub type Result<T> = std::result::Result<T, LlamaError>;
