//! The sharding rule of the routed MoE (`docs/parallelism.md`, §4.2 "The routed exchange"): the composites'
//! chain `moe_dispatch → grouped_matmul[swiglu] → grouped_matmul → moe_combine`, rewritten as a whole.
//!
//! Each rank sorts its own tokens' slots by expert (`moe_dispatch` on its rows: a local sort, not a sharding
//! of the global sorted rows, which is why the chain is one rule), `all_to_all_dispatch` sends each expert's
//! rows to the group member holding it, the members run their experts on what they received (`grouped_matmul`
//! with the received counts; the receive buffer's padding rows belong to no group and stay zero), and
//! `all_to_all_combine` returns every row to the rank and place it came from, where `moe_combine` weighs them.
//! Exact: every token meets the same expert weights as on one device, and only routed rows move.
//!
//! The group is the mesh axes the experts are split over (dim 0 of both expert weights): one axis, or several
//! adjacent in the mesh (axes of degree 1 between them do not count), merged into one group axis of the
//! exchange's own mesh. The tokens are split over those axes (a replicated token axis is split locally, no
//! communication), so each member brings its own tokens. With the experts replicated there is no exchange: each
//! rank runs the chain on its own tokens. Expert-tensor parallelism (the gate and up projections apart, each
//! split on its output width over some axes and the down projection on its input width over the same): the
//! tokens stay whole over those axes, every width slice runs the same exchange within its own group, and the
//! output is a partial sum over them, reduced where the next op needs it.

use super::{Pass, Sv};
use crate::shard::{Placement, Sharding};
use crate::PassError;
use fulgur_ir::{Composite, Graph, NodeId, Op, Value};
use std::collections::{HashMap, HashSet};

/// A routed MoE chain of the source graph, by its nodes.
#[derive(Clone, Debug)]
pub(super) struct MoeChain {
    pub dispatch: NodeId,
    pub up: ChainUp,
    pub down: NodeId,
    pub combine: NodeId,
}

/// The chain's gate and up projections: one `grouped_matmul[swiglu]` on the fused weight, or (the forward
/// built with the halves apart, for expert-tensor parallelism) two `grouped_matmul`s, `silu` and a product.
#[derive(Clone, Copy, Debug)]
pub(super) enum ChainUp {
    Fused(NodeId),
    Split {
        gate: NodeId,
        up: NodeId,
        silu: NodeId,
        mul: NodeId,
    },
}

/// The expert weights of a chain, sharded.
pub(super) enum UpWeights<'a> {
    Fused(&'a Sv),
    Split { gate: &'a Sv, up: &'a Sv },
}

impl MoeChain {
    /// The nodes before the combine, in order.
    pub fn members(&self) -> Vec<NodeId> {
        let mut v = vec![self.dispatch];
        match self.up {
            ChainUp::Fused(n) => v.push(n),
            ChainUp::Split { gate, up, silu, mul } => v.extend([gate, up, silu, mul]),
        }
        v.push(self.down);
        v
    }
}

