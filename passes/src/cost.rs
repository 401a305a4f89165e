//! The roofline cost model: each kernel costs `max(FLOPs / peak, bytes / bandwidth) + launch overhead`, plus
//! communicated bytes over the link bandwidth, on a named [`Target`].
//!
//! Sizes are symbolic in the IR; the model evaluates them under a [`CostModel::env`] of representative symbol
//! values (default `B = 1`, `T = P = 4096`, any other symbol 1024), so one compile is costed at the shapes that
//! matter. What is a kernel is [`crate::classify`]'s to say: leaves, views (reshape, broadcast, slice) and
//! generated values (full, iota) cost nothing; a consumer kernel reads them in place.

use crate::classify::{classify, NodeClass};
use fulgur_ir::{Composite, DType, Op, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Peak rates of a device. FLOP/s and bytes/s; seconds per launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// Dense bf16/f16 tensor-core peak.
    pub matmul_flops_bf16: f64,
    /// Dense TF32 tensor-core peak: f32 matmuls are costed at it only when TF32 is allowed
    /// ([`CostModel::tf32`]); the numerics contract (`docs/numerics.md`) computes f32 in IEEE f32 otherwise.
    pub matmul_flops_tf32: f64,
    /// Non-matmul (vector) f32 peak.
    pub vector_flops: f64,
    /// Device memory bandwidth.
    pub mem_bw: f64,
    /// Bandwidth to a peer for collectives (per direction).
    pub link_bw: f64,
    /// Fixed cost of one kernel launch.
    pub launch_s: f64,
    /// Where the numbers come from.
    pub source: String,
}

const T: f64 = 1e12;

impl Target {
    /// Every built-in target. Numbers are the vendors' published dense peaks (no sparsity).
    pub fn all() -> Vec<Target> {
        let t = |name: &str, bf16: f64, tf32: f64, f32v: f64, bw: f64, link: f64, launch: f64, src: &str| Target {
            name: name.into(),
            matmul_flops_bf16: bf16 * T,
            matmul_flops_tf32: tf32 * T,
            vector_flops: f32v * T,
            mem_bw: bw * T,
            link_bw: link * 1e9,
            launch_s: launch,
            source: src.into(),
        };
        vec![
            t("H100", 989.4, 494.7, 66.9, 3.35, 450.0, 3e-6, "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS BF16, 495 TF32, 67 FP32, 3.35 TB/s HBM3, NVLink 900 GB/s total"),
            t("H200", 989.4, 494.7, 66.9, 4.8, 450.0, 3e-6, "NVIDIA H200 datasheet (SXM): H100 compute, 4.8 TB/s HBM3e, NVLink 900 GB/s total"),
            t("H800", 989.4, 494.7, 66.9, 3.35, 200.0, 3e-6, "NVIDIA H800 SXM product brief: H100 compute, 3.35 TB/s, NVLink 400 GB/s total"),
            t("H20", 148.0, 74.0, 44.0, 4.0, 450.0, 3e-6, "NVIDIA H20 published specs: 148 TFLOPS BF16, 74 TF32, 44 FP32, 4.0 TB/s HBM3, NVLink 900 GB/s total"),
            t("A100", 312.0, 156.0, 19.5, 2.039, 300.0, 3e-6, "NVIDIA A100 datasheet (SXM 80GB): 312 TFLOPS BF16, 156 TF32, 19.5 FP32, 2.039 TB/s, NVLink 600 GB/s total"),
            t("CPU", 0.16, 0.16, 0.16, 0.01, 10.0, 1e-6, "the 2-core AVX2 development VM: 2 cores x 2 FMA x 8 f32 x 2 x 2.5 GHz = 160 GFLOP/s, ~10 GB/s measured-order memory bandwidth"),
        ]
    }

    /// A built-in target by name (case-insensitive; `H100_SXM` and `H100-SXM` are `H100`).
    pub fn by_name(name: &str) -> Option<Target> {
        let n = name.to_ascii_uppercase().replace(['-', '_'], "");
        let n = n.trim_end_matches("SXM").trim_end_matches("SXM5");
        Target::all().into_iter().find(|t| t.name.to_ascii_uppercase() == n)
    }

