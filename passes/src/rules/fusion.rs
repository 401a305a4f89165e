//! Fusion: many small kernels ⇒ fewer, larger ones.
//!
//! Every fused kernel is a `fused[body](args)` node (`fulgur_ir::composite::fused`) whose body *is* the matched
//! subgraph, with the subgraph's external e-classes as its arguments, so each rewrite is sound by construction:
//! the fused node means what was there. The cost model (`cost.rs`: one launch, external bytes only, the body's
//! FLOPs) and the extractor decide which alternative is built.
//!
//! - `fuse-elementwise`: from an elementwise root (unary, binary, compare, select, cast; or a `permute` or
//!   `concat`, kernels of their own), absorb elementwise producers, layout views (reshape, broadcast, slice,
//!   permute, concat), scalar constants, earlier fused kernels (inlined, where their class has no primitive to
//!   absorb) and at most one reduction-class producer (`reduce_*`, `softmax`, `log_softmax`, `rms_norm`)
//!   together with its own elementwise prologue;
//! - `gemm-epilogue`: the same from an elementwise root, but the kernel is a `matmul` with its elementwise
//!   epilogue (scaling, activation, residual add, gating): the matmul is reached through elementwise ops,
//!   reshapes and broadcasts only, and its operands are arguments (a tensor-core kernel);
//! - `fuse-reduction`: a reduction-class root absorbs its elementwise prologue (`reduce_sum(mul(a, b))`,
//!   `rms_norm(add(x, r), w)`);
//! - `rms-norm-pattern`: the decomposed RMSNorm `x · rsqrt(reduce_mean(x², -1) + eps) · w` ⇒ `rms_norm[eps]`;
//! - `concat-projections`: projections `matmul(x, Wᵢ)` of one `x` by parameter-derived rank-2 weights
//!   (`transpose(Wᵢ)`) that meet in one consumer ⇒ one `matmul(x, concat(Wᵢ))` and slices; see
//!   [`ConcatProjections`] for why the rewrite is made at the consumer.
//!
//! Growth is bounded: a region is grown breadth-first from its root up to [`MAX_BODY_OPS`] body ops, and each
//! root yields at most two kernels: the largest region (which may duplicate work of a producer that has other
//! users: sound, and the cost model weighs it) and the region without any producer used outside it (no
//! duplicated work). A kernel must replace at least two kernels. Classes computed from parameters alone stay
//! arguments (they are prepared at load time), and so do slices of arguments (the kernel reads the slice, not
//! the tensor it is cut from). A written-out RMSNorm is absorbed only as the `rms_norm` it equals, so the
//! composite is what gets extracted (a fused copy of its decomposition would cost the same).

use super::{fn_rule, fn_rule_pairs, Family, RuleConfig};
use crate::lang::{add_op, class_ops, class_ty, EGraph, FNode, FOp, Rewrite, ShapeAnalysis};
use egg::{Id, Searcher};
use fulgur_ir::op::FusedBody;
use fulgur_ir::{BinaryOp, Composite, Dim, Graph, Op, ReduceOp, UnaryOp, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// The most ops (non-input nodes) a fused body may hold.
pub const MAX_BODY_OPS: usize = 32;

pub fn family(cfg: &RuleConfig) -> Family {
    Family {
        name: "fusion",
        rules: vec![
            fn_rule_pairs("fuse-elementwise", probe_elementwise, build_elementwise, cfg),
            fn_rule("gemm-epilogue", probe_gemm, build_gemm, cfg),
            fn_rule("fuse-reduction", probe_reduction, build_reduction, cfg),
            fn_rule("rms-norm-pattern", probe_rms, build_rms, cfg),
            concat_projections(),
        ],
    }
}

// ------------------------------------------------------------------------------------------- op kinds

/// What an op is to a fused kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Elementwise,
    /// Index arithmetic: reshape, broadcast, slice, permute, concat.
    View,
    /// A scalar constant, written into the body.
    Leaf,
    MatMul,
    /// `reduce_*`, `softmax`, `log_softmax`, `rms_norm`.
    Reduction,
    Fused,
}

fn kind(op: &Op) -> Option<Kind> {
    Some(match op {
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. } => Kind::Elementwise,
        Op::Reshape { .. } | Op::Broadcast { .. } | Op::Slice { .. } | Op::Permute { .. } | Op::Concat { .. } => {
            Kind::View
        }
        Op::Constant { shape, .. } if shape.is_empty() => Kind::Leaf,
        Op::Full { shape, .. } if shape.rank() == 0 => Kind::Leaf,
        Op::MatMul => Kind::MatMul,
        Op::Reduce { .. }
        | Op::Composite(Composite::Softmax { .. } | Composite::LogSoftmax { .. } | Composite::RmsNorm { .. }) => {
            Kind::Reduction
        }
        Op::Composite(Composite::Fused { .. }) => Kind::Fused,
        _ => return None,
    })
}

fn node_kind(n: &FNode) -> Option<Kind> {
    n.ir_op().and_then(kind)
}

