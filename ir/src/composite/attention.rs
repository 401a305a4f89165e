//! `flash_attention`: softmax attention, decomposed into its plain (materialised scores) form; and its backward,
//! `flash_attention_grad`.
//!
//! `o = softmax(q kᵀ · scale + mask) v` for `q: [..., T, D]`, `k: [..., S, D]`, `v: [..., S, Dv]` (batch axes
//! broadcast as in `matmul`, so grouped-query attention is `q: [B, KVH, G, T, D]` against
//! `k, v: [B, KVH, 1, S, D]`). With `causal`, query `t` sees key `u` iff `u ≤ t + (S − T)`: the queries are the
//! last `T` positions of the `S` keys, so `T = S` is the ordinary causal mask and a decode step (`T = 1`) sees
//! every key. A query that sees no key (`t < T − S`) gives NaN, as a softmax over only −∞ does.

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::{Graph, Value};
use crate::op::CmpOp;

/// Appends the decomposition of `flash_attention[scale, causal](q, k, v)` to `g`.
pub fn decompose(g: &mut Graph, scale: f64, causal: bool, q: Value, k: Value, v: Value) -> Result<Value> {
    let p = probabilities(g, scale, causal, q, k)?;
    g.matmul(p, v)
}

/// Appends the decomposition of `flash_attention_lse[scale, causal](q, k, v)` to `g`: `flash_attention`'s output
/// and the log-sum-exp of each query's masked, scaled scores (`[batch..., T, 1]`): `m + log(Σ exp(s − m))`,
/// `m` the row's maximum. Two outputs merge by `lse = log(e^lse₁ + e^lse₂)`, `o = o₁·e^(lse₁−lse) + o₂·e^(lse₂−lse)`
/// (ring attention's rounds).
pub fn decompose_lse(g: &mut Graph, scale: f64, causal: bool, q: Value, k: Value, v: Value) -> Result<(Value, Value)> {
    let s = scores(g, scale, causal, q, k)?;
    let m = g.max(s, &[-1], true)?;
    let x = g.sub(s, m)?;
    let e = g.exp(x)?;
    let l = g.sum(e, &[-1], true)?;
    let pv = g.matmul(e, v)?;
    let o = g.div(pv, l)?;
    let ll = g.log(l)?;
    let lse = g.add(m, ll)?;
    Ok((o, lse))
}

/// `softmax(q kᵀ · scale + mask)`, `[batch..., T, S]`.
fn probabilities(g: &mut Graph, scale: f64, causal: bool, q: Value, k: Value) -> Result<Value> {
    let s = scores(g, scale, causal, q, k)?;
    super::softmax(g, s, -1)
}

/// `q kᵀ · scale + mask`, `[batch..., T, S]`.
fn scores(g: &mut Graph, scale: f64, causal: bool, q: Value, k: Value) -> Result<Value> {
    let kt = g.transpose(k, -2, -1)?;
    let s = g.matmul(q, kt)?; // [batch..., T, S]
    let s = g.scale(s, scale)?;
    let s = if causal {
        let qd = g.dims(q).to_vec();
        let kd = g.dims(k).to_vec();
        let (t, sl) = (qd[qd.len() - 2].clone(), kd[kd.len() - 2].clone());
        // u ≤ t + (S − T)  ⟺  S − 1 − u ≥ T − 1 − t: both sides count from the end, so no symbolic scalar
        // `S − T` is needed
        let ones_s = g.full(1.0, DType::I64, vec![sl])?;
        let after_u = g.cumsum(ones_s, 0, true, true)?; // [S]: S − 1 − u
        let ones_t = g.full(1.0, DType::I64, vec![t, 1.into()])?;
        let after_t = g.cumsum(ones_t, 0, true, true)?; // [T, 1]: T − 1 − t
        let visible = g.compare(CmpOp::Ge, after_u, after_t)?; // [T, S]
        let dt = g.dtype(s);
        let zero = g.scalar(0.0, dt)?;
        let ninf = g.scalar(f64::NEG_INFINITY, dt)?;
        let bias = g.select(visible, zero, ninf)?;
        g.add(s, bias)?
    } else {
        s
    };
    Ok(s)
}