    /// Applies measured ceilings from JSON (`{"mem_bw": 3.0e12, "launch_s": 4e-6, ...}`; any subset of fields).
    pub fn with_overrides(mut self, json: &str) -> Result<Target, String> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("invalid ceilings JSON: {e}"))?;
        let obj = v.as_object().ok_or("ceilings JSON must be an object")?;
        for (k, x) in obj {
            let f = || match x.as_f64() {
                Some(v) if v.is_finite() && (v > 0.0 || (v == 0.0 && k == "launch_s")) => Ok(v),
                _ if k == "launch_s" => Err(format!("ceiling `{k}` must be a number of seconds ≥ 0, found {x}")),
                _ => Err(format!("ceiling `{k}` must be a positive number, found {x}")),
            };
            match k.as_str() {
                "matmul_flops_bf16" => self.matmul_flops_bf16 = f()?,
                "matmul_flops_tf32" => self.matmul_flops_tf32 = f()?,
                "vector_flops" => self.vector_flops = f()?,
                "mem_bw" => self.mem_bw = f()?,
                "link_bw" => self.link_bw = f()?,
                "launch_s" => self.launch_s = f()?,
                "name" | "source" => {}
                other => return Err(format!("unknown ceiling `{other}`")),
            }
        }
        self.source = format!("{} (overridden by measured ceilings)", self.source);
        Ok(self)
    }
}

/// FLOPs, bytes and communication of one node, and whether it is a kernel launch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeCost {
    pub flops: f64,
    pub bytes: f64,
    pub comm_bytes: f64,
    /// Matmul-class FLOPs (tensor cores) rather than vector FLOPs.
    pub tensor: bool,
    pub kernel: bool,
    /// Sequential latency not captured by the roofline (seconds).
    pub latency_s: f64,
}

/// A target plus the symbol values shapes are costed at.
#[derive(Clone, Debug)]
pub struct CostModel {
    pub target: Target,
    pub env: HashMap<String, i64>,
    /// Whether f32 matmuls may run on TF32 tensor cores (a numerics choice the user makes; off by default).
    pub tf32: bool,
}

impl CostModel {
    pub fn new(target: Target) -> CostModel {
        let env = [("B", 1), ("T", 4096), ("P", 4096), ("N", 4096)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        CostModel {
            target,
            env,
            tf32: false,
        }
    }

    /// Number of elements of a type under the costing environment (unknown symbols count 1024).
    pub fn numel(&self, t: &TensorType) -> f64 {
        t.dims()
            .iter()
            .map(|d| d.eval_or(&self.env, 1024).map(|n| n.max(0) as f64).unwrap_or(0.0))
            .product()
    }

    pub fn dim(&self, t: &TensorType, i: usize) -> f64 {
        t.dims()
            .get(i)
            .and_then(|d| d.eval_or(&self.env, 1024).ok())
            .map(|x| x as f64)
            .unwrap_or(1.0)
    }

    fn bytes(&self, t: &TensorType) -> f64 {
        self.numel(t) * t.dtype.size_bytes() as f64
    }

    /// The cost of `op` with inputs `ins` producing `outs`.
    pub fn node_cost(&self, op: &Op, ins: &[&TensorType], outs: &[TensorType]) -> NodeCost {
        let io = ins.iter().map(|t| self.bytes(t)).sum::<f64>() + outs.iter().map(|t| self.bytes(t)).sum::<f64>();
        let out_n: f64 = outs.iter().map(|t| self.numel(t)).sum();
        let kernel = |flops: f64, bytes: f64, tensor: bool| NodeCost {
            flops,
            bytes,
            tensor,
            kernel: true,
            ..NodeCost::default()
        };
        // what is a kernel at all is the shared classification's to say (the lowering follows it too)
        if !matches!(classify(op), NodeClass::Kernel(_)) {
            return NodeCost::default();
        }
        match op {
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. } => kernel(out_n, io, false),
            Op::MatMul => {
                let a = ins[0];
                let k = self.dim(a, a.rank() - 1);
                kernel(2.0 * out_n * k, io, true)
            }
            Op::Reduce { .. } | Op::CumSum { .. } => kernel(ins.iter().map(|t| self.numel(t)).sum(), io, false),
            Op::Composite(c) => self.composite_cost(c, ins, outs, io),
            _ => kernel(out_n, io, false),
        }
    }

