//! Equality saturation, once per distinct layer template, then stitched.
//!
//! The graph is cut into *segments*: maximal runs of consecutive nodes (in topological node order) whose
//! names share a layer scope (`layers.N.`), and the runs between them. Each segment becomes a *template*: a
//! graph whose inputs are the values the segment reads from elsewhere (including its non-scalar constants, such
//! as a layer's decay rates, so layers that differ only in those share a template) and whose outputs are the
//! values read elsewhere. Templates are keyed by their canonical `.fir` text (node names removed); each distinct
//! template is saturated and extracted once, and every segment is replaced by an instance of its optimized
//! template. Compile time therefore grows with the number of distinct templates, not with depth.

use crate::cost::CostModel;
use crate::extract::{build_graph, dag_cost, extract};
use crate::lang::{graph_to_egraph, EGraph, FNode, Rewrite, ShapeAnalysis};
use crate::pass::{Pass, PassContext};
use crate::rules::Family;
use crate::PassError;
use egg::{Id, Runner, StopReason};
use fulgur_ir::{Graph, NodeId, Op, Value};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Saturation bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nodes: 20_000,
            iterations: 12,
            time: Duration::from_secs(5),
        }
    }
}

/// One saturation iteration.
#[derive(Clone, Debug, Serialize)]
pub struct IterReport {
    pub enodes: usize,
    pub eclasses: usize,
    pub applied: BTreeMap<String, usize>,
    pub ms: f64,
}

/// Matches found and applications made by one rule over a whole saturation.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RuleStat {
    pub family: String,
    pub matches: usize,
    pub applications: usize,
}

/// What saturating one template did.
#[derive(Clone, Debug, Serialize)]
pub struct TemplateReport {
    /// The first instance's scope (`layers.0`) or `main@N` for a segment outside layers.
    pub name: String,
    /// Every segment that uses this template.
    pub instances: Vec<String>,
    pub nodes: usize,
    pub iterations: Vec<IterReport>,
    pub stop_reason: String,
    pub rules: BTreeMap<String, RuleStat>,
    pub cost_before_s: f64,
    pub cost_after_s: f64,
    pub kernels_before: usize,
    pub kernels_after: usize,
    pub wall_ms: f64,
    /// Type conflicts found on merges (rule bugs); the pass fails when this is not empty.
    pub conflicts: Vec<String>,
}

/// The equality-saturation pass's report.
#[derive(Clone, Debug, Serialize)]
pub struct EqSatReport {
    pub families: Vec<String>,
    pub templates: Vec<TemplateReport>,
}

/// The equality-saturation pass.
pub struct EqSat {
    pub families: Vec<Family>,
    pub limits: Limits,
}

type DynSearcher = Arc<dyn egg::Searcher<FNode, ShapeAnalysis> + Sync + Send>;
type DynApplier = Arc<dyn egg::Applier<FNode, ShapeAnalysis> + Sync + Send>;

/// A searcher that counts the matches of the searcher it wraps.
struct Counted {
    inner: DynSearcher,
    count: Arc<AtomicUsize>,
}

/// An applier shared with the rule it came from.
struct Shared(DynApplier);

impl egg::Applier<FNode, ShapeAnalysis> for Shared {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &egg::Subst,
        ast: Option<&egg::PatternAst<FNode>>,
        rule: egg::Symbol,
    ) -> Vec<Id> {
        self.0.apply_one(egraph, eclass, subst, ast, rule)
    }
    fn apply_matches(&self, egraph: &mut EGraph, matches: &[egg::SearchMatches<FNode>], rule: egg::Symbol) -> Vec<Id> {
        self.0.apply_matches(egraph, matches, rule)
    }
    fn get_pattern_ast(&self) -> Option<&egg::PatternAst<FNode>> {
        self.0.get_pattern_ast()
    }
    fn vars(&self) -> Vec<egg::Var> {
        self.0.vars()
    }
}

impl egg::Searcher<FNode, ShapeAnalysis> for Counted {
    fn search_eclass_with_limit(
        &self,
        egraph: &EGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<egg::SearchMatches<'_, FNode>> {
        let m = self.inner.search_eclass_with_limit(egraph, eclass, limit);
        if let Some(m) = &m {
            self.count.fetch_add(m.substs.len(), Ordering::Relaxed);
        }
        m
    }
    fn vars(&self) -> Vec<egg::Var> {
        self.inner.vars()
    }
    fn get_pattern_ast(&self) -> Option<&egg::PatternAst<FNode>> {
        self.inner.get_pattern_ast()
    }
}

