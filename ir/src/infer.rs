//! Shape and dtype inference: the typing rule of every op.
//!
//! [`infer`] returns the output types or a message naming the shapes involved; [`crate::Graph::add_node`]
//! wraps the message with the node's id, name and op.

use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::op::{Composite, ConstData, Op, ReduceOp, UnaryOp};
use crate::types::TensorType;

type R<T> = Result<T, String>;

fn fmt_types(ts: &[&TensorType]) -> String {
    ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

/// Normalises a possibly negative axis for a tensor of rank `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    } else {
        Ok(a as usize)
    }
}

/// NumPy broadcasting of two shapes. Symbolic dims broadcast only against an equal dim or a constant 1.
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> R<Shape> {
    let r = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.rank() >= r {
            Some(&a.0[i + a.rank() - r])
        } else {
            None
        };
        let db = if i + b.rank() >= r {
            Some(&b.0[i + b.rank() - r])
        } else {
            None
        };
        let d = match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(x), Some(y)) if x.is_one() => y.clone(),
            (Some(x), Some(y)) if y.is_one() => x.clone(),
            (Some(x), Some(y)) => {
                return Err(format!(
                    "shapes {a} and {b} do not broadcast: dimension `{x}` against `{y}`"
                ))
            }
            (None, None) => unreachable!("i < max rank"),
        };
        out.push(d);
    }
    Ok(Shape(out))
}

/// [`norm_axis`] for an axis of a value of type `t`; the error names the type.
fn axis_of(axis: i64, t: &TensorType) -> R<usize> {
    norm_axis(axis, t.rank()).map_err(|_| format!("axis {axis} is out of range for {t} (rank {})", t.rank()))
}

fn same_dtype(op: &Op, ins: &[&TensorType]) -> R<DType> {
    let d = ins[0].dtype;
    if ins.iter().any(|t| t.dtype != d) {
        return Err(format!(
            "`{}` needs operands of one dtype, got {}",
            op.name(),
            fmt_types(ins)
        ));
    }
    Ok(d)
}

/// Whether `name` can be a dimension symbol: an identifier (`[A-Za-z_][A-Za-z0-9_]*`) other than the
/// words the text format reserves.
pub fn valid_symbol(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !["true", "false", "nan", "inf", "ceildiv"].contains(&name)
}

fn check_const_shape(shape: &Shape) -> R<()> {
    for s in shape.symbols() {
        if !valid_symbol(&s) {
            return Err(format!(
                "`{s}` is not a valid dimension symbol (an identifier other than true, false, nan, inf, ceildiv)"
            ));
        }
    }
    for d in &shape.0 {
        if d.overflowed() {
            return Err(format!("dimension overflows i64 in shape {shape}"));
        }
        if let Some(c) = d.as_const() {
            if c < 0 {
                return Err(format!("negative dimension {c} in shape {shape}"));
            }
        }
    }
    Ok(())
}

