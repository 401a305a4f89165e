//! # fulgur-runtime
//!
//! Executes graphs: devices (the reference interpreter now; CPU through LLVM and CUDA through `cudarc` later),
//! memory arena, launches, collectives, the training loop, and generation ([`generate`]: prefill, decode steps
//! with carried states, greedy sampling).
//!
//! Every backend implements [`Backend`]; callers (the CLI, generation) are written against the trait so that
//! the compiled backends slot in without changing them.

#[cfg(feature = "llvm")]
pub mod cpu;
pub mod generate;

use fulgur_ir::{Graph, Interpreter, IrError, Precision, Tensor};
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// Runtime errors.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error("{0}")]
    Other(String),
}

/// Something that runs a graph on named host tensors and returns its named outputs.
pub trait Backend {
    /// A short name for logs and reports.
    fn name(&self) -> &str;
    fn run(&self, g: &Graph, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
}

/// The reference interpreter as a backend (the default where no compiled backend is available).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend {
    pub precision: Precision,
    /// The interpreter's memory budget in bytes (`None`: the memory available; see
    /// [`fulgur_ir::Interpreter::memory_limit`]).
    pub memory_limit: Option<u64>,
}

impl Backend for ReferenceBackend {
    fn name(&self) -> &str {
        match self.precision {
            Precision::F32 => "reference-f32",
            Precision::F64 => "reference-f64",
        }
    }
    fn run(&self, g: &Graph, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let interp = Interpreter {
            precision: self.precision,
            memory_limit: self.memory_limit,
        };
        Ok(interp.run(g, inputs)?)
    }
}