    fn composite_cost(&self, c: &Composite, ins: &[&TensorType], outs: &[TensorType], io: f64) -> NodeCost {
        let n_in = ins.first().map(|t| self.numel(t)).unwrap_or(0.0);
        let k = |flops: f64, tensor: bool| NodeCost {
            flops,
            bytes: io,
            tensor,
            kernel: true,
            ..NodeCost::default()
        };
        match c {
            Composite::Softmax { .. } | Composite::LogSoftmax { .. } => k(5.0 * n_in, false),
            Composite::RmsNorm { .. } => k(4.0 * n_in, false),
            Composite::Fused { body } => self.fused_cost(body, io),
            // each rank copies its own chunk: the bytes in and out, no communication
            Composite::ShardSlice { .. } => k(0.0, false),
            // one rank's part of a collective: the whole collective's cost (summed over the ranks) over the ranks
            Composite::OnRank { op, .. } => {
                let ranks = match &**op {
                    Op::Composite(
                        Composite::AllReduce { mesh, .. }
                        | Composite::AllGather { mesh, .. }
                        | Composite::ReduceScatter { mesh, .. }
                        | Composite::AllToAll { mesh, .. }
                        | Composite::SendRecv { mesh, .. }
                        | Composite::ShardSlice { mesh, .. }
                        | Composite::AllToAllDispatch { mesh, .. }
                        | Composite::AllToAllCombine { mesh, .. },
                    ) => mesh.iter().product::<usize>().max(1),
                    _ => 1,
                };
                let lift = |t: &TensorType| {
                    let mut d = vec![fulgur_ir::Dim::from(ranks)];
                    d.extend(t.dims().iter().cloned());
                    TensorType::new(t.dtype, d)
                };
                let whole_ins: Vec<TensorType> = ins.iter().map(|t| lift(t)).collect();
                let refs: Vec<&TensorType> = whole_ins.iter().collect();
                let whole_outs: Vec<TensorType> = outs.iter().map(lift).collect();
                // a routed chunk's overlapped FLOPs are one rank's: every rank's, as the lifted transfer is
                let whole_op = match &**op {
                    Op::Composite(c) => c
                        .with_overlap(|f| f.clone() * fulgur_ir::Dim::from(ranks))
                        .map(Op::Composite),
                    _ => None,
                }
                .unwrap_or_else(|| (**op).clone());
                let c = self.node_cost(&whole_op, &refs, &whole_outs);
                let r = ranks as f64;
                NodeCost {
                    flops: c.flops / r,
                    bytes: c.bytes / r,
                    comm_bytes: c.comm_bytes / r,
                    ..c
                }
            }
            // the wrapped op once per slice of the leading axis (every rank's, summed as a simulated graph is)
            Composite::PerRank { op } => {
                let strip = |t: &TensorType| TensorType::new(t.dtype, t.dims()[1..].to_vec());
                let inner_ins: Vec<TensorType> = ins.iter().map(|t| strip(t)).collect();
                let refs: Vec<&TensorType> = inner_ins.iter().collect();
                let inner_outs: Vec<TensorType> = outs.iter().map(strip).collect();
                let lead = ins.first().map(|t| self.dim(t, 0)).unwrap_or(1.0);
                let c = self.node_cost(op, &refs, &inner_outs);
                NodeCost {
                    flops: c.flops * lead,
                    bytes: c.bytes * lead,
                    comm_bytes: c.comm_bytes * lead,
                    ..c
                }
            }
            Composite::AllToAll { .. }
            | Composite::AllToAllStart { .. }
            | Composite::CollectiveWait
            | Composite::AllReduce { .. }
            | Composite::AllGather { .. }
            | Composite::ReduceScatter { .. }
            | Composite::SendRecv { .. }
            | Composite::AllToAllDispatch { .. }
            | Composite::AllToAllCombine { .. } => collective_cost(self, c, ins),
            _ => {
                // Kernels introduced by the optimizer describe their own work.
                let (flops, tensor) = composite_flops(self, c, ins, outs);
                NodeCost {
                    latency_s: composite_latency(self, c, ins),
                    ..k(flops, tensor)
                }
            }
        }
    }

