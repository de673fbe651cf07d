//! [`ModelError`]: why a checkpoint could not be loaded or a forward pass could not run.

use std::path::PathBuf;

/// Why a checkpoint could not be loaded or a forward pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or misses a field.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The weights do not match the configuration (missing tensor, wrong shape or dtype).
    #[error("checkpoint does not match its config: {0}")]
    Mismatch(String),
    /// The input is not something the model can run on.
    #[error("{0}")]
    Input(String),
    /// ropex rejected a parameter.
    #[error(transparent)]
    Rope(#[from] ropex::RopeError),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
