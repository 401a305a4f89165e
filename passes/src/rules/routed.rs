//! The routed MoE exchange overlapped with the expert compute by chunking a rank's sorted rows (the
//! `collectives` family's rule `routed-overlap-chunks`; `docs/parallelism.md` §4.2).
//!
//! A rank's program from the sharding pass (`passes::shard::lower_rank`) holds, for each expert-parallel MoE,
//!
//! ```text
//! xs [M, C], pos, counts [E] = moe_dispatch(x, ids)          rows sorted by expert, rows per expert
//! y [G·M, C], got [E/G] = on_rank[all_to_all_dispatch](xs, counts)
//! o = f(y, got)                                              the local experts, row by row
//! z [M, C] = on_rank[all_to_all_combine](o, counts)
//! ```
//!
//! One rule for each chunk count `c` of [`RuleConfig::a2a_chunks`] says that `z` equals `c` exchanges of
//! `M/c` rows each, concatenated:
//!
//! ```text
//! cum = cumsum(counts), cumx = cumsum[exclusive](counts)
//! for i in 0..c:  counts_i = clamp(cum − i·M/c, 0, M/c) − clamp(cumx − i·M/c, 0, M/c)
//!                 y_i, got_i = on_rank[all_to_all_dispatch](xs[i·M/c .. (i+1)·M/c], counts_i)
//!                 z_i = on_rank[all_to_all_combine](f(y_i, got_i), counts_i)
//! z = concat(z_0, …, z_{c−1})
//! ```
//!
//! Soundness: the rows of expert `e` are rows `[cumx_e, cum_e)` of `xs`; chunk `i` holds rows
//! `[i·M/c, (i+1)·M/c)`, so `counts_i[e]` is the size of the intersection, every chunk's rows are still sorted
//! by expert (a routed exchange of its own), and the combine returns each row to the place in its chunk it was
//! sent from; rows past `Σ counts` belong to no expert in any chunk and come back as zeros, as in the whole
//! exchange. `f` computes each received row alone with its expert's weights, so `f` of a chunk's rows is the
//! rows' share of `f` of all of them.
//!
//! **Which `f`** (walking from `o` down to `y`, choosing in every class the first e-node that qualifies): a DAG
//! whose values have `y`'s `G·M` rows on axis 0, of `unary`, `cast`, `binary`/`compare`/`select` (other operands
//! computed from parameters and constants only, of size 1 on axis 0 or without it), `slice`/`concat` off axis
//! 0, `rms_norm` on rows, and `grouped_matmul` with `got` as its groups and weights computed from parameters.
//! Nothing else (in particular a reduction over rows, as a weight gradient is), and `f` not empty.
//!
//! Only an exchange of a `moe_dispatch`'s counts is chunked, so a chunk is never chunked again. The exchanges
//! carry the overlap the cost model credits as `overlap_flops`: chunk `i`'s dispatch is hidden behind chunk
//! `i−1`'s experts (none for chunk 0), its combine behind chunk `i+1`'s (none for the last), each behind at
//! most half of that compute; the value is the grouped GEMMs' FLOPs on one chunk's `M/c` rows (what a rank
//! receives when the routing is balanced). The kernel order (`codegen::program::step_order`) issues every
//! chunk's dispatch before chunk 0's experts, so each transfer is in flight by the time the compute it is
//! credited with runs.

use super::{fn_rule, RuleConfig};
use crate::lang::{add_checked, add_op, class_ty, EGraph, FNode, FOp, Rewrite};
use egg::Id;
use fulgur_ir::{Composite, ConstData, Dim, Op};
use std::collections::{BTreeMap, BTreeSet};

pub(super) fn rule(cfg: &RuleConfig) -> Rewrite {
    fn_rule("routed-overlap-chunks", probe, build, cfg)
}

/// A matched routed segment.
#[derive(Clone, Debug)]
struct Seg {
    /// The dispatch's rows and counts.
    xs: Id,
    counts: Id,
    /// The dispatched rows and their counts per local expert (the leaves of `f`).
    y: Id,
    got: Option<Id>,
    /// The combine's input.
    o: Id,
    mesh: Vec<usize>,
    over: usize,
    rank: usize,
    /// The chosen row-wise e-node of every class of `f`.
    f: BTreeMap<Id, FNode>,
}