fn is_fused(n: &FNode) -> bool {
    matches!(n.ir_op(), Some(Op::Composite(Composite::Fused { .. })))
}

/// Ops through which a matmul's result may flow to the root of a GEMM-epilogue kernel.
fn epilogue_op(n: &FNode) -> bool {
    matches!(
        n.ir_op(),
        Some(
            Op::Unary(_)
                | Op::Binary(_)
                | Op::Compare(_)
                | Op::Select
                | Op::Cast { .. }
                | Op::Reshape { .. }
                | Op::Broadcast { .. }
        )
    )
}

/// What a fused body holds: (ops, has a matmul, has a reduction-class op).
fn body_summary(b: &FusedBody) -> (usize, bool, bool) {
    let g = b.graph();
    let (mut ops, mut mm, mut red) = (0, false, false);
    for (_, n) in g.nodes() {
        if n.op.is_input() {
            continue;
        }
        ops += 1;
        match kind(&n.op) {
            Some(Kind::MatMul) => mm = true,
            Some(Kind::Reduction) => red = true,
            _ => {}
        }
    }
    (ops, mm, red)
}

// ------------------------------------------------------------------------------------------- regions

/// Which kernel a region is grown into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Elementwise ops around at most one reduction-class producer; no matmul.
    Elementwise,
    /// One matmul and its elementwise epilogue.
    Gemm,
    /// A reduction-class root and its elementwise prologue.
    Reduction,
}

/// A region of the e-graph: the chosen e-node of every class it absorbs; other classes it reads are arguments.
#[derive(Clone, Debug, PartialEq)]
struct Region {
    root: Id,
    chosen: BTreeMap<Id, FNode>,
}

/// The e-node to absorb for class `c`, its size in body ops and whether it is the region's anchor (its one
/// matmul or reduction), or `None` when `c` stays an argument.
fn choose(eg: &EGraph, c: Id, mode: Mode, anchored: bool, epi: bool, room: usize) -> Option<(FNode, usize, bool)> {
    let data = &eg[c].data;
    data.ty()?;
    // a written-out RMSNorm is left to `rms-norm-pattern`: absorbed only as the `rms_norm` it equals
    let rms = decomposed_rms(eg, c);
    let mut fallback = None;
    for n in &eg[c].nodes {
        let Some(k) = node_kind(n) else { continue };
        if rms && !matches!(n.ir_op(), Some(Op::Composite(Composite::RmsNorm { .. }))) {
            continue;
        }
        if data.param_only && k != Kind::Leaf {
            // weights and what is computed from them alone: prepared at load time, read as arguments
            continue;
        }
        match k {
            Kind::Elementwise | Kind::View | Kind::Leaf if room >= 1 => return Some((n.clone(), 1, false)),
            Kind::MatMul if mode == Mode::Gemm && !anchored && epi && room >= 1 => return Some((n.clone(), 1, true)),
            Kind::Reduction if mode == Mode::Elementwise && !anchored && room >= 1 => {
                return Some((n.clone(), 1, true))
            }
            Kind::Fused if fallback.is_none() => {
                let Some(Op::Composite(Composite::Fused { body })) = n.ir_op() else {
                    continue;
                };
                let (ops, mm, red) = body_summary(body);
                let ok = ops <= room
                    && match (mm, red) {
                        (false, false) => true,
                        (true, false) => mode == Mode::Gemm && !anchored && epi,
                        (false, true) => mode == Mode::Elementwise && !anchored,
                        (true, true) => false,
                    };
                if ok {
                    fallback = Some((n.clone(), ops, mm || red));
                }
            }
            _ => {}
        }
    }
    // an earlier fused kernel is inlined only where the class has no primitive to absorb
    fallback
}

/// Grows the largest region rooted at e-node `n` of class `root`, breadth-first.
fn grow(eg: &EGraph, root: Id, n: &FNode, mode: Mode) -> Option<Region> {
    let root = eg.find(root);
    let k = node_kind(n)?;
    let mut chosen = BTreeMap::new();
    chosen.insert(root, n.clone());
    let mut ops = 1;
    let mut anchored = matches!(k, Kind::MatMul | Kind::Reduction);
    let mut seen: HashSet<Id> = HashSet::from([root]);
    let mut queue: VecDeque<(Id, bool)> = VecDeque::new();
    let epi = epilogue_op(n);
    for &ch in &n.children {
        let ch = eg.find(ch);
        if ch == root {
            return None;
        }
        queue.push_back((ch, epi));
    }
    while let Some((c, epi)) = queue.pop_front() {
        if !seen.insert(c) {
            continue;
        }
        let Some((node, size, anchor)) = choose(eg, c, mode, anchored, epi, MAX_BODY_OPS - ops) else {
            continue;
        };
        ops += size;
        anchored |= anchor;
        let is_matmul = matches!(node.ir_op(), Some(Op::MatMul));
        let child_epi = epi && epilogue_op(&node);
        let children = node.children.clone();
        chosen.insert(c, node);
        if is_matmul {
            // a GEMM's operands are arguments: no prologue
            continue;
        }
        for ch in children {
            let ch = eg.find(ch);
            if ch == root {
                return None;
            }
            queue.push_back((ch, child_epi));
        }
    }
    Some(Region { root, chosen })
}

