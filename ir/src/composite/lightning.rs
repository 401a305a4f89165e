//! `lightning_attention`: causal linear attention with per-head exponential decay, in block form.
//!
//! Meaning (MiniMax-01, `MINIMAX.md` §2a): for `q, k: [batch..., T, D]`, `v: [batch..., T, Dv]` and decay rates
//! `λ = lam` (broadcastable to `[batch..., 1, 1]`, one rate per head),
//!
//! ```text
//! o_t = Σ_{u ≤ t} exp(−λ (t − u)) (q_t · k_u) v_u          [batch..., T, Dv]
//! ```
//!
//! The decomposition is the block ("lightning") algorithm with block size `b`, for a symbolic `T`:
//!
//! 1. `nb = ceildiv(T, b)`; pad q, k, v with zero rows along T to `nb·b` (no padding when `b` divides `T`),
//!    and view them as `[batch..., nb, b, D]`. Zero rows of `k` and `v` contribute nothing; the padded rows of
//!    the output are sliced off at the end.
//! 2. intra-block (left product): `O_intra = ((Q_i K_iᵀ) ⊙ M) V_i`, `M[j, j'] = exp(−λ (j − j'))` for `j ≥ j'`,
//!    else 0 (`[λ..., 1, b, b]`).
//! 3. per-block state contributions `S_i = (K_i ⊙ exp(−λ (b − 1 − j')))ᵀ V_i` (`[batch..., nb, D, Dv]`): the
//!    state block `i` alone leaves behind at its last row.
//! 4. the state entering block `i`: `P_i = Σ_{j < i} exp(−λ b (i − 1 − j)) S_j`, one matmul of the strictly
//!    lower-triangular block-decay matrix `A [λ..., nb, nb]` with `S` viewed as `[batch..., nb, D·Dv]`.
//! 5. inter-block (right product): `O_inter = (Q_i ⊙ exp(−λ (j + 1))) P_i`.
//! 6. `O = O_intra + O_inter`, viewed as `[batch..., nb·b, Dv]`, sliced back to `T` rows.
//!
//! Every decay factor is `exp(−λ·n)` for a non-negative integer `n`, computed directly (never as a power of a
//! rounded `γ = exp(−λ)`), and masked entries are chosen by `select`, so a large `λ·n` that overflows in the
//! masked-out half never leaks.

use crate::dim::Dim;
use crate::error::Result;
use crate::graph::{Graph, Value};
use crate::op::CmpOp;

