//! # fulgur-passes
//!
//! Graph-to-graph transformations. The optimizer is equality saturation with `egg`:
//! - [`lang`]: the e-graph language mirroring the IR (attributes in the node payload, multi-output nodes as a
//!   tuple plus projections), the shape/dtype analysis, and conversion Graph → e-graph;
//! - [`rules`]: rule families, one file each (algebra, …); rules only say what is equal;
//! - [`classify`]: what is data, a view, generated, or a kernel of which kind (the cost model and the lowering
//!   share it);
//! - [`cost`]: the roofline cost model over named targets (H100, H200, H800, H20, A100, CPU);
//! - [`extract`]: DAG-aware greedy extraction back to a graph (a shared subterm is paid once), deterministic;
//! - [`eqsat`]: the saturation pass, run once per distinct layer template and stitched, with node, iteration
//!   and time bounds and a report of what every rule did;
//! - [`pass`]: the pass manager and its reports.
//!
//! - [`autodiff`]: reverse-mode differentiation of a graph with a scalar loss;
//! - [`optim`]: the training step (loss, gradients, clipping, AdamW) as one graph.
//! - [`shard`]: device meshes with named axes, the shardings of values on them, the collectives between two
//!   shardings, and the sharding pass (a single-device graph and a plan → the simulated SPMD graph;
//!   `docs/parallelism.md`).
//!
//! Depends on `fulgur-ir` only.

pub mod autodiff;
pub mod classify;
pub mod cost;
pub mod eqsat;
pub mod extract;
pub mod lang;
pub mod optim;
pub mod pass;
pub mod precision;
pub mod rules;
pub mod shard;
pub mod testing;
pub mod why;

use thiserror::Error;

/// Errors of the passes.
#[derive(Debug, Error)]
pub enum PassError {
    #[error(transparent)]
    Ir(#[from] fulgur_ir::IrError),
    /// A pass produced a graph that does not verify (a bug in the pass).
    #[error("pass `{pass}` produced an invalid graph: {message}")]
    Invalid { pass: String, message: String },
    /// A rule misbehaved (e.g. merged classes of different types).
    #[error("{0}")]
    Rule(String),
    #[error("{0}")]
    Io(String),
    /// Options a pass cannot take.
    #[error("{0}")]
    Options(String),
}

pub use cost::{CostModel, Target};
pub use eqsat::{EqSat, EqSatReport, Limits};
pub use pass::{Dce, Pass, PassContext, PassReport, Pipeline};

/// The standard optimization pipeline: dead-code elimination, then equality saturation with every rule
/// family except those in `disabled`.
pub fn standard_pipeline(cfg: &rules::RuleConfig, disabled: &[String], limits: Limits) -> Result<Pipeline, PassError> {
    let fams = rules::families(cfg, disabled).map_err(PassError::Rule)?;
    let mut eq = EqSat::new(fams);
    eq.limits = limits;
    Ok(Pipeline::new().with(Dce).with(eq))
}
