//! Soundness checking for rules: saturate a graph with some families (with the pipeline's own limits), then for
//! every e-class reachable from the outputs and every e-node in it, build a graph that *uses* that node and
//! compare it with the original on random inputs through the reference interpreter (f64).
//!
//! Using a node takes more than choosing it for its class: the class must also be reached from an output. Each
//! alternative is therefore *routed*: the graph is the extracted one, plus fresh copies of the e-nodes on a
//! path from an output down to the alternative's class (the path that leaves the extractor's choices least,
//! found by a 0-1 breadth-first search), the alternative at its end, and that output rebuilt over them. The
//! copies are new nodes whose other inputs are the extracted values, so a class may be computed one way on the
//! path and another way elsewhere: no route can close a cycle, and an alternative inside a cycle of the e-graph
//! (`a = recip(recip(a))`) is checked as well. Every alternative falls in one of four counts, reported apart:
//! - *in the extracted graph*: it is the extractor's choice and the extracted graph uses it (checked by the
//!   first run, of the extracted graph);
//! - *checked*: the graph routed through it differs from the extracted graph and agrees with the original;
//! - *skipped*: no graph could be built with it (a class it needs has no finite-cost e-node);
//! - *vacuous*: the graph routed through it is the extracted graph itself, so nothing about it was tested.
//!
//! A check in which skipped and vacuous alternatives outnumber the others proves little, and fails.

use crate::cost::{CostModel, Target};
use crate::eqsat::Limits;
use crate::extract::{build_graph, emit, extract, input_node, Extraction};
use crate::lang::{graph_to_egraph, EGraph, FNode, FOp, ShapeAnalysis};
use crate::rules::Family;
use egg::Id;
use fulgur_ir::{Buffer, DType, Graph, Interpreter, IrError, Op, Precision, Tensor, Value};
use std::collections::{HashMap, VecDeque};

/// What a soundness check covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Soundness {
    /// Families saturated.
    pub families: Vec<String>,
    /// E-classes reachable from the outputs, and their e-nodes (the alternatives).
    pub classes: usize,
    pub alternatives: usize,
    /// Alternatives the extracted graph itself uses (it is run first, so they are checked by that run).
    pub in_extracted: usize,
    /// Alternatives whose graph differs from the extracted one and agreed with the original.
    pub checked: usize,
    /// Alternatives no graph could be built with.
    pub skipped: usize,
    /// Alternatives whose graph is the extracted graph itself.
    pub vacuous: usize,
    /// Distinct graphs run through the interpreter.
    pub graphs_run: usize,
    /// Why saturation stopped.
    pub stop_reason: String,
}

impl std::fmt::Display for Soundness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} classes, {} alternatives: {} in the extracted graph, {} checked, {} skipped, {} vacuous ({} graphs \
             run; saturation: {})",
            self.families.join("+"),
            self.classes,
            self.alternatives,
            self.in_extracted,
            self.checked,
            self.skipped,
            self.vacuous,
            self.graphs_run,
            self.stop_reason
        )
    }
}

/// Random inputs for every input and parameter of `g`, with symbols bound from `env`. Integer inputs are
/// drawn in `[0, int_hi)`.
pub fn random_inputs(g: &Graph, env: &HashMap<String, i64>, seed: u64, int_hi: i64) -> HashMap<String, Tensor> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = HashMap::new();
    for id in g.inputs() {
        let Some((name, ty, _)) = g.node(id).op.input_decl() else {
            continue;
        };
        let shape = ty.shape.eval(env).unwrap_or_default();
        let n: usize = shape.iter().product();
        let data = match ty.dtype {
            d if d.is_float() => Buffer::F(
                (0..n)
                    .map(|_| fulgur_ir::tensor::round_to(d, next() * 2.0 - 1.0))
                    .collect(),
            ),
            DType::Bool => Buffer::B((0..n).map(|_| next() < 0.5).collect()),
            _ => Buffer::I((0..n).map(|_| (next() * int_hi as f64) as i64).collect()),
        };
        out.insert(
            name.to_string(),
            Tensor {
                dtype: ty.dtype,
                shape,
                data,
            },
        );
    }
    out
}

