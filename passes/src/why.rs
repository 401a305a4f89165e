//! `--why KERNEL`: the chain of rewrites (egg explanations) that produced a kernel of the optimized graph from
//! the input graph's nodes, with the estimated cost of the term at each step.
//!
//! The kernel's template is saturated again with explanations enabled (explanations slow saturation down, so
//! the normal pipeline runs without them); the input term is the original node of the kernel's e-class, the
//! output term the extracted one, and egg's flat explanation lists the rewrites between them.

use crate::cost::CostModel;
use crate::eqsat::{segment_templates, EqSat};
use crate::extract::extract;
use crate::lang::{graph_to_egraph, EGraph, FNode, FOp, ShapeAnalysis};
use crate::pass::graph_cost;
use crate::PassError;
use egg::{FlatTerm, Id, Language, RecExpr};
use fulgur_ir::{Graph, Value};
use serde::Serialize;
use std::collections::HashMap;

/// One step of an explanation.
#[derive(Clone, Debug, Serialize)]
pub struct WhyStep {
    /// The rule applied to reach this term (`None` for the input term).
    pub rule: Option<String>,
    /// The op at the rewritten position, after the rewrite.
    pub at: String,
    /// Estimated seconds of the term (a DAG: shared subterms once) and its kernel count.
    pub cost_s: f64,
    pub kernels: usize,
}

/// The explanation of one kernel.
#[derive(Clone, Debug, Serialize)]
pub struct WhyReport {
    pub kernel: String,
    pub op: String,
    pub template: String,
    pub steps: Vec<WhyStep>,
}

/// A graph from a term (sharing identical subterms), for costing.
fn recexpr_graph(expr: &RecExpr<FNode>) -> Result<Graph, PassError> {
    let mut g = Graph::new("term");
    let mut vals: Vec<Value> = Vec::with_capacity(expr.as_ref().len());
    let mut memo: HashMap<(String, Vec<Value>), Value> = HashMap::new();
    for n in expr.as_ref() {
        let ins: Vec<Value> = n.children().iter().map(|c| vals[usize::from(*c)]).collect();
        let v = match &n.op {
            FOp::Proj(i) => Value::new(ins[0].node, *i),
            FOp::Op(k) => {
                if let Some((name, _, _)) = k.op().input_decl() {
                    match g.input_by_name(name) {
                        Some(id) => Value::new(id, 0),
                        None => Value::new(g.add_node(k.op().clone(), &[], None)?, 0),
                    }
                } else if let Some(v) = memo.get(&(k.text().to_string(), ins.clone())) {
                    *v
                } else {
                    let v = Value::new(g.add_node(k.op().clone(), &ins, None)?, 0);
                    memo.insert((k.text().to_string(), ins), v);
                    v
                }
            }
        };
        vals.push(v);
    }
    if let Some(last) = vals.last() {
        g.add_output("term", *last)?;
    }
    Ok(g)
}

/// A flat term as an expression (egg's own `get_recexpr` re-parses the printed term, and op texts hold spaces).
fn flat_to_recexpr(t: &FlatTerm<FNode>) -> RecExpr<FNode> {
    fn go(t: &FlatTerm<FNode>, out: &mut RecExpr<FNode>) -> Id {
        let ids: Vec<Id> = t.children.iter().map(|c| go(c, out)).collect();
        let mut i = 0;
        let node = t.node.clone().map_children(|_| {
            let id = ids[i];
            i += 1;
            id
        });
        out.add(node)
    }
    let mut out = RecExpr::default();
    go(t, &mut out);
    out
}

/// The op text where a rewrite happened in a flat term, and the rule.
fn rewrite_site(t: &FlatTerm<FNode>) -> Option<(String, String)> {
    if let Some(r) = t.forward_rule.or(t.backward_rule) {
        return Some((r.to_string(), t.node.to_string()));
    }
    t.children.iter().find_map(rewrite_site)
}

/// The term for a class: the original node of the input graph where there is one (`orig`), else the extracted
/// choice.
fn term(egraph: &EGraph, root: Id, choose: &dyn Fn(Id) -> FNode) -> RecExpr<FNode> {
    let mut expr = RecExpr::default();
    let mut done: HashMap<Id, Id> = HashMap::new();
    let mut stack = vec![(egraph.find(root), false)];
    while let Some((c, expanded)) = stack.pop() {
        if done.contains_key(&c) {
            continue;
        }
        let n = choose(c);
        if !expanded {
            stack.push((c, true));
            for &ch in n.children.iter().rev() {
                stack.push((egraph.find(ch), false));
            }
            continue;
        }
        let mapped = n.clone().map_children(|ch| done[&egraph.find(ch)]);
        done.insert(c, expr.add(mapped));
    }
    expr
}

