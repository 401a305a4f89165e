//! DAG-aware greedy extraction.
//!
//! egg's default extractor sums costs over the *tree* of an expression, so a subterm used twice is paid twice:
//! wrong for dataflow graphs, where a shared value is computed once. Here the cost of choosing a node for a
//! class is the sum over the *set* of distinct classes it needs (its own node cost once, plus the union of its
//! children's sets): the "greedy DAG" extractor of extraction-gym, made exact and bounded.
//!
//! The algorithm, over the classes reachable from the roots, indexed in a depth-first post-order (children
//! before parents wherever the e-graph is acyclic):
//! 1. every class keeps a choice, the bit set of the classes its choice needs, and the total cost of that set;
//! 2. a pass visits every class and evaluates each of its e-nodes against the children's current sets. A class
//!    without a choice takes the cheapest e-node whose children all have one (this can never close a cycle:
//!    nothing chooses its way through a class that has no choice yet). A class with a choice *refreshes* its set
//!    and total whenever they changed below it, even when its choice stays the same, and *switches* to another
//!    e-node only when that is strictly cheaper and does not close a cycle through the current choices (checked
//!    by a search over those choices, never by possibly stale sets);
//! 3. passes repeat until nothing changes (or [`MAX_PASSES`], or the deadline: a bounded number of passes, each
//!    linear in the e-graph's size times the set width);
//! 4. finally every set and total is recomputed exactly, bottom-up over the chosen (acyclic) graph, so
//!    [`Extraction::cost`] is the true DAG cost of each class's choice whatever happened before.
//!
//! Ties are broken by e-node order, so the same e-graph always gives the same choice. Sets are bit sets over
//! the reachable classes (`C²/8` bytes); above [`MAX_DAG_CLASSES`] classes the extractor falls back to tree
//! costs (each class its cheapest e-node by the sum of its children's costs, acyclic by construction) and says
//! so in [`ExtractStats::method`].

use crate::classify::{classify, KernelKind, NodeClass};
use crate::cost::CostModel;
use crate::lang::{EGraph, FNode, FOp};
use egg::Id;
use fulgur_ir::{Graph, IrError, Op, TensorType, Value};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

/// The most improvement passes of the DAG extractor.
pub const MAX_PASSES: usize = 64;
/// Above this many reachable classes the bit sets would need more than 128 MiB: tree costs instead.
pub const MAX_DAG_CLASSES: usize = 32_768;

/// The chosen e-node of every reachable class, with the DAG cost of each choice.
#[derive(Clone, Debug)]
pub struct Extraction {
    pub choice: HashMap<Id, FNode>,
    /// Seconds: the exact DAG cost of the class's chosen subgraph (every class it needs, once).
    pub cost: HashMap<Id, f64>,
    pub stats: ExtractStats,
}

/// How an extraction went.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExtractStats {
    /// `dag` (greedy DAG costs) or `tree` (the fallback for very large e-graphs).
    pub method: &'static str,
    /// Classes reachable from the roots.
    pub classes: usize,
    pub passes: usize,
    /// Whether the passes reached a fixpoint (else they stopped at [`MAX_PASSES`] or the deadline, with a valid
    /// but possibly improvable choice).
    pub converged: bool,
    /// Whether the deadline stopped the improvement passes.
    pub deadline_hit: bool,
    /// Classes whose choice the whole-program refinement changed (see [`refine_roots`]).
    pub refined: usize,
    /// Whether the refinement reached its fixpoint: no single class's switch lowers the roots' cost.
    pub refine_converged: bool,
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

/// One e-node of a class as the extractor sees it.
struct Cand {
    /// Index into the class's e-nodes.
    node: usize,
    own: f64,
    /// A kernel whose work the code generators never share between kernels: a reduction, a matmul, an index
    /// kernel, a composite or a collective (not elementwise or copy work, which `fulgur-codegen` merges and
    /// folds after extraction; see [`refine_roots`]).
    heavy: bool,
    /// Children as class indices, without repeats.
    kids: Vec<usize>,
}

