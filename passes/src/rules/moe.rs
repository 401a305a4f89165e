//! MoE: recognise the definitional (dense) mixture of experts and offer the routed form.
//!
//! The definitional MoE (`models::minimax`, `MINIMAX.md` §3) runs every expert on every token and multiplies
//! by dense combine weights that are zero for the experts a token did not pick:
//!
//! ```text
//! p          = softmax(logits)                                  [N, E]
//! (w, idx)   = topk[k](p);  w = w / sum(w)                       [N, k]
//! cw         = sum_k(one_hot[E](idx) · reshape(w, [N, k, 1]))    [N, E]
//! hup        = x · w13t                                          [E, N, 2I]   (x [N, C], w13t [E, C, 2I])
//! act        = silu(hup[..., :I]) ⊙ hup[..., I:]                 [E, N, I]
//! y          = act · w2t                                         [E, N, C]    (w2t [E, I, C])
//! out        = sum_e(y · reshape(cwᵀ, [E, N, 1]))                [N, C]
//! ```
//!
//! Two rules, both shape-generic (any `N`, `E`, `k`, `C`, `I`; every shape is checked with the analysis and
//! anything that does not fit is refused):
//! - `moe-router`: `softmax → topk → renormalise` is `moe_router[k]`; its projections join the renormalised
//!   weights and the indices.
//! - `moe-dense-to-grouped`: the dense combine above (matched by walking the e-graph down from the final
//!   `reduce_sum`) is `moe_combine(grouped_matmul[swiglu=false](grouped_matmul[swiglu=true](xs, counts, w13t),
//!   counts, w2t), pos, w)` with `(xs, pos, counts) = moe_dispatch[E](x, idx)`. Equality needs every index in
//!   `[0, E)` (the dense form ignores others, dispatch refuses them), so `idx` must come from a `topk` over an
//!   axis of size `E` or from `moe_router` over `E` logits. Repeated indices are fine: both forms add the two
//!   weights of one expert. The forward built with the gate and up halves apart (`split_gate_up`, for
//!   expert-tensor parallelism: `silu(x · gateᵀ) ⊙ (x · upᵀ)`, each `[E, C, I]`) becomes
//!   `silu(grouped_matmul(xs, counts, gateᵀ)) ⊙ grouped_matmul(xs, counts, upᵀ)` in place of the fused
//!   `grouped_matmul[swiglu=true]`.
//!
//! The routed form is joined to the dense output's class; the extractor picks by cost.

use super::{fn_rule, Family, RuleConfig};
use crate::lang::{add_checked, add_op, class_ops, class_ty, EGraph, FNode, FOp};
use egg::Id;
use fulgur_ir::{BinaryOp, Composite, DType, Dim, Op, ReduceOp, UnaryOp};
use std::collections::BTreeSet;

pub fn family(cfg: &RuleConfig) -> Family {
    Family {
        name: "moe",
        rules: vec![
            fn_rule("moe-router", probe_router, build_router, cfg),
            fn_rule("moe-dense-to-grouped", probe_dense, build_dense, cfg),
        ],
    }
}

/// `axis` of a rank-`rank` tensor, negative counting from the end.
fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Whether `axes` are exactly `want` (normalised, in any order).
fn axes_are(axes: &[i64], rank: usize, want: &[usize]) -> bool {
    let got: Option<BTreeSet<usize>> = axes.iter().map(|&a| norm_axis(a, rank)).collect();
    got.is_some_and(|g| g.len() == axes.len() && g == want.iter().copied().collect())
}

fn dims(eg: &EGraph, id: Id) -> Option<Vec<Dim>> {
    class_ty(eg, id).map(|t| t.dims().to_vec())
}

fn dtype(eg: &EGraph, id: Id) -> Option<DType> {
    class_ty(eg, id).map(|t| t.dtype)
}

/// The tuple classes `t` with a node `proj#i(t)` in class `id`.
fn tuples_projected(eg: &EGraph, id: Id, i: u32) -> Vec<Id> {
    eg[id]
        .nodes
        .iter()
        .filter(|n| n.op == FOp::Proj(i))
        .map(|n| eg.find(n.children[0]))
        .collect()
}

