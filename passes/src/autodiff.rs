//! Reverse-mode automatic differentiation as a graph transform.
//!
//! [`differentiate`] takes a graph with a scalar float output (the loss) and returns one graph that computes
//! every output of the original and, beside them, `grad.NAME` for every float parameter (and for the data inputs
//! asked for): the gradient of the loss with respect to it, of its shape and dtype.
//!
//! How (see `docs/passes.md`, "Autodiff"):
//! 1. The forward is copied with its composites expanded into their decompositions (the same ones the
//!    interpreter runs), except `softmax` and `log_softmax`, which keep their own rules (the decomposition's
//!    max-subtraction would add a tie rule for nothing). Each node thus keeps the meaning it had.
//! 2. From the loss backwards, in reverse node order, each node that depends on a differentiated leaf gets
//!    the vector-Jacobian product of its rule; contributions to one value are summed.
//!
//! Rules follow PyTorch's where a function is not differentiable (ties of `max`/`min` share the gradient
//! evenly, `abs` has gradient 0 at 0). Integer and boolean values carry no gradient. A parameter the loss does
//! not depend on gets a gradient of zeros.

use crate::cost::Target;
use crate::PassError;
use fulgur_ir::composite::attention::rope;
use fulgur_ir::{BinaryOp, CmpOp, Composite, DType, Dim, Graph, NodeId, Op, ReduceOp, UnaryOp, Value};
use std::collections::HashMap;

/// Prefix of the gradient outputs: `grad.model.layers.0.mlp.gate.weight`.
pub const GRAD_PREFIX: &str = "grad.";

/// What to differentiate.
#[derive(Clone, Debug, Default)]
pub struct GradOptions {
    /// Data inputs to differentiate as well (float inputs only).
    pub inputs: Vec<String>,
    /// Differentiate every composite through its decomposition, the backward composites unused (the oracle
    /// the backward composites are checked against; far slower to run).
    pub expand_all: bool,
    /// Whether a value the backward needs and the forward's kernels do not keep is stored or recomputed.
    pub recompute: Recompute,
    /// The machine [`Recompute::Auto`] prices the two for (none: store).
    pub target: Option<Target>,
}

/// Activation recompute versus storing, for a value the backward reads that a fused forward kernel does not
/// write: `grouped_matmul[swiglu]`'s pre-activation `h = xs·w` (`[M, 2I]`). (Flash attention's probabilities
/// are always recomputed: storing `[.., T, S]` is what its kernel exists to avoid.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Per value, the cheaper in time on [`GradOptions::target`]: writing it and reading it back, or
    /// recomputing it (a grouped GEMM). Store without a target.
    #[default]
    Auto,
    /// Store every such value (the forward computes it unfused and keeps it).
    Store,
    /// Recompute every such value in the backward.
    All,
}

/// One store-or-recompute decision of [`differentiate_report`].
#[derive(Clone, Debug, PartialEq)]
pub struct RecomputeChoice {
    /// The forward node and the value it concerns, e.g. `layers.3.grouped_matmul` and `pre-activation
    /// f32[M, 8192]`.
    pub node: String,
    pub value: String,
    pub recomputed: bool,
    /// The bytes kept for the backward when stored (saved when recomputed).
    pub bytes: Dim,
    /// The FLOPs recomputing adds (avoided when stored).
    pub flops: Dim,
}

/// What [`differentiate_report`] chose: every store-or-recompute decision, in forward order; and where the
/// backward of each MoE chain lies in the returned graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GradReport {
    pub choices: Vec<RecomputeChoice>,
    pub moe_chains: Vec<MoeChainGrad>,
}

/// A MoE chain of the differentiated graph (`moe_dispatch`, the nodes from its sorted rows to the combine's
/// rows, `moe_combine` reading the dispatch's positions; no value inside read from outside) and its backward:
/// the nodes the chain's vector-Jacobian products wrote, the cotangent they start from and the contribution
/// each gives to a value from outside the chain. Everything the backward computes leaves through those
/// contributions, so a pass that runs the chain differently (the routed exchange of the sharding pass) can
/// write the chain's backward its own way in place of `backward` and hand on the same contributions.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeChainGrad {
    pub dispatch: NodeId,
    /// The nodes between the dispatch and the combine, in order.
    pub members: Vec<NodeId>,
    pub combine: NodeId,
    /// The cotangent of the combine's output.
    pub cotangent: Value,
    /// The backward's nodes, in order.
    pub backward: Vec<NodeId>,
    /// `(value from outside the chain, its contribution)`: the dispatch's tokens, the combine's weights, the
    /// expert weights the members read; each at most once.
    pub contributions: Vec<(Value, Value)>,
}

impl MoeChainGrad {
    /// The record with every node and value renamed by `map` (a copy of the graph that keeps every node);
    /// `None` where one of them is not in it.
    pub fn mapped(&self, map: &HashMap<Value, Value>) -> Option<MoeChainGrad> {
        let node = |id: NodeId| map.get(&Value::new(id, 0)).map(|v| v.node);
        let value = |v: Value| map.get(&v).copied();
        Some(MoeChainGrad {
            dispatch: node(self.dispatch)?,
            members: self.members.iter().map(|&m| node(m)).collect::<Option<_>>()?,
            combine: node(self.combine)?,
            cotangent: value(self.cotangent)?,
            backward: self.backward.iter().map(|&m| node(m)).collect::<Option<_>>()?,
            contributions: self
                .contributions
                .iter()
                .map(|&(v, c)| Some((value(v)?, value(c)?)))
                .collect::<Option<_>>()?,
        })
    }
}