/// For every class reachable from the roots, the (class, e-node) through which a path from a root enters it,
/// choosing paths that follow the extraction wherever they can (a 0-1 breadth-first search: an edge through
/// the extracted e-node of its class costs 0, through any other e-node 1).
fn routes(egraph: &EGraph, base: &Extraction, roots: &[Id]) -> HashMap<Id, (Id, FNode)> {
    let mut dist: HashMap<Id, usize> = HashMap::new();
    let mut pred: HashMap<Id, (Id, FNode)> = HashMap::new();
    let mut dq: VecDeque<(Id, usize)> = VecDeque::new();
    for &r in roots {
        let r = egraph.find(r);
        if dist.insert(r, 0).is_none() {
            dq.push_back((r, 0));
        }
    }
    while let Some((c, d)) = dq.pop_front() {
        if dist.get(&c).is_some_and(|&x| x < d) {
            continue;
        }
        for n in egraph[c].nodes.iter() {
            let w = usize::from(base.choice.get(&c) != Some(n));
            for &ch in &n.children {
                let ch = egraph.find(ch);
                let nd = d + w;
                if dist.get(&ch).is_none_or(|&x| nd < x) {
                    dist.insert(ch, nd);
                    pred.insert(ch, (c, n.clone()));
                    if w == 0 {
                        dq.push_front((ch, nd));
                    } else {
                        dq.push_back((ch, nd));
                    }
                }
            }
        }
    }
    pred
}

/// What routing an alternative needs: the saturated e-graph, its extraction, the routes from the outputs, and
/// the original graph (its name and signature) with its output classes.
struct Routes<'a> {
    egraph: &'a EGraph,
    base: &'a Extraction,
    pred: &'a HashMap<Id, (Id, FNode)>,
    g: &'a Graph,
    roots: &'a [(String, Id)],
}

/// The graph that uses e-node `n` of class `c`: the extracted graph, with the outputs of the route's root
/// recomputed through fresh copies of the route's e-nodes down to `n` (see the module documentation).
fn routed_graph(r: &Routes<'_>, c: Id, n: &FNode) -> Result<Graph, IrError> {
    let Routes {
        egraph,
        base,
        pred,
        g,
        roots,
    } = *r;
    let mut out = Graph::new(g.name.clone());
    for id in g.inputs() {
        out.add_node(g.node(id).op.clone(), &[], None)?;
    }
    let no_names = HashMap::new();
    let mut done: HashMap<Id, Value> = HashMap::new();
    // one e-node applied to extracted children, except `(below, v)`: the child class on the route and its copy
    let mut apply = |out: &mut Graph, node: &FNode, below: Option<(Id, Value)>| -> Result<Value, IrError> {
        let mut ins = Vec::with_capacity(node.children.len());
        for &ch in &node.children {
            let ch = egraph.find(ch);
            match below {
                Some((b, v)) if b == ch => ins.push(v),
                _ => ins.push(emit(egraph, base, &no_names, out, &mut done, ch)?),
            }
        }
        Ok(match &node.op {
            FOp::Proj(i) => Value::new(ins[0].node, *i),
            FOp::Op(k) => match input_node(out, k.op()) {
                Some(existing) => Value::new(existing, 0),
                None => Value::new(out.add_node(k.op().clone(), &ins, None)?, 0),
            },
        })
    };
    let mut v = apply(&mut out, n, None)?;
    let mut at = c;
    let mut steps = 0;
    while let Some((p, via)) = pred.get(&at) {
        v = apply(&mut out, via, Some((at, v)))?;
        at = *p;
        steps += 1;
        if steps > pred.len() {
            return Err(IrError::Graph("the route loops".into()));
        }
    }
    for (name, r) in roots {
        let val = if *r == at {
            v
        } else {
            emit(egraph, base, &no_names, &mut out, &mut done, *r)?
        };
        out.add_output(name.clone(), val)?;
    }
    Ok(out)
}