/// The reachable classes in a deterministic depth-first post-order (children first, where acyclic).
fn post_order(egraph: &EGraph, roots: &[Id]) -> Vec<Id> {
    let kids_of = |c: Id| -> Vec<Id> {
        egraph[c]
            .nodes
            .iter()
            .flat_map(|n| n.children.iter().map(|&ch| egraph.find(ch)))
            .collect()
    };
    let mut order = Vec::new();
    let mut seen: std::collections::HashSet<Id> = std::collections::HashSet::new();
    for &r in roots {
        let r = egraph.find(r);
        if !seen.insert(r) {
            continue;
        }
        // (class, its children over all its e-nodes, next position)
        let mut stack: Vec<(Id, Vec<Id>, usize)> = vec![(r, kids_of(r), 0)];
        while let Some((c, kids, pos)) = stack.last_mut() {
            if *pos < kids.len() {
                let k = kids[*pos];
                *pos += 1;
                if seen.insert(k) {
                    let kk = kids_of(k);
                    stack.push((k, kk, 0));
                }
            } else {
                order.push(*c);
                stack.pop();
            }
        }
    }
    order
}

/// Bit sets over the reachable classes, stored flat: set `i` is `words[i*w .. (i+1)*w]`.
struct Sets {
    w: usize,
    words: Vec<u64>,
}

impl Sets {
    fn new(n: usize) -> Sets {
        let w = n.div_ceil(64).max(1);
        Sets {
            w,
            words: vec![0; n * w],
        }
    }
    fn get(&self, i: usize) -> &[u64] {
        &self.words[i * self.w..(i + 1) * self.w]
    }
    fn contains(&self, i: usize, bit: usize) -> bool {
        self.words[i * self.w + bit / 64] & (1u64 << (bit % 64)) != 0
    }
}

/// Sum of `cost` over the bits of `words`.
fn sum_bits(words: &[u64], cost: &[f64]) -> f64 {
    let mut t = 0.0;
    for (k, &word) in words.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            let b = x.trailing_zeros() as usize;
            t += cost[k * 64 + b];
            x &= x - 1;
        }
    }
    t
}

/// Runs DAG extraction over the classes reachable from `roots`, with no deadline.
pub fn extract(egraph: &EGraph, model: &CostModel, roots: &[Id]) -> Extraction {
    extract_until(egraph, model, roots, None)
}

/// Runs DAG extraction; after `deadline` no further improvement pass starts (every class still gets a valid
/// choice, and the costs are exact for it).
pub fn extract_until(egraph: &EGraph, model: &CostModel, roots: &[Id], deadline: Option<Instant>) -> Extraction {
    let order = post_order(egraph, roots);
    let n = order.len();
    let index: HashMap<Id, usize> = order.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let cands: Vec<Vec<Cand>> = order
        .iter()
        .map(|&c| {
            egraph[c]
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(k, node)| {
                    let own = enode_cost(egraph, model, node, c);
                    if !own.is_finite() {
                        return None;
                    }
                    let mut kids: Vec<usize> = node.children.iter().map(|&ch| index[&egraph.find(ch)]).collect();
                    kids.sort_unstable();
                    kids.dedup();
                    let heavy = !egraph[c].data.param_only
                        && node.ir_op().is_some_and(|op| {
                            matches!(
                                classify(op),
                                NodeClass::Kernel(kind) if !matches!(kind, KernelKind::Elementwise | KernelKind::Copy)
                            )
                        });
                    Some(Cand {
                        node: k,
                        own,
                        kids,
                        heavy,
                    })
                })
                .collect()
        })
        .collect();
    let (mut choice, mut stats) = if n <= MAX_DAG_CLASSES {
        dag_choice(&cands, deadline)
    } else {
        tree_choice(&cands)
    };
    let root_idx: Vec<usize> = roots
        .iter()
        .filter_map(|&r| index.get(&egraph.find(r)).copied())
        .collect();
    let (switches, settled) = refine_roots(&cands, &mut choice, &root_idx, deadline);
    stats.refined = switches;
    stats.refine_converged = settled;
    // exact costs of the final (acyclic) choice, bottom-up
    let cost = exact_costs(&cands, &choice);
    let mut ex = Extraction {
        choice: HashMap::new(),
        cost: HashMap::new(),
        stats: ExtractStats { classes: n, ..stats },
    };
    for (i, &c) in order.iter().enumerate() {
        if let Some(k) = choice[i] {
            ex.choice.insert(c, egraph[c].nodes[cands[i][k].node].clone());
            ex.cost.insert(c, cost[i]);
        }
    }
    ex
}