/// The MoE chains of `g` (see [`MoeChainGrad`]): `(dispatch, members, combine)`.
fn moe_chains(g: &Graph) -> Vec<(NodeId, Vec<NodeId>, NodeId)> {
    let outputs: std::collections::HashSet<Value> = g.outputs().iter().map(|(_, v)| *v).collect();
    let mut found = Vec::new();
    for (c, node) in g.nodes() {
        if !matches!(node.op, Op::Composite(Composite::MoeCombine)) {
            continue;
        }
        let (ys, pos) = (node.inputs[0], node.inputs[1]);
        let d = pos.node;
        if pos.index != 1 || !matches!(g.node(d).op, Op::Composite(Composite::MoeDispatch { .. })) {
            continue;
        }
        // forward from the dispatch's rows and counts, then back from the combine's rows
        let mut from = std::collections::HashSet::new();
        for i in d.index() + 1..c.index() {
            let id = NodeId::new(i);
            if g.node(id)
                .inputs
                .iter()
                .any(|v| (v.node == d && v.index != 1) || from.contains(&v.node))
            {
                from.insert(id);
            }
        }
        let mut to = std::collections::HashSet::from([ys.node]);
        for i in (d.index() + 1..c.index()).rev() {
            let id = NodeId::new(i);
            if to.contains(&id) {
                to.extend(g.node(id).inputs.iter().map(|v| v.node));
            }
        }
        let members: Vec<NodeId> = (d.index() + 1..c.index())
            .map(NodeId::new)
            .filter(|id| from.contains(id) && to.contains(id))
            .collect();
        let inside = |id: NodeId| id == d || members.contains(&id);
        // nothing inside read from outside, nor an output; the positions read by the combine alone
        let closed = members.contains(&ys.node)
            && std::iter::once(d).chain(members.iter().copied()).all(|id| {
                let n = g.node(id);
                (0..n.outputs.len() as u32).all(|k| !outputs.contains(&Value::new(id, k)))
                    && g.users(id).into_iter().all(|(u, slot, k)| {
                        if id == d && k == 1 {
                            u == c && slot == 1
                        } else {
                            inside(u) || (u == c && slot == 0 && id == ys.node)
                        }
                    })
            });
        if closed {
            found.push((d, members, c));
        }
    }
    found
}

impl GradReport {
    /// A one-line summary at the symbol values `env` (unknown symbols 1024): per kind of decision, how many
    /// values, the bytes stored or saved, the FLOPs added or avoided.
    pub fn summary(&self, env: &HashMap<String, i64>) -> String {
        let ev = |d: &Dim| d.eval_or(env, 1024).map(|x| x as f64).unwrap_or(f64::NAN);
        let mut parts = Vec::new();
        for (recomputed, what) in [(false, "stored"), (true, "recomputed")] {
            let mut by: std::collections::BTreeMap<&str, (usize, f64, f64)> = Default::default();
            for c in self.choices.iter().filter(|c| c.recomputed == recomputed) {
                let kind = c.value.split(' ').next().unwrap_or("");
                let e = by.entry(kind).or_default();
                e.0 += 1;
                e.1 += ev(&c.bytes);
                e.2 += ev(&c.flops);
            }
            for (kind, (n, bytes, flops)) in by {
                parts.push(if recomputed {
                    format!(
                        "{n} {kind} {what} (saves {:.1} MiB, adds {:.2} GFLOP)",
                        bytes / 1048576.0,
                        flops / 1e9
                    )
                } else {
                    format!(
                        "{n} {kind} {what} ({:.1} MiB kept for the backward; recomputing would add {:.2} GFLOP)",
                        bytes / 1048576.0,
                        flops / 1e9
                    )
                });
            }
        }
        if parts.is_empty() {
            "nothing to store or recompute".into()
        } else {
            parts.join("; ")
        }
    }
}

fn err(m: impl Into<String>) -> PassError {
    PassError::Options(format!("autodiff: {}", m.into()))
}

/// The graph computing `g`'s outputs and the gradient of its output `loss` with respect to every float
/// parameter (outputs `grad.NAME`, in parameter order) and to the inputs named in `opts`.
pub fn differentiate(g: &Graph, loss: &str, opts: &GradOptions) -> Result<Graph, PassError> {
    Ok(differentiate_report(g, loss, opts)?.0)
}

