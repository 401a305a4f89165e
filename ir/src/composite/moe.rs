//! The MoE composites: route, dispatch, grouped matmul, combine (MiniMax-01, `MINIMAX.md` §3).
//!
//! Together they compute a top-k MoE without running every expert on every token:
//!
//! ```text
//! (weights, experts)  = moe_router[k](logits)                     [N, k], i64 [N, k]
//! (xs, pos, counts)   = moe_dispatch[experts=E](x, experts)        [N·k, C], i64 [N, k], i64 [E]
//! h                   = grouped_matmul[swiglu=true](xs, counts, w13ᵀ)   [N·k, I]   (w13ᵀ: [E, C, 2I])
//! ys                  = grouped_matmul[swiglu=false](h, counts, w2ᵀ)    [N·k, C]   (w2ᵀ: [E, I, C])
//! out                 = moe_combine(ys, pos, weights)              [N, C]
//! ```
//!
//! Dispatch sorts the `N·k` (token, slot) rows by expert without a sort: a row's place is the number of rows
//! of lower experts (an exclusive cumsum of the per-expert counts) plus its rank among the rows of its own
//! expert (an exclusive cumsum down the one-hot matrix), which keeps rows of one expert in (token, slot) order.

use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::graph::{Graph, Value};
use crate::op::CmpOp;

/// `moe_router[k](logits)`: `p = softmax(logits)` over the last axis, its top `k` (ties to the lower expert),
/// renormalised to sum to 1. Returns (weights, experts).
pub fn router(g: &mut Graph, k: usize, logits: Value) -> Result<(Value, Value)> {
    let p = super::softmax(g, logits, -1)?;
    let (w, e) = g.topk(p, k, -1)?;
    let s = g.sum(w, &[-1], true)?;
    Ok((g.div(w, s)?, e))
}

/// `moe_dispatch[experts](x, ids)`: returns (xs, pos, counts). An expert id outside `[0, experts)` is a
/// run-time error (of the gather of its offset).
pub fn dispatch(g: &mut Graph, experts: usize, x: Value, ids: Value) -> Result<(Value, Value, Value)> {
    let xd = g.dims(x).to_vec();
    let id_dims = g.dims(ids).to_vec();
    let (n, c) = (xd[0].clone(), xd[1].clone());
    let nk = n.clone() * id_dims[1].clone();
    let ids = g.cast(ids, DType::I64)?;
    let flat = g.reshape(ids, vec![nk.clone()])?; // row r = n·k + slot
    let oh = g.one_hot(flat, experts, DType::I64)?; // [N·k, E]
                                                    // rank of each row among the rows of its expert, in row order
    let before = g.cumsum(oh, 0, true, false)?;
    let before = g.mul(before, oh)?;
    let rank = g.sum(before, &[1], false)?; // [N·k]
    let counts = g.sum(oh, &[0], false)?; // [E]
    let offsets = g.cumsum(counts, 0, true, false)?; // [E]: rows of lower experts
    let start = g.gather(offsets, flat, 0)?; // [N·k]
    let pos_flat = g.add(start, rank)?;
    let pos = g.reshape(pos_flat, id_dims.clone())?;
    // xs[pos[r]] = x[token of r]
    let token = g.iota(DType::I64, id_dims, 0)?;
    let token = g.reshape(token, vec![nk.clone()])?;
    let rows = g.gather(x, token, 0)?; // [N·k, C]
    let dt = g.dtype(x);
    let zeros = g.full(0.0, dt, vec![nk, c])?;
    let xs = g.scatter_add(zeros, pos_flat, rows, 0)?;
    Ok((xs, pos, counts))
}

/// The group of each of `m` rows in consecutive groups of `counts[e]` rows: `e(r) = Σ_e (r ≥ end_e)` with `end`
/// the inclusive cumsum of `counts`, `i64 [M]` (`E` for a row past every group).
pub fn row_groups(g: &mut Graph, counts: Value, m: &Dim) -> Result<Value> {
    let counts = g.cast(counts, DType::I64)?;
    let end = g.cumsum(counts, 0, false, false)?; // [E]
    let row = g.iota(DType::I64, vec![m.clone(), Dim::from(1)], 0)?; // [M, 1]
    let past = g.compare(CmpOp::Ge, row, end)?; // [M, E]
    let past = g.cast(past, DType::I64)?;
    g.sum(past, &[1], false)
}