/// The classes `c` is read by, through e-nodes other than fused kernels (a fused kernel is an alternative, not
/// a use that needs `c` materialised).
fn users(eg: &EGraph, c: Id) -> impl Iterator<Item = Id> + '_ {
    eg[c]
        .parents()
        .filter(move |&p| !is_fused(eg.id_to_node(p)))
        .map(move |p| eg.find(p))
}

/// The classes of the region reachable from its root through chosen e-nodes.
fn reachable(eg: &EGraph, r: &Region) -> HashSet<Id> {
    let mut out = HashSet::new();
    let mut stack = vec![r.root];
    while let Some(c) = stack.pop() {
        if !r.chosen.contains_key(&c) || !out.insert(c) {
            continue;
        }
        stack.extend(r.chosen[&c].children.iter().map(|&ch| eg.find(ch)));
    }
    out
}

/// Whether a matmul the region absorbs (alone or inside an earlier fused kernel) is an output or is also read
/// outside the region.
fn shares_matmul(eg: &EGraph, r: &Region) -> bool {
    let members: HashSet<Id> = r.chosen.keys().copied().collect();
    r.chosen.iter().any(|(&c, n)| {
        let mm = match n.ir_op() {
            Some(Op::MatMul) => true,
            Some(Op::Composite(Composite::Fused { body })) => body_summary(body).1,
            _ => false,
        };
        c != r.root && mm && escapes(eg, c, &members)
    })
}

/// Whether class `c` of a region whose classes are `members` is needed outside it: an output, or read by a
/// class that is not a member.
fn escapes(eg: &EGraph, c: Id, members: &HashSet<Id>) -> bool {
    eg[c].data.output || users(eg, c).any(|u| !members.contains(&u))
}

/// The region without producers that are also used outside it (and what only they reached): no work is
/// computed twice. Views and scalar constants cost nothing to repeat and stay.
fn without_shared(eg: &EGraph, r: &Region) -> Region {
    let mut r = r.clone();
    loop {
        let members: HashSet<Id> = r.chosen.keys().copied().collect();
        let shared: Vec<Id> = r
            .chosen
            .iter()
            .filter(|(&c, n)| {
                c != r.root && !matches!(node_kind(n), Some(Kind::View | Kind::Leaf)) && escapes(eg, c, &members)
            })
            .map(|(&c, _)| c)
            .collect();
        for c in &shared {
            r.chosen.remove(c);
        }
        let keep = reachable(eg, &r);
        let before = r.chosen.len();
        r.chosen.retain(|c, _| keep.contains(c));
        if shared.is_empty() && r.chosen.len() == before {
            return r;
        }
    }
}

/// Post-order of the region's classes from the root and its arguments in first-use order; `None` on a cycle.
fn order(eg: &EGraph, r: &Region) -> Option<(Vec<Id>, Vec<Id>)> {
    fn visit(
        eg: &EGraph,
        r: &Region,
        c: Id,
        state: &mut HashMap<Id, bool>,
        order: &mut Vec<Id>,
        args: &mut Vec<Id>,
    ) -> Option<()> {
        match state.get(&c) {
            Some(true) => return Some(()),
            Some(false) => return None, // a cycle through the region
            None => {}
        }
        let Some(n) = r.chosen.get(&c) else {
            if !args.contains(&c) {
                args.push(c);
            }
            return Some(());
        };
        state.insert(c, false);
        for &ch in &n.children {
            visit(eg, r, eg.find(ch), state, order, args)?;
        }
        state.insert(c, true);
        order.push(c);
        Some(())
    }
    let (mut o, mut a) = (Vec::new(), Vec::new());
    visit(eg, r, r.root, &mut HashMap::new(), &mut o, &mut a)?;
    Some((o, a))
}

/// The body graph of a region and its argument classes.
fn body_of(eg: &EGraph, r: &Region) -> Option<(FusedBody, Vec<Id>)> {
    let (order, args) = order(eg, r)?;
    let mut g = Graph::new("fused");
    let mut val: HashMap<Id, Value> = HashMap::new();
    for (i, &a) in args.iter().enumerate() {
        let t = class_ty(eg, a)?;
        let v = g.input(&format!("arg{i}"), t.dtype, t.shape.0).ok()?;
        val.insert(a, v);
    }
    for &c in &order {
        let n = &r.chosen[&c];
        let ins: Vec<Value> = n.children.iter().map(|&ch| val[&eg.find(ch)]).collect();
        let v = match n.ir_op()? {
            Op::Composite(Composite::Fused { body }) => fulgur_ir::composite::fused::inline(&mut g, body, &ins).ok()?,
            op => Value::new(g.add_node(op.clone(), &ins, None).ok()?, 0),
        };
        val.insert(c, v);
    }
    g.add_output("out", val[&r.root]).ok()?;
    let body = FusedBody::from_graph(&g).ok()?;
    Some((body, args))
}

