//! Algebra: layout canonicalisation (permute/reshape/broadcast folding), scalar folding, cast elimination,
//! matmul re-association, a batched matmul summed over its batch as one matmul, a one-hot as a comparison. No
//! global commutativity or associativity on tensors: every rule here shrinks or
//! reorders a fixed local pattern, so saturation stays small.

use super::{fn_rule, Family, RuleConfig};
use crate::lang::{add_op, class_ops, class_ty, EGraph, FNode};
use egg::Id;
use fulgur_ir::{BinaryOp, Op};

pub fn family(cfg: &RuleConfig) -> Family {
    Family {
        name: "algebra",
        rules: vec![
            fn_rule("permute-permute", probe_permute_permute, build_permute_permute, cfg),
            fn_rule("reshape-reshape", probe_reshape_reshape, build_reshape_reshape, cfg),
            fn_rule("identity-layout", probe_identity_layout, build_identity_layout, cfg),
            fn_rule("cast-noop", probe_cast_noop, build_cast_noop, cfg),
            fn_rule("mul-one", probe_neutral, build_neutral, cfg),
            fn_rule("scale-scale", probe_scale_scale, build_scale_scale, cfg),
            fn_rule("matmul-reassoc", probe_matmul_reassoc, build_matmul_reassoc, cfg),
            fn_rule("batch-sum-matmul", probe_batch_sum_matmul, build_batch_sum_matmul, cfg),
            fn_rule("one-hot-compare", probe_one_hot, build_one_hot, cfg),
        ],
    }
}

fn op(n: &FNode) -> Option<&Op> {
    n.ir_op()
}

/// `permute[p2](permute[p1](x))` = `permute[p1∘p2](x)`, or `x` when that is the identity.
fn probe_permute_permute(eg: &EGraph, _: Id, n: &FNode) -> bool {
    matches!(op(n), Some(Op::Permute { .. }))
        && class_ops(eg, n.children[0]).any(|(o, _)| matches!(o, Op::Permute { .. }))
}