/// The exchange `op` of `n` if it is `on_rank[kind]` with nothing overlapped: (mesh, over, rank).
fn exchange(n: &FNode, dispatch: bool) -> Option<(Vec<usize>, usize, usize)> {
    let Some(Op::Composite(Composite::OnRank { op, rank })) = n.ir_op() else {
        return None;
    };
    match (&**op, dispatch) {
        (
            Op::Composite(Composite::AllToAllDispatch {
                mesh,
                over,
                overlap_flops,
            }),
            true,
        )
        | (
            Op::Composite(Composite::AllToAllCombine {
                mesh,
                over,
                overlap_flops,
            }),
            false,
        ) if overlap_flops.as_const() == Some(0) => Some((mesh.clone(), *over, *rank)),
        _ => None,
    }
}

/// Whether class `id` holds the counts of a `moe_dispatch` (its output #2).
fn moe_counts(eg: &EGraph, id: Id) -> bool {
    eg[eg.find(id)].nodes.iter().any(|n| {
        matches!(n.op, FOp::Proj(2))
            && eg[eg.find(n.children[0])]
                .nodes
                .iter()
                .any(|t| matches!(t.ir_op(), Some(Op::Composite(Composite::MoeDispatch { .. }))))
    })
}

struct Walk<'a> {
    eg: &'a EGraph,
    rows: Dim,
    counts: Id,
    mesh: Vec<usize>,
    over: usize,
    rank: usize,
    /// The dispatch found: (its rows class `y`, its input rows, its tuple class).
    leaf: Option<(Id, Id, Id)>,
    memo: BTreeMap<Id, Option<FNode>>,
    busy: BTreeSet<Id>,
}

impl Walk<'_> {
    /// Parameters and constants only, of size 1 on (or without) the rows' axis 0.
    fn free(&self, id: Id, rank: usize) -> bool {
        let id = self.eg.find(id);
        let Some(ty) = class_ty(self.eg, id) else { return false };
        self.eg[id].data.param_only && (ty.rank() < rank || ty.dims().first().is_some_and(|d| d.is_one()))
    }

    /// The dispatched rows in class `id`: the tuple class of the matching dispatch and its input rows.
    fn dispatched(&self, id: Id) -> Option<(Id, Id)> {
        self.eg[id].nodes.iter().find_map(|n| {
            if !matches!(n.op, FOp::Proj(0)) {
                return None;
            }
            let t = self.eg.find(n.children[0]);
            self.eg[t].nodes.iter().find_map(|d| {
                let (mesh, over, rank) = exchange(d, true)?;
                let same = mesh == self.mesh
                    && over == self.over
                    && rank == self.rank
                    && self.eg.find(d.children[1]) == self.counts;
                same.then(|| (t, self.eg.find(d.children[0])))
            })
        })
    }

    fn got(&self) -> Option<Id> {
        let (_, _, t) = self.leaf?;
        self.eg.lookup(FNode::proj(t, 1))
    }

    fn chain(&mut self, id: Id) -> bool {
        let id = self.eg.find(id);
        if matches!(self.leaf, Some((y, _, _)) if y == id) {
            return true;
        }
        if let Some(m) = self.memo.get(&id) {
            return m.is_some();
        }
        let Some(ty) = class_ty(self.eg, id) else { return false };
        if ty.rank() == 0 || ty.dims()[0] != self.rows || self.eg[id].data.param_only {
            return false;
        }
        if self.leaf.is_none() {
            if let Some((t, xs)) = self.dispatched(id) {
                self.leaf = Some((id, xs, t));
                return true;
            }
        }
        if self.busy.len() > 64 || !self.busy.insert(id) {
            return false;
        }
        let nodes = self.eg[id].nodes.clone();
        let chosen = nodes.into_iter().find(|n| self.rowwise(n, ty.rank()));
        self.busy.remove(&id);
        let ok = chosen.is_some();
        self.memo.insert(id, chosen);
        ok
    }

    /// Whether the e-node computes row by row from chain values and free operands.
    fn rowwise(&mut self, n: &FNode, rank: usize) -> bool {
        let Some(op) = n.ir_op() else { return false };
        let ch = &n.children;
        let off_rows = |axis: i64| {
            let a = if axis < 0 { axis + rank as i64 } else { axis };
            a > 0 && a < rank as i64
        };
        match op {
            Op::Unary(_) | Op::Cast { .. } => self.chain(ch[0]),
            Op::Binary(_) | Op::Compare(_) | Op::Select => {
                let mut any_chain = false;
                for &c in ch {
                    if self.chain(c) {
                        any_chain = true;
                    } else if !self.free(c, rank) {
                        return false;
                    }
                }
                any_chain
            }
            Op::Slice { axis, .. } => off_rows(*axis) && self.chain(ch[0]),
            Op::Concat { axis } => off_rows(*axis) && ch.iter().all(|&c| self.chain(c)),
            Op::Composite(Composite::RmsNorm { .. }) => rank > 1 && self.free(ch[1], rank) && self.chain(ch[0]),
            Op::Composite(Composite::GroupedMatmul { .. }) => {
                // the rows first: the leaf (and with it `got`) is found on the way
                self.chain(ch[0])
                    && self.got().is_some_and(|g| g == self.eg.find(ch[1]))
                    && self.eg[self.eg.find(ch[2])].data.param_only
            }
            _ => false,
        }
    }
}