/// The chains of `g` whose intermediate values nothing else reads (a training graph's backward reads them:
/// its chains are not rewritten as a whole), by their `moe_combine` node.
pub(super) fn chains(g: &Graph) -> HashMap<NodeId, MoeChain> {
    let outputs: HashSet<Value> = g.outputs().iter().map(|(_, v)| *v).collect();
    let op_of = |v: Value| &g.node(v.node).op;
    // every use of `v` is one of `allowed` (node, input slot), and `v` is no output
    let only = |v: Value, allowed: &[(NodeId, u32)]| {
        !outputs.contains(&v)
            && g.users(v.node)
                .into_iter()
                .filter(|&(_, _, out)| out == v.index)
                .all(|(user, slot, _)| allowed.contains(&(user, slot)))
    };
    let grouped = |v: Value, swiglu: bool| {
        v.index == 0 && matches!(op_of(v), Op::Composite(Composite::GroupedMatmul { swiglu: s }) if *s == swiglu)
    };
    let mut found = HashMap::new();
    for (id, n) in g.nodes() {
        if !matches!(n.op, Op::Composite(Composite::MoeCombine)) {
            continue;
        }
        let (ys, pos) = (n.inputs[0], n.inputs[1]);
        if !grouped(ys, false) {
            continue;
        }
        let down = ys.node;
        let (h, counts) = (g.node(down).inputs[0], g.node(down).inputs[1]);
        let dispatch = pos.node;
        if pos.index != 1 || !matches!(op_of(pos), Op::Composite(Composite::MoeDispatch { .. })) {
            continue;
        }
        let xs = Value::new(dispatch, 0);
        if counts != Value::new(dispatch, 2) || !only(h, &[(down, 0)]) || !only(ys, &[(id, 0)]) {
            continue;
        }
        let up = if grouped(h, true) {
            let ins = &g.node(h.node).inputs;
            if ins[0] != xs || ins[1] != counts || !only(xs, &[(h.node, 0)]) || !only(counts, &[(h.node, 1), (down, 1)])
            {
                continue;
            }
            ChainUp::Fused(h.node)
        } else if h.index == 0 && matches!(op_of(h), Op::Binary(fulgur_ir::BinaryOp::Mul)) {
            // silu(xs · gate) ⊙ (xs · up), in either order
            let mul = h.node;
            let m = &g.node(mul).inputs;
            let split = [(m[0], m[1], 0u32, 1u32), (m[1], m[0], 1, 0)]
                .into_iter()
                .find_map(|(a, u, sa, su)| {
                    let silu = a.node;
                    let act = a.index == 0 && matches!(op_of(a), Op::Unary(fulgur_ir::UnaryOp::Silu));
                    let gv = if act { g.node(silu).inputs[0] } else { return None };
                    let fits = |v: Value| {
                        grouped(v, false) && g.node(v.node).inputs[0] == xs && g.node(v.node).inputs[1] == counts
                    };
                    (fits(gv)
                        && fits(u)
                        && gv.node != u.node
                        && only(a, &[(mul, sa)])
                        && only(gv, &[(silu, 0)])
                        && only(u, &[(mul, su)]))
                    .then_some(ChainUp::Split {
                        gate: gv.node,
                        up: u.node,
                        silu,
                        mul,
                    })
                });
            let Some(split @ ChainUp::Split { gate, up, .. }) = split else {
                continue;
            };
            if !only(xs, &[(gate, 0), (up, 0)]) || !only(counts, &[(gate, 1), (up, 1), (down, 1)]) {
                continue;
            }
            split
        } else {
            continue;
        };
        if !only(pos, &[(id, 1)]) {
            continue;
        }
        found.insert(
            id,
            MoeChain {
                dispatch,
                up,
                down,
                combine: id,
            },
        );
    }
    found
}

