//! The op set.
//!
//! Ops come at two levels (see `docs/ir.md`):
//! - **primitives** ([`Op`]'s variants other than [`Op::Composite`]) define the semantics;
//! - **composites** ([`Composite`]) carry a decomposition into primitives ([`Composite::decompose`]). The
//!   interpreter runs that decomposition, so a composite means exactly what its decomposition means; passes may
//!   introduce a composite only where its decomposition is what was there.
//!
//! Every op has a stable text name ([`Op::name`]) and a flat list of attributes ([`Op::attrs`]); the `.fir`
//! format, JSON and DOT all go through these, and [`Op::from_parts`] rebuilds an op from them.

pub use crate::composite::fused::FusedBody;
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::types::TensorType;
use serde::{Deserialize, Serialize};

/// Elementwise unary ops (float tensors; `neg` and `abs` also integers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sigmoid,
    Silu,
    Tanh,
    Sin,
    Cos,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 12] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Tanh,
        UnaryOp::Sin,
        UnaryOp::Cos,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
        }
    }
    /// Whether the op is defined on integer tensors.
    pub fn allows_int(self) -> bool {
        matches!(self, UnaryOp::Neg | UnaryOp::Abs)
    }
    /// The scalar function in f64.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
        }
    }
}

/// Elementwise binary ops with NumPy broadcasting; both operands have the same dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ];
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
        }
    }
    /// The scalar function on floats (NaN propagates through `max`/`min`).
    pub fn apply_f(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            }
            BinaryOp::Min => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.min(b)
                }
            }
            BinaryOp::Pow => a.powf(b),
        }
    }
    /// The scalar function on integers (wrapping; division truncates toward zero). `None` on division by
    /// zero or a negative exponent.
    pub fn apply_i(self, a: i64, b: i64) -> Option<i64> {
        Some(match self {
            BinaryOp::Add => a.wrapping_add(b),
            BinaryOp::Sub => a.wrapping_sub(b),
            BinaryOp::Mul => a.wrapping_mul(b),
            BinaryOp::Div => {
                if b == 0 {
                    return None;
                }
                a.wrapping_div(b)
            }
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::Pow => a.wrapping_pow(u32::try_from(b).ok()?),
        })
    }
}

/// Elementwise comparisons with NumPy broadcasting; the result is `bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub const ALL: [CmpOp; 6] = [CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge];
    pub fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
            CmpOp::Lt => "lt",
            CmpOp::Le => "le",
            CmpOp::Gt => "gt",
            CmpOp::Ge => "ge",
        }
    }
    pub fn apply<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
    Mean,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min, ReduceOp::Mean];
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Min => "reduce_min",
            ReduceOp::Mean => "reduce_mean",
        }
    }
}