/// Infers the output types of `op` applied to inputs of types `ins`.
pub fn infer(op: &Op, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    if let Some(n) = op.num_inputs() {
        if ins.len() != n {
            return Err(format!("`{}` expects {n} input(s), got {}", op.name(), ins.len()));
        }
    } else if ins.is_empty() {
        return Err(format!("`{}` expects at least one input", op.name()));
    }
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Input { ty, .. } | Op::Param { ty, .. } => {
            check_const_shape(&ty.shape)?;
            one(ty.clone())
        }
        Op::Constant { dtype, shape, data } => {
            let n = shape
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b))
                .ok_or_else(|| format!("constant shape {shape:?} has too many elements"))?;
            if n != data.len() {
                return Err(format!(
                    "constant of shape {shape:?} needs {n} values, got {}",
                    data.len()
                ));
            }
            let ok = match data {
                ConstData::Float(_) => dtype.is_float(),
                ConstData::Int(_) => dtype.is_int(),
                ConstData::Bool(_) => *dtype == DType::Bool,
            };
            if !ok {
                return Err(format!("constant values do not match dtype {dtype}"));
            }
            one(TensorType {
                dtype: *dtype,
                shape: Shape::from_consts(shape),
            })
        }
        Op::Full { dtype, shape, .. } => {
            check_const_shape(shape)?;
            one(TensorType {
                dtype: *dtype,
                shape: shape.clone(),
            })
        }
        Op::Iota { dtype, shape, axis } => {
            check_const_shape(shape)?;
            norm_axis(*axis, shape.rank())
                .map_err(|_| format!("axis {axis} is out of range for shape {shape} (rank {})", shape.rank()))?;
            if !(dtype.is_int() || dtype.is_float()) {
                return Err(format!("iota needs a numeric dtype, got {dtype}"));
            }
            one(TensorType {
                dtype: *dtype,
                shape: shape.clone(),
            })
        }
        Op::Unary(u) => {
            let t = ins[0];
            if !(t.dtype.is_float() || (u.allows_int() && t.dtype.is_int())) {
                return Err(format!("`{}` is not defined on {t}", u.name()));
            }
            one(t.clone())
        }
        Op::Binary(_) => {
            let d = same_dtype(op, ins)?;
            if d == DType::Bool {
                return Err(format!(
                    "`{}` is not defined on bool operands ({})",
                    op.name(),
                    fmt_types(ins)
                ));
            }
            one(TensorType {
                dtype: d,
                shape: broadcast_shapes(&ins[0].shape, &ins[1].shape)?,
            })
        }
        Op::Compare(_) => {
            same_dtype(op, ins)?;
            one(TensorType {
                dtype: DType::Bool,
                shape: broadcast_shapes(&ins[0].shape, &ins[1].shape)?,
            })
        }
        Op::Select => {
            if ins[0].dtype != DType::Bool {
                return Err(format!("`select` needs a bool condition, got {}", ins[0]));
            }
            let d = same_dtype(op, &ins[1..])?;
            let s = broadcast_shapes(&ins[0].shape, &ins[1].shape)?;
            one(TensorType {
                dtype: d,
                shape: broadcast_shapes(&s, &ins[2].shape)?,
            })
        }
        Op::Cast { dtype } => one(TensorType {
            dtype: *dtype,
            shape: ins[0].shape.clone(),
        }),
        Op::MatMul => {
            let (a, b) = (ins[0], ins[1]);
            let d = same_dtype(op, ins)?;
            if !d.is_float() {
                return Err(format!("`matmul` needs float operands, got {a} x {b}"));
            }
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("`matmul` needs operands of rank >= 2, got {a} x {b}"));
            }
            let (ra, rb) = (a.rank(), b.rank());
            let (m, k1) = (&a.dims()[ra - 2], &a.dims()[ra - 1]);
            let (k2, n) = (&b.dims()[rb - 2], &b.dims()[rb - 1]);
            if k1 != k2 {
                return Err(format!(
                    "`matmul` inner dimensions differ: {a} x {b} (`{k1}` vs `{k2}`)"
                ));
            }
            let batch = broadcast_shapes(&Shape(a.dims()[..ra - 2].to_vec()), &Shape(b.dims()[..rb - 2].to_vec()))
                .map_err(|e| format!("`matmul` batch dimensions: {e} ({a} x {b})"))?;
            let mut dims = batch.0;
            dims.push(m.clone());
            dims.push(n.clone());
            one(TensorType::new(d, dims))
        }
        Op::Reduce { op: r, axes, keepdims } => {
            let t = ins[0];
            if t.dtype == DType::Bool || (*r == ReduceOp::Mean && !t.dtype.is_float()) {
                return Err(format!("`{}` is not defined on {t}", r.name()));
            }
            let mut red = vec![false; t.rank()];
            for &a in axes {
                let a = axis_of(a, t)?;
                if red[a] {
                    return Err(format!("axis {a} listed twice in `axes` {axes:?} of {t}"));
                }
                red[a] = true;
            }
            let mut dims = Vec::new();
            for (i, d) in t.dims().iter().enumerate() {
                if !red[i] {
                    dims.push(d.clone());
                } else if *keepdims {
                    dims.push(Dim::constant(1));
                }
            }
            one(TensorType::new(t.dtype, dims))
        }
        Op::Reshape { shape } => {
            let t = ins[0];
            check_const_shape(shape)?;
            if t.shape.numel() != shape.numel() {
                return Err(format!(
                    "cannot reshape {t} ({} elements) to {shape} ({} elements)",
                    t.shape.numel(),
                    shape.numel()
                ));
            }
            one(TensorType {
                dtype: t.dtype,
                shape: shape.clone(),
            })
        }
        Op::Permute { perm } => {
            let t = ins[0];
            let mut seen = vec![false; t.rank()];
            if perm.len() != t.rank()
                || perm
                    .iter()
                    .any(|&p| p >= t.rank() || std::mem::replace(&mut seen[p], true))
            {
                return Err(format!(
                    "perm {perm:?} is not a permutation of the {} axes of {t}",
                    t.rank()
                ));
            }
            one(TensorType::new(
                t.dtype,
                perm.iter().map(|&p| t.dims()[p].clone()).collect(),
            ))
        }
        Op::Broadcast { shape } => {
            let t = ins[0];
            check_const_shape(shape)?;
            if t.rank() > shape.rank() {
                return Err(format!("cannot broadcast {t} to lower rank {shape}"));
            }
            let off = shape.rank() - t.rank();
            for (i, d) in t.dims().iter().enumerate() {
                let target = &shape.0[off + i];
                if d != target && !d.is_one() {
                    return Err(format!(
                        "cannot broadcast {t} to {shape}: dimension `{d}` against `{target}`"
                    ));
                }
            }
            one(TensorType {
                dtype: t.dtype,
                shape: shape.clone(),
            })
        }
        Op::Slice { axis, start, end } => {
            let t = ins[0];
            let a = axis_of(*axis, t)?;
            let len = end.clone() - start.clone();
            let full = &t.dims()[a];
            if let Some(s) = start.as_const() {
                if s < 0 {
                    return Err(format!("slice start {s} of {t} is negative"));
                }
            }
            if let Some(l) = len.as_const() {
                if l < 0 {
                    return Err(format!("slice [{start}, {end}) of {t} has negative length"));
                }
            }
            if let Some(over) = (end.clone() - full.clone()).as_const() {
                if over > 0 {
                    return Err(format!("slice end `{end}` exceeds dimension `{full}` of {t}"));
                }
            }
            let mut dims = t.dims().to_vec();
            dims[a] = len;
            one(TensorType::new(t.dtype, dims))
        }
        Op::Concat { axis } => {
            let d = same_dtype(op, ins)?;
            let r = ins[0].rank();
            let a = axis_of(*axis, ins[0])?;
            let mut total = Dim::constant(0);
            for t in ins {
                if t.rank() != r
                    || t.dims()
                        .iter()
                        .zip(ins[0].dims())
                        .enumerate()
                        .any(|(i, (x, y))| i != a && x != y)
                {
                    return Err(format!(
                        "`concat` along axis {a} needs equal other dimensions, got {}",
                        fmt_types(ins)
                    ));
                }
                total = total + t.dims()[a].clone();
            }
            let mut dims = ins[0].dims().to_vec();
            dims[a] = total;
            one(TensorType::new(d, dims))
        }
        Op::Gather { axis } => {
            let (data, idx) = (ins[0], ins[1]);
            if !idx.dtype.is_int() {
                return Err(format!("`gather` indices must be i32 or i64, got {idx}"));
            }
            let a = axis_of(*axis, data)?;
            let mut dims = data.dims()[..a].to_vec();
            dims.extend_from_slice(idx.dims());
            dims.extend_from_slice(&data.dims()[a + 1..]);
            one(TensorType::new(data.dtype, dims))
        }
        Op::ScatterAdd { axis } => {
            let (data, idx, upd) = (ins[0], ins[1], ins[2]);
            if !idx.dtype.is_int() {
                return Err(format!("`scatter_add` indices must be i32 or i64, got {idx}"));
            }
            if upd.dtype != data.dtype || data.dtype == DType::Bool {
                return Err(format!(
                    "`scatter_add` needs numeric data and updates of one dtype, got {data} and {upd}"
                ));
            }
            let a = axis_of(*axis, data)?;
            let mut want = data.dims()[..a].to_vec();
            want.extend_from_slice(idx.dims());
            want.extend_from_slice(&data.dims()[a + 1..]);
            if upd.dims() != want.as_slice() {
                return Err(format!(
                    "`scatter_add` updates must have shape {} (data {data}, indices {idx}), got {upd}",
                    Shape(want)
                ));
            }
            one(data.clone())
        }
        Op::TopK { k, axis } => {
            let t = ins[0];
            if t.dtype == DType::Bool {
                return Err(format!("`topk` is not defined on {t}"));
            }
            let a = axis_of(*axis, t)?;
            if let Some(n) = t.dims()[a].as_const() {
                if *k as i64 > n {
                    return Err(format!("`topk` k={k} exceeds dimension {n} of {t}"));
                }
            }
            let mut dims = t.dims().to_vec();
            dims[a] = Dim::from(*k);
            Ok(vec![
                TensorType::new(t.dtype, dims.clone()),
                TensorType::new(DType::I64, dims),
            ])
        }
        Op::OneHot { depth, dtype } => {
            let t = ins[0];
            if !t.dtype.is_int() {
                return Err(format!("`one_hot` indices must be i32 or i64, got {t}"));
            }
            let mut dims = t.dims().to_vec();
            dims.push(Dim::from(*depth));
            one(TensorType::new(*dtype, dims))
        }
        Op::CumSum { axis, .. } => {
            let t = ins[0];
            if t.dtype == DType::Bool {
                return Err(format!("`cumsum` is not defined on {t}"));
            }
            axis_of(*axis, t)?;
            one(t.clone())
        }
        Op::Composite(c) => infer_composite(c, ins),
    }
}