/// `r` with its views whose attributes hold symbols (reshape and broadcast shapes, slice bounds) left as
/// arguments, and what only they reached dropped. A body must find every symbol of its attributes as a whole
/// dimension of an argument ([`FusedBody::from_graph`]), which such a view can break (`T` in a reshape to
/// `[B, T - 1, 1]` when the arguments have `T - 1` only); without them the region's other ops still fuse.
fn without_symbolic_views(eg: &EGraph, r: &Region) -> Region {
    let symbolic = |n: &FNode| match n.ir_op() {
        Some(Op::Reshape { shape } | Op::Broadcast { shape }) => shape.0.iter().any(|d| !d.symbols().is_empty()),
        Some(Op::Slice { start, end, .. }) => !start.symbols().is_empty() || !end.symbols().is_empty(),
        _ => false,
    };
    let mut cut = r.clone();
    cut.chosen.retain(|&c, n| c == r.root || !symbolic(n));
    let keep = reachable(eg, &cut);
    cut.chosen.retain(|c, _| keep.contains(c));
    cut
}

/// Whether a body is worth a kernel of its own: it replaces at least two kernels (ops that are kernels when
/// they stand alone: everything but reshape, broadcast, slice and scalar constants), and for a GEMM kernel
/// it holds its matmul.
fn useful(body: &FusedBody, mode: Mode) -> bool {
    let g = body.graph();
    let mut kernels = 0;
    let mut mm = false;
    for (_, n) in g.nodes() {
        match &n.op {
            Op::Permute { .. } | Op::Concat { .. } => kernels += 1,
            op => match kind(op) {
                Some(Kind::Elementwise | Kind::Reduction) => kernels += 1,
                Some(Kind::MatMul) => {
                    kernels += 1;
                    mm = true
                }
                _ => {}
            },
        }
    }
    kernels >= 2 && (mode != Mode::Gemm || mm) && (mode == Mode::Gemm || !mm)
}

/// The region with slices of arguments left outside: the kernel then reads the slice (a free view) instead of
/// the whole tensor it is cut from.
fn slices_outside(eg: &EGraph, r: &Region) -> Region {
    let mut r = r.clone();
    loop {
        let cut: Vec<Id> = r
            .chosen
            .iter()
            .filter(|(&c, n)| {
                c != r.root
                    && matches!(n.ir_op(), Some(Op::Slice { .. }))
                    && !r.chosen.contains_key(&eg.find(n.children[0]))
            })
            .map(|(&c, _)| c)
            .collect();
        if cut.is_empty() {
            return r;
        }
        for c in cut {
            r.chosen.remove(&c);
        }
    }
}

/// A region's identity in its e-graph: its mode and the canonical class and chosen e-node of every member.
fn signature(eg: &EGraph, r: &Region, mode: Mode) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (mode as u8).hash(&mut h);
    eg.find(r.root).hash(&mut h);
    for (c, n) in &r.chosen {
        eg.find(*c).hash(&mut h);
        n.op.hash(&mut h);
        for &ch in &n.children {
            eg.find(ch).hash(&mut h);
        }
    }
    h.finish()
}

/// Adds the fused kernels of the regions rooted at `n` (the largest, and the one without shared producers).
fn build_fused(eg: &mut EGraph, class: Id, n: &FNode, mode: Mode) -> Vec<Id> {
    build_fused_args(eg, class, n, mode).0
}

/// [`build_fused`], also returning the arguments of the largest region when it was built now.
fn build_fused_args(eg: &mut EGraph, class: Id, n: &FNode, mode: Mode) -> (Vec<Id>, Vec<Id>) {
    let Some(full) = grow(eg, class, n, mode) else {
        return (vec![], vec![]);
    };
    let full = slices_outside(eg, &full);
    let lean = slices_outside(eg, &without_shared(eg, &full));
    // a GEMM kernel never repeats a matmul that is also used elsewhere: one product written once and read by
    // each of its users costs less than one product per user (and the extractor, pricing each user alone,
    // would take them all)
    let mut regions = if mode == Mode::Gemm && shares_matmul(eg, &full) {
        vec![]
    } else {
        vec![full]
    };
    if regions.first() != Some(&lean) {
        regions.push(lean);
    }
    let mut out = Vec::new();
    let mut full_args = Vec::new();
    for (i, r) in regions.into_iter().enumerate() {
        // a region already built in this e-graph (an earlier iteration grew the same one) adds nothing new
        if !eg.analysis.fused_seen.insert(signature(eg, &r, mode)) {
            continue;
        }
        // a view whose attributes name a symbol no argument has as a whole dimension (a reshape to
        // `[B, T - 1, 1]`) cannot be in a body: the region without such views still fuses the rest
        let Some((body, args)) = body_of(eg, &r).or_else(|| body_of(eg, &without_symbolic_views(eg, &r))) else {
            continue;
        };
        if i == 0 {
            full_args = args.clone();
        }
        if !useful(&body, mode) {
            continue;
        }
        out.extend(add_op(eg, Op::Composite(Composite::Fused { body }), &args));
    }
    (out, full_args)
}

