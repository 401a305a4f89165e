//! # fulgur-codegen
//!
//! Turns a graph into an executable: [`compile`] (the optimizer under a cost model, as one library call), then
//! grouping into kernels, schedule and streams, memory plan; CUDA C++ emission compiled by NVRTC (with an
//! on-disk cache keyed by source hash and architecture); LLVM IR emission through `inkwell` for the CPU backend
//! (cargo feature `llvm`); the parallelism-plan and executable artifacts. Depends on `fulgur-ir` and
//! `fulgur-passes`.

pub mod artifact;
pub mod compile;
pub mod cuda;
pub mod kernels;
#[cfg(feature = "llvm")]
pub mod llvm;
pub mod loops;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod oracle;
pub mod program;

use thiserror::Error;

/// Errors of compilation.
#[derive(Debug, Error)]
pub enum CodegenError {
    /// Options that cannot be used (an unknown target, a binding of a symbol the graph lacks, ...).
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Pass(#[from] fulgur_passes::PassError),
    #[error(transparent)]
    Ir(#[from] fulgur_ir::IrError),
}