/// [`differentiate`], with its store-or-recompute decisions.
pub fn differentiate_report(g: &Graph, loss: &str, opts: &GradOptions) -> Result<(Graph, GradReport), PassError> {
    let lv = g
        .outputs()
        .iter()
        .find(|(n, _)| n == loss)
        .map(|(_, v)| *v)
        .ok_or_else(|| err(format!("the graph has no output `{loss}` to differentiate")))?;
    let lt = g.ty(lv);
    if !lt.dtype.is_float() || lt.shape.numel().as_const() != Some(1) {
        return Err(err(format!(
            "the loss `{loss}` must be a float value of one element, got {lt}"
        )));
    }
    for name in &opts.inputs {
        let id = g
            .input_by_name(name)
            .filter(|&id| matches!(g.node(id).op, Op::Input { .. }))
            .ok_or_else(|| err(format!("the graph has no data input `{name}` to differentiate")))?;
        let t = g.ty(Value::new(id, 0));
        if !t.dtype.is_float() {
            return Err(err(format!(
                "the input `{name}` is {t}: only float inputs have gradients"
            )));
        }
    }
    let mut report = GradReport::default();
    let mut out = expand(g, opts, &mut report)?;
    let loss_v = out
        .outputs()
        .iter()
        .find(|(n, _)| n == loss)
        .map(|(_, v)| *v)
        .ok_or_else(|| err("the expanded graph lost its loss output"))?;
    // the leaves: float parameters, and the inputs asked for
    let n = out.node_count();
    let mut leaves: Vec<(String, NodeId)> = Vec::new();
    for id in out.node_ids() {
        match &out.node(id).op {
            Op::Param { name, ty } if ty.dtype.is_float() => leaves.push((name.clone(), id)),
            Op::Input { name, .. } if opts.inputs.contains(name) => leaves.push((name.clone(), id)),
            _ => {}
        }
    }
    // which nodes depend on a leaf (node ids are a topological order)
    let mut live = vec![false; n];
    for (_, id) in &leaves {
        live[id.index()] = true;
    }
    for id in out.node_ids().collect::<Vec<_>>() {
        let node = out.node(id);
        if !live[id.index()] && node.inputs.iter().any(|v| live[v.node.index()]) {
            live[id.index()] = node.outputs.iter().any(|t| t.dtype.is_float());
        }
    }
    let mut grads: HashMap<Value, Value> = HashMap::new();
    if live[loss_v.node.index()] {
        let lt = out.ty(loss_v).clone();
        let seed = out.full(1.0, lt.dtype, lt.dims().to_vec())?;
        grads.insert(loss_v, seed);
    }
    // the MoE chains, whose backward is recorded
    let mut chains: Vec<MoeChainGrad> = Vec::new();
    let mut chain_of: HashMap<NodeId, usize> = HashMap::new();
    let mut chain_ok: Vec<bool> = Vec::new();
    for (d, members, c) in moe_chains(&out) {
        let k = chains.len();
        for &id in std::iter::once(&d).chain(&members).chain(std::iter::once(&c)) {
            chain_of.insert(id, k);
        }
        chains.push(MoeChainGrad {
            dispatch: d,
            members,
            combine: c,
            cotangent: Value::new(c, 0),
            backward: Vec::new(),
            contributions: Vec::new(),
        });
        chain_ok.push(false);
    }
    out.push_scope("grad");
    for i in (0..=loss_v.node.index()).rev() {
        let id = NodeId::new(i);
        if !live[i] {
            continue;
        }
        let node = out.node(id).clone();
        let gys: Vec<Option<Value>> = (0..node.outputs.len() as u32)
            .map(|k| grads.get(&Value::new(id, k)).copied())
            .collect();
        if gys.iter().all(|g| g.is_none()) || node.inputs.is_empty() {
            continue;
        }
        let want: Vec<bool> = node
            .inputs
            .iter()
            .map(|v| live[v.node.index()] && out.dtype(*v).is_float())
            .collect();
        if !want.iter().any(|w| *w) {
            continue;
        }
        let chain = chain_of.get(&id).copied();
        if let Some(k) = chain {
            if id == chains[k].combine {
                match gys[0] {
                    Some(gy) => {
                        chains[k].cotangent = gy;
                        chain_ok[k] = true;
                    }
                    None => chain_ok[k] = false,
                }
            }
        }
        let before = out.node_count();
        let contributions = vjp(&mut out, id, &node.op, &node.inputs, &gys, &want).map_err(|e| match e {
            PassError::Options(m) => err(format!(
                "{} (node %{i}{})",
                m.trim_start_matches("autodiff: "),
                node.name.as_deref().map(|s| format!(" `{s}`")).unwrap_or_default()
            )),
            other => other,
        })?;
        let mut written: Vec<NodeId> = (before..out.node_count()).map(NodeId::new).collect();
        for (slot, c) in contributions.into_iter().enumerate() {
            let (Some(c), true) = (c, want[slot]) else {
                continue;
            };
            let v = node.inputs[slot];
            let at = out.node_count();
            let c = fit(&mut out, c, v)?;
            written.extend((at..out.node_count()).map(NodeId::new));
            let inner = chain.is_some_and(|k| chain_of.get(&v.node) == Some(&k));
            if let (Some(k), false) = (chain, inner) {
                // a contribution leaving the chain: once per value
                if chains[k].contributions.iter().any(|(u, _)| *u == v) {
                    chain_ok[k] = false;
                }
                chains[k].contributions.push((v, c));
            }
            let at = out.node_count();
            let acc = match grads.get(&v) {
                Some(&prev) => out.add(prev, c)?,
                None => c,
            };
            if inner {
                written.extend((at..out.node_count()).map(NodeId::new));
            }
            grads.insert(v, acc);
        }
        if let Some(k) = chain {
            chains[k].backward.extend(written);
        }
    }
    report.moe_chains = chains
        .into_iter()
        .zip(chain_ok)
        .filter(|(c, ok)| *ok && !c.backward.is_empty())
        .map(|(c, _)| c)
        .collect();
    out.pop_scope();
    for (name, id) in leaves {
        let v = Value::new(id, 0);
        let gv = match grads.get(&v) {
            Some(&gv) => gv,
            None => {
                let t = out.ty(v).clone();
                out.full(0.0, t.dtype, t.dims().to_vec())?
            }
        };
        out.add_output(format!("{GRAD_PREFIX}{name}"), gv)?;
    }
    out.verify().map_err(|e| PassError::Invalid {
        pass: "autodiff".into(),
        message: e.to_string(),
    })?;
    Ok((out, report))
}

/// Whether a composite keeps its own rule rather than being expanded: those whose backward is a composite kernel
/// (or a few) rather than the autodiff of a decomposition that is not how they run.
fn kept(c: &Composite, expand_all: bool) -> bool {
    match c {
        Composite::Softmax { .. } | Composite::LogSoftmax { .. } => true,
        Composite::LightningAttention { .. }
        | Composite::FlashAttention { .. }
        | Composite::GroupedMatmul { .. }
        | Composite::MoeDispatch { .. }
        | Composite::MoeCombine
        | Composite::AllReduce { .. }
        | Composite::AllGather { .. }
        | Composite::ReduceScatter { .. }
        | Composite::SendRecv { .. }
        | Composite::AllToAll { .. }
        | Composite::AllToAllDispatch { .. }
        | Composite::AllToAllCombine { .. } => !expand_all,
        _ => false,
    }
}