fn build_permute_permute(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(Op::Permute { perm: p2 }) = op(n) else {
        return vec![];
    };
    let inner: Vec<(Vec<usize>, Id)> = class_ops(eg, n.children[0])
        .filter_map(|(o, ch)| match o {
            Op::Permute { perm } => Some((perm.clone(), ch[0])),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (p1, x) in inner {
        let composed: Vec<usize> = p2.iter().map(|&i| p1[i]).collect();
        if composed.iter().enumerate().all(|(i, &p)| i == p) {
            out.push(x);
        } else if let Some(id) = add_op(eg, Op::Permute { perm: composed }, &[x]) {
            out.push(id);
        }
    }
    out
}

/// `reshape(reshape(x))` = `reshape(x)`.
fn probe_reshape_reshape(eg: &EGraph, _: Id, n: &FNode) -> bool {
    matches!(op(n), Some(Op::Reshape { .. }))
        && class_ops(eg, n.children[0]).any(|(o, _)| matches!(o, Op::Reshape { .. }))
}

fn build_reshape_reshape(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(Op::Reshape { shape }) = op(n).cloned() else {
        return vec![];
    };
    let inner: Vec<Id> = class_ops(eg, n.children[0])
        .filter(|(o, _)| matches!(o, Op::Reshape { .. }))
        .map(|(_, ch)| ch[0])
        .collect();
    inner
        .into_iter()
        .filter_map(|x| add_op(eg, Op::Reshape { shape: shape.clone() }, &[x]))
        .collect()
}

/// Reshape or broadcast to the input's own shape, and the identity permutation, are `x`.
fn probe_identity_layout(eg: &EGraph, class: Id, n: &FNode) -> bool {
    match op(n) {
        Some(Op::Reshape { .. }) | Some(Op::Broadcast { .. }) => {
            n.children.len() == 1 && class_ty(eg, n.children[0]) == class_ty(eg, class)
        }
        Some(Op::Permute { perm }) => perm.iter().enumerate().all(|(i, &p)| i == p),
        _ => false,
    }
}

fn build_identity_layout(_: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    vec![n.children[0]]
}

/// `cast[d](x)` with `x` already of dtype `d` is `x`.
fn probe_cast_noop(eg: &EGraph, _: Id, n: &FNode) -> bool {
    match op(n) {
        Some(Op::Cast { dtype }) => class_ty(eg, n.children[0]).is_some_and(|t| t.dtype == *dtype),
        _ => false,
    }
}

fn build_cast_noop(_: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    vec![n.children[0]]
}

/// `x · 1`, `1 · x`, `x + 0`, `0 + x`, `x − 0`, `x / 1` are `x` when broadcasting does not change `x`'s type.
fn neutral_operand(eg: &EGraph, class: Id, n: &FNode) -> Option<Id> {
    let Some(Op::Binary(b)) = op(n) else { return None };
    let (a, c) = (n.children[0], n.children[1]);
    let s = |id: Id| eg[id].data.scalar;
    let same = |x: Id| class_ty(eg, x) == class_ty(eg, class);
    match b {
        BinaryOp::Mul if s(c) == Some(1.0) && same(a) => Some(a),
        BinaryOp::Mul if s(a) == Some(1.0) && same(c) => Some(c),
        BinaryOp::Add if s(c) == Some(0.0) && same(a) => Some(a),
        BinaryOp::Add if s(a) == Some(0.0) && same(c) => Some(c),
        BinaryOp::Sub if s(c) == Some(0.0) && same(a) => Some(a),
        BinaryOp::Div if s(c) == Some(1.0) && same(a) => Some(a),
        _ => None,
    }
}

fn probe_neutral(eg: &EGraph, class: Id, n: &FNode) -> bool {
    neutral_operand(eg, class, n).is_some()
}

fn build_neutral(eg: &mut EGraph, class: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    neutral_operand(eg, class, n).into_iter().collect()
}

fn is_scalar_const(eg: &EGraph, id: Id) -> Option<f64> {
    let t = class_ty(eg, id)?;
    if t.rank() == 0 && t.dtype.is_float() {
        eg[id].data.scalar
    } else {
        None
    }
}

/// `(x · c1) · c2` = `x · (c1·c2)` for scalar float constants, only where the folded constant is exact: `c1`,
/// `c2` and their product all representable in the dtype (a rounded product would change the result: f32
/// `0.1 · 3`). Both products are then the same real number, so the rule is an equality.
fn probe_scale_scale(eg: &EGraph, _: Id, n: &FNode) -> bool {
    matches!(op(n), Some(Op::Binary(BinaryOp::Mul)))
        && is_scalar_const(eg, n.children[1]).is_some()
        && class_ops(eg, n.children[0])
            .any(|(o, ch)| matches!(o, Op::Binary(BinaryOp::Mul)) && is_scalar_const(eg, ch[1]).is_some())
}

fn build_scale_scale(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(c2) = is_scalar_const(eg, n.children[1]) else {
        return vec![];
    };
    let Some(t) = class_ty(eg, n.children[1]) else {
        return vec![];
    };
    let inner: Vec<(Id, f64)> = class_ops(eg, n.children[0])
        .filter_map(|(o, ch)| match o {
            Op::Binary(BinaryOp::Mul) => is_scalar_const(eg, ch[1]).map(|c1| (ch[0], c1)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (x, c1) in inner {
        let Some(v) = exact_product(t.dtype, c1, c2) else {
            continue;
        };
        let Some(c) = add_op(
            eg,
            Op::Constant {
                dtype: t.dtype,
                shape: vec![],
                data: fulgur_ir::ConstData::Float(vec![v]),
            },
            &[],
        ) else {
            continue;
        };
        out.extend(add_op(eg, Op::Binary(BinaryOp::Mul), &[x, c]));
    }
    out
}

/// `c1 · c2` when it is exactly representable in `dtype` (and so are `c1` and `c2`); the f64 product of two
/// f32 (or narrower) values is exact, so comparing it with its rounding tells.
fn exact_product(dtype: fulgur_ir::DType, c1: f64, c2: f64) -> Option<f64> {
    let r = |x: f64| fulgur_ir::tensor::round_to(dtype, x);
    let p = c1 * c2;
    (p.is_finite() && r(c1) == c1 && r(c2) == c2 && r(p) == p).then_some(p)
}

/// `(A·B)·C` = `A·(B·C)` for rank-2 operands; the extractor keeps the cheaper order.
fn probe_matmul_reassoc(eg: &EGraph, _: Id, n: &FNode) -> bool {
    matches!(op(n), Some(Op::MatMul))
        && class_ty(eg, n.children[1]).is_some_and(|t| t.rank() == 2)
        && class_ops(eg, n.children[0]).any(|(o, ch)| {
            matches!(o, Op::MatMul) && ch.iter().all(|&c| class_ty(eg, c).is_some_and(|t| t.rank() == 2))
        })
}

fn build_matmul_reassoc(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let c = n.children[1];
    let inner: Vec<(Id, Id)> = class_ops(eg, n.children[0])
        .filter(|(o, _)| matches!(o, Op::MatMul))
        .map(|(_, ch)| (ch[0], ch[1]))
        .collect();
    let mut out = Vec::new();
    for (a, b) in inner {
        if [a, b].iter().any(|&x| class_ty(eg, x).is_none_or(|t| t.rank() != 2)) {
            continue;
        }
        if let Some(bc) = add_op(eg, Op::MatMul, &[b, c]) {
            out.extend(add_op(eg, Op::MatMul, &[a, bc]));
        }
    }
    out
}

/// The batched matmul `reduce_sum[axes=[0]](matmul(A [B, M, K], C [B, K, N]))` as one matmul over the merged
/// contraction: `reshape(permute(A, [1, 0, 2]), [M, B·K]) · reshape(C, [B·K, N])`. This is a weight's gradient
/// from autodiff (`Xᵀ·dY` per sample, summed over the batch): one GEMM with a `B`-times longer contraction
/// instead of a `[B, M, N]` product written out and read back by a reduction (bench-m's lm_head: 524 MB each
/// way). `A` is usually a transposed view of a `[B, K, M]` activation, so the permute folds into it (the
/// lowering copies it to `[M, B·K]` where its strides do not merge). A batch sum read through a transpose (a
/// weight stored `[N, M]`, as the lm_head's) is left batched: its one-GEMM form needs a transposed operand,
/// which the cost model prices as a copy (`permute` is a copy kernel to it, a view to the lowering).
fn probe_batch_sum_matmul(eg: &EGraph, _: Id, n: &FNode) -> bool {
    let Some(Op::Reduce {
        op: fulgur_ir::ReduceOp::Sum,
        axes,
        keepdims: false,
    }) = op(n)
    else {
        return false;
    };
    axes.len() == 1
        && (axes[0] == 0 || axes[0] == -3)
        && class_ops(eg, n.children[0]).any(|(o, ch)| matches!(o, Op::MatMul) && batch_pair(eg, ch).is_some())
}

/// `(B, M, K, N)` when `a` is `[B, M, K]` and `c` is `[B, K, N]` (one batch dim, not broadcast).
fn batch_pair(eg: &EGraph, ch: &[Id]) -> Option<(fulgur_ir::Dim, fulgur_ir::Dim, fulgur_ir::Dim, fulgur_ir::Dim)> {
    let (a, c) = (class_ty(eg, ch[0])?, class_ty(eg, ch[1])?);
    let (ad, cd) = (a.dims(), c.dims());
    (ad.len() == 3 && cd.len() == 3 && ad[0] == cd[0] && ad[2] == cd[1] && a.dtype == c.dtype)
        .then(|| (ad[0].clone(), ad[1].clone(), ad[2].clone(), cd[2].clone()))
}

fn build_batch_sum_matmul(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let pairs: Vec<Vec<Id>> = class_ops(eg, n.children[0])
        .filter(|(o, _)| matches!(o, Op::MatMul))
        .map(|(_, ch)| ch.to_vec())
        .collect();
    let mut out = Vec::new();
    for ch in pairs {
        let Some((b, m, k, nn)) = batch_pair(eg, &ch) else {
            continue;
        };
        let bk = b * k;
        let shape = |d: Vec<fulgur_ir::Dim>| Op::Reshape {
            shape: fulgur_ir::Shape::new(d),
        };
        let Some(pa) = add_op(eg, Op::Permute { perm: vec![1, 0, 2] }, &[ch[0]]) else {
            continue;
        };
        let Some(ra) = add_op(eg, shape(vec![m, bk.clone()]), &[pa]) else {
            continue;
        };
        let Some(rc) = add_op(eg, shape(vec![bk, nn]), &[ch[1]]) else {
            continue;
        };
        out.extend(add_op(eg, Op::MatMul, &[ra, rc]));
    }
    out
}

/// `one_hot[depth](idx)` = `cast(reshape(idx, [.., 1]) == iota([depth]))`: a comparison the reading kernels
/// compute where they read it, instead of an index kernel writing `[.., depth]` (the loss's one-hot of the
/// labels over the vocabulary: 1 GB of f32 at bench-m's 4 × 2048 tokens, written once and read by the loss and
/// by its gradient). Out-of-range indices equal no position, so their row is zero, as `one_hot`'s.
fn probe_one_hot(eg: &EGraph, _: Id, n: &FNode) -> bool {
    matches!(op(n), Some(Op::OneHot { .. })) && class_ty(eg, n.children[0]).is_some_and(|t| t.dtype.is_int())
}

fn build_one_hot(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(Op::OneHot { depth, dtype }) = op(n).cloned() else {
        return vec![];
    };
    let idx = n.children[0];
    let Some(t) = class_ty(eg, idx) else {
        return vec![];
    };
    let mut dims = t.dims().to_vec();
    dims.push(fulgur_ir::Dim::from(1));
    let col = add_op(
        eg,
        Op::Reshape {
            shape: fulgur_ir::Shape::new(dims),
        },
        &[idx],
    );
    let pos = add_op(
        eg,
        Op::Iota {
            dtype: t.dtype,
            shape: fulgur_ir::Shape::new(vec![fulgur_ir::Dim::from(depth as i64)]),
            axis: 0,
        },
        &[],
    );
    let (Some(col), Some(pos)) = (col, pos) else {
        return vec![];
    };
    let Some(hot) = add_op(eg, Op::Compare(fulgur_ir::CmpOp::Eq), &[col, pos]) else {
        return vec![];
    };
    add_op(eg, Op::Cast { dtype }, &[hot]).into_iter().collect()
}