fn infer_composite(c: &Composite, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    match c {
        Composite::Softmax { axis } | Composite::LogSoftmax { axis } => {
            let t = ins[0];
            if !t.dtype.is_float() {
                return Err(format!("`{}` needs a float tensor, got {t}", c.name()));
            }
            axis_of(*axis, t)?;
            Ok(vec![t.clone()])
        }
        Composite::RmsNorm { .. } => {
            let (x, w) = (ins[0], ins[1]);
            if !x.dtype.is_float() || w.dtype != x.dtype {
                return Err(format!(
                    "`rms_norm` needs float x and weight of one dtype, got {x} and {w}"
                ));
            }
            if x.rank() == 0 || w.rank() != 1 || w.dims()[0] != x.dims()[x.rank() - 1] {
                return Err(format!(
                    "`rms_norm` weight must be [last dim of x], got x {x} and weight {w}"
                ));
            }
            Ok(vec![x.clone()])
        }
        Composite::LightningAttention { block } => infer_lightning(*block, ins),
        Composite::LightningLayer { block, heads, .. } => infer_lightning_layer(*block, *heads, ins),
        Composite::FlashAttention { .. } => infer_flash(ins),
        Composite::FlashAttentionLse { .. } => {
            let o = infer_flash(ins).map_err(|e| e.replace("`flash_attention`", "`flash_attention_lse`"))?;
            let mut d = o[0].dims().to_vec();
            let last = d.len() - 1;
            d[last] = Dim::from(1);
            let lse = TensorType::new(o[0].dtype, d);
            Ok(vec![o[0].clone(), lse])
        }
        Composite::FlashAttentionRope { rotary, .. } => infer_flash_rope(*rotary, ins),
        Composite::MoeRouter { k } => infer_router(*k, ins),
        Composite::MoeDispatch { experts } => infer_dispatch(*experts, ins),
        Composite::GroupedMatmul { swiglu } => infer_grouped_matmul(*swiglu, ins),
        Composite::MoeCombine => infer_combine(ins),
        Composite::FlashAttentionGrad { .. } => infer_flash_grad(ins),
        Composite::GroupedMatmulWgrad => infer_grouped_wgrad(ins),
        Composite::Fused { body } => body.infer(ins),
        Composite::AllToAll { axis, mesh, over } | Composite::AllToAllStart { axis, mesh, over, .. } => {
            crate::composite::collective::infer_all_to_all(c.name(), *axis, mesh, *over, ins)
        }
        Composite::CollectiveWait => crate::composite::collective::infer_wait(ins),
        Composite::AllReduce { mesh, over } => {
            crate::composite::collective::infer_grouped(c.name(), None, mesh, *over, ins)
        }
        Composite::AllGather { axis, mesh, over }
        | Composite::ReduceScatter { axis, mesh, over }
        | Composite::ShardSlice { axis, mesh, over } => {
            crate::composite::collective::infer_grouped(c.name(), Some(*axis), mesh, *over, ins)
        }
        Composite::SendRecv { mesh, over, .. } => crate::composite::collective::infer_send_recv(mesh, *over, ins),
        Composite::AllToAllDispatch { mesh, over, .. } | Composite::AllToAllCombine { mesh, over, .. } => {
            crate::composite::collective::infer_exchange(c.name(), mesh, *over, ins)
        }
        Composite::OnRank { op, rank } => {
            let mesh = match &**op {
                Op::Composite(
                    Composite::AllReduce { mesh, .. }
                    | Composite::AllGather { mesh, .. }
                    | Composite::ReduceScatter { mesh, .. }
                    | Composite::AllToAll { mesh, .. }
                    | Composite::SendRecv { mesh, .. }
                    | Composite::ShardSlice { mesh, .. }
                    | Composite::AllToAllDispatch { mesh, .. }
                    | Composite::AllToAllCombine { mesh, .. },
                ) if !mesh.is_empty() => mesh,
                _ => {
                    return Err(format!(
                        "`on_rank` wraps a collective with its `mesh` (all_reduce, all_gather, reduce_scatter, \
                         all_to_all, all_to_all_dispatch, all_to_all_combine, send_recv, shard_slice), got `{}`",
                        op.name()
                    ))
                }
            };
            let ranks: usize = mesh.iter().product();
            if *rank >= ranks {
                return Err(format!("`on_rank`: rank {rank} of a mesh of {ranks} ranks"));
            }
            let whole: Vec<TensorType> = ins
                .iter()
                .map(|t| {
                    let mut d = vec![Dim::from(ranks)];
                    d.extend(t.dims().iter().cloned());
                    TensorType::new(t.dtype, d)
                })
                .collect();
            let refs: Vec<&TensorType> = whole.iter().collect();
            let outs = infer(op, &refs).map_err(|e| format!("`on_rank` of {e}"))?;
            Ok(outs
                .into_iter()
                .map(|t| TensorType::new(t.dtype, t.dims()[1..].to_vec()))
                .collect())
        }
        Composite::PerRank { op } => {
            let lead = ins.first().and_then(|t| t.dims().first().cloned());
            let Some(lead) = lead.filter(|l| ins.iter().all(|t| t.dims().first() == Some(l))) else {
                return Err(format!(
                    "`per_rank` needs inputs with one common leading axis, got {}",
                    fmt_types(ins)
                ));
            };
            let inner: Vec<TensorType> = ins
                .iter()
                .map(|t| TensorType::new(t.dtype, t.dims()[1..].to_vec()))
                .collect();
            let refs: Vec<&TensorType> = inner.iter().collect();
            let outs = infer(op, &refs).map_err(|e| format!("`per_rank` of {e}"))?;
            Ok(outs
                .into_iter()
                .map(|t| {
                    let mut d = vec![lead.clone()];
                    d.extend(t.dims().iter().cloned());
                    TensorType::new(t.dtype, d)
                })
                .collect())
        }
    }
}