/// A copy of `g` with every composite but the kept ones replaced by its decomposition (repeatedly, for
/// decompositions that use composites).
fn expand(g: &Graph, opts: &GradOptions, report: &mut GradReport) -> Result<Graph, PassError> {
    let expand_all = opts.expand_all;
    let kept = |c: &Composite| kept(c, expand_all);
    let mut cur = g.clone();
    for round in 0..16 {
        // round 0 always runs: it makes the store-or-recompute decisions (and records them once)
        let pending = cur.nodes().any(|(_, n)| matches!(&n.op, Op::Composite(c) if !kept(c)));
        if !pending && round > 0 {
            return Ok(cur);
        }
        let first = round == 0;
        let mut next = Graph::new(cur.name.clone());
        let mut map: HashMap<Value, Value> = HashMap::new();
        for (id, node) in cur.nodes() {
            let ins: Vec<Value> = node.inputs.iter().map(|v| map[v]).collect();
            let outs: Vec<Value> = match &node.op {
                // a fused swiglu whose pre-activation the backward reads: store it (the forward computes it
                // unfused) or recompute it (the node stays fused; its rule recomputes)
                Op::Composite(Composite::GroupedMatmul { swiglu: true }) if !expand_all && first => {
                    let (m, c) = (cur.dims(node.inputs[0])[0].clone(), cur.dims(node.inputs[0])[1].clone());
                    let o = cur.dims(node.inputs[2])[2].clone();
                    let dt = cur.dtype(node.inputs[0]);
                    let bytes = m.clone() * o.clone() * Dim::from(dt.size_bytes() as i64);
                    let flops = Dim::from(2) * m.clone() * c * o.clone();
                    let recompute = match (opts.recompute, &opts.target) {
                        (Recompute::Store, _) | (Recompute::Auto, None) => false,
                        (Recompute::All, _) => true,
                        (Recompute::Auto, Some(t)) => {
                            let ev = |d: &Dim| d.eval_or(&HashMap::new(), 1024).map(|x| x as f64).unwrap_or(0.0);
                            let peak = if dt == DType::F32 {
                                t.vector_flops
                            } else {
                                t.matmul_flops_bf16
                            };
                            ev(&flops) / peak < 2.0 * ev(&bytes) / t.mem_bw
                        }
                    };
                    let name = node.name.clone().unwrap_or_else(|| format!("%{}", id.index()));
                    report.choices.push(RecomputeChoice {
                        node: name,
                        value: format!("swiglu-pre-activation {dt}[{m}, {o}]"),
                        recomputed: recompute,
                        bytes,
                        flops,
                    });
                    if recompute {
                        let nid = next.add_node(node.op.clone(), &ins, node.name.clone())?;
                        vec![Value::new(nid, 0)]
                    } else {
                        let scope = node.name.clone().unwrap_or_else(|| "grouped_matmul".to_string());
                        next.push_scope(scope);
                        let r = (|| -> fulgur_ir::Result<Value> {
                            let h = next.grouped_matmul(ins[0], ins[1], ins[2], false)?;
                            let half = o.div_exact(&Dim::from(2)).unwrap_or_else(|| o.clone());
                            let gate = next.slice(h, -1, 0, half.clone())?;
                            let up = next.slice(h, -1, half, o.clone())?;
                            let act = next.silu(gate)?;
                            next.mul(act, up)
                        })();
                        next.pop_scope();
                        vec![r?]
                    }
                }
                // rotary embeddings, then the flash_attention composite (whose backward is a composite)
                Op::Composite(Composite::FlashAttentionRope { scale, causal, rotary }) if !expand_all => {
                    report
                        .choices
                        .push(probabilities(&cur, &node.inputs, node.name.as_deref(), id));
                    let scope = node.name.clone().unwrap_or_else(|| "flash_attention_rope".to_string());
                    next.push_scope(scope);
                    let r = (|| -> fulgur_ir::Result<Value> {
                        let q = rope(&mut next, *rotary, ins[0], ins[3], ins[4])?;
                        let k = rope(&mut next, *rotary, ins[1], ins[3], ins[4])?;
                        next.flash_attention(q, k, ins[2], *scale, *causal)
                    })();
                    next.pop_scope();
                    vec![r?]
                }
                Op::Composite(c) if !kept(c) => {
                    let scope = node.name.clone().unwrap_or_else(|| c.name().to_string());
                    next.push_scope(scope);
                    let r = c.decompose(&mut next, &ins);
                    next.pop_scope();
                    r?
                }
                op => {
                    if matches!(op, Op::Composite(Composite::FlashAttention { .. })) && !expand_all && first {
                        report
                            .choices
                            .push(probabilities(&cur, &node.inputs, node.name.as_deref(), id));
                    }
                    let nid = next.add_node(op.clone(), &ins, node.name.clone())?;
                    (0..node.outputs.len() as u32).map(|k| Value::new(nid, k)).collect()
                }
            };
            for (k, v) in outs.into_iter().enumerate() {
                map.insert(Value::new(id, k as u32), v);
            }
        }
        for (name, v) in cur.outputs() {
            next.add_output(name.clone(), map[v])?;
        }
        cur = next;
    }
    Err(err(
        "composites still left after 16 rounds of expansion (a decomposition that uses itself?)",
    ))
}

/// The decision flash attention's backward composite always takes: its probabilities `[.., T, S]` recomputed
/// (the scores' `2·T·S·D` FLOPs per head again) rather than stored.
fn probabilities(g: &Graph, ins: &[Value], name: Option<&str>, id: NodeId) -> RecomputeChoice {
    let (q, k) = (g.dims(ins[0]).to_vec(), g.dims(ins[1]).to_vec());
    let (r, rk) = (q.len(), k.len());
    let heads = q[..r - 2].iter().fold(Dim::from(1), |a, d| a * d.clone());
    let (t, d, s) = (q[r - 2].clone(), q[r - 1].clone(), k[rk - 2].clone());
    let dt = g.dtype(ins[0]);
    RecomputeChoice {
        node: name.map(str::to_string).unwrap_or_else(|| format!("%{}", id.index())),
        value: format!("attention-probabilities {dt}[.., {t}, {s}]"),
        recomputed: true,
        bytes: heads.clone() * t.clone() * s.clone() * Dim::from(dt.size_bytes() as i64),
        flops: Dim::from(2) * heads * t * s * d,
    }
}

/// Reduces a gradient `gv` (of a value broadcast into a larger shape) to the shape of `v`, and checks it.
fn fit(g: &mut Graph, gv: Value, v: Value) -> Result<Value, PassError> {
    let target = g.dims(v).to_vec();
    let r = unbroadcast(g, gv, &target)?;
    if g.dims(r) != target.as_slice() {
        let got = g.ty(r).clone();
        return Err(PassError::Invalid {
            pass: "autodiff".into(),
            message: format!("a gradient of {got} for a value of {}", g.ty(v)),
        });
    }
    if g.dtype(r) != g.dtype(v) {
        return Ok(g.cast(r, g.dtype(v))?);
    }
    Ok(r)
}

/// Sums `x` over the axes NumPy broadcasting added or stretched to reach its shape from `target`.
fn unbroadcast(g: &mut Graph, x: Value, target: &[Dim]) -> Result<Value, PassError> {
    let dims = g.dims(x).to_vec();
    if dims.as_slice() == target {
        return Ok(x);
    }
    let (r, t) = (dims.len(), target.len());
    let mut x = x;
    if r > t {
        let lead: Vec<i64> = (0..(r - t) as i64).collect();
        x = g.sum(x, &lead, false)?;
    }
    let dims = g.dims(x).to_vec();
    let axes: Vec<i64> = (0..t.min(dims.len()))
        .filter(|&i| target[i].is_one() && !dims[i].is_one())
        .map(|i| i as i64)
        .collect();
    if !axes.is_empty() {
        x = g.sum(x, &axes, true)?;
    }
    Ok(x)
}