/// Whether class `c` ends every elementwise region that could absorb it: it is an output or used by more
/// than one op, or its one user is an op through which an elementwise region does not grow (anything but an
/// elementwise op or a view). Elementwise kernels are rooted only at such classes, and at the cut points of a
/// region too long for one kernel (see [`build_elementwise`]): a chain of `n` ops then costs `n / 32`
/// regions, not `n`.
fn boundary(eg: &EGraph, c: Id) -> bool {
    // a value the graph outputs is needed as it is: a kernel ends there (its one elementwise consumer, such as
    // AdamW's update reading the new moment, may recompute it too; the extractor weighs both)
    if eg[c].data.output {
        return true;
    }
    let mut user: Option<Id> = None;
    for p in users(eg, c) {
        match user {
            None => user = Some(p),
            Some(u) if u == p => {}
            Some(_) => return true,
        }
    }
    let Some(u) = user else { return true };
    !eg[u]
        .nodes
        .iter()
        .filter(|m| m.children.iter().any(|&ch| eg.find(ch) == eg.find(c)))
        .all(|m| matches!(node_kind(m), Some(Kind::Elementwise | Kind::View)))
}

/// Whether class `c` (not parameter-derived) holds an e-node the region of `mode` could absorb.
fn absorbable(eg: &EGraph, c: Id, mode: Mode) -> bool {
    !eg[c].data.param_only
        && eg[c].nodes.iter().any(|n| match node_kind(n) {
            Some(Kind::Elementwise | Kind::View | Kind::Fused) => true,
            Some(Kind::Reduction) => mode == Mode::Elementwise,
            _ => false,
        })
}

/// Whether a matmul (or a fused kernel holding one) is reached from `c` through epilogue ops within `depth`.
fn reaches_matmul(eg: &EGraph, c: Id, depth: usize) -> bool {
    if eg[c].data.param_only {
        return false;
    }
    eg[c].nodes.iter().any(|n| match n.ir_op() {
        Some(Op::MatMul) => true,
        Some(Op::Composite(Composite::Fused { body })) => body_summary(body).1,
        Some(_) if depth > 0 && epilogue_op(n) => n.children.iter().any(|&ch| reaches_matmul(eg, ch, depth - 1)),
        _ => false,
    })
}

/// An e-node an elementwise kernel may be rooted at (wherever its class is).
fn elementwise_root(eg: &EGraph, class: Id, n: &FNode) -> bool {
    (node_kind(n) == Some(Kind::Elementwise) || matches!(n.ir_op(), Some(Op::Permute { .. } | Op::Concat { .. })))
        && !eg[class].data.param_only
        && n.children.iter().any(|&c| absorbable(eg, c, Mode::Elementwise))
        && match_rms(eg, class, n).is_none()
}

fn probe_elementwise(eg: &EGraph, class: Id, n: &FNode) -> bool {
    elementwise_root(eg, class, n) && boundary(eg, class)
}

