//! Collectives: overlap an expert-parallel all-to-all with the expert compute by chunking tokens.
//!
//! Two rules: `a2a-overlap-chunks` (below) for the fixed-size `all_to_all` of a rank-simulated graph, and
//! `routed-overlap-chunks` (`rules/routed.rs`) for the routed exchange of a rank's program, the real model's.
//!
//! Graphs spanning `R` ranks carry a leading rank axis (`fulgur_ir::composite::collective`). An
//! expert-parallel MoE segment is
//!
//! ```text
//! w = all_to_all[axis=a](x)        dispatch: every rank sends each expert rank its tokens
//! y = f(w)                         the local experts' compute, row-wise along a token axis t
//! z = all_to_all[axis=a'](y)       combine: the results go back to the tokens' ranks
//! ```
//!
//! One rule, `a2a-overlap-chunks`, for each chunk count `c` in [`RuleConfig::a2a_chunks`] and each token axis
//! `t` that fits, says that `z` equals the token-chunked pipeline
//!
//! ```text
//! for i in 0..c:  w_i = collective_wait(all_to_all_start[axis=a](x_i))       x_i = chunk i of x along t
//!                 y_i = f(w_i)
//!                 z_i = collective_wait(all_to_all_start[axis=a'](y_i))
//! z = the z_i put back in place (concat along t)
//! ```
//!
//! whose chunks are independent of each other, so chunk `i+1`'s dispatch and chunk `i−1`'s combine can run on
//! the communication stream while chunk `i` computes. The starts carry the schedule as `overlap_flops`: chunk
//! `i`'s dispatch is placed alongside chunk `i−1`'s compute (none for chunk 0), chunk `i`'s combine alongside
//! chunk `i+1`'s (none for the last); the value is the matmul FLOPs of `f` on one chunk, which the cost model
//! turns into hidden communication time (`docs/passes.md`, "Collectives and overlap").
//!
//! Soundness: an all-to-all only moves data across the rank axis 0 and its exchange axis; rows along any other
//! axis travel untouched, so exchanging a chunk equals the chunk of the exchange; and `f` row-wise along `t`
//! computes each row on its own, so `f` of a chunk is the chunk of `f`. Two ways to chunk:
//! - **plain** (`t` is neither exchange axis, e.g. the capacity/token axis of `[R, R, E_local, T, C]` buffers):
//!   `x_i` is the slice `[i·n/c, (i+1)·n/c)` of axis `t`; the results are concatenated along `t`;
//! - **block** (`t` is the exchange axis of both all-to-alls, e.g. `[R, R·T, C]` buffers of per-destination
//!   blocks of `T` rows): every per-destination block is chunked alike, `x_i` holds rows `[i·T/c, (i+1)·T/c)`
//!   of each block (axis `t` viewed as `[R, T]`, sliced, viewed back), so the combine returns exactly chunk `i`'s
//!   rows, which are put back into each block. This needs `f` to treat every row of axis `t` alike (below).
//!
//! **Which `f`** (checked on the e-graph, walking from `y` down to `w` and choosing in every class the first
//! e-node that qualifies): a DAG of the ops below, every intermediate value of `x`'s rank with `w`'s size `n`
//! on axis `t`, whose other operands are *free*: computed from parameters and constants only
//! ([`ClassData::param_only`](crate::lang::ClassData), e.g. expert weights and their transposes) and of size
//! 1 on axis `t` or without it (so every row meets the same operand values):
//! - `unary`, `cast`; `binary`, `compare`, `select` (operands: chain values or free values);
//! - `matmul` with `t` a batch axis (operands chain or free), the row axis `M` (the left operand a chain value,
//!   the right one computed from parameters and constants only, of any shape: tokens times weights) or the
//!   column axis `N` (the mirror case);
//! - `slice`, `softmax`, `log_softmax`, `reduce_*[keepdims=true]` along axes other than `t`; `rms_norm` when
//!   `t` is not the last axis (its weight free); `concat` of chain values along an axis other than `t`.
//!
//! Everything else is refused, in particular `reshape`, `permute`, `broadcast`, `gather`, and `grouped_matmul`
//! (its row groups come from `counts`, so a chunk of rows would need other counts), and data operands that do
//! not come from `w` (a per-token input would have to be chunked too). `f` must not be empty, `x` and `y` must
//! have the same rank count (axis 0), and `c` must divide the chunked size exactly (`n`, or `n/R` in block
//! mode), symbolically: `4*T` splits in 2 or 4, `T` does not.

