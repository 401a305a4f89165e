//! Decompositions of composite ops into primitives.
//!
//! A composite's meaning is its decomposition: the interpreter runs it, and rewrite rules that introduce a
//! composite are tested against it. Every decomposition works on symbolic shapes (the interpreter builds it
//! for the concrete shapes of each run, a pass may build it for the symbolic ones) and produces exactly the
//! output types [`crate::infer::infer`] gives.
//!
//! - this module: `softmax`, `log_softmax`, `rms_norm`, and the dispatch over all composites;
//! - [`attention`]: `flash_attention` (the plain softmax form) and its backward `flash_attention_grad`;
//! - [`lightning`]: `lightning_attention` (the block form of MiniMax-01's lightning attention);
//! - [`moe`]: `moe_router`, `moe_dispatch`, `grouped_matmul`, `moe_combine`, and `grouped_matmul_wgrad` (the
//!   weight gradient of `grouped_matmul`);
//! - [`fused`]: `fused` (a fused kernel: its body graph, inlined);
//! - [`collective`]: `all_to_all`, `all_to_all_start`, `collective_wait`, `all_reduce`, `all_gather`,
//!   `reduce_scatter`, `send_recv`, `shard_slice` (ranks simulated on a leading axis).

pub mod attention;
pub mod collective;
pub mod fused;
pub mod lightning;
pub mod moe;

use crate::error::{IrError, Result};
use crate::graph::{Graph, Value};
use crate::op::Composite;