impl Pass<'_> {
    /// The chain rewritten as the routed exchange, given the sharded values of the dispatch's tokens and
    /// expert ids, the two expert weights and the combine weights; `None` where the placements do not fit it
    /// (expert weights split on another dim or over axes not adjacent in the mesh, tokens that do not divide):
    /// the chain's ops then take their own rules.
    pub(super) fn routed_moe(
        &mut self,
        experts: usize,
        [x, ids, weights]: [&Sv; 3],
        up: UpWeights,
        w_down: &Sv,
        out_dims: &[fulgur_ir::Dim],
    ) -> Result<Option<Sv>, PassError> {
        let sizes = self.mesh.sizes();
        let down_sh = self.normal(w_down.sh.clone());
        let ups: Vec<Sharding> = match &up {
            UpWeights::Fused(w) => vec![self.normal(w.sh.clone())],
            UpWeights::Split { gate, up } => vec![self.normal(gate.sh.clone()), self.normal(up.sh.clone())],
        };
        // the experts' axes (dim 0 of every expert weight split) and, the halves apart, the width's (the gate
        // and up projections split on their output dim, the down projection on its input dim): anything else
        // does not fit
        let (mut group_axes, mut width_axes) = (Vec::new(), Vec::new());
        for k in 0..sizes.len() {
            let at: Vec<&Placement> = ups.iter().map(|s| &s.per_axis[k]).collect();
            let d = &down_sh.per_axis[k];
            if at.iter().all(|p| **p == Placement::Split(0)) && *d == Placement::Split(0) {
                group_axes.push(k);
            } else if ups.len() == 2 && at.iter().all(|p| **p == Placement::Split(2)) && *d == Placement::Split(1) {
                width_axes.push(k);
            } else if !(at.iter().all(|p| **p == Placement::Replicated) && *d == Placement::Replicated) {
                return Ok(None);
            }
        }
        if !experts_adjacent(&sizes, &group_axes) {
            return Ok(None);
        }
        let Some(tokens) = self.routed_tokens(x, &group_axes, &width_axes) else {
            return Ok(None);
        };
        let xr = self.to(x, &tokens)?;
        let xr = self.ranked(&xr)?;
        let ir = self.to(ids, &tokens)?;
        let ir = self.ranked(&ir)?;
        let wr = self.to(weights, &tokens)?;
        let wr = self.ranked(&wr)?;
        let up = match up {
            UpWeights::Fused(w) => vec![self.ranked(w)?.v],
            UpWeights::Split { gate, up } => vec![self.ranked(gate)?.v, self.ranked(up)?.v],
        };
        let down = self.ranked(w_down)?;
        let per_rank = |op: Composite| {
            Op::Composite(Composite::PerRank {
                op: Box::new(Op::Composite(op)),
            })
        };
        let d = self.emit(per_rank(Composite::MoeDispatch { experts }), &[xr.v, ir.v])?;
        let (xs, pos, counts) = (d[0], d[1], d[2]);
        // the experts on rows `rows` grouped by `groups`
        let experts_on = |p: &mut Self, rows: Value, groups: Value| -> Result<Value, PassError> {
            let h = if let [w13] = up[..] {
                p.emit(
                    per_rank(Composite::GroupedMatmul { swiglu: true }),
                    &[rows, groups, w13],
                )?[0]
            } else {
                let g = p.emit(
                    per_rank(Composite::GroupedMatmul { swiglu: false }),
                    &[rows, groups, up[0]],
                )?[0];
                let u = p.emit(
                    per_rank(Composite::GroupedMatmul { swiglu: false }),
                    &[rows, groups, up[1]],
                )?[0];
                let a = p.out.silu(g)?;
                p.out.mul(a, u)?
            };
            Ok(p.emit(
                per_rank(Composite::GroupedMatmul { swiglu: false }),
                &[h, groups, down.v],
            )?[0])
        };
        let ys = if let Some(mesh) = exchange_mesh(&sizes, &group_axes) {
            let exchanged = self.emit(Op::Composite(Composite::dispatch(mesh.clone(), 1)), &[xs, counts])?;
            let ye = experts_on(self, exchanged[0], exchanged[1])?;
            self.emit(Op::Composite(Composite::combine(mesh, 1)), &[ye, counts])?[0]
        } else {
            experts_on(self, xs, counts)?
        };
        let v = self.emit(per_rank(Composite::MoeCombine), &[ys, pos, wr.v])?[0];
        // a slice of every expert's width gives a part of the output: a partial sum over the width's axes
        Ok(Some(Sv {
            v,
            ranked: true,
            sh: width_partial(tokens, &width_axes),
            dims: out_dims.to_vec(),
        }))
    }

    /// A MoE composite outside a routed chain (a training graph's, or one whose placements do not fit the
    /// exchange): its operands made whole and the op run on every rank alike. Correct for any placement, and
    /// the experts' work repeated on every rank: the plans that meet it are priced so.
    pub(super) fn moe_whole(
        &mut self,
        op: &Op,
        ins: &[Sv],
        out_dims: &[Vec<fulgur_ir::Dim>],
    ) -> Result<Vec<Sv>, PassError> {
        let rep = self.rep();
        let whole: Vec<Sv> = ins.iter().map(|s| self.to(s, &rep)).collect::<Result<_, _>>()?;
        if whole.iter().all(|s| !s.ranked) {
            let vals: Vec<Value> = whole.iter().map(|s| s.v).collect();
            let vs = self.emit(op.clone(), &vals)?;
            return Ok(vs.iter().zip(out_dims).map(|(&v, d)| self.unranked(v, d)).collect());
        }
        let ranked: Vec<Value> = whole
            .iter()
            .map(|s| self.ranked(s).map(|r| r.v))
            .collect::<Result<_, _>>()?;
        let vs = self.emit(
            Op::Composite(Composite::PerRank {
                op: Box::new(op.clone()),
            }),
            &ranked,
        )?;
        Ok(vs
            .iter()
            .zip(out_dims)
            .map(|(&v, d)| Sv {
                v,
                ranked: true,
                sh: rep.clone(),
                dims: d.clone(),
            })
            .collect())
    }
}