use super::{fn_rule, Family, RuleConfig};
use crate::lang::{add_op, class_ty, EGraph, FNode};
use egg::Id;
use fulgur_ir::{Composite, Dim, Op, Shape};
use std::collections::{BTreeMap, BTreeSet};

pub fn family(cfg: &RuleConfig) -> Family {
    Family {
        name: "collectives",
        rules: vec![
            fn_rule("a2a-overlap-chunks", probe_segment, build_segment, cfg),
            super::routed::rule(cfg),
        ],
    }
}

/// `axis` of a rank-`rank` tensor, negative counting from the end.
fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn dims(eg: &EGraph, id: Id) -> Option<Vec<Dim>> {
    class_ty(eg, id).map(|t| t.dims().to_vec())
}

/// A matched segment `all_to_all[a_c](f(all_to_all[a_d](x)))` with `f` row-wise along `t`.
#[derive(Clone, Debug)]
struct Segment {
    /// The dispatch's input.
    x: Id,
    /// The dispatched class (the leaf of `f`).
    w: Id,
    /// The combine's input.
    y: Id,
    dispatch_axis: usize,
    combine_axis: usize,
    /// The token axis chunked.
    t: usize,
    /// `t` is the exchange axis: chunk inside each per-destination block.
    block: bool,
    /// The chosen row-wise e-node of every class of `f` (the leaf `w` excluded).
    f: BTreeMap<Id, FNode>,
}

/// The search for a row-wise `f` along one axis `t`.
struct Walk<'a> {
    eg: &'a EGraph,
    rank: usize,
    t: usize,
    rows: Dim,
    block: bool,
    /// The dispatch found so far: (its class, its input, its axis).
    leaf: Option<(Id, Id, usize)>,
    memo: BTreeMap<Id, Option<FNode>>,
    busy: BTreeSet<Id>,
}

impl Walk<'_> {
    /// A free operand: parameters and constants only, of size 1 on (or without) the output's axis `t`.
    fn free(&self, id: Id) -> bool {
        let id = self.eg.find(id);
        let Some(ty) = class_ty(self.eg, id) else { return false };
        if !self.eg[id].data.param_only || ty.rank() > self.rank {
            return false;
        }
        let lead = self.rank - ty.rank();
        self.t < lead || ty.dims()[self.t - lead].is_one()
    }

    /// The other operand of a matmul whose rows (or columns) are the tokens: parameters and constants only.
    fn weights(&self, id: Id) -> bool {
        self.eg[self.eg.find(id)].data.param_only
    }

    /// A dispatch `all_to_all` in `id` fitting the mode: `(input, axis)`.
    fn dispatch_in(&self, id: Id) -> Option<(Id, usize)> {
        self.eg[id].nodes.iter().find_map(|n| match n.ir_op() {
            // the rule's blocks are the exchange of one group of all ranks
            Some(Op::Composite(Composite::AllToAll { axis, mesh, .. })) if mesh.is_empty() => {
                let a = norm_axis(*axis, self.rank)?;
                ((a == self.t) == self.block).then(|| (self.eg.find(n.children[0]), a))
            }
            _ => None,
        })
    }

    /// Whether `id` is a value computed row-wise from the dispatch (or is the dispatch).
    fn chain(&mut self, id: Id) -> bool {
        let id = self.eg.find(id);
        if matches!(self.leaf, Some((w, _, _)) if w == id) {
            return true;
        }
        if let Some(m) = self.memo.get(&id) {
            return m.is_some();
        }
        let Some(ty) = class_ty(self.eg, id) else { return false };
        if ty.rank() != self.rank || ty.dims()[self.t] != self.rows || self.eg[id].data.param_only {
            return false;
        }
        if self.leaf.is_none() {
            if let Some((x, a)) = self.dispatch_in(id) {
                self.leaf = Some((id, x, a));
                return true;
            }
        }
        if self.busy.len() > 64 || !self.busy.insert(id) {
            return false;
        }
        let nodes = self.eg[id].nodes.clone();
        let chosen = nodes.into_iter().find(|n| self.rowwise(n));
        self.busy.remove(&id);
        let ok = chosen.is_some();
        self.memo.insert(id, chosen);
        ok
    }

    /// Whether the e-node computes row by row along `t` from chain values and free operands.
    fn rowwise(&mut self, n: &FNode) -> bool {
        let Some(op) = n.ir_op() else { return false };
        let ch = &n.children;
        let (r, t) = (self.rank, self.t);
        let off_t = |axis: i64| norm_axis(axis, r).is_some_and(|a| a != t);
        match op {
            Op::Unary(_) | Op::Cast { .. } => self.chain(ch[0]),
            Op::Binary(_) | Op::Compare(_) | Op::Select => {
                let mut any_chain = false;
                for &c in ch {
                    if self.chain(c) {
                        any_chain = true;
                    } else if !self.free(c) {
                        return false;
                    }
                }
                any_chain
            }
            Op::MatMul => {
                if t + 2 < r {
                    match (self.chain(ch[0]), self.chain(ch[1])) {
                        (true, true) => true,
                        (true, false) => self.free(ch[1]),
                        (false, true) => self.free(ch[0]),
                        (false, false) => false,
                    }
                } else if t + 2 == r {
                    self.weights(ch[1]) && self.chain(ch[0])
                } else {
                    self.weights(ch[0]) && self.chain(ch[1])
                }
            }
            Op::Reduce {
                axes, keepdims: true, ..
            } => axes.iter().all(|&a| off_t(a)) && self.chain(ch[0]),
            Op::Slice { axis, .. } => off_t(*axis) && self.chain(ch[0]),
            Op::Composite(Composite::Softmax { axis }) | Op::Composite(Composite::LogSoftmax { axis }) => {
                off_t(*axis) && self.chain(ch[0])
            }
            Op::Composite(Composite::RmsNorm { .. }) => t + 1 < r && self.free(ch[1]) && self.chain(ch[0]),
            Op::Concat { axis } => off_t(*axis) && ch.iter().all(|&c| self.chain(c)),
            _ => false,
        }
    }
}