/// Two orders of a binary node's operands.
fn both_orders(ch: &[Id]) -> [(Id, Id); 2] {
    [(ch[0], ch[1]), (ch[1], ch[0])]
}

// ------------------------------------------------------------------------------------------------------------
// Router

/// A matched `div(w, sum(w))` with `(w, idx) = topk[k](softmax(logits))`, all over the last axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Router {
    logits: Id,
    topk: Id,
    k: usize,
}

fn match_router(eg: &EGraph, class: Id, n: &FNode) -> Vec<Router> {
    let mut out = BTreeSet::new();
    if !matches!(n.ir_op(), Some(Op::Binary(BinaryOp::Div))) || n.children.len() != 2 {
        return vec![];
    }
    let (w, s) = (eg.find(n.children[0]), n.children[1]);
    let (Some(tw), Some(tout)) = (class_ty(eg, w), class_ty(eg, class)) else {
        return vec![];
    };
    let r = tw.rank();
    if r == 0 || !tw.dtype.is_float() || tout != tw {
        return vec![];
    }
    // the denominator: sum(w) over the last axis, kept
    let sums_w = class_ops(eg, s).any(|(o, ch)| {
        matches!(o, Op::Reduce { op: ReduceOp::Sum, axes, keepdims: true } if axes_are(axes, r, &[r - 1]))
            && eg.find(ch[0]) == w
    });
    if !sums_w {
        return vec![];
    }
    for t in tuples_projected(eg, w, 0) {
        for (o, ch) in class_ops(eg, t) {
            let Op::TopK { k, axis } = o else { continue };
            let p = ch[0];
            let Some(tp) = class_ty(eg, p) else { continue };
            if tp.rank() != r || norm_axis(*axis, r) != Some(r - 1) || tp.dtype != tw.dtype {
                continue;
            }
            for (o2, ch2) in class_ops(eg, p) {
                if let Op::Composite(Composite::Softmax { axis }) = o2 {
                    if norm_axis(*axis, r) == Some(r - 1) && class_ty(eg, ch2[0]).as_ref() == Some(&tp) {
                        out.insert(Router {
                            logits: eg.find(ch2[0]),
                            topk: t,
                            k: *k,
                        });
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

fn probe_router(eg: &EGraph, class: Id, n: &FNode) -> bool {
    !match_router(eg, class, n).is_empty()
}

fn build_router(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let mut out = Vec::new();
    for m in match_router(eg, class, n) {
        let Some(r) = add_op(eg, Op::Composite(Composite::MoeRouter { k: m.k }), &[m.logits]) else {
            continue;
        };
        let (Some(w), Some(idx)) = (add_checked(eg, FNode::proj(r, 0)), add_checked(eg, FNode::proj(r, 1))) else {
            continue;
        };
        let Some(old_idx) = add_checked(eg, FNode::proj(m.topk, 1)) else {
            continue;
        };
        if class_ty(eg, w) != class_ty(eg, class) || class_ty(eg, idx) != class_ty(eg, old_idx) {
            continue;
        }
        eg.union_trusted(old_idx, idx, "moe-router");
        out.push(w);
    }
    out
}

// ------------------------------------------------------------------------------------------------------------
// Dense combine of every expert's SwiGLU → dispatch, grouped matmuls, combine

/// A matched dense MoE: its tokens, routing, and expert weights (already in `[E, C, 2I]` / `[E, I, C]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DenseMoe {
    x: Id,
    idx: Id,
    w: Id,
    up: UpProjection,
    w2t: Id,
    experts: usize,
}

/// The experts' gate and up projections: one fused `[E, C, 2I]` weight, or (the forward built with
/// `split_gate_up`, for expert-tensor parallelism) two `[E, C, I]` weights multiplied separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum UpProjection {
    Fused(Id),
    Split { gate: Id, up: Id },
}

/// Whether every value of the integer class `idx` is in `[0, e)`: it is the index output of a `topk` over an
/// axis of size `e`, or the experts of a `moe_router` over `e` logits.
fn indices_below(eg: &EGraph, idx: Id, e: &Dim) -> bool {
    tuples_projected(eg, idx, 1).into_iter().any(|t| {
        class_ops(eg, t).any(|(o, ch)| {
            let Some(tin) = class_ty(eg, ch[0]) else { return false };
            match o {
                Op::TopK { axis, .. } => norm_axis(*axis, tin.rank()).is_some_and(|a| &tin.dims()[a] == e),
                Op::Composite(Composite::MoeRouter { .. }) => tin.dims().last() == Some(e),
                _ => false,
            }
        })
    })
}

/// Classes `cw: [N, E]` such that `cw3 = reshape(cwᵀ, [E, N, 1])` (or `permute(reshape(cw, [N, E, 1]))`).
fn transposed_weights(eg: &EGraph, cw3: Id, e: &Dim, n: &Dim) -> Vec<Id> {
    let ne = Some(vec![n.clone(), e.clone()]);
    let mut out = Vec::new();
    for (o, ch) in class_ops(eg, cw3) {
        match o {
            Op::Reshape { .. } if dims(eg, ch[0]) == Some(vec![e.clone(), n.clone()]) => {
                for (o2, ch2) in class_ops(eg, ch[0]) {
                    if matches!(o2, Op::Permute { perm } if perm == &[1, 0]) && dims(eg, ch2[0]) == ne {
                        out.push(eg.find(ch2[0]));
                    }
                }
            }
            Op::Permute { perm } if perm == &[1, 0, 2] => {
                if dims(eg, ch[0]) != Some(vec![n.clone(), e.clone(), Dim::from(1)]) {
                    continue;
                }
                for (o2, ch2) in class_ops(eg, ch[0]) {
                    if matches!(o2, Op::Reshape { .. }) && dims(eg, ch2[0]) == ne {
                        out.push(eg.find(ch2[0]));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// `(idx, w)` with `cw = sum_k(one_hot[E](idx) · reshape(w, [N, k, 1]))` (over axis 1), `cw: [N, E]`, `w` of
/// dtype `dt`, and `idx` known to lie in `[0, E)`.
fn dense_weights(eg: &EGraph, cw: Id, e: &Dim, n: &Dim, dt: DType) -> Vec<(Id, Id)> {
    let mut out = Vec::new();
    for (o, ch) in class_ops(eg, cw) {
        let Op::Reduce {
            op: ReduceOp::Sum,
            axes,
            keepdims: false,
        } = o
        else {
            continue;
        };
        let m = ch[0];
        let Some(dm) = dims(eg, m) else { continue };
        if dm.len() != 3 || !axes_are(axes, 3, &[1]) || &dm[0] != n || &dm[2] != e {
            continue;
        }
        let nk = vec![n.clone(), dm[1].clone()];
        let nk1 = Some(vec![n.clone(), dm[1].clone(), Dim::from(1)]);
        for (o2, ch2) in class_ops(eg, m) {
            if !matches!(o2, Op::Binary(BinaryOp::Mul)) {
                continue;
            }
            for (oh, w3) in both_orders(ch2) {
                if dims(eg, oh).as_ref() != Some(&dm) || dims(eg, w3) != nk1 {
                    continue;
                }
                for (o3, ch3) in class_ops(eg, oh) {
                    let Op::OneHot { depth, dtype: odt } = o3 else { continue };
                    let idx = eg.find(ch3[0]);
                    let Some(ti) = class_ty(eg, idx) else { continue };
                    if Dim::from(*depth) != *e
                        || *odt != dt
                        || !ti.dtype.is_int()
                        || ti.dims() != nk.as_slice()
                        || !indices_below(eg, idx, e)
                    {
                        continue;
                    }
                    for (o4, ch4) in class_ops(eg, w3) {
                        if !matches!(o4, Op::Reshape { .. }) {
                            continue;
                        }
                        let w = eg.find(ch4[0]);
                        if dims(eg, w).as_ref() == Some(&nk) && dtype(eg, w) == Some(dt) {
                            out.push((idx, w));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `(x, w13t, w2t)` with `y = (silu(hup[.., :I]) ⊙ hup[.., I:]) · w2t`, `hup = x · w13t`, `y: [E, N, C]`.
fn swiglu_experts(eg: &EGraph, y: Id, e: &Dim, n: &Dim, c: &Dim, dt: DType) -> Vec<(Id, UpProjection, Id)> {
    let mut out = Vec::new();
    for (o, ch) in class_ops(eg, y) {
        if !matches!(o, Op::MatMul) {
            continue;
        }
        let (act, w2t) = (ch[0], eg.find(ch[1]));
        let (Some(da), Some(dw2)) = (dims(eg, act), dims(eg, w2t)) else {
            continue;
        };
        if da.len() != 3 || &da[0] != e || &da[1] != n || dw2 != vec![e.clone(), da[2].clone(), c.clone()] {
            continue;
        }
        if dtype(eg, act) != Some(dt) || dtype(eg, w2t) != Some(dt) {
            continue;
        }
        let i = da[2].clone();
        let o_dim = i.clone() * Dim::from(2);
        for (o2, ch2) in class_ops(eg, act) {
            if !matches!(o2, Op::Binary(BinaryOp::Mul)) {
                continue;
            }
            for (s, u) in both_orders(ch2) {
                if dims(eg, s).as_ref() != Some(&da) || dims(eg, u).as_ref() != Some(&da) {
                    continue;
                }
                // the halves of one `hup`: gate = [0, I), up = [I, 2I) of the last axis
                let ups: Vec<Id> = class_ops(eg, u)
                    .filter_map(|(o3, ch3)| match o3 {
                        Op::Slice { axis, start, end }
                            if norm_axis(*axis, 3) == Some(2) && start == &i && end == &o_dim =>
                        {
                            Some(eg.find(ch3[0]))
                        }
                        _ => None,
                    })
                    .collect();
                // the split form: silu(x · gate) ⊙ (x · up), each weight [E, C, I]
                let products = |class: Id| -> Vec<(Id, Id)> {
                    class_ops(eg, class)
                        .filter(|(o, _)| matches!(o, Op::MatMul))
                        .map(|(_, ch)| (eg.find(ch[0]), eg.find(ch[1])))
                        .filter(|&(x, w)| {
                            dims(eg, x) == Some(vec![n.clone(), c.clone()])
                                && dims(eg, w) == Some(vec![e.clone(), c.clone(), i.clone()])
                                && dtype(eg, x) == Some(dt)
                                && dtype(eg, w) == Some(dt)
                        })
                        .collect()
                };
                let up_products = products(u);
                for (o3, ch3) in class_ops(eg, s) {
                    if !matches!(o3, Op::Unary(UnaryOp::Silu)) {
                        continue;
                    }
                    for (x, gate) in products(ch3[0]) {
                        for &(xu, up) in &up_products {
                            if xu == x {
                                out.push((x, UpProjection::Split { gate, up }, w2t));
                            }
                        }
                    }
                    for (o4, ch4) in class_ops(eg, ch3[0]) {
                        let Op::Slice { axis, start, end } = o4 else { continue };
                        let hup = eg.find(ch4[0]);
                        if norm_axis(*axis, 3) != Some(2)
                            || start.as_const() != Some(0)
                            || end != &i
                            || !ups.contains(&hup)
                            || dims(eg, hup) != Some(vec![e.clone(), n.clone(), o_dim.clone()])
                        {
                            continue;
                        }
                        for (o5, ch5) in class_ops(eg, hup) {
                            if !matches!(o5, Op::MatMul) {
                                continue;
                            }
                            let (x, w13t) = (eg.find(ch5[0]), eg.find(ch5[1]));
                            if dims(eg, x) == Some(vec![n.clone(), c.clone()])
                                && dims(eg, w13t) == Some(vec![e.clone(), c.clone(), o_dim.clone()])
                                && dtype(eg, x) == Some(dt)
                                && dtype(eg, w13t) == Some(dt)
                            {
                                out.push((x, UpProjection::Fused(w13t), w2t));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Every reading of `n` (a `reduce_sum` over axis 0 of `[E, N, C]`) as the definitional dense MoE.
fn match_dense(eg: &EGraph, class: Id, n: &FNode) -> Vec<DenseMoe> {
    let Some(Op::Reduce {
        op: ReduceOp::Sum,
        axes,
        keepdims: false,
    }) = n.ir_op()
    else {
        return vec![];
    };
    let y3 = n.children[0];
    let Some(t3) = class_ty(eg, y3) else { return vec![] };
    if t3.rank() != 3 || !axes_are(axes, 3, &[0]) || !t3.dtype.is_float() {
        return vec![];
    }
    let (e, tokens, c) = (&t3.dims()[0], &t3.dims()[1], &t3.dims()[2]);
    let Some(experts) = e.as_const().filter(|&x| x >= 1) else {
        return vec![];
    };
    if dims(eg, class) != Some(vec![tokens.clone(), c.clone()]) {
        return vec![];
    }
    let dt = t3.dtype;
    let mut out = BTreeSet::new();
    for (o, ch) in class_ops(eg, y3) {
        if !matches!(o, Op::Binary(BinaryOp::Mul)) {
            continue;
        }
        for (y, cw3) in both_orders(ch) {
            if dims(eg, y).as_ref() != Some(&t3.dims().to_vec())
                || dims(eg, cw3) != Some(vec![e.clone(), tokens.clone(), Dim::from(1)])
                || dtype(eg, cw3) != Some(dt)
            {
                continue;
            }
            let routes: Vec<(Id, Id)> = transposed_weights(eg, cw3, e, tokens)
                .into_iter()
                .flat_map(|cw| dense_weights(eg, cw, e, tokens, dt))
                .collect();
            if routes.is_empty() {
                continue;
            }
            for (x, up, w2t) in swiglu_experts(eg, y, e, tokens, c, dt) {
                for &(idx, w) in &routes {
                    out.insert(DenseMoe {
                        x,
                        idx,
                        w,
                        up,
                        w2t,
                        experts: experts as usize,
                    });
                }
            }
        }
    }
    out.into_iter().collect()
}

fn probe_dense(eg: &EGraph, class: Id, n: &FNode) -> bool {
    !match_dense(eg, class, n).is_empty()
}

fn build_dense(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let mut out = Vec::new();
    for m in match_dense(eg, class, n) {
        let routed = (|| {
            let d = add_op(
                eg,
                Op::Composite(Composite::MoeDispatch { experts: m.experts }),
                &[m.x, m.idx],
            )?;
            let xs = add_checked(eg, FNode::proj(d, 0))?;
            let pos = add_checked(eg, FNode::proj(d, 1))?;
            let counts = add_checked(eg, FNode::proj(d, 2))?;
            let h = match m.up {
                UpProjection::Fused(w13t) => add_op(
                    eg,
                    Op::Composite(Composite::GroupedMatmul { swiglu: true }),
                    &[xs, counts, w13t],
                )?,
                UpProjection::Split { gate, up } => {
                    let g = add_op(
                        eg,
                        Op::Composite(Composite::GroupedMatmul { swiglu: false }),
                        &[xs, counts, gate],
                    )?;
                    let u = add_op(
                        eg,
                        Op::Composite(Composite::GroupedMatmul { swiglu: false }),
                        &[xs, counts, up],
                    )?;
                    let a = add_op(eg, Op::Unary(UnaryOp::Silu), &[g])?;
                    add_op(eg, Op::Binary(BinaryOp::Mul), &[a, u])?
                }
            };
            let ys = add_op(
                eg,
                Op::Composite(Composite::GroupedMatmul { swiglu: false }),
                &[h, counts, m.w2t],
            )?;
            add_op(eg, Op::Composite(Composite::MoeCombine), &[ys, pos, m.w])
        })();
        if let Some(r) = routed {
            if class_ty(eg, r).is_some() && class_ty(eg, r) == class_ty(eg, class) {
                out.push(r);
            }
        }
    }
    out
}