fn match_seg(eg: &EGraph, n: &FNode) -> Option<Seg> {
    let (mesh, over, rank) = exchange(n, false)?;
    let o = eg.find(n.children[0]);
    let counts = eg.find(n.children[1]);
    if !moe_counts(eg, counts) {
        return None;
    }
    let ty = class_ty(eg, o)?;
    if ty.rank() == 0 {
        return None;
    }
    let mut walk = Walk {
        eg,
        rows: ty.dims()[0].clone(),
        counts,
        mesh: mesh.clone(),
        over,
        rank,
        leaf: None,
        memo: BTreeMap::new(),
        busy: BTreeSet::new(),
    };
    // `f` must not be empty: `o` is computed from the dispatched rows, not the rows themselves
    walk.busy.insert(o);
    let nodes = eg[o].nodes.clone();
    let chosen = nodes.into_iter().find(|m| walk.rowwise(m, ty.rank()))?;
    let (y, xs, _) = walk.leaf?;
    if y == o {
        return None;
    }
    let got = walk.got();
    let mut f: BTreeMap<Id, FNode> = walk.memo.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
    f.insert(o, chosen);
    Some(Seg {
        xs,
        counts,
        y,
        got,
        o,
        mesh,
        over,
        rank,
        f,
    })
}

fn probe(eg: &EGraph, _: Id, n: &FNode) -> bool {
    match_seg(eg, n).is_some()
}

/// Rebuilds `f`'s class `k` on a chunk's rows `yi` and counts `gi`; adds the grouped GEMMs' FLOPs per row to
/// `flops`.
fn rebuild(
    eg: &mut EGraph,
    s: &Seg,
    k: Id,
    (yi, gi): (Id, Option<Id>),
    done: &mut BTreeMap<Id, Id>,
    flops: &mut Dim,
) -> Option<Id> {
    let k = eg.find(k);
    if k == eg.find(s.y) {
        return Some(yi);
    }
    if s.got.is_some_and(|g| eg.find(g) == k) {
        return gi;
    }
    if let Some(&v) = done.get(&k) {
        return Some(v);
    }
    let node = s.f.get(&k)?.clone();
    let mut children = Vec::with_capacity(node.children.len());
    for &c in &node.children {
        let c = eg.find(c);
        let leaf = c == eg.find(s.y) || s.got.is_some_and(|g| eg.find(g) == c) || s.f.contains_key(&c);
        children.push(if leaf {
            rebuild(eg, s, c, (yi, gi), done, flops)?
        } else {
            c
        });
    }
    let op = node.ir_op()?.clone();
    if let Op::Composite(Composite::GroupedMatmul { .. }) = op {
        let w = class_ty(eg, children[2])?;
        *flops = flops.clone() + Dim::from(2usize) * w.dims()[1].clone() * w.dims()[2].clone();
    }
    let id = add_op(eg, op, &children)?;
    done.insert(k, id);
    Some(id)
}