/// `grouped_matmul[swiglu](xs, counts, w)`: row `r` is multiplied by `w[e(r)]`, `e(r) = Σ_e (r ≥ end_e)` with
/// `end` the inclusive cumsum of `counts`. A row past the sum of `counts` belongs to no group and gives zeros
/// (the padding of a routed exchange's receive buffer: a kernel computes only the counted rows).
pub fn grouped_matmul(g: &mut Graph, swiglu: bool, xs: Value, counts: Value, w: Value) -> Result<Value> {
    let xd = g.dims(xs).to_vec();
    let (m, c) = (xd[0].clone(), xd[1].clone());
    let o = g.dims(w)[2].clone();
    let group = row_groups(g, counts, &m)?; // [M]
                                            // rows past every group: weight 0 read, the row zeroed
    let total = g.cast(counts, DType::I64)?;
    let total = g.sum(total, &[0], false)?;
    let row = g.iota(DType::I64, vec![m.clone()], 0)?;
    let member = g.compare(CmpOp::Lt, row, total)?; // [M]
    let zero = g.scalar(0.0, DType::I64)?;
    let group = g.select(member, group, zero)?;
    let wr = g.gather(w, group, 0)?; // [M, C, O]
    let x3 = g.reshape(xs, vec![m.clone(), Dim::from(1), c])?;
    let y = g.matmul(x3, wr)?; // [M, 1, O]
    let y = g.reshape(y, vec![m.clone(), o.clone()])?;
    let member = g.reshape(member, vec![m, Dim::from(1)])?;
    let none = g.scalar(0.0, g.dtype(y))?;
    if !swiglu {
        return g.select(member, y, none);
    }
    let i = o.div_exact(&Dim::from(2)).ok_or_else(|| {
        IrError::Graph(format!(
            "`grouped_matmul[swiglu=true]` needs an even output width, got `{o}`"
        ))
    })?;
    let gate = g.slice(y, -1, 0, i.clone())?;
    let up = g.slice(y, -1, i, o)?;
    let act = g.silu(gate)?;
    let y = g.mul(act, up)?;
    g.select(member, y, none)
}

/// `grouped_matmul_wgrad(xs, counts, dy)`: `dw[e] = Σ_{rows m of group e} xs[m]ᵀ dy[m]`, `[E, C, O]`, as one
/// batched matmul of the rows masked per group (`[E, C, M] · [M, O]`: the meaning, not how it runs).
pub fn grouped_wgrad(g: &mut Graph, xs: Value, counts: Value, dy: Value) -> Result<Value> {
    let m = g.dims(xs)[0].clone();
    let e = g.dims(counts)[0].clone();
    let dt = g.dtype(xs);
    let group = row_groups(g, counts, &m)?; // [M]: E for a row past every group
    let group = g.reshape(group, vec![Dim::from(1), m.clone()])?;
    let ids = g.iota(DType::I64, vec![e, Dim::from(1)], 0)?; // [E, 1]
    let member = g.compare(CmpOp::Eq, group, ids)?; // [E, M]
    let member = g.cast(member, dt)?;
    let me = g.dims(member).to_vec();
    let member = g.reshape(member, vec![me[0].clone(), m, Dim::from(1)])?; // [E, M, 1]
    let xe = g.mul(member, xs)?; // [E, M, C]
    let xet = g.transpose(xe, -2, -1)?; // [E, C, M]
    g.matmul(xet, dy)
}

/// `moe_combine(ys, pos, weights)`: `out[n] = Σ_slot weights[n, slot] · ys[pos[n, slot]]`.
pub fn combine(g: &mut Graph, ys: Value, pos: Value, weights: Value) -> Result<Value> {
    let pd = g.dims(pos).to_vec();
    let picked = g.gather(ys, pos, 0)?; // [N, k, C]
    let w3 = g.reshape(weights, vec![pd[0].clone(), pd[1].clone(), Dim::from(1)])?;
    let weighted = g.mul(picked, w3)?;
    g.sum(weighted, &[1], false)
}