/// The greedy DAG fixpoint (see the module documentation). `choice[i]` indexes `cands[i]`.
fn dag_choice(cands: &[Vec<Cand>], deadline: Option<Instant>) -> (Vec<Option<usize>>, ExtractStats) {
    let n = cands.len();
    let mut sets = Sets::new(n);
    let mut total = vec![f64::INFINITY; n];
    let mut choice: Vec<Option<usize>> = vec![None; n];
    // the own cost of each class's current choice: what a set's bit `i` costs
    let mut class_cost = vec![0.0; n];
    let mut scratch = vec![0u64; sets.w];
    let mut seen = vec![0u32; n];
    let mut stamp = 0u32;
    let mut stats = ExtractStats {
        method: "dag",
        ..ExtractStats::default()
    };
    loop {
        stats.passes += 1;
        let (mut changed, mut assigned) = (false, false);
        for i in 0..n {
            // fresh totals of every admissible e-node, against the children's current sets
            let mut options: Vec<(f64, usize)> = Vec::new();
            for (k, cand) in cands[i].iter().enumerate() {
                if cand.kids.iter().any(|&j| choice[j].is_none()) {
                    continue;
                }
                let current = choice[i] == Some(k);
                if !current && cand.kids.iter().any(|&j| sets.contains(j, i)) {
                    continue; // would need itself
                }
                union_into(&sets, &cand.kids, &mut scratch);
                let t = sum_bits(&scratch, &class_cost) - if bit(&scratch, i) { class_cost[i] } else { 0.0 } + cand.own;
                options.push((t, k));
            }
            if options.is_empty() {
                continue;
            }
            // cheapest first; ties by e-node order (candidates are in e-node order)
            options.sort_by(|a, b| {
                if close(a.0, b.0) {
                    a.1.cmp(&b.1)
                } else {
                    a.0.total_cmp(&b.0)
                }
            });
            let k = match choice[i] {
                None => {
                    assigned = true;
                    options[0].1
                }
                Some(cur) => {
                    let cur_t = options
                        .iter()
                        .find(|o| o.1 == cur)
                        .map(|o| o.0)
                        .unwrap_or(f64::INFINITY);
                    // the cheapest strictly better e-node that does not reach this class through the choices
                    let mut pick = cur;
                    for &(t, k) in &options {
                        if k == cur || t >= cur_t || close(t, cur_t) {
                            break;
                        }
                        stamp = stamp.wrapping_add(1);
                        if !reaches(cands, &choice, &cands[i][k].kids, i, &mut seen, stamp) {
                            pick = k;
                            break;
                        }
                    }
                    pick
                }
            };
            union_into(&sets, &cands[i][k].kids, &mut scratch);
            set_bit(&mut scratch, i);
            let own_before = class_cost[i];
            class_cost[i] = cands[i][k].own;
            let t = sum_bits(&scratch, &class_cost);
            let row = &mut sets.words[i * sets.w..(i + 1) * sets.w];
            if choice[i] != Some(k) || row != scratch.as_slice() || !close(total[i], t) || own_before != class_cost[i] {
                changed = true;
            }
            row.copy_from_slice(&scratch);
            total[i] = t;
            choice[i] = Some(k);
        }
        if !changed {
            stats.converged = true;
            break;
        }
        if stats.passes >= MAX_PASSES && !assigned {
            break;
        }
        if !assigned && deadline.is_some_and(|d| Instant::now() >= d) {
            stats.deadline_hit = true;
            break;
        }
    }
    (choice, stats)
}