fn norm_axis(axis: i64, rank: usize) -> usize {
    if axis < 0 {
        (axis + rank as i64) as usize
    } else {
        axis as usize
    }
}

/// `x: [..., T, D]` with its time axis (the second last) reversed: `x[..., T − 1 − t, :]`.
fn reverse_time(g: &mut Graph, x: Value) -> Result<Value, PassError> {
    let r = g.rank(x);
    let t = g.dims(x)[r - 2].clone();
    let ones = g.full(1.0, DType::I64, vec![t])?;
    let back = g.cumsum(ones, 0, true, true)?; // T − 1 − t
    Ok(g.gather(x, back, r as i64 - 2)?)
}

/// A zero of `x`'s dtype, broadcastable anywhere.
fn zero(g: &mut Graph, like: Value) -> Result<Value, PassError> {
    Ok(g.scalar(0.0, g.dtype(like))?)
}

/// The number of elements of `dims` as a value of `dtype` (a literal when the dims are constants).
fn count(g: &mut Graph, dims: &[Dim], dtype: DType) -> Result<Value, PassError> {
    let n = dims.iter().fold(Dim::constant(1), |a, d| a * d.clone());
    match n.as_const() {
        Some(c) => Ok(g.scalar(c as f64, dtype)?),
        None => {
            let ones = g.full(1.0, dtype, dims.to_vec())?;
            let all: Vec<i64> = (0..dims.len() as i64).collect();
            Ok(g.sum(ones, &all, false)?)
        }
    }
}

/// `gy` of a reduction over `axes` (normalized) back to `x`'s shape.
fn spread(g: &mut Graph, gy: Value, x: Value, axes: &[usize], keepdims: bool) -> Result<Value, PassError> {
    let xd = g.dims(x).to_vec();
    let kept: Vec<Dim> = xd
        .iter()
        .enumerate()
        .map(|(i, d)| if axes.contains(&i) { Dim::constant(1) } else { d.clone() })
        .collect();
    let gy = if keepdims { gy } else { g.reshape(gy, kept)? };
    Ok(g.broadcast(gy, xd)?)
}

