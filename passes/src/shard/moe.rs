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
//! rank runs the chain on its own tokens.

use super::{Pass, Sv};
use crate::shard::{Placement, Sharding};
use crate::PassError;
use fulgur_ir::{Composite, Graph, NodeId, Op, Value};
use std::collections::{HashMap, HashSet};

/// A routed MoE chain of the source graph, by its nodes.
#[derive(Clone, Copy, Debug)]
pub(super) struct MoeChain {
    pub dispatch: NodeId,
    pub up: NodeId,
    pub down: NodeId,
    pub combine: NodeId,
}

impl MoeChain {
    pub fn members(&self) -> [NodeId; 3] {
        [self.dispatch, self.up, self.down]
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
    let mut found = HashMap::new();
    for (id, n) in g.nodes() {
        if !matches!(n.op, Op::Composite(Composite::MoeCombine)) {
            continue;
        }
        let (ys, pos) = (n.inputs[0], n.inputs[1]);
        if ys.index != 0 || !matches!(op_of(ys), Op::Composite(Composite::GroupedMatmul { swiglu: false })) {
            continue;
        }
        let down = ys.node;
        let (h, counts) = (g.node(down).inputs[0], g.node(down).inputs[1]);
        if h.index != 0 || !matches!(op_of(h), Op::Composite(Composite::GroupedMatmul { swiglu: true })) {
            continue;
        }
        let up = h.node;
        let (xs, counts_up) = (g.node(up).inputs[0], g.node(up).inputs[1]);
        let dispatch = xs.node;
        if !matches!(op_of(xs), Op::Composite(Composite::MoeDispatch { .. }))
            || xs.index != 0
            || counts != Value::new(dispatch, 2)
            || counts_up != counts
            || pos != Value::new(dispatch, 1)
        {
            continue;
        }
        if only(xs, &[(up, 0)])
            && only(pos, &[(id, 1)])
            && only(counts, &[(up, 1), (down, 1)])
            && only(h, &[(down, 0)])
            && only(ys, &[(id, 0)])
        {
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
        [x, ids, w_up, w_down, weights]: [&Sv; 5],
        out_dims: &[fulgur_ir::Dim],
    ) -> Result<Option<Sv>, PassError> {
        let sizes = self.mesh.sizes();
        let w_up_sh = self.normal(w_up.sh.clone());
        let w_down_sh = self.normal(w_down.sh.clone());
        if w_up_sh != w_down_sh {
            return Ok(None);
        }
        // the experts' axes: dim 0 split; any other placement of an expert weight does not fit
        let mut group_axes = Vec::new();
        for (k, p) in w_up_sh.per_axis.iter().enumerate() {
            match p {
                Placement::Split(0) => group_axes.push(k),
                Placement::Replicated => {}
                _ => return Ok(None),
            }
        }
        if let (Some(&lo), Some(&hi)) = (group_axes.first(), group_axes.last()) {
            if (lo..=hi).any(|k| !group_axes.contains(&k) && sizes[k] > 1) {
                return Ok(None);
            }
        }
        // the tokens: split over the experts' axes, their other dim-0 splits kept, everything else whole
        let mut tokens = Sharding::replicated(self.mesh);
        for k in 0..sizes.len() {
            if group_axes.contains(&k) || x.sh.per_axis[k] == Placement::Split(0) {
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
        let up = self.ranked(w_up)?;
        let down = self.ranked(w_down)?;
        let per_rank = |op: Composite| {
            Op::Composite(Composite::PerRank {
                op: Box::new(Op::Composite(op)),
            })
        };
        let d = self.emit(per_rank(Composite::MoeDispatch { experts }), &[xr.v, ir.v])?;
        let (xs, pos, counts) = (d[0], d[1], d[2]);
        let ys = if group_axes.is_empty() {
            let h = self.emit(per_rank(Composite::GroupedMatmul { swiglu: true }), &[xs, counts, up.v])?[0];
            self.emit(
                per_rank(Composite::GroupedMatmul { swiglu: false }),
                &[h, counts, down.v],
            )?[0]
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
            let (xe, got) = (exchanged[0], exchanged[1]);
            let h = self.emit(per_rank(Composite::GroupedMatmul { swiglu: true }), &[xe, got, up.v])?[0];
            let ye = self.emit(per_rank(Composite::GroupedMatmul { swiglu: false }), &[h, got, down.v])?[0];
            self.emit(
                Op::Composite(Composite::AllToAllCombine { mesh, over: 1 }),
                &[ye, counts],
            )?[0]
        };
        let v = self.emit(per_rank(Composite::MoeCombine), &[ys, pos, wr.v])?[0];
        Ok(Some(Sv {
            v,
            ranked: true,
            sh: tokens,
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
