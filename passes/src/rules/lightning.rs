//! Attention: the definitional decayed causal linear attention `((Q Kᵀ) ⊙ M_decay) V` ⇒ the block-form
//! `lightning_attention[block=b]` kernel (one alternative per candidate block size; the cost model picks), and
//! softmax attention `softmax(Q Kᵀ · s + causal) V` ⇒ `flash_attention[scale=s, causal=c]`.
//!
//! The matcher walks the e-graph from the final `matmul(·, V)` and checks every piece of the mask:
//! `select(ge(t, u), exp(−λ·(t − u)), 0)` with `t`, `u` the row and column iotas of a `[T, T]` grid, in
//! either of the equivalent spellings `neg(mul(λ, d))` and `mul(neg(λ), d)` (operands in either order). Every
//! shape is checked with the analysis; anything that does not fit is left alone.

use super::{fn_rule, Family, RuleConfig};
use crate::lang::{add_op, class_ops, class_ty, EGraph, FNode};
use egg::Id;
use fulgur_ir::{BinaryOp, CmpOp, Composite, Op, UnaryOp};

pub fn family(cfg: &RuleConfig) -> Family {
    Family {
        name: "lightning",
        rules: vec![
            fn_rule("lightning-block-form", probe_lightning, build_lightning, cfg),
            fn_rule("flash-attention", probe_flash, build_flash, cfg),
            fn_rule("lightning-layer-kernel", probe_layer, build_layer, cfg),
            fn_rule("flash-rope-prologue", probe_flash_rope, build_flash_rope, cfg),
        ],
    }
}

/// Family of softmax attention lives with lightning: both are attention kernels.
fn ops(eg: &EGraph, id: Id) -> Vec<(Op, Vec<Id>)> {
    class_ops(eg, id).map(|(o, c)| (o.clone(), c.to_vec())).collect()
}

/// `(t, u)` when `c` is `ge(t, u)` (or `le(u, t)`) of row/column iotas of one `[T, T]` grid.
fn causal_grid(eg: &EGraph, c: Id) -> Option<(Id, Id)> {
    for (o, ch) in ops(eg, c) {
        let (t, u) = match o {
            Op::Compare(CmpOp::Ge) => (ch[0], ch[1]),
            Op::Compare(CmpOp::Le) => (ch[1], ch[0]),
            _ => continue,
        };
        if is_iota(eg, t, 0)
            && is_iota(eg, u, 1)
            && class_ty(eg, t).map(|x| x.shape) == class_ty(eg, u).map(|x| x.shape)
        {
            return Some((t, u));
        }
    }
    None
}

fn is_iota(eg: &EGraph, id: Id, axis: i64) -> bool {
    class_ops(eg, id).any(|(o, _)| match o {
        Op::Iota { shape, axis: a, .. } => {
            shape.rank() == 2 && (*a == axis || *a == axis - 2) && shape.0[0] == shape.0[1]
        }
        _ => false,
    })
}

/// Whether `d` is `sub(t, u)`.
fn is_distance(eg: &EGraph, d: Id, t: Id, u: Id) -> bool {
    class_ops(eg, d).any(|(o, ch)| {
        matches!(o, Op::Binary(BinaryOp::Sub)) && eg.find(ch[0]) == eg.find(t) && eg.find(ch[1]) == eg.find(u)
    })
}