impl Composite {
    /// Appends the primitive decomposition of `self` applied to `inputs` to `g`; returns the outputs.
    ///
    /// `inputs` must type-check for `self` (see [`crate::infer::infer`]); ill-typed inputs give an error from
    /// whichever primitive first refuses them.
    pub fn decompose(&self, g: &mut Graph, inputs: &[Value]) -> Result<Vec<Value>> {
        if let Some(n) = self.num_inputs() {
            if inputs.len() != n {
                return Err(IrError::Graph(format!(
                    "decomposing `{}`: expects {n} input(s), got {}",
                    self.name(),
                    inputs.len()
                )));
            }
        }
        match self {
            Composite::Softmax { axis } => Ok(vec![softmax(g, inputs[0], *axis)?]),
            Composite::LogSoftmax { axis } => {
                let x = inputs[0];
                let m = g.max(x, &[*axis], true)?;
                let z = g.sub(x, m)?;
                let e = g.exp(z)?;
                let s = g.sum(e, &[*axis], true)?;
                let l = g.log(s)?;
                Ok(vec![g.sub(z, l)?])
            }
            Composite::RmsNorm { eps } => {
                let (x, w) = (inputs[0], inputs[1]);
                let sq = g.mul(x, x)?;
                let ms = g.mean(sq, &[-1], true)?;
                let ms = g.add_scalar(ms, *eps)?;
                let r = g.rsqrt(ms)?;
                let y = g.mul(x, r)?;
                Ok(vec![g.mul(y, w)?])
            }
            Composite::LightningAttention { block } => Ok(vec![lightning::decompose(
                g, *block, inputs[0], inputs[1], inputs[2], inputs[3],
            )?]),
            Composite::LightningLayer { block, heads, eps } => Ok(vec![lightning::decompose_layer(
                g, *block, *heads, *eps, inputs[0], inputs[1], inputs[2], inputs[3],
            )?]),
            Composite::FlashAttentionRope { scale, causal, rotary } => {
                let q = attention::rope(g, *rotary, inputs[0], inputs[3], inputs[4])?;
                let k = attention::rope(g, *rotary, inputs[1], inputs[3], inputs[4])?;
                Ok(vec![attention::decompose(g, *scale, *causal, q, k, inputs[2])?])
            }
            Composite::FlashAttentionLse { scale, causal } => {
                let (o, lse) = attention::decompose_lse(g, *scale, *causal, inputs[0], inputs[1], inputs[2])?;
                Ok(vec![o, lse])
            }
            Composite::FlashAttention { scale, causal } => Ok(vec![attention::decompose(
                g, *scale, *causal, inputs[0], inputs[1], inputs[2],
            )?]),
            Composite::MoeRouter { k } => {
                let (w, e) = moe::router(g, *k, inputs[0])?;
                Ok(vec![w, e])
            }
            Composite::MoeDispatch { experts } => {
                let (xs, pos, counts) = moe::dispatch(g, *experts, inputs[0], inputs[1])?;
                Ok(vec![xs, pos, counts])
            }
            Composite::GroupedMatmul { swiglu } => {
                Ok(vec![moe::grouped_matmul(g, *swiglu, inputs[0], inputs[1], inputs[2])?])
            }
            Composite::MoeCombine => Ok(vec![moe::combine(g, inputs[0], inputs[1], inputs[2])?]),
            Composite::FlashAttentionGrad { scale, causal } => {
                let (dq, dk, dv) =
                    attention::decompose_grad(g, *scale, *causal, inputs[0], inputs[1], inputs[2], inputs[3])?;
                Ok(vec![dq, dk, dv])
            }
            Composite::GroupedMatmulWgrad => Ok(vec![moe::grouped_wgrad(g, inputs[0], inputs[1], inputs[2])?]),
            Composite::Fused { body } => fused::inline_all(g, body, inputs),
            Composite::AllToAll { axis, mesh, .. } | Composite::AllToAllStart { axis, mesh, .. } if mesh.is_empty() => {
                Ok(vec![collective::all_to_all(g, *axis, inputs[0])?])
            }
            Composite::CollectiveWait => Ok(vec![inputs[0]]),
            Composite::AllReduce { mesh, over } => Ok(vec![collective::grouped(
                g,
                "all_reduce",
                collective::Within::Reduce,
                mesh,
                *over,
                inputs[0],
            )?]),
            Composite::AllToAll { axis, mesh, over }
            | Composite::AllToAllStart { axis, mesh, over, .. }
            | Composite::AllGather { axis, mesh, over }
            | Composite::ReduceScatter { axis, mesh, over }
            | Composite::ShardSlice { axis, mesh, over } => {
                let a = collective::per_rank_axis(self.name(), *axis, g.rank(inputs[0]))?;
                let within = match self {
                    Composite::AllGather { .. } => collective::Within::Gather(a),
                    Composite::ShardSlice { .. } => collective::Within::Slice(a),
                    Composite::ReduceScatter { .. } => collective::Within::Scatter(a),
                    _ => collective::Within::Exchange(a),
                };
                Ok(vec![collective::grouped(
                    g,
                    self.name(),
                    within,
                    mesh,
                    *over,
                    inputs[0],
                )?])
            }
            Composite::AllToAllDispatch { mesh, over, .. } => {
                let (y, got) = collective::dispatch_exchange(g, mesh, *over, inputs[0], inputs[1])?;
                Ok(vec![y, got])
            }
            Composite::AllToAllCombine { mesh, over, .. } => Ok(vec![collective::combine_exchange(
                g, mesh, *over, inputs[0], inputs[1],
            )?]),
            Composite::OnRank { op, .. } => Err(IrError::Graph(format!(
                "`on_rank[op={}]` has no decomposition: a collective transport runs it",
                op.name()
            ))),
            Composite::PerRank { op } => {
                let lead = g.dims(inputs[0])[0].as_const().ok_or_else(|| {
                    IrError::Graph("decomposing `per_rank`: the leading axis must have a constant size".into())
                })? as usize;
                let mut outs: Vec<Vec<Value>> = Vec::new();
                for r in 0..lead {
                    let ins: Vec<Value> = inputs
                        .iter()
                        .map(|&x| {
                            let s = g.slice(x, 0, r as i64, r as i64 + 1)?;
                            let d = g.dims(s)[1..].to_vec();
                            g.reshape(s, d)
                        })
                        .collect::<Result<_>>()?;
                    let ys = g.op((**op).clone(), &ins)?;
                    for (i, y) in ys.into_iter().enumerate() {
                        let mut d = vec![crate::Dim::from(1)];
                        d.extend(g.dims(y).iter().cloned());
                        let y = g.reshape(y, d)?;
                        if outs.len() <= i {
                            outs.push(Vec::new());
                        }
                        outs[i].push(y);
                    }
                }
                outs.iter().map(|ys| g.concat(ys, 0)).collect()
            }
            Composite::SendRecv { shift, mesh, over } => Ok(vec![collective::grouped(
                g,
                "send_recv",
                collective::Within::Shift(*shift),
                mesh,
                *over,
                inputs[0],
            )?]),
        }
    }
}

/// `exp(x − max) / sum(exp(x − max))` along `axis`, in primitives.
pub(crate) fn softmax(g: &mut Graph, x: Value, axis: i64) -> Result<Value> {
    let m = g.max(x, &[axis], true)?;
    let z = g.sub(x, m)?;
    let e = g.exp(z)?;
    let s = g.sum(e, &[axis], true)?;
    g.div(e, s)
}