/// Every reading of `n` as the combine of an expert-parallel segment.
fn match_segments(eg: &EGraph, n: &FNode) -> Vec<Segment> {
    let Some(Op::Composite(Composite::AllToAll { axis, mesh, .. })) = n.ir_op() else {
        return vec![];
    };
    if !mesh.is_empty() {
        return vec![];
    }
    let y = eg.find(n.children[0]);
    let Some(ty) = class_ty(eg, y) else { return vec![] };
    let rank = ty.rank();
    let Some(combine_axis) = norm_axis(*axis, rank) else {
        return vec![];
    };
    let mut out = Vec::new();
    for t in 1..rank {
        let block = t == combine_axis;
        let mut walk = Walk {
            eg,
            rank,
            t,
            rows: ty.dims()[t].clone(),
            block,
            leaf: None,
            memo: BTreeMap::new(),
            busy: BTreeSet::new(),
        };
        // `f` must not be empty: `y` itself is computed, not the dispatch
        if walk.dispatch_in(y).is_some() && eg[y].nodes.len() == 1 {
            continue;
        }
        walk.busy.insert(y);
        let nodes = eg[y].nodes.clone();
        let chosen = nodes.into_iter().find(|m| walk.rowwise(m));
        let (Some(node), Some((w, x, dispatch_axis))) = (chosen, walk.leaf) else {
            continue;
        };
        if dims(eg, x).and_then(|d| d.first().cloned()) != Some(ty.dims()[0].clone()) || w == y {
            continue;
        }
        let mut f: BTreeMap<Id, FNode> = walk.memo.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
        f.insert(y, node);
        out.push(Segment {
            x,
            w,
            y,
            dispatch_axis,
            combine_axis,
            t,
            block,
            f,
        });
    }
    out
}

fn probe_segment(eg: &EGraph, _: Id, n: &FNode) -> bool {
    !match_segments(eg, n).is_empty()
}

/// Rebuilds `f`'s class `k` on chunk input `wi`; adds the matmul FLOPs of what it adds to `flops`.
fn rebuild(eg: &mut EGraph, s: &Segment, k: Id, wi: Id, done: &mut BTreeMap<Id, Id>, flops: &mut Dim) -> Option<Id> {
    let k = eg.find(k);
    if k == eg.find(s.w) {
        return Some(wi);
    }
    if let Some(&v) = done.get(&k) {
        return Some(v);
    }
    let node = s.f.get(&k)?.clone();
    let mut children = Vec::with_capacity(node.children.len());
    for &c in &node.children {
        let c = eg.find(c);
        let is_chain = c == eg.find(s.w) || s.f.contains_key(&c);
        children.push(if is_chain {
            rebuild(eg, s, c, wi, done, flops)?
        } else {
            c
        });
    }
    let op = node.ir_op()?.clone();
    let id = add_op(eg, op.clone(), &children)?;
    if let Op::MatMul = op {
        let out = class_ty(eg, id)?;
        let a = class_ty(eg, children[0])?;
        let k_dim = a.dims().last()?.clone();
        *flops = flops.clone() + Dim::from(2usize) * out.shape.numel() * k_dim;
    }
    done.insert(k, id);
    Some(id)
}