/// A routed chain of a training step, as its forward was written: what its backward reads.
pub(super) struct RoutedTrain {
    /// The tokens' sharding (the dispatch's tokens, the combine's weights, the output's cotangent).
    tokens: Sharding,
    /// The output's sharding and the tokens' and combine weights' cotangents': the tokens', a partial sum over
    /// the width's axes (expert-tensor parallelism).
    partial: Sharding,
    x: Value,
    ids: Value,
    weights: Value,
    counts: Value,
    recv: Value,
    got: Value,
    ys: Value,
    /// The exchange's mesh `[before, group, after]` (none: the experts replicated, no exchange).
    mesh: Option<Vec<usize>>,
    /// The expert weights the members read: the source value, its sharded value with the rank axis.
    exts: Vec<(Value, Sv)>,
}

/// Whether the experts' axes are adjacent in the mesh (axes of size 1 between them do not count): the routed
/// exchange runs over one group of consecutive axes.
fn experts_adjacent(sizes: &[usize], group_axes: &[usize]) -> bool {
    match (group_axes.first(), group_axes.last()) {
        (Some(&lo), Some(&hi)) => (lo..=hi).all(|k| group_axes.contains(&k) || sizes[k] <= 1),
        _ => true,
    }
}

/// The routed exchange's mesh `[before, group, after]` (the axes before the experts', the experts', those
/// after, each a product), or `None` where no axis splits the experts.
fn exchange_mesh(sizes: &[usize], group_axes: &[usize]) -> Option<Vec<usize>> {
    let (&lo, &hi) = (group_axes.first()?, group_axes.last()?);
    Some(vec![
        sizes[..lo].iter().product(),
        sizes[lo..=hi].iter().product(),
        sizes[hi + 1..].iter().product(),
    ])
}

/// `tokens` with the width's axes a partial sum: what a slice of every expert's width gives.
fn width_partial(mut tokens: Sharding, width_axes: &[usize]) -> Sharding {
    for &k in width_axes {
        tokens.per_axis[k] = Placement::Partial;
    }
    tokens
}

impl Pass<'_> {
    /// The tokens' placement for the routed exchange: split over the experts' axes, whole over the width's
    /// (every slice of an expert sees them all), the other dim-0 splits of `x` kept, everything else whole;
    /// `None` where the tokens do not divide.
    fn routed_tokens(&self, x: &Sv, group_axes: &[usize], width_axes: &[usize]) -> Option<Sharding> {
        let mut tokens = Sharding::replicated(self.mesh);
        for k in 0..self.mesh.sizes().len() {
            if group_axes.contains(&k) || (!width_axes.contains(&k) && x.sh.per_axis[k] == Placement::Split(0)) {
                tokens.per_axis[k] = Placement::Split(0);
            }
        }
        let tokens = self.normal(tokens);
        self.local(&tokens, &x.dims).is_ok().then_some(tokens)
    }
}

/// The ops a chain member of a training step may be for the routed rule: row-wise on the rows, which the
/// exchange moves (an op along the row axis, or with a shape, would see other rows on every rank).
fn row_wise(op: &Op, rank: usize) -> bool {
    match op {
        Op::Composite(Composite::GroupedMatmul { .. }) => true,
        Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } => true,
        Op::Slice { axis, .. } => {
            let a = if *axis < 0 { *axis + rank as i64 } else { *axis };
            a > 0
        }
        _ => false,
    }
}