/// `q, k: [batch..., T, D]`, `v: [batch..., T, Dv]`, `lam` broadcastable to `[batch..., 1, 1]`, one float dtype.
fn infer_lightning(block: usize, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (q, k, v, lam) = (ins[0], ins[1], ins[2], ins[3]);
    let all = fmt_types(ins);
    if block == 0 {
        return Err("`lightning_attention` needs block >= 1, got block=0".into());
    }
    if !q.dtype.is_float() || ins.iter().any(|t| t.dtype != q.dtype) {
        return Err(format!(
            "`lightning_attention` needs q, k, v and lam of one float dtype, got {all}"
        ));
    }
    let r = q.rank();
    if r < 2 || k.rank() != r || v.rank() != r {
        return Err(format!(
            "`lightning_attention` needs q, k: [batch..., T, D] and v: [batch..., T, Dv] of one rank >= 2, got q {q}, k {k}, v {v}"
        ));
    }
    if k.dims() != q.dims() {
        return Err(format!(
            "`lightning_attention` needs k of q's shape [batch..., T, D], got q {q} and k {k}"
        ));
    }
    if v.dims()[..r - 1] != q.dims()[..r - 1] {
        return Err(format!(
            "`lightning_attention` needs v: [batch..., T, Dv] with q's batch and T dimensions, got q {q} and v {v}"
        ));
    }
    let mut want = q.dims()[..r - 2].to_vec();
    want.extend([Dim::constant(1), Dim::constant(1)]);
    let want = Shape(want);
    let lam_ok = lam.rank() <= r
        && lam
            .dims()
            .iter()
            .zip(&want.0[r - lam.rank()..])
            .all(|(l, w)| l == w || l.is_one());
    if !lam_ok {
        return Err(format!(
            "`lightning_attention` decay rates lam must broadcast to [batch..., 1, 1] = {want} (from q {q}), got lam {lam}"
        ));
    }
    let mut dims = q.dims()[..r - 1].to_vec();
    dims.push(v.dims()[r - 1].clone());
    Ok(vec![TensorType::new(q.dtype, dims)])
}

