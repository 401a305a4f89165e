//! `--why KERNEL`: the chain of rewrites (egg explanations) that produced a kernel of the optimized graph from
//! the input graph's nodes, with the estimated cost of the term at each step.
//!
//! The kernel's template is saturated again with explanations enabled (explanations slow saturation down, so
//! the normal pipeline runs without them) and extracted again (the same choices as the pipeline made: both are
//! deterministic); the kernel is found in that extraction by its name (`LABEL.OP` or `LABEL.OP.K`: the K-th
//! `OP` of its segment). When the kernel's e-class holds a node of the input graph, the explanation goes from
//! that node to the kernel. When it does not (a kernel a rewrite introduced *inside* a larger term: the router,
//! dispatch and grouped GEMMs of the MoE rewrite, the wide matmul and slices of joined projections), it goes
//! from the input node of the nearest consumer class that has one to that class's extracted term, which holds
//! the kernel; the report names that class's input op. A kernel the optimizer did not rewrite is reported as
//! such, with no rewrite steps.

use crate::cost::CostModel;
use crate::eqsat::{segment_templates, EqSat};
use crate::extract::{build_graph_classes, extract};
use crate::lang::{graph_to_egraph, EGraph, FNode, FOp, ShapeAnalysis};
use crate::pass::graph_cost;
use crate::PassError;
use egg::{FlatTerm, Id, Language, RecExpr};
use fulgur_ir::{Composite, Graph, NodeId, Op, Value};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};

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
    /// Whether a rewrite produced the kernel (else it is a node of the input graph, kept as it was).
    pub rewritten: bool,
    /// When the kernel is part of a larger rewritten term: the input graph's op that term replaces.
    pub within: Option<String>,
    pub steps: Vec<WhyStep>,
}

/// An op for people: a `fused` kernel as the list of its body's ops (`fused{mul, add, rms_norm}`), any other as
/// its canonical text.
pub fn op_display(op: &Op) -> String {
    match op {
        Op::Composite(Composite::Fused { body }) => {
            let ops: Vec<&str> = body
                .graph()
                .nodes()
                .filter(|(_, n)| !n.op.is_input())
                .map(|(_, n)| n.op.name())
                .collect();
            format!("fused{{{}}}", ops.join(", "))
        }
        op => crate::lang::op_text(op),
    }
}