/// One segment of the input graph.
struct Segment {
    scope: String,
    nodes: Vec<NodeId>,
}

/// A segment lifted out as a stand-alone graph.
struct Template {
    graph: Graph,
    /// Template input `argI` ← this value of the original graph.
    args: Vec<Value>,
    /// Template output `outJ` → this value of the original graph.
    outs: Vec<Value>,
    /// Canonical text (no names): the template's identity.
    key: String,
}

fn layer_scope(name: &Option<String>) -> String {
    if let Some(n) = name {
        if let Some(rest) = n.strip_prefix("layers.") {
            let idx: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !idx.is_empty() {
                return format!("layers.{idx}");
            }
        }
    }
    "main".to_string()
}

fn segments(g: &Graph) -> Vec<Segment> {
    let mut segs: Vec<Segment> = Vec::new();
    for (id, n) in g.nodes() {
        if n.op.is_input() {
            continue;
        }
        let scope = layer_scope(&n.name);
        match segs.last_mut() {
            Some(s) if s.scope == scope => s.nodes.push(id),
            _ => segs.push(Segment { scope, nodes: vec![id] }),
        }
    }
    segs
}

fn is_abstracted_constant(op: &Op) -> bool {
    matches!(op, Op::Constant { shape, .. } if shape.iter().product::<usize>() > 1)
}

fn lift(g: &Graph, seg: &Segment, used_outside: &dyn Fn(Value) -> bool) -> Result<Template, PassError> {
    let po = crate::pass::param_only_nodes(g);
    let inside: std::collections::HashSet<NodeId> = seg
        .nodes
        .iter()
        .copied()
        .filter(|&id| !is_abstracted_constant(&g.node(id).op))
        .collect();
    let mut t = Graph::new("template");
    let mut map: HashMap<Value, Value> = HashMap::new();
    let mut args = Vec::new();
    let arg_of =
        |v: Value, t: &mut Graph, map: &mut HashMap<Value, Value>, args: &mut Vec<Value>| -> Result<Value, PassError> {
            if let Some(x) = map.get(&v) {
                return Ok(*x);
            }
            let ty = g.ty(v).clone();
            // values computed from weights and constants alone stay parameters in the template, so the cost
            // model treats their preparation as load-time work
            let name = format!("arg{}", args.len());
            let a = if po[v.node.index()] {
                t.param(&name, ty.dtype, ty.shape.0)?
            } else {
                t.input(&name, ty.dtype, ty.shape.0)?
            };
            args.push(v);
            map.insert(v, a);
            Ok(a)
        };
    for &id in &seg.nodes {
        if !inside.contains(&id) {
            continue;
        }
        let n = g.node(id);
        let mut ins = Vec::new();
        for &v in &n.inputs {
            let x = if inside.contains(&v.node) {
                map[&v]
            } else {
                arg_of(v, &mut t, &mut map, &mut args)?
            };
            ins.push(x);
        }
        let nid = t.add_node(n.op.clone(), &ins, None)?;
        for i in 0..n.outputs.len() {
            map.insert(Value::new(id, i as u32), Value::new(nid, i as u32));
        }
    }
    let mut outs = Vec::new();
    for &id in &seg.nodes {
        if !inside.contains(&id) {
            continue;
        }
        for i in 0..g.node(id).outputs.len() {
            let v = Value::new(id, i as u32);
            if used_outside(v) {
                t.add_output(format!("out{}", outs.len()), map[&v])?;
                outs.push(v);
            }
        }
    }
    let key = fulgur_ir::text::print(&t);
    Ok(Template {
        graph: t,
        args,
        outs,
        key,
    })
}

/// An optimized template and what it took.
struct Optimized {
    graph: Graph,
    report: TemplateReport,
}

/// Where each value is read from outside its own segment (or is a graph output).
fn outside_uses(g: &Graph, segs: &[Segment]) -> HashMap<Value, bool> {
    let mut seg_of: HashMap<NodeId, usize> = HashMap::new();
    for (i, s) in segs.iter().enumerate() {
        for &n in &s.nodes {
            seg_of.insert(n, i);
        }
    }
    let mut outside: HashMap<Value, bool> = HashMap::new();
    for (id, n) in g.nodes() {
        for &v in &n.inputs {
            let same = match (seg_of.get(&id), seg_of.get(&v.node)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            };
            if !same {
                outside.insert(v, true);
            }
        }
    }
    for (_, v) in g.outputs() {
        outside.insert(*v, true);
    }
    outside
}