/// `q: [qb..., T, D]`, `k: [kb..., S, D]`, `v: [vb..., S, Dv]`, one float dtype, batch axes broadcast.
fn infer_flash(ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    if !q.dtype.is_float() || ins.iter().any(|t| t.dtype != q.dtype) {
        return Err(format!(
            "`flash_attention` needs q, k and v of one float dtype, got {}",
            fmt_types(ins)
        ));
    }
    if q.rank() < 2 || k.rank() < 2 || v.rank() < 2 {
        return Err(format!(
            "`flash_attention` needs q: [..., T, D], k: [..., S, D], v: [..., S, Dv] of rank >= 2, got q {q}, k {k}, v {v}"
        ));
    }
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let (dq, dk) = (&qd[qd.len() - 1], &kd[kd.len() - 1]);
    if dq != dk {
        return Err(format!(
            "`flash_attention` needs q and k of one head dim: q {q}, k {k} (`{dq}` vs `{dk}`)"
        ));
    }
    let (sk, sv) = (&kd[kd.len() - 2], &vd[vd.len() - 2]);
    if sk != sv {
        return Err(format!(
            "`flash_attention` needs k and v of one length S: k {k}, v {v} (`{sk}` vs `{sv}`)"
        ));
    }
    let batch = |t: &TensorType| Shape(t.dims()[..t.rank() - 2].to_vec());
    let b = broadcast_shapes(&batch(q), &batch(k))
        .and_then(|b| broadcast_shapes(&b, &batch(v)))
        .map_err(|e| format!("`flash_attention` batch dimensions: {e} (q {q}, k {k}, v {v})"))?;
    let mut dims = b.0;
    dims.push(qd[qd.len() - 2].clone());
    dims.push(vd[vd.len() - 1].clone());
    Ok(vec![TensorType::new(q.dtype, dims)])
}

