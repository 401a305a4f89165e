//! The `models` crate's error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    /// A config field is missing, of the wrong type, or contradicts another.
    #[error("{file}: field `{field}`: {message}")]
    Config {
        file: String,
        field: String,
        message: String,
    },
    /// A checkpoint tensor is missing, misshapen, of an unexpected dtype, or unreadable.
    #[error("tensor `{tensor}` in `{file}`: {message}")]
    Tensor {
        tensor: String,
        file: String,
        message: String,
    },
    /// A checkpoint file is unreadable, truncated or corrupt.
    #[error("`{path}`: {message}")]
    Io { path: String, message: String },
    /// Building a graph failed (a bug, or an unsupported configuration).
    #[error("building the graph: {0}")]
    Ir(#[from] fulgur_ir::IrError),
}