/// Every segment of `g` as (scope, template graph), in order.
pub fn segment_templates(g: &Graph) -> Result<Vec<(String, Graph)>, PassError> {
    let segs = segments(g);
    let outside = outside_uses(g, &segs);
    let used = |v: Value| outside.get(&v).copied().unwrap_or(false);
    segs.iter()
        .map(|s| Ok((s.scope.clone(), lift(g, s, &used)?.graph)))
        .collect()
}

impl EqSat {
    /// All rules of the enabled families.
    pub fn rules(&self) -> Result<Vec<Rewrite>, PassError> {
        let mut out = Vec::new();
        for fam in &self.families {
            for r in &fam.rules {
                let searcher = Counted {
                    inner: r.searcher.clone(),
                    count: Arc::default(),
                };
                out.push(
                    egg::Rewrite::new(r.name, searcher, Shared(r.applier.clone()))
                        .map_err(|e| PassError::Rule(format!("rule `{}`: {e}", r.name)))?,
                );
            }
        }
        Ok(out)
    }
}

impl EqSat {
    pub fn new(families: Vec<Family>) -> EqSat {
        EqSat {
            families,
            limits: Limits::default(),
        }
    }

    /// Saturates and extracts one template graph.
    fn optimize(&self, t: &Graph, model: &CostModel, name: &str) -> Result<Optimized, PassError> {
        let start = Instant::now();
        let mut egraph = EGraph::new(ShapeAnalysis);
        let vm = graph_to_egraph(t, &mut egraph);
        egraph.rebuild();
        let roots: Vec<(String, Id)> = t.outputs().iter().map(|(n, v)| (n.clone(), vm.get(*v))).collect();
        let root_ids: Vec<Id> = roots.iter().map(|r| r.1).collect();
        // names of the template's nodes are absent; keep the class → original op name for readability
        let before = extract(&egraph, model, &root_ids);
        let (cost_before, kernels_before) = dag_cost(&egraph, model, &before, &root_ids);

        let mut counters: Vec<(String, String, Arc<AtomicUsize>)> = Vec::new();
        let mut rules: Vec<Rewrite> = Vec::new();
        for fam in &self.families {
            for r in &fam.rules {
                let count = Arc::new(AtomicUsize::new(0));
                counters.push((r.name.to_string(), fam.name.to_string(), count.clone()));
                let searcher = Counted {
                    inner: r.searcher.clone(),
                    count,
                };
                let rw = egg::Rewrite::new(r.name, searcher, Shared(r.applier.clone()))
                    .map_err(|e| PassError::Rule(format!("rule `{}`: {e}", r.name)))?;
                rules.push(rw);
            }
        }
        let runner: Runner<FNode, ShapeAnalysis> = Runner::default()
            .with_egraph(egraph)
            .with_node_limit(self.limits.nodes)
            .with_iter_limit(self.limits.iterations)
            .with_time_limit(self.limits.time)
            .run(&rules);
        let stop = match &runner.stop_reason {
            Some(StopReason::Saturated) => "saturated".to_string(),
            Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
            Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
            Some(StopReason::TimeLimit(s)) => format!("time limit ({s} s)"),
            Some(StopReason::Other(s)) => s.clone(),
            None => "not run".to_string(),
        };
        let mut stats: BTreeMap<String, RuleStat> = BTreeMap::new();
        for (name, fam, c) in &counters {
            let e = stats.entry(name.clone()).or_default();
            e.family = fam.clone();
            e.matches += c.load(Ordering::Relaxed);
        }
        let iterations: Vec<IterReport> = runner
            .iterations
            .iter()
            .map(|it| {
                let applied: BTreeMap<String, usize> = it.applied.iter().map(|(k, v)| (k.to_string(), *v)).collect();
                for (k, v) in &applied {
                    stats.entry(k.clone()).or_default().applications += v;
                }
                IterReport {
                    enodes: it.egraph_nodes,
                    eclasses: it.egraph_classes,
                    applied,
                    ms: it.total_time * 1e3,
                }
            })
            .collect();
        let egraph = runner.egraph;
        let conflicts: Vec<String> = egraph
            .classes()
            .filter_map(|c| c.data.conflict.clone().map(|m| format!("e-class {}: {m}", c.id)))
            .collect();
        let ex = extract(&egraph, model, &root_ids);
        let (cost_after, kernels_after) = dag_cost(&egraph, model, &ex, &root_ids);
        let inputs: Vec<Op> = t.inputs().into_iter().map(|id| t.node(id).op.clone()).collect();
        let graph = build_graph(&egraph, &ex, &t.name, &inputs, &roots, &HashMap::new())?;
        let nodes = t.node_count();
        Ok(Optimized {
            graph,
            report: TemplateReport {
                name: name.to_string(),
                instances: Vec::new(),
                nodes,
                iterations,
                stop_reason: stop,
                rules: stats,
                cost_before_s: cost_before,
                cost_after_s: cost_after,
                kernels_before,
                kernels_after,
                wall_ms: start.elapsed().as_secs_f64() * 1e3,
                conflicts,
            },
        })
    }
}