/// The chunked, overlappable form of segment `s` in `c` chunks (its class), or `None` where it does not fit.
fn chunked(eg: &mut EGraph, s: &Segment, c: usize) -> Option<Id> {
    let xd = dims(eg, s.x)?;
    let yd = dims(eg, s.y)?;
    let (t, ranks) = (s.t, xd[0].clone());
    let n = &xd[s.t];
    let per = if s.block { n.div_exact(&ranks)? } else { n.clone() };
    let m = per.div_exact(&Dim::from(c))?;
    let yper = if s.block {
        yd[t].div_exact(&ranks)?
    } else {
        yd[t].clone()
    };
    if yper != per {
        return None;
    }
    // `[.., R, per, ..]`: axis t viewed as per-destination blocks
    let split = |d: &[Dim], inner: Dim| -> Vec<Dim> {
        let mut v = d[..t].to_vec();
        v.push(ranks.clone());
        v.push(inner);
        v.extend_from_slice(&d[t + 1..]);
        v
    };
    let with_t = |d: &[Dim], size: Dim| -> Vec<Dim> {
        let mut v = d.to_vec();
        v[t] = size;
        v
    };
    let reshape = |eg: &mut EGraph, id: Id, d: Vec<Dim>| add_op(eg, Op::Reshape { shape: Shape(d) }, &[id]);
    let xr = if s.block {
        reshape(eg, s.x, split(&xd, per.clone()))?
    } else {
        s.x
    };
    let slice_axis = if s.block { t + 1 } else { t };
    let chunk_in = |eg: &mut EGraph, i: usize| -> Option<Id> {
        let start = m.clone() * Dim::from(i);
        let end = m.clone() * Dim::from(i + 1);
        let xi = add_op(
            eg,
            Op::Slice {
                axis: slice_axis as i64,
                start,
                end,
            },
            &[xr],
        )?;
        if s.block {
            reshape(eg, xi, with_t(&xd, ranks.clone() * m.clone()))
        } else {
            Some(xi)
        }
    };
    let start = |eg: &mut EGraph, axis: usize, overlap: &Dim, v: Id| -> Option<Id> {
        let h = add_op(
            eg,
            Op::Composite(Composite::AllToAllStart {
                axis: axis as i64,
                overlap_flops: overlap.clone(),
                mesh: vec![],
                over: 0,
            }),
            &[v],
        )?;
        add_op(eg, Op::Composite(Composite::CollectiveWait), &[h])
    };
    let zero = Dim::from(0usize);
    // chunk 0 first: its compute's FLOPs are every chunk's
    let x0 = chunk_in(eg, 0)?;
    let w0 = start(eg, s.dispatch_axis, &zero, x0)?;
    let mut flops = zero.clone();
    let y0 = rebuild(eg, s, s.y, w0, &mut BTreeMap::new(), &mut flops)?;
    let mut outs = Vec::with_capacity(c);
    for i in 0..c {
        let yi = if i == 0 {
            y0
        } else {
            let xi = chunk_in(eg, i)?;
            let wi = start(eg, s.dispatch_axis, &flops, xi)?;
            rebuild(eg, s, s.y, wi, &mut BTreeMap::new(), &mut zero.clone())?
        };
        let overlap = if i + 1 < c { &flops } else { &zero };
        let zi = start(eg, s.combine_axis, overlap, yi)?;
        outs.push(if s.block {
            reshape(eg, zi, split(&yd, m.clone()))?
        } else {
            zi
        });
    }
    let cat = add_op(
        eg,
        Op::Concat {
            axis: slice_axis as i64,
        },
        &outs,
    )?;
    if s.block {
        reshape(eg, cat, yd)
    } else {
        Some(cat)
    }
}

fn build_segment(eg: &mut EGraph, class: Id, n: &FNode, cfg: &RuleConfig) -> Vec<Id> {
    let mut out = Vec::new();
    for s in match_segments(eg, n) {
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
    }
    out
}