/// `logits: float [..., E]` → (`weights [..., k]`, `experts: i64 [..., k]`).
fn infer_router(k: usize, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let t = ins[0];
    if !t.dtype.is_float() || t.rank() == 0 {
        return Err(format!("`moe_router` needs float logits [..., E], got {t}"));
    }
    let e = &t.dims()[t.rank() - 1];
    if k == 0 {
        return Err(format!("`moe_router` needs k >= 1, got k=0 for logits {t}"));
    }
    if let Some(n) = e.as_const() {
        if k as i64 > n {
            return Err(format!("`moe_router` k={k} exceeds the {n} experts of logits {t}"));
        }
    }
    let mut dims = t.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = Dim::from(k);
    Ok(vec![
        TensorType::new(t.dtype, dims.clone()),
        TensorType::new(DType::I64, dims),
    ])
}

/// `x: [N, C]`, `experts: int [N, k]` → (`xs [N·k, C]`, `pos: i64 [N, k]`, `counts: i64 [E]`).
fn infer_dispatch(experts: usize, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (x, ex) = (ins[0], ins[1]);
    if experts == 0 {
        return Err("`moe_dispatch` needs experts >= 1, got experts=0".into());
    }
    if x.rank() != 2 || x.dtype == DType::Bool {
        return Err(format!("`moe_dispatch` needs numeric tokens x: [N, C], got {x}"));
    }
    if !ex.dtype.is_int() || ex.rank() != 2 || ex.dims()[0] != x.dims()[0] {
        return Err(format!(
            "`moe_dispatch` needs integer expert ids [N, k] with the N of x, got x {x} and experts {ex}"
        ));
    }
    let (n, c, k) = (&x.dims()[0], &x.dims()[1], &ex.dims()[1]);
    Ok(vec![
        TensorType::new(x.dtype, vec![n.clone() * k.clone(), c.clone()]),
        TensorType::new(DType::I64, ex.dims().to_vec()),
        TensorType::new(DType::I64, vec![Dim::from(experts)]),
    ])
}