/// The kernels rooted at a boundary class, then at every argument of its largest region that is not a boundary
/// itself (where the region stopped at [`MAX_BODY_OPS`]), and so on down: a long chain is tiled in one go.
fn build_elementwise(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<(Id, Id)> {
    let mut out = Vec::new();
    let mut work = vec![(class, n.clone())];
    while let Some((c, node)) = work.pop() {
        let (ids, args) = build_fused_args(eg, c, &node, Mode::Elementwise);
        out.extend(ids.into_iter().map(|i| (c, i)));
        for a in args {
            let a = eg.find(a);
            if boundary(eg, a) {
                continue; // rooted by its own match
            }
            if let Some(m) = eg[a].nodes.iter().find(|m| elementwise_root(eg, a, m)) {
                work.push((a, m.clone()));
            }
        }
    }
    out
}

fn probe_gemm(eg: &EGraph, class: Id, n: &FNode) -> bool {
    node_kind(n) == Some(Kind::Elementwise)
        && n.children.iter().any(|&c| reaches_matmul(eg, c, 3))
        && match_rms(eg, class, n).is_none()
}

fn build_gemm(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    build_fused(eg, class, n, Mode::Gemm)
}

fn probe_reduction(eg: &EGraph, _: Id, n: &FNode) -> bool {
    node_kind(n) == Some(Kind::Reduction) && n.children.iter().any(|&c| absorbable(eg, c, Mode::Reduction))
}

fn build_reduction(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    build_fused(eg, class, n, Mode::Reduction)
}

// ------------------------------------------------------------------------------------------- RMSNorm

/// `(x, w, eps)` when `n` is the decomposed RMSNorm `(x · rsqrt(reduce_mean(x·x, -1, keepdims) + eps)) · w` (or
/// `pow(x, 2)` for the square; operands of `mul` and `add` in either order) with `w: [n]`, `eps` a scalar.
fn match_rms(eg: &EGraph, class: Id, n: &FNode) -> Option<(Id, Id, f64)> {
    if !matches!(n.ir_op(), Some(Op::Binary(BinaryOp::Mul))) {
        return None;
    }
    let out_ty = class_ty(eg, class)?;
    let (a, b) = (n.children[0], n.children[1]);
    for (y, w) in [(a, b), (b, a)] {
        let Some(wt) = class_ty(eg, w) else { continue };
        if wt.rank() != 1 {
            continue;
        }
        for (o, ch) in class_ops(eg, y) {
            if !matches!(o, Op::Binary(BinaryOp::Mul)) {
                continue;
            }
            for (x, r) in [(ch[0], ch[1]), (ch[1], ch[0])] {
                let Some(xt) = class_ty(eg, x) else { continue };
                let rank = xt.rank();
                if rank == 0 || xt != out_ty || xt.dtype != wt.dtype || xt.dims()[rank - 1] != wt.dims()[0] {
                    continue;
                }
                if let Some(eps) = rsqrt_mean_square(eg, r, x, rank) {
                    return Some((eg.find(x), eg.find(w), eps));
                }
            }
        }
    }
    None
}

/// `eps` when `r` is `rsqrt(reduce_mean(x², [-1], keepdims) + eps)`.
fn rsqrt_mean_square(eg: &EGraph, r: Id, x: Id, rank: usize) -> Option<f64> {
    let dtype = class_ty(eg, x)?.dtype;
    for (o, ch) in class_ops(eg, r) {
        if !matches!(o, Op::Unary(UnaryOp::Rsqrt)) {
            continue;
        }
        for (o2, ch2) in class_ops(eg, ch[0]) {
            if !matches!(o2, Op::Binary(BinaryOp::Add)) {
                continue;
            }
            for (m, e) in [(ch2[0], ch2[1]), (ch2[1], ch2[0])] {
                let Some(et) = class_ty(eg, e) else { continue };
                let Some(eps) = eg[e].data.scalar else { continue };
                if et.rank() != 0 || et.dtype != dtype {
                    continue;
                }
                let mean_of_square = class_ops(eg, m).any(|(o3, ch3)| match o3 {
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes,
                        keepdims: true,
                    } => axes.len() == 1 && (axes[0] == -1 || axes[0] == rank as i64 - 1) && is_square(eg, ch3[0], x),
                    _ => false,
                });
                if mean_of_square {
                    return Some(eps);
                }
            }
        }
    }
    None
}

/// Whether `q` is `x · x` or `pow(x, 2)`.
fn is_square(eg: &EGraph, q: Id, x: Id) -> bool {
    let x = eg.find(x);
    class_ops(eg, q).any(|(o, ch)| match o {
        Op::Binary(BinaryOp::Mul) => eg.find(ch[0]) == x && eg.find(ch[1]) == x,
        Op::Binary(BinaryOp::Pow) => {
            eg.find(ch[0]) == x
                && eg[ch[1]].data.scalar == Some(2.0)
                && class_ty(eg, ch[1]).is_some_and(|t| t.rank() == 0)
        }
        _ => false,
    })
}

/// Whether class `c` holds a written-out RMSNorm.
fn decomposed_rms(eg: &EGraph, c: Id) -> bool {
    eg[c].nodes.iter().any(|n| match_rms(eg, c, n).is_some())
}

fn probe_rms(eg: &EGraph, class: Id, n: &FNode) -> bool {
    match_rms(eg, class, n).is_some()
}

fn build_rms(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some((x, w, eps)) = match_rms(eg, class, n) else {
        return vec![];
    };
    add_op(eg, Op::Composite(Composite::RmsNorm { eps }), &[x, w])
        .into_iter()
        .collect()
}

// ------------------------------------------------------------------------------------------- projections

/// How far (in e-graph edges) a consumer may be above the projections it joins.
const PROJ_DEPTH: usize = 8;
/// The most projections joined into one matmul.
const PROJ_MAX: usize = 16;

/// A projection `matmul(x, w)`: its class, its weight's class and its number of output columns.
#[derive(Clone, Debug)]
struct Projection {
    class: Id,
    w: Id,
    cols: Dim,
}

/// Whether `w` is a weight operand: rank 2, computed from parameters alone, and a parameter or a transposed
/// one (`transpose(W)`; not, say, an already joined `concat` of weights).
fn weight_operand(eg: &EGraph, w: Id) -> Option<Dim> {
    let t = class_ty(eg, w)?;
    let weight = eg[w].nodes.iter().any(|n| match n.ir_op() {
        Some(Op::Param { .. }) => true,
        Some(Op::Permute { perm }) => perm == &[1, 0],
        _ => false,
    });
    (weight && eg[w].data.param_only && t.rank() == 2).then(|| t.dims()[1].clone())
}

