//! DAG-aware greedy extraction.
//!
//! egg's default extractor sums costs over the *tree* of an expression, so a subterm used twice is paid twice:
//! wrong for dataflow graphs, where a shared value is computed once. Here the cost of choosing a node for a
//! class is the sum over the *set* of distinct classes it needs (its own node cost once, plus the union of its
//! children's sets), iterated to a fixpoint (the "greedy DAG" extractor of extraction-gym). Ties are broken by
//! the e-node order, so the same e-graph always gives the same choice.

use crate::cost::CostModel;
use crate::lang::{EGraph, FNode, FOp};
use egg::Id;
use fulgur_ir::{Graph, IrError, Op, TensorType, Value};
use std::collections::{BTreeMap, HashMap};

/// The chosen e-node of every reachable class, with the DAG cost of each choice.
#[derive(Clone, Debug)]
pub struct Extraction {
    pub choice: HashMap<Id, FNode>,
    /// Seconds: DAG cost of the class's chosen subgraph.
    pub cost: HashMap<Id, f64>,
}

/// Cost of one e-node alone (seconds) under the model.
pub fn enode_cost(egraph: &EGraph, model: &CostModel, n: &FNode, class: Id) -> f64 {
    let Some(op) = n.ir_op() else { return 0.0 };
    if egraph[class].data.param_only {
        // weight preparation: done once at load time
        return 0.0;
    }
    let ins: Vec<&TensorType> = n.children.iter().filter_map(|&c| egraph[c].data.ty()).collect();
    if ins.len() != n.children.len() {
        return f64::INFINITY;
    }
    let outs = &egraph[class].data.types;
    let c = model.node_cost(op, &ins, outs);
    let dt = outs.first().map(|t| t.dtype).unwrap_or(fulgur_ir::DType::F32);
    model.time(&c, dt)
}

/// Whether the node is a kernel launch under the model.
pub fn enode_is_kernel(egraph: &EGraph, model: &CostModel, n: &FNode, class: Id) -> bool {
    let Some(op) = n.ir_op() else { return false };
    if egraph[class].data.param_only {
        return false;
    }
    let ins: Vec<&TensorType> = n.children.iter().filter_map(|&c| egraph[c].data.ty()).collect();
    model.node_cost(op, &ins, &egraph[class].data.types).kernel
}

