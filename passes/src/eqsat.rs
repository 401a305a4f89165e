//! Equality saturation, once per distinct layer template, then stitched.
//!
//! The graph is cut into *segments*: maximal runs of consecutive nodes (in topological node order) whose
//! names share a layer scope (`layers.N.`), and the runs between them; a run longer than [`Limits::window`]
//! nodes (a graph without layer names, or a giant layer) is cut into windows of at most that many, so no
//! template is larger than a window whatever the graph. Each segment becomes a *template*: a graph whose
//! inputs are the values the segment reads from elsewhere and whose outputs are the values read elsewhere.
//! Segments whose templates differ only in the values of non-scalar constants (a layer's decay rates, one per
//! head, even when there is one head) share a template, with exactly those constants as inputs; constants
//! that are the same in every instance stay in the template, where rules can see them. Templates are keyed by
//! their canonical `.fir` text (node names removed); each distinct template is saturated and extracted once,
//! and every segment is replaced by an instance of its optimized template. Compile time therefore grows with
//! the number of distinct templates, not with depth, and every phase is linear in the graph's size for
//! bounded templates.
//!
//! Bounds ([`Limits`]): e-nodes and iterations per template decide the result (and bound extraction, whose
//! cost grows with the e-graph); an optional wall-clock budget for the whole pass covers saturation and
//! extraction, and a template it stops is named in a warning, since the result then depends on machine speed.

use crate::cost::CostModel;
use crate::extract::{build_graph, dag_cost, extract, extract_until, ExtractStats};
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

/// Optimizer bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// The most e-nodes in one template's e-graph: saturation stops past it (this also bounds extraction).
    pub nodes: usize,
    /// The most saturation iterations per template.
    pub iterations: usize,
    /// A wall-clock budget for the whole pass (saturation and extraction of every template); `None`: no
    /// wall-clock limit, the node and iteration limits alone decide (the default, so the output never
    /// depends on machine load).
    pub time: Option<Duration>,
    /// The most nodes of one template: longer segments are cut into windows.
    pub window: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nodes: 20_000,
            iterations: 12,
            time: None,
            window: 512,
        }
    }
}

impl Limits {
    /// Checked limits: `nodes` and `window` at least 1, `time_s` (seconds) a positive finite number.
    ///
    /// ```
    /// use fulgur_passes::Limits;
    /// assert!(Limits::new(20_000, 12, Some(2.5), 512).is_ok());
    /// assert_eq!(
    ///     Limits::new(20_000, 12, Some(f64::NAN), 512).unwrap_err(),
    ///     "the time limit must be a positive number of seconds, found NaN"
    /// );
    /// ```
    pub fn new(nodes: usize, iterations: usize, time_s: Option<f64>, window: usize) -> Result<Limits, String> {
        if nodes == 0 {
            return Err("the node limit must be at least 1 e-node".into());
        }
        if window == 0 {
            return Err("the window must be at least 1 node".into());
        }
        let time = match time_s {
            None => None,
            Some(t) if t.is_nan() => {
                return Err("the time limit must be a positive number of seconds, found NaN".into())
            }
            Some(t) if t.is_infinite() && t > 0.0 => {
                return Err(
                    "the time limit must be a finite number of seconds, found infinity (leave it out for no limit)"
                        .into(),
                )
            }
            Some(t) if t <= 0.0 => {
                return Err(format!(
                    "the time limit must be a positive number of seconds, found {}",
                    fulgur_ir::op::format_f64(t)
                ))
            }
            Some(t) => Some(
                Duration::try_from_secs_f64(t)
                    .map_err(|_| format!("the time limit {t} s is too large (leave it out for no limit)"))?,
            ),
        };
        Ok(Limits {
            nodes,
            iterations,
            time,
            window,
        })
    }

