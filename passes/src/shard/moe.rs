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
        if let (Some(&lo), Some(&hi)) = (group_axes.first(), group_axes.last()) {
            if (lo..=hi).any(|k| !group_axes.contains(&k) && sizes[k] > 1) {
                return Ok(None);
            }
        }
        // the tokens: split over the experts' axes, whole over the width's (every slice of an expert sees them
        // all), their other dim-0 splits kept, everything else whole
        let mut tokens = Sharding::replicated(self.mesh);
        for k in 0..sizes.len() {
            if group_axes.contains(&k) || (!width_axes.contains(&k) && x.sh.per_axis[k] == Placement::Split(0)) {
                tokens.per_axis[k] = Placement::Split(0);
            }
        }
        let tokens = self.normal(tokens);
        if self.local(&tokens, &x.dims).is_err() {
            return Ok(None);
        }
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
        let ys = if group_axes.is_empty() {
            experts_on(self, xs, counts)?
        } else {
            let (lo, hi) = (group_axes[0], group_axes[group_axes.len() - 1]);
            let mesh = vec![
                sizes[..lo].iter().product(),
                sizes[lo..=hi].iter().product(),
                sizes[hi + 1..].iter().product(),
            ];
            let exchanged = self.emit(
                Op::Composite(Composite::AllToAllDispatch {
                    mesh: mesh.clone(),
                    over: 1,
                }),
                &[xs, counts],
            )?;
            let ye = experts_on(self, exchanged[0], exchanged[1])?;
            self.emit(
                Op::Composite(Composite::AllToAllCombine { mesh, over: 1 }),
                &[ye, counts],
            )?[0]
        };
        let v = self.emit(per_rank(Composite::MoeCombine), &[ys, pos, wr.v])?[0];
        // a slice of every expert's width gives a part of the output: a partial sum over the width's axes
        let mut sh = tokens;
        for &k in &width_axes {
            sh.per_axis[k] = Placement::Partial;
        }
        Ok(Some(Sv {
            v,
            ranked: true,
            sh,
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