/// `xs: [M, C]`, `counts: int [E]`, `w: [E, C, O]` → `[M, O]` (`[M, O/2]` with `swiglu`).
fn infer_grouped_matmul(swiglu: bool, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (xs, counts, w) = (ins[0], ins[1], ins[2]);
    if !xs.dtype.is_float() || w.dtype != xs.dtype {
        return Err(format!(
            "`grouped_matmul` needs float rows and weights of one dtype, got xs {xs} and w {w}"
        ));
    }
    if !counts.dtype.is_int() || counts.rank() != 1 {
        return Err(format!(
            "`grouped_matmul` needs integer group sizes counts: [E], got {counts}"
        ));
    }
    if xs.rank() != 2 || w.rank() != 3 {
        return Err(format!(
            "`grouped_matmul` needs xs: [M, C] and w: [E, C, O], got xs {xs} and w {w}"
        ));
    }
    if w.dims()[0] != counts.dims()[0] {
        return Err(format!(
            "`grouped_matmul` needs one weight per group: counts {counts}, w {w} (`{}` vs `{}`)",
            counts.dims()[0],
            w.dims()[0]
        ));
    }
    if w.dims()[1] != xs.dims()[1] {
        return Err(format!(
            "`grouped_matmul` inner dimensions differ: xs {xs} x w {w} (`{}` vs `{}`)",
            xs.dims()[1],
            w.dims()[1]
        ));
    }
    let o = &w.dims()[2];
    let out = if swiglu {
        o.div_exact(&Dim::constant(2))
            .ok_or_else(|| format!("`grouped_matmul[swiglu=true]` needs an even output width O = 2·I, got w {w}"))?
    } else {
        o.clone()
    };
    Ok(vec![TensorType::new(xs.dtype, vec![xs.dims()[0].clone(), out])])
}

/// `q, k, v` as for `flash_attention`, `do` of its output's type → `(dq, dk, dv)` of the types of `q, k, v`.
fn infer_flash_grad(ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let out = infer_flash(&ins[..3])
        .map_err(|e| e.replacen("`flash_attention`", "`flash_attention_grad`", 1))?
        .remove(0);
    if *ins[3] != out {
        return Err(format!(
            "`flash_attention_grad` needs `do` of the forward output's type {out}, got {}",
            ins[3]
        ));
    }
    Ok(vec![ins[0].clone(), ins[1].clone(), ins[2].clone()])
}

/// `xs: [M, C]`, `counts: int [E]`, `dy: [M, O]` (dtype of xs) → `[E, C, O]`.
fn infer_grouped_wgrad(ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (xs, counts, dy) = (ins[0], ins[1], ins[2]);
    if !xs.dtype.is_float() || dy.dtype != xs.dtype || xs.rank() != 2 || dy.rank() != 2 {
        return Err(format!(
            "`grouped_matmul_wgrad` needs float xs: [M, C] and dy: [M, O] of one dtype, got xs {xs} and dy {dy}"
        ));
    }
    if !counts.dtype.is_int() || counts.rank() != 1 {
        return Err(format!(
            "`grouped_matmul_wgrad` needs integer group sizes counts: [E], got {counts}"
        ));
    }
    if xs.dims()[0] != dy.dims()[0] {
        return Err(format!(
            "`grouped_matmul_wgrad` needs one row of dy per row of xs: xs {xs}, dy {dy} (`{}` vs `{}`)",
            xs.dims()[0],
            dy.dims()[0]
        ));
    }
    Ok(vec![TensorType::new(
        xs.dtype,
        vec![counts.dims()[0].clone(), xs.dims()[1].clone(), dy.dims()[1].clone()],
    )])
}