/// Appends the decomposition of `lightning_attention[block](q, k, v, lam)` to `g`.
pub fn decompose(g: &mut Graph, block: usize, q: Value, k: Value, v: Value, lam: Value) -> Result<Value> {
    let qd = g.dims(q).to_vec();
    let r = qd.len();
    let dt = g.dtype(q);
    let batch = qd[..r - 2].to_vec();
    let t = qd[r - 2].clone();
    let dk = qd[r - 1].clone();
    let dv = g.dims(v)[r - 1].clone();
    let b = Dim::from(block);
    let nb = t.ceil_div(&b);
    let padded = nb.clone() * b.clone();
    let pad = padded.clone() - t.clone();
    let with = |last: &[Dim]| -> Vec<Dim> { batch.iter().chain(last).cloned().collect() };

    // 1. pad along T to nb·b and split T into [nb, b]
    let pad_rows = |g: &mut Graph, x: Value, width: &Dim| -> Result<Value> {
        if pad.as_const() == Some(0) {
            return Ok(x);
        }
        let z = g.full(0.0, dt, with(&[pad.clone(), width.clone()]))?;
        g.concat(&[x, z], r as i64 - 2)
    };
    let qp = pad_rows(g, q, &dk)?;
    let kp = pad_rows(g, k, &dk)?;
    let vp = pad_rows(g, v, &dv)?;
    let qb = g.reshape(qp, with(&[nb.clone(), b.clone(), dk.clone()]))?;
    let kb = g.reshape(kp, with(&[nb.clone(), b.clone(), dk.clone()]))?;
    let vb = g.reshape(vp, with(&[nb.clone(), b.clone(), dv.clone()]))?;

    // λ at rank r ([λ..., 1, 1]) for [.., nb, nb] factors, and at rank r + 1 ([λ..., 1, 1, 1]) for per-block ones
    let ld = g.dims(lam).to_vec();
    let mut lam_r: Vec<Dim> = vec![Dim::from(1); r - ld.len()];
    lam_r.extend(ld);
    let lam_blocks = g.reshape(lam, lam_r.clone())?;
    let mut lam_r1 = lam_r;
    lam_r1.insert(r - 2, Dim::from(1));
    let lam_rows = g.reshape(lam, lam_r1)?;
    // exp(−λ·n) for a tensor n of non-negative distances
    let decay = |g: &mut Graph, lam: Value, n: Value| -> Result<Value> {
        let ln = g.mul(lam, n)?;
        let nln = g.neg(ln)?;
        g.exp(nln)
    };
    let zero = g.scalar(0.0, dt)?;

    // 2. intra-block: ((Q_i K_iᵀ) ⊙ M) V_i
    let j = g.iota(dt, vec![b.clone(), b.clone()], 0)?;
    let jp = g.iota(dt, vec![b.clone(), b.clone()], 1)?;
    let dist = g.sub(j, jp)?;
    let causal = g.compare(CmpOp::Ge, j, jp)?;
    let m_decay = decay(g, lam_rows, dist)?; // [λ..., 1, b, b]
    let mask = g.select(causal, m_decay, zero)?;
    let kbt = g.transpose(kb, -2, -1)?;
    let scores = g.matmul(qb, kbt)?; // [batch..., nb, b, b]
    let masked = g.mul(scores, mask)?;
    let o_intra = g.matmul(masked, vb)?; // [batch..., nb, b, Dv]

    // 3. per-block state contributions S_i = (K_i ⊙ exp(−λ(b − 1 − j')))ᵀ V_i
    let row = g.iota(dt, vec![b.clone(), Dim::from(1)], 0)?; // j
    let last = g.scalar((block - 1) as f64, dt)?;
    let to_end = g.sub(last, row)?; // b − 1 − j'
    let k_decay = decay(g, lam_rows, to_end)?; // [λ..., 1, b, 1]
    let kw = g.mul(kb, k_decay)?;
    let kwt = g.transpose(kw, -2, -1)?;
    let s = g.matmul(kwt, vb)?; // [batch..., nb, D, Dv]
    let dkv = dk.clone() * dv.clone();
    let s = g.reshape(s, with(&[nb.clone(), dkv]))?;

    // 4. states entering each block: P = A S, A[i, j] = exp(−λ b (i − 1 − j)) for j < i, else 0
    let bi = g.iota(dt, vec![nb.clone(), nb.clone()], 0)?;
    let bj = g.iota(dt, vec![nb.clone(), nb.clone()], 1)?;
    let earlier = g.compare(CmpOp::Gt, bi, bj)?;
    let gap = g.sub(bi, bj)?;
    let gap = g.add_scalar(gap, -1.0)?; // i − 1 − j
    let gap = g.scale(gap, block as f64)?; // b (i − 1 − j)
    let a_decay = decay(g, lam_blocks, gap)?; // [λ..., nb, nb]
    let a = g.select(earlier, a_decay, zero)?;
    let p = g.matmul(a, s)?; // [batch..., nb, D·Dv]
    let p = g.reshape(p, with(&[nb.clone(), dk, dv.clone()]))?;

    // 5. inter-block: (Q_i ⊙ exp(−λ(j + 1))) P_i
    let row1 = g.add_scalar(row, 1.0)?; // j + 1
    let q_decay = decay(g, lam_rows, row1)?; // [λ..., 1, b, 1]
    let qw = g.mul(qb, q_decay)?;
    let o_inter = g.matmul(qw, p)?; // [batch..., nb, b, Dv]

    // 6. combine, merge the blocks, drop the padding
    let o = g.add(o_intra, o_inter)?;
    let o = g.reshape(o, with(&[padded, dv]))?;
    if pad.as_const() == Some(0) {
        Ok(o)
    } else {
        g.slice(o, r as i64 - 2, 0, t)
    }
}

/// Appends the decomposition of `lightning_layer[block, heads, eps](qkv, lam, norm_w, gate)` to `g`: SiLU on
/// the fused projection, per-head interleaved split into q, k, v, `lightning_attention[block]`, heads merged,
/// RMSNorm over all heads, sigmoid output gate (MiniMax-01 §2a steps 1–8).
#[allow(clippy::too_many_arguments)] // one argument per input of the composite, in its order
pub fn decompose_layer(
    g: &mut Graph,
    block: usize,
    heads: usize,
    eps: f64,
    qkv: Value,
    lam: Value,
    norm_w: Value,
    gate: Value,
) -> Result<Value> {
    let dims = g.dims(qkv).to_vec();
    let (b, t) = (dims[0].clone(), dims[1].clone());
    let hd = g.dims(norm_w)[0].clone();
    let d = hd.div_exact(&Dim::from(heads)).unwrap_or_else(|| Dim::from(1));
    let dc = d.as_const().unwrap_or(1).max(0) as usize;
    let x = g.silu(qkv)?;
    let x = g.reshape(
        x,
        vec![b.clone(), t.clone(), Dim::from(heads), Dim::from(3) * d.clone()],
    )?;
    let x = g.permute(x, &[0, 2, 1, 3])?;
    let q = g.slice(x, -1, 0, dc)?;
    let k = g.slice(x, -1, dc, 2 * dc)?;
    let v = g.slice(x, -1, 2 * dc, 3 * dc)?;
    let o = g.op1(
        crate::Op::Composite(crate::Composite::LightningAttention { block }),
        &[q, k, v, lam],
    )?;
    let o = g.permute(o, &[0, 2, 1, 3])?;
    let o = g.reshape(o, vec![b, t, hd])?;
    let y = g.rms_norm(o, norm_w, eps)?;
    let s = g.sigmoid(gate)?;
    g.mul(s, y)
}