/// The most passes of [`refine_roots`].
pub const MAX_REFINE_PASSES: usize = 16;

/// Whole-program refinement of a valid, acyclic choice: the greedy rule prices each class by what *it* needs,
/// so a class may pick an e-node that recomputes a value the program computes anyway for another root (the
/// training graph's forward computes the lightning attention's output for the backward, and the greedy layer
/// class then still picks `lightning_layer`, which computes that attention a second time; the backward's
/// gemm epilogues each recompute one matmul of the same operands). Here the objective is the cost of every
/// class the roots need, each once; a pass tries every other admissible e-node of every needed class and
/// keeps a switch when it strictly lowers that cost, closes no cycle, and takes a *heavy* kernel (reduction,
/// matmul, index, composite, collective) out of the program. Elementwise and copy work alone is never traded:
/// the code generators merge sibling elementwise kernels that read the same inputs and fold an elementwise
/// value into its one reader (`fulgur-codegen`'s `merge_siblings`, `fuse_producers`), which the cost model
/// does not see (AdamW's update that recomputes the new moments inline is one merged kernel with the moments'
/// kernels; reading the stored moments instead looks cheaper here and is not). The change a switch makes is
/// found by reference counts over the chosen graph (classes that become needed, classes no longer needed), so
/// each trial costs the size of what it changes, not of the graph. Passes repeat until none switches
/// ([`MAX_REFINE_PASSES`], or the deadline). Returns the switches made and whether the fixpoint was reached.
fn refine_roots(
    cands: &[Vec<Cand>],
    choice: &mut [Option<usize>],
    roots: &[usize],
    deadline: Option<Instant>,
) -> (usize, bool) {
    let n = cands.len();
    // one trial: `delta` of the roots' cost if class `i` chose `k` (every change logged for the undo)
    fn adjust(
        cands: &[Vec<Cand>],
        choice: &[Option<usize>],
        rc: &mut [u32],
        log: &mut Vec<(usize, bool)>,
        kids: &[usize],
        up: bool,
        heavy: &mut bool,
    ) -> f64 {
        let mut d = 0.0;
        let mut stack: Vec<usize> = kids.to_vec();
        while let Some(j) = stack.pop() {
            log.push((j, up));
            let edge = if up {
                rc[j] += 1;
                rc[j] == 1
            } else {
                rc[j] -= 1;
                rc[j] == 0
            };
            if edge {
                // the class became needed (or stopped being needed): so does its choice's subgraph
                if let Some(k) = choice[j] {
                    d += if up { cands[j][k].own } else { -cands[j][k].own };
                    *heavy |= !up && cands[j][k].heavy;
                    stack.extend(cands[j][k].kids.iter().copied());
                }
            }
        }
        d
    }
    fn undo(rc: &mut [u32], log: &mut Vec<(usize, bool)>) {
        while let Some((j, up)) = log.pop() {
            if up {
                rc[j] -= 1;
            } else {
                rc[j] += 1;
            }
        }
    }
    // reference counts: one per root, plus one per needed class whose choice has the class as a child; the
    // roots' cost is what making the roots needed adds
    let mut rc = vec![0u32; n];
    let mut log: Vec<(usize, bool)> = Vec::new();
    let mut total = adjust(cands, choice, &mut rc, &mut log, roots, true, &mut false);
    log.clear();
    let mut seen = vec![0u32; n];
    let mut stamp = 0u32;
    let mut switches = 0;
    for _ in 0..MAX_REFINE_PASSES {
        let mut changed = false;
        for i in 0..n {
            if i % 256 == 255 && deadline.is_some_and(|d| Instant::now() >= d) {
                return (switches, false);
            }
            let Some(cur) = choice[i] else { continue };
            if rc[i] == 0 || cands[i].len() < 2 {
                continue;
            }
            for k in 0..cands[i].len() {
                let cur = choice[i].unwrap_or(cur);
                if k == cur || cands[i][k].kids.iter().any(|&j| choice[j].is_none()) {
                    continue;
                }
                // add the new e-node's children first, so that shared children never drop out and come back
                let mut delta = cands[i][k].own - cands[i][cur].own;
                let mut removed_heavy = cands[i][cur].heavy;
                delta += adjust(
                    cands,
                    choice,
                    &mut rc,
                    &mut log,
                    &cands[i][k].kids,
                    true,
                    &mut removed_heavy,
                );
                delta += adjust(
                    cands,
                    choice,
                    &mut rc,
                    &mut log,
                    &cands[i][cur].kids,
                    false,
                    &mut removed_heavy,
                );
                let better = removed_heavy && delta < 0.0 && -delta > 1e-9 * total.abs().max(1e-30);
                stamp = stamp.wrapping_add(1);
                if better && !reaches(cands, choice, &cands[i][k].kids, i, &mut seen, stamp) {
                    log.clear();
                    choice[i] = Some(k);
                    total += delta;
                    switches += 1;
                    changed = true;
                } else {
                    undo(&mut rc, &mut log);
                }
            }
        }
        if !changed {
            return (switches, true);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    (switches, false)
}

fn bit(words: &[u64], i: usize) -> bool {
    words[i / 64] & (1u64 << (i % 64)) != 0
}

fn set_bit(words: &mut [u64], i: usize) {
    words[i / 64] |= 1u64 << (i % 64);
}

/// `out` = the union of the sets of `kids`.
fn union_into(sets: &Sets, kids: &[usize], out: &mut [u64]) {
    out.iter_mut().for_each(|w| *w = 0);
    for &j in kids {
        for (o, &x) in out.iter_mut().zip(sets.get(j)) {
            *o |= x;
        }
    }
}

/// Whether class `target` is reached from `from` through the current choices.
fn reaches(
    cands: &[Vec<Cand>],
    choice: &[Option<usize>],
    from: &[usize],
    target: usize,
    seen: &mut [u32],
    stamp: u32,
) -> bool {
    let mut stack: Vec<usize> = from.to_vec();
    while let Some(j) = stack.pop() {
        if j == target {
            return true;
        }
        if seen[j] == stamp {
            continue;
        }
        seen[j] = stamp;
        if let Some(k) = choice[j] {
            stack.extend(cands[j][k].kids.iter().copied());
        }
    }
    false
}

/// Relative closeness of two costs (ties).
fn close(a: f64, b: f64) -> bool {
    if a == b {
        return true;
    }
    let eps = 1e-12 * a.abs().max(b.abs()).max(1e-30);
    (a - b).abs() <= eps
}

/// Tree-cost extraction: each class its cheapest e-node by own cost plus its children's totals, updated only
/// on strict improvement (which never closes a cycle, costs being non-negative). Linear memory.
fn tree_choice(cands: &[Vec<Cand>]) -> (Vec<Option<usize>>, ExtractStats) {
    const CAP: f64 = 1e300;
    let n = cands.len();
    let mut total = vec![f64::INFINITY; n];
    let mut choice: Vec<Option<usize>> = vec![None; n];
    let mut stats = ExtractStats {
        method: "tree",
        ..ExtractStats::default()
    };
    loop {
        stats.passes += 1;
        let mut changed = false;
        for i in 0..n {
            for (k, cand) in cands[i].iter().enumerate() {
                if cand.kids.iter().any(|&j| choice[j].is_none()) {
                    continue;
                }
                let t = (cand.own + cand.kids.iter().map(|&j| total[j]).sum::<f64>()).min(CAP);
                if t < total[i] {
                    total[i] = t;
                    choice[i] = Some(k);
                    changed = true;
                }
            }
        }
        if !changed {
            stats.converged = true;
            break;
        }
    }
    (choice, stats)
}

/// The exact DAG cost of every chosen class: its set recomputed bottom-up over the chosen (acyclic) graph.
/// Bit sets when they fit, else a traversal per class.
fn exact_costs(cands: &[Vec<Cand>], choice: &[Option<usize>]) -> Vec<f64> {
    let n = cands.len();
    let own: Vec<f64> = (0..n)
        .map(|i| choice[i].map(|k| cands[i][k].own).unwrap_or(0.0))
        .collect();
    // topological order of the chosen graph
    let mut topo = Vec::with_capacity(n);
    let mut state = vec![0u8; n]; // 0 new, 1 open, 2 done
    for s in 0..n {
        if choice[s].is_none() || state[s] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(s, 0)];
        state[s] = 1;
        while let Some(&mut (i, ref mut pos)) = stack.last_mut() {
            let kids = choice[i].map(|k| cands[i][k].kids.as_slice()).unwrap_or(&[]);
            if *pos < kids.len() {
                let j = kids[*pos];
                *pos += 1;
                if state[j] == 0 && choice[j].is_some() {
                    state[j] = 1;
                    stack.push((j, 0));
                }
            } else {
                state[i] = 2;
                topo.push(i);
                stack.pop();
            }
        }
    }
    let mut cost = vec![0.0; n];
    if n <= MAX_DAG_CLASSES {
        let mut sets = Sets::new(n);
        for &i in &topo {
            let w = sets.w;
            let mut row = vec![0u64; w];
            if let Some(k) = choice[i] {
                for &j in &cands[i][k].kids {
                    for (o, &x) in row.iter_mut().zip(sets.get(j)) {
                        *o |= x;
                    }
                }
            }
            set_bit(&mut row, i);
            cost[i] = sum_bits(&row, &own);
            sets.words[i * w..(i + 1) * w].copy_from_slice(&row);
        }
    } else {
        let mut seen = vec![0u32; n];
        for (stamp, &i) in topo.iter().enumerate() {
            let stamp = stamp as u32 + 1;
            let mut stack = vec![i];
            let mut t = 0.0;
            while let Some(j) = stack.pop() {
                if seen[j] == stamp {
                    continue;
                }
                seen[j] = stamp;
                t += own[j];
                if let Some(k) = choice[j] {
                    stack.extend(cands[j][k].kids.iter().copied());
                }
            }
            cost[i] = t;
        }
    }
    cost
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
    Ok(build_graph_classes(egraph, ex, graph_name, inputs, outputs, names)?.0)
}

/// [`build_graph`], also returning the value that stands for each class it emitted.
pub fn build_graph_classes(
    egraph: &EGraph,
    ex: &Extraction,
    graph_name: &str,
    inputs: &[Op],
    outputs: &[(String, Id)],
    names: &HashMap<Id, String>,
) -> Result<(Graph, HashMap<Id, Value>), IrError> {
    let mut g = Graph::new(graph_name);
    for op in inputs {
        g.add_node(op.clone(), &[], None)?;
    }
    let mut done: HashMap<Id, Value> = HashMap::new();
    for (oname, root) in outputs {
        let v = emit(egraph, ex, names, &mut g, &mut done, egraph.find(*root))?;
        g.add_output(oname.clone(), v)?;
    }
    Ok((g, done))
}

/// Adds to `g` the value of class `root` under the extraction's choices (and every class it needs), memoized in
/// `done`; the graph's inputs must already be declared. Errors on a cyclic choice or a class without one.
pub fn emit(
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

/// The graph's existing input or parameter node that declares `op`, if `op` declares one.
pub fn input_node(g: &Graph, op: &Op) -> Option<fulgur_ir::NodeId> {
    op.input_decl().and_then(|(name, _, _)| g.input_by_name(name))
}