/// The chunked form of `s` in `c` chunks (its class), or `None` where it does not fit.
fn chunked(eg: &mut EGraph, s: &Seg, c: usize) -> Option<Id> {
    let xt = class_ty(eg, s.xs)?;
    let ct = class_ty(eg, s.counts)?;
    let rows = xt.dims().first()?.as_const()?;
    let c64 = c as i64;
    if rows < c64 || rows % c64 != 0 || !ct.dtype.is_int() || ct.rank() != 1 {
        return None;
    }
    let m = rows / c64;
    let int = |eg: &mut EGraph, v: i64| {
        add_op(
            eg,
            Op::Constant {
                dtype: ct.dtype,
                shape: vec![],
                data: ConstData::Int(vec![v]),
            },
            &[],
        )
    };
    let cumsum = |eg: &mut EGraph, exclusive: bool| {
        add_op(
            eg,
            Op::CumSum {
                axis: 0,
                exclusive,
                reverse: false,
            },
            &[s.counts],
        )
    };
    let bin = |eg: &mut EGraph, op: fulgur_ir::BinaryOp, a: Id, b: Id| add_op(eg, Op::Binary(op), &[a, b]);
    let cum = cumsum(eg, false)?;
    let cumx = cumsum(eg, true)?;
    let (zero, width) = (int(eg, 0)?, int(eg, m)?);
    // rows of `[from, to)` (cumsums) falling in chunk i: clamp(to − i·m, 0, m) − clamp(from − i·m, 0, m)
    let clamp = |eg: &mut EGraph, v: Id, start: Id| -> Option<Id> {
        use fulgur_ir::BinaryOp::{Max, Min, Sub};
        let d = bin(eg, Sub, v, start)?;
        let d = bin(eg, Max, d, zero)?;
        bin(eg, Min, d, width)
    };
    let on_rank = |inner: Composite| {
        Op::Composite(Composite::OnRank {
            op: Box::new(Op::Composite(inner)),
            rank: s.rank,
        })
    };
    let dispatch = Composite::dispatch(s.mesh.clone(), s.over);
    let combine = Composite::combine(s.mesh.clone(), s.over);
    let with_flops = |c: &Composite, flops: Dim| c.with_overlap(|_| flops).unwrap_or_else(|| c.clone());
    let mut per_chunk: Option<Dim> = None;
    let mut outs = Vec::with_capacity(c);
    let mut parts = Vec::with_capacity(c);
    for i in 0..c as i64 {
        let start = int(eg, i * m)?;
        let hi = clamp(eg, cum, start)?;
        let lo = clamp(eg, cumx, start)?;
        let counts_i = bin(eg, fulgur_ir::BinaryOp::Sub, hi, lo)?;
        let xs_i = add_op(
            eg,
            Op::Slice {
                axis: 0,
                start: Dim::from(i * m),
                end: Dim::from((i + 1) * m),
            },
            &[s.xs],
        )?;
        parts.push((xs_i, counts_i));
    }
    // chunk 0's experts give the FLOPs every later dispatch overlaps (every chunk has as many rows)
    for (i, &(xs_i, counts_i)) in parts.iter().enumerate() {
        let flops = per_chunk.clone().unwrap_or_else(|| Dim::from(0usize));
        let overlap = if i > 0 { flops } else { Dim::from(0usize) };
        let t = add_op(eg, on_rank(with_flops(&dispatch, overlap)), &[xs_i, counts_i])?;
        let y_i = add_checked(eg, FNode::proj(t, 0))?;
        let got_i = match s.got {
            Some(_) => Some(add_checked(eg, FNode::proj(t, 1))?),
            None => None,
        };
        let mut per_row = Dim::from(0usize);
        let o_i = rebuild(eg, s, s.o, (y_i, got_i), &mut BTreeMap::new(), &mut per_row)?;
        let chunk_flops = per_row * Dim::from(m);
        per_chunk.get_or_insert(chunk_flops.clone());
        let overlap = if i + 1 < c { chunk_flops } else { Dim::from(0usize) };
        let z_i = add_op(eg, on_rank(with_flops(&combine, overlap)), &[o_i, counts_i])?;
        outs.push(z_i);
    }
    add_op(eg, Op::Concat { axis: 0 }, &outs)
}

fn build(eg: &mut EGraph, class: Id, n: &FNode, cfg: &RuleConfig) -> Vec<Id> {
    let Some(s) = match_seg(eg, n) else { return vec![] };
    let mut out = Vec::new();
    for &c in &cfg.a2a_chunks {
        if c < 2 {
            continue;
        }
        if let Some(id) = chunked(eg, &s, c) {
            if class_ty(eg, id).is_some() && class_ty(eg, id) == class_ty(eg, class) {
                out.push(id);
            }
        }
    }
    out
}