    /// A `fused` kernel (`fulgur_ir::composite::fused`): one launch whose bytes are its external inputs and its
    /// output (`io`: intermediate values stay in registers), whose FLOPs are the sum of its body's, on tensor cores
    /// when the body has a matmul. Layout ops inside the body (reshape, broadcast, slice, permute, concat) are
    /// index arithmetic and free.
    fn fused_cost(&self, body: &fulgur_ir::op::FusedBody, io: f64) -> NodeCost {
        let g = body.graph();
        let (mut flops, mut tensor) = (0.0, false);
        for (_, n) in g.nodes() {
            if matches!(n.op, Op::Permute { .. } | Op::Concat { .. }) {
                continue;
            }
            let ins: Vec<&TensorType> = n.inputs.iter().map(|&v| g.ty(v)).collect();
            let c = self.node_cost(&n.op, &ins, &n.outputs);
            flops += c.flops;
            tensor |= c.tensor;
        }
        NodeCost {
            flops,
            bytes: io,
            tensor,
            kernel: true,
            ..NodeCost::default()
        }
    }

    /// The peak of a matmul in `dtype` under the numerics contract: bf16/f16 on tensor cores; f32 in IEEE f32 on
    /// the vector units, or on TF32 tensor cores only when [`CostModel::tf32`] allows it.
    pub fn matmul_peak(&self, dtype: DType) -> f64 {
        match dtype {
            DType::BF16 | DType::F16 => self.target.matmul_flops_bf16,
            _ if self.tf32 => self.target.matmul_flops_tf32,
            _ => self.target.vector_flops,
        }
    }

    /// Seconds for one node.
    pub fn time(&self, c: &NodeCost, dtype: DType) -> f64 {
        if !c.kernel && c.comm_bytes == 0.0 {
            return 0.0;
        }
        let peak = if c.tensor {
            self.matmul_peak(dtype)
        } else {
            self.target.vector_flops
        };
        let compute = c.flops / peak;
        let memory = c.bytes / self.target.mem_bw;
        let comm = c.comm_bytes / self.target.link_bw;
        compute.max(memory) + comm + c.latency_s + if c.kernel { self.target.launch_s } else { 0.0 }
    }
}