/// Runs greedy DAG extraction over the classes reachable from `roots`.
pub fn extract(egraph: &EGraph, model: &CostModel, roots: &[Id]) -> Extraction {
    // reachable classes, in a deterministic order
    let mut reach: Vec<Id> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        reach.push(c);
        for n in egraph[c].nodes.iter() {
            for &ch in &n.children {
                stack.push(egraph.find(ch));
            }
        }
    }
    reach.sort();
    let mut sets: HashMap<Id, BTreeMap<Id, f64>> = HashMap::new();
    let mut total: HashMap<Id, f64> = HashMap::new();
    let mut choice: HashMap<Id, FNode> = HashMap::new();
    let node_costs: HashMap<(Id, usize), f64> = reach
        .iter()
        .flat_map(|&c| egraph[c].nodes.iter().enumerate().map(move |(i, n)| ((c, i), n)))
        .map(|(k, n)| (k, enode_cost(egraph, model, n, k.0)))
        .collect();
    let mut changed = true;
    let mut rounds = 0;
    while changed && rounds < 1000 {
        changed = false;
        rounds += 1;
        for &c in &reach {
            for (i, n) in egraph[c].nodes.iter().enumerate() {
                let own = node_costs[&(c, i)];
                if !own.is_finite() {
                    continue;
                }
                let mut set: BTreeMap<Id, f64> = BTreeMap::new();
                let mut ok = true;
                for &ch in &n.children {
                    let ch = egraph.find(ch);
                    match sets.get(&ch) {
                        Some(s) if !s.contains_key(&c) => set.extend(s.iter().map(|(k, v)| (*k, *v))),
                        _ => {
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                set.insert(c, own);
                let t: f64 = set.values().sum();
                let better = match (total.get(&c), choice.get(&c)) {
                    (Some(&old), Some(prev)) => {
                        let eps = 1e-12 * old.abs().max(1e-30);
                        t < old - eps || ((t - old).abs() <= eps && n < prev)
                    }
                    _ => true,
                };
                if better && choice.get(&c) != Some(n) {
                    total.insert(c, t);
                    sets.insert(c, set);
                    choice.insert(c, n.clone());
                    changed = true;
                }
            }
        }
    }
    Extraction { choice, cost: total }
}

/// Total DAG cost (seconds) of the extraction for a set of roots: every needed class paid once.
pub fn dag_cost(egraph: &EGraph, model: &CostModel, ex: &Extraction, roots: &[Id]) -> (f64, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    let (mut cost, mut kernels) = (0.0, 0);
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        if let Some(n) = ex.choice.get(&c) {
            cost += enode_cost(egraph, model, n, c);
            if enode_is_kernel(egraph, model, n, c) {
                kernels += 1;
            }
            stack.extend(n.children.iter().map(|&ch| egraph.find(ch)));
        }
    }
    (cost, kernels)
}

/// Builds a graph from the chosen nodes: `outputs` are (name, class) pairs; `names` gives a node name for a
/// class when the input graph had one there; `inputs` (input and parameter ops) are declared first, in order,
/// so the graph keeps its signature even where an input is no longer used. Nodes are emitted in a
/// deterministic depth-first post-order.
pub fn build_graph(
    egraph: &EGraph,
    ex: &Extraction,
    graph_name: &str,
    inputs: &[Op],
    outputs: &[(String, Id)],
    names: &HashMap<Id, String>,
) -> Result<Graph, IrError> {
    let mut g = Graph::new(graph_name);
    for op in inputs {
        g.add_node(op.clone(), &[], None)?;
    }
    let mut done: HashMap<Id, Value> = HashMap::new();
    for (oname, root) in outputs {
        let v = emit(egraph, ex, names, &mut g, &mut done, egraph.find(*root))?;
        g.add_output(oname.clone(), v)?;
    }
    Ok(g)
}

fn emit(
    egraph: &EGraph,
    ex: &Extraction,
    names: &HashMap<Id, String>,
    g: &mut Graph,
    done: &mut HashMap<Id, Value>,
    root: Id,
) -> Result<Value, IrError> {
    // iterative post-order so deep graphs do not overflow the stack
    let mut stack: Vec<(Id, bool)> = vec![(root, false)];
    let mut visiting = std::collections::HashSet::new();
    while let Some((c, expanded)) = stack.pop() {
        if done.contains_key(&c) {
            continue;
        }
        if !expanded && !visiting.insert(c) {
            return Err(IrError::Graph(format!(
                "extraction: the chosen nodes form a cycle through e-class {c}"
            )));
        }
        let n = ex
            .choice
            .get(&c)
            .ok_or_else(|| IrError::Graph(format!("extraction: e-class {c} has no finite-cost choice")))?;
        if !expanded {
            stack.push((c, true));
            for &ch in n.children.iter().rev() {
                let ch = egraph.find(ch);
                if !done.contains_key(&ch) {
                    stack.push((ch, false));
                }
            }
            continue;
        }
        let v = match &n.op {
            FOp::Proj(i) => {
                let t = done[&egraph.find(n.children[0])];
                Value::new(t.node, *i)
            }
            FOp::Op(k) => {
                let inputs: Vec<Value> = n.children.iter().map(|&ch| done[&egraph.find(ch)]).collect();
                let name = match k.op() {
                    Op::Input { .. } | Op::Param { .. } => None,
                    _ => names.get(&c).cloned(),
                };
                if let Some(existing) = input_node(g, k.op()) {
                    Value::new(existing, 0)
                } else {
                    let id = g.add_node(k.op().clone(), &inputs, name)?;
                    Value::new(id, 0)
                }
            }
        };
        done.insert(c, v);
    }
    Ok(done[&root])
}

fn input_node(g: &Graph, op: &Op) -> Option<fulgur_ir::NodeId> {
    op.input_decl().and_then(|(name, _, _)| g.input_by_name(name))
}
