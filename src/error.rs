//! The library's one error type. Binaries wrap it in `anyhow`; the server maps it to a status once.

use std::path::PathBuf;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device problem, ...). Shown as candle's own
    /// message, once (it is also the source).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),

    /// A file or folder could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A model folder or hub id could not be resolved.
    #[error("model not found: {0}")]
    ModelNotFound(String),

    /// A model folder exists but a required file is missing.
    #[error("model folder {} is missing {file}", dir.display())]
    MissingFile { dir: PathBuf, file: String },

    /// A config file is malformed or describes something we do not support.
    #[error("invalid config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// The model is valid but cannot be used for the requested job.
    #[error("incompatible model: {0}")]
    IncompatibleModel(String),

    /// A tokenizer could not be built or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An input image could not be decoded or is unusable.
    #[error("image: {0}")]
    Image(String),

    /// A request parameter is out of range.
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },

    /// A scheduler name or configuration is not supported.
    #[error("scheduler: {0}")]
    Scheduler(String),

    /// The Hugging Face hub cache could not provide a file.
    #[error("hub: {0}")]
    Hub(String),

    /// A service this needs could not be reached (a remote server).
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// Something that cannot fail on valid data did (serialising our own state or files).
    #[error("internal: {0}")]
    Internal(String),

    /// The job was cancelled by its caller (progress callback returned `Stop`).
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