/// λ when `e` is `exp(−λ·d)` spelled `exp(neg(mul(λ, d)))`, `exp(neg(mul(d, λ)))`, `exp(mul(neg(λ), d))` or
/// `exp(mul(d, neg(λ)))`, with `d = sub(t, u)`.
fn decay_rate(eg: &EGraph, e: Id, t: Id, u: Id) -> Option<Id> {
    for (o, ch) in ops(eg, e) {
        if !matches!(o, Op::Unary(UnaryOp::Exp)) {
            continue;
        }
        let x = ch[0];
        // exp(neg(mul(λ, d)))
        for (o2, ch2) in ops(eg, x) {
            match o2 {
                Op::Unary(UnaryOp::Neg) => {
                    for (o3, ch3) in ops(eg, ch2[0]) {
                        if matches!(o3, Op::Binary(BinaryOp::Mul)) {
                            if is_distance(eg, ch3[1], t, u) {
                                return Some(ch3[0]);
                            }
                            if is_distance(eg, ch3[0], t, u) {
                                return Some(ch3[1]);
                            }
                        }
                    }
                }
                Op::Binary(BinaryOp::Mul) => {
                    let (a, b) = (ch2[0], ch2[1]);
                    for (nl, dd) in [(a, b), (b, a)] {
                        if !is_distance(eg, dd, t, u) {
                            continue;
                        }
                        for (o4, ch4) in ops(eg, nl) {
                            if matches!(o4, Op::Unary(UnaryOp::Neg)) {
                                return Some(ch4[0]);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// `(q, k)` when `s` is `matmul(q, permute(k))` with the permute swapping the last two axes.
fn qk_scores(eg: &EGraph, s: Id) -> Option<(Id, Id)> {
    for (o, ch) in ops(eg, s) {
        if !matches!(o, Op::MatMul) {
            continue;
        }
        for (o2, ch2) in ops(eg, ch[1]) {
            if let Op::Permute { perm } = o2 {
                let r = perm.len();
                let swap = r >= 2
                    && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
                    && perm[r - 2] == r - 1
                    && perm[r - 1] == r - 2;
                if swap {
                    return Some((ch[0], ch2[0]));
                }
            }
        }
    }
    None
}

struct LightningMatch {
    q: Id,
    k: Id,
    v: Id,
    lam: Id,
}

fn match_lightning(eg: &EGraph, n: &FNode) -> Option<LightningMatch> {
    if !matches!(n.ir_op(), Some(Op::MatMul)) {
        return None;
    }
    let (masked, v) = (n.children[0], n.children[1]);
    for (o, ch) in ops(eg, masked) {
        if !matches!(o, Op::Binary(BinaryOp::Mul)) {
            continue;
        }
        for (s, m) in [(ch[0], ch[1]), (ch[1], ch[0])] {
            let Some((q, k)) = qk_scores(eg, s) else { continue };
            for (mo, mch) in ops(eg, m) {
                if !matches!(mo, Op::Select) || eg[mch[2]].data.scalar != Some(0.0) {
                    continue;
                }
                let Some((t, u)) = causal_grid(eg, mch[0]) else {
                    continue;
                };
                let Some(lam) = decay_rate(eg, mch[1], t, u) else {
                    continue;
                };
                // shapes: q, k [batch..., T, D] with T the grid's size; λ broadcastable to [batch..., 1, 1]
                let (qt, kt, vt, lt, gt) = (
                    class_ty(eg, q)?,
                    class_ty(eg, k)?,
                    class_ty(eg, v)?,
                    class_ty(eg, lam)?,
                    class_ty(eg, t)?,
                );
                let r = qt.rank();
                if r < 3 || kt.rank() != r || vt.rank() != r || qt.dims()[r - 2] != gt.dims()[0] {
                    continue;
                }
                if lt.rank() > r || lt.dims().iter().rev().take(2).any(|d| !d.is_one()) {
                    continue;
                }
                return Some(LightningMatch { q, k, v, lam });
            }
        }
    }
    None
}

fn probe_lightning(eg: &EGraph, _: Id, n: &FNode) -> bool {
    match_lightning(eg, n).is_some()
}

fn build_lightning(eg: &mut EGraph, _: Id, n: &FNode, cfg: &RuleConfig) -> Vec<Id> {
    let Some(m) = match_lightning(eg, n) else { return vec![] };
    cfg.lightning_blocks
        .iter()
        .filter_map(|&b| {
            add_op(
                eg,
                Op::Composite(Composite::LightningAttention { block: b }),
                &[m.q, m.k, m.v, m.lam],
            )
        })
        .collect()
}

struct FlashMatch {
    q: Id,
    k: Id,
    v: Id,
    scale: f64,
    causal: bool,
}

/// `(scores, scale)` when `x` is `mul(scores, c)` / `mul(c, scores)` with a scalar constant `c`, or
/// `(x, 1)` otherwise.
fn scaled(eg: &EGraph, x: Id) -> Vec<(Id, f64)> {
    let mut v = vec![(x, 1.0)];
    for (o, ch) in ops(eg, x) {
        if matches!(o, Op::Binary(BinaryOp::Mul)) {
            for (s, c) in [(ch[0], ch[1]), (ch[1], ch[0])] {
                if let (Some(val), Some(t)) = (eg[c].data.scalar, class_ty(eg, c)) {
                    if t.rank() == 0 {
                        v.push((s, val));
                    }
                }
            }
        }
    }
    v
}

/// Whether `b` is the causal additive bias `select(ge(t, u), 0, −inf)`.
fn is_causal_bias(eg: &EGraph, b: Id) -> bool {
    class_ops(eg, b).any(|(o, ch)| {
        matches!(o, Op::Select)
            && eg[ch[1]].data.scalar == Some(0.0)
            && eg[ch[2]].data.scalar == Some(f64::NEG_INFINITY)
            && causal_grid(eg, ch[0]).is_some()
    })
}

fn match_flash(eg: &EGraph, n: &FNode) -> Option<FlashMatch> {
    if !matches!(n.ir_op(), Some(Op::MatMul)) {
        return None;
    }
    let (p, v) = (n.children[0], n.children[1]);
    for (o, ch) in ops(eg, p) {
        let Op::Composite(Composite::Softmax { axis }) = o else {
            continue;
        };
        let x = ch[0];
        let rank = class_ty(eg, x)?.rank() as i64;
        if axis != -1 && axis != rank - 1 {
            continue;
        }
        // x = scaled scores (+ causal bias)
        let mut candidates: Vec<(Id, bool)> = vec![(x, false)];
        for (o2, ch2) in ops(eg, x) {
            if matches!(o2, Op::Binary(BinaryOp::Add)) {
                for (s, b) in [(ch2[0], ch2[1]), (ch2[1], ch2[0])] {
                    if is_causal_bias(eg, b) {
                        candidates.push((s, true));
                    }
                }
            }
        }
        for (sx, causal) in candidates {
            for (sc, scale) in scaled(eg, sx) {
                let Some((q, k)) = qk_scores(eg, sc) else { continue };
                let (qt, kt) = (class_ty(eg, q)?, class_ty(eg, k)?);
                if causal && qt.dims()[qt.rank() - 2] != kt.dims()[kt.rank() - 2] {
                    continue;
                }
                // the scores must not be broadcast by the bias (the bias is [T, T] against [..., T, T])
                if class_ty(eg, sx)?.shape != class_ty(eg, x)?.shape {
                    continue;
                }
                return Some(FlashMatch { q, k, v, scale, causal });
            }
        }
    }
    None
}

fn probe_flash(eg: &EGraph, _: Id, n: &FNode) -> bool {
    match_flash(eg, n).is_some()
}

fn build_flash(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(m) = match_flash(eg, n) else { return vec![] };
    add_op(
        eg,
        Op::Composite(Composite::FlashAttention {
            scale: m.scale,
            causal: m.causal,
        }),
        &[m.q, m.k, m.v],
    )
    .into_iter()
    .collect()
}

/// The lightning kernel absorbing its prologue (SiLU on the fused projection, per-head split) and epilogue
/// (head merge, RMSNorm over all heads, sigmoid output gate):
/// `mul(sigmoid(G), rms_norm(reshape(permute(lightning_attention[b](q, k, v, λ))), w))` with q, k, v the three
/// thirds of `permute(reshape(silu(QKV)))` ⇒ `lightning_layer[b, heads, eps](QKV, λ, w, G)`.
struct LayerMatch {
    qkv: Id,
    lam: Id,
    w: Id,
    gate: Id,
    blocks: Vec<usize>,
    heads: usize,
    eps: f64,
}

fn is_head_permute(op: &Op) -> bool {
    matches!(op, Op::Permute { perm } if perm == &[0, 2, 1, 3])
}

/// `(x, start, end)` of a slice on the last axis of a rank-4 value.
fn last_axis_slice(eg: &EGraph, id: Id) -> Vec<(Id, i64, i64)> {
    ops(eg, id)
        .into_iter()
        .filter_map(|(o, ch)| match o {
            Op::Slice { axis, start, end } if axis == -1 || axis == 3 => {
                Some((eg.find(ch[0]), start.as_const()?, end.as_const()?))
            }
            _ => None,
        })
        .collect()
}

fn match_layer(eg: &EGraph, n: &FNode) -> Option<LayerMatch> {
    if !matches!(n.ir_op(), Some(Op::Binary(BinaryOp::Mul))) {
        return None;
    }
    for (s, y) in [(n.children[0], n.children[1]), (n.children[1], n.children[0])] {
        let Some(gate) = ops(eg, s)
            .into_iter()
            .find_map(|(o, ch)| matches!(o, Op::Unary(UnaryOp::Sigmoid)).then(|| ch[0]))
        else {
            continue;
        };
        for (o, ch) in ops(eg, y) {
            let Op::Composite(Composite::RmsNorm { eps }) = o else {
                continue;
            };
            let (r, w) = (ch[0], ch[1]);
            for (ro, rch) in ops(eg, r) {
                if !matches!(ro, Op::Reshape { .. }) {
                    continue;
                }
                for (po, pch) in ops(eg, rch[0]) {
                    if !is_head_permute(&po) {
                        continue;
                    }
                    let mut blocks = Vec::new();
                    let mut found: Option<(Id, Id, usize)> = None;
                    for (lo, lch) in ops(eg, pch[0]) {
                        let Op::Composite(Composite::LightningAttention { block }) = lo else {
                            continue;
                        };
                        let (q, k, v) = (
                            last_axis_slice(eg, lch[0]),
                            last_axis_slice(eg, lch[1]),
                            last_axis_slice(eg, lch[2]),
                        );
                        let Some(&(x, 0, dq)) = q.first() else { continue };
                        let d = dq;
                        if !k.contains(&(x, d, 2 * d)) || !v.contains(&(x, 2 * d, 3 * d)) {
                            continue;
                        }
                        // x = permute(reshape(silu(QKV))) with reshape to [B, T, H, 3D]
                        let qkv = ops(eg, x)
                            .into_iter()
                            .filter(|(o, _)| is_head_permute(o))
                            .find_map(|(_, xc)| {
                                ops(eg, xc[0])
                                    .into_iter()
                                    .filter(|(o, _)| matches!(o, Op::Reshape { .. }))
                                    .find_map(|(_, rc)| {
                                        ops(eg, rc[0])
                                            .into_iter()
                                            .find_map(|(o, sc)| matches!(o, Op::Unary(UnaryOp::Silu)).then(|| sc[0]))
                                    })
                            });
                        let Some(qkv) = qkv else { continue };
                        let heads = class_ty(eg, x)?.dims()[1].as_const()? as usize;
                        blocks.push(block);
                        found = Some((qkv, lch[3], heads));
                    }
                    if let Some((qkv, lam, heads)) = found {
                        blocks.sort();
                        blocks.dedup();
                        return Some(LayerMatch {
                            qkv,
                            lam,
                            w,
                            gate,
                            blocks,
                            heads,
                            eps,
                        });
                    }
                }
            }
        }
    }
    None
}

fn probe_layer(eg: &EGraph, _: Id, n: &FNode) -> bool {
    match_layer(eg, n).is_some()
}

fn build_layer(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(m) = match_layer(eg, n) else { return vec![] };
    m.blocks
        .iter()
        .filter_map(|&block| {
            add_op(
                eg,
                Op::Composite(Composite::LightningLayer {
                    block,
                    heads: m.heads,
                    eps: m.eps,
                }),
                &[m.qkv, m.lam, m.w, m.gate],
            )
        })
        .collect()
}

/// `(x, cos, sin, rotary)` when `y` is the rotary embedding of `x` as the models write it:
/// `add(mul(x_r, cos), mul(concat(neg(x_r[h..r]), x_r[0..h]), sin))` with `x_r = x` (full) or
/// `concat(that, x[r..D])` with `x_r = x[0..r]` (partial); products and sums in either operand order.
fn match_rope(eg: &EGraph, y: Id) -> Option<(Id, Id, Id, usize)> {
    let full = |eg: &EGraph, y: Id| -> Option<(Id, Id, Id, usize)> {
        for (o, ch) in ops(eg, y) {
            if !matches!(o, Op::Binary(BinaryOp::Add)) {
                continue;
            }
            for (a, b) in [(ch[0], ch[1]), (ch[1], ch[0])] {
                for (ao, ach) in ops(eg, a) {
                    if !matches!(ao, Op::Binary(BinaryOp::Mul)) {
                        continue;
                    }
                    for (x, cos) in [(ach[0], ach[1]), (ach[1], ach[0])] {
                        let (xt, ct) = (class_ty(eg, x)?, class_ty(eg, cos)?);
                        let r = xt.dims().last()?.as_const()? as usize;
                        if ct.rank() != 2 || ct.dims()[1].as_const() != Some(r as i64) || !r.is_multiple_of(2) {
                            continue;
                        }
                        let h = (r / 2) as i64;
                        let x = eg.find(x);
                        for (bo, bch) in ops(eg, b) {
                            if !matches!(bo, Op::Binary(BinaryOp::Mul)) {
                                continue;
                            }
                            for (rot, sin) in [(bch[0], bch[1]), (bch[1], bch[0])] {
                                if class_ty(eg, sin) != Some(ct.clone()) {
                                    continue;
                                }
                                let is_rot = ops(eg, rot).into_iter().any(|(ro, rch)| {
                                    matches!(ro, Op::Concat { axis } if axis == -1 || axis == xt.rank() as i64 - 1)
                                        && rch.len() == 2
                                        && ops(eg, rch[0]).into_iter().any(|(no, nch)| {
                                            matches!(no, Op::Unary(UnaryOp::Neg))
                                                && last_axis_slice_any(eg, nch[0]).contains(&(x, h, 2 * h))
                                        })
                                        && last_axis_slice_any(eg, rch[1]).contains(&(x, 0, h))
                                });
                                if is_rot {
                                    return Some((x, cos, sin, r));
                                }
                            }
                        }
                    }
                }
            }
        }
        None
    };
    if let Some(m) = full(eg, y) {
        // x may itself be the first `r` dims of a wider head (partial rotary): then y is not the whole rope
        return Some(m);
    }
    // partial: concat(full_rope(x[0..r]), x[r..D])
    for (o, ch) in ops(eg, y) {
        if !matches!(o, Op::Concat { .. }) || ch.len() != 2 {
            continue;
        }
        let Some((xr, cos, sin, r)) = full(eg, ch[0]) else {
            continue;
        };
        let yt = class_ty(eg, y)?;
        let d = yt.dims().last()?.as_const()?;
        for (x, s0, e0) in last_axis_slice_any(eg, xr) {
            if s0 == 0 && e0 == r as i64 && last_axis_slice_any(eg, ch[1]).contains(&(x, r as i64, d)) {
                return Some((x, cos, sin, r));
            }
        }
    }
    None
}

/// `(x, start, end)` of constant slices on the last axis of any rank.
fn last_axis_slice_any(eg: &EGraph, id: Id) -> Vec<(Id, i64, i64)> {
    let Some(t) = class_ty(eg, id) else { return vec![] };
    let last = t.rank() as i64 - 1;
    ops(eg, id)
        .into_iter()
        .filter_map(|(o, ch)| match o {
            Op::Slice { axis, start, end } if axis == -1 || axis == last => {
                Some((eg.find(ch[0]), start.as_const()?, end.as_const()?))
            }
            _ => None,
        })
        .collect()
}

/// The pre-rotation value and tables when `v` is `reshape(rope(x))` (or `rope(x)` itself).
fn roped_operand(eg: &EGraph, v: Id) -> Vec<(Option<fulgur_ir::Shape>, Id, Id, Id, usize)> {
    let mut out = Vec::new();
    if let Some((x, c, s, r)) = match_rope(eg, v) {
        out.push((None, x, c, s, r));
    }
    for (o, ch) in ops(eg, v) {
        if let Op::Reshape { shape } = o {
            if let Some((x, c, s, r)) = match_rope(eg, ch[0]) {
                out.push((Some(shape), x, c, s, r));
            }
        }
    }
    out
}

struct FlashRopeMatch {
    q: (Option<fulgur_ir::Shape>, Id),
    k: (Option<fulgur_ir::Shape>, Id),
    v: Id,
    cos: Id,
    sin: Id,
    rotary: usize,
    scale: f64,
    causal: bool,
}

fn match_flash_rope(eg: &EGraph, n: &FNode) -> Option<FlashRopeMatch> {
    let Some(Op::Composite(Composite::FlashAttention { scale, causal })) = n.ir_op() else {
        return None;
    };
    let (q, k, v) = (n.children[0], n.children[1], n.children[2]);
    let (qt, kt) = (class_ty(eg, q)?, class_ty(eg, k)?);
    if qt.dims()[qt.rank() - 2] != kt.dims()[kt.rank() - 2] {
        return None;
    }
    for (qs, qx, qc, qsin, r) in roped_operand(eg, q) {
        for (ks, kx, kc, ksin, kr) in roped_operand(eg, k) {
            if kr == r && eg.find(kc) == eg.find(qc) && eg.find(ksin) == eg.find(qsin) {
                return Some(FlashRopeMatch {
                    q: (qs.clone(), qx),
                    k: (ks, kx),
                    v,
                    cos: qc,
                    sin: qsin,
                    rotary: r,
                    scale: *scale,
                    causal: *causal,
                });
            }
        }
    }
    None
}

fn probe_flash_rope(eg: &EGraph, _: Id, n: &FNode) -> bool {
    match_flash_rope(eg, n).is_some()
}

fn build_flash_rope(eg: &mut EGraph, _: Id, n: &FNode, _: &RuleConfig) -> Vec<Id> {
    let Some(m) = match_flash_rope(eg, n) else {
        return vec![];
    };
    // rotation acts on the last axis per position, so it commutes with the head-grouping reshape
    let mut operand = |(shape, x): (Option<fulgur_ir::Shape>, Id)| -> Option<Id> {
        match shape {
            None => Some(x),
            Some(shape) => add_op(eg, Op::Reshape { shape }, &[x]),
        }
    };
    let (Some(q), Some(k)) = (operand(m.q), operand(m.k)) else {
        return vec![];
    };
    add_op(
        eg,
        Op::Composite(Composite::FlashAttentionRope {
            scale: m.scale,
            causal: m.causal,
            rotary: m.rotary,
        }),
        &[q, k, m.v, m.cos, m.sin],
    )
    .into_iter()
    .collect()
}