/// Appends the decomposition of `flash_attention_grad[scale, causal](q, k, v, do)` to `g`; returns
/// `(dq, dk, dv)`. The probabilities `P` are recomputed from `q` and `k` (the forward keeps only its output), then
///
/// ```text
/// dV = Pᵀ dO      dP = dO Vᵀ      dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale      dQ = dS K      dK = dSᵀ Q
/// ```
///
/// each summed over the batch axes its input was broadcast along (grouped-query attention's shared keys).
pub fn decompose_grad(
    g: &mut Graph,
    scale: f64,
    causal: bool,
    q: Value,
    k: Value,
    v: Value,
    d_out: Value,
) -> Result<(Value, Value, Value)> {
    let p = probabilities(g, scale, causal, q, k)?; // [batch..., T, S]
    let pt = g.transpose(p, -2, -1)?;
    let dv = g.matmul(pt, d_out)?; // [batch..., S, Dv]
    let vt = g.transpose(v, -2, -1)?;
    let dp = g.matmul(d_out, vt)?; // [batch..., T, S]
    let pdp = g.mul(p, dp)?;
    let delta = g.sum(pdp, &[-1], true)?; // [batch..., T, 1]
    let centred = g.sub(dp, delta)?;
    let ds = g.mul(p, centred)?;
    let ds = g.scale(ds, scale)?;
    let dq = g.matmul(ds, k)?; // [batch..., T, D]
    let dst = g.transpose(ds, -2, -1)?;
    let dk = g.matmul(dst, q)?; // [batch..., S, D]
    let dq = sum_to(g, dq, q)?;
    let dk = sum_to(g, dk, k)?;
    let dv = sum_to(g, dv, v)?;
    Ok((dq, dk, dv))
}

/// `x` summed over the axes broadcasting stretched to reach its shape from `like`'s.
fn sum_to(g: &mut Graph, x: Value, like: Value) -> Result<Value> {
    let target = g.dims(like).to_vec();
    let mut x = x;
    let r = g.rank(x);
    if r > target.len() {
        let lead: Vec<i64> = (0..(r - target.len()) as i64).collect();
        x = g.sum(x, &lead, false)?;
    }
    let dims = g.dims(x).to_vec();
    let axes: Vec<i64> = (0..target.len())
        .filter(|&i| target[i].is_one() && !dims[i].is_one())
        .map(|i| i as i64)
        .collect();
    if axes.is_empty() {
        Ok(x)
    } else {
        g.sum(x, &axes, true)
    }
}

/// Rotary embedding of `x: [..., T, D]` on its first `rotary` dims with tables `cos, sin: [T, rotary]`:
/// `x_r · cos + rotate_half(x_r) · sin`, `rotate_half(a | b) = (−b | a)`; the other dims pass through.
pub fn rope(g: &mut Graph, rotary: usize, x: Value, cos: Value, sin: Value) -> Result<Value> {
    let d = g.dims(x).last().and_then(|d| d.as_const()).unwrap_or(rotary as i64) as usize;
    let (xr, pass) = if rotary == d {
        (x, None)
    } else {
        (g.slice(x, -1, 0, rotary)?, Some(g.slice(x, -1, rotary, d)?))
    };
    let h = rotary / 2;
    let x1 = g.slice(xr, -1, 0, h)?;
    let x2 = g.slice(xr, -1, h, rotary)?;
    let nx2 = g.neg(x2)?;
    let rot = g.concat(&[nx2, x1], -1)?;
    let a = g.mul(xr, cos)?;
    let b = g.mul(rot, sin)?;
    let y = g.add(a, b)?;
    match pass {
        Some(p) => g.concat(&[y, p], -1),
        None => Ok(y),
    }
}