    /// An egg runner over `egraph` with these bounds; `deadline` (the pass's wall-clock budget) caps its time.
    pub fn runner(&self, egraph: EGraph, deadline: Option<Instant>) -> Runner<FNode, ShapeAnalysis> {
        let time = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        Runner::default()
            .with_egraph(egraph)
            .with_node_limit(self.nodes)
            .with_iter_limit(self.iterations)
            .with_time_limit(time)
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
    /// The first instance's label: its scope (`layers.0`), `main@N` for a segment outside layers, or `SCOPE@N`
    /// for a window of a longer run (`N`: the index of its first node in the input graph).
    pub name: String,
    /// Every segment that uses this template.
    pub instances: Vec<String>,
    pub nodes: usize,
    pub iterations: Vec<IterReport>,
    pub stop_reason: String,
    pub rules: BTreeMap<String, RuleStat>,
    pub extraction: ExtractStats,
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
    /// Segments, and how many of them were windows of a longer run.
    pub segments: usize,
    pub windows: usize,
    /// Templates whose result the wall-clock budget decided (so it depends on machine speed), one line each.
    pub warnings: Vec<String>,
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

/// A rule, its family's name, and the counter of its matches.
type CountedRule = (Rewrite, &'static str, Arc<AtomicUsize>);

/// The name of a node of an instantiated template: `LABEL.OP` for the segment's first `OP`, then `LABEL.OP.1`,
/// `LABEL.OP.2`, ... in node order, so every node of the optimized graph has a name of its own (`--why` finds
/// kernels by it).
pub fn kernel_name(label: &str, op: &'static str, seen: &mut HashMap<&'static str, usize>) -> String {
    let k = seen.entry(op).or_insert(0);
    let name = if *k == 0 {
        format!("{label}.{op}")
    } else {
        format!("{label}.{op}.{k}")
    };
    *k += 1;
    name
}

/// One segment of the input graph.
struct Segment {
    scope: String,
    nodes: Vec<NodeId>,
    /// Whether this is one window of a longer run of its scope.
    window: bool,
}

impl Segment {
    /// `layers.3`, `main@17`, or `layers.3@905` for a window of a longer run.
    fn label(&self) -> String {
        let first = self.nodes.first().map(|n| n.index()).unwrap_or(0);
        if self.scope == "main" || self.window {
            format!("{}@{first}", self.scope)
        } else {
            self.scope.clone()
        }
    }
}

/// A segment lifted out as a stand-alone graph.
struct Template {
    graph: Graph,
    /// Template input `argI` ← this value of the original graph.
    args: Vec<Value>,
    /// Template output `outJ` → this value of the original graph.
    outs: Vec<Value>,
    /// Digest of the canonical text (no names): the template's identity.
    key: u128,
    /// Segment nodes left out of the template (constants that became inputs).
    abstracted: Vec<NodeId>,
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

/// The segments of `g`: runs of one scope, cut into windows of at most `window` nodes.
fn segments(g: &Graph, window: usize) -> Vec<Segment> {
    let mut runs: Vec<Segment> = Vec::new();
    for (id, n) in g.nodes() {
        if n.op.is_input() {
            continue;
        }
        let scope = layer_scope(&n.name);
        match runs.last_mut() {
            Some(s) if s.scope == scope => s.nodes.push(id),
            _ => runs.push(Segment {
                scope,
                nodes: vec![id],
                window: false,
            }),
        }
    }
    let window = window.max(1);
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        if r.nodes.len() <= window {
            out.push(r);
            continue;
        }
        for chunk in r.nodes.chunks(window) {
            out.push(Segment {
                scope: r.scope.clone(),
                nodes: chunk.to_vec(),
                window: true,
            });
        }
    }
    out
}

/// A constant that may become a template input: anything but a scalar (rules read scalars' values).
fn is_tensor_constant(op: &Op) -> bool {
    matches!(op, Op::Constant { shape, .. } if !shape.is_empty())
}

/// Lifts a segment into a template; the constants for which `abstract_const` holds become inputs.
fn lift(
    g: &Graph,
    seg: &Segment,
    param_only: &[bool],
    used_outside: &dyn Fn(Value) -> bool,
    abstract_const: &dyn Fn(NodeId) -> bool,
) -> Result<Template, PassError> {
    let mut abstracted = Vec::new();
    let mut inside: std::collections::HashSet<NodeId> = std::collections::HashSet::with_capacity(seg.nodes.len());
    for &id in &seg.nodes {
        if is_tensor_constant(&g.node(id).op) && abstract_const(id) {
            abstracted.push(id);
        } else {
            inside.insert(id);
        }
    }
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
            let a = if param_only[v.node.index()] {
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
        let mut ins = Vec::with_capacity(n.inputs.len());
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
    let key = text_key(&fulgur_ir::text::print(&t));
    Ok(Template {
        graph: t,
        args,
        outs,
        key,
        abstracted,
    })
}

/// A 128-bit digest of a template's canonical text: its identity, without keeping the text.
fn text_key(text: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        text.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

/// What lifting needs of the whole graph, computed once.
struct Lifter<'a> {
    g: &'a Graph,
    param_only: Vec<bool>,
    outside: std::collections::HashSet<Value>,
    /// The constants that become template inputs (see [`Lifter::new`]).
    varying: std::collections::HashSet<NodeId>,
}

impl<'a> Lifter<'a> {
    /// Finds the non-scalar constants whose values differ between segments that are alike but for constant
    /// values (their templates with every such constant an input are equal): those become inputs, the others
    /// stay in their templates. Keeps no template: one at a time is lifted, hashed and dropped.
    fn new(g: &'a Graph, segs: &[Segment]) -> Result<Lifter<'a>, PassError> {
        let mut l = Lifter {
            g,
            param_only: crate::pass::param_only_nodes(g),
            outside: outside_uses(g, segs),
            varying: std::collections::HashSet::new(),
        };
        // masked key → per member, the constant inputs by argument position
        let mut groups: HashMap<u128, Vec<Vec<NodeId>>> = HashMap::new();
        for s in segs {
            // a segment without tensor constants has nothing to abstract
            if !s.nodes.iter().any(|&id| is_tensor_constant(&g.node(id).op)) {
                continue;
            }
            let t = l.lift(s, &|_| true)?;
            let abstracted: std::collections::HashSet<NodeId> = t.abstracted.iter().copied().collect();
            let consts: Vec<NodeId> = t
                .args
                .iter()
                .filter(|v| abstracted.contains(&v.node))
                .map(|v| v.node)
                .collect();
            groups.entry(t.key).or_default().push(consts);
        }
        for members in groups.values() {
            for j in 0..members[0].len() {
                let text = |m: &Vec<NodeId>| crate::lang::op_text(&g.node(m[j]).op);
                let t0 = text(&members[0]);
                if members[1..].iter().any(|m| text(m) != t0) {
                    l.varying.extend(members.iter().map(|m| m[j]));
                }
            }
        }
        Ok(l)
    }

    fn lift(&self, seg: &Segment, abstract_const: &dyn Fn(NodeId) -> bool) -> Result<Template, PassError> {
        let used = |v: Value| self.outside.contains(&v);
        lift(self.g, seg, &self.param_only, &used, abstract_const)
    }

    /// A segment's template, with exactly the varying constants as inputs.
    fn template(&self, seg: &Segment) -> Result<Template, PassError> {
        self.lift(seg, &|c| self.varying.contains(&c))
    }
}

/// An optimized template and what it took.
struct Optimized {
    graph: Graph,
    report: TemplateReport,
}

/// The values read outside their own segment (or graph outputs).
fn outside_uses(g: &Graph, segs: &[Segment]) -> std::collections::HashSet<Value> {
    let mut seg_of: Vec<usize> = vec![usize::MAX; g.node_count()];
    for (i, s) in segs.iter().enumerate() {
        for &n in &s.nodes {
            seg_of[n.index()] = i;
        }
    }
    let mut outside = std::collections::HashSet::new();
    for (id, n) in g.nodes() {
        for &v in &n.inputs {
            let (a, b) = (seg_of[id.index()], seg_of[v.node.index()]);
            if a == usize::MAX || a != b {
                outside.insert(v);
            }
        }
    }
    for (_, v) in g.outputs() {
        outside.insert(*v);
    }
    outside
}

/// Every segment of `g` as (label, template graph), in order, as the pass lifts them.
pub fn segment_templates(g: &Graph, limits: &Limits) -> Result<Vec<(String, Graph)>, PassError> {
    let segs = segments(g, limits.window);
    let l = Lifter::new(g, &segs)?;
    segs.iter().map(|s| Ok((s.label(), l.template(s)?.graph))).collect()
}

impl EqSat {
    pub fn new(families: Vec<Family>) -> EqSat {
        EqSat {
            families,
            limits: Limits::default(),
        }
    }

    /// All rules of the enabled families, each searcher wrapped to count its matches.
    fn counted_rules(&self) -> Result<Vec<CountedRule>, PassError> {
        let mut out = Vec::new();
        for fam in &self.families {
            for r in &fam.rules {
                let count = Arc::new(AtomicUsize::new(0));
                let searcher = Counted {
                    inner: r.searcher.clone(),
                    count: count.clone(),
                };
                let rw = egg::Rewrite::new(r.name, searcher, Shared(r.applier.clone()))
                    .map_err(|e| PassError::Rule(format!("rule `{}`: {e}", r.name)))?;
                out.push((rw, fam.name, count));
            }
        }
        Ok(out)
    }

    /// All rules of the enabled families.
    pub fn rules(&self) -> Result<Vec<Rewrite>, PassError> {
        Ok(self.counted_rules()?.into_iter().map(|(r, _, _)| r).collect())
    }

    /// Saturates and extracts one template graph, within `deadline`.
    fn optimize(
        &self,
        t: &Graph,
        model: &CostModel,
        name: &str,
        deadline: Option<Instant>,
    ) -> Result<Optimized, PassError> {
        let start = Instant::now();
        let mut egraph = EGraph::new(ShapeAnalysis::default());
        let vm = graph_to_egraph(t, &mut egraph);
        egraph.rebuild();
        let roots: Vec<(String, Id)> = t.outputs().iter().map(|(n, v)| (n.clone(), vm.get(*v))).collect();
        let root_ids: Vec<Id> = roots.iter().map(|r| r.1).collect();
        let before = extract(&egraph, model, &root_ids);
        let (cost_before, kernels_before) = dag_cost(&egraph, model, &before, &root_ids);

        let counted = self.counted_rules()?;
        let rules: Vec<&Rewrite> = counted.iter().map(|(r, _, _)| r).collect();
        let runner = self.limits.runner(egraph, deadline).run(rules);
        let stop = match &runner.stop_reason {
            Some(StopReason::Saturated) => "saturated".to_string(),
            Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
            Some(StopReason::NodeLimit(n)) => format!("node limit ({n} e-nodes)"),
            Some(StopReason::TimeLimit(s)) => format!("time limit (after {s:.3} s)"),
            Some(StopReason::Other(s)) => s.clone(),
            None => "not run".to_string(),
        };
        let mut stats: BTreeMap<String, RuleStat> = BTreeMap::new();
        for (rule, fam, c) in &counted {
            let e = stats.entry(rule.name.to_string()).or_default();
            e.family = fam.to_string();
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
        let ex = extract_until(&egraph, model, &root_ids, deadline);
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
                extraction: ex.stats,
                cost_before_s: cost_before,
                cost_after_s: cost_after,
                kernels_before,
                kernels_after,
                wall_ms: start.elapsed().as_secs_f64() * 1e3,
                conflicts,
            },
        })
    }

    /// A template the wall-clock budget left no time for: kept as it is.
    fn unoptimized(&self, t: &Graph, model: &CostModel, name: &str) -> Optimized {
        let (cost, kernels) = crate::pass::graph_cost(t, model);
        Optimized {
            graph: t.clone(),
            report: TemplateReport {
                name: name.to_string(),
                instances: Vec::new(),
                nodes: t.node_count(),
                iterations: Vec::new(),
                stop_reason: "time limit (not saturated)".into(),
                rules: BTreeMap::new(),
                extraction: ExtractStats::default(),
                cost_before_s: cost,
                cost_after_s: cost,
                kernels_before: kernels,
                kernels_after: kernels,
                wall_ms: 0.0,
                conflicts: Vec::new(),
            },
        }
    }
}

impl Pass for EqSat {
    fn name(&self) -> &str {
        "eqsat"
    }

    fn run(&self, g: &Graph, cx: &PassContext) -> Result<(Graph, Option<EqSatReport>), PassError> {
        let deadline = self.limits.time.map(|t| Instant::now() + t);
        let segs = segments(g, self.limits.window);
        let lifter = Lifter::new(g, &segs)?;

        let mut out = Graph::new(g.name.clone());
        let mut map: HashMap<Value, Value> = HashMap::new();
        for id in g.inputs() {
            let n = g.node(id);
            let nid = out.add_node(n.op.clone(), &[], n.name.clone())?;
            map.insert(Value::new(id, 0), Value::new(nid, 0));
        }
        let mut cache: HashMap<u128, usize> = HashMap::new();
        let mut done: Vec<Optimized> = Vec::new();
        let mut warnings = Vec::new();
        // templates the time limit left no time for
        let mut skipped: Vec<String> = Vec::new();
        for seg in &segs {
            // one template at a time: lifted, optimized if new, instantiated, dropped
            let t = lifter.template(seg)?;
            // constants abstracted out of the template are materialised in the output graph as they were
            for &id in &t.abstracted {
                let n = g.node(id);
                let nid = out.add_node(n.op.clone(), &[], n.name.clone())?;
                map.insert(Value::new(id, 0), Value::new(nid, 0));
            }
            let idx = match cache.get(&t.key) {
                Some(&i) => i,
                None => {
                    let name = seg.label();
                    let o = if deadline.is_some_and(|d| Instant::now() >= d) {
                        skipped.push(name.clone());
                        self.unoptimized(&t.graph, &cx.model, &name)
                    } else {
                        let o = self.optimize(&t.graph, &cx.model, &name, deadline)?;
                        if o.report.stop_reason.starts_with("time limit") || o.report.extraction.deadline_hit {
                            warnings.push(format!(
                                "template {name}: stopped by the time limit ({:.3} s) after {} iteration(s){}; the \
                                 result depends on machine speed",
                                self.limits.time.unwrap_or_default().as_secs_f64(),
                                o.report.iterations.len(),
                                if o.report.extraction.deadline_hit {
                                    ", extraction cut short"
                                } else {
                                    ""
                                }
                            ));
                        }
                        o
                    };
                    if !o.report.conflicts.is_empty() {
                        return Err(PassError::Rule(format!(
                            "template {name}: rules merged e-classes of different types: {}",
                            o.report.conflicts.join("; ")
                        )));
                    }
                    done.push(o);
                    cache.insert(t.key, done.len() - 1);
                    done.len() - 1
                }
            };
            done[idx].report.instances.push(seg.label());
            // instantiate
            let label = seg.label();
            let mut seen_ops: HashMap<&'static str, usize> = HashMap::new();
            let opt = &done[idx].graph;
            let mut local: HashMap<Value, Value> = HashMap::new();
            for (tid, n) in opt.nodes() {
                let v = match &n.op {
                    Op::Input { name, .. } | Op::Param { name, .. } => {
                        let i: usize = name
                            .strip_prefix("arg")
                            .and_then(|i| i.parse().ok())
                            .ok_or_else(|| PassError::Rule(format!("template input `{name}`")))?;
                        map[&t.args[i]]
                    }
                    op => {
                        let ins: Vec<Value> = n.inputs.iter().map(|v| local[v]).collect();
                        let name = kernel_name(&label, op.name(), &mut seen_ops);
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
        if !skipped.is_empty() {
            let shown: Vec<&str> = skipped.iter().take(3).map(|s| s.as_str()).collect();
            let more = if skipped.len() > shown.len() {
                format!(" and {} more", skipped.len() - shown.len())
            } else {
                String::new()
            };
            warnings.push(format!(
                "{} of {} templates not optimized ({}{more}): the time limit ({:.3} s) was reached before them; \
                 the result depends on machine speed",
                skipped.len(),
                done.len(),
                shown.join(", "),
                self.limits.time.unwrap_or_default().as_secs_f64()
            ));
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
            segments: segs.len(),
            windows: segs.iter().filter(|s| s.window).count(),
            warnings,
        };
        Ok((out, Some(report)))
    }
}