impl Pass for EqSat {
    fn name(&self) -> &str {
        "eqsat"
    }

    fn run(&self, g: &Graph, cx: &PassContext) -> Result<(Graph, Option<EqSatReport>), PassError> {
        let segs = segments(g);
        let outside_users = outside_uses(g, &segs);
        let used_outside = |v: Value| outside_users.get(&v).copied().unwrap_or(false);

        let mut out = Graph::new(g.name.clone());
        let mut map: HashMap<Value, Value> = HashMap::new();
        for id in g.inputs() {
            let n = g.node(id);
            let nid = out.add_node(n.op.clone(), &[], n.name.clone())?;
            map.insert(Value::new(id, 0), Value::new(nid, 0));
        }
        let mut cache: HashMap<String, usize> = HashMap::new();
        let mut done: Vec<Optimized> = Vec::new();
        for seg in &segs {
            // constants abstracted out of the template are materialised in the output graph as they were
            for &id in &seg.nodes {
                let n = g.node(id);
                if is_abstracted_constant(&n.op) {
                    let nid = out.add_node(n.op.clone(), &[], n.name.clone())?;
                    map.insert(Value::new(id, 0), Value::new(nid, 0));
                }
            }
            let t = lift(g, seg, &used_outside)?;
            let idx = match cache.get(&t.key) {
                Some(&i) => i,
                None => {
                    let name = if seg.scope == "main" {
                        format!("main@{}", seg.nodes[0].index())
                    } else {
                        seg.scope.clone()
                    };
                    let o = self.optimize(&t.graph, &cx.model, &name)?;
                    if !o.report.conflicts.is_empty() {
                        return Err(PassError::Rule(format!(
                            "template {name}: rules merged e-classes of different types: {}",
                            o.report.conflicts.join("; ")
                        )));
                    }
                    done.push(o);
                    cache.insert(t.key.clone(), done.len() - 1);
                    done.len() - 1
                }
            };
            done[idx].report.instances.push(seg.scope.clone());
            // instantiate
            let opt = &done[idx].graph;
            let mut local: HashMap<Value, Value> = HashMap::new();
            for (tid, n) in opt.nodes() {
                let v = match &n.op {
                    Op::Input { name, .. } | Op::Param { name, .. } => {
                        let i: usize = name
                            .trim_start_matches("arg")
                            .parse()
                            .map_err(|_| PassError::Rule(format!("template input `{name}`")))?;
                        map[&t.args[i]]
                    }
                    op => {
                        let ins: Vec<Value> = n.inputs.iter().map(|v| local[v]).collect();
                        let name = format!("{}.{}", seg.scope, op.name());
                        let nid = out.add_node(op.clone(), &ins, Some(name))?;
                        for i in 1..n.outputs.len() {
                            local.insert(Value::new(tid, i as u32), Value::new(nid, i as u32));
                        }
                        Value::new(nid, 0)
                    }
                };
                local.insert(Value::new(tid, 0), v);
            }
            for (j, (_, v)) in opt.outputs().iter().enumerate() {
                map.insert(t.outs[j], local[v]);
            }
        }
        for (name, v) in g.outputs() {
            let mapped = map
                .get(v)
                .copied()
                .ok_or_else(|| PassError::Rule(format!("output `{name}` was lost")))?;
            out.add_output(name.clone(), mapped)?;
        }
        let report = EqSatReport {
            families: self.families.iter().map(|f| f.name.to_string()).collect(),
            templates: done.into_iter().map(|o| o.report).collect(),
        };
        Ok((out, Some(report)))
    }
}