/// Literal values of a constant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConstData {
    Float(#[serde(with = "crate::json::f64_repr::vec")] Vec<f64>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

impl ConstData {
    pub fn len(&self) -> usize {
        match self {
            ConstData::Float(v) => v.len(),
            ConstData::Int(v) => v.len(),
            ConstData::Bool(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Composite ops: each has a decomposition into primitives ([`Composite::decompose`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Composite {
    /// `exp(x - max) / sum(exp(x - max))` along `axis`.
    Softmax { axis: i64 },
    /// `x - max - log(sum(exp(x - max)))` along `axis`.
    LogSoftmax { axis: i64 },
    /// `rms_norm(x, w) = x * rsqrt(mean(x², last axis) + eps) * w`; `w` has the shape of the last axis.
    RmsNorm {
        #[serde(with = "crate::json::f64_repr")]
        eps: f64,
    },
    /// A whole lightning-attention kernel with its prologue and epilogue (MiniMax-01 §2a steps 1–8): inputs
    /// `qkv: [B, T, 3·H·D]` (the fused projection before SiLU, per-head interleaved q | k | v), `lam` (`[H, 1, 1]`),
    /// `norm_w: [H·D]`, `gate: [B, T, H·D]` (the output-gate projection before the sigmoid); output
    /// `sigmoid(gate) ⊙ rms_norm(merge_heads(lightning_attention[block](split_heads(silu(qkv)))), norm_w, eps)`.
    LightningLayer {
        block: usize,
        heads: usize,
        #[serde(with = "crate::json::f64_repr")]
        eps: f64,
    },
    /// Causal linear attention with per-head exponential decay, in the block form of MiniMax-01's lightning
    /// attention: inputs `q, k: [batch..., T, D]`, `v: [batch..., T, Dv]`, `lam` broadcastable to
    /// `[batch..., 1, 1]`; output `o_t = Σ_{u≤t} exp(−λ(t−u)) (q_t·k_u) v_u`, `[batch..., T, Dv]`.
    LightningAttention { block: usize },
    /// `flash_attention` with rotary embeddings in its prologue: inputs `q: [..., T, D]`, `k: [..., T, D]`
    /// (queries and keys at the same positions, as in a prefill), `v: [..., T, Dv]`, `cos, sin: [T, rotary]`;
    /// `q` and `k` are rotated on their first `rotary` dims (rotate-half pairing `(i, i + rotary/2)`) before the
    /// attention.
    FlashAttentionRope {
        #[serde(with = "crate::json::f64_repr")]
        scale: f64,
        causal: bool,
        rotary: usize,
    },
    /// `softmax(q kᵀ · scale + mask) v` with the causal mask `u ≤ t + (S − T)` when `causal`: inputs
    /// `q: [..., T, D]`, `k: [..., S, D]`, `v: [..., S, Dv]` (batch axes broadcast as in `matmul`).
    FlashAttention {
        #[serde(with = "crate::json::f64_repr")]
        scale: f64,
        causal: bool,
    },
    /// `flash_attention` that also outputs each query's log-sum-exp of its masked, scaled scores
    /// (`[batch..., T, 1]`), so that partial attentions over blocks of keys merge exactly (ring attention).
    FlashAttentionLse {
        #[serde(with = "crate::json::f64_repr")]
        scale: f64,
        causal: bool,
    },
    /// MoE routing: `logits [..., E]` → (`weights [..., k]`, `experts: i64 [..., k]`): softmax, top-k,
    /// weights renormalised to sum to 1.
    MoeRouter { k: usize },
    /// MoE dispatch: `x [N, C]`, `experts: int [N, k]` → (`xs [N·k, C]` sorted by expert, stable;
    /// `pos: i64 [N, k]` the row of `xs` holding `(n, slot)`; `counts: i64 [experts]`).
    MoeDispatch { experts: usize },
    /// Per-group matmul: `xs [M, C]`, `counts: int [E]`, `w [E, C, O]` → `[M, O]` where the rows of group
    /// `e` (consecutive, `counts[e]` of them) use `w[e]`; with `swiglu`, `[M, O/2]` =
    /// `silu(first half) ⊙ second half`. Rows past the sum of the counts belong to no group: zeros.
    GroupedMatmul { swiglu: bool },
    /// MoE combine: `ys [M, C]`, `pos: int [N, k]`, `weights [N, k]` → `[N, C]` =
    /// `Σ_slot weights[n, slot] · ys[pos[n, slot]]`.
    MoeCombine,
    /// The backward of `flash_attention[scale, causal]`: inputs `q, k, v` (as for the forward) and `do`, the
    /// gradient of its output; outputs `(dq, dk, dv)` of the types of `q, k, v` (a batch axis `k` or `v`
    /// broadcast along is summed back). The softmax is recomputed from `q` and `k`, never stored (see
    /// [`crate::composite::attention::decompose_grad`]).
    FlashAttentionGrad {
        #[serde(with = "crate::json::f64_repr")]
        scale: f64,
        causal: bool,
    },
    /// The weight gradient of `grouped_matmul` (without `swiglu`): `xs [M, C]`, `counts: int [E]`,
    /// `dy [M, O]` → `dw [E, C, O]`, `dw[e] = xs_eᵀ · dy_e` over the rows of group `e` (zero for an empty
    /// group; rows past the sum of the counts belong to no group).
    GroupedMatmulWgrad,
    /// A fused kernel: a small graph (its [`FusedBody`], written as canonical `.fir` text) whose inputs
    /// `arg0..argN` are the node's inputs, in order, and whose outputs are the node's (one from the
    /// optimizer's fusion; several from the kernel program's merge of sibling kernels). Its decomposition is the body,
    /// inlined (see [`crate::composite::fused`]).
    Fused { body: FusedBody },
    /// All-to-all over the leading rank axis of `x: [R, ..., R·c (axis), ...]`: rank `r`'s chunk `s` of `axis`
    /// comes from rank `s`'s chunk `r` (see [`crate::composite::collective`]).
    /// With `mesh`/`over` (as for [`Composite::AllReduce`]) the exchange runs within each group; an empty mesh
    /// is one group of all ranks (printed without the two attributes).
    AllToAll {
        axis: i64,
        #[serde(default)]
        mesh: Vec<usize>,
        #[serde(default)]
        over: usize,
    },
    /// The same exchange, started: its value is `all_to_all[axis](x)`, needed at a [`Composite::CollectiveWait`].
    /// `overlap_flops` annotates the schedule (matmul FLOPs of the compute placed alongside; no effect on the
    /// meaning).
    AllToAllStart {
        axis: i64,
        overlap_flops: Dim,
        #[serde(default)]
        mesh: Vec<usize>,
        #[serde(default)]
        over: usize,
    },
    /// Where a started collective's data is needed: the identity.
    CollectiveWait,
    /// Sum over the ranks of each group, every rank receiving the sum: `out[r] = Σ_s x[s]` over the ranks `s`
    /// of `r`'s group, in rank order. The groups: `mesh` factors the leading rank axis (row-major; empty: one
    /// group of all ranks) and the group runs along mesh axis `over` (see [`crate::composite::collective`]).
    AllReduce { mesh: Vec<usize>, over: usize },
    /// Each rank receives every group member's `x`, concatenated along `axis` in rank order:
    /// `[R, ..., c (axis), ...]` → `[R, ..., G·c, ...]`.
    AllGather { axis: i64, mesh: Vec<usize>, over: usize },
    /// The group's sum, rank `r` keeping chunk `r` of `axis`: `[R, ..., G·c (axis), ...]` → `[R, ..., c, ...]`.
    ReduceScatter { axis: i64, mesh: Vec<usize>, over: usize },
    /// Each rank sends `x` to the member `shift` places on in its group (cyclically) and receives from the one
    /// `shift` places back: `out[r] = x[r − shift]` along the group (a pipeline stage's activations, a ring
    /// attention step).
    SendRecv { shift: i64, mesh: Vec<usize>, over: usize },
    /// Each rank keeps its own chunk of `axis` (no communication: a replicated value made split), chunk `i`
    /// for the rank at position `i` of its group: `[R, ..., G·c (axis), ...]` → `[R, ..., c, ...]`.
    ShardSlice { axis: i64, mesh: Vec<usize>, over: usize },
    /// The routed MoE exchange, dispatch side: `x [R, M, ...]` (each rank's rows sorted by expert, as
    /// `moe_dispatch` leaves them) and `counts: int [R, E]` (each rank's rows per expert) →
    /// (`y [R, G·M, ...]`, `got: i64 [R, E/G]`). Expert `e` lives on the group member `e / (E/G)`; member `r`
    /// receives, for each of its experts `j` in order and within it from each member `s` in order, the
    /// `counts[s, r·E/G + j]` rows `s` holds for that expert, packed from row 0, zeros after; `got[r, j]` is the
    /// rows it received for its expert `j`. Groups as for [`Composite::AllReduce`] (see
    /// [`crate::composite::collective`]).
    ///
    /// `overlap_flops` annotates the schedule as for [`Composite::AllToAllStart`]: the matmul FLOPs of the
    /// compute the exchange runs alongside (the routed overlap's chunks, `docs/parallelism.md` §4.2; 0, not
    /// printed, for none), with no effect on the value.
    AllToAllDispatch {
        mesh: Vec<usize>,
        over: usize,
        #[serde(default = "no_overlap", skip_serializing_if = "overlaps_nothing")]
        overlap_flops: Dim,
    },
    /// The routed exchange's combine side, the transpose of [`Composite::AllToAllDispatch`] with the same
    /// `counts` (the sender's): `y [R, G·M, ...]` laid out as dispatch gives it → `x [R, M, ...]`, each row
    /// back at the rank and position it was dispatched from; rows past a rank's `Σ counts` are zero.
    /// `overlap_flops` as for the dispatch.
    AllToAllCombine {
        mesh: Vec<usize>,
        over: usize,
        #[serde(default = "no_overlap", skip_serializing_if = "overlaps_nothing")]
        overlap_flops: Dim,
    },
    /// `per_rank[op=NAME, ...](x0, x1, ...)`: the op (its attributes inline) applied to each slice of the
    /// inputs' common leading axis independently, the results stacked along it: `out[r] = op(x0[r], x1[r],
    /// ...)`. The sharding pass writes it for ops without a batch axis of their own (`scatter_add`, `gather`
    /// from a sharded table, the MoE composites) on values with the rank axis; dropping the rank axis unwraps
    /// it.
    PerRank { op: Box<Op> },
    /// `on_rank[op=NAME, rank=r, ...](x_local...)`: rank `r`'s view of collective `op` (which must name its
    /// `mesh`) in a per-rank program: the inputs are the rank's slices, the outputs its slices of what `op`
    /// gives on the stacked inputs of every rank. It has no decomposition: a collective transport runs it
    /// (simulated ranks, or NCCL).
    OnRank { op: Box<Op>, rank: usize },
}

/// A routed exchange's `overlap_flops` where a JSON graph (written before it existed) leaves it out.
fn no_overlap() -> Dim {
    Dim::from(0usize)
}

/// Whether a routed exchange overlaps nothing (its `overlap_flops`, then left out of JSON as of text).
fn overlaps_nothing(d: &Dim) -> bool {
    d.as_const() == Some(0)
}

/// A collective's group attributes, omitted for the default (`mesh=[]`: one group of all ranks).
fn group_attrs(mesh: &[usize], over: usize) -> Vec<(&'static str, AttrValue)> {
    if mesh.is_empty() && over == 0 {
        vec![]
    } else {
        vec![
            ("mesh", AttrValue::ints(mesh.iter().map(|&m| m as i64))),
            ("over", AttrValue::Int(over as i64)),
        ]
    }
}

impl Composite {
    /// The routed exchange's dispatch over `mesh`'s axis `over`, overlapping nothing.
    pub fn dispatch(mesh: Vec<usize>, over: usize) -> Composite {
        Composite::AllToAllDispatch {
            mesh,
            over,
            overlap_flops: Dim::from(0usize),
        }
    }

    /// The routed exchange's combine over `mesh`'s axis `over`, overlapping nothing.
    pub fn combine(mesh: Vec<usize>, over: usize) -> Composite {
        Composite::AllToAllCombine {
            mesh,
            over,
            overlap_flops: Dim::from(0usize),
        }
    }

    /// A routed exchange's `overlap_flops`; `None` for every other composite.
    pub fn overlap_flops(&self) -> Option<&Dim> {
        match self {
            Composite::AllToAllDispatch { overlap_flops, .. } | Composite::AllToAllCombine { overlap_flops, .. } => {
                Some(overlap_flops)
            }
            _ => None,
        }
    }

    /// The routed exchange with `overlap_flops` set to `f(its own)`; `None` for every other composite.
    pub fn with_overlap(&self, f: impl FnOnce(&Dim) -> Dim) -> Option<Composite> {
        match self {
            Composite::AllToAllDispatch {
                mesh,
                over,
                overlap_flops,
            } => Some(Composite::AllToAllDispatch {
                mesh: mesh.clone(),
                over: *over,
                overlap_flops: f(overlap_flops),
            }),
            Composite::AllToAllCombine {
                mesh,
                over,
                overlap_flops,
            } => Some(Composite::AllToAllCombine {
                mesh: mesh.clone(),
                over: *over,
                overlap_flops: f(overlap_flops),
            }),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Composite::Softmax { .. } => "softmax",
            Composite::LogSoftmax { .. } => "log_softmax",
            Composite::RmsNorm { .. } => "rms_norm",
            Composite::LightningAttention { .. } => "lightning_attention",
            Composite::LightningLayer { .. } => "lightning_layer",
            Composite::FlashAttention { .. } => "flash_attention",
            Composite::FlashAttentionLse { .. } => "flash_attention_lse",
            Composite::FlashAttentionRope { .. } => "flash_attention_rope",
            Composite::MoeRouter { .. } => "moe_router",
            Composite::MoeDispatch { .. } => "moe_dispatch",
            Composite::GroupedMatmul { .. } => "grouped_matmul",
            Composite::MoeCombine => "moe_combine",
            Composite::FlashAttentionGrad { .. } => "flash_attention_grad",
            Composite::GroupedMatmulWgrad => "grouped_matmul_wgrad",
            Composite::Fused { .. } => "fused",
            Composite::AllToAll { .. } => "all_to_all",
            Composite::AllToAllStart { .. } => "all_to_all_start",
            Composite::CollectiveWait => "collective_wait",
            Composite::AllReduce { .. } => "all_reduce",
            Composite::AllGather { .. } => "all_gather",
            Composite::ReduceScatter { .. } => "reduce_scatter",
            Composite::SendRecv { .. } => "send_recv",
            Composite::ShardSlice { .. } => "shard_slice",
            Composite::AllToAllDispatch { .. } => "all_to_all_dispatch",
            Composite::AllToAllCombine { .. } => "all_to_all_combine",
            Composite::PerRank { .. } => "per_rank",
            Composite::OnRank { .. } => "on_rank",
        }
    }
    /// The names of all composites, as [`Composite::name`] gives them.
    pub const NAMES: [&'static str; 27] = [
        "softmax",
        "log_softmax",
        "rms_norm",
        "lightning_attention",
        "lightning_layer",
        "flash_attention",
        "flash_attention_rope",
        "moe_router",
        "moe_dispatch",
        "grouped_matmul",
        "moe_combine",
        "flash_attention_grad",
        "grouped_matmul_wgrad",
        "fused",
        "all_to_all",
        "all_to_all_start",
        "collective_wait",
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "send_recv",
        "shard_slice",
        "per_rank",
        "on_rank",
        "flash_attention_lse",
        "all_to_all_dispatch",
        "all_to_all_combine",
    ];
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        match self {
            Composite::Softmax { axis } | Composite::LogSoftmax { axis } => vec![("axis", AttrValue::Int(*axis))],
            Composite::RmsNorm { eps } => vec![("eps", AttrValue::Float(*eps))],
            Composite::LightningAttention { block } => vec![("block", AttrValue::Int(*block as i64))],
            Composite::LightningLayer { block, heads, eps } => vec![
                ("block", AttrValue::Int(*block as i64)),
                ("heads", AttrValue::Int(*heads as i64)),
                ("eps", AttrValue::Float(*eps)),
            ],
            Composite::FlashAttentionRope { scale, causal, rotary } => vec![
                ("scale", AttrValue::Float(*scale)),
                ("causal", AttrValue::Bool(*causal)),
                ("rotary", AttrValue::Int(*rotary as i64)),
            ],
            Composite::FlashAttention { scale, causal } | Composite::FlashAttentionLse { scale, causal } => {
                vec![
                    ("scale", AttrValue::Float(*scale)),
                    ("causal", AttrValue::Bool(*causal)),
                ]
            }
            Composite::MoeRouter { k } => vec![("k", AttrValue::Int(*k as i64))],
            Composite::MoeDispatch { experts } => vec![("experts", AttrValue::Int(*experts as i64))],
            Composite::GroupedMatmul { swiglu } => vec![("swiglu", AttrValue::Bool(*swiglu))],
            Composite::MoeCombine | Composite::GroupedMatmulWgrad => vec![],
            Composite::FlashAttentionGrad { scale, causal } => vec![
                ("scale", AttrValue::Float(*scale)),
                ("causal", AttrValue::Bool(*causal)),
            ],
            Composite::Fused { body } => vec![("body", AttrValue::Str(body.text().to_string()))],
            Composite::AllToAll { axis, mesh, over } => {
                let mut v = vec![("axis", AttrValue::Int(*axis))];
                v.extend(group_attrs(mesh, *over));
                v
            }
            Composite::AllToAllStart {
                axis,
                overlap_flops,
                mesh,
                over,
            } => {
                let mut v = vec![
                    ("axis", AttrValue::Int(*axis)),
                    ("overlap_flops", AttrValue::dim(overlap_flops.clone())),
                ];
                v.extend(group_attrs(mesh, *over));
                v
            }
            Composite::CollectiveWait => vec![],
            Composite::AllReduce { mesh, over } => group_attrs(mesh, *over),
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
                let mut v = group_attrs(mesh, *over);
                if overlap_flops.as_const() != Some(0) {
                    v.push(("overlap_flops", AttrValue::dim(overlap_flops.clone())));
                }
                v
            }
            Composite::AllGather { axis, mesh, over }
            | Composite::ReduceScatter { axis, mesh, over }
            | Composite::ShardSlice { axis, mesh, over } => {
                let mut v = vec![("axis", AttrValue::Int(*axis))];
                v.extend(group_attrs(mesh, *over));
                v
            }
            Composite::SendRecv { shift, mesh, over } => {
                let mut v = vec![("shift", AttrValue::Int(*shift))];
                v.extend(group_attrs(mesh, *over));
                v
            }
            Composite::PerRank { op } => {
                let mut v = vec![("op", AttrValue::Str(op.name().to_string()))];
                v.extend(op.attrs());
                v
            }
            Composite::OnRank { op, rank } => {
                let mut v = vec![
                    ("op", AttrValue::Str(op.name().to_string())),
                    ("rank", AttrValue::Int(*rank as i64)),
                ];
                v.extend(op.attrs());
                v
            }
        }
    }
    /// Number of inputs (`None`: variadic, at least one: `fused` takes one per argument of its body).
    pub fn num_inputs(&self) -> Option<usize> {
        Some(match self {
            Composite::Softmax { .. } | Composite::LogSoftmax { .. } | Composite::MoeRouter { .. } => 1,
            Composite::RmsNorm { .. }
            | Composite::MoeDispatch { .. }
            | Composite::AllToAllDispatch { .. }
            | Composite::AllToAllCombine { .. } => 2,
            Composite::FlashAttention { .. }
            | Composite::FlashAttentionLse { .. }
            | Composite::GroupedMatmul { .. }
            | Composite::MoeCombine
            | Composite::GroupedMatmulWgrad => 3,
            Composite::LightningAttention { .. }
            | Composite::LightningLayer { .. }
            | Composite::FlashAttentionGrad { .. } => 4,
            Composite::FlashAttentionRope { .. } => 5,
            Composite::Fused { .. } => return None,
            Composite::AllToAll { .. }
            | Composite::AllToAllStart { .. }
            | Composite::CollectiveWait
            | Composite::AllReduce { .. }
            | Composite::AllGather { .. }
            | Composite::ReduceScatter { .. }
            | Composite::SendRecv { .. }
            | Composite::ShardSlice { .. } => 1,
            Composite::PerRank { op } | Composite::OnRank { op, .. } => return op.num_inputs(),
        })
    }
    /// Number of outputs.
    pub fn num_outputs(&self) -> usize {
        match self {
            Composite::MoeRouter { .. } => 2,
            Composite::MoeDispatch { .. } | Composite::FlashAttentionGrad { .. } => 3,
            Composite::FlashAttentionLse { .. } | Composite::AllToAllDispatch { .. } => 2,
            Composite::PerRank { op } | Composite::OnRank { op, .. } => match &**op {
                Op::TopK { .. } => 2,
                Op::Composite(c) => c.num_outputs(),
                _ => 1,
            },
            _ => 1,
        }
    }
}

/// An operation: the payload of a graph node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A named data input (bound per run).
    Input {
        name: String,
        ty: TensorType,
    },
    /// A named parameter (model weight).
    Param {
        name: String,
        ty: TensorType,
    },
    /// Literal values of a constant shape (row-major).
    Constant {
        dtype: DType,
        shape: Vec<usize>,
        data: ConstData,
    },
    /// A tensor of a (possibly symbolic) shape filled with one value.
    Full {
        #[serde(with = "crate::json::f64_repr")]
        value: f64,
        dtype: DType,
        shape: Shape,
    },
    /// `out[i0..in] = i_axis`: the index along `axis`, for a (possibly symbolic) shape.
    Iota {
        dtype: DType,
        shape: Shape,
        axis: i64,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CmpOp),
    /// `select(cond, a, b)`: `a` where `cond`, else `b` (all three broadcast).
    Select,
    Cast {
        dtype: DType,
    },
    /// `[..., M, K] × [..., K, N] → [..., M, N]`, batch dims broadcast.
    #[serde(rename = "matmul")]
    MatMul,
    Reduce {
        op: ReduceOp,
        axes: Vec<i64>,
        keepdims: bool,
    },
    Reshape {
        shape: Shape,
    },
    Permute {
        perm: Vec<usize>,
    },
    /// NumPy broadcast to `shape`.
    Broadcast {
        shape: Shape,
    },
    /// Elements `[start, end)` along `axis`.
    Slice {
        axis: i64,
        start: Dim,
        end: Dim,
    },
    Concat {
        axis: i64,
    },
    /// `numpy.take(data, indices, axis)`: output `data[..axis] + indices + data[axis+1..]`.
    Gather {
        axis: i64,
    },
    /// The adjoint of [`Op::Gather`]: `out = data; out[.., idx[i], ..] += updates[.., i, ..]`.
    ScatterAdd {
        axis: i64,
    },
    /// The `k` largest along `axis` (descending, ties to the lower index): outputs values and i64 indices.
    TopK {
        k: usize,
        axis: i64,
    },
    /// `indices[...] → [..., depth]`; out-of-range indices give an all-zero row.
    OneHot {
        depth: usize,
        dtype: DType,
    },
    CumSum {
        axis: i64,
        exclusive: bool,
        reverse: bool,
    },
    Composite(Composite),
}

/// A syntactic attribute value, shared by the text format, JSON attribute dumps and DOT labels.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A dimension expression; a lone identifier (`f32`, `sum`) is a `Dim` holding one symbol.
    Dim(Dim),
    List(Vec<AttrValue>),
}

impl AttrValue {
    fn shape(s: &Shape) -> AttrValue {
        AttrValue::List(s.0.iter().map(|d| AttrValue::dim(d.clone())).collect())
    }
    fn dim(d: Dim) -> AttrValue {
        match d.as_const() {
            Some(c) => AttrValue::Int(c),
            None => AttrValue::Dim(d),
        }
    }
    fn ident(s: &str) -> AttrValue {
        AttrValue::Dim(Dim::sym(s))
    }
    fn ints(v: impl IntoIterator<Item = i64>) -> AttrValue {
        AttrValue::List(v.into_iter().map(AttrValue::Int).collect())
    }
    /// The identifier, if this value is a lone symbol.
    pub fn as_ident(&self) -> Option<String> {
        match self {
            AttrValue::Dim(d) => {
                let syms = d.symbols();
                if syms.len() == 1 && d == &Dim::sym(&syms[0]) {
                    Some(syms[0].clone())
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// Writes an f64 so that parsing it back gives the same bits (NaN payloads aside).
pub fn format_f64(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        let s = format!("{x:?}");
        if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
            s
        } else {
            format!("{s}.0")
        }
    }
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Float(x) => f.write_str(&format_f64(*x)),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Str(s) => write!(f, "{}", quote(s)),
            AttrValue::Dim(d) => write!(f, "{d}"),
            AttrValue::List(v) => {
                f.write_str("[")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Quotes a string with the escapes the `.fir` lexer understands.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Op {
    /// The op with the dimensions in its attributes (shapes of `reshape`, `broadcast`, `full`, `iota`; `slice`
    /// bounds; `all_to_all_start`'s `overlap_flops`; a fused body's argument types and attributes) rewritten by
    /// `env` (symbols not in `env` stay).
    pub fn substitute_dims(&self, env: &std::collections::HashMap<String, Dim>) -> Op {
        let sh = |s: &crate::dim::Shape| crate::dim::Shape(s.0.iter().map(|d| d.substitute(env)).collect());
        match self {
            Op::Full { value, dtype, shape } => Op::Full {
                value: *value,
                dtype: *dtype,
                shape: sh(shape),
            },
            Op::Iota { dtype, shape, axis } => Op::Iota {
                dtype: *dtype,
                shape: sh(shape),
                axis: *axis,
            },
            Op::Reshape { shape } => Op::Reshape { shape: sh(shape) },
            Op::Broadcast { shape } => Op::Broadcast { shape: sh(shape) },
            Op::Slice { axis, start, end } => Op::Slice {
                axis: *axis,
                start: start.substitute(env),
                end: end.substitute(env),
            },
            Op::Composite(Composite::Fused { body }) => match body.substitute(env) {
                Ok(body) => Op::Composite(Composite::Fused { body }),
                Err(_) => self.clone(),
            },
            Op::Composite(Composite::AllToAllStart {
                axis,
                overlap_flops,
                mesh,
                over,
            }) => Op::Composite(Composite::AllToAllStart {
                axis: *axis,
                overlap_flops: overlap_flops.substitute(env),
                mesh: mesh.clone(),
                over: *over,
            }),
            Op::Composite(c @ (Composite::AllToAllDispatch { .. } | Composite::AllToAllCombine { .. })) => {
                Op::Composite(c.with_overlap(|f| f.substitute(env)).unwrap_or_else(|| c.clone()))
            }
            op => op.clone(),
        }
    }

    /// The op's name in the text format.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "constant",
            Op::Full { .. } => "full",
            Op::Iota { .. } => "iota",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Select => "select",
            Op::Cast { .. } => "cast",
            Op::MatMul => "matmul",
            Op::Reduce { op, .. } => op.name(),
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Broadcast { .. } => "broadcast",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::TopK { .. } => "topk",
            Op::OneHot { .. } => "one_hot",
            Op::CumSum { .. } => "cumsum",
            Op::Composite(c) => c.name(),
        }
    }

    /// Number of inputs the op takes (`None`: variadic, at least one).
    pub fn num_inputs(&self) -> Option<usize> {
        Some(match self {
            Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Full { .. } | Op::Iota { .. } => 0,
            Op::Unary(_) | Op::Cast { .. } | Op::Reduce { .. } | Op::Reshape { .. } | Op::Permute { .. } => 1,
            Op::Broadcast { .. } | Op::Slice { .. } | Op::TopK { .. } | Op::OneHot { .. } | Op::CumSum { .. } => 1,
            Op::Binary(_) | Op::Compare(_) | Op::MatMul | Op::Gather { .. } => 2,
            Op::Select | Op::ScatterAdd { .. } => 3,
            Op::Concat { .. } => return None,
            Op::Composite(c) => return c.num_inputs(),
        })
    }

    /// Whether the op is a graph input (data or parameter).
    pub fn is_input(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. })
    }

    /// The declared name and type of an input or parameter.
    pub fn input_decl(&self) -> Option<(&str, &TensorType, bool)> {
        match self {
            Op::Input { name, ty } => Some((name, ty, false)),
            Op::Param { name, ty } => Some((name, ty, true)),
            _ => None,
        }
    }

    /// Attributes in canonical order (inputs and parameters: none; their name and type are printed apart).
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        match self {
            Op::Input { .. } | Op::Param { .. } => vec![],
            Op::Constant { dtype, shape, data } => vec![
                ("dtype", AttrValue::ident(dtype.name())),
                ("shape", AttrValue::ints(shape.iter().map(|&s| s as i64))),
                (
                    "values",
                    AttrValue::List(match data {
                        ConstData::Float(v) => v.iter().map(|&x| AttrValue::Float(x)).collect(),
                        ConstData::Int(v) => v.iter().map(|&x| AttrValue::Int(x)).collect(),
                        ConstData::Bool(v) => v.iter().map(|&x| AttrValue::Bool(x)).collect(),
                    }),
                ),
            ],
            Op::Full { value, dtype, shape } => vec![
                ("value", AttrValue::Float(*value)),
                ("dtype", AttrValue::ident(dtype.name())),
                ("shape", AttrValue::shape(shape)),
            ],
            Op::Iota { dtype, shape, axis } => vec![
                ("dtype", AttrValue::ident(dtype.name())),
                ("shape", AttrValue::shape(shape)),
                ("axis", AttrValue::Int(*axis)),
            ],
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::MatMul => vec![],
            Op::Cast { dtype } => vec![("dtype", AttrValue::ident(dtype.name()))],
            Op::Reduce { axes, keepdims, .. } => {
                vec![
                    ("axes", AttrValue::ints(axes.iter().copied())),
                    ("keepdims", AttrValue::Bool(*keepdims)),
                ]
            }
            Op::Reshape { shape } | Op::Broadcast { shape } => vec![("shape", AttrValue::shape(shape))],
            Op::Permute { perm } => vec![("perm", AttrValue::ints(perm.iter().map(|&p| p as i64)))],
            Op::Slice { axis, start, end } => vec![
                ("axis", AttrValue::Int(*axis)),
                ("start", AttrValue::dim(start.clone())),
                ("end", AttrValue::dim(end.clone())),
            ],
            Op::Concat { axis } | Op::Gather { axis } | Op::ScatterAdd { axis } => {
                vec![("axis", AttrValue::Int(*axis))]
            }
            Op::TopK { k, axis } => vec![("k", AttrValue::Int(*k as i64)), ("axis", AttrValue::Int(*axis))],
            Op::OneHot { depth, dtype } => {
                vec![
                    ("depth", AttrValue::Int(*depth as i64)),
                    ("dtype", AttrValue::ident(dtype.name())),
                ]
            }
            Op::CumSum {
                axis,
                exclusive,
                reverse,
            } => vec![
                ("axis", AttrValue::Int(*axis)),
                ("exclusive", AttrValue::Bool(*exclusive)),
                ("reverse", AttrValue::Bool(*reverse)),
            ],
            Op::Composite(c) => c.attrs(),
        }
    }

    /// Rebuilds an op (not `input`/`param`) from its name and attributes. Errors say which attribute is
    /// missing, unknown or of the wrong kind.
    pub fn from_parts(name: &str, attrs: &[(String, AttrValue)]) -> Result<Op, String> {
        let mut a = Attrs {
            op: name,
            attrs,
            used: vec![false; attrs.len()],
        };
        let op = match name {
            "constant" => {
                let dtype = a.dtype("dtype")?;
                let shape: Vec<usize> = a
                    .ints("shape")?
                    .into_iter()
                    .map(|s| usize::try_from(s).map_err(|_| format!("`constant`: negative dimension {s} in `shape`")))
                    .collect::<Result<_, _>>()?;
                let vals = a.list("values")?;
                let data = if dtype.is_float() {
                    ConstData::Float(
                        vals.iter()
                            .map(|v| {
                                as_float(v).ok_or_else(|| {
                                    format!("`constant`: `values` of a {dtype} constant must be numbers, found `{v}`")
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    )
                } else if dtype.is_int() {
                    ConstData::Int(
                        vals.iter()
                            .map(|v| match v {
                                AttrValue::Int(i) => Ok(*i),
                                _ => Err(format!(
                                    "`constant`: `values` of a {dtype} constant must be integers, found `{v}`"
                                )),
                            })
                            .collect::<Result<_, _>>()?,
                    )
                } else {
                    ConstData::Bool(
                        vals.iter()
                            .map(|v| match v {
                                AttrValue::Bool(b) => Ok(*b),
                                _ => Err(format!(
                                    "`constant`: `values` of a bool constant must be true/false, found `{v}`"
                                )),
                            })
                            .collect::<Result<_, _>>()?,
                    )
                };
                Op::Constant { dtype, shape, data }
            }
            "full" => Op::Full {
                value: a.float("value")?,
                dtype: a.dtype("dtype")?,
                shape: a.shape("shape")?,
            },
            "iota" => Op::Iota {
                dtype: a.dtype("dtype")?,
                shape: a.shape("shape")?,
                axis: a.int("axis")?,
            },
            "select" => Op::Select,
            "matmul" => Op::MatMul,
            "cast" => Op::Cast {
                dtype: a.dtype("dtype")?,
            },
            "reshape" => Op::Reshape {
                shape: a.shape("shape")?,
            },
            "broadcast" => Op::Broadcast {
                shape: a.shape("shape")?,
            },
            "permute" => Op::Permute {
                perm: a
                    .ints("perm")?
                    .into_iter()
                    .map(|p| usize::try_from(p).map_err(|_| format!("`permute`: negative axis {p} in `perm`")))
                    .collect::<Result<_, _>>()?,
            },
            "slice" => Op::Slice {
                axis: a.int("axis")?,
                start: a.dim("start")?,
                end: a.dim("end")?,
            },
            "concat" => Op::Concat { axis: a.int("axis")? },
            "gather" => Op::Gather { axis: a.int("axis")? },
            "scatter_add" => Op::ScatterAdd { axis: a.int("axis")? },
            "topk" => Op::TopK {
                k: a.usize("k")?,
                axis: a.int("axis")?,
            },
            "one_hot" => Op::OneHot {
                depth: a.usize("depth")?,
                dtype: a.dtype("dtype")?,
            },
            "cumsum" => Op::CumSum {
                axis: a.int("axis")?,
                exclusive: a.bool("exclusive")?,
                reverse: a.bool("reverse")?,
            },
            "softmax" => Op::Composite(Composite::Softmax { axis: a.int("axis")? }),
            "log_softmax" => Op::Composite(Composite::LogSoftmax { axis: a.int("axis")? }),
            "rms_norm" => Op::Composite(Composite::RmsNorm { eps: a.float("eps")? }),
            "lightning_attention" => Op::Composite(Composite::LightningAttention {
                block: a.usize("block")?,
            }),
            "lightning_layer" => Op::Composite(Composite::LightningLayer {
                block: a.usize("block")?,
                heads: a.usize("heads")?,
                eps: a.float("eps")?,
            }),
            "flash_attention_rope" => Op::Composite(Composite::FlashAttentionRope {
                scale: a.float("scale")?,
                causal: a.bool("causal")?,
                rotary: a.usize("rotary")?,
            }),
            "flash_attention" => Op::Composite(Composite::FlashAttention {
                scale: a.float("scale")?,
                causal: a.bool("causal")?,
            }),
            "flash_attention_lse" => Op::Composite(Composite::FlashAttentionLse {
                scale: a.float("scale")?,
                causal: a.bool("causal")?,
            }),
            "moe_router" => Op::Composite(Composite::MoeRouter { k: a.usize("k")? }),
            "moe_dispatch" => Op::Composite(Composite::MoeDispatch {
                experts: a.usize("experts")?,
            }),
            "grouped_matmul" => Op::Composite(Composite::GroupedMatmul {
                swiglu: a.bool("swiglu")?,
            }),
            "moe_combine" => Op::Composite(Composite::MoeCombine),
            "flash_attention_grad" => Op::Composite(Composite::FlashAttentionGrad {
                scale: a.float("scale")?,
                causal: a.bool("causal")?,
            }),
            "grouped_matmul_wgrad" => Op::Composite(Composite::GroupedMatmulWgrad),
            "fused" => {
                let text = a.string("body")?;
                let body = FusedBody::parse(&text).map_err(|e| format!("attribute `body` of `fused`: {e}"))?;
                Op::Composite(Composite::Fused { body })
            }
            "all_to_all" => Op::Composite(Composite::AllToAll {
                axis: a.int("axis")?,
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "all_to_all_start" => Op::Composite(Composite::AllToAllStart {
                axis: a.int("axis")?,
                overlap_flops: a.dim("overlap_flops")?,
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "collective_wait" => Op::Composite(Composite::CollectiveWait),
            "all_reduce" => Op::Composite(Composite::AllReduce {
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "all_gather" => Op::Composite(Composite::AllGather {
                axis: a.int("axis")?,
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "reduce_scatter" => Op::Composite(Composite::ReduceScatter {
                axis: a.int("axis")?,
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "shard_slice" => Op::Composite(Composite::ShardSlice {
                axis: a.int("axis")?,
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "on_rank" => {
                let inner = a.string("op")?;
                let rank = a.usize("rank")?;
                let rest: Vec<(String, AttrValue)> = attrs
                    .iter()
                    .filter(|(k, _)| k != "op" && k != "rank")
                    .cloned()
                    .collect();
                a.used.iter_mut().for_each(|u| *u = true);
                let op = Op::from_parts(&inner, &rest).map_err(|e| format!("`on_rank[op={inner}]`: {e}"))?;
                Op::Composite(Composite::OnRank { op: Box::new(op), rank })
            }
            "per_rank" => {
                let inner = a.string("op")?;
                let rest: Vec<(String, AttrValue)> = attrs.iter().filter(|(k, _)| k != "op").cloned().collect();
                a.used.iter_mut().for_each(|u| *u = true);
                let op = Op::from_parts(&inner, &rest).map_err(|e| format!("`per_rank[op={inner}]`: {e}"))?;
                if op.is_input() || matches!(op, Op::Composite(Composite::PerRank { .. })) {
                    return Err(format!("`per_rank` cannot wrap `{inner}`"));
                }
                Op::Composite(Composite::PerRank { op: Box::new(op) })
            }
            "all_to_all_dispatch" => Op::Composite(Composite::AllToAllDispatch {
                mesh: a.mesh()?,
                over: a.over()?,
                overlap_flops: a.overlap()?,
            }),
            "all_to_all_combine" => Op::Composite(Composite::AllToAllCombine {
                mesh: a.mesh()?,
                over: a.over()?,
                overlap_flops: a.overlap()?,
            }),
            "send_recv" => Op::Composite(Composite::SendRecv {
                shift: a.int("shift")?,
                mesh: a.mesh()?,
                over: a.over()?,
            }),
            "input" | "param" => return Err(format!("`{name}` is declared as `%N = {name} \"NAME\" : TYPE`")),
            _ => {
                if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == name) {
                    Op::Unary(*u)
                } else if let Some(b) = BinaryOp::ALL.iter().find(|b| b.name() == name) {
                    Op::Binary(*b)
                } else if let Some(c) = CmpOp::ALL.iter().find(|c| c.name() == name) {
                    Op::Compare(*c)
                } else if let Some(r) = ReduceOp::ALL.iter().find(|r| r.name() == name) {
                    Op::Reduce {
                        op: *r,
                        axes: a.ints("axes")?,
                        keepdims: a.bool("keepdims")?,
                    }
                } else {
                    return Err(format!("unknown op `{name}`"));
                }
            }
        };
        a.finish()?;
        Ok(op)
    }

    /// All op names accepted by [`Op::from_parts`] (plus `input` and `param`).
    pub fn all_names() -> Vec<&'static str> {
        let mut v = vec![
            "input",
            "param",
            "constant",
            "full",
            "iota",
            "select",
            "matmul",
            "cast",
            "reshape",
            "broadcast",
            "permute",
            "slice",
            "concat",
            "gather",
            "scatter_add",
            "topk",
            "one_hot",
            "cumsum",
        ];
        v.extend(Composite::NAMES);
        v.extend(UnaryOp::ALL.iter().map(|u| u.name()));
        v.extend(BinaryOp::ALL.iter().map(|u| u.name()));
        v.extend(CmpOp::ALL.iter().map(|u| u.name()));
        v.extend(ReduceOp::ALL.iter().map(|u| u.name()));
        v
    }
}

fn as_float(v: &AttrValue) -> Option<f64> {
    match v {
        AttrValue::Float(x) => Some(*x),
        AttrValue::Int(i) => Some(*i as f64),
        _ => None,
    }
}

struct Attrs<'a> {
    op: &'a str,
    attrs: &'a [(String, AttrValue)],
    used: Vec<bool>,
}

impl Attrs<'_> {
    fn get(&mut self, key: &str) -> Result<&AttrValue, String> {
        match self.attrs.iter().position(|(k, _)| k == key) {
            Some(i) => {
                self.used[i] = true;
                Ok(&self.attrs[i].1)
            }
            None => Err(format!("`{}` needs attribute `{key}`", self.op)),
        }
    }
    fn wrong(&self, key: &str, what: &str, v: &AttrValue) -> String {
        format!("attribute `{key}` of `{}` must be {what}, found `{v}`", self.op)
    }
    fn int(&mut self, key: &str) -> Result<i64, String> {
        match self.get(key)?.clone() {
            AttrValue::Int(i) => Ok(i),
            v => Err(self.wrong(key, "an integer", &v)),
        }
    }
    fn usize(&mut self, key: &str) -> Result<usize, String> {
        let i = self.int(key)?;
        usize::try_from(i).map_err(|_| format!("attribute `{key}` of `{}` must be non-negative, found {i}", self.op))
    }
    fn float(&mut self, key: &str) -> Result<f64, String> {
        let v = self.get(key)?.clone();
        as_float(&v).ok_or_else(|| self.wrong(key, "a number", &v))
    }
    fn bool(&mut self, key: &str) -> Result<bool, String> {
        match self.get(key)?.clone() {
            AttrValue::Bool(b) => Ok(b),
            v => Err(self.wrong(key, "true or false", &v)),
        }
    }
    fn dtype(&mut self, key: &str) -> Result<DType, String> {
        let v = self.get(key)?.clone();
        match v.as_ident() {
            Some(s) => s
                .parse::<DType>()
                .map_err(|e| format!("attribute `{key}` of `{}`: {e}", self.op)),
            None => Err(self.wrong(key, "a dtype", &v)),
        }
    }
    fn string(&mut self, key: &str) -> Result<String, String> {
        match self.get(key)?.clone() {
            AttrValue::Str(s) => Ok(s),
            v => Err(self.wrong(key, "a string", &v)),
        }
    }
    fn list(&mut self, key: &str) -> Result<Vec<AttrValue>, String> {
        match self.get(key)?.clone() {
            AttrValue::List(l) => Ok(l),
            v => Err(self.wrong(key, "a list `[...]`", &v)),
        }
    }
    fn ints(&mut self, key: &str) -> Result<Vec<i64>, String> {
        let l = self.list(key)?;
        l.iter()
            .map(|v| match v {
                AttrValue::Int(i) => Ok(*i),
                v => Err(self.wrong(key, "a list of integers", v)),
            })
            .collect()
    }
    /// A collective's `mesh` (absent: `[]`, one group of all ranks).
    fn mesh(&mut self) -> Result<Vec<usize>, String> {
        if self.attrs.iter().any(|(k, _)| k == "mesh") {
            self.sizes("mesh")
        } else {
            Ok(vec![])
        }
    }
    /// A routed exchange's `overlap_flops` (absent: 0).
    fn overlap(&mut self) -> Result<Dim, String> {
        if self.attrs.iter().any(|(k, _)| k == "overlap_flops") {
            self.dim("overlap_flops")
        } else {
            Ok(Dim::from(0usize))
        }
    }
    /// A collective's `over` (absent: 0).
    fn over(&mut self) -> Result<usize, String> {
        if self.attrs.iter().any(|(k, _)| k == "over") {
            self.usize("over")
        } else {
            Ok(0)
        }
    }
    fn sizes(&mut self, key: &str) -> Result<Vec<usize>, String> {
        let op = self.op;
        self.ints(key)?
            .into_iter()
            .map(|i| {
                usize::try_from(i)
                    .map_err(|_| format!("attribute `{key}` of `{op}` must hold non-negative sizes, found {i}"))
            })
            .collect()
    }
    fn dim_of(&self, key: &str, v: &AttrValue) -> Result<Dim, String> {
        match v {
            AttrValue::Int(i) => Ok(Dim::constant(*i)),
            AttrValue::Dim(d) => Ok(d.clone()),
            v => Err(self.wrong(key, "a dimension", v)),
        }
    }
    fn dim(&mut self, key: &str) -> Result<Dim, String> {
        let v = self.get(key)?.clone();
        self.dim_of(key, &v)
    }
    fn shape(&mut self, key: &str) -> Result<Shape, String> {
        let l = self.list(key)?;
        Ok(Shape(l.iter().map(|v| self.dim_of(key, v)).collect::<Result<_, _>>()?))
    }
    fn finish(self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (k, _) in self.attrs {
            if !seen.insert(k) {
                return Err(format!("attribute `{k}` of `{}` given twice", self.op));
            }
        }
        for (i, used) in self.used.iter().enumerate() {
            if !used {
                return Err(format!("`{}` has no attribute `{}`", self.op, self.attrs[i].0));
            }
        }
        Ok(())
    }
}