/// Saturates `g` with `families` under the pipeline's default [`Limits`], then checks every alternative of
/// every reachable class against `g` on `inputs` (relative L2 tolerance `tol`; see the module documentation).
/// Fails on the first disagreement, or when skipped or vacuous alternatives outnumber the checked ones.
pub fn check_soundness(
    g: &Graph,
    families: Vec<Family>,
    inputs: &HashMap<String, Tensor>,
    tol: f64,
) -> Result<Soundness, String> {
    let interp = Interpreter::new(Precision::F64);
    let want = interp.run(g, inputs).map_err(|e| format!("original graph: {e}"))?;
    let mut egraph = EGraph::new(ShapeAnalysis::default());
    let vm = graph_to_egraph(g, &mut egraph);
    let mut report = Soundness {
        families: families.iter().map(|f| f.name.to_string()).collect(),
        ..Soundness::default()
    };
    let rules: Vec<_> = families.into_iter().flat_map(|f| f.rules).collect();
    let runner = Limits::default().runner(egraph, None).run(&rules);
    report.stop_reason = format!("{:?}", runner.stop_reason);
    let egraph = runner.egraph;
    if let Some(c) = egraph.classes().find_map(|c| c.data.conflict.clone()) {
        return Err(format!("type conflict: {c}"));
    }
    let model = CostModel::new(Target::by_name("H100").expect("H100 is built in"));
    let roots: Vec<(String, Id)> = g
        .outputs()
        .iter()
        .map(|(n, v)| (n.clone(), egraph.find(vm.get(*v))))
        .collect();
    let root_ids: Vec<Id> = roots.iter().map(|r| r.1).collect();
    let base = extract(&egraph, &model, &root_ids);
    let inputs_ops: Vec<Op> = g.inputs().into_iter().map(|id| g.node(id).op.clone()).collect();
    let build = |ex: &Extraction| build_graph(&egraph, ex, &g.name, &inputs_ops, &roots, &HashMap::new());
    let compare = |alt: &Graph, what: &str| -> Result<(), String> {
        let got = interp
            .run(alt, inputs)
            .map_err(|e| format!("{what}: {e}\n{}", fulgur_ir::text::print(alt)))?;
        for (name, w) in &want {
            let e = rel_error(&got[name], w);
            if e.is_nan() || e > tol {
                return Err(format!(
                    "{what} changes output `{name}` (relative error {e:.3e}):\n{}",
                    fulgur_ir::text::print(alt)
                ));
            }
        }
        Ok(())
    };
    let base_graph = build(&base).map_err(|e| format!("the extracted graph cannot be built: {e}"))?;
    compare(&base_graph, "the extracted graph")?;
    report.graphs_run = 1;
    let base_text = fulgur_ir::text::print(&base_graph);
    let pred = routes(&egraph, &base, &root_ids);
    // the classes the extracted graph computes
    let mut in_base: std::collections::HashSet<Id> = std::collections::HashSet::new();
    let mut stack: Vec<Id> = root_ids.clone();
    while let Some(c) = stack.pop() {
        let c = egraph.find(c);
        if in_base.insert(c) {
            if let Some(n) = base.choice.get(&c) {
                stack.extend(n.children.iter().copied());
            }
        }
    }
    // graphs already run (many alternatives build the same graph)
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::from([base_text.clone()]);
    let mut classes: Vec<Id> = base.choice.keys().copied().collect();
    classes.sort();
    report.classes = classes.len();
    let routes = Routes {
        egraph: &egraph,
        base: &base,
        pred: &pred,
        g,
        roots: &roots,
    };
    for c in classes {
        for n in egraph[c].nodes.iter() {
            report.alternatives += 1;
            if base.choice.get(&c) == Some(n) && in_base.contains(&c) {
                report.in_extracted += 1;
                continue;
            }
            let Ok(alt) = routed_graph(&routes, c, n) else {
                report.skipped += 1;
                continue;
            };
            let text = fulgur_ir::text::print(&alt);
            if text == base_text {
                report.vacuous += 1;
                continue;
            }
            if seen.insert(text) {
                compare(&alt, &format!("alternative `{n}` of e-class {c}"))?;
                report.graphs_run += 1;
            }
            report.checked += 1;
        }
    }
    if report.skipped + report.vacuous > report.checked + report.in_extracted {
        return Err(format!(
            "the check proves little: skipped and vacuous alternatives outnumber the checked ones ({report})"
        ));
    }
    Ok(report)
}

/// Relative L2 error over the finite elements; non-finite elements must match exactly (NaN with NaN, an
/// infinity with the same infinity), else the error is infinite.
pub fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (x, y) = (a.to_f64(), b.to_f64());
    if x.len() != y.len() || a.shape != b.shape {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (p, q) in x.iter().zip(&y) {
        if !q.is_finite() || !p.is_finite() {
            let same = (p.is_nan() && q.is_nan()) || p == q;
            if !same {
                return f64::INFINITY;
            }
            continue;
        }
        num += (p - q) * (p - q);
        den += q * q;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