/// Every projection of `x` (a class not derived from parameters alone), one per weight, ordered by weight class.
fn projections(eg: &EGraph, x: Id) -> Vec<Projection> {
    let x = eg.find(x);
    if eg[x].data.param_only {
        return vec![];
    }
    let mut by_w: BTreeMap<Id, Projection> = BTreeMap::new();
    for p in eg[x].parents() {
        let n = eg.id_to_node(p);
        if !matches!(n.ir_op(), Some(Op::MatMul)) || eg.find(n.children[0]) != x {
            continue;
        }
        let w = eg.find(n.children[1]);
        if let Some(cols) = weight_operand(eg, w) {
            by_w.entry(w).or_insert(Projection {
                class: eg.find(p),
                w,
                cols,
            });
        }
        if by_w.len() >= PROJ_MAX {
            break;
        }
    }
    // one projection per class (two weights may give equal classes)
    let mut seen = HashSet::new();
    by_w.into_values().filter(|p| seen.insert(p.class)).collect()
}

/// The rule that joins projections. A plain union of `matmul(x, Wᵢ)` with `slice(matmul(x, concat(W)))` is
/// sound but the DAG extractor never takes it: for each class alone the wide matmul costs more than the
/// narrow one, and the saving only shows where the pieces meet. So the rewrite is made at the *consumer*: for
/// an e-node `P` (e.g. `lightning_layer(qkv, λ, w, gate)` or `flash_attention(q', k', v')`) two or more of
/// whose inputs are computed, within [`PROJ_DEPTH`] steps, from different projections of one `x`, it adds `P'`
/// = `P` with those inputs recomputed from slices of one `matmul(x, concat(Wᵢ))` (the path from each slice up
/// to `P` copied with the same ops), equal to `P`. Each slice equals its projection exactly: the same dot
/// products, summed in the same order.
pub struct ConcatProjections;

fn concat_projections() -> Rewrite {
    Rewrite::new("concat-projections", ConcatProjections, ConcatProjections)
        .unwrap_or_else(|e| panic!("rule `concat-projections` is malformed: {e}"))
}

/// A projection e-node: `matmul(x, w)` with a weight operand and at least one other projection of `x`.
fn probe_projection(eg: &EGraph, n: &FNode) -> bool {
    matches!(n.ir_op(), Some(Op::MatMul))
        && weight_operand(eg, n.children[1]).is_some()
        && !eg[n.children[0]].data.param_only
        && eg[n.children[0]].parents().any(|p| {
            let m = eg.id_to_node(p);
            matches!(m.ir_op(), Some(Op::MatMul))
                && eg.find(m.children[0]) == eg.find(n.children[0])
                && eg.find(m.children[1]) != eg.find(n.children[1])
                && weight_operand(eg, m.children[1]).is_some()
        })
}

impl Searcher<FNode, ShapeAnalysis> for ConcatProjections {
    fn search_eclass_with_limit(
        &self,
        egraph: &EGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<egg::SearchMatches<'_, FNode>> {
        let n = egraph[eclass]
            .nodes
            .iter()
            .filter(|n| probe_projection(egraph, n))
            .take(limit)
            .count();
        (n > 0).then(|| egg::SearchMatches {
            eclass,
            substs: vec![egg::Subst::default(); n],
            ast: None,
        })
    }
    fn vars(&self) -> Vec<egg::Var> {
        vec![]
    }
}

impl egg::Applier<FNode, ShapeAnalysis> for ConcatProjections {
    fn apply_matches(&self, eg: &mut EGraph, matches: &[egg::SearchMatches<FNode>], rule: egg::Symbol) -> Vec<Id> {
        // one pass per distinct `x`: the matched projections of one `x` share all their consumers
        let mut xs: Vec<Id> = Vec::new();
        for m in matches {
            let class = eg.find(m.eclass);
            for n in eg[class].nodes.iter().filter(|n| probe_projection(eg, n)) {
                let x = eg.find(n.children[0]);
                if !xs.contains(&x) {
                    xs.push(x);
                }
            }
        }
        let mut changed = Vec::new();
        for x in xs {
            for (p, alt) in join_projections(eg, x) {
                if eg.union_trusted(p, alt, rule) {
                    changed.push(eg.find(p));
                }
            }
        }
        changed
    }
    fn apply_one(
        &self,
        _: &mut EGraph,
        _: Id,
        _: &egg::Subst,
        _: Option<&egg::PatternAst<FNode>>,
        _: egg::Symbol,
    ) -> Vec<Id> {
        Vec::new()
    }
}