/// FLOPs of the optimizer's kernel composites (see `docs/passes.md`): `(flops, uses tensor cores)`.
pub fn composite_flops(m: &CostModel, c: &Composite, ins: &[&TensorType], outs: &[TensorType]) -> (f64, bool) {
    let out_n: f64 = outs.iter().map(|t| m.numel(t)).sum();
    match c {
        Composite::LightningAttention { block } => {
            // per (batch, head): intra-block 2·T·b·(D + Dv), state contributions and inter-block products
            // 4·T·D·Dv, the sequential scan over blocks 2·nb·D·Dv
            let q = ins[0];
            let r = q.rank();
            let (t, d) = (m.dim(q, r - 2), m.dim(q, r - 1));
            let dv = m.dim(ins[2], r - 1);
            let bh = m.numel(q) / (t * d).max(1.0);
            let b = (*block as f64).min(t.max(1.0));
            let nb = (t / b).ceil();
            (
                bh * (2.0 * t * b * (d + dv) + 4.0 * t * d * dv + 2.0 * nb * d * dv),
                true,
            )
        }
        Composite::LightningLayer { block, heads, .. } => {
            // the attention itself plus ~10 flops per element of the prologue and epilogue
            let qkv = ins[0];
            let (t, c3) = (m.dim(qkv, 1), m.dim(qkv, 2));
            let h = *heads as f64;
            let d = c3 / 3.0 / h.max(1.0);
            let bh = m.dim(qkv, 0) * h;
            let b = (*block as f64).min(t.max(1.0));
            let nb = (t / b).ceil();
            let attn = bh * (2.0 * t * b * 2.0 * d + 4.0 * t * d * d + 2.0 * nb * d * d);
            (attn + 10.0 * m.numel(qkv), true)
        }
        Composite::FlashAttentionRope { causal, .. } => {
            let (q, k) = (ins[0], ins[1]);
            let (t, d) = (m.dim(q, q.rank() - 2), m.dim(q, q.rank() - 1));
            let s = m.dim(k, k.rank() - 2);
            let heads = m.numel(q) / (t * d).max(1.0);
            let full = 4.0 * heads * t * s * d;
            let rope = 3.0 * (m.numel(q) + m.numel(k));
            (if *causal { full / 2.0 } else { full } + rope, true)
        }
        Composite::FlashAttention { causal, .. } | Composite::FlashAttentionLse { causal, .. } => {
            let (q, k) = (ins[0], ins[1]);
            let (t, d) = (m.dim(q, q.rank() - 2), m.dim(q, q.rank() - 1));
            let s = m.dim(k, k.rank() - 2);
            let heads = m.numel(q) / (t * d).max(1.0);
            let full = 4.0 * heads * t * s * d;
            (if *causal { full / 2.0 } else { full }, true)
        }
        // MoE (see `fulgur_ir::composite::moe`); bytes are the node's inputs and outputs: dispatch reads x and
        // writes xs, combine reads ys and writes out, a grouped matmul reads xs and every expert's weights
        Composite::MoeRouter { .. } => (5.0 * ins.first().map(|t| m.numel(t)).unwrap_or(0.0), false),
        Composite::MoeDispatch { .. } => (outs.first().map(|t| m.numel(t)).unwrap_or(0.0), false),
        Composite::GroupedMatmul { .. } => {
            // 2·M·C·O on tensor cores for xs [M, C] · w [E, C, O]
            let (xs, w) = (ins[0], ins[2]);
            (2.0 * m.numel(xs) * m.dim(w, 2), true)
        }
        Composite::MoeCombine => (2.0 * ins.first().map(|t| m.numel(t)).unwrap_or(0.0), false),
        Composite::FlashAttentionGrad { causal, .. } => {
            // the scores recomputed (2·T·S·D), dV, dP, dQ and dK (2·T·S·D each): 2.5× the forward's FLOPs
            let (q, k) = (ins[0], ins[1]);
            let (t, d) = (m.dim(q, q.rank() - 2), m.dim(q, q.rank() - 1));
            let s = m.dim(k, k.rank() - 2);
            let heads = m.numel(q) / (t * d).max(1.0);
            let full = 10.0 * heads * t * s * d;
            (if *causal { full / 2.0 } else { full }, true)
        }
        Composite::GroupedMatmulWgrad => {
            // 2·M·C·O on tensor cores for xs [M, C]ᵀ · dy [M, O]
            let (xs, dy) = (ins[0], ins[2]);
            (2.0 * m.numel(xs) * m.dim(dy, 1), true)
        }
        _ => (out_n, false),
    }
}

/// Extra sequential latency of a composite beyond its roofline (seconds): the lightning kernel's scan over
/// `ceil(T / b)` blocks, each step a dependent update of the state (a quarter launch each).
pub fn composite_latency(m: &CostModel, c: &Composite, ins: &[&TensorType]) -> f64 {
    match c {
        Composite::LightningLayer { block, .. } => {
            let t = m.dim(ins[0], 1);
            (t / (*block as f64).max(1.0)).ceil() * m.target.launch_s * 0.25
        }
        Composite::LightningAttention { block } => {
            let q = ins[0];
            let t = m.dim(q, q.rank() - 2);
            (t / (*block as f64).max(1.0)).ceil() * m.target.launch_s * 0.25
        }
        _ => 0.0,
    }
}

