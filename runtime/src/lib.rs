//! # fulgur-runtime
//!
//! Executes graphs: devices (the reference interpreter now; CPU through LLVM and CUDA through `cudarc` later),
//! memory arena, launches, collectives, the training loop, and generation ([`generate`]: prefill, decode steps
//! with carried states, greedy sampling).
//!
//! Every backend implements [`Backend`] (run a graph once) and loads graphs as [`Executable`]s: a graph
//! with its weights resident, run many times (generation's prefill and decode steps). Callers (the CLI,
//! generation) are written against the traits so that the compiled backends slot in without changing them.

#[cfg(feature = "llvm")]
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod generate;
#[cfg(any(feature = "llvm", feature = "cuda"))]
pub mod host;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ranks;
pub mod train;

use fulgur_ir::{Graph, Interpreter, IrError, Precision, Tensor};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
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

/// Where the last call's time went, for executables that can tell (the GPU's): the device's span from the
/// first kernel to the last, and the host's waits on the device inside it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CallTiming {
    /// From the first kernel's start to the last kernel's end, by device events (ms).
    pub device_ms: f64,
    /// How many times the host waited for the device between kernels (a grouped GEMM reading its group
    /// sizes back), and how long those waits took in all (ms).
    pub host_waits: usize,
    pub host_wait_ms: f64,
    /// How many experts' products the grouped GEMMs enqueued, and the host's time enqueueing them (ms; part
    /// of `launch_ms`).
    pub expert_gemms: usize,
    pub expert_enqueue_ms: f64,
    /// How many cuBLASLt heuristic queries those products made (the first product of a bucket of sizes, and one
    /// its bucket's algorithm was refused for, the first time its exact sizes came).
    pub expert_queries: usize,
    /// The host's time (ms) binding and uploading the inputs, enqueueing the kernels (the waits above
    /// included), waiting for the device to finish, and reading the outputs back.
    pub begin_ms: f64,
    pub launch_ms: f64,
    pub finish_ms: f64,
    pub outputs_ms: f64,
}

/// A graph loaded with its weights, run many times on data inputs alone: the weights are never copied per
/// call.
pub trait Executable {
    /// A short name for logs and reports.
    fn name(&self) -> &str;
    /// The names of the data inputs each call takes.
    fn input_names(&self) -> Vec<String>;
    /// Runs one call on the data inputs; returns every output by name.
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError>;
    /// Runs one call whose inputs named in `carried` are this executable's own outputs of the same names from
    /// its previous call, left where they are (device memory stays on the device; nothing becomes a host
    /// tensor); `inputs` holds the others, and the result every output but the carried ones. `None`, before
    /// anything runs, when the executable cannot (it has not run yet, or a carried output is not a
    /// contiguous value of the type its input takes): the caller passes every input to `run` instead.
    fn run_carried(
        &mut self,
        _inputs: &HashMap<String, Tensor>,
        _carried: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        None
    }
    /// Runs one call like `run`, but returns every output except those named in `keep`, which stay where the
    /// executable holds them (for the next `run_carried` and for `last_outputs`): a training step's first call,
    /// whose new weights and moments need not come back to the host. `None`, before anything runs, when the
    /// executable keeps no outputs between calls: the caller uses `run`.
    fn run_keeping(
        &mut self,
        _inputs: &HashMap<String, Tensor>,
        _keep: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        None
    }
    /// The named outputs of the last call, read from where the executable keeps them (after `run_carried`, the
    /// carried outputs it did not return). `None` when the executable keeps no outputs between calls.
    fn last_outputs(&mut self, _names: &[String]) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        None
    }
    /// Where the last call's time went, when the executable measures it.
    fn last_timing(&self) -> Option<CallTiming> {
        None
    }
}

/// Weights held once and shared by the reference executables of one model (prefill and decode).
pub type SharedWeights = Rc<RefCell<HashMap<String, Tensor>>>;

/// A graph on the reference interpreter with its weights: each call lends the data inputs to the weight map
/// for the run and takes them back, so the weights are never cloned.
pub struct ReferenceExecutable {
    pub backend: ReferenceBackend,
    pub graph: Graph,
    pub weights: SharedWeights,
}

impl Executable for ReferenceExecutable {
    fn name(&self) -> &str {
        self.backend.name()
    }
    fn input_names(&self) -> Vec<String> {
        self.graph
            .nodes()
            .filter_map(|(_, n)| match &n.op {
                fulgur_ir::Op::Input { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let mut map = self.weights.borrow_mut();
        // every name checked before any is lent, so that a refused call leaves the weights as they were
        if let Some(name) = inputs.keys().find(|n| map.contains_key(*n)) {
            return Err(RuntimeError::Other(format!("input `{name}` has the name of a weight")));
        }
        let mut lent = Vec::new();
        for (name, t) in inputs {
            map.insert(name.clone(), t.clone());
            lent.push(name.clone());
        }
        let out = self.backend.run(&self.graph, &map);
        for name in lent {
            map.remove(&name);
        }
        out
    }
}