impl Pass<'_> {
    /// The forward of a training step's MoE chain `rec` rewritten as the routed exchange (as [`Self::routed_moe`],
    /// with every member written per rank on the received rows): the combine's output and what the backward
    /// reads; `None` where it does not fit (expert weights split other than on dim 0 or over axes not adjacent,
    /// tokens the group does not divide, a member that is not row-wise, an operand from outside the chain that
    /// is not an expert weight). With expert-tensor parallelism (the chain's split form, each expert's width
    /// over some axes) every width slice runs the exchange within its group and the output is a partial sum over
    /// those axes, as in [`Self::routed_moe`].
    pub(super) fn routed_train_forward(
        &mut self,
        g: &Graph,
        rec: &crate::autodiff::MoeChainGrad,
        vals: &HashMap<Value, Sv>,
    ) -> Result<Option<(Sv, RoutedTrain)>, PassError> {
        let Op::Composite(Composite::MoeDispatch { experts }) = g.node(rec.dispatch).op else {
            return Ok(None);
        };
        let sv = |p: &Self, v: Value| {
            let s = &vals[&v];
            p.reduced.get(&s.v).unwrap_or(s).clone()
        };
        let d_ins = g.node(rec.dispatch).inputs.clone();
        let c_node = g.node(rec.combine);
        let (x, ids, weights) = (sv(self, d_ins[0]), sv(self, d_ins[1]), sv(self, c_node.inputs[2]));
        // the members: row-wise; their operands from outside the chain, expert weights
        let inside = |v: Value| v.node == rec.dispatch || rec.members.contains(&v.node);
        let mut ext_src: Vec<Value> = Vec::new();
        for &m in &rec.members {
            let n = g.node(m);
            let rank = n.inputs.first().map(|v| g.rank(*v)).unwrap_or(0);
            if !row_wise(&n.op, rank) {
                return Ok(None);
            }
            for &v in &n.inputs {
                if inside(v) {
                    if v.node == rec.dispatch && v.index == 1 {
                        return Ok(None);
                    }
                    continue;
                }
                let dims = g.dims(v);
                if dims.len() != 3 || dims[0].as_const() != Some(experts as i64) {
                    return Ok(None);
                }
                if !ext_src.contains(&v) {
                    ext_src.push(v);
                }
            }
        }
        // the experts' axes: dim 0 of every expert weight split alike; the width's (expert-tensor parallelism,
        // the gate and up projections apart): the down projection's weight split on its input dim and the
        // others on their output dim, the members those grouped GEMMs, `silu` and the product; nothing else
        let down_w = g.node(c_node.inputs[0].node).inputs.get(2).copied();
        let split_form = rec.members.len() == 5
            && rec.members.iter().all(|&m| {
                matches!(
                    g.node(m).op,
                    Op::Composite(Composite::GroupedMatmul { swiglu: false })
                        | Op::Unary(fulgur_ir::UnaryOp::Silu)
                        | Op::Binary(fulgur_ir::BinaryOp::Mul)
                )
            });
        let sizes = self.mesh.sizes();
        let (mut group_axes, mut width_axes) = (Vec::new(), Vec::new());
        for k in 0..sizes.len() {
            let at: Vec<(Value, Placement)> = ext_src
                .iter()
                .map(|&v| (v, self.normal(sv(self, v).sh).per_axis[k].clone()))
                .collect();
            let width = split_form
                && ext_src.len() == 3
                && at.iter().all(|(v, p)| {
                    *p == if Some(*v) == down_w {
                        Placement::Split(1)
                    } else {
                        Placement::Split(2)
                    }
                });
            if !at.is_empty() && at.iter().all(|(_, p)| *p == Placement::Split(0)) {
                group_axes.push(k);
            } else if width {
                width_axes.push(k);
            } else if !at.iter().all(|(_, p)| *p == Placement::Replicated) {
                return Ok(None);
            }
        }
        if !experts_adjacent(&sizes, &group_axes) {
            return Ok(None);
        }
        let Some(tokens) = self.routed_tokens(&x, &group_axes, &width_axes) else {
            return Ok(None);
        };
        // a slice of every expert's width gives a part of what the chain gives: a partial sum over the width's
        // axes (the output, and the tokens' and combine weights' cotangents)
        let partial = width_partial(tokens.clone(), &width_axes);
        let xr = self.to(&x, &tokens)?;
        let xr = self.ranked(&xr)?.v;
        let ir = self.to(&ids, &tokens)?;
        let ir = self.ranked(&ir)?.v;
        let wr = self.to(&weights, &tokens)?;
        let wr = self.ranked(&wr)?.v;
        let mut exts = Vec::new();
        for &v in &ext_src {
            let s = sv(self, v);
            let r = self.ranked(&s)?;
            exts.push((v, r));
        }
        let per_rank = |op: Op| Op::Composite(Composite::PerRank { op: Box::new(op) });
        let dispatched = self.emit(per_rank(g.node(rec.dispatch).op.clone()), &[xr, ir])?;
        let (xs, pos, counts) = (dispatched[0], dispatched[1], dispatched[2]);
        let mesh = exchange_mesh(&sizes, &group_axes);
        let (recv, got) = match &mesh {
            Some(mesh) => {
                let e = self.emit(Op::Composite(Composite::dispatch(mesh.clone(), 1)), &[xs, counts])?;
                (e[0], e[1])
            }
            None => (xs, counts),
        };
        // the members on the received rows, per rank
        let mut local: HashMap<Value, Value> = HashMap::new();
        for &m in &rec.members {
            let n = g.node(m);
            let ins: Vec<Value> = n
                .inputs
                .iter()
                .map(|v| {
                    if v.node == rec.dispatch {
                        if v.index == 0 {
                            recv
                        } else {
                            got
                        }
                    } else if let Some(&l) = local.get(v) {
                        l
                    } else {
                        exts.iter().find(|(s, _)| s == v).expect("an expert weight").1.v
                    }
                })
                .collect();
            let outs = self.emit(per_rank(n.op.clone()), &ins)?;
            for (k, o) in outs.into_iter().enumerate() {
                local.insert(Value::new(m, k as u32), o);
            }
        }
        let ye = local[&c_node.inputs[0]];
        let ys = match &mesh {
            Some(mesh) => self.emit(Op::Composite(Composite::combine(mesh.clone(), 1)), &[ye, counts])?[0],
            None => ye,
        };
        let v = self.emit(per_rank(Op::Composite(Composite::MoeCombine)), &[ys, pos, wr])?[0];
        let out = Sv {
            v,
            ranked: true,
            sh: partial.clone(),
            dims: c_node.outputs[0].shape.0.clone(),
        };
        Ok(Some((
            out,
            RoutedTrain {
                tokens,
                partial,
                x: xr,
                ids: ir,
                weights: wr,
                counts,
                recv,
                got,
                ys,
                mesh,
                exts,
            },
        )))
    }

    /// The backward of a routed training chain `rec` (its forward written by [`Self::routed_train_forward`] as
    /// `st`), from the cotangent of the combine's output: the vector-Jacobian products of the three per-rank
    /// parts (the combine, the experts on the received rows, the dispatch), each the autodiff of that part on
    /// one rank's shapes written per rank, joined by the exchanges transposed (the combine's cotangent goes out
    /// as a dispatch, the rows' come back as a combine). Returns each contribution of `rec` as a sharded value:
    /// the tokens' and the combine weights' as the tokens are placed, an expert weight's split as the weight is
    /// and a partial sum over the axes that split the tokens and not the experts.
    pub(super) fn routed_train_backward(
        &mut self,
        g: &Graph,
        rec: &crate::autodiff::MoeChainGrad,
        st: &RoutedTrain,
        vals: &HashMap<Value, Sv>,
    ) -> Result<Vec<(Value, Sv)>, PassError> {
        use crate::autodiff::{differentiate, GradOptions, Recompute, GRAD_PREFIX};
        let gy = {
            let s = &vals[&rec.cotangent];
            self.reduced.get(&s.v).unwrap_or(s).clone()
        };
        let gy = self.to(&gy, &st.tokens)?;
        let gy = self.ranked(&gy)?.v;
        let dispatch_op = g.node(rec.dispatch).op.clone();
        let grad = |piece: &Graph, wrt: &[&str], recompute: Recompute| {
            differentiate(
                piece,
                "loss",
                &GradOptions {
                    inputs: wrt.iter().map(|s| s.to_string()).collect(),
                    recompute,
                    ..Default::default()
                },
            )
        };
        // ⟨out, gy⟩: the loss whose gradient is the vector-Jacobian product with `gy`
        let dot = |l: &mut Graph, out: Value, gy: Value| -> Result<(), PassError> {
            let m = l.mul(out, gy)?;
            let all: Vec<i64> = (0..l.rank(m) as i64).collect();
            let s = l.sum(m, &all, false)?;
            l.add_output("loss", s)?;
            Ok(())
        };
        // the combine: its rows' and weights' cotangents (the dispatch beside it gives the positions)
        let mut l1 = Graph::new("routed_combine");
        let x = self.local_input(&mut l1, "x", st.x)?;
        let ids = self.local_input(&mut l1, "ids", st.ids)?;
        let ys = self.local_input(&mut l1, "ys", st.ys)?;
        let wts = self.local_input(&mut l1, "wts", st.weights)?;
        let gyl = self.local_input(&mut l1, "gy", gy)?;
        let d = l1.op(dispatch_op.clone(), &[x, ids])?;
        let o = l1.op(Op::Composite(Composite::MoeCombine), &[ys, d[1], wts])?[0];
        dot(&mut l1, o, gyl)?;
        let g1 = grad(&l1, &["ys", "wts"], Recompute::Store)?;
        let r1 = self.vmap(
            &g1,
            &HashMap::from([
                ("x", st.x),
                ("ids", st.ids),
                ("ys", st.ys),
                ("wts", st.weights),
                ("gy", gy),
            ]),
        )?;
        let dys = r1[&format!("{GRAD_PREFIX}ys")];
        let dwts = r1[&format!("{GRAD_PREFIX}wts")];
        let dye = match &st.mesh {
            Some(mesh) => self.emit(Op::Composite(Composite::dispatch(mesh.clone(), 1)), &[dys, st.counts])?[0],
            None => dys,
        };
        // the experts on the received rows
        let mut l2 = Graph::new("routed_experts");
        let xs = self.local_input(&mut l2, "xs", st.recv)?;
        let counts = self.local_input(&mut l2, "counts", st.got)?;
        let mut names: Vec<String> = Vec::new();
        let mut ext_in: HashMap<Value, Value> = HashMap::new();
        for (i, (src, s)) in st.exts.iter().enumerate() {
            let name = format!("w{i}");
            ext_in.insert(*src, self.local_input(&mut l2, &name, s.v)?);
            names.push(name);
        }
        let gye = self.local_input(&mut l2, "gy", dye)?;
        let mut local: HashMap<Value, Value> = HashMap::new();
        let mut fused = false;
        for &m in &rec.members {
            let n = g.node(m);
            fused |= matches!(n.op, Op::Composite(Composite::GroupedMatmul { swiglu: true }));
            let ins: Vec<Value> = n
                .inputs
                .iter()
                .map(|v| {
                    if v.node == rec.dispatch {
                        if v.index == 0 {
                            xs
                        } else {
                            counts
                        }
                    } else {
                        local.get(v).or_else(|| ext_in.get(v)).copied().expect("a chain value")
                    }
                })
                .collect();
            let outs = l2.op(n.op.clone(), &ins)?;
            for (k, o) in outs.into_iter().enumerate() {
                local.insert(Value::new(m, k as u32), o);
            }
        }
        dot(&mut l2, local[&g.node(rec.combine).inputs[0]], gye)?;
        let mut wrt: Vec<&str> = vec!["xs"];
        wrt.extend(names.iter().map(|s| s.as_str()));
        // a fused swiglu stays fused and its pre-activation recomputed, as the step chose; else it is stored
        let g2 = grad(&l2, &wrt, if fused { Recompute::All } else { Recompute::Store })?;
        let mut feed: HashMap<&str, Value> = HashMap::from([("xs", st.recv), ("counts", st.got), ("gy", dye)]);
        for (name, (_, s)) in names.iter().zip(&st.exts) {
            feed.insert(name.as_str(), s.v);
        }
        let r2 = self.vmap(&g2, &feed)?;
        let drecv = r2[&format!("{GRAD_PREFIX}xs")];
        let dxs = match &st.mesh {
            Some(mesh) => self.emit(Op::Composite(Composite::combine(mesh.clone(), 1)), &[drecv, st.counts])?[0],
            None => drecv,
        };
        // the dispatch: the tokens' cotangent
        let mut l3 = Graph::new("routed_dispatch");
        let x = self.local_input(&mut l3, "x", st.x)?;
        let ids = self.local_input(&mut l3, "ids", st.ids)?;
        let gxs = self.local_input(&mut l3, "gxs", dxs)?;
        let d = l3.op(dispatch_op, &[x, ids])?;
        dot(&mut l3, d[0], gxs)?;
        let g3 = grad(&l3, &["x"], Recompute::Store)?;
        let r3 = self.vmap(&g3, &HashMap::from([("x", st.x), ("ids", st.ids), ("gxs", dxs)]))?;
        let dx = r3[&format!("{GRAD_PREFIX}x")];
        // the contributions, placed
        let d_ins = &g.node(rec.dispatch).inputs;
        let c_ins = &g.node(rec.combine).inputs;
        let mut out = Vec::new();
        for &(v, c) in &rec.contributions {
            let dims = g.dims(c).to_vec();
            let sv = if v == d_ins[0] {
                Sv {
                    v: dx,
                    ranked: true,
                    sh: st.partial.clone(),
                    dims,
                }
            } else if v == c_ins[2] {
                Sv {
                    v: dwts,
                    ranked: true,
                    sh: st.partial.clone(),
                    dims,
                }
            } else if let Some(i) = st.exts.iter().position(|(s, _)| *s == v) {
                let (_, w) = &st.exts[i];
                let mut sh = w.sh.clone();
                for (k, p) in sh.per_axis.iter_mut().enumerate() {
                    if *p == Placement::Replicated && st.tokens.per_axis[k] == Placement::Split(0) {
                        *p = Placement::Partial;
                    }
                }
                Sv {
                    v: r2[&format!("{GRAD_PREFIX}{}", names[i])],
                    ranked: true,
                    sh: self.normal(sh),
                    dims,
                }
            } else {
                return Err(PassError::Rule(format!(
                    "sharding `{}`: the MoE chain's backward contributes to a value outside it that the routed rule \
                     does not know (%{})",
                    self.at,
                    v.node.index()
                )));
            };
            if self.out.dtype(sv.v) != g.dtype(c) {
                return Err(PassError::Rule(format!(
                    "sharding `{}`: the routed backward's contribution to %{} is {}, the step's {}",
                    self.at,
                    v.node.index(),
                    self.out.dtype(sv.v),
                    g.dtype(c)
                )));
            }
            // the value a contribution permutes, which the step may read too
            if let (Op::Permute { perm }, [x]) = (&g.node(c.node).op, g.node(c.node).inputs.as_slice()) {
                let mut inverse = vec![0; perm.len()];
                for (i, &q) in perm.iter().enumerate() {
                    inverse[q] = i;
                }
                let pre = self.permuted(&sv, &inverse, g.dims(*x))?;
                out.push((*x, pre));
            }
            out.push((c, sv));
        }
        Ok(out)
    }

    /// An input `name` of the one-rank graph `l` typed as one rank's slice of the ranked value `v`.
    fn local_input(&self, l: &mut Graph, name: &str, v: Value) -> Result<Value, PassError> {
        let t = self.out.ty(v);
        Ok(l.input(name, t.dtype, t.dims()[1..].to_vec())?)
    }

    /// One-rank graph `local` written for every rank: its inputs the ranked values `inputs` (by name), each op
    /// `per_rank` on ranked operands (those computed from none, such as constants, written once and broadcast
    /// where a ranked op reads them). Returns its outputs, ranked, by name.
    fn vmap(&mut self, local: &Graph, inputs: &HashMap<&str, Value>) -> Result<HashMap<String, Value>, PassError> {
        let mut map: HashMap<Value, (Value, bool)> = HashMap::new();
        for (id, n) in local.nodes() {
            if let Op::Input { name, .. } = &n.op {
                let v = *inputs.get(name.as_str()).ok_or_else(|| {
                    PassError::Rule(format!(
                        "sharding `{}`: no value for the per-rank input `{name}`",
                        self.at
                    ))
                })?;
                map.insert(Value::new(id, 0), (v, true));
                continue;
            }
            let ins: Vec<(Value, bool)> = n.inputs.iter().map(|v| map[v]).collect();
            let outs = if ins.iter().any(|(_, r)| *r) {
                let mut ranked = Vec::new();
                for (v, r) in ins {
                    ranked.push(if r { v } else { self.lift_unranked(v)? });
                }
                let op = Op::Composite(Composite::PerRank {
                    op: Box::new(n.op.clone()),
                });
                self.emit(op, &ranked)?
                    .into_iter()
                    .map(|v| (v, true))
                    .collect::<Vec<_>>()
            } else {
                let plain: Vec<Value> = ins.iter().map(|(v, _)| *v).collect();
                self.emit(n.op.clone(), &plain)?
                    .into_iter()
                    .map(|v| (v, false))
                    .collect()
            };
            for (k, o) in outs.into_iter().enumerate() {
                map.insert(Value::new(id, k as u32), o);
            }
        }
        let mut out = HashMap::new();
        for (name, v) in local.outputs() {
            let (v, r) = map[v];
            out.insert(name.clone(), if r { v } else { self.lift_unranked(v)? });
        }
        Ok(out)
    }

    /// An unranked value of the output graph broadcast to every rank.
    fn lift_unranked(&mut self, v: Value) -> Result<Value, PassError> {
        let dims = self.out.dims(v).to_vec();
        let s = self.unranked(v, &dims);
        Ok(self.ranked(&s)?.v)
    }
}