/// Collectives over the simulated rank axis (`fulgur_ir::composite::collective`; `docs/passes.md`, "Collectives
/// and overlap"). An all-to-all of `x: [R, ...]` moves `(R−1)/R` of `x`'s bytes over the links (each rank keeps
/// its own chunk); like every cost of a simulated graph it is summed over the ranks.
/// - `all_to_all` (blocking, on the compute stream): that transfer plus a launch;
/// - `all_to_all_start` runs on the communication stream (not a kernel): the transfer, less what is hidden
///   behind the independent compute its `overlap_flops` annotation names: at most half the time of those
///   tensor-core FLOPs (a compute window is shared by the next chunk's dispatch and the previous chunk's
///   combine; the FLOPs alone are a lower bound of that compute's time). `comm_bytes` is what stays exposed;
/// - `collective_wait` is free.
pub fn collective_cost(m: &CostModel, c: &Composite, ins: &[&TensorType]) -> NodeCost {
    let Some(x) = ins.first() else {
        return NodeCost::default();
    };
    let ranks = m.dim(x, 0).max(1.0);
    // the group size G of a collective's mesh/over (an empty mesh: every rank)
    let group_of = |mesh: &[usize], over: usize| {
        if mesh.is_empty() {
            ranks
        } else {
            mesh.get(over).copied().unwrap_or(1).max(1) as f64
        }
    };
    // an exchange within groups of G keeps 1/G of each rank's bytes
    let group = match c {
        Composite::AllToAll { mesh, over, .. } | Composite::AllToAllStart { mesh, over, .. } => group_of(mesh, *over),
        _ => ranks,
    };
    let moved = m.bytes(x) * (group - 1.0) / group;
    match c {
        Composite::AllToAll { .. } => NodeCost {
            comm_bytes: moved,
            kernel: true,
            ..NodeCost::default()
        },
        Composite::AllToAllStart { overlap_flops, .. } => {
            let flops = overlap_flops
                .eval_or(&m.env, 1024)
                .map(|f| f.max(0) as f64)
                .unwrap_or(0.0);
            let peak = m.matmul_peak(x.dtype);
            let transfer = moved / m.target.link_bw;
            let hidden = transfer.min(0.5 * flops / peak);
            NodeCost {
                comm_bytes: (transfer - hidden).max(0.0) * m.target.link_bw,
                kernel: false,
                ..NodeCost::default()
            }
        }
        // ring algorithms within groups of G: an all-reduce moves 2(G−1)/G of each rank's bytes, a reduce-scatter
        // (G−1)/G of its input, an all-gather (G−1)/G of its output, G times its input
        Composite::AllReduce { mesh, over }
        | Composite::AllGather { mesh, over, .. }
        | Composite::ReduceScatter { mesh, over, .. } => {
            let g = group_of(mesh, *over);
            let share = (g - 1.0) / g;
            let bytes = m.bytes(x);
            let moved = match c {
                Composite::AllReduce { .. } => 2.0 * share * bytes,
                Composite::AllGather { .. } => share * g * bytes,
                _ => share * bytes,
            };
            NodeCost {
                comm_bytes: moved,
                kernel: true,
                ..NodeCost::default()
            }
        }
        // the routed exchange moves only the routed rows, known at run time: priced at what a balanced routing
        // moves, the (G−1)/G of the rows each rank sends that leave it (dispatch: its `M` rows; combine: the
        // `G·M`-row buffer holds `M` routed rows on average). A chunk of the routed overlap (`overlap_flops` > 0)
        // is hidden as `all_to_all_start` is, behind at most half the time of the compute it runs alongside.
        Composite::AllToAllDispatch {
            mesh,
            over,
            overlap_flops,
        }
        | Composite::AllToAllCombine {
            mesh,
            over,
            overlap_flops,
        } => {
            let g = group_of(mesh, *over);
            let bytes = match c {
                Composite::AllToAllDispatch { .. } => m.bytes(x),
                _ => m.bytes(x) / g,
            };
            let moved = bytes * (g - 1.0) / g;
            let flops = overlap_flops
                .eval_or(&m.env, 1024)
                .map(|f| f.max(0) as f64)
                .unwrap_or(0.0);
            let transfer = moved / m.target.link_bw;
            let hidden = transfer.min(0.5 * flops / m.matmul_peak(x.dtype));
            NodeCost {
                comm_bytes: (transfer - hidden).max(0.0) * m.target.link_bw,
                kernel: true,
                ..NodeCost::default()
            }
        }
        // every rank sends its whole tensor to one peer (nothing when the shift is a whole turn of the group)
        Composite::SendRecv { shift, mesh, over } => {
            let g = group_of(mesh, *over);
            let moves = (*shift as f64).rem_euclid(g) != 0.0;
            NodeCost {
                comm_bytes: if moves { m.bytes(x) } else { 0.0 },
                kernel: true,
                ..NodeCost::default()
            }
        }
        _ => NodeCost::default(),
    }
}