/// `ys: [M, C]`, `pos: int [N, k]`, `weights: [N, k]` (dtype of ys) → `[N, C]`.
fn infer_combine(ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (ys, pos, w) = (ins[0], ins[1], ins[2]);
    if !ys.dtype.is_float() || ys.rank() != 2 {
        return Err(format!("`moe_combine` needs float expert outputs ys: [M, C], got {ys}"));
    }
    if !pos.dtype.is_int() || pos.rank() != 2 {
        return Err(format!(
            "`moe_combine` needs integer row positions pos: [N, k], got {pos}"
        ));
    }
    if w.dtype != ys.dtype || w.dims() != pos.dims() {
        return Err(format!(
            "`moe_combine` needs weights of pos's shape [N, k] and ys's dtype, got ys {ys}, pos {pos}, weights {w}"
        ));
    }
    Ok(vec![TensorType::new(
        ys.dtype,
        vec![pos.dims()[0].clone(), ys.dims()[1].clone()],
    )])
}

/// Whether a unary op applies to the dtype (used by random-graph generators).
pub fn unary_accepts(u: UnaryOp, d: DType) -> bool {
    d.is_float() || (u.allows_int() && d.is_int())
}

/// `qkv: [B, T, 3·H·D]`, `lam` broadcastable to `[B, H, 1, 1]`, `norm_w: [H·D]`, `gate: [B, T, H·D]`.
fn infer_lightning_layer(block: usize, heads: usize, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let (qkv, lam, w, gate) = (ins[0], ins[1], ins[2], ins[3]);
    let all = fmt_types(ins);
    if block == 0 || heads == 0 {
        return Err(format!(
            "`lightning_layer` needs block >= 1 and heads >= 1, got block={block}, heads={heads}"
        ));
    }
    if !qkv.dtype.is_float() || ins.iter().any(|t| t.dtype != qkv.dtype) {
        return Err(format!(
            "`lightning_layer` needs qkv, lam, norm_w and gate of one float dtype, got {all}"
        ));
    }
    if qkv.rank() != 3 || gate.rank() != 3 || w.rank() != 1 {
        return Err(format!(
            "`lightning_layer` needs qkv [B, T, 3·H·D], norm_w [H·D], gate [B, T, H·D], got {all}"
        ));
    }
    let hd = w.dims()[0].clone();
    if hd.as_const().is_none() {
        return Err(format!("`lightning_layer` needs a constant H·D, got norm_w {w}"));
    }
    let three = Dim::from(3) * hd.clone();
    if qkv.dims()[2] != three || gate.dims()[2] != hd || qkv.dims()[..2] != gate.dims()[..2] {
        return Err(format!(
            "`lightning_layer`: qkv must be [B, T, 3·H·D] and gate [B, T, H·D] with H·D = `{hd}`, got {all}"
        ));
    }
    if hd.div_exact(&Dim::from(heads)).is_none() {
        return Err(format!("`lightning_layer`: {heads} heads do not divide H·D = `{hd}`"));
    }
    if lam.rank() > 4 || lam.dims().iter().rev().take(2).any(|d| !d.is_one()) {
        return Err(format!(
            "`lightning_layer`: lam must broadcast to [B, H, 1, 1], got {lam}"
        ));
    }
    Ok(vec![gate.clone()])
}

/// `flash_attention` inputs plus `cos, sin: [T, rotary]`, with `q` and `k` at the same `T` positions.
fn infer_flash_rope(rotary: usize, ins: &[&TensorType]) -> R<Vec<TensorType>> {
    let out = infer_flash(&ins[..3])?;
    let (q, k, cos, sin) = (ins[0], ins[1], ins[3], ins[4]);
    let (qd, kd) = (q.dims(), k.dims());
    let (t, s) = (&qd[qd.len() - 2], &kd[kd.len() - 2]);
    if t != s {
        return Err(format!(
            "`flash_attention_rope` rotates q and k with one table, so they need one length: q {q}, k {k}"
        ));
    }
    let d = &qd[qd.len() - 1];
    if rotary == 0 || !rotary.is_multiple_of(2) || d.as_const().is_none_or(|d| (rotary as i64) > d) {
        return Err(format!("`flash_attention_rope` needs a constant head dim D and an even rotary in 2..=D, got rotary={rotary} for q {q}"));
    }
    let want = TensorType::new(q.dtype, vec![t.clone(), Dim::from(rotary)]);
    if *cos != want || *sin != want {
        return Err(format!(
            "`flash_attention_rope` needs cos and sin of type {want}, got cos {cos}, sin {sin}"
        ));
    }
    Ok(out)
}