/// The vector-Jacobian products of one node: for each input slot, its gradient contribution (`None` where the
/// input carries none). `gys` holds the gradient of each output (`None`: zero).
fn vjp(
    g: &mut Graph,
    id: NodeId,
    op: &Op,
    ins: &[Value],
    gys: &[Option<Value>],
    want: &[bool],
) -> Result<Vec<Option<Value>>, PassError> {
    let y = Value::new(id, 0);
    let gy = match gys[0] {
        Some(v) => v,
        None => match op {
            // a multi-output op whose first output has no gradient
            Op::TopK { .. } => return Ok(vec![None]),
            _ => return Ok(vec![None; ins.len()]),
        },
    };
    let one = |g: &mut Graph, v: f64, like: Value| -> Result<Value, PassError> { Ok(g.scalar(v, g.dtype(like))?) };
    Ok(match op {
        Op::Unary(u) => {
            let x = ins[0];
            let gx = match u {
                UnaryOp::Neg => g.neg(gy)?,
                UnaryOp::Abs => {
                    let z = zero(g, x)?;
                    let pos = g.compare(CmpOp::Gt, x, z)?;
                    let neg = g.compare(CmpOp::Lt, x, z)?;
                    let ngy = g.neg(gy)?;
                    let t = g.select(neg, ngy, z)?;
                    g.select(pos, gy, t)?
                }
                UnaryOp::Exp => g.mul(gy, y)?,
                UnaryOp::Log => g.div(gy, x)?,
                UnaryOp::Sqrt => {
                    let h = g.div(gy, y)?;
                    g.scale(h, 0.5)?
                }
                UnaryOp::Rsqrt => {
                    // d x^-1/2 = -1/2 · x^-3/2 = -1/2 · y³
                    let y2 = g.mul(y, y)?;
                    let y3 = g.mul(y2, y)?;
                    let t = g.mul(gy, y3)?;
                    g.scale(t, -0.5)?
                }
                UnaryOp::Recip => {
                    let y2 = g.mul(y, y)?;
                    let t = g.mul(gy, y2)?;
                    g.neg(t)?
                }
                UnaryOp::Sigmoid => {
                    let o = one(g, 1.0, y)?;
                    let c = g.sub(o, y)?;
                    let d = g.mul(y, c)?;
                    g.mul(gy, d)?
                }
                UnaryOp::Silu => {
                    // silu' = s · (1 + x · (1 − s)), s = sigmoid(x)
                    let s = g.sigmoid(x)?;
                    let o = one(g, 1.0, x)?;
                    let c = g.sub(o, s)?;
                    let xc = g.mul(x, c)?;
                    let t = g.add(o, xc)?;
                    let d = g.mul(s, t)?;
                    g.mul(gy, d)?
                }
                UnaryOp::Tanh => {
                    let o = one(g, 1.0, y)?;
                    let y2 = g.mul(y, y)?;
                    let d = g.sub(o, y2)?;
                    g.mul(gy, d)?
                }
                UnaryOp::Sin => {
                    let c = g.cos(x)?;
                    g.mul(gy, c)?
                }
                UnaryOp::Cos => {
                    let s = g.sin(x)?;
                    let t = g.mul(gy, s)?;
                    g.neg(t)?
                }
            };
            vec![Some(gx)]
        }
        Op::Binary(b) => {
            let (a, c) = (ins[0], ins[1]);
            match b {
                BinaryOp::Add => vec![Some(gy), Some(gy)],
                BinaryOp::Sub => {
                    let n = if want[1] { Some(g.neg(gy)?) } else { None };
                    vec![Some(gy), n]
                }
                BinaryOp::Mul => {
                    let ga = if want[0] { Some(g.mul(gy, c)?) } else { None };
                    let gc = if want[1] { Some(g.mul(gy, a)?) } else { None };
                    vec![ga, gc]
                }
                BinaryOp::Div => {
                    let ga = if want[0] { Some(g.div(gy, c)?) } else { None };
                    let gc = if want[1] {
                        // −gy · a / c² = −gy · y / c
                        let t = g.mul(gy, y)?;
                        let t = g.div(t, c)?;
                        Some(g.neg(t)?)
                    } else {
                        None
                    };
                    vec![ga, gc]
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // the larger (smaller) operand takes the gradient; ties share it evenly
                    let wins = if *b == BinaryOp::Max { CmpOp::Gt } else { CmpOp::Lt };
                    let z = zero(g, gy)?;
                    let half = g.scale(gy, 0.5)?;
                    let tie = g.compare(CmpOp::Eq, a, c)?;
                    let mut r = Vec::new();
                    for (p, q) in [(a, c), (c, a)] {
                        let w = g.compare(wins, p, q)?;
                        let t = g.select(tie, half, z)?;
                        r.push(Some(g.select(w, gy, t)?));
                    }
                    r
                }
                BinaryOp::Pow => {
                    let ga = if want[0] {
                        // gy · c · a^(c−1), taken as 0 where c = 0 (0 · a^(−1) is NaN at a = 0; PyTorch masks it)
                        let o = one(g, 1.0, c)?;
                        let cm = g.sub(c, o)?;
                        let p = g.binary(BinaryOp::Pow, a, cm)?;
                        let t = g.mul(p, c)?;
                        let z = zero(g, c)?;
                        let c0 = g.compare(CmpOp::Eq, c, z)?;
                        let t = g.select(c0, z, t)?;
                        Some(g.mul(gy, t)?)
                    } else {
                        None
                    };
                    let gc = if want[1] {
                        // gy · y · ln a, taken as 0 where a = 0 (as PyTorch does for exponents ≥ 0)
                        let z = zero(g, a)?;
                        let l = g.log(a)?;
                        let t = g.mul(y, l)?;
                        let at0 = g.compare(CmpOp::Eq, a, z)?;
                        let t = g.select(at0, z, t)?;
                        Some(g.mul(gy, t)?)
                    } else {
                        None
                    };
                    vec![ga, gc]
                }
            }
        }
        Op::Select => {
            let cnd = ins[0];
            let z = zero(g, gy)?;
            let ga = if want[1] { Some(g.select(cnd, gy, z)?) } else { None };
            let gb = if want[2] { Some(g.select(cnd, z, gy)?) } else { None };
            vec![None, ga, gb]
        }
        Op::Cast { .. } => {
            let x = ins[0];
            vec![Some(g.cast(gy, g.dtype(x))?)]
        }
        Op::MatMul => {
            let (a, b) = (ins[0], ins[1]);
            let ga = if want[0] {
                let bt = g.transpose(b, -1, -2)?;
                Some(g.matmul(gy, bt)?)
            } else {
                None
            };
            let gb = if want[1] {
                let at = g.transpose(a, -1, -2)?;
                Some(g.matmul(at, gy)?)
            } else {
                None
            };
            vec![ga, gb]
        }
        Op::Reduce { op: r, axes, keepdims } => {
            let x = ins[0];
            let rank = g.rank(x);
            let axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, rank)).collect();
            let gx = match r {
                ReduceOp::Sum => spread(g, gy, x, &axes, *keepdims)?,
                ReduceOp::Mean => {
                    let red: Vec<Dim> = axes.iter().map(|&a| g.dims(x)[a].clone()).collect();
                    let n = count(g, &red, g.dtype(x))?;
                    let s = spread(g, gy, x, &axes, *keepdims)?;
                    g.div(s, n)?
                }
                ReduceOp::Max | ReduceOp::Min => {
                    // the extreme elements share the gradient evenly
                    let yb = spread(g, y, x, &axes, *keepdims)?;
                    let hit = g.compare(CmpOp::Eq, x, yb)?;
                    let m = g.cast(hit, g.dtype(x))?;
                    let ax: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                    let cnt = g.sum(m, &ax, true)?;
                    let gyb = spread(g, gy, x, &axes, *keepdims)?;
                    let t = g.mul(m, gyb)?;
                    g.div(t, cnt)?
                }
            };
            vec![Some(gx)]
        }
        Op::Reshape { .. } => {
            let x = ins[0];
            let d = g.dims(x).to_vec();
            vec![Some(g.reshape(gy, d)?)]
        }
        Op::Permute { perm } => {
            // a gradient that is itself this permutation's inverse applied to a value (a grouped GEMM's weight
            // gradient written in the layout of the weight it was read from, below): that value
            if let Op::Permute { perm: p2 } = &g.node(gy.node).op {
                if p2.len() == perm.len() && (0..perm.len()).all(|i| p2[perm[i]] == i) {
                    return Ok(vec![Some(g.node(gy.node).inputs[0])]);
                }
            }
            let mut inv = vec![0usize; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(g.permute(gy, &inv)?)]
        }
        Op::Broadcast { .. } => vec![Some(gy)],
        Op::Slice { axis, start, end } => {
            let x = ins[0];
            let xd = g.dims(x).to_vec();
            let a = norm_axis(*axis, xd.len());
            let dt = g.dtype(gy);
            let mut parts = Vec::new();
            let before = start.clone();
            let after = xd[a].clone() - end.clone();
            if before.as_const() != Some(0) {
                let mut d = xd.clone();
                d[a] = before;
                parts.push(g.full(0.0, dt, d)?);
            }
            parts.push(gy);
            if after.as_const() != Some(0) {
                let mut d = xd.clone();
                d[a] = after;
                parts.push(g.full(0.0, dt, d)?);
            }
            let gx = if parts.len() == 1 {
                gy
            } else {
                g.concat(&parts, a as i64)?
            };
            vec![Some(gx)]
        }
        Op::Concat { axis } => {
            let a = norm_axis(*axis, g.rank(gy));
            let mut off = Dim::constant(0);
            let mut r = Vec::new();
            for (slot, &x) in ins.iter().enumerate() {
                let len = g.dims(x)[a].clone();
                let end = off.clone() + len;
                r.push(if want[slot] {
                    Some(g.slice(gy, a as i64, off.clone(), end.clone())?)
                } else {
                    None
                });
                off = end;
            }
            r
        }
        Op::Gather { axis } => {
            let (data, idx) = (ins[0], ins[1]);
            let d = g.dims(data).to_vec();
            let z = g.full(0.0, g.dtype(data), d)?;
            vec![Some(g.scatter_add(z, idx, gy, *axis)?), None]
        }
        Op::ScatterAdd { axis } => {
            let idx = ins[1];
            let gu = if want[2] { Some(g.gather(gy, idx, *axis)?) } else { None };
            vec![Some(gy), None, gu]
        }
        Op::TopK { axis, .. } => {
            // the chosen elements take their values' gradients: Σ_k one_hot(idx_k) · gy_k
            let x = ins[0];
            let rank = g.rank(x);
            let a = norm_axis(*axis, rank);
            if a != rank - 1 {
                return Err(err(format!(
                    "`topk` along axis {axis} of a rank-{rank} value: only the last axis has a rule"
                )));
            }
            let depth = g.dims(x)[a]
                .as_const()
                .ok_or_else(|| err("`topk` over a symbolic dimension has no rule (one_hot needs its depth)"))?;
            let idx = Value::new(id, 1);
            let oh = g.one_hot(idx, depth as usize, g.dtype(x))?;
            let mut d = g.dims(gy).to_vec();
            d.push(Dim::constant(1));
            let gyc = g.reshape(gy, d)?;
            let t = g.mul(oh, gyc)?;
            vec![Some(g.sum(t, &[-2], false)?)]
        }
        Op::CumSum {
            axis,
            exclusive,
            reverse,
        } => {
            vec![Some(g.cumsum(gy, *axis, *exclusive, !*reverse)?)]
        }
        Op::Composite(Composite::Softmax { axis }) => {
            // y ⊙ (gy − Σ gy ⊙ y)
            let p = g.mul(gy, y)?;
            let s = g.sum(p, &[*axis], true)?;
            let d = g.sub(gy, s)?;
            vec![Some(g.mul(y, d)?)]
        }
        Op::Composite(Composite::LogSoftmax { axis }) => {
            // gy − softmax(x) · Σ gy
            let s = g.sum(gy, &[*axis], true)?;
            let p = g.exp(y)?;
            let t = g.mul(p, s)?;
            vec![Some(g.sub(gy, t)?)]
        }
        Op::Composite(Composite::LightningAttention { block }) => {
            // The backward is lightning attention again (the "state gradient carried backwards through the
            // blocks" is the forward scan run on reversed time):
            //   dq_t = Σ_{u≤t} e^{−λ(t−u)} (do_t·v_u) k_u  = LA(do, v, k)
            //   dk_u = Σ_{t≥u} e^{−λ(t−u)} (do_t·v_u) q_t  = rev LA(rev v, rev do, rev q)
            //   dv_u = Σ_{t≥u} e^{−λ(t−u)} (q_t·k_u) do_t  = rev LA(rev k, rev q, rev do)
            //   dλ   = −Σ_t do_t · Σ_{u≤t} (t−u) e^{−λ(t−u)} (q_t·k_u) v_u = −Σ_t do_t · (t·o_t − LA(q, k, u·v)_t)
            // (MiniMax-01's rates are constants, so a model never asks for the last)
            let (q, k, v, lam) = (ins[0], ins[1], ins[2], ins[3]);
            let la = |g: &mut Graph, a: Value, b: Value, c: Value| -> Result<Value, PassError> {
                Ok(g.op1(
                    Op::Composite(Composite::LightningAttention { block: *block }),
                    &[a, b, c, lam],
                )?)
            };
            let dq = if want[0] { Some(la(g, gy, v, k)?) } else { None };
            let (dk, dv) = if want[1] || want[2] {
                let (rq, rk, rv, rd) = (
                    reverse_time(g, q)?,
                    reverse_time(g, k)?,
                    reverse_time(g, v)?,
                    reverse_time(g, gy)?,
                );
                let dk = if want[1] {
                    let r = la(g, rv, rd, rq)?;
                    Some(reverse_time(g, r)?)
                } else {
                    None
                };
                let dv = if want[2] {
                    let r = la(g, rk, rq, rd)?;
                    Some(reverse_time(g, r)?)
                } else {
                    None
                };
                (dk, dv)
            } else {
                (None, None)
            };
            let dlam = if want[3] {
                let r = g.rank(q);
                let t = g.dims(q)[r - 2].clone();
                let pos = g.iota(g.dtype(v), vec![t, Dim::constant(1)], 0)?; // [T, 1]
                let uv = g.mul(v, pos)?;
                let shifted = la(g, q, k, uv)?;
                let to = g.mul(y, pos)?;
                let inner = g.sub(to, shifted)?;
                let prod = g.mul(gy, inner)?;
                let s = g.sum(prod, &[r as i64 - 2, r as i64 - 1], true)?;
                Some(g.neg(s)?)
            } else {
                None
            };
            vec![dq, dk, dv, dlam]
        }
        Op::Composite(Composite::FlashAttention { scale, causal }) => {
            let (dq, dk, dv) = g.flash_attention_grad(ins[0], ins[1], ins[2], gy, *scale, *causal)?;
            vec![Some(dq), Some(dk), Some(dv)]
        }
        Op::Composite(Composite::GroupedMatmul { swiglu }) => {
            let (xs, counts, w) = (ins[0], ins[1], ins[2]);
            let dh = if *swiglu {
                // y = silu(h₁) ⊙ h₂ with h = xs·w per group, recomputed (one grouped GEMM) rather than stored
                let h = g.grouped_matmul(xs, counts, w, false)?;
                let o = g.dims(h)[1].clone();
                let half = g.dims(y)[1].clone();
                let h1 = g.slice(h, -1, 0, half.clone())?;
                let h2 = g.slice(h, -1, half, o)?;
                let s = g.sigmoid(h1)?;
                let act = g.mul(h1, s)?;
                let o1 = one(g, 1.0, h1)?;
                let c = g.sub(o1, s)?;
                let hc = g.mul(h1, c)?;
                let t = g.add(o1, hc)?;
                let d = g.mul(s, t)?; // silu'(h₁)
                let gh2 = g.mul(gy, h2)?;
                let dh1 = g.mul(gh2, d)?;
                let dh2 = g.mul(gy, act)?;
                g.concat(&[dh1, dh2], -1)?
            } else {
                gy
            };
            let dxs = if want[0] {
                let wt = g.permute(w, &[0, 2, 1])?;
                Some(g.grouped_matmul(dh, counts, wt, false)?)
            } else {
                None
            };
            let dw = if !want[2] {
                None
            } else if let Op::Permute { perm } = &g.node(w.node).op {
                // an expert weight stored [E, out, in] and read transposed: its gradient computed in the stored
                // layout, wgrad(xs, dy)ᵀ = wgrad(dy, xs) per group, so that the permutation's backward is a
                // plain view of it and its readers (the cast to the f32 master weight, the optimizer) do not
                // stride across rows
                if perm.as_slice() == [0, 2, 1] {
                    let t = g.grouped_matmul_wgrad(dh, counts, xs)?;
                    Some(g.permute(t, &[0, 2, 1])?)
                } else {
                    Some(g.grouped_matmul_wgrad(xs, counts, dh)?)
                }
            } else {
                Some(g.grouped_matmul_wgrad(xs, counts, dh)?)
            };
            vec![dxs, None, dw]
        }
        // a collective's backward is the transposed collective over the same groups: a sum broadcast to the
        // group is its own transpose, a gather's is the scatter of the summed gradient and back, the exchange
        // a permutation that is its own inverse, a rotation undone by the opposite one
        Op::Composite(
            c @ (Composite::AllReduce { .. }
            | Composite::AllGather { .. }
            | Composite::ReduceScatter { .. }
            | Composite::AllToAll { .. }
            | Composite::SendRecv { .. }),
        ) => {
            let t = match c.clone() {
                Composite::AllGather { axis, mesh, over } => Composite::ReduceScatter { axis, mesh, over },
                Composite::ReduceScatter { axis, mesh, over } => Composite::AllGather { axis, mesh, over },
                Composite::SendRecv { shift, mesh, over } => Composite::SendRecv {
                    shift: -shift,
                    mesh,
                    over,
                },
                same => same,
            };
            vec![Some(g.op(Op::Composite(t), &[gy])?[0])]
        }
        // the routed exchange's two sides are each other's transposes under the same counts (no gradient)
        Op::Composite(Composite::AllToAllDispatch { mesh, over, .. }) => {
            let t = Composite::combine(mesh.clone(), *over);
            vec![Some(g.op(Op::Composite(t), &[gy, ins[1]])?[0]), None]
        }
        Op::Composite(Composite::AllToAllCombine { mesh, over, .. }) => {
            let t = Composite::dispatch(mesh.clone(), *over);
            vec![Some(g.op(Op::Composite(t), &[gy, ins[1]])?[0]), None]
        }
        Op::Composite(Composite::MoeDispatch { .. }) => {
            // x's row n went to rows pos[n, ·] of xs: its gradient sums theirs (moe_combine with unit weights)
            let pos = Value::new(id, 1);
            let pd = g.dims(pos).to_vec();
            let ones = g.full(1.0, g.dtype(gy), pd)?;
            vec![Some(g.moe_combine(gy, pos, ones)?), None]
        }
        Op::Composite(Composite::MoeCombine) => {
            // out[n] = Σ_s w[n, s] · ys[pos[n, s]]
            let (ys, pos, wts) = (ins[0], ins[1], ins[2]);
            let pd = g.dims(pos).to_vec();
            let c = g.dims(gy)[1].clone();
            let gy3 = g.reshape(gy, vec![pd[0].clone(), Dim::constant(1), c.clone()])?; // [N, 1, C]
            let dispatched = match &g.node(pos.node).op {
                Op::Composite(Composite::MoeDispatch { experts }) if pos.index == 1 => {
                    Some((*experts, g.node(pos.node).inputs[1], Value::new(pos.node, 2)))
                }
                _ => None,
            };
            let dys = if !want[0] {
                None
            } else if let Some((experts, ids, counts)) = dispatched {
                // pos is a dispatch's: every row of ys holds one (n, slot), so dys is a dispatch of dy's rows
                // times the weight of the row's slot, found as the slot whose expert is the row's group (no
                // scatter, which would walk the rows serially)
                let k = pd[1].clone();
                let disp = |g: &mut Graph, x: Value| -> Result<Value, PassError> {
                    Ok(g.op(Op::Composite(Composite::MoeDispatch { experts }), &[x, ids])?[0])
                };
                let rows = disp(g, gy)?; // [M, C]: dy of the row's token
                                         // in f32, where expert ids are exact (bf16 holds integers only up to 256)
                let dt = DType::F32;
                let idf = g.cast(ids, dt)?;
                let wf = g.cast(wts, dt)?;
                let wx = g.concat(&[wf, idf], -1)?; // [N, 2k]
                let wr = disp(g, wx)?; // [M, 2k]
                let w_rows = g.slice(wr, -1, 0, k.clone())?;
                let e_rows = g.slice(wr, -1, k.clone(), k.clone() * Dim::constant(2))?;
                let m = g.dims(ys)[0].clone();
                let group = fulgur_ir::composite::moe::row_groups(g, counts, &m)?; // [M]: the row's expert
                let group = g.cast(group, dt)?;
                let group = g.reshape(group, vec![m, Dim::constant(1)])?;
                let mine = g.compare(CmpOp::Eq, e_rows, group)?; // [M, k]
                let mine = g.cast(mine, dt)?;
                let wm = g.mul(w_rows, mine)?;
                let w_sel = g.sum(wm, &[1], true)?; // [M, 1]
                let w_sel = g.cast(w_sel, g.dtype(gy))?;
                Some(g.mul(rows, w_sel)?)
            } else {
                let w3 = g.reshape(wts, vec![pd[0].clone(), pd[1].clone(), Dim::constant(1)])?;
                let rows = g.mul(w3, gy3)?; // [N, k, C]
                let nk = pd[0].clone() * pd[1].clone();
                let rows = g.reshape(rows, vec![nk.clone(), c.clone()])?;
                let flat = g.reshape(pos, vec![nk])?;
                let m = g.dims(ys)[0].clone();
                let zeros = g.full(0.0, g.dtype(ys), vec![m, c])?;
                Some(g.scatter_add(zeros, flat, rows, 0)?)
            };
            let dw = if want[2] {
                let picked = g.gather(ys, pos, 0)?; // [N, k, C]
                let t = g.mul(picked, gy3)?;
                Some(g.sum(t, &[-1], false)?)
            } else {
                None
            };
            vec![dys, None, dw]
        }
        Op::Compare(_) | Op::OneHot { .. } | Op::Iota { .. } | Op::Full { .. } | Op::Constant { .. } => {
            vec![None; ins.len()]
        }
        Op::Input { .. } | Op::Param { .. } => Vec::new(),
        other => return Err(err(format!("no gradient rule for `{}`", other.name()))),
    })
}
