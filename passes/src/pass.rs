//! The pass manager: a [`Pass`] takes a graph and returns a graph and a [`PassReport`]; a [`Pipeline`] runs
//! passes in order, optionally dumping the graph after each as canonical `.fir` and `.dot`.

use crate::cost::CostModel;
use crate::eqsat::EqSatReport;
use crate::PassError;
use fulgur_ir::{Graph, TensorType};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// What every pass may consult.
#[derive(Clone, Debug)]
pub struct PassContext {
    pub model: CostModel,
}

/// One graph-to-graph transformation.
pub trait Pass {
    fn name(&self) -> &str;
    /// Returns the new graph and what the pass itself has to say (`detail`); the pipeline fills in sizes,
    /// costs and time.
    fn run(&self, g: &Graph, cx: &PassContext) -> Result<(Graph, Option<EqSatReport>), PassError>;
}

/// What a pass did.
#[derive(Clone, Debug, Serialize)]
pub struct PassReport {
    pub pass: String,
    pub wall_ms: f64,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub kernels_before: usize,
    pub kernels_after: usize,
    /// Estimated seconds for one run of the graph under the cost model.
    pub cost_before_s: f64,
    pub cost_after_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eqsat: Option<EqSatReport>,
}

/// Estimated seconds and kernel count of a whole graph under the cost model.
///
/// Nodes that depend on parameters and constants only (weight preparation such as a transposed layout) are
/// done once at load time and cost nothing per run.
pub fn graph_cost(g: &Graph, model: &CostModel) -> (f64, usize) {
    let mut cost = 0.0;
    let mut kernels = 0;
    let param_only = param_only_nodes(g);
    for (id, n) in g.nodes() {
        if param_only[id.index()] {
            continue;
        }
        let ins: Vec<&TensorType> = n.inputs.iter().map(|&v| g.ty(v)).collect();
        let c = model.node_cost(&n.op, &ins, &n.outputs);
        let dt = n.outputs.first().map(|t| t.dtype).unwrap_or(fulgur_ir::DType::F32);
        cost += model.time(&c, dt);
        kernels += usize::from(c.kernel);
    }
    (cost, kernels)
}

/// For every node: whether it depends on parameters and constants only (no data input).
pub fn param_only_nodes(g: &Graph) -> Vec<bool> {
    let mut param_only = vec![false; g.node_count()];
    for (id, n) in g.nodes() {
        param_only[id.index()] = match &n.op {
            fulgur_ir::Op::Input { .. } => false,
            op if op.num_inputs() == Some(0) => true,
            _ => !n.inputs.is_empty() && n.inputs.iter().all(|v| param_only[v.node.index()]),
        };
    }
    param_only
}

/// Dead-code elimination: drops nodes no output depends on (inputs and parameters stay).
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &str {
        "dce"
    }
    fn run(&self, g: &Graph, _cx: &PassContext) -> Result<(Graph, Option<EqSatReport>), PassError> {
        Ok((g.dead_code_eliminated(), None))
    }
}

/// A sequence of passes.
#[derive(Default)]
pub struct Pipeline {
    pub passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    pub fn with(mut self, p: impl Pass + 'static) -> Pipeline {
        self.passes.push(Box::new(p));
        self
    }

    /// Runs every pass; with `dump`, writes `NN-PASS.fir` and `NN-PASS.dot` after each (and `00-input.*`).
    pub fn run(&self, g: &Graph, cx: &PassContext, dump: Option<&Path>) -> Result<(Graph, Vec<PassReport>), PassError> {
        if let Some(d) = dump {
            write_dump(d, "00-input", g)?;
        }
        // the graph after the last pass; the input itself until then (never copied)
        let mut last: Option<Graph> = None;
        let mut reports: Vec<PassReport> = Vec::new();
        for (i, p) in self.passes.iter().enumerate() {
            let cur = last.as_ref().unwrap_or(g);
            let (cost_before, kernels_before) = match reports.last() {
                Some(r) => (r.cost_after_s, r.kernels_after),
                None => graph_cost(cur, &cx.model),
            };
            let t = Instant::now();
            let (next, detail) = p.run(cur, cx)?;
            let wall_ms = t.elapsed().as_secs_f64() * 1e3;
            next.verify().map_err(|e| PassError::Invalid {
                pass: p.name().to_string(),
                message: e.to_string(),
            })?;
            let (cost_after, kernels_after) = graph_cost(&next, &cx.model);
            tracing::info!(
                pass = p.name(),
                wall_ms,
                nodes = next.node_count(),
                kernels_after,
                "pass done"
            );
            reports.push(PassReport {
                pass: p.name().to_string(),
                wall_ms,
                nodes_before: cur.node_count(),
                nodes_after: next.node_count(),
                kernels_before,
                kernels_after,
                cost_before_s: cost_before,
                cost_after_s: cost_after,
                eqsat: detail,
            });
            if let Some(d) = dump {
                write_dump(d, &format!("{:02}-{}", i + 1, p.name()), &next)?;
            }
            last = Some(next);
        }
        Ok((last.unwrap_or_else(|| g.clone()), reports))
    }
}

fn write_dump(dir: &Path, stem: &str, g: &Graph) -> Result<(), PassError> {
    std::fs::create_dir_all(dir).map_err(|e| PassError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let w = |ext: &str, text: String| {
        let p = dir.join(format!("{stem}.{ext}"));
        fulgur_ir::tensor::write_atomic(&p, text.as_bytes()).map_err(|e| PassError::Io(e.to_string()))
    };
    w("fir", fulgur_ir::text::print(g))?;
    w("dot", fulgur_ir::dot::to_dot(g))
}