/// For the projections of `x`: every consumer e-node that joins two or more of them, and its rewrite over one
/// wide matmul, as (consumer class, new class) pairs.
fn join_projections(eg: &mut EGraph, x: Id) -> Vec<(Id, Id)> {
    let projs = projections(eg, x);
    if projs.len() < 2 {
        return vec![];
    }
    // distance (in edges, upward) from each projection to each class it reaches
    let mut dist: HashMap<Id, BTreeMap<usize, usize>> = HashMap::new();
    let mut consumers: Vec<Id> = Vec::new(); // e-node ids (parents), in the order met
    let mut met: HashSet<Id> = HashSet::new();
    for (i, p) in projs.iter().enumerate() {
        let mut queue = VecDeque::from([(p.class, 0usize)]);
        while let Some((c, d)) = queue.pop_front() {
            let e = dist.entry(c).or_default();
            if e.contains_key(&i) {
                continue;
            }
            e.insert(i, d);
            if d == PROJ_DEPTH {
                continue;
            }
            for q in eg[c].parents() {
                if matches!(eg.id_to_node(q).op, FOp::Proj(_)) {
                    continue;
                }
                if met.insert(q) {
                    consumers.push(q);
                }
                queue.push_back((eg.find(q), d + 1));
            }
        }
    }
    let reach = |c: Id| dist.get(&c).map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    let mut done: HashSet<FNode> = HashSet::new();
    for q in consumers {
        let node = eg.id_to_node(q).clone();
        let node = FNode {
            op: node.op,
            children: node.children.iter().map(|&c| eg.find(c)).collect(),
        };
        if !done.insert(node.clone()) {
            continue;
        }
        // a lowest meeting point: each input reaches at most one projection, two inputs reach different ones
        let mut used: BTreeMap<usize, ()> = BTreeMap::new();
        let mut ok = true;
        for &c in &node.children {
            match reach(c) {
                0 => {}
                1 => {
                    used.insert(*dist[&c].keys().next().unwrap_or(&0), ());
                }
                _ => ok = false,
            }
        }
        if !ok || used.len() < 2 {
            continue;
        }
        let group: Vec<usize> = used.keys().copied().collect();
        let Some(slices) = wide_matmul(eg, x, &projs, &group) else {
            continue;
        };
        let mut memo: HashMap<Id, Option<Id>> = HashMap::new();
        let mut children = Vec::with_capacity(node.children.len());
        for &c in &node.children {
            let new = match dist.get(&c).and_then(|m| m.iter().next()) {
                Some((&i, _)) => recompute(eg, c, projs[i].class, slices[&i], i, &dist, &mut memo),
                None => Some(c),
            };
            match new {
                Some(n) => children.push(n),
                None => break,
            }
        }
        if children.len() != node.children.len() {
            continue;
        }
        let pclass = eg.find(q);
        if let Some(alt) = crate::lang::add_checked(
            eg,
            FNode {
                op: node.op.clone(),
                children,
            },
        ) {
            if eg.find(alt) != pclass {
                // the consumer e-node's own id: an explanation names this rule at it
                out.push((q, alt));
            }
        }
    }
    out
}

/// `matmul(x, concat[axis=1](w of the group))` and its slices, one per projection of the group.
fn wide_matmul(eg: &mut EGraph, x: Id, projs: &[Projection], group: &[usize]) -> Option<HashMap<usize, Id>> {
    let ws: Vec<Id> = group.iter().map(|&i| projs[i].w).collect();
    let wcat = add_op(eg, Op::Concat { axis: 1 }, &ws)?;
    let m = add_op(eg, Op::MatMul, &[x, wcat])?;
    let mut out = HashMap::new();
    let mut start = Dim::from(0);
    for &i in group {
        let end = start.clone() + projs[i].cols.clone();
        let s = add_op(
            eg,
            Op::Slice {
                axis: -1,
                start: start.clone(),
                end: end.clone(),
            },
            &[m],
        )?;
        out.insert(i, s);
        start = end;
    }
    Some(out)
}

/// Class `c` recomputed with projection `i` (class `target`) replaced by `slice`: an e-node of `c` (a primitive
/// if one will do, so the fusion rules fuse the copy afterwards) copied with every input that reaches the
/// projection recomputed in turn. `None` where no copy avoids a cycle.
fn recompute(
    eg: &mut EGraph,
    c: Id,
    target: Id,
    slice: Id,
    i: usize,
    dist: &HashMap<Id, BTreeMap<usize, usize>>,
    memo: &mut HashMap<Id, Option<Id>>,
) -> Option<Id> {
    let c = eg.find(c);
    if c == eg.find(target) {
        return Some(slice);
    }
    if let Some(r) = memo.get(&c) {
        return *r;
    }
    let reaches = |eg: &EGraph, ch: Id| dist.get(&eg.find(ch)).is_some_and(|m| m.contains_key(&i));
    if !reaches(eg, c) {
        return Some(c);
    }
    memo.insert(c, None); // in progress: a cycle back to `c` finds no copy
    let candidates: Vec<FNode> = {
        let nodes = &eg[c].nodes;
        nodes
            .iter()
            .filter(|n| !is_fused(n) && matches!(n.op, FOp::Op(_)))
            .chain(nodes.iter().filter(|n| is_fused(n)))
            .filter(|n| n.children.iter().any(|&ch| reaches(eg, ch)))
            .cloned()
            .collect()
    };
    'nodes: for n in candidates {
        let mut children = Vec::with_capacity(n.children.len());
        for &ch in &n.children {
            if reaches(eg, ch) {
                match recompute(eg, ch, target, slice, i, dist, memo) {
                    Some(x) => children.push(x),
                    None => continue 'nodes,
                }
            } else {
                children.push(eg.find(ch));
            }
        }
        if let Some(r) = crate::lang::add_checked(eg, FNode { op: n.op, children }) {
            memo.insert(c, Some(r));
            return Some(r);
        }
    }
    None
}