/// Explains the kernel named `kernel` (a node name of the optimized graph, e.g. `layers.0.lightning_attention`,
/// or an op name, e.g. `lightning_attention`, for its first occurrence).
pub fn explain(
    input: &Graph,
    optimized: &Graph,
    eqsat: &EqSat,
    model: &CostModel,
    kernel: &str,
) -> Result<WhyReport, PassError> {
    let (kid, knode) = optimized
        .nodes()
        .find(|(_, n)| n.name.as_deref() == Some(kernel))
        .or_else(|| {
            optimized
                .nodes()
                .find(|(_, n)| n.op.name() == kernel && !n.op.is_input())
        })
        .ok_or_else(|| PassError::Rule(format!("no kernel named `{kernel}` in the optimized graph")))?;
    let kname = knode.name.clone().unwrap_or_else(|| format!("%{}", kid.index()));
    let op_text = crate::lang::op_text(&knode.op);
    let scope = kname.rsplit_once('.').map(|(s, _)| s.to_string()).unwrap_or_default();
    for (seg_scope, template) in segment_templates(input, &eqsat.limits)? {
        // a segment's label is its scope, or `SCOPE@N` for `main` and for windows
        if seg_scope != scope && !seg_scope.starts_with(&format!("{scope}@")) {
            continue;
        }
        let mut egraph = EGraph::new(ShapeAnalysis::default()).with_explanations_enabled();
        let vm = graph_to_egraph(&template, &mut egraph);
        let rules = eqsat.rules()?;
        let runner = eqsat.limits.runner(egraph, None).run(&rules);
        let mut egraph = runner.egraph;
        let Some(class) = egraph
            .classes()
            .find(|c| c.nodes.iter().any(|n| n.to_string() == op_text))
            .map(|c| c.id)
        else {
            continue;
        };
        // the input graph's node in that class
        let mut orig_of: HashMap<Id, FNode> = HashMap::new();
        for (id, n) in template.nodes() {
            let children: Vec<Id> = n.inputs.iter().map(|v| egraph.find(vm.get(*v))).collect();
            let c = if n.outputs.len() == 1 {
                egraph.find(vm.get(Value::new(id, 0)))
            } else {
                continue;
            };
            orig_of.entry(c).or_insert_with(|| FNode::new(n.op.clone(), children));
        }
        if !orig_of.contains_key(&egraph.find(class)) {
            continue;
        }
        let roots: Vec<Id> = template
            .outputs()
            .iter()
            .map(|(_, v)| egraph.find(vm.get(*v)))
            .collect();
        let ex = extract(&egraph, model, &roots);
        let orig = term(&egraph, class, &|c| {
            orig_of.get(&c).cloned().unwrap_or_else(|| egraph[c].nodes[0].clone())
        });
        let kernel_node = egraph[egraph.find(class)]
            .nodes
            .iter()
            .find(|n| n.to_string() == op_text)
            .cloned()
            .ok_or_else(|| PassError::Rule("kernel node vanished".into()))?;
        let root_class = egraph.find(class);
        // the kernel over its inputs as the input graph had them (classes the rewrites created come from the
        // extraction), so the explanation is about this kernel, not about everything beneath it
        let new = term(&egraph, class, &|c| {
            if c == root_class {
                kernel_node.clone()
            } else if let Some(n) = orig_of.get(&c) {
                n.clone()
            } else {
                ex.choice.get(&c).cloned().unwrap_or_else(|| egraph[c].nodes[0].clone())
            }
        });
        let mut expl = egraph.explain_equivalence(&orig, &new);
        let flat = expl.make_flat_explanation().clone();
        let mut steps = Vec::new();
        for (i, t) in flat.iter().enumerate() {
            let g = recexpr_graph(&flat_to_recexpr(t))?;
            let (cost_s, kernels) = graph_cost(&g, model);
            let (rule, at) = if i == 0 {
                (None, t.node.to_string())
            } else {
                match rewrite_site(t) {
                    Some((r, at)) => (Some(r), at),
                    None => (None, t.node.to_string()),
                }
            };
            steps.push(WhyStep {
                rule,
                at,
                cost_s,
                kernels,
            });
        }
        return Ok(WhyReport {
            kernel: kname,
            op: op_text,
            template: seg_scope,
            steps,
        });
    }
    Err(PassError::Rule(format!(
        "could not explain `{kname}` ({op_text}): it is not produced by a rewrite of an input node"
    )))
}

/// An op's text for a report line: a `fused` kernel as the list of its body's ops.
pub fn short_op(text: &str) -> String {
    if !text.starts_with("fused[") {
        return text.to_string();
    }
    let ops: Vec<&str> = text
        .split("\\n")
        .filter_map(|l| {
            let rhs = l.split_once(" = ")?.1;
            let name = rhs.split(['[', '(', ' ']).next()?;
            (name != "input" && name != "param" && !name.is_empty()).then_some(name)
        })
        .collect();
    format!("fused{{{}}}", ops.join(", "))
}