fn node_display(n: &FNode) -> String {
    match n.ir_op() {
        Some(op) => op_display(op),
        None => n.to_string(),
    }
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
/// The rule (`RULE`, or `RULE (backwards)` where egg's proof uses it from right to left) and the op where it
/// applies in a flat term.
fn rewrite_site(t: &FlatTerm<FNode>) -> Option<(String, String)> {
    if let Some(r) = t.forward_rule {
        return Some((r.to_string(), node_display(&t.node)));
    }
    if let Some(r) = t.backward_rule {
        return Some((format!("{r} (backwards)"), node_display(&t.node)));
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

/// The node of `optimized` named `kernel`, or the first node of that op when `kernel` is an op name; an error
/// listing what may be asked otherwise.
fn resolve<'g>(optimized: &'g Graph, kernel: &str) -> Result<(NodeId, &'g fulgur_ir::Node), PassError> {
    let found = optimized
        .nodes()
        .find(|(_, n)| n.name.as_deref() == Some(kernel))
        .or_else(|| {
            optimized
                .nodes()
                .find(|(_, n)| n.op.name() == kernel && !n.op.is_input() && n.name.is_some())
        });
    if let Some(f) = found {
        return Ok(f);
    }
    let explainable = |n: &&fulgur_ir::Node| !n.op.is_input() && !matches!(n.op, Op::Constant { .. });
    let named: Vec<&str> = optimized
        .nodes()
        .map(|(_, n)| n)
        .filter(explainable)
        .filter_map(|n| n.name.as_deref())
        .collect();
    let mut kinds: Vec<&str> = optimized
        .nodes()
        .map(|(_, n)| n)
        .filter(explainable)
        .map(|n| n.op.name())
        .collect();
    kinds.sort();
    kinds.dedup();
    let names = if named.len() <= 40 {
        format!("the nodes: {}", named.join(", "))
    } else {
        format!(
            "{} nodes, named like {} (`--dump DIR` writes them all in the optimized .fir)",
            named.len(),
            named[..3].join(", ")
        )
    };
    Err(PassError::Rule(format!(
        "no kernel named `{kernel}` in the optimized graph: give a kernel's name ({names}) or an op, for its first \
         kernel: {}",
        kinds.join(", ")
    )))
}

/// A template saturated with explanations and extracted as the pipeline did, kept to explain several of its
/// kernels.
struct Saturated {
    egraph: EGraph,
    ex: crate::extract::Extraction,
    /// The extracted template and the value standing for each class.
    tg: Graph,
    classes_of: HashMap<Value, Vec<Id>>,
    /// The input graph's node of each class that has one.
    orig_of: HashMap<Id, FNode>,
}

/// Explains kernels of one optimized graph; templates are saturated once each, on first use.
pub struct Why<'a> {
    optimized: &'a Graph,
    eqsat: &'a EqSat,
    model: &'a CostModel,
    segs: Vec<(String, Graph)>,
    cache: HashMap<String, Saturated>,
}

/// Explains the kernel named `kernel` (a node name of the optimized graph, e.g. `layers.0.lightning_layer` or
/// `layers.0.matmul.2`, or an op name, e.g. `grouped_matmul`, for its first occurrence).
pub fn explain(
    input: &Graph,
    optimized: &Graph,
    eqsat: &EqSat,
    model: &CostModel,
    kernel: &str,
) -> Result<WhyReport, PassError> {
    Why::new(input, optimized, eqsat, model)?.explain(kernel)
}

impl<'a> Why<'a> {
    pub fn new(
        input: &'a Graph,
        optimized: &'a Graph,
        eqsat: &'a EqSat,
        model: &'a CostModel,
    ) -> Result<Why<'a>, PassError> {
        Ok(Why {
            optimized,
            eqsat,
            model,
            segs: segment_templates(input, &eqsat.limits)?,
            cache: HashMap::new(),
        })
    }

    fn saturate(&self, template: &Graph) -> Result<Saturated, PassError> {
        let mut egraph = EGraph::new(ShapeAnalysis::default()).with_explanations_enabled();
        let vm = graph_to_egraph(template, &mut egraph);
        let rules = self.eqsat.rules()?;
        let runner = self.eqsat.limits.runner(egraph, None).run(&rules);
        let egraph = runner.egraph;
        let roots: Vec<(String, Id)> = template
            .outputs()
            .iter()
            .map(|(n, v)| (n.clone(), egraph.find(vm.get(*v))))
            .collect();
        let root_ids: Vec<Id> = roots.iter().map(|r| r.1).collect();
        let ex = extract(&egraph, self.model, &root_ids);
        let inputs: Vec<Op> = template
            .inputs()
            .into_iter()
            .map(|id| template.node(id).op.clone())
            .collect();
        let (tg, class_of) = build_graph_classes(&egraph, &ex, &template.name, &inputs, &roots, &HashMap::new())?;
        let mut classes_of: HashMap<Value, Vec<Id>> = HashMap::new();
        for (&c, &v) in &class_of {
            classes_of.entry(v).or_default().push(c);
        }
        for cs in classes_of.values_mut() {
            cs.sort();
        }
        let mut orig_of: HashMap<Id, FNode> = HashMap::new();
        for (_, n) in template.nodes() {
            let children: Vec<Id> = n.inputs.iter().map(|v| egraph.find(vm.get(*v))).collect();
            let node = FNode::new(n.op.clone(), children);
            if let Some(c) = egraph.lookup(node.clone()) {
                orig_of.entry(egraph.find(c)).or_insert(node);
            }
        }
        Ok(Saturated {
            egraph,
            ex,
            tg,
            classes_of,
            orig_of,
        })
    }

    /// Explains one kernel (see [`explain`]).
    pub fn explain(&mut self, kernel: &str) -> Result<WhyReport, PassError> {
        let (kid, knode) = resolve(self.optimized, kernel)?;
        let kname = knode.name.clone().unwrap_or_else(|| format!("%{}", kid.index()));
        if matches!(knode.op, Op::Constant { .. }) {
            return Err(PassError::Rule(format!(
                "`{kname}` is a constant of the input graph (a template input): no rewrite produced it"
            )));
        }
        // the segment: the longest label the name starts with
        let (label, template) = self
            .segs
            .iter()
            .filter(|(l, _)| kname.starts_with(&format!("{l}.")))
            .max_by_key(|(l, _)| l.len())
            .cloned()
            .ok_or_else(|| PassError::Rule(format!("`{kname}` belongs to no segment of the input graph")))?;
        let rest = &kname[label.len() + 1..];
        let (op_name, k) = match rest.rsplit_once('.') {
            Some((o, k)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()) => {
                (o, k.parse::<usize>().unwrap_or(0))
            }
            _ => (rest, 0),
        };
        if !self.cache.contains_key(&label) {
            let st = self.saturate(&template)?;
            self.cache.insert(label.clone(), st);
        }
        let model = self.model;
        let st = self.cache.get_mut(&label).expect("cached above");
        let Saturated {
            egraph,
            ex,
            tg,
            classes_of,
            orig_of,
        } = st;
        let tnode = tg
            .nodes()
            .filter(|(_, n)| !n.op.is_input() && n.op.name() == op_name)
            .nth(k)
            .map(|(id, _)| id)
            .ok_or_else(|| {
                PassError::Rule(format!(
                    "`{kname}`: template {label} does not extract an op `{op_name}` #{k} again (the optimizer is \
                     not deterministic?)"
                ))
            })?;
        // the kernel's class: for a node with several outputs, the tuple (the class whose choice is no projection)
        let kclass = classes_of
            .get(&Value::new(tnode, 0))
            .and_then(|cs| {
                cs.iter()
                    .copied()
                    .find(|c| ex.choice.get(c).is_some_and(|n| !matches!(n.op, FOp::Proj(_))))
            })
            .ok_or_else(|| PassError::Rule(format!("`{kname}`: its e-class is not found")))?;
        let kernel_node = ex.choice[&kclass].clone();
        // the class to explain: the kernel's own, or the nearest consumer's that the input graph has a node for
        let mut target = None;
        let mut path: HashSet<Id> = HashSet::from([kclass]);
        if orig_of.contains_key(&kclass) {
            target = Some(kclass);
        } else {
            let mut queue: VecDeque<NodeId> = VecDeque::from([tnode]);
            let mut seen: HashSet<NodeId> = HashSet::from([tnode]);
            'search: while let Some(n) = queue.pop_front() {
                for i in 0..tg.node(n).outputs.len() {
                    for &c in classes_of
                        .get(&Value::new(n, i as u32))
                        .map(|v| v.as_slice())
                        .unwrap_or(&[])
                    {
                        if orig_of.contains_key(&c) {
                            target = Some(c);
                            break 'search;
                        }
                        path.insert(c);
                    }
                }
                for (u, _, _) in tg.users(n) {
                    if seen.insert(u) {
                        queue.push_back(u);
                    }
                }
            }
        }
        let target = target.ok_or_else(|| {
            PassError::Rule(format!(
                "could not explain `{kname}`: no consumer of it is a value of the input graph"
            ))
        })?;
        let orig = term(egraph, target, &|c| {
            orig_of.get(&c).cloned().unwrap_or_else(|| egraph[c].nodes[0].clone())
        });
        // the kernel over its inputs as the input graph had them: classes on the way to it as extracted
        let new = term(egraph, target, &|c| {
            if c == kclass {
                kernel_node.clone()
            } else if c == target || path.contains(&c) {
                ex.choice.get(&c).cloned().unwrap_or_else(|| egraph[c].nodes[0].clone())
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
                (None, node_display(&t.node))
            } else {
                match rewrite_site(t) {
                    Some((r, at)) => (Some(r), at),
                    None => (None, node_display(&t.node)),
                }
            };
            steps.push(WhyStep {
                rule,
                at,
                cost_s,
                kernels,
            });
        }
        let rewritten = steps.len() > 1 || orig != new;
        let within = (target != kclass).then(|| node_display(&orig_of[&target]));
        Ok(WhyReport {
            kernel: kname,
            op: node_display(&kernel_node),
            template: label,
            rewritten,
            within,
            steps,
        })
    }
}
