//! The `ir` crate's error type.

use thiserror::Error;

/// Errors from building, verifying, parsing and interpreting graphs.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    /// A node is ill-formed: wrong input count, shapes or dtypes, bad attributes, or a run-time failure.
    #[error("node %{id}{} ({op}): {message}", name.as_ref().map(|n| format!(" \"{n}\"")).unwrap_or_default())]
    Node {
        id: usize,
        name: Option<String>,
        op: String,
        message: String,
    },
    /// A `.fir` text could not be parsed.
    #[error("{line}:{col}: {message}")]
    Parse { line: usize, col: usize, message: String },
    /// A graph input or output is missing, or a tensor bound to an input has the wrong shape or dtype.
    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },
    /// A graph-level problem (duplicate names, cycles, dangling outputs, bad JSON).
    #[error("{0}")]
    Graph(String),
}

pub type Result<T, E = IrError> = std::result::Result<T, E>;
